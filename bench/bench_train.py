"""Training-step throughput of PEFT LoRA on a Llama-shaped (or Qwen3-shaped) model, side by side.

    python bench/bench_train.py --shape 1b                      # eager, inductor, lorafuse
    python bench/bench_train.py --shape 8b --variants eager,eager_gc,inductor,lorafuse --ref
    python bench/bench_train.py --shape tiny --device cpu --variants eager,inductor

The step, the shapes and the peers are those of /work/shared/ANCHORS.md; bench/README.md
explains every column. Layout of one run:

  parent (no CUDA)                 prints progress to stderr, the tables to stdout (last)
    child "build"                  builds the random-init model once, saves it (bf16) to --cache
    child "train" per variant      loads it, trains warmup + steps, writes one JSON line
    child "ref"                    fp32 copy of the same parameters at the --ref-steps

Each child is its own process, so its peak memory and its compile caches are its own, and a
failure (exception, OOM, crash, timeout) costs only that row of the table.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Llama shapes (ANCHORS.md). Batch x sequence is the default workload of each shape.
SHAPES = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
               tie_word_embeddings=False, batch=2, seq=2048),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
               tie_word_embeddings=True, batch=4, seq=2048),
    # A few MB: for CPU smoke tests of this script, not a measurement.
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=344, vocab_size=4096,
                 tie_word_embeddings=True, batch=2, seq=128),
    # Qwen3-8B's shape: RMSNorms on each head of q and k (where the norm op alone beat
    # Inductor's 1.7-2.3 x on the GPU, session 31), 36 layers, a 151,936 vocab
    "qwen3-8b": dict(arch="qwen3", hidden_size=4096, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=12288,
                     vocab_size=151936, tie_word_embeddings=False, batch=2, seq=2048),
    "qwen3-tiny": dict(arch="qwen3", hidden_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=344,
                       vocab_size=4096, tie_word_embeddings=True, batch=2, seq=128),
}

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["eager", "eager_gc", "inductor", "aot_eager", "lorafuse", "unsloth", "unsloth_gc"]
N_BATCHES = 4  # fixed batches in rotation


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one_line(text: str, limit: int = 220) -> str:
    """An error message squeezed into one markdown table cell."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    s = " / ".join(lines[:2]).replace("|", "/")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def describe_error(exc: BaseException) -> str:
    name = type(exc).__name__
    msg = str(exc)
    if "out of memory" in msg.lower() or name == "OutOfMemoryError":
        first = msg.strip().splitlines()[0] if msg.strip() else ""
        return one_line(f"OOM: {first}")
    return one_line(f"{name}: {msg}")


# ----------------------------------------------------------------------------- shared


