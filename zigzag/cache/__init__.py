"""The compressed cache: ragged per-layer storage that stock attention reads exactly.

* :mod:`zigzag.cache.layer`: what every compressed layer shares (lengths, mask sizes, crop, batch selection);
* :mod:`zigzag.cache.dense`: :class:`CompressedLayer`, heads padded to the layer's widest budget;
* :mod:`zigzag.cache.varlen`: :class:`VarlenLayer`, head-wise budgets stored flat, and its attention;
* :mod:`zigzag.cache.attention`: exact attention over a compressed layer under the model's SDPA or eager code;
* :mod:`zigzag.cache.zigzag_cache`: :class:`ZigZagCache`, the cache of such layers.
"""

from zigzag.cache.dense import CompressedLayer
from zigzag.cache.layer import CompressedLayerBase
from zigzag.cache.varlen import VarlenLayer
from zigzag.cache.zigzag_cache import ZigZagCache

__all__ = ["CompressedLayer", "CompressedLayerBase", "VarlenLayer", "ZigZagCache"]
