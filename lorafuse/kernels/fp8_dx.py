"""The frozen base weights' input gradient ``dy · W`` in fp8 (e4m3): the ``fp8_dx`` option.

Why: at the 8B shape the step runs at the H200's power cap (bench/RESULTS.md, session 16),
and the dx GEMMs through the frozen weights are ≈ 44 % of its matmul FLOPs; Hopper's fp8
tensor cores do a FLOP at about half the energy and twice the rate of bf16. The forward,
the LoRA factors' gradients (dA, dB) and the LoRA part of dx (g A) stay in the compute
dtype; only ``dy W`` changes, so this changes the gradients (never the forward), and is
opt-in.

Scaling: one power-of-two scale per row of dy (per token) and one per column of W (per
input feature), so that the largest magnitude in each maps into e4m3's ±448. Powers of
two make the scaling itself exact; each element is then rounded once to e4m3 (3 mantissa
bits: a relative error up to 2⁻⁴ each, ≈ 2-4 % on a dot product of random signs). dx is
accumulated in fp32 and rounded once to the compute dtype (``torch._scaled_mm``, rowwise
scales: sm90+ (Hopper); also on CPU in recent torch).

W's fp8 copy (transposed, as ``_scaled_mm`` wants its second operand column-major) is
made once per weight (at compile time where the graph's inputs show it: ``prebuild``) and
kept while the weight lives and is not modified in place: one byte per frozen weight
element (≈ 6.5 GiB at 8B). A weight's cache entry goes when its storage does. With
``fp8_copies=False`` only W's scales are kept and W is cast again in every backward (one
Triton launch per weight, ``cast_weights_t``): the same bytes, for ≈ 3 bytes of traffic a
weight element a step.

``fp8_dx_reference`` is the same arithmetic in plain PyTorch (quantise, dequantise to
fp32, multiply): the CPU path and the test oracle. Where ``_scaled_mm`` cannot run (an
older GPU, sizes not multiples of 16, fp32 compute) the caller keeps the exact path.

dy's quantisation runs every backward, over every site's dy (≈ 5.5 G elements a step at
the 8B shape): in eager PyTorch (abs, amax, multiply, cast, and a cat for a group) that
is ≈ 15 bytes of memory traffic an element, ≈ 20 ms a step on the H200, most of what the
fp8 GEMMs would save. So on CUDA one Triton launch per GEMM reads each row of the sites'
dy into registers, takes its maximum and power-of-two scale, and scales and casts it into
the concatenated e4m3 operand: 3 bytes of HBM traffic an element, and one launch where a
reduction, the scale's arithmetic and a cast per site took ten (session 27's profile:
≈ 9.6 ms a step in two kernels, and the host time of ≈ 1,300 launches). Rows wider than
``ONE_PASS_MAX`` take a two-pass kernel that reads each row again for the cast (from L2
when it is still there: at 2 × 14336 it mostly was not, session 29).
Under the Triton interpreter the e4m3 cast is not the GPU's (it does not round to
nearest), so CPU tests check the kernel's scaling with an fp32 output and the GPU test
its e4m3 bytes.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch
from torch import Tensor

from .._torch import scaled_mm
from ._dispatch import on_device, warn_once

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path needs none of it
    triton = None

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# the smallest power-of-two scale used: an all-zero row or column gets this one (any
# finite scale gives zeros there)
_MIN_SCALE = 2.0 ** -100
_MANT_1_75 = 0x600000  # fp32 mantissa bits of 1.75


def pow2_scale(amax: Tensor) -> Tensor:
    """fp32 powers of two s, the least with amax / s ≤ 448, from absolute maxima (NaN where
    amax is not finite). Read off amax's fp32 bits, so exact (a log2 is not, near a
    binade's edge): amax = 1.m · 2^e needs s = 2^(e-8), or 2^(e-7) when 1.m > 1.75
    (448 = 1.75 · 2⁸). ``_quantize_rows_kernel`` computes the same bits."""
    bits = amax.float().clamp_min(_MIN_SCALE * E4M3_MAX).view(torch.int32)
    e = (bits >> 23) & 0xFF
    k = e - 127 - 8 + ((bits & 0x7FFFFF) > _MANT_1_75).int()
    s = ((k + 127) << 23).view(torch.float32)
    return torch.where(e == 0xFF, float("nan"), s)


def quantize_rows(t2: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, s)`` for a 2-D ``t2``: q = e4m3(t2 / s) with one power-of-two s per row
    (shape (M, 1), fp32). bf16 and fp32 share an exponent range, so in bf16 the division
    by a power of two is exact and needs no fp32 copy; other dtypes go through fp32."""
    amax = t2.abs().amax(dim=1, keepdim=True) if t2.numel() else t2.new_zeros(t2.shape[0], 1)
    s = pow2_scale(amax)
    if t2.dtype in (torch.bfloat16, torch.float32):
        return (t2 * (1.0 / s).to(t2.dtype)).to(E4M3), s
    return (t2.float() * (1.0 / s)).to(E4M3), s


