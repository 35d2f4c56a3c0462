"""Per-layer cost of merge-on-evict versus hard eviction, on a Llama-3.1-8B shape.

For each context length T, one layer's keys and values ``(1, 8, T, 128)`` (random, bf16) are
compressed at ``ratio`` (fraction removed; kept positions drawn at random per head):

* ``evict``: hard eviction, i.e. gathering the kept keys and values;
* ``merge-torch``: gathering the kept keys plus :class:`zigzag.merge.CosineMerge` on the blocked PyTorch path;
* ``merge-triton``: the same with the fused Triton similarity search (CUDA with triton only).

Times are the median of ``--repeats`` runs after warm-up, with the device synchronized around each
run; peak memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the run
(reset before each method). The model itself (random weights, built on the meta device and then
materialized with ``to_empty``) is built with ``--with-model`` only, for the full-prefill part.

    python -m benchmarks.merge_bench --out results/merge_bench.json                 # GPU, 32k and 128k
    python -m benchmarks.merge_bench --device cpu --lengths 512 2048 --out /tmp/m.json  # tiny, on CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.cli import HelpFormatter
from zigzag.kernels import using
from zigzag.merge import CosineMerge


def llama_config(tiny: bool):
    """Llama-3.1-8B's shape (32 layers, 32 query / 8 KV heads, head_dim 128), or a tiny one for CPU."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=8192,
        )
    from benchmarks.perf.run import llama_8b_config

    return llama_8b_config(max_positions=131072)


def build_model(config, device: torch.device, dtype: torch.dtype):
    """Random-weight LlamaForCausalLM: built on the meta device, then materialized on ``device``."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device=device).eval()  # allocates, leaves garbage in the weights
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # to_empty left the rotary inv_freq uninitialized: rebuild it (float32, as from_pretrained keeps it)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, repeats: int, warmup: int):
    """Median wall time (ms) over ``repeats`` synchronized runs after ``warmup`` runs, and the peak
    memory (MiB) of one run above what was allocated before it (CUDA only, else None)."""
    for _ in range(warmup):
        fn()
    sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        del out
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        del out
    return statistics.median(times), times, peak


def layer_inputs(T: int, kv_heads: int, head_dim: int, ratio: float, dtype, device, seed: int = 0):
    """One layer's random keys/values ``(1, kv_heads, T, head_dim)`` and per-head kept positions
    ``(1, kv_heads, n)`` with ``n = round((1 - ratio) * T)``, ascending."""
    gen = torch.Generator(device=device).manual_seed(seed)
    keys = torch.randn(1, kv_heads, T, head_dim, generator=gen, device=device, dtype=torch.float32).to(dtype)
    values = torch.randn(1, kv_heads, T, head_dim, generator=gen, device=device, dtype=torch.float32).to(dtype)
    n = max(1, round((1.0 - ratio) * T))
    scores = torch.rand(1, kv_heads, T, generator=gen, device=device)
    kept = scores.topk(n, dim=-1).indices.sort(dim=-1).values
    valid = torch.ones(1, T, dtype=torch.bool, device=device)
    return keys, values, kept, valid


def gather(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return x.gather(2, kept[..., None].expand(-1, -1, -1, x.shape[-1]))


def bench_layer(T: int, args, config, device: torch.device, dtype: torch.dtype) -> list[dict]:
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    keys, values, kept, valid = layer_inputs(T, kv_heads, head_dim, args.ratio, dtype, device)
    methods = {"evict": lambda: (gather(keys, kept), gather(values, kept))}
    backends = ["torch"]
    if device.type == "cuda":
        try:
            import triton

            backends.append("triton")
        except ImportError:
            pass
    merge = CosineMerge(chunk_size=args.chunk_size)
    for backend in backends:

        def merged(backend=backend):
            with using("merge", backend):
                return gather(keys, kept), merge.merge(keys, values, kept, valid)

        methods[f"merge-{backend}"] = merged
    kept_mib = 2 * kept.shape[-1] * kv_heads * head_dim * keys.element_size() / 2**20
    rows = []
    for name, fn in methods.items():
        median, times, peak = measure(fn, device, args.repeats, args.warmup)
        row = {
            "T": T,
            "method": name,
            "ms": round(median, 3),
            "times_ms": [round(t, 3) for t in times],
            "model_ms": round(median * config.num_hidden_layers, 1),  # all layers, one after another
            "peak_mib": None if peak is None else round(peak, 1),
            "kept_kv_mib": round(kept_mib, 1),
        }
        if name.startswith("merge"):
            out = fn()[1]
            row["mean_count"] = round(float(out.counts.mean()), 3)
        rows.append(row)
        print(
            f"{T:>7} {name:<13} {row['ms']:>10.2f} ms/layer {row['model_ms']:>10.1f} ms/model "
            f"{'-' if peak is None else f'{peak:9.1f}':>9} MiB peak {kept_mib:8.1f} MiB kept",
            flush=True,
        )
    methods.clear()  # drop the closures (and the layer's tensors) before the next length
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.merge_bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=None, help="context lengths T (None: 32768 131072; on the CPU 512 2048)"
    )
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the cache removed")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before the timed ones")
    parser.add_argument("--chunk-size", type=int, default=None, help="positions per similarity block (None: chosen from the length)")
    parser.add_argument("--tiny", action="store_true", help="tiny model shape (the default on CPU)")
    parser.add_argument("--with-model", action="store_true", help="also build the random-weight model on the device")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (None: print only)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.ratio < 1.0:
        parser.error(f"--ratio must be in [0, 1) (fraction removed); got {args.ratio}")

    device = torch.device(args.device)
    tiny = args.tiny or device.type == "cpu"
    lengths = args.lengths or ([512, 2048] if device.type == "cpu" else [32768, 131072])
    dtype = torch.bfloat16
    config = llama_config(tiny)
    model_gib = None
    if args.with_model:
        model = build_model(config, device, dtype)
        model_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        print(f"model: {model_gib:.2f} GiB of random {dtype} weights on {device}")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {name}; torch {torch.__version__}; layers {config.num_hidden_layers}, "
        f"kv_heads {config.num_key_value_heads}, head_dim {config.head_dim}, ratio {args.ratio}"
    )
    print(f"{'T':>7} {'method':<13} {'median':>10}")
    results = []
    for T in lengths:
        results.extend(bench_layer(T, args, config, device, dtype))

    report = {
        "device": name,
        "torch": torch.__version__,
        "dtype": str(dtype),
        "ratio": args.ratio,
        "repeats": args.repeats,
        "config": {
            "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
        },
        "model_gib": model_gib,
        "layer": results,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
