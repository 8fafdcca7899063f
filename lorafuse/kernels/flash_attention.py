"""Flash attention with the eager chain's extras: ``lorafuse::flash_attention``.

What it computes (Gemma2's ``eager_attention_forward``, with GQA and its masks), per batch
b, query head h, query i, with ``G = H / Hkv`` query heads per K/V head (head h reads K/V
head h // G, transformers' ``repeat_kv`` order)::

    s_ij = scale · q_i · k_j                                 (fp32)
    s_ij = c · tanh(s_ij / c)                                (softcap c, optional)
    visible(i, j) = [causal: j <= i] and [window w: j > i - w] and [key_mask: key_mask[b, j]]
                    and [key bounds: key_lo[b, i] <= j <= key_hi[b, i]]
    p_ij = softmax_j over visible j of s_ij
    out_i = Σ_j p_ij v_j

Causal is top-left (SDPA's ``is_causal``; HF's training masks have Lq = Lkv). The window
is Gemma2's (transformers' ``sliding_window_overlay``: a query sees ``i - w < j <= i``) and
needs ``causal``. A query with no visible key (with a ``key_mask`` or key bounds, or a
window and Lq >= Lkv + w) gets what the eager chain gives with its additive ``finfo.min``
mask: every score plus ``min`` rounds to ``min``, so the softmax is uniform over **all** Lkv keys;
forward and backward reproduce that (the reference path literally does it).

Forward (FlashAttention-2): per block of queries, K/V blocks stream through an online
softmax (running max m, running sum l, fp32 accumulator rescaled by exp(m_old − m_new)),
so no Lq × Lkv matrix exists; blocks wholly outside the causal/window band are skipped.
With key bounds (int32 (B, Lq), inclusive: HF's padding / packed-document / window masks
as per-query ranges, ``kernels/attention.py``'s ``mask_key_ranges``), a query block visits
only the K/V blocks between its rows' smallest lo and largest hi (all of them when one of
its rows sees no key), in the forward and the dq kernel; the dk/dv kernel skips the query
blocks none of whose rows sees its key block (a row that sees no key sees every block).
The key-bounds path is tested under the Triton interpreter only: not compiled or measured
on the GPU yet.
It saves ``lse_i = m_i + log l_i`` (natural log, fp32; +inf marks a row with no visible
key). Backward recomputes p_ij = exp(s_ij − lse_i) block by block; with
D_i = Σ_d dout_id · out_id:

    dv_j = Σ_i p_ij dout_i           dp_ij = dout_i · v_j
    ds_ij = p_ij (dp_ij − D_i) · (1 − tanh²(s_raw_ij / c))   (the last factor with softcap)
    dq_i = scale Σ_j ds_ij k_j       dk_j = scale Σ_i ds_ij q_i

One kernel computes dq (per query block), another dk and dv (per K/V block, looping over
the G query heads that share it, so GQA needs no atomics and K/V are never repeated).
As in FlashAttention-2, D_i comes from ``out`` as stored (bf16 in bf16): on rows that see
only a few keys, dq and dk are a small difference of large terms and carry that rounding
(eager computes Σ_j p_ij dp_ij in fp32 there); from ~16 keys on they are closer to fp32
than eager's (tests/test_flash_attention.py).
tanh is computed from ``exp`` (a Taylor series near 0 where ``1 − e^{−2x}`` would cancel):
``tl.math`` has none and libdevice is not in the interpreter; one formula runs everywhere.

Paths: CUDA tensors run the Triton kernels (autotuned block sizes); everything else, and
any case the kernels refuse (dtype not fp16/bf16/fp32, head dim > 256 or K/V head dims
different from q's) runs the PyTorch reference below (the eager math, in fp32), with one
warning. Head dims that are not powers of two are padded inside the kernel (masked loads).
``LORAFUSE_FLASH_ATTENTION_IMPL=auto|torch|triton``; ``triton`` with TRITON_INTERPRET=1
runs the kernels on CPU tensors (tests). Dropout is not supported (the ``eager_attention``
pass only matches p = 0 or eval).

Layouts: ``out`` is (B, H, Lq, D) with the memory of (B, Lq, H, D) — what the model's
``out.transpose(1, 2).contiguous()`` wants, so that copy is free; dq, dk, dv are laid out
like q, k, v.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._dispatch import triton_or_reference
from ._ops import lorafuse_op

try:  # optional: without triton, every tensor takes the PyTorch path (with a warning on CUDA)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

IMPL_ENV = "LORAFUSE_FLASH_ATTENTION_IMPL"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MASKED = torch.finfo(torch.float32).min  # what HF's additive masks put where not visible


# --------------------------------------------------------------------------- reference


def visible_mask(lq: int, lkv: int, causal: bool, window: Optional[int],
                 key_mask: Optional[Tensor], device, key_lo: Optional[Tensor] = None,
                 key_hi: Optional[Tensor] = None) -> Optional[Tensor]:
    """Boolean (B or 1, 1, Lq, Lkv), True = visible; None when every key is visible."""
    allowed = None
    if causal:
        i = torch.arange(lq, device=device)[:, None]
        j = torch.arange(lkv, device=device)[None, :]
        allowed = j <= i
        if window is not None:
            allowed = allowed & (j > i - window)
        allowed = allowed[None, None]
    if key_mask is not None:
        km = key_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        allowed = km if allowed is None else allowed & km
    if key_lo is not None:
        j = torch.arange(lkv, device=device)
        lo = key_lo.to(device=device, dtype=torch.long)[:, None, :, None]
        hi = key_hi.to(device=device, dtype=torch.long)[:, None, :, None]
        kb = (j >= lo) & (j <= hi)
        allowed = kb if allowed is None else allowed & kb
    return allowed


def _scores(q, k, scale, softcap, G, ct):
    """(raw scores / c or None, capped scores) in ``ct``; K repeated per query head."""
    kf = k.to(ct).repeat_interleave(G, dim=1)
    s = torch.matmul(q.to(ct), kf.transpose(-1, -2)) * scale
    if softcap is None:
        return None, s
    t = torch.tanh(s / softcap)
    return t, t * softcap


def _reference_probs(q, k, key_mask, causal, scale, softcap, window, ct, key_lo=None,
                     key_hi=None):
    """(p, tanh term, visible mask, capped scores): the eager chain's softmax, with its
    additive ``MASKED`` value (so a row with no visible key is uniform, as in eager)."""
    G = q.shape[1] // k.shape[1]
    t, s = _scores(q, k, scale, softcap, G, ct)
    allowed = visible_mask(q.shape[2], k.shape[2], causal, window, key_mask, q.device,
                           key_lo, key_hi)
    logits = s if allowed is None else s.masked_fill(~allowed, MASKED)
    return torch.softmax(logits, dim=-1), t, allowed, s


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)  # fp64 stays fp64 (test oracle)


def _new_out(q: Tensor, v: Tensor) -> Tensor:
    """(B, H, Lq, Dv) with the memory of (B, Lq, H, Dv)."""
    b, h, lq, _ = q.shape
    return q.new_empty((b, lq, h, v.shape[-1])).transpose(1, 2)


def attention_reference(q, k, v, key_mask, causal, scale, softcap, window, key_lo=None,
                        key_hi=None):
    """``(out, lse)`` by the eager math in fp32 (fp64 for fp64 inputs); out in q's dtype."""
    ct = _compute_dtype(q.dtype)
    p, _, allowed, s = _reference_probs(q, k, key_mask, causal, scale, softcap, window, ct,
                                        key_lo, key_hi)
    G = q.shape[1] // k.shape[1]
    o = torch.matmul(p, v.to(ct).repeat_interleave(G, dim=1))
    live = s if allowed is None else s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(live, dim=-1)
    lse = lse.masked_fill(lse == float("-inf"), float("inf")).float()  # no visible key
    return _new_out(q, v).copy_(o), lse.contiguous()


