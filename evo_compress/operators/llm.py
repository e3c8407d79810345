"""LLM agents as variation operators: mutation, crossover and first-generation seeding.

An LLM operator is one more ``Mutation``/``Crossover``: it reads the measured parents and the
search state, asks its provider for a child as JSON matching the genome's schema, validates
the reply with the genome's own code, feeds a validation error back once or twice, and when
it still has no valid child (or no key, no budget, a failing provider) the child comes from
its classic ``fallback`` operator and the record says so. The provider clients, the session
(budget, call log, replay), the prompts and the reply validation are ``evo_compress.agents``.

A child is made in three steps so that a generation's requests run concurrently: ``start``
(main thread, slot order: prompt, budget), ``run`` (any thread: the requests, each recorded
in the run store the moment it ends, or replayed from it on resume), ``finish`` (main thread,
slot order: charge the budget, fall back if needed). ``make_child`` starts and hands the loop
the other two as a ``Pending`` child; ``vary`` does the three in a row.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
from pydantic import ValidationError

from evo_compress.agents.prompts import (
    SYSTEM_PROMPT,
    crossover_prompt,
    feedback_prompt,
    mutation_prompt,
    seed_prompt,
)
from evo_compress.agents.providers import ProviderError, ProviderSettings, Usage
from evo_compress.agents.reply import (
    CandidatesReply,
    ProposalReply,
    ReplyError,
    SeedsReply,
    parse_candidates,
    parse_proposal,
)
from evo_compress.agents.reply import parse_seeds as _parse_seeds
from evo_compress.agents.schema import candidates_schema, proposal_schema, seeds_schema
from evo_compress.agents.session import AgentSession, Grant
from evo_compress.config import format_validation_error
from evo_compress.exceptions import OperatorError, RunStoreError
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.operators._base import (
    Crossover,
    Measured,
    Mutation,
    Pending,
    Proposal,
    VariationContext,
    make_crossover,
    make_mutation,
)
from evo_compress.runs.store import LLMCallRow
from evo_compress.text import clip, encodable

SEED_LABEL = "llm-seed"
# of a validation error: it is stored and fed back, and may echo a megabyte value
MAX_ERROR_CHARS = 1000
# Why a child fell back, as the per-generation line counts them.
WHY_INVALID = "with invalid replies"
WHY_PROVIDER = "with the provider failing"
WHY_OFF = "with the operator off"
WHY_BUDGET = "with the budget spent"
WHY_RESERVED = "with the budget held by earlier children"


@dataclass
class Job:
    """One child's requests: what to ask, what was granted, what came back."""

    role: str
    label: str
    generation: int
    slot: int
    prompt: str
    schema: dict[str, Any]
    schema_name: str
    parse: Callable[[str], Any]
    parents: Sequence[Measured] = ()
    rng: np.random.Generator | None = None
    context: VariationContext | None = None
    grant: Grant = field(default_factory=lambda: Grant(0))
    calls: list[LLMCallRow] = field(default_factory=list)
    result: Any = None  # the parsed valid reply
    # why it has no valid reply: (kind, detail), kind one of the WHY_* strings
    why: tuple[str, str] | None = None


