"""Fused LoRA linear: ``y = x Wᵀ + b + s · (x' Aᵀ) Bᵀ`` as one op with one backward.

Shapes: ``x`` (..., K); ``weight`` W (N, K), any strides (GPT-2 passes a transposed
view); ``bias`` (N,) or None; ``lora_a`` A (r, K); ``lora_b`` B (N, r); ``x_lora``
x' = dropout(x) or None (then x' = x). All floating inputs share one dtype, the
compute dtype (the LoRA pass casts to it, as autocast would); the output has it too.

Precision: every product accumulates in fp32, and y is rounded once: the low-rank term
``l = s · h Bᵀ + b`` (h = x' Aᵀ) is added to the base product inside the base GEMM's fp32
accumulator (the Triton kernel of lora_triton.py; cuBLAS writing fp32 where it cannot
run). Eager PEFT rounds the base product, then the sum: a LoRA term smaller than half
an ulp of the base output is lost there, and a small one mostly lost. h itself is
rounded to the compute dtype in every path (it is an output, and saved).

Gradients (dy = ∂L/∂y, flattened to 2-D; g = s · dy B):
    dx  = dy W + g A          (one GEMM chain: ``(g A).addmm_(dy, W)``)
    dA  = gᵀ x'
    dB  = s · dyᵀ h
    db  = Σ dy, dW = dyᵀ x    (only when those require grad: frozen in LoRA)
With dropout, x' is a separate input: dx = dy W and dx' = g A. On the GPU, dy B is
rounded unscaled and s enters each consumer GEMM as its alpha (one rounding each). dx
takes whichever of the Triton kernel (one rounding) and cuBLAS (``(g A).addmm_(dy, W)``:
g A rounded, then dy W rounded before the add, as eager does) measured faster per shape.
When neither x nor x' needs a gradient, ``lora_linear_backward_ab`` computes only
(dA, dB), skipping the (M, K) dx GEMM.

``fp8_dx`` (the option of that name, opt-in): ``dy W`` in e4m3 with per-token and
per-input-feature scales, accumulated in fp32 (kernels/fp8_dx.py); g A, dA and dB as
without it. Where fp8 cannot run (fp32 compute, sizes not multiples of 16, a GPU before
sm90) dx is exact, warned once.

The MLP fold (``gate``, ``up``, ``act``; passes/lora.py): when x is a gated MLP's product
``act(gate) ⊙ up``, the op also gets gate and up, keeps them for the backward instead of x
(the activation's backward keeps them anyway) and computes dA from them
(kernels/lora_gated.py). The backward ops then take gate in x's place, with ``up`` and
``act``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ._dispatch import bucket, pick_fastest, race_ms, requested_impl, warn_once
from ._dispatch import time_ms as _time_ms  # a module global: tests replace it
from .gated_mlp import gated_mlp_reference
from . import fp8_dx as fp8
from .lora_gated import gated_da, gated_da_reference
from ._ops import lorafuse_op

# --------------------------------------------------------------------------- reference


def _upcast(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None or t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, x_lora=None):
    """Plain PyTorch in fp32 (fp64 stays fp64), rounded once: the CPU path and the
    test oracle. Returns ``(y, h)``."""
    dtype = x.dtype
    xl = x if x_lora is None else x_lora
    x2, xl2 = _upcast(x).reshape(-1, x.shape[-1]), _upcast(xl).reshape(-1, x.shape[-1])
    h = xl2 @ _upcast(lora_a).t()
    y = h @ _upcast(lora_b).t() * scale + x2 @ _upcast(weight).t()
    if bias is not None:
        y = y + _upcast(bias)
    lead = x.shape[:-1]
    return y.to(dtype).reshape(*lead, weight.shape[0]), h.to(dtype).reshape(*lead, lora_a.shape[0])


def lora_linear_backward_reference(dy, x_lora, weight, lora_a, lora_b, h, scale, up=None,
                                   act="", fp8_dx=False):
    """fp32 reference of ``(dx, dA, dB)``; dx omits ``dy W`` when weight is None. With
    ``up`` (the MLP fold) ``x_lora`` is the gate and x' = act(gate) ⊙ up. ``fp8_dx``: dy W
    from e4m3 operands (fp8_dx.fp8_dx_reference)."""
    dtype = dy.dtype
    N = lora_b.shape[0]
    g = (_upcast(dy).reshape(-1, N) @ _upcast(lora_b)) * scale
    dx = g @ _upcast(lora_a)
    if weight is not None and fp8_dx:
        dx = dx + fp8.fp8_dx_reference(dy.reshape(-1, N), weight)
    elif weight is not None:
        dx = dx + _upcast(dy).reshape(-1, N) @ _upcast(weight)
    dA, dB = _lora_ab_reference(dy, x_lora, lora_a, lora_b, h, scale, g, up, act)
    return dx.to(dtype).reshape(x_lora.shape), dA, dB


def _lora_ab_reference(dy, x_lora, lora_a, lora_b, h, scale, g=None, up=None, act=""):
    """fp32 reference of ``(dA, dB)`` alone (the input needs no gradient)."""
    K, N, r = lora_a.shape[1], lora_b.shape[0], lora_a.shape[0]
    dy2 = _upcast(dy).reshape(-1, N)
    if g is None:
        g = (dy2 @ _upcast(lora_b)) * scale
    if up is None:
        dA = (g.t() @ _upcast(x_lora).reshape(-1, K)).to(lora_a.dtype)
    else:
        dA = gated_da_reference(g, x_lora, up, act, 1.0, dy.dtype, lora_a.dtype)
    dB = (dy2.t() @ _upcast(h).reshape(-1, r)) * scale
    return dA, dB.to(lora_b.dtype)


# --------------------------------------------------------------------------- cuBLAS path


def _scaled_mm(a, b, scale):
    """``scale · a @ b`` rounded once (the GEMM's alpha, not a second pass that rounds
    again); with beta = 0 the uninitialised input is never read."""
    if scale == 1.0:
        return a @ b
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return torch.addmm(out, a, b, beta=0, alpha=scale)


def _lora_linear_backward_cublas(dy, x_lora, weight, lora_a, lora_b, h, scale, up=None, act=""):
    N = lora_b.shape[0]
    dy2 = dy.reshape(-1, N)
    g = dy2 @ lora_b  # unscaled; s rides on each consumer's alpha
    dx = _scaled_mm(g, lora_a, scale)
    if weight is not None:
        dx.addmm_(dy2, weight)
    dA, dB = _lora_ab_cublas(dy, x_lora, lora_a, lora_b, h, scale, g, up, act)
    return dx.reshape(x_lora.shape), dA, dB


def _lora_linear_backward_fp8(dy, x_lora, weight, lora_a, lora_b, h, scale, up=None, act="",
                              copies=True):
    """The cuBLAS path with ``dy W`` in e4m3 (fp8_dx.fp8_dx, rounded once), g A added to it
    (a second rounding, as the cuBLAS path rounds twice); None if the fp8 GEMM failed."""
    N = lora_b.shape[0]
    dy2 = dy.reshape(-1, N)
    dx = fp8.fp8_dx([dy2], [weight], copies)
    if dx is None:
        return None
    g = dy2 @ lora_b
    dx.addmm_(g, lora_a, alpha=scale)
    dA, dB = _lora_ab_cublas(dy, x_lora, lora_a, lora_b, h, scale, g, up, act)
    return dx.reshape(x_lora.shape), dA, dB


def _frozen_dx_impl(dy, weight, copies=True):
    """``dy W`` alone (a site with dropout: x and x' take separate gradients), in e4m3
    where fp8_dx applies, exact elsewhere."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    lead = dy.shape[:-1]
    dx = None
    if fp8.applies([dy2], [weight]):
        if not dy.is_cuda and not _triton_on_cpu():
            dx = fp8.fp8_dx_reference(dy2, weight).to(dy.dtype)
        else:
            dx = fp8.fp8_dx([dy2], [weight], copies)
    return (dy2 @ weight if dx is None else dx).reshape(*lead, -1)


def _lora_ab_cublas(dy, x_lora, lora_a, lora_b, h, scale, g=None, up=None, act=""):
    K, N, r = lora_a.shape[1], lora_b.shape[0], lora_a.shape[0]
    dy2 = dy.reshape(-1, N)
    if g is None:
        g = dy2 @ lora_b
    if up is None:
        dA = _scaled_mm(g.t(), x_lora.reshape(-1, K), scale)
    else:  # the MLP fold: x_lora is the gate
        dA = gated_da(g, x_lora, up, act, scale, dy.dtype, lora_a.dtype)
    dB = _scaled_mm(dy2.t(), h.reshape(-1, r), scale)
    return dA, dB


# --------------------------------------------------------------------------- dispatch
#
# CPU: the fp32 reference. CUDA forward: the Triton kernel (see base_plus_lowrank). CUDA
# backward: cuBLAS or the Triton kernel, chosen per shape key by timing both at first use
# (interleaved rounds, _dispatch.race_ms); the choice is cached, so later calls cost a
# dict lookup and never sync.
# LORAFUSE_LORA_IMPL=cublas|triton|auto (default auto) overrides (cublas: the forward
# then writes fp32 from cuBLAS); =triton with TRITON_INTERPRET=1 runs the Triton path on
# CPU (tests). A Triton failure (triton missing, unsupported dtype or size) falls back to
# cuBLAS with one warning.

IMPL_ENV = "LORAFUSE_LORA_IMPL"
_IMPLS = ("auto", "cublas", "triton")
_choice: dict[tuple, str] = {}  # (mode, kind, shape key) -> "cublas" | "triton"


def _requested_impl() -> str:
    return requested_impl(IMPL_ENV, _IMPLS)


def _triton_backward():
    from . import lora_triton  # ImportError when triton is absent: caught by the caller

    return lora_triton.triton_lora_backward


def _dispatch(kind: str, key: tuple, cublas_fn, args):
    mode = _requested_impl()
    if mode == "cublas":
        return cublas_fn(*args)
    ckey = (mode, kind) + key
    choice = _choice.get(ckey)
    if choice == "cublas":
        return cublas_fn(*args)
    measure = choice is None and mode == "auto"
    if measure and args[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return cublas_fn(*args)  # no timing inside a graph capture; decide at a later call
    try:  # only the Triton side: a cuBLAS error is a real error and propagates
        triton_fn = _triton_backward()
        out = triton_fn(*args)  # a first call compiles and autotunes: failures show here
    except Exception as e:  # never crash training over the optional kernel
        _choice[ckey] = "cublas"
        warn_once(f"lorafuse: Triton LoRA kernel unavailable ({type(e).__name__}: {e}); "
                   "using cuBLAS")
        return cublas_fn(*args)
    if not measure:
        _choice[ckey] = "triton"
        return out
    del out  # not held through the timing: at long context dx alone is GiBs
    times = race_ms({"triton": lambda: triton_fn(*args), "cublas": lambda: cublas_fn(*args)},
                    timer=_time_ms)
    choice = _choice[ckey] = min(times, key=times.get)
    return (triton_fn if choice == "triton" else cublas_fn)(*args)


def _triton_on_cpu() -> bool:
    return _requested_impl() == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def base_plus_lowrank(x2, weight, bias, h, lora_b, scale):
    """``x2 Wᵀ + b + s · h Bᵀ`` for 2-D ``x2`` on CUDA, rounded once (the op's contract).

    cuBLAS's beta = 1 epilogue does not round once: on the H200 it rounds x Wᵀ to bf16
    before adding C, like eager PEFT, and a LoRA term under half an ulp of the base output
    is lost (bench/probe_rounding.py: 'captured' 0.19 against 1.00). So this runs the
    fastest of the paths that do round once (``_tail_gemm_forward``), and falls back to
    cuBLAS writing fp32 if the Triton kernels fail. There is no timing choice between
    paths that compute different things."""
    if _requested_impl() != "cublas" and (x2.is_cuda or _triton_on_cpu()):
        try:
            return _tail_gemm_forward(x2, weight, bias, h, lora_b, scale)
        except Exception as e:  # never crash training over the optional kernel
            warn_once(f"lorafuse: Triton LoRA kernel unavailable ({type(e).__name__}: {e}); "
                       "using cuBLAS with an fp32 output")
    return _base_plus_lowrank_fp32(x2, weight, bias, h, lora_b, scale)


def mm_fp32(a, b):
    """``a @ b`` accumulated and written in fp32 (cuBLAS's out_dtype on CUDA; the same
    numbers on CPU, for tests); fp32 and fp64 operands as they are."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _base_plus_lowrank_fp32(x2, weight, bias, h, lora_b, scale):
    """cuBLAS writing the base product in fp32, the tail and bias added there, one rounding:
    the Triton kernels' numbers, with an (M, N) fp32 temporary."""
    y = mm_fp32(x2, weight.t())
    y.addmm_(h.to(y.dtype), lora_b.t().to(y.dtype), alpha=scale)
    if bias is not None:
        y += bias
    return y.to(x2.dtype)


FWD_KERNEL_ENV = "LORAFUSE_LORA_FWD_KERNEL"  # auto | pointer | tma | cublas


def _tail_gemm_forward(x2, weight, bias, h, lora_b, scale):
    """The one-rounding forward GEMM, whichever measured fastest for this shape at its first
    call: the TMA kernel (Hopper, K-contiguous operands), the pointer kernel, or cuBLAS
    with an fp32 output (expected to win where N is small, k/v; not yet measured in a
    step). All three compute the same thing: fp32 accumulation, one rounding. A choice
    already made is looked up before anything else is built (this runs on every LoRA
    forward: the host's time per call counts, bench_op_host.py)."""
    from . import lora_triton as lt

    mode = requested_impl(FWD_KERNEL_ENV, ("auto", "pointer", "tma", "cublas"))
    key = None
    if mode == "auto" and x2.is_cuda:
        key = ("fwd", bucket(x2.shape[0]), weight.shape[0], x2.shape[1], h.shape[1], x2.dtype,
               bias is not None)
        mode = _choice.get(key, "auto")
    tma = mode in ("auto", "tma") and lt.tail_gemm_nt_tma_supported(x2, weight, h, lora_b, bias)
    if mode == "tma" and tma:
        return lt.tail_gemm_nt_tma(x2, weight, h, lora_b, bias, alpha2=scale)
    if mode == "cublas":
        return _base_plus_lowrank_fp32(x2, weight, bias, h, lora_b, scale)
    pointer = lambda: lt.lowrank_tail_gemm(x2, weight.t(), h, lora_b.t(), bias,  # noqa: E731
                                           alpha2=scale)
    if key is None or mode != "auto":  # asked for; a "tma" these operands cannot take; CPU
        return pointer()
    candidates = {
        "tma": lambda: lt.tail_gemm_nt_tma(x2, weight, h, lora_b, bias, alpha2=scale),
        "cublas": lambda: _base_plus_lowrank_fp32(x2, weight, bias, h, lora_b, scale),
        "pointer": pointer,
    }
    if not tma:
        del candidates["tma"]
    return candidates[pick_fastest(_choice, key, candidates, "LoRA forward GEMM",
                                   timer=_time_ms)]()


def _forward_impl(x, weight, bias, lora_a, lora_b, scale, x_lora):
    if not x.is_cuda and not _triton_on_cpu():
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, x_lora)
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    h = (x2 if x_lora is None else x_lora.reshape(-1, K)) @ lora_a.t()
    y = base_plus_lowrank(x2, weight, bias, h, lora_b, scale)
    lead = x.shape[:-1]
    return y.reshape(*lead, N), h.reshape(*lead, lora_a.shape[0])


def _backward_impl(dy, x_lora, weight, lora_a, lora_b, h, scale, up=None, act="",
                   fp8_dx=False, fp8_copies=True):
    args = (dy, x_lora, weight, lora_a, lora_b, h, scale, up, act)
    if fp8_dx and weight is not None and fp8.applies([dy.reshape(-1, dy.shape[-1])], [weight]):
        if not dy.is_cuda and not _triton_on_cpu():
            return lora_linear_backward_reference(*args, fp8_dx=True)
        out = _lora_linear_backward_fp8(*args, copies=fp8_copies)
        if out is not None:  # None: the fp8 GEMM failed; exact from here (fp8_dx.fp8_dx)
            return out
    if not dy.is_cuda and not _triton_on_cpu():
        return lora_linear_backward_reference(*args)
    if weight is None:  # no base GEMM: nothing for the Triton kernel to fuse
        return _lora_linear_backward_cublas(*args)
    M = dy.numel() // dy.shape[-1] if dy.shape[-1] else 0
    key = (bucket(M), weight.shape[0], weight.shape[1], lora_a.shape[0], dy.dtype,
           weight.stride(-1) != 1)
    return _dispatch("bwd", key, _lora_linear_backward_cublas, args)


def _ab_impl(dy, x_lora, lora_a, lora_b, h, scale, up=None, act=""):
    if dy.is_cuda:
        return _lora_ab_cublas(dy, x_lora, lora_a, lora_b, h, scale, up=up, act=act)
    return _lora_ab_reference(dy, x_lora, lora_a, lora_b, h, scale, up=up, act=act)


# --------------------------------------------------------------------------- ops


@lorafuse_op("lorafuse::lora_linear")
def lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    x_lora: Optional[Tensor],
    gate: Optional[Tensor] = None,
    up: Optional[Tensor] = None,
    act: str = "",
    fp8_dx: bool = False,
    fp8_copies: bool = True,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, h)``; h = x' Aᵀ is kept for the backward (r columns, small). gate, up
    and act (the MLP fold, module docstring) change only what the backward keeps;
    ``fp8_dx`` and ``fp8_copies`` only how the backward computes dy W (kernels/fp8_dx.py:
    ``fp8_copies`` False quantises W in every backward instead of keeping its copy)."""
    y, h = _forward_impl(x, weight, bias, lora_a, lora_b, scale, x_lora)
    return y.contiguous(), h.contiguous()


@lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, x_lora, gate=None, up=None, act="", fp8_dx=False,
      fp8_copies=True):
    lead = x.shape[:-1]
    return x.new_empty(*lead, weight.shape[0]), x.new_empty(*lead, lora_a.shape[0])


@lorafuse_op("lorafuse::lora_linear_h")
def lora_linear_h_op(x: Tensor, lora_a: Tensor, x_lora: Optional[Tensor]) -> Tensor:
    """``lora_linear``'s second output alone, h = x' Aᵀ, computed as that op computes it on
    each path (bit-identical): where a backward recomputes a LoRA linear only for the h
    its backward reads (checkpoint_layers: the down projection's output is not needed),
    partition.py calls this instead, and skips the base GEMM."""
    K, r, lead = x.shape[-1], lora_a.shape[0], x.shape[:-1]
    xl = x if x_lora is None else x_lora
    if not x.is_cuda and not _triton_on_cpu():  # lora_linear_reference's h
        h = (_upcast(xl).reshape(-1, K) @ _upcast(lora_a).t()).to(x.dtype)
    else:  # _forward_impl's h
        h = xl.reshape(-1, K) @ lora_a.t()
    return h.reshape(*lead, r).contiguous()


@lora_linear_h_op.register_fake
def _(x, lora_a, x_lora):
    return x.new_empty(*x.shape[:-1], lora_a.shape[0])


@lorafuse_op("lorafuse::lora_linear_backward")
def lora_linear_backward_op(
    dy: Tensor,
    x_lora: Tensor,
    weight: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    h: Tensor,
    scale: float,
    up: Optional[Tensor] = None,
    act: str = "",
    fp8_dx: bool = False,
    fp8_copies: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dA, dB)``; dx = dy W + g A, or g A alone when weight is None. With
    ``up``, x_lora is the gate of x' = act(gate) ⊙ up (the MLP fold). ``fp8_dx``: dy W in
    e4m3 (module docstring); ``fp8_copies``: from W's kept fp8 copy, or W quantised now."""
    dx, dA, dB = _backward_impl(dy, x_lora, weight, lora_a, lora_b, h, scale, up, act, fp8_dx,
                                fp8_copies)
    return dx.contiguous(), dA.contiguous(), dB.contiguous()


@lora_linear_backward_op.register_fake
def _(dy, x_lora, weight, lora_a, lora_b, h, scale, up=None, act="", fp8_dx=False,
      fp8_copies=True):
    return x_lora.new_empty(x_lora.shape), torch.empty_like(lora_a), torch.empty_like(lora_b)


@lorafuse_op("lorafuse::frozen_dx")
def frozen_dx_op(dy: Tensor, weight: Tensor, copies: bool = True) -> Tensor:
    """``dy W`` through a frozen weight with ``fp8_dx``'s e4m3 arithmetic where it applies
    (the backward of a LoRA site with dropout under that option); ``copies``: as
    ``fp8_copies``."""
    return _frozen_dx_impl(dy, weight, copies).contiguous()


@frozen_dx_op.register_fake
def _(dy, weight, copies=True):
    return dy.new_empty(*dy.shape[:-1], weight.shape[1])


@lorafuse_op("lorafuse::lora_linear_backward_ab")
def lora_linear_backward_ab_op(
    dy: Tensor,
    x_lora: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    h: Tensor,
    scale: float,
    up: Optional[Tensor] = None,
    act: str = "",
) -> tuple[Tensor, Tensor]:
    """Returns ``(dA, dB)`` only: the backward when no input needs a gradient (layer 0
    fed by frozen embeddings), which skips the (M, K) dx GEMM. lora_a gives dA's
    shape and dtype; ``up``: as in ``lora_linear_backward``."""
    dA, dB = _ab_impl(dy, x_lora, lora_a, lora_b, h, scale, up, act)
    return dA.contiguous(), dB.contiguous()


@lora_linear_backward_ab_op.register_fake
def _(dy, x_lora, lora_a, lora_b, h, scale, up=None, act=""):
    return torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, x_lora, gate, up, act, fp8_dx, fp8_copies = (
        tuple(inputs) + (None, None, "", False, True)[len(inputs) - 7:])  # defaults may be absent
    ctx.scale = scale
    ctx.fp8_dx, ctx.fp8_copies = fp8_dx, fp8_copies
    ctx.has_bias = bias is not None
    ctx.has_dropout = x_lora is not None
    ctx.act = act
    ctx.fold = up is not None
    # the MLP fold keeps gate and up (which the activation's backward keeps) instead of x
    ctx.save_for_backward(gate if ctx.fold else x, weight, lora_a, lora_b, x_lora, output[1],
                          up)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dh):
    x, weight, lora_a, lora_b, x_lora, h, up = ctx.saved_tensors  # x: the gate under the fold
    need = ctx.needs_input_grad  # x, weight, bias, A, B, scale, x_lora, gate, up, act, fp8_*
    fold = (up, ctx.act) if ctx.fold else ()
    dx = dW = db = dxl = None
    if ctx.has_dropout:
        if need[6]:
            dxl, dA, dB = lora_linear_backward_op(dy, x_lora, None, lora_a, lora_b, h, ctx.scale)
        else:
            dA, dB = lora_linear_backward_ab_op(dy, x_lora, lora_a, lora_b, h, ctx.scale)
        if need[0]:
            dx = frozen_dx_op(dy, weight, ctx.fp8_copies) if ctx.fp8_dx else dy @ weight
    elif need[0]:
        dx, dA, dB = lora_linear_backward_op(dy, x, weight, lora_a, lora_b, h, ctx.scale,
                                             *(fold or (None, "")), fp8_dx=ctx.fp8_dx,
                                             fp8_copies=ctx.fp8_copies)
    else:
        dA, dB = lora_linear_backward_ab_op(dy, x, lora_a, lora_b, h, ctx.scale, *fold)
    if need[1]:
        if ctx.fold:  # passes/lora.py folds only frozen weights; rebuild x all the same
            x = gated_mlp_reference(x, up, ctx.act, dy.dtype)
        dW = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        dW = dW.to(weight.dtype)
    if ctx.has_bias and need[2]:
        db = dy.reshape(-1, dy.shape[-1]).sum(0)
    grads = (dx, dW, db, dA, dB, None, dxl, None, None, None, None, None)
    return grads[:len(ctx.needs_input_grad)]


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x, weight, bias, lora_a, lora_b, scale, x_lora=None):
    """``x Wᵀ + b + s · (x' Aᵀ) Bᵀ`` with the fused forward and backward."""
    return lora_linear_op(x, weight, bias, lora_a, lora_b, float(scale), x_lora)[0]
