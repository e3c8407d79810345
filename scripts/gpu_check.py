"""GPU check (`make gpu-check`): prove the CUDA paths of the transformers back end in one run.

1. The environment: torch sees a CUDA device, a bf16 matmul agrees with the CPU, the
   allocator's peak counter works.
2. The back end: four recipes (baseline, int8 weight-only, nf4, 50% Wanda pruning) evaluated
   end to end on a ~1B-parameter model built from a Llama config with random weights
   (latency, memory and energy do not depend on weight values; accuracy is meaningless and
   printed only to show the path ran), each in its own worker process like a search does.

3. The vLLM back end, when vLLM is installed (its `vllm serve` on PATH, or the command in
   EVO_VLLM_COMMAND, e.g. "/opt/vllm-env/bin/vllm serve"): baseline, fp8 and an fp8 KV
   cache served by vLLM and measured through its API. Without vLLM this part says so and is
   skipped (the device machines have no vLLM).

4. AWQ on the reference model: the hand-written kernel (what runs without a quantization
   environment) against llm-compressor's, on the GPU, by each decoder layer's output error
   and by accuracy (`benchmarks/bench_awq.py` does the same on the CPU). Skipped, saying why,
   where llm-compressor is importable neither here nor in a quantization environment
   (`make vllm-env`).

Exit code 0 only when everything that could run ran; without a GPU it says so and exits 1.
Record the printed table, with the GPU's name, in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RECIPES = {
    "baseline": {},
    "int8": {"quant": {"method": "int8_weight_only"}},
    "nf4": {"quant": {"method": "nf4", "group_size": 64}},
    "wanda-50%": {"prune": {"method": "wanda", "sparsity": 0.5}},
}


def check_environment() -> bool:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch; nothing to check on this machine")
        return False
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    print(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__}")
    torch.manual_seed(0)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    expected = (a.double() @ b.double()).float()
    torch.cuda.reset_peak_memory_stats(device)
    ga, gb = a.to(device, torch.bfloat16), b.to(device, torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        out = ga @ gb
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 20
    error = (out.float().cpu() - expected).abs().max().item() / expected.abs().max().item()
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    print(
        f"bf16 matmul 4096^3: {seconds * 1e3:.3f} ms ({2 * 4096**3 / seconds / 1e12:.0f} "
        f"TFLOP/s), relative error {error:.2e}, allocator peak {peak:.0f} MiB"
    )
    return error < 2e-2 and peak > 0


def build_model(folder: Path) -> None:
    import torch

    from evo_compress.testing import save_random_llama

    save_random_llama(  # TinyLlama-1.1B's shape, random weights
        folder,
        dtype=torch.bfloat16,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    )


VLLM_RECIPES = {
    "baseline": {},
    "fp8": {"quant": {"method": "fp8"}},
    "kv-fp8": {"kv": {"dtype": "fp8"}},
}


def check_vllm(folder: Path) -> bool | None:
    """The vLLM back end on the same model; None when vLLM is not installed here."""
    from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
    from evo_compress.fitness import EvaluationContext, make_evaluator
    from evo_compress.genomes import SearchSpace

    command = os.environ.get("EVO_VLLM_COMMAND", "vllm serve")
    if shutil.which(shlex.split(command)[0]) is None:
        print(f"vLLM: `{command}` not found here; the vLLM back end was not checked")
        return None
    space = SearchSpace.builtin()
    context = EvaluationContext(
        ModelConfig(id=str(folder), dtype="bfloat16"),
        HardwareConfig(device="cuda"),
        CarbonConfig(),
    )
    settings = {"command": command, "limit": 32, "latency_requests": 32, "max_new_tokens": 32}
    evaluator = make_evaluator("vllm", settings, context)
    evaluator.prepare()
    ok = True
    print(f"vLLM back end ({command}):")
    for name, data in VLLM_RECIPES.items():
        recipe = space.recipe({**data, "serve": {"max_num_seqs": 16}})
        result = evaluator.evaluate(recipe, space)
        if result.ok and result.objectives:
            o = result.objectives
            print(
                f"{name:<10} {'ok':<8} {o['accuracy']:>6.3f} {o['latency']:>8.3f} "
                f"{o['memory']:>9.0f} {o['energy']:>9.2f}  {result.metadata.get('vllm_version')}"
            )
        else:
            ok = False
            print(f"{name:<10} {result.status:<8} {result.reason}")
    return ok


def check_back_end(folder: Path) -> bool:
    from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
    from evo_compress.fitness import EvaluationContext, make_evaluator
    from evo_compress.genomes import SearchSpace

    space = SearchSpace.builtin()
    ok = True
    context = EvaluationContext(
        ModelConfig(id=str(folder), dtype="bfloat16"),
        HardwareConfig(device="cuda"),
        CarbonConfig(),
    )
    settings = {"limit": 32, "threads": 4, "latency_prompts": 32, "max_new_tokens": 16}
    evaluator = make_evaluator("transformers", settings, context)
    evaluator.prepare()
    header = f"{'recipe':<10} {'status':<8} {'acc':>6} {'ms/tok':>8} {'MiB':>9} {'J/1k':>9}"
    print(header)
    rows = {}
    for name, data in RECIPES.items():
        recipe = space.recipe({**data, "serve": {"max_num_seqs": 16}})
        result = evaluator.evaluate(recipe, space)
        rows[name] = {
            "status": result.status,
            "objectives": result.objectives,
            "reason": result.reason,
        }
        if result.ok and result.objectives:
            o = result.objectives
            print(
                f"{name:<10} {'ok':<8} {o['accuracy']:>6.3f} {o['latency']:>8.3f} "
                f"{o['memory']:>9.0f} {o['energy']:>9.2f}"
            )
        else:
            ok = False
            print(f"{name:<10} {result.status:<8} {result.reason}")
    ok = check_pinned_worker(evaluator, space) and ok
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps(rows, indent=2))
    return ok


def check_pinned_worker(evaluator: Any, space: Any) -> bool:
    """A parallel worker's path (``evaluation.workers``): the evaluation pinned to one GPU
    with CUDA_VISIBLE_DEVICES, which its process calls cuda; NVML must read that GPU."""
    from evo_compress.fitness import Placement
    from evo_compress.fitness.pool import visible_gpus

    gpu = visible_gpus("cuda")[-1]
    placement = Placement(0, {"CUDA_VISIBLE_DEVICES": gpu}, "cuda", f"pinned to GPU {gpu}")
    result = evaluator.evaluate(space.recipe({"serve": {"max_num_seqs": 16}}), space, placement)
    how = (result.metadata.get("objectives") or {}).get("energy", {}).get("how", "")
    print(f"pinned worker (CUDA_VISIBLE_DEVICES={gpu}): {result.status} {result.reason or how}")
    return result.ok and "NVML" in how.upper()


def _quantization_python(tmp: Path) -> str | None:
    """A Python with llm-compressor for the AWQ job: the quantization environment's, else
    this Python's (as a one-line environment), else None."""
    import importlib.util

    from evo_compress.fitness.model.environments import QUANT_ENV_VAR, default_python

    python = default_python()
    if python is not None or importlib.util.find_spec("llmcompressor") is None:
        return python
    env = tmp / "quant-env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (env / "bin" / "python").chmod(0o755)
    (env / ".installed").write_text("")
    os.environ[QUANT_ENV_VAR] = str(env)
    return str(env / "bin" / "python")


