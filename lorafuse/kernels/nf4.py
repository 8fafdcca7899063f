"""A bitsandbytes 4-bit linear, with an optional LoRA adapter on top, as one op.

    y = x Wᵀ + b + s · (x' Aᵀ) Bᵀ          W = dequant(packed 4-bit weight, quant state)

``x`` (..., K) is the base layer's input in bitsandbytes' compute dtype (the dtype of
``bnb_4bit_compute_dtype``: bitsandbytes casts its input to it, and the pass keeps that
cast); ``bias`` (N,) is in that dtype too. The adapter has its own dtype (that of
``lora_a``: fp32 for PEFT without autocast, the compute dtype under autocast, where the
pass casts A and B to it): ``lora_a`` A (r, K), ``lora_b`` B (N, r) and
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
    When x' is x (the same tensor, passed twice), dx = g A + dy W in one GEMM chain and
    dx' is not returned separately.
    db  = Σ dy               (only when the bias requires grad: frozen in QLoRA)
Saved for the backward: the packed weight and its quant state (parameters and buffers:
no new memory), A, B, x' and h. Not x: the frozen base needs no weight gradient.

Paths. CPU: the fp32 reference below. CUDA (and CPU tensors when ``DEVICE_PATH_ON_CPU``
is set, for tests): dequantise W into a temporary in the compute dtype (the fastest per
shape, timed once, of the Triton kernel ``triton_dequantize_4bit`` and bitsandbytes'
``dequantize_4bit``; the PyTorch decode only where neither exists), then one GEMM and
free the temporary. When the adapter, the output and x share the compute dtype (autocast),
the GEMM is the bf16 LoRA op's forward (``lora.base_plus_lowrank``: the LoRA term added
in the fp32 accumulator, one rounding); otherwise cuBLAS writes fp32, the adapter term
(adapter dtype) and bias are added there, and y is rounded once to ``out_dtype``.
That is bitsandbytes' own path (dequantise + cuBLAS) with the adapter fused in. The
Triton GEMM below (``triton_nf4_gemm``: W decoded inside its tiles, never materialised)
lost to it at every M measured on the H200 (``bench/bench_nf4_gemm.py``, RESULTS.md:
13-50 × slower at M = 128-4096, and slower than bitsandbytes' gemv at M = 1), so it runs
only when asked for (``LORAFUSE_NF4_IMPL=triton``); it is tested under the Triton
interpreter on CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._dispatch import launch_autotuned, on_device, pick_fastest, requested_impl, warn_once
from .lora import base_plus_lowrank, mm_fp32
from ._ops import lorafuse_op

try:  # optional: the CPU reference and the cuBLAS path need no Triton
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  (missing, or broken on this machine)
    triton = tl = None

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
    key = (quant_type, device)
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


def _block_scales_fast(absmax, absmax2, code2, offset):
    """``block_scales`` on CUDA with bitsandbytes' blockwise kernel when it is loaded (one
    launch, as bitsandbytes does it: code2[absmax] · absmax2 in fp32, then + offset; the
    PyTorch gathers take several launches and int64 index tensors)."""
    op = getattr(getattr(torch.ops, "bitsandbytes", None), "dequantize_blockwise", None)
    if absmax2 is not None and op is not None and absmax.is_cuda:
        try:
            s = op.default(absmax.reshape(-1), absmax2.reshape(-1), code2, NESTED_BLOCKSIZE,
                           torch.float32)
            return s + offset.float() if offset is not None else s
        except (RuntimeError, NotImplementedError) as e:  # same numbers, slower
            warn_once(f"lorafuse: bitsandbytes' dequantize_blockwise failed "
                      f"({type(e).__name__}: {e}); decoding the 4-bit scales in PyTorch")
    return block_scales(absmax, absmax2, code2, offset)


_dequant_choice: dict = {}  # shape key -> the fastest dequantisation path on CUDA


def _dequantize_fast(qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, dtype):
    """The device path's dequantisation. On CUDA, the fastest (timed once per shape) of
    the Triton kernel above and bitsandbytes' kernel (when bitsandbytes is loaded: it is
    whenever a graph held its ops), else the PyTorch decode: all give the same numbers.
    Not on CPU: bitsandbytes 0.50.2's CPU kernel decodes wrong scales when K is not a
    multiple of the blocksize (blocks that span rows); the PyTorch decode, like
    bitsandbytes' own default backend, is right there."""
    if not qweight.is_cuda:
        return dequantize_4bit(qweight, absmax, absmax2, code2, offset, shape, blocksize,
                               quant_type, dtype)
    shape = [int(s) for s in shape]
    key = (tuple(shape), blocksize, quant_type, dtype, qweight.device)
    if _dequant_choice.get(key) == "triton":  # the usual case, before anything is built
        return triton_dequantize_4bit(qweight, absmax, absmax2, code2, offset, shape,
                                      blocksize, quant_type, dtype)
    candidates = {}
    if triton is not None and dtype in _W_DTYPES:
        candidates["triton"] = lambda: triton_dequantize_4bit(
            qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, dtype)
    op = getattr(getattr(torch.ops, "bitsandbytes", None), "dequantize_4bit", None)
    if op is not None:
        candidates["bitsandbytes"] = lambda: op.default(
            qweight.reshape(-1, 1), _block_scales_fast(absmax, absmax2, code2, offset),
            blocksize, quant_type, shape, dtype)
    if not candidates:  # only when nothing faster exists: its temporaries are large
        candidates["torch"] = lambda: dequantize_4bit(qweight, absmax, absmax2, code2, offset,
                                                      shape, blocksize, quant_type, dtype)
    return candidates[pick_fastest(_dequant_choice, key, candidates,
                                   "4-bit dequantisation")]()


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
                                  need_dx, need_lora, combine_dx=False):
    """fp32 reference of ``(dx, dA, dB, dx')``; those not asked for are empty tensors. With
    ``combine_dx`` (x' is x: no dropout, one dtype) dx holds dy W + dx' and dx' is empty."""
    N, K = int(shape[0]), int(shape[1])
    acc = _acc(dy, x_lora, lora_a)
    dy2 = dy.reshape(-1, N).to(acc)
    lead = dy.shape[:-1]
    dx, dA, dB, dxl = (dy.new_empty(0) for _ in range(4))  # distinct: outputs never alias
    dx_acc = None
    if need_dx:
        W = dequantize_4bit(qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type,
                            acc)
        dx_acc = dy2 @ W
        del W
    if need_lora:
        g = (dy2 @ lora_b.to(acc)) * scale
        xl2 = x_lora.reshape(-1, K).to(acc)
        dxl_acc = g @ lora_a.to(acc)
        if _folds_dx(need_dx, need_lora, combine_dx, x_lora, x_dtype):
            dx_acc = dx_acc + dxl_acc
        else:
            dxl = dxl_acc.to(x_lora.dtype).reshape(x_lora.shape)
        dA = (g.t() @ xl2).to(lora_a.dtype)
        dB = ((dy2.t() @ h.reshape(-1, lora_a.shape[0]).to(acc)) * scale).to(lora_b.dtype)
    if dx_acc is not None:
        dx = dx_acc.to(x_dtype).reshape(*lead, K)
    return dx, dA, dB, dxl


