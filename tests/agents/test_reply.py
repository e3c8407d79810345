"""Reply parsing on its own: whatever a model sends, the answer is a valid reply or a
ReplyError, never another exception."""

from __future__ import annotations

import json

import pytest

from evo_compress.agents.reply import ReplyError, parse_candidates, parse_proposal, parse_seeds
from evo_compress.genomes import SearchSpace

SPACE = SearchSpace.builtin()
VALID = {"recipe": {"quant": {"method": "awq"}}, "rationale": "cheap", "confidence": 0.5}


@pytest.mark.parametrize("depth", [50, 900, 100_000])
def test_deeply_nested_json_is_an_invalid_reply(depth):
    for nested in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        with pytest.raises(ReplyError, match=r"nested|must be a JSON object"):
            parse_proposal(nested, SPACE)
        with pytest.raises(ReplyError, match=r"nested|must be a JSON object"):
            parse_seeds(nested, SPACE, 3)
    # nesting inside an otherwise valid reply
    deep = json.dumps(VALID).replace('"awq"', "[" * depth + "]" * depth)
    with pytest.raises(ReplyError, match="nested"):
        parse_proposal(deep, SPACE)


def test_a_lone_surrogate_in_the_rationale_is_an_invalid_reply():
    text = json.dumps(VALID | {"rationale": "fine \ud800 text"})  # sent as the escape \ud800
    assert "\\ud800" in text
    with pytest.raises(ReplyError, match="`rationale`"):
        parse_proposal(text, SPACE)
    seeds = json.dumps({"recipes": [VALID["recipe"]], "rationale": "\udfff"})
    with pytest.raises(ReplyError, match="`rationale`"):
        parse_seeds(seeds, SPACE, 2)


def test_a_valid_reply_parses():
    reply = parse_proposal(json.dumps(VALID), SPACE)
    assert reply.recipe == SPACE.recipe({"quant.method": "awq"})
    assert (reply.rationale, reply.confidence) == ("cheap", 0.5)


def candidate(method: str, bits: int | None = None) -> dict:
    quant: dict = {"method": method} if bits is None else {"method": method, "bits": bits}
    return {"recipe": {"quant": quant}, "rationale": f"try {method}", "confidence": 0.4}


def test_several_candidates_parse_and_the_unusable_ones_are_dropped_with_reasons():
    seen = {SPACE.recipe({"quant.method": "gptq"}).hash}
    items = [
        candidate("awq"),
        candidate("no-such-method"),
        candidate("awq"),  # a repeat of the first
        candidate("gptq"),  # evaluated already
        {"recipe": {"quant": {"method": "none"}}, "rationale": "x", "confidence": 2},
        candidate("rtn"),
        candidate("hqq"),  # beyond the 2 wanted
    ]
    reply = parse_candidates(json.dumps({"candidates": items}), SPACE, 2, seen)
    assert reply.recipes == (
        SPACE.recipe({"quant.method": "awq"}),
        SPACE.recipe({"quant.method": "rtn"}),
    )
    assert (reply.rationale, reply.confidence) == ("try awq", 0.4)
    reasons = "\n".join(reply.rejected)
    assert "`candidates[1]`.recipe" in reasons and "no-such-method" in reasons
    assert "`candidates[2]` repeats an earlier candidate" in reasons
    assert "`candidates[3]` has been evaluated in this run already" in reasons
    assert "`confidence` must be from 0 to 1" in reasons


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ({"candidates": []}, r"`candidates` must be a non-empty list .* got an empty list"),
        ({"candidates": "awq"}, r"`candidates` must be a non-empty list .* got str"),
        ({}, r"`candidates` must be a non-empty list .* got nothing"),
        (VALID, r"fields the schema does not allow: 'confidence', 'rationale', 'recipe'"),
        ({"candidates": [VALID], "note": 1}, r"fields the schema does not allow: 'note'"),
        ({"candidates": [["awq"]]}, r"`candidates\[0\]` must be an object, got a list"),
        ({"candidates": [{"rationale": "x"}]}, r"`candidates\[0\]` has no `recipe` field"),
        (
            {"candidates": [VALID | {"why": "x"}]},
            r"`candidates\[0\]` has fields the schema does not allow: 'why'",
        ),
        ({"candidates": [candidate("gptq")] * 2}, r"no usable recipe in `candidates`"),
    ],
)
def test_a_malformed_candidates_reply_is_refused_with_a_clear_error(reply, message):
    seen = {SPACE.recipe({"quant.method": "gptq"}).hash}
    with pytest.raises(ReplyError, match=message):
        parse_candidates(json.dumps(reply), SPACE, 3, seen)
