"""Static-shape decoding over a compressed cache: fixed buffers per layer, each step one CUDA graph.

* :mod:`zigzag.static.cache`: :class:`StaticZigZagCache`, a compressed cache copied into buffers of
  its budget plus headroom, written in place;
* :mod:`zigzag.static.attention`: exact attention over those buffers, as a transformers attention
  implementation;
* :mod:`zigzag.static.decoder`: :class:`StaticDecoder`, greedy generation with the step captured (and
  optionally compiled).
"""

from zigzag.static.cache import StaticLayer, StaticZigZagCache
from zigzag.static.decoder import StaticDecoder

__all__ = ["StaticDecoder", "StaticLayer", "StaticZigZagCache"]
