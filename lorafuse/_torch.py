"""The PyTorch internals lorafuse builds on, in one place.

None of these is a documented stable API; each is the hook DESIGN.md chose, checked to
exist unchanged on torch 2.11 (the GPU machine) through 2.13 (CI). If one moves in a
later release, this is the one file to change.
"""

import copy

import torch
from torch._dynamo.exc import RestartAnalysis  # noqa: F401  Dynamo's "trace again" signal: never swallow it
from torch._dynamo.utils import counters  # noqa: F401  per-pass match counts (users read them here)
# activation_memory_budget, patched per partition (memory_budget; checked on 2.13, not yet on 2.11)
from torch._functorch import config as functorch_config  # noqa: F401
from torch._functorch.partitioners import min_cut_rematerialization_partition  # noqa: F401  Inductor's default split
from torch._inductor import list_mode_options  # noqa: F401  torch.compile(mode=...) as config patches
from torch._inductor.compile_fx import compile_fx  # noqa: F401  Inductor's entry point, with config_patches
from torch._inductor import config as inductor_config  # noqa: F401  which config_patches keys exist
from torch._inductor.custom_graph_pass import CustomPartitionerFn  # noqa: F401  the partitioner hook's base
from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: F401  post-grad pass hook's base
# the aten decompositions Inductor's graphs are traced with (code inlined into a partitioned
# graph must use the same ops: Inductor refuses an op it both decomposes and lowers)
from torch._inductor.decomposition import select_decomp_table  # noqa: F401
from torch._subclasses.fake_tensor import unset_fake_temporarily  # noqa: F401  real tensors at compile time
from torch.fx.experimental.symbolic_shapes import statically_known_true  # noqa: F401  compare sizes, no guards

# Bytes of a node as min-cut's memory budget counts them (size hints if symbolic).
try:
    from torch._functorch.partitioners import _size_of  # noqa: F401
except ImportError:  # present in 2.13 (and 2.3); should it move, keep lorafuse importable
    def _size_of(node) -> int:
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor) or not isinstance(v.numel(), int):
            return 0
        return v.numel() * v.element_size()


def gpu_spin(cycles: int) -> None:
    """Queue a kernel that keeps the current CUDA stream busy for ``cycles`` clock cycles
    (``torch.cuda._sleep``: the only way to hold a stream without memory or a sync). The
    per-shape timer's stand-in for its heating GEMMs when their operands do not fit: the
    timed calls are still all queued before the GPU reaches them, so the CUDA events time
    kernels, not the host's launches (not at the power cap, though)."""
    torch.cuda._sleep(cycles)


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of a Dynamo graph to restore from. ``deepcopy`` keeps ``meta`` but drops the
    ``_dynamo_source`` attribute Dynamo sets on placeholders (outside ``meta``), which
    AOTAutograd needs."""
    new = copy.deepcopy(graph)
    old_ph = [n for n in graph.nodes if n.op == "placeholder"]
    new_ph = [n for n in new.nodes if n.op == "placeholder"]
    for a, b in zip(old_ph, new_ph):
        if hasattr(a, "_dynamo_source"):
            b._dynamo_source = a._dynamo_source
    return new


# --- aten's fused attention kernels, called directly ----------------------------------------
# Public SDPA returns no log-sum-exp, so a custom op that calls it must recompute its forward
# in the backward (the masked_attention op's causal and masked branches did). Calling the
# kernel public SDPA would pick, through its aten op, keeps the lse for the backward: at the
# 8B attention shape on the H200 the masked call's forward + backward went from 2.21 ms
# (recomputed) to 1.65 ms (bench/probe_sdpa_lse.py, bench/RESULTS.md session 13). The ops'
# schemas are checked on 2.11 and 2.13; positional arguments throughout.
from torch.nn.attention import SDPBackend  # noqa: E402

_CUDNN, _FLASH = SDPBackend.CUDNN_ATTENTION.value, SDPBackend.FLASH_ATTENTION.value


def fused_sdpa_kernel(q, k, v, mask, causal: bool, scale, enable_gqa: bool):
    """The kernel public SDPA would run for these inputs, as if they required grad (the op
    that asks is differentiated): ``"cudnn"`` or ``"flash"`` (CUDA's, or the CPU one) when
    it is one of those, else None (efficient or math, or float64: the caller keeps public
    SDPA)."""
    if q.dtype == torch.float64:  # the CPU kernel's lse is then float64, not float32
        return None
    if q.is_cuda and (q.shape[-1] % 8 or v.shape[-1] % 8):
        return None  # public SDPA pads such head dims for CUDA's flash before calling it
    grad = [t.detach().requires_grad_() for t in (q, k, v)]
    try:
        choice = torch._fused_sdp_choice(*grad, mask, 0.0, causal, scale=scale,
                                         enable_gqa=enable_gqa)
    except RuntimeError:  # no kernel allowed takes these inputs (e.g. only efficient
        return None       # enabled, which refuses enable_gqa): the caller tries others
    return {_CUDNN: "cudnn", _FLASH: "flash"}.get(choice)


def _additive(mask, dtype, kernel: str):
    """A boolean mask as the additive one public SDPA makes of it for ``kernel`` (cuDNN's
    masked value is -65504, not -inf: aten's convert_boolean_attn_mask_cudnn)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    masked = -65504.0 if kernel == "cudnn" else float("-inf")
    # two kernels (fill, then zero where visible), not three: once a layer, forward and backward
    return torch.full(mask.shape, masked, dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)


def fused_sdpa_forward(kernel: str, q, k, v, mask, causal: bool, scale):
    """``(out, lse)`` of ``kernel`` (from ``fused_sdpa_kernel``, asked with these inputs):
    out as the kernel lays it out, lse float32 (B, H, Lq)."""
    a = torch.ops.aten
    bias = _additive(mask, q.dtype, kernel)
    if kernel == "cudnn":
        r = a._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, causal, False,
                                                  scale=scale)
        return r[0], r[1].view(q.shape[:3])  # cuDNN's lse is (B, H, Lq, 1)
    if q.is_cuda:  # flash takes no mask (the choice says flash only without one)
        r = a._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return r[0], r[1]
    out, lse = a._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                             attn_mask=bias, scale=scale)
    return out, lse.contiguous()  # the CPU kernel's lse is laid out (B, Lq, H)


