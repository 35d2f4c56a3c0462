"""The window's attention mass for one layer: PyTorch path against the Triton kernel, in one run.

    python -m benchmarks.perf.window_mass --device cuda --seq 32768
    python -m benchmarks.perf.window_mass --device cuda --seq 32768 --sweep

:func:`zigzag.scorers.window_mass_sum` is what SnapKV scores and ZigZag's LMBA is measured on: the
softmax attention of the last ``--window`` queries over every key, summed over those queries. Both
backends (``zigzag.kernels.set_backend("mass", ...)``) run on the same random layer (Llama-3.1-8B head layout
by default: 32 query heads, 8 KV heads, head_dim 128, batch 1, bfloat16), under TF32 as in the
pipeline, alternating so that drift hits both; the device is synchronised around each call.

Prints the median milliseconds per call of each, their ratio, and the largest difference between
the two results (the masses of a query sum to 1). ``--sweep`` also times the kernel at a few tile
configurations ``(W, BLOCK_R, BLOCK_N, BLOCK_D, num_warps)`` (``default`` is the kernel's own choice).
On a CPU without ``TRITON_INTERPRET=1`` only the PyTorch path runs.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.cli import HelpFormatter
from benchmarks.perf.run import median_ms
from zigzag.kernels import set_backend
from zigzag.kernels.precision import tf32_matmuls
from zigzag.kernels.switch import triton_runs_on
from zigzag.scorers import window_mass_sum

SWEEP = [None, (64, 256, 64, 128, 8), (64, 128, 32, 128, 4), (64, 128, 64, 128, 4), (64, 128, 128, 128, 8), (64, 64, 64, 128, 4)]


def _warm_median(fn, repeats: int, sync) -> float:
    fn()  # compile, allocator pools
    return median_ms(fn, repeats, sync)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.window_mass", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--seq", type=int, default=32768, help="keys in the layer (context length)")
    parser.add_argument("--window", type=int, default=64, help="last queries whose attention mass is summed")
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    parser.add_argument("--head-dim", type=int, default=128, help="dimension of a head")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="dtype of the keys")
    parser.add_argument("--query-dtype", default="float32", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the queries (the pipeline's window queries are float32)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per backend; the median is printed")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel at a few tile configurations")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    # keys as the model caches them: a (batch, seq, kv_heads, head_dim) projection seen transposed
    keys = (torch.randn(1, args.seq, args.kv_heads, args.head_dim, generator=gen) * 2).to(device, dtype).transpose(1, 2)
    queries = torch.randn(1, args.heads, args.window, args.head_dim, generator=gen).to(device, getattr(torch, args.query_dtype))
    valid = torch.ones(1, args.seq, dtype=torch.bool, device=device)
    scaling = args.head_dim**-0.5
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"window mass: {name}, torch {torch.__version__}, seq {args.seq}, window {args.window}, "
          f"{args.heads}/{args.kv_heads} heads, head_dim {args.head_dim}, keys {args.dtype}, queries {args.query_dtype}")

    def run(backend: str, config=None) -> torch.Tensor:
        with tf32_matmuls():
            if config is not None:
                from zigzag.kernels.mass_triton import window_mass_sum as kernel

                return kernel(queries, keys, None, scaling, precision="tf32", config=config)
            set_backend("mass", backend)
            return window_mass_sum(queries, keys, valid, scaling, padded=False)

    reference = run("torch")
    torch_ms = _warm_median(lambda: run("torch"), args.repeats, sync)
    print(f"torch path: {torch_ms:.3f} ms")
    if triton_runs_on(device):
        for config in SWEEP if args.sweep else [None]:
            try:
                out = run("triton", config)
            except Exception as error:  # noqa: BLE001 - a tile that does not fit (shared memory, registers)
                print(f"kernel {config}: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
                continue
            ms = _warm_median(lambda config=config: run("triton", config), args.repeats, sync)
            err = (out - reference).abs().max().item()
            print(f"kernel {config or 'default'}: {ms:.3f} ms, {torch_ms / ms:.2f}x faster, max |difference| {err:.2e}")
    set_backend("mass", "auto")


if __name__ == "__main__":
    main()
