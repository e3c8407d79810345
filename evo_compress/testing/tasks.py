"""A test double of a back end that scores several lm-eval tasks: the synthetic landscape, with
each success recording every task's score in ``metadata["tasks"]`` as the real-model back ends
do, and the accuracy objective their weighted mean. For tests of what reads those records (the
`max_task_drop` constraint, the front, the report, export); nothing in it is measured."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evo_compress.config import format_validation_error
from evo_compress.exceptions import ConfigError
from evo_compress.fitness import EVALUATORS, EvaluationContext, EvaluationResult
from evo_compress.fitness.synthetic import SyntheticEvaluator
from evo_compress.genomes import Recipe
from evo_compress.objectives import TASKS_KEY

TASK_EVALUATOR = "test-tasks"


class TaskSpec(BaseModel):
    """One task of the double: its weight in the mean, and how much of the landscape's
    accuracy drop it takes (``sensitivity`` 2: it drops twice as far as the landscape)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)
    sensitivity: float = Field(1.0, ge=0)
    metric: str = "acc"


class TaskScoresEvaluator(SyntheticEvaluator):
    """``evaluator.settings``: ``tasks`` (a list of ``TaskSpec``), the rest the synthetic
    evaluator's. Task ``t`` scores ``base - sensitivity_t * (base - a)``, where ``a`` is the
    landscape's accuracy and ``base`` its ``base_accuracy``; the accuracy objective is the
    weighted mean of the scores (with sensitivities whose weighted mean is 1, it is ``a``)."""

    name: ClassVar[str] = TASK_EVALUATOR

    def __init__(self, settings: Mapping[str, Any], context: EvaluationContext) -> None:
        rest = {k: v for k, v in settings.items() if k != "tasks"}
        super().__init__(rest, context)
        self.settings = dict(settings)
        try:
            self.tasks = [TaskSpec.model_validate(t) for t in settings.get("tasks") or []]
        except ValidationError as exc:
            message = format_validation_error(exc, "", prefix="evaluator.settings.tasks.")
            raise ConfigError(message.removeprefix(": ")) from None
        if not self.tasks:
            raise ConfigError("`evaluator.settings.tasks`: the test-tasks evaluator needs tasks")

    def scored_tasks(self) -> tuple[str, tuple[str, ...]] | None:
        return "tasks", tuple(t.name for t in self.tasks)

    def fingerprint_data(self) -> dict[str, Any]:
        data = super().fingerprint_data()
        data["tasks"] = [t.model_dump() for t in self.tasks]
        return data

    def _compute(self, recipe: Recipe) -> EvaluationResult:
        result = super()._compute(recipe)
        if not result.ok or result.objectives is None:
            return result
        base = self.config.base_accuracy
        drop = base - result.objectives["accuracy"]
        total = sum(t.weight for t in self.tasks)
        scores = {t.name: min(1.0, max(0.0, base - t.sensitivity * drop)) for t in self.tasks}
        tasks = {}
        for t in self.tasks:
            tasks[t.name] = {
                "score": scores[t.name],
                "stderr": self.config.noise,
                "n": self.config.test_items,
                "metric": t.metric,
                "weight": t.weight,
            }
        mean = sum(scores[t.name] * t.weight for t in self.tasks) / total
        objectives = {**result.objectives, "accuracy": mean}
        return EvaluationResult.success(objectives, {**result.metadata, TASKS_KEY: tasks})


def register_task_evaluator() -> str:
    """Register the double under ``test-tasks`` (once per process); return the name."""
    if TASK_EVALUATOR not in EVALUATORS:
        EVALUATORS.register(TASK_EVALUATOR, TaskScoresEvaluator)
    return TASK_EVALUATOR
