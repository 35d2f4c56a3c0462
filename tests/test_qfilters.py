"""Q-Filters calibration: the fit against a float64 SVD, the file, the CLI, the pipeline, and on the real
SmolLM2 that the filters rank keys by the attention they get on text they were not fitted on."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import tiny_llama
from zigzag import cache_kwarg, compress_cache, prefill_context
from zigzag.calibrate import QFilterConfig, fit_qfilters, load_qfilters, save_qfilters
from zigzag.calibrate.__main__ import main
from zigzag.calibrate.texts import stdlib_docstrings
from zigzag.scorers import LayerView
from zigzag.scorers.qfilters import QFilters


def reference_filters(model, chunks: list[list[int]]):
    """float64, from scratch: each chunk alone (positions from 0), q = x W_q^T from the input of q_proj,
    RoPE from the config's theta, the (tokens x head_dim) matrix of every head, torch.linalg.svd.
    Returns filters (L, H, d) oriented to a positive mean projection, that mean (L, H), sigma_1^2 / sum sigma^2."""
    config = model.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    inputs: dict[int, list[torch.Tensor]] = {}
    handles = [
        layer.self_attn.q_proj.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, []).append(args[0]))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]))
    finally:
        for h in handles:
            h.remove()
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    filters, means, explained = [], [], []
    for i, layer in enumerate(model.model.layers):
        weight = layer.self_attn.q_proj.weight.double()
        rotated = []
        for x in inputs[i]:
            q = (x[0].double() @ weight.T).reshape(-1, heads, head_dim)  # (n, H, d)
            angles = torch.arange(q.shape[0], dtype=torch.float64)[:, None] * inv_freq
            cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
            half = head_dim // 2
            rot = torch.cat([-q[..., half:], q[..., :half]], -1)
            rotated.append(q * cos + rot * sin)
        big = torch.cat(rotated)  # (tokens, H, d)
        f, m, e = [], [], []
        for h in range(heads):
            _, s, vh = torch.linalg.svd(big[:, h], full_matrices=False)
            v = vh[0]
            if (big[:, h] @ v).mean() < 0:
                v = -v
            f.append(v)
            m.append((big[:, h] @ v).mean())
            e.append(s[0] ** 2 / (s**2).sum())
        filters.append(torch.stack(f))
        means.append(torch.stack(m))
        explained.append(torch.stack(e))
    return torch.stack(filters), torch.stack(means), torch.stack(explained)


def test_fit_matches_float64_svd_reference():
    model = tiny_llama()
    ids = torch.randint(0, 128, (230,), generator=torch.Generator().manual_seed(0)).tolist()
    config = QFilterConfig(chunk_tokens=50, tokens=1000, batch_size=3)  # batches of 3, 1 and the 30-token tail
    profile = fit_qfilters(model, ids, config)
    chunks = [ids[i : i + 50] for i in range(0, 230, 50)]
    filters, means, explained = reference_filters(model, chunks)
    assert profile.filters.shape == (3, 4, 16) and profile.kv_heads == 2
    assert profile.about["tokens_read"] == 230 and profile.about["chunks"] == 5
    torch.testing.assert_close(profile.filters.double(), filters, rtol=0, atol=1e-4)
    torch.testing.assert_close(profile.scales.double(), means, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(profile.explained.double(), explained, rtol=1e-4, atol=1e-6)
    assert bool((profile.scales >= 0).all())
    # The batching does not change the result; another text does.
    one_by_one = fit_qfilters(model, ids, QFilterConfig(chunk_tokens=50, tokens=1000, batch_size=1))
    torch.testing.assert_close(one_by_one.filters, profile.filters, rtol=0, atol=1e-5)
    other = fit_qfilters(model, ids[::-1], config)
    assert not torch.allclose(other.filters, profile.filters, atol=1e-3)


def test_tokens_and_the_short_tail():
    model = tiny_llama(layers=1)
    ids = list(range(3, 113))  # 110 tokens
    assert fit_qfilters(model, ids, QFilterConfig(chunk_tokens=50, tokens=100)).about["tokens_read"] == 100
    assert fit_qfilters(model, ids, QFilterConfig(chunk_tokens=40)).about["tokens_read"] == 110  # a 30-token tail
    assert fit_qfilters(model, ids, QFilterConfig(chunk_tokens=50)).about["tokens_read"] == 100  # 10 < 50 // 4
    assert fit_qfilters(model, ids[:30], QFilterConfig(chunk_tokens=100)).about["tokens_read"] == 30  # the only chunk
    with pytest.raises(ValueError, match="at least 2"):
        fit_qfilters(model, ids[:1], QFilterConfig())
    for bad in ({"chunk_tokens": 0}, {"tokens": -1}, {"batch_size": 1.5}, {"batch_size": True}):
        with pytest.raises(ValueError):
            QFilterConfig(**bad)


def test_file_roundtrip_and_scorer_from_file(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    profile = fit_qfilters(model, ids, QFilterConfig(chunk_tokens=100))
    path = tmp_path / "f.safetensors"
    save_qfilters(path, profile, model="tiny", text="random ids")
    loaded = load_qfilters(path)
    for name in ("filters", "scales", "explained"):
        torch.testing.assert_close(getattr(loaded, name), getattr(profile, name), rtol=0, atol=0)
    assert loaded.kv_heads == 2
    about = loaded.about
    assert about["model"] == "tiny" and about["text"] == "random ids" and about["config"]["chunk_tokens"] == 100
    assert (about["num_layers"], about["heads"], about["head_dim"], about["tokens_read"]) == (3, 4, 16, 300)
    assert {"torch", "transformers", "python"} <= set(about)
    scorer = QFilters.from_file(path, n_sink=2)
    assert scorer.n_sink == 2 and scorer.kv_heads == 2
    direct = QFilters(filters=profile.filters, kv_heads=2, scales=profile.scales, n_sink=2)
    keys = torch.randn(2, 2, 9, 16)
    view = LayerView(keys, keys, torch.ones(2, 9, dtype=torch.bool), torch.arange(9).expand(2, -1), 0.25, 1, 3)
    torch.testing.assert_close(scorer.score(view), direct.score(view), rtol=0, atol=0)
    from safetensors.torch import save_file

    save_file({"filters": profile.filters}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a Q-Filters profile"):
        load_qfilters(tmp_path / "other.safetensors")


@pytest.mark.parametrize("chunk_size", [None, 32])
def test_compression_keeps_the_top_scored_keys(chunk_size):
    """Layer 0's keys do not depend on what earlier chunks kept, and a Q-Filters score depends on the key
    alone: chunked or not, layer 0 keeps each head's top scores over the whole context. Unchunked, every
    layer does. Batch 2 exercises the folded (row, KV head) rows of chunked prefill."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(2))
    profile = fit_qfilters(model, ids.flatten().tolist(), QFilterConfig(chunk_tokens=64))
    scorer = QFilters(filters=profile.filters, kv_heads=profile.kv_heads, scales=profile.scales)
    ctx = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cache = compress_cache(model, ctx, max_tokens=24, scorer=scorer, chunk_size=chunk_size)
    full = prefill_context(model, ctx, window=0, query_stats_skip=None).cache
    layers = [0] if chunk_size else range(3)
    for layer in layers:
        keys = full.layers[layer].keys
        view = LayerView(keys, keys, torch.ones(2, 96, dtype=torch.bool), torch.arange(96).expand(2, -1),
                         model.model.layers[layer].self_attn.scaling, layer, 3)  # fmt: skip
        expected = scorer.score(view).topk(24, dim=-1).indices.sort(dim=-1).values
        kept = cache.layers[layer].kept_positions
        assert torch.equal(kept.sort(dim=-1).values, expected), layer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from zigzag.testing.models import load_smollm2_tokenizer

    tok = load_smollm2_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow  # the tiny model's folder takes SmolLM2's tokenizer
