"""Triton path of the fused LoRA linear: one GEMM with a rank-r tail.

The kernel computes, in one fp32 accumulator rounded once at the store,

    C = A1 @ B1 + alpha2 · (A2 @ B2) (+ bias)

with A1 (M, K1), B1 (K1, N) the big product and A2 (M, K2), B2 (K2, N) a rank-r tail
(K2 = r, at most a few dozen). Every operand takes any strides, so one kernel serves

    forward   y  = x Wᵀ + s · h Bᵀ + b        A1 = x,  B1 = Wᵀ, A2 = h,    B2 = Bᵀ
    backward  dx = dy W + s · (dy B) A         A1 = dy, B1 = W,  A2 = dy B, B2 = A

The tail is accumulated first (K2 is small: usually one tile), scaled by alpha2 in fp32,
then the base loop accumulates on top of it. Compared with cuBLAS (low-rank term as C,
beta = 1) this saves writing and re-reading the (M, N) low-rank term and, what matters
more, rounds once: cuBLAS was measured rounding x Wᵀ to bf16 before adding C, which loses
a small LoRA term (bench/probe_rounding.py). The forward therefore always runs here. The rank-r products around it (h = x' Aᵀ, dy B, dA,
dB) stay cuBLAS GEMMs: they are memory-bound and cuBLAS splits their long reductions.

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) ``tl.dot`` on bf16 returns
garbage and fp32 -> bf16 casts truncate, so for bf16 the kernel dots fp32 tiles and
rounds to nearest even by hand there; it also uses one fixed small block configuration
instead of autotuning.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._dispatch import bucket, launch_autotuned, on_device
from .lora import _lora_ab_cublas

# Block configurations tried by the autotuner, in one place. The large tiles suit the 8B
# shapes on an H200 (M = 4096 tokens, N and K in the thousands); the small ones short
# sequences and narrow outputs. A config that does not fit (fp32 tiles, shared memory) is
# skipped by the autotuner.
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
# The interpreter runs every program in numpy: small tiles keep CPU tests quick and
# still exercise several programs, partial tiles and the k loop.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_INDEX = 2**31 - 1  # the kernel indexes with int32


# M_BUCKET only keys the autotuner: no compile variants for its divisibility.
@triton.jit(do_not_specialize=["M_BUCKET"])
def _lowrank_tail_gemm_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr,
    M, N, K1, K2,
    M_BUCKET,  # unused in the body (the autotuner re-tunes per power-of-two bucket of M)
    stride_a1m, stride_a1k, stride_b1k, stride_b1n,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_cm, stride_cn,
    alpha2,
    HAS_BIAS: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,  # interpreter + bf16: see the two workarounds below
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, so fp32 is not tf32
    EVEN_K: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_K2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks sweep the columns together, so the B1 tiles
    # they share stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Loads use row/column indices wrapped into range, so the K loop needs no M/N masks
    # (rows past M repeat earlier rows and are never stored): unmasked loads pipeline at
    # full rate. Where the size is a multiple of the block, the plain range keeps the
    # contiguity the compiler can see.
    load_m = offs_m if EVEN_M else offs_m % M
    load_n = offs_n if EVEN_N else offs_n % N

    # Tail first: alpha2 · A2 @ B2 (usually a single tile, K2 = r).
    offs_k2 = tl.arange(0, BLOCK_K2)
    a2_ptrs = a2_ptr + load_m[:, None] * stride_a2m + offs_k2[None, :] * stride_a2k
    b2_ptrs = b2_ptr + offs_k2[:, None] * stride_b2k + load_n[None, :] * stride_b2n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k2 in range(0, tl.cdiv(K2, BLOCK_K2)):
        k_left = K2 - k2 * BLOCK_K2
        a2 = tl.load(a2_ptrs, mask=offs_k2[None, :] < k_left, other=0.0)
        b2 = tl.load(b2_ptrs, mask=offs_k2[:, None] < k_left, other=0.0)
        if INTERPRET_BF16:  # the interpreter's bf16 dot returns garbage: dot in fp32
            a2 = a2.to(tl.float32)
            b2 = b2.to(tl.float32)
        acc = tl.dot(a2, b2, acc, input_precision=INPUT_PRECISION)
        a2_ptrs += BLOCK_K2 * stride_a2k
        b2_ptrs += BLOCK_K2 * stride_b2k
    acc = acc * alpha2
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    # Base product on top, in the same fp32 accumulator.
    offs_k = tl.arange(0, BLOCK_K)
    a1_ptrs = a1_ptr + load_m[:, None] * stride_a1m + offs_k[None, :] * stride_a1k
    b1_ptrs = b1_ptr + offs_k[:, None] * stride_b1k + load_n[None, :] * stride_b1n
    for k in range(0, tl.cdiv(K1, BLOCK_K)):
        if EVEN_K:
            a1 = tl.load(a1_ptrs)
            b1 = tl.load(b1_ptrs)
        else:
            k_left = K1 - k * BLOCK_K
            a1 = tl.load(a1_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b1 = tl.load(b1_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if INTERPRET_BF16:
            a1 = a1.to(tl.float32)
            b1 = b1.to(tl.float32)
        acc = tl.dot(a1, b1, acc, input_precision=INPUT_PRECISION)
        a1_ptrs += BLOCK_K * stride_a1k
        b1_ptrs += BLOCK_K * stride_b1k

    if INTERPRET_BF16:
        # The interpreter casts fp32 -> bf16 by truncation; the GPU rounds to nearest
        # even. Round here (on the bits) so the interpreter computes what the GPU does.
        bits = acc.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        acc = bits.to(tl.float32, bitcast=True)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_INTERPRETED = type(_lowrank_tail_gemm_kernel).__name__ == "InterpretedFunction"

_even_k = triton.heuristics({
    "EVEN_K": lambda a: a["K1"] % a["BLOCK_K"] == 0,
    "EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
})(_lowrank_tail_gemm_kernel)


def _quick_bench(kernel_call, quantiles):
    # Shorter than triton's default (25 ms warm-up, 100 ms per config): the first step
    # tunes a dozen shapes, and the ranking of these configs is stable well before that.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_autotuned = triton.autotune(
    configs=AUTOTUNE_CONFIGS, key=["M_BUCKET", "N", "K1", "K2"], do_bench=_quick_bench,
)(_even_k)


def _max_offset(t: torch.Tensor) -> int:
    return sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)


def _rows_per_launch(*row_operands: torch.Tensor) -> int:
    """The most rows of (M, ·) operands one launch can index with int32: a multiple of the
    largest BLOCK_M where that is possible. Raises ValueError if one row is too long."""
    rows = []
    for t in row_operands:
        within_row = _max_offset(t[:1])
        if within_row > _MAX_INDEX:
            raise ValueError("lowrank_tail_gemm: tensor too large for int32 indexing")
        if t.stride(0) > 0:
            rows.append((_MAX_INDEX - within_row) // t.stride(0) + 1)
    step = min(rows) if rows else row_operands[0].shape[0]
    return step - step % 256 if step >= 256 else step


def lowrank_tail_gemm(a1, b1, a2, b2, bias=None, alpha2=1.0, out=None):
    """``a1 @ b1 + alpha2 · a2 @ b2 (+ bias)`` in one fp32 accumulator, rounded once to
    a1's dtype. 2-D operands of any strides; K1 may be 0 (then only the tail). Operands
    of more rows than int32 offsets reach run as several launches over blocks of rows."""
    M, K1 = a1.shape
    K2 = a2.shape[1]
    N = b1.shape[1]
    dtype = a1.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"lowrank_tail_gemm: unsupported dtype {dtype}")
    operands = [t for t in (a1, b1, a2, b2, bias) if t is not None]
    if any(t.dtype != dtype for t in operands):
        raise TypeError("lowrank_tail_gemm: all operands must share one dtype, got "
                        + ", ".join(str(t.dtype) for t in operands))
    if b1.shape[0] != K1 or a2.shape[0] != M or b2.shape != (K2, N) or (
            bias is not None and bias.shape != (N,)):
        raise ValueError("lowrank_tail_gemm: shape mismatch "
                         f"{tuple(a1.shape)} {tuple(b1.shape)} {tuple(a2.shape)} {tuple(b2.shape)}")
    if not _INTERPRETED and not all(t.is_cuda for t in operands):
        raise ValueError("lowrank_tail_gemm: needs CUDA tensors (or TRITON_INTERPRET=1)")
    if out is None:
        out = torch.empty((M, N), dtype=dtype, device=a1.device)
    if any(_max_offset(t) > _MAX_INDEX for t in (b1, b2, bias) if t is not None):
        raise ValueError("lowrank_tail_gemm: tensor too large for int32 indexing")
    if M == 0 or N == 0:
        return out
    if any(_max_offset(t) > _MAX_INDEX for t in (a1, a2, out)):
        # Long sequences (8B, 262,144 tokens × 14,336): a block of rows per launch, each
        # indexed from its own first row. Every output element sees the same k loop, so
        # the result is the one launch's, bit for bit.
        step = _rows_per_launch(a1, a2, out)
        for r0 in range(0, M, step):
            rows = slice(r0, r0 + step)
            lowrank_tail_gemm(a1[rows], b1, a2[rows], b2, bias, alpha2, out=out[rows])
        return out

    args = (
        a1, b1, a2, b2, bias if bias is not None else out, out,
        M, N, K1, K2, bucket(M),
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
        out.stride(0), out.stride(1),
        float(alpha2),
    )
    # tl.dot needs K tiles of at least 16; a rank above 64 loops over 64-wide tiles.
    meta = dict(
        HAS_BIAS=bias is not None,
        INTERPRET_BF16=_INTERPRETED and dtype == torch.bfloat16,
        INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        BLOCK_K2=min(64, max(16, triton.next_power_of_2(max(K2, 1)))),
    )

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)

    if _INTERPRETED:
        _even_k[grid](*args, **meta, **INTERPRETER_CONFIG)
    else:
        with on_device(a1):
            launch_autotuned(_autotuned, grid, args, meta,
                             (bucket(M), N, K1, K2, dtype, *meta.values()))
    return out


# ------------------------------------------------------------------ TMA forward (Hopper)
# The forward's operands are all K-contiguous (x, W, h, B row-major): an "NT" GEMM that
# Hopper's tensor-memory accelerator (TMA) loads tile by tile with no address arithmetic
# in the kernel, and a persistent grid (one program per SM looping over tiles) overlaps one
# tile's epilogue with the next tile's loads. The pointer kernel above ran 10-20 % behind
# cuBLAS at the 8B shapes (bench/RESULTS.md); this one is chosen only where it measures
# faster (lora._tail_gemm_forward).


def _tma_block_shapes(nargs):
    """Autotune pre-hook: a descriptor's block shape is the config's tile shape."""
    bm, bn, bk, bk2 = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"], nargs["BLOCK_K2"]
    nargs["a1_desc"].block_shape = [bm, bk]
    nargs["b1_desc"].block_shape = [bn, bk]
    nargs["a2_desc"].block_shape = [bm, bk2]
    nargs["b2_desc"].block_shape = [bn, bk2]
    nargs["c_desc"].block_shape = [bm, bn]


# bench/bench_tma_configs.py on the H200 (bench/RESULTS.md): 128 x 128 x 64 tiles, 8 warps,
# 4 stages, the tile loop flattened, won at every 8B shape (0.81-0.94 of cuBLAS's x Wᵀ
# alone); 128 x 256 needs under 4 stages to fit shared memory and ran 0.56-0.79; warp
# specialisation gained nothing on Hopper (and fails to compile with 4 warps). Only configs
# that sweep ran (and checked against fp32) on the H200 are listed.
TMA_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8, "FLATTEN": fl},
                  num_warps=8, num_stages=st, pre_hook=_tma_block_shapes)
    for bm, bn, st, fl in [(128, 128, 4, True), (128, 128, 4, False), (128, 256, 3, False)]
]
TMA_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}


@triton.jit(do_not_specialize=["M_BUCKET"])
def _tail_gemm_nt_tma_kernel(
    a1_desc, b1_desc, a2_desc, b2_desc, c_desc, bias_ptr,
    M, N, K1, K2,
    M_BUCKET,  # autotune key only
    alpha2,
    HAS_BIAS: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_K2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,
):
    """C = A1 B1ᵀ + alpha2 · A2 B2ᵀ (+ bias); all operands K-contiguous, out of bounds of a
    TMA load reads zeros (no masks), the store clips."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K1, BLOCK_K)
    group_size = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0),
                         flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        first_m = (tile // group_size) * GROUP_M
        rows_in_group = min(num_pid_m - first_m, GROUP_M)
        off_m = (first_m + (tile % group_size) % rows_in_group) * BLOCK_M
        off_n = ((tile % group_size) // rows_in_group) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, k_tiles):
            a1 = a1_desc.load([off_m, k * BLOCK_K])
            b1 = b1_desc.load([off_n, k * BLOCK_K])
            if INTERPRET_BF16:
                a1 = a1.to(tl.float32)
                b1 = b1.to(tl.float32)
            acc = tl.dot(a1, b1.T, acc)
        tail = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k2 in range(0, tl.cdiv(K2, BLOCK_K2)):
            a2 = a2_desc.load([off_m, k2 * BLOCK_K2])
            b2 = b2_desc.load([off_n, k2 * BLOCK_K2])
            if INTERPRET_BF16:
                a2 = a2.to(tl.float32)
                b2 = b2.to(tl.float32)
            tail = tl.dot(a2, b2.T, tail)
        acc += tail * alpha2
        if HAS_BIAS:
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if INTERPRET_BF16:  # round to nearest even by hand, as in the pointer kernel
            bits = acc.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            acc = bits.to(tl.float32, bitcast=True)
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


_tma_autotuned = triton.autotune(
    configs=TMA_CONFIGS, key=["M_BUCKET", "N", "K1", "K2"], do_bench=_quick_bench,
)(_tail_gemm_nt_tma_kernel)


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA's rules for a 2-D descriptor: unit last stride, 16-byte aligned base and rows."""
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * t.element_size()) % 16 == 0)


