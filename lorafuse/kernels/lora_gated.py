"""A LoRA adapter's dA when its input is a gated product (the MLP fold).

A Llama-style MLP's down projection reads ``p = act(gate) ⊙ up``. Its adapter's gradient

    dA = s · gᵀ p          g = dy B, (tokens, r)

is the only reason the backward keeps p: the activation's own backward keeps gate and up.
With the fold (passes/lora.py) the down op gets gate and up too and computes dA from them,
so p (2 bytes per element in bf16: 28 KiB per token and layer at intermediate 14336) is not
kept. p is formed in fp32 and rounded to its dtype, as the forward's product was, so dA is
the unfolded dA's number up to the order of its fp32 sums.

Paths: CPU runs the reference (p rebuilt, one fp32 GEMM). CUDA runs ``_gated_da_kernel``:
programs over (column blocks of p, slices of the tokens); each loops over its tokens,
loads gate and up tiles, forms p in registers and accumulates ``gᵀ p`` in fp32; the
slices' partial sums are added, scaled by s and rounded once. It reads gate and up
(twice p's bytes) where the unfolded dA read p: the price of not keeping p.
LORAFUSE_LORA_GATED_IMPL=auto|torch|triton (default auto: Triton on CUDA) overrides;
=triton with TRITON_INTERPRET=1 runs the kernel on CPU (tests). A kernel failure falls
back to the reference with one warning.
"""

from __future__ import annotations

import functools

import torch

from ._dispatch import on_device, triton_or_reference
from .gated_mlp import gated_mlp_reference

try:  # optional: without triton, CUDA tensors take the PyTorch path (with a warning)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

IMPL_ENV = "LORAFUSE_LORA_GATED_IMPL"


def gated_da_reference(g, gate, up, act, scale, p_dtype, out_dtype):
    """``s · gᵀ p`` with ``p = act(gate) ⊙ up`` rounded to ``p_dtype``; fp32 math (fp64
    stays fp64), rounded once to ``out_dtype``. g: (T, r); gate, up: (..., I) → (r, I)."""
    I = gate.shape[-1]
    p = gated_mlp_reference(gate, up, act, p_dtype).reshape(-1, I)
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    return ((g.to(acc).t() @ p.to(acc)) * scale).to(out_dtype)


