"""The ``lorafuse`` torch.compile backend: capture → rewrite → partition → compile.

1. Capture: Dynamo hands us a torch-level FX graph (parameters are placeholders).
2. Rewrite: each enabled pass in ``lorafuse.passes`` replaces the subgraphs it can
   prove with fused custom ops; a pass that raises leaves the graph as it was.
3. Partition: Inductor differentiates the graph and our partitioner splits it.
4. Compile: Inductor's ``compile_fx`` compiles forward and backward; our ops are
   extern calls there. If that fails, the untouched graph goes to plain Inductor.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch

from ._torch import (RestartAnalysis, compile_fx, copy_graph, counters, inductor_config,
                     list_mode_options)
from .kernels._ops import RuntimeTwinsPass
from .partition import AUTO, LorafusePartitioner, parse_activation_dtype, parse_memory_budget
from .passes import DEFAULT_PASSES, PASS_OPTIONS, PASSES
from .report import GraphReport, PassReport

log = logging.getLogger("lorafuse")
_graph_ids = itertools.count()


@dataclass
class Options:
    passes: tuple = DEFAULT_PASSES  # which rewrites run, by name
    verbose: bool = False  # print each graph's report to stderr at compile time
    strict: bool = False  # raise instead of warning and falling back (for tests)
    inductor: dict = field(default_factory=dict)  # extra Inductor config patches
    # activation bytes the backward may keep per graph: "auto" (min-cut's fastest plan
    # unless it would not fit in the GPU memory free at compile time), None (that plan
    # always), a fraction in [0, 1] of that plan's, or "<x>GiB"/"<x>MiB"
    # (partition.parse_memory_budget)
    memory_budget: float | str | None = "auto"
    # how the backward's saved activations are stored: None (as computed), "int8" or "fp8"
    # (e4m3): one fp32 absmax per row, for large activations only matmuls and elementwise
    # ops read in the backward (partition.quantize_saved); the forward is unchanged
    activation_dtype: str | None = None
    # recompute in the backward what cheap ops rebuild from tensors it keeps anyway (an
    # MLP's act(gate) * up, each RMSNorm's output): fewer saved bytes, memory-bound
    # recompute (partition.recompute_free); opt-in: at the 8B shape 5.5 GiB less peak for
    # 1.9 % fewer tok/s (bench/RESULTS.md, session 18); not used with an explicit
    # memory_budget, whose plan already recomputes cheap ops first
    recompute_free: bool = False
    # keep the large saved activations in pinned CPU memory between the forward and the
    # backward, copied on a side stream and prefetched in the backward (offload_prefetch)
    # (partition.offload_saved, kernels/offload.py); opt-in. Without its reordering for
    # peak memory (lorafuse_backend says why). Under ``"triton.cudagraphs"`` the copies go
    # through ops a CUDA graph can record (static shapes; otherwise the graph runs without
    # CUDA graphs, since Inductor's graph partition around the other ops, measured slower
    # in session 32, is turned off for it unless ``inductor`` sets it).
    offload_activations: bool = False
    # with offload_activations: how many reloads ahead the backward starts each copy back
    # (1: the next one; 2 hides the copy behind more compute, for one more tensor on the GPU)
    offload_prefetch: int = 1
    # with the loss pass: a training graph returns an empty tensor as the logits and never
    # writes them (as Liger and Unsloth do in training; 1 GiB at the 8B shape); graphs
    # without gradients keep them (passes/loss.py); opt-in
    drop_logits: bool = False
    # gradient checkpointing in the compiler: each repeated layer's forward is recomputed
    # in the backward from the layer's input; True keeps attention's output (not
    # recomputed), "full" recomputes attention too (layer_checkpoint.py); with
    # offload_activations the kept tensors go to CPU memory (Unsloth's offloaded
    # checkpointing); opt-in; not with an explicit memory_budget
    checkpoint_layers: bool | str = False
    # the lora pass's ops compute the frozen weights' input gradient dy W in fp8 (e4m3,
    # per-token and per-feature power-of-two scales, fp32 accumulation: kernels/fp8_dx.py);
    # the forward and the LoRA factors' own gradients are unchanged, the gradients reaching
    # earlier layers carry ≈ 4 % relative error; keeps an fp8 copy of each frozen weight
    # (1 byte an element); bf16 on sm90+ GPUs only (elsewhere exact, warned); opt-in
    fp8_dx: bool = False
    # with fp8_dx: keep those copies (fastest); False casts each weight in every backward
    # instead (≈ 3 bytes of traffic an element) and keeps only its scales: for
    # configurations short of memory (with checkpoint_layers: 1.04 × faster, session 29)
    fp8_copies: bool = True
    # where the backward recomputes a LoRA linear whose outputs reach no attention op
    # (checkpoint_layers: gate/up), its base GEMM in fp8 (e4m3, per-token and per-output-
    # feature power-of-two scales, fp32 accumulation: kernels/fp8_recompute.py); changes
    # the gradients (as fp8_dx), never the forward; bf16 on sm90+ GPUs (elsewhere exact);
    # opt-in (session 33, 8B: a gate/up group 1.63 → 1.11 ms on the GPU alone; the step
    # with checkpoint_layers + 4.6 % in the one run whose processes ran at one host pace)
    fp8_recompute: bool = False
    # with the tiled_mlp pass: the tokens of one chunk (passes/tiled_mlp.py)
    tiled_mlp_tokens: int = 8192

    @classmethod
    def parse(cls, options: dict | None) -> "Options":
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"lorafuse: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        opts = cls(**options)
        not_bool = [f.name for f in fields(cls) if isinstance(f.default, bool)
                    and not isinstance(getattr(opts, f.name), bool)
                    and not (f.name == "checkpoint_layers" and opts.checkpoint_layers == "full")]
        if not_bool:  # a "false" string would read as True
            raise ValueError(f"lorafuse: option(s) {not_bool} take True or False (checkpoint_"
                             f"layers also \"full\"), got "
                             f"{[getattr(opts, n) for n in not_bool]}")
        for name in ("tiled_mlp_tokens", "offload_prefetch"):
            value = getattr(opts, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"lorafuse: {name} takes a positive int, got {value!r}")
        opts.passes = tuple(dict.fromkeys(opts.passes))  # each once, in the order given
        bad = [p for p in opts.passes if p not in PASSES]
        if bad:
            raise ValueError(f"lorafuse: unknown pass(es) {bad}; available: {list(PASSES)}")
        parse_memory_budget(opts.memory_budget)  # a clear ValueError before any compile
        parse_activation_dtype(opts.activation_dtype)
        if not opts.fp8_copies and not opts.fp8_dx:
            warnings.warn("lorafuse: fp8_copies=False changes nothing without fp8_dx=True",
                          stacklevel=3)
        if opts.fp8_dx and "lora" not in opts.passes:
            warnings.warn("lorafuse: fp8_dx applies to the lora pass's ops; without that pass "
                          "it changes nothing", stacklevel=3)
        if opts.fp8_recompute and "lora" not in opts.passes:
            warnings.warn("lorafuse: fp8_recompute applies to the lora pass's ops; without "
                          "that pass it changes nothing", stacklevel=3)
        if opts.drop_logits and "loss" not in opts.passes:
            warnings.warn("lorafuse: drop_logits needs the loss pass (passes=(..., \"loss\")); "
                          "without it the logits are returned as usual", stacklevel=3)
        if opts.checkpoint_layers and parse_memory_budget(opts.memory_budget) not in (None, AUTO):
            raise ValueError(f"lorafuse: checkpoint_layers with memory_budget="
                             f"{opts.memory_budget!r}: choose one (checkpointing is the memory "
                             "plan; memory_budget='auto' or None)")
        if opts.recompute_free and parse_memory_budget(opts.memory_budget) not in (None, AUTO):
            warnings.warn("lorafuse: recompute_free is not used with a memory_budget (the "
                          "budget's plan already recomputes cheap ops first)", stacklevel=3)
        return opts


def _count(report: GraphReport) -> None:
    for pr in report.passes:
        counters["lorafuse"][pr.name] += len(pr.matched)
        counters["lorafuse"][pr.name + "_skipped"] += len(pr.skipped)


def _run_passes(gm: torch.fx.GraphModule, opts: Options, report: GraphReport,
                pristine: torch.fx.Graph | None = None) -> None:
    """``pristine``: a copy of the graph as captured, reused as the first pass's backup
    (copying a whole-model graph is not free); restores take a copy, so it stays intact."""
    for i, name in enumerate(opts.passes):
        pr = PassReport(name)
        report.passes.append(pr)
        backup = pristine if i == 0 and pristine is not None else copy_graph(gm.graph)
        try:
            PASSES[name](gm, pr, **{k: getattr(opts, k) for k in PASS_OPTIONS.get(name, ())})
        except Exception as e:  # never worse than plain torch.compile
            if opts.strict:
                raise
            gm.graph = copy_graph(backup)
            gm.recompile()
            pr.matched.clear()
            pr.error = f"{type(e).__name__}: {e}"
            warnings.warn(f"lorafuse: pass '{name}' failed on graph {report.index} and left it "
                          f"unmodified: {pr.error}", stacklevel=2)


def _fp8_sites(gm, example_inputs) -> list:
    """``(weights, parameters, M, copies)`` of each LoRA op the lora pass gave ``fp8_dx``:
    its weights as real tensors (graph inputs or attributes, or a ``.t()`` of one; a weight
    cast per step is not persistent and is left out), the tensors they are views of, M its
    rows (None where they vary: dynamic shapes), and its ``fp8_copies``; sites whose
    weights are unknown are left out (their copies are made at the first backward), and
    so are sites whose input needs no gradient (no dx: the copy would never be read)."""
    from .kernels._ops import is_op
    from .passes._graph import val

    inputs = dict(zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs))

    def real(n):  # (the tensor the op gets, the tensor it is a view of), or None
        t = None
        if n.op == "placeholder":
            t = inputs.get(n)
        elif n.op == "get_attr":
            t = gm
            for part in n.target.split("."):
                t = getattr(t, part, None)
        elif n.op == "call_method" and n.target == "t" and isinstance(n.args[0], torch.fx.Node):
            base = real(n.args[0])
            return None if base is None else (base[0].t(), base[1])
        return (t, t) if isinstance(t, torch.Tensor) else None

    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not node.kwargs.get("fp8_dx") or not any(
                is_op(node.target, name) for name in ("lora_linear", "lora_linear_group")):
            continue
        w = node.args[1]
        found = [real(n) if isinstance(n, torch.fx.Node) else None
                 for n in (w if isinstance(w, (list, tuple)) else [w])]
        x = val(node.args[0])
        if x is not None and not x.requires_grad:
            continue  # no dx to compute (the first layer's q/k/v: a frozen embedding below)
        # math.prod keeps a symbolic size symbolic; torch.Size.numel() would make it an int,
        # and so specialise the graph to this batch's size (a recompile at every new size)
        rows = math.prod(x.shape[:-1]) if x is not None else None
        if all(f is not None for f in found):
            sites.append(([f[0] for f in found], [f[1] for f in found],
                          rows if isinstance(rows, int) else None,
                          node.kwargs.get("fp8_copies", True)))
    return sites


def _prebuild_fp8_copies(gm, example_inputs, report) -> None:
    """``fp8_dx``'s weight copies made at compile time (kernels/fp8_dx.py, ``prebuild``:
    why); a failure leaves them to the first backward, as before."""
    from .kernels import fp8_dx

    try:
        sites = _fp8_sites(gm, example_inputs)
        made = fp8_dx.prebuild(sites)
    except Exception as e:  # never fail a compile over it
        warnings.warn(f"lorafuse: fp8_dx's weight copies were not made at compile time "
                      f"({type(e).__name__}: {e}); the first backward makes them", stacklevel=3)
        return
    lora = next((p for p in report.passes if p.name == "lora"), None)
    if made and lora is not None:
        what = "copies" if any(s[3] for s in sites) else "scales (fp8_copies=False)"
        lora.notes.append(f"fp8_dx: {made / 2**30:.3g} GiB of fp8 weight {what} made at "
                          "compile time")


def lorafuse_backend(gm, example_inputs, options=None, mode=None, _collect=None):
    """The backend behind ``torch.compile(model, backend="lorafuse", options={...})``.
    ``_collect``: a ``Report`` to append each graph's report to (tests, tools)."""
    opts = Options.parse(options)
    patches = dict(list_mode_options(mode)) if mode else {}
    if opts.offload_activations and hasattr(inductor_config, "reorder_for_peak_memory"):
        # Inductor's reordering for peak memory hoisted the backward's reloads to its start
        # (a reload needs only its CPU copy, there from the start), where every reloaded
        # copy is live at once: on the GPU test model a 489 MiB peak with it, 335 without,
        # 478 without offloading (bench/RESULTS.md, session 21). offload_saved's order is
        # the plan.
        # (Only where the key exists: an unknown one would fail the compile and its fallback.)
        patches["reorder_for_peak_memory"] = False
    patches.update(opts.inductor)
    # CUDA graphs asked for (options, mode, or torch._inductor.config.triton.cudagraphs)
    cudagraphs = bool(patches.get("triton.cudagraphs", getattr(
        getattr(inductor_config, "triton", None), "cudagraphs", False)))
    if (opts.offload_activations and cudagraphs
            and hasattr(inductor_config, "graph_partition")
            and "graph_partition" not in opts.inductor):
        # The offloads of a graph with static shapes are recorded into its CUDA graphs
        # (the capturable ops, kernels/offload.py); the partition is left off for the rest:
        # the eager offload and reload ops (tagged cudagraph_unsafe), used where a shape is
        # symbolic, would make Inductor's graph partition (on by default in torch 2.13)
        # replay the parts between them from CUDA graphs. Measured slower and larger: the 8B
        # checkpointed fp8 step at 6,737 tok/s and 21.6 GiB with it, 12,208 tok/s and 16.3
        # GiB without (bench/RESULTS.md, session 32). Off, Inductor runs such a graph without
        # CUDA graphs. The user's own setting wins (the tags keep that path correct).
        patches["graph_partition"] = False
    # the user's own post-grad pass (from the options or set globally) still runs, first
    theirs = patches.get("post_grad_custom_post_pass",
                         getattr(inductor_config, "post_grad_custom_post_pass", None))
    patches["post_grad_custom_post_pass"] = RuntimeTwinsPass(theirs)  # kernels/_ops.py
    if "passes" not in (options or {}) and cudagraphs:
        # masked_attention's mask checks return CPU bools, and Inductor runs a graph that
        # holds CPU tensors without CUDA graphs: by default, CUDA graphs win
        opts.passes = tuple(p for p in opts.passes if p != "masked_attention")
    report = GraphReport(next(_graph_ids))
    pristine = copy_graph(gm.graph)
    _run_passes(gm, opts, report, pristine)
    if opts.fp8_dx and torch.is_grad_enabled():  # (an evaluation graph runs no backward)
        _prebuild_fp8_copies(gm, example_inputs, report)

    patches["custom_partitioner_fn"] = LorafusePartitioner(asdict(opts), report,
                                                           cudagraphs=cudagraphs)
    try:
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
    except RestartAnalysis:
        raise  # Dynamo traces the frame again (e.g. dynamic=True turning floats into tensors)
    except Exception as e:
        if opts.strict:
            raise
        report.fell_back = f"{type(e).__name__}: {e}"
        warnings.warn(f"lorafuse: compiling the rewritten graph {report.index} failed "
                      f"({report.fell_back}); using plain Inductor for it", stacklevel=2)
        gm.graph = pristine
        gm.recompile()
        patches.pop("custom_partitioner_fn")  # what plain torch.compile(mode=...) would do
        patches["post_grad_custom_post_pass"] = theirs
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
    else:
        _count(report)  # only what really runs: not sites whose rewrite was thrown away
    if _collect is not None:
        _collect.graphs.append(report)
    text = report.format()
    log.info("%s", text)
    if opts.verbose:
        print("lorafuse " + text, file=sys.stderr, flush=True)
    return compiled


def backend(**options):
    """A backend with options bound: ``torch.compile(model, backend=lorafuse.backend(verbose=True))``."""
    Options.parse(options)  # fail early on typos

    def _backend(gm, example_inputs, **kw):
        merged = {**options, **(kw.pop("options", None) or {})}
        return lorafuse_backend(gm, example_inputs, options=merged, **kw)

    _backend.__name__ = "lorafuse"
    return _backend
