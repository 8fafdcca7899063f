"""Whole tiny models, trained a few steps eagerly and under ``backend="lorafuse"`` (fp32).

What correct means here (DESIGN.md): at every step the loss and every LoRA gradient
agree with eager PyTorch on the same inputs and parameters, and the LoRA pass rewrote
every PEFT ``lora.Linear`` site. CPU compiles cost tens of seconds each, so each model
is compiled once: ``_run(arch)`` trains the eager and the compiled copy side by side,
records everything, and the tests below only inspect the record.

Tolerances. Both sides compute in fp32; Inductor fuses and reorders reductions (norms,
softmax, the loss) and the fused op sums ``x Wᵀ + s·(x Aᵀ) Bᵀ`` in another order, so
results on the same parameters differ by a few ulps (measured: losses ≤ 1e-7 relative,
LoRA gradients ≤ 3e-6 relative). Two comparisons per step:
- same parameters: before each compiled step, the very same module runs eagerly; loss
  rtol 1e-5 / atol 1e-6, gradients ‖g − g_eager‖ ≤ 1e-4 ‖g_eager‖ per tensor.
- trajectory: an eager copy trained on its own. Losses as above. Gradients are checked
  at 1e-3: AdamW's per-element m/√v step turns those ulps into larger parameter
  differences wherever a gradient element is tiny (measured on Qwen2: same-parameter
  gradient errors stay ≤ 2e-6 at every step while the parameters drift 1.4e-5 apart
  after one step and the trajectories' gradients 1.5e-4 apart after four).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import lorafuse
from conftest import ARCHS, VOCAB, assert_close_fp32, lora_params, lora_sites, make_tiny_model
from conftest import examples, randomize_lora, reset_dynamo, run_once

pytestmark = pytest.mark.slow

STEPS = 5
BATCH, SEQ = 2, 16
LR = 1e-2
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_RTOL = 1e-4  # same parameters
TRAJ_GRAD_RTOL = 1e-3  # independently trained copies (AdamW amplification, see above)
RANKS = {"llama": 4, "mistral": 8, "qwen2": 6, "gemma2": 4, "gpt2": 8}  # r, per arch
DYNAMIC_SEQS = (12, 20)  # Llama continues with these after the static steps


# --------------------------------------------------------------------------- helpers


def make_batch(seq: int, seed: int, pad: int = 0) -> dict:
    """Random token ids, labels = ids; with ``pad`` > 0 the second row is left-padded by
    ``pad`` tokens (attention_mask 0, label -100: with causal attention, right padding
    would change nothing). attention_mask is always passed, so padded and unpadded
    batches share one compiled graph."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, seq), generator=g)
    mask = torch.ones(BATCH, seq, dtype=torch.long)
    if pad:
        mask[1, :pad] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_grads_close(got: dict, want: dict, what: str = "", rtol: float = GRAD_RTOL) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        assert torch.isfinite(got[name]).all(), f"{what} non-finite gradient of {name}"
        assert g.norm() > 0, f"{what} eager gradient of {name} is zero: the test would be blind"
        err = rel_err(got[name], g)
        assert err <= rtol, f"{what} gradient of {name}: relative error {err:.2e}"


@dataclass
class Trainer:
    """One model copy and its optimizer; ``fwd`` is the model itself or its compiled form.
    With ``reference=True`` each step first runs the same module eagerly on the same
    parameters and records that loss and those gradients too."""

    model: torch.nn.Module
    fwd: object
    reference: bool = False
    opt: torch.optim.Optimizer = None
    losses: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    ref_losses: list = field(default_factory=list)
    ref_grads: list = field(default_factory=list)

    def __post_init__(self):
        self.opt = torch.optim.AdamW(lora_params(self.model).values(), lr=LR)

    def step(self, batch: dict) -> None:
        if self.reference:
            out = self.model(**batch)  # the module itself: eager
            out.loss.backward()
            self.ref_losses.append(out.loss.detach().clone())
            self.ref_grads.append({n: p.grad.detach().clone()
                                   for n, p in lora_params(self.model).items()})
            self.opt.zero_grad(set_to_none=True)
        out = self.fwd(**batch)
        out.loss.backward()
        self.losses.append(out.loss.detach().clone())
        self.grads.append({n: p.grad.detach().clone() for n, p in lora_params(self.model).items()})
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


