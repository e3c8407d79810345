"""What the prompts state of the search: constraints as phrases, the baseline's values."""

from __future__ import annotations

from evo_compress.agents.prompts import mutation_prompt, seed_prompt
from evo_compress.genomes import SearchSpace
from evo_compress.operators import Measured, VariationContext

SPACE = SearchSpace.builtin()
REFERENCE = {"accuracy": 0.8, "latency": 8.0, "memory": 9000.0, "energy": 60.0, "co2": 6.0}


def test_task_drop_limits_and_the_baselines_task_scores_are_stated() -> None:
    context = VariationContext(
        space=SPACE,
        constraints={"max_accuracy_drop": 0.05, "max_task_drop.my_mc": 0.03},
        reference=REFERENCE,
        reference_tasks={"my_gen": 0.7, "my_mc": 0.9},
    )
    parent = Measured(
        3,
        SPACE.recipe({"quant.method": "awq"}),
        "ok",
        {**REFERENCE, "accuracy": 0.78},
        {"max_accuracy_drop": -0.03, "max_task_drop.my_mc": 0.04},
    )
    prompt = mutation_prompt(parent, context, front_size=4)
    assert "- accuracy may drop at most 0.05 below the baseline's" in prompt
    assert "- task `my_mc` score may drop at most 0.03 below the baseline's" in prompt
    assert "- the uncompressed baseline's task scores: " in prompt
    assert '"my_mc": 0.9' in prompt
    assert '"max_task_drop.my_mc": 0.04' in prompt  # the parent's violated task limit
    assert prompt == mutation_prompt(parent, context, front_size=4)  # a pure function


def test_without_tasks_the_constraints_section_is_unchanged() -> None:
    context = VariationContext(
        space=SPACE, constraints={"max_accuracy_drop": 0.05}, reference=REFERENCE
    )
    section = seed_prompt(4, context).split("## Constraints\n")[1].split("\n\n")[0]
    assert section.splitlines() == [
        "- accuracy may drop at most 0.05 below the baseline's",
        '- the uncompressed baseline measured: {"accuracy": 0.8, "co2": 6.0, "energy": 60.0, '
        '"latency": 8.0, "memory": 9000.0}',
    ]
