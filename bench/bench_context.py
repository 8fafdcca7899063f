"""Long-context LoRA training: tok/s and peak memory per sequence length, and the longest
sequence each variant trains at batch 1 within a memory cap (as Unsloth's context tables).

    python bench/bench_context.py --shape 8b --json ctx.json                   # all of it
    python bench/bench_context.py --shape 8b --variants eager,lorafuse:b0 --seqs '' --caps 80 \\
        --time-budget 540 --resume ctx.json --json $OUT/ctx.json               # a slice, resumed
    python bench/bench_context.py --shape tiny --device cpu --variants eager,eager_gc \\
        --seqs 2x256,1024 --caps 700MiB,800MiB --seq-step 512 --max-seq 8192 \\
        --warmup 1 --steps 1 --json /tmp/ctx_tiny.json                         # CPU smoke

Every run is one child process that imports bench/bench_train.py (not edited) and calls its
`child_train` on one variant, batch and sequence length: the same model, step and peers as
bench_train and ANCHORS.md. The child may first apply Liger's patches (variant `liger`) or
limit the CUDA allocator to the cap (`--enforce fraction`). bench/README.md ("Long context")
says what a fit is, how the bisection works and which commands fill issue 5's tables.

The results file holds every run; the tables and the state of every bisection are computed
from it, so `--resume` continues where an earlier (killed, or budget-limited) command
stopped. It is rewritten after every run; the markdown is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
import bench_train as bt  # noqa: E402  (no torch at import time)

VARIANTS = ["eager", "eager_gc", "inductor", "liger", "unsloth_gc", "unsloth", "lorafuse",
            "lorafuse:b0.5", "lorafuse:b0.2", "lorafuse:b0"]
COMPILED = ("inductor", "aot_eager", "lorafuse")
# Seconds a variant's first run is assumed to take at the 8B shape (load + compile + steps),
# until a run of it was timed: decides whether it still fits in the time budget.
FIRST_RUN_S = {"compiled": 240, "unsloth": 150, "other": 75}
RESERVE_S = 15  # kept back from the budget for writing and printing the tables
BUDGET_TAG = re.compile(r"^b(\d+(?:\.\d+)?)$")  # lorafuse:b0.3 = memory_budget 0.3
OOM_MARKERS = ("out of memory", "cublas_status_alloc_failed", "cudaerrormemoryallocation")


def log(msg: str) -> None:
    print(f"[context {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- parsing


def parse_cap(text: str) -> float:
    """'24', '24GiB' -> 24.0; '600MiB' -> 0.5859 (GiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GiB|MiB)?\s*", text, flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"cap {text!r}: expected a positive size such as 24, 24GiB or 600MiB")
    value = float(m.group(1))
    return value / 1024 if (m.group(2) or "").lower() == "mib" else value


def cap_label(cap_gib: float) -> str:
    return f"{cap_gib:g} GiB" if cap_gib >= 1 else f"{cap_gib * 1024:.0f} MiB"


def parse_workloads(text: str) -> list[tuple[int, int]]:
    """'2x2048,2048,8192' -> [(2, 2048), (1, 2048), (1, 8192)] (batch, seq)."""
    out = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        b, _, s = part.rpartition("x")
        if not s.isdigit() or (b and not b.isdigit()) or int(s) < 1 or (b and int(b) < 1):
            raise ValueError(f"workload {part!r}: expected SEQ or BATCHxSEQ, e.g. 2x2048")
        out.append((int(b or 1), int(s)))
    return out


def lorafuse_configs(variants, given: list[str]) -> dict:
    """TAG -> {"options": ..., "env": ...}: those given with --lorafuse-config, and the
    memory-budget shorthands lorafuse:bF (memory_budget F) for the rest."""
    configs = {}
    for spec in given:
        tag, _, text = spec.partition("=")
        configs[tag] = json.loads(text)
    for v in variants:
        if v.startswith("lorafuse:") and v.split(":", 1)[1] not in configs:
            tag = v.split(":", 1)[1]
            m = BUDGET_TAG.match(tag)
            if not m or float(m.group(1)) > 1:
                raise ValueError(f"variant {v}: give --lorafuse-config {tag}=JSON, or use a "
                                 "tag bF with F in [0, 1] (memory_budget F)")
            configs[tag] = {"options": {"memory_budget": float(m.group(1))}}
    return configs


# ----------------------------------------------------------------------------- the search


def classify(run: dict, cap: float, enforce: str) -> str | None:
    """What one run says about fitting in `cap` GiB: "fit", "over", "error", or None (says
    nothing). A fit: the steps ran and the peak is at most the cap. With --enforce fraction
    the run must also have been limited to at most this cap (the allocator's reserved memory,
    fragmentation included, stayed within it)."""
    outcome, limit = run["outcome"], run.get("cap_gib")
    if outcome == "ok":
        if run["peak_gib"] > cap:
            return "over"
        if enforce == "fraction" and (limit is None or limit > cap):
            return None
        return "fit"
    if outcome == "oom":
        # without a limit it ran out of the whole card (above any cap); with a limit, only a
        # limit at or above this cap says it cannot fit this cap (fraction mode's strictness)
        if limit is None or (enforce == "fraction" and limit >= cap):
            return "over"
        return None
    return "error"


def predict_seq(points, cap: float) -> float | None:
    """Sequence length where the peak reaches `cap`, from the line through the two measured
    (seq, peak GiB) points whose peaks are nearest the cap (activation memory grows linearly
    with the sequence: flash attention, per-token logits); None without two usable points."""
    by_distance = sorted(points, key=lambda p: abs(p[1] - cap))
    for i, (s1, p1) in enumerate(by_distance):
        for s2, p2 in by_distance[i + 1:]:
            if s2 != s1:
                slope = (p2 - p1) / (s2 - s1)
                return s1 + (cap - p1) / slope if slope > 0 else None
    return None


