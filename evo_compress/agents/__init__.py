"""LLM agents for the search: provider clients, the session, prompts and reply validation.
The LLM operators that use them are ``evo_compress.operators.llm``."""

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
    settings_error,
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
    "settings_error",
]
