"""Run one evaluation in its own worker process, with a timeout and a memory limit.

An exception, a crash (segfault, the kernel's OOM killer), running past the timeout or past
the memory limit all come back as a failed ``EvaluationResult`` with the reason; the search
process itself never loads the model. Workers are forked from a forkserver that has the heavy
libraries imported already, so each evaluation gets a fresh process without paying for
``import torch, transformers, lm_eval`` every time.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from evo_compress.fitness._base import EvaluationResult, with_failure_class

_POLL_S = 0.1
_CONTEXTS: dict[tuple[str, ...], Any] = {}
# Workers running now, from any thread: a search stopping with parallel evaluations in
# flight kills them all (their process groups) instead of leaving them to their timeouts.
_LIVE: set[Any] = set()
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()


@dataclass(frozen=True)
class WorkerLimits:
    timeout_s: float
    memory_limit_mib: float | None = None


def _context(preload: Sequence[str]) -> Any:
    """A forkserver context that imports ``preload`` once; forking a warm server is cheap."""
    key = tuple(preload)
    if key not in _CONTEXTS:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))
        _CONTEXTS[key] = ctx
    return _CONTEXTS[key]


def _child(
    target: str, payload: dict[str, Any], conn: Connection, log: str, env: dict[str, str]
) -> None:
    os.setpgrp()  # its own process group, so a kill also takes anything it started
    # A parallel worker's own environment (CUDA_VISIBLE_DEVICES), set before anything in
    # this process touches CUDA: the forkserver it came from has the search's environment.
    os.environ.update(env)
    # Libraries' progress bars and warnings go to a log, not over the search's display;
    # the parent attaches its tail to a failed result.
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        module_name, _, attr = target.partition(":")
        function = getattr(importlib.import_module(module_name), attr)
        result = function(payload)
        conn.send(("ok", result))
    except BaseException as exc:  # everything becomes data for the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=12)))
    finally:
        conn.close()


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process (psutil), or None where it cannot be read: the process
    has exited, or is not ours to read."""
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except (psutil.Error, ValueError):  # ValueError: a negative pid
        return None


def run_in_worker(
    target: str,
    payload: dict[str, Any],
    limits: WorkerLimits,
    preload: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
) -> EvaluationResult:
    """Call ``module:function(payload)`` in a worker process; the function returns an
    ``EvaluationResult`` (or raises). ``env`` is added to the worker's environment. Never
    raises for the evaluation's own failures.

    What the worker prints (libraries' warnings and progress bars) goes to ``log_path``,
    which is kept and named in the result's ``metadata["worker"]["log"]``; without one, to
    a temporary file that is removed. A failed result carries the output's tail either way.
    """
    ctx = _context(preload)
    parent, child = ctx.Pipe(duplex=False)
    if log_path is None:
        log_fd, log = tempfile.mkstemp(prefix="evo-compress-worker-", suffix=".log")
        os.close(log_fd)
    else:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = str(log_path)
    process = ctx.Process(
        target=_child, args=(target, payload, child, log, dict(env or {})), daemon=True
    )
    start = time.perf_counter()
    with _LIVE_LOCK:
        if _STOPPING.is_set():  # the search is shutting down: start nothing new
            parent.close()
            child.close()
            if log_path is None:
                os.unlink(log)
            return with_failure_class(
                EvaluationResult.failure("cancelled: the search is stopping")
            )
        process.start()
        _LIVE.add(process)
    child.close()
    peak = 0.0
    reason: str | None = None
    cause: str | None = None  # the limit that stopped it: decides what the cache may serve
    over: dict[str, float] = {}  # what the limit allowed and what was used when it stopped
    message: Any = None
    try:
        while True:
            if parent.poll(_POLL_S):
                try:
                    message = parent.recv()
                except EOFError:
                    message = None
                break
            if not process.is_alive():
                break
            elapsed = time.perf_counter() - start
            rss = rss_mib(process.pid or 0) or 0.0
            peak = max(peak, rss)
            if elapsed > limits.timeout_s:
                reason = f"timeout: the evaluation ran past {limits.timeout_s:g} s"
                cause = "timeout"
                over = {"needed": elapsed, "limit": limits.timeout_s}
                break
            if limits.memory_limit_mib is not None and rss > limits.memory_limit_mib:
                cause = "memory"
                over = {"needed": rss, "limit": limits.memory_limit_mib}
                reason = (
                    f"out of memory: the worker used {rss:,.0f} MiB, over the "
                    f"{limits.memory_limit_mib:,.0f} MiB limit"
                )
                break
    finally:
        if reason is not None or message is None:
            _kill(process)
        process.join(timeout=10)
        parent.close()
        with _LIVE_LOCK:
            _LIVE.discard(process)
    seconds = time.perf_counter() - start
    meta: dict[str, Any] = {
        "worker": {"pid": process.pid, "seconds": round(seconds, 3), "peak_rss_mib": peak}
    }
    output = _tail(log, remove=log_path is None)
    if log_path is not None:
        meta["worker"]["log"] = log
    if reason is not None or message is None or message[0] == "error":
        meta["worker"]["output_tail"] = output
    if reason is not None:
        meta["limit_cause"] = cause
        meta["over_limit"] = over
        return with_failure_class(EvaluationResult.failure(reason, meta)).with_duration(seconds)
    if message is None:
        code = process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if code == -signal.SIGKILL:
            how += " (killed: often the kernel's out-of-memory killer)"
            meta["limit_cause"] = "memory"
        died = EvaluationResult.failure(f"the worker died ({how})", meta)
        return with_failure_class(died).with_duration(seconds)
    if message[0] == "error":
        meta["traceback"] = message[2]
        return with_failure_class(EvaluationResult.failure(message[1], meta)).with_duration(
            seconds
        )
    result: EvaluationResult = message[1]
    merged = {**result.metadata, **meta}
    return EvaluationResult(result.status, result.objectives, result.reason, merged, seconds)


def kill_live_workers() -> int:
    """Kill every worker process running now and refuse new ones until ``allow_workers``;
    returns how many were killed. Their ``run_in_worker`` calls return failures."""
    with _LIVE_LOCK:
        _STOPPING.set()
        live = list(_LIVE)
    for process in live:
        _kill(process)
    return len(live)


def allow_workers() -> None:
    """Undo ``kill_live_workers``: new workers may start again."""
    _STOPPING.clear()


def _tail(path: str, limit: int = 4000, remove: bool = True) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()[-limit:]
    except OSError:
        return ""
    finally:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _kill(process: Any) -> None:
    if process.pid is None or not process.is_alive():
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
