"""A bitsandbytes 4-bit linear, with an optional LoRA adapter on top, as one op.

    y = x Wᵀ + b + s · (x' Aᵀ) Bᵀ          W = dequant(packed 4-bit weight, quant state)

``x`` (..., K) is the base layer's input in bitsandbytes' compute dtype (the dtype of
``bnb_4bit_compute_dtype``: bitsandbytes casts its input to it, and the pass keeps that
cast); ``bias`` (N,) is in that dtype too. The adapter has its own dtype (that of
``lora_a``; fp32 for PEFT without autocast): ``lora_a`` A (r, K), ``lora_b`` B (N, r) and
``x_lora`` x' (..., K), which is the adapter's input as PEFT feeds it (dropout of the
layer input, cast to the adapter dtype) — always a separate input, so dropout needs no
special case. ``out_dtype``: the dtype the graph wants y in (the add's dtype: PEFT adds
the bf16 base product and the fp32 adapter term in fp32). Without an adapter, ``lora_a``,
``lora_b``, ``x_lora`` are None and y is the base product alone.

The 4-bit weight (``bitsandbytes.functional.QuantState``):
- ``qweight``: the packed weight, any shape (bitsandbytes stores ``((N·K+1)//2, 1)``),
  any storage dtype (``bnb_4bit_quant_storage``; it is read as bytes). Byte i holds
  elements 2i (high nibble) and 2i+1 (low nibble) of the row-major (N, K) weight.
- ``absmax``: one scale per ``blocksize`` consecutive elements of the flattened weight
  (the last block may be partial): fp32, or, double-quantised
  (``bnb_4bit_use_double_quant``), uint8 indices into ``code2`` (256 fp32 values) with
  one fp32 ``absmax2`` per 256 blocks and a scalar fp32 ``offset``:
  ``scale[j] = code2[absmax[j]] · absmax2[j // 256] + offset`` (fp32, as bitsandbytes).
- element value = ``CODE[quant_type][nibble] · scale[block]`` in fp32, then rounded to
  the dtype asked for: the same numbers as ``bitsandbytes.functional.dequantize_4bit``
  (``dequantize_4bit`` below is tested bit-exact against it; it is the oracle for a
  future Triton kernel, so it does not call bitsandbytes).

Precision (the LoRA op's contract, ``lora.py``): every product accumulates in fp32 and y
is rounded once, to ``out_dtype``. Eager QLoRA rounds W to the compute dtype, then x Wᵀ,
then adds the adapter term: the reference here uses W in fp32 (its exact value).

Gradients (dy flattened to 2-D, g = s · dy B):
    dx  = dy W               (W dequantised again: nothing dequantised is saved)
    dx' = g A,  dA = gᵀ x',  dB = s · dyᵀ h      (h = x' Aᵀ, an output, saved: r columns)
    db  = Σ dy               (only when the bias requires grad: frozen in QLoRA)
Saved for the backward: the packed weight and its quant state (parameters and buffers:
no new memory), A, B, x' and h. Not x: the frozen base needs no weight gradient.

Paths. CPU: the fp32 reference below. CUDA (and CPU tensors when ``DEVICE_PATH_ON_CPU``
is set, for tests): dequantise W into a temporary in the compute dtype (bitsandbytes'
``dequantize_4bit`` kernel when bitsandbytes is loaded, else the PyTorch decode), one
cuBLAS GEMM writing fp32, free the temporary; the adapter GEMMs in the adapter dtype,
its term added in the fp32 accumulator. That is bitsandbytes' own path (dequantise +
cuBLAS), and it is the baseline a fused Triton kernel (dequantising inside its tiles,
never materialising W) must beat on the GPU before it replaces it. There is no Triton
kernel yet.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# The 16 code values of each 4-bit format, as bitsandbytes defines them (fp32 values,
# written out exactly; ``get_4bit_type`` in bitsandbytes.functional).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
    0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes' gemm_4bit supports only this for the absmax's own blocks

# Tests set this to run the CUDA code path on CPU tensors.
DEVICE_PATH_ON_CPU = False

_code_cache: dict = {}


def code_table(quant_type: str, device) -> Tensor:
    key = (quant_type, str(device))
    t = _code_cache.get(key)
    if t is None:
        t = _code_cache[key] = torch.tensor(CODES[quant_type], dtype=torch.float32, device=device)
    return t


# --------------------------------------------------------------------------- decode


def block_scales(absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
                 offset: Optional[Tensor]) -> Tensor:
    """fp32 scale of every block (double quantisation undone when ``absmax2`` is given)."""
    if absmax2 is None:
        return absmax.reshape(-1).float()
    a = absmax.reshape(-1)
    idx = torch.arange(a.numel(), device=a.device) // NESTED_BLOCKSIZE
    s = code2.float()[a.long()] * absmax2.reshape(-1).float()[idx]
    return s + offset.float() if offset is not None else s


def dequantize_4bit(qweight: Tensor, absmax: Tensor, absmax2: Optional[Tensor],
                    code2: Optional[Tensor], offset: Optional[Tensor], shape, blocksize: int,
                    quant_type: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (N, K) weight in ``dtype``: code value × block scale in fp32, rounded once."""
    n, k = int(shape[0]), int(shape[1])
    numel = n * k
    q = qweight.reshape(-1)
    if q.dtype != torch.uint8:
        q = q.view(torch.uint8)
    nib = torch.stack((q >> 4, q & 0xF), dim=-1).reshape(-1)[:numel]
    vals = code_table(quant_type, q.device)[nib.long()]
    scales = block_scales(absmax, absmax2, code2, offset)
    w = vals * scales.repeat_interleave(blocksize)[:numel]
    return w.reshape(n, k).to(dtype)


