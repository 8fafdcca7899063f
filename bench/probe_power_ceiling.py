"""The bf16 GEMM throughput this GPU sustains at its power cap: the ceiling an 8B LoRA step
can reach when every step runs capped (session 16: SM clock 1,530-1,725 MHz at ≈ 690 W in
every timed 8B step, against 1,980 MHz idle).

    python bench/probe_power_ceiling.py [--seconds 10] [--n 8192]

Queues n³ bf16 GEMMs back to back for --seconds and prints, per second: TFLOP/s (CUDA
events), and the SM clock, power and clock-limit reasons nvidia-smi reads at that moment.
The first second runs at the idle clock; the rest is what a capped step gets. The 8B step
is 31.9 GFLOP/token × 4,096 tokens ≈ 130.7 TFLOP, so at the capped TFLOP/s T it cannot
take under 130.7 / T seconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess

import torch


def smi() -> str:
    """clock MHz, power W, reasons, as nvidia-smi reads them now ("—" without it)."""
    try:
        got = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,"
                              "clocks_throttle_reasons.active", "--format=csv,noheader,nounits",
                              "-i", str(torch.cuda.current_device())],
                             capture_output=True, text=True, timeout=20)
        return got.stdout.strip() or "—"
    except (OSError, subprocess.SubprocessError):
        return "—"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--n", type=int, default=8192)
    args = p.parse_args()
    n = args.n
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=out)
    torch.cuda.synchronize()
    # GEMMs per one-second window, from a short timing at the idle clock
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        torch.mm(a, b, out=out)
    end.record()
    end.synchronize()
    per_window = max(1, round(1000 / (start.elapsed_time(end) / 20)))
    flop = 2 * n ** 3
    print(f"{n}³ bf16 GEMMs, {per_window} per window (≈ 1 s at the idle clock)")
    print("| second | TFLOP/s | SM MHz, W, reasons (nvidia-smi, read while the window runs) |")
    print("|---|---|---|")
    rates = []
    for sec in range(1, args.seconds + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_window):
            torch.mm(a, b, out=out)
        end.record()
        state = smi()  # the GEMMs run meanwhile: the host returned after queueing them
        end.synchronize()
        rate = per_window * flop / (start.elapsed_time(end) / 1e3) / 1e12
        rates.append(rate)
        print(f"| {sec} | {rate:.0f} | {state} |", flush=True)
    if len(rates) > 2:
        capped = statistics.median(rates[2:])
        print(f"\nmedian from second 3: {capped:.0f} TFLOP/s; the 8B step's 130.7 TFLOP then "
              f"takes ≥ {130.7 / capped * 1e3:.0f} ms (≤ {4096 * capped / 130.7:,.0f} tok/s)")


if __name__ == "__main__":
    main()
