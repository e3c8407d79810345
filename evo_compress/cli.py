"""The ``evo-compress`` command line: run, resume, evaluate, status, front, history,
lineage, operators, report, export, compress, compare, ls, validate, and ``cache`` (ls,
stats, forget) for the fitness cache.

An ``EvoCompressError`` becomes one line on stderr and exit code 2; ``--debug`` shows the
traceback instead. What a command prints is formatted by ``evo_compress.output``: every
command takes ``--format table|json``.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m evo_compress.cli`: Ctrl-C is one line from here on
    from evo_compress._interrupt import exit_on_interrupt

    exit_on_interrupt()

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evo_compress import __version__
from evo_compress._interrupt import EXIT_CODE, exit_on_interrupt, raising
from evo_compress.exceptions import ConfigError, EvoCompressError, RecipeError
from evo_compress.output import (
    FORMAT_HELP,
    Format,
    FrontFormat,
    LineageFormat,
    console,
    emit,
    err_console,
    front_csv,
    print_cache_entries,
    print_cache_forget,
    print_cache_stats,
    print_evaluation,
    print_front,
    print_history,
    print_lines,
    print_operators,
    print_registered,
    print_status,
    write_text,
)
from evo_compress.progress import ProgressListener
from evo_compress.quiet import quiet_libraries
from evo_compress.text import terminal_safe

app = typer.Typer(
    name="evo-compress",
    help="Search for Pareto-optimal compression recipes of a language model (NSGA-II/III).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


SET_HELP = (
    "Set a config value, as in the file: a dotted key and one YAML value, e.g. "
    "search.population_size=12 (repeatable)."
)


def _format_option(default: Any = Format.table, extra: str = "") -> Any:
    return typer.Option(default, "--format", "-f", help=FORMAT_HELP + extra)


@contextmanager
def _errors() -> Iterator[None]:
    """A command's body: an ``EvoCompressError`` is one line and exit code 2, Ctrl-C one line
    and exit code 130 (after the body has cleaned up what it had open)."""
    try:
        with raising():
            yield
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False, markup=False)
        raise typer.Exit(EXIT_CODE) from None
    except EvoCompressError as exc:
        if _state["debug"]:
            raise
        # The message echoes what the user wrote: never read it as rich markup.
        err_console.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(2) from None


def _warn(text: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {text}", highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"evo-compress {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(
        False,
        "--debug",
        help="Show full tracebacks instead of one-line errors, and the seed recipes that "
        "the back end cannot apply.",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state["debug"] = debug
    if not debug:  # before any command imports torch: see evo_compress.quiet
        quiet_libraries()


# ---------------------------------------------------------------------- progress display
class _RichProgress(ProgressListener):
    """Live progress: generation, evaluations done/total, cache hits, front size, hypervolume."""

    def __init__(self, console: Console, debug: bool = False) -> None:
        self.console = console
        self.show_debug = debug
        self.progress = Progress(
            TextColumn("[bold]gen {task.fields[gen]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "evals  cache hits {task.fields[hits]}  front {task.fields[front]}  "
                "HV {task.fields[hv]}"
            ),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task: Any = None
        self.hits = 0

    def search_started(self, search: Any) -> None:
        search_cfg = search.config.search
        offspring = search_cfg.offspring_size or search_cfg.population_size
        total = search_cfg.population_size + (search.target_generations - 1) * offspring
        done = search.store.count_evaluations(min_generation=0)
        self.console.print(
            f"run [bold]{search.store.run_dir}[/]  ({search_cfg.algorithm}, population "
            f"{search_cfg.population_size}, {search.target_generations} generations, "
            f"evaluator {search.evaluator.name})",
            highlight=False,
        )
        if search.evaluator.name == "synthetic":
            self.console.print(
                "[yellow]evaluator `synthetic`: a closed-form test landscape, not measurements "
                "of a model[/]"
            )
        self.progress.start()
        self.task = self.progress.add_task(
            "search", total=total, completed=done, gen="-", hits=0, front="-", hv="-"
        )

    def generation_started(self, generation: int, n_offspring: int) -> None:
        self.progress.update(self.task, gen=generation)

    def evaluation_finished(self, generation: int, result: Any, source: str) -> None:
        if source == "cache":
            self.hits += 1
        self.progress.update(self.task, advance=1, hits=self.hits)

    def generation_finished(self, stats: Any) -> None:
        self.progress.update(self.task, front=stats.front_size, hv=f"{stats.hypervolume:.4f}")
        if not self.console.is_terminal:
            self.console.print(
                f"generation {stats.generation}: {stats.offspring} offspring, "
                f"{stats.evaluated} evaluated, {stats.cache_hits} cache hits, "
                f"{stats.failed} failed, "
                + (f"{stats.quick} stopped quick, " if stats.quick else "")
                + f"front {stats.front_size}, HV {stats.hypervolume:.4f}",
                highlight=False,
            )

    def message(self, text: str) -> None:
        # Messages quote LLM replies and provider errors: no markup, no control codes; one
        # line in a log.
        self.console.print(terminal_safe(text), markup=False, highlight=False, soft_wrap=True)

    def debug(self, text: str) -> None:
        if self.show_debug:
            self.message(f"debug: {text}")

    def stop(self) -> None:
        self.progress.stop()


def _drive(search: Any, listener: _RichProgress, format: Format = Format.table) -> None:
    try:
        search.run()
    except KeyboardInterrupt:
        listener.stop()
        err_console.print(
            f"interrupted: finished evaluations are saved in {search.store.run_dir}; "
            f"continue with `evo-compress resume {search.store.run_dir}`",
            highlight=False,
            markup=False,
            soft_wrap=True,  # one line, however long the path
        )
        search.close()
        raise typer.Exit(EXIT_CODE) from None
    except BaseException:
        listener.stop()
        search.close()
        raise
    listener.stop()
    from evo_compress.runs.front import baseline_recipe, load_front

    members = load_front(search.store)
    baseline = baseline_recipe(search.store)
    run_dir = search.store.run_dir

    def table() -> None:
        print_front(members, baseline)
        console.print(
            f"run directory: {run_dir}  (evo-compress front {run_dir} --format json)",
            highlight=False,
        )

    emit(format, {"run_dir": run_dir, "front": [m.to_json() for m in members]}, table)
    search.close()


# ---------------------------------------------------------------------- commands
@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="Population config (YAML)."),
    run_dir: Path | None = typer.Option(
        None, "--run-dir", help="Where to write the run (default: <runs_root>/<timestamp>-<name>)."
    ),
    recipes: str | None = typer.Option(
        None,
        "--recipes",
        help="First-generation seeds: baseline, conservative, aggressive, a recipes YAML file, "
        "or llm (asked of the config's first LLM operator, or `llm.seeder`).",
    ),
    generations: int | None = typer.Option(
        None, "--generations", min=1, help="Generations in total, the initial one included."
    ),
    seed: int | None = typer.Option(
        None, "--seed", min=0, help="Random seed (same seed, same front)."
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Fitness cache file (default: <runs_root>/.cache/fitness.sqlite)."
    ),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Evaluate everything; read and write no cache."
    ),
    workers: str | None = typer.Option(
        None,
        "--workers",
        help="Evaluations at once (`evaluation.workers`): auto (one per visible GPU, one on "
        "a CPU) or a count.",
    ),
    settings: list[str] = typer.Option(
        [], "--set", help=SET_HELP, metavar="KEY=VALUE", show_default=False
    ),
    format: Format = _format_option(extra="; json: progress on stderr, the front on stdout"),
) -> None:
    """Start a new search from a population config."""
    with _errors():
        from evo_compress.app import check_config, start_search
        from evo_compress.overrides import Override, apply_overrides, describe
        from evo_compress.yamlio import read_yaml

        overrides = [
            *_overrides(
                ("search.recipes", recipes, "--recipes"),
                ("search.generations", generations, "--generations"),
                ("search.seed", seed, "--seed"),
                ("evaluation.workers", _count_or_word(workers), "--workers"),
            ),
            *_cache_overrides(cache, no_cache),
            *(Override.parse(text) for text in settings),
        ]
        # Flags go through the same validation as the file: --generations 10**12 is an error.
        data = read_yaml(config, "config file", ConfigError)
        cfg = apply_overrides(data, overrides, str(config))
        check_config(cfg, describe(str(config), overrides))
        listener = _RichProgress(_progress_console(format), debug=_state["debug"])
        search = start_search(cfg, run_dir=run_dir, listener=listener)
        _drive(search, listener, format)


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="Run directory to continue."),
    generations: int | None = typer.Option(
        None, "--generations", min=1, help="New total of generations (extends a finished run)."
    ),
    cache: Path | None = typer.Option(None, "--cache", help="Use this fitness cache file."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Read and write no fitness cache."),
    retry_failed: bool = typer.Option(
        False,
        "--retry-failed",
        help="Evaluate failed recipes again (in the population, the cache and future draws).",
    ),
    format: Format = _format_option(extra="; json: progress on stderr, the front on stdout"),
) -> None:
    """Continue a run from its last checkpoint, re-using every stored evaluation."""
    with _errors():
        from evo_compress.app import resume_search

        # Validated against the run's own config, as `run` validates its flags.
        overrides = [
            *_overrides(("search.generations", generations, "--generations")),
            *_cache_overrides(cache, no_cache),
        ]
        listener = _RichProgress(_progress_console(format), debug=_state["debug"])
        search = resume_search(
            run_dir, overrides=overrides, listener=listener, retry_failed=retry_failed
        )
        _drive(search, listener, format)


@app.command()
def evaluate(
    config: Path = typer.Option(..., "--config", "-c", help="Population config (YAML)."),
    recipe: str = typer.Option(
        ..., "--recipe", "-r", help="A recipe YAML file, or an inline YAML/JSON mapping."
    ),
    format: Format = _format_option(),
    cache: Path | None = typer.Option(None, "--cache", help="Fitness cache file to use."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Evaluate even if cached."),
    settings: list[str] = typer.Option(
        [], "--set", help=SET_HELP, metavar="KEY=VALUE", show_default=False
    ),
) -> None:
    """Evaluate one recipe with the config's evaluator and print its five objectives."""
    with _errors():
        from evo_compress.app import (
            build_space,
            check_config,
            default_cache_path,
            make_config_evaluator,
        )
        from evo_compress.fitness.cache import open_cache
        from evo_compress.overrides import Override, apply_overrides, describe
        from evo_compress.yamlio import read_yaml

        overrides = [*_cache_overrides(cache, no_cache), *(Override.parse(t) for t in settings)]
        data = read_yaml(config, "config file", ConfigError)
        cfg = apply_overrides(data, overrides, str(config))
        check_config(cfg, describe(str(config), overrides))
        space = build_space(cfg)
        parsed = _read_recipe(recipe, space)
        evaluator = make_config_evaluator(cfg)
        store = None
        if cfg.cache.enabled:
            store = open_cache(cfg.cache.path or default_cache_path(cfg), _warn)
        fingerprint, limits = evaluator.cache_fingerprint(), evaluator.limits()
        result = store.get(parsed, fingerprint, limits) if store is not None else None
        hit = result is not None
        if result is None:
            evaluator.prepare()
            result = evaluator.evaluate(parsed, space)
            if store is not None:
                store.put(parsed, fingerprint, result, limits)
        evaluator.close()
        if store is not None:
            store.close()
        out = {
            "recipe": parsed.to_dict(),
            "hash": parsed.hash,
            "status": result.status,
            "objectives": result.objectives,
            "reason": result.reason,
            "cache_hit": hit,
            "duration_s": result.duration_s,
            "metadata": result.metadata,
        }
        emit(format, out, lambda: print_evaluation(parsed, result, hit))
        if not result.ok:
            raise typer.Exit(1)


