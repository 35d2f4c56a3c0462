"""Quality of compression while generating: teacher-forced NLL of long continuations, and greedy agreement.

    python -m benchmarks.decoding --model smollm2 --out results/decoding-smollm2

1. **NLL.** A short prompt (kept whole, ``ratio=0.0``) is followed by a long continuation of held-out
   text, teacher-forced in chunks of ``--interval`` tokens: the cache compresses at the start of every
   chunk, exactly as it would while generating one token at a time. The mean negative log-likelihood
   of the continuation's tokens is compared with the full cache's, for each scorer x budget x
   ``max_tokens`` (given as fractions of the final length). Texts: Jane Austen's novels (the
   ``novels`` haystack family) and Python standard-library source code, several windows each.
2. **Greedy agreement.** A chat prompt that asks for a long answer; the compressed cache generates
   ``--greedy-tokens`` tokens greedily, as does the full cache: tokens until the first divergence, and
   the share of the first tokens that match position by position.

Writes ``nll.csv``, ``greedy.csv``, ``results.json`` and ``nll_increase.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sysconfig
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from benchmarks.cli import HelpFormatter
from zigzag import Decoding, cache_kwarg, compress_cache

LONG_ANSWER_PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. "
    "Describe every day of the following month."
)


def code_text() -> str:
    """Python standard-library source files (code, not the docstrings calibration reads), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("test"))
    return "\n\n".join(p.read_text(encoding="utf-8", errors="ignore") for p in files)


def novels_text() -> str:
    from benchmarks.ruler.haystacks import sentences

    return " ".join(sentences("novels"))


