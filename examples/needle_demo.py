"""Compress a long needle-in-a-haystack prompt 4x with ZigZag budgets, then answer from the small cache.

    python examples/needle_demo.py [--tokens 3000] [--ratio 0.75] [--scorer expected_attention] [--pool 5] [--seed 7]

The context is prefilled once and compressed twice, with ZigZag and with uniform budgets, so the two
answers can be compared. Runs on a CPU in under a minute (the first run also converts the model,
about 25 s).
"""

from __future__ import annotations

import argparse
import time

import torch

from zigzag import SpanPooled, cache_kwarg, get_scorer, load_smollm2, prefill_context
from zigzag.testing.needle import needle_prompt


def full_cache_bytes(model, seq: int) -> int:
    """Bytes a plain DynamicCache would hold for ``seq`` tokens (keys + values, all layers)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * seq * head_dim * model.dtype.itemsize


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the docstring's layout."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--tokens", type=int, default=3000, help="haystack length in tokens")
    parser.add_argument("--ratio", type=float, default=0.75, help="fraction of the cache removed")
    parser.add_argument("--scorer", default="expected_attention", help="scorer name (zigzag.scorers)")
    parser.add_argument("--pool", type=int, default=5, help="span pooling kernel (1 = off); see benchmarks/RESULTS.md")
    parser.add_argument("--budget", default="zigzag", help="budget name (zigzag.budget); uniform is also run, for comparison")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth, 0 = start, 1 = end")
    parser.add_argument("--seed", type=int, default=7, help="seed of the needle and its haystack")
    args = parser.parse_args()

    model, tok = load_smollm2(dtype=torch.float32)
    prompt = needle_prompt(tok, args.tokens, depth=args.depth, seed=args.seed)
    ctx = tok(prompt.context, return_tensors="pt", add_special_tokens=False)
    question = tok(prompt.question, return_tensors="pt", add_special_tokens=False).input_ids
    seq = ctx.input_ids.shape[1]

    scorer = get_scorer(args.scorer)
    if args.pool > 1:
        scorer = SpanPooled(scorer, args.pool)
    ids = torch.cat([ctx.input_ids, question], dim=-1)

    def answer_from(cache) -> str:
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwarg(model, cache), max_new_tokens=12, do_sample=False
        )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    start = time.perf_counter()
    prefill = prefill_context(model, ctx)
    cache = prefill.compress(args.ratio, scorer, args.budget, progress=True)
    seconds = time.perf_counter() - start
    answers = {args.budget: answer_from(cache)}
    if args.budget != "uniform":
        answers["uniform"] = answer_from(prefill.compress(args.ratio, scorer, "uniform"))

    before, after = full_cache_bytes(model, seq), cache.nbytes()
    print(f"\ncontext: {seq} tokens, needle at depth {args.depth}; scorer={scorer.name}, ratio={args.ratio}")
    print(f"prefill + compression: {seconds:.1f} s (CPU)")
    print(f"cache memory: {before / 2**20:.1f} MiB uncompressed -> {after / 2**20:.1f} MiB compressed "
          f"({after / before:.1%}, index included)")
    print(f"expected answer: {prompt.answer}")
    for budget, answer in answers.items():
        print(f"  {budget:>8} budgets: model says {answer!r}  {'CORRECT' if prompt.answer in answer else 'WRONG'}")
    print(f"\nper-layer {args.budget} budgets (tokens kept per KV head; uniform would keep {int((1 - args.ratio) * seq)}):")
    budgets = cache.budgets[0].tolist()
    for layer, kept in enumerate(budgets):
        print(f"  layer {layer:2d} {kept:5d} {'#' * round(60 * kept / seq)}")


if __name__ == "__main__":
    main()