def laid_out_like(t, ref):
    """``t`` in the memory order of ``ref`` (aten's ``alloc_with_matching_layout``, how
    cuDNN's forward lays out its out): ``t`` itself where the strides already are, else a
    copy."""
    order = sorted(range(ref.dim()), key=ref.stride)  # stable: innermost first, as aten's
    strides, step = [0] * t.dim(), 1
    for i in order:
        strides[i], step = step, step * t.shape[i]
    if list(t.stride()) == strides:
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def fused_sdpa_backward(kernel: str, dout, q, k, v, out, lse, mask, causal: bool, scale):
    """(dq, dk, dv) of ``fused_sdpa_forward``'s call, from its saved out and lse. Without
    dropout the kernels read no RNG state: an empty seed and offset stand in."""
    a = torch.ops.aten
    # made again rather than saved: one elementwise kernel, where saving would keep a
    # (B, 1, L, L) additive mask alive per layer until the backward
    bias = _additive(mask, q.dtype, kernel)
    if kernel == "cudnn":
        # torch caches cuDNN's backward graph per q, k, v and bias (sizes, strides) but bakes
        # out's and dout's strides into it: a later call with the same q, k, v and bias and
        # other out or dout strides replays the first call's graph and returns wrong
        # gradients, silently (bench/probe_cudnn_layouts.py: relative errors 1.4-3.3 on the
        # H200, torch 2.11, cuDNN 9.19; session 14's failed GPU test). Every call here gives
        # both in q's memory order, as public SDPA's forward lays out its out (public SDPA's
        # dout usually follows that out), so calls that share a graph agree on its strides.
        out, dout = laid_out_like(out, q), laid_out_like(dout, q)
        rng = torch.empty((), dtype=torch.long, device=q.device)
        return a._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), rng, rng, bias, None, None, q.shape[2],
            k.shape[2], 0.0, causal, scale=scale)
    if q.is_cuda:
        rng = torch.empty((), dtype=torch.long, device=q.device)
        return a._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, rng,
            rng, scale=scale)
    return a._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale)


def scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """``(a · scale_a) @ (b · scale_b)`` for e4m3 ``a`` (row-major) and ``b`` (column-major)
    with rowwise fp32 scales (``(M, 1)``, ``(1, N)``), accumulated in fp32, rounded once to
    ``out_dtype``: ``torch._scaled_mm`` (rowwise-scaled on sm90+; a CPU kernel in recent torch),
    the only fp8 GEMM in PyTorch; same signature on 2.11 through 2.13."""
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
