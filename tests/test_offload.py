"""The ``offload_activations`` option: saved activations kept in CPU memory between the
forward and the backward (partition.offload_saved, kernels/offload.py).

On CPU there is nothing to gain, but the graphs are rewritten the same way (the ops copy),
so these tests check the rewrite: what is offloaded (by the size threshold, set to 0 here
so the tiny model has candidates), that every offloaded tensor is reloaded before its first
use with the next ``offload_prefetch`` ones prefetched, the report, and that the losses and LoRA gradients equal
the run without offloading (values are only moved). The CUDA path (side stream, pinned
memory, prefetch) is tests/test_cuda.py's.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch

import lorafuse
import lorafuse.partition
from lorafuse.kernels import offload
from lorafuse.kernels._ops import is_op

from conftest import VOCAB, lorafuse_sgd_run, make_tiny_model

STEPS, BATCH, SEQ, LR = 2, 2, 16, 0.5
PREFETCH = 2  # reloads ahead: more than the default one, so the list's bounds are tested


def _batch(step):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


def _train(model, **options):
    return lorafuse_sgd_run(model, [_batch(s) for s in range(STEPS)], LR, options)


@pytest.fixture(scope="module")
def runs():
    base = make_tiny_model("llama", seed=3)
    graphs = {}
    real = lorafuse.partition.offload_saved

    def spy(fwd, bwd, *args, **kwargs):  # keep the rewritten graphs to inspect
        plan = real(fwd, bwd, *args, **kwargs)
        graphs.setdefault("capturable" if plan["capturable"] else "eager", {}).update(
            fwd=fwd, bwd=bwd, plan=plan)
        return plan

    mp = pytest.MonkeyPatch()
    mp.setattr(lorafuse.partition, "OFFLOAD_MIN_BYTES", 0)
    mp.setattr(lorafuse.partition, "offload_saved", spy)
    try:
        with torch._functorch.config.patch(enable_autograd_cache=False):
            out = {"plain": _train(copy.deepcopy(base)),
                   # under CUDA graphs with Inductor's graph partition asked for (the
                   # backend's default turns it off; on CPU nothing is graphed, but the
                   # partitioned code runs); before "offload", whose graphs the spy keeps
                   "offload_cg": _train(copy.deepcopy(base), offload_activations=True,
                                        inductor={"triton.cudagraphs": True,
                                                  "graph_partition": True}),
                   "offload": _train(copy.deepcopy(base), offload_activations=True,
                                     offload_prefetch=PREFETCH)}
    finally:
        mp.undo()
    out["graphs"] = graphs
    return out


def _calls(gm, name):
    """The graph's calls of lorafuse's op ``name`` (compiled graphs call its runtime twin)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and is_op(n.target, name)]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["offload", "offload_cg"])
def test_losses_and_lora_grads_equal_no_offload(runs, run):
    # The values are only moved, but a tensor offloaded through a permutation (attention's
    # (B, H, S, D) views) comes back in its traced layout, and Inductor's kernels around it
    # may then sum in another order: equal to fp32 rounding, not always bitwise.
    got, want = runs[run], runs["plain"]
    for step in range(STEPS):
        torch.testing.assert_close(got["losses"][step], want["losses"][step], rtol=1e-6, atol=0)
        assert got["grads"][step].keys() == want["grads"][step].keys()
        for name, g in want["grads"][step].items():
            assert g.norm() > 0, name
            err = ((got["grads"][step][name] - g).norm() / g.norm()).item()
            print(f"step {step} {name}: relative error {err:.1e}")
            assert err <= 1e-5, (step, name, err)


