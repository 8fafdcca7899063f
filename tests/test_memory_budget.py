"""The ``memory_budget`` option: min-cut under a bound on the activations the backward keeps.

One tiny PEFT Llama (one layer: every kind of op a layer has, and the plan's bytes and
choices hold per layer; 2 layers only made each of the seven compiles slower), compiled once
per budget and trained two SGD steps; the tests only inspect the record. What must hold:
- the bound: the activation bytes the backward keeps (read from the partitioned backward
  graph's inputs, into the report) are within the budget, never grow as the budget shrinks,
  and at budget 0 are zero while the default plan keeps some;
- cheap before expensive: a budget that recomputing norms/rope/activations/casts can meet
  recomputes no matmul, attention or fused op;
- correctness: recomputing instead of keeping changes no number beyond fp32 rounding — the
  losses and every LoRA gradient of both steps equal the no-budget run's (measured on CPU:
  bitwise equal); with LoRA dropout, the masks are kept, never redrawn in the backward;
- bad values are a clear ValueError before anything compiles; the cache key follows the
  budget.

The AOTAutograd cache is off for these compiles (the kernel caches stay on): a cache hit
would skip the partitioner and leave the report empty. CPU time: about 60 s (the fixture).
"""

from __future__ import annotations

import copy
import functools
import pickle
from dataclasses import asdict

import pytest
import torch

import lorafuse
import lorafuse.partition
from lorafuse.partition import LorafusePartitioner, _torch_ratio, parse_memory_budget
from lorafuse.report import Report

from conftest import (VOCAB, lora_params, lorafuse_sgd_run, make_tiny_model, partitioned_graph,
                      reset_dynamo)

BUDGETS = (None, 1.0, 0.95, 0.5, 0.0)  # None: no budget (the reference run)
STEPS, BATCH, SEQ, LR, LAYERS = 2, 2, 16, 0.5, 1
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5  # ‖g − g_ref‖ / ‖g_ref‖ per LoRA tensor


def _batch(step: int) -> dict:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


def _train(model, budget, **options) -> dict:
    """Compile ``model`` with ``memory_budget=budget`` (and ``options``), train STEPS
    plain-SGD steps."""
    return lorafuse_sgd_run(model, [_batch(step) for step in range(STEPS)], LR,
                            {"memory_budget": budget, **options})


@pytest.fixture(scope="module")
def runs():
    base = make_tiny_model("llama", layers=LAYERS, seed=3)
    out = {}
    with torch._functorch.config.patch(enable_autograd_cache=False):
        for budget in BUDGETS:
            out[budget] = _train(copy.deepcopy(base), budget)
        out["free"] = _train(copy.deepcopy(base), None, recompute_free=True)
    return out


def _assert_same_training(got, want, what: str) -> None:
    """The losses and every LoRA gradient of each step equal the reference run's, to fp32
    rounding (measured on CPU: bitwise equal)."""
    for step in range(STEPS):
        torch.testing.assert_close(got["losses"][step], want["losses"][step],
                                   rtol=LOSS_RTOL, atol=0)
        assert got["grads"][step].keys() == want["grads"][step].keys()
        assert len(want["grads"][step]) == 14 * LAYERS  # A and B of 7 sites a layer
        for name, g in want["grads"][step].items():
            assert g.norm() > 0, name
            err = ((got["grads"][step][name] - g).norm() / g.norm()).item()
            assert err <= GRAD_RTOL, f"{what} step {step} {name}: rel. error {err:.2e}"


# --------------------------------------------------------------------------- the bound


@pytest.mark.slow
def test_budget_bounds_activations_kept(runs):
    plain = partitioned_graph(runs[None])
    default = plain.activation_bytes
    assert default > 0 and plain.memory_budget is None
    for budget in BUDGETS[1:]:
        g = partitioned_graph(runs[budget])
        assert g.default_activation_bytes == default, budget  # the same default plan
        assert g.activation_bytes <= g.budget_bytes, (budget, g.activation_bytes, g.budget_bytes)
    assert partitioned_graph(runs[1.0]).activation_bytes == default
    assert partitioned_graph(runs[0.5]).budget_bytes == int(0.5 * default)
    assert partitioned_graph(runs[0.0]).budget_bytes == 0