@app.command()
def status(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    format: Format = _format_option(),
) -> None:
    """Show how far a run got: generations, evaluations, failures, front size, hypervolume."""
    with _errors():
        from evo_compress.runs import RunStore
        from evo_compress.runs.front import run_status

        with RunStore.open(run_dir, read_only=True) as store:
            info = run_status(store)
        emit(format, info, lambda: print_status(info))


@app.command()
def front(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    format: FrontFormat = _format_option(FrontFormat.table, "; csv: one row per member"),
) -> None:
    """Print the Pareto front of a run (as of its last completed generation)."""
    with _errors():
        from evo_compress.runs import RunStore
        from evo_compress.runs.front import baseline_recipe, load_front

        with RunStore.open(run_dir, read_only=True) as store, store.snapshot():
            members = load_front(store)
            baseline = baseline_recipe(store)
        data = [m.to_json() for m in members]
        emit(format, data, lambda: print_front(members, baseline), csv=lambda: front_csv(members))


@app.command()
def history(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    format: Format = _format_option(),
) -> None:
    """Per generation: hypervolume, front size, evaluations, cache hits, failures."""
    with _errors():
        from evo_compress.runs import RunStore
        from evo_compress.runs.analysis import history as run_history

        with RunStore.open(run_dir, read_only=True) as store:
            rows = run_history(store)
        emit(format, rows, lambda: print_history(rows))