def check_awq(tmp: Path, device: str = "cuda") -> bool | None:
    """Hand-written AWQ vs llm-compressor's on the reference model (int4, group 64, the same
    calibration) on ``device``; None when llm-compressor cannot run here."""
    import torch
    from transformers import AutoTokenizer

    from evo_compress.fitness.model.environments import QUANT_ENV_VAR
    from evo_compress.fitness.model.load import load_model, tokenize
    from evo_compress.fitness.model.quantize import apply_quantization
    from evo_compress.reference import default_cache_dir
    from evo_compress.reference.model import ensure_reference_model, greedy_exact_match
    from evo_compress.reference.task import ensure_reference_task, iter_problems

    python = _quantization_python(tmp)
    if python is None:
        print("AWQ comparison: skipped: llm-compressor is not importable here and there is no")
        print("  quantization environment (`make vllm-env`, or EVO_COMPRESS_QUANT_ENV)")
        return None
    cache = default_cache_dir()
    folder = ensure_reference_model(cache, progress=False)
    task = ensure_reference_task(cache)
    problems = list(iter_problems(task.include_path / "test.jsonl"))
    questions, answers = [p.question for p in problems], [p.answer for p in problems]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration = tokenize(tokenizer, list(task.train_texts[:64]), device)["input_ids"]
    held_out = tokenize(tokenizer, list(task.train_texts[-64:]), device)["input_ids"]

    def layer_outputs(model: Any) -> list[Any]:
        with torch.no_grad():
            states = model(held_out, output_hidden_states=True).hidden_states
        return [h.float() for h in states[1:]]

    reference = layer_outputs(load_model(str(folder), "float32", device))
    recipe = {"quant.method": "awq", "quant.group_size": 64}
    rows = {}
    for name, quant_env in (("evo-compress", ""), ("llm-compressor", None)):
        saved = os.environ.get(QUANT_ENV_VAR)
        if quant_env is not None:  # no quantization environment: the hand-written kernel
            os.environ[QUANT_ENV_VAR] = quant_env
        try:
            model = load_model(str(folder), "float32", device)
            result = apply_quantization(model, recipe, device, calibration, tmp / name)
        finally:
            if saved is None:
                os.environ.pop(QUANT_ENV_VAR, None)
            else:
                os.environ[QUANT_ENV_VAR] = saved
        quantized: Any = result.model
        errors = [
            float((q - r).norm() / r.norm())
            for q, r in zip(layer_outputs(quantized), reference, strict=True)
        ]
        accuracy = greedy_exact_match(quantized, tokenizer, questions, answers)
        rows[name] = {"algorithm": result.details["algorithm"], "layer_errors": errors}
        rows[name]["accuracy"] = accuracy
        print(
            f"AWQ {result.details['algorithm']:<34} accuracy {accuracy:.3f}, decoder layer "
            "output errors " + " ".join(f"{e:.4f}" for e in errors)
        )
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check_awq.json").write_text(json.dumps(rows, indent=2))
    return all(r["accuracy"] > 0 for r in rows.values())


def main() -> int:
    if not check_environment():
        return 1
    with tempfile.TemporaryDirectory(prefix="evo-gpu-check-") as tmp:
        folder = Path(tmp) / "llama-1b-random"
        build_model(folder)
        ok = check_back_end(folder)
        vllm_ok = check_vllm(folder)
        awq_ok = check_awq(Path(tmp))
    ok = ok and vllm_ok is not False and awq_ok is not False
    print("gpu-check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
