"""zigzag: KV-cache compression for Hugging Face transformers.

>>> from zigzag import compress_cache  # doctest: +SKIP
>>> cache = compress_cache(model, tok(context, return_tensors="pt"), ratio=0.75)  # doctest: +SKIP
"""

from zigzag.api import compress_cache, prefill_context
from zigzag.budget import BUDGETS, AdaKV, BudgetAllocator, Pyramid, Uniform, ZigZag, ZigZagHeads, get_budget
from zigzag.cache import CompressedLayer, VarlenLayer, ZigZagCache
from zigzag.merge import CosineMerge, get_merge
from zigzag.pipeline.decoding import Decoding
from zigzag.pipeline.full import Prefill
from zigzag.pipeline.hf import UnsupportedModelError, cache_kwarg
from zigzag.scorers import (
    SCORERS,
    TOVA,
    ExpectedAttention,
    HeadShared,
    Knorm,
    KVzip,
    Protected,
    RandomScorer,
    Reconstruction,
    Scorer,
    SnapKV,
    SpanPooled,
    StreamingLLM,
    get_scorer,
)
from zigzag.testing.models import load_model, load_smollm2

__all__ = [
    "BUDGETS",
    "SCORERS",
    "TOVA",
    "AdaKV",
    "BudgetAllocator",
    "CompressedLayer",
    "CosineMerge",
    "Decoding",
    "ExpectedAttention",
    "HeadShared",
    "KVzip",
    "Knorm",
    "Prefill",
    "Protected",
    "Pyramid",
    "RandomScorer",
    "Reconstruction",
    "Scorer",
    "SnapKV",
    "SpanPooled",
    "StreamingLLM",
    "Uniform",
    "UnsupportedModelError",
    "VarlenLayer",
    "ZigZag",
    "ZigZagCache",
    "ZigZagHeads",
    "cache_kwarg",
    "compress_cache",
    "get_budget",
    "get_merge",
    "get_scorer",
    "load_model",
    "load_smollm2",
    "prefill_context",
]
__version__ = "0.1.0"
