"""A stand-in for ``vllm serve``: vLLM's OpenAI-compatible HTTP API, served on the CPU.

``python -m evo_compress_doubles.vllm_server MODEL --host H --port P
--served-model-name N [vLLM engine args]`` answers ``/health``, ``/v1/models``, ``/metrics``,
``/tokenize`` and ``/v1/completions`` (streamed or not) like vLLM, context limit included.
MODEL, a folder with ``config.json``, is run greedily with transformers when torch imports;
anything else gets deterministic fake tokens ("echo" mode, no torch). ``--fake-*`` flags
inject the failures the lifecycle tests need. It is a test double: one request generates at
a time in transformers mode.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default for completions
ECHO_EOS_AFTER = 8  # echo mode's token count without ignore_eos (the last one is EOS)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STANDIN_VERSION = "evo-compress stand-in server (not vLLM)"


# ---------------------------------------------------------------------- arguments
def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m evo_compress_doubles.vllm_server",
        description="A stand-in for `vllm serve` (CPU, test double).",
        allow_abbrev=False,
    )
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None)
    # vLLM engine arguments that change what the stand-in reports or how it serves.
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
    parser.add_argument("--hf-overrides", default=None, help="JSON applied to config.json")
    # Echo mode timing.
    parser.add_argument("--fake-token-delay-ms", type=float, default=2.0)
    parser.add_argument("--fake-ttft-ms", type=float, default=5.0)
    # Fault injection.
    parser.add_argument(
        "--fake-echo", action="store_true", help="echo mode even for a model folder"
    )
    parser.add_argument("--fake-crash-at-start", action="store_true")
    parser.add_argument("--fake-startup-delay", type=float, default=0.0)
    parser.add_argument("--fake-never-healthy", action="store_true")
    parser.add_argument("--fake-ignore-sigterm", action="store_true")
    parser.add_argument("--fake-spawn-child", action="store_true")
    parser.add_argument(
        "--fake-spawn-detached-child",
        action="store_true",
        help="a child in its own session (escapes the server's process group)",
    )
    parser.add_argument("--fake-port-in-use-once", default=None, metavar="FILE")
    parser.add_argument(
        "--fake-stall-s",
        type=float,
        default=0.0,
        help="every completion waits this long before its first token (a hung engine)",
    )
    parser.add_argument(
        "--fake-burst-stream",
        action="store_true",
        help="each stream's chunks are held back and sent together at its end (an API "
        "server that got no CPU while the engine generated)",
    )
    parser.add_argument(
        "--fake-exit-on-request",
        type=int,
        default=None,
        metavar="N",
        help="the process exits with code 1 when the N-th completion request arrives",
    )
    return parser.parse_known_args(list(argv))


# ---------------------------------------------------------------------- metrics
class Histogram:
    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        for bound, count in zip(self.buckets, self.counts, strict=True):
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {float(count)}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {float(self.count)}')
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        out.append(f"{name}_count{{{labels}}} {float(self.count)}")
        return out


@dataclass
class Metrics:
    running: int = 0
    waiting: int = 0
    tokens_in_flight: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=Histogram)
    tpot: Histogram = field(default_factory=Histogram)
    e2e: Histogram = field(default_factory=Histogram)
    lock: threading.Lock = field(default_factory=threading.Lock)


# ---------------------------------------------------------------------- backends
@dataclass(frozen=True)
class Token:
    id: int
    text: str  # the token's own text (for logprobs)
    logprob: float
    top: dict[str, float]


Steps = Generator[tuple[Token, str, bool], None, None]  # (token, text delta, is EOS) per step


class EchoBackend:
    """Deterministic fake tokens " tok0 tok1 ..." with fixed delays; no model, no torch."""

    mode = "echo"

    def __init__(self, token_delay_s: float, ttft_s: float, max_model_len: int | None) -> None:
        self.token_delay_s = token_delay_s
        self.ttft_s = ttft_s
        self.max_model_len = max_model_len

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        return [zlib.crc32(word.encode()) % 50_000 for word in prompt.split()] or [0]

    def prompt_logprobs(self, ids: list[int], prompt: str | list[int], k: int) -> list[Token]:
        words = prompt.split() if isinstance(prompt, str) else [f"id{i}" for i in ids]
        words = words or [""]
        return [
            Token(i, f" {w}" if n else w, -1.0, {w: -1.0})
            for n, (i, w) in enumerate(zip(ids, words, strict=False))
        ]

    def generate(self, ids: list[int], max_tokens: int, ignore_eos: bool, k: int) -> Steps:
        """(token, text delta, is_eos) per generated token."""
        for i in range(max_tokens):
            time.sleep(self.ttft_s if i == 0 else self.token_delay_s)
            eos = not ignore_eos and i == ECHO_EOS_AFTER - 1
            text = "" if eos else f" tok{i}"
            yield Token(i, text, -1.0, {text: -1.0}), text, eos
            if eos:
                return


class TransformersBackend:
    """A local checkpoint run greedily, token by token, with a KV cache (CPU, float32)."""

    mode = "transformers"

    def __init__(self, folder: str, max_model_len: int | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        torch.set_num_threads(int(os.environ.get("EVO_STANDIN_THREADS", "1")))
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.model.eval()
        config_len = getattr(self.model.config, "max_position_embeddings", None)
        self.max_model_len = max_model_len or config_len
        eos = self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.lock = threading.Lock()
        # transformers renamed `past_key_values` to `cache` within 5.x.
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        return list(self.tokenizer(prompt).input_ids)

    def _forward(self, ids: list[int], cache: Any = None) -> tuple[Any, Any]:
        """Logits of the last position and the updated KV cache."""
        extra = {} if cache is None else {self.cache_arg: cache}
        out = self.model(input_ids=self.torch.tensor([ids]), use_cache=True, **extra)
        cache = out.get("cache")
        return out.logits[0, -1], cache if cache is not None else out.get("past_key_values")

    def _piece(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def _token(self, logits: Any, token_id: int, k: int) -> Token:
        logprobs = self.torch.log_softmax(logits.float(), dim=-1)
        top: dict[str, float] = {}
        if k > 0:
            values, indices = self.torch.topk(logprobs, min(k, logprobs.shape[-1]))
            top = {
                self._piece(int(i)): float(v)
                for v, i in zip(values.tolist(), indices.tolist(), strict=True)
            }
        chosen = float(logprobs[token_id])
        top.setdefault(self._piece(token_id), chosen)
        return Token(token_id, self._piece(token_id), chosen, top)

    def prompt_logprobs(self, ids: list[int], prompt: str | list[int], k: int) -> list[Token]:
        with self.lock, self.torch.inference_mode():
            logits = self.model(input_ids=self.torch.tensor([ids])).logits[0]
        tokens = [Token(ids[0], self._piece(ids[0]), math.nan, {})]
        tokens += [self._token(logits[n - 1], ids[n], k) for n in range(1, len(ids))]
        return tokens

    def generate(self, ids: list[int], max_tokens: int, ignore_eos: bool, k: int) -> Steps:
        torch = self.torch
        generated: list[int] = []
        shown = ""
        with self.lock, torch.inference_mode():
            logits, cache = self._forward(ids)
            for _ in range(max_tokens):
                token_id = int(torch.argmax(logits))
                token = self._token(logits, token_id, k)
                eos = token_id in self.eos_ids and not ignore_eos
                generated.append(token_id)
                text = str(self.tokenizer.decode(generated, skip_special_tokens=True))
                delta = ""
                # Hold back an incomplete multi-byte character. Should decoding change text
                # already sent (rare), carry on from the new length rather than stall.
                if not text.endswith("\ufffd"):
                    delta, shown = text[len(shown) :], text
                yield token, delta, eos
                if eos:
                    return
                logits, cache = self._forward([token_id], cache)


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The model folder's ``config.json`` with ``--hf-overrides`` applied on top, as vLLM
    does (``config.update``: derived fields are not recomputed)."""
    config: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads((Path(args.model) / "config.json").read_text())
        config = loaded if isinstance(loaded, dict) else {}
    if args.hf_overrides:
        overrides = json.loads(args.hf_overrides)
        if not isinstance(overrides, dict):
            raise SystemExit(f"--hf-overrides must be a JSON object, got {args.hf_overrides}")
        config.update(overrides)
    return config