def model_config(args):
    """The shape's transformers config: LlamaConfig, or Qwen3Config for ``arch`` qwen3
    (head_dim hidden / heads, as Qwen3-8B's; its own norm eps and rope defaults)."""
    s = SHAPES[args.shape]
    common = dict(
        hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        intermediate_size=s["intermediate_size"], vocab_size=s["vocab_size"],
        tie_word_embeddings=s["tie_word_embeddings"], max_position_embeddings=8192,
        use_cache=False,
    )
    if s.get("arch") == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(head_dim=s["hidden_size"] // s["num_attention_heads"], **common)
    from transformers import LlamaConfig

    return LlamaConfig(rms_norm_eps=1e-5, **common)


def model_class(args):
    """The class that builds the shape's random model (loading goes through Auto*)."""
    if SHAPES[args.shape].get("arch") == "qwen3":
        from transformers import Qwen3ForCausalLM

        return Qwen3ForCausalLM
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


def flops_per_token(args) -> float:
    """LoRA training FLOPs per token (ANCHORS.md): 4 x matmul params (forward + input
    gradients; the frozen base gets no weight gradient) + causal attention, counted as
    3.5 x its forward 2*S*h per layer (forward 1, backward 2.5). 8B: 31.9 G, 1B: 5.41 G."""
    s = SHAPES[args.shape]
    h, f, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * f  # q, o; k, v; gate, up, down
    matmul_params = L * per_layer + h * V  # + lm_head
    attention = 3.5 * 2 * args.seq * h * L
    return 4 * matmul_params + attention


def model_dir(args) -> Path:
    return Path(args.cache) / args.shape


def make_batches(args, vocab_size: int) -> list[dict]:
    """N_BATCHES fixed batches of random ids, the same in every process (CPU generator), as
    the model's keyword arguments: ``input_ids`` and ``labels`` (the ids; the model shifts
    them), with ``--attention-mask`` an all-ones ``attention_mask`` (as a Trainer's collator
    passes), and with ``--pad-right N`` (``--pad-left N``) rows 2.. of each batch padded by
    1..N tokens at their end (start) (mask 0, label -100 there; row 1 unpadded), as a padding
    collator makes them."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for i in range(N_BATCHES):
        ids = torch.randint(0, vocab_size, (args.batch, args.seq), generator=g)
        batch = {"input_ids": ids, "labels": ids}
        pad = args.pad_right or args.pad_left
        if args.attention_mask or pad:
            mask = torch.ones_like(ids)
            for row in range(1, args.batch if pad else 1):
                n = 1 + (i * 7 + row * 13) % pad
                if args.pad_right:
                    mask[row, args.seq - n:] = 0
                else:
                    mask[row, :n] = 0
            batch.update(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        batches.append(batch)
    return batches


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")


def load_base_model(args, dtype, quantized: bool):
    """The saved random-init model, as every variant and the reference load it."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, attn_implementation="sdpa", use_cache=False)
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    device = torch.device(args.device)
    if device.type == "cuda":
        try:
            return AutoModelForCausalLM.from_pretrained(
                model_dir(args), device_map={"": device.index or 0}, **kwargs)
        except Exception as exc:  # e.g. device_map needs accelerate on some versions
            if quantized:
                raise
            log(f"loading with device_map failed ({describe_error(exc)}); loading on CPU")
    model = AutoModelForCausalLM.from_pretrained(model_dir(args), **kwargs)
    return model if quantized else model.to(device)


def training_device(args):
    """args.device as a torch.device with an index for CUDA ("cuda" -> cuda:0), made current."""
    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    return device


ALLOCATOR_EVENTS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


def allocator_events() -> dict:
    """The CUDA caching allocator's counts of cudaMalloc, cudaFree and out-of-memory
    retries so far. Why: a cudaFree waits for the whole GPU, so a step that frees and
    allocates device memory every time (a tight budget, new transient sizes) idles the GPU
    where a kernel profile shows nothing."""
    import torch

    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ALLOCATOR_EVENTS}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def env_info(device_str: str) -> dict:
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device_str,
    }
    for mod in ("peft", "triton", "bitsandbytes"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:
            info[mod] = f"absent ({type(exc).__name__})"
    if device_str.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


# ----------------------------------------------------------------------------- child: build


def child_build(args) -> dict:
    """Build the random-init bf16 model once and save it; reuse it when the config matches."""
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    out = model_dir(args)
    config = model_config(args)
    cfg = config.to_dict()
    cfg.pop("transformers_version", None)
    meta = json.loads(json.dumps({"config": cfg, "seed": args.seed}, default=str))
    meta_file = out / "bench_meta.json"
    result = {"path": str(out)}
    saved = json.loads(meta_file.read_text()) if meta_file.exists() else None
    if saved == meta and (out / "config.json").exists():
        log(f"reusing the saved model in {out}")
        save_tokenizer(out, config.vocab_size)
        result["built"] = False
        return result
    log(f"building the {args.shape} model (seed {args.seed}) on {device} and saving to {out}")
    t0 = time.time()
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = model_class(args)(config)
    model = model.to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    if meta_file.exists():
        meta_file.unlink()
    model.save_pretrained(out)
    save_tokenizer(out, config.vocab_size)
    meta_file.write_text(json.dumps(meta, indent=1))  # last: marks the save as complete
    result.update(built=True, build_s=round(time.time() - t0, 1), params=n_params)
    log(f"built and saved {n_params / 1e9:.3f} B parameters in {time.time() - t0:.0f} s")
    # The kernel writes the saved files back to disk after this: at 8B 16 GB, during the
    # first variant's timed steps (session 20: the first training process on a fresh
    # machine ran 7-11 % slow in two commands; a suspect, not a proven cause). Wait for it.
    t1 = time.time()
    os.sync()
    log(f"written back to disk in {time.time() - t1:.0f} s")
    return result


def save_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer of the model's vocab size beside the weights: Unsloth loads a
    model only by path, with its tokenizer (the batches are random ids either way)."""
    if (out / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Special tokens get names no word contains: the tokenizer matches them inside words
    # ("t1" as BOS would split "t123" into BOS + "23").
    special = ["<unk>", "<s>", "</s>"]
    vocab = {**{t: i for i, t in enumerate(special)},
             **{f"t{i}": i for i in range(len(special), vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>",
                            bos_token="<s>", eos_token="</s>").save_pretrained(out)


def load_unsloth_model(args, gradient_checkpointing: bool):
    """Unsloth's own loader and LoRA wrapper (ANCHORS.md: its peers' numbers came this way).
    UNSLOTH_SITE: the unpacked .whl/uns.tgz, put on sys.path only in this child."""
    import torch

    site = os.environ.get("UNSLOTH_SITE")
    if site and site not in sys.path:
        sys.path.insert(0, site)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from unsloth import FastLanguageModel  # noqa: must come before peft's use (it patches)

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(model_dir(args)), max_seq_length=args.seq, dtype=torch.bfloat16,
        load_in_4bit=args.qlora, local_files_only=True)
    return FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
        random_state=args.seed)


# ----------------------------------------------------------------------------- child: train


def resolve_backend(variant: str):
    """The `backend=` argument for a compiled variant, and how it was found."""
    if variant in ("inductor", "aot_eager"):
        return variant, "builtin"
    from torch._dynamo.backends.registry import lookup_backend

    try:
        lookup_backend("lorafuse")
        return "lorafuse", "entry point"
    except Exception as exc:
        log(f"backend 'lorafuse' is not registered ({describe_error(exc)}); "
            "importing lorafuse.backend from the repository instead")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from lorafuse.backend import lorafuse_backend

    return lorafuse_backend, "import lorafuse.backend"


def child_train(args, variant: str, res: dict) -> dict:
    """Train warmup + steps; fill `res` as it goes (so a failure still reports what ran)."""
    import torch

    device = training_device(args)
    res.update(losses=[], snapshot_steps=[])
    snap_file = snapshot_path(args, variant)
    if args._round == 1:  # never let the ref read an older run's snapshot (later rounds
        snap_file.unlink(missing_ok=True)  # keep round 1's: they write none)

    # -- load, wrap, compile
    t0 = time.time()
    base = variant.split(":")[0]  # "lorafuse:TAG": lorafuse with --lorafuse-config TAG
    if base.startswith("unsloth"):
        model = load_unsloth_model(args, gradient_checkpointing=base == "unsloth_gc")
    else:
        from peft import get_peft_model

        model = load_base_model(args, torch.bfloat16, quantized=args.qlora)
        if base == "eager_gc":
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, lora_config())
    model.train()
    lora_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    res["trainable_params"] = sum(p.numel() for p in lora_params.values())
    res["load_s"] = round(time.time() - t0, 1)
    step_model = model
    cudagraphs = False  # options {"inductor": {"triton.cudagraphs": true}}: CUDA graph trees
    if base in ("inductor", "aot_eager", "lorafuse"):
        backend, how = resolve_backend(base)
        res["backend_via"] = how
        if base != variant:
            options = args.lorafuse_configs[variant.split(":", 1)[1]].get("options")
        else:
            options = json.loads(args.lorafuse_options) if (base == "lorafuse" and
                                                            args.lorafuse_options) else None
        step_model = torch.compile(model, backend=backend, options=options)
        cudagraphs = bool(((options or {}).get("inductor") or {}).get("triton.cudagraphs"))
    try:
        opt = torch.optim.AdamW(lora_params.values(), lr=1e-4, fused=True)
        res["fused_adamw"] = True
    except Exception:
        opt = torch.optim.AdamW(lora_params.values(), lr=1e-4)
        res["fused_adamw"] = False
    batches = [{k: t.to(device) for k, t in b.items()}
               for b in make_batches(args, model.config.vocab_size)]
    on_cuda = device.type == "cuda"
    if on_cuda:
        sync(device)
        res["load_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    log(f"{variant}: loaded in {res['load_s']} s, {res['trainable_params']:,} LoRA params"
        + (f", {res['load_gib']:.2f} GiB allocated" if on_cuda else ""))
    if on_cuda:
        res["host_mm_us"] = host_gauge(device)
        log(f"{variant}: host gauge: {res['host_mm_us']:.1f} µs of host time per torch.mm call")

    def train_step(batch):
        if cudagraphs:  # a new step: the graphs' previous outputs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast):
            loss = step_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # a copy: under CUDA graphs the next step's replay overwrites the graph's output
        return loss.detach().clone()

    # -- the loop. Losses stay on the device (no per-step sync) and are read at the end.
    total = args.warmup + args.steps
    losses, snapshots = [], {}
    if on_cuda and args.memory_snapshot:
        record_memory_history(True)
    timed_s, seg_start = 0.0, None
    timed_window = [None, None]  # wall-clock seconds of the timed steps (for the clock log)
    alloc_before = None  # the caching allocator's event counts when the timed steps began
    try:
        for step in range(1, total + 1):
            if step in args.ref_steps and variant in args.ref_variants and args._round == 1:
                # off the clock: a copy of the LoRA parameters
                sync(device)
                if seg_start is not None:
                    timed_s += time.perf_counter() - seg_start
                    seg_start = None
                snapshots[step] = flat_copy(lora_params.values())
            if step == args.warmup + 1:
                sync(device)
                if on_cuda:
                    res["peak_warmup_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    torch.cuda.reset_peak_memory_stats()
                    alloc_before = allocator_events()
                    if args.memory_snapshot:
                        warm = memory_history_path(args, variant, "warmup")
                        record_memory_history(False, warm)
                        record_memory_history(True)
            if step > args.warmup and seg_start is None:
                sync(device)
                seg_start = time.perf_counter()
                timed_window[0] = timed_window[0] or time.time()
            t_step = time.perf_counter()
            losses.append(train_step(batches[(step - 1) % N_BATCHES]))
            if args.sync_each_step:  # HF Trainer's logging_nan_inf_filter: a host read a step
                bool(torch.isnan(losses[-1]) or torch.isinf(losses[-1]))
            if step == 1:
                sync(device)
                res["compile_s"] = round(time.perf_counter() - t_step, 2)
                res["losses"] = [losses[0].item()]
                parts = compile_seconds()
                if parts:
                    res["compile_parts_s"] = parts
                if on_cuda:
                    res["peak_step1_gib"] = torch.cuda.max_memory_allocated() / 2**30
                if on_cuda and args.memory_snapshot and args.warmup > 1:
                    # step 1 apart: from step 2 on the optimizer's state is allocated, and
                    # under CUDA graphs step 2 is the recording (session 34's command 2)
                    record_memory_history(False, memory_history_path(args, variant, "step1"))
                    record_memory_history(True)
                # bench_context reads this line from the log of a run cut after step 1
                log(f"{variant}: step 1 (compile + first step) {res['compile_s']} s, "
                    f"loss {res['losses'][0]:.4f}"
                    + (f", peak {res['peak_step1_gib']:.2f} GiB" if on_cuda else "")
                    + "".join(f", {k} {v} s" for k, v in parts.items()))
            elif step == total or step % max(1, total // 4) == 0:
                log(f"{variant}: step {step}/{total} queued")
        sync(device)
        timed_window[1] = time.time()
        if seg_start is not None:
            timed_s += time.perf_counter() - seg_start
        if on_cuda and args.steps == 0:  # a one-step fit run (bench_context): its peak only
            res["peak_warmup_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if on_cuda and args.memory_snapshot:
            record_memory_history(False, memory_history_path(args, variant, "timed"))
            both = memory_history_path(
                args, variant, "{step1,warmup,timed}" if args.warmup > 1 else "{warmup,timed}")
            log(f"{variant}: memory history of the warm-up and of the timed steps in {both} "
                "(bench/memory_peak.py reads it)")
    finally:
        try:
            res["losses"] = torch.stack(losses).float().tolist() if losses else []
        except Exception:  # a sticky CUDA error: keep what step 1 gave
            pass
        if snapshots:
            layout = [(n, tuple(p.shape)) for n, p in lora_params.items()]
            torch.save({"layout": layout, "steps": snapshots}, snap_file)
            res["snapshot_steps"] = sorted(snapshots)
    if args.profile:
        res["profile"] = profile_steps(train_step, batches, args.profile, device)
        log(f"{variant}: profile of {args.profile} steps\n{res['profile']['text']}")
    tokens = args.steps * args.batch * args.seq
    res["timed_s"] = round(timed_s, 3)
    res["tok_s"] = tokens / timed_s if tokens else None  # None: no timed step (a fit run)
    if on_cuda:
        if args.steps:
            res["peak_timed_gib"] = torch.cuda.max_memory_allocated() / 2**30
            # Under CUDA graphs a replay allocates nothing through the caching allocator: the
            # timed steps' allocated peak misses the graphs' pool (session 23: 5.78 GiB
            # against 8.80 in the warm-up); the reserved peak holds it.
            res["reserved_timed_gib"] = torch.cuda.max_memory_reserved() / 2**30
            if alloc_before is not None:
                res["allocator_timed"] = {k: v - alloc_before[k]
                                          for k, v in allocator_events().items()}
        res["peak_gib"] = max(res["peak_warmup_gib"], res.get("peak_timed_gib", 0.0))
    if base in ("inductor", "aot_eager", "lorafuse"):
        from torch._dynamo.utils import counters

        res["graphs"] = counters["stats"].get("unique_graphs", 0)
        res["graph_breaks"] = sum(counters["graph_break"].values())
        res["graph_break_reasons"] = [one_line(k, 160) for k in list(counters["graph_break"])[:5]]
        if "lorafuse" in counters:
            res["lorafuse_counters"] = dict(counters["lorafuse"])
        # graphs (or partitions) Inductor ran without the CUDA graphs asked for; the reasons
        # are in the child's log ("skipping cudagraphs due to ...")
        res["cudagraph_skips"] = counters["inductor"].get("cudagraph_skips", 0)
    if base == "lorafuse":
        res["kernel_choices"] = kernel_choices()
        log(f"{variant}: per-shape choices " + "; ".join(
            f"{k} -> {v}" for k, v in sorted(res["kernel_choices"].items())))
    bad = [i + 1 for i, x in enumerate(res["losses"]) if not math.isfinite(x)]
    if bad:
        res["nonfinite_steps"] = bad
    if not args.steps:
        log(f"{variant}: {args.warmup} untimed step(s)"
            + (f", peak {res['peak_gib']:.2f} GiB" if on_cuda else ""))
        return res
    log(f"{variant}: {res['tok_s']:,.0f} tok/s over {args.steps} steps"
        + (f", peak {res['peak_gib']:.2f} GiB (warm-up {res['peak_warmup_gib']:.2f}, "
           f"timed {res['peak_timed_gib']:.2f}; reserved in the timed steps "
           f"{res['reserved_timed_gib']:.2f})" if on_cuda else ""))
    if any(res.get("allocator_timed", {}).values()):
        a = res["allocator_timed"]
        log(f"{variant}: the caching allocator in the timed steps: {a['num_device_alloc']} "
            f"cudaMalloc, {a['num_device_free']} cudaFree (each waits for the GPU), "
            f"{a['num_alloc_retries']} retries after freeing its cache")
    clocks = os.environ.get("BENCH_GPU_CLOCKS")  # run_gpu.sh's nvidia-smi log
    if clocks and timed_window[0]:
        res["clocks"] = clock_summary(clocks, *timed_window)
        if res["clocks"]:
            c = res["clocks"]
            log(f"{variant}: timed steps' GPU: SM clock median {c['sm_mhz']:.0f} MHz "
                f"(min {c['sm_mhz_min']:.0f}), power median {c['power_w']:.0f} W, "
                f"power cap active in {c['power_capped']} of {c['samples']} samples, "
                f"{fmt(c['temp_c'], '.0f')} °C")
    return res


def host_gauge(device, calls: int = 200) -> float:
    """Host µs per ``torch.mm`` launch on tiny tensors (no sync inside the loop): how fast
    this machine's host is. The lent H200 machines differ ≈ 2 × there (session 22: 17 to
    33 µs), and a step that waits on its host moves with it, so a tok/s is read beside
    this number (and compared only within one run)."""
    import torch

    a = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
    for _ in range(20):
        torch.mm(a, a)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        torch.mm(a, a)
    us = (time.perf_counter() - t0) / calls * 1e6
    sync(device)
    return round(us, 1)


def clock_summary(path: str, t0: float, t1: float):
    """The SM clock, power and temperature of the GPU between wall-clock times t0 and t1,
    from an ``nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,
    clocks_throttle_reasons.active,temperature.gpu --format=csv,noheader,nounits -lms N``
    log (run_gpu.sh writes one; the temperature column may be absent). A GPU held at its
    power limit lowers its clock: kernels then take longer at the same work (reason bit
    0x4, the software power cap; session 16: every 8B step). None when no sample falls
    inside the window."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        f = [x.strip() for x in line.split(",")]
        try:
            t = datetime.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            sm, watts, reasons = float(f[1]), float(f[2]), int(f[3], 16)
            temp = float(f[4]) if len(f) > 4 else math.nan
        except (ValueError, IndexError):
            continue  # a header, a partial last line, "[N/A]"
        if t0 <= t <= t1:
            rows.append((sm, watts, reasons, temp))
    if not rows:
        return None
    sms, watts = [r[0] for r in rows], [r[1] for r in rows]
    temps = [r[3] for r in rows if not math.isnan(r[3])]
    return {"samples": len(rows), "sm_mhz": statistics.median(sms), "sm_mhz_min": min(sms),
            "sm_mhz_max": max(sms), "power_w": statistics.median(watts),
            "power_w_max": max(watts), "power_capped": sum(1 for r in rows if r[2] & 0x4),
            "temp_c": statistics.median(temps) if temps else None}


