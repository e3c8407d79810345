"""Clients that send one structured-output request to an LLM provider (Anthropic, OpenAI, Google
or an OpenAI-compatible server) and return the reply text and token usage, with retries.

``ProviderSettings.provider`` names an entry of :data:`PROVIDERS`: a built-in client, or an
:class:`LLMClient` subclass a plugin registers under the ``evo_compress.providers`` entry point.
Each client class says which environment variable holds its key (``default_key_env``) and
checks the settings it is given (``check_settings``).

The provider SDKs are imported inside the clients, so importing this module stays cheap and
works without them. API keys come only from the environment and never appear in an error
message, a repr, a log line or a recorded reply: every message and reply text is scrubbed of the
key before it leaves a client.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from evo_compress.exceptions import ConfigError, EvoCompressError, RegistryError
from evo_compress.registry import BUILTIN, Registry
from evo_compress.text import terminal_safe

log = logging.getLogger(__name__)
_T = TypeVar("_T")

NO_KEY_PLACEHOLDER = "not-needed"  # sent to OpenAI-compatible servers that need no key
REDACTED = "***"
MIN_SECRET_FRAGMENT = 8  # scrub any piece of the key this long (masked echoes, truncations)
MAX_DETAIL_CHARS = 300  # of the provider's own error message, in ours

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Of the 4xx only rate limits (429) and request timeouts (408) are worth another try.
_TRANSIENT_STATUSES = frozenset({408, 429})
_STATUS_LABELS: dict[int, str] = {
    400: "bad request",
    401: "unauthorized",
    402: "payment required",
    403: "permission denied",
    404: "not found",
    408: "request timeout",
    409: "conflict",
    413: "request too large",
    422: "unprocessable request",
    425: "too early",
    429: "rate limited",
    500: "server error",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
    529: "overloaded",
}


# ---------------------------------------------------------------------------------- settings
def settings_error(field: str, message: str, shown: object = None) -> ValidationError:
    """A validation error on ``field`` whose recorded input is ``shown`` (never a secret):
    pydantic merges it into the caller's error with the field path prefixed. What a provider's
    ``LLMClient.check_settings`` raises for a field it refuses.

    Args:
        field: The refused field of ``ProviderSettings``.
        message: What is wrong, as the end of a sentence that starts with the field.
        shown: The input the error records and echoes; never the key itself.

    Returns:
        The error, to be raised.
    """
    error = PydanticCustomError("value_error", message)
    return ValidationError.from_exception_data(
        "ProviderSettings", [InitErrorDetails(type=error, loc=(field,), input=shown)]
    )


class Price(BaseModel):
    """USD per million tokens, to turn token usage into cost.

    Attributes:
        input_per_mtok: USD per million input (prompt) tokens.
        output_per_mtok: USD per million output tokens.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: float = Field(ge=0, allow_inf_nan=False)
    output_per_mtok: float = Field(ge=0, allow_inf_nan=False)


@dataclass(frozen=True)
class Usage:
    """Tokens one request consumed, as the provider reported them (0 when it did not).

    Attributes:
        input_tokens: Prompt tokens.
        output_tokens: Reply tokens.

    Raises:
        ValueError: A count is negative.
    """

    input_tokens: int = 0
    output_tokens: int = 0

    def __post_init__(self) -> None:
        if self.input_tokens < 0 or self.output_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got {self}")

    @property
    def total(self) -> int:
        """Input and output tokens together."""
        return self.input_tokens + self.output_tokens


