"""Host time of one layer's attention at a decoding step, by component (Llama-3.1-8B layer shape).

    python -m benchmarks.perf.host_overhead --slots 1024 --calls 2000
    python -m benchmarks.perf.host_overhead --compare HEAD~1     # this tree against a git revision, on the CPU

Decoding an 8B model at small batch is bound by the host, so what a layer's attention costs in Python
and launches decides decode speed. With a short cache (``--slots`` per KV head) the GPU work of each
call is a few microseconds, every call below is bound by the host, and the time per call over a long
loop (synchronised once at the end) is its host cost:

* ``sdpa``: one dense ``scaled_dot_product_attention`` launch (GQA), the floor;
* ``dense layer step``: a uniform-budget :class:`~zigzag.cache.CompressedLayer`'s ``update`` then SDPA
  through its key subclass, as the model calls them;
* ``varlen layer step``: the same on a head-wise :class:`~zigzag.cache.varlen.VarlenLayer` (Triton kernel);
* ``varlen attend``: what the layer calls for one step, :func:`zigzag.kernels.varlen_triton.attend` over the
  layer's kept :class:`~zigzag.kernels.varlen_triton.Prefix` (argument assembly and launch);
* ``varlen_attention``: the kernel's public wrapper, which also builds the prefix on each call;
* ``triton launch`` / ``direct launch``: the kernel launched through ``JITFunction.run`` or through the
  cached launcher (:func:`zigzag.kernels.varlen_triton.launch`) with the same arguments.

Prints one table of microseconds per call (median of ``--repeats`` loops).

``--memos`` times, on the CPU, each memo of the varlen decoding step against what it saves computing
(the figures in the comments beside them): microseconds per call, the best of 7 loops of ``--calls``.

``--compare REV`` measures something else, on the CPU: the varlen layer step of this tree against the
same step with ``zigzag/cache/varlen.py`` and ``zigzag/kernels/varlen_triton.py`` taken from git revision
``REV`` (the rest of the package is this tree's), the kernel launch replaced by a no-op in both, so that only
the host work above the launch is timed. The step is the model's: ``update``, then transformers'
``sdpa_attention_forward`` with the returned keys, over ``--layers`` layers that share one attention
mask per step. The two run interleaved, ``--rounds`` rounds of ``--steps`` steps, alternating which
goes first; it prints the medians in microseconds per layer step and the median of the per-round
ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
import types

import torch
import torch.nn.functional as F

from benchmarks.cli import HelpFormatter
from benchmarks.perf.revisions import import_source, source_at
from zigzag.cache import CompressedLayer
from zigzag.cache.varlen import VarlenLayer
from zigzag.kernels import set_backend


def per_call_us(fn, calls: int, repeats: int, sync) -> float:
    """Median over ``repeats`` loops of ``calls`` calls of ``fn``: microseconds per call."""
    fn()
    sync()
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        results.append(1e6 * (time.perf_counter() - start) / calls)
    return statistics.median(results)


def components(args) -> None:
    import zigzag.kernels.varlen_triton as vk

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    heads, kv_heads, d, n = 32, 8, 128, args.slots
    gen = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)
    query = rand(1, 1, heads, d).transpose(1, 2)  # (1, Hq, 1, d) as transformers hands it over
    step_k, step_v = rand(1, kv_heads, 1, d), rand(1, kv_heads, 1, d)
    dense_k, dense_v = rand(1, kv_heads, n, d), rand(1, kv_heads, n, d)
    positions = torch.arange(n, device=device).expand(1, kv_heads, n)
    dense = CompressedLayer(dense_k, dense_v, positions, n)
    lengths = torch.full((1, kv_heads), n, device=device)
    lengths[0, 0], lengths[0, 1] = n // 2, n + n // 2  # head-wise: different lengths, same total
    total = int(lengths.sum())
    varlen = VarlenLayer(rand(total, d), rand(total, d), torch.arange(total, device=device), lengths, n)

    def layer_step(layer):
        keys, values = layer.update(step_k, step_v)
        F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)
        if layer.appended >= 64:
            layer.crop(-layer.appended)

    varlen.update(step_k, step_v)
    tail_k, tail_v = varlen.keys, varlen.values
    prefix = varlen._triton_prefix()
    attend = lambda: vk.attend(prefix, query, d**-0.5, query.dtype, tail_k, tail_v, None, False, False)
    wrapper = lambda: vk.varlen_attention(
        query, varlen.prefix_keys, varlen.prefix_values, varlen.offsets, None, kv_heads=kv_heads,
        width=varlen.width, scale=d**-0.5, tail_keys=tail_k, tail_values=tail_v, return_lse=False,
    )  # fmt: skip
    captured = {}
    real_launch_on = vk._launch_on

    def capture(where, *launch_args):
        captured["args"] = launch_args
        real_launch_on(where, *launch_args)

    vk._launch_on = capture
    wrapper()
    vk._launch_on = real_launch_on
    grid, tensors, integers, scale, flags = captured["args"]
    through_run = lambda: vk.launch_through_triton(grid, tensors, integers, scale, flags)
    direct = lambda: vk.launch(grid, tensors, integers, scale, flags)

    rows = [
        ("sdpa", lambda: F.scaled_dot_product_attention(query, dense_k, dense_v, enable_gqa=True)),
        ("dense layer step", lambda: layer_step(dense)),
        ("varlen layer step", lambda: layer_step(varlen)),
        ("varlen attend", attend),
        ("varlen_attention", wrapper),
        ("triton launch", through_run),
        ("direct launch", direct),
    ]
    calls = args.calls if device.type == "cuda" else 3
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"| component ({name}, {n} slots) | host us / call |")
    print("|---|---|")
    for name, fn in rows:
        print(f"| {name} | {per_call_us(fn, calls, args.repeats, sync):.1f} |")


# ---------------------------------------------------------------------------------------------- --compare


LAYOUTS = (("zigzag/cache/varlen.py", "zigzag/kernels/varlen_triton.py"), ("zigzag/varlen.py", "zigzag/varlen_kernel.py"))
"""Where the varlen layer and its kernel module lived: now, and before the package's layout changed."""


