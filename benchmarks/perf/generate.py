"""Decode speed measured through ``model.generate``: head-wise budgets against uniform ones and the
uncompressed cache, Llama-3.1-8B shape with random weights, on one GPU.

    python -m benchmarks.perf.generate --lengths 32768,131072 --batches 1,8 --out results/perf-generate
    python -m benchmarks.perf.generate --tiny --lengths 512 --batches 1,4     # checks the script on the CPU

``benchmarks.perf --sections heads`` times decoding with its own loop. This times what a user runs:
stock ``generate``, which builds its own inputs, position ids and attention mask objects at every
step. For each context length one row of random tokens is compressed (``--scorer`` at ``--ratio``)
once per budget of ``--budgets`` (``none``: the uncompressed ``DynamicCache`` of a plain prefill),
and those one-row caches are kept. For each batch of ``--batches`` every repetition then, budget by
budget, repeats the row to the batch (a fresh cache, freed after its call, so every repetition
starts from the same state and at most one batch-sized cache exists at a time) and runs

    model.generate(input_ids=<context + 1 new token per row>, attention_mask=ones, cache=...,
                   max_new_tokens=N, min_new_tokens=N, do_sample=False)

Per-step times come from inside ``generate``: a logits processor notes ``time.perf_counter()`` at
every step; the differences of consecutive notes are the steps, the first ``--warmup`` dropped.
``generate`` reads ``unfinished_sequences.max() == 0`` back to the host at every step (transformers
5.17 and 5.25, ``StopCheck``; only on MPS does ``DeferredStopCheck`` read it a step late), so each
difference is one whole step, host and GPU; where the installed transformers would defer that read,
the processor synchronises itself (:func:`defers_stop_check`). Without padding after the context,
``generate`` passes attention no mask at all; ``--pad-continuation`` puts a masked padding token
before the new one, so that every step passes one (the masked path of the caches).

The ``--reps`` repetitions are interleaved (every budget once per round, the order rotated by one
each round), so a drift of the machine weighs on all budgets alike. Per (length, batch, budget) one
JSONL row in ``--out``/generate.jsonl, written as each cell finishes: the median ms/token of each
repetition, their median and range, and the speed against ``uniform`` and ``none`` (their ms over
this budget's: above 1 is faster), as the median of the per-round ratios with their range. A cache
that cannot fit at a batch is skipped with its reason, checked before anything is allocated (128k
tokens uncompressed at batch 8 need 137 GB); a budget skipped at a batch is skipped at larger ones
and its one-row cache freed. After a cell's timed rounds, one more profiled ``generate`` per budget
(``--profile-tokens``, 0: none) gives the GPU busy ms per step (near the step time: bound by the GPU)
and the host syncs per step (:data:`benchmarks.perf.profile.HOST_SYNCS`). ``--with-loop`` also times
``benchmarks.perf``'s own decoding loop on the same fresh caches in the same rounds, to tell what
``generate`` adds. A markdown table is printed last.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LogitsProcessor, LogitsProcessorList

from benchmarks.cli import HelpFormatter
from benchmarks.perf.profile import summarize
from benchmarks.perf.run import (
    GIB,
    Meter,
    build_model,
    cache_bytes,
    decode_times,
    llama_8b_config,
    plain_prefill,
    restore_length,
    tiny_config,
)
from zigzag import cache_kwarg, compress_cache
from zigzag.cache.varlen import VarlenLayer, get_backend

NONE = "none"
"""The budget name of the uncompressed cache (a plain prefill's ``DynamicCache``)."""
UNIFORM = "uniform"
"""The budget every speed is compared against first."""


# ---------------------------------------------------------------------------------------------- clock


def defers_stop_check(device: torch.device) -> bool:
    """Whether the installed transformers' ``generate`` reads its stop flag a step late on ``device``
    (``DeferredStopCheck``, 5.17 and 5.25 on MPS only): then the host is not synchronised every step."""
    from transformers.generation import utils

    deferred = getattr(utils, "DeferredStopCheck", None)
    if deferred is None:  # older releases: the flag is read at every step
        return False
    return bool(deferred.is_supported(device, None, cache_is_returned=False, is_assistant=False))


class StepClock(LogitsProcessor):
    """Notes ``time.perf_counter()`` each time ``generate`` processes a step's logits, passing them
    through unchanged. ``sync``: synchronise CUDA first (when ``generate`` does not every step)."""

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.sync:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores

    def step_ms(self, warmup: int) -> list[float]:
        """ms of each step after the first ``warmup`` (one fewer steps than stamps)."""
        return [1000 * (b - a) for a, b in zip(self.stamps, self.stamps[1:])][warmup:]


# ---------------------------------------------------------------------------------------------- caches


def repeated(cache, batch: int):
    """A cache holding the one-row ``cache``'s row ``batch`` times, ``cache`` left as it was.

    Layers are copied shallowly, then repeated: row selection binds every layer's tensors to new
    ones (``DynamicLayer``, dense and varlen layers alike) and nothing writes the old ones in place,
    so the one-row tensors are never touched and no second one-row copy is made (``deepcopy`` would
    make one, 8 GiB at 128k). At ``batch`` 1 the repeat still copies: every call starts afresh."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.batch_repeat_interleave(batch)
    return out


def layer_bytes(layer) -> int:
    """Bytes one layer holds (a compressed layer's ``nbytes()``, a ``DynamicLayer``'s keys and values)."""
    if callable(getattr(layer, "nbytes", None)):
        return layer.nbytes()
    return layer.keys.nbytes + layer.values.nbytes


def bytes_needed(cache, batch: int, new_tokens: int, headroom: int) -> int:
    """Bytes a ``batch``-row copy of the one-row ``cache`` needs while ``generate`` appends
    ``new_tokens`` per row: the copy; one more copy of its largest layer (a dense layer concatenates
    each step into a new tensor while the old one is alive); the appended keys and values of every
    layer (padded to 64 more, as a varlen tail's buffer grows); and ``headroom`` bytes."""
    layers = cache.layers
    first = layers[0]
    kv_heads, head_dim = first.keys.shape[1], first.keys.shape[-1]
    appended = 2 * len(layers) * kv_heads * (new_tokens + 64) * head_dim * first.keys.element_size()
    return batch * (cache_bytes(cache) + max(layer_bytes(layer) for layer in layers) + appended) + headroom


def size(nbytes: int) -> str:
    """``nbytes`` in GiB (1 decimal), or MiB below one GiB."""
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def free_bytes(meter: Meter, limit_gib: float | None) -> int | None:
    """Bytes free for a new cache: ``limit_gib`` if given, else what the GPU has free (after the
    allocator's cache is returned); None (unlimited) on the CPU."""
    if limit_gib is not None:
        return int(limit_gib * GIB)
    if not meter.cuda:
        return None
    meter.free()
    return torch.cuda.mem_get_info()[0]


@dataclass
class OneRow:
    """One budget's one-row cache and what is known of it before any decoding."""

    cache: object
    kv_bytes: int
    varlen_layers: int
    prefill_s: float


def build_one_row(model, ids: torch.Tensor, budget: str, scorer: str, ratio: float, meter: Meter) -> OneRow:
    """The one-row cache of ``budget`` for ``ids (1, T)``: plain prefill for :data:`NONE`, else compressed."""
    if budget == NONE:
        cache, seconds, _ = meter(lambda: plain_prefill(model, ids))
    else:
        cache, seconds, _ = meter(lambda: compress_cache(model, ids, ratio=ratio, scorer=scorer, budget=budget))
    varlen = sum(isinstance(layer, VarlenLayer) for layer in cache.layers)
    return OneRow(cache, cache_bytes(cache), varlen, seconds)


# ---------------------------------------------------------------------------------------------- timing


PAD = 0
"""The padding token of ``--pad-continuation`` (and ``generate``'s ``pad_token_id``)."""


def continuation(context: torch.Tensor, batch: int, padded: bool = False) -> dict[str, torch.Tensor]:
    """``generate``'s ``input_ids`` and ``attention_mask``, ``(batch, T + 1)``: the one-row ``context
    (1, T)`` repeated, then one new token per row. ``padded``: a masked padding token between the two
    (``(batch, T + 2)``), so that every later step's mask over the appended tokens hides one and the
    model passes attention a mask (without padding there it passes none)."""
    new = torch.tensor([[PAD, 11] if padded else [11]], dtype=context.dtype, device=context.device)
    ids = torch.cat([context, new], dim=-1).expand(batch, -1).contiguous()
    mask = torch.ones_like(ids)
    if padded:
        mask[:, -2] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def generate_ms(model, cache, inputs: dict[str, torch.Tensor], new_tokens: int, warmup: int, sync: bool) -> list[float]:
    """ms of each step of ``model.generate`` continuing ``cache`` after ``inputs`` (:func:`continuation`)
    for ``new_tokens`` tokens, the first ``warmup`` steps dropped. Appends to ``cache``."""
    clock = StepClock(sync)
    model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD,
        logits_processor=LogitsProcessorList([clock]), **cache_kwarg(model, cache),
    )  # fmt: skip
    return clock.step_ms(warmup)


def loop_ms(model, cache, length: int, batch: int, steps: int, meter: Meter) -> list[float]:
    """ms of each of ``steps`` steps of :func:`benchmarks.perf.run.decode_times` (its own loop, one
    mask slice per step) on the ``batch``-row ``cache``, after cropping it back to ``length``."""
    restore_length(cache, length)
    return decode_times(model, cache, batch, steps, meter)


@dataclass
class Timings:
    """One budget's timings in one (length, batch) cell: per round, the median ms/step of ``generate``
    (and of the hand-written loop with ``--with-loop``)."""

    rounds: list[float] = field(default_factory=list)
    loop_rounds: list[float] = field(default_factory=list)


def rotated(items: list[str], turn: int) -> list[str]:
    """``items`` rotated left by ``turn``: round ``turn``'s order."""
    k = turn % len(items) if items else 0
    return items[k:] + items[:k]


def time_cell(
    model, rows: dict[str, OneRow], context: torch.Tensor, batch: int, args, meter: Meter
) -> dict[str, Timings]:
    """Interleaved rounds over the budgets of ``rows`` at ``batch``: each builds the budget's
    batch-sized cache, times one ``generate`` on it (and the loop), and frees it. One untimed short
    ``generate`` per budget first (kernels, allocator pools at this batch)."""
    inputs = continuation(context, batch, args.pad_continuation)
    length = inputs["input_ids"].shape[1] - 1  # the cache's length once generate has fed the continuation
    sync = meter.cuda and defers_stop_check(model.device)
    out = {budget: Timings() for budget in rows}

    def once(budget: str, tokens: int, timings: Timings | None) -> None:
        cache = repeated(rows[budget].cache, batch)
        try:
            ms = generate_ms(model, cache, inputs, tokens, args.warmup if timings else 0, sync)
            if timings is not None:
                timings.rounds.append(statistics.median(ms))
                if args.with_loop:
                    timings.loop_rounds.append(
                        statistics.median(loop_ms(model, cache, length, batch, tokens - args.warmup, meter))
                    )
        finally:
            del cache
            meter.free()

    for budget in rows:
        once(budget, min(args.new_tokens, args.warmup + 2), None)
    for turn in range(args.reps):
        for budget in rotated(list(rows), turn):
            once(budget, args.new_tokens, out[budget])
    return out


CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
"""The profiler's names of the CUDA runtime calls that block the host until the GPU has caught up."""
READ = "aten::_local_scalar_dense"
"""The operator under every ``.item()`` / ``bool()`` of a tensor: a value read back to the host."""


def diagnose(model, cache, inputs: dict[str, torch.Tensor], tokens: int, on_gpu: bool) -> dict:
    """GPU busy ms per step, values read back to the host per step and CUDA syncs per step of one
    profiled ``generate`` of ``tokens`` tokens (warm-up included: every forward counts as a step).
    On CUDA a read is one of the syncs; a sync without a read is a copy to the host or an explicit one."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        generate_ms(model, cache, inputs, tokens, 0, False)
        wall = time.perf_counter() - start
    found = summarize(prof.events(), wall, on_gpu)
    return {
        "gpu_busy_ms": round(found.busy_us / 1000 / tokens, 3) if on_gpu else None,
        "reads_per_step": round(found.syncs[READ] / tokens, 2),
        "cuda_syncs_per_step": round(sum(found.syncs[name] for name in CUDA_SYNCS) / tokens, 2),
        "syncs": dict(found.syncs),
    }


def diagnose_cell(
    model, rows: dict[str, OneRow], context: torch.Tensor, batch: int, tokens: int, padded: bool, meter: Meter
) -> dict[str, dict]:
    """:func:`diagnose` for every budget of ``rows`` at ``batch`` (after the timed rounds, so that the
    profiler cannot slow them), each on a fresh batch-sized cache freed after; ``padded``: as
    :func:`continuation`."""
    inputs = continuation(context, batch, padded)
    out = {}
    for budget, row in rows.items():
        cache = repeated(row.cache, batch)
        try:
            out[budget] = diagnose(model, cache, inputs, tokens, meter.cuda)
        finally:
            del cache
            meter.free()
    return out


# ---------------------------------------------------------------------------------------------- rows


def speed_against(mine: list[float], reference: list[float]) -> tuple[float | None, list[float] | None]:
    """The speed of ``mine`` against ``reference`` (per-round medians, same rounds): the median of the
    per-round ratios ``reference / mine`` (above 1: faster) and their range; None without a reference."""
    if not reference or not mine:
        return None, None
    ratios = [r / m for r, m in zip(reference, mine)]
    return round(statistics.median(ratios), 3), [round(min(ratios), 3), round(max(ratios), 3)]


def cell_rows(
    length: int, batch: int, rows: dict[str, OneRow], timings: dict[str, Timings], diagnostics: dict[str, dict]
) -> list[dict]:
    """One JSONL row per budget of a timed cell."""
    out = []
    uniform, none = timings.get(UNIFORM), timings.get(NONE)
    for budget, t in timings.items():
        ms = statistics.median(t.rounds)
        vs_uniform, vs_uniform_range = speed_against(t.rounds, uniform.rounds if uniform else [])
        vs_none, vs_none_range = speed_against(t.rounds, none.rounds if none else [])
        row = {
            "tokens": length, "batch": batch, "budget": budget, "ms_per_token": round(ms, 3),
            "ms_min": round(min(t.rounds), 3), "ms_max": round(max(t.rounds), 3), "round_ms": [round(x, 3) for x in t.rounds],
            "vs_uniform": vs_uniform, "vs_uniform_range": vs_uniform_range, "vs_none": vs_none, "vs_none_range": vs_none_range,
            "varlen_layers": rows[budget].varlen_layers, "kv_mib_one_row": round(rows[budget].kv_bytes / 2**20, 1),
            "prefill_s": round(rows[budget].prefill_s, 3),
        }  # fmt: skip
        if t.loop_rounds:
            row["loop_ms_per_token"] = round(statistics.median(t.loop_rounds), 3)
            row["loop_vs_uniform"], row["loop_vs_uniform_range"] = speed_against(
                t.loop_rounds, uniform.loop_rounds if uniform else []
            )
        found = diagnostics.get(budget)
        if found:
            row.update(found)
            row["gpu_busy_share"] = None if found["gpu_busy_ms"] is None else round(found["gpu_busy_ms"] / ms, 3)
        out.append(row)
    return out


def skipped_row(length: int, batch: int, budget: str, reason: str) -> dict:
    return {"tokens": length, "batch": batch, "budget": budget, "ms_per_token": None, "skipped": reason}


def fitting(rows: dict[str, OneRow], batch: int, args, meter: Meter) -> tuple[dict[str, OneRow], dict[str, str]]:
    """The budgets of ``rows`` whose ``batch``-row copy fits, and the reason of each one that does not."""
    free = free_bytes(meter, args.memory_gib)
    fit, reasons = {}, {}
    for budget, row in rows.items():
        need = bytes_needed(row.cache, batch, args.new_tokens, int(args.headroom_gib * GIB))
        if free is None or need <= free:
            fit[budget] = row
        else:
            reasons[budget] = f"needs {size(need)} at batch {batch}, {size(free)} free"
    return fit, reasons


def write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------- main


def run_length(model, length: int, args, meter: Meter, path: Path) -> list[dict]:
    """Every batch of ``args.batches`` at context ``length``; the rows, also written to ``path``."""
    g = torch.Generator().manual_seed(length)
    context = torch.randint(10, model.config.vocab_size, (1, length), generator=g).to(model.device)
    rows = {budget: build_one_row(model, context, budget, args.scorer, args.ratio, meter) for budget in args.budgets}
    written: list[dict] = []
    gone: dict[str, str] = {}  # budgets skipped at a smaller batch: larger ones cannot fit either
    for batch in sorted(args.batches):
        fit, reasons = fitting(rows, batch, args, meter)
        for budget, reason in reasons.items():
            gone[budget] = reason
            del rows[budget]  # its one-row cache is freed for the others
        skipped = [skipped_row(length, batch, b, gone[b]) for b in args.budgets if b in gone]
        timings = time_cell(model, fit, context, batch, args, meter) if fit else {}
        diagnostics = (
            diagnose_cell(model, fit, context, batch, args.profile_tokens, args.pad_continuation, meter)
            if fit and args.profile_tokens
            else {}
        )
        cell = cell_rows(length, batch, fit, timings, diagnostics) + skipped
        write_rows(path, cell)
        written += cell
    rows.clear()
    meter.free()
    return written


TABLE_HEAD = (
    "| T | batch | budget | ms/token median (min–max) | speed vs uniform (range) | vs none (range) | "
    "own loop ms/token (vs uniform) | GPU busy ms/step (share) | host reads / CUDA syncs per step | "
    "varlen layers | KV MiB (1 row) |"
)


def _with_range(value: float | None, bounds: list[float] | None) -> str:
    return "" if value is None else f"{value} ({bounds[0]}–{bounds[1]})"


def table_line(r: dict) -> str:
    """One markdown line of a JSONL row (timed or skipped)."""
    cells = [r["tokens"], r["batch"], r["budget"]]
    if r["ms_per_token"] is None:
        return "| " + " | ".join(map(str, cells + [f"skipped: {r['skipped']}"] + [""] * 7)) + " |"
    loop = "" if "loop_ms_per_token" not in r else f"{r['loop_ms_per_token']} ({r['loop_vs_uniform']})"
    busy = "" if r.get("gpu_busy_ms") is None else f"{r['gpu_busy_ms']} ({r['gpu_busy_share']})"
    reads = "" if "reads_per_step" not in r else f"{r['reads_per_step']} / {r['cuda_syncs_per_step']}"
    cells += [
        f"{r['ms_per_token']} ({r['ms_min']}–{r['ms_max']})",
        _with_range(r["vs_uniform"], r["vs_uniform_range"]),
        _with_range(r["vs_none"], r["vs_none_range"]),
        loop, busy, reads, r["varlen_layers"], r["kv_mib_one_row"],
    ]  # fmt: skip
    return "| " + " | ".join(map(str, cells)) + " |"


def print_table(rows: list[dict], info: dict) -> None:
    """The rows as one markdown table, after a line on the machine and the run."""
    run = info["args"]
    print(
        f"\n{info['device']}, torch {info['torch']}, transformers {info['transformers']}, {info['date']}; "
        f"{run['new_tokens']} new tokens per call ({run['warmup']} warm-up steps dropped), "
        f"{run['reps']} interleaved repetitions"
    )
    print(TABLE_HEAD)
    print("|---" * TABLE_HEAD.count(" | ") + "|---|")
    for r in rows:
        print(table_line(r))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perf.generate", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--lengths", default="32768,131072", help="context lengths (comma list)")
    parser.add_argument("--batches", default="1,8", help="decode batches: the one-row cache repeated (comma list)")
    parser.add_argument(
        "--budgets", default="none,uniform,adakv,zigzag_heads", help="budgets (comma list); none = uncompressed"
    )
    parser.add_argument("--scorer", default="expected_attention", help="scorer of every compressed cache")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the cache removed")
    parser.add_argument("--new-tokens", type=int, default=32, help="N: tokens generated per call (min and max)")
    parser.add_argument("--warmup", type=int, default=4, help="first steps of each call not counted")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per cell")
    parser.add_argument(
        "--profile-tokens", type=int, default=8, help="tokens of the profiled call per budget and cell (0: none)"
    )
    parser.add_argument(
        "--pad-continuation",
        action="store_true",
        help="a masked padding token before the new one: every step then passes attention a mask",
    )
    parser.add_argument(
        "--with-loop", action="store_true", help="also time benchmarks.perf's own decoding loop in each round"
    )
    parser.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="memory for a batch's cache (default: the GPU's free memory; CPU: unlimited)",
    )
    parser.add_argument("--headroom-gib", type=float, default=2.0, help="memory kept free beyond a cache's own need")
    parser.add_argument("--tiny", action="store_true", help="toy model on the CPU: checks the script, measures nothing")
    parser.add_argument("--out", default="results/perf-generate", help="output folder (generate.jsonl)")
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.budgets = args.budgets.split(",")
    if args.new_tokens < args.warmup + 2:
        parser.error(f"--new-tokens must be at least --warmup + 2 = {args.warmup + 2} (one timed step)")
    return args


def main(argv: list[str] | None = None) -> None:
    import transformers

    args = parse(argv)
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = (tiny_config if args.tiny else llama_8b_config)(max(args.lengths) + args.new_tokens + 256)
    model = build_model(config, device, dtype)
    meter = Meter(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "device": torch.cuda.get_device_name() if not args.tiny else "cpu (tiny check)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "varlen_backend": get_backend(torch.device(device)),
        "stop_check_deferred": defers_stop_check(torch.device(device)),
        "args": vars(args),
    }
    path = out / "generate.jsonl"
    write_rows(path, [{"info": info}])
    rows = []
    for length in args.lengths:
        rows += run_length(model, length, args, meter, path)
    print_table(rows, info)


if __name__ == "__main__":
    main()
