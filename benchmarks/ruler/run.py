"""Run the RULER-style sweep: every (task, protocol) batch is prefilled once and compressed per setting.

    python -m benchmarks.ruler --length 4096 --samples 50 --seed 1000 --out results/ruler-4k
    python -m benchmarks.ruler --model qwen05 --haystack essays,novels,manuals,noise ...
    accelerate launch --num_processes 2 -m benchmarks.ruler ...   # data parallel, same results
    python -m benchmarks.ruler --shard 0/8 ... & ... --shard 7/8   # 8 processes sharing one GPU

Haystacks: ``--haystack ruler`` keeps RULER's own filler per task (noise or essays); a list of
families (``benchmarks.ruler.haystacks.FAMILIES``) builds every task on each family in turn, with
samples drawn independently per family. Records carry the family in ``haystack``.

Protocols: ``agnostic`` compresses the context only; the question and the answer prefix
come after, at positions continuing from the original length. ``aware`` compresses the context and
the question; only the end of the user turn and the answer prefix come after. The chat template is
applied when the tokenizer has one.

Budgets that are calibrated offline (``sensitivity``) read the profile given by ``--calibration``
(write one with ``python -m zigzag.calibrate sensitivity``).

Output folder: ``samples.rank<k>.jsonl`` (one record per sample and setting, appended as they finish,
so an interrupted run resumes where it stopped), ``budgets.rank<k>.jsonl`` (mean per-layer budgets),
then, written by rank 0 once all ranks are done: ``summary.csv`` and the plots (see report.py).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.cli import HelpFormatter
from benchmarks.ruler.haystacks import FAMILIES
from benchmarks.ruler.tasks import TASKS, Sample, generate_task, score_output
from zigzag import BUDGETS, cache_kwarg, get_budget, get_scorer, prefill_context
from zigzag.merge import CosineMerge
from zigzag.scorers import with_reconstruction
from zigzag.scorers.kvzip import DEFAULT_PROMPT, Reconstruction

MERGE_MODES = {"off": None, "cosine": CosineMerge(), "cosine+mass": CosineMerge(preserve_mass=True)}

log = logging.getLogger("benchmarks.ruler")

PROTOCOLS = ("agnostic", "aware")
DEV_SEED_LIMIT = 1000  # seeds below this are for development; reported runs use seeds >= 1000
# Longest answers: UUIDs are ~25 tokens each, multi-value/query answers hold four 7-digit numbers.
MAX_NEW_TOKENS = {
    "niah_single_3": 64, "niah_multikey_3": 64, "niah_multivalue": 48, "niah_multiquery": 48,
    "niah": 32, "vt": 30, "cwe": 64, "fwe": 32, "qa": 32,
}


@dataclass(frozen=True)
class Setting:
    """One compression setting; ``scorer == "none"`` is the uncompressed baseline (ratio 0)."""

    scorer: str
    budget: str
    ratio: float
    merge: str = "off"

    @property
    def key(self) -> str:
        return f"{self.scorer}|{self.budget}|{self.ratio:g}|{self.merge}"


def settings_from(scorers: list[str], budgets: list[str], ratios: list[float], merges: list[str]) -> list[Setting]:
    out = [Setting("none", "none", 0.0)]
    out += [Setting(s, b, r, m) for s in scorers for b in budgets for r in ratios for m in merges]
    return out


def make_scorer(spec: str, reconstruction: Reconstruction | None = None):
    """A registry name with optional wrapper suffixes (``zigzag.scorers.WRAPPER_SUFFIXES``), e.g.
    ``expected_attention+pool5`` (span pooling) or ``expected_attention+pool5+shared+first64``.
    ``reconstruction``: how KVzip scorers (``kvzip+pool7``) repeat the context; None keeps the default."""
    scorer = get_scorer(spec)
    return scorer if reconstruction is None else with_reconstruction(scorer, reconstruction)


def make_budget(spec: str, calibration: Path | None = None):
    """A registry budget name with option suffixes; calibrated ones (``sensitivity+bound0.5``) read
    their profile from ``calibration`` (None: an error that says so)."""
    name = spec.split("+")[0].strip().lower()
    calibrated = getattr(BUDGETS.get(name), "calibrated", False)
    return get_budget(spec, profile=calibration if calibrated else None)


def reconstruction_for(tokenizer, prompt: str, settings: list[Setting]) -> Reconstruction | None:
    """The reconstruction the settings' KVzip scorers read (``prompt`` in words; "" for none), or None
    when no setting reconstructs the context (then the prefill skips the second pass)."""
    if all(getattr(get_scorer(s.scorer), "reconstruction", None) is None for s in settings if s.scorer != "none"):
        return None
    return Reconstruction.from_text(tokenizer, prompt) if prompt else Reconstruction()


def max_new_tokens(task: str) -> int:
    return next(v for k, v in MAX_NEW_TOKENS.items() if task.startswith(k))


def split_prompt(tokenizer, sample: Sample, protocol: str) -> tuple[str, str]:
    """Chat-formatted prompt split into (compressed part, continuation)."""
    user = f"{sample.context}\n\n{sample.question}"
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = user + "\n"
    text += sample.answer_prefix
    anchor = sample.context if protocol == "agnostic" else sample.question
    cut = text.index(user) + (len(sample.context) if protocol == "agnostic" else len(user))
    assert text[cut - len(anchor) : cut] == anchor
    return text[:cut], text[cut:]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def run_batch(
    model,
    tokenizer,
    samples: list[Sample],
    protocol: str,
    settings: list[Setting],
    device,
    kvzip_prompt: str = DEFAULT_PROMPT,
    calibration: Path | None = None,
) -> Iterator[tuple]:
    """Yield ``(setting, sample, output, budgets)`` for every setting over one batch of samples.
    ``kvzip_prompt``: the words between the context and its repeat for KVzip scorers ("" for none);
    ``calibration``: the profile of calibrated budgets (see :func:`make_budget`)."""
    parts = [split_prompt(tokenizer, s, protocol) for s in samples]
    ctx_rows = [tokenizer.encode(c, add_special_tokens=False) for c, _ in parts]
    cont_rows = [tokenizer.encode(q, add_special_tokens=False) for _, q in parts]
    pad = tokenizer.pad_token_id
    ctx_ids, ctx_mask = _left_pad(ctx_rows, pad)
    cont_ids, cont_mask = _left_pad(cont_rows, pad)  # padding inside the prompt is masked like any other
    ids = torch.cat([ctx_ids, cont_ids], dim=-1).to(device)
    mask = torch.cat([ctx_mask, cont_mask], dim=-1).to(device)
    ctx = {"input_ids": ctx_ids.to(device), "attention_mask": ctx_mask.to(device)}
    reconstruction = reconstruction_for(tokenizer, kvzip_prompt, settings)
    pre = prefill_context(model, ctx, reconstruction=reconstruction)
    new_tokens = max(max_new_tokens(s.task) for s in samples)
    for setting in settings:
        if setting.scorer == "none":
            cache, budgets = None, None
        else:
            cache = pre.compress(
                setting.ratio,
                make_scorer(setting.scorer, reconstruction),
                make_budget(setting.budget, calibration),
                merge=MERGE_MODES[setting.merge],
            )
            budgets = cache.budgets.float().mean(0).tolist()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **cache_kwarg(model, cache),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        for sample, text in zip(samples, texts):
            yield setting, sample, text, budgets
        del cache


def _done_keys(out_dir: Path) -> set[tuple]:
    done = set()
    for path in out_dir.glob("samples.rank*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["task"], r.get("haystack", "ruler"), r["index"], r["protocol"], r["setting"]))
    return done


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ruler", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", "--model-path", dest="model", default="smollm2",
                   help="an evaluation model's short name (python -m benchmarks.models list: smollm2, qwen05), "
                        "a Hugging Face folder or a .gguf file")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype (None: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--length", type=int, default=4096, help="target prompt length in tokens")
    p.add_argument("--haystack", default="ruler",
                   help="comma list of haystack families (essays, novels, manuals, noise) or 'ruler' "
                        "(RULER's own filler per task)")
    p.add_argument("--tasks", default="all", help=f"comma list or 'all' ({', '.join(TASKS)})")
    p.add_argument("--scorers", default="knorm,snapkv,expected_attention,tova,streaming_llm",
                   help="comma list of scorer names with optional suffixes, applied left to right: +pool<k>, "
                        "+maxpool<k>, +shared, +sharedmax, +first<n>, +last<n> (e.g. expected_attention+pool5+first64)")
    p.add_argument("--budgets", default="uniform,pyramid,zigzag",
                   help="comma list of budget names (uniform, pyramid, zigzag, adakv, zigzag_heads) with optional "
                        "+<option><value> suffixes, e.g. zigzag+skip2+cap2, zigzag_heads+gamma0.5")
    p.add_argument("--kvzip-prompt", default=DEFAULT_PROMPT,
                   help="words between the context and its repeat for kvzip scorers ('' for none)")
    p.add_argument("--merge", default="off", help=f"comma list of merge modes: {', '.join(MERGE_MODES)}")
    p.add_argument("--ratios", default="0.25,0.5,0.75,0.875", help="comma list of compression ratios (fraction removed)")
    p.add_argument("--protocols", default="agnostic,aware",
                   help=f"comma list of {', '.join(PROTOCOLS)}: question after the compressed context, or inside it")
    p.add_argument("--samples", type=int, default=50, help="samples per task")
    p.add_argument("--batch-size", type=int, default=16, help="samples compressed and generated together")
    p.add_argument("--seed", type=int, default=DEV_SEED_LIMIT, help=f"seeds < {DEV_SEED_LIMIT} are development seeds")
    p.add_argument("--calibration", type=Path, default=None,
                   help="profile of calibrated budgets (sensitivity), from python -m zigzag.calibrate")
    p.add_argument("--shard", default=None,
                   help="K/N: run only the (family, task) cells K, K+N, K+2N, ... without a process group "
                        "(N processes may share one GPU); write the report afterwards with "
                        "python -m benchmarks.ruler.report")
    p.add_argument("--out", type=Path, required=True, help="output folder (a rerun resumes what is in it)")
    p.add_argument("--no-plots", action="store_true", help="write summary.csv only, no PNG plots")
    args = p.parse_args(argv)
    args.tasks = list(TASKS) if args.tasks == "all" else args.tasks.split(",")
    for name, known in (("tasks", TASKS), ("protocols", PROTOCOLS)):
        values = getattr(args, name) if name == "tasks" else getattr(args, name).split(",")
        unknown = [v for v in values if v not in known]
        if unknown:
            p.error(f"unknown {name} {unknown}; known: {', '.join(known)}")
        setattr(args, name, values)
    # Scorers and budgets are names with optional suffixes: ``expected_attention+pool5+first64``,
    # ``zigzag+skip2+cap2`` (see zigzag.scorers.WRAPPER_SUFFIXES and zigzag.budget.BUDGET_OPTIONS).
    args.haystack = args.haystack.split(",")
    if unknown := [h for h in args.haystack if h != "ruler" and h not in FAMILIES]:
        p.error(f"unknown haystack families {unknown}; known: ruler, {', '.join(FAMILIES)}")
    if args.shard is not None:
        try:
            k, n = (int(x) for x in args.shard.split("/"))
        except ValueError:
            p.error(f"--shard must be K/N with integers; got {args.shard!r}")
        if not 0 <= k < n:
            p.error(f"--shard K/N needs 0 <= K < N; got {args.shard!r}")
        args.shard = (k, n)
    if args.calibration is not None and not args.calibration.is_file():
        p.error(f"--calibration {args.calibration} is not a file")
    for name, build in (("scorers", get_scorer), ("budgets", lambda spec: make_budget(spec, args.calibration))):
        values = getattr(args, name).split(",")
        for v in values:
            try:
                build(v)
            except (ValueError, TypeError) as e:
                p.error(f"bad {name[:-1]} {v!r}: {e}")
        setattr(args, name, values)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    if any(not 0 < r < 1 for r in args.ratios):
        p.error("ratios must lie in (0, 1)")
    args.merge = args.merge.split(",")
    if unknown := [m for m in args.merge if m not in MERGE_MODES]:
        p.error(f"unknown merge modes {unknown}; known: {', '.join(MERGE_MODES)}")
    return args


@dataclass(frozen=True)
class _Shard:
    """This process's share of the samples: ``process_index`` of ``num_processes``, without a process
    group (``--shard``), standing in for accelerate's state."""

    process_index: int
    num_processes: int
    device: torch.device

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:  # independent processes: the report is written afterwards
        pass


