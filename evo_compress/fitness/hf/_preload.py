"""Imported once by the evaluation forkserver: the heavy libraries, quietly."""

from __future__ import annotations

from evo_compress.fitness.model._quiet import quiet_output

with quiet_output():
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import evo_compress.fitness.hf.pipeline  # noqa: F401
