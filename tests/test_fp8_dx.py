"""The ``fp8_dx`` option: the frozen weights' dy W in e4m3 (kernels/fp8_dx.py).

What correct means for a rewrite that changes the numbers on purpose:
- the e4m3 arithmetic itself: ``fp8_dx`` (``torch._scaled_mm``, on CPU here) equals its
  plain-PyTorch oracle up to the output's rounding and the order of the fp32 sums;
- the quantisation is what the docstring says (powers of two, |q| ≤ 448, each element
  rounded once);
- against the exact product, the error stays within a stated bound (relative norm ≤ 8 %,
  cosine ≥ 0.995: e4m3's 3 mantissa bits give ≈ 3-4 % on random data);
- in the ops and a whole model: the forward and dA, dB of the site itself are exactly
  those without the option; only dx (and what flows from it) changes, within the bound;
- where it cannot run (fp32 compute, sizes not multiples of 16) dx is the exact one, with
  a warning.
"""

from __future__ import annotations

import functools
import gc
import importlib
import itertools
import math
import warnings
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (CheckRecorder, assert_check_passed, lora_params, make_tiny_model,
                      reset_dynamo, run_interpreter_worker)
from lorafuse.kernels import fp8_dx as fp8
from lorafuse.kernels._dispatch import warned
from lorafuse.kernels.lora import lora_linear_op
from lorafuse.kernels.lora_group import lora_linear_group_op

BF16 = torch.bfloat16


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cos(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(),
                                                 dim=0).item()


def randn(*shape, seed, dtype=BF16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 40), seed=st.integers(0, 2**16),
       log_scale=st.integers(-30, 30))
def test_quantize_rows_powers_of_two_and_one_rounding(m, n, seed, log_scale):
    t = randn(m, n, seed=seed, scale=2.0 ** log_scale)
    t[0] = 0  # an all-zero row
    q, s = fp8.quantize_rows(t)
    assert q.dtype == fp8.E4M3 and s.shape == (m, 1) and s.dtype == torch.float32
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    deq = q.float() * s
    assert deq.abs().max() <= 448 * s.max()
    assert torch.equal(deq[0], torch.zeros(n))
    # one e4m3 rounding of the exact t / s: relative error ≤ 2⁻⁴ for normal e4m3 values,
    # absolute ≤ half the subnormal spacing (2⁻¹⁰ · s) below them
    err = (deq - t.float()).abs()
    bound = torch.maximum(t.float().abs() * 2.0 ** -4, 2.0 ** -10 * s)
    assert (err <= bound).all()
    # the largest element of a nonzero row lands in e4m3's top binade
    amax = (q.float().abs()).amax(1)[1:]
    assert ((amax >= 224) & (amax <= 448)).all()  # (224, 448] before rounding


@settings(max_examples=20, deadline=None)
@given(m=st.sampled_from([16, 32, 48]), ns=st.lists(st.sampled_from([16, 32, 64]), min_size=1,
                                                    max_size=3),
       k=st.sampled_from([16, 48, 80]), seed=st.integers(0, 2**16))
def test_scaled_mm_path_equals_its_oracle_and_stays_near_exact(m, ns, k, seed):
    dys = [randn(m, n, seed=seed + i) for i, n in enumerate(ns)]
    ws = [randn(n, k, seed=seed + 100 + i, scale=0.05) for i, n in enumerate(ns)]
    got = fp8.fp8_dx(dys, ws)
    oracle = fp8.fp8_dx_reference(torch.cat(dys, 1), torch.cat(ws, 0))
    exact = sum(d.float() @ w.float() for d, w in zip(dys, ws))
    assert got.dtype == BF16 and got.shape == (m, k)
    # the oracle rounded to bf16 once: within an ulp (fp32 sums in another order)
    torch.testing.assert_close(got, oracle.to(BF16), rtol=2 ** -7, atol=1e-3 * exact.abs().max().item())
    assert rel(oracle, exact) <= 0.08 and cos(oracle, exact) >= 0.995
    assert rel(oracle, exact) >= 1e-4  # it really is fp8: not the exact product
    fp8.weight_cache.clear()


@settings(max_examples=15, deadline=None)
@given(ns=st.lists(st.sampled_from([16, 32, 48]), min_size=1, max_size=3),
       k=st.sampled_from([16, 80]), seed=st.integers(0, 2**16))
