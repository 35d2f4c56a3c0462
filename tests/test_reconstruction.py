"""Context reconstruction (KVzip): scores against the model's own eager attention, cache hygiene, errors,
and the real SmolLM2."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_llama
from zigzag import compress_cache, prefill_context
from zigzag.pipeline.reconstruction import max_attention, reconstruction_scores
from zigzag.scorers import KVzip, Reconstruction, get_scorer
from zigzag.testing.needle import needle_prompt


def _reference_scores(model, ids: torch.Tensor, valid: torch.Tensor, setup: Reconstruction) -> list[torch.Tensor]:
    """Per layer ``(batch, kv_heads, seq)``: each row run alone, unpadded, once per chunk, as one plain
    eager forward over ``context + prompt + chunk`` with ``output_attentions`` (in the model's dtype).

    KVzip+ (``setup.output_weighted``): each probability of query head ``h`` times
    ``||W_o[:, h] v_i|| / ||x_t||``, with ``x`` the layer's normalized input and ``v = v_proj(x)``."""
    batch, seq = ids.shape
    kv_heads = model.config.num_key_value_heads
    group = model.config.num_attention_heads // kv_heads
    layers = model.config.num_hidden_layers
    out = [torch.zeros(batch, kv_heads, seq, dtype=torch.float64) for _ in range(layers)]
    prompt = torch.tensor(setup.prompt_ids, dtype=torch.long)
    for b in range(batch):
        real = ids[b][valid[b]]
        pad = seq - real.numel()
        for start in range(0, seq, setup.chunk_size):
            chunk = ids[b, start : start + setup.chunk_size][valid[b, start : start + setup.chunk_size]]
            if chunk.numel() == 0:
                continue
            sequence = torch.cat([real, prompt, chunk])[None]
            with torch.no_grad():
                run = model(input_ids=sequence, output_attentions=True, output_hidden_states=True)
            first = real.numel() + prompt.numel()
            for layer, probs in enumerate(run.attentions):  # (1, heads, length, length)
                probs = probs[0, :, first:, : real.numel()]  # (heads, chunk, context)
                if setup.output_weighted:
                    block = model.model.layers[layer]
                    with torch.no_grad():
                        x = block.input_layernorm(run.hidden_states[layer][0])  # (length, hidden)
                        v = block.self_attn.v_proj(x[: real.numel()])  # (context, kv_heads * d)
                    d = v.shape[-1] // kv_heads
                    w = block.self_attn.o_proj.weight  # (hidden, heads * d)
                    for h in range(kv_heads * group):
                        v_h = v[:, (h // group) * d : (h // group + 1) * d]
                        written = (v_h @ w[:, h * d : (h + 1) * d].T).norm(dim=-1)  # (context,)
                        probs[h] = probs[h] * written[None, :] / x[first:].norm(dim=-1)[:, None]
                seen = probs.reshape(kv_heads, group * chunk.numel(), -1).amax(1)
                out[layer][b, :, pad:] = torch.maximum(out[layer][b, :, pad:], seen)
    return out


@pytest.mark.parametrize("weighted", [False, True], ids=["kvzip", "kvzip_plus"])
@pytest.mark.parametrize("chunk_size", [64, 16])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_scores_equal_the_models_eager_attention_while_repeating(chunk_size, attn, weighted):
    model = tiny_llama(attn, seed=7)
    reference_model = tiny_llama("eager", seed=7).double()
    batch, seq = 3, 40
    ids = torch.randint(0, 128, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :9] = 0
    mask[2, :23] = 0  # with chunk_size 16 its first chunk holds no real token
    setup = Reconstruction(prompt_ids=(5, 17, 3), chunk_size=chunk_size, output_weighted=weighted)
    pre = prefill_context(model, {"input_ids": ids, "attention_mask": mask}, reconstruction=setup)
    expected = _reference_scores(reference_model, ids, mask.bool(), setup)
    assert len(pre.reconstruction_scores) == 3
    for ours, ref in zip(pre.reconstruction_scores, expected):
        assert ours.shape == (batch, 2, seq) and ours.dtype == torch.float32
        # KVzip+ scores are about 1e-4 on this model: the same relative precision, not the same absolute one.
        torch.testing.assert_close(ours.double(), ref, atol=2e-6 * float(ref.detach().max()) / 0.02, rtol=1e-5)
    assert float(pre.reconstruction_scores[0][0, :, :9].abs().max()) == 0.0  # padding scores 0


def test_an_empty_prompt_repeats_right_after_the_context():
    model = tiny_llama("eager", seed=3)
    ids = torch.randint(0, 128, (2, 30))
    valid = torch.ones(2, 30, dtype=torch.bool)
    setup = Reconstruction(chunk_size=12)
    pre = prefill_context(model, ids, reconstruction=setup)
    for ours, ref in zip(pre.reconstruction_scores, _reference_scores(model.double(), ids, valid, setup)):
        torch.testing.assert_close(ours.double(), ref, atol=2e-6, rtol=1e-5)


def test_the_cache_is_left_exactly_as_it_was():
    model = tiny_llama(seed=1)
    ids = torch.randint(0, 128, (2, 25))
    pre = prefill_context(model, ids, window=0, query_stats_skip=None)
    before = [(layer.keys, layer.values) for layer in pre.cache.layers]
    setup = Reconstruction(prompt_ids=(1, 2), chunk_size=10)
    reconstruction_scores(model, pre.cache, pre.context.input_ids, pre.context.valid, setup)
    assert pre.cache.get_seq_length() == 25
    for layer, (keys, values) in zip(pre.cache.layers, before):
        assert layer.keys is keys and layer.values is values


def test_max_attention_blocks_give_the_same_maximum(monkeypatch):
    """Queries are taken in blocks bounded by PROBABILITY_BLOCK_ELEMENTS; the maximum cannot depend on it."""
    from zigzag.pipeline import reconstruction

    batch, heads, kv_heads, n, context, head_dim = 2, 4, 2, 9, 13, 8
    length = context + n
    q = torch.randn(batch, heads, n, head_dim)
    k = torch.randn(batch, kv_heads, length, head_dim)
    key_valid = torch.rand(batch, length) > 0.2
    key_valid[:, context:] = True
    query_valid = torch.rand(batch, n) > 0.3
    whole = max_attention(q, k, key_valid, query_valid, context, context, 0.3)
    monkeypatch.setattr(reconstruction, "PROBABILITY_BLOCK_ELEMENTS", 1)  # one query per block
    torch.testing.assert_close(max_attention(q, k, key_valid, query_valid, context, context, 0.3), whole)
    # Plain float64 reference: every query, softmax over what it sees, max over valid queries and the group.
    logits = torch.einsum("bhqd,bhld->bhql", q.double(), k.double().repeat_interleave(2, dim=1)) * 0.3
    seen = key_valid[:, None, None, :] & (torch.arange(length)[None, :] <= context + torch.arange(n)[:, None])
    probs = logits.masked_fill(~seen, float("-inf")).softmax(-1)[..., :context] * query_valid[:, None, :, None]
    expected = probs.view(batch, kv_heads, 2 * n, context).amax(2)
    torch.testing.assert_close(whole.double(), expected, atol=1e-6, rtol=1e-5)


def test_errors():
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 128, (1, 20))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        Reconstruction(chunk_size=0)
    with pytest.raises(ValueError, match="non-negative token ids"):
        Reconstruction(prompt_ids=(3, -1))
    with pytest.raises(TypeError, match="Reconstruction"):
        KVzip(reconstruction=(1, 2))
    with pytest.raises(ValueError, match="reconstruction=scorer.reconstruction"):
        prefill_context(model, ids).compress(0.5, "kvzip", "uniform")
    other = prefill_context(model, ids, reconstruction=Reconstruction(prompt_ids=(4,)))
    with pytest.raises(ValueError, match="needs the context reconstructed"):
        other.compress(0.5, "kvzip", "uniform")
    with pytest.raises(ValueError, match="cannot be combined with chunk_size"):
        compress_cache(model, ids, 0.5, scorer="kvzip", budget="uniform", chunk_size=8)
    with pytest.raises(TypeError, match="reconstruction must be"):
        prefill_context(model, ids, reconstruction="repeat")


def test_compress_cache_and_wrappers_reconstruct_by_themselves():
    model = tiny_llama(seed=5)
    ids = torch.randint(0, 128, (2, 32))
    scorer = get_scorer("kvzip+pool3")
    assert scorer.reconstruction == Reconstruction()
    cache = compress_cache(model, ids, 0.5, scorer=scorer, budget="zigzag")
    expected = prefill_context(model, ids, reconstruction=Reconstruction()).compress(0.5, scorer, "zigzag")
    for ours, ref in zip(cache.kept_positions, expected.kept_positions):
        assert torch.equal(ours, ref)


def test_scores_equal_eager_attention_on_smollm2(smollm2):
    """The real model (SDPA, float32) with the prompt in words: its reconstruction scores are the
    attention its eager implementation gives while repeating the context, chunk by chunk."""
    model, tok = smollm2
    prompt = needle_prompt(tok, 100, depth=0.5, seed=1)
    ctx = tok(prompt.context, return_tensors="pt", add_special_tokens=False)
    setup = Reconstruction.from_text(tok, chunk_size=48)
    assert len(setup.prompt_ids) > 3
    pre = prefill_context(model, ctx, reconstruction=setup)
    model.set_attn_implementation("eager")
    try:
        expected = _reference_scores(model, ctx.input_ids, ctx.attention_mask.bool(), setup)
    finally:
        model.set_attn_implementation("sdpa")
    for ours, ref in zip(pre.reconstruction_scores, expected):
        torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=1e-3)
