"""The ``activation_dtype`` option: saved activations stored as int8/fp8 with per-row scales.

- The functions the partitioner inlines, ``quantize_rows`` / ``dequantize_rows``: the round
  trip stays within the bound of ``kernels/quant_storage.py`` for any shape and magnitude
  (hypothesis), zero rows come back zero and rows with inf/NaN come back all NaN; the same
  as compiled by Inductor (what runs in the partitioned graphs), on a few shapes.
- A tiny PEFT Llama (one layer; fp32, CPU; batch 4 x 128 so its activations pass the 64 KiB
  threshold) compiled with ``activation_dtype``: the activation bytes the backward keeps
  (read from the partitioned backward graph's inputs) shrink by the expected factor; the
  first loss is bitwise the unquantized one (the forward is unchanged); the LoRA
  gradients of step 1 and the losses of 5 SGD steps stay within stated bounds of the
  unquantized run / eager; it composes with ``memory_budget``.
- Without the option the partitioned graphs hold no int8/fp8 tensor and the report no
  quantization fields.

Measured on CPU (torch 2.13, seed 3, one layer), against the unquantized compiled run at
step 1: int8 LoRA gradients cos >= 0.99990 and relative norm error <= 0.015 (worst of 14
tensors), fp8 cos >= 0.9985 and <= 0.058; 7 activations quantized, activation bytes kept
0.59x (quantized ones 0.27x). Losses over 5 SGD steps vs eager: relative difference
<= 1.6e-5 (int8), <= 2.1e-5 (fp8). (Two layers: 0.99992 / 0.013, 0.9988 / 0.052, 14
quantized, 0.54x, 3e-6 / 5e-5; each compile of the module's six runs took ~30 % longer.)
CPU time: about 70 s.
"""

from __future__ import annotations

import copy
import os
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lorafuse
from lorafuse.kernels.quant_storage import dequantize_rows as dequantize
from lorafuse.kernels.quant_storage import quantize_rows as quantize

from conftest import VOCAB, lorafuse_sgd_run, make_tiny_model, partitioned_graph, reset_dynamo

# --------------------------------------------------------------------------- the round trip

STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def _bound(x32, absmax, storage, out_dtype):
    """The documented per-element bound, plus the output dtype's rounding and fp32 slack."""
    m = absmax.unsqueeze(-1)
    if storage == torch.int8:
        b = m / 254
    else:
        b = torch.maximum(x32.abs() / 16, m / 458752)
    out = torch.finfo(out_dtype)
    subnormal_step = out.smallest_normal * out.eps  # the output's rounding below its normals
    return (b * (1 + 1e-5) + x32.abs() * out.eps + subnormal_step
            + m * 4 * torch.finfo(torch.float32).eps)


@settings(max_examples=60, deadline=None, derandomize=True)
@example(rows=1, cols=24, log_scale=-40, dtype=torch.bfloat16, storage="fp8", zero_row=False,
         seed=0)  # bf16 subnormals: once failed in CI, when the bound left out their spacing
