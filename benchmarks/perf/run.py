"""Speed and memory of compression on one GPU, Llama-3.1-8B shape with random weights, in one run.

    python -m benchmarks.perf --lengths 32768,131072 --out results/perf

Sections (``--sections``), each a list of rows in ``perf.jsonl`` and a table printed at the end:

* ``overhead``: plain prefill against prefill + compression (ratio 0.5) with knorm / snapkv /
  expected_attention scores and uniform / zigzag budgets: seconds, peak memory above the weights,
  KV bytes kept, decode ms/token on the result.
* ``merge``: hard eviction against merge-on-evict with the same scorer (knorm) and budgets.
* ``heads``: head-wise budgets (adakv, zigzag_heads) against uniform budgets of the same total.
  The three caches are built first, from one row; decode is then timed at each batch of
  ``--decode-batches`` on copies repeated to that many rows, in rounds that alternate between the
  caches so that drift (clocks, host load) hits all alike. One row per method and batch: ``batch`` is
  the decode batch, ``prefill_s`` / ``peak_gib`` / ``kv_gib`` are those of the one-row cache,
  ``speed_vs_uniform`` is uniform's median ms/step over the method's (null where out of memory), and
  ``gpu_busy_share`` tells whether that batch is bound by the GPU (near 1) or by the host.
* ``chunked``: chunked prefill (``chunk_size``) against one pass, and a context longer than what fits
  uncompressed.
* ``batch``: the largest decode batch whose cache fits at ``--batch-length`` tokens, uncompressed and
  at ratios 0.5 / 0.875, with tokens/s at that batch.

Speed does not depend on the weights, so random weights of the real shape measure it faithfully;
accuracy needs real weights (benchmarks/ruler). ``--tiny`` runs a toy model on the CPU to check the
script itself.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from benchmarks.cli import HelpFormatter
from zigzag import cache_kwarg, compress_cache
from zigzag.cache.varlen import VarlenLayer, get_backend

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

    def free(self) -> None:
        """Return the memory of dropped tensors (Python garbage, then the CUDA allocator's cache)."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def __call__(self, fn: Callable[[], object]) -> tuple[object, float, float]:
        self.free()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) / GIB if self.cuda else float("nan")
        return out, seconds, peak


def median_ms(fn, repeats: int, sync) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn``, each between two ``sync()`` (no warm-up)."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def plain_prefill(model, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
    return cache


def decode_ms(model, cache, batch: int, steps: int, meter: Meter) -> float:
    """Median ms per greedy decode step (one token per row) continuing ``cache``; leaves it as it was."""
    return statistics.median(decode_times(model, cache, batch, steps, meter))


@torch.no_grad()
def decode_times(model, cache, batch: int, steps: int, meter: Meter) -> list[float]:
    """ms of each of ``steps`` decode steps (one token per row) continuing ``cache``; leaves it as it was."""
    length = cache.get_seq_length()
    token = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    mask = torch.ones(batch, length + steps + 2, dtype=torch.long, device=model.device)
    # cuDNN's attention builds a plan for every new key length, which every decode step is; the
    # flash / memory-efficient kernels do not, so decode is timed with those (all rows alike).
    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        with sdpa_kernel(kernels):
            times = _decode_steps(model, cache, token, mask, length, steps, meter)
    finally:
        restore_length(cache, length)  # remove what the timing appended, even after an error
    return [1000 * t for t in times]


def _decode_steps(model, cache, token, mask, length, steps, meter) -> list[float]:
    batch = token.shape[0]
    times = []
    for step in range(steps + 2):  # two warm-up steps
        position = torch.full((batch, 1), length + step, device=model.device)
        meter.sync()
        start = time.perf_counter()
        model(input_ids=token, attention_mask=mask[:, : length + step + 1], position_ids=position, **cache_kwarg(model, cache), use_cache=True)
        meter.sync()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return times


