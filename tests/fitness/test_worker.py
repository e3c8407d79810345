"""Worker isolation: results, exceptions, crashes, timeouts and memory limits."""

from __future__ import annotations

import os
import time

from evo_compress.fitness._base import limit_excess
from evo_compress.fitness.worker import WorkerLimits, run_in_worker

LIMITS = WorkerLimits(timeout_s=30, memory_limit_mib=2048)


def test_a_result_comes_back_from_another_process():
    result = run_in_worker("evo_compress.testing:worker_echo", {"name": "x"}, LIMITS)
    assert result.ok and result.objectives is not None
    assert result.metadata["echo"] == {"name": "x"}
    assert result.metadata["pid"] != os.getpid()
    assert result.metadata["worker"]["seconds"] > 0


def test_an_exception_is_a_failed_result_with_its_traceback():
    result = run_in_worker("evo_compress.testing:worker_raise", {"name": "r1"}, LIMITS)
    assert result.status == "failed"
    assert result.reason == "ValueError: bad recipe r1"
    assert "worker_raise" in result.metadata["traceback"]


def test_a_crash_is_a_failed_result():
    result = run_in_worker("evo_compress.testing:worker_crash", {}, LIMITS)
    assert result.status == "failed"
    assert "worker died" in (result.reason or "") and "signal 11" in (result.reason or "")


def test_a_timeout_kills_the_worker():
    start = time.perf_counter()
    result = run_in_worker(
        "evo_compress.testing:worker_sleep", {"seconds": 60}, WorkerLimits(timeout_s=1.0)
    )
    assert time.perf_counter() - start < 15
    assert result.status == "failed" and (result.reason or "").startswith("timeout")
    # How far past the limit it ran is recorded: the search grades the failure by it.
    assert result.metadata["over_limit"]["limit"] == 1.0
    assert limit_excess(result) == result.metadata["over_limit"]["needed"] - 1.0 >= 0


def test_the_memory_limit_kills_the_worker():
    result = run_in_worker(
        "evo_compress.testing:worker_allocate",
        {"mib": 600},
        WorkerLimits(timeout_s=60, memory_limit_mib=150),
    )
    assert result.status == "failed" and (result.reason or "").startswith("out of memory")
    assert result.metadata["worker"]["peak_rss_mib"] > 150
    assert result.metadata["over_limit"]["limit"] == 150
    assert (limit_excess(result) or 0.0) > 0


def test_within_the_memory_limit_it_completes():
    result = run_in_worker(
        "evo_compress.testing:worker_allocate",
        {"mib": 50},
        WorkerLimits(timeout_s=60, memory_limit_mib=1024),
    )
    assert result.ok and result.metadata["echo"] == {"held": 50}


def test_worker_output_stays_off_the_terminal_and_comes_back_on_failure(capfd):
    result = run_in_worker("evo_compress.testing:worker_print_then_raise", {}, LIMITS)
    out, err = capfd.readouterr()
    assert "chatter from a library" not in out + err
    assert "chatter from a library" in result.metadata["worker"]["output_tail"]


def test_a_log_path_keeps_the_workers_output(tmp_path, capfd):
    log = tmp_path / "logs" / "worker-x.log"
    failed = run_in_worker(
        "evo_compress.testing:worker_print_then_raise", {}, LIMITS, log_path=log
    )
    out, err = capfd.readouterr()
    assert "chatter from a library" not in out + err
    assert "chatter from a library" in log.read_text()
    assert failed.metadata["worker"]["log"] == str(log)
    assert "chatter from a library" in failed.metadata["worker"]["output_tail"]
    ok = run_in_worker("evo_compress.testing:worker_echo", {}, LIMITS, log_path=log)
    assert ok.ok and ok.metadata["worker"]["log"] == str(log) and log.exists()
