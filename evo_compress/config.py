"""The population config: one validated, frozen pydantic model per YAML section.

``parse_config`` turns every validation problem into one ``ConfigError`` line that names the
field path in backticks and echoes the bad value. The schema alone: the checks that build
what a config names are in ``evo_compress.app``. The reference is docs/config.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evo_compress.exceptions import ConfigError
from evo_compress.objectives import CONSTRAINTS_BY_KEY, flat_limits

# Upper bounds far above any real search: they exist so a typo (1e8, 2**63) is an error
# here rather than an allocation, an SQLite overflow or a run that never ends.
MAX_POPULATION = 100_000
MAX_GENERATIONS = 100_000
SEED_MAX = 2**32 - 1
MAX_WORKERS = 4096
_ECHO_CHARS = 80  # a bad value longer than this is echoed shortened
LLM_SEEDS = "llm"  # `search.recipes: llm`: the first generation is asked of an LLM


class _Section(BaseModel):
    # allow_inf_nan=False: every float in a config is finite (.inf, .nan are errors).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul_in_paths(cls, value: Any) -> Any:
        if isinstance(value, Path) and "\x00" in str(value):
            raise ValueError("must be a path without NUL characters")
        return value


class ModelConfig(_Section):
    id: str = Field("synthetic-7b", description="Hub id or local folder of the model")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class HardwareConfig(_Section):
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    name: str | None = Field(None, description="Label for reports and the cache fingerprint")
    memory_gb: float | None = Field(None, gt=0, le=1e6, description="Device memory available, GiB")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        ok = value in {"auto", "cpu", "cuda"} or (
            value.startswith("cuda:") and value[5:].isdigit()
        )
        if not ok:
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value


class CarbonConfig(_Section):
    grid_intensity_g_per_kwh: float = Field(
        400.0, gt=0, le=10_000, description="Carbon intensity of the electricity, g CO2e per kWh"
    )
    deployment_tokens: float = Field(
        1e9, gt=0, le=1e18, description="Tokens the deployment will serve; amortises one-time CO2"
    )


def _doc(key: str) -> str:
    return CONSTRAINTS_BY_KEY[key].doc


class ConstraintsConfig(_Section):
    """One optional limit per entry of ``objectives.CONSTRAINTS`` (which says what it bounds),
    and ``max_task_drop``: one limit per task of the evaluator (``objectives.task_drop``)."""

    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description=_doc("max_accuracy_drop")
    )
    max_latency_ms: float | None = Field(None, gt=0, le=1e12, description=_doc("max_latency_ms"))
    max_memory_mib: float | None = Field(None, gt=0, le=1e12, description=_doc("max_memory_mib"))
    max_energy_j: float | None = Field(None, gt=0, le=1e12, description=_doc("max_energy_j"))
    max_co2_g: float | None = Field(None, gt=0, le=1e12, description=_doc("max_co2_g"))
    max_task_drop: dict[str, Annotated[float, Field(ge=0, le=1)]] | None = Field(
        None,
        description="task -> largest drop of that task's score allowed vs the baseline "
        "recipe (each task of `evaluator.settings.tasks`, absolute)",
    )

    @field_validator("max_task_drop")
    @classmethod
    def _task_names(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for task in value or {}:
            if not task.strip():
                raise ValueError("task names must not be empty")
        return value

    def active(self) -> dict[str, float]:
        """The set limits by flat key: ``max_task_drop`` gives ``max_task_drop.<task>``."""
        return flat_limits(self.model_dump())


class ObjectiveValues(_Section):
    """One optional value per objective, in its natural unit and sign."""

    accuracy: float | None = Field(None, ge=0, le=1, description="fraction")
    latency: float | None = Field(None, ge=0, le=1e12, description="ms per output token")
    memory: float | None = Field(None, ge=0, le=1e12, description="MiB")
    energy: float | None = Field(None, ge=0, le=1e12, description="J per 1,000 tokens")
    co2: float | None = Field(None, ge=0, le=1e12, description="g CO2e per 1,000 tokens")

    def given(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class HypervolumeConfig(_Section):
    """A fixed hypervolume box (evo_compress/runs/hypervolume.py). An objective left out takes
    the run's observed ideal or nadir."""

    ideal: ObjectiveValues = Field(
        ObjectiveValues(), description="Best corner: highest accuracy, lowest latency, ..."
    )
    nadir: ObjectiveValues = Field(
        ObjectiveValues(), description="Worst corner: lowest accuracy, highest latency, ..."
    )

    @field_validator("nadir")
    @classmethod
    def _nadir_worse_than_ideal(cls, nadir: ObjectiveValues, info: Any) -> ObjectiveValues:
        ideal = info.data.get("ideal")
        if ideal is None:
            return nadir
        best, worst = ideal.given(), nadir.given()
        for name in best.keys() & worst.keys():
            if name == "accuracy" and worst[name] >= best[name]:
                raise ValueError(
                    f"`accuracy` must be below the ideal's ({best[name]:g}): accuracy is maximised"
                )
            if name != "accuracy" and worst[name] <= best[name]:
                raise ValueError(
                    f"`{name}` must be above the ideal's ({best[name]:g}): {name} is minimised"
                )
        return nadir


