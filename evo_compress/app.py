"""The composition root: builds what a config names (space, evaluator, pool, operators, LLM
session, cache, run store) and hands it to the search loop, which builds nothing itself.

The config checks that have to build things (operators, the evaluator, the seed portfolio)
live here too: ``evo_compress.config`` is the schema alone.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evo_compress import __version__
from evo_compress.config import LLM_SEEDS, EvaluationConfig, PopulationConfig, parse_config
from evo_compress.exceptions import ConfigError, EvoCompressError, RunStoreError
from evo_compress.genomes import Recipe, SearchSpace, load_portfolio, render_recipe
from evo_compress.overrides import Override, apply_overrides, cache_overrides
from evo_compress.progress import ProgressListener

if TYPE_CHECKING:
    from evo_compress.agents.session import AgentSession
    from evo_compress.engine import Search
    from evo_compress.fitness import Evaluator, FitnessCache
    from evo_compress.fitness.pool import EvaluationPool, WorkerPlan
    from evo_compress.operators import AdaptiveSelector, Crossover, Mutation
    from evo_compress.operators.llm import LLMSeeder
    from evo_compress.runs.store import RunStore
    from evo_compress.runs.weights import WeightsOrigin

__all__ = [
    "agent_session",
    "build_space",
    "check_config",
    "checked_config",
    "compress_recipe",
    "configure_config_evaluator",
    "default_cache_path",
    "default_run_dir",
    "export_weights",
    "load_config",
    "make_config_evaluator",
    "make_operators",
    "make_seeder",
    "open_config_cache",
    "resume_search",
    "seeder_params",
    "start_search",
    "uses_llm",
]


# ---------------------------------------------------------------------- checked configs
def load_config(path: str | Path) -> PopulationConfig:
    """The config in the YAML file ``path``, its schema validated and its cross-section
    checks passed (what ``evo-compress validate`` accepts, ``run`` accepts)."""
    from evo_compress.yamlio import read_yaml

    path = Path(path)
    return checked_config(read_yaml(path, "config file", ConfigError), source=str(path))


def checked_config(data: Any, source: str = "config") -> PopulationConfig:
    """``parse_config`` (the schema) followed by ``check_config`` (what it names exists and
    accepts its settings)."""
    config = parse_config(data, source)
    check_config(config, source)
    return config


def check_config(config: PopulationConfig, source: str = "config") -> None:
    """Cross-section checks: registered names exist, the space builds, operators and the
    evaluator accept their settings, the seed portfolio loads. What ``validate`` passes,
    ``run`` accepts."""
    from evo_compress.fitness import EVALUATORS, EvaluationContext
    from evo_compress.operators import CROSSOVERS, MUTATIONS, make_crossover, make_mutation

    try:
        for kind, registry, specs in (
            ("crossover", CROSSOVERS, config.search.operators.crossover),
            ("mutation", MUTATIONS, config.search.operators.mutation),
        ):
            for i, spec in enumerate(specs):
                if spec.name not in registry:
                    where = f"`search.operators.{kind}[{i}].name`"
                    raise ConfigError(f"{where}: {registry.unknown_message(spec.name)}")
        if config.evaluator.name == "synthetic" and not config.model.id.startswith("synthetic"):
            # The synthetic landscape knows nothing of a real model: never let it stand in.
            raise ConfigError(
                f"`evaluator.name`: the synthetic evaluator is a test landscape and cannot "
                f"evaluate model `{config.model.id}`; use a model id starting with `synthetic` "
                "or a real evaluator"
            )
        if config.evaluator.name not in EVALUATORS:
            raise ConfigError(
                f"`evaluator.name`: {EVALUATORS.unknown_message(config.evaluator.name)}"
            )
        space = build_space(config)
        for kind, make, specs in (
            ("crossover", make_crossover, config.search.operators.crossover),
            ("mutation", make_mutation, config.search.operators.mutation),
        ):
            for i, spec in enumerate(specs):
                make(spec.name, space, spec.params, f"search.operators.{kind}[{i}]")
        _check_llm(config)
        # Evaluator constructors only validate settings; models load on first use.
        context = EvaluationContext(config.model, config.hardware, config.carbon)
        evaluator = EVALUATORS.get(config.evaluator.name)(config.evaluator.settings, context)
        _check_evaluation(config.evaluation, evaluator)
        _check_racing(config, evaluator)
        _check_task_drop(config, evaluator)
        evaluator.close()
        if config.search.recipes != LLM_SEEDS:
            try:
                load_portfolio(config.search.recipes, space)
            except EvoCompressError as exc:
                raise ConfigError(f"`search.recipes`: {exc}") from None
    except EvoCompressError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _check_evaluation(evaluation: EvaluationConfig, evaluator: Evaluator) -> None:
    """The machine has the GPUs ``evaluation.workers`` asks for; Ray is installed for
    ``evaluation.backend: ray``."""
    from evo_compress.fitness.pool import plan_workers

    plan_workers(evaluation, evaluator)
    if evaluation.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "`evaluation.backend` is ray but Ray is not installed: pip install 'evo-compress[ray]'"
        )


def _check_racing(config: PopulationConfig, evaluator: Evaluator) -> None:
    if config.fidelity.racing and not evaluator.supports_racing:
        raise ConfigError(
            f"`fidelity.racing`: the {evaluator.name} back end cannot race "
            "(it measures accuracy in one stage); set `fidelity.racing: false`"
        )


def _check_task_drop(config: PopulationConfig, evaluator: Evaluator) -> None:
    """Every task of `constraints.max_task_drop` is one the evaluator scores; under `auto`,
    one of every back end's section too (whichever back end the machine picks)."""
    from evo_compress.fitness.model import settings_tasks
    from evo_compress.objectives import TASK_DROP_KEY

    drops = config.constraints.max_task_drop
    if not drops:
        return
    scored = evaluator.scored_tasks()
    if scored is None:
        raise ConfigError(
            f"`constraints.{TASK_DROP_KEY}`: the {evaluator.name} evaluator scores no "
            "lm-eval tasks, so no task score can drop; remove it or use the transformers or "
            "vllm evaluator"
        )
    settings = config.evaluator.settings
    where = "evaluator.settings"
    sections = [(where, scored)]
    if config.evaluator.name == "auto":
        sections = [(f"{where}.{evaluator.name}", scored)] + [
            (f"{where}.{name}", settings_tasks(dict(settings[name])))
            for name in ("transformers", "vllm")
            if name != evaluator.name and isinstance(settings.get(name), dict)
        ]
    for prefix, (setting, names) in sections:
        for task in drops:
            if task not in names:
                raise ConfigError(
                    f"`constraints.{TASK_DROP_KEY}.{task}`: no such task in "
                    f"`{prefix}.{setting}` ({', '.join(names) or 'none'})"
                )