def restore_length(cache, length: int) -> None:
    """Crop every layer back to ``length`` tokens, whatever each one had appended (a step that
    failed half-way leaves layers of different lengths). Varlen and compressed layers take
    negative crops of their appended tokens, as ``DynamicLayer`` does."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra:
            layer.crop(-extra)
    if cache.get_seq_length() != length:
        raise RuntimeError(f"decode timing left the cache at {cache.get_seq_length()} tokens, not {length}")


def measure_prefill(meter, model, ids, reps: int, **kwargs) -> tuple[dict, object]:
    """Time ``compress_cache(**kwargs)`` (or the plain prefill when ``kwargs`` is empty) ``reps`` times.

    Returns the row fields (median seconds, peak GiB above what was allocated before, KV kept) and
    the last cache."""
    fn = (lambda: compress_cache(model, ids, **kwargs)) if kwargs else (lambda: plain_prefill(model, ids))
    seconds, peaks = [], []
    cache = None
    for _ in range(reps):
        cache = None  # free the previous repetition's cache before the next one is built
        cache, s, p = meter(fn)
        seconds.append(s)
        peaks.append(p)
    fields = {
        "prefill_s": round(statistics.median(seconds), 4),
        "peak_gib": round(max(peaks), 3),
        "kv_gib": round(cache_bytes(cache) / GIB, 3),
        "kv_bytes": cache_bytes(cache),
    }
    return fields, cache


def run_case(rows, meter, model, ids, *, section, method, reps, decode_steps, **kwargs) -> None:
    """One row: prefill (+ compression with ``kwargs``) timed ``reps`` times, then decode on the result."""
    fields, cache = measure_prefill(meter, model, ids, reps, **kwargs)
    row = {"section": section, "method": method, "tokens": ids.shape[1], "batch": ids.shape[0], **fields, "decode_ms": None}
    if decode_steps:
        times = decode_times(model, cache, ids.shape[0], decode_steps, meter)
        row["decode_ms"] = round(statistics.median(times), 3)
        row["decode_ms_min"] = round(min(times), 3)
    rows.append(row)
    print(json.dumps(row), flush=True)
    del cache


# ---------------------------------------------------------------------------------- heads section

HEAD_BUDGETS = ("uniform", "adakv", "zigzag_heads")  # uniform first: the reference of speed_vs_uniform


def repeat_rows(cache, batch: int):
    """A copy of the one-row ``cache`` whose row is repeated ``batch`` times; ``cache`` is kept."""
    repeated = copy.deepcopy(cache)
    repeated.batch_repeat_interleave(batch)
    return repeated


@dataclass
class Decode:
    """One cache's decode timings at one batch: ``rounds`` holds the ms of each timed step, round by
    round; ``gpu_ms`` the GPU busy ms per step of each profiled call (CUDA only)."""

    rounds: list[list[float]] = field(default_factory=list)
    gpu_ms: list[float] = field(default_factory=list)


def busy_time(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def is_gpu_activity(event) -> bool:
    """Whether a profiler event is work on the GPU (a kernel, copy or memset), not a CPU event nor a
    ``record_function`` range mirrored onto the GPU timeline."""
    return event.device_type == DeviceType.CUDA and not event.is_user_annotation


def decode_gpu_ms(model, cache, batch: int, steps: int, meter: Meter) -> float:
    """GPU busy ms per decode step: the union of the GPU activity of a profiled :func:`decode_times`
    (warm-up steps included) over its steps. Near the step's wall time, decode is bound by the GPU;
    far below it, by the host."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode_times(model, cache, batch, steps, meter)
    busy_us = busy_time((e.time_range.start, e.time_range.end) for e in prof.events() if is_gpu_activity(e))
    return busy_us / 1000 / (steps + 2)


