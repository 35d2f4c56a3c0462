"""Optional Triton kernels and the one switch that chooses between each and its PyTorch reference.

Every kernel has a switch (:mod:`zigzag.kernels.switch`) set to ``"auto"`` (the kernel for CUDA
tensors it supports when ``triton`` imports, else the reference), ``"torch"`` (the reference always,
for A/B timings) or ``"triton"`` (the kernel always: CUDA, or CPU tensors under
``TRITON_INTERPRET=1``). Choose with ``zigzag.kernels.set_backend(kernel, name)``, for a block with
``zigzag.kernels.using(kernel, name)``, or before import with the kernel's environment variable:

* ``ea`` (``ZIGZAG_EA_BACKEND``): ExpectedAttention's logits, :mod:`~zigzag.kernels.ea_triton`
  (operator ``zigzag::ea_group_logits``); reference ``zigzag.scorers.expected_attention._torch_logits``.
* ``mass`` (``ZIGZAG_MASS_BACKEND``): the window's attention mass per key,
  :mod:`~zigzag.kernels.mass_triton` (``zigzag::window_mass_sum``); reference
  ``zigzag.scorers.window_attention`` summed over the window.
* ``moments`` (``ZIGZAG_MOMENTS_BACKEND``): shifted second moments of the queries,
  :mod:`~zigzag.kernels.moments_triton` (``zigzag::shifted_second_moment``); reference the shifted
  copy and batched matmul in :func:`~zigzag.kernels.moments.query_moments_half`.
* ``gather`` (``ZIGZAG_GATHER_BACKEND``): the kept keys and values, :mod:`~zigzag.kernels.gather_triton`
  (``zigzag::gather_split``); reference :func:`~zigzag.kernels.gather.gather_split_torch`.
* ``merge`` (``ZIGZAG_MERGE_BACKEND``): merge-on-evict's cosine best match,
  :mod:`~zigzag.kernels.merge_triton` (``zigzag::cosine_best_match``); reference
  ``zigzag.merge.chunked.best_match_torch``.
* ``varlen`` (``ZIGZAG_VARLEN_BACKEND``): attention over head-wise (varlen) layers,
  :mod:`~zigzag.kernels.varlen_triton` (``zigzag::varlen_attention``); reference
  ``zigzag.cache.varlen.segment_attention`` (``"segment"`` is accepted for ``"torch"``).

Each kernel's launch is a ``torch.library.custom_op`` under the ``zigzag::`` namespace with a fake
implementation, so that torch.compile traces through it (tests check each with
``torch.library.opcheck``). The varlen kernel's eager calls skip its operator, whose dispatch costs
more host time than the launch on the decoding path (:func:`zigzag.kernels.varlen_triton.attend`).

Nothing here imports other zigzag code (scorers, merge, cache and pipeline import from here), and
triton is imported only when a kernel is first used.
"""

from zigzag.kernels.switch import KERNEL_BACKENDS, SWITCHES, get_backend, kernel_switch, set_backend, using

__all__ = ["KERNEL_BACKENDS", "SWITCHES", "get_backend", "kernel_switch", "set_backend", "using"]