# --------------------------------------------------------------------------- Triton
#
# One kernel for both products, with the 4-bit weight decoded inside its tiles:
#     forward  C (M, N) = X (M, K) @ Wᵀ [+ alpha · H (M, r) @ Bᵀ] [+ bias]
#     backward C (M, K) = dY (M, N) @ W                    (TRANS_W)
# A tile of W is decoded from the packed bytes (element e of the row-major (N, K) weight:
# byte e // 2, high nibble when e is even), its code value looked up in the 16-entry table
# and multiplied by its block's fp32 scale (the per-block scales are computed first by
# ``block_scales``: N·K/blocksize floats, which keeps double-quantised scales bit-exact
# with bitsandbytes), then rounded to the compute dtype, as bitsandbytes' dequantize does,
# and fed to tl.dot; everything accumulates in fp32 and C is rounded once. The dequantised
# weight never exists in memory. The LoRA tail (r columns) enters the same accumulator.
# Small M (decoding, short sequences) and large M (training) are served by the autotuned
# tile shapes (BLOCK_M 16 to 128); there is no split-K variant. Measured on the H200, it
# loses to dequantise + cuBLAS at every M (the per-element decode, a gather from the code
# table, costs more than the tensor-core work it feeds): the op uses it only when
# LORAFUSE_NF4_IMPL=triton.
#
# Under the interpreter (TRITON_INTERPRET=1, CPU tensors) tl.dot on bf16 returns garbage
# and fp32 -> bf16 casts truncate (DESIGN.md), so bf16 tiles are rounded to nearest even by
# hand and dotted in fp32 there.