def test_weights_cast_every_backward_are_the_kept_copies_bytes(ns, k, seed):
    """``fp8_copies=False``: W's scales kept, W cast in every backward; the same bytes as
    the kept copy (``quantize_weight_t`` of the concatenation), so dx is bit-equal, and no
    copy is kept."""
    fp8.weight_cache.clear()
    fp8.scale_cache.clear()
    ws = [randn(n, k, seed=seed + i, scale=0.05 * (i + 1)) for i, n in enumerate(ns)]
    ws[0][:, 3] = 0  # an all-zero input feature
    wq, sb = fp8.quantize_weight_t(torch.cat(ws, 0))
    assert torch.equal(fp8.weight_scales(ws), sb)
    got = fp8.cast_weights_t(ws, (1.0 / sb).reshape(-1))
    assert got.shape == wq.shape and torch.equal(got.view(torch.uint8), wq.view(torch.uint8))
    dys = [randn(32, n, seed=seed + 50 + i) for i, n in enumerate(ns)]
    per_step = fp8.fp8_dx(dys, ws, copies=False)
    assert len(fp8.weight_cache) == 0 and len(fp8.scale_cache) == 1
    assert fp8.scale_cache.nbytes() == 2 * 4 * k  # scales and their inverses only
    assert torch.equal(per_step, fp8.fp8_dx(dys, ws, copies=True))
    fp8.weight_cache.clear()
    fp8.scale_cache.clear()


def test_lora_op_without_copies(monkeypatch):
    """The op with fp8_copies=False on the GPU's code path (CPU tensors): dx bit-equal to
    the op with copies, and only scales kept."""
    import lorafuse.kernels.lora as lora_mod
    monkeypatch.setattr(lora_mod, "_triton_on_cpu", lambda: True)
    monkeypatch.setattr(lora_mod, "_forward_impl", lambda x, w, bias, a, b, s, xl:
                        lora_mod.lora_linear_reference(x, w, bias, a, b, s, xl))
    x, w, a, b = _site(32, 48, 64, 8, seed=5)
    fp8.weight_cache.clear()
    fp8.scale_cache.clear()

    def op(copies):
        return lambda x, a, b: lora_linear_op(x, w, None, a, b, 0.5, None, fp8_dx=True,
                                              fp8_copies=copies)[0]

    _, (dx0, da0, db0) = _grads(op(True), [x, a, b])
    assert len(fp8.weight_cache) == 1
    fp8.weight_cache.clear()
    _, (dx1, da1, db1) = _grads(op(False), [x, a, b])
    assert len(fp8.weight_cache) == 0 and len(fp8.scale_cache) == 1
    assert torch.equal(dx0, dx1) and torch.equal(da0, da1) and torch.equal(db0, db1)
    fp8.scale_cache.clear()


def test_quantize_dy_equals_quantize_rows_of_the_concatenation():
    """The group path's quantisation (no cat, one scale per row across the sites) gives the
    bytes ``quantize_rows`` gives for the concatenated dy, rows of zeros and tiny ones too."""
    dys = [randn(32, 48, seed=1, scale=1e-6), randn(32, 16, seed=2), randn(32, 32, seed=3)]
    dys[0][3] = 0
    dys[1][3] = 0
    dys[2][3] = 0
    q, s = fp8.quantize_dy(dys)
    q2, s2 = fp8.quantize_rows(torch.cat(dys, 1))
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


def test_quantise_config_is_the_measured_one_at_the_8b_sites():
    """The kernel and warps bench_fp8_dx measured fastest per 8B site (RESULTS, session 29);
    rows too wide for registers take the two-pass kernel."""
    assert fp8.quantise_config([4096]) == (True, 8)  # o, down
    assert fp8.quantise_config([4096, 1024, 1024]) == (True, 8)  # qkv
    assert fp8.quantise_config([14336, 14336]) == (True, 16)  # gate_up, padded 2 × 16384
    assert fp8.quantise_config([28672, 28672]) == (False, 8)  # 70B's gate_up
    assert fp8.quantise_config([16, 600]) == (True, 8)


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__)


@pytest.mark.parametrize("check", ["quantize-rows-into", "cast-t-into"])
def test_triton_interpreter(interpreter_results, check):
    assert_check_passed(interpreter_results, check)


def _edge_rows(m: int, n: int) -> torch.Tensor:
    """m rows of n random values, the first five replaced by edge cases of the scale: all
    zero, tiny (2⁻¹²⁰), a maximum of exactly 448 · 2³, one just above it, and an inf."""
    t = randn(m, n, seed=m * n)
    edges = [0.0, 2.0 ** -120, 448.0 * 8, 448.0 * 8 * (1 + 2.0 ** -7), float("inf")]
    for i, v in enumerate(edges[:m]):
        t[i] = randn(n, seed=i, scale=1e-3) * (v if 0 < v < float("inf") else 1) if v else 0
        if v:
            t[i, i % n] = v
    return t


