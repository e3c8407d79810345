"""Run one vLLM OpenAI-compatible server process for an evaluation, and never leave an orphan.

The server runs under ``_guard.py``, a small standard-library supervisor in its own session:
``stop()``, an exception, Ctrl-C, the interpreter's exit and even SIGKILL of the search
process all end the server's whole process tree. The search process never imports vllm;
``ServerSpec.command`` may point into another environment or a container wrapper.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from evo_compress.exceptions import ConfigError, EvaluationError
from evo_compress.fitness.vllm._guard import live_processes

GUARD_SCRIPT = Path(__file__).with_name("_guard.py")
PORT_RETRIES = 3
"""New ports tried when the server reports its port already taken (a race with another
process between picking a free port and the server binding it)."""
_PORT_IN_USE = re.compile(r"address already in use|errno 98\b|eaddrinuse", re.IGNORECASE)
_OURS = ("--host", "--port", "--served-model-name")
_SECRET = re.compile(r"token|key|secret|password", re.IGNORECASE)


class ServerError(EvaluationError):
    """The vLLM server could not be started or stopped; the message ends with its log's tail."""


@dataclass(frozen=True)
class ServerSpec:
    """What to serve and how: ``[*command, model, --host, --port, --served-model-name,
    *args]`` is the command line, run with ``os.environ`` updated by ``env``."""

    command: tuple[str, ...]
    model: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    served_model_name: str = "evo-compress"

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", tuple(str(c) for c in self.command))
        object.__setattr__(self, "args", tuple(str(a) for a in self.args))
        object.__setattr__(self, "env", dict(self.env))
        if not self.command:
            raise ConfigError("`command` must name the serve command, e.g. ['vllm', 'serve']")
        if not str(self.model):
            raise ConfigError("`model` must name a checkpoint folder or model id, got ''")
        if not self.served_model_name:
            raise ConfigError("`served_model_name` must not be empty")
        for arg in self.args:
            if arg.split("=", 1)[0] in _OURS:
                raise ConfigError(
                    f"`args` must not set {arg.split('=', 1)[0]}: the server's host, port and "
                    f"served name are chosen by evo-compress, got {list(self.args)}"
                )
        bad = {k: v for k, v in self.env.items() if not isinstance(v, str)}
        if bad:
            raise ConfigError(f"`env` values must be strings, got {bad}")

    def command_line(self, host: str, port: int) -> list[str]:
        return [
            *self.command,
            self.model,
            "--host",
            host,
            "--port",
            str(port),
            "--served-model-name",
            self.served_model_name,
            *self.args,
        ]