@app.command()
def lineage(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    ident: int | None = typer.Argument(None, help="Individual id (default: the final front)."),
    front_only: bool = typer.Option(
        False, "--front", help="Every member of the final front (the default without an ID)."
    ),
    depth: int | None = typer.Option(
        None, "--depth", min=0, help="Generations to walk back (default: to generation 0)."
    ),
    format: LineageFormat = _format_option(
        LineageFormat.table, "; tree: the same as table; dot (Graphviz) or graphml"
    ),
) -> None:
    """Where recipes came from: each ancestor with its generation, the operator that made it
    (LLM provider, model and rationale too) and how its objectives changed from its parents."""
    with _errors():
        from evo_compress.runs import RunStore
        from evo_compress.runs.lineage import load_lineage

        ids = None if front_only or ident is None else [ident]
        with RunStore.open(run_dir, read_only=True) as store:
            graph = load_lineage(store, ids, depth)
        emit(
            format,
            graph.to_json(),
            lambda: write_text(graph.to_tree()),
            tree=graph.to_tree,
            dot=graph.to_dot,
            graphml=graph.to_graphml,
        )


@app.command()
def operators(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    format: Format = _format_option(),
) -> None:
    """Per operator: children, the share valid, feasible, dominating a parent and entering the
    front, hypervolume contribution, fallbacks, and for LLM operators calls, tokens and cost
    (in all and per evaluated child)."""
    with _errors():
        from evo_compress.runs import RunStore
        from evo_compress.runs.analysis import operator_stats

        with RunStore.open(run_dir, read_only=True) as store:
            rows = operator_stats(store)
        emit(format, rows, lambda: print_operators(rows))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="HTML file to write (default: <run dir>/report.html)."
    ),
    png: Path | None = typer.Option(
        None, "--png", help="Folder for the PNG plots (default: the HTML report's folder)."
    ),
    no_png: bool = typer.Option(False, "--no-png", help="Write the HTML report only."),
    format: Format = _format_option(),
) -> None:
    """Write one self-contained HTML report (opens offline): the front in five objectives,
    hypervolume per generation, the front's lineage, operator credit, how each value was
    measured, and the run's config; and its plots as PNG files beside it (``--no-png``: not)."""
    with _errors():
        if no_png and png is not None:
            raise ConfigError("`--png` and `--no-png` contradict each other: give one")
        from evo_compress.reports import write_pngs, write_report
        from evo_compress.runs import RunStore

        pngs: list[Path] = []
        with (
            RunStore.open(run_dir, read_only=True) as store,
            store.snapshot(),
        ):  # the HTML and PNGs agree
            path = write_report(store, out or Path(run_dir) / "report.html")
            if not no_png:
                try:
                    pngs = write_pngs(store, png if png is not None else path.parent)
                except ImportError as exc:  # matplotlib draws them; the HTML needs none
                    _warn(f"no PNG plots written: matplotlib cannot be imported ({exc})")
        emit(
            format,
            {"report": path, "plots": pngs},
            lambda: print_lines([f"report: {path}", *(f"plot: {item}" for item in pngs)]),
        )


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    ident: int = typer.Argument(..., help="Individual id (see `evo-compress front`)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder to write (default: <run dir>/export/<ID>)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Overwrite files already there (and an earlier --weights folder)."
    ),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        help="Also rebuild the compressed model with the run's config and seed, and write it "
        "here: a folder AutoModelForCausalLM.from_pretrained loads, with tokenizer and model "
        "card (transformers evaluator only).",
    ),
    format: Format = _format_option(extra="; json: progress on stderr"),
) -> None:
    """Take a recipe to production: its YAML, the llm-compressor recipe where one exists, the
    `vllm serve` command line, and its measured objectives; with --weights, the compressed
    model itself."""
    with _errors():
        from evo_compress.runs import RunStore
        from evo_compress.runs.export import export_recipe

        if weights is not None:
            from evo_compress.runs.weights import check_target

            check_target(weights, force)  # before the recipe folder is written
        with RunStore.open(run_dir, read_only=True) as store, store.snapshot():
            paths = export_recipe(
                store, ident, out or Path(run_dir) / "export" / str(ident), force=force
            )
            if weights is not None:
                from evo_compress.app import export_weights

                paths += export_weights(store, ident, weights, force=force, message=_progress)
        emit(format, {"id": ident, "files": paths}, lambda: print_lines([str(p) for p in paths]))


