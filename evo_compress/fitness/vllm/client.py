"""Measurements against a running vLLM server through its OpenAI-compatible HTTP API.

Streamed completions give time to first token and time per output token; ``/metrics`` gives
the server's own Prometheus counters. Standard library only (``http.client`` and threads),
so the search process measures a server that runs in any other environment.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from evo_compress.exceptions import EvaluationError


class ClientError(EvaluationError):
    """A request to the server failed: an HTTP error, a broken stream or a timeout.
    ``status`` is the HTTP status when the server answered with an error, else None."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestTiming:
    """One streamed request. ``tpot_s`` is None when fewer than two tokens came back.
    ``paced``: its token chunks arrived one generation step apart (the median gap between
    them is at least ``PACED_GAP_S``), so ``tpot_s`` times generation. A stream whose tokens
    were held back and then arrived together (a busy API server on a CPU shared with the
    engine) is not paced: its ``tpot_s`` is near 0 and says nothing about generation."""

    ttft_s: float
    tpot_s: float | None
    output_tokens: int
    total_s: float
    paced: bool = True


@dataclass(frozen=True)
class LatencyReport:
    """Medians and 95th percentiles over the measured requests (warm-up requests left out),
    the TPOT ones over the paced requests (``RequestTiming.paced``; NaN when none was);
    ``throughput_tok_s`` is every output token over the measured phase's wall time."""

    requests: int
    concurrency: int
    max_tokens: int
    output_tokens: int
    wall_s: float
    ttft_median_ms: float
    ttft_p95_ms: float
    tpot_median_ms: float
    tpot_p95_ms: float
    throughput_tok_s: float
    paced_requests: int = 0

    @property
    def paced(self) -> bool:
        """Whether at least half the requests were paced: then the TPOT figures, taken over
        the paced requests only, time generation."""
        return 2 * self.paced_requests >= self.requests

    def to_json(self) -> dict[str, Any]:
        """The fields, NaN as None (strict JSON)."""
        return {
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in asdict(self).items()
        }


