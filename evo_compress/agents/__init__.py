"""LLM agents for the search: provider clients (and, beside them, the LLM operators)."""

from evo_compress.agents.providers import (
    PROVIDERS,
    AnthropicClient,
    GoogleClient,
    LLMClient,
    LLMReply,
    MissingKeyError,
    OpenAIClient,
    OpenAICompatibleClient,
    Price,
    ProviderError,
    ProviderSettings,
    Usage,
    make_client,
)

__all__ = [
    "PROVIDERS",
    "AnthropicClient",
    "GoogleClient",
    "LLMClient",
    "LLMReply",
    "MissingKeyError",
    "OpenAIClient",
    "OpenAICompatibleClient",
    "Price",
    "ProviderError",
    "ProviderSettings",
    "Usage",
    "make_client",
]