@given(rows=st.integers(1, 6), cols=st.integers(1, 70),
       log_scale=st.sampled_from([-40, -20, -3, 0, 3, 20, 36]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       storage=st.sampled_from(["int8", "fp8"]), zero_row=st.booleans(), seed=st.integers(0, 99))
def test_round_trip_within_bound(rows, cols, log_scale, dtype, storage, zero_row, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * 10.0 ** log_scale
    # per-row spread of magnitudes too (tiny and huge values in one row)
    x = x * torch.exp(torch.randn(rows, cols, generator=gen) * 3)
    if zero_row:
        x[0] = 0
    x = x.to(dtype)  # may under/overflow in half precision: the op sees what the model has
    finite = torch.isfinite(x).all(-1)
    q, absmax = quantize(x, STORAGE[storage])
    assert q.dtype == STORAGE[storage] and q.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == x.shape[:-1]
    y = dequantize(q, absmax, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    x32, y32 = x.float()[finite], y.float()[finite]
    err = (y32 - x32).abs()
    bound = _bound(x32, absmax[finite], STORAGE[storage], dtype)
    assert (err <= bound).all(), (err - bound).max()
    if zero_row:
        assert (y[0] == 0).all()
    assert y[~finite].isnan().all()


@pytest.mark.parametrize("storage", ["int8", "fp8"])
def test_non_finite_rows_come_back_nan(storage):
    x = torch.randn(4, 32)
    x[1, 3], x[2, 0], x[3, 5] = float("inf"), float("nan"), -float("inf")
    y = dequantize(*quantize(x, STORAGE[storage]), torch.float32)
    assert y[1:].isnan().all()
    assert (y[0] - x[0]).abs().max() <= x[0].abs().max() / 16


@pytest.mark.parametrize("shape,dtype,storage", [
    ((3, 40), torch.float32, "int8"), ((2, 5, 33), torch.bfloat16, "fp8"),
    ((7, 129), torch.float16, "int8"), ((4, 1000), torch.bfloat16, "int8"),
    ((6, 64), torch.float32, "fp8")])
def test_compiled_round_trip_within_bound(shape, dtype, storage):
    """The round trip as Inductor compiles it (in the partitioned graphs it is inlined
    aten code): within the same bound, zero rows zero, a row with inf/NaN all NaN."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 3)
    x = x.reshape(-1, shape[-1])
    x[0] = 0
    x[1, 2] = float("inf")
    x = x.reshape(shape).to(dtype)
    reset_dynamo()
    qdtype = STORAGE[storage]
    quant = torch.compile(lambda t: quantize(t, qdtype), backend="inductor", fullgraph=True)
    dequant = torch.compile(lambda q, m: dequantize(q, m, dtype), backend="inductor",
                            fullgraph=True)
    q, absmax = quant(x)
    y = dequant(q, absmax)
    reset_dynamo()
    assert q.dtype == qdtype and absmax.dtype == torch.float32 and y.dtype == dtype
    rows_x, rows_y, m = x.reshape(-1, shape[-1]), y.reshape(-1, shape[-1]), absmax.reshape(-1)
    assert (rows_y[0] == 0).all() and rows_y[1].isnan().all()
    x32, y32 = rows_x[2:].float(), rows_y[2:].float()
    bound = _bound(x32, m[2:], qdtype, dtype)
    assert ((y32 - x32).abs() <= bound).all()


# --------------------------------------------------------------------------- the model

STEPS, BATCH, SEQ, LR, LAYERS = 5, 4, 128, 0.5, 1
# Bounds, with margin over what was measured on CPU (docstring).
GRAD_COS = {"int8": 0.9995, "fp8": 0.995}
GRAD_REL = {"int8": 0.04, "fp8": 0.12}
LOSS_RTOL = 1e-4  # int8, per step, vs eager (measured <= 1.6e-5)


def _batch(step):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


def _train(model, options, steps):
    """``options=None``: eager. Plain SGD (no Adam: it would amplify rounding differences)."""
    return lorafuse_sgd_run(model, [_batch(step) for step in range(steps)], LR, options)


RUNS = {  # name: (options, steps)
    "eager": (None, STEPS),
    "plain": ({}, 1),
    "int8": ({"activation_dtype": "int8"}, STEPS),
    "fp8": ({"activation_dtype": "fp8"}, 1),
    "int8+budget": ({"activation_dtype": "int8", "memory_budget": 0.5}, 1),
    "budget": ({"memory_budget": 0.5}, 1),
}


@pytest.fixture(scope="module")
def runs():
    # The norm and MLP folds (passes/lora.py, on by default) take the norms' outputs and
    # the MLP's product out of the plan, and with them most of what quantized storage
    # would store here: with the norm fold alone the int8 run keeps 0.60 of the plain run's
    # bytes, and under budget 0.5 nothing large is left to quantize. These runs measure
    # the quantizer on the tensors its bounds were set on, so the folds are off.
    base = make_tiny_model("llama", layers=LAYERS, seed=3)
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            mock.patch.dict(os.environ, {"LORAFUSE_NORM_FOLD": "0", "LORAFUSE_MLP_FOLD": "0"}):
        return {name: _train(copy.deepcopy(base), opts, steps)
                for name, (opts, steps) in RUNS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_activation_bytes_shrink(runs, name):
    """Quantized tensors are fp32 rows of >= 32 elements: (n + 4) / 4n <= 0.28 of their
    bytes; the activations kept in all shrink by what they saved."""
    plain, got = partitioned_graph(runs["plain"]), partitioned_graph(runs[name])
    assert got.quantized_tensors >= 4 * LAYERS, got.format()  # 4 a layer at least (MLP input, ...)
    assert got.quantized_to_bytes <= 0.29 * got.quantized_from_bytes
    saved = got.quantized_from_bytes - got.quantized_to_bytes
    assert got.activation_bytes == plain.activation_bytes - saved
    assert got.activation_bytes <= 0.6 * plain.activation_bytes, (got.activation_bytes,
                                                                   plain.activation_bytes)


@pytest.mark.slow
def test_first_loss_is_unchanged(runs):
    for name in ("int8", "fp8", "int8+budget"):
        assert torch.equal(runs[name]["losses"][0], runs["plain"]["losses"][0]), name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8", "fp8", "int8+budget"])
def test_lora_grads_close_to_unquantized(runs, name):
    want, got = runs["plain"]["grads"][0], runs[name]["grads"][0]
    assert len(want) == 14 * LAYERS  # A and B of 7 sites a layer
    storage = name.split("+")[0]
    for n, g in want.items():
        cos = torch.nn.functional.cosine_similarity(got[n].flatten(), g.flatten(), dim=0)
        rel = ((got[n] - g).norm() / g.norm()).item()
        assert cos >= GRAD_COS[storage] and rel <= GRAD_REL[storage], (name, n, cos, rel)


@pytest.mark.slow
def test_losses_close_to_eager_over_5_steps(runs):
    want, got = runs["eager"]["losses"], runs["int8"]["losses"]
    assert len(got) == STEPS
    for step in range(STEPS):
        torch.testing.assert_close(got[step], want[step], rtol=LOSS_RTOL, atol=0,
                                   msg=lambda m: f"step {step}: {m}")


@pytest.mark.slow
def test_int8_with_the_folds_on():
    """The default plan (norm and MLP folds on): int8 storage still finds activations to
    quantize, in a plan where gate and up now also feed the down projection's dA, and the
    step-1 LoRA gradients stay within the int8 bounds of the unquantized run. Measured on
    CPU: 4 tensors quantized, activation bytes kept 0.76x; worst cos 0.99994, relative
    norm error <= 0.011."""
    base = make_tiny_model("llama", layers=LAYERS, seed=3)
    with torch._functorch.config.patch(enable_autograd_cache=False):
        plain, got = (_train(copy.deepcopy(base), opts, 1)
                      for opts in ({}, {"activation_dtype": "int8"}))
    assert "MLP fold: 1 op(s)" in str(got["report"]), got["report"]
    assert partitioned_graph(got).quantized_tensors >= 1, partitioned_graph(got).format()
    assert torch.equal(got["losses"][0], plain["losses"][0])
    for n, g in plain["grads"][0].items():
        cos = torch.nn.functional.cosine_similarity(got["grads"][0][n].flatten(), g.flatten(),
                                                    dim=0)
        rel = ((got["grads"][0][n] - g).norm() / g.norm()).item()
        assert cos >= GRAD_COS["int8"] and rel <= GRAD_REL["int8"], (n, cos, rel)


@pytest.mark.slow
def test_works_with_memory_budget(runs):
    budget, both = partitioned_graph(runs["budget"]), partitioned_graph(runs["int8+budget"])
    assert both.budget_bytes == budget.budget_bytes and both.quantized_tensors > 0
    assert both.activation_bytes < budget.activation_bytes
    text = str(runs["int8+budget"]["report"])
    assert "budget 0.5: activations" in text and "activation_dtype int8:" in text, text


@pytest.mark.slow
def test_report_shows_the_plan(runs):
    text = str(runs["int8"]["report"])
    assert "activations stored quantized" in text and "kept as computed" in text, text
    plain = partitioned_graph(runs["plain"])
    assert plain.activation_dtype is None and plain.quantized_tensors is None
    assert "activation_dtype" not in str(runs["plain"]["report"])


def test_off_by_default_no_quantize_ops(monkeypatch):
    """Without the option the partitioned graphs are min-cut's, untouched: no int8 / fp8
    tensor anywhere (the budget tests in test_memory_budget.py hold the numbers bitwise)."""
    import lorafuse.partition as partition

    seen = []
    real = partition.min_cut_rematerialization_partition

    def spy(*a, **kw):
        fwd, bwd = real(*a, **kw)
        seen.append((fwd, bwd))
        return fwd, bwd

    monkeypatch.setattr(partition, "min_cut_rematerialization_partition", spy)
    model = make_tiny_model("llama", layers=1, seed=1)
    reset_dynamo()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        torch.compile(model, backend=lorafuse.backend(strict=True))(**_batch(0)).loss.backward()
    reset_dynamo()
    assert seen
    quantized = (torch.int8, torch.float8_e4m3fn)
    for fwd, bwd in seen:
        for gm in (fwd, bwd):
            assert not any(getattr(n.meta.get("val"), "dtype", None) in quantized
                           for n in gm.graph.nodes)


@pytest.mark.parametrize("value", ["int4", "float8", torch.int8, 8, True])
def test_bad_activation_dtype_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"lorafuse: activation_dtype=.*'int8' or 'fp8'"):
        lorafuse.backend(activation_dtype=value)


def test_cache_key_follows_the_option():
    from dataclasses import asdict

    from lorafuse.partition import LorafusePartitioner

    def uuid(**kw):
        return LorafusePartitioner(asdict(lorafuse.Options(**kw))).uuid()

    keys = {uuid(), uuid(activation_dtype="int8"), uuid(activation_dtype="fp8")}
    assert len(keys) == 3


@pytest.mark.slow
def test_dynamic_shapes_quantized_and_offloaded(monkeypatch):
    """torch.compile(dynamic=True): the inlined (de)quantisation and the offload ops are
    traced on symbolic sizes; two sequence lengths run one compiled graph, with losses
    within the int8 bound of eager's."""
    import lorafuse.partition
    from lorafuse.report import Report

    monkeypatch.setattr(lorafuse.partition, "OFFLOAD_MIN_BYTES", 0)
    model = make_tiny_model("llama", layers=1, seed=5)
    eager = copy.deepcopy(model)
    reset_dynamo()
    report = Report()
    backend = lambda gm, ex: lorafuse.lorafuse_backend(  # noqa: E731
        gm, ex, _collect=report,
        options={"strict": True, "activation_dtype": "int8", "offload_activations": True})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for seq in (128, 96):
        ids = torch.randint(0, VOCAB, (BATCH, seq), generator=torch.Generator().manual_seed(seq))
        got = compiled(input_ids=ids, labels=ids).loss
        got.backward()
        want = eager(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(got, want, rtol=LOSS_RTOL, atol=0)
    reset_dynamo()
    (graph,) = report.graphs  # one graph for both lengths
    assert graph.fell_back is None, graph.fell_back
    assert graph.quantized_tensors and graph.offloaded_tensors, (graph.quantized_tensors,
                                                                 graph.offloaded_tensors)
    # attention's permuted (B, H, S, D) tensors too: their symbolic strides still order
    assert "not dense in any dimension order" not in graph.offload_left_alone, \
        graph.offload_left_alone
