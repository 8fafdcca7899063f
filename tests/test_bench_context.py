"""bench/bench_context.py without a GPU: the longest-sequence search against fake oracles,
the classification of runs, and the driver (budget, resume, tables) with a fake run in
place of the child process. Pure Python, no model: well under a second."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_context as bc  # noqa: E402

STEP = 1024


def search(fits, peak=None, cap=80.0, step=STEP, max_seq=262144, limit=60):
    """Drive search_state with the oracle fits(seq) (and peak(seq) for the line) until it
    settles; return the final Search and the sequences it tried, in order."""
    outcomes, points, tried = [], [], []
    for _ in range(limit):
        s = bc.search_state(outcomes, points, cap, step, max_seq, [o for _, o in outcomes])
        if s.next is None:
            return s, tried
        assert s.next % step == 0 and step <= s.next <= max_seq, s
        assert s.next not in tried, (s, tried)
        tried.append(s.next)
        ok = fits(s.next)
        outcomes.append((s.next, "fit" if ok else "over"))
        if peak is not None:
            points.append((s.next, peak(s.next)))
    raise AssertionError(f"no answer after {limit} runs: {tried}")


def test_bisection_alone_finds_the_threshold_in_log_steps():
    rng = random.Random(0)
    for _ in range(200):
        threshold = rng.randrange(0, 300_000)
        s, tried = search(lambda n, t=threshold: n <= t)
        expect = min(threshold // STEP * STEP, 262144)
        assert s.lo == expect, (threshold, s, tried)
        assert len(tried) <= 2 * 9 + 2  # doubling, then halving over <= 256 steps
        if expect < 262144:
            assert s.hi == expect + STEP and s.note == ""


def test_peak_line_settles_in_two_or_three_runs():
    # peak = weights + per-token activations: the line through two table points predicts
    for a, b in [(15.0, 0.0021), (16.0, 0.00023), (20.0, 0.008), (15.5, 0.0004)]:
        for cap in (24.0, 80.0):
            def peak(n):
                return a + b * n
            table = [(2048, "fit" if peak(2048) <= cap else "over"),
                     (8192, "fit" if peak(8192) <= cap else "over")]
            outcomes, points, tried = list(table), [(2048, peak(2048)), (8192, peak(8192))], []
            while True:
                s = bc.search_state(outcomes, points, cap, STEP, 262144,
                                    [o for n, o in outcomes if n in tried])
                if s.next is None:
                    break
                tried.append(s.next)
                outcomes.append((s.next, "fit" if peak(s.next) <= cap else "over"))
                points.append((s.next, peak(s.next)))
            expect = min(int((cap - a) / b) // STEP * STEP, 262144)
            assert s.lo == expect, (a, b, cap, s, tried)
            assert len(tried) <= 3, (a, b, cap, tried)


def test_a_wrong_line_falls_back_to_bisection():
    # the peak jumps (a memory plan that changes with length): the line keeps missing
    def peak(n):
        return 20 + 0.001 * n + (40 if n > 50_000 else 0)
    s, tried = search(lambda n: peak(n) <= 80, peak)
    assert s.lo == 49152  # 50,000 rounded down to a multiple of 1024: 48 * 1024
    assert len(tried) <= 20


def test_two_misses_in_a_row_gallop():
    line = [(8192, 20.0), (16384, 30.0)]  # predicts 80 GiB at 57,344
    s = bc.search_state([(57344, "fit"), (58368, "fit")], line, 80, STEP, 262144,
                        ["fit", "fit"])
    assert s.next == 58368 + 2 * STEP
    s = bc.search_state([(57344, "fit"), (58368, "fit"), (60416, "fit")], line, 80, STEP,
                        262144, ["fit", "fit", "fit"])
    assert s.next == 60416 + 4 * STEP
    # downwards, and never past the midpoint
    s = bc.search_state([(4096, "fit"), (57344, "over"), (56320, "over")], line, 80, STEP,
                        262144, ["over", "over"])
    assert s.next == 56320 - 2 * STEP
    s = bc.search_state([(4096, "fit"), (20480, "over"), (19456, "over"), (17408, "over"),
                         (13312, "over")], line, 80, STEP, 262144, ["over"] * 4)
    assert s.next == 8192  # 13,312 - 8 steps would pass the midpoint 8,704


def test_nothing_fits_and_everything_fits():
    s, _ = search(lambda n: False)
    assert (s.lo, s.hi, s.next) == (0, STEP, None)
    s, tried = search(lambda n: True, max_seq=65536)
    assert s.lo == 65536 and s.hi is None and "max-seq" in s.note
    assert tried[-1] == 65536
    # a table run past --max-seq that fits is the answer, named as such
    s = bc.search_state([(16384, "fit"), (270336, "fit")], [], 80, STEP, 262144)
    assert s.lo == 270336 and s.next is None and s.note == "fits at 270,336, the longest tried"


def test_a_failed_run_inside_the_interval_stops_the_search():
    s = bc.search_state([(4096, "fit"), (8192, "error"), (65536, "over")], [], 80, STEP, 262144)
    assert s.next is None and s.stopped and s.lo == 4096 and "8,192" in s.note
    # an error outside (lo, hi) says nothing about the answer
    s = bc.search_state([(4096, "fit"), (8192, "over"), (65536, "error")], [], 80, STEP, 262144)
    assert s.next == 5120 or 4096 < s.next < 8192
    assert not s.stopped


def test_not_monotone_is_reported():
    s = bc.search_state([(4096, "fit"), (5120, "over"), (9216, "fit")], [], 80, STEP, 262144)
    assert s.lo == 4096 and s.hi == 5120 and s.next is None and "not monotone" in s.note


def test_predict_seq_uses_the_points_nearest_the_cap():
    points = [(2048, 20.0), (8192, 26.0), (32768, 50.0)]
    assert bc.predict_seq(points, 80.0) == pytest.approx(32768 + 30 / (24 / 24576))
    assert bc.predict_seq(points, 23.0) == pytest.approx(2048 + 3 * 6144 / 6)
    assert bc.predict_seq([(2048, 20.0)], 80.0) is None
    assert bc.predict_seq([(2048, 20.0), (4096, 19.0)], 80.0) is None  # no growth: no line


def run(outcome, peak=None, cap=None, seq=4096):
    r = {"variant": "eager", "batch": 1, "seq": seq, "outcome": outcome, "cap_gib": cap}
    if peak is not None:
        r["peak_gib"] = peak
    return r


def test_classify_peak_mode():
    assert bc.classify(run("ok", 23.9), 24, "peak") == "fit"
    assert bc.classify(run("ok", 24.1), 24, "peak") == "over"
    assert bc.classify(run("oom"), 80, "peak") == "over"  # out of the whole card
    assert bc.classify(run("error"), 80, "peak") == "error"


def test_classify_fraction_mode():
    assert bc.classify(run("ok", 20, cap=24), 24, "fraction") == "fit"
    assert bc.classify(run("ok", 20, cap=24), 80, "fraction") == "fit"  # fit 24: fits 80
    assert bc.classify(run("ok", 20, cap=80), 24, "fraction") is None  # reserved unknown
    assert bc.classify(run("ok", 20), 24, "fraction") is None  # not limited
    assert bc.classify(run("ok", 30), 24, "fraction") == "over"
    assert bc.classify(run("oom", cap=80), 24, "fraction") == "over"
    assert bc.classify(run("oom", cap=24), 80, "fraction") is None


def test_outcome_of_errors():
    assert bc.outcome_of({"tok_s": 1.0}) == "ok"
    assert bc.outcome_of({"error": "OOM: CUDA out of memory. Tried to allocate 2 GiB"}) == "oom"
    assert bc.outcome_of({"error": "RuntimeError: CUBLAS_STATUS_ALLOC_FAILED when calling"}) \
        == "oom"
    assert bc.outcome_of({"error": "timeout: killed after 560 s"}) == "error"
    assert bc.outcome_of({"error": "OutOfResources: out of resource: shared memory"}) == "error"


def test_parsing():
    assert bc.parse_workloads("2x2048, 2048,8192") == [(2, 2048), (1, 2048), (1, 8192)]
    assert bc.parse_workloads("") == []
    with pytest.raises(ValueError):
        bc.parse_workloads("2x")
    assert bc.parse_cap("24") == 24 and bc.parse_cap("80GiB") == 80
    assert bc.parse_cap("512MiB") == 0.5
    with pytest.raises(ValueError):
        bc.parse_cap("24GB")
    cfg = bc.lorafuse_configs(["lorafuse:b0.2", "lorafuse:x"],
                              ['x={"options": {"passes": ["lora"]}}'])
    assert cfg == {"b0.2": {"options": {"memory_budget": 0.2}},
                   "x": {"options": {"passes": ["lora"]}}}
    with pytest.raises(ValueError):
        bc.lorafuse_configs(["lorafuse:b2"], [])


# ----------------------------------------------------------------------------- the driver

# fake variants: peak GiB = a + b * (tokens / 1024); the card holds 139 GiB
FAKE = {"eager": (15.0, 8.5), "unsloth_gc": (16.0, 0.4), "lorafuse:b0": (15.5, 0.3)}
CARD = 139.0


class FakeRuns:
    """Stands for run_probe: a fake peak per variant, OOM above the card (or above the cap
    when limited), and `wall` seconds of a fake clock per run."""

    def __init__(self, wall=100.0, broken=()):
        self.now, self.wall, self.broken, self.calls = 0.0, wall, set(broken), []

    def clock(self):
        return self.now

    def __call__(self, variant, batch, seq, cap_gib, warmup, steps, timeout, log_path):
        self.calls.append((variant, batch, seq, cap_gib))
        if timeout < self.wall:
            self.now += timeout
            return {"error": f"timeout: killed after {timeout:.0f} s", "timed_out": True,
                    "wall_s": timeout}
        self.now += self.wall
        a, b = FAKE[variant]
        peak = a + b * batch * seq / 1024
        if (variant, seq) in self.broken:
            return {"error": "RuntimeError: illegal memory access", "wall_s": self.wall}
        if peak > min(CARD, cap_gib or CARD):
            return {"error": "OOM: CUDA out of memory. Tried to allocate 1 GiB",
                    "wall_s": self.wall}
        return {"tok_s": 1e4, "peak_gib": peak, "losses": [12.57, 12.5], "wall_s": self.wall}


def driver(tmp_path, fake, *extra, resume=False):
    argv = ["--variants", "eager,unsloth_gc,lorafuse:b0", "--json", str(tmp_path / "ctx.json"),
            "--caps", "24,80", *extra]
    if resume:
        argv += ["--resume", str(tmp_path / "ctx.json")]
    opts = bc.parse_args(argv)
    state = bc.load_state(opts) if resume else bc.new_state(opts)
    opts.session, opts.sites = len(state["meta"]["sessions"]), {}
    return bc.Driver(opts, state, probe=fake, clock=fake.clock), opts, state


def expected(variant, cap, step=STEP):
    a, b = FAKE[variant]
    return min(int((cap - a) / b * 1024) // step * step, 262144)


@pytest.mark.parametrize("enforce", ["peak", "fraction"])
def test_driver_fills_the_tables(tmp_path, enforce):
    fake = FakeRuns()
    d, opts, state = driver(tmp_path, fake, "--enforce", enforce)
    d.go()
    for v in FAKE:
        for cap in (24.0, 80.0):
            s = bc.search_for(state, v, cap, opts)
            assert s.next is None and s.lo == expected(v, cap), (v, cap, s)
    table = [c for c in fake.calls if c[2] in (2048, 8192, 32768) and c[3] is None]
    assert len(table) == 12  # 3 variants x 4 workloads, each once
    searches = len(fake.calls) - len(table)
    assert searches <= 10, fake.calls  # two per variant and cap, less where the table settles
    text = bc.render(opts, state)
    assert "state: complete" in text
    assert "| eager | 10,000 · " in text and "OOM" in text  # eager at 1x32768: 287 GiB
    assert f"{expected('lorafuse:b0', 80):,} (10,000 tok/s" in text
    assert "longest lorafuse lorafuse:b0" in text
    saved = json.loads((tmp_path / "ctx.json").read_text())
    assert len(saved["runs"]) == len(fake.calls)


def test_driver_budget_and_resume_reach_the_same_answer(tmp_path):
    whole = FakeRuns()
    d, opts, state = driver(tmp_path / "a", whole)
    d.go()
    answer = {(v, c): bc.search_for(state, v, c, opts).lo for v in FAKE for c in (24.0, 80.0)}

    fake = FakeRuns()
    commands = 0
    while True:
        d, opts, state = driver(tmp_path / "b", fake, "--time-budget", "560",
                                resume=commands > 0)
        d.go()
        bc.save(opts, state)
        commands += 1
        if "state: complete" in bc.render(opts, state):
            break
        assert commands < 20
    assert commands >= 4  # 5 runs of 100 s per command
    got = {(v, c): bc.search_for(state, v, c, opts).lo for v in FAKE for c in (24.0, 80.0)}
    assert got == answer
    assert len(fake.calls) == len(whole.calls)  # nothing ran twice


def test_a_run_cut_by_the_budget_is_retried_not_recorded(tmp_path):
    fake = FakeRuns(wall=100)
    d, opts, state = driver(tmp_path, fake, "--time-budget", "100", "--seqs", "2048")
    d.estimate = lambda *args: 10  # the estimate was wrong: the run needs 100 s
    d.go()
    assert state["runs"] == [] and len(state["interrupted"]) == 1
    assert any("cut by the time budget" in why for *_, why in d.skipped)
    d2, _, _ = driver(tmp_path, FakeRuns(), resume=True)
    assert d2.estimate("eager") > 100  # next time it asks for more than it had


def test_estimate_grows_with_the_square_of_the_length(tmp_path):
    """A long run's time comes from the variant's shorter runs: their fixed part plus steps
    of b·L + c·L² seconds (session 9's Unsloth runs: 16K at 8,454 tok/s in 94 s, 64K at
    4,511 tok/s in 96 s, 1 + 1 steps), so a 270K run is neither refused for the quadratic
    guess of one point nor started on the shortest run's time."""
    d, _, state = driver(tmp_path, FakeRuns())
    state["runs"] = [
        {"variant": "unsloth_gc", "batch": 1, "seq": 16384, "outcome": "ok", "tok_s": 8454.0,
         "wall_s": 94.1, "warmup": 1, "steps": 1},
        {"variant": "unsloth_gc", "batch": 1, "seq": 65536, "outcome": "ok", "tok_s": 4511.0,
         "wall_s": 96.2, "warmup": 1, "steps": 1}]
    at_64k = d.estimate("unsloth_gc", 65536, 2)
    assert at_64k == pytest.approx(96.2, rel=1e-6)  # a length it ran: its own time
    long = d.estimate("unsloth_gc", 270336, 2)
    step_16k, step_64k = 16384 / 8454, 65536 / 4511
    c = (step_64k / 65536 - step_16k / 16384) / (65536 - 16384)
    b = step_64k / 65536 - c * 65536
    want = 96.2 - 2 * step_64k + 2 * (b * 270336 + c * 270336 ** 2)
    assert long == pytest.approx(want, rel=1e-6) and 380 < long < 460
    state["runs"] = state["runs"][:1]  # one point: the whole step scaled with the square
    assert d.estimate("unsloth_gc", 65536, 2) == pytest.approx(
        94.1 - 2 * step_16k + 2 * step_16k * 16, rel=1e-6)
    assert d.estimate("unsloth_gc", 8192, 2) == pytest.approx(94.1, rel=1e-6)  # shorter: no less
    assert d.estimate("lorafuse:b0", 65536, 2) == bc.FIRST_RUN_S["compiled"]  # no run yet


