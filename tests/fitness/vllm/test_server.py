"""The vLLM server's lifecycle, with the stand-in server: health, failures, and no orphans."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from evo_compress.exceptions import ConfigError, EvaluationError
from evo_compress.fitness.vllm import server as server_module
from evo_compress.fitness.vllm._guard import live_processes
from evo_compress.fitness.vllm.server import ServerError, ServerSpec, VLLMServer

STANDIN = (sys.executable, "-m", "evo_compress_doubles.vllm_server")


def spec(*args: str) -> ServerSpec:
    return ServerSpec(command=STANDIN, model="echo-model", args=tuple(args))


def make(tmp_path: Path, *args: str, **kwargs: float) -> VLLMServer:
    kwargs.setdefault("health_interval_s", 0.05)
    kwargs.setdefault("stop_timeout_s", 5.0)
    return VLLMServer(spec(*args), tmp_path / "logs" / "vllm.log", **kwargs)


def gone(pid: int) -> bool:
    """No such process, or only its zombie (some containers' init never reaps orphans)."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_until(predicate, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def child_pids(log: Path) -> list[int]:
    return [
        int(p) for p in re.findall(r"started (?:detached )?child process (\d+)", log.read_text())
    ]


def get(url_base: str, path: str) -> tuple[int, bytes]:
    host, port = url_base.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture(autouse=True)
def _no_leftovers():  # type: ignore[no-untyped-def]
    """Whatever a failing test leaves running is killed, so it cannot disturb the next one."""
    yield
    with server_module._RUNNING_LOCK:
        leftovers = list(server_module._RUNNING)
    for server in leftovers:
        with contextlib.suppress(Exception):
            server.stop()
    assert not leftovers, "a test left a server running"


def test_starts_serves_and_stops_leaving_nothing(tmp_path: Path) -> None:
    server = make(tmp_path, "--max-num-seqs", "4")
    server.start()
    try:
        assert server.alive()
        assert server.base_url == f"http://127.0.0.1:{server.port}"
        pid, guard = server.pid, server.guard_pid
        assert pid is not None and guard is not None and pid != guard
        assert os.getpgid(pid) == pid  # the server leads its own process group
        status, body = get(server.base_url, "/v1/models")
        assert status == 200 and json.loads(body)["data"][0]["id"] == "evo-compress"
    finally:
        server.stop()
    assert not server.alive()
    assert group_gone(pid) and gone(guard)
    server.stop()  # idempotent
    log = server.log_path.read_text()
    header = log.splitlines()[1]
    assert "evo-compress: starting the vLLM server (attempt 1/4)" in header
    command = f"echo-model --host 127.0.0.1 --port {server.port} --served-model-name evo-compress"
    assert command in log and "--max-num-seqs 4" in log
    assert "stand-in vLLM server argv:" in log
    assert "Application startup complete." in log
    assert "received SIGTERM" in log  # the guard's account of the stop
    assert not server.pid_file.exists()


def test_the_log_is_appended_across_starts(tmp_path: Path) -> None:
    server = make(tmp_path)
    with server:
        pass
    with server:
        pass
    assert server.log_path.read_text().count("starting the vLLM server (attempt 1/4)") == 2


def test_a_crash_at_start_reports_the_exit_code_and_the_log(tmp_path: Path) -> None:
    server = make(tmp_path, "--fake-crash-at-start")
    with pytest.raises(ServerError) as info:
        server.start()
    message = str(info.value)
    assert message.startswith("the vLLM server exited with code 3 during startup")
    assert str(server.log_path) in message
    assert "fake crash at start" in message
    assert isinstance(info.value, EvaluationError)
    assert not server.alive()


def test_a_missing_serve_command_is_a_server_error(tmp_path: Path) -> None:
    server = VLLMServer(
        ServerSpec(("/nonexistent/vllm", "serve"), "m"),
        tmp_path / "vllm.log",
        health_interval_s=0.05,
    )
    with pytest.raises(ServerError, match=r"exited with code 127[\s\S]*cannot start"):
        server.start()


def test_never_healthy_times_out_and_leaves_nothing(tmp_path: Path) -> None:
    server = make(tmp_path, "--fake-never-healthy", startup_timeout_s=1.5)
    pids: list[int] = []
    original = server._healthy

    def healthy() -> bool:
        if server.pid is not None and not pids:
            pids.append(server.pid)
        return original()

    server._healthy = healthy  # type: ignore[method-assign]
    start = time.monotonic()
    with pytest.raises(ServerError, match=r"was not healthy after \d+s; last lines of"):
        server.start()
    assert time.monotonic() - start < 10
    assert pids and group_gone(pids[0])
    assert not server.alive()


def test_a_slow_startup_is_waited_for(tmp_path: Path) -> None:
    server = make(tmp_path, "--fake-startup-delay", "1.0")
    start = time.monotonic()
    with server:
        assert time.monotonic() - start >= 1.0
        assert get(server.base_url, "/health")[0] == 200


def test_a_server_ignoring_sigterm_is_killed_after_the_stop_timeout(tmp_path: Path) -> None:
    server = make(tmp_path, "--fake-ignore-sigterm", stop_timeout_s=1.0)
    server.start()
    pid = server.pid
    assert pid is not None
    start = time.monotonic()
    server.stop()
    took = time.monotonic() - start
    assert 1.0 <= took < 8
    assert group_gone(pid)
    assert "SIGKILL to" in server.log_path.read_text()


def test_children_of_the_server_are_stopped_with_it(tmp_path: Path) -> None:
    server = make(tmp_path, "--fake-spawn-child", "--fake-spawn-detached-child")
    with server:
        pid = server.pid
        children = child_pids(server.log_path)
        assert pid is not None and len(children) == 2
        assert os.getpgid(children[0]) == pid  # in the server's group
        assert os.getpgid(children[1]) != pid  # escaped it (its own session)
        assert not any(gone(c) for c in children)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert all(gone(c) for c in children)


def test_an_exception_inside_the_block_stops_the_server(tmp_path: Path) -> None:
    server = make(tmp_path, "--fake-spawn-child")
    with pytest.raises(RuntimeError, match="boom"), server:
        pid = server.pid
        raise RuntimeError("boom")
    assert pid is not None and group_gone(pid)
    assert all(gone(c) for c in child_pids(server.log_path))


def test_an_interrupt_during_the_health_wait_stops_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make(tmp_path, "--fake-startup-delay", "60")
    seen: list[int] = []

    def interrupted(_seconds: float) -> None:
        assert wait_until(lambda: server.pid is not None, 10)
        seen.extend([server.pid or 0, server.guard_pid or 0])
        raise KeyboardInterrupt

    monkeypatch.setattr(server_module, "_sleep", interrupted)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert time.monotonic() - start < 10
    assert group_gone(seen[0]) and gone(seen[1])
    assert not server.alive()


def test_a_taken_port_is_retried_on_another(tmp_path: Path) -> None:
    marker = tmp_path / "taken-once"
    server = make(tmp_path, "--fake-port-in-use-once", str(marker))
    with server:
        assert get(server.base_url, "/health")[0] == 200
    log = server.log_path.read_text()
    assert "Address already in use" in log
    assert "attempt 2/4" in log and "retrying on another port" in log


def test_engine_args_must_not_set_what_the_server_chooses() -> None:
    with pytest.raises(ConfigError, match="--port"):
        ServerSpec(STANDIN, "m", ("--port=8001",))
    with pytest.raises(ConfigError, match="--served-model-name"):
        ServerSpec(STANDIN, "m", ("--served-model-name", "x"))
    with pytest.raises(ConfigError, match="`command`"):
        ServerSpec((), "m")


SEARCH = textwrap.dedent(
    """
    import json, re, sys, time
    from pathlib import Path
    from evo_compress.fitness.vllm.server import ServerSpec, VLLMServer

    log = Path(sys.argv[1])
    command = (sys.executable, "-m", "evo_compress_doubles.vllm_server")
    spec = ServerSpec(command, "echo-model", ("--fake-spawn-child",))
    server = VLLMServer(spec, log, health_interval_s=0.05, stop_timeout_s=2)
    server.start()
    child = int(re.search(r"started child process (\\d+)", log.read_text()).group(1))
    print(json.dumps({"guard": server.guard_pid, "server": server.pid, "child": child}))
    sys.stdout.flush()
    if sys.argv[2] == "block":
        time.sleep(600)
    """
)


def run_search(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    search = subprocess.Popen(
        [sys.executable, "-c", SEARCH, str(tmp_path / "vllm.log"), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = search.stdout.readline() if search.stdout else ""
    assert line, f"the search process failed; log:\n{(tmp_path / 'vllm.log').read_text()}"
    return search, json.loads(line)


def _kill_all(pids: dict[str, int]) -> None:
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def test_sigkill_of_the_search_process_leaves_no_orphan(tmp_path: Path) -> None:
    search, pids = run_search(tmp_path, "block")
    try:
        assert not any(gone(pid) for pid in pids.values())
        os.kill(search.pid, signal.SIGKILL)
        search.wait(timeout=10)
        assert wait_until(lambda: all(gone(pid) for pid in pids.values()), 10), pids
        assert group_gone(pids["server"])
        assert "the search process" in (tmp_path / "vllm.log").read_text()
    finally:
        search.kill()
        _kill_all(pids)


def test_a_normal_exit_without_stop_stops_the_server(tmp_path: Path) -> None:
    search, pids = run_search(tmp_path, "exit")
    try:
        assert search.wait(timeout=30) == 0
        assert wait_until(lambda: all(gone(pid) for pid in pids.values()), 10), pids
        assert "received SIGTERM" in (tmp_path / "vllm.log").read_text()  # atexit's stop()
    finally:
        search.kill()
        _kill_all(pids)


def test_the_server_outlives_the_thread_that_started_it(tmp_path: Path) -> None:
    # The kernel's parent-death signal fires when the starting *thread* exits; the guard
    # must tell that apart from the search process dying.
    server = make(tmp_path)
    starter = threading.Thread(target=server.start)
    starter.start()
    starter.join()
    try:
        time.sleep(0.5)
        assert server.alive()
        assert get(server.base_url, "/health")[0] == 200
    finally:
        server.stop()


def test_live_processes_leave_out_zombies_and_processes_that_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    zombie = subprocess.Popen(["true"])  # not waited for: it stays a zombie
    try:
        assert wait_until(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE)
        live = live_processes(os.getpid(), -1)
        assert live is not None and sleeper.pid in live and zombie.pid not in live
        real_getpgid = os.getpgid

        def getpgid(pid: int) -> int:  # the sleeper exits while the table is read
            if pid == sleeper.pid:
                raise ProcessLookupError(pid)
            return real_getpgid(pid)

        monkeypatch.setattr(os, "getpgid", getpgid)
        live = live_processes(os.getpid(), -1)
        assert live is not None and sleeper.pid not in live
    finally:
        sleeper.kill()
        sleeper.wait()
        zombie.wait()
