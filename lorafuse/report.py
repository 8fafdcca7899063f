"""What the backend did to each compiled graph: per pass, sites matched and left alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class PassReport:
    name: str
    matched: list = field(default_factory=list)  # site names
    skipped: list = field(default_factory=list)  # (site name, reason)
    ops: int = 0  # fused ops emitted (sites sharing an input may share one op)
    error: str | None = None  # set when the pass raised and the graph was left alone
    notes: list = field(default_factory=list)  # what a user should know about matched sites


@dataclass
class GraphReport:
    index: int
    passes: list = field(default_factory=list)
    saved_for_backward: int | None = None  # tensors the partitioner kept for the backward
    saved_bytes: int | None = None  # their size, where the sizes are static
    activation_bytes: int | None = None  # of which not graph inputs (sizes hinted if dynamic)
    tokens: int | None = None  # tokens per call (the batch's B × S), for bytes per token
    memory_budget: str | None = None  # the memory_budget option, when one was set
    budget_bytes: int | None = None  # activation bytes it allows this graph
    default_activation_bytes: int | None = None  # activation bytes kept without a budget
    budget_ratio: float | None = None  # torch's activation_memory_budget that was used
    budget_solves: int | None = None  # min-cut solves it took (1 without a budget)
    budget_tier: int | None = None  # 1: only cheap ops may be recomputed; 2: matmuls too
    recomputed_ops: int | None = None  # forward ops the backward computes again
    recomputed_expensive: int | None = None  # of which matmuls, attention, custom ops
    budget_note: str | None = None  # why the budget was not met, if it was not
    activation_dtype: str | None = None  # storage dtype of quantized saved activations
    quantized_tensors: int | None = None  # saved activations stored quantized
    quantized_from_bytes: int | None = None  # their bytes in the dtype computed
    quantized_to_bytes: int | None = None  # their bytes stored (codes + per-row scales)
    quantize_left_alone: dict | None = None  # saved tensors kept as computed: reason -> count
    offloaded_tensors: int | None = None  # saved activations kept in CPU memory
    offloaded_bytes: int | None = None  # their bytes
    offload_left_alone: dict | None = None  # saved tensors left on the device: reason -> count
    offload_capturable: bool = False  # through the ops CUDA graphs can record
    recompute_free_bytes: int | None = None  # activation bytes recompute_free took off the plan
    checkpointed_layers: int | None = None  # layers recomputed in the backward (checkpoint_layers)
    checkpoint_note: str | None = None  # why checkpoint_layers was not applied, if it was not
    kept_residuals: int = 0  # post-attention residuals kept, not recomputed (with offloading)
    lowrank_only: int | None = None  # recomputed LoRA linears reduced to their x' Aᵀ
    fp8_recomputed: int | None = None  # recomputed LoRA linears with an e4m3 base GEMM
    fell_back: str | None = None  # why the rewritten graph was not used, if it was not

    def _per_token(self) -> list:
        """The plan in bytes per token: kept, recomputed instead of kept (against min-cut's
        plan), stored quantized, offloaded to CPU memory."""
        t = self.tokens
        parts = [f"{_size(self.activation_bytes // t)} of activations kept"]
        recomputed = (self.default_activation_bytes - self.activation_bytes
                      if self.default_activation_bytes is not None else self.recompute_free_bytes)
        if recomputed and recomputed > 0:
            parts.append(f"{_size(recomputed // t)} recomputed instead")
        if self.quantized_tensors:
            parts.append(f"{_size(self.quantized_to_bytes // t)} of those kept stored quantized "
                         f"(from {_size(self.quantized_from_bytes // t)})")
        if self.offloaded_tensors:
            parts.append(f"{_size(self.offloaded_bytes // t)} of those kept offloaded to CPU memory")
        else:
            parts.append("none offloaded")
        return parts

    def format(self) -> str:
        lines = [f"graph {self.index}:"]
        for p in self.passes:
            if p.error:
                lines.append(f"  {p.name}: pass failed, graph left unmodified ({p.error})")
                continue
            ops = f" (as {p.ops} fused ops)" if p.ops and p.ops != len(p.matched) else ""
            lines.append(f"  {p.name}: {len(p.matched)} matched{ops}, {len(p.skipped)} left alone")
            for reason, n in Counter(r for _, r in p.skipped).items():
                sites = [s for s, r in p.skipped if r == reason]
                shown = ", ".join(sites[:3]) + (", ..." if len(sites) > 3 else "")
                lines.append(f"    left alone ×{n}: {reason} [{shown}]")
            lines += [f"    {note}" for note in p.notes]
        if self.saved_for_backward is not None:
            size = "" if self.saved_bytes is None else f", {self.saved_bytes / 2**20:.1f} MiB"
            lines.append(f"  memory plan: {self.saved_for_backward} tensors kept for backward{size}"
                         " (min-cut rematerialization)")
            if self.activation_bytes is not None and self.tokens:
                lines.append(f"    per token ({self.tokens} tokens a call): "
                             + ", ".join(self._per_token()))
            kept, default = self.activation_bytes, self.default_activation_bytes
            if self.memory_budget is not None and None not in (kept, default, self.budget_bytes):
                lines.append(f"    budget {self.memory_budget}: activations {_size(kept)} kept "
                             f"(allowed {_size(self.budget_bytes)}), "
                             f"{_size(max(default - kept, 0))} recomputed of {_size(default)} "
                             f"without a budget; {self.recomputed_ops} ops recomputed, "
                             f"{self.recomputed_expensive} of them matmul/attention/custom "
                             f"(torch's activation_memory_budget {self.budget_ratio:.3g}, "
                             f"{self.budget_solves} min-cut solves)")
            if self.budget_note:
                lines.append(f"    {self.budget_note}")
            if self.checkpointed_layers:
                lines.append(f"    checkpoint_layers: {self.checkpointed_layers} layers recomputed "
                             f"in the backward from their inputs; {self.recomputed_ops} ops "
                             "recomputed")
            if self.kept_residuals:
                lines.append(f"    checkpoint_layers: {self.kept_residuals} post-attention "
                             "residuals kept for the backward (offload_activations), not "
                             "recomputed")
            if self.checkpoint_note:
                lines.append(f"    {self.checkpoint_note}")
            if self.lowrank_only:
                lines.append(f"    recomputed LoRA linears reduced to their adapter's x' Aᵀ: "
                             f"{self.lowrank_only} (the backward does not read their output)")
            if self.fp8_recomputed:
                lines.append(f"    fp8_recompute: {self.fp8_recomputed} recomputed LoRA linears "
                             "with their base GEMM in e4m3 (their outputs reach no attention)")
            if self.recompute_free_bytes:
                lines.append(f"    recompute_free: {_size(self.recompute_free_bytes)} fewer "
                             "activation bytes kept (cheap ops redone in the backward from "
                             f"tensors it keeps anyway); {self.recomputed_ops} ops recomputed")
            if self.activation_dtype is not None and self.quantized_tensors is not None:
                kept = self.activation_bytes
                lines.append(f"    activation_dtype {self.activation_dtype}: "
                             f"{self.quantized_tensors} activations stored quantized, "
                             f"{_size(self.quantized_from_bytes)} -> "
                             f"{_size(self.quantized_to_bytes)}; activations kept in all "
                             f"{_size(kept) if kept is not None else '?'}")
                for reason, n in sorted((self.quantize_left_alone or {}).items()):
                    lines.append(f"      kept as computed ×{n}: {reason}")
            if self.offloaded_tensors is not None:
                lines.append(f"    offload_activations: {self.offloaded_tensors} activations "
                             f"({_size(self.offloaded_bytes)}) kept in CPU memory between the "
                             "forward and the backward"
                             + (" (ops CUDA graphs can record)" if self.offload_capturable
                                else ""))
                for reason, n in sorted((self.offload_left_alone or {}).items()):
                    lines.append(f"      left on the device ×{n}: {reason}")
        if self.fell_back:
            lines.append(f"  fell back to plain Inductor: {self.fell_back}")
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{nbytes} B"


@dataclass
class Report:
    graphs: list = field(default_factory=list)

    def totals(self) -> dict:
        out: Counter = Counter()
        for g in self.graphs:
            for p in g.passes:
                out[p.name] += len(p.matched)
                out[p.name + "_skipped"] += len(p.skipped)
        return dict(out)

    def __str__(self) -> str:
        head = ["lorafuse report: " + (", ".join(f"{k}={v}" for k, v in self.totals().items())
                                       or "no graphs compiled")]
        return "\n".join(head + [g.format() for g in self.graphs])