class ProviderSettings(BaseModel):
    """Which provider and model to ask, and how (limits, retries, structured output, price).

    No field holds an API key: ``api_key_env`` names the environment variable to read it from.
    The provider's client class checks the settings too (``LLMClient.check_settings``), so
    settings that validate are settings it can serve.

    Attributes:
        provider: A registered LLM provider: a built-in or an installed provider plugin.
        model: The provider's model name.
        base_url: The server's URL: required for ``openai-compatible``; a proxy or test
            server otherwise.
        api_key_env: The environment variable that holds the key (default: the provider's
            ``default_key_env``; ``openai-compatible``: none needed).
        temperature: Sampling temperature; None: the provider's default (reasoning models
            need it).
        max_tokens: Output tokens per request.
        timeout_s: Seconds per HTTP request.
        max_attempts: HTTP attempts per request (1: no retry).
        backoff_initial_s: The first wait between attempts, in seconds.
        backoff_max_s: The longest wait between attempts, in seconds.
        structured_output: How the reply schema is enforced (OpenAI and openai-compatible
            only); ``auto``: ``json_schema``.
        price: USD per million tokens, for the cost of each call; None: not counted.

    Raises:
        pydantic.ValidationError: A field is invalid, an ``api_key`` is given, the provider
            is unknown, or its client class refuses the settings.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = Field(
        description="A registered LLM provider: a built-in or an installed provider plugin"
    )
    model: str = Field(min_length=1)
    base_url: str | None = Field(
        None, description="Required for openai-compatible; a proxy or test server otherwise"
    )
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the key (default: the provider's own "
        "`default_key_env`; openai-compatible: none needed)",
    )
    temperature: float | None = Field(
        0.7, ge=0, le=2, description="None: the provider's default (reasoning models need it)"
    )
    max_tokens: int = Field(2048, ge=1, description="Output tokens per request")
    timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False, description="Per HTTP request")
    max_attempts: int = Field(5, ge=1, description="HTTP attempts per request (1: no retry)")
    backoff_initial_s: float = Field(1.0, ge=0, allow_inf_nan=False)
    backoff_max_s: float = Field(30.0, ge=0, allow_inf_nan=False)
    structured_output: Literal["auto", "json_schema", "json_object", "none"] = Field(
        "auto", description="OpenAI and openai-compatible only; auto: json_schema"
    )
    price: Price | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_settings(cls, data: Any) -> Any:
        # Raised as field errors whose input is redacted, so that no error message (which
        # echoes the bad value) can ever carry the key.
        if isinstance(data, Mapping):
            if "api_key" in data:
                raise settings_error(
                    "api_key",
                    "is not accepted: API keys are read only from the environment; set "
                    "`api_key_env` to the name of the environment variable that holds the key",
                    REDACTED,
                )
            env_name = data.get("api_key_env")
            if env_name is not None and not (
                isinstance(env_name, str) and _ENV_NAME.fullmatch(env_name)
            ):
                raise settings_error(
                    "api_key_env",
                    "must be the name of an environment variable (letters, digits and "
                    "underscores), not the key itself",
                    REDACTED,
                )
        return data

    @field_validator("provider")
    @classmethod
    def _registered(cls, name: str) -> str:
        # Plugins are listed here but not imported: only the named one is loaded, below.
        if name not in PROVIDERS:
            known = PROVIDERS.names()
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise PydanticCustomError(
                "value_error",
                f"is not a known LLM provider{hint}; known: {', '.join(known)}",
            )
        return name

    @model_validator(mode="after")
    def _check_provider_fields(self) -> ProviderSettings:
        self.client_class().check_settings(self)
        return self

    def client_class(self) -> type[LLMClient]:
        """The client class registered under ``provider`` (a plugin is imported here).

        Returns:
            The ``LLMClient`` subclass.

        Raises:
            pydantic.ValidationError: The provider's plugin fails to load, or is not an
                ``LLMClient`` subclass.
        """
        try:
            found = PROVIDERS.get(self.provider)
        except RegistryError as exc:  # a plugin that fails to import: one line
            raise settings_error("provider", str(exc), self.provider) from None
        if not (isinstance(found, type) and issubclass(found, LLMClient)):
            raise settings_error(
                "provider",
                f"`{self.provider}` is registered as {found!r}, not an LLMClient subclass",
                self.provider,
            )
        return found

    def key_env(self) -> str | None:
        """The environment variable the key is read from.

        Returns:
            ``api_key_env``, else the client class's ``default_key_env``; None: no key
            needed.
        """
        if self.api_key_env is not None:
            return self.api_key_env
        return self.client_class().default_key_env

    def cost(self, usage: Usage) -> float | None:
        """USD for ``usage`` at ``price``.

        Args:
            usage: Tokens one or more requests consumed.

        Returns:
            The cost in USD; None when no price is configured.
        """
        if self.price is None:
            return None
        return (
            usage.input_tokens * self.price.input_per_mtok
            + usage.output_tokens * self.price.output_per_mtok
        ) / 1e6


# ---------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LLMReply:
    """One answered request: the reply text (JSON for structured output) and what it cost.

    Attributes:
        text: The reply, scrubbed of the key.
        usage: Tokens the successful attempt consumed.
        latency_s: Seconds from the first attempt to the reply, waits between attempts
            included.
        attempts: HTTP attempts, 1 when the first one succeeded.
        model: The model as reported by the provider, else the configured one.
    """

    text: str
    usage: Usage
    latency_s: float  # from the first attempt to the reply, waits between attempts included
    attempts: int  # HTTP attempts, 1 when the first one succeeded
    model: str  # as reported by the provider, else the configured one


def _restore_error(cls: type[ProviderError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ProviderError(EvoCompressError):
    """A request to an LLM provider failed. ``transient`` failures (rate limits, timeouts,
    overloaded servers) are worth retrying; the others (a bad request, a wrong key) are not.

    Args:
        message: What failed, in one line, never holding the key.
        transient: Whether another attempt may succeed.
        status: The HTTP status; None for timeouts and connection failures.
        retry_after: Seconds the provider asked to wait before the next attempt.
        attempts: HTTP attempts made; set by ``LLMClient.complete`` on the error it raises.
        elapsed_s: Seconds from the first attempt to giving up, waits included; set by
            ``LLMClient.complete``.
    """

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        status: int | None = None,
        retry_after: float | None = None,
        attempts: int | None = None,
        elapsed_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status  # HTTP status, None for timeouts and connection failures
        self.retry_after = retry_after  # seconds the provider asked us to wait
        # set by LLMClient.complete on the error it raises: HTTP attempts made, and the
        # seconds from the first attempt to giving up, waits between attempts included
        self.attempts = attempts
        self.elapsed_s = elapsed_s

    @property
    def message(self) -> str:
        """The error's message."""
        return str(self.args[0]) if self.args else ""

    def _with(self, message: str, **changes: Any) -> ProviderError:
        """A copy of this error (same class) with another message and ``changes``."""
        state = {**self.__dict__, **changes}
        restored: ProviderError = _restore_error(type(self), (message,), state)
        return restored

    def __reduce__(self) -> tuple[Any, ...]:  # the keyword-only arguments break the default
        return _restore_error, (type(self), self.args, self.__dict__)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, transient={self.transient}, "
            f"status={self.status})"
        )


