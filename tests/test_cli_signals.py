"""Ctrl-C at any moment of a command, imports included: one line and exit code 130."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `-X importtime` reports each import as it completes: the test starts its clock at the
# line for the module that installs the handling, the first moment the project's code can
# act (before it, Python's own startup reports a Ctrl-C as it likes).
READY = "| evo_compress._interrupt"


def interrupt_after(delay: float, *args: str, module: str = "evo_compress.cli") -> tuple:
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.rstrip().endswith(READY):
            break
    else:
        raise AssertionError(f"{READY} never imported; exit {proc.wait()}")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("import time:")]
    return proc.returncode, lines


def assert_interrupted(code: int, lines: list[str]) -> None:
    # 130, or ended by the signal itself when it came while Python was shutting down (after
    # it let go of the handlers); a shell reports 130 for both. Never a traceback.
    assert code in (130, -signal.SIGINT), lines
    assert all(line.startswith("interrupted") for line in lines), lines
    assert len(lines) == 1 if code == 130 else len(lines) <= 1, lines


@pytest.mark.parametrize("delay", [0.002, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3])
def test_ctrl_c_while_starting_or_validating_is_one_line(tmp_path: Path, delay: float) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("evaluator: {name: synthetic}\n")
    code, lines = interrupt_after(delay, "validate", str(config))
    if code == 0:
        pytest.skip("validate finished before the signal came")  # a much faster machine
    assert_interrupted(code, lines)


@pytest.mark.parametrize("delay", [0.002, 0.05])
def test_the_evo_compress_command_handles_ctrl_c_before_its_imports(delay: float) -> None:
    # `python -m evo_compress` runs the function the `evo-compress` script runs.
    code, lines = interrupt_after(delay, "--help", module="evo_compress")
    assert_interrupted(code, lines)


def test_ctrl_c_during_a_search_saves_it_and_says_how_to_resume(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "search: {population_size: 6, generations: 500, seed: 1}\n"
        "evaluator: {name: synthetic, settings: {cost_s: 0.01}}\n"
        "cache: {enabled: false}\n"
    )
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "evo_compress.cli", "run", "-c", config, "--run-dir", run_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("generation 1:"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [x for x in err.splitlines() if x.strip()]
    assert proc.returncode == 130, err
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), err
    assert f"evo-compress resume {run_dir}" in lines[0]
    status = subprocess.run(
        [sys.executable, "-m", "evo_compress.cli", "status", run_dir],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert status.returncode == 0 and "of 500" in status.stdout, status.stderr
