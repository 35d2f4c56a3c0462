"""Per-call time of compression over many calls of varying length: one process, or many on one GPU.

    python -m benchmarks.perf.sweep --out results/sweep                           # 50 calls x 7 settings
    python -m benchmarks.perf.sweep --processes 16 --calls 20 --out results/sweep-16
    python -m benchmarks.perf.sweep --tiny --calls 2 --out /tmp/sweep             # checks the script on the CPU

A SmolLM2-135M-shaped model (30 layers, 9 query / 3 KV heads, head_dim 64) with random weights in
bfloat16 on CUDA (speed does not depend on the weights; ``--model PATH`` loads a real one with
``AutoModelForCausalLM``). ``--calls`` contexts of lengths drawn uniformly from ``--lengths`` (fixed
``--seed``; each process draws its own) are each compressed at ``--ratio`` with every setting of
``--settings`` (``scorer/budget``) and prefilled plainly (``none``, the baseline), after
``--warmup`` untimed calls per setting. The settings take turns call by call, in an order rotated at
every call, so that noise hits all alike; each call is timed between two ``torch.cuda.synchronize``.

Every timed call is a row of ``sweep.rank<r>.jsonl`` in ``--out`` (written as it goes; the folder's
earlier rows are removed first): milliseconds, peak memory above what was allocated before the call,
and the pinned host blocks torch allocated during the call (zigzag's provisional layers park in a
pinned arena that should pin nothing after the first calls). The last thing printed, and written to
``table.md``, is one Markdown table: per setting the median, p90 and max ms, max / median, the median
against uniform budgets with the same scorer and against the plain prefill. ``--processes N`` starts
N worker processes (spawned, each with its own model on the same GPU, all released together by a
barrier once warmed up); the table then pools every process's calls and adds the spread of the
per-process medians.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing.synchronize
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks.cli import HelpFormatter
from benchmarks.perf.run import build_model, plain_prefill, tiny_config
from zigzag import compress_cache

SETTINGS = ("knorm/uniform,knorm/zigzag,expected_attention+pool25/uniform,expected_attention+pool25/zigzag,"
            "snapkv/uniform,snapkv/zigzag")
BASELINE = "none"
MIB = 2**20
BARRIER_TIMEOUT_S = 1800  # a worker that fails before the barrier breaks it for the others instead of hanging them


def smollm2_135m_config(max_positions: int) -> LlamaConfig:
    """SmolLM2-135M's shape: 30 layers, hidden 576, 9 query / 3 KV heads (head_dim 64), MLP 1536, vocab 49152."""
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=max_positions, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )  # fmt: skip


@dataclass(frozen=True)
class Setting:
    """``none`` (the plain prefill) or ``scorer/budget`` compressed at a ratio."""

    name: str

    @property
    def scorer(self) -> str | None:
        return None if self.name == BASELINE else self.name.split("/")[0]

    @property
    def budget(self) -> str | None:
        return None if self.name == BASELINE else self.name.split("/")[1]

    def call(self, model, ids: torch.Tensor, ratio: float) -> Callable[[], object]:
        """The work one timed call runs: ``ids`` is ``(1, length)`` on the model's device."""
        if self.scorer is None:
            return lambda: plain_prefill(model, ids)
        return lambda: compress_cache(model, ids, ratio, self.scorer, self.budget)


def parse_settings(text: str) -> list[Setting]:
    """The plain prefill first, then each ``scorer/budget`` of the comma list (once each)."""
    names = [BASELINE] + [s.strip() for s in text.split(",") if s.strip() and s.strip() != BASELINE]
    for name in names[1:]:
        if name.count("/") != 1:
            raise SystemExit(f"--settings: {name!r} is not scorer/budget")
    return [Setting(n) for n in dict.fromkeys(names)]


def parse_lengths(text: str) -> tuple[int, int]:
    """``"3500-4100"`` -> ``(3500, 4100)``; ``"4000"`` -> ``(4000, 4000)``."""
    low, _, high = text.partition("-")
    low, high = int(low), int(high or low)
    if not 1 <= low <= high:
        raise SystemExit(f"--lengths must be LOW-HIGH with 1 <= LOW <= HIGH; got {text!r}")
    return low, high


def draw_lengths(seed: int, count: int, low: int, high: int) -> list[int]:
    """``count`` lengths uniform in ``[low, high]``, the same for the same seed."""
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(count)]