def _worker():
    """Runs in the subprocess (TRITON_INTERPRET=1): the Triton kernel's maxima, scales,
    scaling and indexing, with its fp32 output (the interpreter's e4m3 cast is not the
    GPU's; the GPU test checks the e4m3 bytes)."""
    record = CheckRecorder()

    def quantize_rows_into():
        # rows past one program, columns past a BLOCK_N, one to three sources; both
        # kernels, and the one picked (one pass at these widths)
        for (m, ns), one_pass in itertools.product(
                ((7, (16, 600)), (9, (32, 16, 48)), (6, (2100,))), (False, True, None)):
            dy = _edge_rows(m, sum(ns)).float()  # fp32 keeps the edge values exact
            dys = list(torch.split(dy, list(ns), dim=1))
            out = torch.full((m, sum(ns)), -1.0)
            scale = torch.full((m,), -1.0)
            fp8.quantize_rows_into(dys, out, scale, one_pass=one_pass)
            want_s = fp8.pow2_scale(dy.abs().amax(1))
            torch.testing.assert_close(scale, want_s, rtol=0, atol=0, equal_nan=True)
            fin = want_s.isfinite()
            assert torch.equal(out[fin], dy[fin] / want_s[fin, None])
            assert out[~fin].isnan().all() and (~fin).sum() == (m >= 5)
            scaled = fin & (dy.abs().amax(1) >= 448 * 2.0 ** -100)  # not the zero, tiny rows
            top = out[scaled].abs().amax(1)
            assert ((top > 224) & (top <= 448)).all(), top

    record("quantize-rows-into", quantize_rows_into)

    def cast_t_into():
        # tiles past N and K, a column slice of the output (a group's second weight)
        w = randn(70, 100, seed=4) * torch.exp2(torch.arange(100.0) % 7 - 3)
        inv = (1.0 / fp8.weight_scales([w])).reshape(-1)
        out = torch.full((100, 90), float("nan"))
        fp8.cast_t_into(w, inv, out[:, 20:])
        assert torch.equal(out[:, 20:], (w.float() * inv).t())
        assert out[:, :20].isnan().all()  # nothing written outside the slice

    record("cast-t-into", cast_t_into)
    record.report()


@settings(max_examples=200, deadline=None)
@given(a=st.floats(0, 2.0 ** 127, width=32), nudge=st.sampled_from([0, -1, 1]))
def test_pow2_scale_is_the_least_power_of_two(a, nudge):
    """``pow2_scale`` (fp32 bits, as the kernel computes it) is exactly the least power of
    two s with a / s ≤ 448, at binade edges too (a = 448 · 2^k and its fp32 neighbours),
    against float64 arithmetic; zero gets the smallest scale."""
    if a > 0 and nudge:  # a power of two times 448, then one ulp either side
        a = float(torch.nextafter(torch.tensor(448.0 * 2.0 ** round(math.log2(a / 448))),
                                  torch.tensor(nudge * float("inf"))))
    s = fp8.pow2_scale(torch.tensor([a])).item()
    if a == 0:
        assert s == 2.0 ** -100
        return
    want = 2.0 ** max(-100, math.ceil(math.log2(a / 448)))
    assert s == want, (a, s, want)


def test_weight_cache_hits_rebuilds_and_evicts():
    fp8.weight_cache.clear()
    w = randn(32, 16, seed=1)
    a = fp8.weight_cache.get([w])
    assert fp8.weight_cache.get([w]) is a  # a hit: the same tensors
    assert fp8.weight_cache.get([w.detach()]) is a  # an alias of the same storage and view
    with torch.no_grad():
        w.mul_(2)  # in place: the version moves, the entry is rebuilt
    b = fp8.weight_cache.get([w])
    assert b is not a and torch.equal(b[1], a[1] * 2)
    t = w.t()  # another view of the same storage is another operand
    c = fp8.weight_cache.get([t])
    assert c[0].shape == (32, 16) and c is not b
    w2 = randn(32, 16, seed=2)
    assert fp8.weight_cache.get([w, w2])[0].shape == (16, 64)  # a group: concatenated along N
    assert len(fp8.weight_cache) == 2
    del w, t, a, b, c
    gc.collect()
    assert len(fp8.weight_cache) == 0  # both entries read w's storage: gone with it
    fp8.weight_cache.clear()


