"""Population configs: defaults, one-line errors naming the field, round trips."""

from __future__ import annotations

import pytest
import yaml

from evo_compress.app import build_space, checked_config, load_config
from evo_compress.config import PopulationConfig
from evo_compress.exceptions import ConfigError


def test_defaults_validate_and_round_trip_through_yaml():
    config = checked_config({})
    again = checked_config(yaml.safe_load(config.to_yaml()))
    assert again == config
    assert config.search.algorithm == "nsga2" and config.evaluator.name == "auto"
    # auto on the default synthetic model is the synthetic landscape.
    from evo_compress.app import make_config_evaluator

    assert make_config_evaluator(config).name == "synthetic"


def test_racing_is_off_by_default_and_round_trips():
    assert checked_config({}).fidelity.racing is False
    config = checked_config({"fidelity": {"racing": True, "quick_limit": 100, "z": 1.5}})
    assert checked_config(yaml.safe_load(config.to_yaml())) == config


def test_the_demo_config_loads():
    config = load_config("configs/synthetic.yaml")
    assert isinstance(config, PopulationConfig)
    assert config.constraints.active() == {"max_accuracy_drop": 0.05, "max_memory_mib": 16000}


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"search": {"population_size": 2}}, ["`search.population_size`", "4", "got 2"]),
        ({"search": {"algorithm": "nsga4"}}, ["`search.algorithm`", "nsga4"]),
        ({"constraints": {"max_latency_ms": -1}}, ["`constraints.max_latency_ms`", "-1"]),
        ({"modle": {}}, ["unknown key `modle`"]),
        (
            {"search": {"operators": {"crossover_prob": 1.5}}},
            ["`search.operators.crossover_prob`", "1.5"],
        ),
        ({"search": {"operators": {"crossover": []}}}, ["`search.operators.crossover`"]),
        ({"search": {"space": {"base": "llm-compresion"}}}, ["did you mean `llm-compression`"]),
        (
            {"search": {"space": {"genes": {"prune.sparsity": {"low": 0.9, "high": 0.1}}}}},
            ["`search.space`", "low 0.9"],
        ),
        ({"hardware": {"device": "tpu"}}, ["`hardware.device`", "tpu"]),
        ({"name": "bad name!"}, ["`name`"]),
        (
            {"model": {"id": "meta-llama/Llama-3.1-8B"}, "evaluator": {"name": "synthetic"}},
            ["synthetic evaluator", "Llama-3.1-8B"],
        ),
        ([1, 2], ["must be a mapping"]),
    ],
)
def test_errors_name_the_field_and_the_value(data, fragments):
    with pytest.raises(ConfigError) as info:
        checked_config(data)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_space_overrides_apply(tmp_path):
    config = checked_config(
        {
            "search": {
                "space": {
                    "pin": {"quant.method": "nf4"},
                    "genes": {"prune.sparsity": {"high": 0.3}},
                }
            }
        }
    )
    space = build_space(config)
    assert space.genes["quant.method"].choices == ("nf4",)  # type: ignore[attr-defined]
    assert space.genes["prune.sparsity"].high == 0.3  # type: ignore[attr-defined]


def test_a_space_file_can_be_the_base(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "genes": {"quant.method": {"type": "choice", "choices": ["none", "awq"]}},
            }
        )
    )
    space = build_space(checked_config({"search": {"space": {"base": str(path)}}}))
    assert space.name == "tiny" and list(space.genes) == ["quant.method"]


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"search": {"population_size": 10**8}}, ["`search.population_size`", "<= 100000"]),
        ({"search": {"population_size": 2**63}}, ["`search.population_size`", str(2**63)]),
        ({"search": {"population_size": 1e8}}, ["`search.population_size`", "<= 100000"]),
        ({"search": {"generations": 2**63}}, ["`search.generations`", "<="]),
        ({"search": {"offspring_size": 2**40}}, ["`search.offspring_size`", "<="]),
        ({"search": {"seed": 2**64}}, ["`search.seed`", "<="]),
        ({"search": {"max_redraws": 10**12}}, ["`search.max_redraws`", "<="]),
        ({"search": {"nsga3_partitions": 10**6}}, ["`search.nsga3_partitions`", "<="]),
        ({"carbon": {"deployment_tokens": float("inf")}}, ["`carbon.deployment_tokens`", "inf"]),
        ({"carbon": {"grid_intensity_g_per_kwh": 1e300}}, ["`carbon.grid_intensity_g_per_kwh`"]),
        ({"hardware": {"memory_gb": float("inf")}}, ["`hardware.memory_gb`", "finite"]),
        ({"constraints": {"max_latency_ms": float("inf")}}, ["`constraints.max_latency_ms`"]),
        ({"constraints": {"max_accuracy_drop": 5}}, ["`constraints.max_accuracy_drop`", "<="]),
        (
            {"search": {"operators": {"mutation": [{"name": "gene", "weight": float("inf")}]}}},
            ["`search.operators.mutation.0.weight`"],
        ),
        ({"llm": {"concurrency": 10**9}}, ["`llm.concurrency`", "<="]),
        ({"llm": {"budget": {"max_cost": float("nan")}}}, ["`llm.budget.max_cost`"]),
        ({"evaluation": {"workers": 10**9}}, ["`evaluation.workers`", str(10**9)]),
        ({"output": {"runs_root": "runs\x00x"}}, ["`output.runs_root`", "NUL"]),
        ({"fidelity": {"quick_limit": 0}}, ["`fidelity.quick_limit`", ">= 1", "got 0"]),
        ({"fidelity": {"z": -1}}, ["`fidelity.z`", ">= 0"]),
        ({"fidelity": {"z": float("nan")}}, ["`fidelity.z`"]),
        ({"fidelity": {"raceing": True}}, ["unknown key `fidelity.raceing`"]),
    ],
)
def test_numbers_out_of_any_sane_range_are_rejected(data, fragments):
    with pytest.raises(ConfigError) as info:
        checked_config(data)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_huge_bad_value_is_echoed_shortened():
    with pytest.raises(ConfigError) as info:
        checked_config({"model": {"dtype": "x" * 100_000}})
    message = str(info.value)
    assert "`model.dtype`" in message and "xxxx" in message and len(message) < 400


@pytest.mark.parametrize(
    ("genes", "fragments"),
    [
        ({"serve.max_num_seqs": {"choices": ["xyz", 1]}}, ["serve.max_num_seqs", "'xyz'"]),
        ({"serve.max_num_seqs": {"choices": [0, 4]}}, ["serve.max_num_seqs", "got 0"]),
        ({"serve.max_num_seqs": {"choices": [1.5, 4]}}, ["serve.max_num_seqs", "1.5"]),
        (
            {"recovery.steps": {"low": -100, "high": -50, "default": -50}},
            ["recovery.steps", "-100"],
        ),
        ({"prune.sparsity": {"low": 0.5, "high": 3.0}}, ["prune.sparsity", "3.0"]),
        ({"kv.sliding_window": {"type": "choice", "choices": ["yes", 3]}}, ["kv.sliding_window"]),
        (
            {"serve.gpu_memory_utilization": {"low": 0.0, "high": 1e300, "step": 1e-300}},
            ["serve.gpu_memory_utilization"],
        ),
    ],
)
def test_space_overrides_stay_within_what_the_back_ends_accept(genes, fragments):
    with pytest.raises(ConfigError) as info:
        checked_config({"search": {"space": {"genes": genes}}})
    message = str(info.value)
    assert "\n" not in message and "`search.space`" in message
    for fragment in fragments:
        assert fragment in message, message