_INTERPRETED = False
if triton is not None:
    NF4_AUTOTUNE_CONFIGS = [
        triton.Config({"BLOCK_M": 16, "BLOCK_P": 64, "BLOCK_Q": 128, "GROUP_M": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_P": 64, "BLOCK_Q": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_P": 128, "BLOCK_Q": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_P": 128, "BLOCK_Q": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_P": 256, "BLOCK_Q": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    ]
    NF4_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 2}

    @triton.jit
    def _round_bf16(x):
        """fp32 → the nearest bf16 value (ties to even), kept in fp32."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit(do_not_specialize=["M_BUCKET"])
    def _nf4_gemm_kernel(
        a_ptr, q_ptr, scale_ptr, code_ptr, h_ptr, lb_ptr, bias_ptr, c_ptr,
        M, P, Q, R, K_W, M_BUCKET,
        stride_am, stride_aq, stride_hm, stride_hr, stride_lbp, stride_lbr, stride_cm, stride_cp,
        alpha,
        TRANS_W: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
        W_DTYPE: tl.constexpr,  # 0: fp32, 1: bf16, 2: fp16 (W is rounded to it)
        INTERPRET: tl.constexpr, ROUND_OUT_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        LOG2_BLOCKSIZE: tl.constexpr,  # blocksizes are powers of two: a shift, not a division
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_p = tl.cdiv(P, BLOCK_P)
        group_size = GROUP_M * num_pid_p
        first_m = (pid // group_size) * GROUP_M
        rows_in_group = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % rows_in_group
        pid_p = (pid % group_size) // rows_in_group

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_m = offs_m < M
        mask_p = offs_p < P
        load_m = offs_m % M  # rows/columns past the end repeat earlier ones, never stored
        load_p = offs_p % P

        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        if HAS_LORA:  # the rank-r tail first (usually one tile), in fp32
            offs_r = tl.arange(0, BLOCK_R)
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + offs_r
                h = tl.load(h_ptr + load_m[:, None] * stride_hm + rr[None, :] * stride_hr,
                            mask=rr[None, :] < R, other=0.0).to(tl.float32)
                lb = tl.load(lb_ptr + rr[:, None] * stride_lbr + load_p[None, :] * stride_lbp,
                             mask=rr[:, None] < R, other=0.0).to(tl.float32)
                acc = tl.dot(h, lb, acc, input_precision="ieee")
            acc = acc * alpha
        if HAS_BIAS:
            acc += tl.load(bias_ptr + load_p).to(tl.float32)[None, :]

        offs_q = tl.arange(0, BLOCK_Q)
        for q0 in range(0, Q, BLOCK_Q):
            qq = q0 + offs_q
            mask_q = qq < Q
            a = tl.load(a_ptr + load_m[:, None] * stride_am + qq[None, :] * stride_aq,
                        mask=mask_q[None, :], other=0.0)
            # element index in the row-major (N, K) weight of the (BLOCK_Q, BLOCK_P) tile
            # (int32: the host checks N·K < 2³¹)
            if TRANS_W:
                e = qq[:, None] * K_W + load_p[None, :]
            else:
                e = load_p[None, :] * K_W + qq[:, None]
            byte = tl.load(q_ptr + (e >> 1), mask=mask_q[:, None], other=0).to(tl.int32)
            nib = tl.where((e & 1) == 0, byte >> 4, byte & 0xF)
            val = tl.load(code_ptr + nib)
            s = tl.load(scale_ptr + (e >> LOG2_BLOCKSIZE), mask=mask_q[:, None], other=0.0)
            w = tl.where(mask_q[:, None], val * s, 0.0)
            if W_DTYPE == 1:
                if INTERPRET:
                    w = _round_bf16(w)
                    a = a.to(tl.float32)
                else:
                    w = w.to(tl.bfloat16)
            elif W_DTYPE == 2:
                w = w.to(tl.float16)
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)

        if ROUND_OUT_BF16:  # the interpreter truncates fp32 -> bf16: round by hand
            acc = _round_bf16(acc)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_p[None, :] * stride_cp
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_p[None, :])

    _INTERPRETED = type(_nf4_gemm_kernel).__name__ == "InterpretedFunction"

    def _nf4_bench(kernel_call, quantiles):
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    _nf4_autotuned = triton.autotune(configs=NF4_AUTOTUNE_CONFIGS,
                                     key=["M_BUCKET", "P", "Q", "R"],
                                     do_bench=_nf4_bench)(_nf4_gemm_kernel)

    @triton.jit
    def _dequant_4bit_kernel(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                             out_ptr, numel, NESTED: tl.constexpr, HAS_OFFSET: tl.constexpr,
                             LOG2_BLOCKSIZE: tl.constexpr, ROUND_BF16: tl.constexpr,
                             ROWS: tl.constexpr):
        """ROWS quantization blocks per program, one block a row: the block's packed bytes
        are read once (contiguous, two elements each) and its fp32 scale once, then each
        nibble's code value × the scale, rounded once to the output dtype, is stored with
        the two nibbles of a byte interleaved (high first): bitsandbytes' dequantize_4bit,
        bit for bit. A double-quantised scale is decoded as bitsandbytes does it
        (code2[absmax] · absmax2, rounded, then + offset, rounded: the launch turns off FMA
        contraction to keep both roundings). Session 21 measured the one-element-a-lane
        kernel this replaces (a byte load and up to three scale gathers per element) at
        ≈ 1.9 TB/s, against ≈ 3.5 TB/s for Unsloth's dequantization in the same step."""
        BLOCKSIZE: tl.constexpr = 1 << LOG2_BLOCKSIZE
        HALF: tl.constexpr = BLOCKSIZE // 2
        blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        nblocks = (numel + BLOCKSIZE - 1) >> LOG2_BLOCKSIZE
        rmask = blk < nblocks
        if NESTED:
            a8 = tl.load(absmax_ptr + blk, mask=rmask, other=0).to(tl.int32)
            s = tl.load(code2_ptr + a8) * tl.load(absmax2_ptr + (blk >> 8), mask=rmask,
                                                  other=0.0)
            if HAS_OFFSET:
                s = s + tl.load(offset_ptr)
        else:
            s = tl.load(absmax_ptr + blk, mask=rmask, other=0.0)
        b = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF) byte index
        byte = tl.load(q_ptr + b, mask=b < (numel + 1) // 2, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4)) * s[:, None]
        lo = tl.load(code_ptr + (byte & 0xF)) * s[:, None]
        w = tl.reshape(tl.join(hi, lo), (ROWS, BLOCKSIZE))  # element 2j: high nibble
        if ROUND_BF16:  # the interpreter truncates fp32 -> bf16: round by hand
            w = _round_bf16(w)
        e = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + e, w.to(out_ptr.dtype.element_ty), mask=e < numel)

