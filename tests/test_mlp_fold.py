"""The MLP fold: a down projection's LoRA op fed by a gated product ``act(gate) * up``
computes its dA from gate and up, so the backward no longer keeps the product
(kernels/lora_gated.py, kernels/lora.py, passes/lora.py).

- the op: outputs and every gradient (through the activation's own autograd graph: gate,
  up, A, B; with and without a gradient for the op's input) equal the unfolded op's in fp32,
  for SiLU and both GELUs;
- the Triton kernel (interpreter, subprocess) against the reference: fp32 tightly, bf16
  within bf16 rounding, odd sizes, ranks below and above one dot tile, strided gate/up
  (Phi-3's chunks), several token slices;
- whole models: a tiny Llama keeps fewer activation bytes with the same training (fp32);
  with a bf16 base every down projection folds and the losses stay the unfolded run's;
  LORAFUSE_MLP_FOLD=0 turns it off.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorafuse.passes.lora as lora_pass
from lorafuse.kernels.gated_mlp import activation
from lorafuse.kernels.lora import lora_linear_op
from lorafuse.kernels.lora_gated import gated_da_reference

from conftest import (VOCAB, CheckRecorder, assert_check_passed, assert_same_sgd_training,
                      bf16_base, fold_sgd_run, make_tiny_model, partitioned_graph,
                      run_interpreter_worker)

ACTS = ("silu", "gelu", "gelu_tanh")


def _problem(seed, lead, I, N, rank, dtype):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(dtype)  # noqa: E731
    return (rnd(*lead, I), rnd(*lead, I), rnd(N, I) / I**0.5, rnd(rank, I) / I**0.5,
            rnd(N, rank), rnd(*lead, N))


def _train_op(fold, act, gate, up, w, A, B, dy, need_input_grad=True):
    """The single op on act(gate) * up (folded or not): y and the gradients of gate, up
    (None without an input gradient), A and B."""
    gate = gate.detach().requires_grad_(need_input_grad)
    up = up.detach().requires_grad_(need_input_grad)
    A, B = A.detach().requires_grad_(), B.detach().requires_grad_()
    p = activation(gate, act) * up
    extra = (gate, up, act) if fold else ()
    y, _ = lora_linear_op(p, w, None, A, B, 0.75, None, *extra)
    y.backward(dy)
    return [y.detach(), gate.grad, up.grad, A.grad, B.grad]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), lead=st.sampled_from([(5,), (2, 7), (3, 1, 4)]),
       I=st.integers(1, 40), N=st.integers(1, 24), rank=st.integers(1, 8),
       act=st.sampled_from(ACTS), need_input_grad=st.booleans())
def test_fold_op_equals_unfolded_fp32(seed, lead, I, N, rank, act, need_input_grad):
    args = _problem(seed, lead, I, N, rank, torch.float32)
    got = _train_op(True, act, *args, need_input_grad=need_input_grad)
    want = _train_op(False, act, *args, need_input_grad=need_input_grad)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None and not need_input_grad, i
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, i
        assert ((a - b).norm() / b.norm()).item() < 1e-5, i


def test_fold_keeps_gate_and_up_not_the_product():
    """What the op saves for the backward: gate and up (which the activation's backward
    saves too), never the product."""
    gate, up, w, A, B, dy = _problem(0, (4,), 8, 6, 2, torch.float32)
    gate.requires_grad_()
    p = activation(gate, "silu") * up
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = lora_linear_op(p, w, None, A.requires_grad_(), B.requires_grad_(), 1.0, None,
                              gate, up, "silu")
    assert any(t is gate for t in saved) and any(t is up for t in saved)
    assert not any(t is p for t in saved)


# --------------------------------------------------------------------------- Triton (subprocess)

# (name, lead shape, I, rank, strided); the interpreter's tiles are 16 x 16
TRITON_CASES = [
    ("odd", (3, 11), 37, 5, False),
    ("rank-20", (40,), 24, 20, False),
    ("slices", (300,), 20, 3, False),  # more than one token slice
    ("chunked", (2, 9), 33, 4, True),  # gate, up = gate_up.chunk(2, -1)
]


def _triton_checks():
    """(case, act, dtype): every activation on the first case, SiLU on the others."""
    return [(c, a, d) for i, c in enumerate(TRITON_CASES) for a in ACTS
            for d in ("float32", "bfloat16") if i == 0 or a == "silu"]


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__, LORAFUSE_LORA_GATED_IMPL="triton")


def _check_name(case, act, dtype):
    return f"{case[0]}-{act}-{dtype}"


@pytest.mark.parametrize("check", [_check_name(*c) for c in _triton_checks()])
def test_triton_interpreter(interpreter_results, check):
    assert_check_passed(interpreter_results, check)


def _worker():
    """Runs in the subprocess (TRITON_INTERPRET=1, LORAFUSE_LORA_GATED_IMPL=triton)."""
    import warnings

    from lorafuse.kernels import lora_gated

    assert lora_gated._INTERPRETED, "TRITON_INTERPRET did not take effect"
    record = CheckRecorder()

    def case(lead, I, rank, strided, act, dtype):
        gen = torch.Generator().manual_seed(I * 31 + rank)
        rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
        if strided:
            gate, up = rnd(*lead, 2 * I).to(dtype).chunk(2, -1)
        else:
            gate, up = rnd(*lead, I).to(dtype), rnd(*lead, I).to(dtype)
        g = rnd(*lead, rank).to(dtype)
        if lead == (300,):  # the "slices" case must split the tokens
            assert lora_gated._launch(300, I, rank)[3] > 1, "one slice only"
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback would hide the kernel
            got = lora_gated.gated_da(g.reshape(-1, rank), gate, up, act, 0.5, dtype, dtype)
        want = gated_da_reference(g.reshape(-1, rank), gate, up, act, 0.5, dtype, dtype)
        assert got.shape == want.shape == (rank, I) and got.dtype == dtype
        if dtype == torch.float32:  # sigmoid/erf of another library, another sum order
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        else:  # both round p to bf16 (the GPU's rounding): the sums differ in order only
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err <= 2.0**-8, err

    for (name, lead, I, rank, strided), act, d in _triton_checks():
        record(_check_name((name,), act, d),
               lambda: case(lead, I, rank, strided, act, getattr(torch, d)))
    record.report()


# --------------------------------------------------------------------------- models

BATCH, SEQ, LAYERS = 2, 16, 2  # BATCH and SEQ: fold_sgd_run's


def _run(model, monkeypatch, fold: bool):
    """Trains ``model`` with the fold on or off: (the run, what each fold check gave)."""
    seen = []
    out = fold_sgd_run(model, monkeypatch, lora_pass.MLP_FOLD_ENV, fold, "_mlp_fold_args", seen)
    return out, [a[2] if a else None for a in seen]


@pytest.mark.slow
def test_model_keeps_fewer_bytes_same_training(monkeypatch):
    base = make_tiny_model("llama", layers=LAYERS, seed=3)
    inter = base.config.intermediate_size
    folded, count = _run(copy.deepcopy(base), monkeypatch, True)
    plain, _ = _run(copy.deepcopy(base), monkeypatch, False)
    # o_proj reads the attention's output (no fold); down_proj the gated product
    assert count == [None, "silu"] * LAYERS, count
    assert f"MLP fold: {LAYERS} op(s)" in str(folded["report"])
    assert "MLP fold" not in str(plain["report"])
    tokens = BATCH * SEQ
    kept, kept_folded = (partitioned_graph(r).activation_bytes for r in (plain, folded))
    assert kept - kept_folded >= LAYERS * tokens * inter * 4, (kept, kept_folded)
    assert_same_sgd_training(folded, plain, 1e-6, 1e-5)


@pytest.mark.slow
def test_model_bf16_base_folds_and_trains(monkeypatch):
    """A bf16 base (LoRA factors fp32, PEFT's default): every down projection folds, and
    the loss of each step is the unfolded run's within bf16 noise."""
    model = bf16_base(make_tiny_model("llama", layers=LAYERS, seed=5))
    folded, count = _run(copy.deepcopy(model), monkeypatch, True)
    plain, _ = _run(copy.deepcopy(model), monkeypatch, False)
    assert count.count("silu") == LAYERS, count
    assert_same_sgd_training(folded, plain, 1e-3)


@pytest.mark.parametrize("order", [("lora", "gated_mlp"), ("gated_mlp", "lora")])
def test_fold_with_the_gated_mlp_pass(order):
    """With the ``gated_mlp`` pass too, in either order, the down op folds (reading the
    gate and up that the gated op reads), and the compiled step's gradients are eager's."""
    from lorafuse.passes import PASSES
    from lorafuse.report import PassReport

    from conftest import reset_dynamo

    seen = {}

    def backend(gm, example_inputs):
        for name in order:
            PASSES[name](gm, PassReport(name))
        down = [n for n in gm.graph.nodes if n.target is torch.ops.lorafuse.lora_linear.default
                and len(n.args) == 10]
        gated = [n for n in gm.graph.nodes if n.target is torch.ops.lorafuse.gated_mlp.default]
        seen["folds"] = [(n.args[7], n.args[8], n.args[9]) for n in down]
        seen["gated"] = [tuple(n.args[:3]) for n in gated]
        return torch._dynamo.lookup_backend("aot_eager_default_partitioner")(gm, example_inputs)

    model = make_tiny_model("llama", layers=1, seed=3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    want = copy.deepcopy(model)
    want(input_ids=ids, labels=ids).loss.backward()
    reset_dynamo()
    torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    reset_dynamo()
    assert len(seen["folds"]) == 1 and seen["folds"] == seen["gated"], seen
    for (name, p), (_, q) in zip(model.named_parameters(), want.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fold_off_by_env(monkeypatch):
    """LORAFUSE_MLP_FOLD=0: the pass adds no fold arguments."""
    monkeypatch.setenv(lora_pass.MLP_FOLD_ENV, "0")
    assert lora_pass._mlp_fold_args(None, torch.float32) == ()


if __name__ == "__main__":
    os.environ.setdefault("LORAFUSE_LORA_GATED_IMPL", "triton")
    _worker()
