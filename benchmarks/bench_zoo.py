"""Every compression method on every zoo architecture through the transformers back end:
ok, refused before loading (with the reason) or failed (with the error), the seconds it took
and the weight bytes it left; for the mixture of experts also the experts' stored bytes
before and after quantization. Writes the `zoo` section of BENCHMARKS.md.

The matrix is every choice of the built-in space's prune, quantization and recovery genes
(magnitude and Wanda in each pattern), plus the KV settings, each alone on the baseline (QLoRA
on nf4). Evaluations run the worker's own function in this process (``evaluate_in_worker``)
rather than in a fresh worker each: the same code, without seconds of process start per cell.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import importlib
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import machine_info
from sections import write_section

from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
from evo_compress.fitness import EvaluationContext, make_evaluator
from evo_compress.fitness.hf import evaluator as hf_evaluator
from evo_compress.genomes import SearchSpace
from evo_compress.reference.zoo import ZOO, ensure_zoo_model

SETTINGS = {
    "threads": 1,
    "limit": 8,
    "latency_prompts": 2,
    "max_new_tokens": 2,
    "latency_repeats": 1,
    "calibration_samples": 16,
    "recovery_batch_size": 8,
}
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "mixtral")
STEPS = 50  # recovery.steps' lowest value in the space


def cells(space: SearchSpace) -> dict[str, dict[str, Any]]:
    """Column name -> partial recipe: every choice of the space's weight-method genes."""
    out: dict[str, dict[str, Any]] = {}
    patterns = space.genes["prune.pattern"].choices  # type: ignore[attr-defined]
    for method in space.genes["prune.method"].choices:  # type: ignore[attr-defined]
        if method == "none":
            continue
        if method in ("magnitude", "wanda"):
            for pattern in patterns:
                out[f"{method} {pattern}"] = {"prune": {"method": method, "pattern": pattern}}
        else:
            # Half the heads: 0.25 of the zoo's two KV groups rounds to removing none.
            sparsity = 0.5 if method == "structured_heads" else 0.25
            out[method] = {"prune": {"method": method, "sparsity": sparsity}}
    for method in space.genes["quant.method"].choices:  # type: ignore[attr-defined]
        if method != "none":
            out[method] = {"quant": {"method": method}}
    for method in space.genes["recovery.method"].choices:  # type: ignore[attr-defined]
        if method == "none":
            continue
        recipe: dict[str, Any] = {"recovery": {"method": method, "steps": STEPS}}
        if method == "qlora":
            recipe["quant"] = {"method": "nf4"}
        out[method] = recipe
    out["kv fp8"] = {"kv": {"dtype": "fp8"}}
    out["sliding window"] = {"kv": {"sliding_window": True, "window": 256}}
    return out