def quantize_weight_t(w: Tensor) -> tuple[Tensor, Tensor]:
    """For W (N, K): ``(wq, s)`` with wq (K, N) contiguous e4m3 = (W / s)ᵀ, s one power of
    two per column of W (per K index), shape (1, K). ``wq.t()`` is _scaled_mm's
    column-major second operand for ``dy @ W``."""
    wq, s = quantize_rows(w.t())
    return wq.contiguous(), s.reshape(1, -1)


def weight_scales(weights: list) -> Tensor:
    """``quantize_weight_t``'s scales (1, K) of the weights concatenated along N, without
    the concatenation: one power of two per input feature over all of them."""
    amax = torch.linalg.vector_norm(weights[0], float("inf"), dim=0)
    for w in weights[1:]:
        amax = torch.maximum(amax, torch.linalg.vector_norm(w, float("inf"), dim=0))
    return pow2_scale(amax).reshape(1, -1)


def cast_weights_t(weights: list, inv: Tensor) -> Tensor:
    """``quantize_weight_t``'s wq (K, ΣN) for the weights concatenated along N, given the
    inverses ``inv`` (K,) of their scales (``weight_scales``; ``scale_cache`` keeps both),
    the same bytes: the ``fp8_copies=False`` path, every backward. CUDA: one Triton launch
    per weight, W read once and wq written once (≈ 3 bytes of traffic an element);
    elsewhere, or if it fails (warned once), PyTorch."""
    K, N = weights[0].shape[1], sum(w.shape[0] for w in weights)
    out = torch.empty(K, N, dtype=E4M3, device=weights[0].device)
    if triton is not None and weights[0].is_cuda and all(w.stride(1) == 1 for w in weights):
        try:
            off = 0
            for w in weights:
                cast_t_into(w, inv, out[:, off:off + w.shape[0]])
                off += w.shape[0]
            return out
        except Exception as e:  # never crash training over the optional kernel
            warn_once(f"lorafuse: Triton fp8 weight cast failed ({type(e).__name__}: {e}); "
                      "using PyTorch")
    return cast_weights_t_pytorch(weights, inv, out)


def cast_weights_t_pytorch(weights: list, inv: Tensor, out: Tensor) -> Tensor:
    """``cast_weights_t``'s PyTorch path (and the benchmark's eager row), into ``out``."""
    off = 0
    for w in weights:  # exact in bf16 (a power of two); the copy rounds once
        out[:, off:off + w.shape[0]].copy_((w * inv.to(w.dtype)).t())
        off += w.shape[0]
    return out


def fp8_dx_reference(dy2: Tensor, weight: Tensor, dtype=torch.float32) -> Tensor:
    """``dy2 @ W`` with both operands rounded to e4m3 as ``fp8_dx`` rounds them, the
    product in fp32: the oracle (and CPU path) of ``fp8_dx``; ``dtype``: the result's."""
    q, sa = quantize_rows(dy2)
    wq, sb = quantize_weight_t(weight)
    return ((q.float() * sa) @ (wq.float() * sb.reshape(-1, 1)).t()).to(dtype)


