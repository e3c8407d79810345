"""The zoo's tiny random models: built offline from AutoConfig, cached, loadable."""

from __future__ import annotations

import pytest

from evo_compress.reference.zoo import ZOO, ensure_zoo_model, zoo_config

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("architecture", sorted(ZOO))
def test_zoo_model_loads_with_its_own_layout(architecture: str, tmp_path) -> None:
    folder = ensure_zoo_model(architecture, tmp_path)
    assert ensure_zoo_model(architecture, tmp_path) == folder  # cached: built once
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == zoo_config(architecture).model_type
    assert tokenizer("12+3=")["input_ids"] == [5, 6, 14, 7, 15]
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if architecture == "phi3":
        assert {"qkv_proj", "gate_up_proj"} <= names
    elif architecture == "mixtral":
        assert "experts" in names and "gate_proj" not in names
    else:
        assert {"q_proj", "gate_proj"} <= names


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="llama"):
        zoo_config("gpt5")