if triton is not None:
    from .gated_mlp import _ACT_CODE, _act_and_grad
    from .norm import _rne_bf16

    @triton.jit
    def _gated_da_kernel(
        g_ptr, gate_ptr, up_ptr, part_ptr, T, I, R, rows_per_slice,
        stride_g, stride_gate, stride_up,
        ACT: tl.constexpr, INTERPRET_BF16: tl.constexpr, P_FP32: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """part[slice, :R, cols] = g[rows]ᵀ p[rows, cols] over one slice of the rows."""
        pid_i = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        ranks = tl.arange(0, BLOCK_R)
        col_ok = cols < I
        rank_ok = ranks < R
        start = pid_s * rows_per_slice
        end = tl.minimum(start + rows_per_slice, T)
        acc = tl.zeros((BLOCK_R, BLOCK_I), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            row_ok = rows < end
            r64 = rows.to(tl.int64)
            m = row_ok[:, None] & col_ok[None, :]
            gt = tl.load(gate_ptr + r64[:, None] * stride_gate + cols[None, :], mask=m,
                         other=0.0).to(tl.float32)
            ut = tl.load(up_ptr + r64[:, None] * stride_up + cols[None, :], mask=m,
                         other=0.0).to(tl.float32)
            a, _ = _act_and_grad(gt, ACT, False)
            p = a * ut
            gr = tl.load(g_ptr + r64[:, None] * stride_g + ranks[None, :],
                         mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            if INTERPRET_BF16:
                # The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even)
                # and its bf16 dot returns garbage: round by hand, dot the bf16 values in fp32.
                gr, p = gr.to(tl.float32), _rne_bf16(p)
            elif not P_FP32:  # p rounded to the compute dtype, as the forward rounded it
                p = p.to(gr.dtype)
            if P_FP32 or INTERPRET_BF16:  # fp32 products, no TF32
                acc += tl.dot(tl.trans(gr), p, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(gr), p)
        base = part_ptr + pid_s.to(tl.int64) * R * I
        tl.store(base + ranks[:, None] * I + cols[None, :], acc,
                 mask=rank_ok[:, None] & col_ok[None, :])

    _INTERPRETED = type(_gated_da_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover
    _INTERPRETED = False


@functools.lru_cache(maxsize=None)
def _programs_wanted(device_index) -> int:
    """Programs enough for every SM a few times (4 × 132 on an H200; CPU: the same)."""
    if device_index is None:
        return 4 * 132
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


# (BLOCK_T, BLOCK_I, num_warps, num_stages) on the GPU: the fastest at the 8B shape on the
# H200 (bench/bench_mlp_fold.py, sessions 19 and 20: 0.097 ms, 58 % of the bandwidth
# ceiling; (128, 64, 4, 3) 0.109 ms, (64, 128, 4, 3) 0.114, (64, 64, 4, 5) 0.127). Session 20
# also measured accumulating the transpose pᵀ g (the rank as the tile's N, not its M):
# 30-40 % slower at every tile, so it was removed.
CONFIG = (64, 64, 4, 3)


def _launch(T: int, I: int, R: int, config=None, device_index=None):
    """(BLOCK_T, BLOCK_I, BLOCK_R, slices, rows per slice, num_warps, num_stages)."""
    bt, bi, warps, stages = config or CONFIG
    if _INTERPRETED:
        bt, bi, warps = 16, 16, 1
    br = max(16, triton.next_power_of_2(R))
    col_blocks = triton.cdiv(I, bi)
    programs = _programs_wanted(device_index)
    slices = max(1, min(triton.cdiv(T, 8 * bt), triton.cdiv(programs, col_blocks)))
    rows = triton.cdiv(triton.cdiv(T, slices), bt) * bt
    return bt, bi, br, triton.cdiv(T, rows) if T else 1, rows, warps, stages


def gated_da_triton(g, gate, up, act, scale, p_dtype, out_dtype, config=None):
    """Same contract as ``gated_da_reference``; ``config`` overrides ``CONFIG`` (benchmarks)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if gate.shape != up.shape or p_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gate {tuple(gate.shape)}, up {tuple(up.shape)}, p {p_dtype}")
    if g.dtype != p_dtype:  # the op's compute dtype, both
        raise TypeError(f"g is {g.dtype}, p {p_dtype}")
    I, R = gate.shape[-1], g.shape[-1]
    g2 = g.reshape(-1, R)
    gate2, up2 = gate.reshape(-1, I), up.reshape(-1, I)
    if gate2.stride(-1) != 1:
        gate2 = gate2.contiguous()
    if up2.stride(-1) != 1:
        up2 = up2.contiguous()
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    T = g2.shape[0]
    bt, bi, br, slices, rows, warps, stages = _launch(
        T, I, R, config, g.device.index if g.is_cuda else None)
    part = torch.empty((slices, R, I), dtype=torch.float32, device=g.device)
    if T == 0:
        part.zero_()
    else:
        with on_device(g):
            _gated_da_kernel[(triton.cdiv(I, bi), slices)](
                g2, gate2, up2, part, T, I, R, rows,
                g2.stride(0), gate2.stride(0), up2.stride(0),
                ACT=_ACT_CODE[act], INTERPRET_BF16=_INTERPRETED and p_dtype == torch.bfloat16,
                P_FP32=p_dtype == torch.float32, BLOCK_T=bt, BLOCK_I=bi, BLOCK_R=br,
                num_warps=warps, num_stages=stages)
    da = part[0] if slices == 1 else part.sum(0)
    return da.mul_(scale).to(out_dtype)


def gated_da(g, gate, up, act, scale, p_dtype, out_dtype):
    """``s · gᵀ (act(gate) ⊙ up)``: the Triton kernel on CUDA, else the reference."""
    return triton_or_reference(
        gate, IMPL_ENV, "gated LoRA dA",
        lambda: gated_da_triton(g, gate, up, act, scale, p_dtype, out_dtype),
        lambda: gated_da_reference(g, gate, up, act, scale, p_dtype, out_dtype))
