"""The ``fp8_recompute`` option: a recomputed LoRA linear's base GEMM in e4m3
(kernels/fp8_recompute.py, partition.fp8_recomputes).

What correct means for a rewrite that changes the numbers on purpose (as ``fp8_dx``):
- the ops equal their plain-PyTorch oracle (e4m3 operands, fp32 product) up to the
  output's roundings, h equals the exact op's bitwise, and against the exact op the error
  stays within the bound test_fp8_dx.py states (relative norm ≤ 8 %, cosine ≥ 0.995);
- where fp8 cannot run (fp32, sizes not multiples of 16, an earlier failure) the outputs
  are the exact op's;
- in a whole model with checkpoint_layers: the losses of step 1 equal those without the
  option (the forward is untouched), the gate/up and output-projection recomputes are
  replaced and q/k/v's are not (their outputs reach attention), and the LoRA gradients
  change within the bound.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny_model, reset_dynamo, run_once
from lorafuse.kernels import fp8_recompute as fr
from lorafuse.kernels._dispatch import warned
from lorafuse.kernels.lora import lora_linear_op
from lorafuse.kernels.lora_group import lora_linear_group_op
from test_fp8_dx import _bf16_run, cos, rel

BF16 = torch.bfloat16


def _group(m, k, ns, r, seed, dtype=BF16, bias=False):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = rn(2, m // 2, k)
    ws = [rn(n, k, scale=k ** -0.5) for n in ns]
    bs = [rn(n) if bias else None for n in ns]
    As = [rn(r, k, scale=k ** -0.5) for _ in ns]
    Bs = [rn(n, r) for n in ns]  # not zero: the low-rank term is part of y
    scales = [0.5 + i for i in range(len(ns))]
    return x, ws, bs, As, Bs, scales


@settings(max_examples=20, deadline=None)
@given(m=st.sampled_from([16, 32, 64]), k=st.sampled_from([32, 64, 96]),
       ns=st.lists(st.sampled_from([16, 48, 80]), min_size=1, max_size=3),
       r=st.integers(1, 8), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_group_op_equals_its_oracle_and_stays_near_exact(m, k, ns, r, bias, seed):
    x, ws, bs, As, Bs, scales = _group(m, k, ns, r, seed, bias=bias)
    got = fr.lora_linear_group_fp8_op(x, ws, bs, As, Bs, scales)
    exact = lora_linear_group_op(x, ws, bs, As, Bs, scales)
    assert torch.equal(got[-1], exact[-1])  # h: as the exact op computes it
    x2 = x.reshape(-1, k)
    h = exact[-1].reshape(-1, sum(r for _ in ns)).float()
    for i, (y, ye, w) in enumerate(zip(got[:-1], exact[:-1], ws)):
        assert y.shape == ye.shape and y.dtype == BF16 and y.is_contiguous()
        hi = h[:, i * r:(i + 1) * r]
        oracle = fr.fp8_linear_reference(x2, w) + hi @ Bs[i].float().t() * scales[i]
        if bs[i] is not None:
            oracle = oracle + bs[i].float()
        # three roundings to bf16 (the GEMM's, the tail's, the bias's) against none
        assert rel(y.reshape(-1, w.shape[0]), oracle) <= 3 * 2 ** -8, i
        assert rel(y, ye) <= 0.08 and cos(y, ye) >= 0.995, (i, rel(y, ye))


def test_single_op_with_dropout_input():
    """``lora_linear``'s twin: y near the exact op's, h from x_lora bitwise."""
    x, ws, bs, As, Bs, scales = _group(32, 64, [48], 4, seed=1, bias=True)
    x_lora = x * 0.5  # a dropout's output stands in
    y, h = fr.lora_linear_fp8_op(x, ws[0], bs[0], As[0], Bs[0], 0.75, x_lora)
    ye, he = lora_linear_op(x, ws[0], bs[0], As[0], Bs[0], 0.75, x_lora)
    assert torch.equal(h, he)
    assert 0 < rel(y, ye) <= 0.08 and cos(y, ye) >= 0.995


@pytest.mark.parametrize("case", ["fp32", "k not a multiple of 16", "m not a multiple of 16"])
def test_exact_where_fp8_cannot_run(case):
    m, k, dtype = {"fp32": (32, 64, torch.float32), "k not a multiple of 16": (32, 40, BF16),
                   "m not a multiple of 16": (18, 64, BF16)}[case]
    x, ws, bs, As, Bs, scales = _group(m, k, [48, 16], 4, seed=2, dtype=dtype)
    got = fr.lora_linear_group_fp8_op(x, ws, bs, As, Bs, scales)
    exact = lora_linear_group_op(x, ws, bs, As, Bs, scales)
    assert all(torch.equal(a, b) for a, b in zip(got, exact))


def test_a_failure_falls_back_to_exact_for_the_rest_of_the_process(monkeypatch):
    def broken(*args):
        raise RuntimeError("no rowwise fp8 kernel here")

    monkeypatch.setattr(fr, "scaled_mm", broken)
    monkeypatch.setattr(fr, "_failed", [])
    warned.clear()
    x, ws, bs, As, Bs, scales = _group(32, 64, [48], 4, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fr.lora_linear_group_fp8_op(x, ws, bs, As, Bs, scales)
        second = fr.lora_linear_group_fp8_op(x, ws, bs, As, Bs, scales)
    exact = lora_linear_group_op(x, ws, bs, As, Bs, scales)
    assert all(torch.equal(a, b) for out in (first, second) for a, b in zip(out, exact))
    msgs = [str(w.message) for w in caught if "fp8_recompute failed" in str(w.message)]
    assert len(msgs) == 1, msgs


_RUNS: dict = {}


def _ck_run(fp8_recompute):
    """test_fp8_dx's tiny bf16 Llama run (3 SGD steps) with checkpoint_layers: (losses,
    per-step LoRA grads, the report); once per module (the q/k/v test reads it too)."""
    return run_once(_RUNS, fp8_recompute, lambda: _bf16_run(
        False, checkpoint_layers=True, fp8_recompute=fp8_recompute,
        passes=["lora", "attention", "loss"]))


def _count(report, field) -> int:
    return sum(getattr(g, field) or 0 for g in report.graphs)


@pytest.mark.slow
def test_whole_model_checkpointed_gate_up_and_o_in_fp8():
    exact_losses, exact_grads, exact_report = _ck_run(False)
    losses, grads, report = _ck_run(True)
    layers = 2
    # Each layer recomputes 4 LoRA calls: the q/k/v group, o, the gate/up group, down.
    # Down is reduced to x' Aᵀ where the backward does not read its output (every layer
    # but the last); of the other 7, all but the 2 q/k/v groups (their outputs reach
    # attention) take e4m3.
    h_only, fp8_calls = _count(report, "lowrank_only"), _count(report, "fp8_recomputed")
    assert h_only == _count(exact_report, "lowrank_only") == layers - 1
    assert fp8_calls == 4 * layers - h_only - layers, fp8_calls
    assert _count(exact_report, "fp8_recomputed") == 0
    text = report.graphs[0].format()
    assert f"fp8_recompute: {fp8_calls} recomputed LoRA linears" in text, text
    assert losses[0] == exact_losses[0]  # the forward is not touched
    errs = {n: rel(grads[0][n], exact_grads[0][n]) for n in exact_grads[0]}
    changed = [n for n, e in errs.items() if e > 1e-3]
    assert len(changed) >= len(errs) // 2, errs
    assert max(errs.values()) <= 0.1, errs
    for a, b in zip(losses, exact_losses):
        assert abs(a - b) <= 0.02 * abs(b)


@pytest.mark.parametrize("arch,fp8_calls", [("llama", 5), ("gemma2", 6)])
def test_q_k_v_stay_exact_where_attention_rebuilds_its_probabilities(arch, fp8_calls):
    """Llama through the attention pass (its backward rebuilds the probabilities from q and
    k): 2 layers × (o, gate/up) + the last down, q/k/v exact. Gemma2's eager softcapped
    attention, left alone with only the lora pass: its backward recomputes the softmax
    from q and k (a matmul, then an exp), so q/k/v stay exact there too; o and down (read
    by Gemma2's extra norms) and gate/up of both layers take e4m3.

    Llama's count is read from the whole-model test's run (``_ck_run(True)``: this model,
    first batch and options, with the loss pass too; each compile costs ~30 s on CI's CPU),
    whose report counts the e4m3 recomputes as ``counters["lorafuse"]["recompute_fp8"]``."""
    import lorafuse
    from torch._dynamo.utils import counters

    if arch == "llama":
        _, _, report = _ck_run(True)
        assert len(report.graphs) == 1 and _count(report, "fp8_recomputed") == fp8_calls, \
            report.graphs[0].format()
        return
    reset_dynamo()
    counters.clear()
    model = make_tiny_model(arch, intermediate_size=64, r=4, seed=3)
    fn = torch.compile(model, backend=functools.partial(lorafuse.lorafuse_backend, options={
        "strict": True, "checkpoint_layers": True, "fp8_recompute": True, "passes": ["lora"]}))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", BF16):
        loss = fn(input_ids=ids, labels=ids).loss
    loss.backward()
    assert counters["lorafuse"]["recompute_fp8"] == fp8_calls, dict(counters["lorafuse"])
    reset_dynamo()


def test_without_the_lora_pass_warns():
    import lorafuse

    with pytest.warns(UserWarning, match="fp8_recompute applies to the lora pass"):
        lorafuse.Options.parse({"fp8_recompute": True, "passes": ["attention"]})
