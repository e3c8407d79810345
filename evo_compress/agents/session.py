"""What the LLM operators of one run share: the budget, the provider clients, the call log in
the run store (from which a resumed run replays replies instead of paying for them twice),
and the messages said once.

Budget decisions are made in the main thread in offspring-slot order, from the state at the
start of a generation's batch plus what earlier slots reserved, so they do not depend on which
concurrent reply arrives first. Each admitted child reserves up to ``1 + fix_attempts``
requests and an estimate of their tokens (prompt characters / 3 + ``max_tokens`` each) and
cost; ``max_calls`` is never passed, the token and cost limits by at most the estimate's error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from evo_compress.agents.providers import LLMClient, ProviderSettings, make_client
from evo_compress.config import LLMConfig
from evo_compress.runs.store import LLMCallRow, RunStore
from evo_compress.text import clip


@dataclass(frozen=True)
class Grant:
    """What one child may spend: requests, and the token and cost estimate reserved."""

    calls: int
    tokens: int = 0
    cost: float = 0.0


class AgentSession:
    def __init__(
        self,
        config: LLMConfig,
        store: RunStore | None = None,
        say: Callable[[str], None] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self._say = say or (lambda text: None)
        self._env = env
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost = 0.0
        self.disabled: dict[str, str] = {}  # operator label -> why it was switched off
        self.failures: dict[str, int] = {}  # operator label -> failed children in a row
        self._reserved = Grant(0)
        self._said: set[str] = set()
        # (generation, label) -> (fallback label, [(kind, detail) per child])
        self._tallies: dict[tuple[int, str], tuple[str, list[tuple[str, str]]]] = {}
        self._clients: dict[str, LLMClient] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ messages
    def say(self, text: str) -> None:
        self._say(text)

    def say_once(self, key: str, text: str) -> None:
        with self._lock:
            if key in self._said:
                return
            self._said.add(key)
        self._say(text)

    # ------------------------------------------------------------------ clients
    def client(self, settings: ProviderSettings) -> LLMClient:
        """One client per provider settings; raises ``MissingKeyError`` without a key."""
        key = settings.model_dump_json()
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = make_client(settings, self._env)
                self._clients[key] = client
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    # ------------------------------------------------------------------ budget
    def admit(self, wanted: int, tokens_per_call: int, cost_per_call: float) -> Grant:
        """Reserve up to ``wanted`` requests for one child (0: the budget is spent, or what is
        left of it is reserved by earlier children of this generation)."""
        granted = self._left(wanted, tokens_per_call, cost_per_call, self._reserved)
        if granted == 0:
            self._say_if_spent(tokens_per_call, cost_per_call)
            return Grant(0)
        grant = Grant(granted, granted * tokens_per_call, granted * cost_per_call)
        self._reserved = Grant(
            self._reserved.calls + grant.calls,
            self._reserved.tokens + grant.tokens,
            self._reserved.cost + grant.cost,
        )
        return grant

    def _say_if_spent(self, tokens_per_call: int, cost_per_call: float) -> None:
        # Only what was used counts: a budget reserved by a generation's children is not spent.
        if self.budget_spent(tokens_per_call, cost_per_call):
            self.say_once(
                "budget",
                f"LLM budget spent ({self.describe_usage()}); the LLM operators hand their "
                "children to their fallback operators for the rest of the run",
            )

    def budget_spent(self, tokens_per_call: int, cost_per_call: float) -> bool:
        """Whether not even one more such request fits, reservations aside."""
        return self._left(1, tokens_per_call, cost_per_call, Grant(0)) == 0

    def _left(self, wanted: int, tokens_per_call: int, cost_per_call: float, held: Grant) -> int:
        budget = self.config.budget
        granted = wanted
        if budget.max_calls is not None:
            granted = min(granted, budget.max_calls - self.calls - held.calls)
        if budget.max_tokens is not None:
            left = budget.max_tokens - self.tokens - held.tokens
            granted = min(granted, left // max(tokens_per_call, 1))
        if budget.max_cost is not None and cost_per_call > 0:
            left_cost = budget.max_cost - self.cost - held.cost
            granted = min(granted, int(left_cost // cost_per_call))
        return max(granted, 0)

    def settle(self, grant: Grant, calls: list[LLMCallRow]) -> None:
        """Release a child's reservation and charge what its requests really used."""
        self._reserved = Grant(
            self._reserved.calls - grant.calls,
            self._reserved.tokens - grant.tokens,
            self._reserved.cost - grant.cost,
        )
        for call in calls:
            self.calls += 1
            self.input_tokens += call.input_tokens
            self.output_tokens += call.output_tokens
            self.cost += call.cost or 0.0
        if grant.calls:
            self._say_if_spent(grant.tokens // grant.calls, grant.cost / grant.calls)

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def describe_usage(self) -> str:
        budget = self.config.budget
        parts = [
            f"{self.calls}{'/' + str(budget.max_calls) if budget.max_calls is not None else ''}"
            " requests",
            f"{self.tokens}{'/' + str(budget.max_tokens) if budget.max_tokens is not None else ''}"
            " tokens",
        ]
        if self.cost or budget.max_cost is not None:
            limit = f"/{budget.max_cost:g}" if budget.max_cost is not None else ""
            parts.append(f"${self.cost:.4f}{limit}")
        return ", ".join(parts)

    # ------------------------------------------------------------------ operator health
    def disable(self, label: str, reason: str, fallback: str) -> None:
        with self._lock:
            if label not in self.disabled:
                self.disabled[label] = reason
            reason = self.disabled[label]
        self.say_once(
            f"disabled:{label}",
            f"LLM operator `{label}` is off for the rest of the run: {reason}; its children "
            f"come from `{fallback}` instead",
        )

    def off(self, label: str) -> str | None:
        """Why ``label`` is switched off (None: it is not)."""
        with self._lock:
            return self.disabled.get(label)

    def count_child(self, label: str, error: str | None, fallback: str) -> None:
        """Count one child's requests the moment they end (any thread): a child without a
        valid reply (the provider failed after its retries, or every reply was invalid after
        the re-asks) lengthens the operator's streak, a valid reply ends it.
        ``llm.max_failures`` in a row switch the operator off at once, so its requests still
        waiting in this generation are not sent."""
        with self._lock:
            streak = self.failures.get(label, 0) + 1 if error is not None else 0
            self.failures[label] = streak
        if streak >= self.config.max_failures:
            self.disable(
                label,
                f"{streak} children in a row without a valid reply (last: {error})",
                fallback,
            )

    def tally(self, label: str, generation: int, fallback: str, outcome: tuple[str, str]) -> None:
        """Note how one child of ``label`` came about (main thread): ``(kind, detail)`` with
        kind ``valid``, ``re-asked`` (valid after re-asks) or why it fell back."""
        self._tallies.setdefault((generation, label), (fallback, []))[1].append(outcome)

    def report(self, generation: int) -> None:
        """Say, per LLM operator asked in ``generation``, how its children came about."""
        for (gen, label), (fallback, outcomes) in sorted(self._tallies.items()):
            if gen != generation:
                continue
            valid = sum(kind == "valid" for kind, _ in outcomes)
            fixed = sum(kind == "re-asked" for kind, _ in outcomes)
            parts = [f"{valid} valid"]
            if fixed:
                parts.append(f"{fixed} valid after re-asking")
            failed: dict[str, list[str]] = {}
            for kind, detail in outcomes:
                if kind not in ("valid", "re-asked"):
                    failed.setdefault(kind, []).append(detail)
            if failed:
                why = "; ".join(
                    f"{len(details)} {kind}"
                    + (f" (last: {clip(details[-1], 200, ellipsis='...')})" if details[-1] else "")
                    for kind, details in failed.items()
                )
                count = sum(len(d) for d in failed.values())
                parts.append(f"{count} fell back to `{fallback}`: {why}")
            self._say(f"generation {generation}, LLM operator `{label}`: " + ", ".join(parts))
        self._tallies = {k: v for k, v in self._tallies.items() if k[0] != generation}

    # ------------------------------------------------------------------ call log
    def recorded(self, generation: int, slot: int, label: str, attempt: int) -> LLMCallRow | None:
        if self.store is None:
            return None
        return self.store.llm_call(generation, slot, label, attempt)

    def record(self, row: LLMCallRow) -> None:
        if self.store is not None:
            self.store.add_llm_call(row)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost": self.cost,
            "disabled": dict(self.disabled),
            "failures": dict(self.failures),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))
        self.input_tokens = int(state.get("input_tokens", 0))
        self.output_tokens = int(state.get("output_tokens", 0))
        self.cost = float(state.get("cost", 0.0))
        self.disabled = dict(state.get("disabled", {}))
        self.failures = {k: int(v) for k, v in dict(state.get("failures", {})).items()}
