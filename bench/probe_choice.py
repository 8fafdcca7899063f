"""How often the LoRA op's per-shape path choice picks the slower path, and what that costs
an 8B step (H200, bf16). Session 16: two processes of the same 8B run chose differently
for two shapes, and each time the slower path (bench/RESULTS.md, session 16).

    python bench/probe_choice.py [--procs 4] [--m 4096] [--r 16] [--hot 150]

Each of --procs fresh processes (fresh Triton autotuning, empty choice cache), for every
LoRA GEMM shape of the Llama-3.1-8B step:
  pick     the choice the library makes at a shape's first call (lora._choice), as in
           step 1 of a training run
  quick    3 interleaved rounds × 5 calls on an idle GPU (the candidates alternating): the
           library's timer of session 16, before it heated the GPU first
  truth    every candidate timed long and interleaved (ROUNDS rounds × CALLS calls, the
           candidates alternating each round), median ms per call of device time: a GPU
           spin is queued before each burst, so the calls are queued before the GPU
           reaches them, as in a training step whose GPU runs behind the host
  idle     the same on an idle GPU (no spin): where a candidate's launches take longer
           than its kernels, this times the host (session 17: the k/v forward)
  hot      (--hot MS) the truth again with MS of the library's heating GEMMs
           (``_dispatch.heat_gpu``; session 17's logs used 8192³ bf16 ones) before every burst,
           so that the candidates run at the power cap as in a training step (the library
           times its choices that way since session 17, 20 ms of GEMMs: two rankings at a
           cold GPU's full clock differed from the cap's); the picks' cost at the cap
The parent prints, per shape: the picks across processes, the truth per candidate (median
over processes, with the range), and the ms a step that wrong picks cost (sites per step ×
(truth of the pick − truth of the best), averaged over processes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafuse._torch import gpu_spin  # noqa: E402

# (kind, N, K, LoRA sites a step use it: 32 layers × projections of that shape). q, k, v
# and gate, up run through the group op, whose forward calls the single-site forward per
# member and whose backward has no choice; o and down are single-site ops.
SHAPES = [("fwd", 4096, 4096, 64), ("fwd", 1024, 4096, 64), ("fwd", 14336, 4096, 64),
          ("fwd", 4096, 14336, 32), ("bwd", 4096, 4096, 32), ("bwd", 4096, 14336, 32)]
ROUNDS, CALLS = 7, 10


def interleaved_ms(fns: dict, rounds: int = ROUNDS, calls: int = CALLS, heater=None) -> dict:
    """Median ms per call of each candidate over ``rounds`` rounds of ``calls`` back-to-back
    calls, the candidates taking turns within each round; ``heater()`` (if given) queues
    work before every burst, so the bursts run on a GPU that is already at its power cap."""
    for f in fns.values():
        f()
    samples = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            if heater is not None:
                heater()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                f()
            end.record()
            end.synchronize()
            samples[n].append(start.elapsed_time(end) / calls)
    return {n: statistics.median(s) for n, s in samples.items()}


def sm_clock_now() -> float | None:
    """The SM clock in MHz as nvidia-smi reads it now (None without nvidia-smi)."""
    try:
        got = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,"
                              "nounits", "-i", str(torch.cuda.current_device())],
                             capture_output=True, text=True, timeout=20)
        return float(got.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def child(m: int, r: int, hot_ms: float, picks_only: bool, heat: str) -> None:
    from lorafuse.kernels import _dispatch, lora
    from lorafuse.kernels import lora_triton as lt

    if heat:  # the library's heater and rounds, to compare settings: N,dtype,rounds
        n, dtype, rounds = heat.split(",")
        _dispatch._HEAT_N, _dispatch._HEAT_DTYPE = int(n), getattr(torch, dtype)
        _dispatch.ROUNDS = int(rounds)

    torch.manual_seed(0)
    dt, s, out = torch.bfloat16, 2.0, []
    heater = lambda: _dispatch.heat_gpu(hot_ms)  # noqa: E731  the library's heating GEMMs
    for kind, N, K, sites in SHAPES:
        x = torch.randn(m, K, device="cuda", dtype=dt)
        w = torch.randn(N, K, device="cuda", dtype=dt) / K ** 0.5
        a = torch.randn(r, K, device="cuda", dtype=dt) / K ** 0.5
        b = torch.randn(N, r, device="cuda", dtype=dt) * 1e-2
        h = x @ a.t()
        before = set(lora._choice)
        if kind == "fwd":
            lora._tail_gemm_forward(x, w, None, h, b, s)
            fns = {"tma": lambda: lt.tail_gemm_nt_tma(x, w, h, b, None, alpha2=s),
                   "cublas": lambda: lora._base_plus_lowrank_fp32(x, w, None, h, b, s),
                   "pointer": lambda: lt.lowrank_tail_gemm(x, w.t(), h, b.t(), None, alpha2=s)}
        else:
            dy = torch.randn(m, N, device="cuda", dtype=dt)
            args = (dy, x, w, a, b, h, s)
            lora._backward_impl(*args)
            fns = {"triton": lambda: lt.triton_lora_backward(*args),
                   "cublas": lambda: lora._lora_linear_backward_cublas(*args)}
        new = [k for k in lora._choice if k not in before]
        pick = lora._choice[new[0]] if new else "?"
        if picks_only:
            out.append({"kind": kind, "N": N, "K": K, "sites": sites, "pick": pick})
            continue
        quick = interleaved_ms(fns, rounds=3, calls=5)
        truth = interleaved_ms(fns, heater=lambda: gpu_spin(40_000_000))  # ≈ 20 ms
        idle = interleaved_ms(fns)
        row = {"kind": kind, "N": N, "K": K, "sites": sites, "pick": pick,
               "quick": min(quick, key=quick.get), "truth": truth, "idle": idle}
        if hot_ms:
            heater()
            heater()
            row["hot"] = interleaved_ms(fns, rounds=5, calls=4 * CALLS, heater=heater)
            heater()  # the clock under load, read while these GEMMs run
            row["hot_mhz"] = sm_clock_now()
            torch.cuda.synchronize()
        out.append(row)
        del x, w, a, b, h
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--hot", type=float, default=0.0, metavar="MS",
                   help="also time every candidate at the power cap: MS of heating GEMMs "
                        "queued before each burst (e.g. 150), and the clock read there")
    p.add_argument("--picks-only", action="store_true",
                   help="only the library's picks per process (no truth timings)")
    p.add_argument("--heat", default="", metavar="N,DTYPE,ROUNDS",
                   help="the library's heating GEMM size and dtype and its timing rounds "
                        "(e.g. 8192,bfloat16,5; default: the library's)")
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    if args.child:
        return child(args.m, args.r, args.hot, args.picks_only, args.heat)
    runs = []
    for i in range(args.procs):
        res = subprocess.run([sys.executable, __file__, "--child", "--m", str(args.m),
                              "--r", str(args.r), "--hot", str(args.hot), "--heat", args.heat]
                             + (["--picks-only"] if args.picks_only else []),
                             capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(f"process {i + 1} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
            continue
        runs.append(json.loads(line[0][7:]))
        print(f"process {i + 1}: " + ", ".join(
            f"{d['kind']} {d['N']}x{d['K']} -> {d['pick']}" for d in runs[-1]), flush=True)
    if not runs:
        sys.exit(1)
    if args.picks_only:
        return
    print(f"\nM = {args.m}, r = {args.r}, {len(runs)} processes; truth: median ms per call "
          f"({ROUNDS} interleaved rounds × {CALLS} calls), median over processes [range]\n")
    print("| shape | sites/step | picks | quick picks | truth per candidate | best "
          "| wrong-pick cost ms/step (picks; quick) |")
    print("|---|---|---|---|---|---|---|")
    total = qtotal = 0.0
    for j, (kind, N, K, sites) in enumerate(SHAPES):
        rows = [run[j] for run in runs]
        cands = list(rows[0]["truth"])
        med = {c: statistics.median(r_["truth"][c] for r_ in rows) for c in cands}
        rng = {c: (min(r_["truth"][c] for r_ in rows), max(r_["truth"][c] for r_ in rows))
               for c in cands}
        best = min(med, key=med.get)
        # each process's own truth: its pick against its own best
        cost, qcost = (statistics.mean(
            sites * (r_["truth"].get(r_[k], min(r_["truth"].values()))
                     - min(r_["truth"].values())) for r_ in rows) for k in ("pick", "quick"))
        total += cost
        qtotal += qcost
        truth = ", ".join(f"{c} {med[c]:.3f} [{rng[c][0]:.3f}–{rng[c][1]:.3f}]" for c in cands)
        print(f"| {kind} {N}×{K} | {sites} | {', '.join(r_['pick'] for r_ in rows)} "
              f"| {', '.join(r_['quick'] for r_ in rows)} | {truth} | {best} "
              f"| {cost:.2f}; {qcost:.2f} |")
    print(f"\nwrong picks cost {total:.2f} ms a step on average (quick timer: {qtotal:.2f}), "
          "against each process's own best")
    if args.hot:
        hot_cost = statistics.mean(sum(
            sites * (r_["hot"][r_["pick"]] - min(r_["hot"].values()))
            for r_, (_, _, _, sites) in zip(run, SHAPES) if r_["pick"] in r_["hot"]) for run in runs)
        print(f"\nthe picks cost {hot_cost:.2f} ms a step at the power cap (hot truth, "
              "each process against its own best)")
        print(f"\nAt the power cap ({args.hot:g} ms of GEMMs queued before each of 5 rounds × "
              f"{4 * CALLS} calls): median ms per call over processes; the SM clock read "
              "under load\n")
        print("| shape | hot truth per candidate | best hot | best cold (device) "
              "| idle GPU per candidate | SM MHz |")
        print("|---|---|---|---|---|---|")
        for j, (kind, N, K, _) in enumerate(SHAPES):
            rows = [run[j] for run in runs]
            hot = {c: statistics.median(r_["hot"][c] for r_ in rows) for c in rows[0]["hot"]}
            cold = {c: statistics.median(r_["truth"][c] for r_ in rows) for c in hot}
            idle = {c: statistics.median(r_["idle"][c] for r_ in rows) for c in hot}
            mhz = [r_["hot_mhz"] for r_ in rows if r_.get("hot_mhz")]
            print(f"| {kind} {N}×{K} | " + ", ".join(f"{c} {t:.3f}" for c, t in hot.items())
                  + f" | {min(hot, key=hot.get)} | {min(cold, key=cold.get)} | "
                  + ", ".join(f"{c} {t:.3f}" for c, t in idle.items()) + " | "
                  + (f"{statistics.median(mhz):.0f}" if mhz else "—") + " |")


if __name__ == "__main__":
    main()
