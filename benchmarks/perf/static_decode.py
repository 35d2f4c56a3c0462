"""Compiled decoding: the static compressed cache's CUDA-graph step against eager and compiled baselines.

    python -m benchmarks.perf.static_decode --length 32768 --batches 1,16
    python -m benchmarks.perf.static_decode --tiny          # toy model on the CPU: checks the script

One row of random tokens is compressed once per budget (``--budgets``, ``--scorer``, ``--ratio``) on the
Llama-3.1-8B shape with random weights, and kept; for each batch in ``--batches`` every method decodes
greedily from a batch-sized copy (the row repeated), built just before it and freed after:

* ``eager none``: the uncompressed DynamicCache, the model called once per token (transformers' eager
  decoding, what ``generate`` runs at its core);
* ``hf static+compile none``: transformers' StaticCache, filled with the same prefix, decoded by
  ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`` (its documented fast path);
* ``eager <budget>``: the compressed :class:`~zigzag.ZigZagCache` through the same eager loop;
* ``graph <budget>``: :class:`~zigzag.static.StaticDecoder`, each step one CUDA graph replay;
* ``compile+graph <budget>`` (budgets in ``--compile-budgets``): the same with the step compiled first.

Each method runs a warm-up (its compilation or capture, timed apart), then ``--reps`` windows of
``--steps`` steps between two synchronisations: the table gives the median ms per token over windows
(and the range), tokens/s for the batch, the speed against eager uncompressed decoding, and the memory
the cache holds. A method that does not fit in GPU memory at a batch is skipped with the reason, checked
before it allocates. Rows go to ``--out``/static_decode.jsonl as they come.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache, StaticCache

from benchmarks.cli import HelpFormatter
from benchmarks.perf.run import GIB, Meter, build_model, cache_bytes, llama_8b_config, plain_prefill, tiny_config
from zigzag import cache_kwarg, compress_cache
from zigzag.static import StaticDecoder


def timed_windows(step: Callable[[], None], steps: int, reps: int, sync: Callable[[], None]) -> list[float]:
    """Milliseconds per step of ``reps`` windows of ``steps`` calls, each window between two syncs."""
    out = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        out.append((time.perf_counter() - start) * 1e3 / steps)
    return out


def eager_loop(model, cache, batch: int, position: int, device: str):
    """A ``steps``-token greedy decoder over ``cache`` in eager mode: returns ``run(steps)``."""
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    state = {"position": position}

    def run(steps: int) -> None:
        nonlocal token
        for _ in range(steps):
            pos = torch.full((batch, 1), state["position"], device=device)
            out = model(input_ids=token, position_ids=pos, use_cache=True, logits_to_keep=1, **cache_kwarg(model, cache))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            state["position"] += 1

    return run


def hf_static_cache(model, prefix: DynamicCache, batch: int, max_len: int) -> StaticCache:
    """transformers' StaticCache of ``max_len`` slots holding ``prefix`` (one row) repeated to ``batch``."""
    static = StaticCache(config=model.config, max_cache_len=max_len)
    for layer, full in zip(static.layers, prefix.layers):
        layer.lazy_initialization(full.keys[:, :, :1].expand(batch, -1, -1, -1), full.values[:, :, :1].expand(batch, -1, -1, -1))
        length = full.keys.shape[2]
        layer.keys[:, :, :length].copy_(full.keys.expand(batch, -1, -1, -1))
        layer.values[:, :, :length].copy_(full.values.expand(batch, -1, -1, -1))
        layer.cumulative_length.fill_(length)
    return static


def hf_compiled_loop(model, cache: StaticCache, batch: int, position: int, device: str, compile_mode: str):
    forward = torch.compile(model.forward, mode=compile_mode, fullgraph=True)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.full((batch, 1), position, dtype=torch.long, device=device)

    def run(steps: int) -> None:
        for _ in range(steps):
            out = forward(input_ids=token, position_ids=pos, use_cache=True, logits_to_keep=1, **cache_kwarg(model, cache))
            token.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
            pos.add_(1)

    return run


