"""The partitioner hook: splits Inductor's joint graph into forward and backward.

It delegates to min-cut rematerialization (Inductor's default) and records what the
backward keeps, for the report. By default (``memory_budget="auto"``) that plan stands
unless its activations would not fit in the GPU memory free at compile time; then that
becomes the budget. (A compiled graph found in PyTorch's caches is not partitioned again:
its plan is the one made when it was compiled.) With a fraction or size as
``memory_budget``, it bounds the activations the backward keeps and lets min-cut's own
knapsack choose what to recompute instead (cheapest by FLOPs first): see
``parse_memory_budget`` for what the budget means and ``LorafusePartitioner._budgeted``
for how it is mapped onto torch's ``activation_memory_budget``. With ``activation_dtype``
set, ``quantize_saved`` then stores the large activations the backward keeps as int8/fp8
with per-row scales. The ``recompute_free`` option (without a budget; ``recompute_free``
below) drops from min-cut's plan what cheap ops rebuild from tensors the backward keeps
anyway. With ``offload_activations``, ``offload_saved`` moves the large activations the
backward keeps to CPU memory after the forward and brings each back, prefetched, before the
backward needs it (kernels/offload.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import operator
import os
import re
import warnings
from pathlib import Path

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.checkpoint import CheckpointPolicy

from ._torch import (CustomPartitionerFn, _size_of, counters, functorch_config,
                     min_cut_rematerialization_partition, select_decomp_table,
                     statically_known_true)
# Every op a compiled graph may call is registered at import: a graph loaded from
# PyTorch's caches in a new process calls them by name, and no pass runs before it does
# (session 34: a warm cache raised "no attribute 'lora_linear_group_fp8'" on the H200)
from .kernels import fp8_recompute as _fp8_recompute_ops  # noqa: F401
from .kernels import offload as _offload_ops  # noqa: F401
from .kernels._dispatch import warn_once
from .layer_checkpoint import _LORAFUSE_ATTENTION, tag_layers
from .kernels.quant_storage import (FLOAT_DTYPES, STORAGE_DTYPES, dequantize_rows,
                                    quantize_rows)

_SOURCES = sorted(str(p) for p in Path(__file__).parent.rglob("*.py"))


@functools.lru_cache(maxsize=None)
def _sources_digest() -> str:
    h = hashlib.sha256()
    for path in _SOURCES:
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def source_hash(extra: str = "") -> str:
    """Hash of lorafuse's sources and ``extra``: a cache key that changes with the code."""
    return hashlib.sha256((_sources_digest() + extra).encode()).hexdigest()


_GIB = 2**30
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(GiB|MiB)\s*$")


AUTO = ("auto", None)
AUTO_FRACTION = 0.7  # of the GPU memory free at compile time that "auto" lets activations take


