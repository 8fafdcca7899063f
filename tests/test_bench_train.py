"""bench/bench_train.py without a GPU or a model: the batches it trains on (the same in
every process, and with --pad-right or --pad-left padded the way a padding collator pads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_train as bt  # noqa: E402


def batches(*argv):
    return bt.make_batches(bt.parse_args(["--shape", "tiny", *argv]), vocab_size=97)


def test_plain_batches_are_ids_as_labels_and_repeat_across_processes():
    a, b = batches(), batches()
    assert len(a) == bt.N_BATCHES and set(a[0]) == {"input_ids", "labels"}
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and x["labels"] is x["input_ids"]
    ones = batches("--attention-mask")
    assert all(bool(x["attention_mask"].eq(1).all()) for x in ones)
    assert all(torch.equal(x["labels"], x["input_ids"]) for x in ones)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_pads_rows_after_the_first_by_1_to_n_tokens_on_its_side(side):
    n = 5
    got = batches("--batch", "3", "--seq", "16", f"--pad-{side}", str(n))
    lengths = set()
    for x in got:
        mask, labels, ids = x["attention_mask"], x["labels"], x["input_ids"]
        assert bool(mask[0].eq(1).all())  # row 1 unpadded
        for row in range(1, 3):
            pad = int(mask[row].eq(0).sum())
            where = mask[row, -pad:] if side == "right" else mask[row, :pad]
            assert 1 <= pad <= n and bool(where.eq(0).all())  # one run at that side
            lengths.add(pad)
        assert torch.equal(labels, ids.masked_fill(mask == 0, -100))
    assert len(lengths) > 1  # the padding varies between rows and batches


@pytest.mark.parametrize("argv", [["--batch", "1", "--pad-right", "4"],
                                  ["--seq", "8", "--pad-right", "8"],
                                  ["--seq", "8", "--pad-left", "8"],
                                  ["--pad-right", "2", "--pad-left", "2"]])
def test_pad_refuses_what_it_cannot_pad(argv):
    with pytest.raises(SystemExit):
        bt.parse_args(["--shape", "tiny", *argv])


def test_rounds_interleave_fresh_processes_and_keep_round_one_for_the_reference(
        monkeypatch, tmp_path, capsys):
    """--rounds 3: the variant list runs three times, A B A B A B, each a child told its
    round (later rounds write no snapshot); the reference gets round 1's variants only; the
    rounds table gives each variant's median and spread."""
    calls = []
    tok = {("eager", 1): 100.0, ("lorafuse", 1): 150.0, ("eager", 2): 110.0,
           ("lorafuse", 2): 140.0, ("eager", 3): 90.0, ("lorafuse", 3): 160.0}

    def fake_child(args, role, timeout, extra=()):
        calls.append((role, list(extra)))
        if role == "build":
            return {"env": {}}
        if role == "ref":
            return {"ref": {v: {1: 8.0} for v in extra[1].split(",")}}
        rnd = int(extra[extra.index("--_round") + 1])
        return {"tok_s": tok[(role, rnd)], "losses": [8.1, 8.0],
                "snapshot_steps": [1] if rnd == 1 else []}

    monkeypatch.setattr(bt, "run_child", fake_child)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--shape", "tiny", "--device", "cpu",
                                      "--variants", "eager,lorafuse", "--rounds", "3",
                                      "--warmup", "1", "--steps", "1", "--ref-steps", "1",
                                      "--cache", str(tmp_path)])
    assert bt.main() == 0
    roles = [(r, e) for r, e in calls if r not in ("build", "ref")]
    assert [r for r, _ in roles] == ["eager", "lorafuse"] * 3
    assert [e for _, e in roles] == [["--_round", str(k)] for k in (1, 1, 2, 2, 3, 3)]
    assert calls[-1] == ("ref", ["--variants", "eager,lorafuse"])
    out = capsys.readouterr().out
    assert "| eager | 100 | 110 | 90 | 100 | 20.0 | 1.000 |" in out
    assert "| lorafuse | 150 | 140 | 160 | 150 | 13.3 | 1.500 |" in out
    assert "| lorafuse#3 | 160 |" in out


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        bt.parse_args(["--shape", "tiny", "--rounds", "0"])