def memory_history_path(args, variant: str, phase: str) -> Path:
    """``--memory-snapshot`` FILE for one variant and phase: ``{variant}`` replaced, the
    phase before the suffix (``run.pickle`` -> ``run.warmup.pickle``)."""
    path = Path(args.memory_snapshot.replace("{variant}", variant.replace(":", "_")))
    return path.with_name(f"{path.stem}.{phase}{path.suffix}")


def record_memory_history(on: bool, path=None) -> None:
    """Start (on) or dump to ``path`` and stop recording the CUDA allocator's history, with
    the Python stack of each allocation. torch.cuda.memory's recording functions are
    underscored (private, stable since torch 2.1); only this benchmark calls them."""
    import torch

    if on:
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)


def compile_seconds() -> dict:
    """Dynamo's compile time so far, forward (tracing, the backend, Inductor) and backward,
    from its own timers (private, and only read here): how much of step 1 was compiling.
    Empty when torch does not keep them."""
    try:
        from torch._dynamo.utils import compile_times

        names, times = compile_times(repr="csv", aggregate=True)
        total = dict(zip(names, (float(t) for t in times)))
    except Exception:
        return {}
    parts = {"forward_compile": total.get("_compile.compile_inner"),
             "backward_compile": total.get("compile_fx.<locals>.bw_compiler")}
    return {k: round(v, 1) for k, v in parts.items() if v}