class OperatorSpec(_Section):
    name: str
    label: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Name in records and reports (default: the operator's name, numbered "
        "when two operators share it)",
    )
    weight: float = Field(1.0, gt=0, le=1e6, description="Relative chance of being picked")
    params: dict[str, Any] = Field(default_factory=dict)


class AdaptiveConfig(_Section):
    method: Literal["fixed", "probability-matching"] = Field(
        "probability-matching",
        description="fixed: the weights; probability-matching: weights adapt from credit",
    )
    min_prob: float = Field(0.05, ge=0, le=0.5, description="Floor of every operator's chance")
    learning_rate: float = Field(0.3, gt=0, le=1, description="How fast credit moves chances")


class OperatorsConfig(_Section):
    crossover_prob: float = Field(0.9, ge=0, le=1)
    mutation_prob: float = Field(1.0, ge=0, le=1)
    crossover: tuple[OperatorSpec, ...] = (OperatorSpec(name="uniform"),)
    mutation: tuple[OperatorSpec, ...] = (OperatorSpec(name="gene"),)
    adaptive: AdaptiveConfig = AdaptiveConfig()

    @field_validator("crossover", "mutation")
    @classmethod
    def _not_empty(cls, value: tuple[OperatorSpec, ...]) -> tuple[OperatorSpec, ...]:
        if not value:
            raise ValueError("must list at least one operator")
        return value


class SpaceConfig(_Section):
    base: str = Field("llm-compression", description="Built-in space name or YAML path")
    pin: dict[str, Any] = Field(default_factory=dict, description="gene -> fixed value")
    genes: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="gene -> partial definition to merge (or a new gene)"
    )
    forbid: tuple[dict[str, Any], ...] = ()


class SurrogateConfig(_Section):
    """Surrogate-assisted pre-screening (evo_compress/surrogate.py)."""

    enabled: bool = Field(
        True, description="Breed `pool` x more children and evaluate the best predicted"
    )
    pool: int = Field(4, ge=2, le=64, description="Candidates bred per evaluated child")
    min_evaluations: int = Field(
        16, ge=2, le=100_000, description="Evaluations before the model is trusted"
    )
    exploration: float = Field(
        1.0, ge=0, le=10, description="Weight of the model's uncertainty: mean - w * std"
    )
    llm_candidates: int | None = Field(
        None,
        ge=1,
        le=64,
        description=(
            "Children each LLM request proposes while screening is on, the model choosing "
            "among them; default: `pool`"
        ),
    )


class SearchConfig(_Section):
    algorithm: Literal["nsga2", "nsga3"] = "nsga2"
    population_size: int = Field(24, ge=4, le=MAX_POPULATION)
    offspring_size: int | None = Field(
        None, ge=1, le=MAX_POPULATION, description="Default: population_size"
    )
    generations: int = Field(
        10, ge=1, le=MAX_GENERATIONS, description="Generations in total, the initial one included"
    )
    seed: int = Field(0, ge=0, le=SEED_MAX)
    recipes: str = Field("baseline", description="Seed portfolio name or YAML file of recipes")
    space: SpaceConfig = SpaceConfig()
    operators: OperatorsConfig = OperatorsConfig()
    max_redraws: int = Field(
        100,
        ge=1,
        le=100_000,
        description="Attempts per offspring slot to find a recipe not yet evaluated",
    )
    nsga3_partitions: int | None = Field(
        None,
        ge=1,
        le=64,  # 5 objectives: C(p + 4, 4) directions, 814,385 at 64
        description="Das-Dennis partitions for NSGA-III reference directions",
    )
    surrogate: SurrogateConfig = SurrogateConfig()


class BudgetConfig(_Section):
    max_calls: int | None = Field(
        None, ge=0, le=10**9, description="Provider requests in the whole run"
    )
    max_tokens: int | None = Field(None, ge=0, le=10**15, description="Input plus output tokens")
    max_cost: float | None = Field(
        None, ge=0, le=1e9, description="USD; every LLM operator then needs a `price`"
    )


class LLMConfig(_Section):
    concurrency: int = Field(4, ge=1, le=1024, description="LLM requests in flight at once")
    budget: BudgetConfig = BudgetConfig()
    max_failures: int = Field(
        3, ge=1, le=10**6, description="Failed requests in a row that switch an LLM operator off"
    )
    seeder: dict[str, Any] | None = Field(
        None,
        description="Provider settings for `search.recipes: llm` (default: the first LLM "
        "operator's)",
    )


