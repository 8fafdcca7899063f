"""The RMSNorm and LayerNorm ops (``lorafuse::rms_norm``, ``lorafuse::layer_norm``), their
Triton kernels and the norm pass.

- Op (CPU: the PyTorch reference) against transformers' own RMSNorm modules (Llama: n
  rounded to the input dtype before ``weight *``; Gemma2: ``n * (1 + w.float())`` in fp32,
  cast after) and a weightless variant, drawn by hypothesis: ranks 1-4, odd widths,
  weight frozen or trainable, input needing a gradient or not. fp32: output and
  gradients equal eager to rtol 1e-5. bf16: against the fp32 computation on the same
  (bf16-valued) inputs, the op's error is at most 1.5 × eager bf16's (+ 1e-6).
- LayerNorm op against F.layer_norm (hypothesis: ranks 1-4, odd widths, with and without
  weight and bias, each gradient asked for or not): fp32 equal to eager to rtol 1e-5; bf16
  and fp16 (parameters in the input's dtype or fp32) no farther from fp64 than eager ×
  1.25 (+ fp32 noise); fake impls and torch.library.opcheck of both ops.
- Triton kernels under TRITON_INTERPRET=1 in a subprocess (this file run as a script,
  like test_lora_triton.py), small shapes.
- The pass on Dynamo graphs without Inductor (fast): what it matches, what it leaves
  alone and why.
- Whole models (fp32, compiled once each): tiny Llama (norm weights made trainable, so
  dw runs), Gemma2 and GPT-2 (LayerNorm weights and biases trainable: dw, db) with PEFT
  LoRA, ``backend=lorafuse`` (lora + norm passes) against eager on the same parameters for
  3 AdamW steps: loss at every step, every trainable gradient, and one fused op per
  RMSNorm / LayerNorm module.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import CheckRecorder, assert_check_passed, run_interpreter_worker

# --------------------------------------------------------------------------- eager code
# The model code the op replaces: transformers' modules, and a weightless RMSNorm.


def norm_module(variant: str, N: int, eps: float, w=None):
    """transformers' module for ``variant`` (weight ``w`` if given), or the weightless
    RMSNorm as a module."""
    if variant == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        m = LlamaRMSNorm(N, eps=eps)
    elif variant == "gemma":
        from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

        m = Gemma2RMSNorm(N, eps=eps)
    else:
        return Weightless(eps)
    if w is not None:
        del m.weight
        m.weight = w  # a plain attribute: gradients reach the caller's leaf
    return m


class Weightless(torch.nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype)


def eager_norm(variant: str, x, w, eps):
    return norm_module(variant, x.shape[-1], eps, w)(x)


def op_norm(variant: str, x, w, eps, out_dtype):
    from lorafuse.kernels.norm import rms_norm

    offset = 1.0 if variant == "gemma" else 0.0
    return rms_norm(x, None if variant == "plain" else w, eps, offset,
                    cast_before_weight=(variant != "gemma"), out_dtype=out_dtype)


def run_both(variant, x, w, eps, dy, x_grad, w_grad, dtype_x, dtype_w):
    """(eager outputs, op outputs, fp32-reference outputs): [y, dx?, dw?] each."""
    def leaves(xd, wd):
        xx = x.to(xd).detach().requires_grad_(x_grad)
        ww = w.to(wd).detach().requires_grad_(w_grad and variant != "plain")
        return xx, ww

    def grads(y, xx, ww, d):
        want = [t for t in (xx, ww) if t.requires_grad]
        return [y.detach()] + list(torch.autograd.grad(y, want, d.to(y.dtype))) if want else [y]

    xx, ww = leaves(dtype_x, dtype_w)
    ye = eager_norm(variant, xx, ww, eps)
    eager = grads(ye, xx, ww, dy)
    xx, ww = leaves(dtype_x, dtype_w)
    got = grads(op_norm(variant, xx, ww, eps, ye.dtype), xx, ww, dy)
    xx, ww = leaves(torch.float32, torch.float32)
    ref = grads(eager_norm(variant, xx, ww, eps), xx, ww, dy)
    return eager, got, ref


def term_scales(variant, x, w, eps, dy, x_grad, w_grad):
    """Magnitudes of the terms each output is summed from (y, then dx and dw as present):
    the absolute slack of an fp32 comparison scales with these, not with a result that
    cancellation can make arbitrarily small (dx of a 1-wide row is ~0)."""
    x, dy = x.double(), dy.double()
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    n = x * r
    w_eff = torch.ones_like(w) if variant == "plain" else w.double() + (variant == "gemma")
    out = [(n * w_eff).abs().max().item()]
    if x_grad:
        out.append(((dy * w_eff).abs() * r).max().item())
    if w_grad and variant != "plain":
        out.append((dy * n).abs().reshape(-1, x.shape[-1]).sum(0).max().item())
    return out


def assert_no_worse(got, eager, ref, scale, what, factor=1.5):
    """got's distance from the fp32 reference ≤ ``factor`` × eager's, plus fp32 noise (1e-5
    of the terms' magnitude: where the result cancels to ~0, both are noise), plus one
    rounding of got's dtype at the largest magnitude, in total: with one or two elements
    (a width-1 norm's weight gradient) eager may land on the nearest value by luck and got
    one ulp away (measured: 0.8008 against 0.7969 for 0.7981)."""
    one_rounding = torch.finfo(got.dtype).eps * ref.double().abs().max().item() if got.numel() else 0
    floor = 1e-5 * scale * got.numel() ** 0.5 + one_rounding
    err = (got.double() - ref.double()).norm().item()
    err_eager = (eager.double() - ref.double()).norm().item()
    assert err <= factor * err_eager + floor, \
        f"{what}: error {err:.3g} vs eager {err_eager:.3g} (|ref| {ref.double().norm():.3g})"


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- op: hypothesis

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

if st is not None:
    odd = st.integers(1, 300).filter(lambda v: v % 16 != 0)

    @st.composite
    def norm_cases(draw):
        rank = draw(st.integers(1, 4))
        lead = tuple(draw(st.integers(1, 5)) for _ in range(rank - 1))
        variant = draw(st.sampled_from(["llama", "llama", "gemma", "gemma", "plain"]))
        x_grad = draw(st.booleans())
        w_grad = variant != "plain" and draw(st.booleans())
        if not (x_grad or w_grad):
            x_grad = True
        return dict(shape=lead + (draw(odd),), variant=variant, x_grad=x_grad, w_grad=w_grad,
                    eps=draw(st.sampled_from([1e-6, 1e-5, 1e-3])),
                    scale=draw(st.sampled_from([1.0, 1e-2, 30.0])),
                    seed=draw(st.integers(0, 2**31 - 1)))

    def inputs(c):
        g = torch.Generator().manual_seed(c["seed"])
        x = torch.randn(c["shape"], generator=g) * c["scale"]
        base = 0.0 if c["variant"] == "gemma" else 1.0  # Gemma stores w - 1
        w = base + 0.3 * torch.randn(c["shape"][-1], generator=g)
        dy = torch.randn(c["shape"], generator=g)
        return x, w, dy

    @settings(max_examples=60, deadline=None)
    @given(norm_cases())
    def test_op_fp32_equals_eager(c):
        x, w, dy = inputs(c)
        eager, got, _ = run_both(c["variant"], x, w, c["eps"], dy, c["x_grad"], c["w_grad"],
                                 torch.float32, torch.float32)
        assert len(got) == len(eager)
        scales = term_scales(c["variant"], x, w, c["eps"], dy, c["x_grad"], c["w_grad"])
        for name, a, b, scale in zip(("y", "g1", "g2"), got, eager, scales):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m: f"{name}: {m}")

    @settings(max_examples=60, deadline=None)
    @given(norm_cases(), st.sampled_from([torch.bfloat16, torch.float32]),
           st.sampled_from([torch.bfloat16, torch.float16]))
    def test_op_low_precision_no_worse_than_eager(c, w_dtype, x_dtype):
        """Half-precision input; weight in fp32 or the input's dtype (as HF loads it)."""
        x, w, dy = inputs(c)
        w_dtype = x_dtype if w_dtype == torch.bfloat16 else w_dtype
        # Values representable in the input dtype, so every side sees the same numbers.
        x, w, dy = x.to(x_dtype).float(), w.to(w_dtype).float(), dy.to(x_dtype).float()
        eager, got, ref = run_both(c["variant"], x, w, c["eps"], dy, c["x_grad"], c["w_grad"],
                                   x_dtype, w_dtype)
        scales = term_scales(c["variant"], x, w, c["eps"], dy, c["x_grad"], c["w_grad"])
        for name, a, b, r, scale in zip(("y", "g1", "g2"), got, eager, ref, scales):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.isfinite(a).all(), name
            assert_no_worse(a, b, r, scale, name)


def test_op_fake_and_rstd():
    """The fake implementation agrees with the real one (shapes, dtypes), rstd is the
    per-row 1/rms, and dweight alone (input frozen) works."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorafuse.kernels.norm import rms_norm_op

    x = torch.randn(3, 4, 10, dtype=torch.bfloat16)
    w = torch.randn(10, requires_grad=True)
    y, rstd = rms_norm_op(x, w, 1e-6, 0.0, True, torch.float32)
    with FakeTensorMode() as mode:
        fy, frstd = rms_norm_op(mode.from_tensor(x), mode.from_tensor(w), 1e-6, 0.0, True,
                                torch.float32)
    assert (fy.shape, fy.dtype, frstd.shape, frstd.dtype) == (y.shape, y.dtype, rstd.shape,
                                                            rstd.dtype)
    want = x.float().pow(2).mean(-1).add(1e-6).rsqrt()
    torch.testing.assert_close(rstd, want)
    (dw,) = torch.autograd.grad(y.sum(), [w])
    want = (x.float() * want.unsqueeze(-1)).to(torch.bfloat16).float().reshape(-1, 10).sum(0)
    torch.testing.assert_close(dw, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- LayerNorm op
# ``lorafuse::layer_norm`` against F.layer_norm (eager) and an fp64 F.layer_norm on the
# same inputs.


def run_both_ln(x, w, b, dy, eps, need, dtype_x, dtype_p):
    """(eager, op, fp64 reference): [y, then the gradients ``need`` = (x, w, b) asks for
    of the tensors present]; w or b None for a LayerNorm without them."""
    from lorafuse.kernels.norm import layer_norm

    N = x.shape[-1]

    def run(fn, xd, pd):
        xx = x.to(xd).detach().requires_grad_(need[0])
        ww = None if w is None else w.to(pd).detach().requires_grad_(need[1])
        bb = None if b is None else b.to(pd).detach().requires_grad_(need[2])
        y = fn(xx, ww, bb)
        want = [t for t in (xx, ww, bb) if t is not None and t.requires_grad]
        return [y.detach()] + list(torch.autograd.grad(y, want, dy.to(y.dtype)))

    def eager(xx, ww, bb):
        return torch.nn.functional.layer_norm(xx, (N,), ww, bb, eps)

    return (run(eager, dtype_x, dtype_p), run(lambda *a: layer_norm(*a, eps), dtype_x, dtype_p),
            run(eager, torch.float64, torch.float64))


def ln_term_scales(x, w, b, dy, eps, need):
    """As term_scales, for LayerNorm: y, then dx, dw, db as present."""
    N = x.shape[-1]
    x, dy = x.double(), dy.double()
    var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
    r = torch.rsqrt(var + eps)
    na = (x.abs() + mean.abs()) * r  # n = (x - mean) · r before cancellation
    wa = torch.ones(N, dtype=torch.float64) if w is None else w.double().abs()
    out = [(na * wa).max().item() + (0 if b is None else b.abs().max().item())]
    if need[0]:
        out.append(((dy.abs() * wa).max() * r.max() * (1 + na.max())).item())
    if need[1] and w is not None:
        out.append((dy * na).abs().reshape(-1, N).sum(0).max().item())
    if need[2] and b is not None:
        out.append(dy.abs().reshape(-1, N).sum(0).max().item())
    return out


def ln_inputs(shape, has_w, has_b, scale, seed):
    """Random, never all zeros: x with a per-row offset (so the mean matters), w around 1."""
    g = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x = (torch.randn(shape, generator=g) + torch.randn(shape[:-1] + (1,), generator=g)) * scale
    w = 1.0 + 0.3 * torch.randn(N, generator=g) if has_w else None
    b = 0.5 * torch.randn(N, generator=g) if has_b else None
    dy = torch.randn(shape, generator=g)
    return x, w, b, dy


if st is not None:

    @st.composite
    def ln_cases(draw):
        rank = draw(st.integers(1, 4))
        lead = tuple(draw(st.integers(1, 5)) for _ in range(rank - 1))
        has_w, has_b = draw(st.booleans()), draw(st.booleans())
        need = (draw(st.booleans()), has_w and draw(st.booleans()), has_b and draw(st.booleans()))
        if not any(need):
            need = (True,) + need[1:]
        return dict(shape=lead + (draw(odd),), has_w=has_w, has_b=has_b, need=need,
                    eps=draw(st.sampled_from([1e-6, 1e-5, 1e-3])),
                    scale=draw(st.sampled_from([1.0, 1e-2, 30.0])),
                    seed=draw(st.integers(0, 2**31 - 1)))

    def _ln(c):
        return ln_inputs(c["shape"], c["has_w"], c["has_b"], c["scale"], c["seed"])

    @settings(max_examples=60, deadline=None)
    @given(ln_cases())
    def test_layer_norm_fp32_equals_eager(c):
        x, w, b, dy = _ln(c)
        eager, got, _ = run_both_ln(x, w, b, dy, c["eps"], c["need"], torch.float32,
                                    torch.float32)
        assert len(got) == len(eager) == 1 + sum(c["need"])
        scales = ln_term_scales(x, w, b, dy, c["eps"], c["need"])
        for i, (a, e, scale) in enumerate(zip(got, eager, scales)):
            assert a.dtype == e.dtype and a.shape == e.shape, i
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m: f"output {i}: {m}")

    @settings(max_examples=60, deadline=None)
    @given(ln_cases(), st.sampled_from([torch.bfloat16, torch.float16]), st.booleans())
    def test_layer_norm_low_precision_no_worse_than_eager(c, x_dtype, fp32_params):
        """Half-precision input; weight and bias in its dtype or fp32 (F.layer_norm's mixed
        case; not with a bias alone, where eager's CPU backward raises). The op is no
        farther from fp64 than eager × 1.25 (+ fp32 noise)."""
        x, w, b, dy = _ln(c)
        p_dtype = torch.float32 if fp32_params and c["has_w"] else x_dtype
        x, dy = x.to(x_dtype).float(), dy.to(x_dtype).float()
        w = None if w is None else w.to(p_dtype).float()
        b = None if b is None else b.to(p_dtype).float()
        eager, got, ref = run_both_ln(x, w, b, dy, c["eps"], c["need"], x_dtype, p_dtype)
        scales = ln_term_scales(x, w, b, dy, c["eps"], c["need"])
        for i, (a, e, r, scale) in enumerate(zip(got, eager, ref, scales)):
            assert a.dtype == e.dtype and a.shape == e.shape, i
            assert torch.isfinite(a).all(), i
            assert_no_worse(a, e, r, scale, f"output {i}", factor=1.25)


def test_layer_norm_fake_mean_rstd_and_opcheck():
    """Fake impl agrees with the real one; mean and rstd are the per-row statistics
    (biased variance); torch.library.opcheck on both ops, with and without weight/bias."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorafuse.kernels.norm import layer_norm_backward_op, layer_norm_op

    x = torch.randn(3, 4, 11, dtype=torch.bfloat16) + 2
    w = torch.randn(11, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    y, mean, rstd = layer_norm_op(x, w, b, 1e-5)
    with FakeTensorMode() as mode:
        fake = layer_norm_op(*(mode.from_tensor(t) for t in (x, w, b)), 1e-5)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in (y, mean, rstd)]
    var, want_mean = torch.var_mean(x.float(), -1, correction=0)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(rstd, (var + 1e-5).rsqrt())
    g = torch.Generator().manual_seed(0)
    for xd in (torch.float32, torch.bfloat16):
        xx = torch.randn(2, 3, 13, generator=g).to(xd).requires_grad_(True)
        for ww, bb in ((None, None), (torch.randn(13, generator=g), None),
                       (torch.randn(13, generator=g), torch.randn(13, generator=g))):
            ww = None if ww is None else ww.to(xd).requires_grad_(True)
            bb = None if bb is None else bb.to(xd).requires_grad_(True)
            torch.library.opcheck(layer_norm_op, (xx, ww, bb, 1e-5))
        _, mean, rstd = layer_norm_op(xx.detach(), None, None, 1e-5)
        dy = torch.randn(2, 3, 13, generator=g).to(xd)
        for need in ((True, False, False), (False, True, True), (True, True, True)):
            torch.library.opcheck(layer_norm_backward_op,
                                  (dy, xx.detach(), torch.randn(13).to(xd), mean, rstd, *need))


# --------------------------------------------------------------------------- Triton (subprocess)

DTYPES = ("float32", "bfloat16", "float16")
# (name, shape, variant, weight dtype: "same" | "float32", weight needs grad)
TRITON_CASES = [
    ("llama-3d", (2, 5, 37), "llama", "same", False),
    ("llama-fp32w-dw", (7, 45), "llama", "float32", True),
    ("gemma-dw", (3, 11, 33), "gemma", "same", True),
    ("qk-4d", (2, 3, 4, 16), "llama", "same", True),  # per-head: many narrow rows
    ("plain-2d", (9, 20), "plain", "same", False),
    ("wide-1d", (300,), "llama", "same", True),
]


# LayerNorm: (name, shape, weight, bias, parameter dtype: "same" | "float32", gradients
# of (x, weight, bias))
LN_TRITON_CASES = [
    ("ln-3d", (2, 5, 37), True, True, "same", (True, True, True)),
    ("ln-fp32p", (7, 45), True, True, "float32", (True, True, False)),
    ("ln-plain", (9, 20), False, False, "same", (True, False, False)),
    ("ln-w-only-dw", (3, 11, 33), True, False, "same", (False, True, False)),
]


def _triton_check_ids():
    return ([f"{c[0]}-{d}" for c in TRITON_CASES for d in DTYPES] + ["kernel-direct"]
            + [f"{c[0]}-{d}" for c in LN_TRITON_CASES for d in DTYPES] + ["ln-kernel-direct"])


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__, LORAFUSE_NORM_IMPL="triton")


@pytest.mark.parametrize("check", _triton_check_ids())
def test_triton_interpreter(interpreter_results, check):
    assert_check_passed(interpreter_results, check)


def _worker():
    """Runs in the subprocess (TRITON_INTERPRET=1, LORAFUSE_NORM_IMPL=triton)."""
    import warnings

    from lorafuse.kernels import norm

    assert norm._INTERPRETED, "TRITON_INTERPRET did not take effect"
    warnings.simplefilter("error", RuntimeWarning)  # a silent fallback would hide the kernel
    record = CheckRecorder()

    def case(shape, variant, wdt, w_grad, dtype):
        g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
        x = (torch.randn(shape, generator=g) * 3).to(dtype).float()
        w = (0.0 if variant == "gemma" else 1.0) + 0.3 * torch.randn(shape[-1], generator=g)
        w_dtype = torch.float32 if wdt == "float32" else dtype
        w = w.to(w_dtype).float()
        dy = torch.randn(shape, generator=g).to(dtype).float()
        os.environ["LORAFUSE_NORM_IMPL"] = "triton"
        eager, got, ref = run_both(variant, x, w, 1e-6, dy, True, w_grad, dtype, w_dtype)
        os.environ["LORAFUSE_NORM_IMPL"] = "torch"
        _, want, _ = run_both(variant, x, w, 1e-6, dy, True, w_grad, dtype, w_dtype)
        os.environ["LORAFUSE_NORM_IMPL"] = "triton"
        scales = term_scales(variant, x, w, 1e-6, dy, True, w_grad)
        for name, a, b, e, r, scale in zip(("y", "dx", "dw"), got, want, eager, ref, scales):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.isfinite(a).all(), name
            if dtype == torch.float32:  # only the reduction order differs
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(),
                                           msg=lambda m: f"{name}: {m}")
            else:  # one rounding apart at most, and no farther from fp32 than eager
                err = rel(a, b)
                assert err <= 2.0**-8, f"{name}: {err:.3g} from the reference path"
                assert_no_worse(a, e, r, scale, name)

    for name, shape, variant, wdt, w_grad in TRITON_CASES:
        for d in DTYPES:
            record(f"{name}-{d}",
                   lambda: case(shape, variant, wdt, w_grad, getattr(torch, d)))

    def direct():
        """The kernels called directly: rstd, dx without dw, dw without dx."""
        x = torch.randn(13, 24)
        w = torch.randn(24)
        y, rstd = norm.rms_norm_forward_triton(x, w, 1e-5, 0.0, True, torch.float32)
        y0, rstd0 = norm.rms_norm_reference(x, w, 1e-5, 0.0, True, torch.float32)
        torch.testing.assert_close(rstd, rstd0)
        torch.testing.assert_close(y, y0)
        dy = torch.randn(13, 24)
        for need_dx, need_dw in ((True, False), (False, True)):
            got = norm.rms_norm_backward_triton(dy, x, w, rstd, 0.0, True, need_dx, need_dw)
            want = norm.rms_norm_backward_reference(dy, x, w, rstd, 0.0, True, need_dx, need_dw)
            for a, b in zip(got, want):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    record("kernel-direct", direct)

    def ln_case(shape, has_w, has_b, pdt, need, dtype):
        x, w, b, dy = ln_inputs(shape, has_w, has_b, 3.0, len(shape) * 100 + shape[-1])
        p_dtype = torch.float32 if pdt == "float32" else dtype
        x, dy = x.to(dtype).float(), dy.to(dtype).float()
        w = None if w is None else w.to(p_dtype).float()
        b = None if b is None else b.to(p_dtype).float()
        os.environ["LORAFUSE_NORM_IMPL"] = "triton"
        eager, got, ref = run_both_ln(x, w, b, dy, 1e-5, need, dtype, p_dtype)
        os.environ["LORAFUSE_NORM_IMPL"] = "torch"
        _, want, _ = run_both_ln(x, w, b, dy, 1e-5, need, dtype, p_dtype)
        os.environ["LORAFUSE_NORM_IMPL"] = "triton"
        scales = ln_term_scales(x, w, b, dy, 1e-5, need)
        for i, (a, o, e, r, scale) in enumerate(zip(got, want, eager, ref, scales)):
            assert a.dtype == o.dtype and a.shape == o.shape, i
            assert torch.isfinite(a).all(), i
            if dtype == torch.float32:
                torch.testing.assert_close(a, o, rtol=1e-5, atol=1e-5 * scale,
                                           msg=lambda m: f"output {i}: {m}")
            else:
                err = rel(a, o)
                assert err <= 2.0**-8, f"output {i}: {err:.3g} from the reference path"
                assert_no_worse(a, e, r, scale, f"output {i}", factor=1.25)

    for name, shape, has_w, has_b, pdt, need in LN_TRITON_CASES:
        for d in DTYPES:
            record(f"{name}-{d}",
                   lambda: ln_case(shape, has_w, has_b, pdt, need, getattr(torch, d)))

    def ln_direct():
        """The LayerNorm kernels called directly: mean and rstd, each gradient alone."""
        x = torch.randn(13, 24) + 1
        w, b = torch.randn(24), torch.randn(24)
        got = norm.layer_norm_forward_triton(x, w, b, 1e-5)
        want = norm.layer_norm_reference(x, w, b, 1e-5)
        for a, o in zip(got, want):
            torch.testing.assert_close(a, o)
        dy = torch.randn(13, 24)
        for need in ((True, False, False), (False, True, False), (False, False, True)):
            got_b = norm.layer_norm_backward_triton(dy, x, w, got[1], got[2], *need)
            want_b = norm.layer_norm_backward_reference(dy, x, w, want[1], want[2], *need)
            for a, o in zip(got_b, want_b):
                assert a.shape == o.shape
                torch.testing.assert_close(a, o, rtol=1e-5, atol=1e-5)

    record("ln-kernel-direct", ln_direct)
    record.report()


# --------------------------------------------------------------------------- the pass (no Inductor)


def _pass_on(fn, *args):
    """Capture ``fn`` with Dynamo, run the norm pass on the graph, check the rewritten
    graph computes what the original did; returns (PassReport, rewritten graph)."""
    from lorafuse.passes import norm as norm_pass
    from lorafuse.report import PassReport

    out = {}

    def backend(gm, example_inputs):
        want = gm(*example_inputs)
        pr = PassReport("norm")
        norm_pass.run(gm, pr)
        got = gm(*example_inputs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        out["report"], out["graph"] = pr, gm.graph
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return out["report"], out["graph"]


def _ops(graph, name="rms_norm"):
    return [n for n in graph.nodes if name in str(n.target)]


def test_pass_matches_variants():
    m = torch.nn.ModuleDict({
        "a": norm_module("llama", 24, 1e-6),
        "b": norm_module("gemma", 24, 1e-6).to(torch.bfloat16),
        "c": norm_module("plain", 24, 1e-5),
        "d": norm_module("llama", 24, 1e-6).to(torch.bfloat16),
    })
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()

    def f(x, xb, heads):
        return m["a"](x), m["b"](xb), m["c"](xb), m["d"](heads.view(2, 3, 4, 24))  # per-head

    pr, g = _pass_on(f, torch.randn(2, 3, 24), torch.randn(3, 24, dtype=torch.bfloat16),
                     torch.randn(2, 3, 96, dtype=torch.bfloat16))
    assert len(pr.matched) == 4 and not pr.skipped, (pr.matched, pr.skipped)
    variants = sorted((n.args[3], n.args[4], str(n.args[5])) for n in _ops(g))
    assert variants == sorted([(0.0, True, "torch.float32"), (1.0, False, "torch.bfloat16"),
                               (0.0, True, "torch.bfloat16"), (0.0, True, "torch.bfloat16")])
    # Only the op, x and weight remain of each norm: no pow / rsqrt left in the graph.
    assert not [n for n in g.nodes if n.target in ("pow", torch.rsqrt)]


def test_pass_leaves_alone_with_reasons():
    w = torch.randn(16)

    def leaky(x):  # the variance escapes: not provably a norm-only intermediate
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + 1e-6)
        return w * h.to(x.dtype), var

    pr, g = _pass_on(leaky, torch.randn(4, 16))
    assert not pr.matched and len(pr.skipped) == 1, pr.skipped
    assert "used outside" in pr.skipped[0][1]

    def other(x):  # rsqrt of a sum, mean over another dim: not RMSNorm
        a = torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6) * x
        c = x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6)
        return a, c

    pr, g = _pass_on(other, torch.randn(4, 16))
    assert not pr.matched and not pr.skipped and not _ops(g)


