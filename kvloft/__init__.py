"""kvloft: long-context LLM decoding with a tiered KV cache and attention-aware retrieval."""

from kvloft.config import CacheConfig, ModelConfig, RetrievalConfig, RuntimeConfig
from kvloft.runtime.engine import Engine
from kvloft.runtime.loader import Model, load_model, load_tokenizer
from kvloft.runtime.numerics import NonFiniteError
from kvloft.runtime.session import Session
from kvloft.version import __version__ as __version__

__all__ = [
    "CacheConfig",
    "Engine",
    "Model",
    "ModelConfig",
    "NonFiniteError",
    "RetrievalConfig",
    "RuntimeConfig",
    "Session",
    "load_model",
    "load_tokenizer",
]