def token_ids(vocab: int, length: int, seed: int, device: str) -> torch.Tensor:
    """``(1, length)`` random token ids (the same for the same seed) on ``device``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (1, length), generator=g).to(device)


def rotated(items: list, turn: int) -> list:
    """``items`` starting at position ``turn`` (modulo): over ``len(items)`` turns each item holds every position once."""
    k = turn % len(items)
    return items[k:] + items[:k]


def pinned_blocks() -> int | None:
    """Pinned host blocks torch's allocator has created so far (None without CUDA)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None  # no CUDA, or a torch without pinned-memory statistics
    stats = torch.cuda.host_memory_stats()
    return int(stats.get("num_host_alloc", stats.get("allocations.allocated", 0)))  # the second: older torch


def timed(fn: Callable[[], object], cuda: bool) -> dict:
    """One call of ``fn`` between two syncs: ``ms``, ``peak_mib`` above what was allocated before and
    ``pinned`` (host blocks pinned during the call); the result is dropped before returning."""
    pinned = pinned_blocks()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / MIB if cuda else None
    del out
    after = pinned_blocks()
    return {"ms": round(ms, 3), "peak_mib": None if peak is None else round(peak, 2),
            "pinned": None if pinned is None else after - pinned}  # fmt: skip


def load_model(args: argparse.Namespace, device: str, max_positions: int):
    """The model the sweep times, in eval mode on ``device``."""
    if args.model:
        dtype = torch.float32 if args.tiny else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
        return model.to(device).eval().requires_grad_(False)
    if args.tiny:
        return build_model(tiny_config(max_positions), device, torch.float32)
    return build_model(smollm2_135m_config(max_positions), device, torch.bfloat16)


@dataclass(frozen=True)
class Plan:
    """What every worker runs, read from the command line."""

    settings: list[Setting]
    low: int
    high: int
    calls: int
    warmup: int
    seed: int
    ratio: float
    out: Path
    device: str


def worker(rank: int, args: argparse.Namespace, plan: Plan, barrier: multiprocessing.synchronize.Barrier | None) -> None:
    """Warm up, wait at ``barrier`` for every worker, then time ``plan.calls`` calls of every setting,
    writing one row per call to ``sweep.rank<rank>.jsonl``."""
    if args.tiny:
        torch.set_num_threads(1)  # many small ops on a shared CPU: one thread is faster
    model = load_model(args, plan.device, plan.high + 64)
    vocab = model.config.vocab_size
    cuda = plan.device.startswith("cuda")
    seed = plan.seed * 1009 + rank  # each process its own lengths and tokens
    # Warm-up: kernels compiled for both ends of the range and a length inside it, allocators' pools.
    warm = [plan.low, plan.high, *draw_lengths(seed + 7919, max(plan.warmup - 2, 0), plan.low, plan.high)][: plan.warmup]
    for k, length in enumerate(warm):
        ids = token_ids(vocab, length, -1 - k, plan.device)
        for setting in rotated(plan.settings, k):
            timed(setting.call(model, ids, plan.ratio), cuda)
    if barrier is not None:
        barrier.wait(timeout=BARRIER_TIMEOUT_S)
    with open(plan.out / f"sweep.rank{rank}.jsonl", "w") as f:
        for k, length in enumerate(draw_lengths(seed, plan.calls, plan.low, plan.high)):
            ids = token_ids(vocab, length, seed * 100003 + k, plan.device)
            for setting in rotated(plan.settings, k):
                row = {"rank": rank, "call": k, "setting": setting.name, "tokens": length,
                       **timed(setting.call(model, ids, plan.ratio), cuda)}  # fmt: skip
                f.write(json.dumps(row) + "\n")
                f.flush()


def _spawned(rank: int, args: argparse.Namespace, plan: Plan, barrier) -> None:
    """A spawned worker: a failure before the barrier breaks it, so the others stop instead of waiting."""
    try:
        worker(rank, args, plan, barrier)
    except BaseException:
        barrier.abort()
        raise