def sliding_window(config: dict[str, Any]) -> int | None:
    """The window vLLM serves with (``ModelConfig.get_hf_config_sliding_window``): none
    while a ``use_sliding_window`` switch (Qwen2) is off, whatever ``sliding_window`` says."""
    if "use_sliding_window" in config and not config["use_sliding_window"]:
        return None
    window = config.get("sliding_window")
    return window if isinstance(window, int) and not isinstance(window, bool) else None


def make_backend(args: argparse.Namespace) -> EchoBackend | TransformersBackend:
    if not args.fake_echo and (Path(args.model) / "config.json").is_file():
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except Exception as exc:  # a broken or absent install: still serve, in echo mode
            print(f"WARNING: transformers unavailable ({exc}); echo mode", flush=True)
        else:
            return TransformersBackend(args.model, args.max_model_len)
    return EchoBackend(
        args.fake_token_delay_ms / 1000.0, args.fake_ttft_ms / 1000.0, args.max_model_len
    )


# ---------------------------------------------------------------------- requests
class RequestError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "BadRequestError", param: Any = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.status,
            }
        }


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[str | list[int]]
    max_tokens: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool
    stop: list[str]
    echo: bool
    logprobs: int | None


Prepared = tuple[str | list[int], list[int], int]  # prompt, its token ids, max_tokens


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) for v in value)


