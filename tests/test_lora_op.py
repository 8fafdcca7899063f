"""Property tests of the fused LoRA linear op against eager PyTorch (CPU: reference path).

fp32: output and every gradient match eager PyTorch to relative error 1e-5.
bf16: against an fp64 computation on the same bf16-valued inputs, the op's error is no
larger than eager bf16's error (times 1.5), for the output and every gradient.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafuse.kernels import _dispatch, lora
from lorafuse.kernels.lora import lora_linear

# Sizes that are not multiples of 16, so no path gets a friendly tile.
odd = st.integers(1, 70).filter(lambda v: v % 16 != 0)


@dataclass
class Case:
    lead: tuple  # leading dims of x: (M,) or (batch, seq)
    N: int
    K: int
    r: int
    bias: bool
    weight_t: bool  # weight passed as W_kn.t(), GPT-2 style
    dropout: float  # 0: x' = x; else x' = x * mask / (1 - p), mask fixed
    x_grad: bool
    w_grad: bool
    b_grad: bool
    scale: float
    seed: int


@st.composite
def cases(draw, min_numel=1):
    lead = draw(st.one_of(st.tuples(odd), st.tuples(st.integers(1, 3), odd)))
    bias = draw(st.booleans())
    c = Case(
        lead=lead, N=draw(odd), K=draw(odd), r=draw(st.integers(1, 64)),
        bias=bias, weight_t=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.1, 0.3])),
        x_grad=draw(st.booleans()), w_grad=draw(st.booleans()),
        b_grad=bias and draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 2.0, 0.5, 0.37, 3.1])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return c


def make_leaves(c: Case, dtype):
    """Random non-zero leaves (values drawn in fp32, then cast) and a fixed dropout mask."""
    g = torch.Generator().manual_seed(c.seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    M = 1
    for d in c.lead:
        M *= d
    leaves = {
        "x": rnd(*c.lead, c.K).requires_grad_(c.x_grad),
        # LoRA-like magnitudes: B is non-zero (a trained adapter), the low-rank term small.
        "w": (rnd(c.K, c.N, std=c.K ** -0.5) if c.weight_t else rnd(c.N, c.K, std=c.K ** -0.5)
              ).requires_grad_(c.w_grad),
        "b": rnd(c.N).requires_grad_(c.b_grad) if c.bias else None,
        "a": rnd(c.r, c.K, std=c.K ** -0.5).requires_grad_(True),
        "B": rnd(c.N, c.r, std=0.3 * c.r ** -0.5).requires_grad_(True),
    }
    mask = (torch.rand(*c.lead, c.K, generator=g) >= c.dropout).to(dtype) if c.dropout else None
    dy = rnd(*c.lead, c.N)
    return leaves, mask, dy


def x_lora_of(c: Case, x, mask):
    return None if mask is None else x * mask / (1.0 - c.dropout)


def weight_of(c: Case, w):
    return w.t() if c.weight_t else w


def eager(c: Case, leaves, mask):
    x, W, b = leaves["x"], weight_of(c, leaves["w"]), leaves["b"]
    xl = x if mask is None else x_lora_of(c, x, mask)
    return F.linear(x, W, b) + F.linear(F.linear(xl, leaves["a"]), leaves["B"]) * c.scale


def fused(c: Case, leaves, mask):
    x = leaves["x"]
    return lora_linear(x, weight_of(c, leaves["w"]), leaves["b"], leaves["a"], leaves["B"],
                       c.scale, x_lora_of(c, x, mask))


def forward_backward(fn, c: Case, leaves, mask, dy):
    """Output and the gradients of every leaf that requires one, by name."""
    y = fn(c, leaves, mask)
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy)
    return {"y": y.detach(), **dict(zip(names, grads))}


def rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_fp32(c: Case):
    leaves, mask, dy = make_leaves(c, torch.float32)
    got = forward_backward(fused, c, leaves, mask, dy)
    want = forward_backward(eager, c, leaves, mask, dy)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert rel_err(got[k], want[k]) < 1e-5, (k, rel_err(got[k], want[k]), c)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_fp32_matches_eager(c):
    check_fp32(c)


def fp64_reference(c: Case, leaves, mask, dy):
    """Eager fp64 on the same values. x' keeps its bf16 value (the op's input) while its
    gradient still flows to x through the mask: so both sides see identical inputs."""
    l64 = {k: None if v is None else v.detach().double().requires_grad_(v.requires_grad)
           for k, v in leaves.items()}

    def fn(c, l, m):
        x, W, b = l["x"], weight_of(c, l["w"]), l["b"]
        if m is None:
            xl = x
        else:
            exact = x * m.double() / (1.0 - c.dropout)
            xl = exact + (x_lora_of(c, leaves["x"].detach(), mask).double() - exact).detach()
        return F.linear(x, W, b) + F.linear(F.linear(xl, l["a"]), l["B"]) * c.scale

    return forward_backward(fn, c, l64, mask, dy.double())


def bf16_errors(c: Case, min_pooled=256, max_draws=32):
    """Relative errors against fp64 of the op and of eager bf16, per output/gradient.

    Rounding errors are random: on a tensor of a few elements one draw can make eager
    look lucky. So errors are pooled (sums of squares) over draws of fresh random values
    of the same case until each tensor has seen about ``min_pooled`` elements."""
    sums = {}
    draws = 1
    i = 0
    while i < draws:
        leaves, mask, dy = make_leaves(dataclasses.replace(c, seed=c.seed + i), torch.bfloat16)
        ref = fp64_reference(c, leaves, mask, dy)
        got = forward_backward(fused, c, leaves, mask, dy)
        base = forward_backward(eager, c, leaves, mask, dy)
        if i == 0:
            smallest = min(t.numel() for t in ref.values())
            draws = min(max_draws, -(-min_pooled // smallest))
        for k in ref:
            assert got[k].dtype == torch.bfloat16 and torch.isfinite(got[k]).all(), k
            r = ref[k]
            s = sums.setdefault(k, [0.0, 0.0, 0.0])
            s[0] += (got[k].double() - r).norm().item() ** 2
            s[1] += (base[k].double() - r).norm().item() ** 2
            s[2] += r.norm().item() ** 2
        i += 1
    return {k: ((e_op / n) ** 0.5, (e_eager / n) ** 0.5) for k, (e_op, e_eager, n) in sums.items()}


def check_bf16(c: Case, factor=1.5):
    for k, (e_op, e_eager) in bf16_errors(c).items():
        assert e_op <= factor * e_eager + 1e-6, (k, e_op, e_eager, c)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_bf16_no_worse_than_eager(c):
    check_bf16(c)


def _coarsen(t, bits=6):
    """Round to ``bits`` significant bits: about 4x the error of bf16's 8."""
    m, e = torch.frexp(t.float())
    return torch.ldexp(torch.round(m * 2**bits) / 2**bits, e).to(t.dtype)