def interleaved_decode(model, caches: dict, batch: int, rounds: int, steps: int, meter: Meter) -> dict[str, Decode]:
    """Per cache, the ms of its ``steps`` decode steps in each of ``rounds`` rounds, at ``batch`` rows.

    Each round times every cache once, in the order A B C, then C B A in the next round, and so on:
    a slow drift of the machine then weighs on all caches alike. On CUDA one more, profiled, call per
    cache measures its GPU busy time. At ``batch`` 1 the caches themselves are decoded (and
    restored); at larger batches, copies repeated to ``batch`` rows, freed on return. Raises
    ``torch.OutOfMemoryError`` if the copies do not fit."""
    copies: dict = {}
    try:
        for method, cache in caches.items():
            copies[method] = cache if batch == 1 else repeat_rows(cache, batch)
        out = {method: Decode() for method in copies}
        order = list(copies)
        for turn in range(rounds):
            for method in order if turn % 2 == 0 else reversed(order):
                out[method].rounds.append(decode_times(model, copies[method], batch, steps, meter))
        if meter.cuda:  # after the timed rounds, so that profiling cannot slow them
            for method in order:
                out[method].gpu_ms.append(decode_gpu_ms(model, copies[method], batch, steps, meter))
        return out
    finally:
        copies.clear()
        meter.free()


def decode_fields(decode: Decode, uniform: Decode) -> dict:
    """Row fields of one cache's decode timings against uniform's, from the same interleaving.

    ``speed_vs_uniform`` is uniform's median ms/step over this cache's (above 1: faster than
    uniform); ``speed_vs_uniform_range`` is the lowest and highest of the same ratio round by round.
    ``gpu_busy_ms`` is the GPU busy time per step, ``gpu_busy_share`` its share of the median step
    (near 1: GPU-bound) and ``gpu_speed_vs_uniform`` the speed ratio of the GPU work alone (all
    three null off CUDA)."""
    ms = statistics.median(t for steps in decode.rounds for t in steps)
    uniform_ms = statistics.median(t for steps in uniform.rounds for t in steps)
    per_round = [statistics.median(u) / statistics.median(m) for u, m in zip(uniform.rounds, decode.rounds)]
    gpu_ms = statistics.median(decode.gpu_ms) if decode.gpu_ms else None
    return {
        "decode_ms": round(ms, 3),
        "decode_ms_min": round(min(min(steps) for steps in decode.rounds), 3),
        "decode_round_ms": [round(statistics.median(steps), 3) for steps in decode.rounds],
        "speed_vs_uniform": round(uniform_ms / ms, 3),
        "speed_vs_uniform_range": [round(min(per_round), 3), round(max(per_round), 3)],
        "gpu_busy_ms": None if gpu_ms is None else round(gpu_ms, 3),
        "gpu_busy_share": None if gpu_ms is None else round(gpu_ms / ms, 3),
        "gpu_speed_vs_uniform": None if gpu_ms is None else round(statistics.median(uniform.gpu_ms) / gpu_ms, 3),
    }


def try_interleaved(model, caches: dict, batch: int, rounds: int, steps: int, meter: Meter) -> dict[str, Decode] | None:
    """:func:`interleaved_decode`, or None if the copies run out of memory (then freed)."""
    try:
        return interleaved_decode(model, caches, batch, rounds, steps, meter)
    except torch.OutOfMemoryError:
        pass
    meter.free()  # here, once the traceback no longer holds the half-made copies
    return None


OUT_OF_MEMORY = {"decode_ms": None, "speed_vs_uniform": None, "timing": "out of memory"}


def compare_decode(model, caches: dict, batch: int, rounds: int, steps: int, meter: Meter) -> dict[str, dict]:
    """Decode fields of every cache at ``batch`` rows; the first cache (uniform) is the reference.

    All caches are interleaved together when their copies fit in memory; otherwise each other cache
    is interleaved with uniform alone (uniform's fields then pool its timings of every pair). A pair
    that does not fit either gets null timings (:data:`OUT_OF_MEMORY`)."""
    uniform, *others = caches
    decodes = try_interleaved(model, caches, batch, rounds, steps, meter)
    if decodes is not None:
        return {method: {**decode_fields(decodes[method], decodes[uniform]), "timing": "all interleaved"} for method in caches}
    fields, pooled = {}, Decode()
    for method in others:
        decodes = try_interleaved(model, {uniform: caches[uniform], method: caches[method]}, batch, rounds, steps, meter)
        if decodes is None:
            fields[method] = OUT_OF_MEMORY
            continue
        fields[method] = {**decode_fields(decodes[method], decodes[uniform]), "timing": "pairwise with uniform"}
        pooled.rounds += decodes[uniform].rounds
        pooled.gpu_ms += decodes[uniform].gpu_ms
    fields[uniform] = {**decode_fields(pooled, pooled), "timing": "pairwise"} if pooled.rounds else OUT_OF_MEMORY
    return {method: fields[method] for method in caches}