@pytest.mark.slow
def test_bytes_kept_shrink_with_the_budget(runs):
    """Activation bytes never grow as the budget goes 1 → 0.95 → 0.5 → 0, and are 0 at 0;
    all bytes saved for backward (parameters included) are below the default plan's at 0.
    In between they need not shrink: a recompute reads parameters, which count there
    (resident anyway); with the norm and MLP folds, 0.95 saves more of them than 1.0."""
    order = [partitioned_graph(runs[b]) for b in (1.0, 0.95, 0.5, 0.0)]
    act = [g.activation_bytes for g in order]
    saved = [g.saved_bytes for g in order]
    assert act == sorted(act, reverse=True) and act[-1] == 0 < act[0], act
    assert saved[-1] < saved[0], saved
    assert order[-1].saved_for_backward < order[0].saved_for_backward


@pytest.mark.slow
def test_report_shows_the_plan(runs):
    text = str(runs[0.5]["report"])
    assert "memory plan:" in text and "budget 0.5: activations" in text, text
    assert " recomputed of " in text and "min-cut solves" in text, text
    assert "of them matmul/attention/custom" in text, text
    g = partitioned_graph(runs[0.5])
    assert g.tokens == BATCH * SEQ
    assert f"per token ({BATCH * SEQ} tokens a call): " in text, text
    assert f"{g.activation_bytes // g.tokens} B of activations kept" in text \
        or "KiB of activations kept" in text, text
    assert "recomputed instead" in text and "none offloaded" in text, text
    assert "recomputed instead" not in str(runs[None]["report"])


@pytest.mark.slow
def test_cheap_recomputes_first(runs):
    """A budget that recomputing cheap ops (norms, rope, activations, casts) can meet
    recomputes no matmul, attention or fused op; only a tighter one does. Without the
    pins torch's knapsack recomputes the fused LoRA and attention ops first (it does not
    count their cost). On this tiny model 0.95 is met by cheap ops (they reach 0.92 of the
    default plan's bytes: the norm and MLP folds left little else to recompute), 0.5 is
    not."""
    plain, cheap, tight = (partitioned_graph(runs[b]) for b in (None, 0.95, 0.0))
    assert cheap.budget_tier == 1 and cheap.recomputed_expensive == 0
    assert cheap.recomputed_ops > plain.recomputed_ops  # it did recompute more: cheap ops
    assert cheap.activation_bytes < plain.activation_bytes
    assert tight.budget_tier == 2 and tight.recomputed_expensive > 0
    assert "budget" not in str(runs[None]["report"])


# --------------------------------------------------------------------------- correctness


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS[1:])
def test_losses_and_lora_grads_equal_no_budget(runs, budget):
    want, got = runs[None], runs[budget]
    _assert_same_training(got, want, f"budget {budget}")


# --------------------------------------------------------------------------- recompute_free


@pytest.mark.slow
def test_recompute_free_keeps_fewer_bytes_recomputing_only_cheap_ops(runs):
    """``recompute_free`` drops the activations cheap ops rebuild from what the backward
    keeps anyway (the MLP's act(gate) * up, the norms' outputs and inverse RMS): fewer
    bytes than min-cut's plan, no matmul / attention / fused op recomputed, and the
    report says how much."""
    plain, free = partitioned_graph(runs[None]), partitioned_graph(runs["free"])
    assert free.activation_bytes < plain.activation_bytes
    assert free.recompute_free_bytes == plain.activation_bytes - free.activation_bytes
    assert free.recomputed_expensive == 0 and free.recomputed_ops > plain.recomputed_ops
    # (not saved_bytes: it counts the parameters a recompute reads, in memory anyway; with
    # the norm fold the plain plan's is the smaller, 138,916 against 141,328 bytes)
    assert "recompute_free: " in str(runs["free"]["report"])
    assert "recomputed instead" in str(runs["free"]["report"])
    assert "recompute_free" not in str(runs[None]["report"])


@pytest.mark.slow
def test_recompute_free_losses_and_lora_grads_equal_min_cut(runs):
    want, got = runs[None], runs["free"]
    _assert_same_training(got, want, "recompute_free")


@pytest.mark.slow
def test_recompute_free_never_redraws_dropout(dropout_model):
    """Random ops are never in what recompute_free recomputes: with LoRA dropout the
    gradients equal eager's on the same masks, and fewer bytes are still kept."""
    reset_dynamo()
    graph = _dropout_run(dropout_model, None, recompute_free=True)
    assert graph.recompute_free_bytes and graph.recompute_free_bytes > 0