# ---------------------------------------------------------------------- HTTP
class _Endpoint:
    """A base URL split for ``http.client`` (a path prefix, e.g. behind a proxy, is kept)."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"`base_url` must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.prefix = parts.path

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def connect(self, timeout_s: float) -> http.client.HTTPConnection:
        kind = (
            http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        )
        return kind(self.host, self.port, timeout=timeout_s)


def _error_message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])[:500]
        if isinstance(data.get("message"), str):
            return str(data["message"])[:500]
    return text[:500]


class _Call:
    """One HTTP request whose failures all become ``ClientError`` naming method and URL."""

    def __init__(
        self,
        endpoint: _Endpoint,
        method: str,
        path: str,
        timeout_s: float,
        payload: dict[str, Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.method = method
        self.path = path
        self.url = endpoint.url(path)
        self.timeout_s = timeout_s
        self.payload = payload
        self.connection: http.client.HTTPConnection | None = None

    def fail(self, why: str, status: int | None = None) -> ClientError:
        return ClientError(f"{self.method} {self.url}: {why}", status)

    def open(self) -> http.client.HTTPResponse:
        body = None if self.payload is None else json.dumps(self.payload).encode()
        headers = {"Accept": "application/json, text/event-stream"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        self.connection = self.endpoint.connect(self.timeout_s)
        try:
            self.connection.request(
                self.method, self.endpoint.prefix + self.path, body=body, headers=headers
            )
            response = self.connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise self.translate(exc) from exc
        except BaseException:
            self.close()
            raise
        if not 200 <= response.status < 300:
            try:
                detail = _error_message(response.read())
            except (OSError, http.client.HTTPException):
                detail = ""
            self.close()
            raise self.fail(
                f"HTTP {response.status} {response.reason}: {detail}".rstrip(": "), response.status
            )
        return response

    def translate(self, exc: OSError | http.client.HTTPException) -> ClientError:
        if isinstance(exc, TimeoutError):
            return self.fail(f"no response within {self.timeout_s:g}s")
        return self.fail(f"{type(exc).__name__}: {exc}")

    def read_all(self) -> bytes:
        response = self.open()
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self.translate(exc) from exc
        finally:
            self.close()

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def _json(call: _Call) -> Any:
    body = call.read_all()
    try:
        return json.loads(body)
    except ValueError:
        raise call.fail(f"the reply is not JSON: {body[:200]!r}") from None


# ---------------------------------------------------------------------- completions
def _events(call: _Call, deadline: float) -> Iterator[tuple[float, Any]]:
    """(arrival time, decoded JSON) per server-sent event, until ``data: [DONE]``."""
    response = call.open()
    try:
        while True:
            if time.perf_counter() > deadline:
                raise call.fail(f"the stream did not finish within {call.timeout_s:g}s")
            line = response.readline()
            now = time.perf_counter()
            if not line:
                raise call.fail("the stream ended before `data: [DONE]`")
            text = line.decode("utf-8", errors="replace").strip()
            if not text.startswith("data:"):
                continue  # blank separators, comments, event names
            data = text[5:].strip()
            if data == "[DONE]":
                # Read the stream's end, so that closing the socket does not reset it.
                with contextlib.suppress(OSError, http.client.HTTPException):
                    response.read()
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise call.fail(f"a stream event is not JSON: {data[:200]!r}") from None
            if isinstance(event, dict) and "error" in event:
                raise call.fail(f"the server reported an error: {_error_message(data.encode())}")
            yield now, event
    except (OSError, http.client.HTTPException) as exc:
        raise call.translate(exc) from exc
    finally:
        call.close()


# Below this median gap between a request's token chunks they were delivered together, not
# as generated: a generation step takes milliseconds even for a tiny model on a GPU, while
# chunks that waited in a buffer arrive tens of microseconds apart (measured on the CPU build).
PACED_GAP_S = 0.0005


def stream_completion(
    base_url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    timeout_s: float = 300.0,
    ignore_eos: bool = True,
) -> RequestTiming:
    """One streamed greedy completion, timed. TTFT: from sending the request to the first
    chunk with output (text, or an empty-text token chunk as vLLM sends for special tokens);
    TPOT: from that chunk to the last, over (tokens - 1), where tokens is the usage figure the
    server reports, or the number of output chunks if it reports none."""
    payload = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    call = _Call(_Endpoint(base_url), "POST", "/v1/completions", timeout_s, payload)
    start = time.perf_counter()
    first = last = None
    chunks = 0
    arrivals: list[float] = []
    usage_tokens: int | None = None
    for now, event in _events(call, start + timeout_s):
        if not isinstance(event, dict):
            continue
        usage = event.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            usage_tokens = int(usage["completion_tokens"])
        for choice in event.get("choices") or []:
            text = choice.get("text") or ""
            # A chunk with text carries tokens; so does vLLM's empty-text chunk of a special
            # token. An empty chunk that only announces the finish reason does not.
            if text or choice.get("finish_reason") is None:
                first = now if first is None else first
                last = now
                chunks += 1
                arrivals.append(now)
    total = time.perf_counter() - start
    if first is None or last is None:
        raise call.fail("the stream carried no output tokens")
    tokens = usage_tokens if usage_tokens is not None else chunks
    tpot = (last - first) / (tokens - 1) if tokens >= 2 else None
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    paced = bool(gaps) and _percentile(gaps, 50) >= PACED_GAP_S
    return RequestTiming(first - start, tpot, tokens, total, paced)


def complete(
    base_url: str, model: str, prompt: str, max_tokens: int, timeout_s: float = 60.0
) -> str:
    """The text of one greedy, non-streamed completion."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    call = _Call(_Endpoint(base_url), "POST", "/v1/completions", timeout_s, payload)
    data = _json(call)
    try:
        return str(data["choices"][0]["text"])
    except (KeyError, IndexError, TypeError):
        raise call.fail(f"the reply has no choices[0].text: {str(data)[:200]}") from None