def kernel_choices() -> dict:
    """The paths lorafuse's timed-once dispatch chose per shape key (LoRA forward / backward,
    4-bit dequantisation, a ranges batch's attention): runs of the same code that differ in
    speed may differ here."""
    out = {}
    for mod, attr in (("lorafuse.kernels.lora", "_choice"),
                      ("lorafuse.kernels.nf4", "_dequant_choice"),
                      ("lorafuse.kernels.attention", "RANGES_PATHS")):
        cache = getattr(sys.modules.get(mod), attr, None) or {}
        out.update({f"{mod.rsplit('.', 1)[1]}{tuple(str(x) for x in k)}": v
                    for k, v in cache.items()})
    return out


# Kernel name -> category, first match wins (lower-case substrings).
KERNEL_CATEGORIES = [
    ("lorafuse triton", ("lowrank", "lora", "tail_gemm", "nf4", "dequant_4bit", "rope", "gated_mlp",
                         "rms_norm")),
    ("bitsandbytes", ("kdequantize", "kgemm_4bit", "kquantize")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "triton_tem")),
    ("inductor reduction", ("triton_red", "triton_per")),
    ("inductor pointwise", ("triton_poi",)),
    ("optimizer", ("adam", "multi_tensor")),
    ("memcpy/memset", ("memcpy", "memset")),
    ("aten other", ("",)),
]


def idle_gaps(prof, n: int) -> list:
    """``trace_gaps.gap_report`` of the profile: where the compute stream waited."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trace_gaps import gap_report

    try:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "trace.json"
            prof.export_chrome_trace(str(path))
            return gap_report(json.loads(path.read_text()), n)
    except Exception as e:  # the profile's other tables stand without it
        return [f"  idle gaps: not computed ({type(e).__name__}: {e})"]


def profile_steps(train_step, batches, n: int, device) -> dict:
    """GPU time per kernel category and the 25 costliest kernels over n steps (per step)."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    t0 = time.perf_counter()
    on_cuda = device.type == "cuda"  # on CPU (smoke runs) it profiles CPU ops instead
    acts = [ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]
    host = on_cuda and os.environ.get("BENCH_PROFILE_HOST") == "1"  # also host time per op
    if host:
        acts.append(ProfilerActivity.CPU)
    with profile(activities=acts) as prof:
        for i in range(n):
            train_step(batches[i % N_BATCHES])
        sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / n
    kernels = collections.Counter()
    counts = collections.Counter()
    from torch.autograd import DeviceType

    for evt in prof.key_averages():
        if host and evt.device_type != DeviceType.CUDA:
            continue  # a host op: its device time is its kernels', counted under their names
        us = evt.self_device_time_total if on_cuda else evt.self_cpu_time_total
        if us > 0:
            kernels[evt.key] += us / 1e3 / n
            counts[evt.key] += evt.count / n
    cats = collections.Counter()
    for name, ms in kernels.items():
        low = name.lower()
        cats[next(c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys))] += ms
    gpu_ms = sum(kernels.values()) or float("nan")
    lines = [f"wall {wall_ms:.1f} ms/step (profiled), GPU kernels {gpu_ms:.1f} ms/step"]
    lines += [f"  {c:20s} {ms:8.2f} ms  {100 * ms / gpu_ms:5.1f} %" for c, ms in cats.most_common()]
    lines.append("  top kernels (ms/step, launches/step):")
    lines += [f"  {ms:8.2f} {counts[k]:6.0f}  {one_line(k, 110)}" for k, ms in kernels.most_common(25)]
    if host:  # the host side: which ops' Python / dispatch cost the most per step
        cpu = sorted(((e.self_cpu_time_total / 1e3 / n, e.count / n, e.key)
                      for e in prof.key_averages() if e.self_cpu_time_total > 0), reverse=True)
        lines.append(f"  host: {sum(c[0] for c in cpu):.1f} ms/step self CPU time; top ops "
                     "(ms/step, calls/step):")
        lines += [f"  {ms:8.2f} {cnt:6.0f}  {one_line(k, 110)}" for ms, cnt, k in cpu[:25]]
        lines += idle_gaps(prof, n)
    return {"wall_ms": wall_ms, "gpu_ms": gpu_ms, "categories": dict(cats),
            "top": [[k, ms, counts[k]] for k, ms in kernels.most_common(40)],
            "text": "\n".join(lines)}