class LLMAgent:
    """The provider settings and request loop an LLM operator (or the seeder) uses."""

    def __init__(
        self, params: dict[str, Any], where: str = "params", session: AgentSession | None = None
    ) -> None:
        params = dict(params)
        self.fix_attempts = int(params.pop("fix_attempts", 2))
        if not 0 <= self.fix_attempts <= 5:
            raise OperatorError(f"`fix_attempts` must be 0 to 5, got {self.fix_attempts}")
        self.front_size = int(params.pop("front_size", 8))
        if self.front_size < 0:
            raise OperatorError(f"`front_size` must be >= 0, got {self.front_size}")
        try:
            self.settings = ProviderSettings.model_validate(params)
        except ValidationError as exc:
            raise OperatorError(format_validation_error(exc, where).split(": ", 1)[1]) from None
        # The run's session (None outside a run: every request falls back at once).
        self.session = session
        self.fallback_label = "the other operators"  # named in the switched-off message

    # ------------------------------------------------------------------ the three steps
    def start(self, job: Job) -> Job:
        """Main thread: reserve the budget (0 requests: the job falls back)."""
        session = self.session
        if session is None:
            return job
        off = session.off(job.label)
        if off is not None:
            job.why = (WHY_OFF, off)
            return job
        replayable = session.recorded(job.generation, job.slot, job.label, 0) is not None
        if not replayable:
            try:
                session.client(self.settings)
            except ProviderError as exc:  # no key: nothing to ask with
                session.disable(job.label, str(exc), self.fallback_label)
                job.why = (WHY_OFF, str(exc))
                return job
        prompt_tokens = math.ceil(
            (len(SYSTEM_PROMPT) + len(job.prompt) + len(json.dumps(job.schema))) / 3
        )
        tokens = prompt_tokens + self.settings.max_tokens
        cost = self.settings.cost(Usage(prompt_tokens, self.settings.max_tokens)) or 0.0
        job.grant = session.admit(1 + self.fix_attempts, tokens, cost)
        if job.grant.calls == 0:
            spent = session.budget_spent(tokens, cost)
            job.why = (WHY_BUDGET, session.describe_usage()) if spent else (WHY_RESERVED, "")
        return job

    def run(self, job: Job) -> Job:
        """Any thread: ask (or replay), validate, re-ask with the error, record each request.
        Once the operator is switched off (by this job or a concurrent one) nothing more is
        sent; recorded requests are still replayed, so a resumed run makes the same child."""
        session = self.session
        if session is None or job.grant.calls == 0:
            return job
        schema_text = json.dumps(job.schema, sort_keys=True)
        prompt = job.prompt
        for attempt in range(job.grant.calls):
            prompt_hash = hashlib.sha256(
                "\0".join([SYSTEM_PROMPT, prompt, schema_text]).encode()
            ).hexdigest()
            recorded = session.recorded(job.generation, job.slot, job.label, attempt)
            if recorded is not None:
                if recorded.prompt_hash != prompt_hash:
                    raise RunStoreError(
                        f"the recorded LLM request of generation {job.generation} slot "
                        f"{job.slot} ({job.label}, attempt {attempt}) had another prompt; the "
                        "run store does not match this version or config"
                    )
                text, error = recorded.reply, recorded.error if recorded.reply is None else None
                usage = Usage(recorded.input_tokens, recorded.output_tokens)
                latency, transport, model = (
                    recorded.latency_s,
                    recorded.transport_attempts,
                    recorded.model,
                )
            else:
                off = session.off(job.label)
                if off is not None:
                    job.why = (WHY_OFF, off)
                    return job
                text, error = None, None
                usage, latency, transport, model = Usage(), 0.0, 0, self.settings.model
                try:
                    reply = session.client(self.settings).complete(
                        SYSTEM_PROMPT, prompt, job.schema, job.schema_name
                    )
                    text, usage, latency = reply.text, reply.usage, reply.latency_s
                    transport, model = reply.attempts, reply.model
                except ProviderError as exc:
                    error = str(exc)
                    transport, latency = exc.attempts or 0, exc.elapsed_s or 0.0
            parsed: Any = None
            if text is None:
                outcome = "fallback"
            else:
                try:
                    parsed = job.parse(text)
                    outcome, error = "valid", None
                except ReplyError as exc:
                    error = clip(str(exc), MAX_ERROR_CHARS, ellipsis="...", flatten=False)
                    outcome = "invalid" if attempt + 1 < job.grant.calls else "fallback"
                # A reply is parsed as it came; what is stored and fed back must encode.
                text = encodable(text)
            error = None if error is None else encodable(error)
            model = encodable(model)
            row = LLMCallRow(
                generation=job.generation,
                slot=job.slot,
                operator=job.label,
                attempt=attempt,
                role=job.role,
                provider=self.settings.provider,
                model=model,
                prompt_hash=prompt_hash,
                prompt=json.dumps({"system": SYSTEM_PROMPT, "user": prompt}),
                reply=text,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost=self.settings.cost(usage),
                latency_s=round(latency, 4),
                transport_attempts=transport,
                outcome=outcome,
                error=error,
                rationale=getattr(parsed, "rationale", None),
                confidence=getattr(parsed, "confidence", None),
            )
            if recorded is None:
                session.record(row)
            job.calls.append(row)
            if parsed is not None:
                job.result, job.why = parsed, None
                session.count_child(job.label, None, self.fallback_label)
                return job
            job.why = (WHY_PROVIDER if text is None else WHY_INVALID, error or "")
            if text is None or attempt + 1 == job.grant.calls:
                # no valid child; a provider that failed after its own retries is not re-asked
                session.count_child(job.label, error or "", self.fallback_label)
                return job
            prompt = feedback_prompt(job.prompt, text, error or "")
        return job

    def finish(self, job: Job) -> None:
        """Main thread, slot order: charge the budget, note how the child came about."""
        session = self.session
        if session is None:
            return
        session.settle(job.grant, job.calls)
        if job.result is not None:
            outcome = ("valid", "") if len(job.calls) == 1 else ("re-asked", "")
        elif job.why is None or job.why[0] in (WHY_OFF, WHY_BUDGET):
            outcome = (job.why[0] if job.why else WHY_OFF, "")  # its reason was said once
        else:
            outcome = job.why
        session.tally(job.label, job.generation, self.fallback_label, outcome)