@pytest.mark.parametrize("where", ["y", "dA"])
def test_bf16_check_can_fail(monkeypatch, where):
    """The bf16 comparison must catch an op that is a few times less precise than a
    single rounding, in the output or in a gradient."""
    c = Case(lead=(2, 33), N=47, K=61, r=8, bias=True, weight_t=False, dropout=0.0,
             x_grad=True, w_grad=False, b_grad=False, scale=1.0, seed=3)
    if where == "y":
        orig = lora.lora_linear_reference
        monkeypatch.setattr(lora, "lora_linear_reference",
                            lambda *a: (_coarsen(orig(*a)[0]), orig(*a)[1]))
    else:
        orig = lora.lora_linear_backward_reference
        monkeypatch.setattr(lora, "lora_linear_backward_reference",
                            lambda *a: (lambda dx, dA, dB: (dx, _coarsen(dA), dB))(*orig(*a)))
    with pytest.raises(AssertionError):
        check_bf16(c)


@pytest.mark.parametrize("bias,weight_t,dropout", [(True, False, 0.0), (False, True, 0.25)])
def test_fp64_gradcheck(bias, weight_t, dropout):
    g = torch.Generator().manual_seed(0)
    N, K, r = 5, 7, 3
    x = torch.randn(2, 3, K, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*((K, N) if weight_t else (N, K)), generator=g, dtype=torch.float64,
                    requires_grad=True)
    b = torch.randn(N, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    a = torch.randn(r, K, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(N, r, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 3, K, generator=g) > dropout).double()

    def fn(x, w, a, B, *b_opt):
        xl = x * mask / (1 - dropout) if dropout else None
        return lora_linear(x, w.t() if weight_t else w, b_opt[0] if b_opt else None, a, B, 0.7, xl)

    inputs = (x, w, a, B) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(fn, inputs)


# --------------------------------------------------------------------------- compile


def test_aot_eager_dynamic_shapes():
    torch._dynamo.reset()
    c = Case(lead=(2, 9), N=19, K=23, r=5, bias=True, weight_t=True, dropout=0.1,
             x_grad=True, w_grad=True, b_grad=True, scale=0.5, seed=1)
    compiled = torch.compile(lambda l, m: fused(c, l, m), backend="aot_eager", dynamic=True)
    for lead in [(2, 9), (3, 13), (1, 5)]:  # the sequence length changes: no shape baked in
        c.lead = lead
        leaves, mask, dy = make_leaves(c, torch.float32)
        got = forward_backward(lambda c, l, m: compiled(l, m), c, leaves, mask, dy)
        want = forward_backward(eager, c, leaves, mask, dy)
        for k in want:
            assert got[k].shape == want[k].shape, k
            assert rel_err(got[k], want[k]) < 1e-5, k


def _backward_graph_ops(x_grad: bool, dropout: float):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    c = Case(lead=(7,), N=9, K=11, r=3, bias=False, weight_t=False, dropout=dropout,
             x_grad=x_grad, w_grad=False, b_grad=False, scale=2.0, seed=2)
    leaves, mask, dy = make_leaves(c, torch.float32)
    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    compiled = torch.compile(lambda l, m: fused(c, l, m), backend=backend, dynamic=True)
    got = forward_backward(lambda c, l, m: compiled(l, m), c, leaves, mask, dy)
    want = forward_backward(eager, c, leaves, mask, dy)
    for k in want:
        assert rel_err(got[k], want[k]) < 1e-5, k
    assert len(graphs) == 2
    return {n.target for n in graphs[1].graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_frozen_input_skips_dx(dropout):
    ops = torch.ops.lorafuse
    frozen = _backward_graph_ops(x_grad=False, dropout=dropout)
    assert ops.lora_linear_backward_ab.default in frozen
    assert ops.lora_linear_backward.default not in frozen
    trained = _backward_graph_ops(x_grad=True, dropout=dropout)
    assert ops.lora_linear_backward.default in trained
    assert ops.lora_linear_backward_ab.default not in trained


def test_fake_impls_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, W, A, B = torch.empty(2, 5, 7), torch.empty(6, 7), torch.empty(3, 7), torch.empty(6, 3)
        y, h = torch.ops.lorafuse.lora_linear(x, W, None, A, B, 1.0, None)
        assert y.shape == (2, 5, 6) and h.shape == (2, 5, 3)
        dx, dA, dB = torch.ops.lorafuse.lora_linear_backward(y, x, W, A, B, h, 1.0)
        assert dx.shape == x.shape and dA.shape == A.shape and dB.shape == B.shape
        dA, dB = torch.ops.lorafuse.lora_linear_backward_ab(y, x, A, B, h, 1.0)
        assert dA.shape == A.shape and dB.shape == B.shape


# --------------------------------------------------------------------------- dispatch


@pytest.fixture
def fresh_dispatch(monkeypatch):
    monkeypatch.setattr(lora, "_choice", {})
    monkeypatch.setattr(_dispatch, "warned", set())
    monkeypatch.delenv(lora.IMPL_ENV, raising=False)
    return monkeypatch


def _stub_dispatch(monkeypatch, times, triton_raises=False):
    """Route _dispatch to stub kernels and stub timings; record what ran."""
    calls = []

    def triton_fn(*args):
        calls.append("triton")
        if triton_raises:
            raise TypeError("unsupported")
        return "T"

    def cublas_fn(*args):
        calls.append("cublas")
        return "C"

    def time_ms(fn):
        calls.append("time")
        n = len(calls)
        fn()
        return times[calls[n] == "triton"]

    monkeypatch.setattr(lora, "_triton_backward", lambda: triton_fn)
    monkeypatch.setattr(lora, "_time_ms", time_ms)
    args = (torch.empty(1),)
    return lambda: lora._dispatch("bwd", (64, 1, 1, 1), cublas_fn, args), calls


def test_pick_fastest_times_once_skips_failures_raises_only_if_none_works(fresh_dispatch):
    """The shared per-shape choice (the LoRA forward's kernels, the 4-bit dequantisation):
    every working candidate is timed in ROUNDS interleaved rounds, the fastest median is
    cached; a candidate that raises is left out with one warning, the last one too (then
    the others' choice is cached, not timed again at every call); only when none works
    does the error propagate."""
    timed = []

    def timer(fn):
        timed.append(fn)
        return fn()

    def boom():
        raise TypeError("unsupported")

    cache = {}
    cands = {"a": lambda: 3.0, "bad": boom, "b": lambda: 2.0}
    with pytest.warns(RuntimeWarning, match="'bad' unavailable"):
        assert _dispatch.pick_fastest(cache, "k", cands, "test", timer=timer) == "b"
    rounds = _dispatch.ROUNDS
    assert cache == {"k": "b"} and len(timed) == 2 * rounds
    assert timed[:4] == [cands["a"], cands["b"]] * 2  # interleaved: a b a b ...
    assert _dispatch.pick_fastest(cache, "k", cands, "test", timer=timer) == "b"
    assert len(timed) == 2 * rounds  # cached: nothing timed again
    cache = {}
    with pytest.warns(RuntimeWarning, match="'last' unavailable"):
        assert _dispatch.pick_fastest(cache, "k", {"a": lambda: 1.0, "last": boom}, "test",
                                      timer=timer) == "a"
    assert cache == {"k": "a"}
    with pytest.raises(TypeError):
        _dispatch.pick_fastest({}, "k", {"bad": boom, "last": boom}, "test", timer=timer)


def test_launch_autotuned_tunes_once_then_launches_the_choice_directly(monkeypatch):
    """``launch_autotuned`` (every autotuned Triton launch on CUDA): the first call for a
    key goes through the autotuner; later ones call its JIT function with the chosen
    config's arguments, after the config's pre-hook (the TMA kernels' block shapes), as the
    autotuner itself would; another key tunes again."""
    monkeypatch.setattr(_dispatch, "_tuned", {})
    log = []

    class Config:
        def __init__(self, bm):
            self.bm = bm
            self.pre_hook = lambda nargs: log.append(("hook", nargs["a"], nargs["BLOCK_M"]))

        def all_kwargs(self):
            return {"BLOCK_M": self.bm, "num_warps": 8}

    class Launcher:
        def __init__(self, who):
            self.who = who

        def __getitem__(self, grid):
            return lambda *args, **kw: log.append((self.who, grid, args, kw))

    class Autotuned(Launcher):
        arg_names = ["a", "b"]

        def __init__(self):
            super().__init__("autotuner")
            self.fn = Launcher("jit")
            self.best_config = Config(64)

    k = Autotuned()
    _dispatch.launch_autotuned(k, "g", (1, 2), {"X": True}, key=("k1",))
    assert log == [("autotuner", "g", (1, 2), {"X": True})]
    log.clear()
    k.best_config = Config(128)  # a later tuning elsewhere must not change this key's
    _dispatch.launch_autotuned(k, "g", (3, 4), {"X": True}, key=("k1",))
    assert log == [("hook", 3, 64),
                   ("jit", "g", (3, 4), {"X": True, "BLOCK_M": 64, "num_warps": 8})]
    log.clear()
    _dispatch.launch_autotuned(k, "g", (5, 6), {"X": False}, key=("k2",))
    assert log == [("autotuner", "g", (5, 6), {"X": False})]


def test_race_takes_each_candidates_median_over_interleaved_rounds():
    """One slow round (a clock dip, other work on the GPU) does not decide the race: each
    candidate's median over the rounds does, and the candidates take turns."""
    rounds = {"a": iter([5.0, 1.0, 1.2]), "b": iter([1.1, 1.1, 1.1])}
    order = []

    def timer(fn):
        order.append(fn())
        return next(rounds[order[-1]])

    times = _dispatch.race_ms({"a": lambda: "a", "b": lambda: "b"}, timer, rounds=3)
    assert order == ["a", "b"] * 3
    assert times == {"a": 1.2, "b": 1.1}


def test_timer_heats_the_gpu_before_the_timed_calls(monkeypatch):
    """time_ms measures device time at the power cap: after the warm-up call and a second
    call timed on the host, it queues heating GEMMs and only then records the events around
    each timed call, so the calls are queued before the GPU reaches them and run at the cap
    (session 17: on an idle GPU a launch-heavy path was timed by its launches, and two
    rankings at full clock differed from the cap's)."""
    log = []

    class Event:
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            log.append("event")
            self.t = len(log)

        def synchronize(self):
            log.append("sync")

        def elapsed_time(self, end):
            return float(end.t - self.t)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(_dispatch, "heat_gpu", lambda ms: log.append(("heat", ms)))
    ms = _dispatch.time_ms(lambda: log.append("call"), iters=3)
    assert log == ["call", "call", ("heat", _dispatch.HEAT_MS),
                   *["event", "call", "event"] * 3, "sync"]
    assert ms == 2.0  # each timed pair brackets exactly one call


def test_heat_leaves_the_default_rng_alone(monkeypatch):
    """The heating GEMMs' operands come from a generator of their own: a choice timed inside
    a training step must not move the default generator that dropout draws from. On CPU,
    with the CUDA device redirected to the CPU and an 8 × 8 heater."""
    real_randn, real_generator = torch.randn, torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device=None: real_generator())
    monkeypatch.setattr(torch, "randn", lambda *a, device=None, **k: real_randn(*a, **k))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_dispatch, "_HEAT_N", 8)
    monkeypatch.setattr(_dispatch, "_HEAT_DTYPE", torch.float32)
    monkeypatch.setattr(_dispatch, "_gemm_ms", {0: 1.0})
    mms = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: mms.append(1) or real_mm(*a, **k))
    state = torch.random.get_rng_state()
    _dispatch.heat_gpu(5.0)
    assert len(mms) == 5  # 5 ms of 1-ms GEMMs
    assert torch.equal(torch.random.get_rng_state(), state)


