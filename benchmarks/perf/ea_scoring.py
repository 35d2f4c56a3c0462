"""ExpectedAttention's scoring time for one layer, against the scorer of an earlier commit, in one run.

    python -m benchmarks.perf.ea_scoring --seq 8192 --baseline HEAD
    python -m benchmarks.perf.ea_scoring --device cuda --seq 32768 --dtype bfloat16
    python -m benchmarks.perf.ea_scoring --device cuda --seq 32768 --dtype bfloat16 --backends
    python -m benchmarks.perf.ea_scoring --device cuda --seq 32768 --dtype bfloat16 --logits-sweep

``--backends`` compares the working tree's scorer with itself instead: its PyTorch path against its
Triton kernel (``zigzag.kernels.set_backend("ea", ...)`` before each call), the "baseline"
being the PyTorch path. ``--logits-sweep`` times only the logits step (``z`` for every key and query
head, which the kernel replaces): the PyTorch loop and the kernel at each of a few tile configurations
(``BLOCK_N, BLOCK_D, BLOCK_J, num_warps, num_stages``; ``default`` is the kernel's own choice), under
TF32, with the largest difference from the PyTorch logits relative to their largest magnitude.

The baseline is ``zigzag/scorers/expected_attention.py`` as of ``--baseline`` (read with ``git show``),
loaded as a separate module next to the working tree's. Both score the same random layer (Llama-3.1-8B
head layout by default: 32 query heads, 8 KV heads, head_dim 128, batch 1) through
:func:`zigzag.pipeline.select.score_layer`, so TF32 is on for CUDA as in the pipeline. Calls alternate between the
two so that drift (clocks, host load) hits both alike; the device is synchronised around each call.

Prints the median seconds per call of each, their ratio (baseline / working tree), the largest score
difference relative to the largest score, and the share of the top half (ratio 0.5) that both keep.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import zigzag.scorers.expected_attention as ea
from benchmarks.cli import HelpFormatter
from benchmarks.perf.revisions import import_source, source_at
from benchmarks.perf.run import median_ms
from zigzag import ExpectedAttention
from zigzag.kernels import set_backend
from zigzag.pipeline.select import score_layer
from zigzag.scorers import LayerView

SCORER_PATH = "zigzag/scorers/expected_attention.py"


def baseline_scorer_class(rev: str, path: Path | None = None) -> type:
    """``ExpectedAttention`` as of git revision ``rev`` (or from the file ``path``, for machines whose
    copy of the tree has no git history), imported under a private module name."""
    source = path.read_text() if path is not None else source_at(rev, SCORER_PATH)
    return import_source("_ea_baseline", source, tempfile.mkdtemp()).ExpectedAttention


def rope(positions: torch.Tensor, head_dim: int, theta: float = 500000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard RoPE (HF layout): positions ``(batch, n)`` to cos, sin ``(batch, n, head_dim)`` float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    freqs = positions.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def random_layer(
    seq: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> LayerView:
    """One row, no padding; queries with a non-zero mean and keys with a few large dimensions, as in Llama."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    keys = torch.randn(1, kv_heads, seq, head_dim, generator=gen)
    keys[..., : head_dim // 16] *= 8  # outlier dimensions
    values = torch.randn(1, kv_heads, seq, head_dim, generator=gen)
    q = torch.randn(1, heads, 4096, head_dim, generator=gen) * 0.7 + torch.randn(1, heads, 1, head_dim, generator=gen)
    mean = q.mean(dim=2)
    centred = q - mean[:, :, None]
    cov = centred.transpose(-1, -2) @ centred / q.shape[2]
    return LayerView(
        keys=keys.to(device=device, dtype=dtype),
        values=values.to(device=device, dtype=dtype),
        valid=torch.ones(1, seq, dtype=torch.bool, device=device),
        positions=torch.arange(seq, device=device)[None],
        scaling=head_dim**-0.5,
        layer_idx=0,
        num_layers=1,
        query_mean=mean.to(device),
        query_cov=cov.to(device),
        rope=lambda p: rope(p, head_dim),
        padded=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.ea_scoring", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--seq", type=int, default=8192, help="keys in the layer (context length)")
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    parser.add_argument("--head-dim", type=int, default=128, help="dimension of a head")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the layer")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--baseline", default="HEAD", help="git revision of the scorer to compare against")
    parser.add_argument("--baseline-file", type=Path, default=None, help="the baseline scorer's source file instead of git (None: use --baseline)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of each; the median is printed")
    parser.add_argument(
        "--backends", action="store_true", help="the working tree's torch path (baseline) against its Triton kernel"
    )
    parser.add_argument("--logits-sweep", action="store_true", help="time the logits step alone: torch, kernel configs")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    layer = random_layer(args.seq, args.heads, args.kv_heads, args.head_dim, getattr(torch, args.dtype), device)
    if args.logits_sweep:
        logits_sweep(layer, args.repeats, sync)
        return
    if args.backends:
        scorer = ExpectedAttention()
        names = {"baseline": "torch", "working tree": "triton"}

        def run(name: str) -> torch.Tensor:
            set_backend("ea", names[name])
            return score_layer(scorer, layer)

        label = "baseline (torch path) / working tree (Triton kernel)"
    else:
        scorers = {
            "baseline": baseline_scorer_class(args.baseline, args.baseline_file)(),
            "working tree": ExpectedAttention(),
        }

        def run(name: str) -> torch.Tensor:
            return score_layer(scorers[name], layer)

        label = f"baseline ({args.baseline}) / working tree"
    scores = {name: run(name) for name in ("baseline", "working tree")}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in scores}
    for _ in range(args.repeats):
        for name in scores:
            sync()
            start = time.perf_counter()
            run(name)
            sync()
            times[name].append(time.perf_counter() - start)
    set_backend("ea", "auto")

    old, new = scores["baseline"], scores["working tree"]
    keep = args.seq // 2
    kept_old = torch.zeros_like(old, dtype=torch.bool).scatter_(-1, old.topk(keep, dim=-1).indices, True)
    kept_new = torch.zeros_like(new, dtype=torch.bool).scatter_(-1, new.topk(keep, dim=-1).indices, True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"ExpectedAttention, one layer: batch 1, heads {args.heads}, kv_heads {args.kv_heads}, seq {args.seq}, "
        f"head_dim {args.head_dim}, {args.dtype} on {device} ({torch.get_num_threads()} CPU threads)"
    )
    for name, median in medians.items():
        print(f"  {name:>12}: {median * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"  ratio {label}: {medians['baseline'] / medians['working tree']:.2f}x")
    print(f"  max |score difference| / max score: {((old - new).abs().max() / old.abs().max()).item():.2e}")
    print(f"  top half kept by both: {(kept_old & kept_new).sum().item() / kept_old.sum().item():.6f}")


SWEEP_CONFIGS = [
    (64, 128, 64, 8, 2),
    (64, 128, 64, 4, 2),
    (64, 128, 128, 8, 2),
    (128, 128, 64, 8, 2),
    (64, 128, 64, 8, 3),
    (32, 128, 128, 4, 2),
]
"""Tile configurations timed by ``--logits-sweep`` for head_dim 128 (``BLOCK_N, BLOCK_D, BLOCK_J, num_warps,
num_stages``); all compile for sm_90 without spills. Other head sizes time the default only."""


def logits_sweep(layer: LayerView, repeats: int, sync) -> None:
    """Median time of the logits step alone: ExpectedAttention's PyTorch loop, then the Triton kernel at
    its default and at each of :data:`SWEEP_CONFIGS`, all with TF32 products, on the same weights."""
    from zigzag.kernels.precision import tf32_matmuls

    keys = layer.keys
    batch, kv_heads, seq, head_dim = keys.shape
    heads = layer.query_mean.shape[1]
    groups = heads // kv_heads
    gen = torch.Generator(device="cpu").manual_seed(1)
    mean = torch.randn(batch, heads, head_dim, generator=gen) * 0.1
    quad = torch.randn(batch, heads, head_dim, head_dim, generator=gen) * 0.01
    weights = ea._group_weights(mean, quad + quad.transpose(-1, -2), kv_heads).to(keys.device)
    out = torch.empty(batch, kv_heads, groups, seq, device=keys.device)
    runs = {"torch": lambda: ea._torch_logits(keys, weights, out)}
    if keys.is_cuda:
        from zigzag.kernels import ea_triton as kernel
        runs["kernel default"] = lambda: kernel.group_logits(keys, weights, out=out, precision="tf32")
        for config in SWEEP_CONFIGS if head_dim == 128 else []:
            runs[f"kernel {config}"] = lambda c=config: kernel.group_logits(
                keys, weights, out=out, precision="tf32", config=c
            )
    print(f"logits step, one layer: batch {batch}, heads {heads}, kv_heads {kv_heads}, seq {seq}, head_dim {head_dim}, "
          f"{keys.dtype} on {keys.device}, TF32")  # fmt: skip
    reference = None
    with tf32_matmuls():
        for name, fn in runs.items():
            fn()  # warm-up and compile
            sync()
            result = out.clone()
            reference = result if reference is None else reference
            ms = median_ms(fn, repeats, sync)
            error = ((result - reference).abs().max() / reference.abs().max()).item()
            print(f"  {name:>32}: {ms:8.3f} ms   max |diff| / max |torch|: {error:.1e}")


if __name__ == "__main__":
    main()
