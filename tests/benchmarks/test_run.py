"""The RULER runner: resumes, and gives the same results on two processes as on one.

A tiny random-weight Llama with SmolLM2's real tokenizer keeps this fast; its answers are garbage,
but deterministic, which is all that sharding and resuming need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.ruler.report import load_records

REPO = Path(__file__).resolve().parents[2]
ARGS = [
    "--length", "300", "--tasks", "niah_single_1,niah_multikey_1,vt", "--samples", "3",
    "--scorers", "knorm,snapkv", "--budgets", "uniform,zigzag", "--ratios", "0.5",
    "--protocols", "agnostic,aware", "--batch-size", "2", "--seed", "5", "--no-plots",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from zigzag.testing.models import load_smollm2_tokenizer

    tok = load_smollm2_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _run(launcher: list[str], out: Path, model_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*launcher, "-m", "benchmarks.ruler", *ARGS, "--model-path", str(model_dir), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True, timeout=600)


def _comparable(out: Path) -> list[tuple]:
    return [(r["task"], r["index"], r["protocol"], r["setting"], r["output"], r["score"]) for r in load_records(out)]


@pytest.mark.slow
def test_two_processes_give_the_one_process_results_and_resume_is_a_no_op(tmp_path, tiny_model_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable], one, tiny_model_dir)
    records = _comparable(one)
    assert len(records) == 3 * 3 * 2 * (1 + 2 * 2)  # tasks x samples x protocols x settings
    _run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no"],
        two,
        tiny_model_dir,
    )
    assert sorted(p.name for p in two.glob("samples.rank*.jsonl")) == ["samples.rank0.jsonl", "samples.rank1.jsonl"]
    assert _comparable(two) == records
    assert (one / "summary.csv").read_text() == (two / "summary.csv").read_text()

    # Resume: a second run over a finished folder adds nothing.
    before = (one / "samples.rank0.jsonl").read_text()
    _run([sys.executable], one, tiny_model_dir)
    assert (one / "samples.rank0.jsonl").read_text() == before
    # ... and an interrupted one (last records lost) completes to the same results.
    lines = before.splitlines(keepends=True)
    (one / "samples.rank0.jsonl").write_text("".join(lines[: len(lines) // 2]))
    _run([sys.executable], one, tiny_model_dir)
    assert _comparable(one) == records
    assert json.loads((one / "config.json").read_text())["samples"] == 3


@pytest.mark.slow
def test_shards_families_and_calibrated_budgets(tmp_path, tiny_model_dir):
    """``--shard K/N`` processes split the (family, task) cells and together give the one-process
    records; every family runs every task; a calibrated budget reads its profile."""
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"layers": [1.0, 3.0]}))
    extra = ["--haystack", "essays,noise", "--budgets", "uniform,sensitivity+bound0.2", "--calibration", str(profile),
             "--tasks", "niah_single_1,niah_multikey_1", "--protocols", "agnostic"]

    def run(out: Path, shard: str | None) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "benchmarks.ruler", *ARGS, *extra, "--model", str(tiny_model_dir), "--out", str(out)]
        subprocess.run(cmd + (["--shard", shard] if shard else []), check=True, cwd=REPO, env=env, capture_output=True, timeout=600)

    one, shards = tmp_path / "one", tmp_path / "shards"
    run(one, None)
    run(shards, "0/2")
    run(shards, "1/2")
    records = load_records(one)
    assert {(r["haystack"], r["task"]) for r in records} == {(h, t) for h in ("essays", "noise") for t in ("niah_single_1", "niah_multikey_1")}
    assert {r["budget"] for r in records} == {"none", "uniform", "sensitivity+bound0.2"}
    assert len(records) == 2 * 2 * 3 * (1 + 2 * 2)  # families x tasks x samples x settings
    assert sorted(p.name for p in shards.glob("samples.rank*.jsonl")) == ["samples.rank0.jsonl", "samples.rank1.jsonl"]
    key = lambda r: (r["haystack"], r["task"], r["index"], r["protocol"], r["setting"], r["output"], r["score"])
    assert sorted(map(key, load_records(shards))) == sorted(map(key, records))
    assert not (shards / "summary.csv").exists()  # shards leave the report to a separate call