def parse_request(body: dict[str, Any], served_name: str) -> CompletionRequest:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model", served_name)
    if model != served_name:
        raise RequestError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    prompt = body.get("prompt")
    prompts: list[str | list[int]]
    if isinstance(prompt, str) or (_is_int_list(prompt) and prompt):
        prompts = [prompt]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, str) or (_is_int_list(p) and p) for p in prompt)
    ):
        prompts = list(prompt)
    else:
        raise RequestError(400, "`prompt` must be a string, a list of strings or of token ids")
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError(400, f"`max_tokens` must be at least 1, got {max_tokens!r}")
    temperature = body.get("temperature", 1.0)
    if temperature is not None and not isinstance(temperature, (int, float)):
        raise RequestError(400, f"`temperature` must be a number, got {temperature!r}")
    if body.get("n", 1) != 1:
        raise RequestError(400, "the stand-in server supports only `n` = 1")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "`stop` must be a string or a list of non-empty strings")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or logprobs < 0):
        raise RequestError(400, f"`logprobs` must be a non-negative integer, got {logprobs!r}")
    options = body.get("stream_options") or {}
    return CompletionRequest(
        prompts=prompts,
        max_tokens=max_tokens,
        stream=bool(body.get("stream", False)),
        include_usage=bool(options.get("include_usage", False)),
        ignore_eos=bool(body.get("ignore_eos", False)),
        stop=stop,
        echo=bool(body.get("echo", False)),
        logprobs=logprobs,
    )


@dataclass
class Piece:
    """What one step of a completion adds: text, the tokens behind it (for logprobs), how many
    of them were generated (an echoed prompt's are not), and maybe the finish reason."""

    text: str
    tokens: list[Token]
    generated: int
    finish_reason: str | None = None