def test_clock_summary_reads_the_timed_window_of_an_nvidia_smi_log(tmp_path):
    """run_gpu.sh's nvidia-smi log (timestamp, SM MHz, W, reasons): only the samples inside
    the timed steps' window count; headers and "[N/A]" lines are skipped; bit 0x4 (the
    software power cap) is counted."""
    import datetime

    t0 = 1_800_000_000.0
    rows = [(-1.0, 1980, 90.0, "0x1", 30), (0.2, 1980, 500.0, "0x0", 41),
            (0.4, 1755, 699.5, "0x4", 44), (0.6, 1710, 700.1, "0x0000000000000004", 47),
            (9.0, 1980, 80.0, "0x1", 35)]
    text = ["timestamp, clocks.current.sm [MHz], power.draw [W], reasons, temperature",
            "x, [N/A], 1, 0x0, 1"]
    for dt, sm, w, r, temp in rows:
        stamp = datetime.datetime.fromtimestamp(t0 + dt).strftime("%Y/%m/%d %H:%M:%S.%f")
        text.append(f"{stamp[:-3]}, {sm}, {w}, {r}, {temp}")
    log = tmp_path / "gpu_clocks.csv"
    log.write_text("\n".join(text) + "\n")
    got = bt.clock_summary(str(log), t0, t0 + 1.0)
    assert got == {"samples": 3, "sm_mhz": 1755.0, "sm_mhz_min": 1710.0, "sm_mhz_max": 1980.0,
                   "power_w": 699.5, "power_w_max": 700.1, "power_capped": 2, "temp_c": 44.0}
    assert bt.clock_summary(str(log), t0 + 2, t0 + 3) is None
    assert bt.clock_summary(str(tmp_path / "missing.csv"), t0, t0 + 1) is None


def test_clocks_table_lists_variants_with_a_clock_log_and_tok_s_per_mhz():
    c = {"samples": 25, "sm_mhz": 1650.0, "sm_mhz_min": 1485.0, "power_w": 690.0,
         "power_capped": 25, "temp_c": None}
    results = [{"variant": "lorafuse", "tok_s": 16333.0, "clocks": c, "host_mm_us": 27.5},
               {"variant": "eager", "tok_s": 10900.0},  # no clock log: not listed
               {"variant": "unsloth", "error": "skipped"}]
    lines = bt.clocks_table(results)
    rows = [ln for ln in lines if ln.startswith("| lorafuse")]
    assert rows == ["| lorafuse | 1,650 (1,485) | 690 | 25 of 25 | — | 9.90 | 27.5 |"]
    assert not any("eager" in ln or "unsloth" in ln for ln in lines)
    assert bt.clocks_table(results[1:]) == []


def test_reference_snapshot_is_one_flat_copy_that_unflattens_to_the_parameters():
    gen = torch.Generator().manual_seed(0)
    params = {"a.lora_A": torch.randn(4, 6, generator=gen),
              "a.lora_B": torch.randn(5, 4, generator=gen).to(torch.bfloat16),
              "b.scale": torch.randn(3, generator=gen)}
    flat = bt.flat_copy(params.values())
    assert flat.dim() == 1 and flat.dtype == torch.float32 and flat.device.type == "cpu"
    layout = [(n, tuple(p.shape)) for n, p in params.items()]
    back = bt.unflatten(layout, flat)
    assert list(back) == list(params)
    for name, p in params.items():
        assert torch.equal(back[name], p.float()), name
    with pytest.raises(RuntimeError, match="layout"):
        bt.unflatten(layout[:2], flat)  # a layout that does not cover the copy


def _render(argv, results):
    args = bt.parse_args(["--shape", "tiny", *argv])
    meta = {"gflop_per_token": 1.0, "env": {}, "date": "2026-11-30", "commit": "abc1234"}
    return bt.render(args, meta, results, ref={})


