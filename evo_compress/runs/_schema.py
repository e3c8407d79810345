"""The run store's schema: its tables, and the versioned migrations that build them.

A store is built by applying every migration in turn, and an older store is upgraded by
applying those newer than its ``schema_version`` (like Optuna's ``storages/_rdb`` models and
alembic versions). Each migration is a list of single SQL statements, never a script to split.
The statements' text is what SQLite keeps in ``sqlite_master``: changing a comment in one
changes the file that stores are written as, so they are kept as they were first released.
"""

from __future__ import annotations

# 2: the llm_calls and credits tables (added to a version-1 store when it is opened).
SCHEMA_VERSION = 3

META = """\
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)"""

INDIVIDUALS = """\
CREATE TABLE IF NOT EXISTS individuals (
    id INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,          -- -1: the baseline reference, 0: initial population
    slot INTEGER NOT NULL,                -- position among the generation's offspring
    hash TEXT NOT NULL,                   -- SHA-256 of the canonical recipe JSON
    recipe TEXT NOT NULL,                 -- canonical recipe JSON (dotted gene names)
    parents TEXT NOT NULL,                -- JSON list of individual ids
    operators TEXT NOT NULL,              -- JSON list of operator names that made it
    created_at REAL NOT NULL,
    UNIQUE (generation, slot)
)"""

INDIVIDUALS_HASH = """\
CREATE INDEX IF NOT EXISTS individuals_hash ON individuals (hash)"""

EVALUATIONS = """\
CREATE TABLE IF NOT EXISTS evaluations (
    individual_id INTEGER PRIMARY KEY REFERENCES individuals (id),
    status TEXT NOT NULL,                 -- ok | failed | infeasible
    objectives TEXT,                      -- JSON {accuracy, latency, memory, energy, co2}
    reason TEXT,                          -- why it failed or is infeasible
    source TEXT NOT NULL,                 -- evaluated | cache | run (reused within this run)
    duration_s REAL NOT NULL,             -- of the original evaluation
    finished_at REAL NOT NULL,
    metadata TEXT NOT NULL                -- JSON: how each value was obtained
)"""

CHECKPOINTS = """\
CREATE TABLE IF NOT EXISTS checkpoints (
    generation INTEGER PRIMARY KEY,
    population TEXT NOT NULL,             -- JSON list of {id, rank, crowding, cv, ...}
    algorithm_state TEXT NOT NULL,        -- JSON: RNG state, iteration, survival state
    operator_state TEXT NOT NULL,         -- JSON per operator
    stats TEXT NOT NULL,                  -- JSON: hypervolume, front size, counts
    created_at REAL NOT NULL
)"""

LLM_CALLS = """\
CREATE TABLE IF NOT EXISTS llm_calls (
    id INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,          -- the generation the child is for (0 for seeding)
    slot INTEGER NOT NULL,                -- the offspring slot (-1 for seeding)
    operator TEXT NOT NULL,               -- the operator's label
    attempt INTEGER NOT NULL,             -- 0, then 1, 2 for re-asks after an invalid reply
    role TEXT NOT NULL,                   -- mutation | crossover | seed
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,            -- SHA-256 of the system prompt, prompt and schema
    prompt TEXT NOT NULL,                 -- JSON {system, user}
    reply TEXT,                           -- the reply text (null when the provider failed)
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost REAL,                            -- USD, where a price is configured
    latency_s REAL NOT NULL,
    transport_attempts INTEGER NOT NULL,  -- HTTP attempts (retries on 429, 5xx, timeouts)
    outcome TEXT NOT NULL,                -- valid | invalid (re-asked) | fallback
    error TEXT,                           -- the validation or provider error
    rationale TEXT,
    confidence REAL,
    created_at REAL NOT NULL,
    UNIQUE (generation, slot, operator, attempt)
)"""

CREDITS = """\
CREATE TABLE IF NOT EXISTS credits (
    individual_id INTEGER PRIMARY KEY REFERENCES individuals (id),
    generation INTEGER NOT NULL,
    operators TEXT NOT NULL,              -- JSON list of the operators drawn for the child
    feasible INTEGER NOT NULL,
    dominated_parent INTEGER NOT NULL,    -- it dominates (constrained) at least one parent
    entered_front INTEGER NOT NULL,       -- it is on the run's front after its generation
    hv_contribution REAL,                 -- hypervolume the front loses without it (null:
                                          -- not worked out, no selector had a choice)
    reward REAL NOT NULL                  -- what adaptive operator selection was credited
)"""

LLM_CHILDREN = """\
CREATE TABLE IF NOT EXISTS llm_children (
    individual_id INTEGER PRIMARY KEY REFERENCES individuals (id),
    request_slot INTEGER NOT NULL         -- the llm_calls slot of the request it came from,
                                          -- where that is not its own slot (a screened
                                          -- generation: one request proposes several)
)"""

# Every table by name, in the order the migrations create them.
TABLES: dict[str, str] = {
    "meta": META,
    "individuals": INDIVIDUALS,
    "evaluations": EVALUATIONS,
    "checkpoints": CHECKPOINTS,
    "llm_calls": LLM_CALLS,
    "credits": CREDITS,
    "llm_children": LLM_CHILDREN,
}

# (version, statements): what turns a store of the version before into one of this version.
# Only ever append: a released migration is what older stores were upgraded with.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (META, INDIVIDUALS, INDIVIDUALS_HASH, EVALUATIONS, CHECKPOINTS)),
    (2, (LLM_CALLS, CREDITS)),
    (3, (LLM_CHILDREN,)),
)
assert MIGRATIONS[-1][0] == SCHEMA_VERSION

# The whole schema as one script, for ``sqlite3`` users and tests (the store never splits it).
SCHEMA = "".join(f"\n{statement};" for _, statements in MIGRATIONS for statement in statements)

LLM_CALL_COLUMNS = (
    "generation",
    "slot",
    "operator",
    "attempt",
    "role",
    "provider",
    "model",
    "prompt_hash",
    "prompt",
    "reply",
    "input_tokens",
    "output_tokens",
    "cost",
    "latency_s",
    "transport_attempts",
    "outcome",
    "error",
    "rationale",
    "confidence",
)
CREDIT_COLUMNS = (
    "individual_id",
    "generation",
    "operators",
    "feasible",
    "dominated_parent",
    "entered_front",
    "hv_contribution",
    "reward",
)


def statements_after(version: int) -> list[str]:
    """The statements that upgrade a store of schema ``version`` to ``SCHEMA_VERSION``, in
    order (every statement for a new store, ``version`` 0)."""
    return [s for v, statements in MIGRATIONS if v > version for s in statements]


def temporary(statement: str) -> str:
    """``statement`` (a CREATE TABLE) creating a temporary table instead: it lives in one
    connection only and is never written to the store."""
    return statement.replace("CREATE TABLE", "CREATE TEMP TABLE", 1)