def _modules_at(rev: str, folder: str) -> tuple[types.ModuleType, types.ModuleType]:
    """The varlen layer and kernel modules as of git revision ``rev``, imported under other names,
    the first using the second for its kernels."""
    for layer_path, kernel_path in LAYOUTS:
        try:
            layer_source, kernel_source = source_at(rev, layer_path), source_at(rev, kernel_path)
            break
        except subprocess.CalledProcessError:
            continue
    else:
        raise FileNotFoundError(f"no varlen modules at {rev} (looked for {LAYOUTS})")
    # Its operators under another namespace: this tree's registered theirs under zigzag:: already.
    kernel_source = kernel_source.replace('custom_op("zigzag::', 'custom_op("zigzag_at_rev::')
    kernel = import_source("_at_0_varlen_kernel", kernel_source, folder)
    layer = import_source("_at_1_varlen", layer_source, folder)
    layer._triton_kernels = lambda: kernel
    return layer, kernel


def _use_triton(layer_module: types.ModuleType) -> None:
    """The Triton backend for ``layer_module``'s layers: its own setter where it had one (before the
    one kernel switch), else the switch."""
    if hasattr(layer_module, "set_backend"):
        layer_module.set_backend("triton")
    set_backend("varlen", "triton")


def _no_launch(*args) -> None:
    """Stands in for the kernel launch."""