def test_sites_left_alone_are_named_under_the_table(tmp_path):
    """A lorafuse run whose passes left sites alone (session 9: the causal mask, at every
    layer) is named under the table, with the counters, so a slow cell has its reason."""
    d, opts, state = driver(tmp_path, FakeRuns(), "--seqs", "2048", "--caps=")
    d.go()
    assert "left sites alone" not in bc.render(opts, state)
    rec = next(r for r in state["runs"] if r["variant"] == "lorafuse:b0")
    rec["lorafuse_counters"] = {"attention": 0, "attention_skipped": 32, "lora": 224,
                                "lora_skipped": 0}
    assert "lorafuse:b0 1×2048 (attention_skipped 32)" in bc.render(opts, state)


def test_a_failing_run_stops_that_search_only(tmp_path):
    fake = FakeRuns(broken={("lorafuse:b0", 32768)})
    d, opts, state = driver(tmp_path, fake)
    d.go()
    s = bc.search_for(state, "lorafuse:b0", 80.0, opts)
    assert s.stopped and s.lo == 8192
    assert bc.search_for(state, "unsloth_gc", 80.0, opts).lo == expected("unsloth_gc", 80)
    text = bc.render(opts, state)
    assert "stopped: the run at 32,768 failed" in text
    assert "error: RuntimeError: illegal memory access" in text