def parse_memory_budget(value):
    """The ``memory_budget`` option, checked: ``None`` (no budget: min-cut's
    runtime-optimal plan), ``AUTO``, ``("fraction", f)`` or ``("bytes", n)``.

    ``"auto"`` (the default): min-cut's plan, unless its activations would not fit in
    ``AUTO_FRACTION`` of the GPU memory free when the graph compiles; then that many bytes
    become the budget (a warning says so). On CPU it is no budget.

    What the budget bounds: the **activation bytes kept for the backward** of each compiled
    graph, i.e. the tensors the forward saves that are not graph inputs (parameters and the
    batch are resident anyway, so keeping them costs nothing), sized at the shapes of the
    compile (size hints where shapes are dynamic).

    - a number ``f`` in [0, 1]: at most ``f`` times the activation bytes min-cut keeps
      without a budget (1.0: that plan; 0.0: no activations, the backward recomputes the
      whole forward from the inputs);
    - a string ``"<x> GiB"`` or ``"<x> MiB"``: at most that many bytes, per compiled graph.

    The outputs of random ops (dropout masks) are always kept, never recomputed: where
    they alone exceed the budget, it is not met, and the report and a warning say so.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"lorafuse: memory_budget={value!r}: expected None, 'auto', a "
                         "fraction in [0, 1] or a size such as '4GiB'")
    if isinstance(value, (int, float)):
        f = float(value)
        if not math.isfinite(f) or not 0.0 <= f <= 1.0:
            raise ValueError(
                f"lorafuse: memory_budget={value!r}: a number is a fraction in [0, 1] of the "
                "activation bytes kept without a budget; give an absolute size as a string, "
                "e.g. '4GiB' or '512MiB'")
        return ("fraction", f)
    if isinstance(value, str) and value.strip().lower() == "auto":
        return AUTO
    if isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"lorafuse: memory_budget={value!r}: expected a size such as "
                             "'4GiB' or '512MiB', 'auto', or a fraction in [0, 1]")
        scale = _GIB if m.group(2) == "GiB" else 2**20
        return ("bytes", int(float(m.group(1)) * scale))
    raise ValueError(f"lorafuse: memory_budget={value!r}: expected None, 'auto', a fraction "
                     "in [0, 1] or a size such as '4GiB'")


class LorafusePartitioner(CustomPartitionerFn):
    def __init__(self, options: dict, report=None, cudagraphs: bool = False):
        # LORAFUSE_KEEP_RESIDUAL=0: checkpoint_layers with offloading recomputes the
        # post-attention residual as before session 25 (an A/B switch for the benchmarks)
        self._keep_residual = os.environ.get("LORAFUSE_KEEP_RESIDUAL", "1") != "0"
        # compiled for Inductor's CUDA graphs: offloading uses the ops they can record
        self._cudagraphs = bool(cudagraphs)
        self._key = source_hash(json.dumps(options, sort_keys=True, default=str)
                                + f"keep_residual={self._keep_residual}"
                                + f"cudagraphs={self._cudagraphs}")
        self._budget = parse_memory_budget(options.get("memory_budget"))
        self._budget_text = str(options.get("memory_budget")).strip()  # as the user wrote it
        self._storage_dtype = parse_activation_dtype(options.get("activation_dtype"))
        self._recompute_free = bool(options.get("recompute_free", False))
        self._offload = bool(options.get("offload_activations", False))
        self._prefetch = int(options.get("offload_prefetch", 1))
        self._checkpoint = options.get("checkpoint_layers", False)  # False, True or "full"
        self._fp8_recompute = bool(options.get("fp8_recompute", False))
        self._report = report

    def __call__(self, gm, joint_inputs, **kwargs):
        inputs = _graph_inputs(gm)
        budget, limit = self._budget, None
        keep_residual = self._checkpoint is True and self._offload and self._keep_residual
        checkpointed = (tag_layers(gm, _draws_random, keep_attention=self._checkpoint != "full",
                                   residual_ops=set(_lowrank_only_ops()) if keep_residual else ())
                        if self._checkpoint else None)
        if checkpointed and checkpointed["layers"]:
            budget = None  # the layers' recompute is the plan (Options forbids a budget)
        if budget == AUTO:
            budget, limit = None, _auto_budget_bytes(joint_inputs, _fp8_copies_to_make(gm))
        if budget is None:  # min-cut as configured, one call
            fwd, bwd = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
            plan = None
            if self._recompute_free:
                fwd, bwd = recompute_free(gm, joint_inputs, kwargs, fwd, bwd, inputs,
                                          self._report)
            act = _saved_bytes(bwd, inputs)[0] if limit is not None else None  # "auto" only
            if act is not None and act > limit:  # would not fit: "auto" sets a budget
                text = f"auto ({limit / _GIB:.2f} GiB)"
                warnings.warn(
                    f"lorafuse: this graph's activations ({act / _GIB:.2f} GiB) would not fit "
                    f"in {AUTO_FRACTION:.0%} of the GPU memory free now; recomputing to keep "
                    f"at most {limit / _GIB:.2f} GiB (memory_budget='auto'; memory_budget=None "
                    "turns this off). At long sequences checkpoint_layers=True with "
                    "offload_activations and the 'loss' pass is likely faster and far smaller "
                    "(README, 'Long context')", stacklevel=2)
                fwd, bwd, plan = self._budgeted(gm, joint_inputs, kwargs, ("bytes", limit),
                                                text)
        else:
            fwd, bwd, plan = self._budgeted(gm, joint_inputs, kwargs, budget,
                                            self._budget_text)
        try:
            lowrank_only = lowrank_only_recomputes(bwd)
        except Exception as e:  # an optimisation: never the reason a compile fails
            warn_once(f"lorafuse: recomputed LoRA linears left whole ({type(e).__name__}: {e})")
            lowrank_only = 0
        fp8_recomputed = 0
        if self._fp8_recompute:
            try:
                fp8_recomputed = fp8_recomputes(bwd)
            except Exception as e:  # an optimisation: never the reason a compile fails
                warn_once(f"lorafuse: fp8_recompute not applied ({type(e).__name__}: {e})")
        quantized = None
        if self._storage_dtype is not None:
            quantized = quantize_saved(fwd, bwd, inputs, kwargs["num_fwd_outputs"],
                                       self._storage_dtype)
        offloaded = None
        if self._offload:
            offloaded = offload_saved(fwd, bwd, inputs, kwargs["num_fwd_outputs"],
                                      self._prefetch, capturable=self._cudagraphs)
            warn_if_host_short(offloaded["bytes"])
        self._record(fwd, bwd, inputs, plan, quantized, offloaded, checkpointed, lowrank_only,
                     fp8_recomputed)
        return fwd, bwd

    def _budgeted(self, gm, joint_inputs, kwargs, budget, budget_text):
        """Min-cut under a budget on the activation bytes kept for the backward.

        torch's knob, ``torch._functorch.config.activation_memory_budget = r``, bounds the
        bytes of *all* saved values, graph inputs included, as
        ``inputs + r * (default - inputs)`` where ``inputs`` is the bytes of every graph
        input (used in the backward or not) and ``default`` what min-cut saves at r = 1
        (``choose_saved_values_set``; r = 0 saves the inputs only). For a LoRA model that
        mixes the frozen weights into a bound on activations, and when the default plan
        keeps fewer bytes than all inputs together (a large embedding, a short batch)
        every 0 < r < 1 is silently the default plan. So: one min-cut at r = 1 gives the
        default plan, and from its bytes the activation target becomes torch's r.

        Cheap before expensive, in two tiers. torch's knapsack weighs recompute cost by
        FLOPs, but ops outside its own list (lorafuse's fused LoRA and attention ops, any
        custom op, CPU attention) are not even candidates there: min-cut recomputes them
        as if free, before any norm (measured: at r = 0.36 a Llama layer recomputed both
        grouped LoRA projections and the attention, and no norm). Tier 1 pins every
        matmul/attention/custom op MUST_SAVE, so only cheap ops (norms, rope, activations,
        casts, elementwise) are recomputed: r, then r's floor. Only if that cannot meet the
        target does tier 2 unpin them and let torch choose among everything: r, then 0
        (with custom ops as knapsack candidates: ``_tier_config``).
        Each plan is measured from the backward graph it produced; the first within the
        target is used. Cost: 2 to 5 min-cut solves per graph instead of 1, only with a
        budget (2 where cheap recomputes suffice).

        Random ops (dropout): torch's knapsack may choose to recompute them, and r = 0
        recomputes the whole forward; either draws a new mask in the backward and gives
        silently wrong gradients (measured: LoRA dropout 0.1, relative gradient error ~2).
        So random ops stay pinned MUST_SAVE in both tiers (the tag torch's own partitioner
        uses for collectives), which the knapsack respects and r = 0 would ignore, so
        their floor is the smallest r > 0; and a plan that still redraws one is dropped.
        """
        if not hasattr(functorch_config, "activation_memory_budget"):  # torch < 2.4
            raise RuntimeError("memory_budget needs torch._functorch.config."
                               "activation_memory_budget (torch >= 2.4)")
        inputs = _graph_inputs(gm)  # before min-cut, which may replace gm.graph
        with functorch_config.patch(activation_memory_budget=1.0):
            fwd, bwd = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        default_plan = fwd, bwd
        default_act, default_in = _saved_bytes(bwd, inputs)
        kind, amount = budget
        target = int(amount * default_act) if kind == "fraction" else amount
        plan = {"target": target, "default_activation_bytes": default_act,
                "ratio": 1.0, "solves": 1, "tier": 0, "text": budget_text}
        if default_act <= target:  # the default plan fits: nothing to recompute
            return fwd, bwd, plan
        # min-cut replaced gm.graph (CSE): pin on the graph it will partition again.
        has_random = _pin(gm, _draws_random, "random")
        _pin(gm, _is_expensive, "expensive")
        unsaved_inputs = sum(_size_of(n) for n in gm.graph.nodes if n.name in inputs) - default_in
        ratio = _torch_ratio(target, default_act, unsaved_inputs)
        best = None
        for tier in (1, 2):
            if tier == 2:
                _unpin(gm, "expensive")
            floor = _RANDOM_FLOOR if (has_random or tier == 1) else 0.0
            for r in dict.fromkeys((max(floor, ratio), floor)):  # r, then the floor
                with functorch_config.patch(activation_memory_budget=r, **_tier_config(tier)):
                    fwd, bwd = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
                plan["solves"] += 1
                if _random_ops_in(bwd):  # would redraw a mask: never use it
                    continue
                act, _ = _saved_bytes(bwd, inputs)
                if best is None or act < best[0]:
                    best = (act, fwd, bwd, r, tier)
                if act <= target:
                    break
            if best is not None and best[0] <= target:
                break
        _unpin(gm, "random")
        _unpin(gm, "expensive")
        if best is None:
            # Every plan redrew a random op: the pins did not hold on this torch. Keep the
            # default plan rather than a wrong one.
            act, (fwd, bwd) = default_act, default_plan
            plan["note"] = ("budget not applied: torch's plans recomputed a random op "
                            "(dropout) in the backward; the default plan is used")
        else:
            act, fwd, bwd, plan["ratio"], plan["tier"] = best
            if act > target:  # only where random ops set the floor: say so, never hide it
                plan["note"] = (f"budget not met: {act:,} bytes kept > {target:,} bytes (the "
                                "outputs of random ops such as dropout are kept, not recomputed)")
        if "note" in plan:
            warnings.warn(f"lorafuse: memory_budget={budget_text}: {plan['note']}",
                          stacklevel=2)
        return fwd, bwd, plan

    def _record(self, fwd, bwd, inputs, plan=None, quantized=None, offloaded=None,
                checkpointed=None, lowrank_only=0, fp8_recomputed=0):
        if self._report is None:
            return
        try:
            self._record_into(fwd, bwd, inputs, plan, quantized, offloaded, checkpointed)
            self._report.lowrank_only = lowrank_only
            self._report.fp8_recomputed = fp8_recomputed
        except Exception as e:  # the report must never cost the user their compile
            self._report.budget_note = f"memory plan not recorded ({type(e).__name__}: {e})"

    def _record_into(self, fwd, bwd, inputs, plan, quantized, offloaded=None, checkpointed=None):
        saved = [n for n in bwd.graph.nodes
                 if n.op == "placeholder" and not n.name.startswith("tangents")]
        self._report.saved_for_backward = len(saved)
        self._report.saved_bytes = _static_bytes(saved)
        self._report.activation_bytes, _ = _saved_bytes(bwd, inputs)
        self._report.tokens = _tokens(fwd)
        # Forward nodes the backward computes again (names survive the split).
        forward = {n.name for n in fwd.graph.nodes if n.op == "call_function"}
        again = [n for n in bwd.graph.nodes if n.op == "call_function" and n.name in forward]
        self._report.recomputed_ops = len(again)
        self._report.recomputed_expensive = sum(map(_is_expensive, again))
        if plan is not None:
            self._report.memory_budget = plan["text"]
            self._report.budget_bytes = plan["target"]
            self._report.default_activation_bytes = plan["default_activation_bytes"]
            self._report.budget_ratio = plan["ratio"]
            self._report.budget_solves = plan["solves"]
            self._report.budget_tier = plan["tier"]
            self._report.budget_note = plan.get("note")
        if quantized is not None:
            self._report.activation_dtype = quantized["dtype"]
            self._report.quantized_tensors = len(quantized["names"])
            self._report.quantized_from_bytes = quantized["from_bytes"]
            self._report.quantized_to_bytes = quantized["to_bytes"]
            self._report.quantize_left_alone = quantized["left_alone"]
        if checkpointed is not None:
            self._report.checkpointed_layers = checkpointed["layers"]
            self._report.checkpoint_note = checkpointed.get("note")
            self._report.kept_residuals = checkpointed.get("residuals", 0)
        if offloaded is not None:
            self._report.offloaded_tensors = len(offloaded["names"])
            self._report.offloaded_bytes = offloaded["bytes"]
            self._report.offload_left_alone = offloaded["left_alone"]
            self._report.offload_capturable = offloaded.get("capturable", False)

    def __getstate__(self):
        # Inductor pickles its config, this object included, into its cache key: only the
        # key may go in, not the per-compile report, or no compile would ever hit the cache.
        # (The budget is in the key; a pickled copy never partitions.)
        return {"_key": self._key, "_budget": self._budget, "_budget_text": self._budget_text,
                "_recompute_free": self._recompute_free, "_offload": self._offload,
                "_prefetch": self._prefetch, "_checkpoint": self._checkpoint,
                "_keep_residual": self._keep_residual,
                "_storage_dtype": self._storage_dtype, "_report": None}

    def uuid(self):
        # Inductor keys its cache on this; None would let stale entries skip the hook.
        return self._key


# The smallest torch budget that still runs its knapsack (r = 0 skips it and ignores
# MUST_SAVE tags). Its knapsack quantises normalised sizes to 1e-4 ("dp" solver).
# Used where pins must hold: random ops (both tiers) and matmuls (tier 1).
_RANDOM_FLOOR = 1e-4


def _fp8_copies_to_make(gm) -> int:
    """Bytes of the fp8 weight copies the ``fp8_dx`` option will cache at this graph's first
    backward (kernels/fp8_dx.py): one byte an element of each persistent weight (a graph
    input, through views) of a LoRA op with ``fp8_dx``, less what the cache holds already
    (a recompile of the same model); a weight cast every step is a temporary, not counted."""
    from .kernels import fp8_dx
    from .kernels._ops import is_op

    weights = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not any(
                is_op(node.target, name) for name in ("lora_linear", "lora_linear_group")):
            continue
        if not _arg(node, "fp8_dx") or not _arg(node, "fp8_copies"):
            continue  # (without copies: a cast a step, a temporary)
        w = node.args[1]
        for n in (w if isinstance(w, (list, tuple)) else [w]):
            while isinstance(n, torch.fx.Node) and n.op == "call_function" and \
                    getattr(n.target, "is_view", False):
                n = n.args[0]
            if isinstance(n, torch.fx.Node) and n.op == "placeholder" and \
                    isinstance(n.meta.get("val"), torch.Tensor):
                weights[n] = n.meta["val"].numel()
    return max(0, sum(weights.values()) - fp8_dx.weight_cache.nbytes())


def _auto_budget_bytes(joint_inputs, reserve: int = 0):
    """``AUTO_FRACTION`` of the memory free on the graph's GPU now, less ``reserve`` bytes
    the step will allocate outside the plan (``_fp8_copies_to_make``), or None off the GPU.
    Free: the driver's free memory plus what PyTorch's caching allocator holds unused, and
    no more than a ``torch.cuda.set_per_process_memory_fraction`` cap leaves."""
    device = next((t.device for t in _flat_tensors(joint_inputs) if t.device.type == "cuda"),
                  None)
    if device is None or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + max(torch.cuda.memory_reserved(device) - allocated, 0)
    cap = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if cap is not None and cap(device) < 1.0:
        available = min(available, int(cap(device) * total) - allocated)
    return int(AUTO_FRACTION * max(available - reserve, 0))


def _flat_tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat_tensors(y)


_FREE_CONE = 8  # at most this many ops recomputed for one saved tensor


def _free_cone(node, saved: set, inputs: set, limit: int = _FREE_CONE):
    """The cheap ops to recompute ``node`` from tensors the backward keeps anyway (saved
    values, graph inputs), ``node`` included; None if it needs more than ``limit`` ops,
    an expensive or random op, or a value that is not kept."""
    cone, stack = [], [node]
    while stack:
        n = stack.pop()
        if n in cone:
            continue
        if (n.op != "call_function" or _is_expensive(n) or _draws_random(n)
                or (n.meta.get("recompute") is not None and n.meta.get(_PIN) != "free")
                or getattr(n.target, "namespace", None) not in ("aten", "prims")):
            return None
        cone.append(n)
        if len(cone) > limit:
            return None
        for a in n.all_input_nodes:
            if a.name in saved or a.name in inputs or a.op == "placeholder":
                continue
            if not isinstance(a.meta.get("val"), torch.Tensor):
                return None  # symbolic sizes: leave min-cut's plan alone
            stack.append(a)
    return cone


def recompute_free(gm, joint_inputs, kwargs, fwd, bwd, inputs, report=None):
    """The ``recompute_free`` option: drop from min-cut's plan every saved activation that
    cheap ops (norm scaling, activations, casts, elementwise: no matmul, attention, custom
    or random op) recompute from what the backward keeps anyway. Those ops are tagged
    MUST_RECOMPUTE and min-cut runs once more; its plan is kept only if it saves fewer
    bytes and redraws nothing random. It costs memory-bound recompute in the backward and
    no extra saved bytes: in a Llama layer, the MLP's ``act(gate) * up`` (the gate and up
    outputs are kept for its backward) and each RMSNorm's output (the norm's input and
    inverse RMS are kept)."""
    saved = {n.name for n in bwd.graph.nodes if n.op == "placeholder"
             and not n.name.startswith("tangents")}
    by_name = {n.name: n for n in gm.graph.nodes}
    tagged = []
    for name in sorted(saved - inputs):
        node = by_name.get(name)
        cone = _free_cone(node, saved, inputs) if node is not None else None
        if cone is None:
            continue
        for n in cone:
            if n.meta.get("recompute") is None:
                n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                n.meta[_PIN] = "free"
                tagged.append(n)
    if not tagged:
        return fwd, bwd
    try:
        fwd2, bwd2 = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
    finally:
        _unpin(gm, "free")
    before, after = _saved_bytes(bwd, inputs)[0], _saved_bytes(bwd2, inputs)[0]
    if after >= before or _random_ops_in(bwd2):
        return fwd, bwd
    if report is not None:
        report.recompute_free_bytes = before - after
    return fwd2, bwd2


def _tier_config(tier: int) -> dict:
    """Tier 2: custom ops (lorafuse's fused ops) become knapsack candidates, sized like
    any other, instead of being recomputed wholesale as if free (measured, 8-layer tiny
    Llama at budget 0.5: 13 instead of 32 matmul/attention/custom ops recomputed, 227 KiB
    kept of 245 KiB allowed instead of 58 KiB). Without a flop formula torch costs each
    such op 1, like a norm: the knapsack then trades them by size alone."""
    if tier == 2 and hasattr(functorch_config, "is_non_builtin_to_include"):
        return {"is_non_builtin_to_include": True}
    return {}


_PIN = "lorafuse_pin"  # node.meta key: which of our pins set node.meta["recompute"]


def _pin(gm, predicate, why: str) -> int:
    """Tag MUST_SAVE every node that ``predicate`` accepts and no checkpoint policy tags
    yet (a user's own policy wins); returns how many it accepts."""
    n = 0
    for node in gm.graph.nodes:
        if predicate(node):
            n += 1
            if node.meta.get("recompute") is None:
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                node.meta[_PIN] = why
    return n


def _unpin(gm, why: str) -> None:
    for node in gm.graph.nodes:
        if node.meta.get(_PIN) == why:
            del node.meta["recompute"], node.meta[_PIN]


# aten ops whose recompute costs a matmul or an attention (torch's own compute-intensive
# list, plus the CPU attention kernels it leaves out).
_EXPENSIVE_ATEN = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_mm", "_int_mm")


# lorafuse's elementwise / normalisation ops: memory-bound, as cheap to redo as the aten
# chains they replace, so tier 1 may recompute them like the norms and activations it stands for.
_CHEAP_LORAFUSE = ("rms_norm", "layer_norm", "rope", "gated_mlp")


def _is_expensive(node) -> bool:
    """A matmul, an attention, or any op outside aten/prims (lorafuse's fused ops,
    bitsandbytes, Triton kernels, higher-order ops): recomputed only in tier 2."""
    if node.op != "call_function":
        return False
    namespace = getattr(node.target, "namespace", None)
    if namespace is None:
        return False  # Python callables: getitem, symbolic size arithmetic
    if namespace == "lorafuse" and str(node.target).split(".")[1] in _CHEAP_LORAFUSE:
        return False
    if namespace not in ("aten", "prims"):
        return True
    name = str(node.target).split(".")[1]
    return name in _EXPENSIVE_ATEN or "attention" in name


def _draws_random(node) -> bool:
    """A node whose op is tagged random and may really draw: SDPA carries the tag for its
    ``dropout_p``, so an op whose ``dropout_p``/``p`` argument is 0 is deterministic."""
    if node.op != "call_function" or torch.Tag.nondeterministic_seeded not in getattr(
            node.target, "tags", ()):
        return False
    schema = getattr(node.target, "_schema", None)
    for i, arg in enumerate(getattr(schema, "arguments", ())):
        if arg.name in ("dropout_p", "p"):
            value = node.kwargs.get(arg.name, node.args[i] if i < len(node.args)
                                    else arg.default_value)
            if isinstance(value, (int, float)) and value == 0:
                return False
    return True


def _random_ops_in(gm) -> bool:
    return any(_draws_random(n) for n in gm.graph.nodes)


def _graph_inputs(gm) -> set:
    """Names of the joint graph's primal inputs (parameters, buffers, the batch): saved
    values by these names are inputs, not activations. Names survive the split."""
    return {n.name for n in gm.graph.nodes if n.op == "placeholder"
            and not any(t in n.name for t in ("tangents", "bwd_seed", "bwd_base_offset"))}


def _saved_bytes(bwd, inputs) -> tuple[int, int]:
    """(activation bytes, input bytes) the backward graph takes from the forward, sized as
    min-cut's budget sizes them (size hints for symbolic shapes)."""
    act = inp = 0
    for n in bwd.graph.nodes:
        if n.op != "placeholder" or n.name.startswith("tangents"):
            continue
        if not isinstance(n.meta.get("val"), torch.Tensor):
            continue  # symbolic sizes, seeds: bytes, not tensors
        if n.name in inputs:
            inp += _size_of(n)
        else:
            act += _size_of(n)
    return act, inp


def _torch_ratio(target: int, default_act: int, unsaved_inputs: int) -> float:
    """torch's ``activation_memory_budget`` for at most ``target`` activation bytes.

    torch bounds all saved bytes by ``I + r (D - I)``, ``I`` all inputs, ``D`` the default
    plan. With ``D = S + A`` (saved inputs, activations) and ``U = I - S`` (inputs the
    backward does not need): keeping ``S`` plus ``target`` means
    ``r = (target - U) / (A - U)``. If ``A <= U`` torch ignores every 0 < r < 1 (it
    returns the default plan), so only r = 0 can cut activations."""
    if default_act <= unsaved_inputs:
        return 0.0
    return min(1.0, max(0.0, (target - unsaved_inputs) / (default_act - unsaved_inputs)))


def _tokens(fwd):
    """Tokens per call of the graph: the size of its first 2-D integer input (the batch's
    token ids, B × S), or None (no such input, or a symbolic size)."""
    for n in fwd.graph.nodes:
        v = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point() \
                and v.dtype != torch.bool:
            numel = v.numel()
            return numel if isinstance(numel, int) and numel > 0 else None
    return None


def _static_bytes(nodes):
    total = 0
    for n in nodes:
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        numel = v.numel()
        if not isinstance(numel, int):  # symbolic: int() would add a guard and specialise
            return None
        total += numel * v.element_size()
    return total


# --------------------------------------------------------------------------- quantized storage


def parse_activation_dtype(value):
    """The ``activation_dtype`` option, checked: ``None`` (activations are saved in the
    dtype the forward computed them in) or the storage dtype for ``"int8"`` / ``"fp8"``
    (float8_e4m3fn); both with one fp32 absmax per row (``kernels/quant_storage.py``)."""
    if value is None:
        return None
    if isinstance(value, str) and value in STORAGE_DTYPES:
        return STORAGE_DTYPES[value]
    raise ValueError(f"lorafuse: activation_dtype={value!r}: expected None, 'int8' or 'fp8'")


# What is worth quantizing: tensors of at least this many bytes (per-row statistics and
# small tensors cost little to keep), with rows of at least this many elements (the fp32
# scale per row costs 4 bytes: at 16 elements an fp32 row shrinks 3.2x, a bf16 row 1.8x).
QUANTIZE_MIN_BYTES = 64 * 2**10
QUANTIZE_MIN_ROW = 16

# Backward consumers of a saved activation (looking through views and casts), by what
# they do with its noise (|error| <= absmax/254 per element for int8). Accepted: matmuls
# and sums (the noise enters linearly), elementwise arithmetic and activation functions
# (the norm recomputed as x * rstd, silu/gelu backward), the input x of lorafuse's LoRA
# backward ops (only dA = (dy B s)^T x reads it). Refused: the tensor minus a per-row
# statistic saved from the exact values (the cross-entropy backward recomputes softmax as
# exp(logits - amax - log(sum)): the probabilities no longer sum to 1, and a noise d in a
# logit is a relative error d in its probability), attention backward ops (P recomputed
# as exp(q k^T - logsumexp): the same), softmax backward, and any op not listed
# (indexing, scatter, unknown custom ops).
_VIEWS = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand",
          "unsqueeze", "squeeze", "clone", "_to_copy", "convert_element_type", "alias"}
_ELEMENTWISE = {"mul", "add", "sub", "rsub", "div", "neg", "pow", "sigmoid", "tanh", "silu",
                "silu_backward", "gelu", "gelu_backward", "relu", "threshold_backward",
                "sigmoid_backward", "tanh_backward", "exp", "abs", "sqrt", "rsqrt", "erf"}
_SHIFTS = {"sub", "add", "rsub"}  # x - statistic: the softmax/log-softmax recompute
_LINEAR_SINKS = {"mm", "bmm", "addmm", "baddbmm", "sum", "mean"}
# lorafuse's backward ops: the arguments that only enter a matmul for a LoRA gradient
# (dA = (dy B s)^T x). Their saved ``h = x A^T`` is not listed: it is small (tokens x r,
# ~r/hidden of x's bytes) with r-element rows (the per-row scale costs 4 bytes per r). Its
# noise is not amplified (measured, tiny Llama, int8 h as well: worst dB relative error
# 0.0081 -> 0.0089), so the exclusion is about bytes, not accuracy.
_LORAFUSE_LINEAR_ARGS = {"lora_linear_backward": {"x_lora"},
                         "lora_linear_backward_ab": {"x_lora"},
                         "lora_linear_group_backward": {"x"}}


def _op_name(node) -> tuple[str | None, str | None]:
    """``(namespace, op name)`` of a call_function node's target, or ``(None, None)``."""
    if node.op != "call_function":
        return None, None
    namespace = getattr(node.target, "namespace", None)
    if namespace is None:
        return None, None
    return namespace, str(node.target).split(".")[1]


def _is_row_statistic(arg) -> bool:
    val = getattr(arg, "meta", {}).get("val")
    return isinstance(val, torch.Tensor) and val.dim() > 0 and val.shape[-1] == 1


def _refusing_consumer(node) -> str | None:
    """The first backward op that would not tolerate noise in ``node``'s value, or None."""
    for user in node.users:
        namespace, name = _op_name(user)
        if namespace in ("aten", "prims") and name in _VIEWS:
            refused = _refusing_consumer(user)
            if refused:
                return refused
            continue
        if namespace == "aten" and name in _SHIFTS and any(
                a is not node and _is_row_statistic(a) for a in user.args):
            return f"{namespace}.{name} with a saved per-row statistic (softmax recompute)"
        if namespace == "aten" and (name in _ELEMENTWISE or name in _LINEAR_SINKS):
            continue
        if namespace == "lorafuse" and name in _LORAFUSE_LINEAR_ARGS:
            args = [a.name for a in user.target._schema.arguments]
            used_as = {args[i] for i, a in enumerate(user.args) if a is node}
            used_as |= {k for k, a in user.kwargs.items() if a is node}
            if used_as <= _LORAFUSE_LINEAR_ARGS[name]:
                continue
        return f"{namespace}.{name}" if name else str(user.target)
    return None


def _aliases_input(node, inputs) -> bool:
    """A view (through any chain of views) of a graph input: no memory of its own."""
    while node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None:
            return False
        node = node.args[0]
    return node.op == "placeholder" or node.name in inputs


def _why_kept_as_is(node, inputs, user_outputs) -> str | None:
    """What rules out storing the saved tensor ``node`` any other way (quantized,
    offloaded) whatever its size or dtype, or None."""
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return "not a tensor"
    if node.op == "placeholder" or node.name in inputs or _aliases_input(node, inputs):
        return "graph input (kept anyway)"
    if node in user_outputs:
        return "also a forward output (kept anyway)"
    if node.meta.get("saved_tensor_with_no_vc_check", False):
        return "saved without version check"
    return None


def _why_not_quantized(node, saved, inputs, user_outputs) -> str | None:
    """Why the saved tensor ``node`` (its backward placeholder ``saved``) stays in its
    dtype, or None to quantize it."""
    why = _why_kept_as_is(node, inputs, user_outputs)
    if why is not None:
        return why
    val = node.meta["val"]
    if val.dtype not in FLOAT_DTYPES:
        return f"{val.dtype}"
    perm = _dense_order(val) if val.dim() else None
    if val.dim() and perm is None:
        return "not dense in any dimension order"
    row = val.shape[perm[-1]] if val.dim() else 0  # the rows run along the innermost dim
    if not isinstance(row, int) or row < QUANTIZE_MIN_ROW:
        return f"rows shorter than {QUANTIZE_MIN_ROW}"
    if _size_of(node) < QUANTIZE_MIN_BYTES:
        return f"smaller than {QUANTIZE_MIN_BYTES // 2**10} KiB"
    refused = _refusing_consumer(saved)
    return f"used by {refused}" if refused else None


def quantize_saved(fwd, bwd, inputs, num_fwd_outputs: int, storage_dtype) -> dict:
    """Store the saved activations that qualify (``_why_not_quantized``) quantized
    (``kernels/quant_storage.py``, inlined as aten ops), in place in both partitioned graphs.

    AOTAutograd's contract for the two graphs (torch 2.11–2.13, ``_extract_fwd_bwd_modules``
    and ``_categorize_saved_tensors_for_backward``): the forward returns
    ``user outputs (num_fwd_outputs) + saved tensors + saved opaque objects + saved
    symints``; the backward's placeholders are ``saved symints + saved tensors (same order)
    + opaque objects + tangents + seeds``. AOTAutograd counts the saved tensors from the
    forward's outputs after the partitioner returns, so a saved tensor x may be replaced,
    at its position in both lists, by two tensors (q, absmax); the names are kept equal on
    both sides (its saved-tensor-hooks check compares them). Tensors saved without a
    version-counter check are sorted last and counted by a meta flag: they are left alone.

    Returns ``{"dtype", "names", "from_bytes", "to_bytes", "left_alone": {reason: count}}``.
    """
    output = fwd.graph.find_nodes(op="output")[0]
    outs = list(output.args[0])
    user_outputs = set(outs[:num_fwd_outputs])
    saved_in_bwd = {n.name: n for n in bwd.graph.find_nodes(op="placeholder")}
    plan = {"dtype": str(storage_dtype).replace("torch.", ""), "names": [], "from_bytes": 0,
            "to_bytes": 0, "left_alone": {}}
    new_outs = list(outs[:num_fwd_outputs])
    for node in outs[num_fwd_outputs:]:
        saved = saved_in_bwd.get(getattr(node, "name", None))
        why = ("not used by the backward" if saved is None else
               _why_not_quantized(node, saved, inputs, user_outputs))
        if why is not None:
            new_outs.append(node)
            if isinstance(getattr(node, "meta", {}).get("val"), torch.Tensor):
                plan["left_alone"][why] = plan["left_alone"].get(why, 0) + 1
            continue
        perm = _dense_order(node.meta["val"])
        q, scale = _quantize_in_forward(fwd.graph, node, storage_dtype, perm)
        new_outs += [q, scale]
        _dequantize_in_backward(bwd.graph, saved, q, scale, _inverse(perm))
        plan["names"].append(node.name)
        plan["from_bytes"] += _size_of(node)
        plan["to_bytes"] += _size_of(q) + _size_of(scale)
    if plan["names"]:
        output.update_arg(0, tuple(new_outs))
        for gm in (fwd, bwd):
            gm.graph.lint()
            gm.recompile()
    return plan


def _inline(graph, fn, nodes, *consts):
    """``fn(*values of nodes, *consts)`` traced to aten ops on the nodes' fake values and
    copied into ``graph`` at its insertion point; returns the copy of fn's output (a node
    or a tuple of nodes), each with its fake value. Inlined rather than one opaque op so
    that Inductor compiles it with the kernels around it."""
    vals = [n.meta["val"] for n in nodes]
    mode = getattr(vals[0], "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        traced = make_fx(lambda *xs: fn(*xs, *consts), select_decomp_table(),
                         tracing_mode="real")(*vals)
    placeholders = traced.graph.find_nodes(op="placeholder")
    return graph.graph_copy(traced.graph, dict(zip(placeholders, nodes)))


def _renamed(graph, node, name):
    """``node`` recreated under ``name`` (AOTAutograd matches a saved tensor's name in the
    forward's outputs with the backward's placeholder)."""
    with graph.inserting_after(node):
        new = graph.create_node(node.op, node.target, node.args, node.kwargs, name=name)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _quantize_in_forward(graph, node, storage_dtype, perm):
    """``q, absmax`` (``quantize_rows`` of ``node.permute(perm)``, contiguous, inlined)
    right after ``node``: the full-precision tensor dies after its last forward use, not at
    the end of the forward."""
    with graph.inserting_before(node.next):  # (inserting_after(node) would reverse them)
        q, scale = _inline(graph, lambda x, dtype: quantize_rows(_permute(x, perm), dtype),
                           [node], storage_dtype)
    return [_renamed(graph, q, f"{node.name}_q"), _renamed(graph, scale, f"{node.name}_absmax")]


def _dequantize_in_backward(graph, saved, q, scale, inverse) -> None:
    """``saved`` (a placeholder) becomes two placeholders (q, absmax) at its position, and
    the dequantisation (``dequantize_rows``, inlined, permuted by ``inverse`` back to the
    saved tensor's strides) right before its first user (not at the top of the backward:
    the dequantized copy lives only from where it is needed)."""
    with graph.inserting_before(saved):
        q_in = graph.placeholder(q.name)
        scale_in = graph.placeholder(scale.name)
    q_in.meta["val"], scale_in.meta["val"] = q.meta["val"], scale.meta["val"]
    first_user = min(saved.users, key=_position(graph))
    with graph.inserting_before(first_user):
        value = _inline(graph, lambda c, a, dtype: _permute(dequantize_rows(c, a, dtype), inverse),
                        [q_in, scale_in], saved.meta["val"].dtype)
    saved.replace_all_uses_with(value)
    graph.erase_node(saved)


def _position(graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


def _dense_order(val) -> list | None:
    """A permutation ``perm`` with ``val.permute(perm)`` contiguous (the identity for a
    contiguous tensor), or None where no permutation is provably one (overlapping, gapped,
    or strides whose order the symbolic sizes leave open). Attention's q, k, v and output
    are such permuted views ((B, H, S, D) of a (B, S, H, D) buffer): ≈ 20 KiB per token
    and layer at the 8B shape, left on the GPU before (session 7: peak 20.0 GiB with
    everything else offloaded)."""
    strides = val.stride()

    def larger_first(i, j):
        if statically_known_true(strides[i] > strides[j]):
            return -1
        if statically_known_true(strides[i] < strides[j]):
            return 1
        return 0

    perm = sorted(range(val.dim()), key=functools.cmp_to_key(larger_first))
    return perm if statically_known_true(val.permute(perm).is_contiguous()) else None


def _is_identity(perm: list) -> bool:
    return perm == list(range(len(perm)))


def _permute(x, perm: list):
    """``x.permute(perm)``, or x itself for the identity (no node where nothing moves)."""
    return x if _is_identity(perm) else x.permute(perm)


def _inverse(perm: list) -> list:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _permuted(graph, node, perm):
    """``node.permute(perm)`` as a node after ``node`` (``node`` itself for the identity)."""
    if _is_identity(perm):
        return node
    with graph.inserting_after(node):
        out = graph.call_function(torch.ops.aten.permute.default, (node, perm))
    out.meta["val"] = node.meta["val"].permute(perm)
    return out


# --------------------------------------------------------------------------- offloading

OFFLOAD_MIN_BYTES = 2**20  # smaller tensors are not worth a copy each way


def _why_not_offloaded(node, saved, inputs, user_outputs) -> str | None:
    """Why the saved tensor ``node`` (its backward placeholder ``saved``) stays on the
    device, or None to offload it."""
    why = _why_kept_as_is(node, inputs, user_outputs)
    if why is not None:
        return why
    val = node.meta["val"]
    if val.device.type not in ("cuda", "cpu"):
        return f"on {val.device.type}"
    if _size_of(node) < OFFLOAD_MIN_BYTES:
        return f"smaller than {OFFLOAD_MIN_BYTES // 2**10} KiB"
    if _dense_order(val) is None:
        return "not dense in any dimension order"
    return None


def host_available_bytes() -> int | None:
    """The host memory the kernel says is available (``MemAvailable`` in /proc/meminfo),
    or None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _lowrank_only_ops() -> dict:
    """LoRA linear ops -> the op computing their second output (h = x' Aᵀ) alone."""
    from .kernels import lora, nf4  # noqa: F401  (registers the ops)

    ops = torch.ops.lorafuse
    return {ops.lora_linear.default: ops.lora_linear_h.default,
            ops.nf4_linear.default: ops.nf4_linear_h.default}


def _arg(node, name: str):
    """``node``'s argument ``name`` by its op's schema: positional, keyword or default."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if i < len(node.args):
                return node.args[i]
            return node.kwargs.get(name, a.default_value if a.has_default_value() else None)
    raise KeyError(name)


def lowrank_only_recomputes(bwd) -> int:
    """Where the backward recomputes a LoRA linear (``lora_linear``, ``nf4_linear``) whose
    output it does not read, only for the h = x' Aᵀ its backward needs for dB, call the op
    that computes h alone: the base GEMM (and a 4-bit weight's dequantization) is skipped.
    ``checkpoint_layers`` recomputes each layer's forward, and the down projection's output
    feeds only the next layer's input, which the backward keeps: a (tokens × hidden ×
    intermediate) GEMM a layer, a quarter of the recomputed matmul work at the 8B shape.
    Returns how many calls were replaced (also counted in
    ``torch._dynamo.utils.counters["lorafuse"]["recompute_h_only"]``)."""
    replace = _lowrank_only_ops()
    count = 0
    for node in list(bwd.graph.nodes):
        cheap = replace.get(node.target) if node.op == "call_function" else None
        if cheap is None:
            continue
        args = (_arg(node, "x"), _arg(node, "lora_a"), _arg(node, "x_lora"))
        val = node.meta.get("val")
        x_lora_required = node.target is torch.ops.lorafuse.nf4_linear.default
        if args[1] is None or (x_lora_required and args[2] is None) \
                or not isinstance(val, (tuple, list)):
            continue  # no adapter (h is empty), or no example value for the new node
        users = list(node.users)
        if not users or any(u.target is not operator.getitem or u.args[1] != 1 for u in users):
            continue  # the output is read (or the call is used whole): keep it
        with bwd.graph.inserting_before(node):
            h = bwd.graph.call_function(cheap, args)
        h.meta["val"] = val[1]
        for u in users:
            u.replace_all_uses_with(h)
            bwd.graph.erase_node(u)
        bwd.graph.erase_node(node)
        count += 1
    if count:
        bwd.graph.lint()
        bwd.recompile()
        counters["lorafuse"]["recompute_h_only"] += count  # beside the passes' counters
    return count


_SEARCH_LIMIT = 400  # nodes visited from one recompute before giving up (left exact)


def _is_attention_call(node) -> bool:
    """aten's SDPA family or lorafuse's attention ops (layer_checkpoint's names), forward
    or backward."""
    namespace, name = _op_name(node)
    return (namespace == "aten" and "attention" in name) or \
        (namespace == "lorafuse" and name.startswith(_LORAFUSE_ATTENTION))


def _is_lora_call(node) -> bool:
    namespace, name = _op_name(node)
    return namespace == "lorafuse" and name.startswith(("lora_linear", "nf4_linear"))


_MATMULS = ("mm", "bmm", "matmul", "baddbmm", "addmm")


def _reaches_attention(node) -> bool | None:
    """Whether ``node``'s value flows, before the next LoRA op (another site, or a backward
    op: the search ends there), into an attention op, or through a matmul into an exp or a
    softmax: attention written out (GPT-2's or Gemma2's eager code; the joint graph
    decomposes its softmax into exp and sums) whose backward rebuilds the probabilities.
    An exp reached without a matmul is an activation's (SiLU's sigmoid). None where the
    search is too long to say."""
    seen, todo = set(), [(u, False) for u in node.users]
    while todo:
        n, matmul = todo.pop()
        if (n, matmul) in seen:
            continue
        seen.add((n, matmul))
        if len(seen) > _SEARCH_LIMIT:
            return None
        namespace, name = _op_name(n)
        name = name if namespace == "aten" else ""  # (None for a non-operator call)
        if _is_attention_call(n) or (matmul and ("softmax" in name or name in ("exp", "exp2"))):
            return True
        if not _is_lora_call(n):
            matmul = matmul or name in _MATMULS
            todo.extend((u, matmul) for u in n.users)
    return False


def fp8_recomputes(bwd) -> int:
    """The ``fp8_recompute`` option: where the backward recomputes a LoRA linear
    (``lora_linear``, ``lora_linear_group``; ``checkpoint_layers``, a memory budget) whose
    outputs reach no attention op, exp or softmax (``_reaches_attention``), call its twin
    with the base GEMM in e4m3 (kernels/fp8_recompute.py): gate/up, a recomputed output
    projection; not q, k and v where attention's backward rebuilds the probabilities from
    them. Returns how many calls were replaced (also
    ``counters["lorafuse"]["recompute_fp8"]``)."""
    ops = torch.ops.lorafuse
    twins = {ops.lora_linear.default: ops.lora_linear_fp8.default,
             ops.lora_linear_group.default: ops.lora_linear_group_fp8.default}
    count = 0
    for node in list(bwd.graph.nodes):
        twin = twins.get(node.target) if node.op == "call_function" else None
        if twin is None or _reaches_attention(node) is not False:
            continue
        # the same node (its name: the report counts recomputed forward ops by name; its
        # outputs and layer), the twin's arguments; not the old op's input values, which
        # Inductor would normalise against the twin's schema (it has fewer arguments)
        args = tuple(_arg(node, a.name) for a in twin._schema.arguments)
        node.target, node.args, node.kwargs = twin, args, {}
        node.meta.pop("eager_input_vals", None)
        count += 1
    if count:
        bwd.graph.lint()
        bwd.recompile()
        counters["lorafuse"]["recompute_fp8"] += count
    return count


def warn_if_host_short(offloaded_bytes: int) -> None:
    """Offloaded activations live in pinned (unswappable) host memory from the forward to
    the backward. Warn when one call's exceed 90 % of what the host has available: the
    pinned allocation would fail (the copies then fall back to pageable memory, slowly) or
    the host run out (at 8B, 8 KiB per token and layer with ``checkpoint_layers="full"``:
    ≈ 90 GiB at 360K tokens)."""
    available = host_available_bytes()
    if available is not None and offloaded_bytes > 0.9 * available:
        warn_once(f"lorafuse: offload_activations keeps {offloaded_bytes / 2**30:.1f} GiB in "
                  f"pinned host memory per call; the host has {available / 2**30:.1f} GiB "
                  "available")


def offload_saved(fwd, bwd, inputs, num_fwd_outputs: int, prefetch: int = 1,
                  capturable: bool = False) -> dict:
    """Keep the saved activations that qualify (``_why_not_offloaded``) in CPU memory: the
    forward returns ``lorafuse::offload(x)`` in x's place (same position, same name, as
    ``quantize_saved`` explains), and the backward calls ``lorafuse::reload`` right before
    x's first use, passing the next ``prefetch`` offloaded tensors in the backward's order of
    first use so that their copies back start there (a prefetch ``prefetch`` reloads ahead;
    the first reload starts that many, each later one the one ``prefetch`` ahead).

    One ahead, the 8B QLoRA step with ``checkpoint_layers=True`` waited ≈ 0.44 ms a layer
    just after a copy back ended (14 ms a step, session 23's gap table); likely attention's
    output, read a few projections after the reload of the layer's input started its copy.

    ``capturable`` (the backend compiles for CUDA graphs): the ops a CUDA graph can record
    instead (kernels/offload.py, "under CUDA graphs"): the forward offloads each tensor to a
    token and ends with one ``offload_join`` of all of them, whose tokens it returns; the
    backward reloads from a token, with the tensor's shape and dtype. Only where every
    offloaded shape is static (the token ops take sizes as ints); otherwise the eager ops.

    Returns ``{"names", "bytes", "left_alone": {reason: count}, "capturable": bool}``."""
    output = fwd.graph.find_nodes(op="output")[0]
    outs = list(output.args[0])
    user_outputs = set(outs[:num_fwd_outputs])
    saved_in_bwd = {n.name: n for n in bwd.graph.find_nodes(op="placeholder")}
    plan = {"names": [], "bytes": 0, "left_alone": {}, "capturable": False}
    new_outs = list(outs[:num_fwd_outputs])
    chosen = []  # [backward placeholder, its CPU placeholder or token, inverse perm, dense,
    #            (added below) its first use in the backward]
    picked = []  # (forward output, saved placeholder)
    for node in outs[num_fwd_outputs:]:
        saved = saved_in_bwd.get(getattr(node, "name", None))
        why = ("not used by the backward" if saved is None or not saved.users else
               _why_not_offloaded(node, saved, inputs, user_outputs))
        if why is not None:
            if isinstance(getattr(node, "meta", {}).get("val"), torch.Tensor):
                plan["left_alone"][why] = plan["left_alone"].get(why, 0) + 1
        else:
            picked.append((node, saved))
    capturable = capturable and all(
        isinstance(d, int) for node, _ in picked for d in node.meta["val"].shape)
    offload = (torch.ops.lorafuse.offload_capturable.default if capturable
               else torch.ops.lorafuse.offload.default)
    taken = {node for node, _ in picked}
    for node in outs[num_fwd_outputs:]:
        if node not in taken:
            new_outs.append(node)
            continue
        saved = saved_in_bwd[node.name]
        perm = _dense_order(node.meta["val"])  # the copies move contiguous tensors
        dense = _permuted(fwd.graph, node, perm)
        with fwd.graph.inserting_after(dense):
            cpu = fwd.graph.call_function(offload, (dense,))
        cpu.meta["val"] = offload(dense.meta["val"])
        new_outs.append(cpu)
        chosen.append([saved, cpu, _inverse(perm), dense.meta["val"]])
        plan["names"].append(node.name)
        plan["bytes"] += _size_of(node)
    if not chosen:
        return plan
    if capturable:  # one join of every token, last in the forward; its tokens are saved
        with fwd.graph.inserting_before(output):
            tokens = [entry[1] for entry in chosen]
            join = fwd.graph.call_function(torch.ops.lorafuse.offload_join.default, (tokens,))
            join.meta["val"] = torch.ops.lorafuse.offload_join.default(
                [t.meta["val"] for t in tokens])
            for i, entry in enumerate(chosen):
                got = fwd.graph.call_function(operator.getitem, (join, i))
                got.meta["val"] = join.meta["val"][i]
                new_outs[new_outs.index(entry[1])] = got
                entry[1] = got
        plan["capturable"] = True
    for entry in chosen:  # the backward's input in the saved tensor's place
        saved, out = entry[0], entry[1]
        with bwd.graph.inserting_before(saved):
            entry[1] = bwd.graph.placeholder(out.name)
        entry[1].meta["val"] = out.meta["val"]
    # each saved tensor's first use, found once: the reloads and permutes inserted below
    # use none of the saved placeholders, so the order of their users stays as it is here
    position = _position(bwd.graph)
    for entry in chosen:
        entry.append(min(entry[0].users, key=position))
    chosen.sort(key=lambda entry: position(entry[4]))
    for i, (saved, cpu_in, inverse, dense_val, first_use) in enumerate(chosen):
        nxt = [entry[1] for entry in chosen[i + 1:i + 1 + prefetch]]
        device = saved.meta["val"].device
        if capturable:
            op = torch.ops.lorafuse.reload_capturable.default
            args = (cpu_in, list(dense_val.shape), dense_val.dtype, nxt)
            val = op(cpu_in.meta["val"], list(dense_val.shape), dense_val.dtype, [])
        else:
            op = torch.ops.lorafuse.reload.default
            args, val = (cpu_in, device, nxt), op(cpu_in.meta["val"], device, [])
        with bwd.graph.inserting_before(first_use):
            back = bwd.graph.call_function(op, args)
        back.meta["val"] = val
        saved.replace_all_uses_with(_permuted(bwd.graph, back, inverse))
        bwd.graph.erase_node(saved)
    output.update_arg(0, tuple(new_outs))
    for gm in (fwd, bwd):
        gm.graph.lint()
        gm.recompile()
    return plan