@app.command()
def compress(
    config: Path = typer.Option(
        ...,
        "--config",
        "-c",
        help="Population config (YAML): its model, transformers "
        "evaluator settings (task, calibration, seed) and hardware are used.",
    ),
    recipe: str = typer.Option(
        ..., "--recipe", "-r", help="A recipe YAML/JSON file, or an inline YAML/JSON mapping."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Folder to write the compressed model, tokenizer and model "
        "card to (new or empty, or an earlier export with --force).",
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an earlier weights export in --out."
    ),
    settings: list[str] = typer.Option(
        [], "--set", help=SET_HELP, metavar="KEY=VALUE", show_default=False
    ),
    format: Format = _format_option(extra="; json: progress on stderr"),
) -> None:
    """Apply a recipe given by hand to the config's model and save the compressed model as a
    folder transformers loads (what `export --weights` does for a run's recipe)."""
    with _errors():
        from evo_compress.app import build_space, check_config, compress_recipe
        from evo_compress.overrides import Override, apply_overrides, describe
        from evo_compress.yamlio import read_yaml

        overrides = [Override.parse(t) for t in settings]
        data = read_yaml(config, "config file", ConfigError)
        cfg = apply_overrides(data, overrides, str(config))
        check_config(cfg, describe(str(config), overrides))
        parsed = _read_recipe(recipe, build_space(cfg))
        paths = compress_recipe(cfg, parsed, out, force=force, message=_progress)
        emit(
            format,
            {"hash": parsed.hash, "recipe": parsed.to_dict(), "files": paths},
            lambda: print_lines([str(p) for p in paths]),
        )


