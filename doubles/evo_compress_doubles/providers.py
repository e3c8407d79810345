"""A fake LLM provider on 127.0.0.1 that speaks the OpenAI, Anthropic and Google wire formats,
so tests drive the real provider SDKs with scripted replies, errors and hangs.

    with FakeProviderServer() as server:
        server.queue(Status(429, headers={"Retry-After": "0"}), Reply('{"a": 1}'))
        url = server.base_url("openai")  # what ProviderSettings.base_url must be
        settings = ProviderSettings(provider="openai", model="m", base_url=url)
        ...
        server.requests[-1].body  # what the SDK sent

Each request is answered by the next queued response, or by ``server.default(request)`` once
the queue is empty. The wire format is chosen by the request's path, so one server serves
every provider at once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import urlsplit

Wire = Literal["openai", "anthropic", "google"]

# Which path each SDK posts to (google-genai 3.x: API version v1 unless
# GOOGLE_GENAI_API_VERSION says otherwise). Routing only looks at the path's ending.
PATHS: dict[str, str] = {
    "openai": "/v1/chat/completions",
    "openai-compatible": "/v1/chat/completions",
    "anthropic": "/v1/messages",
    "google": "/v1/models/{model}:generateContent",
}


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received: headers have lower-case names, body is parsed JSON."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    wire: Wire | None  # the format its path belongs to (None: an unknown path)

    @property
    def model(self) -> str | None:
        """The model the request names (in the body, or in the path for Google)."""
        if self.wire == "google":
            name = urlsplit(self.path).path.rsplit("/", 1)[-1]
            return name.split(":", 1)[0]
        if isinstance(self.body, dict) and isinstance(self.body.get("model"), str):
            return str(self.body["model"])
        return None

    @property
    def api_key(self) -> str | None:
        """The credential the request carried (Bearer token, x-api-key or x-goog-api-key)."""
        for name in ("x-goog-api-key", "x-api-key"):
            if self.headers.get(name):
                return self.headers[name]
        authorization = self.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            return authorization[7:]
        return authorization or None


@dataclass(frozen=True)
class Reply:
    """A successful reply in the requesting provider's own format.

    Anthropic replies carry ``text`` as the input of a ``tool_use`` block when it is a JSON
    object and the request offered a tool, else as a ``text`` block. ``model`` defaults to the
    requested one; ``with_usage=False`` leaves the usage out, as some local servers do.
    """

    text: str
    input_tokens: int = 11
    output_tokens: int = 7
    model: str | None = None
    with_usage: bool = True


@dataclass(frozen=True)
class Status:
    """An HTTP error. Without ``body`` the provider's error JSON is built around ``message``;
    a dict ``body`` is sent as JSON, a str one as plain text."""

    code: int
    body: Any = None
    headers: Mapping[str, str] | None = None
    message: str | None = None


@dataclass(frozen=True)
class Hang:
    """Wait ``seconds`` before answering with ``then`` (default: an empty JSON object reply).
    Closing the server ends the wait at once."""

    seconds: float
    then: Reply | Status | None = None


Response = Reply | Status | Hang
Script = Response | Callable[[RecordedRequest], Response]


def empty_reply(request: RecordedRequest) -> Response:
    """The default answer: a valid reply whose text is ``{}``."""
    return Reply("{}")


# ---------------------------------------------------------------------------------- reading
def wire_of(path: str) -> Wire | None:
    route = urlsplit(path).path
    if route.endswith("/chat/completions"):
        return "openai"
    if route.endswith("/messages"):
        return "anthropic"
    if route.endswith(":generateContent"):
        return "google"
    return None


def _texts(content: Any) -> list[str]:
    """The text of a message content: a string, or a list of text blocks / parts."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, dict):
        content = [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
    return out


def request_text(request: RecordedRequest) -> str:
    """The user prompt a recorded request carried, in any of the three formats."""
    body = request.body if isinstance(request.body, dict) else {}
    texts: list[str] = []
    if request.wire in ("openai", "anthropic"):
        for message in body.get("messages") or []:
            if isinstance(message, dict) and message.get("role") == "user":
                texts += _texts(message.get("content"))
    elif request.wire == "google":
        contents = body.get("contents") or []
        for content in contents if isinstance(contents, list) else [contents]:
            if isinstance(content, dict) and content.get("role", "user") == "user":
                texts += _texts(content.get("parts"))
    return "\n".join(texts)


def request_system(request: RecordedRequest) -> str | None:
    """The system prompt a recorded request carried (None: none)."""
    body = request.body if isinstance(request.body, dict) else {}
    texts: list[str] = []
    if request.wire == "openai":
        for message in body.get("messages") or []:
            if isinstance(message, dict) and message.get("role") in ("system", "developer"):
                texts += _texts(message.get("content"))
    elif request.wire == "anthropic":
        texts += _texts(body.get("system"))
    elif request.wire == "google":
        instruction = body.get("systemInstruction") or body.get("system_instruction")
        if isinstance(instruction, dict):
            texts += _texts(instruction.get("parts"))
        else:
            texts += _texts(instruction)
    return "\n".join(texts) if texts else None


def request_schema(request: RecordedRequest) -> dict[str, Any] | None:
    """The JSON schema a recorded request asked the reply to follow (None: none)."""
    body = request.body if isinstance(request.body, dict) else {}
    found: Any = None
    if request.wire == "openai":
        response_format = body.get("response_format") or {}
        if response_format.get("type") == "json_schema":
            found = (response_format.get("json_schema") or {}).get("schema")
    elif request.wire == "anthropic":
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        wanted = (body.get("tool_choice") or {}).get("name")
        chosen = [t for t in tools if t.get("name") == wanted] or tools
        if chosen:
            found = chosen[0].get("input_schema")
        else:
            found = ((body.get("output_config") or {}).get("format") or {}).get("schema")
    elif request.wire == "google":
        config = body.get("generationConfig") or body.get("generation_config") or {}
        for name in ("responseJsonSchema", "response_json_schema", "responseSchema"):
            if config.get(name) is not None:
                found = config[name]
                break
    return found if isinstance(found, dict) else None


# ---------------------------------------------------------------------------------- writing
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}
_GOOGLE_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def error_body(wire: Wire | None, code: int, message: str) -> dict[str, Any]:
    """The error JSON each provider sends with status ``code``."""
    if wire == "anthropic":
        kind = _ANTHROPIC_TYPES.get(code, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if wire == "google":
        status = _GOOGLE_STATUSES.get(code, "UNKNOWN")
        return {"error": {"code": code, "message": message, "status": status}}
    kind = _OPENAI_TYPES.get(code, "server_error" if code >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def reply_body(request: RecordedRequest, reply: Reply, serial: int) -> dict[str, Any]:
    """A successful reply in the format of ``request``."""
    model = reply.model or request.model or "fake-model"
    body: dict[str, Any]
    if request.wire == "anthropic":
        sent = request.body if isinstance(request.body, dict) else {}
        tools = sent.get("tools") or []
        tool_name = (sent.get("tool_choice") or {}).get("name") or (
            tools[0].get("name") if tools else None
        )
        try:
            parsed = json.loads(reply.text)
        except (ValueError, RecursionError):  # a scripted hostile reply goes out as text
            parsed = None
        if tool_name and isinstance(parsed, dict):
            block = {
                "type": "tool_use",
                "id": f"toolu_{serial}",
                "name": tool_name,
                "input": parsed,
            }
            content = [block]
            stop_reason = "tool_use"
        else:
            content = [{"type": "text", "text": reply.text}]
            stop_reason = "end_turn"
        body = {
            "id": f"msg_fake{serial}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
        }
        if reply.with_usage:
            body["usage"] = {
                "input_tokens": reply.input_tokens,
                "output_tokens": reply.output_tokens,
            }
        return body
    if request.wire == "google":
        body = {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": reply.text}]},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "modelVersion": model,
            "responseId": f"fake{serial}",
        }
        if reply.with_usage:
            body["usageMetadata"] = {
                "promptTokenCount": reply.input_tokens,
                "candidatesTokenCount": reply.output_tokens,
                "totalTokenCount": reply.input_tokens + reply.output_tokens,
            }
        return body
    body = {
        "id": f"chatcmpl-fake{serial}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
    }
    if reply.with_usage:
        body["usage"] = {
            "prompt_tokens": reply.input_tokens,
            "completion_tokens": reply.output_tokens,
            "total_tokens": reply.input_tokens + reply.output_tokens,
        }
    return body


# ---------------------------------------------------------------------------------- server
class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.0"  # one request per connection: no stale keep-alive sockets

    def do_POST(self) -> None:
        self.server.owner._handle(self)

    do_GET = do_POST

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung handler never blocks shutdown or interpreter exit
    owner: FakeProviderServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out hang up on purpose


@dataclass
class _State:
    queue: deque[Script] = field(default_factory=deque)
    requests: list[RecordedRequest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class FakeProviderServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, default: Callable[[RecordedRequest], Response] | None = None) -> None:
        self.default: Callable[[RecordedRequest], Response] = default or empty_reply
        self._state = _State()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._serial = itertools.count(1)
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-provider-server",
            daemon=True,
        )
        self._thread.start()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> FakeProviderServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()  # wakes hung handlers
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def base_url(self, provider: str) -> str:
        """What to set as ``ProviderSettings.base_url`` for ``provider``."""
        if provider in ("openai", "openai-compatible"):
            return f"{self.url}/v1"
        if provider in ("anthropic", "google"):
            return self.url
        raise ValueError(f"unknown provider {provider!r}")

    # ------------------------------------------------------------------ script and record
    def queue(self, *responses: Script) -> None:
        """Answer the next requests with ``responses``, in order (a callable gets the
        request and returns the response)."""
        with self._lock:
            self._state.queue.extend(responses)

    @property
    def pending(self) -> int:
        """Queued responses not used yet."""
        with self._lock:
            return len(self._state.queue)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._state.requests)

    @property
    def errors(self) -> list[str]:
        """Exceptions raised by scripted callables (each answered with HTTP 500)."""
        with self._lock:
            return list(self._state.errors)

    def reset(self) -> None:
        """Forget the queue, the recorded requests and errors (``default`` stays)."""
        with self._lock:
            self._state = _State()

    # ------------------------------------------------------------------ serving
    def _next(self, request: RecordedRequest) -> Response:
        with self._lock:
            script: Script = self._state.queue.popleft() if self._state.queue else self.default
        if isinstance(script, (Reply, Status, Hang)):
            return script
        try:
            return script(request)
        except Exception as exc:  # a broken script: answer 500 and keep the message
            message = f"scripted response failed: {type(exc).__name__}: {exc}"
            with self._lock:
                self._state.errors.append(message)
            return Status(500, message=message)

    def _handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        request = RecordedRequest(
            method=handler.command,
            path=handler.path,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            wire=wire_of(handler.path),
        )
        with self._lock:
            self._state.requests.append(request)
        if request.wire is None:
            response: Response = Status(404, message=f"no route for {request.path}")
        else:
            response = self._next(request)
        if isinstance(response, Hang):
            if self._closing.wait(response.seconds):
                return
            response = response.then or Reply("{}")
        serial = next(self._serial)
        headers: dict[str, str] = {}
        if isinstance(response, Reply):
            code, payload = 200, json.dumps(reply_body(request, response, serial)).encode()
            content_type = "application/json"
        else:
            code = response.code
            headers.update(response.headers or {})
            if isinstance(response.body, str):
                payload, content_type = response.body.encode(), "text/plain"
            else:
                error = response.body
                if error is None:
                    error = error_body(request.wire, code, response.message or f"error {code}")
                payload, content_type = json.dumps(error).encode(), "application/json"
        with contextlib.suppress(OSError):  # the client may have given up already
            handler.send_response(code)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(payload)


