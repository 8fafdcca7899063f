"""How lorafuse's ops are registered: each is a ``torch.library.custom_op`` (what the passes
insert, and what tracing, autograd and fake tensors see) with a runtime twin,
``lorafuse_rt::<name>``: the same schema and the same Python body, registered through
``torch.library.Library``, with no autograd formula.

Why the twin: around its body a custom_op call runs a Python autograd kernel, a second
dispatch and an aliasing check of its outputs. On the H200's host that was ≈ 134 µs of
the 585 µs one 4-bit forward call takes (``bench/bench_op_host.py --parts``, session 22),
and the 8B QLoRA step with checkpointing makes 672 such calls (bench/RESULTS.md: its GPU
waited on the host); a twin's call measured 47-71 µs less than its op's. The aliasing
check is the op's tests' job (they call the custom ops). The forward and backward graphs Inductor compiles never
differentiate through an op (AOTAutograd has already split them, or there are no
gradients), so Inductor's post-grad pass ``RuntimeTwinsPass`` (set by backend.py) points
every graph's calls at the twins: forward, backward, and graphs without gradients.

Twins are defined when their op is (at import), not when a graph first needs them: a
compiled graph loaded from PyTorch's caches in a new process calls them by name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from .._torch import CustomGraphPass

NAMESPACE, TWIN_NAMESPACE = "lorafuse", "lorafuse_rt"
_lib = torch.library.Library(TWIN_NAMESPACE, "DEF")
_twin_names: set = set()


def lorafuse_op(qualname: str, tags: tuple = ()) -> Callable:
    """``torch.library.custom_op(qualname, mutates_args=(), tags=tags)``, and its runtime
    twin with the same tags (Inductor reads them after the twins replaced the ops). Every
    lorafuse op is functional: it writes only tensors it allocates."""
    namespace, name = qualname.split("::")
    if namespace != NAMESPACE:
        raise ValueError(f"lorafuse_op: {qualname!r} is not in the {NAMESPACE!r} namespace")

    def register(fn):
        # tags only where there are some: every other op registers as it always did
        op = torch.library.custom_op(qualname, mutates_args=(),
                                     **({"tags": tags} if tags else {}))(fn)
        schema = str(getattr(torch.ops.lorafuse, name).default._schema)
        _lib.define(schema.split("::", 1)[1], tags=tags)
        # every device, as custom_op registers its default; meta tensors take the fake
        _lib.impl(name, fn, "CompositeExplicitAutograd")

        def fake(*args, **kwargs):  # the custom op's fake, as tracing saw it
            return getattr(torch.ops.lorafuse, name).default(*args, **kwargs)

        torch.library.register_fake(f"{TWIN_NAMESPACE}::{name}", fake, lib=_lib)
        _twin_names.add(name)
        return op

    return register


def runtime_twin(target):
    """The twin of ``target`` when it is a lorafuse op's overload, else None."""
    schema = getattr(target, "_schema", None)  # an OpOverload (FX targets may be anything)
    if schema is None or getattr(target, "namespace", None) != NAMESPACE:
        return None
    name = schema.name.split("::", 1)[1]
    if name not in _twin_names or schema.overload_name:
        return None
    return getattr(getattr(torch.ops, TWIN_NAMESPACE), name).default


def swap_targets(graph: torch.fx.Graph) -> int:
    """Point every lorafuse op call of ``graph`` at its twin; how many were."""
    n = 0
    for node in graph.nodes:
        twin = runtime_twin(node.target) if node.op == "call_function" else None
        if twin is not None:
            node.target = twin
            n += 1
    return n


class RuntimeTwinsPass(CustomGraphPass):
    """Inductor's post-grad pass that points a compiled graph's lorafuse calls at their
    twins (after partitioning: the forward and the backward; and graphs compiled without
    gradients, evaluation under ``torch.no_grad()``, generation). ``then``: the user's own
    ``post_grad_custom_post_pass`` (one pass or a list), run first, on the ops' own
    names."""

    def __init__(self, then=None):
        self.then = then

    def _theirs(self) -> tuple:
        if self.then is None:
            return ()
        return tuple(self.then) if isinstance(self.then, (list, tuple)) else (self.then,)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self._theirs():
            p(graph)
        swap_targets(graph)

    def uuid(self):
        """Inductor's cache key for the pass: this file's text and the user's passes' keys
        (None, no caching, when one of theirs has none, as theirs alone would give)."""
        theirs = [getattr(p, "uuid", lambda: None)() for p in self._theirs()]
        if any(u is None for u in theirs):
            return None
        h = hashlib.sha256(Path(__file__).read_bytes())
        h.update(repr(theirs).encode())
        return h.hexdigest()


def is_op(target, name: str) -> bool:
    """Whether ``target`` is lorafuse's op ``name`` or its twin (tests and tools that read
    compiled graphs)."""
    return any(target is getattr(getattr(torch.ops, ns), name).default
               for ns in (NAMESPACE, TWIN_NAMESPACE))
