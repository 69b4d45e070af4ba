"""kvloft: long-context LLM decoding with a tiered KV cache and attention-aware retrieval."""

from kvloft.config import CacheConfig, ModelConfig, RetrievalConfig, RuntimeConfig

__all__ = ["CacheConfig", "ModelConfig", "RetrievalConfig", "RuntimeConfig"]
__version__ = "0.1.0"
