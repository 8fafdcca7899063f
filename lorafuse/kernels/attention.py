"""Attention whose mask comes from the inputs: causal attention when the mask turns out
causal at run time, the masked call otherwise.

Trainers pass an ``attention_mask`` with every batch, so under tracing transformers builds
SDPA's mask from it (and from ``position_ids``): the graph cannot know whether a batch is
padded. Padded or not, the traced call is ``sdpa(q, repeat_kv(k), repeat_kv(v),
attn_mask=mask)``, which at the 8B shape costs 1.83 ms forward + backward against 0.73 ms
for ``sdpa(q, k, v, is_causal=True, enable_gqa=True)`` (bench/bench_attention.py).

The ops (``passes/masked_attention.py`` and ``passes/eager_attention.py`` insert them):

- ``lorafuse::mask_is_causal(mask)`` → a 0-d bool tensor **on the CPU**: whether the mask
  selects exactly the causal (top-left ``tril``) pattern on every batch and head. One
  device→host read per mask per step (every layer shares the mask), early in the forward.

- ``lorafuse::mask_key_ranges(mask)`` → ``(lo, hi, ok)``: each query's first and last
  visible key (int32 (B, Lq), on the mask's device) and a CPU bool (one host read): every
  query sees exactly that range, and at least one key.
- ``lorafuse::sdpa_causal_ranges_or_masked(q, k, v, mask, use_causal, ranges_ok, lo, hi,
  n_rep, scale, flash)``: the attention of q against K/V with ``n_rep`` query heads per
  K/V head, three ways, chosen by the CPU bools (no sync): ``is_causal=True`` with
  ``enable_gqa`` on the unrepeated K/V where ``use_causal`` holds; else, where ``flash``
  and ``ranges_ok`` and it is the faster for the shape, ``lorafuse::flash_attention`` with
  key bounds lo..hi (unrepeated K/V, K/V blocks outside a query block's ranges skipped);
  else the traced masked call's mask (on the unrepeated K/V on CUDA, on repeated K/V on the
  CPU, as traced). Inserted by ``masked_attention``.
- ``lorafuse::eager_ranges_or_chain(q, k, v, mask, ranges_ok, lo, hi, n_rep, scale,
  softcap)``: an eager chain (Gemma2: softcap) whose mask comes from the inputs: the flash
  op with softcap and key bounds where ``ranges_ok`` and it is the faster for the shape,
  else the chain's own math (``eager_chain``). Inserted by ``eager_attention``.

Under transformers 5.x a left-padded batch's padded queries see no key at all (their rows
are empty): ``ok`` is False and such batches take the masked / chain branch. Right
padding and packed documents (``position_ids`` restarting at 0) are ranges. On CUDA the
flash kernel takes a ranges batch only where it is faster than the other path, forward and
backward, timed at a shape's first ranges batch (``RANGES_PATHS``): on the 8B shape a right-padded
batch on the flash branch trained 9 % slower than an unpadded one on the causal branch
(bench/RESULTS.md, session 12), and the masked SDPA call does no more work on a padded
batch than on an unpadded one.

Both ops return ``(out, lse, path)``: the log-sum-exp their backward uses instead of
recomputing the forward, and how the forward ran, a CPU tensor the backward reads without a
sync (an int8: ``RECOMPUTED``, ``FLASH_BOUNDS`` or, for the SDPA op, ``FUSED + i``). The
flash branch's backward runs the flash backward from the saved output and lse, as SDPA's
own backward does (the output is kept anyway: it is the o_proj input the LoRA op saves).
The SDPA op's causal and masked branches call the kernel public SDPA would pick through its
aten op (``_torch.fused_sdpa_forward``: cuDNN on the H200, flash on the CPU) so that they
keep its lse too; where public SDPA would take another kernel (efficient, math), or in
float64, they call public SDPA and their backward recomputes its forward (lse zeros), as
the eager chain's does. Dropout is not supported (a recompute would draw another mask): the
passes leave such calls alone.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import lorafuse_op


# Elements compared at once by is_causal_mask: a mask is checked by blocks of query rows,
# so the check never holds more than this (bytes: ×1, bool) beside the mask itself. At 8B
# and 16K tokens, comparing the whole mask broadcast over the heads took 8 GiB at compile
# time, 5 GiB above the training step's own peak (session 9's memory history).
ROW_BLOCK_ELEMENTS = 2**26


def mask_rows(mask, r0: int, r1: int):
    """Query rows ``r0:r1`` (dimension -2) of ``mask``, a tensor or an object with
    ``shape`` and ``rows(r0, r1)`` (a mask evaluated by blocks of rows: the attention
    pass's constant masks too large to build whole); a size-1 row dimension broadcasts."""
    if not isinstance(mask, torch.Tensor):
        return mask.rows(r0, r1)
    return mask if mask.dim() < 2 or mask.shape[-2] == 1 else mask[..., r0:r1, :]


def rows_per_block(mask, lkv: int) -> int:
    """How many query rows of ``mask`` (in its own leading sizes, against ``lkv`` keys) one
    block of at most ``ROW_BLOCK_ELEMENTS`` elements holds (at least one)."""
    per_row = lkv
    for size in tuple(mask.shape)[:-2]:
        per_row *= size
    return max(1, ROW_BLOCK_ELEMENTS // max(1, per_row))


def is_causal_mask(mask, q_shape, k_shape) -> bool:
    """Whether ``mask`` (SDPA's ``attn_mask``: boolean, True = attend, or additive float)
    selects exactly what ``is_causal=True`` does for queries ``q_shape`` and keys
    ``k_shape`` (B, H, L, D): top-left ``tril`` on every batch and head. An additive mask
    must be 0 where attended and -inf (or the dtype's lowest) elsewhere. ``mask`` is a
    tensor or a mask evaluated by rows (``mask_rows``); it is compared by blocks of query
    rows in its own shape, never broadcast over the batch and heads."""
    if not (isinstance(mask, torch.Tensor) or hasattr(mask, "rows")) or len(mask.shape) > 4:
        return False
    lq, lkv = q_shape[-2], k_shape[-2]
    full = torch.Size((q_shape[0], q_shape[1], lq, lkv))
    try:
        if torch.broadcast_shapes(tuple(mask.shape), full) != full:
            return False
    except RuntimeError:
        return False
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return False
    lowest = None if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    step = rows_per_block(mask, lkv)
    cols = torch.arange(lkv, device=mask.device)
    ok = torch.ones((), dtype=torch.bool, device=mask.device)
    for r0 in range(0, lq, step):  # one host read at the end, not one per block
        r1 = min(lq, r0 + step)
        m = mask_rows(mask, r0, r1)
        causal = cols <= torch.arange(r0, r1, device=mask.device)[:, None]
        same = m == causal if lowest is None else torch.where(causal, m == 0, m <= lowest)
        ok &= same.all()
    return bool(ok)


def repeat_kv(t: Tensor, n_rep: int) -> Tensor:
    """(B, H, L, D) → (B, H·n, L, D), head h·n + r = head h (transformers' repeat_kv)."""
    if n_rep == 1:
        return t
    b, h, length, d = t.shape
    return t[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def attention_reference(q, k, v, mask, use_causal: bool, n_rep: int, scale):
    """The two branches, in plain SDPA calls (also the op's implementation on any device)."""
    if use_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=n_rep > 1)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep),
                                          attn_mask=mask, scale=scale)