def test_weight_cache_reads_the_parameters_version():
    """A view that a compiled graph makes of a parameter (a ``reinterpret_tensor``: its own
    version counter, fresh each step) hits the entry built for it, and an in-place update
    of the parameter, which that view's counter never shows, still rebuilds it."""
    fp8.weight_cache.clear()
    w = randn(48, 32, seed=5)  # Conv1D-style (K, N) parameter; the op gets its .t()

    def graph_view():
        return torch.empty(0, dtype=w.dtype).set_(w.untyped_storage(), 0, (32, 48), (1, 32))

    first = fp8.weight_cache.get([graph_view()], version_of=[w])
    assert fp8.weight_cache.get([graph_view()]) is first  # later lookups: no version_of
    with torch.no_grad():
        w.mul_(2)
    second = fp8.weight_cache.get([graph_view()])
    assert second is not first and torch.equal(second[1], first[1] * 2)  # scales doubled
    assert fp8.weight_cache.get([graph_view()]) is second
    with torch.no_grad():
        w.mul_(2)  # the rebuilt entry still reads the parameter's counter
    assert torch.equal(fp8.weight_cache.get([graph_view()])[1], first[1] * 4)
    fp8.weight_cache.clear()


def test_weight_cache_keeps_what_cuda_graphs_read(monkeypatch):
    """An entry read while a CUDA graph was being recorded (faked here: CPU tensors) is not
    freed by ``clear`` or by a rebuild after an in-place change, since the graph's replays
    read its memory; each warns. Entries no recording read are freed as before."""
    cache = fp8._WeightCache(fp8._copy_of)
    recording = [False]
    monkeypatch.setattr(fp8, "_recording", lambda w: recording[0])
    w_free, w_graph, w_rebuilt, w_hit = (randn(32, 16, seed=s) for s in (1, 2, 3, 4))
    free = weakref.ref(cache.get([w_free])[0])
    hit = weakref.ref(cache.get([w_hit])[0])  # made before the recording, read during it
    recording[0] = True
    graph = weakref.ref(cache.get([w_graph])[0])
    assert cache.get([w_hit])[0] is hit()
    old = weakref.ref(cache.get([w_rebuilt])[0])
    recording[0] = False
    assert cache.get([w_graph])[0] is graph()  # a hit outside the recording: still held
    with torch.no_grad():
        w_rebuilt.mul_(2)
    with pytest.warns(RuntimeWarning, match="changed in place after CUDA graphs"):
        new = cache.get([w_rebuilt])
    gc.collect()
    assert old() is not None and new[0] is not old()  # the recorded one stays allocated
    del new
    with pytest.warns(RuntimeWarning, match=r"cleared .* reading 2 of its entries"):
        cache.clear()  # w_rebuilt's new entry was not recorded: w_graph's and w_hit's are
    gc.collect()
    assert free() is None  # the control: an entry no recording read is freed
    assert graph() is not None and hit() is not None and old() is not None
    assert len(cache) == 0 and len(cache._graph_held) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get([w_graph])  # after clear: a fresh entry, not marked as recorded
        cache.clear()
    assert cache.release_graph_held() == 3 * (32 * 16 + 16 * 4)  # e4m3 copies + fp32 scales
    gc.collect()
    assert graph() is None and hit() is None and old() is None


def _site(m, k, n, r, seed):
    x = randn(m, k, seed=seed)
    w = randn(n, k, seed=seed + 1, scale=k ** -0.5)
    a = randn(r, k, seed=seed + 2, scale=0.3)
    b = randn(n, r, seed=seed + 3, scale=0.3)
    return x, w, a, b


def _lora_op(w, scale):
    """A factory: fp8_dx -> the single-site op's y as a function of (x, A, B), W fixed."""
    return lambda fp8_dx: lambda x, a, b: lora_linear_op(x, w, None, a, b, scale, None,
                                                        fp8_dx=fp8_dx)[0]


def _grads(fn, leaves):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    dy = randn(*out.shape, seed=99)
    out.backward(dy)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("path", ["reference", "scaled_mm"])
