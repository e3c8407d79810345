"""Classic typed operators: uniform crossover over genes and per-gene mutation by gene type."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evo_compress.exceptions import OperatorError
from evo_compress.genomes import BoolGene, ChoiceGene, Gene, SearchSpace
from evo_compress.genomes.genes import RangeGene
from evo_compress.operators._base import Crossover, Mutation


class UniformCrossover(Crossover):
    """Each gene comes from the second parent with probability ``swap_prob``, else the first.

    A gene only one parent has (active there, inactive in the other) is taken from that
    parent; repair then drops it if the child's other genes switch it off.
    """

    name = "uniform"

    def __init__(self, space: SearchSpace, swap_prob: float = 0.5) -> None:
        super().__init__(space)
        if not 0.0 <= swap_prob <= 1.0:
            raise OperatorError(f"`swap_prob` must be in [0, 1], got {swap_prob}")
        self.swap_prob = float(swap_prob)

    def _do(self, parents: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
        first, second = parents
        child: dict[str, Any] = {}
        for name in self.space.genes:  # space order keeps the RNG draws stable
            if name not in first and name not in second:
                continue
            take_second = rng.random() < self.swap_prob
            if name in second and (take_second or name not in first):
                child[name] = second[name]
            else:
                child[name] = first[name]
        return child


class GeneMutation(Mutation):
    """Mutate each active gene with probability ``gene_prob`` (default 1 / active genes), at
    least one gene always: choices are reset to another choice, booleans flipped, numbers
    moved by a Gaussian step of ``step_scale`` x their range (at least one step), clipped."""

    name = "gene"

    def __init__(
        self, space: SearchSpace, gene_prob: float | None = None, step_scale: float = 0.2
    ) -> None:
        super().__init__(space)
        if gene_prob is not None and not 0.0 < gene_prob <= 1.0:
            raise OperatorError(f"`gene_prob` must be in (0, 1], got {gene_prob}")
        if not (step_scale > 0 and math.isfinite(step_scale)):
            raise OperatorError(f"`step_scale` must be > 0, got {step_scale}")
        self.gene_prob = gene_prob
        self.step_scale = float(step_scale)
        self._variable: tuple[SearchSpace, frozenset[str]] | None = None

    def _do(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        variable = self._variable_genes()
        mutable = [n for n in values if n in variable]
        if not mutable:
            return values
        prob = self.gene_prob if self.gene_prob is not None else 1.0 / len(mutable)
        chosen = [n for n in mutable if rng.random() < prob]
        if not chosen:
            chosen = [mutable[int(rng.integers(len(mutable)))]]
        out = dict(values)
        for name in chosen:
            out[name] = self._mutate_gene(self.space.genes[name], out[name], rng)
        return out

    def _variable_genes(self) -> frozenset[str]:
        """The genes of ``space`` that ``can_vary``, worked out once per space."""
        if self._variable is None or self._variable[0] is not self.space:
            genes = self.space.genes
            self._variable = (self.space, frozenset(n for n, g in genes.items() if can_vary(g)))
        return self._variable[1]

    def _mutate_gene(self, gene: Gene, value: Any, rng: np.random.Generator) -> Any:
        if isinstance(gene, BoolGene):
            return not value
        if isinstance(gene, ChoiceGene):
            others = [c for c in gene.choices if c != value]
            return others[int(rng.integers(len(others)))]
        assert isinstance(gene, RangeGene)
        span = gene.high - gene.low
        delta = rng.normal(0.0, self.step_scale * span)
        steps = round(delta / gene.step)
        if steps == 0:
            steps = 1 if rng.random() < 0.5 else -1
        moved = value + steps * gene.step
        if moved < gene.low or moved > gene.high:
            # Bounce back into range rather than stick at a bound.
            moved = value - steps * gene.step
        if moved < gene.low or moved > gene.high:
            # The step overshoots both ways (a large step_scale): any other grid value will do.
            grid = [gene.clip(gene.low + k * gene.step, rng) for k in range(gene.n_steps + 1)]
            others = [v for v in grid if v != value]
            return others[int(rng.integers(len(others)))]
        return gene.clip(moved, rng)


def can_vary(gene: Gene) -> bool:
    """Whether a mutation can give ``gene`` another value: more than one choice, or a range
    wider than one step."""
    if isinstance(gene, ChoiceGene):
        return len(gene.choices) > 1
    if isinstance(gene, RangeGene):
        return gene.n_steps > 0
    return True
