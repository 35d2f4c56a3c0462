"""Static decoding on CUDA: the captured graph (and the compiled step) give the eager step's tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny_llama
from zigzag import cache_kwarg, compress_cache
from zigzag.static import StaticDecoder
from zigzag.static.attention import attend_reference, attend_static
from zigzag.static.cache import StaticLayer

pytestmark = pytest.mark.gpu


def _setup(budget: str, merge, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = tiny_llama(layers=4).to("cuda", dtype)
    ids = torch.randint(0, 128, (2, 300), device="cuda")
    mask = torch.ones(2, 300, dtype=torch.long, device="cuda")
    mask[1, :41] = 0
    ctx = {"input_ids": ids, "attention_mask": mask}
    cache = compress_cache(model, ctx, ratio=0.6, scorer="snapkv", budget=budget, merge=merge)
    question = torch.randint(0, 128, (2, 5), device="cuda")
    return model, ctx, cache, question


@pytest.mark.parametrize("budget,merge", [("uniform", None), ("zigzag", None), ("adakv", None), ("uniform", "cosine")])
def test_graph_replay_gives_the_eager_tokens_and_model_generate(budget, merge):
    model, ctx, cache, question = _setup(budget, merge, torch.float32)
    expected_cache = copy.deepcopy(cache)
    eager = StaticDecoder(model, copy.deepcopy(cache), 40, context_mask=ctx["attention_mask"], graph=False)
    graphed = StaticDecoder(model, cache, 40, context_mask=ctx["attention_mask"])
    assert graphed.use_graph
    a = eager.generate(question, 30)
    b = graphed.generate(question, 30)
    assert torch.equal(a, b)
    mask = torch.cat([ctx["attention_mask"], torch.ones_like(question)], dim=-1)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.cat([ctx["input_ids"], question], -1), attention_mask=mask, max_new_tokens=30,
            do_sample=False, pad_token_id=0, eos_token_id=None, **cache_kwarg(model, expected_cache),
        )  # fmt: skip
    assert torch.equal(b, out[:, -30:])


def test_graph_survives_a_second_generate_and_bf16():
    model, ctx, cache, _ = _setup("zigzag_heads", None, torch.bfloat16, seed=3)
    eager = StaticDecoder(model, copy.deepcopy(cache), 40, context_mask=ctx["attention_mask"], graph=False)
    graphed = StaticDecoder(model, cache, 40, context_mask=ctx["attention_mask"])
    for n in (10, 12):  # the second call replays the graph captured by the first
        q = torch.randint(0, 128, (2, 3), device="cuda")
        assert torch.equal(eager.generate(q, n), graphed.generate(q, n))


def test_compiled_and_captured_step_gives_the_eager_tokens():
    model, ctx, cache, question = _setup("adakv", None, torch.float32, seed=5)
    eager = StaticDecoder(model, copy.deepcopy(cache), 24, context_mask=ctx["attention_mask"], graph=False)
    compiled = StaticDecoder(model, cache, 24, context_mask=ctx["attention_mask"], compile=True)
    assert torch.equal(eager.generate(question, 16), compiled.generate(question, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_reference_on_cuda(dtype):
    torch.manual_seed(0)
    batch, kv_heads, group, slots, head_dim = 3, 8, 4, 5000, 128
    keys = torch.randn(batch, kv_heads, slots, head_dim, device="cuda", dtype=dtype)
    values = torch.randn_like(keys)
    bias = torch.randn(batch, kv_heads, slots, device="cuda").masked_fill(
        torch.rand(batch, kv_heads, slots, device="cuda") < 0.4, float("-inf")
    )
    layer = StaticLayer(keys, values, bias, prefix_slots=slots - 64, original_length=9000)
    query = torch.randn(batch, kv_heads * group, 1, head_dim, device="cuda", dtype=dtype)
    exact = StaticLayer(keys.float(), values.float(), bias, prefix_slots=slots - 64, original_length=9000)
    reference = attend_reference(exact, query.float(), 0.088)
    layer.use_kernel = True
    kernel = attend_static(layer, query, 0.088)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (kernel.float() - reference.float()).abs().max().item() < tol