@pytest.mark.parametrize("argv, noted", [
    (["--ref", "--ref-steps", "1-5", "--warmup", "2", "--steps", "3"], True),
    (["--ref", "--ref-steps", "1,2", "--warmup", "2", "--steps", "3"], False),  # warm-up only
    (["--no-ref", "--warmup", "2", "--steps", "3"], False),
])
def test_summary_says_when_timed_steps_took_reference_snapshots(argv, noted):
    results = [{"variant": "eager", "tok_s": 100.0, "round": 1},
               {"variant": "lorafuse", "tok_s": 150.0, "round": 1}]
    text = _render(argv, results)
    assert ("took fp32-reference snapshots" in text) == noted
    if noted:
        assert "tok/s of eager, lorafuse:" in text


def test_header_says_when_each_step_is_read_on_the_host():
    results = [{"variant": "eager", "tok_s": 100.0, "round": 1}]
    assert "--sync-each-step" in _render(["--sync-each-step"], results)
    assert "--sync-each-step" not in _render([], results)


def test_trace_gaps_charges_idle_time_to_the_host_op_or_to_a_wait():
    """bench/trace_gaps.py on a synthetic profiler trace (times in ms): the compute stream
    runs k1, k2, k3, k4 (a side stream's copy is not the compute stream). k2 was launched
    inside ``lorafuse_rt::nf4_linear`` (nested in a graph call) after k1 had finished: 30 ms
    of host, charged to the innermost op. k3 was launched before k2 ended yet started 20 ms
    late, 10 µs after the side stream's copy ended: a wait on that copy. k4 follows k3
    within the launch latency (2 µs): no gap. By phase, both are the graph call's; then
    with k3 launched later by the optimizer, its gap is the optimizer's."""
    from trace_gaps import gap_report

    def ev(cat, name, ts, dur, pid=0, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts * 1e3, "dur": dur * 1e3,
                "pid": pid, "tid": 1, "args": args}

    trace = {"traceEvents": [
        ev("cpu_op", "## Call CompiledFxGraph ##", 0, 200),
        ev("cpu_op", "lorafuse_rt::nf4_linear", 100, 50),
        ev("cpu_op", "aten::empty", 120, 5),  # ended before the launch: not around it
        ev("cuda_runtime", "cudaLaunchKernel", 5, 2, correlation=1),
        ev("cuda_driver", "cuLaunchKernelEx", 140, 2, correlation=2),
        ev("cuda_runtime", "cudaLaunchKernel", 150, 2, correlation=3),
        ev("cuda_runtime", "cudaLaunchKernel", 160, 2, correlation=4),
        ev("cuda_runtime", "cudaStreamSynchronize", 170, 7),
        ev("kernel", "k1", 10, 100, pid=9, correlation=1, stream=7),
        ev("kernel", "k2", 140, 60, pid=9, correlation=2, stream=7),
        ev("gpu_memcpy", "copy", 150, 69.99, pid=9, correlation=9, stream=20),
        ev("kernel", "k3", 220, 40, pid=9, correlation=3, stream=7),
        ev("kernel", "k4", 260.002, 10, pid=9, correlation=4, stream=7),
    ]}
    lines = gap_report(trace, steps=2)
    assert lines[0] == ("  compute stream idle: 25.0 of 130.0 ms/step; waiting on the host "
                        "15.0 ms, on other work (events, copies) 10.0 ms (0.5 gaps)")
    i = lines.index("  waits by what ended just before the late kernel (ms/step, gaps/step):")
    (row,) = lines[2:i]
    assert row.split() == ["15.00", "0.5", "lorafuse_rt::nf4_linear"]
    assert lines[i + 1].split() == ["10.00", "0.5", "after", "copy", "(another", "stream)"]
    j = lines.index("  idle by phase, the outermost host op around the late launch (host ms/step, "
                    "waits ms/step, gaps/step):")
    # both gaps' kernels were launched inside the graph call: one phase
    assert [r.split() for r in lines[j + 1:-1]] == [
        ["15.00", "10.00", "1.0", "##", "Call", "CompiledFxGraph", "##"]]
    assert lines[-1] == "  host blocked in: cudaStreamSynchronize 3.5 ms/step"
    copy = next(e for e in trace["traceEvents"] if e["name"] == "copy")
    copy["dur"] -= 100  # ended 110 µs before k3 started: not what k3 waited on
    assert "(no other stream's work ended just before)" in gap_report(trace, steps=2)[i + 1]
    # k3 launched by the optimizer after the graph call ended and after k2 ran: a host gap,
    # of the optimizer's phase
    launch3 = next(e for e in trace["traceEvents"] if (e.get("args") or {}).get("correlation") == 3
                   and e["cat"] == "cuda_runtime")
    trace["traceEvents"].append(ev("cpu_op", "Optimizer.step#AdamW.step", 205, 20))
    launch3["ts"] = 210e3
    lines = gap_report(trace, steps=2)
    j = next(k for k, line in enumerate(lines) if line.startswith("  idle by phase"))
    assert [r.split()[:3] + [r.split()[-1]] for r in lines[j + 1:-1]] == [
        ["15.00", "0.00", "0.5", "##"], ["10.00", "0.00", "0.5", "Optimizer.step#AdamW.step"]]
    assert gap_report({"traceEvents": []}) == ["  idle gaps: no GPU events in the trace"]