def _check_llm(config: PopulationConfig) -> None:
    """Operator labels differ; LLM seeding has provider settings; a cost budget has prices."""
    from evo_compress.operators._base import operator_labels

    ops = config.search.operators
    try:
        operator_labels(ops.crossover, ops.mutation)
    except EvoCompressError as exc:
        raise ConfigError(f"`search.operators`: {exc}") from None
    llm_specs = [
        (f"search.operators.{kind}[{i}]", spec)
        for kind, specs in (("crossover", ops.crossover), ("mutation", ops.mutation))
        for i, spec in enumerate(specs)
        if spec.name == "llm"
    ]
    if config.search.recipes == LLM_SEEDS:
        from evo_compress.operators.llm import LLMSeeder

        params = seeder_params(config)  # a ConfigError without any provider settings
        where = "llm.seeder" if config.llm.seeder is not None else llm_specs[0][0] + ".params"
        try:
            LLMSeeder(params)
        except EvoCompressError as exc:
            raise ConfigError(f"`{where}`: {exc}") from None
    if config.llm.budget.max_cost is not None:
        for where, spec in llm_specs:
            if spec.params.get("price") is None:
                raise ConfigError(
                    f"`{where}.params.price` is needed: `llm.budget.max_cost` is set and "
                    "the cost of this operator's tokens is otherwise unknown"
                )
        seeder = config.llm.seeder
        seeds_by_llm = config.search.recipes == LLM_SEEDS
        if seeds_by_llm and seeder is not None and seeder.get("price") is None:
            raise ConfigError("`llm.seeder.price` is needed: `llm.budget.max_cost` is set")


