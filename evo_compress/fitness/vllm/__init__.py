"""The vLLM back end: compile a recipe into a checkpoint and engine arguments, serve it with
vLLM under a guard that leaves no orphan, and measure it through the OpenAI-compatible API.

``compile.py`` (recipe -> engine arguments), ``checkpoint.py`` (weights, cached),
``server.py`` + ``_guard.py`` (the server process), ``client.py`` (latency, ``/metrics``),
``accuracy.py`` (lm-eval against the server), ``evaluator.py`` (the ``vllm`` evaluator).
``quantize_job.py`` runs in vLLM's own environment; ``evo_compress_doubles.vllm_server``
is a CPU stand-in for tests.
"""

from evo_compress.fitness.vllm.compile import (
    QuantStep,
    ServePlan,
    VLLMCapabilities,
    compile_recipe,
    unsupported_reason,
)
from evo_compress.fitness.vllm.evaluator import VLLMEvaluator, VLLMSettings
from evo_compress.fitness.vllm.server import ServerError, ServerSpec, VLLMServer

__all__ = [
    "QuantStep",
    "ServePlan",
    "ServerError",
    "ServerSpec",
    "VLLMCapabilities",
    "VLLMEvaluator",
    "VLLMServer",
    "VLLMSettings",
    "compile_recipe",
    "unsupported_reason",
]