@pytest.mark.slow
def test_every_offloaded_tensor_is_reloaded_before_use_with_the_next_prefetched(runs):
    g = runs["graphs"]["eager"]
    fwd, bwd, plan = g["fwd"], g["bwd"], g["plan"]
    offloads = _calls(fwd, "offload")
    reloads = _calls(bwd, "reload")
    assert len(plan["names"]) == len(offloads) == len(reloads) > 0
    # each offload reads its source, or a contiguous permutation of it (attention's
    # (B, H, S, D) views), and feeds only the forward's output
    sources = {}
    for node in offloads:
        src = node.args[0]
        if src.target is torch.ops.aten.permute.default:
            assert src.meta["val"].is_contiguous()
            src = src.args[0]
        assert src.name in plan["names"]
        assert [u.op for u in node.users] == ["output"]
        sources[node.name] = src.meta["val"]
    permuted = [n for n in offloads if n.args[0].target is torch.ops.aten.permute.default]
    assert permuted, "no permuted tensor offloaded: the tiny model should have some"
    # reloads in backward order: reload i prefetches the CPU tensors reloads i + 1 to
    # i + PREFETCH read
    order = {n: i for i, n in enumerate(bwd.graph.nodes)}
    reloads.sort(key=order.__getitem__)
    for i, node in enumerate(reloads):
        cpu, device, nxt = node.args
        assert cpu.op == "placeholder" and cpu.meta["val"].device.type == "cpu"
        assert list(nxt) == [r.args[0] for r in reloads[i + 1:i + 1 + PREFETCH]]
        first_use = min(node.users, key=order.__getitem__)
        assert order[node] < order[first_use]
        # what the backward reads has the saved tensor's shape and strides again
        value = node
        if len(node.users) == 1 and first_use.target is torch.ops.aten.permute.default:
            value = first_use
        want = sources[cpu.name]
        assert value.meta["val"].shape == want.shape
        assert value.meta["val"].stride() == want.stride()
    # nothing in the backward reads an offloaded tensor's old placeholder
    names = {n.name for n in bwd.graph.find_nodes(op="placeholder")}
    assert not names & set(plan["names"])


@pytest.mark.slow
def test_under_cuda_graphs_the_forward_returns_tokens_joined_once(runs):
    """Compiled for CUDA graphs (``offload_cg``), the capturable ops: no CPU tensor leaves
    the forward (every offload returns a token on the activation's device), one
    ``offload_join`` of all the tokens comes last and its tokens are what the forward
    saves, and the backward reloads each from its token, with the saved tensor's shape
    and dtype, before its first use, prefetching the next one."""
    g = runs["graphs"]["capturable"]
    fwd, bwd, plan = g["fwd"], g["bwd"], g["plan"]
    assert plan["capturable"]
    offloads = _calls(fwd, "offload_capturable")
    (join,) = _calls(fwd, "offload_join")
    reloads = _calls(bwd, "reload_capturable")
    assert not _calls(fwd, "offload") and not _calls(bwd, "reload")
    assert len(plan["names"]) == len(offloads) == len(reloads) > 0
    assert list(join.args[0]) == offloads
    order = {n: i for i, n in enumerate(fwd.graph.nodes)}
    assert all(order[o] < order[join] for o in offloads)
    output = fwd.graph.find_nodes(op="output")[0]
    saved = [n for n in output.args[0] if getattr(n, "args", None) and n.args[0] is join]
    assert len(saved) == len(offloads)
    assert not set(offloads) & set(output.args[0])  # every token goes through the join
    assert all(set(o.users) == {join} for o in offloads)
    border = {n: i for i, n in enumerate(bwd.graph.nodes)}
    reloads.sort(key=border.__getitem__)
    for i, node in enumerate(reloads):
        token, shape, dtype, nxt = node.args
        assert token.op == "placeholder" and token.meta["val"].shape == (1,)
        assert token.meta["val"].dtype == torch.uint8
        assert list(node.meta["val"].shape) == list(shape) and node.meta["val"].dtype == dtype
        assert list(nxt) == [r.args[0] for r in reloads[i + 1:i + 2]]
        assert border[node] < min(border[u] for u in node.users)
    (graph,) = runs["offload_cg"]["report"].graphs
    assert graph.offload_capturable and "ops CUDA graphs can record" in graph.format()
    assert not offload._held, "a token's buffer outlived its graph"