class MissingKeyError(ProviderError):
    """The environment variable that should hold the provider's API key is unset or empty.

    Args:
        message: What is missing: the provider and the variable's name.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


# ---------------------------------------------------------------------------------- helpers
def scrub(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` and every piece of it of 8+ characters replaced by ``***``.

    Args:
        text: Any text that may quote the secret (an error message, a reply).
        secret: The API key; None or empty: nothing to scrub.

    Returns:
        The scrubbed text.
    """
    if not secret:
        return text
    text = text.replace(secret, REDACTED)
    if len(secret) <= MIN_SECRET_FRAGMENT:
        return text
    pieces = _pieces(secret)
    out: list[str] = []
    i, n = 0, len(text)
    # A regex finds where the next 8-character piece starts (a megabyte reply is scrubbed in
    # C, not character by character); from there the longest piece is taken, as pieces of
    # pieces are pieces.
    while (found := pieces.search(text, i)) is not None:
        start = found.start()
        k = MIN_SECRET_FRAGMENT
        while start + k < n and text[start : start + k + 1] in secret:
            k += 1
        out += [text[i:start], REDACTED]
        i = start + k
    out.append(text[i:])
    return "".join(out)


@functools.lru_cache(maxsize=8)
def _pieces(secret: str) -> re.Pattern[str]:
    size = MIN_SECRET_FRAGMENT
    found = {secret[j : j + size] for j in range(len(secret) - size + 1)}
    return re.compile("|".join(re.escape(piece) for piece in sorted(found)))


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date).

    Args:
        headers: A response's headers (any case); None: none.

    Returns:
        The seconds (>= 0), ``retry-after-ms`` first; None when neither header holds a
        valid value.
    """
    if not headers:
        return None
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def is_transient_status(status: int) -> bool:
    """Whether an HTTP status is worth another attempt.

    Args:
        status: The HTTP status.

    Returns:
        True for rate limits (429), request timeouts (408) and server errors (5xx, 529:
        Anthropic overloaded).
    """
    return status in _TRANSIENT_STATUSES or status >= 500


def error_detail(body: object, fallback: str | None = None) -> str:
    """The provider's own explanation from an error body (``error.message`` or ``message``).

    Args:
        body: The error body: parsed JSON or text.
        fallback: What to say when the body says nothing.

    Returns:
        The explanation; the body as JSON when it is a mapping without one.
    """
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
        if isinstance(body.get("message"), str):
            return str(body["message"])
        return json.dumps(body, default=str)
    if isinstance(body, str) and body.strip():
        return body
    return fallback or ""


def _truncate(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    # the provider's own words end up in logs and on the terminal
    text = " ".join(terminal_safe(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, ProviderError) and error.transient


def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeout, other transport) exception classes of httpx2 and httpx, whichever exist."""
    timeouts: list[type[BaseException]] = []
    transport: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        try:
            module: Any = __import__(name)
        except ImportError:
            continue
        timeouts.append(module.TimeoutException)
        transport.append(module.TransportError)
    return tuple(timeouts), tuple(transport)