@app.command()
def compare(
    run_a: Path = typer.Argument(..., help="First run directory."),
    run_b: Path = typer.Argument(..., help="Second run directory."),
    format: Format = _format_option(),
) -> None:
    """Two fronts side by side, with each one's hypervolume against a common reference."""
    with _errors():
        from evo_compress.runs import RunStore
        from evo_compress.runs.compare import compare_runs, render_comparison

        with (
            RunStore.open(run_a, read_only=True) as a,
            RunStore.open(run_b, read_only=True) as b,
            a.snapshot(),
            b.snapshot(),
        ):
            result = compare_runs(a, b)
        emit(format, result, lambda: write_text(render_comparison(result)))


@app.command("ls")
def ls(format: Format = _format_option()) -> None:
    """Everything registered (evaluators, operators, LLM providers, compression methods):
    where each comes from, built in or a plugin distribution, and what it is."""
    with _errors():
        import importlib

        from evo_compress.methods import BACKENDS, ENTRY_POINT_GROUP, METHODS
        from evo_compress.registry import registries

        for module in _REGISTRY_MODULES:
            importlib.import_module(module)
        order = {group: i for i, group in enumerate(_GROUP_ORDER)}
        groups = sorted(registries().items(), key=lambda kv: (order.get(kv[0], 99), kv[0]))
        rows: list[dict[str, str | None]] = [
            {
                "kind": registry.kind,
                "name": name,
                "from": registry.origin(name),
                "description": registry.describe(name),
                "group": group,
            }
            for group, registry in groups
            for name in registry.names()
        ]
        # Compression methods: built in, or from the `evo_compress.methods` entry points.
        rows += [
            {
                "kind": f"{method.kind} method",
                "name": method.name,
                "from": METHODS.origin(method.name),
                "description": f"{method.description} Back ends: "
                + ", ".join(b for b in BACKENDS if method.name in METHODS.names(backend=b)),
                "group": ENTRY_POINT_GROUP,
            }
            for method in METHODS
        ]
        rows += [
            {
                "kind": "compression method",
                "name": name,
                "from": "plugin",
                "description": reason,
                "group": ENTRY_POINT_GROUP,
            }
            for name, reason in METHODS.broken().items()
        ]
        emit(format, rows, lambda: print_registered(rows))


