"""The evaluator extension point: recipe in, five objectives (or a recorded failure) out.

Subclasses write ``_evaluate``; the public ``evaluate`` does the shared work: the back end's
capability check (a recipe it cannot apply is infeasible with a reason, not a crash), timing,
turning exceptions into failed results, and checking that five finite objectives came back.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.objectives import check_objectives
from evo_compress.registry import Registry

if TYPE_CHECKING:
    from evo_compress.fitness.racing import RaceRule

Status = Literal["ok", "failed", "infeasible"]


@dataclass(frozen=True)
class EvaluationResult:
    """What one evaluation produced. ``metadata`` says how each value was obtained (measured,
    estimated or synthetic, device, repeats, spread) and is stored as plain JSON.

    Build one with ``success`` (which checks the objectives) or ``failure``.

    Attributes:
        status: ``"ok"``; ``"failed"`` (the evaluation raised or returned a failure); or
            ``"infeasible"`` (the back end cannot apply the recipe).
        objectives: The five objectives by name, in canonical order; None unless ok.
        reason: Why it failed or is infeasible, in one line; None when ok.
        metadata: How the values were obtained, as plain JSON data.
        duration_s: Wall seconds of the evaluation, set by ``Evaluator.evaluate``.
    """

    status: Status
    objectives: dict[str, float] | None = None
    reason: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the evaluation succeeded (``status == "ok"``)."""
        return self.status == "ok"

    @classmethod
    def success(
        cls, objectives: Mapping[str, float], metadata: Mapping[str, Any]
    ) -> EvaluationResult:
        """A successful result, its objectives checked.

        Args:
            objectives: The five objectives (``evo_compress.objectives``) by name.
            metadata: How they were obtained, as plain JSON data (copied).

        Returns:
            An ``ok`` result with the objectives in canonical order, as floats.

        Raises:
            ValueError: An objective is missing, unknown or not finite.
        """
        return cls("ok", check_objectives(objectives), None, dict(metadata))

    @classmethod
    def failure(
        cls, reason: str, metadata: Mapping[str, Any] | None = None, status: Status = "failed"
    ) -> EvaluationResult:
        """A result without objectives.

        Args:
            reason: Why, in one line (stored and shown in tables).
            metadata: What is known about it, as plain JSON data (copied).
            status: ``"failed"``, or ``"infeasible"`` for a recipe the back end cannot
                apply.

        Returns:
            The failed (or infeasible) result.
        """
        return cls(status, None, reason, dict(metadata or {}))

    def with_duration(self, seconds: float) -> EvaluationResult:
        """A copy with ``duration_s`` set.

        Args:
            seconds: Wall seconds the evaluation took.

        Returns:
            The same result with ``duration_s = seconds``.
        """
        return EvaluationResult(self.status, self.objectives, self.reason, self.metadata, seconds)


# The reason words of failures a limit may have caused, from back ends that give no
# ``limit_cause`` of their own (a request timeout inside a vLLM evaluation, a CUDA OOM).
_LIMIT_WORDS = {
    "timeout": re.compile(r"time[sd]?[ -]?out|within \d+(\.\d+)? ?s\b|after \d+(\.\d+)? ?s\b"),
    "memory": re.compile(r"out of memory|\boom\b|killed", re.IGNORECASE),
}


def limit_cause(result: EvaluationResult) -> str | None:
    """ "timeout" or "memory" when a failure may have been caused by a limit (the worker's
    time or memory limit, a server or request timeout) rather than by the recipe; None for
    every other result. The worker says so in ``metadata["limit_cause"]``; other failures
    are judged by their reason, erring towards "may have been".

    Args:
        result: Any evaluation result.

    Returns:
        ``"timeout"``, ``"memory"``, or None.
    """
    if result.status != "failed":
        return None
    tagged = result.metadata.get("limit_cause")
    if tagged in _LIMIT_WORDS:
        return str(tagged)
    reason = (result.reason or "").lower()
    for cause, words in _LIMIT_WORDS.items():
        if words.search(reason):
            return cause
    return None