def test_capturable_ops_copy_values_and_give_buffers_back():
    """On CPU tensors the capturable ops keep the CUDA path's bookkeeping: the value
    comes back from the token (through the join) with the shape and dtype given, a
    prefetched one too; an eager call's buffer returns to the free list at its reload,
    or when its token dies without one, and is reused by the next offload of that size."""
    ops = torch.ops.lorafuse
    offload._free_pinned.clear()
    xs = [torch.randn(3, 5), torch.randn(3, 5).to(torch.bfloat16)]
    tokens = ops.offload_join.default([ops.offload_capturable.default(x) for x in xs])
    assert all(t.shape == (1,) and t.dtype == torch.uint8 for t in tokens)
    assert len(offload._held) == 2
    back = ops.reload_capturable.default(tokens[0], [3, 5], torch.float32, [tokens[1]])
    assert torch.equal(back, xs[0])
    assert len(offload._token_prefetched) == 1
    back = ops.reload_capturable.default(tokens[1], [3, 5], torch.bfloat16, [])
    assert torch.equal(back, xs[1]) and not offload._token_prefetched
    assert not offload._held and sum(map(len, offload._free_pinned.values())) == 2
    buffers = {b.data_ptr() for bs in offload._free_pinned.values() for b in bs}
    token = ops.offload_join.default([ops.offload_capturable.default(xs[0])])[0]
    assert offload._held[token.data_ptr()].buffer.data_ptr() in buffers  # reused
    del token
    gc.collect()
    assert not offload._held and sum(map(len, offload._free_pinned.values())) == 2
    with pytest.raises(RuntimeError, match="forward copy is unknown"):
        ops.reload_capturable.default(torch.empty(1, dtype=torch.uint8), [3, 5],
                                      torch.float32, [])
    torch.library.opcheck(ops.offload_capturable.default, (xs[0],),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_report_shows_what_was_offloaded(runs):
    (graph,) = runs["offload"]["report"].graphs
    plan = runs["graphs"]["eager"]["plan"]
    assert graph.offloaded_tensors == len(plan["names"]) and graph.offloaded_bytes == plan["bytes"]
    text = graph.format()
    assert "offload_activations:" in text and "offloaded to CPU memory" in text
    (plain,) = runs["plain"]["report"].graphs
    assert plain.offloaded_tensors is None and "none offloaded" in plain.format()


def test_ops_copy_values_and_pass_opcheck():
    x = torch.randn(3, 5, 7)
    cpu = torch.ops.lorafuse.offload.default(x)
    assert cpu.device.type == "cpu" and torch.equal(cpu, x) and cpu.data_ptr() != x.data_ptr()
    back = torch.ops.lorafuse.reload.default(cpu, torch.device("cpu"), [])
    assert torch.equal(back, x) and back.data_ptr() != cpu.data_ptr()
    torch.library.opcheck(torch.ops.lorafuse.offload.default, (x,))
    torch.library.opcheck(torch.ops.lorafuse.reload.default, (cpu, torch.device("cpu"), [x]))


def test_offload_and_reload_are_cuda_graph_partition_boundaries():
    """Both ops, and the runtime twins Inductor compiles (kernels/_ops.py), carry
    ``cudagraph_unsafe``: under ``triton.cudagraphs`` Inductor's graph partition runs them
    between CUDA graphs, with their per-call host work (events, prefetches), not inside a
    replay that would skip it. Other ops are not tagged (they run inside the graphs)."""
    unsafe = getattr(torch.Tag, "cudagraph_unsafe", None)
    if unsafe is None:  # an older torch: nothing to tag with, and nothing tagged
        assert offload._GRAPH_UNSAFE == ()
        return
    for ns in ("lorafuse", "lorafuse_rt"):
        for name in ("offload", "reload"):
            assert unsafe in getattr(getattr(torch.ops, ns), name).default.tags, (ns, name)
        assert unsafe not in getattr(torch.ops, ns).lora_linear.default.tags


def test_prefetch_option_checked():
    assert lorafuse.Options.parse({"offload_prefetch": 3}).offload_prefetch == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="offload_prefetch"):
            lorafuse.Options.parse({"offload_prefetch": bad})


def test_reload_starts_each_prefetch_once(monkeypatch):
    """The CUDA reload's bookkeeping with the copies and the stream stubbed: a reload uses
    the copy an earlier reload started, starts the listed ones not started yet, and
    replaces a stale entry (another tensor at the same address) instead of trusting it."""
    started = []

    def copy_back(x, device):
        started.append(x)
        return ("gpu", x), "event"

    class Stream:
        def wait_event(self, event):
            assert event == "event"

    monkeypatch.setattr(offload, "_copy_back", copy_back)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(offload, "_prefetched", {})
    xs = [torch.randn(4) for _ in range(4)]
    dev = torch.device("cuda", 0)
    assert offload._reload_cuda(xs[0], dev, xs[1:3]) == ("gpu", xs[0])
    assert started == xs[:3]
    assert offload._reload_cuda(xs[1], dev, xs[2:4]) == ("gpu", xs[1])
    assert started == xs  # x1 and x2 were not copied again
    offload._prefetched[xs[3].data_ptr()] = (xs[3].clone(), ("gpu", "stale"), "event")
    assert offload._reload_cuda(xs[2], dev, xs[3:]) == ("gpu", xs[2])
    assert started == xs + [xs[3]]  # the stale entry was replaced
    assert offload._reload_cuda(xs[3], dev, []) == ("gpu", xs[3])
    assert not offload._prefetched