def test_pass_matches_layer_norm():
    """nn.LayerNorm with and without weight and bias, half precision with fp32 parameters,
    torch.layer_norm: one op each; normalized_shape over two dims is left alone, with a
    reason."""
    ln = torch.nn.ModuleDict({
        "a": torch.nn.LayerNorm(24),
        "b": torch.nn.LayerNorm(24, elementwise_affine=False),
        "c": torch.nn.LayerNorm(24, bias=False).to(torch.bfloat16),
        "d": torch.nn.LayerNorm(24, eps=1e-6),  # fp32 parameters, bf16 input
    })
    with torch.no_grad():
        for p in ln.parameters():
            p.normal_()
    w, b = torch.randn(24), torch.randn(24)
    F = torch.nn.functional

    def f(x, xb):
        return (ln["a"](x), ln["b"](x), ln["c"](xb), ln["d"](xb),
                torch.layer_norm(x, [24], w, b, 1e-5),
                F.layer_norm(x.view(6, 24), (3, 24)[-1:], weight=w, bias=None),
                F.layer_norm(x.view(2, 72).view(2, 3, 24), (3, 24)))  # two dims: left alone

    pr, g = _pass_on(f, torch.randn(2, 3, 24), torch.randn(3, 24, dtype=torch.bfloat16))
    assert len(pr.matched) == 6, (pr.matched, pr.skipped)
    assert len(pr.skipped) == 1 and "last dim" in pr.skipped[0][1], pr.skipped
    ops = _ops(g, "lorafuse.layer_norm")
    assert sorted((a.args[1] is None, a.args[2] is None, a.args[3]) for a in ops) == sorted(
        [(False, False, 1e-5), (True, True, 1e-5), (False, True, 1e-5), (False, False, 1e-6),
         (False, False, 1e-5), (False, True, 1e-5)])
    assert sum(n.target is F.layer_norm for n in g.nodes) == 1


