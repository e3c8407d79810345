"""Test doubles of evo-compress, kept out of its wheel: users never need them.

- ``evo_compress_doubles.vllm_server``: a CPU stand-in for ``vllm serve`` that speaks its
  OpenAI-compatible API and /metrics (``python -m evo_compress_doubles.vllm_server MODEL``).
- ``evo_compress_doubles.providers``: a fake LLM provider on 127.0.0.1 speaking the OpenAI,
  Anthropic and Google wire formats, with scripted and recorded replies.

``make setup`` installs this distribution (``pip install -e ./doubles``) beside evo-compress
for the tests and benchmarks. Plugin authors' contract suites stay in ``evo_compress.testing``.
"""