def fits(need_bytes: int, device: str) -> str | None:
    """None when ``need_bytes`` more fit on ``device`` (with 2 GiB to spare), else why not."""
    if not device.startswith("cuda"):
        return None
    free, _ = torch.cuda.mem_get_info()
    if need_bytes + 2 * GIB > free:
        return f"needs {need_bytes / GIB:.1f} GiB, {free / GIB:.1f} GiB free"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--length", type=int, default=32768, help="context tokens")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the cache removed")
    parser.add_argument("--scorer", default="snapkv", help="scorer of every compressed cache")
    parser.add_argument("--budgets", default="uniform,zigzag,adakv", help="compressed caches timed")
    parser.add_argument("--compile-budgets", default="zigzag", help="budgets also timed with the step compiled ('' for none)")
    parser.add_argument("--batches", default="1,16", help="decode batches: the one-row caches repeated (comma list)")
    parser.add_argument("--steps", type=int, default=64, help="steps per timed window")
    parser.add_argument("--reps", type=int, default=3, help="timed windows per method")
    parser.add_argument("--no-hf-compile", action="store_true", help="skip transformers' static cache + torch.compile")
    parser.add_argument("--tiny", action="store_true", help="toy model on the CPU: checks the script, measures nothing")
    parser.add_argument("--out", default="results/static-decode", help="output folder (static_decode.jsonl)")
    args = parser.parse_args(argv)

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    length = min(args.length, 256) if args.tiny else args.length
    room = (args.reps + 2) * args.steps + 16
    config = tiny_config(length + room + 64) if args.tiny else llama_8b_config(length + room + 64)
    model = build_model(config, device, dtype)
    meter = Meter(device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_path = out_dir / "static_decode.jsonl"
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "length": length, "ratio": args.ratio, "scorer": args.scorer, "steps": args.steps, "reps": args.reps,
    }  # fmt: skip
    import transformers

    info["transformers"] = transformers.__version__
    print(json.dumps(info))
    torch.manual_seed(1234)
    ids = torch.randint(0, config.vocab_size, (1, length), device=device)
    budgets = [b for b in args.budgets.split(",") if b]
    compiled = {b for b in args.compile_budgets.split(",") if b}
    prefix = plain_prefill(model, ids)
    caches = {b: compress_cache(model, {"input_ids": ids}, args.ratio, args.scorer, b) for b in budgets}
    rows: list[dict] = []

    def record(row: dict) -> None:
        row = {**info, **row}
        rows.append(row)
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def measure(method: str, budget: str, batch: int, need: int, build: Callable[[], tuple[Callable[[int], None], int]]) -> None:
        meter.free()  # the last method's cache goes first, or it would count against this one
        why = fits(need, device)
        if why is not None:
            record({"method": method, "budget": budget, "batch": batch, "skipped": why})
            return
        try:
            meter.free()
            start = time.perf_counter()
            run, held = build()
            run(2)  # warm-up: compilation, capture, first launches
            meter.sync()
            setup_s = time.perf_counter() - start
            times = timed_windows(lambda: run(args.steps), args.steps, args.reps, meter.sync)
            ms = statistics.median(times)
            record({
                "method": method, "budget": budget, "batch": batch, "ms_per_token": ms, "ms_min": min(times),
                "ms_max": max(times), "tokens_per_s": batch * 1e3 / ms, "setup_s": setup_s, "cache_gib": held / GIB,
            })  # fmt: skip
        except Exception as error:  # noqa: BLE001 (a failed method is a row, not the end of the run)
            traceback.print_exc()
            record({"method": method, "budget": budget, "batch": batch, "error": f"{type(error).__name__}: {error}"[:500]})
        finally:
            meter.free()

    full_bytes = cache_bytes(prefix)
    for batch in [int(b) for b in args.batches.split(",")]:
        def eager_none(batch=batch):
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(batch)
            return eager_loop(model, cache, batch, length, device), cache_bytes(cache)

        measure("eager", "none", batch, full_bytes * batch, eager_none)

        if not args.no_hf_compile and device == "cuda":
            def hf_static(batch=batch):
                cache = hf_static_cache(model, prefix, batch, length + room)
                return hf_compiled_loop(model, cache, batch, length, device, "reduce-overhead"), cache_bytes(cache)

            measure("hf static+compile", "none", batch, full_bytes * batch * (length + room) // length, hf_static)

        for budget in budgets:
            one_row = caches[budget]

            def eager_compressed(one_row=one_row, batch=batch):
                cache = copy.deepcopy(one_row)
                cache.batch_repeat_interleave(batch)
                return eager_loop(model, cache, batch, length, device), cache.nbytes()

            def static(one_row=one_row, compile=False, batch=batch):
                cache = copy.deepcopy(one_row)
                cache.batch_repeat_interleave(batch)
                decoder = StaticDecoder(model, cache, room, compile=compile, consume=True)
                del cache
                decoder.feed(torch.zeros(batch, 1, dtype=torch.long, device=device))
                return decoder.decode, decoder.cache.nbytes()

            need = one_row.nbytes() * batch
            measure("eager", budget, batch, need, eager_compressed)
            measure("graph", budget, batch, need + need // 8, static)  # consume=True: the copy is released layer by layer
            if budget in compiled:
                measure("compile+graph", budget, batch, need + need // 8, lambda one_row=one_row: static(one_row, compile=True))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    base = {r["batch"]: r["ms_per_token"] for r in rows if r["method"] == "eager" and r["budget"] == "none" and "ms_per_token" in r}
    print("\n| batch | method | budget | ms/token (min-max) | tokens/s | vs eager none | cache GiB | setup s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ms_per_token" not in r:
            print(f"| {r['batch']} | {r['method']} | {r['budget']} | {r.get('skipped') or r.get('error')} | | | | |")
            continue
        speed = f"{base[r['batch']] / r['ms_per_token']:.2f}x" if r["batch"] in base else ""
        print(
            f"| {r['batch']} | {r['method']} | {r['budget']} | {r['ms_per_token']:.2f} ({r['ms_min']:.2f}-{r['ms_max']:.2f}) | "
            f"{r['tokens_per_s']:.0f} | {speed} | {r['cache_gib']:.2f} | {r['setup_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