_RUNNING: set[VLLMServer] = set()
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    """Last line of defence in a normal interpreter exit (the guard covers abnormal ones)."""
    with _RUNNING_LOCK:
        servers = list(_RUNNING)
    for server in servers:
        # A thread still inside start() holds the lock: then only signal the guard, which
        # finishes the job (it also notices this process is gone).
        if server._lock.acquire(timeout=1.0):
            try:
                with contextlib.suppress(Exception):
                    server.stop()
            finally:
                server._lock.release()
        elif server._guard is not None:
            with contextlib.suppress(OSError):
                server._guard.send_signal(signal.SIGTERM)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)  # a seam for tests (an interrupt during the health wait)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it; another process may take it
    before the server binds it, hence the retries in ``start``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class VLLMServer:
    """One server process for the lifetime of a ``with`` block (or ``start``/``stop``).

    >>> with VLLMServer(spec, run_dir / "logs" / "vllm.log") as server:
    ...     measure_latency(server.base_url, spec.served_model_name, prompts, 64, 8)

    ``pid`` is the server process itself (also its process group); the guard in between is
    ``guard_pid``. Output goes to ``log_path`` (appended, one header per start attempt).
    """

    def __init__(
        self,
        spec: ServerSpec,
        log_path: Path | str,
        startup_timeout_s: float = 900.0,
        stop_timeout_s: float = 30.0,
        health_interval_s: float = 0.5,
        host: str = "127.0.0.1",
    ) -> None:
        for name, value in (
            ("startup_timeout_s", startup_timeout_s),
            ("stop_timeout_s", stop_timeout_s),
            ("health_interval_s", health_interval_s),
        ):
            if not value > 0:
                raise ConfigError(f"`{name}` must be > 0, got {value}")
        self.spec = spec
        self.log_path = Path(log_path)
        self.startup_timeout_s = float(startup_timeout_s)
        self.stop_timeout_s = float(stop_timeout_s)
        self.health_interval_s = float(health_interval_s)
        self.host = host
        self.pid_file = self.log_path.with_name(self.log_path.name + ".pgid")
        self._port: int | None = None
        self._guard: subprocess.Popen[bytes] | None = None
        self._server_pid: int | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ properties
    @property
    def port(self) -> int:
        if self._port is None:
            raise ServerError("the vLLM server has not been started")
        return self._port

    @property
    def base_url(self) -> str:
        host = self._client_host()
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def _client_host(self) -> str:
        """Where to connect: a wildcard bind address is reached through loopback."""
        return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    @property
    def pid(self) -> int | None:
        """The server process (its pid is also its process group), once known."""
        if self._server_pid is None and self._guard is not None:
            self._server_pid = self._read_pid_file()
        return self._server_pid

    @property
    def guard_pid(self) -> int | None:
        return self._guard.pid if self._guard is not None else None

    def alive(self) -> bool:
        return self._guard is not None and self._guard.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 64 * 1024))
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            self.stop()
            return
        try:
            self.stop()
        except ServerError as error:  # keep the original exception; say what stop found
            if hasattr(exc, "add_note"):
                exc.add_note(f"while stopping the vLLM server: {error}")

    def start(self) -> None:
        with self._lock:
            if self._guard is not None:
                raise ServerError(f"the vLLM server is already running at {self.base_url}")
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            attempts = PORT_RETRIES + 1
            for attempt in range(1, attempts + 1):
                offset = self._log_size()
                self._launch(attempt, attempts)
                try:
                    self._wait_healthy(offset)
                    return
                except _PortTaken:
                    self.stop()
                    if attempt == attempts:
                        raise ServerError(
                            f"the vLLM server found its port already in use {attempts} times; "
                            f"last lines of {self.log_path}:\n{self.log_tail()}"
                        ) from None
                    self._note(f"port {self._port} was taken; retrying on another port")
                except BaseException:
                    self.stop()  # KeyboardInterrupt included: nothing may outlive the wait
                    raise

    def _launch(self, attempt: int, attempts: int) -> None:
        self._port = free_port(self.host)
        self._server_pid = None
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        command = self.spec.command_line(self.host, self._port)
        guard = [
            sys.executable,
            "-I",  # no user site, no PYTHON* variables, not the script's folder on sys.path
            str(GUARD_SCRIPT),
            "--parent",
            str(os.getpid()),
            "--grace",
            f"{self.stop_timeout_s:g}",
            "--pid-file",
            str(self.pid_file),
            "--",
            *command,
        ]
        extra = " ".join(
            f"{k}={'***' if _SECRET.search(k) else v}" for k, v in self.spec.env.items()
        )
        stamp = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
        with open(self.log_path, "ab") as log:
            header = (
                f"\n===== {stamp} evo-compress: starting the vLLM server "
                f"(attempt {attempt}/{attempts}) =====\n$ {shlex.join(command)}\n"
                + (f"extra environment: {extra}\n" if extra else "")
            )
            log.write(header.encode())
            log.flush()
            try:
                self._guard = subprocess.Popen(
                    guard,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **self.spec.env},
                    # Its own session: Ctrl-C in the terminal reaches only the search, which
                    # then stops the server in its own order.
                    start_new_session=True,
                )
            except OSError as exc:
                raise ServerError(f"cannot start the vLLM server guard: {exc}") from exc
        with _RUNNING_LOCK:
            _RUNNING.add(self)

    def _wait_healthy(self, offset: int) -> None:
        """Poll ``/health`` until 200; ``offset`` is where this attempt's log starts."""
        assert self._guard is not None
        start = time.monotonic()
        while True:
            code = self._guard.poll()
            if code is not None:
                if _PORT_IN_USE.search(self._log_text(offset)):
                    raise _PortTaken
                tail = self.log_tail()
                self.stop()
                raise ServerError(
                    f"the vLLM server exited with code {code} during startup; "
                    f"last lines of {self.log_path}:\n{tail}"
                )
            if self._healthy():
                self._server_pid = self._read_pid_file()
                return
            waited = time.monotonic() - start
            if waited > self.startup_timeout_s:
                tail = self.log_tail()
                self.stop()
                raise ServerError(
                    f"the vLLM server was not healthy after {waited:.0f}s; "
                    f"last lines of {self.log_path}:\n{tail}"
                )
            _sleep(self.health_interval_s)

    def _healthy(self) -> bool:
        timeout = min(5.0, max(1.0, 2 * self.health_interval_s))
        connection = http.client.HTTPConnection(self._client_host(), self.port, timeout=timeout)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            return response.status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        """Stop the server and everything it started; safe to call any number of times.
        Raises ServerError only if processes survive SIGKILL."""
        with self._lock:
            guard = self._guard
            if guard is None:
                return
            server_pid = self.pid
            try:
                if guard.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        guard.send_signal(signal.SIGTERM)
                    try:
                        # The guard gives the server stop_timeout_s, then kills its tree.
                        guard.wait(timeout=self.stop_timeout_s + 10.0)
                    except subprocess.TimeoutExpired:
                        self._note("the guard did not exit in time: SIGKILL")
                self._kill_leftovers(guard, server_pid)
            finally:
                self._guard = None
                self._server_pid = None
                with _RUNNING_LOCK:
                    _RUNNING.discard(self)
                with contextlib.suppress(OSError):
                    self.pid_file.unlink()

    def _kill_leftovers(self, guard: subprocess.Popen[bytes], server_pid: int | None) -> None:
        """SIGKILL whatever is still running in the guard's or the server's group (nothing,
        unless the guard itself was killed or stuck), and reap the guard."""
        groups = [guard.pid] + ([server_pid] if server_pid else [])
        deadline = time.monotonic() + 10.0
        while True:
            remaining = self._remaining(groups)
            if not remaining:
                break
            if time.monotonic() > deadline:
                raise ServerError(
                    f"processes {remaining} of the vLLM server survived SIGKILL; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            for group in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                guard.wait(timeout=0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            guard.wait(timeout=5.0)

    @staticmethod
    def _remaining(groups: list[int]) -> list[int]:
        found: set[int] = set()
        for group in groups:
            live = live_processes(-1, group)
            if live is None:  # the processes cannot be listed: ask the groups themselves
                try:
                    os.killpg(group, 0)
                except (ProcessLookupError, PermissionError):
                    continue
                found.add(group)
            else:
                found.update(live)
        return sorted(found)

    # ------------------------------------------------------------------ helpers
    def _read_pid_file(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_text(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(offset)
                return handle.read(1 << 20).decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _note(self, message: str) -> None:
        with contextlib.suppress(OSError), open(self.log_path, "a") as log:
            log.write(f"[evo-compress] {message}\n")

    def __repr__(self) -> str:
        state = f"running at {self.base_url}" if self.alive() else "stopped"
        return f"VLLMServer({self.spec.model!r}, {state})"


class _PortTaken(Exception):
    """The server's port was taken between picking it and binding it (retried)."""


__all__ = ["ServerError", "ServerSpec", "VLLMServer", "free_port"]