def test_lora_linear_only_dx_changes(path, monkeypatch):
    """The op with fp8_dx: y, dA, dB bit-equal to the op without it; dx equal to the e4m3
    oracle's and within the bound of the exact one. 'scaled_mm' runs the GPU's code path
    on CPU tensors (the Triton interpreter switch routes the op there)."""
    if path == "scaled_mm":
        import lorafuse.kernels.lora as lora_mod
        monkeypatch.setattr(lora_mod, "_triton_on_cpu", lambda: True)
        monkeypatch.setattr(lora_mod, "_forward_impl", lambda x, w, bias, a, b, s, xl:
                            lora_mod.lora_linear_reference(x, w, bias, a, b, s, xl))
    x, w, a, b = _site(32, 48, 64, 8, seed=5)
    op = _lora_op(w, 0.5)

    y0, (dx0, da0, db0) = _grads(op(False), [x, a, b])
    y1, (dx1, da1, db1) = _grads(op(True), [x, a, b])
    assert torch.equal(y0, y1)
    if path == "reference":
        assert torch.equal(da0, da1) and torch.equal(db0, db1)
    else:  # the cuBLAS-style path's dA, dB (rounded as that path rounds) against the reference's
        assert rel(da1, da0) <= 2e-2 and rel(db1, db0) <= 2e-2
    dy = randn(32, 64, seed=99)
    g = (dy.float() @ b.float()) * 0.5
    oracle = g @ a.float() + fp8.fp8_dx_reference(dy, w)
    torch.testing.assert_close(dx1.float(), oracle, rtol=2e-2, atol=2e-2 * oracle.abs().max().item())
    assert 1e-3 <= rel(dx1, dx0) <= 0.08 and cos(dx1, dx0) >= 0.995
    fp8.weight_cache.clear()


def test_lora_group_only_dx_changes():
    x, _, _, _ = _site(32, 48, 16, 4, seed=7)
    ws = [randn(n, 48, seed=20 + n, scale=48 ** -0.5) for n in (32, 16, 16)]
    as_ = [randn(4, 48, seed=30 + i, scale=0.3) for i in range(3)]
    bs = [randn(n, 4, seed=40 + n, scale=0.3) for n in (32, 16, 16)]

    def op(fp8_dx):
        def f(x, *ab):
            ys = lora_linear_group_op(x, ws, [None] * 3, list(ab[:3]), list(ab[3:]), [0.5] * 3,
                                      fp8_dx=fp8_dx)
            return torch.cat(ys[:3], dim=-1)
        return f

    y0, (dx0, *dab0) = _grads(op(False), [x, *as_, *bs])
    y1, (dx1, *dab1) = _grads(op(True), [x, *as_, *bs])
    assert torch.equal(y0, y1)
    assert all(torch.equal(p, q) for p, q in zip(dab0, dab1))
    assert 1e-3 <= rel(dx1, dx0) <= 0.08 and cos(dx1, dx0) >= 0.995
    fp8.weight_cache.clear()