class _LLMOperator(ABC):
    """What LLM mutation and crossover share (mixed into ``Mutation`` / ``Crossover``)."""

    informed: ClassVar[bool] = True
    remote: ClassVar[bool] = True
    role: ClassVar[str]
    agent: LLMAgent
    fallback: Any  # a Mutation or Crossover, as the concrete class says
    label: str
    space: SearchSpace

    def make_child(
        self,
        parents: Sequence[Measured],
        rng: np.random.Generator,
        context: VariationContext,
        defer: bool = True,
    ) -> Proposal | Pending:
        """A ``Pending`` child with its own RNG (drawn from ``rng``), so that the children
        do not depend on which reply arrives first; without ``defer`` the fallback's child."""
        if not defer:
            child = self.fallback.vary(parents, rng, context)
            return self._fell_back(child.recipe)
        job_rng = np.random.default_rng(int(rng.integers(2**63)))
        return _PendingChild(self, self.start(parents, job_rng, context))

    def _fell_back(self, recipe: Recipe) -> Proposal:
        return Proposal(recipe, (self.label, f"fallback:{self.fallback.label}"), fell_back=True)

    def start(
        self, parents: Sequence[Measured], rng: np.random.Generator, context: VariationContext
    ) -> Job:
        prompt = self._prompt(parents, context)
        space = context.space
        seen = context.seen
        wanted = context.candidates
        parse: Callable[[str], ProposalReply | CandidatesReply]
        if wanted > 1:  # the surrogate chooses among several children of one request

            def parse(text: str) -> ProposalReply | CandidatesReply:
                return parse_candidates(text, space, wanted, seen)

            schema, schema_name = candidates_schema(space), "propose_candidates"
        else:

            def parse(text: str) -> ProposalReply | CandidatesReply:
                return parse_proposal(text, space, seen)

            schema, schema_name = proposal_schema(space), "propose_recipe"
        job = Job(
            role=self.role,
            label=self.label,
            generation=context.generation,
            slot=context.slot,
            prompt=prompt,
            schema=schema,
            schema_name=schema_name,
            parse=parse,
            parents=tuple(parents),
            rng=rng,
            context=context,
        )
        return self.agent.start(job)

    def run(self, job: Job) -> Job:
        return self.agent.run(job)

    def finish(self, job: Job) -> Proposal:
        return self.finish_all(job)[0]

    def finish_all(self, job: Job) -> list[Proposal]:
        """Every child the reply proposed, in its order, or the fallback's child."""
        self.agent.finish(job)
        result = job.result
        if isinstance(result, CandidatesReply):
            return [Proposal(recipe, (self.label,)) for recipe in result.recipes]
        if result is not None:
            return [Proposal(result.recipe, (self.label,))]
        assert job.rng is not None and job.context is not None
        return [self._fell_back(self.fallback.vary(job.parents, job.rng, job.context).recipe)]

    def vary(
        self, parents: Sequence[Measured], rng: np.random.Generator, context: VariationContext
    ) -> Proposal:
        return self.finish(self.run(self.start(parents, rng, context)))

    @abstractmethod
    def _prompt(self, parents: Sequence[Measured], context: VariationContext) -> str:
        """The user prompt for this kind of request."""