def _in_process(target: str, payload: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(payload)


def run_matrix(
    archs: Iterable[str] = ARCHS, names: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """One row per (architecture, method): outcome, reason, seconds, bytes."""
    space = SearchSpace.builtin()
    matrix = cells(space)
    chosen = list(names) if names is not None else list(matrix)
    original = hf_evaluator.run_in_worker
    hf_evaluator.run_in_worker = _in_process
    rows: list[dict[str, Any]] = []
    try:
        for arch in archs:
            folder = ensure_zoo_model(arch)
            context = EvaluationContext(
                ModelConfig(id=str(folder)), HardwareConfig(device="cpu"), CarbonConfig()
            )
            evaluator = make_evaluator("transformers", SETTINGS, context)
            evaluator.prepare()
            baseline = evaluator.evaluate(space.recipe({}), space)
            base_bytes = (
                baseline.metadata["compression"]["quant"]["weight_bytes"] if baseline.ok else None
            )
            for name in chosen:
                recipe = space.recipe({**matrix[name], "serve": {"max_num_seqs": 2}})
                start = time.perf_counter()
                result = evaluator.evaluate(recipe, space)
                row: dict[str, Any] = {
                    "arch": arch,
                    "method": name,
                    "seconds": round(time.perf_counter() - start, 2),
                    "base_bytes": base_bytes,
                }
                if result.ok:
                    quant = result.metadata["compression"]["quant"]
                    row.update(outcome="ok", weight_bytes=quant["weight_bytes"])
                    if "experts" in quant:
                        row["experts"] = quant["experts"]
                    prune = result.metadata["compression"].get("prune")
                    if prune is not None:
                        row["sparsity"] = prune["measured_sparsity"]
                elif result.status == "infeasible":
                    row.update(outcome="refused", reason=result.reason)
                else:
                    row.update(outcome="failed", reason=result.reason)
                rows.append(row)
                print(
                    f"{arch:8} {name:18} {row['outcome']:8} {row['seconds']:6.2f}s "
                    f"{row.get('reason') or ''}"[:200],
                    flush=True,
                )
            evaluator.close()
    finally:
        hf_evaluator.run_in_worker = original
    return rows


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.0f}"


def render(rows: list[dict[str, Any]], info: dict[str, str], seconds: float) -> str:
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["arch"], r["method"]): r for r in rows}
    reasons: dict[str, int] = {}
    lines = [
        "## Every method on every zoo architecture (transformers back end)",
        "",
        f"Run {info['date']} on {info['cpu']}, {info['arch']}, {info['nproc']} CPUs "
        f"({info['threads']}), torch threads 1, in {seconds:.0f} s. Tiny random models of the "
        "zoo (`evo_compress/reference/zoo.py`: 2 layers, hidden 128, 4 heads over 2 KV heads, "
        "MLP 256; Mixtral with 4 experts, top-2), float32, on the CPU, the reference task "
        "(8 items: random models score ~0; the point is that each recipe is applied and "
        "measured). Each method alone on the baseline; defaults for the genes not named "
        "(group size 128; sparsity 0.25 for structured_mlp, 0.5 for structured_heads (one of "
        "the two KV groups), 50% for the N:M patterns and unstructured methods; recovery 50 "
        "steps; QLoRA on nf4).",
        "",
        "A cell is `ok` with the seconds of the evaluation and the weight KiB after "
        "compression (measured from the stored tensors), `refused [n]` (infeasible before "
        "any weight was loaded, reason n below) or `FAILED` (an error after loading).",
        "",
        "| method | " + " | ".join(archs) + " |",
        "|---|" + "---|" * len(archs),
    ]
    base = " | ".join(_kb(by[(a, methods[0])].get("base_bytes")) for a in archs)
    lines.append(f"| *(baseline KiB)* | {base} |")
    for method in methods:
        cells_ = []
        for arch in archs:
            r = by.get((arch, method))
            if r is None:
                cells_.append("")
            elif r["outcome"] == "ok":
                cells_.append(f"ok {r['seconds']:.1f}s {_kb(r['weight_bytes'])}")
            else:
                number = reasons.setdefault(r["reason"] or "", len(reasons) + 1)
                label = "refused" if r["outcome"] == "refused" else "FAILED"
                cells_.append(f"{label} [{number}]")
        lines.append(f"| {method} | " + " | ".join(cells_) + " |")
    lines += ["", "Reasons:", ""]
    for reason, number in reasons.items():
        lines.append(f"{number}. {reason}")
    # The cells that changed the weights' bytes (quantization, channel removal).
    moe = [r for r in rows if r.get("experts") and r["weight_bytes"] != r["base_bytes"]]
    if moe:
        lines += [
            "",
            "Mixtral's experts are fused 3-D parameters (`mlp.experts.gate_up_proj` "
            "[E, 2I, H], `down_proj` [E, H, I]), not `nn.Linear`: pruning reaches them "
            "(per expert), quantization does not (torchao and bitsandbytes quantize "
            "`nn.Linear` layers), and the router is never compressed. Their stored bytes, "
            "measured before and after the quantization step, in the cells that changed "
            "the model's bytes:",
            "",
            "| method | model KiB | expert params | expert KiB before | expert KiB after |",
            "|---|---|---|---|---|",
        ]
        for r in moe:
            e = r["experts"]
            lines.append(
                f"| {r['method']} | {_kb(r['weight_bytes'])} | {e['params']} | "
                f"{_kb(e['bytes_before'])} | {_kb(e['bytes_after'])} |"
            )
    failed = sum(r["outcome"] == "failed" for r in rows)
    refused = sum(r["outcome"] == "refused" for r in rows)
    lines += [
        "",
        f"{len(rows)} cells: {len(rows) - failed - refused} ok, {refused} refused before "
        f"loading, {failed} failed.",
        "",
        "How to reproduce: `make bench` (this section: `benchmarks/bench_zoo.py`).",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", action="append", choices=sorted(ZOO), help="default: all")
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    args = parser.parse_args()
    info = machine_info()
    info["threads"] = ", ".join(
        f"{v}={os.environ.get(v)}"
        for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    )
    start = time.perf_counter()
    rows = run_matrix(args.arch or ARCHS)
    body = render(rows, info, time.perf_counter() - start)
    print(body)
    if not args.no_write:
        write_section("zoo", body)
    return 1 if any(r["outcome"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