def supported(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``_scaled_mm`` takes ``dy (M, N) @ W (N, K)``: bf16 compute (rowwise scales
    want a bf16 output on CUDA), every size a multiple of 16, a CUDA device of compute
    capability 9.0+ (PyTorch's rowwise-scaled fp8 GEMM is Hopper's and later; sm89 has
    fp8 but not that kernel in every release), or the CPU (recent torch; tests); and no
    earlier failure (``fp8_dx``)."""
    if _failed or dtype != torch.bfloat16 or any(n % 16 for n in (M, N, K)) or M == 0:
        return False
    if device.type == "cuda":
        return _sm90(device.index if device.index is not None else torch.cuda.current_device())
    return device.type == "cpu"


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:  # asked at every backward of every site: ask the driver once
    return torch.cuda.get_device_capability(index) >= (9, 0)


_failed: list = []  # the first error of the fp8 path in this process, if any


def applies(dy2s: list, weights: list) -> bool:
    """Whether ``fp8_dx`` can run for these sites (dy_i (M, N_i), W_i (N_i, K): one GEMM
    over the concatenated N); warns once per kind of site where it cannot."""
    M, N, K = dy2s[0].shape[0], sum(d.shape[1] for d in dy2s), weights[0].shape[1]
    dtype, device = dy2s[0].dtype, dy2s[0].device
    if all(w.dtype == dtype for w in weights) and supported(M, N, K, dtype, device):
        return True
    warn_once(f"lorafuse: fp8_dx does not apply to a ({M}, {N}) x ({N}, {K}) {dtype} dy W "
              f"on {device} (it needs bf16, sizes that are multiples of 16, sm90+); that dx "
              "is exact")
    return False


def _row_scales(dy2s: list) -> Tensor:
    """One power-of-two scale per row across the sites' dy (M, 1), from each site's exact
    row maxima (one reduction each, no temporary): the PyTorch path's."""
    amax = torch.linalg.vector_norm(dy2s[0], float("inf"), dim=1)
    for d in dy2s[1:]:
        amax = torch.maximum(amax, torch.linalg.vector_norm(d, float("inf"), dim=1))
    return pow2_scale(amax).reshape(-1, 1)


MAX_SOURCES = 3  # the kernel's: a q/k/v group

if triton is not None:
    @triton.jit
    def _pow2_scale_and_inverse(amax, min_amax):
        """``pow2_scale``'s bits (and 1 / scale, exact) for fp32 maxima, NaN where not
        finite."""
        bits = tl.maximum(amax, min_amax).to(tl.int32, bitcast=True)
        e = (bits >> 23) & 0xFF
        k = e - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)  # 135 = 127 + 8
        finite = e != 0xFF
        scale = tl.where(finite, ((k + 127) << 23).to(tl.float32, bitcast=True), float("nan"))
        inv = tl.where(finite, ((127 - k) << 23).to(tl.float32, bitcast=True), float("nan"))
        return scale, inv

    @triton.jit
    def _source_amax(x_ptr, sx, N, r64, rmask, amax, BLOCK_N: tl.constexpr):
        for c in range(0, N, BLOCK_N):
            cols = c + tl.arange(0, BLOCK_N)
            m = rmask[:, None] & (cols < N)[None, :]
            x = tl.load(x_ptr + r64 * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        return amax

    @triton.jit
    def _source_cast(x_ptr, sx, N, o_ptr, so, r64, rmask, inv, TO_E4M3: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        for c in range(0, N, BLOCK_N):
            cols = c + tl.arange(0, BLOCK_N)
            m = rmask[:, None] & (cols < N)[None, :]
            x = tl.load(x_ptr + r64 * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
            y = x * inv[:, None]  # exact: inv is a power of two
            if TO_E4M3:
                tl.store(o_ptr + r64 * so + cols[None, :], y.to(tl.float8e4nv), mask=m)
            else:
                tl.store(o_ptr + r64 * so + cols[None, :], y, mask=m)

    @triton.jit
    def _quantize_rows_kernel(x0, x1, x2, sx0, sx1, sx2, n0, n1, n2, out_ptr, so, scale_ptr,
                              M, min_amax, NSRC: tl.constexpr, TO_E4M3: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """For BLOCK_M rows of up to three sources side by side: the row maxima, the
        power-of-two scale (``pow2_scale``'s bits), then each source read again, scaled
        and cast into its columns of ``out``. TO_E4M3=False stores the fp32 product
        (interpreter tests)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        r64 = rows.to(tl.int64)[:, None]
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        amax = _source_amax(x0, sx0, n0, r64, rmask, amax, BLOCK_N)
        if NSRC > 1:
            amax = _source_amax(x1, sx1, n1, r64, rmask, amax, BLOCK_N)
        if NSRC > 2:
            amax = _source_amax(x2, sx2, n2, r64, rmask, amax, BLOCK_N)
        scale, inv = _pow2_scale_and_inverse(amax, min_amax)
        tl.store(scale_ptr + rows, scale, mask=rmask)
        _source_cast(x0, sx0, n0, out_ptr, so, r64, rmask, inv, TO_E4M3, BLOCK_N)
        if NSRC > 1:
            _source_cast(x1, sx1, n1, out_ptr + n0, so, r64, rmask, inv, TO_E4M3, BLOCK_N)
        if NSRC > 2:
            _source_cast(x2, sx2, n2, out_ptr + n0 + n1, so, r64, rmask, inv, TO_E4M3,
                         BLOCK_N)

    @triton.jit
    def _row_of(x_ptr, sx, N, row, B: tl.constexpr):
        cols = tl.arange(0, B)
        return tl.load(x_ptr + row * sx + cols, mask=cols < N, other=0.0).to(tl.float32)

    @triton.jit
    def _store_row(o_ptr, so, N, row, y, TO_E4M3: tl.constexpr, B: tl.constexpr):
        cols = tl.arange(0, B)
        if TO_E4M3:
            tl.store(o_ptr + row * so + cols, y.to(tl.float8e4nv), mask=cols < N)
        else:
            tl.store(o_ptr + row * so + cols, y, mask=cols < N)

    @triton.jit
    def _quantize_row_one_pass_kernel(x0, x1, x2, sx0, sx1, sx2, n0, n1, n2, out_ptr, so,
                                      scale_ptr, min_amax, TO_E4M3: tl.constexpr,
                                      B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
        """``_quantize_rows_kernel`` for one row held whole in registers (Bi: source i's
        width rounded up to a power of two; an unused source has width 0): dy read from
        memory once, where the two-pass kernel's second read of a wide row can miss L2."""
        row = tl.program_id(0).to(tl.int64)
        a0 = _row_of(x0, sx0, n0, row, B0)
        a1 = _row_of(x1, sx1, n1, row, B1)
        a2 = _row_of(x2, sx2, n2, row, B2)
        amax = tl.maximum(tl.max(tl.abs(a0), axis=0),
                          tl.maximum(tl.max(tl.abs(a1), axis=0), tl.max(tl.abs(a2), axis=0)))
        scale, inv = _pow2_scale_and_inverse(amax, min_amax)
        tl.store(scale_ptr + row, scale)
        _store_row(out_ptr, so, n0, row, a0 * inv, TO_E4M3, B0)  # exact: inv is 2^k
        _store_row(out_ptr + n0, so, n1, row, a1 * inv, TO_E4M3, B1)
        _store_row(out_ptr + n0 + n1, so, n2, row, a2 * inv, TO_E4M3, B2)

    @triton.jit
    def _cast_t_kernel(w_ptr, sw, inv_ptr, out_ptr, so, N, K, TO_E4M3: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[k, n] = e4m3(W[n, k] · inv[k]) for a (BLOCK_N, BLOCK_K) tile of W, stored
        transposed; TO_E4M3=False stores the fp32 product (interpreter tests)."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + n.to(tl.int64)[:, None] * sw + k[None, :],
                    mask=(n < N)[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
        y = tl.trans(w * tl.load(inv_ptr + k, mask=k < K, other=1.0)[None, :])
        dst = out_ptr + k.to(tl.int64)[:, None] * so + n[None, :]
        mask_t = (k < K)[:, None] & (n < N)[None, :]
        if TO_E4M3:
            tl.store(dst, y.to(tl.float8e4nv), mask=mask_t)
        else:
            tl.store(dst, y, mask=mask_t)


def cast_t_into(w: Tensor, inv: Tensor, out: Tensor) -> None:
    """The Triton kernel: ``out`` (K, N), a column slice of wq = e4m3(W · inv)ᵀ for W (N, K)
    with contiguous rows, ``inv`` (K,) fp32 powers of two; an fp32 ``out`` takes the product
    uncast (tests)."""
    N, K = w.shape
    BLOCK_N, BLOCK_K = 64, 64
    with on_device(out):
        _cast_t_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K))](
            w, w.stride(0), inv, out, out.stride(0), N, K, TO_E4M3=out.dtype == E4M3,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


def quantize_rows_into(dy2s: list, out: Tensor, scale: Tensor, one_pass: bool | None = None,
                       num_warps: int | None = None) -> None:
    """The Triton kernel: ``out`` (M, ΣN) = the sites' dy side by side, each row scaled by
    its power of two and cast (e4m3; an fp32 ``out`` takes the product uncast, for tests),
    ``scale`` (M,) fp32 = those powers of two. One launch for up to ``MAX_SOURCES`` sites
    whose rows are contiguous. ``one_pass`` (the row held in registers, read once) or the
    two-pass kernel (the row read twice), and ``num_warps``: None picks them as measured;
    bench/bench_fp8_dx.py times the others."""
    M = out.shape[0]
    srcs = list(dy2s) + [dy2s[0]] * (MAX_SOURCES - len(dy2s))  # unused slots: any pointer
    ns = [d.shape[1] for d in dy2s] + [0] * (MAX_SOURCES - len(dy2s))
    picked = quantise_config([d.shape[1] for d in dy2s])
    one_pass = picked[0] if one_pass is None else one_pass
    num_warps = num_warps or (picked[1] if one_pass == picked[0] else 8)  # forced: 8
    strides = [d.stride(0) for d in srcs]
    with on_device(out):
        if one_pass:
            _quantize_row_one_pass_kernel[(M,)](
                *srcs, *strides, *ns, out, out.stride(0), scale, _MIN_SCALE * E4M3_MAX,
                TO_E4M3=out.dtype == E4M3, B0=_pow2_at_least(ns[0]),
                B1=_pow2_at_least(ns[1]), B2=_pow2_at_least(ns[2]), num_warps=num_warps)
            return
        BLOCK_M, BLOCK_N = 1, 2048  # one row a program; its second read partly hits L2
        _quantize_rows_kernel[(triton.cdiv(M, BLOCK_M),)](
            *srcs, *strides, *ns, out, out.stride(0), scale, M,
            _MIN_SCALE * E4M3_MAX, NSRC=len(dy2s), TO_E4M3=out.dtype == E4M3,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)


# widest row (the sources' widths, each padded to a power of two) the one-pass kernel
# holds in registers; wider rows (not measured) take the two-pass kernel
ONE_PASS_MAX = 32768


def quantise_config(widths: list) -> tuple[bool, int]:
    """``quantize_rows_into``'s kernel for sources of these widths: (one pass?, num_warps).
    H200, the 8B sites (bench/RESULTS.md, session 29): one pass at 8 warps for rows 4096
    and 4096 + 2 × 1024 wide (97 % and 94 % of the bandwidth; two passes 84 % and 66 %),
    at 16 warps for 2 × 16384 (90 %; 8 warps 74 %, 32 warps 71 %, two passes 57 %)."""
    width = sum(_pow2_at_least(n) for n in widths)
    if width > ONE_PASS_MAX:
        return False, 8
    return True, 8 if width <= 8192 else 16


def _pow2_at_least(n: int) -> int:
    return max(16, 1 << max(n - 1, 0).bit_length())


def _kernel_takes(dy2s: list) -> bool:
    return (triton is not None and dy2s[0].is_cuda and len(dy2s) <= MAX_SOURCES
            and all(d.stride(1) == 1 for d in dy2s))


def quantize_dy(dy2s: list) -> tuple[Tensor, Tensor]:
    """``quantize_rows`` of the sites' dy concatenated along N (the same bytes), without
    the concatenation: ``(q (M, ΣN) e4m3, s (M, 1) fp32)``. CUDA: one Triton launch
    (module docstring); elsewhere, or if it fails (warned once), PyTorch."""
    M, N = dy2s[0].shape[0], sum(d.shape[1] for d in dy2s)
    q = torch.empty(M, N, dtype=E4M3, device=dy2s[0].device)
    if _kernel_takes(dy2s):
        s = torch.empty(M, dtype=torch.float32, device=q.device)
        try:
            quantize_rows_into(dy2s, q, s)
            return q, s.reshape(-1, 1)
        except Exception as e:  # never crash training over the optional kernel
            warn_once(f"lorafuse: Triton fp8 quantisation failed ({type(e).__name__}: "
                      f"{e}); using PyTorch")
    return q, quantize_dy_pytorch(dy2s, q)


def quantize_dy_pytorch(dy2s: list, q: Tensor) -> Tensor:
    """``quantize_dy``'s PyTorch path (and the benchmark's eager row): writes q, returns s."""
    s = _row_scales(dy2s)
    inv = (1.0 / s).reshape(-1, 1)
    off = 0
    for d in dy2s:  # exact in bf16 (a power of two); the copy rounds once
        q[:, off:off + d.shape[1]].copy_(d * inv.to(d.dtype))
        off += d.shape[1]
    return s


def _recording(w: Tensor) -> bool:
    """Whether a CUDA graph is being recorded on ``w``'s device's current stream: then the
    graph reads a value handed out now at that address in every replay."""
    return w.is_cuda and torch.cuda.is_current_stream_capturing()


class _WeightCache:
    """What ``build`` makes of frozen weights (or of several concatenated along N, a q/k/v
    group's): their fp8 copies and scales, or the scales alone; keyed by their storages;
    an entry is dropped when one of its storages is freed, and rebuilt when it is asked
    for a different view of those storages or a weight was modified in place since (a
    version counter moved).

    CUDA graphs (Inductor's ``triton.cudagraphs``): a graph recorded while reading an
    entry reads that memory in every replay, with no Python to look the entry up again.
    So an entry read during a recording is never freed by ``clear`` or a rebuild: it is
    kept aside (``_graph_held``), with a warning that those replays still see the old
    weights.

    Whose version counter: a view that a compiled graph makes of a parameter (Inductor's
    ``reinterpret_tensor``: GPT-2's Conv1D weight, transposed) has its own counter, fresh
    at every step, that the parameter's in-place updates never move. So an entry reads the
    counters of the tensors it was built from while they live (``prebuild`` names the
    parameters themselves), and the asked-for weights' own after that."""

    def __init__(self, build):
        self._build = build  # weights (a list) -> the value kept
        self._entries: dict = {}  # key -> (sig, version sources (weakrefs), versions, value)
        self._captured: set = set()  # keys whose value a CUDA graph recording read
        self._graph_held: list = []  # values dropped (clear, a rebuild) that graphs read

    @staticmethod
    def _sig(w: Tensor) -> tuple:
        return (w.data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()), w.dtype,
                w.device)

    @staticmethod
    def _current(entry, weights) -> bool:
        _, refs, versions, _ = entry
        for ref, v, w in zip(refs, versions, weights):
            src = ref()
            if (src if src is not None else w)._version != v:
                return False
        return True

    def get(self, weights: list, version_of: list | None = None):
        """The cached value for ``weights`` (a group's, concatenated along N), made now if
        absent or stale; ``version_of``: the tensors whose version counters stand for the
        weights' (their parameters, where ``weights`` are views made by a graph)."""
        storages = [w.untyped_storage() for w in weights]
        key = tuple(id(s) for s in storages)
        sig = tuple(self._sig(w) for w in weights)
        capturing = _recording(weights[0])
        hit = self._entries.get(key)
        if hit is not None and hit[0] == sig and self._current(hit, weights):
            if capturing:
                self._captured.add(key)
            return hit[3]
        if hit is not None and key in self._captured:  # stale, but recorded graphs read it
            self._hold_for_graphs([hit[3]], "a frozen weight changed in place after CUDA "
                                  "graphs were recorded reading its fp8_dx cache entry")
            self._captured.discard(key)
        value = self._build(weights)
        if capturing:
            self._captured.add(key)
        if hit is None:  # first entry for these storages: evict when any of them goes
            for s in storages:
                weakref.finalize(s, self._forget, key)
        sources = list(version_of or weights)
        if version_of is None and hit is not None:  # a rebuild keeps the parameters it knew
            sources = [src if (src := r()) is not None else t for r, t in zip(hit[1], sources)]
        self._entries[key] = (sig, [weakref.ref(t) for t in sources],
                              [t._version for t in sources], value)
        return value

    def _forget(self, key) -> None:
        self._entries.pop(key, None)
        self._captured.discard(key)

    def clear(self) -> None:
        """Drop every entry (the next backward rebuilds what it needs). An entry that a CUDA
        graph recording read (Inductor's ``triton.cudagraphs``) is not freed but kept
        aside, warned: its replays read that memory at its recorded address, and freed it
        could be handed to another tensor (wrong gradients, no error)."""
        held = [entry[3] for key, entry in self._entries.items() if key in self._captured]
        if held:
            self._hold_for_graphs(held, f"fp8_dx's cache was cleared while CUDA graphs "
                                  f"recorded reading {len(held)} of its entries may replay")
        self._entries.clear()
        self._captured.clear()

    def release_graph_held(self) -> int:
        """Free what ``clear`` or a rebuild kept aside for CUDA graphs; returns the bytes.
        Only once no graph recorded before then can replay (the compiled model is gone, or
        its graphs were reset: ``torch.compiler.reset()``)."""
        freed = sum(t.nbytes for value in self._graph_held for t in value)
        self._graph_held.clear()
        return freed

    def _hold_for_graphs(self, values: list, what: str) -> None:
        self._graph_held.extend(values)
        gib = sum(t.nbytes for value in values for t in value) / 2**30
        warnings.warn(f"lorafuse: {what}: those graphs' replays keep reading the old entry "
                      f"({gib:.2f} GiB, kept allocated for them), not the weights as they "
                      "are now; compile again to use them", RuntimeWarning, stacklevel=3)

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        """Bytes the cached values take."""
        return sum(sum(t.nbytes for t in value) for *_, value in self._entries.values())


def _copy_of(weights: list) -> tuple[Tensor, Tensor]:
    return quantize_weight_t(weights[0] if len(weights) == 1 else torch.cat(weights, dim=0))


def _scales_of(weights: list) -> tuple[Tensor, Tensor]:
    s = weight_scales(weights)
    return s, (1.0 / s).reshape(-1)


# fp8_copies (the default): W's fp8 copy and scales, kept. Without: W's scales and their
# inverses alone (2 × K fp32), kept, and W cast in every backward (``cast_weights_t``).
weight_cache = _WeightCache(_copy_of)
scale_cache = _WeightCache(_scales_of)

PREBUILD_DEVICES = ("cuda",)  # where ``prebuild`` makes copies (tests add "cpu")


def prebuild(sites: list) -> int:
    """Make the fp8 copies (or scales alone) of these sites' frozen weights now, at compile
    time, where ``fp8_dx`` will take them; returns the bytes made. ``sites``: ``(weights,
    parameters, M, copies)``: the weights as the op will get them, the parameters they are
    views of, M the site's rows of dy as traced (None where they vary from batch to batch:
    the copy is made, and each batch's M is checked when it runs), and whether the op
    keeps copies or only scales.

    Why not at the first backward: under Inductor's CUDA graphs that first run is its
    warm-up, which allocates in the graphs' private memory pool; a copy kept from there is
    a block the pool knows nothing of, and the pool may hand it out again when it restores
    an earlier state (a recording on another path). Made here they are ordinary
    allocations, and the first step's peak is no longer their moment."""
    made = 0
    for weights, params, M, copies in sites:
        w0 = weights[0]
        if w0.device.type not in PREBUILD_DEVICES or any(w.dtype != w0.dtype for w in weights):
            continue
        N = sum(w.shape[0] for w in weights)
        if not supported(16 if M is None else M, N, w0.shape[1], w0.dtype, w0.device):
            continue  # fp8_dx will not run here: no copy
        cache = weight_cache if copies else scale_cache
        before = cache.nbytes()
        cache.get(list(weights), version_of=list(params))
        made += cache.nbytes() - before
    return made


def fp8_dx(dy2s: list, weights: list, copies: bool = True):
    """``Σ_i dy_i @ W_i`` (one site, or a group's sites concatenated along N) with dy and W
    in e4m3 (module docstring), accumulated in fp32 and rounded once to dy's dtype; W's
    fp8 copy kept (``copies``) or cast now from its kept scales (the same bytes); callers
    check ``applies`` first. None after an error (a torch without the rowwise kernel, say):
    the caller computes the exact product, and so does every later call in this process
    (``supported`` says no), warned once: never crash training over the opt-in path."""
    try:
        q, sa = quantize_dy(dy2s)
        if copies:
            wq, sb = weight_cache.get(list(weights))
        else:
            sb, inv = scale_cache.get(list(weights))
            wq = cast_weights_t(list(weights), inv)
        return scaled_mm(q, wq.t(), sa, sb, dy2s[0].dtype)
    except Exception as e:
        _failed.append(e)
        warn_once(f"lorafuse: fp8_dx failed ({type(e).__name__}: {e}); dy W is exact from "
                  "here on")
        return None