def test_cli_writes_the_fit_and_keeps_the_methods_apart(tmp_path, tiny_model_dir, capsys):
    from zigzag.testing.models import load_model

    text = tmp_path / "text.txt"
    text.write_text(stdlib_docstrings()[:6000], encoding="utf-8")
    out = tmp_path / "f.safetensors"
    main(["qfilters", "--model", str(tiny_model_dir), "--out", str(out), "--text", str(text),
          "--chunk-tokens", "128", "--tokens", "512", "--batch-size", "2"])  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    loaded = load_qfilters(out)
    model, tok = load_model(tiny_model_dir)
    ids = tok(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    direct = fit_qfilters(model, ids, QFilterConfig(chunk_tokens=128, tokens=512, batch_size=2))
    torch.testing.assert_close(loaded.filters, direct.filters, rtol=0, atol=1e-6)
    about = loaded.about
    assert about["model"] == str(tiny_model_dir) and about["text"] == str(text) and about["text_tokens"] == len(ids)
    assert about["model_type"] == "llama" and about["dtype"] == "torch.float32" and len(about["text_sha256"]) == 64
    assert about["config"] == {"chunk_tokens": 128, "tokens": 512, "batch_size": 2}

    # The sensitivity subcommand works as before; neither takes the other's options.
    profile = tmp_path / "p.json"
    main(["sensitivity", "--model", str(tiny_model_dir), "--out", str(profile), "--text", str(text), "--scorer", "knorm",
          "--context-tokens", "192", "--copy-tokens", "32", "--cue-tokens", "8", "--samples", "2", "--batch-size", "2"])  # fmt: skip
    saved = json.loads(profile.read_text())
    assert (
        len(saved["layers"]) == 2 and saved["about"]["text"] == str(text) and saved["config"]["context_tokens"] == 192
    )
    for argv in (["qfilters", "--keep-fraction", "0.5"], ["sensitivity", "--chunk-tokens", "64"], ["knorm"]):
        with pytest.raises(SystemExit):
            main([*argv[:1], "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), *argv[1:]])
    assert not (tmp_path / "x").exists()


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_real_model_filters_rank_keys_by_attention(smollm2, tmp_path):
    """Fitted on stdlib docstrings, SmolLM2's filters rank the keys of a Paul Graham haystack by the
    attention that the haystack's second half pays them (the true one, from eager attention): a Spearman
    correlation of about 0.8 per layer on average (random scores: 0, the opposite sign: -0.8), and ten
    times more of the top tenth than chance. The command line writes filters for the real model too."""
    from zigzag.testing.needle import needle_prompt

    model, tok = smollm2
    calibration = tok(stdlib_docstrings()[:20_000], add_special_tokens=False)["input_ids"]
    profile = fit_qfilters(model, calibration, QFilterConfig(chunk_tokens=512, tokens=1024, batch_size=2))
    heads, kv_heads = model.config.num_attention_heads, profile.kv_heads
    assert profile.filters.shape == (30, heads, 64) and bool((profile.scales > 0).all())
    assert float(profile.explained.mean()) > 0.3  # strongly anisotropic queries: one direction holds much
    scorer = QFilters(filters=profile.filters, kv_heads=kv_heads, scales=profile.scales)

    ids = tok(needle_prompt(tok, 450, seed=0).context, add_special_tokens=False, return_tensors="pt")["input_ids"]
    seq = ids.shape[1]
    window = seq // 2  # the queries that come after every key scored
    keys_scored = seq - window
    attention: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(module, args, output):
            attention[i] = output[1][0, :, keys_scored:, :keys_scored].double().mean(dim=1)  # (heads, keys)

        return hook

    from transformers import DynamicCache

    cache = DynamicCache()
    model.set_attn_implementation("eager")  # eager attention returns its probabilities
    handles = [layer.self_attn.register_forward_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model.model(input_ids=ids, **cache_kwarg(model.model, cache), use_cache=True)
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation("sdpa")

    gen = torch.Generator().manual_seed(0)
    ours, flipped, chance, overlap = [], [], [], []
    top = keys_scored // 10
    for layer, held in enumerate(cache.layers):
        view = LayerView(held.keys, held.values, torch.ones(1, seq, dtype=torch.bool), torch.arange(seq)[None],
                         model.model.layers[layer].self_attn.scaling, layer, 30)  # fmt: skip
        scores = scorer.score(view)[0, :, :keys_scored]
        true = attention[layer].reshape(kv_heads, heads // kv_heads, keys_scored).mean(dim=1)  # the group's mean
        for g in range(kv_heads):
            ours.append(_spearman(scores[g], true[g]))
            flipped.append(_spearman(-scores[g], true[g]))
            chance.append(_spearman(torch.rand(keys_scored, generator=gen), true[g]))
            picked = set(scores[g].topk(top).indices.tolist()) & set(true[g].topk(top).indices.tolist())
            overlap.append(len(picked) / top)
    per_layer = torch.tensor(ours).reshape(30, kv_heads).mean(dim=1)
    assert float(per_layer.mean()) > 0.6, per_layer
    assert float(per_layer.min()) > 0.3, per_layer
    assert sum(flipped) / len(flipped) < -0.6
    assert abs(sum(chance) / len(chance)) < 0.1
    assert sum(overlap) / len(overlap) > 0.4  # chance: 0.1

    text = tmp_path / "text.txt"
    text.write_text(stdlib_docstrings()[:3000], encoding="utf-8")
    out = tmp_path / "smollm2.safetensors"
    main(
        [
            "qfilters",
            "--model",
            "smollm2",
            "--out",
            str(out),
            "--text",
            str(text),
            "--chunk-tokens",
            "256",
            "--tokens",
            "256",
        ]
    )
    written = QFilters.from_file(out)
    assert (written.num_layers, written.heads, written.kv_heads, written.head_dim) == (30, heads, kv_heads, 64)
