"""AWQ on the reference model: the hand-written kernel (what runs without a quantization
environment) against llm-compressor's, on the CPU, by each decoder layer's output error on
held-out text and by accuracy on the reference task (int4, group 64, the same 64 calibration
texts). Writes the `awq` section of BENCHMARKS.md; `make gpu-check` runs the same comparison
on a GPU.

    python benchmarks/bench_awq.py [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_engine import machine_info
from gpu_check import check_awq
from sections import write_section


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-awq-") as tmp:
        os.environ["OUT"] = tmp
        ran = check_awq(Path(tmp), "cpu")
        if ran is None:
            print("bench_awq: llm-compressor cannot run here (no quantization environment)")
            return 0
        rows = json.loads(Path(tmp, "gpu_check_awq.json").read_text())
    layers = len(next(iter(rows.values()))["layer_errors"])
    lines = [
        "## AWQ: hand-written against llm-compressor (`bench_awq.py`)",
        "",
        f"Run {info['date']} on {info['cpu']}, {info['arch']}, {info['nproc']} CPUs "
        f"({info['threads']}), Python {info['python']}. The reference model (float32, CPU), "
        "int4 weights in groups of 64, the same 64 calibration texts for both; the "
        "hand-written AWQ is what the transformers back end runs without a quantization "
        "environment, llm-compressor's what it runs with one (and what the vLLM back end "
        "builds). Layer error: relative error of each decoder layer's output on 64 held-out "
        "texts against the unquantized model's.",
        "",
        "| AWQ | accuracy | mean layer error | last layer error |",
        "|---|---:|---:|---:|",
    ]
    for row in rows.values():
        errors = row["layer_errors"]
        lines.append(
            f"| {row['algorithm']} | {row['accuracy']:.3f} | {sum(errors) / len(errors):.4f} "
            f"| {errors[-1]:.4f} |"
        )
    lines += ["", f"Per layer ({layers} decoder layers):", ""]
    for row in rows.values():
        lines.append(
            f"- {row['algorithm']}: " + ", ".join(f"{e:.4f}" for e in row["layer_errors"])
        )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("awq", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