def heads_section(rows, meter, model, ids, *, ratio: float, reps: int, batches: list[int], rounds: int, steps: int) -> None:
    """Head-wise budgets against uniform ones: the one-row caches of every budget in
    :data:`HEAD_BUDGETS` are built first (prefill timed), then decoded, interleaved, at each batch.
    ``varlen_layers`` counts each cache's :class:`~zigzag.cache.varlen.VarlenLayer` layers: random weights
    can give every KV head the same budget, and such a cache is dense like uniform's."""
    prefill, caches = {}, {}
    for budget in HEAD_BUDGETS:
        method = f"expected_attention/{budget}"
        prefill[method], caches[method] = measure_prefill(meter, model, ids, reps, ratio=ratio, scorer="expected_attention", budget=budget)
        # Layers whose heads kept different counts (the rest are dense): with none, the row times dense layers.
        prefill[method]["varlen_layers"] = sum(isinstance(layer, VarlenLayer) for layer in caches[method].layers)
    for batch in batches:
        for method, fields in compare_decode(model, caches, batch, rounds, steps, meter).items():
            row = {"section": "heads", "method": method, "tokens": ids.shape[1], "batch": batch, **prefill[method], **fields}
            rows.append(row)
            print(json.dumps(row), flush=True)
    caches.clear()
    meter.free()


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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--lengths", default="32768,131072", help="context lengths for overhead/merge/heads")
    parser.add_argument("--sections", default="overhead,merge,heads,chunked,batch", help="comma list of the sections to run (see above)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the cache removed (overhead, merge, heads)")
    parser.add_argument("--scorers", default="knorm,snapkv,expected_attention", help="overhead: scorers timed (names with suffixes)")
    parser.add_argument("--budgets", default="uniform,zigzag", help="overhead: budgets timed with every scorer")
    parser.add_argument("--decode-steps", type=int, default=20, help="decode steps timed per row (all sections but heads)")
    parser.add_argument("--decode-batches", default="1,8", help="heads: decode batches (the one-row cache repeated)")
    parser.add_argument("--decode-rounds", type=int, default=5, help="heads: interleaved rounds per cache and batch")
    parser.add_argument("--round-steps", type=int, default=10, help="heads: decode steps timed per round")
    parser.add_argument("--chunk-size", type=int, default=16384, help="chunked: tokens per prefill chunk")
    parser.add_argument("--long-length", type=int, default=524288, help="chunked: a context too long to fit uncompressed")
    parser.add_argument("--batch-length", type=int, default=32768, help="batch: context length of each row")
    parser.add_argument("--batch-limit", type=int, default=512, help="batch: largest batch tried")
    parser.add_argument("--tiny", action="store_true", help="toy model on the CPU: checks the script, measures nothing")
    parser.add_argument("--out", default="results/perf", help="output folder (perf.jsonl)")
    args = parser.parse_args(argv)

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    lengths = [int(x) for x in args.lengths.split(",")]
    sections = args.sections.split(",")
    decode_batches = [int(x) for x in args.decode_batches.split(",")]
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
        "varlen_backend": get_backend(torch.device(device)),
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
        meter(functools.partial(compress_cache, model, warm, **kwargs) if kwargs else functools.partial(plain_prefill, model, warm))
    del warm

    steps = args.decode_steps
    for length in lengths:
        ids = ids_of(length)
        reps = 2 if length <= 32768 else 1
        # Untimed: pinned host blocks of this size (zigzag's provisional layers) and kernels for it.
        meter(functools.partial(compress_cache, model, ids, ratio=args.ratio, scorer="knorm", budget="zigzag"))
        common = dict(reps=reps, decode_steps=steps, ratio=args.ratio)
        if "overhead" in sections:
            run_case(rows, meter, model, ids, section="overhead", method="none", reps=reps, decode_steps=steps)
            for scorer in args.scorers.split(","):
                for budget in args.budgets.split(","):
                    try:
                        run_case(rows, meter, model, ids, section="overhead", method=f"{scorer}/{budget}", scorer=scorer, budget=budget, **common)
                    except torch.OutOfMemoryError as error:  # one scorer's memory need must not end the run
                        meter.free()
                        rows.append({"section": "overhead", "method": f"{scorer}/{budget}", "tokens": length, "error": str(error)[:200]})
                        print(json.dumps(rows[-1]), flush=True)
        if "merge" in sections:
            for budget in ("uniform", "zigzag"):
                run_case(rows, meter, model, ids, section="merge", method=f"knorm/{budget}", scorer="knorm", budget=budget, **common)
                run_case(rows, meter, model, ids, section="merge", method=f"knorm/{budget}+merge", scorer="knorm", budget=budget, merge="cosine", **common)
        if "heads" in sections:
            heads_section(rows, meter, model, ids, ratio=args.ratio, reps=reps, batches=decode_batches,
                          rounds=args.decode_rounds, steps=args.round_steps)
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
    """The rows as Markdown tables: one for the heads section, one for all the others."""
    print(f"\n{info['device']}, torch {info['torch']}, {info['date']}, weights {info['weights_gib']} GiB")
    base = {(r["tokens"]): r for r in rows if r.get("method") == "none" and r["section"] == "overhead"}
    print("| section | method | T | prefill s | vs none | peak GiB | KV GiB | decode ms/token median (min) | max batch | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["section"] == "heads":
            continue
        ref = base.get(r.get("tokens"))
        rel = f"{r['prefill_s'] / ref['prefill_s']:.3f}x" if ref and "prefill_s" in r else ""
        print(
            f"| {r['section']} | {r.get('method', '')} | {r.get('tokens', '')} | {r.get('prefill_s', '')} | {rel} | "
            f"{r.get('peak_gib', '')} | {r.get('kv_gib', '')} | {r.get('decode_ms', '') or ''} ({r.get('decode_ms_min', '')}) | "
            f"{r.get('max_batch', '')} | {r.get('tokens_per_s', '')} |"
        )
    print_heads_table([r for r in rows if r["section"] == "heads"])


def print_heads_table(rows: list[dict]) -> None:
    """Head-wise budgets: decode ms/step and speed against uniform, per context length and batch."""
    if not rows:
        return
    print("\n| T | batch | method | decode ms/step median (min) | speed vs uniform (per-round range) | GPU busy ms/step (share) | GPU speed vs uniform | timing | varlen layers | prefill s | peak GiB | KV GiB (1 row) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        decode = speed = gpu = gpu_speed = "null"
        if r["decode_ms"] is not None:
            decode = f"{r['decode_ms']} ({r['decode_ms_min']})"
            speed = f"{r['speed_vs_uniform']} ({r['speed_vs_uniform_range'][0]}–{r['speed_vs_uniform_range'][1]})"
            gpu, gpu_speed = f"{r['gpu_busy_ms']} ({r['gpu_busy_share']})", r["gpu_speed_vs_uniform"]
        print(f"| {r['tokens']} | {r['batch']} | {r['method']} | {decode} | {speed} | {gpu} | {gpu_speed} | "
              f"{r['timing']} | {r['varlen_layers']} | {r['prefill_s']} | {r['peak_gib']} | {r['kv_gib']} |")


if __name__ == "__main__":
    main()