def _dequantize_fast(qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, dtype):
    """The device path's dequantisation: on CUDA, bitsandbytes' kernel when it is loaded
    (it is whenever a graph held its ops), else the PyTorch decode: the same numbers.
    Not on CPU: bitsandbytes 0.50.2's CPU kernel decodes wrong scales when K is not a
    multiple of the blocksize (blocks that span rows); the PyTorch decode, like
    bitsandbytes' own default backend, is right there."""
    op = getattr(getattr(torch.ops, "bitsandbytes", None), "dequantize_4bit", None)
    if op is not None and qweight.is_cuda:
        try:
            scales = block_scales(absmax, absmax2, code2, offset)
            q = qweight.reshape(-1, 1)
            return op.default(q, scales, blocksize, quant_type, [int(s) for s in shape], dtype)
        except (RuntimeError, NotImplementedError):
            pass
    return dequantize_4bit(qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type,
                           dtype)


# --------------------------------------------------------------------------- reference


def _up(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None or t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


def _acc(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) \
        else torch.float32


def nf4_linear_reference(x, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type,
                         bias, lora_a, lora_b, scale, x_lora, out_dtype):
    """fp32 (fp64 when an operand is fp64) reference, rounded once: ``(y, h)``; h is an
    empty tensor without an adapter."""
    N, K = int(shape[0]), int(shape[1])
    acc = _acc(x, x_lora, lora_a)
    W = dequantize_4bit(qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, acc)
    x2 = x.reshape(-1, K).to(acc)
    y = x2 @ W.t()
    if bias is not None:
        y = y + bias.to(acc)
    lead = x.shape[:-1]
    if lora_a is None:
        return y.to(out_dtype).reshape(*lead, N), x.new_empty(0)
    h = x_lora.reshape(-1, K).to(acc) @ lora_a.to(acc).t()
    y = y + (h @ lora_b.to(acc).t()) * scale
    return y.to(out_dtype).reshape(*lead, N), h.to(lora_a.dtype).reshape(*lead, lora_a.shape[0])


def nf4_linear_backward_reference(dy, qweight, absmax, absmax2, code2, offset, shape, blocksize,
                                  quant_type, x_dtype, lora_a, lora_b, x_lora, h, scale,
                                  need_dx, need_lora):
    """fp32 reference of ``(dx, dA, dB, dx')``; those not asked for are empty tensors."""
    N, K = int(shape[0]), int(shape[1])
    acc = _acc(dy, x_lora, lora_a)
    dy2 = dy.reshape(-1, N).to(acc)
    lead = dy.shape[:-1]
    dx, dA, dB, dxl = (dy.new_empty(0) for _ in range(4))  # distinct: outputs never alias
    if need_dx:
        W = dequantize_4bit(qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type,
                            acc)
        dx = (dy2 @ W).to(x_dtype).reshape(*lead, K)
        del W
    if need_lora:
        g = (dy2 @ lora_b.to(acc)) * scale
        xl2 = x_lora.reshape(-1, K).to(acc)
        dxl = (g @ lora_a.to(acc)).to(x_lora.dtype).reshape(x_lora.shape)
        dA = (g.t() @ xl2).to(lora_a.dtype)
        dB = ((dy2.t() @ h.reshape(-1, lora_a.shape[0]).to(acc)) * scale).to(lora_b.dtype)
    return dx, dA, dB, dxl


# --------------------------------------------------------------------------- device path


def _scaled_mm(a, b, scale):
    """``scale · a @ b`` rounded once (the GEMM's alpha)."""
    if scale == 1.0:
        return a @ b
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return torch.addmm(out, a, b, beta=0, alpha=scale)


def _mm_fp32(a, b):
    """``a @ b`` accumulated in fp32 and written in fp32 (cuBLAS's out_dtype on CUDA)."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # CPU stand-in with the same numbers


def _forward_device(x, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type,
                    bias, lora_a, lora_b, scale, x_lora, out_dtype):
    N, K = int(shape[0]), int(shape[1])
    W = _dequantize_fast(qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type,
                         x.dtype)
    y = _mm_fp32(x.reshape(-1, K), W.t())
    del W  # the temporary dequantised weight lives only for this GEMM
    lead = x.shape[:-1]
    h = x.new_empty(0)
    if lora_a is not None:
        h = x_lora.reshape(-1, K) @ lora_a.t()
        y.addmm_(h.to(y.dtype), lora_b.t().to(y.dtype), alpha=scale)
        h = h.reshape(*lead, lora_a.shape[0])
    if bias is not None:
        y += bias
    return y.to(out_dtype).reshape(*lead, N), h


def _backward_device(dy, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type,
                     x_dtype, lora_a, lora_b, x_lora, h, scale, need_dx, need_lora):
    N, K = int(shape[0]), int(shape[1])
    dy2 = dy.reshape(-1, N)
    lead = dy.shape[:-1]
    dx, dA, dB, dxl = (dy.new_empty(0) for _ in range(4))  # distinct: outputs never alias
    if need_dx:
        W = _dequantize_fast(qweight, absmax, absmax2, code2, offset, shape, blocksize,
                             quant_type, x_dtype)
        dx = (dy2.to(x_dtype) @ W).reshape(*lead, K)
        del W
    if need_lora:
        adt = lora_a.dtype
        dya = dy2.to(adt)
        g = dya @ lora_b  # unscaled: s rides on each consumer GEMM's alpha
        dxl = _scaled_mm(g, lora_a, scale).to(x_lora.dtype).reshape(x_lora.shape)
        dA = _scaled_mm(g.t(), x_lora.reshape(-1, K).to(adt), scale)
        dB = _scaled_mm(dya.t(), h.reshape(-1, lora_a.shape[0]), scale).to(lora_b.dtype)
    return dx, dA, dB, dxl


def _exact(t: Tensor) -> bool:
    return not t.is_cuda and not DEVICE_PATH_ON_CPU


# --------------------------------------------------------------------------- ops


@torch.library.custom_op("lorafuse::nf4_linear", mutates_args=())
def nf4_linear_op(
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    offset: Optional[Tensor],
    shape: list[int],
    blocksize: int,
    quant_type: str,
    bias: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    scale: float,
    x_lora: Optional[Tensor],
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, h)``: h = x' Aᵀ kept for the backward (empty without an adapter)."""
    impl = nf4_linear_reference if _exact(x) else _forward_device
    y, h = impl(x, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, bias,
                lora_a, lora_b, scale, x_lora, out_dtype)
    return y.contiguous(), h.contiguous()


@nf4_linear_op.register_fake
def _(x, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, bias, lora_a,
      lora_b, scale, x_lora, out_dtype):
    lead = x.shape[:-1]
    y = x.new_empty(*lead, shape[0], dtype=out_dtype)
    if lora_a is None:
        return y, x.new_empty(0)
    return y, x_lora.new_empty(*lead, lora_a.shape[0], dtype=lora_a.dtype)


@torch.library.custom_op("lorafuse::nf4_linear_backward", mutates_args=())
def nf4_linear_backward_op(
    dy: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    offset: Optional[Tensor],
    shape: list[int],
    blocksize: int,
    quant_type: str,
    x_dtype: torch.dtype,
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    x_lora: Optional[Tensor],
    h: Tensor,
    scale: float,
    need_dx: bool,
    need_lora: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dA, dB, dx')``; those not asked for are empty."""
    impl = nf4_linear_backward_reference if _exact(dy) else _backward_device
    outs = impl(dy, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type,
                x_dtype, lora_a, lora_b, x_lora, h, scale, need_dx, need_lora)
    return tuple(t.contiguous() for t in outs)


@nf4_linear_backward_op.register_fake
def _(dy, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, x_dtype, lora_a,
      lora_b, x_lora, h, scale, need_dx, need_lora):
    lead = dy.shape[:-1]
    dx = dy.new_empty(*lead, shape[1], dtype=x_dtype) if need_dx else dy.new_empty(0)
    if not need_lora:
        return dx, dy.new_empty(0), dy.new_empty(0), dy.new_empty(0)
    return dx, torch.empty_like(lora_a), torch.empty_like(lora_b), x_lora.new_empty(x_lora.shape)


_X, _BIAS, _A, _B, _XL = 0, 9, 10, 11, 13  # positions in nf4_linear_op's inputs


def _setup_context(ctx, inputs, output):
    (x, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, bias, lora_a,
     lora_b, scale, x_lora, out_dtype) = inputs
    ctx.meta = (list(shape), blocksize, quant_type, x.dtype, scale)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.has_lora = lora_a is not None
    # The packed weight and its quant state, not a dequantised copy; not x either.
    ctx.save_for_backward(qweight, absmax, absmax2, code2, offset, lora_a, lora_b, x_lora,
                          output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dh):
    qweight, absmax, absmax2, code2, offset, lora_a, lora_b, x_lora, h = ctx.saved_tensors
    shape, blocksize, quant_type, x_dtype, scale = ctx.meta
    need = ctx.needs_input_grad
    need_dx = bool(need[_X])
    need_lora = ctx.has_lora and bool(need[_A] or need[_B] or need[_XL])
    grads = [None] * 15
    if need_dx or need_lora:
        dx, dA, dB, dxl = nf4_linear_backward_op(
            dy, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, x_dtype,
            lora_a, lora_b, x_lora, h, scale, need_dx, need_lora)
        if need_dx:
            grads[_X] = dx
        if need_lora:
            grads[_A], grads[_B] = (dA if need[_A] else None), (dB if need[_B] else None)
            grads[_XL] = dxl if need[_XL] else None
    if ctx.has_bias and need[_BIAS]:
        grads[_BIAS] = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return tuple(grads)


nf4_linear_op.register_autograd(_backward, setup_context=_setup_context)


def nf4_linear(x, qweight, absmax, shape, blocksize, quant_type, *, absmax2=None, code2=None,
               offset=None, bias=None, lora_a=None, lora_b=None, scale=1.0, x_lora=None,
               out_dtype=None):
    """``x Wᵀ + b (+ s · (x' Aᵀ) Bᵀ)`` from the packed 4-bit weight; x' defaults to x cast
    to the adapter's dtype."""
    if lora_a is not None and x_lora is None:
        x_lora = x.to(lora_a.dtype)
    return nf4_linear_op(x, qweight, absmax, absmax2, code2, offset, [int(s) for s in shape],
                         int(blocksize), quant_type, bias, lora_a, lora_b, float(scale), x_lora,
                         out_dtype or x.dtype)[0]


def from_quant_state(qs):
    """``nf4_linear`` keyword arguments from a bitsandbytes ``QuantState``."""
    kw = dict(absmax=qs.absmax, shape=list(qs.shape), blocksize=qs.blocksize,
              quant_type=qs.quant_type)
    if qs.nested:
        kw.update(absmax2=qs.state2.absmax, code2=qs.state2.code, offset=qs.offset)
    return kw