class Engine:
    """Admission (``--max-num-seqs`` requests run, the rest wait), generation and metrics."""

    def __init__(self, backend: EchoBackend | TransformersBackend, args: argparse.Namespace):
        self.backend = backend
        self.args = args
        self.metrics = Metrics()
        slots = 1 if backend.mode == "transformers" else max(1, args.max_num_seqs)
        self.slots = threading.BoundedSemaphore(slots)
        dtype_factor = 2.0 if str(args.kv_cache_dtype).startswith("fp8") else 1.0
        # Like vLLM: the KV-cache budget grows with the memory share, and an fp8 cache holds
        # twice the tokens of a 16-bit one.
        blocks = round(1024 * args.gpu_memory_utilization / 0.9 * dtype_factor)
        self.num_gpu_blocks = int(args.num_gpu_blocks_override or blocks)
        self.sliding_window = sliding_window(model_config(args))

    def max_tokens_for(self, request: CompletionRequest, prompt_len: int) -> int:
        limit = self.backend.max_model_len
        if limit is not None and prompt_len >= limit:
            raise RequestError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your "
                f"prompt has {prompt_len} tokens.",
            )
        if request.max_tokens is None:
            return (limit - prompt_len) if limit is not None else DEFAULT_MAX_TOKENS
        if limit is not None and prompt_len + request.max_tokens > limit:
            raise RequestError(
                400,
                f"'max_tokens' is too large: {request.max_tokens}. This model's maximum "
                f"context length is {limit} tokens and your request has {prompt_len} input "
                f"tokens ({request.max_tokens} > {limit} - {prompt_len}).",
            )
        return request.max_tokens

    def run(
        self, request: CompletionRequest, prompt: str | list[int], ids: list[int], max_tokens: int
    ) -> Iterator[Piece]:
        """One prompt's completion, piece by piece; stop strings are held back and cut."""
        metrics = self.metrics
        start = time.perf_counter()
        with metrics.lock:
            metrics.waiting += 1
        self.slots.acquire()
        with metrics.lock:
            metrics.waiting -= 1
            metrics.running += 1
            metrics.tokens_in_flight += len(ids)
            metrics.prompt_tokens += len(ids)
        generated = 0
        finish = "length"
        steps: Steps | None = None
        try:
            k = request.logprobs or 0
            if request.echo:
                echoed = prompt if isinstance(prompt, str) else ""
                tokens = self.backend.prompt_logprobs(ids, prompt, k) if request.logprobs else []
                yield Piece(echoed, tokens, 0)
            hold = max((len(s) for s in request.stop), default=1) - 1
            text, sent = "", 0
            pending: list[Token] = []
            last = start
            steps = self.backend.generate(ids, max_tokens, request.ignore_eos, k)
            for token, delta, eos in steps:
                now = time.perf_counter()
                with metrics.lock:
                    if generated == 0:
                        metrics.ttft.observe(now - start)
                    else:
                        metrics.tpot.observe(now - last)
                    metrics.generation_tokens += 1
                    metrics.tokens_in_flight += 1
                last = now
                generated += 1
                text += delta
                pending.append(token)
                cut = min((i for s in request.stop if (i := text.find(s)) >= 0), default=-1)
                if cut >= 0 or eos:
                    finish = "stop"
                    yield Piece(text[sent : cut if cut >= 0 else len(text)], pending, 1, finish)
                    return
                if generated == max_tokens:
                    yield Piece(text[sent:], pending, 1, finish)
                    return
                safe = max(sent, len(text) - hold)
                yield Piece(text[sent:safe], pending, 1)
                sent, pending = safe, []
        finally:
            if steps is not None:
                steps.close()  # at once, not when collected: it may hold the model's lock
            with metrics.lock:
                metrics.running -= 1
                metrics.tokens_in_flight -= len(ids) + generated
                metrics.finished[finish] = metrics.finished.get(finish, 0) + 1
                metrics.e2e.observe(time.perf_counter() - start)
            self.slots.release()

    def render_metrics(self, served_name: str) -> str:
        m = self.metrics
        labels = f'model_name="{served_name}",engine="0"'
        capacity = self.num_gpu_blocks * self.args.block_size
        with m.lock:
            usage = min(1.0, m.tokens_in_flight / capacity) if capacity else 0.0
            lines = [
                "# HELP vllm:num_requests_running Number of requests in model execution batches.",
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running{{{labels}}} {float(m.running)}",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting{{{labels}}} {float(m.waiting)}",
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f"vllm:kv_cache_usage_perc{{{labels}}} {usage}",
                "# TYPE vllm:prompt_tokens_total counter",
                f"vllm:prompt_tokens_total{{{labels}}} {float(m.prompt_tokens)}",
                "# TYPE vllm:generation_tokens_total counter",
                f"vllm:generation_tokens_total{{{labels}}} {float(m.generation_tokens)}",
                "# TYPE vllm:request_success_total counter",
            ]
            for reason, count in sorted(m.finished.items()):
                lines.append(
                    f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} '
                    f"{float(count)}"
                )
            lines += m.ttft.lines("vllm:time_to_first_token_seconds", labels)
            lines += m.tpot.lines("vllm:time_per_output_token_seconds", labels)
            lines += m.e2e.lines("vllm:e2e_request_latency_seconds", labels)
        info = {
            "block_size": str(self.args.block_size),
            "cache_dtype": str(self.args.kv_cache_dtype),
            "gpu_memory_utilization": str(self.args.gpu_memory_utilization),
            "num_gpu_blocks": str(self.num_gpu_blocks),
            "sliding_window": str(self.sliding_window),  # "None" without one, like vLLM
        }
        text = ",".join(f'{k}="{v}"' for k, v in info.items())
        lines += ["# TYPE vllm:cache_config_info gauge", f"vllm:cache_config_info{{{text}}} 1.0"]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- HTTP
class StandInServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False  # a taken port fails like uvicorn's bind does

    def __init__(self, address: tuple[str, int], engine: Engine, args: argparse.Namespace):
        super().__init__(address, Handler)
        self.engine = engine
        self.args = args
        self.served_name = args.served_model_name or args.model
        self.started = time.monotonic()
        self.completions = 0
        self.completions_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)  # a client hanging up is no error


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked streams: like uvicorn
    server: StandInServer
    _held: list[bytes] | None = None  # a stream's chunks held back (--fake-burst-stream)

    def setup(self) -> None:
        super().setup()
        # One small write per token: without this, Nagle's algorithm delays the stream.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        print(f"INFO: {self.address_string()} - {format % args}", flush=True)

    # -------------------------------------------------------------- replies
    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode())

    def _error(self, error: RequestError) -> None:
        self._json(error.status, error.body())

    def _healthy(self) -> bool:
        args = self.server.args
        if args.fake_never_healthy:
            return False
        return time.monotonic() - self.server.started >= args.fake_startup_delay

    # -------------------------------------------------------------- routes
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200 if self._healthy() else 503, b"")
        elif path == "/v1/models":
            engine = self.server.engine
            model = {
                "id": self.server.served_name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "vllm",
                "root": self.server.args.model,
                "parent": None,
                "max_model_len": engine.backend.max_model_len,
            }
            self._json(200, {"object": "list", "data": [model]})
        elif path == "/metrics":
            text = self.server.engine.render_metrics(self.server.served_name)
            self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/version":
            self._json(200, {"version": STANDIN_VERSION})
        else:
            self._error(RequestError(404, f"no route {path}", "NotFoundError"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path == "/tokenize":
            self._tokenize(raw)
            return
        if path != "/v1/completions":
            self._error(RequestError(404, f"no route {path}", "NotFoundError"))
            return
        self._maybe_crash()
        try:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
            request = parse_request(body, self.server.served_name)
            engine = self.server.engine
            prepared = []
            for prompt in request.prompts:
                ids = engine.backend.encode(prompt)
                prepared.append((prompt, ids, engine.max_tokens_for(request, len(ids))))
        except RequestError as error:
            self._error(error)
            return
        if request.stream:
            self._stream(request, prepared)
            return
        try:
            self._complete(request, prepared)
        except Exception as exc:  # a generation failure is the client's 500, not a dead socket
            self._error(RequestError(500, f"{type(exc).__name__}: {exc}", "InternalServerError"))

    def _tokenize(self, raw: bytes) -> None:
        """vLLM's ``POST /tokenize``: a prompt's token ids, their count and the context."""
        try:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
            if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
                raise RequestError(400, "`prompt` must be a string")
            model = body.get("model", self.server.served_name)
            if model not in (None, self.server.served_name):
                raise RequestError(
                    404, f"The model `{model}` does not exist.", "NotFoundError", "model"
                )
        except RequestError as error:
            self._error(error)
            return
        backend = self.server.engine.backend
        ids = backend.encode(body["prompt"])
        self._json(200, {"count": len(ids), "max_model_len": backend.max_model_len, "tokens": ids})

    def _maybe_crash(self) -> None:
        server = self.server
        with server.completions_lock:
            server.completions += 1
            count = server.completions
        if server.args.fake_exit_on_request == count:
            print(f"ERROR: fake crash at completion request {count}", file=sys.stderr, flush=True)
            os._exit(1)

    def _head(self) -> dict[str, Any]:
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.server.served_name,
        }

    @staticmethod
    def _logprobs(tokens: list[Token], offset: int) -> dict[str, Any]:
        offsets, position = [], offset
        for token in tokens:
            offsets.append(position)
            position += len(token.text)
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [None if math.isnan(t.logprob) else t.logprob for t in tokens],
            "top_logprobs": [t.top or None for t in tokens],
            "text_offset": offsets,
        }

    def _complete(self, request: CompletionRequest, prepared: list[Prepared]) -> None:
        engine = self.server.engine
        time.sleep(self.server.args.fake_stall_s)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, (prompt, ids, max_tokens) in enumerate(prepared):
            text, tokens, finish = "", [], None
            for piece in engine.run(request, prompt, ids, max_tokens):
                text += piece.text
                tokens += piece.tokens
                completion_tokens += piece.generated
                finish = piece.finish_reason or finish
            prompt_tokens += len(ids)
            logprobs = self._logprobs(tokens, 0) if request.logprobs is not None else None
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            )
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        self._json(200, {**self._head(), "choices": choices, "usage": usage})

    def _chunk(self, data: Any) -> None:
        """One server-sent event, as one HTTP chunk (one write: no Nagle delay)."""
        payload = b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode())
        payload += b"\n\n"
        framed = b"%x\r\n%s\r\n" % (len(payload), payload)
        held = self._held
        if held is not None and data != b"[DONE]":
            held.append(framed)
            return
        if held:
            self._held = None
            framed = b"".join(held) + framed
        self.wfile.write(framed)

    def _stream(self, request: CompletionRequest, prepared: list[Prepared]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        engine = self.server.engine
        head = self._head()
        prompt_tokens = completion_tokens = 0
        time.sleep(self.server.args.fake_stall_s)
        self._held = [] if self.server.args.fake_burst_stream else None
        try:
            for index, (prompt, ids, max_tokens) in enumerate(prepared):
                offset = 0
                for piece in engine.run(request, prompt, ids, max_tokens):
                    completion_tokens += piece.generated
                    choice: dict[str, Any] = {
                        "index": index,
                        "text": piece.text,
                        "logprobs": None,
                        "finish_reason": piece.finish_reason,
                        "stop_reason": None,
                    }
                    if request.logprobs is not None:
                        choice["logprobs"] = self._logprobs(piece.tokens, offset)
                    offset += len(piece.text)
                    self._chunk({**head, "choices": [choice]})
                prompt_tokens += len(ids)
            if request.include_usage:
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                self._chunk({**head, "choices": [], "usage": usage})
            self._chunk(b"[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; the generator was closed
            return
        except Exception as exc:  # headers are out: report in the stream, like vLLM
            error = RequestError(500, f"{type(exc).__name__}: {exc}", "InternalServerError")
            self._chunk(error.body())
            self._chunk(b"[DONE]")
            self.wfile.write(b"0\r\n\r\n")


# ---------------------------------------------------------------------- main
def _spawn_child(detached: bool) -> int:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        stdin=subprocess.DEVNULL,
        start_new_session=detached,
    )
    return child.pid


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:
        print(STANDIN_VERSION)
        return 0
    print(f"stand-in vLLM server argv: {json.dumps(argv)}", flush=True)
    args, unknown = parse_args(argv)
    if unknown:
        print(f"INFO: engine arguments accepted and ignored: {unknown}", flush=True)
    if args.fake_crash_at_start:
        print("ERROR: fake crash at start (--fake-crash-at-start)", file=sys.stderr, flush=True)
        return 3
    marker = args.fake_port_in_use_once
    if marker is not None and not os.path.exists(marker):
        Path(marker).write_text("taken once\n")
        print("OSError: [Errno 98] Address already in use", file=sys.stderr, flush=True)
        return 1
    if args.fake_spawn_child:
        print(f"INFO: started child process {_spawn_child(False)}", flush=True)
    if args.fake_spawn_detached_child:
        print(f"INFO: started detached child process {_spawn_child(True)}", flush=True)
    if args.fake_ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:

        def on_sigterm(_signum: int, _frame: Any) -> None:
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, on_sigterm)
    backend = make_backend(args)
    print(f"INFO: stand-in backend: {backend.mode}", flush=True)
    engine = Engine(backend, args)
    server = StandInServer((args.host, args.port), engine, args)
    print(f"INFO: Started server process [{os.getpid()}]", flush=True)
    print(f"INFO: Uvicorn-like stand-in running on http://{args.host}:{args.port}", flush=True)

    def announce() -> None:
        if args.fake_never_healthy:
            return
        time.sleep(args.fake_startup_delay)
        print("INFO: Application startup complete.", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        print("INFO: Shutting down", flush=True)
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
