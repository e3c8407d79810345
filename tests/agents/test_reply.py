"""Reply parsing on its own: whatever a model sends, the answer is a valid reply or a
ReplyError, never another exception."""

from __future__ import annotations

import json

import pytest

from evo_compress.agents.reply import ReplyError, parse_proposal, parse_seeds
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
