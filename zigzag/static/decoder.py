"""Greedy decoding over a static compressed cache, one CUDA graph per step.

Decoding in transformers is bound by the host: at small batch a step's Python and kernel launches
take longer than the GPU work (reading the weights and the kept cache). :class:`StaticDecoder` removes
the host from the loop. The question (or any tokens fed at once) runs as an ordinary forward pass;
each following step is the same fixed-shape computation (embed the last token, run every layer over
its fixed buffers, take the argmax, advance the position), which the decoder captures once as a CUDA
graph and replays: a step then costs one graph launch, and ``max_new_tokens`` steps run without a
single host sync. Optionally the step is compiled first (``compile=True``, torch.compile), which fuses
the model's small elementwise kernels before the capture.

On the CPU (or with ``graph=False``) the same step runs eagerly: the results are those of the graph,
which the tests compare with the model's own decoding over the :class:`~zigzag.ZigZagCache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zigzag.cache import ZigZagCache
from zigzag.pipeline.hf import cache_kwarg, check_model
from zigzag.static.attention import ATTENTION_NAME, CACHE_KWARG, attention_implementation, register
from zigzag.static.cache import StaticZigZagCache

WARMUP_STEPS = 2
"""Steps run (and rewound) before a capture: cuBLAS, Triton and torch.compile set themselves up on
first use, which a CUDA graph cannot record."""


@dataclass
class _Step:
    """The static buffers one decoding step reads and writes (the graph's inputs and outputs)."""

    token: torch.Tensor  # (batch, 1) long: the last token, overwritten by the next
    position: torch.Tensor  # (batch, 1) long: its RoPE position, advanced by one
    generated: torch.Tensor  # (batch, capacity) long: tokens produced so far
    count: torch.Tensor  # (1,) long: how many of them


class StaticDecoder:
    """Greedy generation from a compressed cache with fixed shapes (see the module docstring).

    Args:
        model: the model the cache was compressed with (eval mode; SDPA or eager attention).
        cache: a :class:`~zigzag.ZigZagCache` from :func:`zigzag.compress_cache` (nothing appended
            yet) or a :class:`~zigzag.static.StaticZigZagCache` built from one.
        max_new_tokens: room for the tokens that will be appended, question included, over the
            decoder's whole life (the buffers are sized for it, plus :data:`WARMUP_STEPS`).
        context_mask: ``(batch, original_length)`` 0/1 attention mask of the compressed context when
            it was padded (positions continue from each row's real length); None: no padding.
        graph: capture the decoding step as a CUDA graph (CUDA only; ignored elsewhere).
        compile: compile the step with ``torch.compile`` before capturing it.
        consume: convert ``cache`` layer by layer, releasing each layer (see
            :meth:`StaticZigZagCache.from_cache`).

    Example:
        >>> cache = compress_cache(model, ctx, ratio=0.5, budget="zigzag")  # doctest: +SKIP
        >>> decoder = StaticDecoder(model, cache, max_new_tokens=64)  # doctest: +SKIP
        >>> tokens = decoder.generate(question_ids, max_new_tokens=32)  # (batch, 32) doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        cache: ZigZagCache | StaticZigZagCache,
        max_new_tokens: int,
        *,
        context_mask: torch.Tensor | None = None,
        graph: bool = True,
        compile: bool = False,
        consume: bool = False,
    ) -> None:
        check_model(model)
        if model.training:
            raise ValueError("put the model in eval mode (model.eval()) before decoding")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
        # The warm-up before a capture writes WARMUP_STEPS tokens past the last real one (then rewinds).
        if isinstance(cache, ZigZagCache):
            cache = StaticZigZagCache.from_cache(cache, max_new_tokens + WARMUP_STEPS, consume=consume)
        elif not isinstance(cache, StaticZigZagCache):
            raise TypeError(f"cache must be a ZigZagCache or a StaticZigZagCache; got {type(cache).__name__}")
        elif cache.headroom < max_new_tokens + WARMUP_STEPS:
            raise ValueError(
                f"the static cache has headroom {cache.headroom}; max_new_tokens={max_new_tokens} needs "
                f"{max_new_tokens + WARMUP_STEPS} (WARMUP_STEPS={WARMUP_STEPS} more for the graph's warm-up)"
            )
        self.capacity = max_new_tokens
        self.model, self.cache = model, cache
        self._cache_kwargs = {**cache_kwarg(model, cache), CACHE_KWARG: cache}
        self.device = cache.layers[0].device
        batch = cache.layers[0].keys.shape[0]
        length = cache.original_length
        if context_mask is None:
            next_position = torch.full((batch, 1), length, dtype=torch.long, device=self.device)
        else:
            if context_mask.shape != (batch, length):
                raise ValueError(f"context_mask must be (batch, original_length) = {(batch, length)}; got {tuple(context_mask.shape)}")
            next_position = context_mask.to(self.device).long().sum(-1, keepdim=True)
        self._state = _Step(
            token=torch.zeros((batch, 1), dtype=torch.long, device=self.device),
            position=next_position,
            generated=torch.zeros((batch, max_new_tokens + WARMUP_STEPS), dtype=torch.long, device=self.device),
            count=torch.zeros(1, dtype=torch.long, device=self.device),
        )
        self.appended = 0  # tokens written after the context (host count: the device never syncs it back)
        self.use_graph = graph and self.device.type == "cuda"
        self.compile = compile
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_kernel = False  # the backend the graph was captured with
        self._step_fn = self._step
        if compile:
            cache.mark_static()
            for t in (self._state.token, self._state.position, self._state.generated, self._state.count):
                torch._dynamo.mark_static_address(t)
            self._step_fn = torch.compile(self._step, dynamic=False)
        register()

    @property
    def batch(self) -> int:
        return self._state.token.shape[0]

    @property
    def room(self) -> int:
        """Tokens that can still be appended."""
        return self.capacity - self.appended

    # ------------------------------------------------------------------------------------ passes

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The model over ``input_ids (batch, new)`` at ``position_ids``: last logits ``(batch, vocab)``."""
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=1, **self._cache_kwargs)
        return out.logits[:, -1]

    def _step(self) -> None:
        """One decoding step on the static buffers: what the CUDA graph replays."""
        s = self._state
        logits = self._forward(s.token, s.position)
        token = logits.argmax(-1, keepdim=True)
        s.token.copy_(token)
        s.position.add_(1)
        s.generated.index_copy_(1, s.count, token)
        s.count.add_(1)

    @torch.no_grad()
    def feed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``input_ids (batch, new)`` (left-padded where ``attention_mask`` has zeros) in one
        forward pass; returns the logits of the last token ``(batch, vocab)``."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch:
            raise ValueError(f"input_ids must be (batch={self.batch}, new); got {tuple(input_ids.shape)}")
        new = input_ids.shape[1]
        self._reserve(new)
        input_ids = input_ids.to(self.device)
        s = self._state
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(self.device).bool()
        positions = s.position + (valid.long().cumsum(-1) - 1).clamp_min(0)
        self.cache.choose_backend()
        if attention_mask is not None:
            self.cache.expect_padding(valid)
        with attention_implementation(self.model, ATTENTION_NAME):
            logits = self._forward(input_ids, positions)
        s.position.add_(valid.long().sum(-1, keepdim=True))
        self.appended += new
        return logits

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Feed ``input_ids (batch, new)`` (the question), then decode greedily.

        Returns ``(batch, max_new_tokens)`` long: the generated tokens (no end-of-sequence handling:
        cut them at your EOS token)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
        self._reserve(input_ids.shape[1] + max_new_tokens - 1)
        logits = self.feed(input_ids, attention_mask)
        s = self._state
        first = logits.argmax(-1, keepdim=True)
        s.token.copy_(first)
        s.count.zero_()
        s.generated[:, :1] = first
        s.count.add_(1)
        self.decode(max_new_tokens - 1)
        return s.generated[:, :max_new_tokens].clone()

    @torch.no_grad()
    def decode(self, steps: int) -> None:
        """Run ``steps`` greedy steps from the last token (``generated`` collects them)."""
        self._reserve(steps)
        if steps <= 0:
            return
        self.cache.choose_backend()
        with attention_implementation(self.model, ATTENTION_NAME):
            if self.use_graph:
                if self._graph is None or self._graph_kernel != self.cache.layers[0].use_kernel:
                    self._capture()  # again when the kernel switch changed since the last capture
                for _ in range(steps):
                    self._graph.replay()
            else:
                for _ in range(steps):
                    self._step_fn()
        self.appended += steps

    # ------------------------------------------------------------------------------------ graph

    def _capture(self) -> None:
        """Capture :meth:`_step` as a CUDA graph, after :data:`WARMUP_STEPS` steps that are rewound."""
        s = self._state
        saved = [t.clone() for t in (s.token, s.position, s.count)]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                self._step_fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._restore(saved, WARMUP_STEPS)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self._step_fn()
        # Capturing records without running: nothing to rewind. The buffers hold the saved state.
        self._graph = graph
        self._graph_kernel = self.cache.layers[0].use_kernel

    def _restore(self, saved: list[torch.Tensor], steps: int) -> None:
        s = self._state
        for t, before in zip((s.token, s.position, s.count), saved):
            t.copy_(before)
        self.cache.rewind(steps)

    def _reserve(self, new: int) -> None:
        if new > self.room:
            raise ValueError(
                f"{new} more tokens do not fit: the static cache has room for {self.room} more "
                f"(max_new_tokens={self.capacity} at construction)"
            )


__all__ = ["WARMUP_STEPS", "StaticDecoder"]
