"""The search: pymoo's NSGA-II / NSGA-III loop (``search.py``) and the parts it is made of,
one job per module: the problem's objective and constraint vectors (``problem.py``), the
first generation (``seeding.py``), breeding (``mating.py``), the known-result chain
(``evaluation.py``), the front and its hypervolume box (``archive.py``), operator credit
(``credit.py``) and the checkpoint codec (``codec.py``). ``evo_compress.app`` builds a
``Search`` from a config."""

from evo_compress.engine.problem import FAILURE_VIOLATION, failure_violation
from evo_compress.engine.search import Search

__all__ = ["FAILURE_VIOLATION", "Search", "failure_violation"]