# The modules whose import registers the built-ins of each extension point; a new registry
# adds its module here and its entry-point group to the order.
_REGISTRY_MODULES = ("evo_compress.fitness", "evo_compress.operators", "evo_compress.agents")
_GROUP_ORDER = (
    "evo_compress.evaluators",
    "evo_compress.crossovers",
    "evo_compress.mutations",
    "evo_compress.providers",
)


@app.command()
def validate(
    file: Path = typer.Argument(..., help="A population config, or a YAML file of recipes."),
    space: str | None = typer.Option(
        None, "--space", help="Search space for recipe files (default: llm-compression)."
    ),
    format: Format = _format_option(),
) -> None:
    """Check a config or recipe file without running anything."""
    with _errors():
        from evo_compress.app import build_space, checked_config
        from evo_compress.yamlio import read_yaml

        data = read_yaml(file, "file")
        if _looks_like_config(data):
            cfg = checked_config(data, source=str(file))
            genes = len(build_space(cfg).genes)
            found = {
                "file": file,
                "kind": "config",
                "name": cfg.name,
                "algorithm": cfg.search.algorithm,
                "population_size": cfg.search.population_size,
                "generations": cfg.search.generations,
                "genes": genes,
                "evaluator": cfg.evaluator.name,
            }
            line = (
                f"{file}: valid config `{cfg.name}` ({cfg.search.algorithm}, population "
                f"{cfg.search.population_size}, {cfg.search.generations} generations, "
                f"{genes} genes, evaluator {cfg.evaluator.name})"
            )
            emit(format, found, lambda: print_lines([line]))
            return
        from evo_compress.genomes import SearchSpace, load_portfolio, render_recipe

        space_obj = SearchSpace.load(space or "llm-compression")
        if isinstance(data, list) or (isinstance(data, dict) and set(data) == {"recipes"}):
            recipes = load_portfolio(str(file), space_obj)
        else:
            try:
                recipes = [space_obj.recipe({} if data is None else data)]
            except RecipeError as exc:
                raise RecipeError(f"{file}: {exc}") from None
        found = {
            "file": file,
            "kind": "recipes",
            "space": space_obj.name,
            "recipes": [
                {"hash": r.hash, "recipe": r.to_dict(), "text": render_recipe(r)} for r in recipes
            ],
        }
        lines = [
            f"{file}: {len(recipes)} valid recipe(s) in space `{space_obj.name}`",
            *(f"  {r.short_hash}  {render_recipe(r)}" for r in recipes),
        ]
        emit(format, found, lambda: print_lines(lines))


# ---------------------------------------------------------------------- cache
cache_app = typer.Typer(
    name="cache",
    help="Look into the fitness cache (the SQLite file runs share) and clean it up: list "
    "entries, count them, forget some; prune the vLLM back end's built checkpoints.",
    no_args_is_help=True,
)
app.add_typer(cache_app)

_CLASS_HELP = (
    "Only failures of this class: recipe (the recipe itself fails; served again), limit (a "
    "timeout or out of memory; served to equal or tighter limits) or environment (a missing "
    "package, a server that did not start, or a failure cached before classes existed; "
    "never served)."
)


def _cache_file_option() -> Any:
    return typer.Option(
        None,
        "--cache",
        help="Fitness cache file (default: the --config's cache, else "
        "runs/.cache/fitness.sqlite in the working directory).",
    )


def _cache_config_option() -> Any:
    return typer.Option(
        None,
        "--config",
        "-c",
        help="Take the cache file from this population config (`cache.path`, else "
        "<output.runs_root>/.cache/fitness.sqlite) and, for `forget --checkpoints`, the "
        "vLLM evaluator's `checkpoint_dir`.",
    )


def _failed_option() -> Any:
    return typer.Option(False, "--failed", help="Only failed entries (any class).")


def _class_option() -> Any:
    return typer.Option(None, "--class", help=_CLASS_HELP, show_default=False)


