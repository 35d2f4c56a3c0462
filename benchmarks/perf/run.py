"""Speed and memory of compression on one GPU, Llama-3.1-8B shape with random weights, in one run.

    python -m benchmarks.perf --lengths 32768,131072 --out results/perf

Sections (``--sections``), each a list of rows in ``perf.jsonl`` and a table printed at the end:

* ``overhead``: plain prefill against prefill + compression (ratio 0.5) with knorm / snapkv /
  expected_attention scores and uniform / zigzag budgets: seconds, peak memory above the weights,
  KV bytes kept, decode ms/token on the result (issue 5; NOTES.md has the reference library's row).
* ``merge``: hard eviction against merge-on-evict with the same scorer (knorm) and budgets (issue 4).
* ``heads``: head-wise budgets (adakv) against uniform budgets of the same total (issue 6).
* ``chunked``: chunked prefill (``chunk_size``) against one pass, and a context longer than what fits
  uncompressed (issue 5).
* ``batch``: the largest decode batch whose cache fits at ``--batch-length`` tokens, uncompressed and
  at ratios 0.5 / 0.875, with tokens/s at that batch (issue 5).

Speed does not depend on the weights, so random weights of the real shape measure it faithfully;
accuracy needs real weights (benchmarks/ruler). ``--tiny`` runs a toy model on the CPU to check the
script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from zigzag import compress_cache

GIB = 2**30


def llama_8b_config(max_positions: int) -> LlamaConfig:
    """Llama-3.1-8B's shape: 32 layers, 32 query / 8 KV heads, head_dim 128, MLP 14336, vocab 128256."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=max_positions,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )


def tiny_config(max_positions: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)