def tokenize(
    base_url: str, model: str, prompt: str, timeout_s: float = 60.0
) -> tuple[int, int | None]:
    """vLLM's ``POST /tokenize``: the prompt's token count as the server counts it (special
    tokens included, as for a completion) and the served context length (None: unknown)."""
    payload = {"model": model, "prompt": prompt, "add_special_tokens": True}
    call = _Call(_Endpoint(base_url), "POST", "/tokenize", timeout_s, payload)
    data = _json(call)
    try:
        count = int(data["count"])
        limit = data.get("max_model_len")
        return count, None if limit is None else int(limit)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise call.fail(f"the reply has no token count: {str(data)[:200]}") from None


def _percentile(values: Sequence[float], q: float) -> float:
    """numpy's percentile (linear interpolation between closest ranks); NaN when empty."""
    return float(np.percentile(values, q)) if len(values) else math.nan


def warm_up(
    base_url: str,
    model: str,
    prompts: Sequence[str],
    max_tokens: int,
    requests: int = 2,
    timeout_s: float = 300.0,
) -> None:
    """``requests`` uncounted streamed requests, one at a time, taken in turn from
    ``prompts`` (first-request costs: kernel set-up, allocation)."""
    if requests < 0:
        raise ValueError(f"`warmup` must be >= 0, got {requests}")
    for i in range(requests):
        stream_completion(base_url, model, prompts[i % len(prompts)], max_tokens, timeout_s)


def measure_latency(
    base_url: str,
    model: str,
    prompts: Sequence[str],
    max_tokens: int,
    concurrency: int,
    warmup: int = 2,
    timeout_s: float = 300.0,
) -> LatencyReport:
    """Stream every prompt once with at most ``concurrency`` requests in flight, after
    ``warmup`` uncounted requests (one at a time). EOS is ignored so each request produces
    ``max_tokens`` tokens. Any failed request fails the measurement."""
    if not prompts:
        raise ValueError("`prompts` must not be empty")
    if max_tokens < 2:
        raise ValueError(f"`max_tokens` must be >= 2 to time output tokens, got {max_tokens}")
    if concurrency < 1:
        raise ValueError(f"`concurrency` must be >= 1, got {concurrency}")
    warm_up(base_url, model, prompts, max_tokens, warmup, timeout_s)
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="evo-latency")
    try:
        start = time.perf_counter()
        futures = [
            pool.submit(stream_completion, base_url, model, p, max_tokens, timeout_s)
            for p in prompts
        ]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        wall = time.perf_counter() - start
        for future in done:
            error = future.exception()
            if error is not None:
                raise error
        timings = [f.result() for f in futures]
    finally:
        # On a failure or an interrupt, queued requests are dropped and running ones are not
        # waited for: they end with their timeout, or at once when the server stops.
        pool.shutdown(wait=False, cancel_futures=True)
    ttfts = [t.ttft_s * 1000.0 for t in timings]
    timed = [t for t in timings if t.tpot_s is not None]
    if not timed:
        raise ClientError(
            f"POST {base_url.rstrip('/')}/v1/completions: no request returned two or more "
            "tokens, so the time per output token cannot be measured"
        )
    tpots = [t.tpot_s * 1000.0 for t in timed if t.paced and t.tpot_s is not None]
    tokens = sum(t.output_tokens for t in timings)
    return LatencyReport(
        requests=len(timings),
        concurrency=concurrency,
        max_tokens=max_tokens,
        output_tokens=tokens,
        wall_s=wall,
        ttft_median_ms=_percentile(ttfts, 50),
        ttft_p95_ms=_percentile(ttfts, 95),
        tpot_median_ms=_percentile(tpots, 50),
        tpot_p95_ms=_percentile(tpots, 95),
        throughput_tok_s=tokens / wall if wall > 0 else math.inf,
        paced_requests=len(tpots),
    )


# ---------------------------------------------------------------------- metrics
def _samples(text: str) -> Iterator[Sample]:
    """The samples of a Prometheus text exposition, read by ``prometheus_client``'s parser a
    line at a time: it gives up on the whole text at the first line it cannot read, so that
    line alone is left out. Comments are left out before it sees them, ``# TYPE`` included:
    for a counter whose samples lack ``_total`` it would add the suffix to their names."""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        try:
            families = list(text_string_to_metric_families(line))
        except (ValueError, IndexError):  # IndexError: some malformed label sets
            continue
        for family in families:
            yield from family.samples