def _check_class(value: str | None) -> str | None:
    from evo_compress.fitness._base import FAILURE_CLASSES

    if value is not None and value not in FAILURE_CLASSES:
        raise EvoCompressError(
            f"`--class {value}`: a failure class is one of {', '.join(FAILURE_CLASSES)}"
        )
    return value


def _cache_target(cache: Path | None, config: Path | None) -> tuple[Path, Any]:
    """The cache file the flags name, and the config read (None without ``--config``)."""
    if config is None:
        return cache or Path("runs") / ".cache" / "fitness.sqlite", None
    from evo_compress.app import default_cache_path, load_config

    cfg = load_config(config)
    return cache or cfg.cache.path or default_cache_path(cfg), cfg


@cache_app.command("ls")
def cache_ls(
    cache: Path | None = _cache_file_option(),
    config: Path | None = _cache_config_option(),
    failed: bool = _failed_option(),
    failure_class: str | None = _class_option(),
    recipe: str | None = typer.Option(
        None, "--recipe", help="Only entries whose recipe hash starts with this prefix."
    ),
    format: Format = _format_option(),
) -> None:
    """List the entries, oldest first.

    One row per entry: recipe hash, status, failure class, when it was cached (UTC),
    evaluator fingerprint, hits, the recipe, and its objectives or why it failed. Reads the
    file only: a missing one is an error, not created."""
    with _errors():
        from evo_compress.fitness.cache_admin import EntryFilter, list_entries

        path, _ = _cache_target(cache, config)
        where = EntryFilter(failed, _check_class(failure_class), recipe)
        rows = [e.to_json() for e in list_entries(path, where)]
        emit(format, rows, lambda: print_cache_entries(rows))


@cache_app.command("stats")
def cache_stats(
    cache: Path | None = _cache_file_option(),
    config: Path | None = _cache_config_option(),
    format: Format = _format_option(),
) -> None:
    """Count the entries: by status, failures by class, hits.

    Entries, file size, entries by status and failures by class, evaluator fingerprints, the
    oldest and newest entry, and how often entries were served (hits). Reads the file only:
    a missing one is an error, not created."""
    with _errors():
        from evo_compress.fitness.cache_admin import cache_stats as stats_of

        path, _ = _cache_target(cache, config)
        info = stats_of(path)
        emit(format, info, lambda: print_cache_stats(info))


