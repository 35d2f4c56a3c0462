"""Expected Attention: the attention that future queries are expected to pay, from query statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.kernels.precision import tf32_matmuls_enabled
from zigzag.kernels.switch import kernel_switch
from zigzag.scorers.base import LayerView, Scorer
from zigzag.scorers.window import group_mean, raise_protected

_CHUNK = 4096  # keys per step of the quadratic term; bounds memory at heads * _CHUNK * head_dim floats

_SWITCH = kernel_switch("ea")
"""The ``"ea"`` kernel switch (``zigzag.kernels.set_backend("ea", ...)``, ``ZIGZAG_EA_BACKEND``):
the Triton logits kernel or :func:`_torch_logits`, the reference."""


def _use_kernel(keys: torch.Tensor) -> bool:
    """Whether the ``"ea"`` switch sends ``keys`` to the Triton kernel. ``"auto"`` also leaves to
    PyTorch what the kernel does not take (other dtypes, head_dim > 256, a grid too tall)."""
    batch, kv_heads, _, head_dim = keys.shape
    supported = keys.dtype in (torch.float16, torch.bfloat16, torch.float32) and head_dim <= 256 and batch * kv_heads < 2**16
    return _SWITCH.use_kernel(keys.device, supported)


@dataclass
class ExpectedAttention(Scorer):
    """Score each token by the attention that the next ``n_future`` queries are expected to give it.

    Paper: https://arxiv.org/abs/2510.00636 ("Expected Attention", NVIDIA kvpress, 2025).

    Future queries are modelled as Gaussian, ``q ~ N(mu, S)`` per query head, from the mean and
    covariance of the pre-RoPE queries of the prompt (``layer.query_mean``, ``layer.query_cov``;
    the pipeline skips the first ``n_sink`` tokens, see ``query_stats_skip``). Their RoPE rotation
    is averaged over the next ``n_future`` positions of each row (``last + 1 .. last + n_future``,
    ``last`` the row's largest position): with ``cos``/``sin`` from ``layer.rope`` (HF convention
    ``x_rot = x * cos + rotate_half(x) * sin``), ``Rbar x = x * mean(cos) + rotate_half(x) * mean(sin)``,
    a ``(head_dim, head_dim)`` matrix per row. The logit of key ``k`` (cached, post-RoPE) is the log
    of the Gaussian moment generating function::

        z = (Rbar mu) . k * scaling + k^T (Rbar S Rbar^T) k * scaling**2 / 2

    (with ``scaling = head_dim ** -0.5``: ``(Rbar mu).k / sqrt(d) + k^T Rbar S Rbar^T k / (2 d)``).
    ``z`` goes through a softmax over the valid tokens of the row (float32), the probabilities are
    averaged over the query heads of each KV group, and, if ``use_vnorm``, the score is
    ``(p + epsilon) * ||v||``. The first ``n_sink`` tokens (positions ``< n_sink``) are lifted
    above every other token (always kept). Memory: about ``heads * min(seq, 4096) * head_dim`` floats at once
    on the PyTorch path; for CUDA keys a Triton kernel (:mod:`zigzag.kernels.ea_triton`, see
    the ``"ea"`` switch of :mod:`zigzag.kernels`) computes ``z`` from the keys in place and needs
    only the logits.

    Parameters
    ----------
    n_future:
        Number of future positions the RoPE rotation is averaged over.
    n_sink:
        Leading tokens kept unconditionally and left out of the query statistics.
    epsilon:
        Added to the probability before weighting by ``||v||`` (only with ``use_vnorm``).
    use_vnorm:
        Multiply by the L2 norm of the value (a token's output contribution scales with it).
    """

    n_future: int = 512
    n_sink: int = 4
    epsilon: float = 1e-2
    use_vnorm: bool = True

    name: ClassVar[str] = "expected_attention"
    query_window: ClassVar[int] = 0
    needs_query_stats: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.n_future < 1:
            raise ValueError(f"n_future must be >= 1 (future positions averaged over); got {self.n_future}")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0 (number of sink tokens kept); got {self.n_sink}")
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0; got {self.epsilon}")

    @property
    def query_stats_skip(self) -> int:
        """Leading valid tokens left out of the query statistics: the sinks."""
        return self.n_sink

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return Expected Attention scores.

        Args:
            layer: the layer; reads ``keys``/``values: (batch, kv_heads, seq, head_dim)``,
                ``valid``/``positions: (batch, seq)``, ``query_mean: (batch, heads, head_dim)``,
                ``query_cov: (batch, heads, head_dim, head_dim)``, ``rope`` and ``scaling``.

        Returns:
            ``(batch, kv_heads, seq)`` float32; higher means keep.
        """
        if layer.query_mean is None or layer.query_cov is None or layer.rope is None:
            raise ValueError(
                "ExpectedAttention needs LayerView.query_mean, query_cov and rope (needs_query_stats=True); "
                "got None"
            )
        keys = layer.keys
        batch, kv_heads, seq, _ = keys.shape
        device = keys.device
        heads = layer.query_mean.shape[1]
        if heads % kv_heads != 0:
            raise ValueError(f"query heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        groups = heads // kv_heads
        valid = layer.valid.to(device=device, dtype=torch.bool)

        rbar = self._mean_rotation(layer, valid)  # (batch, d, d)
        mu = layer.query_mean.to(device=device, dtype=torch.float32)
        cov = layer.query_cov.to(device=device, dtype=torch.float32)
        mean = torch.einsum("bij,bhj->bhi", rbar, mu) * layer.scaling  # (batch, heads, d)
        quad = rbar[:, None] @ cov @ rbar[:, None].transpose(-1, -2) * (layer.scaling**2 / 2)  # (batch, heads, d, d)
        weights = _group_weights(mean, quad, kv_heads)  # (batch, kv_heads, d, groups * d + groups)

        # Per key k (a row) and query head h of its group: z = (k Q_h) . k + m_h . k, Q_h = quad, m_h = mean.
        logits = torch.empty(batch, kv_heads, groups, seq, device=device, dtype=torch.float32)
        if _use_kernel(keys):
            # TF32 products exactly when the torch path's float32 matmul would use them.
            precision = "tf32" if keys.is_cuda and tf32_matmuls_enabled() else "ieee"
            from zigzag.kernels.ea_triton import group_logits  # imports triton: on first use only

            group_logits(keys, weights, out=logits, precision=precision)
        else:
            _torch_logits(keys, weights, logits)
        logits = logits.view(batch, heads, seq).masked_fill(~valid[:, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        probs = torch.where(valid[:, None, :], probs, torch.zeros((), device=device))  # all-padded rows
        scores = group_mean(probs, kv_heads)  # (batch, kv_heads, seq)
        if self.use_vnorm:
            vnorm = torch.linalg.vector_norm(layer.values, dim=-1, dtype=torch.float32)
            scores = (scores + self.epsilon) * vnorm
        sinks = valid & (layer.positions.to(device) < self.n_sink)
        return raise_protected(scores, sinks, valid)

    def _mean_rotation(self, layer: LayerView, valid: torch.Tensor) -> torch.Tensor:
        """RoPE rotation averaged over the next ``n_future`` positions of each row: ``(batch, d, d)`` float32."""
        device = layer.keys.device
        head_dim = layer.keys.shape[-1]
        positions = layer.positions.to(device=device, dtype=torch.long)
        last = positions.masked_fill(~valid, -1).amax(dim=-1)  # (batch,); -1 for an all-padded row
        future = last[:, None] + torch.arange(1, self.n_future + 1, device=device)  # (batch, n_future)
        cos, sin = layer.rope(future)
        if cos.shape[-1] != head_dim:
            raise ValueError(
                f"rope must return cos/sin over the full head_dim ({head_dim}); got {cos.shape[-1]} "
                "(partial rotary embeddings are not supported)"
            )
        cos = cos.to(device=device, dtype=torch.float32).mean(dim=1)  # (batch, d)
        sin = sin.to(device=device, dtype=torch.float32).mean(dim=1)
        # rotate_half(x) = cat(-x2, x1) = P x with P = [[0, -I], [I, 0]].
        half = head_dim // 2
        eye = torch.eye(half, device=device)
        rotate_half = torch.zeros(head_dim, head_dim, device=device)
        rotate_half[:half, half:] = -eye
        rotate_half[half:, :half] = eye
        return torch.diag_embed(cos) + sin[:, :, None] * rotate_half  # Rbar = diag(cos) + diag(sin) P


def _torch_logits(keys: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor) -> None:
    """Fill ``logits`` with ``z = k Q_h . k + m_h . k`` in chunks of keys: the reference for the kernel.

    Args:
        keys: ``(batch, kv_heads, seq, head_dim)``, any float dtype and strides.
        weights: ``(batch, kv_heads, head_dim, groups * head_dim + groups)`` float32 (:func:`_group_weights`).
        logits: ``(batch, kv_heads, groups, seq)`` float32, written in place.
    """
    batch, kv_heads, seq, head_dim = keys.shape
    groups = logits.shape[2]
    # The matmul gives every k Q_h and m_h . k of the group at once; a batched dot product with k
    # (one tiny bmm per key) finishes it. The only full-size intermediate, y, is written once and
    # read once, where k Q_h followed by (k Q_h * k).sum(-1) wrote and read it twice more. The group
    # average cannot join the small matrices: each query head has its own softmax over the keys.
    quad_width = groups * head_dim
    for start in range(0, seq, _CHUNK):
        # float32 (TF32 under the pipeline): rounding Q_h to bfloat16 for a half-precision matmul
        # would cost 8x TF32's error. contiguous(): a chunk of float32 keys is a strided slice, and
        # the views below merge (batch, kv_heads, c) into one batch dimension.
        k = keys[:, :, start : start + _CHUNK].to(torch.float32).contiguous()  # (batch, kv_heads, c, d)
        c = k.shape[2]
        n = batch * kv_heads * c
        y = torch.matmul(k, weights)  # (batch, kv_heads, c, groups * d + groups)
        k_quad = y[..., :quad_width].reshape(n, groups, head_dim)  # views: row h is k Q_h
        k_mean = y[..., quad_width:].reshape(n, 1, groups)  # m_h . k
        z = torch.baddbmm(k_mean, k.view(n, 1, head_dim), k_quad.transpose(1, 2))  # (n, 1, groups)
        logits[..., start : start + c] = z.view(batch, kv_heads, c, groups).transpose(-1, -2)


def _group_weights(mean: torch.Tensor, quad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per KV head, the matrix that maps a key to every ``k Q_h`` and ``m_h . k`` of its query group.

    Query head ``h`` belongs to kv head ``h // groups``; within the group the blocks follow the query heads.

    Args:
        mean: ``(batch, heads, head_dim)`` float32, the linear coefficients ``m_h``.
        quad: ``(batch, heads, head_dim, head_dim)`` float32, the quadratic forms ``Q_h``.
        kv_heads: number of kv heads; ``heads`` is a multiple of it.

    Returns:
        ``(batch, kv_heads, head_dim, groups * head_dim + groups)`` float32:
        ``[Q_1 | Q_2 | ... | Q_groups | m_1 ... m_groups]``, so that for a key row ``k``,
        ``k @ W = [k Q_1, ..., k Q_groups, m_1 . k, ..., m_groups . k]``.
    """
    batch, heads, head_dim = mean.shape
    groups = heads // kv_heads
    quad = quad.reshape(batch, kv_heads, groups, head_dim, head_dim).transpose(2, 3)  # (b, kv, d, groups, d)
    quad = quad.reshape(batch, kv_heads, head_dim, groups * head_dim)
    mean = mean.reshape(batch, kv_heads, groups, head_dim).transpose(2, 3)  # (b, kv, d, groups)
    return torch.cat([quad, mean], dim=-1)