_W_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def triton_nf4_gemm(a, qweight, scales, shape, blocksize, quant_type, *, trans_w=False, h=None,
                    lora_b=None, alpha=1.0, bias=None, out_dtype=None):
    """``a @ Wᵀ [+ alpha · h @ lora_bᵀ] [+ bias]`` (or ``a @ W`` with ``trans_w``) with W
    decoded from the packed 4-bit weight inside the kernel's tiles, rounded to a's dtype
    (the compute dtype) before each tile product; fp32 accumulation, one rounding to
    ``out_dtype`` (default a's dtype). ``scales``: fp32 per-block scales
    (``block_scales``). ``a`` is 2-D, any strides."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    N, K = int(shape[0]), int(shape[1])
    M, Q = a.shape
    P = K if trans_w else N
    if Q != (N if trans_w else K):
        raise ValueError(f"triton_nf4_gemm: input {tuple(a.shape)} does not fit weight {N}x{K}")
    if a.dtype not in _W_DTYPES:
        raise TypeError(f"triton_nf4_gemm: unsupported dtype {a.dtype}")
    if not _INTERPRETED and not a.is_cuda:
        raise ValueError("triton_nf4_gemm: needs CUDA tensors (or TRITON_INTERPRET=1)")
    if blocksize not in BLOCKSIZES or N * K >= 2**31 or max(M, 1) * max(Q, P) >= 2**31:
        raise ValueError("triton_nf4_gemm: blocksize not a supported power of two, or a "
                         "tensor too large for int32 indexing")
    out = torch.empty((M, P), dtype=out_dtype or a.dtype, device=a.device)
    if M == 0 or P == 0:
        return out
    q = qweight.reshape(-1)
    if q.dtype != torch.uint8:
        q = q.view(torch.uint8)
    has_lora = h is not None and not trans_w
    R = h.shape[1] if has_lora else 0
    args = (
        a, q, scales.contiguous(), code_table(quant_type, a.device),
        h if has_lora else out, lora_b if has_lora else out,
        bias if bias is not None else out, out,
        M, P, Q, R, K, 1 << max(0, M - 1).bit_length(),
        a.stride(0), a.stride(1),
        h.stride(0) if has_lora else 0, h.stride(1) if has_lora else 0,
        lora_b.stride(0) if has_lora else 0, lora_b.stride(1) if has_lora else 0,
        out.stride(0), out.stride(1),
        float(alpha),
    )
    meta = dict(
        TRANS_W=bool(trans_w), HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        W_DTYPE=_W_DTYPES[a.dtype], INTERPRET=_INTERPRETED,
        ROUND_OUT_BF16=_INTERPRETED and out.dtype == torch.bfloat16,
        LOG2_BLOCKSIZE=int(blocksize).bit_length() - 1,
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_R=min(64, max(16, triton.next_power_of_2(max(R, 1)))),
    )

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(P, m["BLOCK_P"]),)

    if _INTERPRETED:
        _nf4_gemm_kernel[grid](*args, **meta, **NF4_INTERPRETER_CONFIG)
    else:
        with on_device(a):
            launch_autotuned(_nf4_autotuned, grid, args, meta,
                             (args[13], P, Q, R, a.dtype, out.dtype, *meta.values()))
    return out


def _dense(t: Tensor, dtype=None) -> Tensor:
    """``t`` contiguous and in ``dtype`` (when given), with no op where it already is."""
    t = _as(t, dtype) if dtype is not None else t
    return t if t.is_contiguous() else t.contiguous()


DEQUANT_ELEMENTS = 4096  # elements per program of _dequant_4bit_kernel (whole blocks)


def triton_dequantize_4bit(qweight, absmax, absmax2, code2, offset, shape, blocksize,
                           quant_type, dtype):
    """The (N, K) weight in ``dtype`` from the packed 4-bit weight and its quant state
    (``absmax`` fp32 per block, or double-quantised: uint8 ``absmax`` with ``absmax2``,
    ``code2`` and ``offset``): the same numbers as ``dequantize_4bit``, in one launch."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if not _INTERPRETED and not qweight.is_cuda:
        raise ValueError("triton_dequantize_4bit: needs CUDA tensors (or TRITON_INTERPRET=1)")
    if blocksize not in BLOCKSIZES or dtype not in _W_DTYPES:
        raise ValueError(f"triton_dequantize_4bit: blocksize {blocksize} or dtype {dtype} "
                         "not supported")
    nested = absmax2 is not None
    if nested and (absmax.dtype != torch.uint8 or code2 is None):
        raise ValueError("triton_dequantize_4bit: double-quantised absmax must be uint8 "
                         "indices into code2")
    N, K = int(shape[0]), int(shape[1])
    out = torch.empty((N, K), dtype=dtype, device=qweight.device)
    numel = N * K
    if numel == 0:
        return out
    # The kernel takes pointers: only contiguity and dtype matter, and each op here costs
    # host time on every call (bench_op_host.py), so none runs where none is needed.
    q = _dense(qweight)
    if q.dtype != torch.uint8:
        q = q.view(torch.uint8)
    if nested:
        absmax = _dense(absmax)
        absmax2, code2 = _dense(absmax2, torch.float32), _dense(code2, torch.float32)
        off = _dense(offset, torch.float32) if offset is not None else absmax2
    else:
        absmax = _dense(absmax, torch.float32)
        absmax2 = code2 = off = absmax
    log2_bs = int(blocksize).bit_length() - 1
    rows = max(1, DEQUANT_ELEMENTS >> log2_bs)  # quantization blocks per program
    grid = (triton.cdiv(triton.cdiv(numel, blocksize), rows),)
    args = (q, absmax, absmax2, code2, off, code_table(quant_type, q.device), out, numel)
    meta = dict(NESTED=nested, HAS_OFFSET=nested and offset is not None,
                LOG2_BLOCKSIZE=log2_bs, ROUND_BF16=_INTERPRETED and dtype == torch.bfloat16,
                ROWS=rows)
    if _INTERPRETED:
        _dequant_4bit_kernel[grid](*args, **meta)
    else:
        with on_device(q):
            _dequant_4bit_kernel[grid](*args, **meta, num_warps=4, enable_fp_fusion=False)
    return out


