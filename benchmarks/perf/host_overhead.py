"""Host time of one layer's attention at a decoding step, by component (Llama-3.1-8B layer shape).

    python -m benchmarks.perf.host_overhead --slots 1024 --calls 2000

Decoding an 8B model at small batch is bound by the host, so what a layer's attention costs in Python
and launches decides decode speed. With a short cache (``--slots`` per KV head) the GPU work of each
call is a few microseconds, every call below is bound by the host, and the time per call over a long
loop (synchronised once at the end) is its host cost:

* ``sdpa``: one dense ``scaled_dot_product_attention`` launch (GQA), the floor;
* ``dense layer step``: a uniform-budget :class:`~zigzag.cache.CompressedLayer`'s ``update`` then SDPA
  through its key subclass, as the model calls them;
* ``varlen layer step``: the same on a head-wise :class:`~zigzag.varlen.VarlenLayer` (Triton kernel);
* ``varlen_attention``: the kernel's Python wrapper alone, and ``triton launch`` / ``direct launch``:
  the kernel launched through ``JITFunction.run`` or through the cached launcher
  (:func:`zigzag.varlen_kernel.launch`) with the same arguments.

Prints one table of microseconds per call (median of ``--repeats`` loops).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from zigzag.cache import CompressedLayer
from zigzag.varlen import VarlenLayer


def per_call_us(fn, calls: int, repeats: int, sync) -> float:
    """Median over ``repeats`` loops of ``calls`` calls of ``fn``: microseconds per call."""
    fn()
    sync()
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        results.append(1e6 * (time.perf_counter() - start) / calls)
    return statistics.median(results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=1024, help="cached tokens per KV head")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda; cpu runs the kernel in Triton's interpreter (checks the script)")
    args = parser.parse_args(argv)
    import zigzag.varlen_kernel as vk

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    heads, kv_heads, d, n = 32, 8, 128, args.slots
    gen = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)
    query = rand(1, 1, heads, d).transpose(1, 2)  # (1, Hq, 1, d) as transformers hands it over
    step_k, step_v = rand(1, kv_heads, 1, d), rand(1, kv_heads, 1, d)
    dense_k, dense_v = rand(1, kv_heads, n, d), rand(1, kv_heads, n, d)
    positions = torch.arange(n, device=device).expand(1, kv_heads, n)
    dense = CompressedLayer(dense_k, dense_v, positions, n)
    lengths = torch.full((1, kv_heads), n, device=device)
    lengths[0, 0], lengths[0, 1] = n // 2, n + n // 2  # head-wise: different lengths, same total
    total = int(lengths.sum())
    varlen = VarlenLayer(rand(total, d), rand(total, d), torch.arange(total, device=device), lengths, n)

    def layer_step(layer):
        keys, values = layer.update(step_k, step_v)
        F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)
        if layer.appended >= 64:
            layer.crop(-layer.appended)

    varlen.update(step_k, step_v)
    tail_k, tail_v = varlen.keys, varlen.values
    wrapper = lambda: vk.varlen_attention(
        query, varlen.prefix_keys, varlen.prefix_values, varlen.offsets, None, kv_heads=kv_heads,
        width=varlen.width, scale=d**-0.5, tail_keys=tail_k, tail_values=tail_v, return_lse=False,
    )  # fmt: skip
    captured = {}
    real_launch = vk.launch

    def capture(*launch_args):
        captured["args"] = launch_args
        real_launch(*launch_args)

    vk.launch = capture
    wrapper()
    vk.launch = real_launch
    grid, tensors, integers, scale, flags = captured["args"]
    through_run = lambda: vk.launch_through_triton(grid, tensors, integers, scale, flags)
    direct = lambda: vk.launch(grid, tensors, integers, scale, flags)

    rows = [
        ("sdpa", lambda: F.scaled_dot_product_attention(query, dense_k, dense_v, enable_gqa=True)),
        ("dense layer step", lambda: layer_step(dense)),
        ("varlen layer step", lambda: layer_step(varlen)),
        ("varlen_attention", wrapper),
        ("triton launch", through_run),
        ("direct launch", direct),
    ]
    calls = args.calls if device.type == "cuda" else 3
    print(f"| component ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {n} slots) | host us / call |")
    print("|---|---|")
    for name, fn in rows:
        print(f"| {name} | {per_call_us(fn, calls, args.repeats, sync):.1f} |")


if __name__ == "__main__":
    main()