def _import_sdk(provider: str, module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ProviderError(
            f"{provider}: the `{module}` package is not installed "
            "(pip install 'evo-compress[llm]')",
            transient=False,
        ) from None


# ---------------------------------------------------------------------------------- clients
class LLMClient(ABC):
    """Sends one structured-output request per ``complete``, retrying transient failures.

    Subclasses write only the hooks: ``_make_sdk_client`` (SDK retries off), ``_classify``
    (SDK exception -> ``ProviderError``) and ``_request`` (one HTTP attempt through
    ``_send``). Thread-safe: the search asks one client from several threads at once.

    Args:
        settings: The provider, model and request settings; ``settings.provider`` must be
            this class's ``provider``.
        env: Where the key is read from; None: ``os.environ``.

    Attributes:
        provider: The name it is registered under.
        default_key_env: The environment variable its API key is read from unless
            ``api_key_env`` names another (None: the provider needs no key).
        structured_output_modes: Whether ``_request`` honours
            ``ProviderSettings.structured_output``.
        settings: The settings it was built with.

    Raises:
        ConfigError: ``settings.provider`` is another provider.
        MissingKeyError: The key's environment variable is unset or empty.
        ProviderError: The provider's SDK is not installed (the built-in clients).
    """

    provider: ClassVar[str]  # the name it is registered under
    # The environment variable its API key is read from unless ``api_key_env`` names another
    # (None: the provider needs no key).
    default_key_env: ClassVar[str | None] = None
    # Whether :meth:`_request` honours ``ProviderSettings.structured_output``.
    structured_output_modes: ClassVar[bool] = False

    @classmethod
    def check_settings(cls, settings: ProviderSettings) -> None:
        """Refuse settings this provider cannot serve, as ``raise settings_error(field,
        message, shown)`` (the error names the field). Called when the settings are
        validated; an override should call ``super().check_settings(settings)``.

        Args:
            settings: The settings being validated.

        Raises:
            pydantic.ValidationError: A field this provider refuses, from
                ``settings_error``; the base refuses a ``structured_output`` other than
                ``auto`` unless ``structured_output_modes``.
        """
        if not cls.structured_output_modes and settings.structured_output != "auto":
            takers = [
                name
                for name in PROVIDERS.names()
                if PROVIDERS.origin(name) == BUILTIN
                and getattr(PROVIDERS.get(name), "structured_output_modes", False)
            ]
            raise settings_error(
                "structured_output",
                f"applies to providers {' and '.join(takers)} only, not `{settings.provider}`",
                settings.structured_output,
            )

    def __init__(self, settings: ProviderSettings, env: Mapping[str, str] | None = None) -> None:
        if settings.provider != self.provider:
            raise ConfigError(
                f"{type(self).__name__} serves provider `{self.provider}`, "
                f"got `{settings.provider}`"
            )
        self.settings = settings
        env = os.environ if env is None else env
        variable = settings.key_env()
        self._key: str | None = None
        if variable is not None:
            key = env.get(variable, "").strip()
            if not key:
                raise MissingKeyError(
                    f"{self.provider}: no API key: set the environment variable {variable}"
                )
            self._key = key
        # tenacity sleeps through this: tests record the waits instead of sleeping
        self._sleep: Callable[[float], None] = time.sleep
        self._backoff = _backoff(settings)
        self._client: Any = self._make_sdk_client()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.settings.model!r}, "
            f"base_url={self.settings.base_url!r})"
        )

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def _sdk_key(self) -> str:
        return self._key if self._key is not None else NO_KEY_PLACEHOLDER

    def _scrub(self, text: str) -> str:
        return scrub(text, self._key)

    # ------------------------------------------------------------------ the public request
    def complete(
        self, system: str, user: str, schema: dict[str, Any], schema_name: str = "proposal"
    ) -> LLMReply:
        """Ask once, retrying transient failures with exponential backoff.

        Waits follow the provider's ``Retry-After`` when it sends one (at most
        ``backoff_max_s``); at most ``max_attempts`` attempts are made.

        Args:
            system: The system prompt.
            user: The user message.
            schema: The JSON Schema the reply must follow.
            schema_name: The schema's name in the request (a tool's or response format's).

        Returns:
            The reply, its text scrubbed of the key.

        Raises:
            ProviderError: The last attempt's failure, or the first one that is not
                transient, scrubbed of the key, with ``attempts`` and ``elapsed_s`` set.
        """
        from tenacity import Retrying, retry_if_exception, stop_after_attempt

        attempts = 0

        def attempt() -> tuple[str, Usage, str]:
            nonlocal attempts
            attempts += 1
            try:
                return self._request(system, user, schema, schema_name)
            except ProviderError as exc:
                error = exc._with(self._scrub(exc.message))
            except Exception as exc:  # a failure _request did not classify: do not retry it
                detail = _truncate(self._scrub(f"{type(exc).__name__}: {exc}"))
                error = ProviderError(
                    f"{self.provider}: unexpected error: {detail}", transient=False
                )
            raise error  # outside the except block: no SDK exception rides along as context

        retrying = Retrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(self.settings.max_attempts),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        started = time.monotonic()
        try:
            text, usage, model = retrying(attempt)
        except ProviderError as exc:
            plural = "" if attempts == 1 else "s"
            final = exc._with(
                f"{exc.message} (after {attempts} attempt{plural})",
                attempts=attempts,
                elapsed_s=time.monotonic() - started,
            )
        else:
            # A reply is scrubbed as errors are: a server may echo the key it was sent.
            return LLMReply(
                text=self._scrub(text),
                usage=usage,
                latency_s=time.monotonic() - started,
                attempts=attempts,
                model=self._scrub(model) if model else self.settings.model,
            )
        raise final

    def close(self) -> None:
        """Release the SDK client's connections."""
        closer = getattr(self._client, "close", None)
        if callable(closer):
            closer()

    # ------------------------------------------------------------------ retry policy
    def _wait(self, retry_state: Any) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, ProviderError) and error.retry_after is not None:
            return min(error.retry_after, self.settings.backoff_max_s)
        return float(self._backoff(retry_state))

    def _log_retry(self, retry_state: Any) -> None:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        wait = retry_state.next_action.sleep if retry_state.next_action is not None else 0.0
        log.info(
            "%s: attempt %d failed, retrying in %.2fs: %s",
            self.provider,
            retry_state.attempt_number,
            wait,
            error,  # already scrubbed
        )

    # ------------------------------------------------------------------ classification
    def _http_error(
        self, status: int, detail: str, headers: Mapping[str, str] | None
    ) -> ProviderError:
        lowered = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        transient = is_transient_status(status)
        # A provider that says not to retry is obeyed; one that asks to retry a 4xx other
        # than 429 or 408 is not (a malformed or refused request fails the same way again).
        if lowered.get("x-should-retry") == "false":
            transient = False
        label = _STATUS_LABELS.get(status, "error")
        detail = _truncate(self._scrub(detail))
        message = f"{self.provider}: HTTP {status} {label}" + (f": {detail}" if detail else "")
        return ProviderError(
            message, transient=transient, status=status, retry_after=parse_retry_after(lowered)
        )

    def _timeout_error(self) -> ProviderError:
        return ProviderError(
            f"{self.provider}: request timed out after {self.settings.timeout_s:g}s",
            transient=True,
        )

    def _connection_error(self, exc: BaseException) -> ProviderError:
        cause = exc.__cause__ or exc
        detail = _truncate(self._scrub(f"{type(cause).__name__}: {cause}"))
        return ProviderError(f"{self.provider}: connection failed: {detail}", transient=True)

    def _invalid_response(self, what: str) -> ProviderError:
        # permanent: a URL that answers 200 with something else is misconfigured, not busy
        return ProviderError(f"{self.provider}: invalid response: {what}", transient=False)

    def _other_error(self, what: str, exc: BaseException) -> ProviderError:
        detail = _truncate(self._scrub(str(exc)))
        return ProviderError(f"{self.provider}: {what}: {detail}", transient=False)

    def _send(self, call: Callable[[], _T]) -> _T:
        """Run one SDK call; its failure is raised as ``_classify`` maps it, outside the
        except block, so the SDK's exception (whose text may quote the key) is not kept as the
        ProviderError's context. ``_request`` makes its SDK calls through it.

        Args:
            call: The SDK call, without arguments.

        Returns:
            What ``call`` returns.

        Raises:
            ProviderError: ``call`` failed with an exception ``_classify`` maps.
            Exception: ``call``'s own exception when ``_classify`` returns None for it.
        """
        try:
            return call()
        except Exception as exc:
            error = self._classify(exc)
            if error is None:
                raise
        raise error

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _classify(self, exc: Exception) -> ProviderError | None:
        """The ProviderError for an SDK exception: a hook subclasses write.

        ``_http_error``, ``_timeout_error``, ``_connection_error`` and ``_other_error`` build
        the usual ones, scrubbed and marked transient or not.

        Args:
            exc: What the SDK call raised.

        Returns:
            The error to raise instead; None: not the SDK's, let it through.
        """

    @abstractmethod
    def _make_sdk_client(self) -> Any:
        """The provider SDK's client: a hook subclasses write. Called once, by ``__init__``.

        Returns:
            The SDK's client, with its own retries off and ``settings.timeout_s`` set; the
            key is ``self._sdk_key``.

        Raises:
            ProviderError: The SDK is not installed.
        """

    @abstractmethod
    def _request(
        self, system: str, user: str, schema: dict[str, Any], schema_name: str
    ) -> tuple[str, Usage, str]:
        """One HTTP attempt: a hook subclasses write, making its SDK calls through ``_send``.

        Args:
            system: The system prompt.
            user: The user message.
            schema: The JSON Schema the reply must follow.
            schema_name: The schema's name in the request.

        Returns:
            The reply text (JSON for structured output), the usage, and the model the
            provider reported ("" when it did not).

        Raises:
            ProviderError: The attempt failed; ``transient`` says whether to retry. Any
                other exception counts as a failure not worth retrying.
        """