def test_pass_layer_norm_dynamic_left_alone():
    """Under dynamic=True eps is a graph input and a normalized_shape taken from x.shape is
    a symbolic size: both left alone, with a reason (nothing is guessed)."""
    from lorafuse.passes import norm as norm_pass
    from lorafuse.report import PassReport

    ln = torch.nn.LayerNorm(24)
    reasons = []

    def backend(gm, example_inputs):
        pr = PassReport("norm")
        norm_pass.run(gm, pr)
        assert not pr.matched
        reasons.extend(why for _, why in pr.skipped)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x: ln(x), backend=backend, dynamic=True)(torch.randn(2, 5, 24))
    torch._dynamo.reset()
    f = torch.compile(lambda x: torch.nn.functional.layer_norm(x, x.shape[-1:]), backend=backend,
                      dynamic=True)
    f(torch.randn(3, 7, 5))
    torch._dynamo.reset()
    assert len(reasons) == 2 and "eps" in reasons[0] and "symbolic" in reasons[1], reasons


# --------------------------------------------------------------------------- whole models

STEPS = 3
BATCH, SEQ = 2, 12


def _norm_modules(model) -> int:
    """RMSNorm and LayerNorm modules: one fused op each."""
    return sum(type(m).__name__.endswith("RMSNorm") or isinstance(m, torch.nn.LayerNorm)
               for m in model.modules())