@dataclass
class Search:
    """The state of one bisection: `lo` the longest sequence known to fit (0: none yet),
    `hi` the shortest known not to (None: none yet), `next` the sequence to run next (None:
    settled or stopped), `stopped` whether a failed run (not OOM) ended it short, `note`
    what the table should say about it."""
    lo: int
    hi: int | None
    next: int | None
    note: str = ""
    stopped: bool = False


def search_state(outcomes, points, cap: float, step: int, max_seq: int, recent=()) -> Search:
    """Where the bisection for one variant and cap stands, and which sequence to try next.

    outcomes: (seq, "fit" | "over" | "error") for every run of this variant that says
        something about this cap (classify()); points: (seq, peak GiB) of its completed runs
        at batch 1; recent: the outcomes of the runs this search asked for, oldest first.
    Sequences are multiples of `step`, from `step` to `max_seq`. Fitting is assumed to be
    monotone in the sequence length. The next length comes from the peak line (predict_seq),
    rounded down to a multiple of `step` and kept strictly inside (lo, hi): when the line is
    right, one run just below the cap and one a step above settle it. When this search's last
    k >= 2 runs landed on the same side (the line keeps missing), it gallops instead: 2^(k-1)
    steps beyond the bound that moved, at most halfway to the other one. Without a line
    (fewer than two measured peaks): doubling from the longest fit, then halving.
    """
    fits = [s for s, o in outcomes if o == "fit"]
    overs = [s for s, o in outcomes if o == "over"]
    hi = min(overs) if overs else None
    lo = max((s for s in fits if hi is None or s < hi), default=0)
    notes = []
    if any(hi is not None and s > hi for s in fits):
        notes.append(f"not monotone: fits at {max(fits):,} above {hi:,} that does not")
    errors = sorted(s for s, o in outcomes if o == "error" and s > lo and (hi is None or s < hi))
    if errors:
        notes.append(f"stopped: the run at {errors[0]:,} failed (not OOM)")
        return Search(lo, hi, None, "; ".join(notes), stopped=True)
    top = hi if hi is not None else max_seq + step  # no run above max_seq
    if top - lo <= step:
        if hi is None:
            notes.append(f"fits at {lo:,}, the longest tried" if lo > max_seq else
                         f"fits at the longest tried (--max-seq {max_seq:,})")
        return Search(lo, hi, None, "; ".join(notes))
    streak = 0  # how many of this search's last runs landed on the same side
    while streak < len(recent) and recent[-1 - streak] == recent[-1]:
        streak += 1
    guess = predict_seq(points, cap)
    if streak >= 2 and recent[-1] in ("fit", "over"):
        jump = step * 2 ** (streak - 1)
        guess = (min(lo + jump, (lo + top) / 2) if recent[-1] == "fit"
                 else max(top - jump, (lo + top) / 2))
    elif guess is None or not math.isfinite(guess):
        if hi is None:
            guess = 2 * lo if lo else 8 * step  # doubling until something does not fit
        else:
            guess = (lo + hi) / 2
    # (the small term: a prediction a rounding error below a multiple of step is that multiple)
    nxt = max(lo + step, min(top - step, math.floor(guess / step + 1e-9) * step))
    return Search(lo, hi, nxt, "; ".join(notes))


# ----------------------------------------------------------------------------- the runs


def workload_runs(state, variant, batch, seq, kind=None):
    return [r for r in state["runs"] if r["variant"] == variant and r["batch"] == batch
            and r["seq"] == seq and (kind is None or r["kind"] == kind)]


def search_for(state: dict, variant: str, cap: float, opts) -> Search:
    runs = [r for r in state["runs"] if r["variant"] == variant and r["batch"] == 1]
    outcomes = [(r["seq"], o) for r in runs
                if (o := classify(r, cap, opts.enforce)) is not None]
    points = [(r["seq"], r["peak_gib"]) for r in runs if r["outcome"] == "ok"]
    recent = [classify(r, cap, opts.enforce) for r in runs if r.get("for_cap") == cap]
    return search_state(outcomes, points, cap, opts.seq_step, opts.max_seq, recent)


def outcome_of(res: dict) -> str:
    if "error" not in res:
        return "ok"
    text = res["error"].lower()
    return "oom" if text.startswith("oom") or any(m in text for m in OOM_MARKERS) else "error"


def peer_sites(opts) -> dict:
    """Where the peers' packages are, when not importable here: .whl/base.tgz (bitsandbytes,
    liger-kernel) and .whl/uns.tgz (unsloth), built by /work/shared/tools/build_peer_bundles.sh
    and carried to the GPU machine, unpacked once to the folders run_gpu.sh uses."""

    def unpack(tgz: Path, dest: Path) -> str | None:
        if not dest.is_dir():
            if not tgz.exists():
                return None
            partial = Path(f"{dest}.partial")
            subprocess.run(["rm", "-rf", str(partial)], check=True)
            partial.mkdir(parents=True)
            subprocess.run(["tar", "xzf", str(tgz), "-C", str(partial)], check=True)
            partial.rename(dest)
            log(f"unpacked {tgz} to {dest}")
        return str(dest)

    wanted = {v.split(":")[0] for v in opts.variants}
    unsloth = bool(wanted & {"unsloth", "unsloth_gc"})
    sites = {}
    if ("liger" in wanted and importlib.util.find_spec("liger_kernel") is None) or \
            ((unsloth or opts.qlora) and importlib.util.find_spec("bitsandbytes") is None):
        sites["base"] = unpack(REPO_ROOT / ".whl/base.tgz", Path("/tmp/site_base"))
    if unsloth and "UNSLOTH_SITE" not in os.environ:
        sites["uns"] = unpack(REPO_ROOT / ".whl/uns.tgz", Path("/tmp/site_uns"))
    return {k: v for k, v in sites.items() if v}


