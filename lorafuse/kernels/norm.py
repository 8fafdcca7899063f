"""Fused RMSNorm: ``lorafuse::rms_norm`` with its backward, in the rounding order of the
model code it replaces. LayerNorm (``lorafuse::layer_norm``) is the second half of this
file, laid out the same way; its own notes are there.

Two variants, as transformers writes them (h = x in fp32, r = rsqrt(mean(h²) + eps) per
row, n = h · r in fp32):

    cast_before_weight=True   (Llama, Mistral, Qwen2/3, OLMo2 ...)
        y = weight * n.to(x.dtype)          # n rounded to the input dtype first; the
                                            # product is rounded once to out_dtype =
                                            # promote(weight.dtype, x.dtype)
    cast_before_weight=False  (Gemma: offset = 1; T5-style fp32 scaling: offset = 0)
        y = (n * (offset + weight.float())).to(out_dtype)
                                            # offset + w rounded to fp32, product in
                                            # fp32, one rounding at the end

``weight`` may be None (RMSNorm without a scale): y = n.to(x.dtype) (cast_before_weight)
or n.to(out_dtype). The norm runs over the last dim of any-rank ``x`` (per-head q/k
norms are the same op on a [..., heads, head_dim] view).

The op returns ``(y, rstd)``; rstd (fp32, shape ``x.shape[:-1]``) and x are all the
backward keeps (weight is a parameter). Gradients, in fp32 (dy = ∂L/∂y):

    dn = dy · w_eff                          w_eff = weight (cast variant) or offset + w;
                                             dn = dy without a weight
    dx = r · (dn − n · mean(dn · n))         rounded once to x.dtype
    dw = Σ_rows dy · c                       c = n.to(x.dtype) (cast variant) or n;
                                             only when weight requires grad

Eager autograd rounds dy · w to the input dtype before the rest; here nothing is rounded
until dx itself, so the bf16 gradient is at least as close to fp32 as eager's.

Paths: CPU runs the PyTorch reference (the same torch calls as the model code, so the
forward equals eager exactly; it is also the test oracle). CUDA runs the Triton kernels
of this file: forward one block of rows per program (BLOCK_M rows × the whole row,
fp32 math); backward a grid of programs looping over row blocks, accumulating dw per
program in registers when it is needed (a (programs, N) fp32 partial, summed after).
LORAFUSE_NORM_IMPL=auto|torch|triton (default auto: Triton on CUDA) overrides;
=triton with TRITON_INTERPRET=1 runs the kernels on CPU (tests). A Triton failure falls
back to the reference with one warning. The norm pass is not a default pass: on the
H200 (bench/bench_norm.py, session 31, the GPU alone) the op by itself runs at 84-91 % of
the memory bandwidth, ahead of Inductor's norms, but behind a residual add, as every norm
of a Llama decoder layer is, Inductor folds the add into its norm and is faster.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._dispatch import on_device, triton_or_reference
from ._ops import lorafuse_op

try:  # optional: without triton, CUDA tensors take the PyTorch path (with a warning)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

IMPL_ENV = "LORAFUSE_NORM_IMPL"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- reference


def rms_norm_reference(x, weight, eps, offset=0.0, cast_before_weight=True, out_dtype=None):
    """The model code's own torch calls, in its order: ``(y, rstd)``."""
    h = x.to(torch.float32)
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    n = h * rstd
    if cast_before_weight:
        n = n.to(x.dtype)
        y = n if weight is None else weight * n
    else:
        y = n if weight is None else n * (offset + weight.to(torch.float32))
    if out_dtype is not None:
        y = y.to(out_dtype)
    return y, rstd.squeeze(-1)


def rms_norm_backward_reference(dy, x, weight, rstd, offset, cast_before_weight, need_dx,
                                need_dweight):
    """fp32 ``(dx, dw)``; dw is fp32 (N,) or an empty tensor when not needed, dx is
    ``x.dtype`` or empty when not needed."""
    N = x.shape[-1]
    h = x.to(torch.float32)
    r = rstd.unsqueeze(-1)
    n = h * r
    g = dy.to(torch.float32)
    dw = g.new_empty(0)
    if weight is not None:
        w = weight.to(torch.float32)
        if not cast_before_weight:
            w = offset + w
        if need_dweight:
            c = n.to(x.dtype).to(torch.float32) if cast_before_weight else n
            dw = (g * c).reshape(-1, N).sum(0)
        g = g * w
    dx = x.new_empty(0)
    if need_dx:
        dot = (g * n).sum(-1, keepdim=True) / N
        dx = (r * (g - n * dot)).to(x.dtype)
    return dx, dw