# --------------------------------------------------------------------------- dropout


def _dropout_step(model, fn):
    torch.manual_seed(100)  # the same dropout masks on both sides (fallback_random)
    loss = fn(**_batch(0)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lora_params(model).items()}


@pytest.fixture(scope="module")
def dropout_model():
    return make_tiny_model("llama", layers=1, lora_dropout=0.1, seed=2)


def _dropout_run(base, budget, **options):
    """One step of a LoRA-dropout model compiled with ``budget``, against eager on the
    same masks: ``fallback_random`` makes Inductor draw them with eager's ATen ops —
    also the case where a recomputed dropout would draw a new mask in the backward
    (Inductor's own RNG recomputes from a saved seed, which is harmless)."""
    eager, comp = copy.deepcopy(base), copy.deepcopy(base)
    want = _dropout_step(eager, eager)
    reset_dynamo()
    report = Report()
    backend = functools.partial(lorafuse.lorafuse_backend, _collect=report,
                                options={"memory_budget": budget, "strict": True, **options})
    with torch._inductor.config.patch(fallback_random=True), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        got = _dropout_step(comp, torch.compile(comp, backend=backend))
    reset_dynamo()
    torch.testing.assert_close(got[0], want[0], rtol=LOSS_RTOL, atol=0)
    for name, g in want[1].items():
        err = ((got[1][name] - g).norm() / g.norm()).item()
        assert err <= 10 * GRAD_RTOL, f"budget {budget}, dropout: {name} rel. error {err:.2e}"
    (graph,) = report.graphs
    return graph


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["0.06MiB", 0.0])
def test_dropout_masks_are_kept_not_redrawn(dropout_model, budget, recwarn):
    """torch's knapsack (and budget 0) would recompute dropout in the backward with a new
    mask — relative gradient error ~2, silently. The partitioner pins random ops (they are
    kept); where that makes the budget unreachable it says so."""
    graph = _dropout_run(dropout_model, budget)
    assert graph.activation_bytes < graph.default_activation_bytes
    if budget == 0.0:
        assert graph.activation_bytes > 0 and "budget not met" in graph.budget_note
        assert any("budget not met" in str(w.message) for w in recwarn)
    else:
        assert graph.budget_bytes == int(0.06 * 2**20)
        assert graph.activation_bytes <= graph.budget_bytes and graph.budget_note is None


@pytest.mark.slow
def test_plans_that_redraw_a_mask_are_never_used(dropout_model, monkeypatch):
    """If the random-op pins did not hold (another torch release), a plan whose backward
    redraws a mask is thrown away (at worst for the default plan): correct gradients."""
    real_pin, real_check, redrawn = lorafuse.partition._pin, lorafuse.partition._random_ops_in, []

    def pin_all_but_random(gm, predicate, why):
        return 0 if why == "random" else real_pin(gm, predicate, why)

    def check(gm):
        redrawn.append(real_check(gm))
        return redrawn[-1]

    monkeypatch.setattr(lorafuse.partition, "_pin", pin_all_but_random)
    monkeypatch.setattr(lorafuse.partition, "_random_ops_in", check)
    graph = _dropout_run(dropout_model, 0.0)  # r = 0 recomputes everything: dropout too
    assert any(redrawn), "no plan redrew a mask: the test is blind"
    if not all(redrawn):
        assert graph.activation_bytes < graph.default_activation_bytes
    else:
        assert "budget not applied" in graph.budget_note


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("value", [-0.1, 1.5, 2, float("nan"), float("inf"), True, "4GB",
                                   "lots", "-1GiB", [0.5]])
def test_bad_budget_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"lorafuse: memory_budget=.*(fraction|size)"):
        lorafuse.backend(memory_budget=value)
    with pytest.raises(ValueError, match="memory_budget"):
        lorafuse.Options.parse({"memory_budget": value})


def test_budget_forms():
    assert parse_memory_budget(None) is None
    assert parse_memory_budget(0) == ("fraction", 0.0)
    assert parse_memory_budget(1) == ("fraction", 1.0)
    assert parse_memory_budget(0.25) == ("fraction", 0.25)
    assert parse_memory_budget("4GiB") == ("bytes", 4 * 2**30)
    assert parse_memory_budget(" 1.5 GiB ") == ("bytes", 3 * 2**29)
    assert parse_memory_budget("512MiB") == ("bytes", 2**29)
    assert parse_memory_budget("auto") == parse_memory_budget(" Auto ") == lorafuse.partition.AUTO
    from lorafuse.backend import Options

    assert Options.parse({}).memory_budget == "auto"  # the default