def attention_backward_reference(dout, q, k, v, out, lse, key_mask, causal, scale, softcap,
                                 window, key_lo=None, key_hi=None):
    """``(dq, dk, dv)``: the eager chain's gradients (softmax backward from its own p),
    in fp32, laid out like q, k, v. ``out`` and ``lse`` are not needed here."""
    ct = _compute_dtype(q.dtype)
    b, h, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    G = h // hkv
    p, t, _, _ = _reference_probs(q, k, key_mask, causal, scale, softcap, window, ct, key_lo,
                                  key_hi)
    do = dout.to(ct)
    dp = torch.matmul(do, v.to(ct).repeat_interleave(G, dim=1).transpose(-1, -2))
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    if t is not None:
        ds = ds * (1 - t * t)
    ds = ds * scale
    dq = torch.matmul(ds, k.to(ct).repeat_interleave(G, dim=1))
    dk = torch.matmul(ds.transpose(-1, -2), q.to(ct)).view(b, hkv, G, lkv, d).sum(2)
    dv = torch.matmul(p.transpose(-1, -2), do).view(b, hkv, G, lkv, v.shape[-1]).sum(2)
    return (torch.empty_like(q).copy_(dq), torch.empty_like(k).copy_(dk),
            torch.empty_like(v).copy_(dv))