def test_fp8_copies_without_fp8_dx_warns():
    from lorafuse.backend import Options

    with pytest.warns(UserWarning, match="fp8_copies=False changes nothing"):
        Options.parse({"fp8_copies": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Options.parse({"fp8_copies": False, "fp8_dx": True})


def test_bench_fp8_dx_smoke(capsys):
    """bench/bench_fp8_dx.py runs end to end on CPU (small shapes) and prints its table;
    on the GPU (``OPS=bench_fp8_dx.py bash bench/run_gpu.sh ops``) it times the Triton
    kernels against eager and Inductor."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_fp8_dx.py"
    spec = importlib.util.spec_from_file_location("bench_fp8_dx", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--small", "--variants", "eager,lorafuse"]) == 0
    out = capsys.readouterr().out
    assert out.count("| quantise dy |") == 4 and out.count("| dy W |") == 6
    assert "| call ms | GPU ms | host µs |" in out  # GPU ms: "—" on CPU


def test_falls_back_to_exact_where_fp8_cannot_run():
    """fp32 compute and a size that is not a multiple of 16: dx exact, one warning each."""
    warned.clear()
    for dtype, (m, k, n) in ((torch.float32, (32, 48, 64)), (BF16, (32, 40, 64))):
        x, w, a, b = (t.to(dtype) for t in _site(m, k, n, 4, seed=3))
        op = _lora_op(w, 1.0)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, g1 = _grads(op(True), [x, a, b])
        _, g0 = _grads(op(False), [x, a, b])
        assert all(torch.equal(p, q) for p, q in zip(g0, g1))
        assert any("fp8_dx does not apply" in str(c.message) for c in caught)
    assert len(fp8.weight_cache) == 0


# --------------------------------------------------------------------------- a whole model


def _bf16_run(fp8_dx, steps=3, **options):
    """A tiny Llama (all GEMM sizes multiples of 16), compiled, CPU bf16 autocast, plain SGD
    steps: (losses, per-step LoRA grads, the report)."""
    import lorafuse
    from lorafuse.report import Report

    reset_dynamo()
    model = make_tiny_model("llama", intermediate_size=64, r=4, seed=3)
    report = Report()
    backend = functools.partial(lorafuse.lorafuse_backend, _collect=report,
                                options={"strict": True, "fp8_dx": fp8_dx, **options})
    fn = torch.compile(model, backend=backend)
    gen = torch.Generator().manual_seed(0)
    params = lora_params(model)
    losses, grads = [], []
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=gen)
        with torch.autocast("cpu", BF16):
            loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach().float())
        grads.append({n: p.grad.clone() for n, p in params.items()})
        with torch.no_grad():
            for p in params.values():
                p -= 0.5 * p.grad
                p.grad = None
    reset_dynamo()
    fp8.weight_cache.clear()
    fp8.scale_cache.clear()
    return losses, grads, report


@pytest.mark.slow
def test_whole_model_bf16_fp8_dx():
    exact_losses, exact_grads, _ = _bf16_run(False)
    losses, grads, report = _bf16_run(True)
    notes = " ".join(n for g in report.graphs for p in g.passes for n in p.notes)
    assert "fp8_dx:" in notes
    assert losses[0] == exact_losses[0]  # the forward is not touched
    # the last layer's down projection reads dy from the (exact) lm_head: its grads are the
    # same; every site upstream of an e4m3 dx sees a changed dy
    errs = {n: rel(grads[0][n], exact_grads[0][n]) for n in exact_grads[0]}
    last_down = [n for n in errs if "layers.1.mlp.down_proj" in n]
    assert last_down and all(errs[n] == 0 for n in last_down)
    changed = [n for n, e in errs.items() if e > 1e-3]
    assert len(changed) >= len(errs) // 2, errs
    assert max(errs.values()) <= 0.1, errs
    for a, b in zip(losses, exact_losses):
        assert abs(a - b) <= 0.02 * abs(b)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weight_copies_are_made_at_compile_time(arch, monkeypatch):
    """With bf16 frozen weights, compiling makes the fp8 weight copy of every LoRA site
    that computes a dx (one byte an element of each base weight, each in exactly one cache
    entry; GPT-2's Conv1D weights through their ``.t()``) and of no other (the first
    layer's q/k/v read a frozen embedding: no dx), before any backward, and the report says
    so; and the first backward adds nothing (the copies are the ones it looks up). On the
    GPU this keeps them out of CUDA graphs' memory pool (``fp8_dx.prebuild``)."""
    import lorafuse
    from lorafuse.report import Report

    monkeypatch.setattr(fp8, "PREBUILD_DEVICES", ("cuda", "cpu"))
    monkeypatch.setenv("LORAFUSE_LORA_IMPL", "triton")  # the CPU op reads the cache only
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # on its Triton path: see lora.py
    reset_dynamo()
    fp8.weight_cache.clear()
    width = {"n_inner": 64} if arch == "gpt2" else {"intermediate_size": 64}  # sizes % 16
    model = make_tiny_model(arch, r=4, seed=3, **width).to(BF16)
    no_dx = ("h.0.attn.c_attn",) if arch == "gpt2" else tuple(
        f"layers.0.self_attn.{p}_proj" for p in "qkv")
    sites = {n: m.base_layer.weight for n, m in model.named_modules() if hasattr(m, "lora_A")}
    bases = [w for n, w in sites.items() if not n.endswith(no_dx)]
    assert len(sites) - len(bases) == len(no_dx)
    report = Report()
    backend = functools.partial(lorafuse.lorafuse_backend, _collect=report,
                                options={"strict": True, "fp8_dx": True})
    fn = torch.compile(model, backend=backend)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # an evaluation graph runs no backward: no copies for it
        fn(input_ids=ids, labels=ids)
    assert len(fp8.weight_cache) == 0
    loss = fn(input_ids=ids, labels=ids).loss  # compiles: the copies are made here
    entries = {k: v[-1][0] for k, v in fp8.weight_cache._entries.items()}
    assert sum(q.numel() for q in entries.values()) == sum(w.numel() for w in bases)
    if arch == "llama":  # q/k/v and gate/up share one entry each (GPT-2: no groups)
        assert len(entries) == 4 * 2 - 1 < len(bases)
    notes = " ".join(n for g in report.graphs for p in g.passes for n in p.notes)
    assert "GiB of fp8 weight copies made at compile time" in notes
    looked_up = []
    monkeypatch.setattr(fp8.weight_cache, "get", _counting(fp8.weight_cache.get, looked_up))
    loss.backward()  # single sites read the cache here (groups: the CPU reference path)
    assert looked_up, "the backward did not read the cache: nothing checked"
    after = {k: v[-1][0] for k, v in fp8.weight_cache._entries.items()}
    assert after.keys() == entries.keys() and all(after[k] is entries[k] for k in entries), \
        "the backward made copies of its own"
    reset_dynamo()
    fp8.weight_cache.clear()


def test_weight_copies_are_made_at_compile_time_with_dynamic_shapes(monkeypatch):
    """``dynamic=True`` with rows that stay symbolic (a PEFT MLP, whose batch size Dynamo
    does not specialise; the tiny HF models specialise theirs): the copies are still made
    when the graph compiles, not at the first backward (which Inductor's CUDA graphs run
    in their memory pool), later batches of other sizes read them, and the graph is not
    recompiled for them."""
    import lorafuse
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(fp8, "PREBUILD_DEVICES", ("cuda", "cpu"))
    monkeypatch.setenv("LORAFUSE_LORA_IMPL", "triton")  # the CPU op reads the cache only
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # on its Triton path: see lora.py
    reset_dynamo()
    fp8.weight_cache.clear()
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    model = get_peft_model(mlp.to(BF16), LoraConfig(r=4, target_modules=["0", "2"],
                                                    init_lora_weights=False))
    bases = [m.base_layer.weight for m in model.modules() if hasattr(m, "lora_A")]
    backend_mod = importlib.import_module("lorafuse.backend")  # (lorafuse.backend: a function)
    rows_seen = []
    sites = backend_mod._fp8_sites
    monkeypatch.setattr(backend_mod, "_fp8_sites",
                        lambda *a: rows_seen.extend(s[2] for s in sites(*a)) or sites(*a))
    compiles = []
    fn = torch.compile(model, dynamic=True, backend=_counting(functools.partial(
        lorafuse.lorafuse_backend, options={"strict": True, "fp8_dx": True}), compiles))
    built, looked_up = [], []
    monkeypatch.setattr(fp8.weight_cache, "_build", _counting(fp8.weight_cache._build, built))
    x = torch.randn(48, 32, dtype=BF16, requires_grad=True)  # 48: no duck sizing with 32 or 64
    out = fn(x)
    assert rows_seen and all(r is None for r in rows_seen), rows_seen  # symbolic: None
    assert len(built) == len(fp8.weight_cache) == 2, "the copies were not made at compile time"
    entries = {k: v[-1][0] for k, v in fp8.weight_cache._entries.items()}
    assert sum(q.numel() for q in entries.values()) == sum(w.numel() for w in bases)
    monkeypatch.setattr(fp8.weight_cache, "get", _counting(fp8.weight_cache.get, looked_up))
    out.float().square().sum().backward()
    x = torch.randn(80, 32, dtype=BF16, requires_grad=True)  # other rows, the same graph
    fn(x).float().square().sum().backward()
    assert looked_up, "the backwards did not read the cache: nothing checked"
    assert len(built) == 2, "a backward made copies of its own"
    # finding the sites' rows did not specialise the graph to the first batch's size
    # (torch.Size.numel() of symbolic sizes did, before: a recompile at every new size)
    assert len(compiles) == 1, compiles
    reset_dynamo()
    fp8.weight_cache.clear()


def test_only_scales_are_made_at_compile_time_without_copies(monkeypatch):
    """``fp8_copies=False``: compiling makes each site's scales (4 bytes an input feature)
    and no copy, and the backward keeps none either."""
    import lorafuse

    monkeypatch.setattr(fp8, "PREBUILD_DEVICES", ("cuda", "cpu"))
    monkeypatch.setenv("LORAFUSE_LORA_IMPL", "triton")  # the CPU op's GPU-style path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reset_dynamo()
    fp8.weight_cache.clear()
    fp8.scale_cache.clear()
    model = make_tiny_model("llama", r=4, seed=3, intermediate_size=64).to(BF16)
    ks = {m.base_layer.weight.shape[1] for m in model.modules() if hasattr(m, "lora_A")}
    fn = torch.compile(model, backend=functools.partial(
        lorafuse.lorafuse_backend, options={"strict": True, "fp8_dx": True, "fp8_copies": False}))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = fn(input_ids=ids, labels=ids).loss
    entries = 4 * 2 - 1  # 4 groups or sites a layer, 2 layers; the first q/k/v has no dx
    assert len(fp8.scale_cache) == entries and len(fp8.weight_cache) == 0
    assert {e[-1][0].shape[1] for e in fp8.scale_cache._entries.values()} == ks
    loss.backward()
    assert len(fp8.scale_cache) == entries and len(fp8.weight_cache) == 0
    reset_dynamo()
    fp8.scale_cache.clear()


def _counting(fn, calls: list):
    def wrapper(*a, **k):
        calls.append(1)
        return fn(*a, **k)
    return wrapper


@pytest.mark.slow
def test_checkpoint_layers_without_copies(monkeypatch):
    """fp8_dx under checkpoint_layers (issue 5's 16.7 GiB configuration), on the GPU's code
    path with CPU tensors: with fp8_copies=False (each weight cast every backward) the
    losses and LoRA gradients of 2 steps are bit-equal to those with copies, and the
    layers were checkpointed."""
    monkeypatch.setenv("LORAFUSE_LORA_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ck = {"checkpoint_layers": True, "passes": ["lora", "attention", "loss"]}
    kept_losses, kept_grads, report = _bf16_run(True, steps=2, **ck)
    losses, grads, _ = _bf16_run(True, steps=2, fp8_copies=False, **ck)
    assert "layers recomputed" in report.graphs[0].format()
    assert [l.item() for l in losses] == [l.item() for l in kept_losses]
    for g, k in zip(grads, kept_grads):
        assert all(torch.equal(g[n], k[n]) for n in k)


@pytest.mark.slow
def test_dropout_sites_use_fp8_too():
    """With LoRA dropout on every site (x and x' take separate gradients: dy W comes from
    the ``frozen_dx`` op), bf16 autocast: the same dropout masks and step-1 loss as
    without the option, the gradients changed within the bound. One layer holds all 7 kinds
    of site (a second compiled ~40 % longer)."""
    import lorafuse
    from lorafuse.report import Report

    def run(fp8_dx):
        reset_dynamo()
        model = make_tiny_model("llama", layers=1, intermediate_size=64, lora_dropout=0.1,
                                seed=4)
        report = Report()
        backend = functools.partial(lorafuse.lorafuse_backend, _collect=report,
                                    options={"strict": True, "fp8_dx": fp8_dx})
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(0)  # the same dropout masks in both runs
        with torch.autocast("cpu", BF16):
            loss = torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss
        loss.backward()
        reset_dynamo()
        fp8.weight_cache.clear()
        return report, loss.detach(), {n: p.grad for n, p in lora_params(model).items()}

    report, loss, grads = run(True)
    _, exact_loss, exact = run(False)
    notes = " ".join(n for g in report.graphs for p in g.passes for n in p.notes)
    assert "fp8_dx: 7 op(s)" in notes, notes  # 7 sites, none grouped (dropout)
    assert loss == exact_loss
    errs = {n: rel(grads[n], exact[n]) for n in exact}
    assert sum(e > 1e-3 for e in errs.values()) >= len(errs) // 2, errs
    assert max(errs.values()) <= 0.1, errs


def test_an_fp8_failure_falls_back_to_exact_for_the_rest_of_the_process(monkeypatch):
    """A torch whose fp8 GEMM raises (no rowwise kernel, say): that call's dx and every
    later one are the exact path's, with one warning; training does not stop."""
    import lorafuse.kernels.lora as lora_mod

    monkeypatch.setattr(lora_mod, "_triton_on_cpu", lambda: True)
    monkeypatch.setattr(lora_mod, "_forward_impl", lambda x, w, bias, a, b, s, xl:
                        lora_mod.lora_linear_reference(x, w, bias, a, b, s, xl))
    monkeypatch.setattr(lora_mod, "_dispatch", lambda kind, key, fn, args: fn(*args))

    def broken(*args):
        raise RuntimeError("no rowwise fp8 kernel here")

    monkeypatch.setattr(fp8, "scaled_mm", broken)
    monkeypatch.setattr(fp8, "_failed", [])
    warned.clear()
    x, w, a, b = _site(32, 48, 64, 8, seed=6)
    op = _lora_op(w, 0.5)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, g1 = _grads(op(True), [x, a, b])
        _, g2 = _grads(op(True), [x, a, b])
    _, g0 = _grads(op(False), [x, a, b])
    assert all(torch.equal(p, q) for p, q in zip(g0, g1))
    assert all(torch.equal(p, q) for p, q in zip(g0, g2))
    msgs = [str(c.message) for c in caught if "fp8_dx failed" in str(c.message)]
    assert len(msgs) == 1 and "no rowwise fp8 kernel" in msgs[0]
    assert not fp8.supported(32, 64, 48, BF16, torch.device("cpu"))
    fp8.weight_cache.clear()


if __name__ == "__main__":
    _worker()