# --------------------------------------------------------------------------- device path


def _scaled_mm(a, b, scale):
    """``scale · a @ b`` rounded once (the GEMM's alpha)."""
    if scale == 1.0:
        return a @ b
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return torch.addmm(out, a, b, beta=0, alpha=scale)


def _forward_device(x, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type,
                    bias, lora_a, lora_b, scale, x_lora, out_dtype):
    N, K = int(shape[0]), int(shape[1])
    W = _dequantize_fast(qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type,
                         x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    same = out_dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
    if same and lora_a is None and bias is None:  # one GEMM, rounded once by cuBLAS
        return (x2 @ W.t()).reshape(*lead, N), x.new_empty(0)
    if same and lora_a is not None and lora_a.dtype == x.dtype and x_lora.dtype == x.dtype:
        # the adapter in the compute dtype too (autocast): the bf16 LoRA op's forward GEMM
        # (TMA / pointer kernel or cuBLAS in fp32, fastest per shape; one rounding)
        h = x_lora.reshape(-1, K) @ lora_a.t()
        y = base_plus_lowrank(x2, W, bias, h, lora_b, scale)
        return y.reshape(*lead, N), h.reshape(*lead, lora_a.shape[0])
    y = mm_fp32(x2, W.t())
    del W  # the temporary dequantised weight lives only for this GEMM
    h = x.new_empty(0)
    if lora_a is not None:
        h = x_lora.reshape(-1, K) @ lora_a.t()
        y.addmm_(h.to(y.dtype), lora_b.t().to(y.dtype), alpha=scale)
        h = h.reshape(*lead, lora_a.shape[0])
    if bias is not None:
        y += bias
    return y.to(out_dtype).reshape(*lead, N), h


def _backward_device(dy, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type,
                     x_dtype, lora_a, lora_b, x_lora, h, scale, need_dx, need_lora,
                     combine_dx=False, use_triton=False):
    N, K = int(shape[0]), int(shape[1])
    dy2 = dy.reshape(-1, N)
    lead = dy.shape[:-1]
    dx = dA = dB = dxl = None  # what is not computed returns empty (and distinct)
    if need_lora:
        adt = lora_a.dtype
        dya = _as(dy2, adt)
        g = dya @ lora_b  # unscaled: s rides on each consumer GEMM's alpha
        dxl = _as(_scaled_mm(g, lora_a, scale), x_lora.dtype).reshape(x_lora.shape)
        dA = _scaled_mm(g.t(), _as(x_lora.reshape(-1, K), adt), scale)
        dB = _as(_scaled_mm(dya.t(), h.reshape(-1, lora_a.shape[0]), scale), lora_b.dtype)
    # x' is x (combine_dx, same dtype): dx = dx' + dy W in one GEMM chain, as the bf16 LoRA
    # op's cuBLAS backward does, instead of two (M, K) outputs that autograd adds.
    fold = _folds_dx(need_dx, need_lora, combine_dx, x_lora, x_dtype)
    if need_dx and use_triton:
        scales = block_scales(absmax, absmax2, code2, offset)
        dx = triton_nf4_gemm(_as(dy2, x_dtype), qweight, scales, shape, blocksize, quant_type,
                             trans_w=True)
        if fold:
            dx += dxl.reshape(-1, K)
    elif need_dx:
        W = _dequantize_fast(qweight, absmax, absmax2, code2, offset, shape, blocksize,
                             quant_type, x_dtype)
        dx = dxl.reshape(-1, K).addmm_(_as(dy2, x_dtype), W) if fold else _as(dy2, x_dtype) @ W
        del W
    if need_dx:
        dx = dx.reshape(*lead, K)
    if fold:
        dxl = None  # folded into dx
    return tuple(dy.new_empty(0) if t is None else t for t in (dx, dA, dB, dxl))


def _as(t: Tensor, dtype) -> Tensor:
    """``t.to(dtype)``, without the call where ``t`` has that dtype (host time a call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _forward_triton(x, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type,
                    bias, lora_a, lora_b, scale, x_lora, out_dtype):
    N, K = int(shape[0]), int(shape[1])
    scales = block_scales(absmax, absmax2, code2, offset)  # (N·K/blocksize,) fp32: small
    lead = x.shape[:-1]
    h = x.new_empty(0)
    hr = None
    if lora_a is not None:
        hr = x_lora.reshape(-1, K) @ lora_a.t()
        h = hr.reshape(*lead, lora_a.shape[0])
    y = triton_nf4_gemm(x.reshape(-1, K), qweight, scales, shape, blocksize, quant_type, h=hr,
                        lora_b=lora_b, alpha=scale, bias=bias, out_dtype=out_dtype)
    return y.reshape(*lead, N), h


def _backward_triton(*args):
    return _backward_device(*args, use_triton=True)


# --------------------------------------------------------------------------- dispatch
#
# CPU: the fp32 reference. CUDA: the cuBLAS path (bitsandbytes' own: dequantise + GEMM)
# until the Triton kernel is measured faster on the GPU. LORAFUSE_NF4_IMPL=triton asks
# for the Triton kernel (on CUDA; with TRITON_INTERPRET=1 also on CPU tensors, for tests);
# a Triton failure falls back to cuBLAS with one warning.

IMPL_ENV = "LORAFUSE_NF4_IMPL"
def _impl(t: Tensor) -> str:
    """"reference", "device" (cuBLAS) or "triton" for a call on ``t``'s device."""
    want = requested_impl(IMPL_ENV, ("cublas", "triton"), default="cublas")
    if want == "triton" and triton is not None and (
            t.is_cuda or (_INTERPRETED and not t.is_cuda)):
        return "triton"
    if not t.is_cuda and not DEVICE_PATH_ON_CPU:
        return "reference"
    return "device"


def _run(kind, impls, *args):
    impl = _impl(args[0])
    if impl == "triton":
        try:
            return impls[2](*args)
        except Exception as e:  # never crash training over the optional kernel
            warn_once(f"lorafuse: Triton 4-bit kernel unavailable ({type(e).__name__}: {e}); "
                       "using dequantize + cuBLAS")
            impl = "device" if args[0].is_cuda else "reference"
    return (impls[0] if impl == "reference" else impls[1])(*args)


# --------------------------------------------------------------------------- ops


@lorafuse_op("lorafuse::nf4_linear")
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
    y, h = _run("fwd", (nf4_linear_reference, _forward_device, _forward_triton), x, qweight,
                absmax, absmax2, code2, offset, shape, blocksize, quant_type, bias, lora_a,
                lora_b, scale, x_lora, out_dtype)
    return y.contiguous(), h.contiguous()


@nf4_linear_op.register_fake
def _(x, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, bias, lora_a,
      lora_b, scale, x_lora, out_dtype):
    lead = x.shape[:-1]
    y = x.new_empty(*lead, shape[0], dtype=out_dtype)
    if lora_a is None:
        return y, x.new_empty(0)
    return y, x_lora.new_empty(*lead, lora_a.shape[0], dtype=lora_a.dtype)


@lorafuse_op("lorafuse::nf4_linear_h")
def nf4_linear_h_op(x: Tensor, lora_a: Tensor, x_lora: Tensor) -> Tensor:
    """``nf4_linear``'s second output alone, h = x' Aᵀ, computed as that op computes it on
    each path (bit-identical): where a backward recomputes a 4-bit linear only for the h
    its backward reads (checkpoint_layers: the down projection's output is not needed),
    partition.py calls this instead, and skips the dequantization and the base GEMM."""
    K, r, lead = x.shape[-1], lora_a.shape[0], x.shape[:-1]
    if _impl(x) == "reference":  # nf4_linear_reference's h
        acc = _acc(x, x_lora, lora_a)
        h = (x_lora.reshape(-1, K).to(acc) @ lora_a.to(acc).t()).to(lora_a.dtype)
    else:  # _forward_device's and _forward_triton's h
        h = x_lora.reshape(-1, K) @ lora_a.t()
    return h.reshape(*lead, r).contiguous()


@nf4_linear_h_op.register_fake
def _(x, lora_a, x_lora):
    return x_lora.new_empty(*x.shape[:-1], lora_a.shape[0], dtype=lora_a.dtype)


@lorafuse_op("lorafuse::nf4_linear_backward")
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
    combine_dx: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dA, dB, dx')``; those not asked for are empty. ``combine_dx`` (x' is
    x): dx' is added into dx, and returned empty, when both are asked for and x' has x's
    dtype."""
    outs = _run("bwd", (nf4_linear_backward_reference, _backward_device, _backward_triton), dy,
                qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, x_dtype,
                lora_a, lora_b, x_lora, h, scale, need_dx, need_lora, combine_dx)
    return tuple(t.contiguous() for t in outs)


def _folds_dx(need_dx, need_lora, combine_dx, x_lora, x_dtype) -> bool:
    return bool(combine_dx and need_dx and need_lora and x_lora.dtype == x_dtype)


@nf4_linear_backward_op.register_fake
def _(dy, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, x_dtype, lora_a,
      lora_b, x_lora, h, scale, need_dx, need_lora, combine_dx=False):
    lead = dy.shape[:-1]
    dx = dy.new_empty(*lead, shape[1], dtype=x_dtype) if need_dx else dy.new_empty(0)
    if not need_lora:
        return dx, dy.new_empty(0), dy.new_empty(0), dy.new_empty(0)
    dxl = dy.new_empty(0) if _folds_dx(need_dx, need_lora, combine_dx, x_lora, x_dtype) \
        else x_lora.new_empty(x_lora.shape)
    return dx, torch.empty_like(lora_a), torch.empty_like(lora_b), dxl


_X, _BIAS, _A, _B, _XL = 0, 9, 10, 11, 13  # positions in nf4_linear_op's inputs


def _setup_context(ctx, inputs, output):
    (x, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, bias, lora_a,
     lora_b, scale, x_lora, out_dtype) = inputs
    ctx.meta = (list(shape), blocksize, quant_type, x.dtype, scale)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.has_lora = lora_a is not None
    ctx.x_lora_is_x = x_lora is x  # the pass passes one node twice when x' is x
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
        combine = ctx.x_lora_is_x
        dx, dA, dB, dxl = nf4_linear_backward_op(
            dy, qweight, absmax, absmax2, code2, offset, shape, blocksize, quant_type, x_dtype,
            lora_a, lora_b, x_lora, h, scale, need_dx, need_lora, combine)
        if need_dx:
            grads[_X] = dx  # dy W, plus dx' when folded (x' is x)
        if need_lora:
            grads[_A], grads[_B] = (dA if need[_A] else None), (dB if need[_B] else None)
            folded = _folds_dx(need_dx, need_lora, combine, x_lora, x_dtype)
            grads[_XL] = dxl if need[_XL] and not folded else None
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