def test_run_gpu_configs_are_valid_options():
    """Every lorafuse configuration run_gpu.sh passes to bench_train parses as JSON and as
    backend options: a typo there costs a device command, not a CI run."""
    import json
    import re

    import lorafuse

    script = (Path(__file__).resolve().parents[1] / "bench" / "run_gpu.sh").read_text()
    found = re.findall(r"^[A-Z0-9_]+_CONFIG='(.*?)'$", script, flags=re.M | re.S)
    found += re.findall(r"--lorafuse-config '[a-z0-9]+=(.*?)'$", script, flags=re.M)
    assert len(found) >= 11, found
    for text in found:
        config = json.loads(text)
        assert set(config) <= {"options", "env"}, config
        lorafuse.Options.parse(config.get("options"))


def test_summary_gives_the_ratio_to_unsloth_when_it_ran():
    """Issue 3's bar reads tok/s against Unsloth's: a column when `unsloth` ran (a skipped
    variant's row keeps the table's width), none otherwise."""
    results = [{"variant": "lorafuse:fp8cg", "tok_s": 115.0, "round": 1},
               {"variant": "unsloth", "tok_s": 100.0, "round": 1},
               {"variant": "inductor", "tok_s": 90.0, "round": 1},
               {"variant": "lorafuse:fp8", "error": "skipped: time budget", "round": 1}]
    rows = [l for l in _render(["--no-ref"], results).splitlines()
            if l.startswith("| ") and "× inductor" in l or l.startswith("| lorafuse")
            or l.startswith("| unsloth |") or l.startswith("| inductor |")]
    assert "× unsloth" in rows[0]
    assert any(l.startswith("| lorafuse:fp8cg | 115 | — | 1.28 | 1.150 |") for l in rows), rows
    assert len({l.count("|") for l in rows}) == 1, rows  # every row as wide as the header
    without = _render(["--no-ref"], [results[0], results[2]])
    assert "× unsloth" not in without


def test_qwen3_shapes_build_qwen3_models_and_llama_shapes_stay_llama():
    """--shape qwen3-*: a Qwen3 config (q/k norms on each head, head_dim = hidden / heads)
    and class; the Llama shapes keep their config (the cached 8B model's meta compares it)."""
    q = bt.parse_args(["--shape", "qwen3-tiny"])
    cfg = bt.model_config(q)
    assert cfg.model_type == "qwen3" and cfg.head_dim == 128 // 4
    assert bt.model_class(q).__name__ == "Qwen3ForCausalLM"
    assert bt.parse_args(["--shape", "qwen3-8b"]).ref is False  # 8B: the reference is asked for
    llama = bt.parse_args(["--shape", "tiny"])
    cfg = bt.model_config(llama)
    assert cfg.model_type == "llama" and cfg.rms_norm_eps == 1e-5 and not cfg.use_cache
    assert bt.model_class(llama).__name__ == "LlamaForCausalLM"
