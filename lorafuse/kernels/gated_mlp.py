"""Fused gated-MLP activation: ``lorafuse::gated_mlp`` computes ``act(gate) * up``.

The model code it replaces (Llama-style MLPs: ``down(act(gate(x)) * up(x))``; Phi-3's
``gate, up = gate_up(x).chunk(2, -1)``):

    y = act(gate) * up          act: "silu"       a(g) = g σ(g)
                                     "gelu"       a(g) = g Φ(g)          (erf form)
                                     "gelu_tanh"  a(g) = g (1 + tanh(k (g + 0.044715 g³))) / 2,
                                                  k = √(2/π)

The forward writes only y; the backward keeps the pre-activations gate and up (not
act(gate), which eager autograd keeps too) and recomputes the activation:

    d_up   = dy · a(g)
    d_gate = dy · up · a'(g)    silu:      σ(g) (1 + g (1 − σ(g)))
                                gelu:      Φ(g) + g φ(g)
                                gelu_tanh: (1 + t) / 2 + g (1 − t²) k (1 + 3·0.044715 g²) / 2

Math in fp32, each output rounded once (y to ``out_dtype``, the gradients to the dtypes
of gate and up); eager bf16 rounds a(g) before the product.

Paths: CPU runs the PyTorch reference (the model's torch calls in fp32, and aten's own
activation backward: equal to eager in fp32; the test oracle). CUDA runs the Triton
kernels below on rows of the last dim (gate and up may be strided views, as Phi-3's
chunks are). LORAFUSE_GATED_MLP_IMPL=auto|torch|triton (default auto: Triton on CUDA)
overrides; =triton with TRITON_INTERPRET=1 runs the kernels on CPU (tests). Other dtypes
or shapes take the reference with one warning. The gated_mlp pass is not a default pass
until measured faster than Inductor (bench/bench_elementwise.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import on_device, triton_or_reference
from ._ops import lorafuse_op

try:  # optional: without triton, CUDA tensors take the PyTorch path (with a warning)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

IMPL_ENV = "LORAFUSE_GATED_MLP_IMPL"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; known: {ACTIVATIONS}")


# --------------------------------------------------------------------------- reference


def activation(g: Tensor, act: str) -> Tensor:
    _check_act(act)
    if act == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if act == "gelu_tanh" else "none")


def gated_mlp_reference(gate, up, act, out_dtype):
    """``act(gate) * up`` in fp32, rounded once to ``out_dtype``."""
    return (activation(gate.float(), act) * up.float()).to(out_dtype)


def gated_mlp_backward_reference(dy, gate, up, act, need_dgate, need_dup):
    """``(d_gate, d_up)`` in the dtypes of gate and up (empty where not needed)."""
    g, u, d = gate.float(), up.float(), dy.float()
    dgate, dup = gate.new_empty(0), up.new_empty(0)
    if need_dgate:
        du_act = d * u  # the gradient reaching act(gate)
        if act == "silu":
            dgate = torch.ops.aten.silu_backward(du_act, g)
        else:
            dgate = torch.ops.aten.gelu_backward(
                du_act, g, approximate="tanh" if act == "gelu_tanh" else "none")
        dgate = dgate.to(gate.dtype)
    if need_dup:
        dup = (d * activation(g, act)).to(up.dtype)
    return dgate, dup


# --------------------------------------------------------------------------- Triton
#
# Under the Triton interpreter fp32 -> bf16 casts truncate; the GPU rounds to nearest
# even. HAND_ROUND_* rounds on the bits there, so the interpreter computes what the GPU does.

_INTERPRETER_BLOCK_N = 16  # several column blocks per row even for small tests

if triton is not None:
    from .norm import _rne_bf16

    _SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
    _INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))
    _INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr, NEED_GRAD: tl.constexpr):
        """a(g), and a'(g) when NEED_GRAD (else 0), in fp32. ACT: 0 silu, 1 gelu (erf),
        2 gelu (tanh)."""
        a = tl.zeros_like(g)
        da = tl.zeros_like(g)
        if ACT == 0:
            sig = tl.sigmoid(g)
            a = g * sig
            if NEED_GRAD:
                da = sig * (1.0 + g * (1.0 - sig))
        elif ACT == 1:
            cdf = 0.5 * (1.0 + tl.math.erf(g * _INV_SQRT_2))
            a = g * cdf
            if NEED_GRAD:
                da = cdf + g * tl.exp(-0.5 * g * g) * _INV_SQRT_2PI
        else:
            inner = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh (libdevice has no interpreter form)
            a = 0.5 * g * (1.0 + t)
            if NEED_GRAD:
                da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (
                    1.0 + 3.0 * 0.044715 * g * g)
        return a, da

    @triton.jit
    def _gated_fwd_kernel(
        g_ptr, u_ptr, y_ptr, N, stride_g, stride_u, stride_y,
        ACT: tl.constexpr, HAND_ROUND: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < N
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, ACT, False)
        y = a * u
        if HAND_ROUND:
            y = _rne_bf16(y)
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_bwd_kernel(
        dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, N,
        stride_dy, stride_g, stride_u, stride_dg, stride_du,
        ACT: tl.constexpr, NEED_DGATE: tl.constexpr, NEED_DUP: tl.constexpr,
        HAND_ROUND_DG: tl.constexpr, HAND_ROUND_DU: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < N
        d = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, ACT, NEED_DGATE)
        if NEED_DGATE:
            u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
            dg = d * u * da
            if HAND_ROUND_DG:
                dg = _rne_bf16(dg)
            tl.store(dg_ptr + row * stride_dg + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
        if NEED_DUP:
            du = d * a
            if HAND_ROUND_DU:
                du = _rne_bf16(du)
            tl.store(du_ptr + row * stride_du + cols, du.to(du_ptr.dtype.element_ty), mask=mask)

    _INTERPRETED = type(_gated_fwd_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover
    _INTERPRETED = False


def _rows(t: Tensor, N: int) -> Tensor:
    """A (rows, N) view with unit column stride (a copy only where no view exists)."""
    t2 = t.reshape(-1, N)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(N: int) -> dict:
    if _INTERPRETED:
        return dict(BLOCK_N=_INTERPRETER_BLOCK_N, num_warps=1)
    return dict(BLOCK_N=min(1024, triton.next_power_of_2(max(N, 1))), num_warps=4)


def _check(gate: Tensor, up: Tensor, act: str, dtypes) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check_act(act)
    if any(d not in FLOAT_DTYPES for d in dtypes):
        raise TypeError(f"unsupported dtypes {list(dtypes)}")
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if not _INTERPRETED and not gate.is_cuda:
        raise ValueError("needs CUDA tensors (or TRITON_INTERPRET=1)")


def _grid(M: int, N: int, cfg: dict):
    return (M, triton.cdiv(N, cfg["BLOCK_N"]))


def gated_mlp_forward_triton(gate, up, act, out_dtype):
    """Same contract as ``gated_mlp_reference``; the output is contiguous."""
    _check(gate, up, act, (gate.dtype, up.dtype, out_dtype))
    N = gate.shape[-1] if gate.dim() else 1
    y = torch.empty(gate.shape, dtype=out_dtype, device=gate.device)
    if y.numel():
        g2, u2, y2 = _rows(gate, N), _rows(up, N), y.view(-1, N)
        cfg = _launch(N)
        with on_device(gate):
            _gated_fwd_kernel[_grid(g2.shape[0], N, cfg)](
                g2, u2, y2, N, g2.stride(0), u2.stride(0), y2.stride(0),
                ACT=_ACT_CODE[act], HAND_ROUND=_INTERPRETED and out_dtype == torch.bfloat16,
                **cfg)
    return y


def gated_mlp_backward_triton(dy, gate, up, act, need_dgate, need_dup):
    """Same contract as ``gated_mlp_backward_reference``; the gradients are contiguous."""
    _check(gate, up, act, (dy.dtype, gate.dtype, up.dtype))
    N = gate.shape[-1] if gate.dim() else 1
    dev = gate.device
    dgate = torch.empty(gate.shape if need_dgate else (0,), dtype=gate.dtype, device=dev)
    dup = torch.empty(up.shape if need_dup else (0,), dtype=up.dtype, device=dev)
    if gate.numel() and (need_dgate or need_dup):
        d2, g2, u2 = _rows(dy, N), _rows(gate, N), _rows(up, N)
        dg2 = dgate.view(-1, N) if need_dgate else g2  # unused pointer when not needed
        du2 = dup.view(-1, N) if need_dup else u2
        cfg = _launch(N)
        bf16 = torch.bfloat16
        with on_device(gate):
            _gated_bwd_kernel[_grid(g2.shape[0], N, cfg)](
                d2, g2, u2, dg2, du2, N,
                d2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0),
                ACT=_ACT_CODE[act], NEED_DGATE=bool(need_dgate), NEED_DUP=bool(need_dup),
                HAND_ROUND_DG=_INTERPRETED and gate.dtype == bf16,
                HAND_ROUND_DU=_INTERPRETED and up.dtype == bf16,
                **cfg)
    return dgate, dup


# --------------------------------------------------------------------------- dispatch


def _forward_impl(gate, up, act, out_dtype):
    return triton_or_reference(
        gate, IMPL_ENV, "gated MLP forward",
        lambda: gated_mlp_forward_triton(gate, up, act, out_dtype),
        lambda: gated_mlp_reference(gate, up, act, out_dtype))


def _backward_impl(dy, gate, up, act, need_dgate, need_dup):
    return triton_or_reference(
        gate, IMPL_ENV, "gated MLP backward",
        lambda: gated_mlp_backward_triton(dy, gate, up, act, need_dgate, need_dup),
        lambda: gated_mlp_backward_reference(dy, gate, up, act, need_dgate, need_dup))


# --------------------------------------------------------------------------- ops


@lorafuse_op("lorafuse::gated_mlp")
def gated_mlp_op(gate: Tensor, up: Tensor, act: str, out_dtype: torch.dtype) -> Tensor:
    """``act(gate) * up`` in ``out_dtype``, contiguous; gate and up of one shape."""
    _check_act(act)
    return _forward_impl(gate, up, act, out_dtype).contiguous()


@gated_mlp_op.register_fake
def _(gate, up, act, out_dtype):
    _check_act(act)
    return gate.new_empty(gate.shape, dtype=out_dtype)


@lorafuse_op("lorafuse::gated_mlp_backward")
def gated_mlp_backward_op(dy: Tensor, gate: Tensor, up: Tensor, act: str, need_dgate: bool,
                          need_dup: bool) -> tuple[Tensor, Tensor]:
    """``(d_gate, d_up)``, contiguous, each empty unless needed."""
    dgate, dup = _backward_impl(dy, gate, up, act, need_dgate, need_dup)
    return dgate.contiguous(), dup.contiguous()


@gated_mlp_backward_op.register_fake
def _(dy, gate, up, act, need_dgate, need_dup):
    return (gate.new_empty(gate.shape if need_dgate else (0,)),
            up.new_empty(up.shape if need_dup else (0,)))


def _setup_context(ctx, inputs, output):
    gate, up, act, out_dtype = inputs
    ctx.act = act
    ctx.save_for_backward(gate, up)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    need_dgate, need_dup = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dgate or need_dup):
        return None, None, None, None
    dgate, dup = gated_mlp_backward_op(dy, gate, up, ctx.act, need_dgate, need_dup)
    return (dgate if need_dgate else None), (dup if need_dup else None), None, None


gated_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def gated_mlp(gate, up, act="silu", out_dtype=None):
    """``act(gate) * up`` with the fused forward and backward (see module doc)."""
    if out_dtype is None:
        out_dtype = torch.promote_types(gate.dtype, up.dtype)
    return gated_mlp_op(gate, up, act, out_dtype)
