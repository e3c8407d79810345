"""Entry-point plugins in a registry: found from real dist-info metadata on first use, loaded
only when their name is looked up, a clash or a broken import one line naming the plugin."""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from evo_compress.exceptions import RegistryError
from evo_compress.fitness import EVALUATORS
from evo_compress.operators import CROSSOVERS, MUTATIONS
from evo_compress.registry import BUILTIN, Registry, registries

_GROUP_NUMBERS = itertools.count()


def install(site: Path, dist: str, version: str, group: str, entries: dict[str, str]) -> None:
    """What pip leaves in site-packages for a distribution declaring ``entries``."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "site"
    folder.mkdir()
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    for name in [m for m in sys.modules if m.startswith("widgets_plugin")]:
        del sys.modules[name]


@pytest.fixture
def group() -> str:
    return f"evo_compress_tests.widgets{next(_GROUP_NUMBERS)}"


def test_plugin_is_found_on_first_lookup_and_imported_only_when_used(site, group) -> None:
    (site / "widgets_plugin.py").write_text('class Gear:\n    """A gear.\n\n    More text."""\n')
    install(site, "widgets-plugin", "1.2", group, {"gear": "widgets_plugin:Gear"})
    registry: Registry[object] = Registry("widget", group=group)
    registry.register("cog", "evo_compress.genomes:SearchSpace")

    assert registry.names() == ["cog", "gear"]
    assert "widgets_plugin" not in sys.modules  # listing imports nothing
    assert registry.origin("gear") == "widgets-plugin 1.2"
    assert registry.origin("cog") == BUILTIN
    assert registry.get("gear").__name__ == "Gear"
    assert "widgets_plugin" in sys.modules
    assert registry.describe("gear") == "A gear."
    assert registries()[group] is registry


def test_plugin_reusing_a_builtin_name_is_ignored_with_one_line(site, group, caplog) -> None:
    (site / "widgets_plugin.py").write_text("class Gear:\n    pass\n")
    install(site, "widgets-plugin", "1.2", group, {"cog": "widgets_plugin:Gear"})
    registry: Registry[object] = Registry("widget", group=group)
    registry.register("cog", "evo_compress.genomes:SearchSpace")
    with caplog.at_level(logging.WARNING, logger="evo_compress.registry"):
        assert registry.names() == ["cog"]
    from evo_compress.genomes import SearchSpace

    assert registry.get("cog") is SearchSpace
    assert registry.origin("cog") == BUILTIN
    [record] = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    for fragment in ("`cog`", "widgets-plugin 1.2", "cog = widgets_plugin:Gear", group):
        assert fragment in message


def test_builtin_registered_after_discovery_still_wins(site, group, caplog) -> None:
    (site / "widgets_plugin.py").write_text("class Gear:\n    pass\n")
    install(site, "widgets-plugin", "1.2", group, {"cog": "widgets_plugin:Gear"})
    registry: Registry[object] = Registry("widget", group=group)
    assert registry.origin("cog") == "widgets-plugin 1.2"
    with caplog.at_level(logging.WARNING, logger="evo_compress.registry"):
        registry.register("cog", Registry)
    assert registry.get("cog") is Registry and registry.origin("cog") == BUILTIN
    assert "widgets-plugin 1.2" in caplog.records[0].getMessage()


def test_broken_plugin_fails_only_its_own_lookup_with_one_line(site, group) -> None:
    (site / "widgets_plugin.py").write_text("import no_such_module_for_widgets\n")
    install(site, "widgets-broken", "0.1", group, {"bad": "widgets_plugin:Gear"})
    registry: Registry[object] = Registry("widget", group=group)
    registry.register("cog", Registry)

    assert registry.names() == ["bad", "cog"]
    assert registry.get("cog") is Registry  # runs that do not use the plugin work
    with pytest.raises(RegistryError) as info:
        registry.get("bad")
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    for fragment in ("`bad`", "widgets-broken 0.1", "bad = widgets_plugin:Gear", "no_such"):
        assert fragment in message
    assert registry.describe("bad") == message


def test_unknown_name_lists_plugins_too(site, group) -> None:
    (site / "widgets_plugin.py").write_text("class Gear:\n    pass\n")
    install(site, "widgets-plugin", "1.2", group, {"gear": "widgets_plugin:Gear"})
    registry: Registry[object] = Registry("widget", group=group)
    with pytest.raises(RegistryError, match=r"did you mean `gear`\?\); known: gear"):
        registry.get("geer")


def test_a_group_has_one_registry(group) -> None:
    Registry("widget", group=group)
    with pytest.raises(RegistryError, match=group):
        Registry("widget", group=group)


def test_every_extension_point_has_its_entry_point_group() -> None:
    import evo_compress.agents  # noqa: F401  (registers the providers)

    groups = registries()
    assert groups["evo_compress.evaluators"] is EVALUATORS
    assert groups["evo_compress.crossovers"] is CROSSOVERS
    assert groups["evo_compress.mutations"] is MUTATIONS
    assert "openai" in groups["evo_compress.providers"]
    assert EVALUATORS.origin("synthetic") == BUILTIN


def test_a_name_registered_at_run_time_outside_the_package_is_no_builtin() -> None:
    registry: Registry[object] = Registry("widget")
    registry.register("cog", Registry)
    registry.register("lazy", "evo_compress.genomes:SearchSpace")
    registry.register("mine", dict)  # a benchmark's landscape, a test's double
    registry.register("theirs", "collections:OrderedDict")
    assert registry.origin("cog") == registry.origin("lazy") == BUILTIN
    assert registry.origin("mine") == "registered by `builtins`"
    assert registry.origin("theirs") == "registered by `collections`"
