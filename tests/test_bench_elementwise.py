"""bench/bench_elementwise.py's verdict line per op, against lorafuse's default passes (pure
Python: rows as the benchmark writes them, no kernels run)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_elementwise as be  # noqa: E402


def _rows(op, lorafuse_ms, inductor_ms, gpu=None):
    rows = [{"op": op, "variant": "lorafuse", "fwd_bwd_ms": lorafuse_ms},
            {"op": op, "variant": "inductor", "fwd_bwd_ms": inductor_ms}]
    if gpu:
        for r, g in zip(rows, gpu):
            r["gpu_ms"] = g
    return rows


def test_verdict_knows_the_default_passes():
    from lorafuse.passes import DEFAULT_PASSES

    assert "rope" in DEFAULT_PASSES and "gated_mlp" not in DEFAULT_PASSES
    text = be.verdict(_rows("rope", 0.75, 0.84, gpu=(0.052, 0.110))
                      + _rows("gated_mlp", 0.45, 0.48))
    assert "rope: lorafuse beat Inductor (0.750 vs 0.840 ms): a default pass already" in text
    assert "gated_mlp: lorafuse beat Inductor (0.450 vs 0.480 ms): a candidate default" in text
    # losing on the GPU alone is losing, default pass or not
    text = be.verdict(_rows("rope", 0.75, 0.84, gpu=(0.12, 0.110))
                      + _rows("gated_mlp", 0.67, 0.48))
    assert "'rope' is a default pass: measure the whole-model step" in text
    assert "keep 'gated_mlp' out of the default passes" in text