@pytest.fixture(scope="module")
def model_runs():
    """Per arch: eager and compiled (lora + norm passes) on the same parameters, each
    step; everything recorded once, inspected by the tests below."""
    import lorafuse
    from conftest import VOCAB, make_tiny_model, reset_dynamo
    from torch._dynamo.utils import counters

    runs = {}
    for arch in MODEL_ARCHS:
        reset_dynamo()
        model = make_tiny_model(arch, layers=1)
        if arch in ("llama", "gpt2"):  # trainable norm weights (and biases): dw (db) paths
            for name, p in model.named_parameters():
                if "norm" in name or ".ln_" in name:
                    p.requires_grad_(True)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW(params.values(), lr=1e-2)
        compiled = torch.compile(model, backend=lorafuse.backend(passes=("lora", "norm"),
                                                                 strict=True))
        rec = {"norms": _norm_modules(model), "steps": []}
        for step in range(STEPS):
            g = torch.Generator().manual_seed(step)
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
            batch = {"input_ids": ids, "labels": ids}
            out = []
            for fwd in (model, compiled):
                loss = fwd(**batch).loss
                loss.backward()
                out.append((loss.detach(), {n: p.grad.clone() for n, p in params.items()}))
                opt.zero_grad(set_to_none=True)
            rec["steps"].append(out)
            for n, p in params.items():  # step with the compiled side's gradients
                p.grad = out[1][1][n]
            opt.step()
            opt.zero_grad(set_to_none=True)
        rec["counter"] = counters["lorafuse"]["norm"]
        rec["skipped"] = counters["lorafuse"]["norm_skipped"]
        runs[arch] = rec
        reset_dynamo()
    return runs