# ---------------------------------------------------------------------------------- a fake model
def model_like(space: Any = None) -> Callable[[RecordedRequest], Response]:
    """Answer evo-compress prompts as a model would: valid recipes of ``space`` (default: the
    built-in one) drawn from a generator seeded by the prompt's text, so the same prompt always
    gets the same reply (as a replayed one must) and a re-ask gets a new one. A prompt that
    asks for several candidate children gets that many."""
    import hashlib
    import re

    import numpy as np

    from evo_compress.genomes import SearchSpace, nest

    space = space or SearchSpace.builtin()

    def recipe_json(rng: np.random.Generator) -> dict[str, Any]:
        recipe = space.sample(rng)
        return nest({name: recipe.get(name) for name in space.genes})  # null: inactive

    def answer(request: RecordedRequest) -> Response:
        text = request_text(request)
        digest = hashlib.sha256(text.encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        wanted = re.search(r"# Task: seed\nPropose (\d+) distinct recipes", text)
        if wanted:
            recipes = [recipe_json(rng) for _ in range(int(wanted.group(1)))]
            return Reply(json.dumps({"recipes": recipes, "rationale": "a spread"}), 900, 400)
        several = re.search(r"# Task: \w+\nPropose (\d+) distinct child recipes", text)
        if several:
            count = int(several.group(1))
            candidates = [
                {
                    "recipe": recipe_json(rng),
                    "rationale": "lower precision where accuracy has slack",
                    "confidence": 0.6,
                }
                for _ in range(count)
            ]
            return Reply(json.dumps({"candidates": candidates}), 700, 120 * count)
        body = {
            "recipe": recipe_json(rng),
            "rationale": "lower precision where accuracy has slack",
            "confidence": 0.6,
        }
        return Reply(json.dumps(body), 700, 120)

    return answer


def operator_params(
    server: FakeProviderServer, provider: str, key_env: str = "EVO_TEST_KEY", **extra: Any
) -> dict[str, Any]:
    """LLM operator params that point ``provider`` at ``server``, with no backoff waits."""
    params: dict[str, Any] = {
        "provider": provider,
        "model": f"{provider}-model",
        "base_url": server.base_url(provider),
        "backoff_initial_s": 0.0,
        "backoff_max_s": 0.0,
        "timeout_s": 10.0,
    }
    if provider != "openai-compatible":
        params["api_key_env"] = key_env
    return params | extra


def llm_search_sections(
    server: FakeProviderServer,
    generations: int = 3,
    crossover_extra: dict[str, Any] | None = None,
    llm: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Config sections of a small search that uses every provider of ``server``: LLM seeding
    (google), LLM crossover (anthropic) and mutation (openai-compatible, label ``local``)
    beside the classic and expert operators."""
    return {
        "search": {
            "population_size": 8,
            "generations": generations,
            "seed": 5,
            "recipes": "llm",
            "operators": {
                "crossover": [
                    {"name": "uniform"},
                    {
                        "name": "llm",
                        "params": operator_params(server, "anthropic", **(crossover_extra or {})),
                    },
                ],
                "mutation": [
                    {"name": "gene"},
                    {"name": "expert"},
                    {
                        "name": "llm",
                        "label": "local",
                        "params": operator_params(server, "openai-compatible"),
                    },
                ],
            },
        },
        "llm": {"seeder": operator_params(server, "google"), **(llm or {})},
        "constraints": {"max_accuracy_drop": 0.1},
    }
