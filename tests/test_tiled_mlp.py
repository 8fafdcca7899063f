"""The tiled MLP (``lorafuse::tiled_mlp``, kernels/tiled_mlp.py) and its pass.

- Op (CPU), drawn by hypothesis: token counts that are and are not multiples of the chunk,
  odd widths, ranks 1-4, biases or none, SiLU / GELU / tanh GELU. fp32: the output and
  every gradient equal the untiled fused ops (the grouped LoRA gate/up, the gated product,
  LoRA down) to fp32 rounding (relative norm 1e-6 for the output, 1e-5 for the gradients,
  whose sums over tokens are reordered), and a float64 computation of the model's formula
  to 1e-5.
- The pass on tiny models (after the lora pass): one op per layer, the same losses and
  LoRA gradients as eager over two SGD steps, with Llama (SiLU) and Gemma2 (tanh GELU), and
  with ``checkpoint_layers``; no (tokens × intermediate) activation kept for the backward;
  left alone with a reason when the graph holds no more tokens than a chunk.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_layer_checkpoint import BATCH, LR, SEQ, STEPS, _batches, _saved_spy
from conftest import INTERMEDIATE, lorafuse_sgd_run, make_tiny_model
from lorafuse.kernels.gated_mlp import gated_mlp_op
from lorafuse.kernels.lora import lora_linear
from lorafuse.kernels.lora_group import lora_linear_group
from lorafuse.kernels.tiled_mlp import tiled_mlp, tiled_mlp_reference


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _untiled(x, weights, biases, lora_as, lora_bs, scales, act):
    g, u = lora_linear_group(x, weights[:2], biases[:2], lora_as[:2], lora_bs[:2], scales[:2])
    return lora_linear(gated_mlp_op(g, u, act, g.dtype), weights[2], biases[2], lora_as[2],
                       lora_bs[2], scales[2])


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 40), chunk=st.integers(1, 16), k=st.integers(3, 24),
       n=st.integers(3, 40), r=st.integers(1, 4), bias=st.booleans(),
       act=st.sampled_from(["silu", "gelu", "gelu_tanh"]), seed=st.integers(0, 2**16))
def test_op_equals_the_untiled_ops_and_the_formula(tokens, chunk, k, n, r, bias, act, seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    x = randn(1, tokens, k, grad=True)
    weights = [randn(n, k) / k**0.5, randn(n, k) / k**0.5, randn(k, n) / n**0.5]
    biases = [randn(n), randn(n), randn(k)] if bias else [None] * 3
    lora_as = [randn(r, k, grad=True), randn(r, k, grad=True), randn(r, n, grad=True)]
    lora_bs = [randn(n, r, grad=True), randn(n, r, grad=True), randn(k, r, grad=True)]
    scales = [2.0, 0.5, 1.5]
    leaves = [x, *lora_as, *lora_bs]
    y = tiled_mlp(x, weights, biases, lora_as, lora_bs, scales, act, chunk)
    dy = randn(*y.shape)
    got = torch.autograd.grad(y, leaves, dy)
    y_u = _untiled(x, weights, biases, lora_as, lora_bs, scales, act)
    want = torch.autograd.grad(y_u, leaves, dy)
    # fp32 rounding: CPU BLAS sums in an order that depends on the number of rows
    assert _rel(y, y_u) <= 1e-6
    for a, b in zip(got, want):
        assert _rel(a, b) <= 1e-5
    d = [t.detach().double().requires_grad_() for t in leaves]
    y64 = tiled_mlp_reference(d[0], [w.double() for w in weights],
                              [b.double() if b is not None else None for b in biases],
                              d[1:4], d[4:], scales, act)
    ref = torch.autograd.grad(y64, d, dy.double())
    assert _rel(y, y64) <= 1e-5
    for a, b in zip(got, ref):
        assert _rel(a, b) <= 1e-5


def test_one_chunk_of_intermediates_live_at_a_time(monkeypatch):
    """Forward and backward: when a chunk's gate/up is computed, no earlier chunk's
    (tokens × intermediate) tensor is still live (the loop's names held the last chunk's
    while the next was allocated, before session 34)."""
    import weakref

    from lorafuse.kernels import tiled_mlp as tiled

    made = []  # weak references to every chunk's g, u, h, p

    def gate_up(*args, inner=tiled._gate_up):
        alive = [r for r in made if r() is not None]
        assert not alive, f"{len(alive)} tensors of an earlier chunk still live"
        out = inner(*args)
        made.extend(weakref.ref(t) for t in out)
        return out

    monkeypatch.setattr(tiled, "_gate_up", gate_up)
    k, n, r = 6, 10, 2
    x = torch.randn(1, 23, k, requires_grad=True)
    weights = [torch.randn(n, k), torch.randn(n, k), torch.randn(k, n)]
    lora_as = [torch.randn(r, k, requires_grad=True), torch.randn(r, k, requires_grad=True),
               torch.randn(r, n, requires_grad=True)]
    lora_bs = [torch.randn(n, r, requires_grad=True), torch.randn(n, r, requires_grad=True),
               torch.randn(k, r, requires_grad=True)]
    y = tiled_mlp(x, weights, [None] * 3, lora_as, lora_bs, [1.0, 1.0, 1.0], "silu", 5)
    calls = len(made) // 4
    made.clear()
    y.backward(torch.randn(y.shape))
    assert calls == 5 and len(made) == 5 * 4  # 23 tokens in chunks of 5, both ways
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_opcheck():
    x = torch.randn(2, 5, 6, requires_grad=True)
    weights = [torch.randn(8, 6), torch.randn(8, 6), torch.randn(6, 8)]
    lora_as = [torch.randn(2, 6, requires_grad=True), torch.randn(2, 6, requires_grad=True),
               torch.randn(2, 8, requires_grad=True)]
    lora_bs = [torch.randn(8, 2, requires_grad=True), torch.randn(8, 2, requires_grad=True),
               torch.randn(6, 2, requires_grad=True)]
    torch.library.opcheck(torch.ops.lorafuse.tiled_mlp.default,
                          (x, weights, [None] * 3, lora_as, lora_bs, [1.0, 2.0, 0.5], "silu", 3))


# ----------------------------------------------------------------- the pass, whole models

LAYERS, CHUNK = 2, 7  # chunks of 7 of the 32 tokens: the last one partial


# One layer where each layer's op stands alone (a 2-layer compile costs ~40 % more); two with
# checkpoint_layers, where the first layer's recomputed MLP is not the last layer's.
@pytest.mark.slow
@pytest.mark.parametrize("arch,extra,layers", [("llama", {}, 1), ("gemma2", {}, 1),
                                               ("llama", {"checkpoint_layers": True}, LAYERS)])
def test_models_train_as_eager_keeping_no_intermediate(arch, extra, layers, monkeypatch,
                                                       no_autograd_cache):
    base = make_tiny_model(arch, layers=layers, seed=5)
    plans = _saved_spy(monkeypatch)
    eager = lorafuse_sgd_run(copy.deepcopy(base), _batches(), LR, None)
    got = lorafuse_sgd_run(copy.deepcopy(base), _batches(), LR,
                           {"passes": ["lora", "tiled_mlp"], "tiled_mlp_tokens": CHUNK, **extra})
    (graph,) = got["report"].graphs
    tiled = next(p for p in graph.passes if p.name == "tiled_mlp")
    assert len(tiled.matched) == layers and not tiled.skipped, graph.format()
    for step in range(STEPS):
        torch.testing.assert_close(got["losses"][step], eager["losses"][step], rtol=1e-5,
                                   atol=0)
        for name, g in eager["grads"][step].items():
            assert g.norm() > 0, name
            assert _rel(got["grads"][step][name], g) <= 1e-4, (arch, step, name)
    assert not _mlp_sized(plans[-1].values()), plans[-1]
    if not extra and arch == "llama":  # the check can fail: without the pass they are kept
        lorafuse_sgd_run(copy.deepcopy(base), _batches(), LR, {"passes": ["lora"]})
        assert _mlp_sized(plans[-1].values())


def _mlp_sized(saved) -> list:
    """The (tokens × intermediate) activations among ``saved``."""
    return [tuple(v.shape) for v in saved if isinstance(v, torch.Tensor) and v.dim() >= 2
            and v.is_floating_point() and v.shape[-1] == INTERMEDIATE
            and v.numel() >= BATCH * SEQ * INTERMEDIATE]


def test_left_alone_at_most_one_chunk_of_tokens():
    """The pass's decision, on the Dynamo graph (``lorafuse.explain``, strict: a failing pass
    raises); the graph it leaves is the lora pass's alone, compiled and trained above."""
    import lorafuse

    base = make_tiny_model("llama", layers=LAYERS, seed=5)
    report = lorafuse.explain(base, **_batches()[0], lorafuse_options={  # 32 tokens, chunks of 8192
        "passes": ["lora", "tiled_mlp"], "strict": True})
    tiled = next(p for p in report.graphs[0].passes if p.name == "tiled_mlp")
    assert tiled.matched == [] and {r for _, r in tiled.skipped} == {
        f"{BATCH * SEQ} tokens, not more than one chunk (8192)"}


def test_option_checked():
    from lorafuse.backend import Options

    for bad in (0, -3, 2.5, True, "8192"):
        with pytest.raises(ValueError, match="tiled_mlp_tokens"):
            Options.parse({"tiled_mlp_tokens": bad})