def build_model(config: LlamaConfig, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights, initialised directly on ``device`` in ``dtype`` (no 32 GB float32 detour)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("sdpa")
    return model.eval().requires_grad_(False)


class Meter:
    """Wall time and peak memory of a call, above what was allocated before it."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> tuple[object, float, float]:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) / GIB if self.cuda else float("nan")
        return out, seconds, peak


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def plain_prefill(model, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def decode_ms(model, cache, batch: int, steps: int, meter: Meter) -> float:
    """Median ms per greedy decode step (one token per row) continuing ``cache``; leaves it as it was."""
    return statistics.median(decode_times(model, cache, batch, steps, meter))


@torch.no_grad()
def decode_times(model, cache, batch: int, steps: int, meter: Meter) -> list[float]:
    """ms of each of ``steps`` decode steps (one token per row) continuing ``cache``; leaves it as it was."""
    length = cache.get_seq_length()
    token = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    mask = torch.ones(batch, length + steps + 1, dtype=torch.long, device=model.device)
    times = []
    # cuDNN's attention builds a plan for every new key length, which every decode step is; the
    # flash / memory-efficient kernels do not, so decode is timed with those (all rows alike).
    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(kernels):
        times = _decode_steps(model, cache, token, mask, length, steps, meter)
    cache.crop(-(steps + 2))  # remove what the timing appended
    return [1000 * t for t in times]


def _decode_steps(model, cache, token, mask, length, steps, meter) -> list[float]:
    batch = token.shape[0]
    times = []
    for step in range(steps + 2):  # two warm-up steps
        position = torch.full((batch, 1), length + step, device=model.device)
        meter.sync()
        start = time.perf_counter()
        model(input_ids=token, attention_mask=mask[:, : length + step + 1], position_ids=position, past_key_values=cache, use_cache=True)
        meter.sync()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return times


def run_case(rows, meter, model, ids, *, section, method, reps, decode_steps, **kwargs) -> None:
    """Time ``compress_cache(**kwargs)`` (or the plain prefill when ``kwargs`` is empty) ``reps`` times."""
    length = ids.shape[1]
    fn = (lambda: compress_cache(model, ids, **kwargs)) if kwargs else (lambda: plain_prefill(model, ids))
    seconds, peaks = [], []
    cache = None
    for _ in range(reps):
        cache = None
        cache, s, p = meter(fn)
        seconds.append(s)
        peaks.append(p)
    row = {
        "section": section,
        "method": method,
        "tokens": length,
        "batch": ids.shape[0],
        "prefill_s": round(statistics.median(seconds), 4),
        "peak_gib": round(max(peaks), 3),
        "kv_gib": round(cache_bytes(cache) / GIB, 3),
        "kv_bytes": cache_bytes(cache),
        "decode_ms": None,
    }
    if decode_steps:
        times = decode_times(model, cache, ids.shape[0], decode_steps, meter)
        row["decode_ms"] = round(statistics.median(times), 3)
        row["decode_ms_min"] = round(min(times), 3)
    rows.append(row)
    print(json.dumps(row), flush=True)
    del cache


def largest_batch(model, ids, meter, limit: int, **kwargs) -> tuple[int, float]:
    """The largest batch (doubling, then bisection, up to ``limit``) whose cache, built from one row
    and repeated, runs decode steps without running out of memory; and its tokens/s."""

    def fits(batch: int) -> float | None:
        cache = None
        try:
            gc.collect()
            torch.cuda.empty_cache()
            cache = compress_cache(model, ids, **kwargs) if kwargs else plain_prefill(model, ids)
            cache.batch_repeat_interleave(batch)
            ms = decode_ms(model, cache, batch, 3, meter)
            return batch / ms * 1000
        except torch.OutOfMemoryError:
            return None
        finally:
            del cache
            gc.collect()
            torch.cuda.empty_cache()

    good, good_tps, batch = 0, 0.0, 1
    while batch <= limit:
        tps = fits(batch)
        if tps is None:
            break
        good, good_tps, batch = batch, tps, batch * 2
    bad = min(batch, limit + 1)
    while bad - good > max(1, good // 16):  # to within ~6%
        mid = (good + bad) // 2
        tps = fits(mid)
        if tps is None:
            bad = mid
        else:
            good, good_tps = mid, tps
    return good, good_tps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768,131072", help="context lengths for overhead/merge/heads")
    parser.add_argument("--sections", default="overhead,merge,heads,chunked,batch")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--chunk-size", type=int, default=16384)
    parser.add_argument("--long-length", type=int, default=524288, help="chunked: a context too long to fit uncompressed")
    parser.add_argument("--batch-length", type=int, default=32768)
    parser.add_argument("--batch-limit", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="toy model on the CPU: checks the script, measures nothing")
    parser.add_argument("--out", default="results/perf")
    args = parser.parse_args(argv)

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    lengths = [int(x) for x in args.lengths.split(",")]
    sections = args.sections.split(",")
    max_positions = max(lengths + [args.long_length, args.batch_length]) + 1024
    model = build_model((tiny_config if args.tiny else llama_8b_config)(max_positions), device, dtype)
    meter = Meter(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    info = {
        "device": torch.cuda.get_device_name() if not args.tiny else "cpu (tiny check)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "weights_gib": round(sum(p.nbytes for p in model.parameters()) / GIB, 2),
        "args": vars(args),
    }
    print(json.dumps(info), flush=True)

    def ids_of(length: int, batch: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(length)
        return torch.randint(10, model.config.vocab_size, (batch, length), generator=g).to(device)

    # Warm-up: kernels, allocator pools, Triton compilation (not timed).
    warm = ids_of(min(lengths))
    for kwargs in ({}, {"ratio": args.ratio, "scorer": "expected_attention", "budget": "zigzag"},
                   {"ratio": args.ratio, "scorer": "knorm", "budget": "uniform", "merge": "cosine"}):
        meter(lambda: compress_cache(model, warm, **kwargs) if kwargs else plain_prefill(model, warm))
    del warm

    steps = args.decode_steps
    for length in lengths:
        ids = ids_of(length)
        reps = 2 if length <= 32768 else 1
        # Untimed: pinned host blocks of this size (zigzag's provisional layers) and kernels for it.
        meter(lambda: compress_cache(model, ids, ratio=args.ratio, scorer="knorm", budget="zigzag"))
        common = dict(reps=reps, decode_steps=steps, ratio=args.ratio)
        if "overhead" in sections:
            run_case(rows, meter, model, ids, section="overhead", method="none", reps=reps, decode_steps=steps)
            for scorer in ("knorm", "snapkv", "expected_attention"):
                for budget in ("uniform", "zigzag"):
                    run_case(rows, meter, model, ids, section="overhead", method=f"{scorer}/{budget}", scorer=scorer, budget=budget, **common)
        if "merge" in sections:
            for budget in ("uniform", "zigzag"):
                run_case(rows, meter, model, ids, section="merge", method=f"knorm/{budget}", scorer="knorm", budget=budget, **common)
                run_case(rows, meter, model, ids, section="merge", method=f"knorm/{budget}+merge", scorer="knorm", budget=budget, merge="cosine", **common)
        if "heads" in sections:
            for budget in ("uniform", "adakv"):
                run_case(rows, meter, model, ids, section="heads", method=f"expected_attention/{budget}", scorer="expected_attention", budget=budget, **common)
        del ids

    if "chunked" in sections:
        length = max(lengths)
        ids = ids_of(length)
        for chunk in (None, args.chunk_size):
            run_case(rows, meter, model, ids, section="chunked", method=f"expected_attention/zigzag chunk={chunk}",
                     reps=1, decode_steps=0, ratio=0.875, scorer="expected_attention", budget="zigzag", chunk_size=chunk)
        del ids
        long_ids = ids_of(args.long_length)
        kv_full = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * 128 * 2 * args.long_length / GIB
        print(json.dumps({"note": f"uncompressed KV of {args.long_length} tokens would need {kv_full:.1f} GiB"}), flush=True)
        try:
            run_case(rows, meter, model, long_ids, section="chunked", method=f"expected_attention/zigzag chunk={args.chunk_size}",
                     reps=1, decode_steps=steps, ratio=0.875, scorer="expected_attention", budget="zigzag", chunk_size=args.chunk_size)
        except torch.OutOfMemoryError as error:
            rows.append({"section": "chunked", "method": "long context", "tokens": args.long_length, "error": str(error)[:200]})
        del long_ids

    if "batch" in sections and not args.tiny:
        ids = ids_of(args.batch_length)
        for ratio in (None, 0.5, 0.875):
            kwargs = {} if ratio is None else {"ratio": ratio, "scorer": "expected_attention", "budget": "uniform"}
            batch, tps = largest_batch(model, ids, meter, args.batch_limit, **kwargs)
            row = {"section": "batch", "method": "none" if ratio is None else f"expected_attention/uniform ratio={ratio}",
                   "tokens": args.batch_length, "max_batch": batch, "tokens_per_s": round(tps, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    with open(out / "perf.jsonl", "a") as f:
        f.write(json.dumps({"info": info}) + "\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print_table(rows, info)


def print_table(rows: list[dict], info: dict) -> None:
    print(f"\n{info['device']}, torch {info['torch']}, {info['date']}, weights {info['weights_gib']} GiB")
    base = {(r["tokens"]): r for r in rows if r.get("method") == "none" and r["section"] == "overhead"}
    print("| section | method | T | prefill s | vs none | peak GiB | KV GiB | decode ms/token median (min) | max batch | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = base.get(r.get("tokens"))
        rel = f"{r['prefill_s'] / ref['prefill_s']:.3f}x" if ref and "prefill_s" in r else ""
        print(
            f"| {r['section']} | {r.get('method', '')} | {r.get('tokens', '')} | {r.get('prefill_s', '')} | {rel} | "
            f"{r.get('peak_gib', '')} | {r.get('kv_gib', '')} | {r.get('decode_ms', '') or ''} ({r.get('decode_ms_min', '')}) | "
            f"{r.get('max_batch', '')} | {r.get('tokens_per_s', '')} |"
        )


if __name__ == "__main__":
    main()