def _backoff(settings: ProviderSettings) -> Callable[[Any], float]:
    from tenacity import wait_exponential_jitter

    # jitter scales with the initial wait, so backoff_initial_s=0 means no wait at all
    wait: Callable[[Any], float] = wait_exponential_jitter(
        initial=settings.backoff_initial_s,
        max=settings.backoff_max_s,
        jitter=settings.backoff_initial_s,
    )
    return wait


PROVIDERS: Registry[LLMClient] = Registry("LLM provider", group="evo_compress.providers")


@PROVIDERS.register("anthropic")
class AnthropicClient(LLMClient):
    """Anthropic Messages API; the schema is a forced tool whose input is the reply."""

    provider = "anthropic"
    default_key_env: ClassVar[str | None] = "ANTHROPIC_API_KEY"

    def _classify(self, exc: Exception) -> ProviderError | None:
        import anthropic

        if isinstance(exc, anthropic.APITimeoutError):
            return self._timeout_error()
        if isinstance(exc, anthropic.APIConnectionError):
            return self._connection_error(exc)
        if isinstance(exc, anthropic.APIStatusError):
            detail = error_detail(exc.body, exc.message)
            return self._http_error(exc.status_code, detail, exc.response.headers)
        if isinstance(exc, anthropic.AnthropicError):
            return self._other_error("invalid response", exc)
        return None

    def _make_sdk_client(self) -> Any:
        anthropic = _import_sdk(self.provider, "anthropic")
        return anthropic.Anthropic(
            api_key=self._sdk_key,
            base_url=self.settings.base_url,
            max_retries=0,
            timeout=self.settings.timeout_s,
        )

    def _request(
        self, system: str, user: str, schema: dict[str, Any], schema_name: str
    ) -> tuple[str, Usage, str]:
        # anthropic 2.x has no sampling parameters (temperature) on messages.create
        message = self._send(
            lambda: self._client.messages.create(
                model=self.settings.model,
                max_tokens=self.settings.max_tokens,
                system=system,
                messages=[{"role": "user", "content": user}],
                tools=[
                    {
                        "name": schema_name,
                        "description": "Submit the answer; its input is the whole reply.",
                        "input_schema": schema,
                    }
                ],
                tool_choice={"type": "tool", "name": schema_name},
            )
        )
        if not hasattr(message, "content"):
            raise self._invalid_response(f"expected a message, got {type(message).__name__}")
        text = ""
        for block in message.content:
            if getattr(block, "type", None) == "tool_use":
                text = json.dumps(block.input)
                break
        else:
            text = "".join(
                block.text for block in message.content if getattr(block, "type", None) == "text"
            )
        usage = getattr(message, "usage", None)
        return (
            text,
            Usage(
                int(getattr(usage, "input_tokens", 0) or 0),
                int(getattr(usage, "output_tokens", 0) or 0),
            ),
            str(message.model or ""),
        )


