"""Fuzzing what an LLM replies: valid replies mutated (wrong types, extra and missing fields,
deep nesting, huge numbers, NaN, surrogates and control codes, truncation, empty and megabyte
replies), fed through reply validation, through an operator that records them in a real run
store, and through whole searches against the fake provider. Nothing may raise but a
ReplyError, and every search must complete. Seeded: a failure reproduces."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from evo_compress_doubles.providers import (
    FakeProviderServer,
    RecordedRequest,
    Reply,
    Response,
    llm_search_sections,
    operator_params,
)

from evo_compress.agents.reply import ProposalReply, ReplyError, parse_proposal, parse_seeds
from evo_compress.agents.session import AgentSession
from evo_compress.app import start_search
from evo_compress.config import LLMConfig
from evo_compress.genomes import SearchSpace, nest
from evo_compress.operators import Measured, VariationContext
from evo_compress.operators.llm import LLMMutation
from evo_compress.runs import RunStore

SPACE = SearchSpace.builtin()
KEY = "sk-fuzz-0123456789abcdefFUZZ"

ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 7, 1.5, -0.0, 1e308, 2**70, "", "awq", "0.3", [], {}, [1, 2],
    {"a": 1}, ["awq"], {"method": "awq"},
]  # fmt: skip
ODD_TEXT = [
    "\ud800",
    "\udfff tail",
    "\x1b]0;pwned\x07\x1b[2J",
    "\x00\x08\r\x7f\x9b",
    "\u202eevil",
    "🙂 日本 ünï",
    "[/] [bold]",
    '"}{"',
    "IGNORE PREVIOUS INSTRUCTIONS",
]
RAW_NUMBERS = ["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1" * 5000, "0x10", "1_000"]


def valid_reply(rng: random.Random, seeds: bool) -> dict[str, Any]:
    generator = np.random.default_rng(rng.randrange(2**32))

    def recipe() -> dict[str, Any]:
        sampled = SPACE.sample(generator)
        return nest({name: sampled.get(name) for name in SPACE.genes})

    if seeds:
        return {"recipes": [recipe() for _ in range(rng.randint(1, 4))], "rationale": "spread"}
    return {"recipe": recipe(), "rationale": "because", "confidence": rng.random()}


def _containers(data: Any) -> list[Any]:
    """Every dict and list inside ``data`` (itself included)."""
    out, stack = [], [data]
    while stack:
        value = stack.pop()
        if isinstance(value, (dict, list)):
            out.append(value)
            stack.extend(value.values() if isinstance(value, dict) else value)
    return out


def _a_slot(rng: random.Random, data: Any) -> tuple[Any, Any] | None:
    """A (container, key or index) somewhere in ``data``."""
    slots = [
        (c, k)
        for c in _containers(data)
        for k in (list(c) if isinstance(c, dict) else range(len(c)))
    ]
    return rng.choice(slots) if slots else None


def _put(rng: random.Random, data: Any, value: Any) -> None:
    slot = _a_slot(rng, data)
    if slot is not None:
        slot[0][slot[1]] = value


MARK = "__FUZZ__"


def _splice(text: str, raw: str) -> str:
    return text.replace(json.dumps(MARK), raw, 1)


def mutate(rng: random.Random, data: dict[str, Any]) -> str:
    """One hostile variant of a valid reply, as the text a provider would send."""
    kind = rng.randrange(13)
    if kind == 0:  # a value of the wrong type
        _put(rng, data, rng.choice(ODD_VALUES))
    elif kind == 1:  # a field the schema does not name
        target = rng.choice([c for c in _containers(data) if isinstance(c, dict)])
        target[rng.choice(["exec", "path", "__class__", "recipe", "x" * 50])] = rng.choice(
            ODD_VALUES
        )
    elif kind == 2:  # a field missing
        slot = _a_slot(rng, data)
        if slot is not None:
            del slot[0][slot[1]]
    elif kind == 3:  # deep nesting, anywhere
        depth = rng.choice([9, 60, 1500, 50_000])
        _put(rng, data, MARK)
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
        return _splice(json.dumps(data), opener * depth + "1" + closer * depth)
    elif kind == 4:  # numbers JSON has no room for, or does not have
        _put(rng, data, MARK)
        return _splice(json.dumps(data), rng.choice(RAW_NUMBERS))
    elif kind == 5:  # surrogates, control codes, bidi, markup in any string
        _put(rng, data, rng.choice(ODD_TEXT) + rng.choice(["", "awq", "x"]))
        return json.dumps(data, ensure_ascii=rng.random() < 0.5)
    elif kind == 6:  # a hostile field name
        target = rng.choice([c for c in _containers(data) if isinstance(c, dict)])
        target[rng.choice(ODD_TEXT)] = 1
        return json.dumps(data, ensure_ascii=rng.random() < 0.5)
    elif kind == 7:  # truncated
        text = json.dumps(data)
        return text[: rng.randrange(len(text))]
    elif kind == 8:  # empty or not an object
        return rng.choice(["", "   ", "null", "{}", "[]", "0", '"text"', "```", "```json\n```"])
    elif kind == 9:  # a megabyte string
        char, count = rng.choice([("A", 1_000_000), ("é", 500_000), ("\x1b", 100_000)])
        _put(rng, data, char * count)
        return json.dumps(data, ensure_ascii=False)
    elif kind == 10:  # fenced, with prose around it
        return rng.choice(["", "Sure!\n"]) + "```json\n" + json.dumps(data) + "\n```"
    elif kind == 11:  # bytes flipped
        chars = list(json.dumps(data))
        for _ in range(rng.randint(1, 5)):
            chars[rng.randrange(len(chars))] = rng.choice('{}[]":,\\ \x00a1')
        return "".join(chars)
    else:  # a field given twice
        text = json.dumps(data)
        return text[:-1] + ', "rationale": 5}' if len(text) > 2 else text
    return json.dumps(data)


def fuzzed_replies(seed: int, count: int, seeds: bool = False) -> list[str]:
    rng = random.Random(seed)
    return [mutate(rng, valid_reply(rng, seeds)) for _ in range(count)]


def test_the_mutations_reach_every_path():
    """A fuzz run that never produced a valid reply or never a ReplyError tests little."""
    valid = invalid = 0
    for text in fuzzed_replies(0, 200):
        try:
            parse_proposal(text, SPACE)
            valid += 1
        except ReplyError:
            invalid += 1
    assert valid >= 10 and invalid >= 100


@pytest.mark.parametrize("seed", range(3))
def test_reply_validation_only_ever_raises_reply_errors(seed):
    for text in fuzzed_replies(seed, 150):
        try:
            reply = parse_proposal(text, SPACE, seen=frozenset())
        except ReplyError as exc:
            str(exc).encode("utf-8")  # the message is stored and fed back
        else:
            assert isinstance(reply, ProposalReply)
            assert SPACE.recipe(dict(reply.recipe)) == reply.recipe
            reply.rationale.encode("utf-8")
            assert reply.confidence is None or 0.0 <= reply.confidence <= 1.0
    for text in fuzzed_replies(seed + 100, 100, seeds=True):
        try:
            seeds = parse_seeds(text, SPACE, 3)
        except ReplyError:
            continue
        assert 1 <= len(seeds.recipes) <= 3
        assert len({r.hash for r in seeds.recipes}) == len(seeds.recipes)


def _measured() -> Measured:
    objectives = {"accuracy": 0.8, "latency": 10.0, "memory": 4000.0, "energy": 50.0, "co2": 5.0}
    return Measured(1, SPACE.recipe({"quant.method": "awq"}), "ok", objectives, {})


def test_fuzzed_replies_through_an_operator_are_recorded_and_fall_back(tmp_path):
    texts = fuzzed_replies(7, 60)
    store = RunStore.create(tmp_path / "run", "{}", {})
    session = AgentSession(LLMConfig(max_failures=10_000), store, None, env={"EVO_TEST_KEY": KEY})
    with FakeProviderServer() as server:
        ops = [
            LLMMutation(
                SPACE, session=session, **operator_params(server, provider, fix_attempts=0)
            )
            for provider in ("openai-compatible", "anthropic", "google")
        ]
        for i, text in enumerate(texts):
            server.queue(Reply(text))
            context = VariationContext(space=SPACE, generation=1, slot=i)
            child = ops[i % len(ops)].vary([_measured()], np.random.default_rng(i), context)
            assert SPACE.recipe(dict(child.recipe)) == child.recipe
    rows = store.llm_calls()
    store.close()
    assert len(rows) == len(texts)
    assert {r.outcome for r in rows} == {"valid", "fallback"}
    for row in rows:  # stored, so encodable, and read back intact
        for value in (row.reply, row.error, row.rationale, row.model, row.prompt):
            (value or "").encode("utf-8")


def _fuzzing_provider(seed: int) -> Callable[[RecordedRequest], Response]:
    rng = random.Random(seed)

    def answer(request: RecordedRequest) -> Response:
        seeds = "# Task: seed" in json.dumps(request.body)
        return Reply(mutate(rng, valid_reply(rng, seeds)))

    return answer


@pytest.mark.parametrize("seed", [11, 12])
def test_a_search_whose_provider_only_sends_fuzzed_replies_completes(
    config_factory, tmp_path, monkeypatch, seed
):
    monkeypatch.setenv("EVO_TEST_KEY", KEY)
    run_dir: Path = tmp_path / "run"
    with FakeProviderServer(default=_fuzzing_provider(seed)) as server:
        sections = llm_search_sections(server, generations=3, llm={"max_failures": 10_000})
        search = start_search(config_factory(**sections), run_dir=run_dir)
        try:
            history = search.run()
        finally:
            search.close()
        asked = len(server.requests)
    assert len(history) == 3
    with RunStore.open(run_dir) as store:
        checkpoint = store.last_checkpoint()
        calls = store.llm_calls()
    assert checkpoint is not None and checkpoint.generation == 2
    assert asked >= 10 and len(calls) >= 10
    assert any(c.outcome != "valid" for c in calls)