def run_workers(args: argparse.Namespace, plan: Plan) -> None:
    """``args.processes`` workers, spawned and released together; in this process when there is one."""
    if args.processes == 1:
        worker(0, args, plan, None)
        return
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.processes)
    procs = [ctx.Process(target=_spawned, args=(rank, args, plan, barrier)) for rank in range(args.processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [rank for rank, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise SystemExit(f"workers {failed} failed (exit codes {[procs[r].exitcode for r in failed]})")


# ---------------------------------------------------------------------------------------------- the table


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by linear interpolation between closest ranks."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(rows: list[dict], settings: list[Setting]) -> list[dict]:
    """One summary per setting over all ``rows`` (every process's calls)."""
    medians = {s.name: statistics.median(r["ms"] for r in rows if r["setting"] == s.name) for s in settings}
    out = []
    for s in settings:
        mine = [r for r in rows if r["setting"] == s.name]
        ms = [r["ms"] for r in mine]
        median = medians[s.name]
        uniform = medians.get(f"{s.scorer}/uniform")
        per_rank = [statistics.median(r["ms"] for r in mine if r["rank"] == rank) for rank in sorted({r["rank"] for r in mine})]
        peaks = [r["peak_mib"] for r in mine if r["peak_mib"] is not None]
        pinned = [r["pinned"] for r in mine if r["pinned"] is not None]
        out.append({
            "setting": s.name, "calls": len(ms), "median_ms": median, "p90_ms": percentile(ms, 0.9), "max_ms": max(ms),
            "max_over_median": max(ms) / median,
            "vs_uniform": None if uniform is None or s.budget in (None, "uniform") else median / uniform,
            "vs_none": median / medians[BASELINE], "process_medians": [min(per_rank), max(per_rank)],
            "peak_mib": statistics.median(peaks) if peaks else None, "pinned_blocks": sum(pinned) if pinned else None,
        })  # fmt: skip
    return out


def _number(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def markdown(summary: list[dict], processes: int) -> str:
    """The summaries as a Markdown table (the per-process spread only with several processes)."""
    spread = processes > 1
    head = ["setting", "calls", "median ms", "p90 ms", "max ms", "max/median", "vs uniform", "vs none", "peak MiB", "pinned blocks"]
    if spread:
        head.append("process medians ms (max/min)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["setting"], str(s["calls"]), _number(s["median_ms"]), _number(s["p90_ms"]), _number(s["max_ms"]),
                 _number(s["max_over_median"], 2), _number(s["vs_uniform"], 2), _number(s["vs_none"], 2),
                 _number(s["peak_mib"]), "" if s["pinned_blocks"] is None else str(s["pinned_blocks"])]  # fmt: skip
        if spread:
            low, high = s["process_medians"]
            cells.append(f"{low:.1f}–{high:.1f} ({high / low:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(out.glob("sweep.rank*.jsonl")) for line in path.read_text().splitlines()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.sweep", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--calls", type=int, default=50, help="timed calls per setting and process")
    p.add_argument("--lengths", default=None, help="context lengths LOW-HIGH, drawn uniformly (default 3500-4100; 300-340 with --tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the lengths and tokens (process r uses seed * 1009 + r)")
    p.add_argument("--settings", default=SETTINGS, help="comma list of scorer/budget; the plain prefill (none) always runs")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of the cache removed")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per setting before the timed ones (lengths LOW, HIGH, then random)")
    p.add_argument("--processes", type=int, default=1, help="worker processes sharing the GPU, each with its own model")
    p.add_argument("--model", default=None, help="a Hugging Face folder loaded with AutoModelForCausalLM instead of random weights")
    p.add_argument("--tiny", action="store_true", help="a toy model on the CPU: checks the script, measures nothing")
    p.add_argument("--out", default="results/sweep", help="output folder (sweep.rank<r>.jsonl, info.json, table.md)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.calls < 1 or args.processes < 1 or args.warmup < 0:
        raise SystemExit("--calls and --processes must be at least 1, --warmup at least 0")
    low, high = parse_lengths(args.lengths or ("300-340" if args.tiny else "3500-4100"))
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny to check the script on the CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("sweep.rank*.jsonl"):
        old.unlink()
    plan = Plan(parse_settings(args.settings), low, high, args.calls, args.warmup, args.seed, args.ratio, out, device)
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (tiny check)",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
    }  # fmt: skip
    print(json.dumps(info), flush=True)
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    start = time.perf_counter()
    run_workers(args, plan)
    summary = summarize(read_rows(out), plan.settings)
    table = markdown(summary, args.processes)
    (out / "table.md").write_text(table + "\n")
    print(f"\n{info['device']}, torch {info['torch']}, {args.processes} process(es), {args.calls} calls of "
          f"{low}-{high} tokens per setting, ratio {args.ratio}, {time.perf_counter() - start:.0f} s\n")
    print(table)


if __name__ == "__main__":
    main()