def build_space(config: PopulationConfig) -> SearchSpace:
    """The search space of this config: the base space with its overrides applied."""
    space_cfg = config.search.space
    try:
        space = SearchSpace.load(space_cfg.base)
        if space_cfg.pin or space_cfg.genes or space_cfg.forbid:
            space = space.with_overrides(space_cfg.pin, space_cfg.genes, space_cfg.forbid)
    except EvoCompressError as exc:
        raise ConfigError(f"`search.space`: {exc}") from None
    return space


# ---------------------------------------------------------------------- collaborators
def default_run_dir(config: PopulationConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = config.output.runs_root / f"{stamp}-{config.name}"
    suffix = 2
    while path.exists():  # two runs started in the same second
        path = config.output.runs_root / f"{stamp}-{config.name}-{suffix}"
        suffix += 1
    return path


def default_cache_path(config: PopulationConfig) -> Path:
    return config.output.runs_root / ".cache" / "fitness.sqlite"


def make_config_evaluator(config: PopulationConfig) -> Evaluator:
    """The evaluator a config names, with its model, hardware and carbon context, set up
    for the config's parallel evaluation (threads divided between CPU workers)."""
    return configure_config_evaluator(config)[0]


def configure_config_evaluator(config: PopulationConfig) -> tuple[Evaluator, WorkerPlan]:
    """The config's evaluator and how its evaluations run (``fitness.pool``)."""
    from evo_compress.fitness import EvaluationContext, make_evaluator
    from evo_compress.fitness.pool import configure_evaluator

    context = EvaluationContext(config.model, config.hardware, config.carbon)
    evaluator = make_evaluator(config.evaluator.name, config.evaluator.settings, context)
    return configure_evaluator(config.evaluation, evaluator)


def open_config_cache(
    config: PopulationConfig, listener: ProgressListener | None
) -> FitnessCache | None:
    """The config's fitness cache; None when it is off, or (with one warning) when the file
    cannot be used as one: the cache only saves time, so the search goes on without it."""
    from evo_compress.fitness.cache import open_cache

    if not config.cache.enabled:
        return None
    warn = (listener or ProgressListener()).message
    return open_cache(config.cache.path or default_cache_path(config), warn)


def make_operators(
    config: PopulationConfig, space: SearchSpace, session: AgentSession | None = None
) -> tuple[list[Crossover], list[Mutation], dict[str, AdaptiveSelector]]:
    """The configured crossovers and mutations (labelled uniquely, LLM operators given the
    run's ``session``) and one adaptive selector per kind."""
    from evo_compress.operators import AdaptiveSelector, make_crossover, make_mutation
    from evo_compress.operators._base import operator_labels

    ops = config.search.operators
    crossovers: list[Crossover] = [
        make_crossover(s.name, space, s.params, f"search.operators.crossover[{i}]", session)
        for i, s in enumerate(ops.crossover)
    ]
    mutations: list[Mutation] = [
        make_mutation(s.name, space, s.params, f"search.operators.mutation[{i}]", session)
        for i, s in enumerate(ops.mutation)
    ]
    labels = operator_labels(ops.crossover, ops.mutation)
    for op, label in zip([*crossovers, *mutations], labels, strict=True):
        op.label = label
    adaptive = ops.adaptive
    selectors = {
        kind: AdaptiveSelector(
            [op.label for op in kind_ops],
            [s.weight for s in specs],
            adaptive.method,
            min(adaptive.min_prob, 1.0 / len(kind_ops)),
            adaptive.learning_rate,
        )
        for kind, kind_ops, specs in (
            ("crossover", crossovers, ops.crossover),
            ("mutation", mutations, ops.mutation),
        )
    }
    return crossovers, mutations, selectors


def uses_llm(config: PopulationConfig) -> bool:
    """Whether the config asks an LLM for anything (operators or the first generation)."""
    return config.search.recipes == LLM_SEEDS or any(
        s.name == "llm"
        for s in (*config.search.operators.crossover, *config.search.operators.mutation)
    )


def agent_session(
    config: PopulationConfig, store: RunStore, listener: ProgressListener
) -> AgentSession | None:
    """The LLM agents' shared session, when the config uses an LLM (imported only then)."""
    if not uses_llm(config):
        return None
    from evo_compress.agents.session import AgentSession

    return AgentSession(config.llm, store, listener.message)


def make_seeder(config: PopulationConfig, session: AgentSession | None) -> LLMSeeder | None:
    if config.search.recipes != LLM_SEEDS or session is None:
        return None
    from evo_compress.operators.llm import LLMSeeder

    return LLMSeeder(seeder_params(config), session=session)


def seeder_params(config: PopulationConfig) -> dict[str, Any]:
    """Provider settings for LLM seeding: `llm.seeder`, else the first LLM operator's."""
    if config.llm.seeder is not None:
        return dict(config.llm.seeder)
    for spec in (*config.search.operators.mutation, *config.search.operators.crossover):
        if spec.name == "llm":
            return {k: v for k, v in spec.params.items() if k != "fallback"}
    raise ConfigError(
        "`search.recipes`: `llm` seeding needs an LLM operator in `search.operators` or "
        "provider settings in `llm.seeder`"
    )


# ---------------------------------------------------------------------- searches
def start_search(
    config: PopulationConfig,
    run_dir: Path | None = None,
    listener: ProgressListener | None = None,
) -> Search:
    """A new search of ``config`` in a new run directory (``run_dir``, the config's, or a
    timestamped one under ``output.runs_root``). Its model is prepared before the directory
    is made, so a model that cannot be found leaves nothing behind."""
    from evo_compress.runs.hypervolume import REFERENCE_POINT
    from evo_compress.runs.store import RunStore

    full_space = build_space(config)
    evaluator, plan = configure_config_evaluator(config)
    # Search only what the back end can apply: no evaluation is spent on a recipe that
    # would come back infeasible.
    space = evaluator.restrict_space(full_space)
    seeds = []
    if config.search.recipes != LLM_SEEDS:  # an LLM's seeds are asked for in generation 0
        for recipe in load_portfolio(config.search.recipes, full_space):  # before a run dir
            reason = evaluator.infeasible_reason(recipe, full_space)
            if reason is None:
                seeds.append(space.recipe(recipe))
            elif listener is not None:
                # A built-in portfolio serves every back end: that one of its recipes does
                # not fit this one is no news to the user, only to whoever debugs the run.
                shown = render_recipe(recipe, baseline=full_space.baseline())
                listener.debug(f"seed recipe {shown} skipped: {reason}")
    # A model that cannot be found (or trained) fails here, before a run directory exists.
    evaluator.prepare()
    run_dir = Path(run_dir or config.output.run_dir or default_run_dir(config))
    cache_path = config.cache.path or default_cache_path(config)
    config = config.model_copy(
        update={
            "output": config.output.model_copy(update={"run_dir": run_dir.resolve()}),
            "cache": config.cache.model_copy(update={"path": Path(cache_path).resolve()}),
        }
    )
    store = RunStore.create(
        run_dir,
        config.to_yaml(),
        {
            "name": config.name,
            "tool_version": __version__,
            "space": space.to_data(),
            # The reference baseline's space, stored so resume needs no file the config
            # named (a relative path may not resolve from another directory).
            "base_space": SearchSpace.load(config.search.space.base).to_data(),
            # Likewise the seed recipes, in case a run killed in generation 0 resumes.
            "seed_recipes": (
                LLM_SEEDS
                if config.search.recipes == LLM_SEEDS
                else [r.to_dict(nested=False) for r in seeds]
            ),
            "fingerprint": evaluator.fingerprint(),
            # Not part of the fingerprint: `resume` names what changed and goes on.
            "packages": evaluator.packages(),
            "generations_target": config.search.generations,
            # How checkpoint stats measure hypervolume (runs before it stored `hv_scales`).
            "hv_box": {
                "box": "ideal and nadir of the front and the baseline reference",
                "reference_point": REFERENCE_POINT,
            },
        },
        note=listener.message if listener is not None else None,
    )
    try:
        return _assemble(
            config,
            store,
            space,
            evaluator,
            plan,
            open_config_cache(config, listener),
            config.search.generations,
            listener,
        )
    except BaseException:
        store.close()
        raise


def package_changes(before: Mapping[str, Any] | None, now: Mapping[str, Any]) -> str | None:
    """``torch 2.12.0 -> 2.13.0, peft none -> 0.22.0``: the versions that differ, or None
    (also for a run from before versions were stored, which has nothing to compare)."""
    if not isinstance(before, Mapping):
        return None
    names = sorted(set(before) | set(now))
    parts = [
        f"{name} {before.get(name) or 'none'} -> {now.get(name) or 'none'}"
        for name in names
        if before.get(name) != now.get(name)
    ]
    return ", ".join(parts) or None


def resume_search(
    run_dir: Path,
    generations: int | None = None,
    cache: Path | bool | None = None,
    listener: ProgressListener | None = None,
    retry_failed: bool = False,
    overrides: Sequence[Override] = (),
) -> Search:
    """Continue a run from its last checkpoint. ``overrides`` (the CLI's flags) change the
    stored config and are validated with it, as ``run`` validates its flags: a new total of
    ``search.generations`` (to extend a finished run) and the ``cache`` section.
    ``generations`` and ``cache`` (a path, False for none) are shorthands for the same
    overrides. ``retry_failed`` evaluates failed recipes again instead of re-using the
    failure."""
    from evo_compress.runs.store import RunStore

    changes = [*overrides, *cache_overrides(cache)]
    if generations is not None:
        changes.append(Override("search.generations", generations, f"--generations {generations}"))
    store = RunStore.open(run_dir)
    try:
        store.lock()
        # The schema only: the run store holds the search space, and the files the config
        # names may have moved since.
        config = apply_overrides(store.config_data(), changes, f"{run_dir} config")
        space = SearchSpace.from_data(store.get_meta("space"))
        extended = any(o.path == "search.generations" for o in changes)
        target = config.search.generations if extended else store.target_generations()
        # A damaged last checkpoint is stepped over (``run`` says so).
        done = store.last_checkpoint(on_damage=lambda _: None)
        if done is not None and target < done.generation + 1:
            raise RunStoreError(
                f"`--generations {target}` is fewer than the {done.generation + 1} "
                "generations this run has completed"
            )
        if config.cache.path is not None:  # a path given now is read from here
            config = config.model_copy(
                update={
                    "cache": config.cache.model_copy(update={"path": config.cache.path.resolve()})
                }
            )
        store.set_meta({"generations_target": target})
        evaluator, plan = configure_config_evaluator(config)
        if evaluator.fingerprint() != store.get_meta("fingerprint"):
            raise RunStoreError(
                f"{run_dir}: the evaluator's settings or environment differ from the ones "
                "this run started with, so its results would not be comparable"
            )
        packages = evaluator.packages()
        changed = package_changes(store.get_meta("packages", None), packages)
        if changed:
            (listener or ProgressListener()).message(
                f"{run_dir}: packages changed since the run last ran: {changed}; each "
                "evaluation records the versions that measured it"
            )
            store.set_meta({"packages": packages})
    except BaseException:
        store.close()
        raise
    cache_obj = open_config_cache(config, listener)
    if retry_failed and cache_obj is not None:
        cache_obj.forget_failures(evaluator.cache_fingerprint())
    return _assemble(
        config,
        store,
        space,
        evaluator,
        plan,
        cache_obj,
        target,
        listener,
        retry_failed=retry_failed,
    )


def _assemble(
    config: PopulationConfig,
    store: RunStore,
    space: SearchSpace,
    evaluator: Evaluator,
    plan: WorkerPlan,
    cache: FitnessCache | None,
    target_generations: int,
    listener: ProgressListener | None,
    retry_failed: bool = False,
) -> Search:
    """The search loop with every collaborator it uses built and wired."""
    from evo_compress.engine import Search

    listener = listener or ProgressListener()
    _check_racing(config, evaluator)  # resume checks no more than the schema before this
    if cache is not None:  # its warnings (a bad entry, a full disk) join the progress
        cache.warn = listener.message
    evaluator.set_run_dir(store.run_dir)
    # Evaluations run in a pool (local worker slots or Ray); the search's process alone
    # writes the run store and the cache.
    pool = make_pool(evaluator, plan, config.evaluation)
    # The LLM agents share one session: budget, provider clients, the call log.
    session = agent_session(config, store, listener)
    crossovers, mutations, selectors = make_operators(config, space, session)
    return Search(
        config,
        store=store,
        space=space,
        evaluator=evaluator,
        cache=cache,
        pool=pool,
        plan=plan,
        crossovers=crossovers,
        mutations=mutations,
        selectors=selectors,
        session=session,
        seeder=make_seeder(config, session),
        target_generations=target_generations,
        listener=listener,
        retry_failed=retry_failed,
    )


def make_pool(
    evaluator: Evaluator, plan: WorkerPlan, evaluation: EvaluationConfig
) -> EvaluationPool:
    """The pool ``plan`` asks for; Ray is imported only when its pool starts."""
    from evo_compress.fitness.pool import LocalPool

    if plan.backend == "ray":
        from evo_compress.fitness.ray_pool import RayPool

        return RayPool(evaluator, plan, evaluation.ray)
    return LocalPool(evaluator, plan)


# ---------------------------------------------------------------------- weights
def export_weights(
    store: RunStore,
    ident: int,
    out: Path,
    *,
    force: bool = False,
    message: Callable[[str], None] | None = None,
) -> list[Path]:
    """Rebuild the compressed model of individual ``ident`` of the run in ``store`` with the
    run's stored config (model, evaluator settings, seed) and write it to the folder ``out``
    (``runs.weights``): the checkpoint, the tokenizer, a model card with the recipe and its
    measured objectives. Returns the files written."""
    from evo_compress.fitness.model import model_fingerprint
    from evo_compress.runs.export import DEFAULT_CAPABILITIES, gather_individual, objective_entries
    from evo_compress.runs.weights import WeightsOrigin

    # One line for an unknown or failed id.
    info = gather_individual(store, ident, DEFAULT_CAPABILITIES)
    config = apply_overrides(store.config_data(), [], f"{store.run_dir} config")
    evaluator, _plan = configure_config_evaluator(config)
    warnings: list[str] = []
    _check_weights_evaluator(evaluator, f"run {store.run_dir}")
    if evaluator.fingerprint() != store.get_meta("fingerprint", None):
        warnings.append(
            "the evaluator's settings or environment (machine, libraries, model files) differ "
            "from the ones this run was measured with: the weights are rebuilt with the run's "
            "recipe and seed, but may not reproduce its objectives exactly"
        )
    run = {
        "name": info.run_name,
        "dir": str(info.run_dir),
        "individual": info.row.id,
        "generation": info.row.generation,
        "search_seed": config.search.seed,
        "on_front": info.on_front,
        "feasible": info.feasible,
    }
    metadata = info.evaluation.result.metadata
    tasks = metadata.get("tasks")
    origin = WeightsOrigin(
        recipe=info.recipe,
        model=config.model.id,
        model_fingerprint=model_fingerprint(config.model),
        evaluator=evaluator.name,
        settings={},
        device="",
        task="",
        run=run,
        objectives=objective_entries(info),
        tasks=tasks if isinstance(tasks, dict) and tasks else None,
        warnings=tuple(warnings),
    )
    for warning in warnings:
        (message or (lambda _text: None))(f"warning: {warning}")
    return _write_weights(evaluator, info.recipe, out, origin, force, message)


def compress_recipe(
    config: PopulationConfig,
    recipe: Recipe,
    out: Path,
    *,
    force: bool = False,
    message: Callable[[str], None] | None = None,
) -> list[Path]:
    """Apply ``recipe`` (given by hand) to the config's model with its transformers
    evaluator's settings and write the compressed model to ``out``, as ``export_weights``
    does for a run's recipe (no objectives: nothing was measured)."""
    from evo_compress.fitness.model import model_fingerprint
    from evo_compress.runs.weights import WeightsOrigin

    evaluator, _plan = configure_config_evaluator(config)
    _check_weights_evaluator(evaluator, "config")
    reason = evaluator.infeasible_reason(recipe, build_space(config))
    if reason is not None:
        raise EvoCompressError(f"recipe {recipe.short_hash} cannot be applied here: {reason}")
    origin = WeightsOrigin(
        recipe=recipe,
        model=config.model.id,
        model_fingerprint=model_fingerprint(config.model),
        evaluator=evaluator.name,
        settings={},
        device="",
        task="",
    )
    return _write_weights(evaluator, recipe, out, origin, force, message)


def _check_weights_evaluator(evaluator: Evaluator, what: str) -> None:
    if not hasattr(evaluator, "worker_payload") and not hasattr(evaluator, "save_weights"):
        raise EvoCompressError(
            "weights are built with the `transformers` or `vllm` evaluator's model and "
            f"settings; this {what} uses `{evaluator.name}`"
        )


def _write_weights(
    evaluator: Evaluator,
    recipe: Recipe,
    out: Path,
    origin: WeightsOrigin,
    force: bool,
    message: Callable[[str], None] | None,
) -> list[Path]:
    """Refuse what cannot be saved before loading anything, then build and write."""
    import dataclasses

    from evo_compress.exceptions import EvaluationError
    from evo_compress.fitness.model.save import unsaveable_reason
    from evo_compress.runs.weights import check_target, write_weights

    say = message or (lambda _text: None)
    failed = f"cannot export the weights of recipe {recipe.short_hash}"
    if hasattr(evaluator, "save_weights"):
        return _write_served_weights(evaluator, recipe, out, origin, force, say, failed)
    reason = unsaveable_reason(recipe)
    if reason is not None:
        raise EvoCompressError(f"{failed}: {reason}")
    check_target(Path(out), force)
    say(f"preparing model `{origin.model}` and its task")
    payload = evaluator.worker_payload(recipe)  # type: ignore[attr-defined]
    origin = dataclasses.replace(
        origin,
        settings=payload["settings"],
        device=str(payload["device"]),
        # Every configured task by its name in the config (several with `tasks`).
        task=", ".join(
            str(entry["name"])
            for entry in payload["task"].get("entries") or [{"name": payload["task"]["name"]}]
        ),
    )

    def build(folder: Path) -> dict[str, Any]:
        from evo_compress.fitness.model.save import save_compressed

        try:
            return save_compressed(payload, dict(recipe), folder, say)
        except EvoCompressError as exc:
            raise type(exc)(f"{failed}: {exc}") from None
        except Exception as exc:  # a library's error while applying or saving: one line
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise EvaluationError(f"{failed}: {type(exc).__name__}: {first}") from exc

    try:
        return write_weights(Path(out), origin, build, force=force, message=say)
    finally:
        evaluator.close()


def _write_served_weights(
    evaluator: Any,
    recipe: Recipe,
    out: Path,
    origin: Any,
    force: bool,
    say: Callable[[str], None],
    failed: str,
) -> list[Path]:
    """The vLLM back end's weights: the very checkpoint it serves for ``recipe`` (cached by
    its evaluations, else built the same way), which ``vllm serve`` loads as it is."""
    import dataclasses

    from evo_compress.exceptions import EvaluationError
    from evo_compress.fitness.model import task_entries
    from evo_compress.runs.weights import check_target, write_weights

    check_target(Path(out), force)
    say(f"preparing model `{origin.model}` and its task")
    origin = dataclasses.replace(
        origin,
        settings=evaluator.config.model_dump(mode="json"),
        device=str(evaluator.device),
        task=", ".join(entry.name for entry in task_entries(evaluator.config)),
    )

    def build(folder: Path) -> dict[str, Any]:
        try:
            return dict(evaluator.save_weights(recipe, folder, say))
        except EvaluationError as exc:
            raise EvaluationError(f"{failed}: {exc}") from None

    try:
        return write_weights(Path(out), origin, build, force=force, message=say)
    finally:
        evaluator.close()