@PROVIDERS.register("openai")
class OpenAIClient(LLMClient):
    """OpenAI Chat Completions with a strict JSON-schema response format."""

    provider = "openai"
    default_key_env: ClassVar[str | None] = "OPENAI_API_KEY"
    structured_output_modes = True

    def _classify(self, exc: Exception) -> ProviderError | None:
        import openai

        if isinstance(exc, openai.APITimeoutError):
            return self._timeout_error()
        if isinstance(exc, openai.APIConnectionError):
            return self._connection_error(exc)
        if isinstance(exc, openai.APIStatusError):
            detail = error_detail(exc.body, exc.message)
            return self._http_error(exc.status_code, detail, exc.response.headers)
        if isinstance(exc, openai.OpenAIError):
            return self._other_error("invalid response", exc)
        return None

    def _make_sdk_client(self) -> Any:
        openai = _import_sdk(self.provider, "openai")
        return openai.OpenAI(
            api_key=self._sdk_key,
            base_url=self.settings.base_url,
            max_retries=0,
            timeout=self.settings.timeout_s,
        )

    def _token_limit(self) -> dict[str, int]:
        # OpenAI's own API prefers max_completion_tokens (reasoning models refuse max_tokens)
        return {"max_completion_tokens": self.settings.max_tokens}

    def _response_format(self, schema: dict[str, Any], schema_name: str) -> dict[str, Any] | None:
        mode = self.settings.structured_output
        if mode in ("auto", "json_schema"):
            return {
                "type": "json_schema",
                "json_schema": {"name": schema_name, "schema": schema, "strict": True},
            }
        if mode == "json_object":
            return {"type": "json_object"}
        return None

    def _request(
        self, system: str, user: str, schema: dict[str, Any], schema_name: str
    ) -> tuple[str, Usage, str]:
        response_format = self._response_format(schema, schema_name)
        if response_format is None or response_format["type"] != "json_schema":
            # The request carries no schema: the model reads it in the prompt instead.
            user = (
                f"{user}\n\n## Reply schema\nReply with one JSON object that matches this JSON "
                f"Schema:\n```json\n{json.dumps(schema, sort_keys=True)}\n```"
            )
        kwargs: dict[str, Any] = {
            "model": self.settings.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            **self._token_limit(),
        }
        if self.settings.temperature is not None:
            kwargs["temperature"] = self.settings.temperature
        if response_format is not None:
            kwargs["response_format"] = response_format
        completion = self._send(lambda: self._client.chat.completions.create(**kwargs))
        if not hasattr(completion, "choices"):
            raise self._invalid_response(f"expected a completion, got {type(completion).__name__}")
        choices = completion.choices or []
        message = getattr(choices[0], "message", None) if choices else None
        text = getattr(message, "content", None) or ""
        usage = getattr(completion, "usage", None)  # local servers may leave it out
        return (
            str(text),
            Usage(
                int(getattr(usage, "prompt_tokens", 0) or 0),
                int(getattr(usage, "completion_tokens", 0) or 0),
            ),
            str(getattr(completion, "model", "") or ""),
        )