def child_env(opts, variant: str) -> dict:
    """The environment of one run: the peer packages it needs, and a lorafuse:TAG's env."""
    env = dict(os.environ)
    base = variant.split(":")[0]
    if "base" in opts.sites and (base in ("liger", "unsloth", "unsloth_gc") or opts.qlora):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [opts.sites["base"],
                                                           env.get("PYTHONPATH")]))
    if "uns" in opts.sites and base.startswith("unsloth"):
        env["UNSLOTH_SITE"] = opts.sites["uns"]  # bench_train puts it on that child's path
    if variant.startswith("lorafuse:"):  # as bench_train's run_child does
        env.update({k: str(v) for k, v in
                    opts.configs[variant.split(":", 1)[1]].get("env", {}).items()})
    return env


def train_argv(opts, variant: str, batch: int, seq: int, warmup: int, steps: int) -> list:
    """bench_train's command line for one run (parsed by its parse_args in the child)."""
    argv = ["--shape", opts.shape, "--device", opts.device, "--cache", opts.cache,
            "--seed", str(opts.seed), "--batch", str(batch), "--seq", str(seq),
            "--warmup", str(warmup), "--steps", str(steps), "--no-ref",
            "--variants", "eager" if variant == "liger" else variant]
    if opts.qlora:
        argv.append("--qlora")
    if variant.startswith("lorafuse:"):
        tag = variant.split(":", 1)[1]
        argv += ["--lorafuse-config", f"{tag}={json.dumps(opts.configs[tag])}"]
    return argv


EXIT_WAIT_S = 120


def wait_for_result(proc, out_path: Path, timeout: float, poll_s: float = 1.0) -> bool:
    """Wait until the child exits or has written its whole result (one line ending in a
    newline), at most ``timeout`` seconds; False on timeout. Session 12: a child with 66 GiB
    of pinned host memory printed its result 27 s before the device's time limit and was
    still tearing down when the limit killed the whole run, result file unread."""
    end = time.time() + timeout
    while True:
        try:
            proc.wait(timeout=poll_s)
            return True
        except subprocess.TimeoutExpired:
            pass
        if out_path.read_text().endswith("\n"):
            return True
        if time.time() >= end:
            return False


def run_probe(opts, variant, batch, seq, cap_gib, warmup, steps, timeout, log_path,
              gpu=None) -> dict:
    """One run in its own process (this script with --_probe); its output goes to log_path.
    ``gpu``: the one device it sees (CUDA_VISIBLE_DEVICES), under --gpus. Returns the
    child's result, or {"error": ...} when it wrote none (crash, kill, timeout)."""
    fd, out_path = tempfile.mkstemp(prefix="context_", suffix=".json")
    os.close(fd)
    spec = {"variant": variant, "train_argv": train_argv(opts, variant, batch, seq, warmup, steps),
            "cap_gib": cap_gib, "out": out_path}
    env = child_env(opts, variant)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--_probe", json.dumps(spec)]
    t0 = time.time()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        timed_out = not wait_for_result(proc, Path(out_path), timeout)
        wall = round(time.time() - t0, 1)  # to the result: not the child's teardown
        try:  # the child's process group: it, and any compile workers it left
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:  # a child that pinned tens of GiB can take many seconds to go; its result is in
            proc.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            log(f"  (the child has not exited {EXIT_WAIT_S} s after its kill; going on)")
    text = Path(out_path).read_text().strip()
    os.unlink(out_path)
    if text:
        res = json.loads(text)
    elif timed_out:
        res = {"error": f"timeout: killed after {wall:.0f} s", "timed_out": True}
    elif proc.returncode < 0:
        res = {"error": f"killed by signal {-proc.returncode} (host OOM?)"}
    else:
        res = {"error": f"exit code {proc.returncode} without a result (see {log_path})"}
    if "error" in res and (step1 := step1_from_log(log_path)):
        res["step1"] = step1  # killed or cut after step 1: what that step showed
    res["wall_s"] = wall
    return res


STEP1_LINE = re.compile(r"step 1 \(compile \+ first step\) ([\d.]+) s, loss (\S+?)"
                        r"(?:, peak ([\d.]+) GiB)?(?:,|$)", re.M)


def step1_from_log(log_path) -> dict | None:
    """bench_train's step-1 line in a run's log ({"s", "loss", "peak_gib"}), or None: a run
    cut or killed later still shows that one training step ran, and at which peak."""
    try:
        found = STEP1_LINE.findall(Path(log_path).read_text(errors="replace"))
    except OSError:
        return None
    if not found:
        return None
    seconds, loss, peak = found[-1]
    out = {"s": float(seconds), "loss": float(loss)}
    if peak:
        out["peak_gib"] = float(peak)
    return out


def step1_note(r: dict) -> str:
    step1 = r.get("step1")
    if not step1:
        return ""
    peak = f", peak {fmt_gib(step1['peak_gib'])} GiB" if "peak_gib" in step1 else ""
    return f" (step 1 ran: {step1['s']:.0f} s, loss {step1['loss']:.4f}{peak})"