@dataclass
class Run:
    arch: str
    sites: int
    eager: Trainer
    compiled: Trainer
    batches: list
    graphs_after: list = field(default_factory=list)  # unique_graphs after each step
    lora_count: int = 0  # counters["lorafuse"]["lora"] after the first step
    lora_skipped: int = 0
    masked_vs_unmasked: tuple = ()  # eager loss of one padded batch with / without its mask
    final_lora_count: int = 0  # counters["lorafuse"]["lora"] after the last step
    warnings: list = field(default_factory=list)  # lorafuse's warnings (fallbacks)
    moved: float = 0.0  # ‖θ_final − θ_0‖ / ‖θ_0‖ of the compiled copy's LoRA parameters


_RUNS: dict = {}


def _run(arch: str) -> Run:
    """Train eager and compiled copies of one tiny model side by side, once per arch."""
    return run_once(_RUNS, arch, lambda: _train(arch))


def _train(arch: str) -> Run:
    reset_dynamo()  # earlier runs' frames must not count here (nor use the recompile limit)
    model = make_tiny_model(arch, r=RANKS[arch], lora_alpha=2 * RANKS[arch], seed=1)
    eager_model, comp_model = copy.deepcopy(model), copy.deepcopy(model)
    compiled = torch.compile(comp_model, backend="lorafuse")
    run = Run(arch, lora_sites(model), Trainer(eager_model, eager_model),
              Trainer(comp_model, compiled, reference=True), [])
    # A new batch every step; odd steps are left-padded (a padding attention mask).
    run.batches = [make_batch(SEQ, seed=10 + i, pad=5 * (i % 2)) for i in range(STEPS)]
    if arch == "llama":  # dynamic shapes: two more steps at other sequence lengths
        run.batches += [make_batch(s, seed=20 + s, pad=3) for s in DYNAMIC_SEQS]
    for i, batch in enumerate(run.batches):
        run.eager.step(batch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run.compiled.step(batch)
        run.warnings += [str(w.message) for w in caught if "lorafuse" in str(w.message)]
        run.graphs_after.append(counters["stats"]["unique_graphs"])
        if i == 0:
            run.lora_count = counters["lorafuse"]["lora"]
            run.lora_skipped = counters["lorafuse"]["lora_skipped"]
    padded = run.batches[1]
    with torch.no_grad():
        unmasked = {**padded, "attention_mask": torch.ones_like(padded["attention_mask"])}
        run.masked_vs_unmasked = (eager_model(**padded).loss, eager_model(**unmasked).loss)
    run.final_lora_count = counters["lorafuse"]["lora"]
    theta0, theta = lora_params(model), lora_params(comp_model)
    run.moved = (torch.cat([(theta[n] - theta0[n]).flatten() for n in theta]).norm()
                 / torch.cat([p.flatten() for p in theta0.values()]).norm()).item()
    reset_dynamo()
    return run


# --------------------------------------------------------------------------- every architecture


@pytest.mark.parametrize("arch", ARCHS)
def test_every_lora_site_is_fused(arch):
    run = _run(arch)
    assert not run.warnings, f"{arch}: lorafuse fell back: {run.warnings}"
    assert run.graphs_after[0] == 1, f"{arch}: graph breaks ({run.graphs_after[0]} graphs)"
    assert run.lora_count == run.sites, f"{arch}: {run.lora_count} of {run.sites} LoRA sites fused"
    assert run.lora_skipped == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_losses_match_eager_every_step(arch):
    run = _run(arch)
    got = torch.stack(run.compiled.losses)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.stack(run.compiled.ref_losses), **LOSS_TOL)
    torch.testing.assert_close(got, torch.stack(run.eager.losses), **LOSS_TOL)
    assert run.moved > 0.05, f"LoRA parameters moved only {run.moved:.1e}: steps too timid"


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_grads_match_eager_every_step(arch):
    run = _run(arch)
    assert len(run.compiled.grads) == len(run.batches)
    for step, got in enumerate(run.compiled.grads):
        assert_grads_close(got, run.compiled.ref_grads[step], f"{arch} step {step}:")
        assert_grads_close(got, run.eager.grads[step], f"{arch} step {step} (trajectory):",
                           rtol=TRAJ_GRAD_RTOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_recompile_across_static_steps(arch):
    run = _run(arch)
    assert run.graphs_after[:STEPS] == [1] * STEPS


# --------------------------------------------------------------------------- Llama extras


def test_padding_attention_mask_llama():
    run = _run("llama")
    masked, unmasked = run.masked_vs_unmasked
    assert abs(masked - unmasked) > 1e-4, "the padding mask did not change the loss: test is blind"
    for step in range(1, STEPS, 2):  # the padded batches
        assert run.batches[step]["attention_mask"].eq(0).any()
        torch.testing.assert_close(run.compiled.losses[step], run.eager.losses[step], **LOSS_TOL)
        assert_grads_close(run.compiled.grads[step], run.compiled.ref_grads[step],
                           f"padded step {step}:")


def test_dynamic_sequence_lengths_llama():
    """Lengths 16 (five steps), 12, 20: the first new length recompiles once with the
    sequence dimension dynamic; the next one reuses that graph. Every graph is fully
    rewritten (sizes are symbolic there) and losses still equal eager."""
    run = _run("llama")
    static, first_new, second_new = run.graphs_after[STEPS - 1], run.graphs_after[STEPS], \
        run.graphs_after[STEPS + 1]
    assert static == 1
    assert first_new <= 2, "a new sequence length compiled more than one graph"
    assert second_new == first_new, "a third sequence length recompiled: dims not dynamic"
    assert run.final_lora_count == run.sites * first_new, "the dynamic graph was not fully fused"
    for step in (STEPS, STEPS + 1):
        assert run.batches[step]["input_ids"].shape[1] == DYNAMIC_SEQS[step - STEPS]
        torch.testing.assert_close(run.compiled.losses[step], run.eager.losses[step], **LOSS_TOL)
        assert_grads_close(run.compiled.grads[step], run.compiled.ref_grads[step], f"step {step}:")


def test_lora_dropout_training_llama(fresh_dynamo):
    """lora_dropout=0.1 in training mode: the dropout stays outside the fused op (the op
    takes dropout(x) as a separate input), so every site still matches.

    RNG alignment: with ``torch._inductor.config.fallback_random = True`` Inductor calls
    the same ATen random ops as eager, in graph order, so after ``torch.manual_seed`` the
    dropout masks equal eager's. We therefore compare directly against eager PyTorch
    (stronger than comparing against plain ``backend="inductor"``) in training mode, and
    check that dropout is live (another seed gives another loss)."""
    model = make_tiny_model("llama", layers=1, lora_dropout=0.1, seed=2)
    eager_model, comp_model = copy.deepcopy(model), copy.deepcopy(model)
    batch = make_batch(SEQ, seed=3)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(comp_model, backend="lorafuse")
        eager, comp = Trainer(eager_model, eager_model), Trainer(comp_model, compiled)
        for step in range(2):
            torch.manual_seed(100 + step)
            eager.step(batch)
            torch.manual_seed(100 + step)
            comp.step(batch)
    assert counters["lorafuse"]["lora"] == lora_sites(model) == 7
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(torch.stack(comp.losses), torch.stack(eager.losses), **LOSS_TOL)
    for step in range(2):  # step 1 follows one AdamW step on each side: a trajectory
        assert_grads_close(comp.grads[step], eager.grads[step], f"dropout step {step}:",
                           rtol=GRAD_RTOL if step == 0 else TRAJ_GRAD_RTOL)
    with torch.no_grad():
        torch.manual_seed(999)
        other_seed = eager_model(**batch).loss
        eager_model.eval()
        no_dropout = eager_model(**batch).loss
    assert abs(other_seed - no_dropout) > 1e-5, "dropout had no effect: the test is blind"


# --------------------------------------------------------------------------- sites left alone


def _left_alone_model(case: str):
    from peft import LoraConfig

    if case == "dora":
        return make_tiny_model("llama", layers=1, use_dora=True,
                               target_modules=["q_proj", "v_proj"])
    if case == "embedding":
        return make_tiny_model("llama", layers=1, target_modules=["embed_tokens", "q_proj"])
    assert case == "two_adapters"
    model = make_tiny_model("llama", layers=1, target_modules=["q_proj", "v_proj"])
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"],
                                           lora_dropout=0.0))
    model.base_model.set_adapter(["default", "second"])  # both active (and trainable)
    randomize_lora(model, seed=5)
    return model