@pytest.mark.slow
@pytest.mark.parametrize("free_gib", [1.0, 45e-6])
def test_auto_budget_applies_only_when_the_plan_would_not_fit(runs, monkeypatch, free_gib):
    """memory_budget='auto' (the default): min-cut's plan while its activations fit in the
    memory "auto" allows (1 GiB: plenty for the tiny model; off the GPU it allows all,
    see the next test), else that many bytes become the budget, with a warning and the
    report saying so; the losses and gradients stay those of the plain plan (the module's
    no-budget run, same model and batches)."""
    import warnings

    limit = int(free_gib * 2**30)
    monkeypatch.setattr(lorafuse.partition, "_auto_budget_bytes",
                        lambda joint_inputs, reserve=0: limit)
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _train(make_tiny_model("llama", layers=LAYERS, seed=3), "auto")
    want = runs[None]
    plain, auto = partitioned_graph(want), partitioned_graph(got)
    said = [str(w.message) for w in caught if "would not fit" in str(w.message)]
    fits = limit >= plain.activation_bytes
    assert fits == (free_gib == 1.0), (limit, plain.activation_bytes)  # both branches run
    if fits:
        assert auto.activation_bytes == plain.activation_bytes and auto.memory_budget is None
        assert not said
    else:
        assert auto.memory_budget.startswith("auto (") and auto.budget_bytes == limit
        assert auto.activation_bytes <= limit < plain.activation_bytes
        assert said and "memory_budget=None" in said[0] and "checkpoint_layers=True" in said[0]
    _assert_same_training(got, want, f"auto {free_gib}")


def test_torch_ratio_mapping():
    """lorafuse's target (activation bytes) as torch's activation_memory_budget r, which
    bounds inputs + r (default − inputs): see partition._torch_ratio."""
    assert _torch_ratio(target=100, default_act=100, unsaved_inputs=0) == 1.0
    assert _torch_ratio(target=50, default_act=100, unsaved_inputs=0) == 0.5
    assert _torch_ratio(target=50, default_act=100, unsaved_inputs=20) == pytest.approx(30 / 80)
    assert _torch_ratio(target=10, default_act=100, unsaved_inputs=20) == 0.0
    assert _torch_ratio(target=10, default_act=100, unsaved_inputs=200) == 0.0  # torch's dead zone


def test_cache_key_follows_the_budget():
    def uuid(**kw):
        return LorafusePartitioner(asdict(lorafuse.Options(**kw))).uuid()

    keys = [uuid(), uuid(memory_budget=1.0), uuid(memory_budget=0.5), uuid(memory_budget="1GiB")]
    assert len(set(keys)) == len(keys)
    assert uuid(memory_budget=0.5) == uuid(memory_budget=0.5)
    part = LorafusePartitioner(asdict(lorafuse.Options(memory_budget=0.5)), report=object())
    state = part.__getstate__()
    assert state["_report"] is None and len(pickle.dumps(state)) < 400


def test_lorafuse_elementwise_ops_are_cheap_to_recompute():
    """Tier 1 recomputes norms, rope and activations: lorafuse's fused forms of them too;
    its matmul-shaped ops (LoRA, 4-bit linear, fused loss) stay expensive."""
    import lorafuse.kernels.gated_mlp  # noqa: F401  (register the ops)
    import lorafuse.kernels.lora  # noqa: F401
    import lorafuse.kernels.norm  # noqa: F401
    import lorafuse.kernels.rope  # noqa: F401
    from lorafuse.partition import _is_expensive

    g = torch.fx.Graph()

    def node(target):
        return g.call_function(target, ())

    ops = torch.ops.lorafuse
    import lorafuse.kernels.norm  # noqa: F401  (registers layer_norm)

    cheap = (ops.rope, ops.gated_mlp, ops.rms_norm, ops.layer_norm)
    assert not any(_is_expensive(node(op.default)) for op in cheap)
    assert _is_expensive(node(ops.lora_linear.default))
    assert _is_expensive(node(torch.ops.aten.mm.default))
    assert not _is_expensive(node(torch.ops.aten.mul.Tensor))


