"""bench/bench_fp8_recompute.py on CPU (a smoke run: the script's code paths, not its times)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.bench_fp8_recompute as b  # noqa: E402


def test_runs_small_on_cpu(capsys):
    """Every piece timed at tiny sizes, the table printed with a row per site and piece."""
    assert b.main(["--device", "cpu", "--small", "--rep", "1"]) == 0
    out = capsys.readouterr().out
    assert "| gate_up | fp8 op |" in out and "| down | bf16 op |" in out
