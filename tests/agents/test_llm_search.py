"""LLM operators inside the search: records, credit, adaptive selection, resume that replays
instead of paying twice, determinism whatever order replies arrive in, keys kept out of the
run directory, and a run that goes on without a key."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from evo_compress_doubles.providers import (
    FakeProviderServer,
    Hang,
    RecordedRequest,
    Reply,
    Response,
    Status,
    llm_search_sections,
    model_like,
)

from evo_compress import app
from evo_compress.exceptions import ConfigError
from evo_compress.progress import ProgressListener
from evo_compress.runs import RunStore
from evo_compress.runs.analysis import operator_stats
from evo_compress.runs.front import load_front
from evo_compress.testing import resume_search

KEY = "sk-live-THISKEYMUSTNEVERLEAK-0123456789"


def llm_config(
    config_factory: Any, server: FakeProviderServer, generations: int = 3, **llm: Any
) -> Any:
    return config_factory(**llm_search_sections(server, generations, llm=llm))


class Messages(ProgressListener):
    def __init__(self) -> None:
        self.said: list[str] = []

    def message(self, text: str) -> None:
        self.said.append(text)


def run(config: Any, run_dir: Path, listener: ProgressListener | None = None) -> list[Any]:
    search = app.start_search(config, run_dir=run_dir, listener=listener)
    try:
        search.run()
        return [m.to_json() for m in load_front(search.store)]
    finally:
        search.close()


def state(run_dir: Path) -> tuple[Any, ...]:
    with RunStore.open(run_dir) as store:
        checkpoint = store.last_checkpoint()
        assert checkpoint is not None
        individuals = [(r.generation, r.slot, r.hash, r.operators) for r in store.individuals()]
        # Rows are inserted as replies arrive: compare them in slot order.
        calls = sorted(
            (c.generation, c.slot, c.operator, c.attempt, c.reply) for c in store.llm_calls()
        )
        return checkpoint.population, checkpoint.operator_state, individuals, calls


@pytest.fixture
def keyed(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EVO_TEST_KEY", KEY)


def test_a_search_with_llm_operators_records_every_call_and_credit(
    config_factory, tmp_path, fake_llm, keyed
):
    messages = Messages()
    front = run(llm_config(config_factory, fake_llm), tmp_path / "run", messages)
    assert front
    with RunStore.open(tmp_path / "run") as store:
        calls = store.llm_calls()
        individuals = store.individuals()
        checkpoint = store.last_checkpoint()
        credits = store.credits()
    # Seeding came from the LLM, children from every kind of operator.
    first = [r for r in individuals if r.generation == 0]
    assert first and all(r.operators == ["llm-seed"] for r in first)
    used = {op for r in individuals if r.generation > 0 for op in r.operators}
    assert {"crossover:llm", "local"} & used and "expert" in used
    assert {c.operator for c in calls} >= {"llm-seed"}
    assert {c.provider for c in calls} >= {"google"}
    assert all(c.outcome == "valid" and c.input_tokens > 0 for c in calls)
    assert len(calls) == len(fake_llm.requests)
    # Adaptive selection and the LLM budget are part of the checkpoint.
    assert checkpoint is not None
    selectors = checkpoint.operator_state["selectors"]
    assert selectors["mutation"]["labels"] == ["gene", "expert", "local"]
    assert checkpoint.operator_state["llm"]["calls"] == len(calls)
    # Every child of generations 1.. is credited to the operators drawn for it.
    children = [r for r in individuals if r.generation > 0]
    assert len(credits) == len(children)
    assert all(c["reward"] >= 0 for c in credits)
    assert any(c["entered_front"] for c in credits)


@pytest.mark.parametrize(
    ("crash_generation", "after"),
    # generation 1 is bred without the surrogate, 3 with it (the run has 17 evaluations by 2)
    [(1, 3), (3, 1)],
)
def test_resume_replays_recorded_replies_and_matches_an_uninterrupted_run(
    config_factory, tmp_path, keyed, crash_generation, after
):
    with FakeProviderServer(default=model_like()) as server:
        config = llm_config(config_factory, server, generations=4)
        expected = run(config, tmp_path / "full")
        total = len(server.requests)

    class Crash(Exception):
        pass

    with FakeProviderServer(default=model_like()) as server:
        config = llm_config(config_factory, server, generations=4)
        search = app.start_search(config, run_dir=tmp_path / "crashed")
        assert search.session is not None
        original = search.session.record
        recorded = {"n": 0}

        def record_then_crash(row: Any) -> None:
            # Crash after some of the generation's LLM requests were recorded.
            if row.generation == crash_generation and recorded["n"] >= after:
                raise Crash
            original(row)
            recorded["n"] += row.generation == crash_generation

        search.session.record = record_then_crash  # type: ignore[method-assign]
        with pytest.raises(Crash):
            search.run()
        search.close()
        before = len(server.requests)
        with RunStore.open(tmp_path / "crashed") as store:
            kept = len(store.llm_calls())

        resumed = app.resume_search(tmp_path / "crashed")
        resumed.run()
        front = [m.to_json() for m in load_front(resumed.store)]
        resumed.close()
        after = len(server.requests) - before

    assert front == expected
    assert state(tmp_path / "crashed") == state(tmp_path / "full")
    # Only what was not recorded is asked again: no token is paid for twice.
    assert after == total - kept


def test_with_screening_llm_requests_propose_more_children_than_are_evaluated(
    config_factory, tmp_path, fake_llm, keyed
):
    sections = llm_search_sections(fake_llm, generations=4)
    sections["search"]["surrogate"] = {"min_evaluations": 8, "llm_candidates": 3}
    run(config_factory(**sections), tmp_path / "run")
    llm_labels = {"crossover:llm", "local"}
    with RunStore.open(tmp_path / "run") as store:
        calls = [c for c in store.llm_calls() if c.operator in llm_labels]
        children = [r for r in store.individuals() if r.generation > 0]
        stats = {row["operator"]: row for row in operator_stats(store)}
    # Every generation after the first is screened (the run has 9 evaluations by then): each
    # request asks for several candidates, and the surrogate keeps 8 children of the pool.
    assert calls and all(c.generation > 0 for c in calls)
    prompts = [json.loads(c.prompt)["user"] for c in calls]
    assert sum("Propose 3 distinct child recipes" in p for p in prompts) >= len(calls) // 2
    proposed = sum(
        len(json.loads(c.reply)["candidates"]) if "candidates" in c.reply else 1
        for c in calls
        if c.outcome == "valid" and c.reply is not None
    )
    evaluated = [r for r in children if llm_labels & set(r.operators)]
    made_by_llm = [r for r in evaluated if not any(o.startswith("fallback:") for o in r.operators)]
    assert len(children) == 3 * 8
    assert proposed > len(made_by_llm) > 0
    # What an evaluated child of each LLM operator cost is reported.
    for label in llm_labels & set(stats):
        row = stats[label]
        assert row["evaluated"] > 0
        tokens = row["input_tokens"] + row["output_tokens"]
        assert row["tokens_per_evaluated_child"] == pytest.approx(tokens / row["evaluated"])


def test_children_do_not_depend_on_which_reply_arrives_first(config_factory, tmp_path, keyed):
    slow = random.Random(0)
    answer = model_like()

    def jittery(request: RecordedRequest) -> Response:
        return Hang(slow.uniform(0.0, 0.15), then=answer(request))  # type: ignore[arg-type]

    fronts = []
    for concurrency in (1, 4):
        with FakeProviderServer(default=jittery) as server:
            config = llm_config(config_factory, server, concurrency=concurrency)
            fronts.append(run(config, tmp_path / f"c{concurrency}"))
    assert fronts[0] == fronts[1]
    assert state(tmp_path / "c1") == state(tmp_path / "c4")


def test_llm_requests_of_a_generation_run_concurrently(config_factory, tmp_path, keyed):
    import threading

    inflight = {"now": 0, "max": 0}
    lock = threading.Lock()
    answer = model_like()

    def counted(request: RecordedRequest) -> Response:
        with lock:
            inflight["now"] += 1
            inflight["max"] = max(inflight["max"], inflight["now"])
        try:
            import time

            time.sleep(0.1)
            return answer(request)
        finally:
            with lock:
                inflight["now"] -= 1

    with FakeProviderServer(default=counted) as server:
        config = llm_config(config_factory, server, concurrency=3)
        run(config, tmp_path / "run")
    assert 1 < inflight["max"] <= 3


def test_without_a_key_the_run_goes_on_and_says_so_once(
    config_factory, tmp_path, fake_llm, monkeypatch
):
    monkeypatch.delenv("EVO_TEST_KEY", raising=False)
    messages = Messages()
    front = run(llm_config(config_factory, fake_llm), tmp_path / "run", messages)
    assert front
    # The local server needs no key and keeps answering; Anthropic and Google are skipped.
    assert {r.wire for r in fake_llm.requests} == {"openai"}
    no_key = [m for m in messages.said if "EVO_TEST_KEY" in m]
    assert len(no_key) == 2  # once for the seeder, once for the crossover
    assert any("portfolios instead" in m for m in messages.said)
    with RunStore.open(tmp_path / "run") as store:
        ops = [r.operators for r in store.individuals() if r.generation > 0]
    assert ["crossover:llm", "fallback:uniform"] in [o[:2] for o in ops]


def test_nested_and_surrogate_replies_end_neither_the_run_nor_its_resume(
    config_factory, tmp_path, keyed
):
    answer = model_like()
    hostile = [
        "[" * 100_000 + "]" * 100_000,
        json.dumps({"recipe": {}, "rationale": "\ud800", "confidence": 0.5}),
        json.dumps({"recipe": {}, "rationale": "\udfff"}, ensure_ascii=False),
    ]
    count = {"n": 0}

    def sometimes_hostile(request: RecordedRequest) -> Response:
        count["n"] += 1
        if count["n"] % 2:
            return Reply(hostile[count["n"] // 2 % len(hostile)])
        return answer(request)

    with FakeProviderServer(default=sometimes_hostile) as server:
        config = llm_config(config_factory, server, generations=2, max_failures=100)
        assert run(config, tmp_path / "run")
        resume_search(tmp_path / "run", generations=3)
    with RunStore.open(tmp_path / "run") as store:
        checkpoint = store.last_checkpoint()
        calls = store.llm_calls()
    assert checkpoint is not None and checkpoint.generation == 2
    errors = " ".join(c.error or "" for c in calls)
    assert "nested" in errors and "surrogate" in errors
    assert any(c.generation == 2 for c in calls)


def test_the_budget_stops_llm_requests_and_the_run_goes_on(
    config_factory, tmp_path, fake_llm, keyed
):
    messages = Messages()
    config = llm_config(config_factory, fake_llm, generations=4, budget={"max_calls": 5})
    assert run(config, tmp_path / "run", messages)
    assert len(fake_llm.requests) == 5
    assert sum("budget spent" in m for m in messages.said) == 1


def test_api_keys_never_reach_the_run_directory(config_factory, tmp_path, keyed):
    answer = model_like()
    count = {"n": 0}

    def sometimes_refuse(request: RecordedRequest) -> Response:
        count["n"] += 1
        if count["n"] % 4 == 0:  # an error that echoes the credentials it was sent
            return Status(401, message=f"invalid key {request.api_key} for {request.headers}")
        return answer(request)

    messages = Messages()
    with FakeProviderServer(default=sometimes_refuse) as server:
        config = llm_config(config_factory, server, max_failures=100)
        run(config, tmp_path / "run", messages)
    assert any(r.api_key == KEY for r in server.requests)  # the key was really used
    with RunStore.open(tmp_path / "run") as store:
        errors = [c.error for c in store.llm_calls() if c.error]
    assert any("401" in e for e in errors)
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
            assert KEY[8:24].encode() not in path.read_bytes(), path
    assert not any(KEY in m for m in messages.said)


def test_llm_seeding_without_provider_settings_is_a_config_error(config_factory):
    with pytest.raises(ConfigError, match=r"`search\.recipes`: `llm` seeding needs"):
        config_factory(search={"recipes": "llm"})


def test_a_cost_budget_needs_prices(config_factory, fake_llm):
    with pytest.raises(ConfigError, match="price"):
        llm_config(config_factory, fake_llm, budget={"max_cost": 1.0})


def test_the_config_refuses_an_api_key_in_the_file(config_factory):
    with pytest.raises(ConfigError) as err:
        config_factory(
            search={
                "operators": {
                    "mutation": [
                        {
                            "name": "llm",
                            "params": {
                                "provider": "openai",
                                "model": "m",
                                "api_key": "sk-live-abcdef123456",
                            },
                        }
                    ]
                }
            }
        )
    assert "api_key_env" in str(err.value) and "sk-live-abcdef123456" not in str(err.value)


def test_operator_labels_must_differ(config_factory):
    with pytest.raises(ConfigError, match="label `same` is used twice"):
        config_factory(
            search={
                "operators": {
                    "mutation": [
                        {"name": "gene", "label": "same"},
                        {"name": "expert", "label": "same"},
                    ]
                }
            }
        )


def test_the_prompt_is_a_function_of_the_search_state(config_factory, tmp_path, keyed):
    """Two identical runs send byte-identical prompts (what replay relies on)."""
    prompts = []
    for name in ("a", "b"):
        with FakeProviderServer(default=model_like()) as server:
            run(llm_config(config_factory, server), tmp_path / name)
            prompts.append([json.dumps(r.body, sort_keys=True) for r in server.requests])
    assert prompts[0] and sorted(prompts[0]) == sorted(prompts[1])


def test_llm_text_reaches_the_terminal_without_control_codes(tmp_path, keyed):
    import subprocess
    import sys

    import yaml
    from evo_compress_doubles.providers import Reply

    hostile = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x9b1m\x07\x08\r\x00\u202e [/] [bold]x"
    answer = model_like()
    count = {"n": 0}

    def evil(request: RecordedRequest) -> Response:
        count["n"] += 1
        if count["n"] % 4 == 0:  # an error message the provider wrote
            return Status(400, message=f"refused {hostile}")
        reply = answer(request)
        assert isinstance(reply, Reply)
        body = json.loads(reply.text)
        body["rationale"] = f"said {hostile}"
        if "recipes" in body:  # one seed recipe the genome refuses, quoting the model
            body["recipes"].append({"quant": {"method": f"int3 {hostile}"}})
        return Reply(json.dumps(body), model=f"evil {hostile}")

    with FakeProviderServer(default=evil) as server:
        data = {
            "name": "evil",
            **llm_search_sections(server, generations=2, llm={"max_failures": 100}),
            "evaluator": {"name": "synthetic"},
            "cache": {"enabled": False},
        }
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(data))
        exe = [sys.executable, "-m", "evo_compress.cli"]
        run_dir = tmp_path / "run"
        runs = subprocess.run(
            [*exe, "run", "--config", str(config), "--run-dir", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert runs.returncode == 0, runs.stderr
    lineage = subprocess.run(
        [*exe, "lineage", str(run_dir)], capture_output=True, text=True, timeout=300
    )
    assert lineage.returncode == 0, lineage.stderr
    assert "said" in lineage.stdout and "red" in lineage.stdout  # the words stay
    assert "refused" in runs.stdout + runs.stderr and "int3" in runs.stdout + runs.stderr
    assert "pwned" not in lineage.stdout  # the window-title sequence went as a whole
    for out in (runs.stdout, runs.stderr, lineage.stdout, lineage.stderr):
        shown = {c for c in out if ord(c) < 32 or 0x7F <= ord(c) <= 0x9F or c == "\u202e"}
        assert shown <= {"\n", "\t"}, shown


def test_each_generation_says_how_each_llm_operator_did(config_factory, tmp_path, keyed):
    answer = model_like()

    def picky(request: RecordedRequest) -> Response:
        if request.wire == "anthropic":  # the crossover only ever replies prose
            return Reply("Let me think about this step by step.")
        return answer(request)

    messages = Messages()
    with FakeProviderServer(default=picky) as server:
        config = llm_config(config_factory, server, generations=4)
        assert run(config, tmp_path / "run", messages)
    lines = [m for m in messages.said if ", LLM operator `" in m]
    local = [m for m in lines if "`local`" in m]
    crossover = [m for m in lines if "`crossover:llm`" in m]
    assert local and all(" valid" in m and "fell back" not in m for m in local)
    assert crossover and "fell back to `uniform`: " in crossover[0]
    assert "invalid replies" in crossover[0] and "not valid JSON" in crossover[0]
    # every child without a valid reply counts: 3 in a row switch the crossover off
    assert any("`crossover:llm` is off for the rest of the run" in m for m in messages.said)
    assert "operator off" in crossover[-1]
    generations = [int(m.split(",")[0].split()[1]) for m in lines]
    assert generations == sorted(generations) and len(set(generations)) > 1
