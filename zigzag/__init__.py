"""zigzag: KV-cache compression for Hugging Face transformers.

>>> from zigzag import compress_cache  # doctest: +SKIP
>>> cache = compress_cache(model, tok(context, return_tensors="pt"), ratio=0.75)  # doctest: +SKIP
"""

from zigzag.api import Prefill, UnsupportedModelError, prefill_context
from zigzag.budget import BUDGETS, Pyramid, Uniform, ZigZag, get_budget
from zigzag.cache import CompressedLayer, ZigZagCache
from zigzag.testing.models import load_model, load_smollm2
from zigzag.scorers import (
    SCORERS,
    TOVA,
    ExpectedAttention,
    Knorm,
    RandomScorer,
    SnapKV,
    SpanPooled,
    StreamingLLM,
    get_scorer,
)
from zigzag.streaming import compress_cache

__all__ = [
    "BUDGETS",
    "SCORERS",
    "TOVA",
    "CompressedLayer",
    "ExpectedAttention",
    "Knorm",
    "Prefill",
    "Pyramid",
    "RandomScorer",
    "SnapKV",
    "SpanPooled",
    "StreamingLLM",
    "Uniform",
    "UnsupportedModelError",
    "ZigZag",
    "ZigZagCache",
    "compress_cache",
    "get_budget",
    "get_scorer",
    "load_model",
    "load_smollm2",
    "prefill_context",
]
__version__ = "0.1.0"