# Why a failure happened, recorded with it (``metadata["failure_class"]``); it decides what
# the fitness cache may serve again:
# - ``recipe``: a deterministic outcome of this recipe on this model, back end and device
#   (a method that raises on this model, a checkpoint the server rejects): served;
# - ``limit``: a worker or request limit stopped it (``limit_cause``): served only to equal
#   or tighter limits;
# - ``environment``: a missing or broken package, a server or worker that could not start for
#   reasons not the recipe's, a full disk, a killed worker, a stopped search: never served,
#   since fixing the environment changes the outcome.
FAILURE_CLASS_KEY = "failure_class"
FAILURE_CLASSES = ("recipe", "limit", "environment")
_ENVIRONMENT_WORDS = re.compile(
    r"ModuleNotFoundError|ImportError|PackageNotFoundError|No module named|"
    r"\bnot installed\b|cannot import name|No space left on device|Errno 28|ENOSPC|"
    r"Permission denied|Address already in use|port already in use|Connection refused|"
    r"cannot run `|cannot start the vLLM server|"
    r"the worker died|server died while|cancelled: the search is stopping|"
    r"(?:CUDA|NVIDIA) driver|no CUDA-capable device|CUDA error: (?:unknown|initialization)|"
    r"illegal instruction|SIGILL|"
    r"`make vllm-env`",  # a missing or incomplete environment of its own, named for the fix
    re.IGNORECASE,
)


def classify_failure(result: EvaluationResult) -> str | None:
    """``recipe``, ``limit`` or ``environment`` for a failure (None for any other result):
    what the back end or worker recorded, else judged from the reason (``limit_cause``
    first, then the words of a missing package, a full disk, a server or worker that could
    not start); a failure with none of those signs is the recipe's.

    Args:
        result: Any evaluation result.

    Returns:
        ``"recipe"``, ``"limit"`` or ``"environment"`` for a failure; None for a success or
        an infeasible recipe.
    """
    if result.status != "failed":
        return None
    tagged = result.metadata.get(FAILURE_CLASS_KEY)
    if tagged in FAILURE_CLASSES:
        return str(tagged)
    if limit_cause(result) is not None:
        return "limit"
    text = "\n".join(
        str(x) for x in (result.reason, result.metadata.get("traceback")) if isinstance(x, str)
    )
    return "environment" if _ENVIRONMENT_WORDS.search(text) else "recipe"


def with_failure_class(result: EvaluationResult) -> EvaluationResult:
    """``result`` with its ``failure_class`` recorded.

    Args:
        result: Any evaluation result.

    Returns:
        A copy whose ``metadata["failure_class"]`` is ``classify_failure(result)``;
        ``result`` itself when it is not a failure or has it recorded already.
    """
    cls = classify_failure(result)
    if cls is None or result.metadata.get(FAILURE_CLASS_KEY) == cls:
        return result
    metadata = {**result.metadata, FAILURE_CLASS_KEY: cls}
    return EvaluationResult(
        result.status, result.objectives, result.reason, metadata, result.duration_s
    )