def test_recompute_free_with_a_budget_warns_that_the_budget_applies():
    from lorafuse.backend import Options

    with pytest.warns(UserWarning, match="recompute_free is not used with a memory_budget"):
        Options.parse({"recompute_free": True, "memory_budget": 0.5})


@pytest.mark.parametrize("cap", [1.0, 0.1])
def test_auto_budget_reads_free_gpu_memory_and_a_process_cap(monkeypatch, cap):
    """What "auto" allows: 70 % of the driver's free memory plus the allocator's unused
    reserve, within a set_per_process_memory_fraction cap; nothing off the GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gib = 2**30
    for name, value in (("is_available", lambda: True),
                        ("mem_get_info", lambda d: (10 * gib, 80 * gib)),
                        ("memory_reserved", lambda d: 3 * gib),
                        ("memory_allocated", lambda d: 1 * gib),
                        ("get_per_process_memory_fraction", lambda d: cap)):
        monkeypatch.setattr(torch.cuda, name, value)
    with FakeTensorMode():
        on_gpu = [[torch.empty(2, device="cuda")], []]
        on_cpu = [[torch.empty(2)], []]
    got = lorafuse.partition._auto_budget_bytes(on_gpu)
    want = 12 * gib if cap == 1.0 else 8 * gib - 1 * gib  # free + unused reserve; cap − used
    assert got == int(lorafuse.partition.AUTO_FRACTION * want)
    assert lorafuse.partition._auto_budget_bytes(on_cpu) is None
    # what the step will allocate outside the plan (fp8_dx's weight copies) comes off first
    reserved = lorafuse.partition._auto_budget_bytes(on_gpu, reserve=2 * gib)
    assert reserved == int(lorafuse.partition.AUTO_FRACTION * (want - 2 * gib))


def test_fp8_copies_counted_once_per_persistent_weight(monkeypatch):
    """``_fp8_copies_to_make``: one byte an element of each graph-input weight (through
    views) of a LoRA op with fp8_dx, each weight once, grouped ops' lists too; not a weight
    cast every step (a temporary), not ops without the option or with fp8_copies=False
    (their casts are temporaries too); less what is cached."""
    import torch.fx as fx

    from lorafuse.kernels import fp8_dx
    from lorafuse.kernels import lora, lora_group  # noqa: F401  (registers the ops)

    aten, ops = torch.ops.aten, torch.ops.lorafuse
    g = fx.Graph()

    def ph(name, *shape):
        n = g.placeholder(name)
        n.meta["val"] = torch.empty(*shape, dtype=torch.bfloat16, device="meta")
        return n

    x, a, b = ph("x", 8, 32), ph("a", 4, 32), ph("b", 64, 4)
    w1, w2, w3, w4, w5 = ph("w1", 32, 64), ph("w2", 16, 32), ph("w3", 48, 32), ph("w4", 64, 32), \
        ph("w5", 64, 32)
    w6 = ph("w6", 64, 32)
    w1t = g.call_function(aten.t.default, (w1,))  # GPT-2's Conv1D weight: a view
    cast = g.call_function(aten._to_copy.default, (w5,), {"dtype": torch.bfloat16})
    on = {"fp8_dx": True}
    g.call_function(ops.lora_linear.default, (x, w1t, None, a, b, 1.0, None), on)
    g.call_function(ops.lora_linear.default, (x, w1t, None, a, b, 1.0, None), on)  # again
    g.call_function(ops.lora_linear_group.default, (x, [w2, w3], [None, None], [a, a], [b, b],
                                                     [1.0, 1.0]), on)
    g.call_function(ops.lora_linear.default, (x, w4, None, a, b, 1.0, None))  # no fp8_dx
    g.call_function(ops.lora_linear.default, (x, cast, None, a, b, 1.0, None), on)
    g.call_function(ops.lora_linear.default, (x, w6, None, a, b, 1.0, None),
                    {"fp8_dx": True, "fp8_copies": False})
    gm = fx.GraphModule(torch.nn.Module(), g)
    fp8_dx.weight_cache.clear()
    want = 32 * 64 + 16 * 32 + 48 * 32
    assert lorafuse.partition._fp8_copies_to_make(gm) == want
    monkeypatch.setattr(fp8_dx.weight_cache, "nbytes", lambda: 1000)
    assert lorafuse.partition._fp8_copies_to_make(gm) == want - 1000