def flat_copy(params) -> "torch.Tensor":
    """The parameters, flattened into one fp32 CPU tensor by one device-to-host copy.

    One copy and one object a step, not one per LoRA tensor (448 at 8B): session 20's
    per-tensor snapshots coincided with lorafuse's timed steps running 11 % slow (a host
    read each step alone cost nothing); with this copy session 21 measured no slowdown
    (16,202 tok/s beside Unsloth's 16,335). The concatenation is a temporary
    on the device (0.16 GiB at 8B), between two steps, far under a training step's peak."""
    import torch

    return torch.cat([p.detach().reshape(-1).float() for p in params]).cpu()


def unflatten(layout, flat) -> dict:
    """``flat_copy``'s tensor as ``{name: tensor}`` by ``layout`` ([(name, shape)])."""
    out, at = {}, 0
    for name, shape in layout:
        n = 1
        for d in shape:
            n *= d
        out[name] = flat[at:at + n].view(shape)
        at += n
    if at != flat.numel():
        raise RuntimeError(f"snapshot holds {flat.numel()} values, its layout {at}")
    return out


def snapshot_path(args, variant: str) -> Path:
    tag = args.shape + ("_qlora" if args.qlora else "")
    d = Path(args.cache) / "snapshots" / tag
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{variant}.pt"


# ----------------------------------------------------------------------------- child: ref


def dequantize_4bit_linears(model) -> int:
    """Replace every bitsandbytes Linear4bit by an fp32 nn.Linear holding its dequantized
    weight: the fp32 reference of a QLoRA model computes with the same (quantized) values."""
    import bitsandbytes as bnb
    import torch

    count = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
                lin = torch.nn.Linear(child.in_features, child.out_features,
                                      bias=child.bias is not None,
                                      device=w.device, dtype=torch.float32)
                with torch.no_grad():
                    lin.weight.copy_(w.float())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias.float())
                setattr(mod, child_name, lin)
                count += 1
    return count


def child_ref(args, variants) -> dict:
    """Loss of an fp32 model (no autocast) with the same base weights and the LoRA values each
    variant had at each --ref-steps step, on that step's batch."""
    import torch
    from peft import get_peft_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    device = training_device(args)
    t0 = time.time()
    if args.qlora:
        model = load_base_model(args, torch.bfloat16, quantized=True)
        n = dequantize_4bit_linears(model)
        log(f"ref: dequantized {n} 4-bit linears to fp32")
        torch.nn.Module.float(model)  # HF refuses .float() on a model it loaded quantized
    else:
        model = load_base_model(args, torch.float32, quantized=False)
    model = get_peft_model(model, lora_config())
    model.eval()
    lora_names = {n for n, p in model.named_parameters() if p.requires_grad}
    batches = make_batches(args, model.config.vocab_size)
    log(f"ref: fp32 model loaded in {time.time() - t0:.0f} s")
    out = {}
    for variant in variants:
        path = snapshot_path(args, variant)
        if not path.exists():
            continue
        snaps = torch.load(path)
        per_step = {}
        for step, flat in sorted(snaps["steps"].items()):
            state = unflatten(snaps["layout"], flat)
            missing = lora_names - set(state)
            if missing:
                raise RuntimeError(f"snapshot of {variant} lacks {len(missing)} LoRA tensors, "
                                   f"e.g. {sorted(missing)[0]}")
            unexpected = model.load_state_dict(state, strict=False).unexpected_keys
            if unexpected:
                raise RuntimeError(f"snapshot of {variant} has tensors the fp32 model lacks, "
                                   f"e.g. {unexpected[0]}")
            batch = {k: t.to(device) for k, t in batches[(step - 1) % N_BATCHES].items()}
            with torch.no_grad():
                per_step[step] = model(**batch).loss.item()
            del batch
        out[variant] = per_step
        log(f"ref: {variant} at steps {sorted(per_step)} done")
    return out


# ----------------------------------------------------------------------------- parent


def run_child(args, role: str, timeout: float | None, extra=()) -> dict:
    """Run this script as a child with `--_child role`; stream its output to stderr; return
    the JSON it wrote, or {"error": ...} when it wrote none."""
    fd, out_path = tempfile.mkstemp(prefix="bench_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), *args.argv, *extra,
           "--_child", role, "--_out", out_path]
    env = dict(os.environ)
    cache_dir = None
    if ":" in role:  # lorafuse:TAG runs with the environment of its --lorafuse-config
        env.update({k: str(v) for k, v in
                    args.lorafuse_configs[role.split(":", 1)[1]].get("env", {}).items()})
    if args.cold_compile and role.split(":")[0] in ("inductor", "aot_eager", "lorafuse"):
        cache_dir = tempfile.mkdtemp(prefix=f"inductor_cache_{role}_")
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    tail = collections.deque(maxlen=30)
    last_output = [time.time()]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True, env=env)

    def pump():
        for line in proc.stdout:
            last_output[0] = time.time()
            tail.append(line.rstrip())
            sys.stderr.write(f"  {role}| {line}")
            sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    while proc.poll() is None:
        elapsed = time.time() - t0
        if timeout is not None and elapsed > timeout:
            timed_out = True
            break
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            if time.time() - last_output[0] > 60:  # show life during a long compile
                log(f"{role}: still running ({time.time() - t0:.0f} s)")
                last_output[0] = time.time()
    # Kill what is left of the child's own process group (it, or its compile workers).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    reader.join(timeout=5)
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    wall = round(time.time() - t0, 1)
    try:
        text = Path(out_path).read_text().strip()
        result = json.loads(text.splitlines()[-1]) if text else None
    finally:
        os.unlink(out_path)
    if result is None:
        if timed_out:
            err = f"timeout: killed after {wall:.0f} s"
        elif proc.returncode < 0:
            err = f"killed by signal {-proc.returncode} (host OOM?)"
        else:
            last = [ln for ln in tail if ln.strip()]
            err = f"exit code {proc.returncode}: " + (last[-1] if last else "no output")
        result = {"error": one_line(err)}
    result["wall_s"] = wall
    return result