# case → (reason that must be given, sites that may still be fused)
LEFT_ALONE = {
    "dora": ("DoRA", 0),
    "embedding": ("LoRA on an embedding", 1),  # q_proj is an ordinary site
    "two_adapters": ("several active adapters", 2),  # v_proj (default), o_proj (second)
}


@pytest.mark.parametrize("case", list(LEFT_ALONE))
def test_sites_left_alone_with_reason(case, fresh_dynamo):
    reason, fusable = LEFT_ALONE[case]
    model = _left_alone_model(case)
    batch = make_batch(SEQ, seed=4)
    report = lorafuse.explain(model, **batch)
    totals = report.totals()
    skipped = [(site, why) for g in report.graphs for p in g.passes for site, why in p.skipped]
    assert totals.get("lora", 0) == fusable, str(report)
    assert skipped, f"{case}: nothing reported as left alone\n{report}"
    assert any(reason in why for _, why in skipped), f"{case}: reason missing\n{report}"
    assert all(why for _, why in skipped)
    if case != "dora":  # DoRA graph-breaks inside PEFT: names there are frame-local
        assert all(not site.startswith("L_") for site, _ in skipped), \
            f"{case}: unreadable site names\n{report}"

    # Compiled (whatever was left alone stays as PEFT wrote it) still equals eager.
    reset_dynamo()
    eager_model, comp_model = copy.deepcopy(model), copy.deepcopy(model)
    eager, comp = Trainer(eager_model, eager_model), \
        Trainer(comp_model, torch.compile(comp_model, backend="lorafuse"))
    eager.step(batch)
    comp.step(batch)
    assert counters["lorafuse"]["lora"] == fusable
    torch.testing.assert_close(comp.losses[0], eager.losses[0], **LOSS_TOL)
    assert_grads_close(comp.grads[0], eager.grads[0], f"{case}:")