@lorafuse_op("lorafuse::mask_is_causal")
def mask_is_causal_op(mask: Tensor) -> Tensor:
    """0-d bool on the CPU: is ``mask`` ([B, [H,]] Lq, Lkv) the causal pattern everywhere?"""
    if not 2 <= mask.dim() <= 4:
        return torch.tensor(False)
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        # No host read inside a CUDA graph capture, and a replay would repeat whatever
        # branch was captured: take the masked call, which is right for every mask.
        return torch.tensor(False)
    b, h, lq, lkv = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return torch.tensor(is_causal_mask(mask, (b, h, lq, 1), (b, h, lkv, 1)))


@mask_is_causal_op.register_fake
def _(mask):
    return torch.empty((), dtype=torch.bool, device="cpu")


# --------------------------------------------------------------------------- key ranges
# HF's 4-D masks (padding, packed documents, sliding windows) show each query one
# contiguous range of keys, [first, last]. ``lorafuse::mask_key_ranges`` finds those ranges
# on the mask's device and says (one host read) whether they describe the mask exactly;
# then ``lorafuse::flash_attention`` with per-query key bounds computes the attention on
# the unrepeated K/V, skipping the K/V blocks outside each query block's ranges.


def _visible_keys(mask: Tensor):
    """(visible, valid): ``mask`` as booleans, True = attend, and a 0-d device bool that
    says whether an additive mask holds only 0 (attend) and the dtype's lowest or -inf
    (masked), transformers' values; boolean masks are always valid."""
    if mask.dtype == torch.bool:
        return mask, torch.ones((), dtype=torch.bool, device=mask.device)
    visible = mask == 0
    valid = (visible | (mask <= torch.finfo(mask.dtype).min)).all()
    return visible, valid