@PROVIDERS.register("openai-compatible")
class OpenAICompatibleClient(OpenAIClient):
    """A local or third-party server speaking the Chat Completions API (vLLM, llama.cpp,
    Ollama, ...); no key unless ``api_key_env`` names one."""

    provider = "openai-compatible"
    default_key_env = None  # local servers need none; ``api_key_env`` names one if needed

    @classmethod
    def check_settings(cls, settings: ProviderSettings) -> None:
        super().check_settings(settings)
        if not settings.base_url:
            raise settings_error(
                "base_url",
                "is required for provider `openai-compatible`: the server's URL, "
                "e.g. http://127.0.0.1:8000/v1",
                settings.base_url,
            )

    def _token_limit(self) -> dict[str, int]:
        return {"max_tokens": self.settings.max_tokens}  # what local servers understand


@PROVIDERS.register("google")
class GoogleClient(LLMClient):
    """Google Gemini API (google-genai) with a JSON response schema."""

    provider = "google"
    default_key_env: ClassVar[str | None] = "GOOGLE_API_KEY"

    def _classify(self, exc: Exception) -> ProviderError | None:
        from google.genai import errors

        # the SDK lets httpx2's (or httpx's) transport errors through unwrapped
        timeouts, transport = _transport_errors()
        if isinstance(exc, errors.APIError):
            headers = getattr(getattr(exc, "response", None), "headers", None)
            detail = exc.message or error_detail(exc.details, exc.status)
            return self._http_error(int(exc.code or 0), str(detail), headers)
        if isinstance(exc, json.JSONDecodeError):
            return self._invalid_response(f"not JSON: {exc}")
        if isinstance(exc, timeouts):
            return self._timeout_error()
        if isinstance(exc, transport):
            return self._connection_error(exc)
        return None

    def _make_sdk_client(self) -> Any:
        genai = _import_sdk(self.provider, "google.genai")
        types = genai.types
        return genai.Client(
            vertexai=False,  # the Gemini API with a key, whatever GOOGLE_GENAI_USE_VERTEXAI says
            api_key=self._sdk_key,
            http_options=types.HttpOptions(
                base_url=self.settings.base_url or None,
                timeout=max(1, int(self.settings.timeout_s * 1000)),
                retry_options=None,  # None: the SDK makes exactly one attempt
            ),
        )

    def _request(
        self, system: str, user: str, schema: dict[str, Any], schema_name: str
    ) -> tuple[str, Usage, str]:
        from google.genai import types

        config = types.GenerateContentConfig(
            system_instruction=system,
            temperature=self.settings.temperature,
            max_output_tokens=self.settings.max_tokens,
            response_mime_type="application/json",
            response_json_schema=schema,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            automatic_continuation=False,  # one request, one HTTP call
        )
        response = self._send(
            lambda: self._client.models.generate_content(
                model=self.settings.model, contents=user, config=config
            )
        )
        text = response.text or ""
        usage = response.usage_metadata
        return (
            text,
            Usage(
                int(getattr(usage, "prompt_token_count", None) or 0),
                int(getattr(usage, "candidates_token_count", None) or 0),
            ),
            str(response.model_version or ""),
        )


def make_client(settings: ProviderSettings, env: Mapping[str, str] | None = None) -> LLMClient:
    """The client for ``settings.provider``.

    Args:
        settings: Validated provider settings.
        env: Where the key is read from; None: ``os.environ``.

    Returns:
        The client; close it (or use it as a context manager) when done.

    Raises:
        MissingKeyError: The key's environment variable is unset or empty.
        ProviderError: The provider's SDK is not installed.
        RegistryError: The provider's plugin fails to load.
    """
    client: LLMClient = PROVIDERS.get(settings.provider)(settings, env)
    return client