def child_probe(spec: dict) -> None:
    """In the child: set up the cap / Liger, run bench_train's child_train, write the result."""
    args = bt.parse_args(spec["train_argv"])
    variant, cap = spec["variant"], spec["cap_gib"]
    res = {"variant": variant}
    try:
        import torch

        if cap is not None:  # --enforce fraction: the allocator may not reserve more than cap
            device = bt.training_device(args)
            if device.type != "cuda":
                raise RuntimeError("--enforce fraction needs a CUDA device")
            total = torch.cuda.get_device_properties(device).total_memory
            if cap * 2**30 >= total:
                raise RuntimeError(f"cap {cap:g} GiB is not below the card's "
                                   f"{total / 2**30:.1f} GiB")
            torch.cuda.set_per_process_memory_fraction(cap * 2**30 / total, device)
        if variant == "liger":  # the four kernels of ANCHORS.md's Liger row, before loading
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=True)
        bt.child_train(args, variant, res)
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            res["reserved_end_gib"] = torch.cuda.memory_reserved() / 2**30
            # the allocator's segments, not only the live tensors: what an 80 GiB card must
            # hold unless the cache is released (session 11: 84 GiB reserved at 62 allocated)
            res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            res["device_total_gib"] = torch.cuda.get_device_properties(
                torch.cuda.current_device()).total_memory / 2**30
    except BaseException as exc:  # reported in one line by the parent, never raised
        bt.log(f"{variant} failed:\n{traceback.format_exc()}")
        res.update(error=bt.describe_error(exc), traceback=traceback.format_exc()[-3000:])
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB
    tmp = Path(spec["out"] + ".part")  # the parent reads the file once it ends in a newline
    tmp.write_text(json.dumps(res) + "\n")
    tmp.replace(spec["out"])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: freeing tens of GiB of pinned memory takes long


def run_record(opts, res, kind, variant, batch, seq, cap_gib, for_cap, warmup, steps, log_path):
    """The stored form of one run: what the tables and the searches read."""
    on_cuda = opts.device.startswith("cuda")
    rec = {"kind": kind, "variant": variant, "batch": batch, "seq": seq, "cap_gib": cap_gib,
           "for_cap": for_cap, "warmup": warmup, "steps": steps, "session": opts.session,
           "outcome": outcome_of(res), "wall_s": res.get("wall_s"), "log": str(log_path)}
    if variant.startswith("lorafuse:"):
        rec["config"] = opts.configs[variant.split(":", 1)[1]]
    losses = res.get("losses") or []
    bad = [i + 1 for i, x in enumerate(losses) if not math.isfinite(x)]
    if rec["outcome"] == "ok" and bad:  # a run that returns NaN does not "train" at that length
        rec["outcome"], res["error"] = "error", f"non-finite loss at steps {bad[:5]}"
    if "error" in res:
        rec["error"] = res["error"]
    if rec["outcome"] == "ok":
        rec.update(tok_s=res["tok_s"], loss_1=losses[0] if losses else None,
                   peak_kind="cuda max_memory_allocated" if on_cuda else "cpu max RSS",
                   peak_gib=res["peak_gib"] if on_cuda else res["peak_rss_gib"])
    for key in ("compile_s", "load_s", "load_gib", "reserved_end_gib", "device_total_gib",
                "graph_breaks", "peak_warmup_gib", "peak_timed_gib", "lorafuse_counters",
                "peak_step1_gib", "compile_parts_s", "step1", "peak_rss_gib",
                "peak_reserved_gib"):
        if key in res:
            rec[key] = res[key]
    return rec


# ----------------------------------------------------------------------------- the driver


