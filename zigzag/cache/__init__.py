"""The compressed cache: ragged per-layer storage that stock attention reads exactly."""

from zigzag.cache.dense import CompressedLayer, ZigZagCache, random_cache
from zigzag.cache.varlen import VarlenLayer

__all__ = ["CompressedLayer", "VarlenLayer", "ZigZagCache", "random_cache"]