def parse_metrics(text: str) -> dict[str, Any]:
    """Prometheus text exposition -> one entry per metric name. Samples of a name are summed
    over their label sets (several engines, finish reasons); ``*_info`` metrics give their
    labels; histogram ``*_bucket`` samples give ``{le: cumulative count}``; ``*_created``
    timestamps, comments and lines that do not parse are left out."""
    out: dict[str, Any] = {}
    for sample in _samples(text):
        name, labels, value = sample.name, sample.labels, float(sample.value)
        if name.endswith("_created"):
            continue
        if name.endswith("_info"):
            out.setdefault(name, dict(labels))
        elif name.endswith("_bucket") and "le" in labels:
            buckets = out.setdefault(name, {})
            if isinstance(buckets, dict):
                buckets[labels["le"]] = buckets.get(labels["le"], 0.0) + value
        else:
            previous = out.get(name, 0.0)
            out[name] = (previous if isinstance(previous, float) else 0.0) + value
    return out


def _number(value: Any, kind: type[int] | type[float]) -> Any:
    """``value`` (a label's text or a sample) as ``kind``; None when absent, "None" or NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(number):
        return None
    return int(number) if kind is int else number


def kv_cache_figures(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's KV-cache figures from parsed ``/metrics``: the cache configuration (the labels
    of ``vllm:cache_config_info``) and its current usage as a fraction of the cache
    (``vllm:kv_cache_usage_perc``; ``vllm:gpu_cache_usage_perc`` in older releases).
    ``capacity_tokens`` is ``num_gpu_blocks`` x ``block_size``. A figure the server does not
    report is None."""
    info = metrics.get("vllm:cache_config_info")
    labels: Mapping[str, Any] = info if isinstance(info, dict) else {}
    block_size = _number(labels.get("block_size"), int)
    blocks = _number(labels.get("num_gpu_blocks"), int)
    usage = None
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        usage = _number(metrics.get(name), float)
        if usage is not None:
            break
    dtype = labels.get("cache_dtype")
    return {
        "cache_dtype": dtype if isinstance(dtype, str) else None,
        "block_size": block_size,
        "num_gpu_blocks": blocks,
        "capacity_tokens": None if None in (blocks, block_size) else blocks * block_size,
        "gpu_memory_utilization": _number(labels.get("gpu_memory_utilization"), float),
        "sliding_window": _number(labels.get("sliding_window"), int),
        "usage": usage,
    }


# The server's own time per output token, newest name first: vLLM V1's per-request figure
# (decode time over tokens - 1, from the engine's timestamps), then the per-token one of
# older releases and of the stand-in server.
SERVER_TPOT_METRICS = (
    "vllm:request_time_per_output_token_seconds",
    "vllm:time_per_output_token_seconds",
)


def server_tpot_ms(
    before: Mapping[str, Any], after: Mapping[str, Any]
) -> tuple[float, str] | None:
    """The server's mean time per output token (ms) over what it served between two
    ``scrape_metrics`` results, and the histogram it came from; None when it reports none.
    It times generation where the engine runs, so it holds when the streamed chunks did not
    arrive as they were generated."""
    for name in SERVER_TPOT_METRICS:
        total = _number(after.get(f"{name}_sum"), float)
        count = _number(after.get(f"{name}_count"), float)
        if total is None or count is None:
            continue
        total -= _number(before.get(f"{name}_sum"), float) or 0.0
        count -= _number(before.get(f"{name}_count"), float) or 0.0
        if count > 0:
            return total / count * 1000.0, name
    return None


def scrape_metrics(base_url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The server's ``/metrics``, parsed by ``parse_metrics``."""
    call = _Call(_Endpoint(base_url), "GET", "/metrics", timeout_s)
    return parse_metrics(call.read_all().decode("utf-8", errors="replace"))


__all__ = [
    "ClientError",
    "LatencyReport",
    "RequestTiming",
    "complete",
    "kv_cache_figures",
    "measure_latency",
    "parse_metrics",
    "scrape_metrics",
    "server_tpot_ms",
    "stream_completion",
    "tokenize",
    "warm_up",
]
