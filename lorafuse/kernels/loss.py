"""Fused lm_head + cross-entropy: ``CE(softcap(hidden Wᵀ), labels)`` in chunks of rows,
so the full (tokens × vocab) fp32 logits, their log-softmax and their gradient never
exist at once.

Shapes: ``hidden`` (..., H) with N rows in all; ``weight`` W (V, H) (the lm_head, any
strides); ``labels`` (N,) integer, ``ignore_index`` marks rows left out. ``softcap`` c
(Gemma2's final_logit_softcapping) or None: z = c · tanh(x / c) with x = hidden Wᵀ.

Semantics are ``F.cross_entropy(z.float().view(-1, V), labels, ignore_index=...,
reduction=...)`` exactly: "mean" divides the sum over the rows kept by their count (all
rows ignored: 0/0 = nan, every gradient 0, as PyTorch gives); "sum" is the plain sum
(transformers then divides by ``num_items_in_batch`` outside; the graph keeps that
division). Gradients: with p = softmax(z) per row and e_y the label's one-hot,
    dz = (p − e_y) · s_row            s_row = 1/n_kept (mean) or 1 (sum); 0 if ignored
    dx = dz · (1 − tanh²(x/c))        (softcap only)
    dhidden = dx W,   dW = dxᵀ hidden  (dW only when W requires grad: normally frozen)
The forward computes these per chunk while the chunk's logits are at hand, and returns
them (fp32); the backward only scales them by the loss's incoming gradient (a scalar):
one pass over the logits in all, no logits saved.

Precision: logits accumulate in fp32 (bf16/fp16 inputs: fp32 GEMM output on CUDA; on
CPU everything is upcast, fp32 math) and the softmax/log-sum-exp is fp32, as
transformers' ``logits.float()`` does. On CUDA with bf16/fp16 inputs, dx is rounded to
the input dtype for the dhidden/dW GEMMs (as eager's bf16 linear backward does) and those
GEMMs accumulate and write fp32; dhidden is rounded to the input dtype once, after the
scaling in the backward.

The logits as a tensor (``return_logits``): Hugging Face models return the logits next
to the loss, so in a compiled whole model they are a graph output. The op then also
writes each chunk's z (softcapped) in the compute dtype into an (..., V) output: the
user gets the same logits as eager (from the same fp32 accumulator, rounded once) with no
second lm_head GEMM. That output is differentiable: a gradient arriving for it (the user
built something else on the logits) is honoured in the backward by recomputing each
chunk's x (hidden and W are then saved, as eager's linear saves them). Autograd hands the
compiled backward a zero tensor for an output nobody used; the backward checks for that
(on CUDA one ``.any()`` host sync per step, skipped under CUDA graph capture where the
extra GEMM just runs) and then skips the extra GEMMs.

Implementation: per chunk, a cuBLAS GEMM with fp32 output, then the elementwise part
(softcap, log-sum-exp, the label's logit, the gradient) in one of two ways:
- PyTorch (CPU tensors, ``LORAFUSE_LOSS_IMPL=torch``, or after the kernel failed): fp32
  ops in place on the chunk's buffer
  (logsumexp, exp, one scatter for the label, scaling, the cast for the GEMMs): about ten
  passes over the chunk's fp32 logits (≈ 22 GB a step at the 8B shape).
- Triton (the default on CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 with
  ``LORAFUSE_LOSS_IMPL=triton``):
  one program per row reads the row once for an online log-sum-exp (and writes the
  returned logits, if any), and once more to write the gradient straight in the GEMMs'
  dtype: about three passes. On the H200 at the 8B head (bench_loss.py, session 31):
  15.1 ms forward + backward against the PyTorch rows' 20.8, and the whole 8B step 2.9 %
  faster (bench/RESULTS.md). A kernel error falls back to PyTorch for the rest of the
  process (warned once).
Chunk rows: so that one (rows × V) fp32 buffer is at most ``LORAFUSE_LOSS_CHUNK_MB`` MiB
(default 256; temporaries of the softcap and the logsumexp add up to two more such
buffers on the PyTorch path).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ._dispatch import on_device, use_triton, warn_once
from ._ops import lorafuse_op

try:  # optional: without triton every chunk takes the PyTorch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

CHUNK_ENV = "LORAFUSE_LOSS_CHUNK_MB"
IMPL_ENV = "LORAFUSE_LOSS_IMPL"
# Tests set this to force many small chunks (rows per chunk; None: from the byte budget).
CHUNK_ROWS: Optional[int] = None
# Tests set this to run the CUDA code path (GEMM operands in the compute dtype, fp32
# output) on CPU tensors.
DEVICE_PATH_ON_CPU = False


def _exact(t: Tensor) -> bool:
    """CPU: upcast everything, fp32 math throughout (the reference's numbers)."""
    return not t.is_cuda and not DEVICE_PATH_ON_CPU


def chunk_rows(n_rows: int, vocab: int) -> int:
    if CHUNK_ROWS is not None:
        return max(1, int(CHUNK_ROWS))
    try:
        budget = float(os.environ.get(CHUNK_ENV, "256")) * 2**20
    except ValueError:
        budget = 256 * 2**20
    return max(1, min(max(n_rows, 1), int(budget // (4 * max(vocab, 1)))))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- reference


def linear_cross_entropy_reference(hidden, weight, labels, softcap=None, ignore_index=-100,
                                   reduction="mean", num_items_in_batch=None):
    """The oracle: full logits in fp32 (fp64 stays fp64), softcap, ``F.cross_entropy``;
    differentiable by autograd. Returns ``(loss, logits)``."""
    acc = _acc_dtype(hidden.dtype)
    logits = hidden.to(acc) @ weight.to(acc).t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, weight.shape[0]), labels.reshape(-1), ignore_index=ignore_index,
        reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss, logits


# --------------------------------------------------------------------------- chunked path


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``a @ b`` accumulated and written in ``acc`` (fp32): operands already in acc, or
    bf16/fp16 on CUDA (``mm(..., out_dtype=)``; if that overload is missing, the product
    is rounded to the input dtype first, as eager's linear does)."""
    if a.dtype == acc:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=acc)
    except (RuntimeError, TypeError, NotImplementedError) as e:
        warn_once(f"lorafuse: mm(out_dtype={acc}) unavailable ({type(e).__name__}); the loss "
                  "op's logits are rounded to the input dtype first, as eager's")
        return (a @ b).to(acc)


# --------------------------------------------------------------------------- Triton rows
#
# Under the Triton interpreter fp32 -> bf16 casts truncate; the GPU rounds to nearest
# even. HAND_ROUND rounds on the bits there, so the interpreter computes what the GPU does.

_MAX_BLOCK = 4096  # fp32 columns of one tile (16 KiB)

if triton is not None:
    from .flash_attention import _tanh
    from .norm import _rne_bf16

    @triton.jit
    def _ce_rows_kernel(
        z_ptr, label_ptr, scale_ptr, loss_ptr, g_ptr, logits_ptr,
        V, stride_z, stride_g, stride_logits, cap,
        HAS_CAP: tl.constexpr, NEED_GRAD: tl.constexpr, WRITE_LOGITS: tl.constexpr,
        HAND_ROUND: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Row r of a chunk: x = z[r] (fp32, the GEMM's output), zz = cap·tanh(x/cap) or x;
        loss[r] = lse(zz) − zz[label] where scale[r] ≠ 0 (kept rows), else 0; with
        NEED_GRAD g[r] = (softmax(zz) − onehot(label)) · scale[r] (· (1 − tanh²) under
        the cap), in g's dtype; with WRITE_LOGITS logits[r] = zz in logits' dtype."""
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(label_ptr + row)
        scale = tl.load(scale_ptr + row)
        cols = tl.arange(0, BLOCK)
        z_row = z_ptr + row * stride_z
        m = tl.full([BLOCK], float("-inf"), tl.float32)  # per-lane running max and sum
        acc = tl.zeros([BLOCK], tl.float32)
        picked = tl.zeros([BLOCK], tl.float32)
        for v0 in range(0, V, BLOCK):
            c = v0 + cols
            mask = c < V
            x = tl.load(z_row + c, mask=mask, other=0.0)
            if HAS_CAP:
                x = cap * _tanh(x / cap)
            if WRITE_LOGITS:
                lz = x
                if HAND_ROUND:
                    lz = _rne_bf16(lz)
                tl.store(logits_ptr + row * stride_logits + c,
                         lz.to(logits_ptr.dtype.element_ty), mask=mask)
            x = tl.where(mask, x, float("-inf"))
            m_new = tl.maximum(m, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) − (-inf)
            acc = acc * tl.exp(m - m_safe) + tl.exp(x - m_safe)
            m = m_new
            picked += tl.where(c == label, x, 0.0)
        row_max = tl.max(m, axis=0)
        lse = row_max + tl.log(tl.sum(acc * tl.exp(m - row_max), axis=0))
        tl.store(loss_ptr + row, tl.where(scale != 0.0, lse - tl.sum(picked, axis=0), 0.0))
        if NEED_GRAD:
            for v0 in range(0, V, BLOCK):
                c = v0 + cols
                mask = c < V
                x = tl.load(z_row + c, mask=mask, other=0.0)
                if HAS_CAP:
                    t = _tanh(x / cap)
                    x = cap * t
                p = tl.exp(x - lse)
                p = tl.where(c == label, p - 1.0, p) * scale
                if HAS_CAP:
                    p = p * (1.0 - t * t)
                if HAND_ROUND:
                    p = _rne_bf16(p)
                tl.store(g_ptr + row * stride_g + c, p.to(g_ptr.dtype.element_ty), mask=mask)


_INTERPRETED = triton is not None and type(_ce_rows_kernel).__name__ == "InterpretedFunction"
# Set when the kernel raised: the process keeps the PyTorch rows from then on (a kernel that
# failed to compile would otherwise be compiled again, and fail again, at every chunk).
_rows_failed = False


def _triton_rows_wanted(z: Tensor) -> bool:
    """An fp32 chunk on CUDA unless ``LORAFUSE_LOSS_IMPL=torch``; on CPU only under the
    Triton interpreter with ``LORAFUSE_LOSS_IMPL=triton`` (tests); never after the kernel
    has failed in this process."""
    if triton is None or _rows_failed or z.dtype != torch.float32:
        return False
    return use_triton(z, IMPL_ENV)


def _ce_rows_triton(z: Tensor, safe_labels: Tensor, row_scale: Tensor, softcap,
                    g: Optional[Tensor], logits: Optional[Tensor]) -> Tensor:
    """The chunk's per-row losses (fp32); writes ``g`` (the logits' gradient for a loss
    gradient of 1) and ``logits`` where given. ``z`` is left as it was. ``row_scale`` is
    fp32 like ``z`` (the op's accumulation dtype), one contiguous slice per chunk."""
    rows, V = z.shape
    loss = torch.empty(rows, dtype=torch.float32, device=z.device)
    dummy = loss  # a pointer for the outputs not written (never dereferenced)
    block = min(_MAX_BLOCK, triton.next_power_of_2(max(V, 1)))
    with on_device(z):
        _ce_rows_kernel[(rows,)](
            z, safe_labels, row_scale, loss,
            dummy if g is None else g, dummy if logits is None else logits,
            V, z.stride(0), 0 if g is None else g.stride(0),
            0 if logits is None else logits.stride(0), float(softcap or 1.0),
            HAS_CAP=softcap is not None, NEED_GRAD=g is not None,
            WRITE_LOGITS=logits is not None,
            HAND_ROUND=_INTERPRETED and torch.bfloat16 in (
                getattr(g, "dtype", None), getattr(logits, "dtype", None)),
            BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return loss


def _forward_impl(hidden, weight, labels, softcap, ignore_index, reduction, return_logits,
                  need_dhidden, need_dweight):
    H, V = hidden.shape[-1], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    h2 = hidden.reshape(-1, H)
    N = h2.shape[0]
    exact = _exact(hidden)
    w = weight.to(acc) if exact else weight
    if exact:
        h2 = h2.to(acc)
    labels = labels.reshape(-1).to(hidden.device)
    if labels.shape[0] != N:
        raise ValueError(f"linear_cross_entropy: {labels.shape[0]} labels for {N} rows")
    kept = labels != ignore_index
    safe = torch.where(kept, labels, torch.zeros_like(labels))
    n_kept = kept.sum()
    if reduction == "mean":
        # 1/0 = inf when every row is ignored; no row is kept then, so every scale is 0.
        row_scale = torch.where(kept, 1.0 / n_kept.to(acc), torch.zeros((), dtype=acc,
                                                                         device=kept.device))
    else:
        row_scale = kept.to(acc)
    need_grad = need_dhidden or need_dweight

    total = torch.zeros((), dtype=acc, device=hidden.device)
    logits = hidden.new_empty(N, V) if return_logits else hidden.new_empty(0)
    dh = torch.empty(N, H, dtype=acc, device=hidden.device) if need_dhidden else \
        hidden.new_empty(0, dtype=acc)
    dw = torch.zeros(V, H, dtype=acc, device=hidden.device) if need_dweight else \
        hidden.new_empty(0, dtype=acc)
    step = chunk_rows(N, V)
    g_buf = None  # the Triton path's gradient buffer, one chunk's worth, reused
    for s in range(0, N, step):
        e = min(s + step, N)
        hc = h2[s:e]
        # the last chunk's buffers go back before this chunk's are allocated (else two
        # chunks of fp32 logits were live at once: 512 MiB at the 8B shape, at the peak of
        # session 34's 16.7 GiB runs)
        z = t = p = g = None
        z = _mm(hc, w.t(), acc)  # (rows, V) fp32: the only big buffer
        if not exact and _triton_rows_wanted(z):
            if need_grad and g_buf is None:
                g_buf = torch.empty(step, V, dtype=weight.dtype, device=z.device)
            g = None if not need_grad else g_buf[:e - s]
            try:
                rows_loss = _ce_rows_triton(z, safe[s:e], row_scale[s:e], softcap, g,
                                            logits[s:e] if return_logits else None)
            except Exception as err:  # never fail training over the optional kernel
                global _rows_failed
                _rows_failed = True
                warn_once(f"lorafuse: Triton cross-entropy rows failed ({type(err).__name__}: "
                          f"{err}); using PyTorch from now on")
            else:
                total += rows_loss.sum()
                if need_dhidden:
                    dh[s:e] = _mm(g, w, acc)
                if need_dweight:
                    dw += _mm(g.t(), hc, acc)
                continue
        t = None
        if softcap is not None:
            t = z.div_(softcap).tanh_()  # z's buffer now holds tanh(x / c)
            z = t * softcap
        if return_logits:
            logits[s:e].copy_(z)
        lse = torch.logsumexp(z, dim=1)
        picked = z.gather(1, safe[s:e, None]).squeeze(1)
        total += torch.where(kept[s:e], lse - picked, torch.zeros_like(lse)).sum()
        if not need_grad:
            continue
        p = z.sub_(lse[:, None]).exp_()  # softmax, in place
        p.scatter_add_(1, safe[s:e, None], -kept[s:e, None].to(acc))  # − one-hot
        p.mul_(row_scale[s:e, None])
        if t is not None:
            p.mul_(t.mul_(t).neg_().add_(1))  # · (1 − tanh²)
        g = p if exact or p.dtype == weight.dtype else p.to(weight.dtype)
        if need_dhidden:
            dh[s:e] = _mm(g, w, acc)
        if need_dweight:
            dw += _mm(g.t(), hc, acc)
    loss = total / n_kept.to(acc) if reduction == "mean" else total
    lead = hidden.shape[:-1]
    if return_logits:
        logits = logits.reshape(*lead, V)
    if need_dhidden:
        dh = dh.reshape(*lead, H)
    return loss, logits, dh, dw


def _grad_is_zero(g: Optional[Tensor]) -> bool:
    """Whether the logits' incoming gradient is absent or all zeros (what autograd gives
    an output nobody used). Under CUDA graph capture no host sync is allowed: answer
    False (the backward then does the GEMMs, correct either way)."""
    if g is None or g.numel() == 0:
        return True
    if g.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not bool(g.any())


def _logits_backward(g_logits, hidden, weight, softcap, need_dhidden, need_dweight, dh, dw):
    """Adds the logits output's gradient to ``dh`` / ``dw`` (fp32, in place), chunk by
    chunk; x = hidden Wᵀ is recomputed only under a softcap (its derivative needs it)."""
    H, V = hidden.shape[-1], weight.shape[0]
    acc = dh.dtype if need_dhidden else dw.dtype
    exact = _exact(hidden)
    h2 = hidden.reshape(-1, H)
    w = weight.to(acc) if exact else weight
    if exact:
        h2 = h2.to(acc)
    g2 = g_logits.reshape(-1, V)
    dh2 = dh.reshape(-1, H) if need_dhidden else None
    step = chunk_rows(h2.shape[0], V)
    for s in range(0, h2.shape[0], step):
        e = min(s + step, h2.shape[0])
        gx = t = None  # the last chunk's buffers go back first (the forward's comment)
        gx = g2[s:e].to(acc)
        if softcap is not None:
            t = _mm(h2[s:e], w.t(), acc).div_(softcap).tanh_()
            gx = gx * t.mul_(t).neg_().add_(1)
        gx = gx if exact or gx.dtype == weight.dtype else gx.to(weight.dtype)
        if need_dhidden:
            dh2[s:e] += _mm(gx, w, acc)
        if need_dweight:
            dw += _mm(gx.t(), h2[s:e], acc)


# --------------------------------------------------------------------------- ops


@lorafuse_op("lorafuse::linear_cross_entropy")
def linear_cross_entropy_op(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    softcap: Optional[float],
    ignore_index: int,
    reduction: str,
    return_logits: bool,
    need_dhidden: bool,
    need_dweight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss, logits, dhidden, dweight)``: loss a scalar (fp32); logits
    (..., V) in hidden's dtype, or empty unless ``return_logits``; dhidden (..., H) and
    dweight (V, H) in fp32, the gradients for an incoming loss gradient of 1 (empty
    unless asked for). ``need_*`` are decided when the graph is built (a compiled
    forward cannot see requires_grad)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction {reduction!r} (mean or sum)")
    loss, logits, dh, dw = _forward_impl(hidden, weight, labels, softcap, ignore_index,
                                         reduction, return_logits, need_dhidden, need_dweight)
    return loss, logits.contiguous(), dh.contiguous(), dw.contiguous()


@linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, softcap, ignore_index, reduction, return_logits, need_dhidden,
      need_dweight):
    acc = _acc_dtype(hidden.dtype)
    lead, H, V = hidden.shape[:-1], hidden.shape[-1], weight.shape[0]
    def none():  # a fresh empty tensor per output (outputs must not alias)
        return hidden.new_empty(0, dtype=acc)

    return (hidden.new_empty((), dtype=acc),
            hidden.new_empty(*lead, V) if return_logits else hidden.new_empty(0),
            hidden.new_empty(*lead, H, dtype=acc) if need_dhidden else none(),
            hidden.new_empty(V, H, dtype=acc) if need_dweight else none())


@lorafuse_op("lorafuse::linear_cross_entropy_backward")
def linear_cross_entropy_backward_op(
    g_loss: Tensor,
    g_logits: Tensor,
    dh: Tensor,
    dw: Tensor,
    hidden: Tensor,
    weight: Tensor,
    softcap: Optional[float],
    need_dhidden: bool,
    need_dweight: bool,
) -> tuple[Tensor, Tensor]:
    """The backward when the logits were returned: ``g_loss · (dh, dw)`` plus the logits
    output's gradient through the lm_head (skipped when that gradient is zero). Returns
    (dhidden in hidden's dtype, dweight in weight's dtype); empty where not needed."""
    dh = dh * g_loss if need_dhidden else dh
    dw = dw * g_loss if need_dweight else dw
    if not _grad_is_zero(g_logits):
        _logits_backward(g_logits, hidden, weight, softcap, need_dhidden, need_dweight, dh, dw)
    return (dh.to(hidden.dtype) if need_dhidden else hidden.new_empty(0),
            dw.to(weight.dtype) if need_dweight else weight.new_empty(0))


@linear_cross_entropy_backward_op.register_fake
def _(g_loss, g_logits, dh, dw, hidden, weight, softcap, need_dhidden, need_dweight):
    return (torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_dweight else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, softcap, _, _, return_logits, need_dh, need_dw = inputs
    ctx.softcap, ctx.return_logits = softcap, return_logits
    ctx.need_dh, ctx.need_dw = need_dh, need_dw
    ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
    if return_logits:  # a gradient for the logits output is possible: keep the operands
        ctx.save_for_backward(output[2], output[3], hidden, weight)
    else:
        ctx.save_for_backward(output[2], output[3])
        ctx.mark_non_differentiable(output[1])
    ctx.mark_non_differentiable(output[2], output[3])


def _backward(ctx, g_loss, g_logits, _gdh, _gdw):
    need = ctx.needs_input_grad  # hidden, weight, labels, ...
    if ctx.need_dh is False and need[0]:
        raise RuntimeError("lorafuse::linear_cross_entropy: hidden needs a gradient but the "
                           "op was built with need_dhidden=False")
    if ctx.need_dw is False and need[1]:
        raise RuntimeError("lorafuse::linear_cross_entropy: weight needs a gradient but the "
                           "op was built with need_dweight=False")
    if ctx.return_logits:
        dh, dw, hidden, weight = ctx.saved_tensors
        if g_logits is None:
            g_logits = hidden.new_empty(0)
        dhid, dwt = linear_cross_entropy_backward_op(g_loss, g_logits, dh, dw, hidden, weight,
                                                     ctx.softcap, ctx.need_dh, ctx.need_dw)
        return (dhid if need[0] else None, dwt if need[1] else None,
                None, None, None, None, None, None, None)
    dh, dw = ctx.saved_tensors
    dhid = (dh * g_loss).to(ctx.hidden_dtype) if need[0] else None
    dwt = (dw * g_loss).to(ctx.weight_dtype) if need[1] else None
    return dhid, dwt, None, None, None, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden, weight, labels, softcap=None, ignore_index=-100,
                         reduction="mean", num_items_in_batch=None, return_logits=False):
    """``F.cross_entropy(softcap(hidden Wᵀ).float().view(-1, V), labels, ...)`` fused and
    chunked (see the module docstring); ``/ num_items_in_batch`` when given (with
    reduction "sum", as transformers does). Returns the loss, or ``(loss, logits)``."""
    grad = torch.is_grad_enabled()
    loss, logits, _, _ = linear_cross_entropy_op(
        hidden, weight, labels, None if softcap is None else float(softcap), int(ignore_index),
        reduction, bool(return_logits), grad and hidden.requires_grad,
        grad and weight.requires_grad)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return (loss, logits) if return_logits else loss
