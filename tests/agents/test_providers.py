"""The provider clients: the real SDKs against a local server speaking each wire format."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest
from evo_compress_doubles.providers import (
    FakeProviderServer,
    Hang,
    RecordedRequest,
    Reply,
    Response,
    Status,
    request_schema,
    request_system,
    request_text,
)
from pydantic import ValidationError

from evo_compress.agents.providers import (
    PROVIDERS,
    AnthropicClient,
    GoogleClient,
    LLMClient,
    MissingKeyError,
    OpenAIClient,
    OpenAICompatibleClient,
    Price,
    ProviderError,
    ProviderSettings,
    Usage,
    make_client,
    parse_retry_after,
    scrub,
    settings_error,
)
from evo_compress.config import format_validation_error
from evo_compress.exceptions import RegistryError

ALL = ["anthropic", "openai", "google", "openai-compatible"]
KEYED = ["anthropic", "openai", "google"]
KEYS = {
    "ANTHROPIC_API_KEY": "sk-ant-api03-Zq8VhXc2LrT5wN1mKp7s",
    "OPENAI_API_KEY": "sk-proj-Bf4jR9tYu2KdLw6QzX0e",
    "GOOGLE_API_KEY": "AIzaSyD3kF7qLm0PxRt9VbN2cW",
    "LOCAL_LLM_KEY": "local-Hn5TgQ8rWz1YpLk3",
}
SYSTEM = "You propose compression recipes."
USER = "Parents: A and B. Propose one child."
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"bits": {"type": "integer"}, "why": {"type": "string"}},
    "required": ["bits", "why"],
    "additionalProperties": False,
}
ANSWER = {"bits": 4, "why": "halve the memory"}


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as fake:
        yield fake


def settings_for(server: FakeProviderServer, provider: str, **overrides: Any) -> ProviderSettings:
    fields: dict[str, Any] = {
        "provider": provider,
        "model": "test-model",
        "base_url": server.base_url(provider),
        "timeout_s": 5.0,
        "max_attempts": 3,
        "backoff_initial_s": 0.0,
        **overrides,
    }
    return ProviderSettings.model_validate(fields)


def client_for(
    server: FakeProviderServer, provider: str, waits: list[float] | None = None, **overrides: Any
) -> LLMClient:
    client = make_client(settings_for(server, provider, **overrides), env=KEYS)
    if waits is not None:
        client._sleep = waits.append  # record tenacity's waits instead of sleeping
    return client


def sent_key(provider: str) -> str:
    return {
        "anthropic": KEYS["ANTHROPIC_API_KEY"],
        "openai": KEYS["OPENAI_API_KEY"],
        "google": KEYS["GOOGLE_API_KEY"],
        "openai-compatible": "not-needed",
    }[provider]


# ---------------------------------------------------------------------------------- success
@pytest.mark.parametrize("provider", ALL)
def test_valid_reply_carries_text_usage_and_the_structured_request(
    server: FakeProviderServer, provider: str
) -> None:
    server.queue(Reply(json.dumps(ANSWER), input_tokens=321, output_tokens=54, model="served-7"))
    with client_for(server, provider) as client:
        reply = client.complete(SYSTEM, USER, SCHEMA, "proposal")

    assert json.loads(reply.text) == ANSWER
    assert reply.usage == Usage(321, 54) and reply.usage.total == 375
    assert reply.attempts == 1 and reply.model == "served-7" and reply.latency_s >= 0
    [request] = server.requests
    assert request_schema(request) == SCHEMA
    assert request_text(request) == USER
    assert request_system(request) == SYSTEM
    assert request.api_key == sent_key(provider)
    assert request.model == "test-model"
    body = request.body
    if provider == "anthropic":
        assert body["tool_choice"] == {"type": "tool", "name": "proposal"}
        assert body["max_tokens"] == 2048
    elif provider == "google":
        assert body["generationConfig"]["responseMimeType"] == "application/json"
        assert body["generationConfig"]["maxOutputTokens"] == 2048
        assert body["generationConfig"]["temperature"] == 0.7
    else:
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema"
        assert fmt["json_schema"]["name"] == "proposal" and fmt["json_schema"]["strict"] is True
        assert body["temperature"] == 0.7
        limit = "max_completion_tokens" if provider == "openai" else "max_tokens"
        assert body[limit] == 2048


@pytest.mark.parametrize("provider", ALL)
def test_model_and_usage_fall_back_when_the_server_omits_them(
    server: FakeProviderServer, provider: str
) -> None:
    server.queue(Reply("{}", with_usage=False))
    reply = client_for(server, provider).complete(SYSTEM, USER, SCHEMA)
    assert reply.usage == Usage(0, 0)
    assert reply.model == "test-model"


def test_anthropic_plain_text_reply_when_no_tool_was_used(server: FakeProviderServer) -> None:
    server.queue(Reply("not json at all"))
    reply = client_for(server, "anthropic").complete(SYSTEM, USER, SCHEMA)
    assert reply.text == "not json at all"


def test_temperature_none_leaves_it_to_the_provider(server: FakeProviderServer) -> None:
    client_for(server, "openai", temperature=None).complete(SYSTEM, USER, SCHEMA)
    client_for(server, "google", temperature=None).complete(SYSTEM, USER, SCHEMA)
    openai_request, google_request = server.requests
    assert "temperature" not in openai_request.body
    assert "temperature" not in google_request.body["generationConfig"]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("json_object", {"type": "json_object"}), ("none", None), ("json_schema", "schema")],
)
def test_openai_compatible_structured_output_modes(
    server: FakeProviderServer, mode: str, expected: Any
) -> None:
    client = client_for(server, "openai-compatible", structured_output=mode)
    assert json.loads(client.complete(SYSTEM, USER, SCHEMA).text) == {}
    [request] = server.requests
    text = request_text(request)
    if expected == "schema":
        assert request_schema(request) == SCHEMA
        assert text == USER
    else:
        assert request.body.get("response_format") == expected
        assert request_schema(request) is None
        # Without a schema in the request the model still needs it: it is in the prompt.
        assert text.startswith(USER)
        block = text.split("```json\n", 1)[1].split("\n```", 1)[0]
        assert json.loads(block) == SCHEMA


def test_one_client_serves_concurrent_requests(server: FakeProviderServer) -> None:
    server.default = lambda request: Reply(json.dumps({"echo": request_text(request)}))
    client = client_for(server, "openai")
    replies: dict[int, str] = {}

    def ask(i: int) -> None:
        replies[i] = client.complete(SYSTEM, f"prompt {i}", SCHEMA).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert {i: json.loads(text)["echo"] for i, text in replies.items()} == {
        i: f"prompt {i}" for i in range(6)
    }
    assert len(server.requests) == 6


# ---------------------------------------------------------------------------------- retries
@pytest.mark.parametrize("provider", ALL)
def test_rate_limit_waits_as_long_as_retry_after_says(
    server: FakeProviderServer, provider: str
) -> None:
    waits: list[float] = []
    server.queue(Status(429, headers={"Retry-After": "7"}), Reply(json.dumps(ANSWER)))
    reply = client_for(server, provider, waits).complete(SYSTEM, USER, SCHEMA)
    assert json.loads(reply.text) == ANSWER
    assert reply.attempts == 2 and len(server.requests) == 2
    assert waits == [7.0]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After": "0.25"}, 0.25),
        ({"Retry-After": "3600"}, 12.0),  # capped at backoff_max_s
    ],
)
def test_retry_after_forms_and_cap(
    server: FakeProviderServer, headers: dict[str, str], expected: float
) -> None:
    waits: list[float] = []
    server.queue(Status(429, headers=headers), Reply("{}"))
    client_for(server, "openai", waits, backoff_max_s=12.0).complete(SYSTEM, USER, SCHEMA)
    assert waits == [pytest.approx(expected)]


def test_retry_after_as_http_date() -> None:
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    seconds = parse_retry_after({"Retry-After": when})
    assert seconds is not None and 25 <= seconds <= 30
    past = format_datetime(datetime.now(timezone.utc) - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after({"retry-after": past}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-3"}) is None
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({}) is None


@pytest.mark.parametrize("provider", ALL)
def test_server_errors_are_retried_until_success(
    server: FakeProviderServer, provider: str
) -> None:
    waits: list[float] = []
    server.queue(Status(500), Status(500), Reply(json.dumps(ANSWER)))
    reply = client_for(server, provider, waits).complete(SYSTEM, USER, SCHEMA)
    assert json.loads(reply.text) == ANSWER
    assert reply.attempts == 3 and len(server.requests) == 3
    assert waits == [0.0, 0.0]  # backoff_initial_s=0, no Retry-After


def test_exponential_backoff_without_retry_after(server: FakeProviderServer) -> None:
    waits: list[float] = []
    server.queue(Status(502), Status(502), Status(502), Reply("{}"))
    client = client_for(
        server, "openai", waits, max_attempts=4, backoff_initial_s=0.5, backoff_max_s=1.5
    )
    client.complete(SYSTEM, USER, SCHEMA)
    assert len(waits) == 3
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 1.5 and waits[2] == 1.5


@pytest.mark.parametrize("provider", ALL)
def test_persistent_overload_gives_up_after_max_attempts(
    server: FakeProviderServer, provider: str
) -> None:
    server.default = lambda request: Status(503, message="try later")
    with pytest.raises(ProviderError) as caught:
        client_for(server, provider, []).complete(SYSTEM, USER, SCHEMA)
    error = caught.value
    assert error.transient and error.status == 503 and error.attempts == 3
    assert str(error).startswith(f"{provider}: HTTP 503 service unavailable: try later")
    assert str(error).endswith("(after 3 attempts)")
    assert len(server.requests) == 3


def test_anthropic_overloaded_529_is_retried(server: FakeProviderServer) -> None:
    server.queue(Status(529, message="Overloaded"), Reply("{}"))
    assert client_for(server, "anthropic", []).complete(SYSTEM, USER, SCHEMA).attempts == 2


def test_x_should_retry_false_is_obeyed_but_no_other_4xx_is_retried(
    server: FakeProviderServer,
) -> None:
    server.queue(Status(500, headers={"x-should-retry": "false"}), Reply("{}"))
    with pytest.raises(ProviderError) as caught:
        client_for(server, "openai", []).complete(SYSTEM, USER, SCHEMA)
    assert not caught.value.transient and len(server.requests) == 1
    for code in (400, 409, 422):
        server.reset()
        server.queue(Status(code, headers={"x-should-retry": "true"}), Reply("{}"))
        with pytest.raises(ProviderError):
            client_for(server, "openai", []).complete(SYSTEM, USER, SCHEMA)
        assert len(server.requests) == 1


@pytest.mark.parametrize("provider", ALL)
@pytest.mark.parametrize("code", [400, 401, 404])
def test_client_errors_fail_at_once(server: FakeProviderServer, provider: str, code: int) -> None:
    server.queue(Status(code, message="you asked wrong"), Reply("{}"))
    with pytest.raises(ProviderError) as caught:
        client_for(server, provider, []).complete(SYSTEM, USER, SCHEMA)
    error = caught.value
    assert not error.transient and error.status == code and error.attempts == 1
    assert f"{provider}: HTTP {code}" in str(error) and "you asked wrong" in str(error)
    assert len(server.requests) == 1 and server.pending == 1


@pytest.mark.parametrize("provider", ALL)
def test_timeouts_are_retried_then_reported(server: FakeProviderServer, provider: str) -> None:
    server.queue(Hang(5), Hang(5))
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        client_for(server, provider, [], timeout_s=0.3, max_attempts=2).complete(
            SYSTEM, USER, SCHEMA
        )
    assert time.monotonic() - started < 4
    error = caught.value
    assert error.transient and error.status is None
    assert str(error) == f"{provider}: request timed out after 0.3s (after 2 attempts)"
    assert len(server.requests) == 2


@pytest.mark.parametrize("provider", ALL)
def test_a_success_status_with_a_foreign_body_is_an_invalid_response(
    server: FakeProviderServer, provider: str
) -> None:
    server.queue(Status(200, body="<html>a login page</html>"))
    with pytest.raises(ProviderError) as caught:
        client_for(server, provider, []).complete(SYSTEM, USER, SCHEMA)
    assert str(caught.value).startswith(f"{provider}: invalid response")
    assert not caught.value.transient and len(server.requests) == 1


def test_connection_refused_is_transient(server: FakeProviderServer) -> None:
    port = server.port
    server.close()
    client = client_for(
        server, "openai", [], max_attempts=2, base_url=f"http://127.0.0.1:{port}/v1"
    )
    with pytest.raises(ProviderError) as caught:
        client.complete(SYSTEM, USER, SCHEMA)
    assert caught.value.transient and "connection failed" in str(caught.value)
    assert caught.value.attempts == 2


def test_closing_the_server_ends_a_hung_request(server: FakeProviderServer) -> None:
    server.queue(Hang(60))
    errors: list[ProviderError] = []

    def ask() -> None:
        try:
            client_for(server, "openai", max_attempts=1, timeout_s=30).complete(
                SYSTEM, USER, SCHEMA
            )
        except ProviderError as exc:
            errors.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    server.close()
    thread.join(timeout=10)
    assert time.monotonic() - started < 5
    assert len(errors) == 1 and errors[0].transient


# ---------------------------------------------------------------------------------- keys
@pytest.mark.parametrize("provider", KEYED)
def test_missing_key_names_the_variable(server: FakeProviderServer, provider: str) -> None:
    variable = f"{provider.upper()}_API_KEY"
    settings = settings_for(server, provider)
    assert settings.key_env() == variable
    for env in ({}, {variable: "  "}):
        with pytest.raises(MissingKeyError) as caught:
            make_client(settings, env=env)
        assert (
            str(caught.value) == f"{provider}: no API key: set the environment variable {variable}"
        )
        assert not caught.value.transient
    custom = settings_for(server, provider, api_key_env="TEAM_KEY")
    with pytest.raises(MissingKeyError, match="TEAM_KEY"):
        make_client(custom, env={variable: "present-but-not-the-one"})
    assert make_client(custom, env={"TEAM_KEY": "k-123"}).settings.key_env() == "TEAM_KEY"
    assert server.requests == []


def test_openai_compatible_needs_no_key_unless_it_names_one(server: FakeProviderServer) -> None:
    plain = settings_for(server, "openai-compatible")
    assert plain.key_env() is None
    make_client(plain, env={}).complete(SYSTEM, USER, SCHEMA)
    assert server.requests[-1].api_key == "not-needed"
    keyed = settings_for(server, "openai-compatible", api_key_env="LOCAL_LLM_KEY")
    with pytest.raises(MissingKeyError, match="LOCAL_LLM_KEY"):
        make_client(keyed, env={})
    make_client(keyed, env=KEYS).complete(SYSTEM, USER, SCHEMA)
    assert server.requests[-1].api_key == KEYS["LOCAL_LLM_KEY"]


def _echo_credentials(request: RecordedRequest) -> Response:
    """A 401 whose message repeats every credential header, whole and masked."""
    raw = " | ".join(
        f"{name}={request.headers[name]}"
        for name in ("authorization", "x-api-key", "x-goog-api-key")
        if name in request.headers
    )
    key = request.api_key or ""
    return Status(401, message=f"Incorrect API key provided: {raw}; masked {key[3:-2]}")


@pytest.mark.parametrize("provider", ALL)
def test_the_key_never_reaches_an_error_message(
    server: FakeProviderServer, provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = {"api_key_env": "LOCAL_LLM_KEY"} if provider == "openai-compatible" else {}
    client = client_for(server, provider, [], **overrides)
    key = client._key
    assert key is not None and key in KEYS.values()
    # a retried failure first (logged), then the echoing 401
    server.queue(
        lambda request: Status(429, message=f"slow down, {request.api_key}"), _echo_credentials
    )
    caplog.set_level(logging.DEBUG, logger="evo_compress")
    with pytest.raises(ProviderError) as caught:
        client.complete(SYSTEM, USER, SCHEMA)
    assert server.requests[-1].api_key == key  # the server did see (and echo) the key
    error = caught.value
    texts = [str(error), repr(error), *map(str, error.args), repr(client), caplog.text]
    for text in texts:
        assert key not in text
        assert not any(key[i : i + 8] in text for i in range(len(key) - 7)), text
    assert "Incorrect API key provided" in str(error) and "***" in str(error)
    # no SDK exception (whose text may quote the key) rides along as cause or context
    assert error.__cause__ is None and error.__context__ is None
    assert any("slow down" in record.getMessage() for record in caplog.records)


def test_scrub_catches_whole_and_partial_keys() -> None:
    key = "sk-proj-Bf4jR9tYu2KdLw6QzX0e"
    assert scrub(f"key {key}!", key) == "key ***!"
    assert scrub("masked sk-...Lw6QzX0e and Bf4jR9tYu2", key) == "masked sk-...*** and ***"
    assert scrub("short Bf4jR9t stays", key) == "short Bf4jR9t stays"
    assert scrub("nothing here", None) == "nothing here"
    assert scrub("pin 1234 and 1234", "1234") == "pin *** and ***"


def test_provider_errors_pickle_with_their_fields() -> None:
    error = ProviderError(
        "openai: HTTP 429 rate limited", transient=True, status=429, retry_after=2
    )
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.transient, copy.status, copy.retry_after) == (
        ProviderError,
        "openai: HTTP 429 rate limited",
        True,
        429,
        2,
    )
    missing = pickle.loads(pickle.dumps(MissingKeyError("google: no API key")))
    assert isinstance(missing, MissingKeyError) and not missing.transient


# ---------------------------------------------------------------------------------- settings
def test_an_api_key_field_is_refused_without_echoing_it() -> None:
    secret = "sk-live-Qm3Wz8Rt5Yx2Lp9N"
    with pytest.raises(ValidationError) as caught:
        ProviderSettings.model_validate({"provider": "openai", "model": "m", "api_key": secret})
    [error] = caught.value.errors()
    assert error["loc"] == ("api_key",)
    assert "environment" in error["msg"] and "api_key_env" in error["msg"]
    line = format_validation_error(caught.value, "config.yaml", "operators.llm.")
    assert line.startswith("config.yaml: `operators.llm.api_key` is not accepted")
    for text in (str(caught.value), repr(caught.value.errors()), line):
        assert secret not in text


def test_an_api_key_env_holding_the_key_itself_is_refused() -> None:
    secret = "sk-live-Qm3Wz8Rt5Yx2Lp9N"
    with pytest.raises(ValidationError) as caught:
        ProviderSettings(provider="openai", model="m", api_key_env=secret)
    assert caught.value.errors()[0]["loc"] == ("api_key_env",)
    assert secret not in str(caught.value) and secret not in repr(caught.value.errors())


@pytest.mark.parametrize(
    ("fields", "where", "words"),
    [
        ({"provider": "openai-compatible", "model": "m"}, ("base_url",), "required"),
        ({"provider": "openai", "model": "m", "temprature": 1}, ("temprature",), "Extra"),
        ({"provider": "openai", "model": ""}, ("model",), "at least 1"),
        ({"provider": "openai", "model": "m", "temperature": 3}, ("temperature",), "2"),
        ({"provider": "cohere", "model": "m"}, ("provider",), "anthropic"),
        ({"provider": "openai", "model": "m", "max_attempts": 0}, ("max_attempts",), "1"),
        (
            {"provider": "google", "model": "m", "structured_output": "json_object"},
            ("structured_output",),
            "openai",
        ),
        (
            {"provider": "openai", "model": "m", "price": {"input_per_mtok": -1}},
            ("price", "input_per_mtok"),
            "0",
        ),
    ],
)
def test_invalid_settings_are_refused(
    fields: dict[str, Any], where: tuple[str, ...], words: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        ProviderSettings.model_validate(fields)
    error = caught.value.errors()[0]
    assert error["loc"] == where and words in error["msg"]


def test_an_unknown_provider_is_one_line_listing_the_known_ones() -> None:
    with pytest.raises(ValidationError) as caught:
        ProviderSettings.model_validate({"provider": "anthropc", "model": "m"})
    line = format_validation_error(caught.value, "config.yaml", "operators.llm.")
    assert line == (
        "config.yaml: `operators.llm.provider` is not a known LLM provider (did you mean "
        "`anthropic`?); known: anthropic, google, openai, openai-compatible, got 'anthropc'"
    )


class EchoClient(LLMClient):
    """A provider registered at run time, as a plugin's would be: its key variable and its
    field checks come from the class."""

    provider = "echo"
    default_key_env = "ECHO_API_KEY"

    @classmethod
    def check_settings(cls, settings: ProviderSettings) -> None:
        super().check_settings(settings)
        if settings.temperature not in (None, 0.0):
            raise settings_error("temperature", "must be 0 for provider `echo`", 0.7)

    def _classify(self, exc: Exception) -> ProviderError | None:
        return None

    def _make_sdk_client(self) -> Any:
        return None

    def _request(
        self, system: str, user: str, schema: dict[str, Any], schema_name: str
    ) -> tuple[str, Usage, str]:
        return json.dumps({"echo": user}), Usage(len(user), 1), "echo-1"


@pytest.fixture
def echo_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    # as the registry holds an entry-point plugin once it is loaded
    PROVIDERS.names()  # discovery first, so the entries below are not rediscovered
    monkeypatch.setitem(PROVIDERS._entries, "echo", EchoClient)
    monkeypatch.setitem(PROVIDERS._origins, "echo", "evo-echo 1.0")


def test_a_registered_provider_supplies_its_key_variable_and_checks(echo_registered) -> None:
    settings = ProviderSettings(provider="echo", model="m", temperature=0)
    assert settings.key_env() == "ECHO_API_KEY"
    with pytest.raises(MissingKeyError, match="set the environment variable ECHO_API_KEY"):
        make_client(settings, env={})
    client = make_client(settings, env={"ECHO_API_KEY": "k-echo-123"})
    assert isinstance(client, EchoClient)
    assert json.loads(client.complete(SYSTEM, USER, SCHEMA).text) == {"echo": USER}
    with pytest.raises(ValidationError) as caught:
        ProviderSettings(provider="echo", model="m")
    [error] = caught.value.errors()
    assert error["loc"] == ("temperature",) and error["msg"] == "must be 0 for provider `echo`"
    # the base class's own check: structured_output is for clients that honour it
    with pytest.raises(ValidationError, match="openai and openai-compatible only, not `echo`"):
        ProviderSettings(provider="echo", model="m", temperature=0, structured_output="none")
    with pytest.raises(ValidationError, match="known: anthropic, echo, google"):
        ProviderSettings(provider="ech", model="m")


def test_settings_are_frozen_and_round_trip() -> None:
    settings = ProviderSettings(
        provider="openai-compatible",
        model="qwen",
        base_url="http://127.0.0.1:8000/v1",
        structured_output="json_object",
        price=Price(input_per_mtok=0.1, output_per_mtok=0.4),
    )
    assert ProviderSettings.model_validate_json(settings.model_dump_json()) == settings
    assert ProviderSettings.model_validate(settings.model_dump()) == settings
    with pytest.raises(ValidationError):
        settings.model = "other"  # type: ignore[misc]


def test_cost_from_the_price() -> None:
    priced = ProviderSettings(
        provider="anthropic", model="m", price={"input_per_mtok": 3.0, "output_per_mtok": 15.0}
    )
    assert priced.cost(Usage(1_000_000, 200_000)) == pytest.approx(6.0)
    assert priced.cost(Usage()) == 0.0
    assert ProviderSettings(provider="anthropic", model="m").cost(Usage(10, 10)) is None


def test_priced_reply_cost(server: FakeProviderServer) -> None:
    server.queue(Reply("{}", input_tokens=2_000, output_tokens=500))
    price = {"input_per_mtok": 2.5, "output_per_mtok": 10.0}
    client = client_for(server, "openai", price=price)
    reply = client.complete(SYSTEM, USER, SCHEMA)
    assert client.settings.cost(reply.usage) == pytest.approx(0.005 + 0.005)


def test_usage_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Usage(-1, 0)


# ---------------------------------------------------------------------------------- registry
def test_registry_maps_every_provider_to_its_client(server: FakeProviderServer) -> None:
    assert PROVIDERS.names() == sorted(ALL)
    expected = {
        "anthropic": AnthropicClient,
        "openai": OpenAIClient,
        "google": GoogleClient,
        "openai-compatible": OpenAICompatibleClient,
    }
    for provider, cls in expected.items():
        client = make_client(settings_for(server, provider), env=KEYS)
        assert type(client) is cls and client.provider == provider
        assert "test-model" in repr(client)
        client.close()
    with pytest.raises(RegistryError, match="did you mean `anthropic`"):
        PROVIDERS.get("anthropc")


def test_importing_the_providers_loads_no_sdk() -> None:
    code = (
        "import sys, evo_compress.agents, evo_compress.agents.providers\n"
        "sdks = [m for m in sys.modules if m.split('.')[0] in ('anthropic', 'openai')"
        " or m.startswith('google.genai')]\n"
        "print(sdks)\n"
        "sys.exit(1 if sdks else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------- fake server
def test_fake_server_reports_broken_scripts_and_unknown_paths(server: FakeProviderServer) -> None:
    def broken(request: RecordedRequest) -> Response:
        raise KeyError("oops")

    server.queue(broken)
    with pytest.raises(ProviderError, match="HTTP 500"):
        client_for(server, "openai", max_attempts=1).complete(SYSTEM, USER, SCHEMA)
    assert server.errors == ["scripted response failed: KeyError: 'oops'"]
    request = urllib.request.Request(server.url + "/v1/embeddings", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 404
    caught.value.close()
    assert server.requests[-1].wire is None
    server.reset()
    assert server.requests == [] and server.errors == [] and server.pending == 0
