"""Where the GPU waits, from a PyTorch profiler trace (``prof.export_chrome_trace``).

The compute stream (the stream with the most kernel time) is idle between two of its
kernels whenever the next one was not there to run. Each such gap is charged to one of:

- the host: the next kernel was launched after the previous one had finished. The gap is
  charged to the innermost host op (``cpu_op``) around that launch, the op whose Python
  and dispatch the GPU waited for; a launch outside any op is Inductor's generated code.
- a wait: the next kernel was launched in time, yet started late: it waited on an event
  of another stream (an offload copy, a reload) or on the GPU's own scheduling. Waits are
  grouped by the other stream's work that ended just before the late start, if any.

Both kinds are also summed by phase: the outermost host op around the late kernel's
launch (a compiled graph's call, the optimizer's step), in the order the phases first ran,
so the forward's gaps and the backward's are told apart.

    python bench/trace_gaps.py trace.json [--steps N]

``bench_train.py --profile N`` prints this table after its own when ``BENCH_PROFILE_HOST=1``.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import sys

DEVICE_CATS = ("kernel", "gpu_memset", "gpu_memcpy")
MIN_GAP_US = 5.0  # shorter gaps are the launch latency of back-to-back kernels
WAIT_MATCH_US = 20.0  # another stream's work that ended this soon before a late start


def _corr(e) -> int | None:
    return (e.get("args") or {}).get("correlation")


def gap_report(trace: dict, steps: int = 1, top: int = 12) -> list[str]:
    """The table's lines: idle time of the compute stream per step, split into host
    (by the op that launched the late kernel) and waits."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    if not device:
        return ["  idle gaps: no GPU events in the trace"]
    per_stream = collections.Counter()
    for e in device:
        if e.get("cat") == "kernel":
            per_stream[(e.get("pid"), (e.get("args") or {}).get("stream"))] += e["dur"]
    if not per_stream:
        return ["  idle gaps: no kernels in the trace"]
    compute = per_stream.most_common(1)[0][0]
    stream = sorted((e for e in device
                     if (e.get("pid"), (e.get("args") or {}).get("stream")) == compute),
                    key=lambda e: e["ts"])
    launches = {_corr(e): e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and _corr(e) is not None}
    ops = collections.defaultdict(list)  # thread -> host ops, sorted by start
    for e in events:
        if e.get("cat") == "cpu_op":
            ops[(e.get("pid"), e.get("tid"))].append(e)
    starts = {}
    for key, lst in ops.items():
        lst.sort(key=lambda e: e["ts"])
        starts[key] = [e["ts"] for e in lst]

    def around(launch) -> list:
        """The host ops around ``launch``, innermost first."""
        key = (launch.get("pid"), launch.get("tid"))
        lst, st = ops.get(key, []), starts.get(key, [])
        return [lst[i] for i in range(bisect.bisect_right(st, launch["ts"]) - 1, -1, -1)
                if lst[i]["ts"] + lst[i]["dur"] >= launch["ts"]]

    phase_start = {}  # phase name -> when it first ran

    # other streams' work by end time: a late start right after one ended waited on it
    others = sorted((e for e in device
                     if (e.get("pid"), (e.get("args") or {}).get("stream")) != compute),
                    key=lambda e: e["ts"] + e["dur"])
    other_ends = [e["ts"] + e["dur"] for e in others]

    def waited_on(start) -> str:
        i = bisect.bisect_right(other_ends, start + 1.0) - 1
        if i >= 0 and other_ends[i] >= start - WAIT_MATCH_US:
            return f"after {others[i]['name'][:80]} (another stream)"
        return "(no other stream's work ended just before)"

    host, waits = collections.Counter(), collections.Counter()
    host_n, waits_n = collections.Counter(), collections.Counter()
    by_phase = collections.defaultdict(lambda: [0.0, 0.0, 0])  # host µs, wait µs, gaps
    end = stream[0]["ts"] + stream[0]["dur"]
    for e in stream[1:]:
        gap = e["ts"] - end
        if gap > MIN_GAP_US:
            launch = launches.get(_corr(e))
            found = around(launch) if launch is not None else []
            phase = found[-1]["name"] if found else "(outside any host op)"  # the outermost
            if found:
                phase_start[phase] = min(found[-1]["ts"], phase_start.get(phase, found[-1]["ts"]))
            row = by_phase[phase]
            row[2] += 1
            if launch is not None and launch["ts"] > end:  # launched after the GPU ran dry
                # the latest-starting op around the launch: the innermost
                name = found[0]["name"] if found else "(no op: Inductor's generated code)"
                host[name] += gap
                host_n[name] += 1
                row[0] += gap
            else:
                why = waited_on(e["ts"])
                waits[why] += gap
                waits_n[why] += 1
                row[1] += gap
        end = max(end, e["ts"] + e["dur"])
    wait, wait_n = sum(waits.values()), sum(waits_n.values())
    span = end - stream[0]["ts"]
    busy = span - sum(host.values()) - wait
    lines = [f"  compute stream idle: {(span - busy) / 1e3 / steps:.1f} of "
             f"{span / 1e3 / steps:.1f} ms/step; waiting on the host "
             f"{sum(host.values()) / 1e3 / steps:.1f} ms, on other work (events, copies) "
             f"{wait / 1e3 / steps:.1f} ms ({wait_n / steps:.1f} gaps)",
             "  host gaps by the op that launched the late kernel (ms/step, gaps/step):"]
    lines += [f"  {us / 1e3 / steps:8.2f} {host_n[name] / steps:6.1f}  {name[:100]}"
              for name, us in host.most_common(top)]
    if waits:
        lines.append("  waits by what ended just before the late kernel (ms/step, gaps/step):")
        lines += [f"  {us / 1e3 / steps:8.2f} {waits_n[why] / steps:6.1f}  {why}"
                  for why, us in waits.most_common(4)]
    lines.append("  idle by phase, the outermost host op around the late launch (host ms/step, "
                 "waits ms/step, gaps/step):")
    for name in sorted(by_phase, key=lambda n: phase_start.get(n, float("inf"))):
        h, w, n = by_phase[name]
        lines.append(f"  {h / 1e3 / steps:8.2f} {w / 1e3 / steps:8.2f} {n / steps:6.1f}  "
                     f"{name[:100]}")
    blocking = collections.Counter()
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and (
                "Synchronize" in e["name"] or e["name"] in ("cudaMemcpy", "cuMemcpy")):
            blocking[e["name"]] += e["dur"]
    if blocking:
        lines.append("  host blocked in: " + ", ".join(
            f"{n} {us / 1e3 / steps:.1f} ms/step" for n, us in blocking.most_common(4)))
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=1, help="steps in the trace (per-step numbers)")
    args = p.parse_args()
    with open(args.trace) as f:
        print("\n".join(gap_report(json.load(f), args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