@functools.lru_cache(maxsize=None)
def _has_tma(index) -> bool:
    """Hopper or newer (asked once per device: this check runs on every LoRA forward)."""
    return torch.cuda.get_device_capability(index)[0] >= 9


def tail_gemm_nt_tma_supported(x2, weight, h, lora_b, bias) -> bool:
    if x2.dtype not in (torch.float16, torch.bfloat16):
        return False
    if any(t.dtype != x2.dtype for t in (weight, h, lora_b) + ((bias,) if bias is not None else ())):
        return False
    if not _INTERPRETED and not (x2.is_cuda and _has_tma(x2.device.index)):
        return False
    N = weight.shape[0]
    return (all(_tma_ok(t) for t in (x2, weight, h, lora_b)) and (N * x2.element_size()) % 16 == 0
            and min(x2.shape[0], N, x2.shape[1], h.shape[1]) > 0)


_NUM_SMS: dict = {}


def tail_gemm_nt_tma(x2, weight, h, lora_b, bias=None, alpha2=1.0):
    """``x2 Wᵀ + alpha2 · h Bᵀ (+ bias)`` rounded once, through TMA on a persistent grid.
    Callers check ``tail_gemm_nt_tma_supported`` first."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K1 = x2.shape
    N, K2 = weight.shape[0], h.shape[1]
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    block_k2 = min(64, max(16, triton.next_power_of_2(K2)))
    dummy = [16, 16]  # replaced per config by _tma_block_shapes
    descs = [TensorDescriptor.from_tensor(t, list(dummy)) for t in (x2, weight, h, lora_b, out)]
    args = (*descs, bias if bias is not None else out, M, N, K1, K2, bucket(M), float(alpha2))
    meta = dict(HAS_BIAS=bias is not None, BLOCK_K2=block_k2,
                INTERPRET_BF16=_INTERPRETED and x2.dtype == torch.bfloat16)
    if _INTERPRETED:
        cfg = dict(TMA_INTERPRETER_CONFIG, BLOCK_K2=block_k2)
        _tma_block_shapes({**cfg, "a1_desc": descs[0], "b1_desc": descs[1], "a2_desc": descs[2],
                           "b2_desc": descs[3], "c_desc": descs[4]})
        tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
        _tail_gemm_nt_tma_kernel[(min(3, tiles),)](*args, **{**meta, **TMA_INTERPRETER_CONFIG})
        return out
    dev = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    if dev not in _NUM_SMS:
        _NUM_SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count

    def grid(m):
        return (min(_NUM_SMS[dev], triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"])),)

    with on_device(x2):
        launch_autotuned(_tma_autotuned, grid, args, meta,
                         (bucket(M), N, K1, K2, x2.dtype, *meta.values()))
    return out


def triton_lora_backward(dy, x_lora, weight, lora_a, lora_b, h, scale, up=None, act=""):
    """Same contract as ``lora._lora_linear_backward_cublas`` with a base weight (without
    one there is no base GEMM to fuse, and the op stays on cuBLAS): ``(dx, dA, dB)``."""
    N = lora_b.shape[0]
    dy2 = dy.reshape(-1, N)
    g = dy2 @ lora_b  # unscaled: s is applied in fp32 inside each consumer
    dx = lowrank_tail_gemm(dy2, weight, g, lora_a, None, alpha2=scale)
    dA, dB = _lora_ab_cublas(dy, x_lora, lora_a, lora_b, h, scale, g, up, act)
    return dx.reshape(x_lora.shape), dA, dB
