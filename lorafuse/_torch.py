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
from torch._inductor.custom_graph_pass import CustomPartitionerFn  # noqa: F401  the partitioner hook's base
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