def test_heat_out_of_memory_spins_instead(monkeypatch):
    """Where the heater's operands do not fit (long context near the memory limit), a GPU
    spin holds the stream for about as long, and nothing raises."""
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    real_generator = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device=None: real_generator())
    monkeypatch.setattr(torch, "randn", oom)
    spins = []
    monkeypatch.setattr(_dispatch, "gpu_spin", spins.append)
    _dispatch.heat_gpu(20.0)
    assert spins == [40_000_000]  # 20 ms at 2 GHz


def test_heat_outlasts_the_hosts_launches():
    """The GPU stays busy for twice the host time of the timed calls where that is longer
    than HEAT_MS (a launch-heavy path), never longer than HEAT_MAX_MS."""
    assert _dispatch.heat_ms(0.001, 5) == _dispatch.HEAT_MS
    assert _dispatch.heat_ms(3.0, 5) == 30.0  # 5 calls of 3 ms, twice
    assert _dispatch.heat_ms(1000.0, 5) == _dispatch.HEAT_MAX_MS


@pytest.mark.parametrize("triton_faster", [True, False])
def test_dispatch_measures_once_and_caches(fresh_dispatch, triton_faster):
    run, calls = _stub_dispatch(fresh_dispatch, {True: 1.0 if triton_faster else 3.0, False: 2.0})
    want = "T" if triton_faster else "C"
    assert run() == want
    assert calls.count("time") == 2 * _dispatch.ROUNDS  # interleaved rounds
    calls.clear()
    assert [run() for _ in range(3)] == [want] * 3
    assert "time" not in calls  # no more measuring (and no syncs) after the first call


