"""Search spaces: an ordered set of typed genes, their activation conditions and forbidden rules.

Spaces are declared in YAML (``genomes/builtin/*.yaml`` ships ``llm-compression``) and can be
narrowed, pinned or extended from the population config without writing Python.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evo_compress.exceptions import RecipeError, SearchSpaceError
from evo_compress.genomes.genes import (
    GENE_LIMITS,
    ChoiceGene,
    Clause,
    Gene,
    Value,
    gene_from_data,
)
from evo_compress.genomes.recipe import Recipe, flatten
from evo_compress.methods import KINDS, METHODS
from evo_compress.yamlio import read_yaml

_MAX_REPAIR_ROUNDS = 64


@dataclass(frozen=True)
class ForbidRule:
    """A combination no recipe may have, with the reason shown to the user."""

    when: Clause
    reason: str

    def describe(self) -> str:
        parts = []
        for name, negated, values in self.when.terms:
            if len(values) == 1:
                parts.append(f"{name} {'!=' if negated else '='} {values[0]}")
            else:
                parts.append(f"{name} {'not in' if negated else 'in'} {list(values)}")
        return " and ".join(parts)

    def to_data(self) -> dict[str, Any]:
        return {"when": self.when.to_data(), "reason": self.reason}


def builtin_space_names() -> list[str]:
    folder = resources.files("evo_compress.genomes") / "builtin"
    return sorted(
        p.name[: -len(".yaml")]
        for p in folder.iterdir()
        if p.name.endswith(".yaml") and p.name != "portfolios.yaml"
    )


class SearchSpace:
    """Genes in dependency order plus forbidden combinations.

    Strict construction (``recipe``) rejects unknown genes, out-of-range values and forbidden
    combinations with an error naming the gene; lenient ``repair`` moves any assignment to the
    nearest valid recipe. Both return canonical ``Recipe`` objects.
    """

    def __init__(
        self,
        name: str,
        genes: Sequence[Gene],
        forbid: Sequence[ForbidRule] = (),
        description: str = "",
    ) -> None:
        self.name = name
        self.description = description
        by_name: dict[str, Gene] = {}
        for gene in genes:
            if gene.name in by_name:
                raise SearchSpaceError(f"gene `{gene.name}` is declared twice")
            by_name[gene.name] = gene
        for name in by_name:
            group = name.rsplit(".", 1)[0] if "." in name else None
            while group is not None:
                if group in by_name:
                    raise SearchSpaceError(
                        f"gene `{group}` is also the group of gene `{name}`; rename one"
                    )
                group = group.rsplit(".", 1)[0] if "." in group else None
        for gene in genes:
            limits = GENE_LIMITS.get(gene.name)
            if limits is not None:
                limits.check(gene)
            for dep in sorted(gene.active_if.genes()):
                if dep not in by_name:
                    raise SearchSpaceError(
                        f"`genes.{gene.name}.active_if` names unknown gene `{dep}`"
                    )
        for i, rule in enumerate(forbid):
            for dep in sorted(rule.when.genes()):
                if dep not in by_name:
                    raise SearchSpaceError(f"`forbid[{i}].when` names unknown gene `{dep}`")
        self.genes: dict[str, Gene] = {g.name: g for g in _topological(genes)}
        self.forbid: tuple[ForbidRule, ...] = tuple(forbid)
        # What repair walks for every child: each gene with its condition (None: always on).
        self._plan = tuple(
            (name, gene.active_if if gene.active_if.clauses else None, gene.clip, gene.sample)
            for name, gene in self.genes.items()
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_data(cls, data: Mapping[str, Any], default_name: str = "custom") -> SearchSpace:
        if not isinstance(data, Mapping):
            raise SearchSpaceError("a search space must be a mapping with `genes`")
        unknown = set(data) - {"name", "description", "genes", "forbid"}
        if unknown:
            raise SearchSpaceError(f"search space has unknown keys {sorted(unknown)}")
        genes_data = data.get("genes")
        if not isinstance(genes_data, Mapping) or not genes_data:
            raise SearchSpaceError("`genes` must be a non-empty mapping of gene definitions")
        genes = [gene_from_data(str(n), _resolve_gene(str(n), d)) for n, d in genes_data.items()]
        forbid = []
        for i, item in enumerate(data.get("forbid") or []):
            if (
                not isinstance(item, Mapping)
                or set(item) - {"when", "reason"}
                or "when" not in item
            ):
                raise SearchSpaceError(f"`forbid[{i}]` must be {{when: {{...}}, reason: ...}}")
            when = _resolve_clause(item["when"], f"forbid[{i}].when")
            forbid.append(
                ForbidRule(Clause.parse(when, f"forbid[{i}].when"), str(item.get("reason", "")))
            )
        return cls(
            str(data.get("name", default_name)), genes, forbid, str(data.get("description", ""))
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        data = read_yaml(path, "search space", SearchSpaceError)
        return cls.from_data(data, default_name=path.stem)

    @classmethod
    def builtin(cls, name: str = "llm-compression") -> SearchSpace:
        names = builtin_space_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise SearchSpaceError(f"unknown search space `{name}`{hint}; built in: {names}")
        text = (resources.files("evo_compress.genomes") / "builtin" / f"{name}.yaml").read_text()
        return cls.from_data(yaml.safe_load(text), default_name=name)

    @classmethod
    def load(cls, ref: str | Path) -> SearchSpace:
        """A built-in name, or a path to a YAML file."""
        if isinstance(ref, Path) or str(ref).endswith((".yaml", ".yml")) or "/" in str(ref):
            return cls.from_yaml(ref)
        return cls.builtin(str(ref))

    def with_overrides(
        self,
        pin: Mapping[str, Any] | None = None,
        genes: Mapping[str, Mapping[str, Any]] | None = None,
        forbid: Sequence[Mapping[str, Any]] | None = None,
    ) -> SearchSpace:
        """A new space: ``genes`` merges partial definitions (narrow ranges, new choices, new
        genes), ``pin`` fixes genes to one value, ``forbid`` adds rules."""
        data = self.to_data()
        gene_data: dict[str, Any] = data["genes"]
        for name, partial in (genes or {}).items():
            if not isinstance(partial, Mapping):
                raise SearchSpaceError(f"`genes.{name}` must be a mapping, got {partial!r}")
            if name in gene_data:
                merged = {**gene_data[name], **partial}
                if "default" not in partial:
                    merged.pop("default", None)  # re-derived from the new domain below
                    old_default = gene_data[name]["default"]
                    probe = gene_from_data(name, merged)
                    try:
                        merged["default"] = probe.check(old_default)
                    except RecipeError:
                        merged["default"] = probe.default
                gene_data[name] = merged
            else:
                gene_data[name] = dict(partial)
        for name, value in (pin or {}).items():
            if name not in gene_data:
                raise SearchSpaceError(self._unknown_gene(name, "pin"))
            gene = gene_from_data(name, gene_data[name])
            try:
                value = gene.check(value)
            except RecipeError as exc:
                raise SearchSpaceError(f"cannot pin: {exc}") from None
            if gene.type_name in ("int", "float"):
                # A one-point range still snaps nearby numbers (0.1 + 0.2 -> 0.3).
                pinned = {
                    "type": gene.type_name,
                    "low": value,
                    "high": value,
                    "step": gene_data[name]["step"],
                    "default": value,
                }
            else:
                pinned = {"type": "choice", "choices": [value], "default": value}
            for key in ("active_if", "doc"):
                if key in gene_data[name]:
                    pinned[key] = gene_data[name][key]
            gene_data[name] = pinned
        data["forbid"] = list(data.get("forbid", [])) + list(forbid or [])
        return SearchSpace.from_data(data)

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name}
        if self.description:
            data["description"] = self.description
        data["genes"] = {name: gene.to_data() for name, gene in self.genes.items()}
        if self.forbid:
            data["forbid"] = [rule.to_data() for rule in self.forbid]
        return data

    @property
    def fingerprint(self) -> str:
        text = json.dumps(self.to_data(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    # ------------------------------------------------------------------ recipes
    def recipe(self, data: Mapping[str, Any] | Recipe | None = None) -> Recipe:
        """Strict: validate ``data`` (nested or dotted) and return its canonical recipe.

        Missing active genes take their defaults; genes that are inactive are dropped.
        """
        flat = flatten({} if data is None else data)
        for name in flat:
            if name not in self.genes:
                raise RecipeError(self._unknown_gene(name, "recipe"))
        values: dict[str, Value] = {}
        for name, gene in self.genes.items():
            if gene.active_if.holds(values):
                values[name] = gene.check(flat.get(name, gene.default))
        rule = self.violated_rule(values)
        if rule is not None:
            raise RecipeError(f"forbidden combination {rule.describe()}: {rule.reason}")
        return Recipe(values)

    def repair(self, data: Mapping[str, Any], rng: np.random.Generator) -> Recipe:
        """Lenient: the nearest valid recipe. Unknown genes are dropped, numbers clipped and
        snapped, invalid choices moved to the nearest (numeric) or a random one, genes that
        became active sampled, and forbidden combinations broken by changing one of their genes."""
        current = {k: v for k, v in flatten(data).items() if k in self.genes}
        for _ in range(_MAX_REPAIR_ROUNDS):
            values = self._resolve(current, rng)
            rule = self.violated_rule(values)
            if rule is None:
                return Recipe(values)
            current = values
            self._break(rule, current, rng)
        # A space whose rules cannot be satisfied from here: start over from random draws.
        for _ in range(_MAX_REPAIR_ROUNDS):
            values = self._resolve({}, rng)
            if self.violated_rule(values) is None:
                return Recipe(values)
        raise SearchSpaceError(
            f"search space `{self.name}`: could not find a recipe that satisfies its forbid rules"
        )

    def sample(self, rng: np.random.Generator) -> Recipe:
        """A uniformly drawn valid recipe (per gene, in dependency order)."""
        return self.repair({}, rng)

    def baseline(self) -> Recipe:
        """Every gene at its default: for ``llm-compression`` the uncompressed model."""
        return self.recipe({})

    def violated_rule(self, values: Mapping[str, Value]) -> ForbidRule | None:
        for rule in self.forbid:
            if rule.when.holds(values):
                return rule
        return None

    def active_genes(self, values: Mapping[str, Any]) -> list[str]:
        active: dict[str, Any] = {}
        for name, gene in self.genes.items():
            if gene.active_if.holds(active):
                active[name] = values.get(name, gene.default)
        return list(active)

    # ------------------------------------------------------------------ helpers
    def _resolve(self, current: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Value]:
        values: dict[str, Value] = {}
        for name, condition, clip, sample in self._plan:
            if condition is None or condition.holds(values):
                values[name] = clip(current[name], rng) if name in current else sample(rng)
        return values

    def _break(self, rule: ForbidRule, values: dict[str, Any], rng: np.random.Generator) -> None:
        terms = list(rule.when.terms)
        for index in rng.permutation(len(terms)):
            name, negated, allowed = terms[int(index)]
            gene = self.genes[name]
            if isinstance(gene, ChoiceGene):
                options = [c for c in gene.choices if (c in allowed) == negated]
            else:
                draws = [gene.sample(rng) for _ in range(16)]
                options = [v for v in draws if (v in allowed) == negated]
            if options:
                values[name] = options[int(rng.integers(len(options)))]
                return

    def _unknown_gene(self, name: str, where: str) -> str:
        close = difflib.get_close_matches(name, list(self.genes), n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        return f"{where}: unknown gene `{name}`{hint} in search space `{self.name}`"

    def __repr__(self) -> str:
        return f"SearchSpace({self.name!r}, {len(self.genes)} genes, {len(self.forbid)} rules)"


# --------------------------------------------------------------------------- method registry
# A space may take its method lists from the registry (``evo_compress.methods``) instead of
# spelling them out, so a newly registered method joins the built-in space by itself:
#   choices_from: {methods: quantization}        every method of the kind, in registry order
#   choices_from: {group_sizes: quantization}    the group sizes those methods accept, sorted
#   active_if: {quant.method: {methods: quantization, grouped: true}}   a set of method names
_METHOD_FILTERS = ("grouped", "calibration")


def _resolve_gene(name: str, data: Any) -> Any:
    """A gene's definition with ``choices_from`` and method sets replaced by plain lists."""
    if not isinstance(data, Mapping):
        return data
    where = f"genes.{name}"
    out = dict(data)
    if "choices_from" in out:
        if "choices" in out:
            raise SearchSpaceError(f"`{where}` has both `choices` and `choices_from`; keep one")
        out["choices"] = _choices_from(out.pop("choices_from"), f"{where}.choices_from")
    condition = out.get("active_if")
    if isinstance(condition, Mapping):
        out["active_if"] = _resolve_clause(condition, f"{where}.active_if")
    elif isinstance(condition, Sequence) and not isinstance(condition, str):
        out["active_if"] = [
            _resolve_clause(c, f"{where}.active_if[{i}]") for i, c in enumerate(condition)
        ]
    return out