class _FakeCopy:
    """An event stand-in: finished or not, and whether the host waited on it."""

    def __init__(self, finished):
        self.finished, self.waited = finished, False

    def query(self):
        return self.finished

    def synchronize(self):
        self.waited = self.finished = True


def test_inflight_copies_are_bounded_oldest_first():
    """limit_inflight forgets finished copies without waiting, waits on the host for the
    oldest unfinished ones only while the bytes in flight exceed the limit, and never for
    the newest (the copy just issued)."""
    from collections import deque

    from lorafuse.kernels.offload import limit_inflight

    q = deque()
    a, b, c, d = _FakeCopy(True), _FakeCopy(False), _FakeCopy(False), _FakeCopy(False)
    limit_inflight(q, a, 100, 250)
    assert list(q) == [(a, 100)]  # the newest stays even when finished
    limit_inflight(q, b, 100, 250)
    assert [e for e, _ in q] == [b] and not a.waited  # a had finished: dropped, no wait
    limit_inflight(q, c, 100, 250)
    assert [e for e, _ in q] == [b, c] and not b.waited  # 200 in flight ≤ 250
    limit_inflight(q, d, 100, 250)  # 300 > 250: wait for the oldest only
    assert b.waited and not c.waited and not d.waited
    assert [e for e, _ in q] == [c, d]
    big = _FakeCopy(False)
    limit_inflight(q, big, 1000, 250)  # alone above the limit: everything older is waited on
    assert c.waited and d.waited and not big.waited and [e for e, _ in q] == [big]


def test_inflight_limit_from_the_environment():
    from lorafuse.kernels import offload

    assert offload._inflight_bytes(None) == 512 * 2**20
    assert offload._inflight_bytes("64") == 64 * 2**20
    for bad in ("lots", "0", "-5", "nan", "inf"):
        with pytest.warns(UserWarning, match="not a positive number of MiB"):
            assert offload._inflight_bytes(bad) == 512 * 2**20
    # the capturable ops' staged clones: their own default, the same variable
    assert offload._inflight_bytes(None, 64) == 64 * 2**20
    assert offload._inflight_bytes("300", 64) == 300 * 2**20
    with pytest.warns(UserWarning, match="using 64"):
        assert offload._inflight_bytes("0", 64) == 64 * 2**20


def test_warns_when_the_host_cannot_hold_the_offloaded_activations(monkeypatch,
                                                                   no_autograd_cache):
    """The offloaded bytes of a call live in pinned host memory until the backward: more
    than 90 % of the host's available memory is warned about at compile time, once."""
    from lorafuse.kernels import _dispatch

    monkeypatch.setattr(lorafuse.partition, "OFFLOAD_MIN_BYTES", 0)
    monkeypatch.setattr(_dispatch, "warned", set())
    monkeypatch.setattr(lorafuse.partition, "host_available_bytes", lambda: 2**10)
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            pytest.warns(RuntimeWarning, match=r"keeps .* GiB in pinned host memory per call; "
                                               r"the host has 0\.0 GiB available"):
        _train(make_tiny_model("llama", seed=3), offload_activations=True)
    monkeypatch.setattr(lorafuse.partition, "host_available_bytes", lambda: 2**40)
    monkeypatch.setattr(_dispatch, "warned", set())
    with torch._functorch.config.patch(enable_autograd_cache=False), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _train(make_tiny_model("llama", seed=3), offload_activations=True)


class _FakePinning:
    """Stands for cudaHostRegister / cudaHostUnregister / draining the side stream."""

    def __init__(self):
        self.pinned, self.unpinned, self.drained = [], [], []

    def pool(self):
        return offload.ExactPinnedPool(lambda a, n: self.pinned.append((a, n)),
                                       self.unpinned.append, self.drained.append)