# --------------------------------------------------------------------------- Triton
#
# Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) fp32 -> bf16 casts
# truncate; the GPU rounds to nearest even. HAND_ROUND_* rounds on the bits there, so the
# interpreter computes what the GPU does.

MAX_BLOCK_N = 65536  # one row per block; wider rows take the PyTorch path
_INTERPRETER_BLOCK_M = 4  # several rows per program even for small tests

if triton is not None:

    @triton.jit
    def _rne_bf16(v):
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _rms_norm_fwd_kernel(
        x_ptr, w_ptr, y_ptr, rstd_ptr,
        M, N, stride_x, stride_y,
        inv_n, eps, offset,
        HAS_WEIGHT: tl.constexpr,
        CAST_BEFORE_WEIGHT: tl.constexpr,
        HAND_ROUND_MID: tl.constexpr,
        HAND_ROUND_OUT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < M
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        h = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(h * h, axis=1) * inv_n + eps)
        n = h * rstd[:, None]
        if CAST_BEFORE_WEIGHT:  # n rounded to the input dtype, as the model code does
            if HAND_ROUND_MID:
                n = _rne_bf16(n)
            else:
                n = n.to(x_ptr.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            if not CAST_BEFORE_WEIGHT:
                w = w + offset  # rounded to fp32, as (offset + weight.float()) is
            n = n * w[None, :]
        if HAND_ROUND_OUT:
            n = _rne_bf16(n)
        tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :],
                 n.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr,
        M, N, stride_dy, stride_x, stride_dx,
        inv_n, offset, num_blocks,
        HAS_WEIGHT: tl.constexpr,
        CAST_BEFORE_WEIGHT: tl.constexpr,
        NEED_DX: tl.constexpr,
        NEED_DW: tl.constexpr,
        HAND_ROUND_MID: tl.constexpr,
        HAND_ROUND_DX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # Each program walks row blocks pid, pid + programs, ...: with NEED_DW the grid is
        # a few programs per SM and each keeps its dw partial sum in registers.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            if not CAST_BEFORE_WEIGHT:
                w = w + offset
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for blk in range(pid, num_blocks, nprog):
            rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            rows64 = rows.to(tl.int64)
            h = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            g = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            n = h * rstd[:, None]
            if HAS_WEIGHT:
                if NEED_DW:
                    c = n
                    if CAST_BEFORE_WEIGHT:
                        if HAND_ROUND_MID:
                            c = _rne_bf16(n)
                        else:
                            c = n.to(x_ptr.dtype.element_ty).to(tl.float32)
                    dw_acc += tl.sum(g * c, axis=0)
                g = g * w[None, :]
            if NEED_DX:
                dot = tl.sum(g * n, axis=1) * inv_n
                dx = rstd[:, None] * (g - n * dot[:, None])
                if HAND_ROUND_DX:
                    dx = _rne_bf16(dx)
                tl.store(dx_ptr + rows64[:, None] * stride_dx + cols[None, :],
                         dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            tl.store(dw_ptr + pid * N + cols, dw_acc, mask=cmask)

    _INTERPRETED = type(_rms_norm_fwd_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover
    _INTERPRETED = False


def launch_config(N: int) -> dict:
    """Block shape and warps for rows of N: one row per program at LLM widths, several
    rows per program for narrow rows (per-head q/k norms)."""
    block_n = triton.next_power_of_2(max(N, 1))
    if block_n > MAX_BLOCK_N:
        raise ValueError(f"rows of {N} elements are wider than {MAX_BLOCK_N}")
    if _INTERPRETED:
        return dict(BLOCK_M=_INTERPRETER_BLOCK_M, BLOCK_N=block_n, num_warps=1)
    block_m = max(1, min(32, 4096 // block_n))
    num_warps = max(1, min(16, block_m * block_n // 512))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)


def _rows(t: Tensor, N: int) -> Tensor:
    t2 = t.reshape(-1, N)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: Tensor, weight, out_dtype) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed")
    dtypes = [x.dtype, out_dtype] + ([] if weight is None else [weight.dtype])
    if any(d not in FLOAT_DTYPES for d in dtypes):
        raise TypeError(f"unsupported dtypes {dtypes}")
    if not _INTERPRETED and not x.is_cuda:
        raise ValueError("needs CUDA tensors (or TRITON_INTERPRET=1)")


def rms_norm_forward_triton(x, weight, eps, offset, cast_before_weight, out_dtype):
    """Same contract as ``rms_norm_reference`` (out_dtype given): ``(y, rstd)``."""
    _check(x, weight, out_dtype)
    N = x.shape[-1]
    x2 = _rows(x, N)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M and N:
        cfg = launch_config(N)
        bf16 = torch.bfloat16
        grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
        with on_device(x):
            _rms_norm_fwd_kernel[grid](
                x2, x2 if weight is None else weight, y, rstd,
                M, N, x2.stride(0), y.stride(0),
                1.0 / N, float(eps), float(offset),
                HAS_WEIGHT=weight is not None,
                CAST_BEFORE_WEIGHT=bool(cast_before_weight),
                HAND_ROUND_MID=_INTERPRETED and x.dtype == bf16,
                HAND_ROUND_OUT=_INTERPRETED and out_dtype == bf16,
                **cfg,
            )
    return y.reshape(x.shape), rstd.reshape(x.shape[:-1])


def _dw_programs(x: Tensor, num_blocks: int) -> int:
    if _INTERPRETED:
        return min(num_blocks, 3)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return min(num_blocks, 4 * sms)


def rms_norm_backward_triton(dy, x, weight, rstd, offset, cast_before_weight, need_dx,
                             need_dweight):
    """Same contract as ``rms_norm_backward_reference``: ``(dx, dw)``."""
    _check(x, weight, dy.dtype)
    N = x.shape[-1]
    x2, dy2 = _rows(x, N), _rows(dy, N)
    M = x2.shape[0]
    need_dw = bool(need_dweight) and weight is not None
    dx = torch.empty((M, N) if need_dx else (0,), dtype=x.dtype, device=x.device)
    if not (M and N):
        dw = torch.zeros((N,) if need_dw else (0,), dtype=torch.float32, device=x.device)
        return dx.reshape(x.shape) if need_dx else dx, dw
    cfg = launch_config(N)
    num_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    programs = _dw_programs(x, num_blocks) if need_dw else num_blocks
    partial = torch.empty((programs, N) if need_dw else (0,), dtype=torch.float32,
                          device=x.device)
    with on_device(x):
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, x2 if weight is None else weight, rstd.reshape(-1),
            dx if need_dx else x2, partial if need_dw else rstd,
            M, N, dy2.stride(0), x2.stride(0), dx.stride(0) if need_dx else 0,
            1.0 / N, float(offset), num_blocks,
            HAS_WEIGHT=weight is not None,
            CAST_BEFORE_WEIGHT=bool(cast_before_weight),
            NEED_DX=bool(need_dx),
            NEED_DW=need_dw,
            HAND_ROUND_MID=_INTERPRETED and x.dtype == torch.bfloat16,
            HAND_ROUND_DX=_INTERPRETED and x.dtype == torch.bfloat16,
            **cfg,
        )
    dw = partial.sum(0) if need_dw else partial
    return (dx.reshape(x.shape) if need_dx else dx), dw


# --------------------------------------------------------------------------- dispatch


def _forward_impl(x, weight, eps, offset, cast_before_weight, out_dtype):
    return triton_or_reference(
        x, IMPL_ENV, "RMSNorm forward",
        lambda: rms_norm_forward_triton(x, weight, eps, offset, cast_before_weight, out_dtype),
        lambda: rms_norm_reference(x, weight, eps, offset, cast_before_weight, out_dtype))


def _backward_impl(dy, x, weight, rstd, offset, cast_before_weight, need_dx, need_dweight):
    args = (dy, x, weight, rstd, offset, cast_before_weight, need_dx, need_dweight)
    return triton_or_reference(x, IMPL_ENV, "RMSNorm backward",
                               lambda: rms_norm_backward_triton(*args),
                               lambda: rms_norm_backward_reference(*args))


# --------------------------------------------------------------------------- ops


@lorafuse_op("lorafuse::rms_norm")
def rms_norm_op(
    x: Tensor,
    weight: Optional[Tensor],
    eps: float,
    offset: float,
    cast_before_weight: bool,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, rstd)``: y in ``out_dtype`` with x's shape, rstd fp32 ``x.shape[:-1]``."""
    y, rstd = _forward_impl(x, weight, eps, offset, cast_before_weight, out_dtype)
    return y.contiguous(), rstd.contiguous()


@rms_norm_op.register_fake
def _(x, weight, eps, offset, cast_before_weight, out_dtype):
    return (x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@lorafuse_op("lorafuse::rms_norm_backward")
def rms_norm_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    rstd: Tensor,
    offset: float,
    cast_before_weight: bool,
    need_dx: bool,
    need_dweight: bool,
) -> tuple[Tensor, Tensor]:
    """Returns ``(dx, dw)``: dx in x.dtype (empty unless need_dx), dw fp32 (N,) (empty
    unless need_dweight)."""
    dx, dw = _backward_impl(dy, x, weight, rstd, offset, cast_before_weight, need_dx,
                            need_dweight)
    return dx.contiguous(), dw.contiguous()


@rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, offset, cast_before_weight, need_dx, need_dweight):
    dx = x.new_empty(x.shape if need_dx else (0,))
    dw = x.new_empty((x.shape[-1],) if need_dweight and weight is not None else (0,),
                     dtype=torch.float32)
    return dx, dw


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset, cast_before_weight, out_dtype = inputs
    ctx.offset = offset
    ctx.cast_before_weight = cast_before_weight
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = weight is not None and ctx.needs_input_grad[1]
    if not (need_dx or need_dw):
        return None, None, None, None, None, None
    dx, dw = rms_norm_backward_op(dy, x, weight, rstd, ctx.offset, ctx.cast_before_weight,
                                  need_dx, need_dw)
    return (dx if need_dx else None, dw.to(weight.dtype) if need_dw else None,
            None, None, None, None)


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def out_dtype_of(x_dtype, weight_dtype, cast_before_weight):
    """The output dtype the model code produces without a final cast."""
    if weight_dtype is None:
        return x_dtype if cast_before_weight else torch.float32
    if cast_before_weight:
        return torch.promote_types(weight_dtype, x_dtype)
    return torch.float32


def rms_norm(x, weight=None, eps=1e-6, offset=0.0, cast_before_weight=True, out_dtype=None):
    """RMSNorm over the last dim with the fused forward and backward (see module doc)."""
    if out_dtype is None:
        out_dtype = out_dtype_of(x.dtype, None if weight is None else weight.dtype,
                                 cast_before_weight)
    return rms_norm_op(x, weight, float(eps), float(offset), bool(cast_before_weight),
                       out_dtype)[0]


# =========================================================================== LayerNorm
#
# ``lorafuse::layer_norm``: F.layer_norm over the last dim (h = x in fp32, per row
# mean μ = mean(h), rstd = 1/sqrt(mean((h − μ)²) + eps), the biased variance as
# F.layer_norm uses), n = (h − μ)·rstd, y = n·w + b in fp32, rounded once to x.dtype
# (what F.layer_norm returns, mixed bf16/fp16 input with fp32 parameters included).
# weight and bias are each optional (elementwise_affine=False, bias=False).
#
# The op returns ``(y, mean, rstd)`` (mean and rstd fp32, shape ``x.shape[:-1]``); x,
# mean and rstd are all the backward keeps, never y. Gradients in fp32 (g = dy · w, or dy
# without a weight):
#
#     dx = rstd · (g − mean(g) − n · mean(g · n))      rounded once to x.dtype
#     dw = Σ_rows dy · n                                only when weight requires grad
#     db = Σ_rows dy                                    only when bias requires grad
#
# CPU runs the reference (F.layer_norm itself for y, so the forward equals eager exactly);
# CUDA runs the Triton kernels below, laid out as the RMSNorm ones (forward: BLOCK_M rows
# per program; backward: programs looping over row blocks, dw and db as (programs, N)
# fp32 partial sums, summed after). Not measured on the GPU.


def layer_norm_reference(x, weight, bias, eps):
    """``(y, mean, rstd)``: y from F.layer_norm (eager's numbers), mean and rstd fp32."""
    N = x.shape[-1]
    y = torch.nn.functional.layer_norm(x, (N,), weight, bias, eps)
    var, mean = torch.var_mean(x.to(torch.float32), -1, correction=0)
    return y, mean, torch.rsqrt(var + eps)


def layer_norm_backward_reference(dy, x, weight, mean, rstd, need_dx, need_dweight,
                                  need_dbias):
    """``(dx, dw, db)``: dx in x.dtype, dw and db fp32 (N,); each an empty tensor when
    not needed."""
    N = x.shape[-1]
    r = rstd.unsqueeze(-1)
    n = (x.to(torch.float32) - mean.unsqueeze(-1)) * r
    g = dy.to(torch.float32)
    dw = g.new_empty(0)
    db = g.new_empty(0)
    if need_dweight:
        dw = (g * n).reshape(-1, N).sum(0)
    if need_dbias:
        db = g.reshape(-1, N).sum(0)
    if weight is not None:
        g = g * weight.to(torch.float32)
    dx = x.new_empty(0)
    if need_dx:
        dx = (r * (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True)))
        dx = dx.to(x.dtype)
    return dx, dw, db


if triton is not None:

    @triton.jit
    def _layer_norm_fwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
        M, N, stride_x, stride_y,
        inv_n, eps,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAND_ROUND_OUT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < M
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        h = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        mean = tl.sum(h, axis=1) * inv_n
        hc = tl.where(mask, h - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(hc * hc, axis=1) * inv_n + eps)
        n = hc * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            n = n * w[None, :]
        if HAS_BIAS:
            b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            n = n + b[None, :]
        if HAND_ROUND_OUT:
            n = _rne_bf16(n)
        tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :],
                 n.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit
    def _layer_norm_bwd_kernel(
        dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
        M, N, stride_dy, stride_x, stride_dx,
        inv_n, num_blocks,
        HAS_WEIGHT: tl.constexpr,
        NEED_DX: tl.constexpr,
        NEED_DW: tl.constexpr,
        NEED_DB: tl.constexpr,
        HAND_ROUND_DX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # As _rms_norm_bwd_kernel: programs walk row blocks pid, pid + programs, ...,
        # keeping their dw and db partial sums in registers.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for blk in range(pid, num_blocks, nprog):
            rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            rows64 = rows.to(tl.int64)
            h = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            g = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            n = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
            if NEED_DW:
                dw_acc += tl.sum(g * n, axis=0)
            if NEED_DB:
                db_acc += tl.sum(g, axis=0)
            if HAS_WEIGHT:
                g = g * w[None, :]
            if NEED_DX:
                mean_g = tl.sum(g, axis=1) * inv_n
                dot = tl.sum(g * n, axis=1) * inv_n
                dx = rstd[:, None] * (g - mean_g[:, None] - n * dot[:, None])
                if HAND_ROUND_DX:
                    dx = _rne_bf16(dx)
                tl.store(dx_ptr + rows64[:, None] * stride_dx + cols[None, :],
                         dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            tl.store(dw_ptr + pid * N + cols, dw_acc, mask=cmask)
        if NEED_DB:
            tl.store(db_ptr + pid * N + cols, db_acc, mask=cmask)


def _check_layer_norm(x, weight, bias) -> None:
    _check(x, weight, x.dtype)
    if bias is not None and bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"unsupported bias dtype {bias.dtype}")


def layer_norm_forward_triton(x, weight, bias, eps):
    """Same contract as ``layer_norm_reference``: ``(y, mean, rstd)``."""
    _check_layer_norm(x, weight, bias)
    N = x.shape[-1]
    x2 = _rows(x, N)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M and N:
        cfg = launch_config(N)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
        with on_device(x):
            _layer_norm_fwd_kernel[grid](
                x2, x2 if weight is None else weight, x2 if bias is None else bias,
                y, mean, rstd,
                M, N, x2.stride(0), y.stride(0),
                1.0 / N, float(eps),
                HAS_WEIGHT=weight is not None,
                HAS_BIAS=bias is not None,
                HAND_ROUND_OUT=_INTERPRETED and x.dtype == torch.bfloat16,
                **cfg,
            )
    lead = x.shape[:-1]
    return y.reshape(x.shape), mean.reshape(lead), rstd.reshape(lead)


def layer_norm_backward_triton(dy, x, weight, mean, rstd, need_dx, need_dweight, need_dbias):
    """Same contract as ``layer_norm_backward_reference``: ``(dx, dw, db)``."""
    _check_layer_norm(x, weight, None)
    N = x.shape[-1]
    x2, dy2 = _rows(x, N), _rows(dy, N)
    M = x2.shape[0]
    need_dw, need_db = bool(need_dweight), bool(need_dbias)
    dx = torch.empty((M, N) if need_dx else (0,), dtype=x.dtype, device=x.device)
    if not (M and N):
        zeros = [torch.zeros((N,) if need else (0,), dtype=torch.float32, device=x.device)
                 for need in (need_dw, need_db)]
        return (dx.reshape(x.shape) if need_dx else dx), zeros[0], zeros[1]
    cfg = launch_config(N)
    num_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    programs = _dw_programs(x, num_blocks) if (need_dw or need_db) else num_blocks
    partial = [torch.empty((programs, N) if need else (0,), dtype=torch.float32,
                           device=x.device) for need in (need_dw, need_db)]
    with on_device(x):
        _layer_norm_bwd_kernel[(programs,)](
            dy2, x2, x2 if weight is None else weight, mean.reshape(-1), rstd.reshape(-1),
            dx if need_dx else x2, partial[0] if need_dw else rstd,
            partial[1] if need_db else rstd,
            M, N, dy2.stride(0), x2.stride(0), dx.stride(0) if need_dx else 0,
            1.0 / N, num_blocks,
            HAS_WEIGHT=weight is not None,
            NEED_DX=bool(need_dx),
            NEED_DW=need_dw,
            NEED_DB=need_db,
            HAND_ROUND_DX=_INTERPRETED and x.dtype == torch.bfloat16,
            **cfg,
        )
    dw, db = (p.sum(0) if need else p for p, need in zip(partial, (need_dw, need_db)))
    return (dx.reshape(x.shape) if need_dx else dx), dw, db


def _layer_norm_forward_impl(x, weight, bias, eps):
    return triton_or_reference(
        x, IMPL_ENV, "LayerNorm forward",
        lambda: layer_norm_forward_triton(x, weight, bias, eps),
        lambda: layer_norm_reference(x, weight, bias, eps))


def _layer_norm_backward_impl(*args):
    x = args[1]
    return triton_or_reference(x, IMPL_ENV, "LayerNorm backward",
                               lambda: layer_norm_backward_triton(*args),
                               lambda: layer_norm_backward_reference(*args))


@lorafuse_op("lorafuse::layer_norm")
def layer_norm_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(y, mean, rstd)``: y in x.dtype with x's shape, mean and rstd fp32
    ``x.shape[:-1]``."""
    y, mean, rstd = _layer_norm_forward_impl(x, weight, bias, eps)
    return y.contiguous(), mean.contiguous(), rstd.contiguous()


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return (x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@lorafuse_op("lorafuse::layer_norm_backward")
def layer_norm_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dw, db)``: dx in x.dtype (empty unless need_dx), dw and db fp32 (N,)
    (each empty unless needed)."""
    dx, dw, db = _layer_norm_backward_impl(dy, x, weight, mean, rstd, need_dx, need_dweight,
                                           need_dbias)
    return dx.contiguous(), dw.contiguous(), db.contiguous()


@layer_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd, need_dx, need_dweight, need_dbias):
    N = x.shape[-1]
    return (x.new_empty(x.shape if need_dx else (0,)),
            x.new_empty((N,) if need_dweight else (0,), dtype=torch.float32),
            x.new_empty((N,) if need_dbias else (0,), dtype=torch.float32))


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = ctx.has_bias and ctx.needs_input_grad[2]
    if not (need_dx or need_dw or need_db):
        return None, None, None, None
    dx, dw, db = layer_norm_backward_op(dy, x, weight, mean, rstd, need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw.to(weight.dtype) if need_dw else None,
            db.to(ctx.bias_dtype) if need_db else None, None)


layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """F.layer_norm over the last dim with the fused forward and backward."""
    return layer_norm_op(x, weight, bias, float(eps))[0]