def test_dynamic_true_runtime_scale_is_fused(fresh_dynamo):
    """torch.compile(dynamic=True) passes PEFT's float scaling as a graph input (a 0-d tensor
    read with item()): the sites are still fused, the scale folded into B at run time, and
    losses and every LoRA gradient equal eager's, with specialize_float or without."""
    from lorafuse.report import Report

    model = make_tiny_model("llama", layers=1, target_modules=["q_proj", "k_proj", "down_proj"])
    batch = make_batch(SEQ, seed=4)
    eager = copy.deepcopy(model)
    want = eager(**batch).loss
    want.backward()
    want_grads = {n: p.grad for n, p in lora_params(eager).items()}
    for specialize in (False, True):
        reset_dynamo()
        comp = copy.deepcopy(model)
        report = Report()
        compiled = torch.compile(comp, dynamic=True, backend=_collecting_backend(report))
        with torch._dynamo.config.patch(specialize_float=specialize), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = compiled(**batch).loss
            got.backward()
        # Dynamo's restart (floats turned into tensors) is not a failed compile to fall back from
        assert not [w for w in caught if "plain Inductor" in str(w.message)]
        torch.testing.assert_close(got, want, **LOSS_TOL)
        assert_grads_close({n: p.grad for n, p in lora_params(comp).items()}, want_grads,
                           f"specialize_float={specialize}:")
        skipped = [why for g in report.graphs for p in g.passes if p.name == "lora"
                   for _, why in p.skipped]
        assert report.totals().get("lora", 0) == 3 and not skipped, str(report)


