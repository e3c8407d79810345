"""The registry of compression methods: its rules, and that the built-in space, the docs and
the space's `choices_from` read it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from evo_compress.exceptions import RegistryError, SearchSpaceError
from evo_compress.genomes import SearchSpace
from evo_compress.methods import (
    METHODS,
    CompressionMethod,
    MethodRegistry,
    SyntheticTraits,
    VllmSupport,
    get_method,
)
from evo_compress.methods import docs as methods_docs

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_SPACE = ROOT / "tests" / "golden" / "builtin-space.json"
# SearchSpace.builtin().fingerprint (since `int8_bnb` joined the methods): recipe hashes,
# cache keys and the golden fronts depend on the built space staying exactly this.
BUILTIN_FINGERPRINT = "c2c2263615283836b833628261c4d4c7cb1a31db537ef878534b91ce3ca39e0f"


def _method(name: str = "int3", **fields: object) -> CompressionMethod:
    base = CompressionMethod(
        name="int3", kind="quantization", description="A test method.", weight_bits=4
    )
    return replace(base, name=name, **fields)  # type: ignore[arg-type]


def test_builtin_space_is_unchanged_by_the_registry() -> None:
    space = SearchSpace.builtin()
    expected = json.loads(GOLDEN_SPACE.read_text())
    assert json.loads(json.dumps(space.to_data(), default=str)) == expected
    assert list(space.genes) == list(expected["genes"])
    assert space.fingerprint == BUILTIN_FINGERPRINT


def test_builtin_space_choices_come_from_the_registry() -> None:
    space = SearchSpace.builtin()
    assert space.genes["quant.method"].to_data()["choices"] == METHODS.names("quantization")
    grouped = [m.name for m in METHODS.methods("quantization") if m.grouped]
    assert space.genes["quant.group_size"].active_if.to_data() == [{"quant.method": grouped}]


def test_registering_a_name_twice_raises() -> None:
    registry = MethodRegistry()
    registry.register(_method("int3"))
    with pytest.raises(RegistryError, match="`int3` is already registered"):
        registry.register(_method("int3", weight_bits=3))


def test_plugin_methods_join_after_the_builtins_and_fail_in_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The entry points of the group, as a distribution declares them (the pip-installed toy
    plugin of tests/test_plugins.py does the same for real)."""
    import sys
    import types
    from importlib.metadata import EntryPoint

    from evo_compress.methods import _base

    module = types.ModuleType("evo_test_methods")
    module.INT3 = _method("int3")  # type: ignore[attr-defined]
    module.RTN = get_method("rtn")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "evo_test_methods", module)
    group = "evo_test.methods"
    points = [
        EntryPoint("int3", "evo_test_methods:INT3", group),
        EntryPoint("rtn", "evo_test_methods:RTN", group),  # a built-in's name: ignored
        EntryPoint("int2", "evo_test_methods:INT3", group),  # not named as its entry point
        EntryPoint("gone", "evo_no_such_module:GONE", group),
    ]
    monkeypatch.setattr(_base, "entry_points", lambda group: points)
    registry = MethodRegistry(group)
    for method in METHODS:
        registry.register(method)
    with caplog.at_level("WARNING"):
        assert registry.names() == [*METHODS.names(), "int3"]
    [warning] = caplog.messages
    assert "`rtn` ignored: the name is taken by a built-in" in warning
    assert registry.origin("int3") == "unknown distribution"
    assert registry.origin("rtn") == "built-in"
    with pytest.raises(RegistryError, match=r"`gone` failed to load \(ModuleNotFoundError"):
        registry.get("gone")
    assert set(registry.broken()) == {"gone", "int2"}
    assert "is not a CompressionMethod named `int2`" in registry.broken()["int2"]
    assert registry.find("gone") is None