class EvaluatorConfig(_Section):
    # auto: synthetic for `synthetic*` models, vLLM on a GPU machine that has it, else
    # transformers (fitness/auto.py).
    name: str = "auto"
    settings: dict[str, Any] = Field(default_factory=dict)


class RayConfig(_Section):
    address: str | None = Field(
        None,
        description="`auto` (the cluster this machine belongs to), a cluster address "
        "(`host:6379` or `ray://host:10001`), or none for a local Ray started on the fly",
    )
    cpus_per_task: float | None = Field(
        None,
        gt=0,
        le=4096,
        description="CPUs one evaluation asks for (default: the evaluator's threads)",
    )
    gpus_per_task: float | None = Field(
        None,
        ge=0,
        le=1024,
        description="GPUs one evaluation asks for (default: 1 on a CUDA device)",
    )
    max_retries: int = Field(
        2, ge=0, le=1000, description="Re-runs of an evaluation whose worker or node died"
    )
    local_cpus: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="CPUs a local Ray started on the fly offers (default: all)",
    )
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime_env for the workers (env_vars, ...)"
    )


class EvaluationConfig(_Section):
    workers: int | Literal["auto"] = Field(
        "auto",
        description="Evaluations run at once. auto: one per visible GPU (one on a CPU; "
        "Ray: as many as the cluster places). N on a CPU divides the cores' threads",
    )
    backend: Literal["local", "ray"] = Field(
        "local", description="local: worker processes on this machine; ray: a Ray cluster"
    )
    ray: RayConfig = RayConfig()

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        ok = value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS
        )
        if not ok:
            raise ValueError(f"must be auto or a count from 1 to {MAX_WORKERS}")
        return value


class FidelityConfig(_Section):
    """Racing (evo_compress/fitness/racing.py): measure accuracy on a few test items first and
    finish only recipes that can still reach the front."""

    racing: bool = Field(False, description="Stop dominated recipes after the quick stage")
    quick_limit: int = Field(
        50, ge=1, le=10**7, description="Test items of the quick stage (the task's first ones)"
    )
    z: float = Field(
        2.0, ge=0, le=10, description="Optimism of the quick accuracy: accuracy + z * stderr"
    )


class CacheConfig(_Section):
    enabled: bool = True
    path: Path | None = Field(None, description="Default: <runs_root>/.cache/fitness.sqlite")


class OutputConfig(_Section):
    runs_root: Path = Path("runs")
    run_dir: Path | None = Field(None, description="Default: <runs_root>/<timestamp>-<name>")


class PopulationConfig(_Section):
    name: str = Field("search", pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelConfig = ModelConfig()
    hardware: HardwareConfig = HardwareConfig()
    carbon: CarbonConfig = CarbonConfig()
    constraints: ConstraintsConfig = ConstraintsConfig()
    search: SearchConfig = SearchConfig()
    llm: LLMConfig = LLMConfig()
    evaluator: EvaluatorConfig = EvaluatorConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    fidelity: FidelityConfig = FidelityConfig()
    cache: CacheConfig = CacheConfig()
    output: OutputConfig = OutputConfig()
    hypervolume: HypervolumeConfig = HypervolumeConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_PHRASES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "literal_error": "must be {expected}",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "string_pattern_mismatch": "must match {pattern}",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "model_type": "must be a mapping",
    "finite_number": "must be a finite number",
}


def format_validation_error(exc: ValidationError, source: str, prefix: str = "") -> str:
    """The first pydantic error as one line: "`search.population_size` must be >= 4, got 1"."""
    err = exc.errors()[0]
    path = prefix + ".".join(str(p) for p in err["loc"])
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key `{path}`{more}"
    if err["type"] == "missing":
        return f"{source}: `{path}` is required{more}"
    template = _PHRASES.get(err["type"])
    if template is not None:
        phrase = template.format(**err.get("ctx", {}))
    else:
        phrase = str(err["msg"]).removeprefix("Value error, ")
        phrase = phrase[:1].lower() + phrase[1:]
    return f"{source}: `{path}` {phrase}, got {_echo(err.get('input'))}{more}"


def _echo(value: Any) -> str:
    """``repr(value)``, shortened: a 10 MB string in a config is not echoed whole."""
    text = repr(value)
    if len(text) > _ECHO_CHARS:
        text = f"{text[: _ECHO_CHARS - 20]}...{text[-15:]} ({len(text):,} characters)"
    return text


def parse_config(data: Any, source: str = "config") -> PopulationConfig:
    """Validate ``data`` against the schema. What it names (operators, the evaluator, the
    space, the seed portfolio) is checked by ``evo_compress.app.check_config``, which has to
    build those things."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, got {type(data).__name__}")
    try:
        return PopulationConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
