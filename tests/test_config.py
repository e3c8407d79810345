"""Population configs: defaults, one-line errors naming the field, round trips."""

from __future__ import annotations

import pytest
import yaml

from evo_compress.config import PopulationConfig, build_space, load_config, parse_config
from evo_compress.exceptions import ConfigError


def test_defaults_validate_and_round_trip_through_yaml():
    config = parse_config({})
    again = parse_config(yaml.safe_load(config.to_yaml()))
    assert again == config
    assert config.search.algorithm == "nsga2" and config.evaluator.name == "auto"
    # auto on the default synthetic model is the synthetic landscape.
    from evo_compress.engine import make_config_evaluator

    assert make_config_evaluator(config).name == "synthetic"


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
        parse_config(data)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_space_overrides_apply(tmp_path):
    config = parse_config(
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
    space = build_space(parse_config({"search": {"space": {"base": str(path)}}}))
    assert space.name == "tiny" and list(space.genes) == ["quant.method"]
