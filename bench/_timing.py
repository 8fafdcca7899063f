"""Timing shared by the op microbenchmarks (bench_elementwise, bench_norm, bench_loss):
calls one after another, the same replayed from a CUDA graph, and the line that says
where that replay could not be recorded."""

from __future__ import annotations

import statistics
import time

import torch


def call_ms(fn, device: str, rep_ms: int, grad_to_none=None) -> float:
    """Median ms of ``fn`` called one after another: ``triton.testing.do_bench`` on CUDA
    (the host's work per call counts wherever it is longer than the kernels'), a
    perf_counter median on CPU (smoke tests)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms,
                                       grad_to_none=grad_to_none, return_mode="median")
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or time.perf_counter() < deadline:
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def gpu_alone(fn, rep_ms: int, grad_to_none=None) -> dict:
    """``{"gpu_ms": ...}``: ``fn`` recorded in a CUDA graph and replayed
    (``do_bench_cudagraph``), the kernels' time without the host's, as a step under CUDA
    graphs runs them; ``grad_to_none``'s gradients are set to None before the capture, so
    the graph's backward writes them fresh. ``{"gpu_error": ...}`` where the calls cannot
    be recorded (a host sync, say): the call times stand."""
    import triton.testing

    try:
        return {"gpu_ms": triton.testing.do_bench_cudagraph(
            fn, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")}
    except Exception as e:
        torch.cuda.synchronize()
        return {"gpu_error": f"{type(e).__name__}: {e}".replace("\n", " ")[:200]}


def capture_failures(rows: list) -> str:
    """What to print between a table and its verdict: a blank line, and where the table's
    GPU-ms column is "—" somewhere, how many rows and the first error between blank lines."""
    failed = [r for r in rows if "gpu_error" in r]
    if not failed:
        return ""
    return (f"\nGPU-alone capture failed in {len(failed)} of {len(rows)} rows; first: "
            f"{failed[0]['gpu_error']}\n")