def child_main(args) -> None:
    role = args._child
    result = {}
    try:
        if role == "build":
            result = {"env": env_info(args.device)}
            result.update(child_build(args))
        elif role == "ref":
            result = {"ref": child_ref(args, args.variants)}
        else:
            result = {"variant": role}
            child_train(args, role, result)
    except BaseException as exc:  # report, never raise: the parent shows it in one line
        log(f"{role} failed:\n{traceback.format_exc()}")
        result.update(variant=role, error=describe_error(exc),
                      traceback=traceback.format_exc()[-4000:])
    with open(args._out, "w") as f:
        f.write(json.dumps(result) + "\n")


def git_commit() -> str:
    """$BENCH_COMMIT when set (a copied tree's .git can be stale), else HEAD of this checkout
    (+dirty), else "unknown"."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    fallback = "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0 or not out.stdout.strip():
            return fallback
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return fallback


def fmt(x, spec=",.0f", missing="—"):
    return missing if x is None else format(x, spec)


def render(args, meta, results, ref) -> str:
    """Markdown: header, loss per step, fp32 reference, then the short summary table last."""
    ok = {r["variant"]: r for r in results if "error" not in r}
    lines = []
    env = meta.get("env", {})
    lines.append(f"## bench_train --shape {args.shape}{' --qlora' if args.qlora else ''} "
                 f"({meta['date']}, commit {meta['commit']})")
    lines.append("")
    lines.append(f"- device: {env.get('device_name', '?')} ({args.device}); torch "
                 f"{env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
                 f"peft {env.get('peft', '?')}, triton {env.get('triton', '?')}"
                 + (f", bitsandbytes {env.get('bitsandbytes')}" if args.qlora else ""))
    lines.append(f"- batch {args.batch} x {args.seq} = {args.batch * args.seq} tokens/step; "
                 f"{args.warmup} warm-up + {args.steps} timed steps; autocast "
                 f"{'off' if args.no_autocast else 'bf16'}; LoRA r=16 alpha=16 on 7 projections; "
                 f"{meta['gflop_per_token']:.3g} GFLOP/token"
                 + ("; a host read of the loss every step (--sync-each-step)"
                    if args.sync_each_step else "")
                 + (f"; attention_mask with rows 2.. {'right' if args.pad_right else 'left'}-"
                    f"padded by 1..{args.pad_right or args.pad_left} tokens (counted in tok/s)"
                    if args.pad_right or args.pad_left else
                    "; an all-ones attention_mask" if args.attention_mask else ""))
    lines.append("")

    # loss at every step
    names = [r["variant"] for r in results]
    if ok:
        lines.append("### loss per step (* = fp32 reference step)")
        lines.append("")
        lines.append("| step | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for step in range(1, args.warmup + args.steps + 1):
            cells = []
            for n in names:
                ls = ok.get(n, {}).get("losses", [])
                cells.append(f"{ls[step - 1]:.4f}" if step <= len(ls) else "—")
            mark = "*" if step in args.ref_steps else ""
            lines.append(f"| {step}{mark} | " + " | ".join(cells) + " |")
        lines.append("")

    # fp32 reference
    ref_vars = [n for n in names if ref.get(n) and n in ok]
    if ref_vars:
        lines.append("### fp32 reference of the same parameters (Δ = loss − fp32 loss)")
        lines.append("")
        lines.append("| step | " + " | ".join(f"{n} fp32 | {n} Δ" for n in ref_vars) + " |")
        lines.append("|---|" + "---|---|" * len(ref_vars))
        for step in args.ref_steps:
            cells = []
            for n in ref_vars:
                r32 = ref[n].get(step)
                d = ok[n].get("ref_delta", {}).get(step)
                cells.append(f"{r32:.4f}" if r32 is not None else "—")
                cells.append(f"{d:+.5f}" if d is not None else "—")
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    elif meta.get("ref_error"):
        lines.append(f"fp32 reference: {meta['ref_error']}")
        lines.append("")

    # what the compilers did
    notes = []
    for r in results:
        if "error" in r or "graphs" not in r:
            continue
        note = (f"- {r['variant']}: backend via {r.get('backend_via')}; {r['graphs']} graph(s), "
                f"{r['graph_breaks']} graph break(s)")
        if r.get("lorafuse_counters"):
            note += "; lorafuse counters " + ", ".join(
                f"{k} {v}" for k, v in sorted(r["lorafuse_counters"].items()))
        if r.get("cudagraph_skips"):
            note += f"; CUDA graphs skipped {r['cudagraph_skips']} time(s) (reasons in its log)"
        if r.get("graph_break_reasons"):
            note += "; first breaks: " + " // ".join(r["graph_break_reasons"][:2])
        notes.append(note)
    if notes:
        lines += notes + [""]

    if args.rounds > 1:
        lines += rounds_table(args, results) + [""]

    lines += clocks_table(results)
    # summary, last
    base_e = ok.get("eager", {}).get("tok_s")
    base_i = ok.get("inductor", {}).get("tok_s")
    base_u = ok.get("unsloth", {}).get("tok_s")  # issue 3's bar: Unsloth without checkpointing
    ceiling = args.peak_tflops * 1e12 / meta["gflop_per_token"] / 1e9
    lines.append(f"### summary ({args.shape}; ceiling {ceiling:,.0f} tok/s at "
                 f"{args.peak_tflops} TFLOP/s)")
    lines.append("")
    u_head, u_rule = (" × unsloth |", "---|") if base_u else ("", "")
    lines.append(f"| variant | tok/s | × eager | × inductor |{u_head} % ceiling | peak GiB | "
                 "compile s | max abs Δloss vs fp32 |")
    lines.append(f"|---|---|---|---|{u_rule}---|---|---|---|")
    for r in results:
        n = r["variant"]
        if "error" in r:
            label = "" if r["error"].startswith("skipped") else "error: "
            lines.append(f"| {n} | {label}{r['error']} |{' |' * (6 + bool(base_u))}")
            continue
        tok = r.get("tok_s")
        note = ""
        if r.get("nonfinite_steps"):
            note = f" (non-finite loss at steps {r['nonfinite_steps'][:5]})"
        if r.get("graph_breaks"):
            note += f" ({r['graph_breaks']} graph breaks)"
        lines.append(
            f"| {n}{note} | {fmt(tok)} | {fmt(tok / base_e if base_e else None, '.2f')} | "
            f"{fmt(tok / base_i if base_i else None, '.2f')} | "
            + (f"{fmt(tok / base_u, '.3f')} | " if base_u else "")
            + f"{fmt(100 * tok / ceiling, '.1f')} | {fmt(r.get('peak_gib'), '.1f')} | "
            f"{fmt(r.get('compile_s'), '.1f')} | {fmt(r.get('ref_max_abs_delta'), '.5f')} |")
    snapped = [r["variant"] for r in results if "error" not in r
               and r["variant"] in args.ref_variants and r.get("round", 1) == 1
               and any(s > args.warmup + 1 for s in args.ref_steps)]
    if snapped:
        # Session 20: lorafuse 14,173 tok/s with a snapshot (then one copy per tensor)
        # before every step, 15,829 with a host read of the loss every step
        # (--sync-each-step). Session 21, one flat copy a step: 16,202.
        lines.append("")
        lines.append(f"tok/s of {', '.join(snapped)}: their timed steps took fp32-reference "
                     "snapshots (a sync and a host copy of the LoRA parameters, off the clock); "
                     "at 8B, one copy per tensor once ran lorafuse 11 % slow, the flat copy "
                     "used now did not (bench/RESULTS.md, sessions 20-21).")
    return "\n".join(lines) + "\n"


def clocks_table(results) -> list[str]:
    """The GPU's clock, power and temperature over each variant's timed steps (run_gpu.sh's
    nvidia-smi log), and tok/s per MHz: at a power cap the clock a process gets moves its
    tok/s (bench/README.md, "Clocks and power"); and the host gauge (``host_gauge``).
    Empty when no variant has them."""
    rows = [r for r in results if r.get("clocks") and r.get("tok_s")]
    if not rows:
        return []
    lines = ["### GPU over the timed steps (nvidia-smi, every 200 ms)", "",
             "| variant | SM clock median (min) MHz | power median W | power-capped samples "
             "| °C | tok/s per MHz | host µs per torch.mm |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["clocks"]
        lines.append(f"| {r['variant']} | {c['sm_mhz']:,.0f} ({c['sm_mhz_min']:,.0f}) | "
                     f"{c['power_w']:.0f} | {c['power_capped']} of {c['samples']} | "
                     f"{fmt(c.get('temp_c'), '.0f')} | {r['tok_s'] / c['sm_mhz']:.2f} | "
                     f"{fmt(r.get('host_mm_us'), '.1f')} |")
    return lines + [""]


def rounds_table(args, results) -> list[str]:
    """``--rounds``: each variant's tok/s in every round, their median, their spread
    ((max − min) / median), and the median as a multiple of the first variant's."""
    rounds = range(1, args.rounds + 1)
    tok = {(r.get("base", r["variant"]), r.get("round", 1)): r.get("tok_s")
           for r in results if "error" not in r}
    got = {v: [tok[(v, k)] for k in rounds if tok.get((v, k))] for v in args.variants}
    medians = {v: statistics.median(t) if t else None for v, t in got.items()}
    first = medians[args.variants[0]]
    lines = ["### rounds (tok/s; each cell a fresh process, rounds interleaved)", "",
             "| variant | " + " | ".join(f"round {k}" for k in rounds)
             + f" | median | spread % | × {args.variants[0]} |",
             "|---|" + "---|" * (len(rounds) + 3)]
    for v in args.variants:
        med = medians[v]
        spread = 100 * (max(got[v]) - min(got[v])) / med if len(got[v]) > 1 else None
        lines.append(f"| {v} | " + " | ".join(fmt(tok.get((v, k))) for k in rounds)
                     + f" | {fmt(med)} | {fmt(spread, '.1f')} | "
                     f"{fmt(med / first if med and first else None, '.3f')} |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--variants", default="eager,inductor,lorafuse",
                   help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, or cpu (tiny only, really)")
    p.add_argument("--batch", type=int, help="default: per shape (8b: 2, 1b: 4, tiny: 2)")
    p.add_argument("--seq", type=int, help="default: per shape (2048; tiny: 128)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps; step 1 = compile time")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="/tmp/lorafuse_bench",
                   help="where the random-init model and the LoRA snapshots are saved")
    p.add_argument("--ref", dest="ref", action="store_true", default=None,
                   help="compute the fp32 reference (default: on for 1b and tiny, off for 8b)")
    p.add_argument("--no-ref", dest="ref", action="store_false")
    p.add_argument("--ref-variants", default="",
                   help="variants that get the fp32 reference (default: all), e.g. eager,lorafuse")
    p.add_argument("--ref-steps", default="1,5,10,20",
                   help="steps (1-based, warm-up included) whose loss is also computed in fp32")
    p.add_argument("--qlora", action="store_true",
                   help="base weights in bitsandbytes NF4 (double quant, bf16 compute)")
    p.add_argument("--attention-mask", action="store_true",
                   help="pass an all-ones attention_mask with every batch (as HF Trainer does)")
    p.add_argument("--pad-right", type=int, default=0, metavar="N",
                   help="an attention_mask that right-pads rows 2.. of each batch by 1..N tokens "
                        "(labels -100 there), as a padding collator does; needs --batch >= 2")
    p.add_argument("--pad-left", type=int, default=0, metavar="N",
                   help="the same padding at the start of the rows (padding_side='left')")
    p.add_argument("--no-autocast", action="store_true", help="no bf16 autocast (CPU smoke)")
    p.add_argument("--lorafuse-options", default="",
                   help="JSON dict passed as torch.compile(options=...) to the lorafuse variant")
    p.add_argument("--lorafuse-config", action="append", default=[], metavar="TAG=JSON",
                   help='a variant "lorafuse:TAG" runs with {"options": {...}, "env": {...}} '
                        "(backend options; environment of its process)")
    p.add_argument("--peak-tflops", type=float, default=763.5,
                   help="bf16 matmul TFLOP/s for the ceiling (H200, measured: 763.5)")
    p.add_argument("--variant-timeout", type=float, default=1800,
                   help="seconds one variant may take (load, compile, steps)")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds for the whole run (0: none); variants that would not fit "
                        "are skipped and the tables still print")
    p.add_argument("--cold-compile", action="store_true",
                   help="give each compiled variant an empty TORCHINDUCTOR_CACHE_DIR, so its "
                        "compile time does not profit from kernels an earlier variant cached")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed steps, profile N more steps: GPU time per kernel "
                        "category and the top kernels, per variant (in the JSON and stderr)")
    p.add_argument("--memory-snapshot", metavar="FILE",
                   help="record the CUDA allocator's history of the warm-up steps and of the timed "
                        "steps and dump them to FILE with .warmup/.timed before its suffix (with "
                        "more than one warm-up step, step 1 apart in .step1 and .warmup from "
                        "step 2 on; {variant} is replaced); bench/memory_peak.py reads them")
    p.add_argument("--json", help="write everything (args, env, every loss) to this file")
    p.add_argument("--md", help="also write the printed markdown to this file")
    p.add_argument("--sync-each-step", action="store_true",
                   help="read each step's loss on the host (isnan/isinf, as HF Trainer's "
                        "default logging_nan_inf_filter does): the GPU waits for the host's "
                        "launches at every step start")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="run the variant list N times, interleaved, each variant a fresh "
                        "process every time; a table gives each variant's tok/s per round, "
                        "median and spread (session 15: one configuration measured 3.3 %% "
                        "apart in two processes). The fp32 reference and the loss tables "
                        "use round 1")
    p.add_argument("--_round", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.lorafuse_configs = {}
    for spec in args.lorafuse_config:
        tag, _, text = spec.partition("=")
        args.lorafuse_configs[tag] = json.loads(text)
    unknown = [v for v in args.variants if v.split(":")[0] not in VARIANTS
               or (":" in v and (not v.startswith("lorafuse:")
                                 or v.split(":", 1)[1] not in args.lorafuse_configs))]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    shape = SHAPES[args.shape]
    args.batch = args.batch or shape["batch"]
    args.seq = args.seq or shape["seq"]
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (step 1 includes the compile and is not timed)")
    if args.pad_right and args.pad_left:
        p.error("--pad-right and --pad-left exclude each other")
    for side, n in (("right", args.pad_right), ("left", args.pad_left)):
        if n and not (args.batch >= 2 and 0 < n < args.seq):
            p.error(f"--pad-{side} {n} needs --batch >= 2 (row 1 stays unpadded) and "
                    f"1 <= N < --seq ({args.seq})")
    if args.ref is None:  # the fp32 reference of an 8B model costs minutes: asked for there
        args.ref = not args.shape.endswith("8b")
    total = args.warmup + args.steps
    steps = set()
    for part in (s.strip() for s in args.ref_steps.split(",")):
        lo, _, hi = part.partition("-")  # "1-20" is every step from 1 to 20
        if part:
            steps |= set(range(int(lo), int(hi or lo) + 1))
    args.ref_steps = sorted(s for s in steps if 1 <= s <= total) if args.ref else []
    args.ref_variants = [v.strip() for v in args.ref_variants.split(",") if v.strip()] \
        or args.variants
    return args


def main() -> int:
    args = parse_args()
    if args._child:
        child_main(args)
        return 0
    if args.steps < 1:  # bench_context's one-step fit runs call child_train directly
        print("bench_train.py: error: --steps must be at least 1 (the tables are tokens/s)",
              file=sys.stderr)
        return 2

    t_start = time.time()

    def remaining():
        return args.time_budget - (time.time() - t_start) if args.time_budget else None

    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "commit": git_commit(), "shape": args.shape, "qlora": args.qlora,
            "gflop_per_token": flops_per_token(args) / 1e9}
    log(f"shape {args.shape}, variants {args.variants}, commit {meta['commit']}, "
        f"{meta['gflop_per_token']:.3g} GFLOP/token")
    results = []

    def finish(ref):
        for r in results:
            if "error" in r or not ref.get(r["variant"]):
                continue
            deltas = {}
            for step, r32 in ref[r["variant"]].items():
                if step <= len(r["losses"]):
                    deltas[step] = r["losses"][step - 1] - r32
            r["ref_loss"] = ref[r["variant"]]
            r["ref_delta"] = deltas
            if deltas:
                r["ref_max_abs_delta"] = max(abs(d) for d in deltas.values())
        try:
            text = render(args, meta, results, ref)
        except Exception:  # never lose the numbers to a formatting bug
            log(f"rendering the tables failed:\n{traceback.format_exc()}")
            text = "\n".join(f"{r.get('variant')}: tok/s {r.get('tok_s')}, peak GiB "
                              f"{r.get('peak_gib')}, compile s {r.get('compile_s')}, "
                              f"max abs dloss {r.get('ref_max_abs_delta')}, "
                              f"error {r.get('error')}" for r in results) + "\n"
        if args.json:
            payload = {"meta": meta, "args": {k: v for k, v in vars(args).items()
                                              if not k.startswith("_")},
                       "results": results, "ref": ref}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
        if args.md:
            Path(args.md).parent.mkdir(parents=True, exist_ok=True)
            Path(args.md).write_text(text)
        return text

    if args.qlora and importlib.util.find_spec("bitsandbytes") is None:
        msg = ("--qlora needs bitsandbytes, which is not importable here "
               "(on the GPU machine: carry .whl/base.tgz, see bench/README.md)")
        log(msg)
        results = [{"variant": v, "error": msg} for v in args.variants]
        print(finish({}), flush=True)
        return 1

    build = run_child(args, "build", timeout=remaining() or 3600)
    meta["env"] = build.get("env", {})
    meta["build"] = {k: v for k, v in build.items() if k != "env"}
    if "error" in build:
        log(f"building the model failed: {build['error']}")
        results = [{"variant": v, "error": f"model build failed: {build['error']}"}
                   for v in args.variants]
        print(finish({}), flush=True)
        return 1

    for variant in args.variants:  # no stale LoRA snapshots from an earlier run
        snapshot_path(args, variant).unlink(missing_ok=True)
    for rnd in range(1, args.rounds + 1):  # rounds interleaved: A B A B, not A A B B
        for variant in args.variants:
            name = variant if rnd == 1 else f"{variant}#{rnd}"
            left = remaining()
            if left is not None and left < 60:
                results.append({"variant": name, "base": variant, "round": rnd,
                                "error": f"skipped: time budget ({left:.0f} s left)"})
                continue
            timeout = min(args.variant_timeout, left - 20) if left is not None \
                else args.variant_timeout
            log(f"=== {name} (timeout {timeout:.0f} s)")
            r = run_child(args, variant, timeout, extra=["--_round", str(rnd)])
            r.update(variant=name, base=variant, round=rnd)
            results.append(r)
            finish({})  # partial results survive a kill of this process

    ref = {}
    with_snaps = [r["variant"] for r in results if r.get("snapshot_steps") and "error" not in r]
    if args.ref and with_snaps:
        left = remaining()
        if left is not None and left < 45:
            meta["ref_error"] = f"skipped: time budget ({left:.0f} s left)"
        else:
            log("=== fp32 reference")
            out = run_child(args, "ref", timeout=(left - 10) if left is not None else 3600,
                            extra=["--variants", ",".join(with_snaps)])
            if "error" in out:
                meta["ref_error"] = out["error"]
                log(f"fp32 reference failed: {out['error']}")
            else:
                ref = {v: {int(k): x for k, x in steps.items()} for v, steps in out["ref"].items()}
    print(finish(ref), flush=True)
    log(f"done in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