def test_dispatch_env_override(fresh_dispatch):
    run, calls = _stub_dispatch(fresh_dispatch, {True: 1.0, False: 2.0})
    fresh_dispatch.setenv(lora.IMPL_ENV, "cublas")
    assert run() == "C" and calls == ["cublas"]
    fresh_dispatch.setenv(lora.IMPL_ENV, "triton")
    calls.clear()
    assert run() == "T" and calls == ["triton"]  # forced: no timing


def test_dispatch_falls_back_with_one_warning(fresh_dispatch):
    run, calls = _stub_dispatch(fresh_dispatch, {True: 1.0, False: 2.0}, triton_raises=True)
    fresh_dispatch.setenv(lora.IMPL_ENV, "triton")
    with pytest.warns(RuntimeWarning, match="using cuBLAS"):
        assert run() == "C"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run() == "C"  # cached: no second attempt, no second warning
    assert calls == ["triton", "cublas", "cublas"]


def test_cpu_triton_request_without_interpreter_uses_reference(fresh_dispatch):
    fresh_dispatch.setenv(lora.IMPL_ENV, "triton")
    fresh_dispatch.delenv("TRITON_INTERPRET", raising=False)
    c = Case(lead=(5,), N=6, K=7, r=2, bias=True, weight_t=False, dropout=0.0,
             x_grad=True, w_grad=False, b_grad=False, scale=1.0, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_fp32(c)


def test_dispatch_auto_falls_back_when_triton_fails(fresh_dispatch):
    run, calls = _stub_dispatch(fresh_dispatch, {True: 1.0, False: 2.0}, triton_raises=True)
    fresh_dispatch.setattr(lora, "_time_ms", lambda fn: fn() and 1.0)
    with pytest.warns(RuntimeWarning, match="using cuBLAS"):
        assert run() == "C"
    assert run() == "C" and calls == ["triton", "cublas", "cublas"]


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 40), n=st.integers(1, 24), r=st.integers(1, 8),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       separate=st.booleans(), seed=st.integers(0, 2**16))
def test_h_op_is_the_ops_second_output(m, k, n, r, dtype, separate, seed):
    """``lora_linear_h`` (what a backward calls where it recomputes the op only for h,
    partition.lowrank_only_recomputes) gives the op's h bit for bit, and its fake the same
    shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    a = torch.randn(r, k, generator=g).to(dtype)
    b = torch.randn(n, r, generator=g).to(dtype)
    xl = torch.randn(2, m, k, generator=g).to(dtype) if separate else None
    _, h = torch.ops.lorafuse.lora_linear.default(x, w, None, a, b, 0.5, xl)
    got = torch.ops.lorafuse.lora_linear_h.default(x, a, xl)
    assert got.dtype == h.dtype and torch.equal(got, h)
    with FakeTensorMode() as mode:
        fx, fa = mode.from_tensor(x), mode.from_tensor(a)
        fxl = None if xl is None else mode.from_tensor(xl)
        fake = torch.ops.lorafuse.lora_linear_h.default(fx, fa, fxl)
    assert fake.shape == h.shape and fake.dtype == h.dtype