def _choices_from(spec: Any, where: str) -> list[Any]:
    if not isinstance(spec, Mapping) or len(spec) != 1 or set(spec) - {"methods", "group_sizes"}:
        raise SearchSpaceError(
            f"`{where}` must be {{methods: KIND}} or {{group_sizes: KIND}}, got {spec!r}"
        )
    ((what, kind),) = spec.items()
    methods = METHODS.methods(_kind(kind, f"{where}.{what}"))
    if what == "methods":
        return [m.name for m in methods]
    return sorted({size for m in methods for size in m.group_sizes})


def _resolve_clause(clause: Any, where: str) -> Any:
    """``{gene: {methods: KIND, grouped: true}}`` terms become lists of method names."""
    if not isinstance(clause, Mapping):
        return clause
    out: dict[Any, Any] = {}
    for gene, spec in clause.items():
        if isinstance(spec, Mapping) and "methods" in spec:
            unknown = set(spec) - {"methods", *_METHOD_FILTERS}
            if unknown:
                raise SearchSpaceError(
                    f"`{where}.{gene}` may filter methods by {list(_METHOD_FILTERS)}, "
                    f"got {sorted(unknown)}"
                )
            methods = METHODS.methods(_kind(spec["methods"], f"{where}.{gene}.methods"))
            for key in _METHOD_FILTERS:
                if key in spec:
                    if not isinstance(spec[key], bool):
                        raise SearchSpaceError(
                            f"`{where}.{gene}.{key}` must be true or false, got {spec[key]!r}"
                        )
                    methods = [m for m in methods if getattr(m, key) == spec[key]]
            out[gene] = [m.name for m in methods]
        else:
            out[gene] = spec
    return out


def _kind(kind: Any, where: str) -> Any:
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise SearchSpaceError(
            f"`{where}`: unknown kind of method `{kind}`{hint}; known: {', '.join(KINDS)}"
        )
    return kind


def _topological(genes: Sequence[Gene]) -> list[Gene]:
    """Genes ordered so each comes after the genes its condition reads; declared order breaks
    ties, so the order (and hence every random draw) is stable."""
    remaining = list(genes)
    placed: dict[str, Gene] = {}
    while remaining:
        progressed = False
        for gene in list(remaining):
            if gene.active_if.genes() <= set(placed):
                placed[gene.name] = gene
                remaining.remove(gene)
                progressed = True
                break
        if not progressed:
            cycle = ", ".join(g.name for g in remaining)
            raise SearchSpaceError(f"gene conditions form a cycle among: {cycle}")
    return list(placed.values())