def installed_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Each distribution's installed version in this environment.

    Args:
        names: Distribution names (``"torch"``, ``"transformers"``).

    Returns:
        Each name's version, None where it is not installed.
    """
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def limit_excess(result: EvaluationResult) -> float | None:
    """How far past a limit a failure went, relative: needed / allowed - 1 (>= 0), from the
    ``metadata["over_limit"]`` a back end records (``{"needed": ..., "limit": ...}``, one
    unit: the synthetic evaluator's memory, the worker's memory or time limit).

    Args:
        result: Any evaluation result.

    Returns:
        ``needed / limit - 1`` (at least 0); None for a success, or a failure whose record
        does not say.
    """
    if result.ok:
        return None
    over = result.metadata.get("over_limit")
    if not isinstance(over, Mapping):
        return None
    needed, limit = _real(over.get("needed")), _real(over.get("limit"))
    if needed is None or limit is None or limit <= 0:
        return None
    return max(needed / limit - 1.0, 0.0)


def _real(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a finite number."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Placement:
    """Where one evaluation runs when several run at once (``fitness.pool``).

    ``env`` goes into the environment of every process the evaluation starts (a worker,
    a server): ``CUDA_VISIBLE_DEVICES`` pins one GPU. ``device`` then replaces
    ``hardware.device`` inside those processes ("cuda": the one GPU they see). ``where``
    names the worker in the result's metadata.

    Attributes:
        slot: The pool's slot number (0 when evaluations run one at a time).
        env: Environment variables for the processes the evaluation starts.
        device: Replaces ``hardware.device`` in those processes; None: keep it.
        where: The worker's name in the result's metadata.
    """

    slot: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    device: str | None = None
    where: str = "this process"

    def describe(self) -> dict[str, Any]:
        """The placement as plain data, for the result's metadata.

        Returns:
            ``slot`` and ``where``, and ``env`` when it sets anything.
        """
        data: dict[str, Any] = {"slot": self.slot, "where": self.where}
        if self.env:
            data["env"] = dict(self.env)
        return data


@dataclass(frozen=True)
class EvaluationContext:
    """What an evaluator needs besides its own settings: the model, hardware and carbon data.

    Attributes:
        model: The ``model`` section of the config: the model's id, revision and dtype.
        hardware: The ``hardware`` section: the device, its name and its memory.
        carbon: The ``carbon`` section: the grid's carbon intensity and the deployment's
            tokens, for the ``co2`` objective.
    """

    model: ModelConfig = field(default_factory=lambda: ModelConfig())
    hardware: HardwareConfig = field(default_factory=lambda: HardwareConfig())
    carbon: CarbonConfig = field(default_factory=lambda: CarbonConfig())


class Evaluator(ABC):
    """Base of every fitness back end.

    ``capabilities`` maps each gene the back end can apply to the values it supports (None:
    any value). A recipe that sets any other gene away from its default is infeasible here.

    Subclasses write ``capabilities`` and ``_evaluate`` (and ``_evaluate_raced`` where they
    race); the other methods have defaults a back end overrides when they do not hold for
    it. Constructors only check the settings: heavy work goes in ``prepare``.

    Args:
        settings: The back end's own settings (``evaluator.settings`` of the config).
        context: The model, hardware and carbon sections of the config.

    Attributes:
        name: The name the back end is registered under (``evaluator.name``).
        supports_racing: Whether ``_evaluate_raced`` measures a quick stage first.
        settings: A copy of ``settings``.
        context: The model, hardware and carbon sections it was built with.
        run_dir: Where this run's own files go; set by ``set_run_dir``.
        concurrent: Evaluations the pool runs at once on this machine's CPUs.
        sequential: Whether evaluations run one at a time, in ``plan_batch`` order.
    """

    name: ClassVar[str] = "evaluator"
    # Whether ``_evaluate_raced`` measures a quick stage first (``fidelity.racing``).
    supports_racing: ClassVar[bool] = False

    def __init__(self, settings: Mapping[str, Any], context: EvaluationContext) -> None:
        self.settings = dict(settings)
        self.context = context
        self.run_dir: Path | None = None
        # Evaluations run at once on this machine's CPUs (``fitness.pool``): measurements
        # taken under that contention are fingerprinted apart from solo ones.
        self.concurrent = 1
        # Whether evaluations run one at a time, in the order ``plan_batch`` gave (the pool
        # says): only then may a back end share work between consecutive evaluations.
        self.sequential = True

    def set_run_dir(self, run_dir: Path | None) -> None:
        """Where this run's own files go (a serving back end's logs). The search sets it
        before the first evaluation; ``evaluate`` outside a run leaves it None.

        Args:
            run_dir: The run directory, or None outside a run.
        """
        self.run_dir = run_dir

    @abstractmethod
    def capabilities(self) -> Mapping[str, Collection[Any] | None]:
        """Genes this back end can apply, each with its supported values.

        Returns:
            Gene name -> the values supported (None: every value of the gene). Genes left
            out can only keep their default.
        """

    @abstractmethod
    def _evaluate(self, recipe: Recipe, placement: Placement) -> EvaluationResult:
        """Apply ``recipe``, measure it and return the result: the hook subclasses write.

        Processes it starts get ``placement.env``; ``placement.device`` overrides the
        configured device. ``evaluate`` has checked the capabilities before and checks the
        objectives after.

        Args:
            recipe: A valid, canonical recipe this back end can apply.
            placement: Where the evaluation runs.

        Returns:
            ``EvaluationResult.success`` with the five objectives, or a failure.

        Raises:
            Exception: Any failure of the recipe may be raised: ``evaluate`` records it as a
                failed result with its traceback.
        """

    def _evaluate_raced(
        self, recipe: Recipe, placement: Placement, race: RaceRule
    ) -> EvaluationResult:
        """``_evaluate`` with racing: measure on ``race.quick_limit`` items, return that
        result (``metadata.stage: "quick"``) when ``race.stop`` says it cannot reach the
        front, else finish (``stage: "full"``). Back ends with ``supports_racing`` override
        it; one that does not race measures everything, which is the full stage.

        Args:
            recipe: As for ``_evaluate``.
            placement: As for ``_evaluate``.
            race: When to stop after the quick stage.

        Returns:
            The quick or the full result.

        Raises:
            Exception: As ``_evaluate``.
        """
        return self._evaluate(recipe, placement)

    def plan_batch(self, recipes: Sequence[Recipe], space: SearchSpace) -> list[int]:
        """The order in which to evaluate a batch (a generation's new recipes), as indices
        into ``recipes``. A back end that shares work between recipes (one server for
        several, ``fitness.vllm``) groups them here and remembers the batch.

        Args:
            recipes: The batch.
            space: The search space they belong to.

        Returns:
            A permutation of ``range(len(recipes))``; the default keeps the given order.
        """
        return list(range(len(recipes)))

    def quick_fingerprint(self, quick_limit: int) -> str:
        """The fitness cache's key for this back end's quick (raced) results.

        Args:
            quick_limit: Test items of the quick stage.

        Returns:
            A key apart from ``cache_fingerprint``'s, so quick results are never served as
            full ones.
        """
        from evo_compress.fitness.racing import quick_fingerprint

        return quick_fingerprint(self.cache_fingerprint(), {"quick_limit": quick_limit})

    def scored_tasks(self) -> tuple[str, tuple[str, ...]] | None:
        """The setting that names the tasks this back end scores (``tasks`` or ``task``) and
        their names: each success records their scores in ``metadata["tasks"]``, which
        `constraints.max_task_drop` reads.

        Returns:
            ``(setting, task names)``, or None when it scores no named tasks (the default).
        """
        return None

    def shared_paths(self) -> list[Path]:
        """Files and folders every evaluation reads by path (the model, the task's files):
        on a cluster they must exist at the same path on every node. After ``prepare``.

        Returns:
            The paths; none by default.
        """
        return []

    def uses_gpu(self) -> bool:
        """Whether one evaluation occupies a GPU (parallel workers then get one each).

        Returns:
            False by default.
        """
        return False

    def threads(self) -> int | None:
        """torch threads of one evaluation.

        Returns:
            The thread count, or None (the default) when it runs no torch of its own.
        """
        return None

    def with_threads(self, threads: int) -> Evaluator:
        """This evaluator with ``threads`` per evaluation (a new object when that changes
        anything); parallel CPU workers divide the cores this way.

        Args:
            threads: torch threads per evaluation.

        Returns:
            An evaluator that uses ``threads``; ``self`` by default.
        """
        return self

    def fingerprint_data(self) -> dict[str, Any]:
        """Everything besides the recipe that changes the result; keys the fitness cache.

        Returns:
            Plain data: the back end's name and settings and the model, hardware and carbon
            sections. An override adds what else changes its results.
        """
        return {
            "evaluator": self.name,
            "settings": self.settings,
            "model": self.context.model.model_dump(mode="json"),
            "hardware": self.context.hardware.model_dump(mode="json"),
            "carbon": self.context.carbon.model_dump(mode="json"),
        }

    def limits(self) -> dict[str, float | None]:
        """The limits an evaluation runs under (worker timeout and memory, server timeouts):
        left out of the fingerprint, since they change whether an evaluation finishes, not
        what it measures, but stored with a cached failure they may have caused.

        Returns:
            Limit name -> value (None: unlimited); none by default.
        """
        return {}

    def fingerprint(self) -> str:
        """What ``resume`` checks: the same settings, model and machine. Package versions
        are left out (``packages``), so a run resumes after an upgrade.

        Returns:
            The SHA-256 hex digest of ``fingerprint_data``.
        """
        text = json.dumps(self.fingerprint_data(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def packages(self) -> dict[str, str | None]:
        """The versions of the packages this back end's outcomes depend on (None: not
        installed). They key the fitness cache (``cache_fingerprint``), so a changed
        environment is never answered with an old result, and each evaluation records them
        (``metadata["packages"]``).

        Returns:
            Distribution name -> installed version (``installed_versions``); none by
            default.
        """
        return {}

    def cache_fingerprint(self) -> str:
        """The fitness cache's key besides the recipe: ``fingerprint`` and ``packages``.

        Returns:
            A SHA-256 hex digest; ``fingerprint`` itself when ``packages`` is empty.
        """
        packages = self.packages()
        if not packages:
            return self.fingerprint()
        text = json.dumps(
            {"fingerprint": self.fingerprint(), "packages": packages}, sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def infeasible_reason(self, recipe: Recipe, space: SearchSpace) -> str | None:
        """Why this back end cannot apply ``recipe``, from ``capabilities``.

        Args:
            recipe: The recipe.
            space: Its search space (for the genes' defaults).

        Returns:
            The first gene value it does not support, in one line; None when it can apply
            the recipe.
        """
        caps = self.capabilities()
        for gene, value in recipe.items():
            if gene in caps:
                allowed = caps[gene]
                if allowed is not None and value not in allowed:
                    return (
                        f"the {self.name} back end cannot apply `{gene}` = {value!r} "
                        f"(supported: {sorted(map(str, allowed))})"
                    )
            elif gene in space.genes and value != space.genes[gene].default:
                return f"the {self.name} back end cannot apply `{gene}` (only its default)"
        return None

    def restrict_space(self, space: SearchSpace) -> SearchSpace:
        """``space`` narrowed to what this back end can apply: genes it cannot apply are
        pinned to their default, choices it does not support are dropped.

        Args:
            space: The configured search space.

        Returns:
            The narrowed space; ``space`` itself when the back end supports everything.

        Raises:
            ConfigError: The back end supports no value of some choice gene.
        """
        from evo_compress.exceptions import ConfigError
        from evo_compress.genomes import BoolGene, ChoiceGene

        caps = self.capabilities()
        pin: dict[str, Any] = {}
        narrow: dict[str, dict[str, Any]] = {}
        for name, gene in space.genes.items():
            if name not in caps:
                if not (isinstance(gene, ChoiceGene) and len(gene.choices) == 1):
                    pin[name] = gene.default
                continue
            allowed = caps[name]
            if allowed is None or not isinstance(gene, (ChoiceGene, BoolGene)):
                continue
            domain = gene.choices if isinstance(gene, ChoiceGene) else (False, True)
            kept = [c for c in domain if c in allowed]
            if not kept:
                raise ConfigError(
                    f"the {self.name} back end supports no value of gene `{name}` "
                    f"({list(domain)}); pin it in `search.space.pin` or use another back end"
                )
            if len(kept) < len(domain):
                if len(kept) == 1:
                    pin[name] = kept[0]
                else:
                    default = gene.default if gene.default in kept else kept[0]
                    narrow[name] = {"type": "choice", "choices": kept, "default": default}
        if not pin and not narrow:
            return space
        restricted = space.with_overrides(pin=pin, genes=narrow)
        restricted.name = space.name
        return restricted

    def evaluate(
        self,
        recipe: Recipe,
        space: SearchSpace,
        placement: Placement | None = None,
        race: RaceRule | None = None,
    ) -> EvaluationResult:
        """Evaluate one recipe; never raises for a recipe's own failure.

        A recipe the back end cannot apply is ``infeasible`` without calling the hook; an
        exception of ``_evaluate`` becomes a failed result with its traceback; a success
        whose objectives are not five finite numbers becomes a failure. The result records
        the ``packages``, its failure class and its duration.

        Args:
            recipe: A valid, canonical recipe of ``space``.
            space: The search space (for the genes' defaults).
            placement: Where it runs; None: this process, as configured.
            race: With a back end that races, when the measurement may stop after its
                quick stage; None: measure everything.

        Returns:
            The result: ok, failed or infeasible.
        """
        placement = placement or Placement()
        start = time.perf_counter()
        reason = self.infeasible_reason(recipe, space)
        if reason is not None:
            result = EvaluationResult.failure(reason, {"evaluator": self.name}, "infeasible")
            return result.with_duration(time.perf_counter() - start)
        try:
            if race is not None and self.supports_racing:
                result = self._evaluate_raced(recipe, placement, race)
            else:
                result = self._evaluate(recipe, placement)
            if result.ok:
                # Re-check: a back end that returns NaN or four objectives is a failure.
                result = EvaluationResult.success(result.objectives or {}, result.metadata)
        except Exception as exc:  # a crash of one evaluation is data, not a crash of the search
            result = EvaluationResult.failure(
                f"{type(exc).__name__}: {exc}",
                {"evaluator": self.name, "traceback": traceback.format_exc(limit=8)},
            )
        packages = self.packages()
        if packages:  # what produced it, in its record
            result = EvaluationResult(
                result.status,
                result.objectives,
                result.reason,
                {**result.metadata, "packages": packages},
            )
        return with_failure_class(result).with_duration(time.perf_counter() - start)

    def prepare(self) -> None:
        """One-time work before the first evaluation (train or download the model, write
        task files). Constructors only validate settings, so ``validate`` stays fast. The
        built-in back ends make it idempotent: a second call does nothing."""

    def close(self) -> None:
        """Release models, servers or worker processes. Safe to call twice."""


EVALUATORS: Registry[Evaluator] = Registry("evaluator", group="evo_compress.evaluators")
EVALUATORS.register("synthetic", "evo_compress.fitness.synthetic:SyntheticEvaluator")
EVALUATORS.register("transformers", "evo_compress.fitness.hf.evaluator:TransformersEvaluator")
EVALUATORS.register("vllm", "evo_compress.fitness.vllm.evaluator:VLLMEvaluator")
# vLLM on a CUDA machine that has it, else transformers (a factory returning either).
EVALUATORS.register("auto", "evo_compress.fitness.auto:make_auto_evaluator")


def make_evaluator(
    name: str, settings: Mapping[str, Any], context: EvaluationContext
) -> Evaluator:
    """The evaluator registered as ``name``, built from the config.

    Args:
        name: A registered back end (``synthetic``, ``transformers``, ``vllm``, ``auto``, or
            a plugin's).
        settings: Its settings (``evaluator.settings``).
        context: The model, hardware and carbon sections.

    Returns:
        The evaluator (its constructor has checked the settings).

    Raises:
        RegistryError: ``name`` is unknown, or its plugin fails to load.
        ConfigError: The back end refuses the settings.
    """
    return EVALUATORS.get(name)(settings, context)
