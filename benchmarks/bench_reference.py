"""The transformers back end on the reference model: what each kind of recipe costs and
measures on this machine. Writes the `reference` section of BENCHMARKS.md.

Every number is measured by the same code a search uses (one worker process per
evaluation), except energy on CPUs without power counters, which is an estimate from CPU
time and is labelled so in the table.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sections import write_section

from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
from evo_compress.fitness import EvaluationContext, make_evaluator
from evo_compress.fitness.model import cpu_name
from evo_compress.genomes import SearchSpace
from evo_compress.reference import default_cache_dir, read_reference_info, reference_model_dir

RECIPES: dict[str, dict[str, object]] = {
    "baseline (fp32)": {},
    "int8 weight-only": {"quant": {"method": "int8_weight_only"}},
    "int8 w8a8": {"quant": {"method": "int8_w8a8"}},
    "rtn int4 /64": {"quant": {"method": "rtn", "group_size": 64}},
    "gptq int4 /64": {"quant": {"method": "gptq", "group_size": 64}},
    "nf4 /64": {"quant": {"method": "nf4", "group_size": 64}},
    "wanda 50%": {"prune": {"method": "wanda", "sparsity": 0.5}},
    "wanda 2:4 + lora r16 x200": {
        "prune": {"method": "wanda", "pattern": "2:4"},
        "recovery": {"method": "lora", "lora_rank": 16, "steps": 200},
    },
    "structured mlp 25%": {"prune": {"method": "structured_mlp", "sparsity": 0.25}},
}
SETTINGS = {"threads": 2, "latency_prompts": 16, "max_new_tokens": 8, "latency_repeats": 3}
BATCH = 4


def main() -> int:
    space = SearchSpace.builtin()
    context = EvaluationContext(
        ModelConfig(id="reference"), HardwareConfig(device="cpu"), CarbonConfig()
    )
    evaluator = make_evaluator("transformers", SETTINGS, context)
    evaluator.prepare()
    info = read_reference_info(reference_model_dir(default_cache_dir()))
    rows = []
    energy_how = ""
    for name, data in RECIPES.items():
        recipe = space.recipe({**data, "serve": {"max_num_seqs": BATCH}})
        started = time.perf_counter()
        result = evaluator.evaluate(recipe, space)
        seconds = time.perf_counter() - started
        if not result.ok or result.objectives is None:
            rows.append(f"| {name} | {result.status}: {result.reason} | | | | | |")
            print(f"{name}: {result.status} {result.reason}")
            continue
        o = result.objectives
        energy = result.metadata["objectives"]["energy"]
        energy_how = energy["how"]
        mark = "" if energy["measured"] else " (est.)"
        rows.append(
            f"| {name} | {o['accuracy']:.3f} | {o['latency']:.2f} | {o['memory']:.2f} | "
            f"{o['energy']:.1f}{mark} | {o['co2']:.5f} | {seconds:.1f} |"
        )
        print(rows[-1])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(
        [
            "## Transformers back end on the reference model",
            "",
            f"Run {date} on {cpu_name()}, {platform.machine()}, {os.cpu_count()} CPUs, "
            f"2 torch threads per worker. Reference model: {info.get('parameters', '~1M')} "
            f"parameters, trained in {info.get('attempts', [{}])[-1].get('seconds', '?')} s, "
            f"held-out exact match "
            f"{info.get('test_accuracy', '?')}. Batch size (`serve.max_num_seqs`) {BATCH}, "
            f"{SETTINGS['max_new_tokens']} new tokens per prompt, "
            f"{SETTINGS['latency_repeats']} timed passes after a warm-up.",
            "",
            "| recipe | accuracy | ms/token (median) | memory MiB | energy J/1k tok | "
            "CO2 g/1k tok | evaluation s |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Energy: {energy_how}. Memory is the measured weight footprint plus the growth of "
            "resident memory while serving; torchao's int4 on CPU stores values unpacked in int8, "
            "so RTN/GPTQ take about as much memory as int8 here. One evaluation per recipe: on "
            "a ~1M-parameter model the latency of one recipe varies by tens of percent from run "
            "to run, so small latency and energy differences in this table are noise.",
            "",
            "GPU (`make gpu-check`): not run yet - no GPU was lent to the session that built "
            "this back end. Its CUDA paths (allocator peak memory, NVML energy, fp8, torchao "
            "int4) are unmeasured.",
            "",
            "How to reproduce: `make bench` (this section: `benchmarks/bench_reference.py`).",
        ]
    )
    write_section("reference", body)
    evaluator.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