def windows(tokenizer, text: str, length: int, count: int, seed: int) -> torch.Tensor:
    """``(count, length)`` token windows from evenly spaced, seeded offsets of ``text``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < count * length:
        raise ValueError(f"the text has {len(ids)} tokens; {count} windows of {length} need more")
    rng = random.Random(seed)
    stride = len(ids) // count
    starts = [i * stride + rng.randrange(stride - length + 1) for i in range(count)]
    return torch.tensor([ids[s : s + length] for s in starts])


@torch.no_grad()
def continuation_nll(
    model, ids: torch.Tensor, prompt: int, interval: int, decoding: Decoding | None, scorer, budget
) -> torch.Tensor:
    """``(batch,)`` mean NLL of ``ids[:, prompt:]`` given everything before, fed ``interval`` tokens at a
    time after the first ``prompt - 1`` (the full cache when ``decoding`` is None)."""
    ctx = {"input_ids": ids[:, : prompt - 1], "attention_mask": torch.ones_like(ids[:, : prompt - 1])}
    if decoding is None:
        cache = DynamicCache(config=model.config)
        model(**ctx, **cache_kwarg(model, cache))
    else:
        cache = compress_cache(model, ctx, ratio=0.0, scorer=scorer, budget=budget, decoding=decoding)
    total = torch.zeros(ids.shape[0], dtype=torch.float64)
    count = 0
    for start in range(prompt - 1, ids.shape[1] - 1, interval):
        chunk = ids[:, start : min(start + interval, ids.shape[1] - 1)]
        mask = torch.ones(ids.shape[0], start + chunk.shape[1], dtype=torch.long)
        logits = model(input_ids=chunk, attention_mask=mask, **cache_kwarg(model, cache)).logits
        target = ids[:, start + 1 : start + 1 + chunk.shape[1]]  # position j predicts token j + 1
        total += torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), target, reduction="none").sum(-1)
        count += target.shape[1]
    return total / count


@torch.no_grad()
def greedy(model, tok, new_tokens: int, decoding: Decoding | None, scorer, budget) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": LONG_ANSWER_PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    cut = ids.shape[1] - 1
    ctx = {"input_ids": ids[:, :cut], "attention_mask": torch.ones_like(ids[:, :cut])}
    kwargs = {}
    if decoding is not None:
        kwargs = cache_kwarg(
            model, compress_cache(model, ctx, ratio=0.0, scorer=scorer, budget=budget, decoding=decoding)
        )
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id, **kwargs)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def agreement(ours: list[int], full: list[int]) -> tuple[int, float]:
    """Tokens before the first divergence, and the share of positions that match."""
    first = next((i for i, (a, b) in enumerate(zip(ours, full)) if a != b), min(len(ours), len(full)))
    n = min(len(ours), len(full))
    return first, sum(a == b for a, b in zip(ours[:n], full[:n])) / max(n, 1)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = sorted({r["text"] for r in rows})
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5), squeeze=False, sharey=True)
    for ax, text in zip(axes[0], texts):
        lines: dict[tuple, list] = {}
        for r in rows:
            if r["text"] == text:
                lines.setdefault((r["scorer"], r["budget"]), []).append((r["fraction"], 100 * r["increase"]))
        for (scorer, budget), pts in sorted(lines.items()):
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=f"{scorer} / {budget}")
        ax.axhline(5, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max_tokens / final length")
        ax.set_title(f"{text}: NLL increase over the full cache")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("NLL increase (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.decoding", description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("--model", default="smollm2", help="evaluation model (python -m benchmarks.models list) or a path")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (kept whole)")
    p.add_argument("--continuation", type=int, default=2048, help="teacher-forced continuation tokens")
    p.add_argument("--samples", type=int, default=3, help="text windows per text (rows of one batch)")
    p.add_argument("--fractions", default="0.125,0.25,0.5", help="max_tokens as fractions of prompt + continuation")
    p.add_argument("--scorers", default="knorm,tova,expected_attention+pool25", help="comma list of scorer names")
    p.add_argument("--budgets", default="uniform,zigzag", help="comma list of budget names")
    p.add_argument("--interval", type=int, default=64, help="tokens between compression events")
    p.add_argument("--recent", type=int, default=32, help="most recent tokens always kept")
    p.add_argument("--texts", default="novels,code", help="novels, code")
    p.add_argument("--greedy-tokens", type=int, default=512, help="greedy tokens for the agreement measure (0: skip)")
    p.add_argument("--seed", type=int, default=1000, help="picks the text windows")
    args = p.parse_args(argv)

    from benchmarks.models import load_eval_model

    model, tok = load_eval_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    length = args.prompt + args.continuation
    fractions = [float(f) for f in args.fractions.split(",")]
    settings = [(s, b, f) for s in args.scorers.split(",") for b in args.budgets.split(",") for f in fractions]
    sources = {"novels": novels_text, "code": code_text}
    rows: list[dict] = []
    started = time.time()
    for text in args.texts.split(","):
        ids = windows(tok, sources[text](), length, args.samples, args.seed)
        full = continuation_nll(model, ids, args.prompt, args.interval, None, None, None)
        for scorer, budget, fraction in tqdm(settings, desc=f"nll {text}"):
            decoding = Decoding(max_tokens=int(fraction * length), interval=args.interval, recent=args.recent)
            nll = continuation_nll(model, ids, args.prompt, args.interval, decoding, scorer, budget)
            rows.append({"text": text, "scorer": scorer, "budget": budget, "fraction": fraction,
                         "max_tokens": decoding.max_tokens, "nll_full": float(full.mean()), "nll": float(nll.mean()),
                         "increase": float((nll / full - 1).mean())})  # fmt: skip
    write_csv(args.out / "nll.csv", rows)
    plot(rows, args.out / "nll_increase.png")

    greedy_rows: list[dict] = []
    if args.greedy_tokens:
        reference = greedy(model, tok, args.greedy_tokens, None, None, None)
        for scorer, budget, fraction in tqdm(settings, desc="greedy"):
            decoding = Decoding(
                max_tokens=int(fraction * args.greedy_tokens), interval=args.interval, recent=args.recent
            )
            first, share = agreement(greedy(model, tok, args.greedy_tokens, decoding, scorer, budget), reference)
            greedy_rows.append({"scorer": scorer, "budget": budget, "fraction": fraction, "max_tokens": decoding.max_tokens,
                                "first_divergence": first, "match": share})  # fmt: skip
        write_csv(args.out / "greedy.csv", greedy_rows)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps({"args": meta, "nll": rows, "greedy": greedy_rows,
                                                       "seconds": round(time.time() - started)}, indent=1))  # fmt: skip
    best = min(rows, key=lambda r: (r["fraction"] != 0.25, r["increase"]))
    print(
        f"best at a quarter of the tokens: {best['scorer']} / {best['budget']} on {best['text']}: {100 * best['increase']:+.2f}% NLL"
    )


if __name__ == "__main__":
    main()