def test_gradient_checkpointing_reason_and_warning(fresh_dynamo):
    """HF gradient checkpointing (TRL's default) puts the layers inside checkpoint regions,
    where no site can be fused: the report says why and what to do, and a warning too."""
    from lorafuse.kernels import _dispatch
    from lorafuse.passes.lora import CHECKPOINT_REASON
    from lorafuse.report import Report

    model = make_tiny_model("llama", layers=1, target_modules=["q_proj", "down_proj"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = make_batch(SEQ, seed=4)
    want = copy.deepcopy(model)(**batch).loss
    report = Report()
    _dispatch.warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(model, backend=_collecting_backend(report))(**batch).loss
    torch.testing.assert_close(got, want, **LOSS_TOL)
    skipped = [why for g in report.graphs for p in g.passes if p.name == "lora"
               for _, why in p.skipped]
    assert report.totals().get("lora", 0) == 0 and len(skipped) == 2, str(report)
    assert all(why == CHECKPOINT_REASON for why in skipped), str(report)
    assert sum("gradient_checkpointing=False" in str(w.message) for w in caught) == 1


def _collecting_backend(report):
    def backend(gm, example_inputs):
        return lorafuse.lorafuse_backend(gm, example_inputs, _collect=report)
    return backend


# --------------------------------------------------------------------------- property test


class TwoLayer(torch.nn.Module):
    """``down(gelu(up(x)))``: PEFT wraps both linears; ``up``'s LoRA reads the model input."""

    def __init__(self, k, n, bias):
        super().__init__()
        self.up = torch.nn.Linear(k, n, bias=bias)
        self.down = torch.nn.Linear(n, k, bias=bias)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@settings(max_examples=examples(10, ci=5), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(3, 40), n=st.integers(3, 40), r=st.integers(1, 8),
       bias=st.booleans(), alpha=st.sampled_from([1, 8, 24]), rslora=st.booleans(),
       lead=st.sampled_from([(5,), (2, 7), (1, 3, 4)]))
def test_peft_linear_shapes_property(k, n, r, bias, alpha, rslora, lead):
    """Real PEFT ``lora.Linear`` layers over drawn sizes, ranks, scalings, bias and input
    ranks: output and the gradients of x, A and B equal eager; both sites fused."""
    from peft import LoraConfig, get_peft_model

    reset_dynamo()
    torch.manual_seed(k * 1000 + n * 10 + r)
    model = get_peft_model(TwoLayer(k, n, bias), LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["up", "down"]))
    randomize_lora(model)
    comp_model = copy.deepcopy(model)
    x = torch.randn(*lead, k)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = model(xe)
    yc = torch.compile(comp_model, backend="lorafuse")(xc)
    assert counters["lorafuse"]["lora"] == 2
    assert_close_fp32(yc, ye, what="output")
    dy = torch.randn_like(ye)
    ye.backward(dy)
    yc.backward(dy)
    assert_close_fp32(xc.grad, xe.grad, what="dx")
    ge = {name: p.grad for name, p in lora_params(model).items()}
    gc = {name: p.grad for name, p in lora_params(comp_model).items()}
    assert_grads_close(gc, ge, f"k={k} n={n} r={r}:")
    reset_dynamo()


@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.sampled_from([(3, 1), (4, 4), (6, 2)]), head_dim=st.sampled_from([4, 8]),
       intermediate=st.integers(17, 90), r=st.integers(1, 8), bias=st.booleans(),
       seq=st.integers(3, 20))
def test_llama_configs_property(heads, head_dim, intermediate, r, bias, seq):
    """One Llama layer over drawn head layouts (MHA, GQA, MQA), odd sizes, ranks and
    biases: every site fused, loss and LoRA gradients equal eager on the same step."""
    n_heads, n_kv = heads
    reset_dynamo()
    model = make_tiny_model("llama", layers=1, r=r, lora_alpha=16, seed=r + seq,
                            hidden_size=n_heads * head_dim, num_attention_heads=n_heads,
                            num_key_value_heads=n_kv, head_dim=head_dim,
                            intermediate_size=intermediate, attention_bias=bias, mlp_bias=bias)
    comp_model = copy.deepcopy(model)
    eager, comp = Trainer(model, model), \
        Trainer(comp_model, torch.compile(comp_model, backend="lorafuse"))
    batch = make_batch(seq, seed=seq, pad=min(2, seq - 1))
    eager.step(batch)
    comp.step(batch)
    assert counters["lorafuse"]["lora"] == lora_sites(model) == 7
    torch.testing.assert_close(comp.losses[0], eager.losses[0], **LOSS_TOL)
    assert_grads_close(comp.grads[0], eager.grads[0], f"heads={heads} r={r}:")
    reset_dynamo()