def test_unknown_name_says_did_you_mean() -> None:
    with pytest.raises(
        RegistryError, match=r"unknown quantization method `gptqq` \(did you mean `gptq`\?\)"
    ):
        get_method("gptqq", "quantization")
    assert METHODS.find("gptqq") is None and METHODS.find(128) is None
    assert METHODS.find("awq", "quantization") is get_method("awq")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "Int 3"}, "`name`"),
        ({"description": "two\nlines"}, "`description`"),
        ({"weight_bits": 0}, "`weight_bits`"),
        ({"group_sizes": (64, 64)}, "`group_sizes`"),
        (
            {"group_sizes": (64,), "vllm": VllmSupport(quantization="x", group_sizes=(32,))},
            "vLLM group sizes",
        ),
    ],
)
def test_invalid_entries_raise(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _method(**fields)


def test_vllm_support_is_online_or_offline_not_both() -> None:
    with pytest.raises(ValueError, match="not both"):
        VllmSupport(quantization="fp8", scheme="W8A8", algorithm="rtn")
    with pytest.raises(ValueError, match="`scheme`"):
        VllmSupport(scheme="W3A16", algorithm="rtn")


def test_backends_are_the_supports_that_are_set() -> None:
    method = _method(
        "int3",
        synthetic=SyntheticTraits(
            degradation=0.1, dequant_factor=1.0, compute_factor=1.0, calibration_j=0.0
        ),
    )
    assert method.backends == ("synthetic",)
    served = METHODS.names("quantization", backend="vllm")
    assert {"none", "fp8", "awq"} <= set(served)
    assert served == [m.name for m in METHODS if m.vllm is not None]  # registry order
    with pytest.raises(RegistryError, match="unknown back end `tensorrt`"):
        METHODS.methods(backend="tensorrt")


def test_a_registered_method_joins_the_builtin_space(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = MethodRegistry()
    for method in METHODS:
        registry.register(method)
    registry.register(_method("int3", group_sizes=(16, 64)))
    monkeypatch.setattr("evo_compress.genomes.space.METHODS", registry)
    space = SearchSpace.builtin()
    assert space.genes["quant.method"].to_data()["choices"][-1] == "int3"
    assert space.genes["quant.group_size"].to_data()["choices"] == [16, 32, 64, 128]
    assert space.recipe({"quant.method": "int3", "quant.group_size": 16})["quant.group_size"] == 16
    # The existing choices keep their order, so every earlier draw stays the same.
    assert space.genes["quant.method"].to_data()["choices"][:-1] == METHODS.names()


def test_choices_from_in_a_user_space() -> None:
    space = SearchSpace.from_data(
        {
            "genes": {
                "quant.method": {
                    "type": "choice",
                    "choices_from": {"methods": "quantization"},
                    "default": "awq",
                },
                "quant.group_size": {
                    "type": "choice",
                    "choices_from": {"group_sizes": "quantization"},
                    "default": 64,
                    "active_if": {
                        "quant.method": {"methods": "quantization", "calibration": True}
                    },
                },
            }
        }
    )
    assert space.genes["quant.group_size"].active_if.to_data() == [
        {"quant.method": ["awq", "gptq"]}
    ]
    assert "quant.group_size" not in space.recipe({"quant.method": "rtn"})


@pytest.mark.parametrize(
    ("gene", "message"),
    [
        (
            {"type": "choice", "choices_from": {"methods": "quantisation"}, "default": "none"},
            r"`genes.q.choices_from.methods`: unknown kind of method `quantisation` "
            r"\(did you mean `quantization`\?\)",
        ),
        (
            {"type": "choice", "choices_from": {"method": "quantization"}, "default": "none"},
            r"`genes.q.choices_from` must be",
        ),
        (
            {
                "type": "choice",
                "choices": ["none"],
                "choices_from": {"methods": "quantization"},
                "default": "none",
            },
            r"`genes.q` has both `choices` and `choices_from`",
        ),
        (
            {
                "type": "bool",
                "default": False,
                "active_if": {"p": {"methods": "quantization", "bits": 4}},
            },
            r"`genes.q.active_if.p` may filter methods by",
        ),
        (
            {
                "type": "bool",
                "default": False,
                "active_if": {"p": {"methods": "quantization", "grouped": "yes"}},
            },
            r"`genes.q.active_if.p.grouped` must be true or false",
        ),
    ],
)
def test_choices_from_errors_name_the_field(gene: dict[str, object], message: str) -> None:
    data = {
        "genes": {
            "p": {"type": "choice", "choices": ["none", "awq"], "default": "none"},
            "q": gene,
        }
    }
    with pytest.raises(SearchSpaceError, match=message):
        SearchSpace.from_data(data)


def test_committed_methods_doc_matches_the_registry() -> None:
    committed = (ROOT / "docs" / "methods.md").read_text()
    assert committed == methods_docs.render(), (
        "docs/methods.md is stale: run `python -m evo_compress.methods.docs > docs/methods.md`"
    )
    for method in METHODS:
        assert f"`{method.name}`" in committed


def test_every_llm_compressor_step_is_one_the_job_runs() -> None:
    """``fitness/vllm/quantize_job.py`` runs in vLLM's own Python and keeps its own table:
    every scheme and algorithm the registry asks it for must be in that table."""
    from evo_compress.fitness.vllm import quantize_job

    for method in METHODS:
        if method.vllm is not None and method.vllm.scheme is not None:
            assert method.vllm.algorithm in quantize_job.ALGORITHMS[method.vllm.scheme], method


def test_kernel_references_are_module_attr() -> None:
    from evo_compress.methods import TransformersSupport

    with pytest.raises(ValueError, match='`kernel` must be "module:attr"'):
        TransformersSupport(library="x", kernel="my_module.kernel")
    with pytest.raises(ValueError, match="without a `kernel`"):
        TransformersSupport(library="x", probe="m:probe")
    ok = TransformersSupport(library="x", kernel="m:KERNEL", probe="m:KERNEL.probe")
    assert ok.storage is None