class _PendingChild(Pending):
    """A started LLM request series: ``run`` asks, ``finish`` gives the child."""

    def __init__(self, op: _LLMOperator, job: Job) -> None:
        self.op = op
        self.job = job

    @property
    def asks(self) -> bool:
        return self.job.grant.calls > 0

    def run(self) -> None:
        self.op.run(self.job)

    def finish(self) -> Proposal:
        return self.op.finish(self.job)

    def finish_all(self) -> list[Proposal]:
        return self.op.finish_all(self.job)


class LLMMutation(_LLMOperator, Mutation):
    """An LLM proposes a child of one measured parent. Params: provider settings (provider,
    model, base_url, api_key_env, temperature, max_tokens, timeout_s, price, ...), plus
    ``fix_attempts`` (re-asks after an invalid reply, default 2), ``fallback`` (a mutation,
    default ``expert``) and ``front_size`` (front members shown, default 8). ``session``:
    the run's LLM session, passed in by whoever builds the operator (``evo_compress.app``)."""

    name = "llm"
    role = "mutation"

    def __init__(
        self,
        space: SearchSpace,
        fallback: str = "expert",
        session: AgentSession | None = None,
        **params: Any,
    ) -> None:
        Mutation.__init__(self, space)
        self.agent = LLMAgent(params, session=session)
        if fallback == self.name:
            raise OperatorError("`fallback` must be a classic mutation, not `llm`")
        self.fallback = make_mutation(fallback, space, {}, "fallback")
        self.agent.fallback_label = self.fallback.label

    def _do(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        # Without measurements (outside a search) there is nothing to ask about.
        return dict(self.fallback.do(Recipe(values), rng))

    def _prompt(self, parents: Sequence[Measured], context: VariationContext) -> str:
        return mutation_prompt(parents[0], context, self.agent.front_size, context.candidates)


class LLMCrossover(_LLMOperator, Crossover):
    """An LLM combines two measured parents into a child. Params as for ``LLMMutation``;
    ``fallback`` is a crossover (default ``uniform``)."""

    name = "llm"
    role = "crossover"

    def __init__(
        self,
        space: SearchSpace,
        fallback: str = "uniform",
        session: AgentSession | None = None,
        **params: Any,
    ) -> None:
        Crossover.__init__(self, space)
        self.agent = LLMAgent(params, session=session)
        if fallback == self.name:
            raise OperatorError("`fallback` must be a classic crossover, not `llm`")
        self.fallback = make_crossover(fallback, space, {}, "fallback")
        self.agent.fallback_label = self.fallback.label

    def _do(self, parents: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
        return dict(self.fallback.do([Recipe(p) for p in parents], rng))

    def _prompt(self, parents: Sequence[Measured], context: VariationContext) -> str:
        return crossover_prompt(parents, context, self.agent.front_size, context.candidates)


class LLMSeeder:
    """``search.recipes: llm``: the first generation's portfolio, asked of an LLM."""

    def __init__(
        self,
        params: dict[str, Any],
        where: str = "llm.seeder",
        session: AgentSession | None = None,
    ) -> None:
        self.agent = LLMAgent(params, where, session)

    def seed(self, count: int, context: VariationContext) -> SeedsReply | None:
        """Up to ``count`` valid recipes, or None when the agent could not provide any."""
        space = context.space

        def parse(text: str) -> SeedsReply:
            return _parse_seeds(text, space, count)

        job = Job(
            role="seed",
            label=SEED_LABEL,
            generation=0,
            slot=-1,
            prompt=seed_prompt(count, replace(context, front=())),
            schema=seeds_schema(space),
            schema_name="propose_recipes",
            parse=parse,
        )
        self.agent.finish(self.agent.run(self.agent.start(job)))
        result: SeedsReply | None = job.result
        session = self.agent.session
        # (no key and a spent budget were said already)
        if result is None and session is not None and job.why is not None:
            kind, detail = job.why
            if kind not in (WHY_OFF, WHY_BUDGET):
                session.say(f"LLM seeding failed: {detail or kind}")
        return result
