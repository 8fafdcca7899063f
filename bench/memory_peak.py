"""What is allocated at the peak of a CUDA memory history (``bench_train.py
--memory-snapshot FILE``): the live blocks at the moment the allocated bytes were highest,
grouped by the line that allocated them (the innermost frame in Inductor's generated code,
lorafuse or the benchmark; else the innermost frame), largest first, with that line's text
when the file is readable here (run it on the machine that ran the steps to see Inductor's
generated code).

    python bench/memory_peak.py snapshot.pickle [--top 30]

Bytes are counted as ``torch.cuda.max_memory_allocated`` counts them: a block is live from
its ``alloc`` to its ``free_requested``. A block freed while another stream still uses it
(``record_stream``) is not reusable until its ``free_completed``: those bytes are not
allocated any more but still held (reserved), and are shown beside the peak. Blocks
allocated before the recording started are one constant ("before") and are not itemised.
"""

from __future__ import annotations

import argparse
import linecache
import pickle
from collections import defaultdict

OURS = ("torchinductor", "lorafuse/", "bench/")


def site(frames: list) -> str:
    """``file:line  text`` of the allocating line that says most about the tensor."""
    if not frames:
        return "(no Python frame)"
    pick = next((f for f in frames if any(k in f["filename"] for k in OURS)), frames[0])
    text = linecache.getline(pick["filename"], pick["line"]).strip()
    name = pick["filename"].rsplit("/", 2)
    return f"{'/'.join(name[-2:])}:{pick['line']} {pick.get('name', '')}  {text[:110]}"


def peak(trace: list) -> tuple:
    """(peak allocated bytes above the start, index of the event at the peak, blocks
    allocated there: addr -> event, bytes freed but still held by other streams there)."""
    live, pending, level, best, at, at_live, at_pending = {}, {}, 0, 0, -1, {}, 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            level += ev["size"]
            if level > best:
                best, at = level, i
                at_live, at_pending = dict(live), sum(e["size"] for e in pending.values())
        elif ev["action"] == "free_requested":
            level -= ev["size"]  # also for a block allocated before the recording
            if ev["addr"] in live:
                pending[ev["addr"]] = live.pop(ev["addr"])
        elif ev["action"] == "free_completed":
            pending.pop(ev["addr"], None)
    return best, at, at_live, at_pending


def report(snap: dict, top: int = 30, device: int = 0) -> str:
    """The peak of ``snap`` (``torch.cuda.memory._snapshot()`` or a dumped history) and
    the live blocks there, grouped by allocating line, as text (markdown table)."""
    trace = snap["device_traces"][device]
    total_end = sum(b["size"] for seg in snap["segments"] if seg["device"] == device
                    for b in seg["blocks"] if b["state"] == "active_allocated")
    net = sum(ev["size"] if ev["action"] == "alloc" else -ev["size"]
              for ev in trace if ev["action"] in ("alloc", "free_requested"))
    before = total_end - net
    best, at, live, pending = peak(trace)
    gib = 2**30
    lines = [f"{len(trace)} events; allocated before the recording: {before / gib:.2f} GiB; "
             f"peak {(before + best) / gib:.2f} GiB at event {at} (+{best / gib:.2f} GiB); "
             f"besides, freed but held for other streams then: {pending / gib:.2f} GiB"]
    if at >= 0:
        lines.append(f"the allocation that reached it: {trace[at]['size'] / 2**20:.1f} MiB at "
                     f"{site(trace[at]['frames'])}")
    groups = defaultdict(lambda: [0, 0])
    for ev in live.values():
        g = groups[site(ev["frames"])]
        g[0] += ev["size"]
        g[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    during = sum(e["size"] for e in live.values()) / gib
    lines += ["", f"live at the peak, allocated during the recording ({during:.2f} GiB):",
              "| MiB | blocks | allocated at |", "|---|---|---|"]
    for where, (nbytes, count) in rows[:top]:
        lines.append(f"| {nbytes / 2**20:,.1f} | {count} | `{where}` |")
    if len(rows) > top:
        rest = sum(g[0] for _, g in rows[top:])
        lines.append(f"| {rest / 2**20:,.1f} | {sum(g[1] for _, g in rows[top:])} | (the rest) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("snapshot")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--device", type=int, default=0)
    args = p.parse_args(argv)
    with open(args.snapshot, "rb") as f:
        snap = pickle.load(f)
    print(report(snap, args.top, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