def test_exact_pinned_only_where_rounding_would_waste_much(monkeypatch):
    """Session 10: an 8B layer input at 270,336 tokens is 2.06 GiB, which PyTorch's pinned
    allocator rounds to 4 GiB (128 GiB for 32 layers); 262,144 tokens, exactly 2 GiB, are
    left to it, as are small tensors, whose rounding costs little."""
    layer = 270_336 * 4096 * 2
    assert offload.rounding_waste(layer) > 0.9 and offload.wants_exact(layer)
    assert not offload.wants_exact(262_144 * 4096 * 2)  # a power of two
    assert not offload.wants_exact(33 * 2**20)  # below EXACT_MIN_BYTES
    assert offload.wants_exact(100 * 2**20) and not offload.wants_exact(120 * 2**20)
    monkeypatch.setenv(offload.EXACT_ENV, "0")
    assert not offload.wants_exact(layer)


def test_exact_pinned_buffers_are_reused_once_their_storage_dies():
    fake = _FakePinning()
    pool = fake.pool()
    a = pool.empty((3, 5), torch.bfloat16, 0)
    assert a.shape == (3, 5) and a.dtype == torch.bfloat16 and a.is_contiguous()
    a.copy_(torch.arange(15.0).view(3, 5))
    assert torch.equal(a.float(), torch.arange(15.0).view(3, 5))
    first = a.data_ptr()
    assert fake.pinned == [(first, 30)] and pool.pinned_bytes == 30
    view = a[1:]  # a view keeps the buffer: a second request pins another
    del a
    gc.collect()
    b = pool.empty((3, 5), torch.bfloat16, 0)
    assert b.data_ptr() != first and len(fake.pinned) == 2
    del view
    gc.collect()
    assert pool.free_bytes() == 30
    c = pool.empty((15,), torch.int16, 0)  # the same bytes: the same buffer, not pinned again
    assert c.data_ptr() == first and len(fake.pinned) == 2 and pool.free_bytes() == 0
    d = pool.empty((3, 5), torch.bfloat16, 1)  # another device's stream: its own buffers
    assert len(fake.pinned) == 3 and not fake.unpinned
    del b, c, d


def test_a_new_size_unpins_free_buffers_after_draining_their_copies():
    """Changing lengths would otherwise pin a new set of buffers every step."""
    fake = _FakePinning()
    pool = fake.pool()
    held = [pool.empty((n,), torch.float32, 0) for n in (10, 20, 30)]
    addresses = [t.data_ptr() for t in held]
    while held:  # freed in this order: 40, 80, then 120 bytes
        held.pop(0)
    gc.collect()
    assert pool.free_bytes() == 240
    big = pool.empty((25,), torch.float32, 0)  # 100 bytes: frees the two oldest (40 + 80 bytes)
    assert fake.drained == [0]
    assert fake.unpinned == addresses[:2]
    assert pool.free_bytes() == 120 and pool.pinned_bytes == 220
    del big


def test_staged_clones_retire_oldest_first_after_a_gpu_wait(monkeypatch):
    """The capturable offload's staged clones: past the byte limit the oldest ones are
    dropped, each after the compute stream waits on its copy's event (never the host), the
    newest is always kept, and an entry made in the other mode (a recording's, outside it;
    an eager one, inside a recording) is dropped without a wait that could not be made."""
    from collections import deque

    waited = []

    class Stream:
        def wait_event(self, event):
            waited.append(event)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(offload, "_staged", {0: deque(
        [("a", "ev_a", 100, False), ("b", "ev_b", 100, True), ("c", "ev_c", 100, False),
         ("d", "ev_d", 100, False)])})
    offload._retire_staged(0, 150)
    assert waited == ["ev_a", "ev_c"]  # b was a recording's: dropped, not waited on
    assert [e[0] for e in offload._staged[0]] == ["d"]
    offload._retire_staged(0, 0)
    assert [e[0] for e in offload._staged[0]] == ["d"]  # the newest stays
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    offload._staged[0].extendleft([("e", "ev_e", 100, True), ("f", "ev_f", 100, False)])
    waited.clear()
    offload._retire_staged(0, 100)
    assert waited == ["ev_e"] and [e[0] for e in offload._staged[0]] == ["d"]
