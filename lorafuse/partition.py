"""The partitioner hook: splits Inductor's joint graph into forward and backward.

For now it delegates to min-cut rematerialization (Inductor's default) and records
what the backward keeps, for the report; deciding per activation (keep, keep
quantized, recompute, offload) under a memory budget builds on this hook.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch

from ._torch import CustomPartitionerFn, min_cut_rematerialization_partition

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


class LorafusePartitioner(CustomPartitionerFn):
    def __init__(self, options: dict, report=None):
        self._key = source_hash(json.dumps(options, sort_keys=True, default=str))
        self._report = report

    def __call__(self, gm, joint_inputs, **kwargs):
        fwd, bwd = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        if self._report is not None:
            saved = [n for n in bwd.graph.nodes
                     if n.op == "placeholder" and not n.name.startswith("tangents")]
            self._report.saved_for_backward = len(saved)
            self._report.saved_bytes = _static_bytes(saved)
        return fwd, bwd

    def __getstate__(self):
        # Inductor pickles its config, this object included, into its cache key: only the
        # key may go in, not the per-compile report, or no compile would ever hit the cache.
        return {"_key": self._key, "_report": None}

    def uuid(self):
        # Inductor keys its cache on this; None would let stale entries skip the hook.
        return self._key


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