def key_ranges(mask: Tensor):
    """``(lo, hi, ok)`` on ``mask``'s device (see ``mask_key_ranges_op``); ``ok`` 0-d."""
    b, h, lq, lkv = mask.shape
    dev = mask.device
    if lq == 0 or lkv == 0 or not (mask.dtype == torch.bool or mask.is_floating_point()):
        zeros = torch.zeros((b, lq), dtype=torch.int32, device=dev)
        return zeros, zeros - 1, torch.zeros((), dtype=torch.bool, device=dev)
    visible, ok = _visible_keys(mask)
    if h != 1:  # one range per (batch, query): every head must agree
        ok = ok & (visible == visible[:, :1]).all()
    vis = visible[:, 0]
    count = vis.sum(-1)
    lo = vis.view(torch.uint8).argmax(-1)  # the first visible key (0 for an empty row)
    hi = lo + count - 1
    # one run of visible keys: exactly one False -> True step (counting one before key 0)
    starts = vis[..., 0].to(torch.int64) + (vis[..., 1:] & ~vis[..., :-1]).sum(-1)
    ok = ok & (starts == 1).all()  # also: no empty row
    return lo.to(torch.int32), hi.to(torch.int32), ok


@lorafuse_op("lorafuse::mask_key_ranges")
def mask_key_ranges_op(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(lo, hi, ok)`` of a 4-D mask (B or 1, 1, Lq, Lkv), boolean (True = attend) or
    additive (0 = attend; the dtype's lowest or -inf = masked): lo and hi int32 (B, Lq),
    each query's first and last visible key, on the mask's device; ``ok`` a 0-d bool **on
    the CPU** (one device→host read): every query sees exactly the keys lo..hi, at least
    one, and the additive values are only those two. A head dim > 1 must repeat one mask."""
    if mask.dim() != 4:
        raise ValueError(f"mask_key_ranges takes a 4-D mask, not {mask.dim()}-D")
    lo, hi, ok = key_ranges(mask)
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return lo, hi, torch.tensor(False)  # no host read under capture (mask_is_causal)
    return lo, hi, ok.cpu()


@mask_key_ranges_op.register_fake
def _(mask):
    if mask.dim() != 4:
        raise ValueError(f"mask_key_ranges takes a 4-D mask, not {mask.dim()}-D")
    b, lq = mask.shape[0], mask.shape[2]
    return (mask.new_empty((b, lq), dtype=torch.int32),
            mask.new_empty((b, lq), dtype=torch.int32),
            torch.empty((), dtype=torch.bool, device="cpu"))


def _flash_out_like(q: Tensor, v: Tensor) -> Tensor:
    """(B, H, Lq, Dv) with the memory of (B, Lq, H, Dv): the flash op's output layout, free
    to ``transpose(1, 2).contiguous()`` (what HF does next)."""
    b, h, lq, _ = q.shape
    return q.new_empty((b, lq, h, v.shape[-1])).transpose(1, 2)


def _in_flash_layout(out: Tensor, q: Tensor, v: Tensor) -> Tensor:
    want = _flash_out_like(q, v)
    return out if out.stride() == want.stride() else want.copy_(out)


def _bounds(lo: Tensor, hi: Tensor, batch: int):
    """The key bounds expanded to the batch (a mask may broadcast over it)."""
    return lo.expand(batch, -1), hi.expand(batch, -1)


def _flash_scale(q: Tensor, scale: Optional[float]) -> float:
    return float(scale) if scale is not None else q.shape[-1] ** -0.5  # SDPA's default


def flash_with_bounds(q, k, v, lo, hi, scale, softcap=None):
    """``lorafuse::flash_attention`` (not causal, no window, no key mask) with key bounds."""
    from . import flash_attention  # noqa: F401  (registers the op)

    klo, khi = _bounds(lo, hi, q.shape[0])
    return torch.ops.lorafuse.flash_attention(q, k, v, None, False, scale, softcap, None,
                                              klo, khi)


def flash_with_bounds_backward(dout, q, k, v, out, lse, lo, hi, scale, softcap=None):
    """(dq, dk, dv) of ``flash_with_bounds`` from its saved ``out`` and ``lse``."""
    klo, khi = _bounds(lo, hi, q.shape[0])
    return torch.ops.lorafuse.flash_attention_backward(dout, q, k, v, out, lse, None, False,
                                                       scale, softcap, None, klo, khi)


# (op, q/k/v shapes with batch and length bucketed, dtype, softcap) -> "flash" or "other":
# the faster path for a ranges batch of such shapes on CUDA, timed at the first use of the
# key (forward and backward of each).
RANGES_PATHS: dict = {}


def _ranges_take_flash(what: str, q, k, v, lo, hi, scale: float, softcap, other) -> bool:
    """Whether the flash kernel with key bounds takes this ranges batch: off CUDA always
    (the CPU tests run it, under the Triton interpreter or on its reference), on CUDA where
    it is faster than ``other(dout)`` (the op's other path, forward and backward) for the
    shape. The first batch of a shape decides for the later ones: how much padding it has
    changes the flash kernel's time, not the other path's."""
    return True if not q.is_cuda else faster_is_flash(what, q, k, v, lo, hi, scale, softcap,
                                                      other)


def faster_is_flash(what: str, q, k, v, lo, hi, scale: float, softcap, other,
                    timer=None) -> bool:
    """``_ranges_take_flash``'s timing (cached in ``RANGES_PATHS``): each path forward and
    backward; ``timer`` for tests (default: CUDA events)."""
    from ._dispatch import bucket, pick_fastest, time_ms

    # batch and lengths per power-of-two bucket: with lengths that vary from batch to batch,
    # a few timings, not one per length (each is ≈ 0.1 s of forwards, backwards and heating)
    key = (what, *((bucket(t.shape[0]), t.shape[1], bucket(t.shape[2]), t.shape[3])
                   for t in (q, k, v)), q.dtype, softcap)
    if key in RANGES_PATHS:  # every later step: no allocation, no timing
        return RANGES_PATHS[key] == "flash"
    # ones, not randn: the times do not depend on the values, and drawing would move the
    # RNG that dropout reads after this step's first attention call
    dout = torch.ones_like(_flash_out_like(q, v))

    def flash():
        out, lse = flash_with_bounds(q, k, v, lo, hi, scale, softcap)
        flash_with_bounds_backward(dout, q, k, v, out, lse, lo, hi, scale, softcap)

    def masked():  # last: the one taken inside a CUDA graph capture, right for any mask
        other(dout)

    return pick_fastest(RANGES_PATHS, key, {"flash": flash, "other": masked},
                        f"{what} (ranges batch)", timer=timer or time_ms) == "flash"


def _no_lse(q: Tensor) -> Tensor:
    """The lse output of a branch that does not make one (its backward recomputes): zeros,
    so that every call returns the same values (opcheck compares them)."""
    return q.new_zeros(q.shape[:3], dtype=torch.float32)


def _vjp(fn, dout, q, k, v):
    # torch.func.vjp, not autograd.grad: inside a custom op's implementation the autograd
    # dispatch keys are excluded, so tensors would get no grad_fn; functorch's transform
    # levels work there.
    _, vjp = torch.func.vjp(fn, q, k, v)
    return vjp(dout)


# How a branching op ran its forward: a CPU int8 its backward follows. RECOMPUTED: public
# SDPA (or the eager chain), differentiated by running it again in the backward;
# FLASH_BOUNDS: lorafuse's flash kernel with key bounds; FUSED + i (the SDPA op only):
# aten's kernel FUSED_KERNELS[i // 2] (the one public SDPA picks) with its lse kept, on K/V
# repeated to the query heads if i odd.
RECOMPUTED, FLASH_BOUNDS, FUSED = 0, 1, 2
FUSED_KERNELS = ("cudnn", "flash")


def _path(code: int) -> Tensor:
    return torch.tensor(code, dtype=torch.int8)  # on the CPU: read without a sync


def sdpa_forward(q, k, v, mask, causal: bool, n_rep: int, scale):
    """The op's SDPA branches, ``(out, lse, path)``: the causal call on the unrepeated K/V
    (``enable_gqa``, as the attention pass makes it; repeated if the kernel takes no GQA),
    or the masked call, on the unrepeated K/V too on CUDA (cuDNN's GQA: no repeat copies,
    four a layer forward and backward), on the CPU on K/V repeated as the traced call has
    them (the same sums in the backward: session 13's CPU suite saw a fp32 training
    trajectory drift 2.5e-3 with the CPU kernel's own GQA); each through aten's fused
    kernel with its lse where public SDPA would pick cuDNN or flash, else public SDPA itself
    (lse zeros, recomputed in the backward)."""
    from .._torch import fused_sdpa_forward, fused_sdpa_kernel
    from ._dispatch import warn_once

    m = None if causal else mask
    tries = [False] if causal or n_rep == 1 or q.is_cuda else []
    if n_rep > 1:
        tries.append(True)
    for repeated in tries:  # K/V repeated only when tried: two copies a layer otherwise
        k_, v_ = (repeat_kv(k, n_rep), repeat_kv(v, n_rep)) if repeated else (k, v)
        kernel = fused_sdpa_kernel(q, k_, v_, m, causal, scale, n_rep > 1 and not repeated)
        if kernel in FUSED_KERNELS:
            try:
                out, lse = fused_sdpa_forward(kernel, q, k_, v_, m, causal, scale)
            except Exception as e:  # a private op refusing: public SDPA, never a failed step
                warn_once(f"lorafuse: aten's {kernel} attention failed ({type(e).__name__}: "
                          f"{e}); using public SDPA, recomputed in the backward")
                break
            code = FUSED + 2 * FUSED_KERNELS.index(kernel) + int(repeated)
            return out, lse, code
    return attention_reference(q, k, v, mask, causal, n_rep, scale), _no_lse(q), RECOMPUTED


def sdpa_backward(code: int, dout, q, k, v, out, lse, mask, causal: bool, n_rep: int, scale):
    """(dq, dk, dv) of ``sdpa_forward``'s call, which returned ``code``."""
    from ._dispatch import warn_once

    def recomputed():
        return _vjp(lambda q_, k_, v_: attention_reference(q_, k_, v_, mask, causal, n_rep,
                                                           scale), dout, q, k, v)

    if code == RECOMPUTED:
        return recomputed()
    from .._torch import fused_sdpa_backward

    kernel, repeated = FUSED_KERNELS[(code - FUSED) // 2], (code - FUSED) % 2 == 1
    k_, v_ = (repeat_kv(k, n_rep), repeat_kv(v, n_rep)) if repeated else (k, v)
    try:
        dq, dk, dv = fused_sdpa_backward(kernel, dout, q, k_, v_, out, lse,
                                         None if causal else mask, causal, scale)
    except Exception as e:  # as in the forward: recompute through public SDPA instead
        warn_once(f"lorafuse: aten's {kernel} attention backward failed ({type(e).__name__}: "
                  f"{e}); recomputing through public SDPA")
        return recomputed()
    if repeated:  # repeat_kv's backward: sum each K/V head's copies
        b, h, length, d = k.shape
        dk = dk.view(b, h, n_rep, length, d).sum(2)
        dv = dv.view(b, h, n_rep, length, v.shape[-1]).sum(2)
    return dq, dk, dv


@lorafuse_op("lorafuse::sdpa_causal_ranges_or_masked")
def sdpa_causal_ranges_or_masked_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
                                    use_causal: Tensor, ranges_ok: Tensor, key_lo: Tensor,
                                    key_hi: Tensor, n_rep: int, scale: Optional[float],
                                    flash: bool) -> tuple[Tensor, Tensor, Tensor]:
    """SDPA of q on K/V (``n_rep`` query heads per K/V head) under ``mask``, three ways,
    chosen by the CPU bools: causal SDPA on the unrepeated K/V if ``use_causal``; else, if
    ``flash`` and ``ranges_ok`` and the flash kernel is the faster for the shape,
    ``lorafuse::flash_attention`` with the mask's key ranges; else the traced masked SDPA.
    Returns (out in the flash op's layout, lse, path): the log-sum-exp the backward uses
    instead of recomputing the forward (zeros where the branch ran public SDPA, which does
    not return it: that backward recomputes), and how the forward ran (``RECOMPUTED``,
    ``FLASH_BOUNDS``, ``FUSED + i``), a CPU int8."""
    causal = bool(use_causal)

    def masked(dout):  # the masked branch, forward and backward, for the timing
        out, lse, code = sdpa_forward(q, k, v, mask, False, n_rep, scale)
        sdpa_backward(code, dout, q, k, v, out, lse, mask, False, n_rep, scale)

    if not causal and flash and bool(ranges_ok) and _ranges_take_flash(
            "masked attention", q, k, v, key_lo, key_hi, _flash_scale(q, scale), None, masked):
        return (*flash_with_bounds(q, k, v, key_lo, key_hi, _flash_scale(q, scale)),
                _path(FLASH_BOUNDS))
    out, lse, code = sdpa_forward(q, k, v, mask, causal, n_rep, scale)
    return _in_flash_layout(out, q, v), lse, _path(code)


@sdpa_causal_ranges_or_masked_op.register_fake
def _(q, k, v, mask, use_causal, ranges_ok, key_lo, key_hi, n_rep, scale, flash):
    return _flash_out_like(q, v), _no_lse(q), torch.empty((), dtype=torch.int8, device="cpu")


@lorafuse_op("lorafuse::sdpa_causal_ranges_or_masked_backward")
def sdpa_causal_ranges_or_masked_backward_op(
        dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor,
        use_causal: Tensor, path: Tensor, key_lo: Tensor, key_hi: Tensor, n_rep: int,
        scale: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the path the forward took: the flash and fused paths' from their
    saved out and lse, public SDPA's by recomputing its forward."""
    code = int(path)
    if code == FLASH_BOUNDS:
        dq, dk, dv = flash_with_bounds_backward(dout, q, k, v, out, lse, key_lo, key_hi,
                                                _flash_scale(q, scale))
    else:
        dq, dk, dv = sdpa_backward(code, dout, q, k, v, out, lse, mask, bool(use_causal),
                                   n_rep, scale)
    return _like(dq, q), _like(dk, k), _like(dv, v)


def _like(grad: Tensor, t: Tensor) -> Tensor:
    """``grad`` laid out as ``torch.empty_like(t)`` (the fake's promise): cuDNN's gradients
    already are. Making them contiguous was three of the five copies a layer in session 13's
    8B profile (6.3 ms a step for all five; dropping these three gained nothing measurable
    end to end)."""
    want = torch.empty_like(t)
    return grad if grad.stride() == want.stride() else want.copy_(grad)


@sdpa_causal_ranges_or_masked_backward_op.register_fake
def _(dout, q, k, v, out, lse, mask, use_causal, path, key_lo, key_hi, n_rep, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _ranges_setup_context(ctx, inputs, output):
    q, k, v, mask, use_causal, ranges_ok, key_lo, key_hi, n_rep, scale, flash = inputs
    out, lse, path = output
    ctx.n_rep, ctx.scale = n_rep, scale
    ctx.save_for_backward(q, k, v, out, lse, mask, use_causal, path, key_lo, key_hi)
    ctx.mark_non_differentiable(lse, path)


def _ranges_backward(ctx, dout, _dlse, _dpath):
    q, k, v, out, lse, mask, use_causal, path, key_lo, key_hi = ctx.saved_tensors
    dq, dk, dv = sdpa_causal_ranges_or_masked_backward_op(
        dout, q, k, v, out, lse, mask, use_causal, path, key_lo, key_hi, ctx.n_rep,
        ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None, None, None


sdpa_causal_ranges_or_masked_op.register_autograd(_ranges_backward,
                                                  setup_context=_ranges_setup_context)


def eager_chain(q, k, v, mask, n_rep: int, scale: float, softcap: Optional[float]):
    """transformers' ``eager_attention_forward`` (Gemma2's), as the eager chain computes it:
    scores in q's dtype, the softcap, ``+ mask``, softmax in fp32 cast back, times V."""
    s = torch.matmul(q, repeat_kv(k, n_rep).transpose(2, 3)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s + mask
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, repeat_kv(v, n_rep))


@lorafuse_op("lorafuse::eager_ranges_or_chain")
def eager_ranges_or_chain_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
                             ranges_ok: Tensor, key_lo: Tensor, key_hi: Tensor, n_rep: int,
                             scale: float, softcap: Optional[float]
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """An eager attention chain with an additive ``mask`` from the inputs: the flash op with
    the softcap and the mask's key ranges where ``ranges_ok`` (a CPU bool) and it is the
    faster for the shape, else the chain's own math (``eager_chain``). Returns (out in the
    flash op's layout, lse, path), as ``sdpa_causal_ranges_or_masked`` does (lse
    zeros on the chain's branch)."""
    def chain(q_, k_, v_):
        return eager_chain(q_, k_, v_, mask, n_rep, scale, softcap)

    def chain_fwd_bwd(dout):  # the chain branch for the timing: forward, then recomputed
        chain(q, k, v)
        _vjp(chain, dout, q, k, v)

    if bool(ranges_ok) and _ranges_take_flash("eager attention", q, k, v, key_lo, key_hi,
                                              scale, softcap, chain_fwd_bwd):
        return (*flash_with_bounds(q, k, v, key_lo, key_hi, scale, softcap),
                _path(FLASH_BOUNDS))
    return _in_flash_layout(chain(q, k, v), q, v), _no_lse(q), _path(RECOMPUTED)


@eager_ranges_or_chain_op.register_fake
def _(q, k, v, mask, ranges_ok, key_lo, key_hi, n_rep, scale, softcap):
    return _flash_out_like(q, v), _no_lse(q), torch.empty((), dtype=torch.int8, device="cpu")


@lorafuse_op("lorafuse::eager_ranges_or_chain_backward")
def eager_ranges_or_chain_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                      out: Tensor, lse: Tensor, mask: Tensor,
                                      path: Tensor, key_lo: Tensor, key_hi: Tensor,
                                      n_rep: int, scale: float, softcap: Optional[float]
                                      ) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the branch the forward took: the flash branch's from its saved out
    and lse, the chain's by recomputing it."""
    if int(path) == FLASH_BOUNDS:
        dq, dk, dv = flash_with_bounds_backward(dout, q, k, v, out, lse, key_lo, key_hi,
                                                scale, softcap)
    else:
        dq, dk, dv = _vjp(lambda q_, k_, v_: eager_chain(q_, k_, v_, mask, n_rep, scale,
                                                         softcap), dout, q, k, v)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@eager_ranges_or_chain_backward_op.register_fake
def _(dout, q, k, v, out, lse, mask, path, key_lo, key_hi, n_rep, scale, softcap):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _eager_setup_context(ctx, inputs, output):
    q, k, v, mask, ranges_ok, key_lo, key_hi, n_rep, scale, softcap = inputs
    out, lse, path = output
    ctx.args = (n_rep, scale, softcap)
    ctx.save_for_backward(q, k, v, out, lse, mask, path, key_lo, key_hi)
    ctx.mark_non_differentiable(lse, path)


def _eager_backward(ctx, dout, _dlse, _dpath):
    q, k, v, out, lse, mask, path, key_lo, key_hi = ctx.saved_tensors
    dq, dk, dv = eager_ranges_or_chain_backward_op(dout, q, k, v, out, lse, mask, path,
                                                   key_lo, key_hi, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


eager_ranges_or_chain_op.register_autograd(_eager_backward, setup_context=_eager_setup_context)