MODEL_ARCHS = ("llama", "gemma2", "gpt2")


@pytest.mark.parametrize("arch", MODEL_ARCHS)
def test_model_every_norm_fused(model_runs, arch):
    rec = model_runs[arch]
    # per layer 2 (Gemma2 4), + final; GPT-2: ln_1, ln_2 per layer + ln_f (LayerNorm)
    assert rec["norms"] == {"llama": 3, "gemma2": 5, "gpt2": 3}[arch]
    assert rec["counter"] == rec["norms"] and rec["skipped"] == 0


@pytest.mark.parametrize("arch", MODEL_ARCHS)
def test_model_losses_and_grads_match_eager(model_runs, arch):
    for step, ((le, ge), (lc, gc)) in enumerate(model_runs[arch]["steps"]):
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")
        assert ge.keys() == gc.keys()
        if arch == "llama":
            assert any("norm" in n for n in ge)  # the trainable norm weights are compared
        if arch == "gpt2":
            assert any(".ln_" in n and n.endswith("bias") for n in ge)  # dw and db
        for name, g in ge.items():
            assert g.norm() > 0, f"eager gradient of {name} is zero: the test would be blind"
            err = rel(gc[name], g)
            assert err <= 1e-4, f"step {step}, {name}: relative error {err:.2e}"


if __name__ == "__main__":
    _worker()