def test_resume_refuses_other_settings(tmp_path):
    d, opts, state = driver(tmp_path, FakeRuns(), "--seqs", "2048", "--caps", "")
    d.go()
    with pytest.raises(SystemExit, match="enforce"):
        driver(tmp_path, FakeRuns(), "--enforce", "fraction", resume=True)
    with pytest.raises(SystemExit, match="another tag"):
        driver(tmp_path, FakeRuns(), "--lorafuse-config", 'b0={"options": {}}', resume=True)


def test_report_prints_the_file_and_runs_nothing(tmp_path, capsys):
    d, opts, state = driver(tmp_path, FakeRuns(), "--seqs", "2048", "--caps", "")
    d.go()
    assert bc.main(["--report", "--resume", str(tmp_path / "ctx.json"), "--seqs", "2048",
                    "--caps", "80"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")]
    assert rows.count("| eager") == 2 and "| liger" not in rows  # the file's variants only
    assert "state: incomplete" in out  # the searches at 80 GiB were not run by --report
    assert json.loads((tmp_path / "ctx.json").read_text())["runs"] == state["runs"]


def test_a_run_cut_after_step_1_shows_what_that_step_ran(tmp_path):
    """Session 10: an 8B run at 262,144 tokens finished its first step (7.5 min with the
    compile) and was cut in the second; the table said "—". Now the log's step-1 line is
    kept: that one training step ran, and at which peak."""
    log = tmp_path / "run.log"
    log.write_text("Loading weights: 100%\r[bench 07:25:34] lorafuse:ckf: loaded in 25.1 s\n"
                   "[bench 07:33:07] lorafuse:ckf: step 1 (compile + first step) 453.88 s, "
                   "loss 12.5829, peak 61.42 GiB, forward_compile 96.1 s\n")
    assert bc.step1_from_log(log) == {"s": 453.88, "loss": 12.5829, "peak_gib": 61.42}
    log.write_text("[bench] eager: step 1 (compile + first step) 3.5 s, loss 12.5000\n")
    assert bc.step1_from_log(log) == {"s": 3.5, "loss": 12.5}  # a CPU run: no peak
    log.write_text("[bench] eager: loaded\n")
    assert bc.step1_from_log(log) is None

    fake = FakeRuns(wall=100)

    def cut_after_step_1(variant, batch, seq, cap_gib, warmup, steps, timeout, log_path):
        res = fake(variant, batch, seq, cap_gib, warmup, steps, timeout, log_path)
        res["step1"] = {"s": 80.0, "loss": 12.58, "peak_gib": 61.42}
        return res

    d, opts, state = driver(tmp_path, fake, "--time-budget", "100", "--seqs", "2048")
    d.probe = cut_after_step_1
    d.estimate = lambda *args: 10  # the estimate was wrong: the run needs 100 s
    d.go()
    assert state["runs"] == [] and state["interrupted"][0]["step1"]["peak_gib"] == 61.42
    assert any("step 1 ran: 80 s, loss 12.5800, peak 61.4 GiB" in why for *_, why in d.skipped)
    assert "| cut by the budget (step 1 ran: 80 s, loss 12.5800, peak 61.4 GiB) |" in \
        bc.render(opts, state)


def test_one_step_fit_runs_decide_by_their_peak_with_no_tok_s(tmp_path):
    """--fit-steps 0: a search run is its warm-up step alone (at 256K tokens one step of the
    8B is minutes); it decides by its peak and the table says it was not timed."""
    fake = FakeRuns()

    def untimed(variant, batch, seq, cap_gib, warmup, steps, timeout, log_path):
        res = fake(variant, batch, seq, cap_gib, warmup, steps, timeout, log_path)
        if steps == 0 and "error" not in res:
            res["tok_s"] = None
        return res

    d, opts, state = driver(tmp_path, fake, "--fit-steps", "0", "--seqs", "2048")
    d.probe = untimed
    d.go()
    searches = [r for r in state["runs"] if r["kind"] != "table"]
    assert searches and all(r["steps"] == 0 for r in searches)
    for v in FAKE:
        assert bc.search_for(state, v, 80.0, opts).lo == expected(v, 80)
    text = bc.render(opts, state)
    assert "untimed, 1 step" in text and "search runs 1+0" in text
    with pytest.raises(SystemExit):
        bc.parse_args(["--steps", "0"])  # a table run is tokens/s: it needs a timed step


def test_fit_steps_of_one_variant(tmp_path):
    """--fit-steps-of VARIANT=N: that variant's search runs take N timed steps, the others
    --fit-steps (Unsloth's 256K peak comes in its second step); a variant not run, or a
    value that is not a count, is refused."""
    fake = FakeRuns()
    d, opts, state = driver(tmp_path, fake, "--fit-steps", "0", "--fit-steps-of",
                            "unsloth_gc=1", "--seqs", "2048")
    d.go()
    steps = {(r["variant"], r["steps"]) for r in state["runs"] if r["kind"] != "table"}
    assert steps == {("eager", 0), ("lorafuse:b0", 0), ("unsloth_gc", 1)}, steps
    for v in FAKE:
        assert bc.search_for(state, v, 80.0, opts).lo == expected(v, 80)
    for bad in (["--fit-steps-of", "liger=1"], ["--fit-steps-of", "unsloth_gc"],
                ["--fit-steps-of", "unsloth_gc=-1"]):
        with pytest.raises(SystemExit):
            bc.parse_args(["--variants", "eager,unsloth_gc", *bad])


def test_the_parent_takes_a_result_without_waiting_for_the_childs_exit(tmp_path):
    """A child that has written its result but is slow to exit (pinned memory being freed)
    is not waited for: the result counts, not as a timeout. A child that writes nothing
    within the timeout is a timeout."""
    import subprocess
    import time

    out = tmp_path / "res.json"
    out.write_text("")
    slow = ("import pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text('{\"tok_s\": 1}\\n');"
            " time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", slow, str(out)])
    t0 = time.time()
    try:
        assert bc.wait_for_result(proc, out, timeout=20, poll_s=0.1)
        assert time.time() - t0 < 10
        assert json.loads(out.read_text()) == {"tok_s": 1}
    finally:
        proc.kill()
        proc.wait()
    out.write_text("")
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not bc.wait_for_result(silent, out, timeout=0.5, poll_s=0.1)
    finally:
        silent.kill()
        silent.wait()


def test_compare_line_decides_only_from_the_bounds():
    opts = bc.parse_args(["--json", "x.json"])
    S = bc.Search
    settled = {"lorafuse:ckf": S(270336, None, None), "unsloth": S(17408, 18432, None)}
    line = bc.compare_line(settled, opts)
    assert line.startswith("lorafuse longer") and "(15.53 ×)" in line and "≥ 270,336" in line
    # session 35: Unsloth fits none of the lengths tried, lorafuse the longest tried
    grid = bc.parse_args(["--json", "x.json", "--seq-step", "262144", "--max-seq", "262144"])
    line = bc.compare_line({"lorafuse:ckf": S(262144, None, None),
                            "unsloth_gc": S(0, 262144, None)}, grid)
    assert line == ("lorafuse longer: longest lorafuse lorafuse:ckf ≥ 262,144, "
                    "longest Unsloth unsloth_gc none (< 262,144)")
    line = bc.compare_line({"lorafuse": S(8192, 9216, None), "unsloth": S(8192, 9216, None)}, opts)
    assert line.startswith("the same length") and "(1.00 ×)" in line
    line = bc.compare_line({"lorafuse": S(4096, 5120, None), "unsloth": S(8192, 9216, None)}, opts)
    assert line.startswith("Unsloth longer")
    # an open Unsloth search whose known fit is above lorafuse's: no verdict for lorafuse
    open_peer = dict(settled, unsloth_gc=S(65536, None, 131072))
    line = bc.compare_line(dict(open_peer, **{"lorafuse:ckf": S(40960, None, 81920)}), opts)
    assert line.startswith("Unsloth longer") is False and "not decided" in line
    # the bounds decide it although a search is open: Unsloth's over-run caps it at 261,120
    line = bc.compare_line(dict(settled, unsloth_gc=S(65536, 262144, 131072)), opts)
    assert line.startswith("lorafuse longer") and "261,120" in line
    line = bc.compare_line({"lorafuse": S(8192, 9216, None), "unsloth_gc": S(32768, None, 65536)},
                           opts)
    assert line.startswith("Unsloth longer") and "8,192" in line
    assert bc.compare_line({"lorafuse": S(8192, 9216, None)}, opts) is None


def test_gpus_run_variants_side_by_side_with_the_serial_answers(tmp_path, monkeypatch):
    """--gpus 2: two workers, one GPU each, take the variants; each variant's runs stay on
    one GPU, two runs overlap in time, and the searches end where the serial driver's do."""
    import threading
    import time

    serial = FakeRuns()
    d, opts, state = driver(tmp_path / "serial", serial)
    d.go()
    answer = {(v, c): bc.search_for(state, v, c, opts).lo for v in FAKE for c in (24.0, 80.0)}

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeRuns()
    d, opts, state = driver(tmp_path / "par", fake, "--gpus", "2")
    assert opts.gpu_ids == ["0", "1"]
    active, seen, lock = [0], [], threading.Lock()

    def probe(*args):
        with lock:
            active[0] += 1
            seen.append(active[0])
        time.sleep(0.01)  # long enough for the other worker's run to start meanwhile
        try:
            with lock:
                return fake(*args)
        finally:
            with lock:
                active[0] -= 1

    d.probe = probe
    d.go()
    got = {(v, c): bc.search_for(state, v, c, opts).lo for v in FAKE for c in (24.0, 80.0)}
    assert got == answer
    assert max(seen) == 2
    gpus = {}
    for r in state["runs"]:
        gpus.setdefault(r["variant"], set()).add(r["gpu"])
    assert all(len(g) == 1 for g in gpus.values()) and set.union(*gpus.values()) == {"0", "1"}
    saved = json.loads((tmp_path / "par" / "ctx.json").read_text())
    assert len(saved["runs"]) == len(fake.calls) == len(serial.calls)


def test_gpus_takes_the_visible_devices_and_refuses_too_few(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    assert bc.parse_args(["--json", "x.json", "--gpus", "2"]).gpu_ids == ["3", "5"]
    assert bc.parse_args(["--json", "x.json"]).gpu_ids == [None]
    with pytest.raises(SystemExit):
        bc.parse_args(["--json", "x.json", "--gpus", "4"])
    with pytest.raises(SystemExit):
        bc.parse_args(["--json", "x.json", "--gpus", "0"])