class Driver:
    """Runs what is missing, in order (the table, then the searches, variant by variant),
    within the time budget; saves the state after every run. Under ``--gpus N`` (N > 1), N
    workers take the variants one at a time, each on its own GPU, side by side: a variant's
    table and searches run in order on one GPU, and the state and its file are shared
    under a lock (issue 5's 80 GiB comparison in one command: Unsloth's and lorafuse's
    256K runs take 4-9 minutes each)."""

    def __init__(self, opts, state, probe=None, clock=time.time):
        self.opts, self.state, self.clock = opts, state, clock
        self.worker = threading.local()  # .gpu: the GPU of the worker thread running
        self.probe = probe or (lambda *a: run_probe(opts, *a, gpu=self.gpu()))
        self.t0 = clock()
        self.skipped = []  # (variant, what, why) for the report
        self.log_dir = Path(opts.log_dir)
        self.lock = threading.Lock()  # state, its file, the log numbering

    def gpu(self) -> str | None:
        return getattr(self.worker, "gpu", None)

    def left(self) -> float | None:
        return self.opts.time_budget - (self.clock() - self.t0) if self.opts.time_budget else None

    def estimate(self, variant: str, tokens: int = 0, n_steps: int = 2) -> float:
        """Seconds a run of ``variant`` at ``tokens`` (batch × sequence) with ``n_steps``
        steps is expected to take. From the variant's finished runs: their fixed part (load,
        compile) plus the steps, whose time per step is ``b·L + c·L²`` fitted through the two
        runs nearest below (attention grows with the square of the length), or scaled with
        the square from the one run there is. With no finished run, the longest run so far
        (any outcome), or a first-run guess. A run cut by the budget needed more than it had:
        a minute more than that, at least."""
        runs = [r for r in self.state["runs"] if r["variant"] == variant]
        walls = [r.get("wall_s") or 0 for r in runs]
        walls += [(r.get("wall_s") or 0) + 60 for r in self.state["interrupted"]
                  if r["variant"] == variant]
        base = variant.split(":")[0]
        kind = ("compiled" if base in COMPILED else
                "unsloth" if base.startswith("unsloth") else "other")
        floor = max(walls) if walls else FIRST_RUN_S[kind]
        timed = sorted((r["batch"] * r["seq"], r) for r in runs
                       if r.get("outcome") == "ok" and r.get("tok_s") and r.get("wall_s"))
        if not timed or not tokens:
            return floor
        below = [t for t in timed if t[0] <= tokens] or timed[:1]

        def step_s(t, r):
            return t / r["tok_s"]

        t1, r1 = below[-1]
        fixed = max(0.0, r1["wall_s"] - (r1["warmup"] + r1["steps"]) * step_s(t1, r1))
        if len(below) >= 2 and below[-2][0] < t1:
            t0, r0 = below[-2]
            # b·t + c·t² through both points; c < 0 (noise) falls back to linear
            per0, per1 = step_s(t0, r0) / t0, step_s(t1, r1) / t1
            c = max(0.0, (per1 - per0) / (t1 - t0))
            step = (per1 - c * t1) * tokens + c * tokens ** 2
            step = max(step, step_s(t1, r1) * tokens / t1)
        else:
            step = step_s(t1, r1) * max(1.0, (tokens / t1) ** 2)
        interrupted = [(r.get("wall_s") or 0) + 60 for r in self.state["interrupted"]
                       if r["variant"] == variant and r["batch"] * r["seq"] <= tokens]
        return max([fixed + n_steps * step] + interrupted)

    def run(self, kind, variant, batch, seq, cap_gib=None, for_cap=None) -> str | None:
        """One run if the budget allows; returns its outcome, or None if it did not run (or
        was cut by the budget: then it is kept aside and retried by a later --resume)."""
        o = self.opts
        warmup, steps = ((o.warmup, o.steps) if kind == "table"
                         else (o.fit_warmup, o.fit_steps_of.get(variant, o.fit_steps)))
        what = f"{batch}x{seq}" + (f" for {cap_label(for_cap)}" if for_cap else "")
        left, need = self.left(), self.estimate(variant, batch * seq, warmup + steps)
        if left is not None and left - RESERVE_S < need:
            self.skipped.append((variant, what, f"needs ~{need:.0f} s, {max(left, 0):.0f} s left"))
            return None
        timeout = o.variant_timeout if left is None else min(o.variant_timeout, left - RESERVE_S)
        gpu = self.gpu()
        with self.lock:
            n = len(self.state["runs"]) + len(self.state["interrupted"])
            self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{n:03d}_{variant.replace(':', '_')}_{batch}x{seq}.log"
        log(f"{variant} {what} ({kind}, {warmup}+{steps} steps, timeout {timeout:.0f} s, "
            + (f"GPU {gpu}, " if gpu is not None else "") + f"log {log_path})")
        res = self.probe(variant, batch, seq, cap_gib, warmup, steps, timeout, log_path)
        rec = run_record(o, res, kind, variant, batch, seq, cap_gib, for_cap, warmup, steps,
                         log_path)
        if gpu is not None:
            rec["gpu"] = gpu
        if res.get("timed_out") and timeout < o.variant_timeout:
            with self.lock:
                self.state["interrupted"].append(rec)  # the budget's fault: not an observation
                save(o, self.state)
            self.skipped.append((variant, what, f"cut by the time budget after {rec['wall_s']} s"
                                 + step1_note(rec)))
            return None
        with self.lock:
            self.state["runs"].append(rec)
            save(o, self.state)
        who = f"  {variant} {what}" if gpu is not None else " "  # interleaved under --gpus
        log(f"{who} -> {rec['outcome']}" + (f": {fmt_tok_s(rec, ' tok/s')}, peak {rec['peak_gib']:.2f}"
                                        f" GiB" if rec["outcome"] == "ok"
                                        else f": {rec['error']}{step1_note(rec)}")
            + f" ({rec['wall_s']} s)")
        return rec["outcome"]

    def go(self) -> None:
        gpus = self.opts.gpu_ids
        if len(gpus) <= 1:
            self.go_variants(self.opts.variants)
            return
        todo = queue.SimpleQueue()
        for v in self.opts.variants:
            todo.put(v)
        failed = []

        def work(gpu):
            self.worker.gpu = gpu
            while not failed:
                try:
                    variant = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    self.go_variants([variant])
                except BaseException as exc:  # the other workers stop after their run
                    failed.append(exc)

        threads = [threading.Thread(target=work, args=(g,), name=f"gpu{g}") for g in gpus]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failed:
            raise failed[0]

    def go_variants(self, variants) -> None:
        o = self.opts
        for variant in variants:
            for batch, seq in o.workloads:
                if not workload_runs(self.state, variant, batch, seq, "table"):
                    self.run("table", variant, batch, seq)
        for variant in variants:
            for cap in o.caps:
                tried = set()
                while True:
                    s = search_for(self.state, variant, cap, o)
                    if s.next is None:
                        break
                    if s.next in tried:  # cannot happen while classify/search agree
                        raise RuntimeError(f"{variant}: search asked for {s.next} twice")
                    tried.add(s.next)
                    limit = cap if o.enforce == "fraction" else None
                    if self.run("fit", variant, 1, s.next, limit, cap) is None:
                        break


# ----------------------------------------------------------------------------- state, tables


def new_state(opts) -> dict:
    return {"meta": {"shape": opts.shape, "device": opts.device, "qlora": opts.qlora,
                     "enforce": opts.enforce,
                     "created": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                     "sessions": []},
            "runs": [], "interrupted": []}


def load_state(opts) -> dict:
    """The --resume file, checked against this command's settings."""
    path = Path(opts.resume)
    if not path.exists():
        log(f"--resume {path}: no such file yet, starting afresh")
        return new_state(opts)
    state = json.loads(path.read_text())
    meta = state["meta"]
    for key in ("shape", "device", "qlora", "enforce"):
        if meta.get(key) != getattr(opts, key):
            raise SystemExit(f"--resume {path}: it has {key}={meta.get(key)!r}, this command "
                             f"{getattr(opts, key)!r}; use another results file")
    for r in state["runs"]:
        tag = r["variant"].split(":", 1)[1] if r["variant"].startswith("lorafuse:") else None
        if tag and tag in opts.configs and r.get("config") != opts.configs[tag]:
            raise SystemExit(f"--resume {path}: {r['variant']} ran with {r.get('config')}, "
                             f"now {opts.configs[tag]}; give this configuration another tag")
    return state