def main(argv: list[str] | None = None) -> None:
    from benchmarks.models import load_eval_model
    from benchmarks.ruler.report import write_report

    args = parse_args(argv)
    if args.shard is not None:
        state = _Shard(*args.shard, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        from accelerate import PartialState

        # Without CUDA, accelerate only forms a process group (gloo) when told it runs on the CPU.
        state = PartialState(cpu=not torch.cuda.is_available())
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING)
    if args.seed < DEV_SEED_LIMIT:
        log.warning("seed %d is a development seed: do not report these numbers", args.seed)
    device = state.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tok = load_eval_model(args.model, dtype=dtype, device=str(device))

    args.out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        (args.out / "config.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, indent=1))
    settings = settings_from(args.scorers, args.budgets, args.ratios, args.merge)
    done = _done_keys(args.out)
    samples_file = open(args.out / f"samples.rank{state.process_index}.jsonl", "a")
    budgets_file = open(args.out / f"budgets.rank{state.process_index}.jsonl", "a")

    work = []  # (task, haystack, protocol, samples of this rank still to do)
    cells = [(h, t) for h in args.haystack for t in args.tasks]
    for cell, (haystack, task) in enumerate(cells):
        # accelerate ranks share every (family, task) cell by sample index; --shard processes take
        # whole cells, so that each one still batches all samples of a cell together.
        if args.shard is not None and cell % state.num_processes != state.process_index:
            continue
        family = None if haystack == "ruler" else haystack
        samples = generate_task(task, tok, args.length, args.samples, args.seed, haystack=family)
        mine = samples if args.shard is not None else [s for s in samples if s.index % state.num_processes == state.process_index]
        for protocol in args.protocols:
            todo = [s for s in mine if any((task, haystack, s.index, protocol, st.key) not in done for st in settings)]
            if todo:
                work.append((task, haystack, protocol, todo))
    total = sum(len(t) for *_, t in work) * len(settings)
    with tqdm(total=total, desc=f"rank {state.process_index}", disable=not state.is_main_process and state.num_processes > 1) as bar:
        for task, haystack, protocol, todo in work:
            for batch in _batches(todo, args.batch_size):
                missing = [st for st in settings if any((task, haystack, s.index, protocol, st.key) not in done for s in batch)]
                bar.update((len(settings) - len(missing)) * len(batch))
                batches = run_batch(model, tok, batch, protocol, missing, device, args.kvzip_prompt, args.calibration)
                for setting, sample, text, budgets in batches:
                    if (task, haystack, sample.index, protocol, setting.key) in done:
                        bar.update(1)
                        continue
                    record = {
                        "task": task,
                        "haystack": haystack,
                        "index": sample.index,
                        "protocol": protocol,
                        "setting": setting.key,
                        **asdict(setting),
                        "score": score_output(sample, text),
                        "output": text,
                        "references": list(sample.references),
                    }
                    samples_file.write(json.dumps(record) + "\n")
                    samples_file.flush()  # a run killed at its time limit loses at most one record
                    bar.update(1)
                    if budgets is not None and sample is batch[0]:
                        row = {"task": task, "haystack": haystack, "protocol": protocol, "setting": setting.key, "budgets": budgets}
                        budgets_file.write(json.dumps(row) + "\n")
                samples_file.flush()
                budgets_file.flush()
    samples_file.close()
    budgets_file.close()
    state.wait_for_everyone()
    if state.is_main_process and args.shard is None:
        write_report(args.out, plots=not args.no_plots)