def _decode(stack: list, steps: int, query: torch.Tensor, step_kv: torch.Tensor, masked: bool, module) -> None:
    """``steps`` decoding steps over the layers of ``stack``, as the model runs them: each layer's
    ``update`` then transformers' SDPA attention; one bool mask per step, shared by the layers, when
    ``masked``. Every 63 steps the layers are cropped back to their compressed prefix."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, d = query.shape[0], query.shape[-1]
    for _ in range(steps):
        appended = stack[0].appended
        if appended >= 63:
            for layer in stack:
                layer.crop(-appended)
            appended = 0
        mask = torch.ones(batch, 1, 1, 2 + appended, dtype=torch.bool) if masked else None
        for layer in stack:
            keys, values = layer.update(step_kv, step_kv)
            sdpa_attention_forward(module, query, keys, values, mask, scaling=d**-0.5)


def compare(args) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend on CPU tensors; nothing is launched
    import zigzag.cache.varlen as varlen_here
    import zigzag.kernels.varlen_triton as kernel_here

    torch.set_num_threads(1)
    heads, kv_heads, d, n = 32, 8, 128, 256
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    with tempfile.TemporaryDirectory() as folder:
        varlen_there, kernel_there = _modules_at(args.compare, folder)
        trees = {args.compare: (varlen_there, kernel_there), "this tree": (varlen_here, kernel_here)}
        for layer_module, kernel in trees.values():
            _use_triton(layer_module)
            for name in ("launch", "_launch_on"):  # the launch entry points of either version
                if hasattr(kernel, name):
                    setattr(kernel, name, _no_launch)
        case = f"decoding step ({args.layers} layers, host only, launch stubbed)"
        print(f"| {case} | {args.compare} us | this tree us | ratio |")
        print("|---|---|---|---|")
        for batch, masked in ((1, False), (4, True)):
            gen = torch.Generator().manual_seed(0)
            lengths = torch.full((batch, kv_heads), n)
            lengths[:, 0], lengths[:, 1] = n // 2, n + n // 2
            total = int(lengths.sum())
            flat = torch.randn(total, d, generator=gen)
            layers = {
                name: [mod.VarlenLayer(flat, flat, torch.arange(total) % n, lengths, n) for _ in range(args.layers)]
                for name, (mod, _kernel) in trees.items()
            }
            query = torch.randn(batch, 1, heads, d, generator=gen).transpose(1, 2)
            step_kv = torch.randn(batch, kv_heads, 1, d, generator=gen)
            times = {name: [] for name in trees}
            for name in trees:
                _decode(layers[name], 100, query, step_kv, masked, module)  # warm up
            for r in range(args.rounds):
                for name in list(trees)[:: 1 if r % 2 else -1]:
                    start = time.perf_counter()
                    _decode(layers[name], args.steps, query, step_kv, masked, module)
                    times[name].append(1e6 * (time.perf_counter() - start) / (args.steps * args.layers))
            there, here = (statistics.median(times[name]) for name in trees)
            ratio = statistics.median(b / a for a, b in zip(*times.values()))
            case = f"batch {batch}, {'bool mask' if masked else 'no mask'}"
            print(f"| {case} | {there:.1f} | {here:.1f} | {ratio:.3f} |")


def memos(args) -> None:
    """Each memo of the varlen decoding step, hit, against the computation it saves (CPU)."""
    import timeit

    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend on CPU tensors; nothing is launched
    import zigzag.cache.varlen as layer_module
    import zigzag.kernels.varlen_triton as vk
    from zigzag.cache.attention import plain

    torch.set_num_threads(1)
    set_backend("varlen", "triton")
    batch, kv_heads, d, n = 4, 8, 128, 256
    lengths = torch.full((batch, kv_heads), n)
    lengths[:, 0], lengths[:, 1] = n // 2, n + n // 2
    total = int(lengths.sum())
    flat = torch.randn(total, d)
    layer = VarlenLayer(flat, flat, torch.arange(total) % n, lengths, n)
    layer.update(torch.randn(batch, kv_heads, 1, d), torch.randn(batch, kv_heads, 1, d))
    mask = torch.ones(batch, 1, 1, 1 + layer.appended, dtype=torch.bool)
    tail = layer_module._tail_of(plain(mask), layer.appended)
    shape = (batch, 32, 1, layer.appended)

    def import_statement():
        from zigzag.kernels import varlen_triton

        return varlen_triton

    rows = [
        ("_triton_kernels()", layer_module._triton_kernels, import_statement),
        ("_resolved_backend()", layer._resolved_backend, lambda: layer_module.get_backend(layer.device)),
        ("_triton_prefix()", layer._triton_prefix, lambda: vk.build_prefix(
            layer.prefix_keys, layer.prefix_values, layer.offsets, None, kv_heads=kv_heads, width=layer.width)),
        ("_sdpa_tail_mask()", lambda: layer_module._sdpa_tail_mask(mask, layer.appended),
         lambda: layer_module._tail_of(plain(mask), layer.appended)),
        ("_kernel_mask()", lambda: vk._kernel_mask(tail, shape),
         lambda: (tail.view(torch.uint8), vk._mask_strides(tail, shape))),
    ]  # fmt: skip
    best = lambda fn: min(timeit.repeat(fn, number=args.calls, repeat=7)) / args.calls * 1e6
    print("| memo (CPU) | hit us | computed us |")
    print("|---|---|---|")
    for name, hit, computed in rows:
        hit()  # fill the memo
        print(f"| {name} | {best(hit):.2f} | {best(computed):.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.host_overhead", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--slots", type=int, default=1024, help="cached tokens per KV head")
    parser.add_argument("--calls", type=int, default=2000, help="calls timed per component and repeat")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per component; the median is printed")
    parser.add_argument("--device", default="cuda", help="cuda; cpu runs the kernel in Triton's interpreter (a check)")
    parser.add_argument("--compare", metavar="REV", help="time this tree's varlen layer step against revision REV (None: no comparison)")
    parser.add_argument("--memos", action="store_true", help="time the varlen step's memos against their computation (CPU)")
    parser.add_argument("--layers", type=int, default=4, help="--compare: layers per decoding step")
    parser.add_argument("--rounds", type=int, default=40, help="--compare: interleaved rounds")
    parser.add_argument("--steps", type=int, default=100, help="--compare: decoding steps per round")
    args = parser.parse_args(argv)
    if args.memos:
        memos(args)
    elif args.compare:
        compare(args)
    else:
        components(args)


if __name__ == "__main__":
    main()
