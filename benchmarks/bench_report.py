"""The HTML report of a long run: the page's size and how long headless chromium, without
WebGL, takes to draw it. Writes the ``report`` section of BENCHMARKS.md.

A synthetic run of 101 generations of 100 (10,100 evaluations, a front of over a thousand
members) is searched, its report written, then loaded three times in a fresh headless
chromium (``--disable-3d-apis``: the SVG figures, as CI and locked-down desktops draw them);
the figure is the median load time until every figure is drawn. Targets (issue 21): under
5 MB and under 10 s.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "reports"))

from bench_engine import machine_info
from conftest import make_config
from sections import write_section
from test_report import Devtools

from evo_compress.app import start_search
from evo_compress.reports import write_report
from evo_compress.runs import RunStore
from evo_compress.runs.front import load_front

LOADS = 3


def measure(work: Path, chromium: str) -> dict[str, float]:
    config = make_config(work, search={"population_size": 100, "generations": 101})
    search = start_search(config, run_dir=work / "run")
    search.run()
    search.close()
    with RunStore.open(work / "run") as store:
        evaluations = store.count_evaluations()
        page = write_report(store, work / "report.html")
        front = len(load_front(store))
    seconds = []
    for i in range(LOADS):
        browser = Devtools(chromium, work / f"load{i}")
        try:
            seconds.append(browser.load(page))
        finally:
            browser.close()
    return {
        "evaluations": evaluations,
        "front": front,
        "bytes": page.stat().st_size,
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
    }


def render(m: dict[str, float], chromium_version: str) -> str:
    info = machine_info()
    verdict = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    return "\n".join(
        [
            "## The report of a long run (`bench_report.py`)",
            "",
            f"Run {info['date']} on {info['cpu']} ({info['nproc']} cores shared, Python "
            f"{info['python']}), {chromium_version} headless without WebGL "
            "(`--disable-3d-apis`). A synthetic run of 101 generations of 100; its report "
            f"loaded {LOADS} times, each in a fresh browser, timed until every figure is drawn.",
            "",
            "| evaluations | front | page size | draw time: median (min-max) | targets |",
            "|---|---|---|---|---|",
            f"| {m['evaluations']:,} | {m['front']:,} | {m['bytes'] / 1e6:.2f} MB | "
            f"{m['median_s']:.1f} s ({m['min_s']:.1f}-{m['max_s']:.1f}) | "
            f"< 5 MB {verdict(m['bytes'] < 5_000_000)}, < 10 s "
            f"{verdict(m['median_s'] < 10)} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="Print, leave BENCHMARKS.md")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("no chromium here: install Debian's chromium to draw the report headless")
    import subprocess

    version = (
        subprocess.run(
            [chromium, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or "chromium"
    )
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        m = measure(Path(tmp), chromium)
    text = render(m, version)
    print(text)
    if not args.no_write:
        write_section("report", text)


if __name__ == "__main__":
    main()