def save(opts, state) -> None:
    path = Path(opts.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    tmp.replace(path)  # a kill mid-write leaves the previous file whole
    if opts.md:
        Path(opts.md).write_text(render(opts, state))


def fmt_gib(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"  # small figures: CPU smoke runs


def fmt_tok_s(r: dict, unit: str = "") -> str:
    """A run's tok/s, or what it ran instead: a fit run with no timed step (--fit-steps 0)."""
    if r.get("tok_s"):
        return f"{r['tok_s']:,.0f}{unit}"
    return f"untimed, {r['warmup']} step" + ("s" if r["warmup"] > 1 else "")


def fmt_run(r: dict) -> str:
    if r["outcome"] == "ok":
        return f"{fmt_tok_s(r)} · {fmt_gib(r['peak_gib'])}"
    if r["outcome"] == "oom":
        return "OOM" + (f" (limit {cap_label(r['cap_gib'])})" if r.get("cap_gib") else "") \
            + step1_note(r)
    return "error: " + bt.one_line(r["error"], 80) + step1_note(r)


def render(opts, state) -> str:
    runs = state["runs"]
    variants = list(dict.fromkeys(opts.variants + [r["variant"] for r in runs]))
    workloads = list(dict.fromkeys(opts.workloads + [(r["batch"], r["seq"]) for r in runs
                                                      if r["kind"] == "table"]))
    sessions = state["meta"]["sessions"]
    lines = [f"## bench_context --shape {opts.shape}{' --qlora' if opts.qlora else ''}", ""]
    for s in sessions:
        env = s.get("env", {})
        lines.append(f"- session {s['index']}: {s['date']}, commit {s['commit']}, "
                     f"{env.get('device_name', '?')}, torch {env.get('torch', '?')}, "
                     f"transformers {env.get('transformers', '?')}, peft {env.get('peft', '?')}"
                     + (f"; {s['gpus']} variants at a time, one GPU each"
                        if s.get("gpus", 1) > 1 else ""))
    on_cpu = opts.device == "cpu"
    peak = "max RSS of the process (CPU smoke, not a GPU figure)" if on_cpu else \
        "`torch.cuda.max_memory_allocated` (weights included)"

    def steps_of(kind, default):  # what the recorded runs did (--report has no settings)
        done = sorted({f"{r['warmup']}+{r['steps']}" for r in runs if (r["kind"] == "table")
                       == (kind == "table")})
        return " or ".join(done) if done else default

    lines += [f"- peak: {peak}; LoRA r=16 on 7 projections, bf16 autocast, AdamW; table runs "
              f"{steps_of('table', f'{opts.warmup}+{opts.steps}')} steps, search runs "
              f"{steps_of('search', f'{opts.fit_warmup}+{opts.fit_steps}')}", ""]

    lines += ["### tok/s · peak GiB per workload (batch × sequence)", "",
              "| variant | " + " | ".join(f"{b}×{s}" for b, s in workloads) + " |",
              "|---|" + "---|" * len(workloads)]
    for v in variants:
        cells = []
        for b, s in workloads:
            rs = workload_runs(state, v, b, s, "table")
            cut = [r for r in state["interrupted"] if r.get("step1") and r["kind"] == "table"
                   and (r["variant"], r["batch"], r["seq"]) == (v, b, s)]
            cells.append(fmt_run(rs[-1]) if rs else
                         "cut by the budget" + step1_note(cut[-1]) if cut else "—")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines.append("")
    left = left_alone(runs)
    if left:  # session 9: a mask left in place made a run 1.8 × slower with nothing in the table
        lines += ["lorafuse runs whose passes left sites alone (the report says why): "
                  + "; ".join(left), ""]
    flagged = loss_outliers(runs)
    if flagged:
        lines += ["Step-1 loss unlike the other variants' at the same workload (same weights "
                  "and batch, so it should agree to ~1e-3): " + "; ".join(flagged), ""]

    if opts.caps:
        fit_def = ("steps ran and peak ≤ cap" if opts.enforce == "peak" else
                   "steps ran with the CUDA allocator limited to the cap "
                   "(`set_per_process_memory_fraction`)")
        lines += [f"### longest sequence at batch 1 (multiples of {opts.seq_step:,}; fit: "
                  f"{fit_def})", "",
                  "| variant | " + " | ".join(f"≤ {cap_label(c)}" for c in opts.caps) + " |",
                  "|---|" + "---|" * len(opts.caps)]
        searches = {c: {} for c in opts.caps}
        notes = []
        for v in variants:
            cells = []
            for c in opts.caps:
                s = searches[c][v] = search_for(state, v, c, opts)
                cells.append(fit_cell(state, v, s, opts))
                if s.note:
                    notes.append(f"- {v}, {cap_label(c)}: {s.note}")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
        for c in opts.caps:
            line = compare_line(searches[c], opts)
            if line:
                lines.append(f"- {cap_label(c)}: {line}")
        lines += notes + [""]

    todo = todo_lines(opts, state)
    lines.append("state: complete" if not todo else
                 "state: incomplete, run again with --resume: " + "; ".join(todo))
    return "\n".join(lines) + "\n"


def compare_line(searches: dict, opts) -> str | None:
    """Longest lorafuse variant against the longest Unsloth variant at one cap (issue 5's
    bar), from the searches' bounds: a verdict only when the bounds decide it, so an open
    search of either side never makes the other look longer than it is."""
    def side(prefix):
        found = {v: s for v, s in searches.items() if v.startswith(prefix)}
        if not found:
            return None
        # lo: longest known to fit; top: longest that may fit (inf: no length known too long)
        lo_v = max(found, key=lambda v: found[v].lo)
        top = max(math.inf if s.hi is None or s.stopped else s.hi - opts.seq_step
                  for s in found.values())
        settled = all(s.next is None and not s.stopped for s in found.values())
        return lo_v, found[lo_v].lo, top, settled
    mine, peers = side("lorafuse"), side("unsloth")
    if not mine or not peers:
        return None
    (v1, lo1, top1, done1), (v2, lo2, top2, done2) = mine, peers
    if done1 and done2:
        def length(lo, top):  # top is inf where the variant fit at the longest tried
            return f"none (< {top + opts.seq_step:,})" if lo == 0 else (
                f"≥ {lo:,}" if top == math.inf else f"{lo:,}")
        if lo1 == lo2:
            verdict = ("not decided: both fit at the longest tried (--max-seq)"
                       if top1 == top2 == math.inf else "the same length")
        else:
            verdict = "lorafuse longer" if lo1 > lo2 else "Unsloth longer"
        ratio = f" ({lo1 / lo2:.2f} ×)" if lo2 else ""
        return (f"{verdict}: longest lorafuse {v1} {length(lo1, top1)}, longest Unsloth "
                f"{v2} {length(lo2, top2)}{ratio}")
    if lo1 > top2:
        return (f"lorafuse longer: {v1} fits at {lo1:,}; no Unsloth variant fits above "
                f"{top2:,} (searches still open)")
    if lo2 > top1:
        return (f"Unsloth longer: {v2} fits at {lo2:,}; no lorafuse variant fits above "
                f"{top1:,} (searches still open)")
    return (f"not decided yet: lorafuse {v1} fits at {lo1:,}, Unsloth {v2} at {lo2:,} "
            "(searches still open)")


def fit_cell(state, variant, s: Search, opts) -> str:
    """One cell of the longest-sequence table (the notes under it say why a search stopped)."""
    if s.next is not None:
        top = s.hi or opts.max_seq + opts.seq_step
        return f"≥ {s.lo:,}, < {top:,} (open)" if s.lo else f"< {top:,} (open)"
    if s.stopped:
        return (f"≥ {s.lo:,}" if s.lo else "—") + " (stopped, see below)"
    if s.lo == 0:
        return f"none (< {s.hi:,})"
    at = [r for r in state["runs"] if r["variant"] == variant and r["batch"] == 1
          and r["seq"] == s.lo and r["outcome"] == "ok"]
    detail = f" ({fmt_tok_s(at[-1], ' tok/s')}, {fmt_gib(at[-1]['peak_gib'])} GiB)" if at else ""
    return ("≥ " if s.hi is None else "") + f"{s.lo:,}{detail}"


def left_alone(runs) -> list[str]:
    """``variant batch×seq (attention_skipped 32, …)`` for each lorafuse run with a
    ``*_skipped`` counter above 0."""
    out = []
    for r in runs:
        skipped = {k: n for k, n in (r.get("lorafuse_counters") or {}).items()
                   if k.endswith("_skipped") and n}
        if skipped:
            out.append(f"{r['variant']} {r['batch']}×{r['seq']} ("
                       + ", ".join(f"{k} {n}" for k, n in sorted(skipped.items())) + ")")
    return out


def loss_outliers(runs) -> list[str]:
    groups = {}
    for r in runs:
        if r["outcome"] == "ok" and r.get("loss_1") is not None:
            groups.setdefault((r["batch"], r["seq"]), {})[r["variant"]] = r["loss_1"]
    out = []
    for (b, s), by_variant in groups.items():
        if len(by_variant) >= 3:
            median = sorted(by_variant.values())[len(by_variant) // 2]
            out += [f"{v} at {b}×{s}: {x:.4f} vs median {median:.4f}"
                    for v, x in by_variant.items() if abs(x - median) > 0.05]
    return out


def todo_lines(opts, state) -> list[str]:
    """What this command's workloads and caps still lack, over every variant in the file."""
    variants = list(dict.fromkeys(opts.variants + [r["variant"] for r in state["runs"]]))
    todo = []
    missing = [(v, b, s) for v in variants for b, s in opts.workloads
               if not workload_runs(state, v, b, s, "table")]
    if missing:
        todo.append(f"{len(missing)} table cell(s)")
    open_ = [(v, c) for v in variants for c in opts.caps
             if search_for(state, v, c, opts).next is not None]
    if open_:
        todo.append("searches open: " + ", ".join(f"{v} {cap_label(c)}" for v, c in open_))
    return todo


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(bt.SHAPES), default="8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="bench_train's variants, liger, and lorafuse:bF (memory_budget F)")
    p.add_argument("--seqs", default="2x2048,2048,8192,32768",
                   help="table workloads, SEQ (batch 1) or BATCHxSEQ; '' for none")
    p.add_argument("--caps", default="24,80",
                   help="memory caps for the longest-sequence search, GiB (or 600MiB); '' for none")
    p.add_argument("--enforce", choices=["peak", "fraction"], default="peak",
                   help="peak: a fit is a run whose peak allocated is at most the cap (one run "
                        "serves every cap); fraction: each search run is also limited to its cap "
                        "with torch.cuda.set_per_process_memory_fraction")
    p.add_argument("--seq-step", type=int, default=1024,
                   help="the lengths searched are multiples of this")
    p.add_argument("--max-seq", type=int, default=262144, help="longest sequence the search tries")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps of a table run (step 1: compile)")
    p.add_argument("--steps", type=int, default=5, help="timed steps of a table run")
    p.add_argument("--fit-warmup", type=int, default=1, help="untimed steps of a search run")
    p.add_argument("--fit-steps", type=int, default=1,
                   help="timed steps of a search run; 0: its untimed steps only, which decide "
                        "by their peak and give no tok/s (at 256K one step is minutes)")
    p.add_argument("--fit-steps-of", action="append", default=[], metavar="VARIANT=N",
                   help="--fit-steps for one variant (repeatable): Unsloth's offloaded "
                        "checkpointing needs its second step at 256K, where its double-"
                        "buffered backward starts (82.7 GiB against step 1's 78.5, session 11)")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds for this command (0: none); what does not fit is left "
                        "for --resume")
    p.add_argument("--variant-timeout", type=float, default=560, help="seconds one run may take")
    p.add_argument("--gpus", type=int, default=1,
                   help="run up to this many variants side by side, one GPU each (the first N "
                        "of CUDA_VISIBLE_DEVICES, else 0..N-1); each run still sees one GPU, "
                        "and the host's memory is shared (offloading pins it)")
    p.add_argument("--lorafuse-config", action="append", default=[], metavar="TAG=JSON",
                   help='lorafuse:TAG runs with {"options": {...}, "env": {...}} (as bench_train)')
    p.add_argument("--cache", default="/tmp/lorafuse_bench", help="bench_train's model cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qlora", action="store_true", help="bitsandbytes NF4 base (as bench_train)")
    p.add_argument("--json", help="results file, rewritten after every run (default: --resume's)")
    p.add_argument("--resume", help="results file of earlier commands to continue from")
    p.add_argument("--md", help="also write the tables to this file")
    p.add_argument("--report", action="store_true",
                   help="print the tables of every variant in --resume's file; run nothing")
    p.add_argument("--log-dir", help="one log per run (default: beside --json)")
    p.add_argument("--_probe", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts._probe:
        return opts
    opts.variants = [v.strip() for v in opts.variants.split(",") if v.strip()]
    try:
        opts.workloads = parse_workloads(opts.seqs)
        opts.caps = sorted(parse_cap(c) for c in opts.caps.split(",") if c.strip())
        opts.configs = lorafuse_configs(opts.variants, opts.lorafuse_config)
    except ValueError as exc:
        p.error(str(exc))
    unknown = [v for v in opts.variants if v != "liger" and v.split(":")[0] not in bt.VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS} (or lorafuse:TAG)")
    try:
        opts.fit_steps_of = {v.strip(): int(n) for v, n in
                             (item.split("=", 1) for item in opts.fit_steps_of)}
    except ValueError:
        p.error(f"--fit-steps-of takes VARIANT=N, got {opts.fit_steps_of}")
    stray = sorted(set(opts.fit_steps_of) - set(opts.variants))
    if stray:
        p.error(f"--fit-steps-of names variants not in --variants: {stray}")
    if (min([opts.fit_steps, *opts.fit_steps_of.values()]) < 0 or opts.fit_warmup < 1
            or opts.steps < 1 or opts.warmup < 1):
        p.error("warm-up steps must be at least 1, and a table run's timed steps too "
                "(--fit-steps may be 0)")
    if opts.seq_step < 1 or opts.max_seq < opts.seq_step:
        p.error("--seq-step must be positive and --max-seq at least --seq-step")
    if opts.enforce == "fraction" and opts.device == "cpu":
        p.error("--enforce fraction limits the CUDA allocator; on CPU use --enforce peak")
    if opts.gpus < 1:
        p.error("--gpus must be at least 1")
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if d.strip()]
    if opts.gpus > 1 and visible and len(visible) < opts.gpus:
        p.error(f"--gpus {opts.gpus}: CUDA_VISIBLE_DEVICES names {len(visible)} device(s)")
    opts.gpu_ids = (visible or [str(i) for i in range(opts.gpus)])[:opts.gpus] \
        if opts.gpus > 1 else [None]
    opts.json = opts.json or opts.resume
    if opts.report and not (opts.resume and Path(opts.resume).exists()):
        p.error("--report needs --resume FILE (an existing results file)")
    if not opts.json:
        p.error("give --json FILE (or --resume FILE) for the results")
    opts.log_dir = opts.log_dir or str(Path(opts.json).with_suffix("")) + "_logs"
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts._probe:
        child_probe(json.loads(opts._probe))
        return 0
    state = load_state(opts) if opts.resume else new_state(opts)
    if opts.report:
        opts.variants = []  # the rows: the variants in the file
        print(render(opts, state), flush=True)
        return 0
    opts.session = len(state["meta"]["sessions"])
    opts.sites = peer_sites(opts)
    if opts.gpus > 1 and opts.device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < opts.gpus:
            log(f"--gpus {opts.gpus}: this machine shows {torch.cuda.device_count()} GPU(s); "
                "nothing was run")
            return 2
    driver = Driver(opts, state)
    # the model: bench_train's own build child (reuses the saved model when it matches)
    build_args = bt.parse_args(train_argv(opts, "eager", 1, 128, 1, 1))
    build = bt.run_child(build_args, "build", timeout=driver.left() or 3600)
    state["meta"]["sessions"].append({
        "index": opts.session, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "commit": bt.git_commit(), "argv": sys.argv[1:] if argv is None else argv,
        "gpus": opts.gpus,
        "env": build.get("env", {}), "peer_sites": opts.sites})
    save(opts, state)
    if "error" in build:
        log(f"building the model failed: {build['error']}")
        return 1
    try:
        driver.go()
    finally:
        for variant, what, why in driver.skipped:
            log(f"not run this time: {variant} {what}: {why}")
        save(opts, state)
        print(render(opts, state), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