@cache_app.command("forget")
def cache_forget(
    cache: Path | None = _cache_file_option(),
    config: Path | None = _cache_config_option(),
    failed: bool = typer.Option(
        False, "--failed", help="Forget failed entries (any class; with --class, that class)."
    ),
    failure_class: str | None = _class_option(),
    recipe: str | None = typer.Option(
        None,
        "--recipe",
        metavar="HASH_PREFIX",
        help="Forget entries whose recipe hash starts with this prefix (as `cache ls` shows).",
    ),
    older_than: float | None = typer.Option(
        None,
        "--older-than",
        min=0,
        metavar="DAYS",
        help="Forget entries cached more than DAYS days ago (a fraction is fine: 0.5 is 12 "
        "hours); with --checkpoints, checkpoint folders last modified that long ago.",
    ),
    everything: bool = typer.Option(
        False,
        "--all",
        help="Forget every entry (or, with --checkpoints, every checkpoint). Without "
        "--all at least one filter is needed.",
    ),
    checkpoints: bool = typer.Option(
        False,
        "--checkpoints",
        help="Prune the vLLM back end's built checkpoints instead of cache entries: remove "
        "the subfolders of the checkpoint folder that hold evo_checkpoint.json (all, with "
        "--all, or those --older-than DAYS); anything else there is left alone. They are "
        "rebuilt when a recipe needs them again.",
    ),
    checkpoint_dir: Path | None = typer.Option(
        None,
        "--checkpoint-dir",
        metavar="DIR",
        help="The checkpoint folder for --checkpoints (default: the --config's vLLM "
        "`checkpoint_dir`, else <EVO_COMPRESS_CACHE or the project cache>/vllm-checkpoints).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Only count what would be removed; remove nothing."
    ),
    format: Format = _format_option(),
) -> None:
    """Delete entries (or, with --checkpoints, vLLM checkpoints).

    Deletes the entries that match every filter given (--failed, --class, --recipe,
    --older-than; or --all), so they are evaluated again, and prints how many. With
    --checkpoints it prunes the vLLM checkpoint folder instead."""
    with _errors():
        from evo_compress.fitness.cache_admin import (
            EntryFilter,
            default_checkpoint_dir,
            forget_entries,
            prune_checkpoints,
        )

        where = EntryFilter(failed, _check_class(failure_class), recipe, older_than)
        out: dict[str, Any] = {"dry_run": dry_run}
        if checkpoints:
            if failed or failure_class is not None or recipe is not None:
                raise EvoCompressError(
                    "`--checkpoints` takes only --older-than DAYS or --all: a checkpoint "
                    "is shared by recipes and has no status"
                )
            if older_than is None and not everything:
                raise EvoCompressError(
                    "name the checkpoints to remove: --older-than DAYS, or --all for every one"
                )
            _, cfg = _cache_target(cache, config)
            folder = checkpoint_dir
            if folder is None and cfg is not None and cfg.evaluator.name == "vllm":
                folder = cfg.evaluator.settings.get("checkpoint_dir")
            if checkpoint_dir is not None and not checkpoint_dir.is_dir():
                raise EvoCompressError(f"`--checkpoint-dir {checkpoint_dir}`: no such folder")
            out["checkpoints"] = prune_checkpoints(
                Path(folder or default_checkpoint_dir()), older_than, dry_run
            )
        else:
            if checkpoint_dir is not None:
                raise EvoCompressError("`--checkpoint-dir` goes with --checkpoints")
            if where.empty and not everything:
                raise EvoCompressError(
                    "name the entries to forget: --failed, --class CLASS, --recipe "
                    "HASH_PREFIX, --older-than DAYS, or --all for every entry"
                )
            if everything and not where.empty:
                raise EvoCompressError("`--all` forgets every entry: give it without filters")
            path, _ = _cache_target(cache, config)
            out["cache"] = path
            out["entries_removed"] = forget_entries(path, where, dry_run)
        emit(format, out, lambda: print_cache_forget(out))


# ---------------------------------------------------------------------- helpers
def _read_recipe(text: str, space: Any) -> Any:
    """``--recipe``: a YAML/JSON file, or an inline YAML/JSON mapping, as a recipe of
    ``space``."""
    from evo_compress.yamlio import is_file, parse_yaml, read_yaml

    path = Path(text)
    if is_file(path):
        data = read_yaml(path, "recipe file", RecipeError)
    else:
        data = parse_yaml(text, "`--recipe`", RecipeError)
    if isinstance(data, str):
        raise RecipeError(f"`--recipe {text}`: no such file, and not a YAML mapping")
    return space.recipe(data)


def _progress(text: str) -> None:
    """A step of a long command, on stderr (stdout may carry JSON)."""
    err_console.print(terminal_safe(text), markup=False, highlight=False, soft_wrap=True)


def _overrides(*flags: tuple[str, Any, str]) -> list[Any]:
    """``(config path, value, flag)`` for each flag given (not None), as overrides."""
    from evo_compress.overrides import Override

    return [
        Override(path, value, f"{flag} {value}")
        for path, value, flag in flags
        if value is not None
    ]


def _cache_overrides(cache: Path | None, no_cache: bool) -> list[Any]:
    from evo_compress.overrides import cache_overrides

    if cache is not None and no_cache:
        raise EvoCompressError("`--cache` and `--no-cache` exclude each other")
    return cache_overrides(False if no_cache else cache)


def _progress_console(format: Format) -> Console:
    """Where a search's progress goes: stdout for people, stderr when stdout carries JSON."""
    return err_console if format is Format.json else console


def _count_or_word(value: str | None) -> int | str | None:
    """``--workers 4`` is a count, ``--workers auto`` a word (only ASCII digits make a count)."""
    if value is None:
        return None
    return int(value) if value.isascii() and value.isdigit() else value


def _looks_like_config(data: Any) -> bool:
    # An empty file is a valid config (every default), which is what `run` would make of it.
    from evo_compress.config import PopulationConfig

    keys = set(PopulationConfig.model_fields)
    return data is None or (isinstance(data, dict) and bool(set(data) & keys))


def main() -> None:
    exit_on_interrupt()  # already done by the entry points; here for callers of main()
    app()


if __name__ == "__main__":
    main()