# --------------------------------------------------------------------------- Triton
#
# VISIT_ALL: some query may see no key (key_mask, or a window past the keys). Then no block
# is skipped and such rows get the uniform average of all Lkv keys (what eager gives).
# HAS_BOUNDS: per-query key bounds key_lo/key_hi (B, Lq). Each query block then visits only
# the K/V blocks in [min lo, max hi] of its rows (clipped to the causal/window band); a block
# with a row that sees no key visits all of them, as VISIT_ALL does (decided at run time, per
# block). BOUNDS_SKIP = HAS_BOUNDS and not VISIT_ALL; DEAD_UNIFORM = HAS_BOUNDS or VISIT_ALL.
# DOT_FP32: the dots run in fp32 ("ieee": no TF32) — fp32 inputs, and bf16 under the
# interpreter, whose bf16 tl.dot is wrong (DESIGN.md). HAND_ROUND: the interpreter casts
# fp32 -> bf16 by truncation; round to nearest even on the bits, as the GPU does.

_INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1)

if triton is not None:
    from .norm import _rne_bf16

    @triton.jit
    def _tanh(x):
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        big = (1.0 - e) / (1.0 + e)
        x2 = a * a  # Taylor to x^11 below 0.3: the next term is < 1e-9 relative there
        small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (
            -17.0 / 315.0 + x2 * (62.0 / 2835.0 + x2 * (-1382.0 / 155925.0))))))
        t = tl.where(a < 0.3, small, big)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def _dot(a, b, DOT_FP32: tl.constexpr):
        if DOT_FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _visible(rows, cols, LQ, LKV, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
        """[rows, cols] bool: in range and inside the causal/window band (no key mask)."""
        ok = (rows[:, None] < LQ) & (cols[None, :] < LKV)
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None])
            if HAS_WINDOW:
                ok = ok & (cols[None, :] > rows[:, None] - window)
        return ok

    @triton.jit
    def _row_bounds(KLO, KHI, b, rows, LQ, LKV, window, CAUSAL: tl.constexpr,
                    HAS_WINDOW: tl.constexpr):
        """Per row: the first and last key it may see, [lo, hi] (its key bounds clipped to
        the keys and the causal/window band), and whether it sees none (rows < LQ only)."""
        live = rows < LQ
        lo = tl.load(KLO + b * LQ + rows, mask=live, other=0)
        hi = tl.load(KHI + b * LQ + rows, mask=live, other=-1)
        lo = tl.maximum(lo, 0)
        hi = tl.minimum(hi, LKV - 1)
        if CAUSAL:
            hi = tl.minimum(hi, rows)
            if HAS_WINDOW:
                lo = tl.maximum(lo, rows - window + 1)
        return lo, hi, live & (lo > hi)

    @triton.jit
    def _block_key_range(r_lo, r_hi, dead, rows, LQ, LKV, BLOCK_N: tl.constexpr):
        """[start, end) of the K/V blocks a query block visits under key bounds: from the
        smallest lo to the largest hi of its rows, start aligned to BLOCK_N; all keys when
        one of its rows sees none."""
        seen = (rows < LQ) & (r_lo <= r_hi)
        start = tl.min(tl.where(seen, r_lo, LKV), 0)
        end = tl.max(tl.where(seen, r_hi, -1), 0) + 1
        any_dead = tl.max(dead.to(tl.int32), 0) > 0
        start = tl.where(any_dead, 0, start // BLOCK_N * BLOCK_N)
        end = tl.where(any_dead, LKV, end)
        return start, end, any_dead

    @triton.jit
    def _fwd_kernel(
        Q, K, V, O, LSE, KM, KLO, KHI,
        sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, skm_b, skm_n,
        H, G, LQ, LKV, HEAD_D, scale, softcap, window,
        CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_KEY_MASK: tl.constexpr, VISIT_ALL: tl.constexpr, HAS_BOUNDS: tl.constexpr,
        BOUNDS_SKIP: tl.constexpr, DEAD_UNIFORM: tl.constexpr, DOT_FP32: tl.constexpr,
        HAND_ROUND: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        hk = (h // G).to(tl.int64)
        h = h.to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_D
        q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_m + offs_d[None, :],
                    mask=(rows < LQ)[:, None] & dmask[None, :], other=0.0)
        k_base = K + b * sk_b + hk * sk_h
        v_base = V + b * sv_b + hk * sv_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        vsum = tl.zeros([BLOCK_D], tl.float32)
        lo = 0
        hi = LKV
        if not VISIT_ALL:  # skip blocks wholly outside the causal / window band
            if CAUSAL:
                hi = tl.minimum(LKV, (pid_m + 1) * BLOCK_M)
                if HAS_WINDOW:
                    lo = tl.maximum(0, pid_m * BLOCK_M - window + 1) // BLOCK_N * BLOCK_N
        r_lo = rows
        r_hi = rows
        any_dead = False
        if HAS_BOUNDS:
            r_lo, r_hi, dead = _row_bounds(KLO, KHI, b, rows, LQ, LKV, window, CAUSAL,
                                           HAS_WINDOW)
            if BOUNDS_SKIP:  # (the band above is a superset of these blocks)
                lo, hi, any_dead = _block_key_range(r_lo, r_hi, dead, rows, LQ, LKV, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = (cols < LKV)[:, None] & dmask[None, :]
            k = tl.load(k_base + cols[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), DOT_FP32) * scale
            if HAS_SOFTCAP:
                s = softcap * _tanh(s / softcap)
            ok = _visible(rows, cols, LQ, LKV, window, CAUSAL, HAS_WINDOW)
            if HAS_KEY_MASK:
                km = tl.load(KM + b * skm_b + cols * skm_n, mask=cols < LKV, other=0)
                ok = ok & (km != 0)[None, :]
            if HAS_BOUNDS:
                ok = ok & (cols[None, :] >= r_lo[:, None]) & (cols[None, :] <= r_hi[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no NaN from -inf - -inf
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
            if DOT_FP32:
                acc = acc * alpha[:, None] + _dot(p, v, DOT_FP32)
            else:
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
            if VISIT_ALL:
                vsum += tl.sum(v.to(tl.float32), 0)
            if BOUNDS_SKIP:
                if any_dead:  # this block visits every key: a dead row's mean of all V
                    vsum += tl.sum(v.to(tl.float32), 0)
            m_i = m_new
        dead = l_i == 0.0
        out = acc / tl.where(dead, 1.0, l_i)[:, None]
        if DEAD_UNIFORM:
            out = tl.where(dead[:, None], (vsum / LKV)[None, :], out)
        lse = tl.where(dead, float("inf"), m_i + tl.log(tl.where(dead, 1.0, l_i)))
        if HAND_ROUND:
            out = _rne_bf16(out)
        tl.store(O + b * so_b + h * so_h + rows[:, None] * so_m + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=(rows < LQ)[:, None] & dmask[None, :])
        tl.store(LSE + bh.to(tl.int64) * LQ + rows, lse, mask=rows < LQ)

    @triton.jit
    def _probs_and_dscores(q, k, v, do, lse, delta, rows, cols, KM, b, skm_b, skm_n,
                           LQ, LKV, scale, softcap, window, r_lo, r_hi,
                           CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                           HAS_WINDOW: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                           HAS_BOUNDS: tl.constexpr, DEAD_UNIFORM: tl.constexpr,
                           DOT_FP32: tl.constexpr):
        """p and ds (times the softcap factor, not yet times scale), [rows, cols]."""
        s = _dot(q, tl.trans(k), DOT_FP32) * scale
        if HAS_SOFTCAP:
            t = _tanh(s / softcap)
            s = softcap * t
        ok = _visible(rows, cols, LQ, LKV, window, CAUSAL, HAS_WINDOW)
        if HAS_KEY_MASK:
            km = tl.load(KM + b * skm_b + cols * skm_n, mask=cols < LKV, other=0)
            ok = ok & (km != 0)[None, :]
        if HAS_BOUNDS:
            ok = ok & (cols[None, :] >= r_lo[:, None]) & (cols[None, :] <= r_hi[:, None])
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        if DEAD_UNIFORM:  # rows with no visible key: uniform over all keys, as in eager
            dead = (lse == float("inf"))[:, None] & (rows < LQ)[:, None] & (cols < LKV)[None, :]
            p = tl.where(dead, 1.0 / LKV, p)
        dp = _dot(do, tl.trans(v), DOT_FP32)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        return p, ds

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, KM, KLO, KHI,
        sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_m,
        sdq_b, sdq_h, sdq_m, skm_b, skm_n,
        H, G, LQ, LKV, HEAD_D, scale, softcap, window,
        CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_KEY_MASK: tl.constexpr, VISIT_ALL: tl.constexpr, HAS_BOUNDS: tl.constexpr,
        BOUNDS_SKIP: tl.constexpr, DEAD_UNIFORM: tl.constexpr, DOT_FP32: tl.constexpr,
        HAND_ROUND: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        hk = (h // G).to(tl.int64)
        h = h.to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_D
        qmask = (rows < LQ)[:, None] & dmask[None, :]
        q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_m + offs_d[None, :],
                    mask=qmask, other=0.0)
        do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_m + offs_d[None, :],
                     mask=qmask, other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * LQ + rows, mask=rows < LQ, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * LQ + rows, mask=rows < LQ, other=0.0)
        k_base = K + b * sk_b + hk * sk_h
        v_base = V + b * sv_b + hk * sv_h
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo = 0
        hi = LKV
        if not VISIT_ALL:
            if CAUSAL:
                hi = tl.minimum(LKV, (pid_m + 1) * BLOCK_M)
                if HAS_WINDOW:
                    lo = tl.maximum(0, pid_m * BLOCK_M - window + 1) // BLOCK_N * BLOCK_N
        r_lo = rows
        r_hi = rows
        if HAS_BOUNDS:
            r_lo, r_hi, dead = _row_bounds(KLO, KHI, b, rows, LQ, LKV, window, CAUSAL,
                                           HAS_WINDOW)
            if BOUNDS_SKIP:
                lo, hi, any_dead = _block_key_range(r_lo, r_hi, dead, rows, LQ, LKV, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = (cols < LKV)[:, None] & dmask[None, :]
            k = tl.load(k_base + cols[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
            p, ds = _probs_and_dscores(q, k, v, do, lse, delta, rows, cols, KM, b, skm_b, skm_n,
                                       LQ, LKV, scale, softcap, window, r_lo, r_hi, CAUSAL,
                                       HAS_SOFTCAP, HAS_WINDOW, HAS_KEY_MASK, HAS_BOUNDS,
                                       DEAD_UNIFORM, DOT_FP32)
            if DOT_FP32:
                dq += _dot(ds, k, DOT_FP32)
            else:
                dq += _dot(ds.to(k.dtype), k, DOT_FP32)
        dq = dq * scale
        if HAND_ROUND:
            dq = _rne_bf16(dq)
        tl.store(DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_m + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=qmask)

    @triton.jit
    def _dkdv_block(dk, dv, k, v, q_base, do_base, LSE, DELTA, KM, bh, b, rows, cols, dmask,
                    offs_d, sq_m, sdo_m, skm_b, skm_n, LQ, LKV, scale, softcap, window,
                    r_lo, r_hi,
                    CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_KEY_MASK: tl.constexpr, HAS_BOUNDS: tl.constexpr,
                    DEAD_UNIFORM: tl.constexpr, DOT_FP32: tl.constexpr):
        """dk, dv plus one query block's share."""
        qmask = (rows < LQ)[:, None] & dmask[None, :]
        q = tl.load(q_base + rows[:, None] * sq_m + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdo_m + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + bh * LQ + rows, mask=rows < LQ, other=0.0)
        delta = tl.load(DELTA + bh * LQ + rows, mask=rows < LQ, other=0.0)
        p, ds = _probs_and_dscores(q, k, v, do, lse, delta, rows, cols, KM, b, skm_b, skm_n,
                                   LQ, LKV, scale, softcap, window, r_lo, r_hi, CAUSAL,
                                   HAS_SOFTCAP, HAS_WINDOW, HAS_KEY_MASK, HAS_BOUNDS,
                                   DEAD_UNIFORM, DOT_FP32)
        if DOT_FP32:
            dv += _dot(tl.trans(p), do, DOT_FP32)
            dk += _dot(tl.trans(ds), q, DOT_FP32)
        else:
            dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, KM, KLO, KHI,
        sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_m,
        sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, skm_b, skm_n,
        H, G, LQ, LKV, HEAD_D, scale, softcap, window,
        CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_KEY_MASK: tl.constexpr, VISIT_ALL: tl.constexpr, HAS_BOUNDS: tl.constexpr,
        BOUNDS_SKIP: tl.constexpr, DEAD_UNIFORM: tl.constexpr, DOT_FP32: tl.constexpr,
        HAND_ROUND: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bhk = tl.program_id(1)
        HKV = H // G
        b = (bhk // HKV).to(tl.int64)
        hk = (bhk % HKV).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_D
        kv_mask = (cols < LKV)[:, None] & dmask[None, :]
        k = tl.load(K + b * sk_b + hk * sk_h + cols[:, None] * sk_n + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * sv_b + hk * sv_h + cols[:, None] * sv_n + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        lo = 0
        hi = LQ
        if not VISIT_ALL:  # the queries that can see this key block
            if CAUSAL:
                lo = pid_n * BLOCK_N // BLOCK_M * BLOCK_M
                if HAS_WINDOW:
                    hi = tl.minimum(LQ, pid_n * BLOCK_N + BLOCK_N - 1 + window)
        if BOUNDS_SKIP:  # a row with no visible key reads every key block: test each block
            lo = 0
            hi = LQ
        first_col = pid_n * BLOCK_N
        last_col = tl.minimum(first_col + BLOCK_N, LKV) - 1
        for g in range(0, G):  # the query heads sharing this K/V head
            h = hk * G + g
            bh = b * H + h
            q_base = Q + b * sq_b + h * sq_h
            do_base = DO + b * sdo_b + h * sdo_h
            for start_m in range(lo, hi, BLOCK_M):
                rows = start_m + offs_m
                if HAS_BOUNDS:
                    r_lo, r_hi, dead = _row_bounds(KLO, KHI, b, rows, LQ, LKV, window, CAUSAL,
                                                   HAS_WINDOW)
                    if BOUNDS_SKIP:  # skip query blocks none of whose rows sees this block
                        hit = dead | ((rows < LQ) & (r_lo <= last_col) & (r_hi >= first_col)
                                      & (r_lo <= r_hi))
                        if tl.max(hit.to(tl.int32), 0) > 0:
                            dk, dv = _dkdv_block(
                                dk, dv, k, v, q_base, do_base, LSE, DELTA, KM, bh, b, rows,
                                cols, dmask, offs_d, sq_m, sdo_m, skm_b, skm_n, LQ, LKV, scale,
                                softcap, window, r_lo, r_hi, CAUSAL, HAS_SOFTCAP, HAS_WINDOW,
                                HAS_KEY_MASK, HAS_BOUNDS, DEAD_UNIFORM, DOT_FP32)
                    else:
                        dk, dv = _dkdv_block(
                            dk, dv, k, v, q_base, do_base, LSE, DELTA, KM, bh, b, rows, cols,
                            dmask, offs_d, sq_m, sdo_m, skm_b, skm_n, LQ, LKV, scale, softcap,
                            window, r_lo, r_hi, CAUSAL, HAS_SOFTCAP, HAS_WINDOW, HAS_KEY_MASK,
                            HAS_BOUNDS, DEAD_UNIFORM, DOT_FP32)
                else:
                    dk, dv = _dkdv_block(
                        dk, dv, k, v, q_base, do_base, LSE, DELTA, KM, bh, b, rows, cols,
                        dmask, offs_d, sq_m, sdo_m, skm_b, skm_n, LQ, LKV, scale, softcap,
                        window, rows, rows, CAUSAL, HAS_SOFTCAP, HAS_WINDOW, HAS_KEY_MASK,
                        HAS_BOUNDS, DEAD_UNIFORM, DOT_FP32)
        dk = dk * scale
        if HAND_ROUND:
            dk = _rne_bf16(dk)
            dv = _rne_bf16(dv)
        tl.store(DK + b * sdk_b + hk * sdk_h + cols[:, None] * sdk_n + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + b * sdv_b + hk * sdv_h + cols[:, None] * sdv_n + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    _INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"

    def _quick_bench(kernel_call, quantiles):
        # The default (25 ms warm-up, 100 ms per config) is long for a first training step.
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    def _configs(pairs):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in pairs]

    _TUNE_KEY = ["BLOCK_D", "CAUSAL", "HAS_SOFTCAP", "HAS_WINDOW", "VISIT_ALL", "HAS_BOUNDS",
                 "DOT_FP32"]
    # (BLOCK_M, BLOCK_N, warps, stages), in one place. Head dim 256 needs the small tiles;
    # configs that do not fit in shared memory are skipped by the autotuner. The last of
    # each list fits fp32 at head dim 256 (an sm_90 compile: 70 / 98 / 102 KB of 227 KB).
    FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2),
                            (128, 64, 4, 2), (64, 64, 4, 2), (32, 32, 4, 1)])
    DQ_CONFIGS = _configs([(64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2),
                           (64, 16, 4, 2), (32, 16, 4, 1)])
    DKDV_CONFIGS = _configs([(32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2),
                             (16, 32, 4, 2), (16, 32, 4, 1)])

    def _fp32_smallest(configs, nargs, **meta):
        # fp32 dots ("ieee") on the H200 (triton 3.6): at head dim 256 the backward's first
        # configs (dq 64 × 32, dkdv 32 × 64, 4 warps, 2 stages) did not finish compiling in
        # 200 s (stuck in Triton's make_llir, faulthandler's stack), where the last,
        # smallest ones compiled and ran in < 10 s (session 7, bench/probe_flash_hang.py;
        # bf16 at the same tiles: 3 s). Until other head dims are probed, fp32 autotunes
        # only the last config of each list: slower kernels, no stuck first step.
        return configs[-1:] if meta.get("DOT_FP32") else configs

    def _tuned(configs, kernel):
        return triton.autotune(configs, key=_TUNE_KEY, do_bench=_quick_bench,
                               prune_configs_by={"early_config_prune": _fp32_smallest})(kernel)

    _fwd_tuned = _tuned(FWD_CONFIGS, _fwd_kernel)
    _dq_tuned = _tuned(DQ_CONFIGS, _bwd_dq_kernel)
    _dkdv_tuned = _tuned(DKDV_CONFIGS, _bwd_dkdv_kernel)
else:  # pragma: no cover
    _INTERPRETED = False


def _check_shapes(q, k, v, key_mask, causal, window, softcap, key_lo=None, key_hi=None):
    """Contract errors (the caller's mistakes, not a kernel limit): ValueError."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (batch, heads, length, head_dim)")
    b, h, _, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[-1] != d:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if k.shape[1] == 0 or h % k.shape[1]:
        raise ValueError(f"{h} query heads are not a multiple of {k.shape[1]} K/V heads")
    if key_mask is not None and (key_mask.dtype != torch.bool
                                 or tuple(key_mask.shape) != (b, k.shape[2])):
        raise ValueError("key_mask must be boolean (batch, key length)")
    if window is not None and (not causal or window < 1):
        raise ValueError("a window needs causal=True and window >= 1")
    if softcap is not None and not softcap > 0:
        raise ValueError("softcap must be > 0")
    if (key_lo is None) != (key_hi is None):
        raise ValueError("key_lo and key_hi go together")
    if key_lo is not None and any(t.dtype != torch.int32 or tuple(t.shape) != (b, q.shape[2])
                                  for t in (key_lo, key_hi)):
        raise ValueError("key_lo and key_hi must be int32 (batch, query length)")


def _has_dead_rows(lq, lkv, causal, window, key_mask) -> bool:
    """Whether some query may see no key: a key mask, or a window that ends before the keys
    (row i sees j in [i - w + 1, min(i, Lkv - 1)]: empty once i >= Lkv + w - 1)."""
    return key_mask is not None or (causal and window is not None and lq >= lkv + window)


def _kernel_args(q, k, v, key_mask, causal, scale, softcap, window, key_lo=None, key_hi=None):
    """Checks what the kernels handle (raises otherwise) and their common arguments: the key
    mask as bytes, the key bounds contiguous, the constexprs, the scalars."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if not _INTERPRETED and not q.is_cuda:
        raise ValueError("needs CUDA tensors (or TRITON_INTERPRET=1)")
    if any(t.dtype not in FLOAT_DTYPES or t.dtype != q.dtype for t in (k, v)) or \
            q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"unsupported dtypes {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[-1]
    if d > MAX_HEAD_DIM or v.shape[-1] != d:
        raise ValueError(f"head dims q/k {d}, v {v.shape[-1]}: the kernel takes equal ones "
                         f"up to {MAX_HEAD_DIM}")
    b, h, lq, _ = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    km = key_mask.view(torch.uint8) if key_mask is not None else None
    bounds = None if key_lo is None else (key_lo.contiguous(), key_hi.contiguous())
    visit_all = _has_dead_rows(lq, lkv, causal, window, key_mask)
    meta = dict(
        CAUSAL=bool(causal), HAS_SOFTCAP=softcap is not None,
        HAS_WINDOW=window is not None, HAS_KEY_MASK=key_mask is not None,
        VISIT_ALL=visit_all, HAS_BOUNDS=bounds is not None,
        BOUNDS_SKIP=bounds is not None and not visit_all,
        DEAD_UNIFORM=bounds is not None or visit_all,
        DOT_FP32=q.dtype == torch.float32 or (_INTERPRETED and q.dtype == torch.bfloat16),
        HAND_ROUND=_INTERPRETED and q.dtype == torch.bfloat16,
        BLOCK_D=max(16, triton.next_power_of_2(d)),  # tl.dot wants >= 16; padded lanes masked
    )
    scalars = (h, h // hkv, lq, lkv, d, float(scale),
               float(softcap) if softcap is not None else 1.0,
               int(window) if window is not None else 0)
    return km, bounds, meta, scalars


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _launch(tuned, raw, grid, args, meta, device):
    if _INTERPRETED:
        raw[grid(_INTERPRETER_BLOCKS)](*args, **meta, **_INTERPRETER_BLOCKS)
    else:
        with torch.cuda.device(device):
            tuned[grid](*args, **meta)


def attention_forward_triton(q, k, v, key_mask, causal, scale, softcap, window, key_lo=None,
                             key_hi=None):
    """Same contract as ``attention_reference``."""
    km, bounds, meta, scalars = _kernel_args(q, k, v, key_mask, causal, scale, softcap, window,
                                             key_lo, key_hi)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, h, lq, _ = q.shape
    out = _new_out(q, v)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or k.shape[2] == 0:
        if k.shape[2] == 0:  # no keys: eager's softmax over nothing, times nothing, is 0
            out.zero_()
            lse.fill_(float("inf"))
        return out, lse
    kmt = km if km is not None else lse  # any pointer: never read without HAS_KEY_MASK
    klo, khi = bounds if bounds is not None else (lse, lse)  # never read without HAS_BOUNDS
    args = (q, k, v, out, lse, kmt, klo, khi,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            km.stride(0) if km is not None else 0, km.stride(1) if km is not None else 0,
            *scalars)

    def grid(m):
        return (triton.cdiv(lq, m["BLOCK_M"]), b * h)

    _launch(_fwd_tuned, _fwd_kernel, grid, args, meta, q.device)
    return out, lse


def attention_backward_triton(dout, q, k, v, out, lse, key_mask, causal, scale, softcap,
                              window, key_lo=None, key_hi=None):
    """Same contract as ``attention_backward_reference``."""
    km, bounds, meta, scalars = _kernel_args(q, k, v, key_mask, causal, scale, softcap, window,
                                             key_lo, key_hi)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout, q, k, v = (_last_dim_contiguous(t) for t in (dout, q, k, v))
    b, h, lq, _ = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    # D_i = dout_i · out_i (FlashAttention-2's preprocessing), fp32, (B, H, Lq) contiguous
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    kmt = km if km is not None else lse
    klo, khi = bounds if bounds is not None else (lse, lse)
    km_strides = (km.stride(0), km.stride(1)) if km is not None else (0, 0)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1),
              dout.stride(2))
    dq_args = (q, k, v, dout, lse, delta, dq, kmt, klo, khi, *common,
               dq.stride(0), dq.stride(1), dq.stride(2), *km_strides, *scalars)
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, kmt, klo, khi, *common,
                 dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1),
                 dv.stride(2), *km_strides, *scalars)
    if dq.stride(-1) != 1 or dk.stride(-1) != 1 or dv.stride(-1) != 1:
        raise ValueError("gradients would not be contiguous in the head dim")

    def dq_grid(m):
        return (triton.cdiv(lq, m["BLOCK_M"]), b * h)

    def dkdv_grid(m):
        return (triton.cdiv(lkv, m["BLOCK_N"]), b * hkv)

    _launch(_dq_tuned, _bwd_dq_kernel, dq_grid, dq_args, meta, q.device)
    _launch(_dkdv_tuned, _bwd_dkdv_kernel, dkdv_grid, dkdv_args, meta, q.device)
    return dq, dk, dv


# --------------------------------------------------------------------------- ops


@lorafuse_op("lorafuse::flash_attention")
def flash_attention_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                       causal: bool, scale: float, softcap: Optional[float],
                       window: Optional[int], key_lo: Optional[Tensor] = None,
                       key_hi: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(out, lse)``; see the module doc. q (B, H, Lq, D), k and v (B, Hkv, Lkv, D),
    key_mask boolean (B, Lkv) or None (True = visible), key_lo/key_hi int32 (B, Lq) or None
    (query i sees keys key_lo[b, i] <= j <= key_hi[b, i], inclusive)."""
    # never index out of bounds
    _check_shapes(q, k, v, key_mask, causal, window, softcap, key_lo, key_hi)
    args = (q, k, v, key_mask, causal, scale, softcap, window, key_lo, key_hi)
    return triton_or_reference(q, IMPL_ENV, "flash attention forward",
                               lambda: attention_forward_triton(*args),
                               lambda: attention_reference(*args))


@flash_attention_op.register_fake
def _(q, k, v, key_mask, causal, scale, softcap, window, key_lo=None, key_hi=None):
    _check_shapes(q, k, v, key_mask, causal, window, softcap, key_lo, key_hi)
    return _new_out(q, v), q.new_empty(q.shape[:3], dtype=torch.float32)


@lorafuse_op("lorafuse::flash_attention_backward")
def flash_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                lse: Tensor, key_mask: Optional[Tensor], causal: bool,
                                scale: float, softcap: Optional[float],
                                window: Optional[int], key_lo: Optional[Tensor] = None,
                                key_hi: Optional[Tensor] = None
                                ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, laid out like q, k, v (dk, dv on the K/V heads: GQA summed)."""
    args = (dout, q, k, v, out, lse, key_mask, causal, scale, softcap, window, key_lo, key_hi)
    return triton_or_reference(q, IMPL_ENV, "flash attention backward",
                               lambda: attention_backward_triton(*args),
                               lambda: attention_backward_reference(*args))


@flash_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, key_mask, causal, scale, softcap, window, key_lo=None,
      key_hi=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, causal, scale, softcap, window, key_lo, key_hi = inputs
    out, lse = output
    ctx.args = (causal, scale, softcap, window)
    ctx.save_for_backward(q, k, v, out, lse, key_mask, key_lo, key_hi)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_mask, key_lo, key_hi = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return (None,) * 10
    dq, dk, dv = flash_attention_backward_op(dout, q, k, v, out, lse, key_mask, *ctx.args,
                                             key_lo, key_hi)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            *(None,) * 7)


flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q, k, v, *, causal=True, scale=None, softcap=None, window=None,
                    key_mask=None, key_lo=None, key_hi=None):
    """Attention of q (B, H, Lq, D) on k, v (B, Hkv, Lkv, D) (see the module doc):
    ``softcap`` (tanh logit cap) and ``window`` (sliding window, with causal) optional,
    ``key_mask`` boolean (B, Lkv), True = visible; ``key_lo``, ``key_hi`` int32 (B, Lq):
    query i sees only keys key_lo[b, i] <= j <= key_hi[b, i]. Returns out (B, H, Lq, D)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    softcap = None if softcap is None or softcap == 0 else float(softcap)
    window = None if window is None else int(window)
    _check_shapes(q, k, v, key_mask, causal, window, softcap, key_lo, key_hi)
    return flash_attention_op(q, k, v, key_mask, bool(causal), float(scale), softcap, window,
                              key_lo, key_hi)[0]

