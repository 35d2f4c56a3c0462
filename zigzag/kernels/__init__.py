"""Optional Triton kernels and the one switch that chooses between each and its PyTorch reference.

Nothing here imports other zigzag code: scorers, merge, cache and pipeline import from here. Triton is
imported only when a kernel is first used (:mod:`zigzag.kernels.switch`).
"""
