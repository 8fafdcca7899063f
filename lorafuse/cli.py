"""The ``lorafuse`` command.

``lorafuse finetune``: LoRA / QLoRA fine-tuning of a local Hugging Face model on a JSONL file,
with the HF ``Trainer`` and the model compiled by the lorafuse backend; the adapters and the
tokenizer are saved to ``--out``. ``lorafuse export-gguf`` and ``lorafuse demo`` forward their
arguments to ``lorafuse.export`` and ``lorafuse.demo``.

Mistakes in the command line or the inputs are reported as one message and a non-zero exit,
with no traceback (``UserError``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .passes import DEFAULT_PASSES, PASSES

IGNORE_INDEX = -100  # labels the loss skips (HF's cross-entropy ignore_index)
_GiB = 2**30


class UserError(Exception):
    """A mistake in the command line or the inputs: printed as one message, exit status 1."""


# --------------------------------------------------------------------------- data

_FORMATS = '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}'
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _expect_string(where: str, rec: dict, key: str, allow_empty: bool = False) -> None:
    value = rec[key]
    if not isinstance(value, str):
        raise UserError(f'{where}: "{key}" should be a string, found {_json_type(value)}: {json.dumps(value)[:60]}')
    if not value and not allow_empty:
        raise UserError(f'{where}: "{key}" is empty')


def _check_record(where: str, rec) -> str:
    """The format of one parsed JSONL record ("text", "prompt_completion" or "messages"),
    or a UserError saying what was expected and what was found."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object ({_FORMATS}), found {_json_type(rec)}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            found = "an empty array" if msgs == [] else _json_type(msgs)
            raise UserError(f'{where}: "messages" should be a non-empty array of '
                            f'{{"role": ..., "content": ...}} objects, found {found}')
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise UserError(f'{where}: messages[{i}] should be an object with string "role" and '
                                f'"content", found {json.dumps(m)[:80]}')
        return "messages"
    if "prompt" in rec or "completion" in rec:
        missing = [k for k in ("prompt", "completion") if k not in rec]
        if missing:
            raise UserError(f'{where}: a prompt/completion example needs both "prompt" and "completion"; '
                            f'"{missing[0]}" is missing (found keys {sorted(rec)})')
        _expect_string(where, rec, "prompt", allow_empty=True)
        _expect_string(where, rec, "completion")
        return "prompt_completion"
    if "text" in rec:
        _expect_string(where, rec, "text")
        return "text"
    raise UserError(f"{where}: expected one of {_FORMATS}; found keys {sorted(rec)}")


def read_jsonl(path: Path) -> list[tuple[str, dict, str]]:
    """The examples of a JSONL file as (``file:line``, record, format), each checked; blank
    lines skipped."""
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    records = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                f"each line should be one JSON object: {_FORMATS}") from None
            records.append((where, rec, _check_record(where, rec)))
    if not records:
        raise UserError(f"{path}: no examples (the file is empty); each line should be one JSON "
                        f"object: {_FORMATS}")
    return records


def tokenize_example(tokenizer, rec: dict, where: str = "example") -> dict:
    """``input_ids`` and ``labels`` of one record (untruncated). Labels are the input ids (the
    model shifts them), with IGNORE_INDEX on a prompt: prompt/completion trains on the completion
    only; "text" and "messages" train on every token. An EOS ends "text" and completions."""
    eos = tokenizer.eos_token_id
    if "messages" in rec:
        if not tokenizer.chat_template:
            raise UserError(f'{where}: "messages" examples need the tokenizer\'s chat template, and '
                            f"this tokenizer has none (use \"text\" or \"prompt\"/\"completion\")")
        text = tokenizer.apply_chat_template(rec["messages"], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has them
        return {"input_ids": ids, "labels": list(ids)}
    if "text" in rec:
        ids = tokenizer(rec["text"])["input_ids"]
        if eos is not None and ids[-1:] != [eos]:
            ids = ids + [eos]
        return {"input_ids": ids, "labels": list(ids)}
    prompt = tokenizer(rec["prompt"])["input_ids"] if rec["prompt"] else []
    completion = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"]
    if eos is not None and completion[-1:] != [eos]:
        completion = completion + [eos]
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


def pad_collate(examples: list[dict], length: int, pad_id: int) -> dict:
    """A batch padded on the right to ``length`` (one length for the whole run, so the model
    compiles once): ``attention_mask`` 0 and labels IGNORE_INDEX on the padding."""
    n = len(examples)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, ex in enumerate(examples):
        k = len(ex["input_ids"])
        ids[i, :k] = torch.tensor(ex["input_ids"])
        labels[i, :k] = torch.tensor(ex["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _Collator:
    def __init__(self, length: int, pad_id: int):
        self.length, self.pad_id = length, pad_id

    def __call__(self, examples):
        return pad_collate(examples, self.length, self.pad_id)


def load_dataset(path: Path, tokenizer, seq_len: int) -> tuple[list[dict], dict]:
    """Tokenized examples truncated to ``seq_len``, and facts for the log: the formats found,
    how many were truncated, how many dropped because truncation left nothing to train on."""
    examples, formats, truncated, dropped = [], set(), 0, 0
    for where, rec, fmt in read_jsonl(path):
        formats.add(fmt)
        ex = tokenize_example(tokenizer, rec, where)
        if len(ex["input_ids"]) > seq_len:
            truncated += 1
            ex = {k: v[:seq_len] for k, v in ex.items()}
        if all(lab == IGNORE_INDEX for lab in ex["labels"]):
            dropped += 1  # a prompt that fills seq_len: no completion token left
            continue
        examples.append(ex)
    if not examples:
        raise UserError(f"{path}: every example's prompt is at least --seq-len {seq_len} tokens long, "
                        "so no completion token is left to train on; raise --seq-len")
    return examples, {"formats": sorted(formats), "truncated": truncated, "dropped": dropped}


# --------------------------------------------------------------------------- memory estimate

_QLORA_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # nf4 + 8-bit absmax/64 + fp32 per 256 absmax
_CUDA_OVERHEAD = 0.5 * _GiB  # CUDA context, cuBLAS workspaces, allocator slack


@dataclass
class ModelSizes:
    """What the memory estimate needs to know of a model: parameter counts and shape."""
    linear: int  # weights of the linears other than the output layer (4-bit with --qlora)
    other: int  # every other parameter (embeddings, norms, lm_head, biases): model dtype
    lora_per_rank: int  # sum of in + out features of the linears LoRA adapts
    hidden: int
    intermediate: int
    layers: int
    vocab: int


def model_sizes(config, target_modules) -> ModelSizes:
    """Counted exactly from the model built on the meta device (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out_emb = model.get_output_embeddings()
    linear = lora_per_rank = 0
    counted = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not out_emb:
            linear += module.weight.numel()
            counted.add(id(module.weight))
            if target_modules == "all-linear" or name.split(".")[-1] in target_modules:
                lora_per_rank += module.in_features + module.out_features
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    text = config.get_text_config()
    return ModelSizes(linear, other, lora_per_rank, text.hidden_size,
                      getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
                      text.num_hidden_layers, text.vocab_size)


def estimate_memory(sizes: ModelSizes, *, qlora: bool, lora_r: int, batch_size: int, seq_len: int,
                    dtype_bytes: int = 2) -> dict:
    """Bytes a training run needs on the GPU, by part: a rough estimate of PEFT training
    without gradient checkpointing. At the Llama-3.1-8B shape, batch 2 × 2048, bf16: 45.0 GiB,
    where eager PEFT measured 48.0 GiB and lorafuse 35.5 GiB (bench/RESULTS.md)."""
    tokens = batch_size * seq_len
    # kept for the backward per token and layer: ~10 hidden-sized tensors (norm inputs and
    # their fp32 copies, q/k/v, attention output, residuals) and 4 intermediate-sized (gate, up,
    # act, act*up); the logits: model-dtype output, fp32 copy for the loss and its gradient
    per_token_layer = (10 * sizes.hidden + 4 * sizes.intermediate) * dtype_bytes
    parts = {
        "weights": int(sizes.linear * (_QLORA_BYTES_PER_WEIGHT if qlora else dtype_bytes)
                       + sizes.other * dtype_bytes),
        "lora": lora_r * sizes.lora_per_rank * 16,  # fp32 parameter, gradient, AdamW's two moments
        "activations": tokens * (sizes.layers * per_token_layer + sizes.vocab * (dtype_bytes + 8)),
        "overhead": _CUDA_OVERHEAD,
    }
    parts["total"] = sum(parts.values())
    return parts


def check_gpu_memory(sizes: ModelSizes, args, seq_len: int, total_memory: int, dtype_bytes: int) -> int:
    """The estimated bytes of the run, or a UserError naming what would fit in ``total_memory``."""
    def need(**changes):
        kw = dict(qlora=args.qlora, lora_r=args.lora_r, batch_size=args.batch_size, seq_len=seq_len,
                  dtype_bytes=dtype_bytes)
        return estimate_memory(sizes, **{**kw, **changes})["total"]

    needed = need()
    if needed <= total_memory:
        return needed
    fits = []
    qlora_fits = not args.qlora and need(qlora=True) <= total_memory
    if qlora_fits:
        fits.append(f"--qlora (about {need(qlora=True) / _GiB:.1f} GiB)")
    accum = args.grad_accum * args.batch_size  # per step, kept by a smaller --batch-size
    # the largest batch and the longest sequence that fit; with --qlora too where needed
    for qlora in (args.qlora,) if args.qlora or qlora_fits else (False, True):
        flag = "--qlora " if qlora and not args.qlora else ""
        bs = args.batch_size // 2
        while bs >= 1 and need(qlora=qlora, batch_size=bs) > total_memory:
            bs //= 2
        if bs >= 1:
            fits.append(f"{flag}--batch-size {bs} --grad-accum {accum // bs} (same batch per step; "
                        f"about {need(qlora=qlora, batch_size=bs) / _GiB:.1f} GiB)")
        s = seq_len // 2
        while s >= 64 and need(qlora=qlora, seq_len=s) > total_memory:
            s //= 2
        if s >= 64:
            fits.append(f"{flag}--seq-len {s} (truncates longer examples; about "
                        f"{need(qlora=qlora, seq_len=s) / _GiB:.1f} GiB)")
        if bs >= 1:
            break
    if not fits:  # all three together
        s = seq_len // 2
        while s >= 64 and need(qlora=True, batch_size=1, seq_len=s) > total_memory:
            s //= 2
        if s >= 64:
            fits.append(f"{'' if args.qlora else '--qlora '}--batch-size 1 --grad-accum {accum} --seq-len {s} "
                        f"(about {need(qlora=True, batch_size=1, seq_len=s) / _GiB:.1f} GiB)")
    hint = ("would fit: " + "; or ".join(fits) if fits else
            "nothing smaller fits: even --qlora --batch-size 1 --seq-len 64 needs about "
            f"{need(qlora=True, batch_size=1, seq_len=64) / _GiB:.1f} GiB")
    raise UserError(f"this run needs about {needed / _GiB:.1f} GiB of GPU memory (estimated: "
                    f"{'4-bit' if args.qlora else 'model-dtype'} weights, LoRA parameters with AdamW "
                    f"state, activations of batch {args.batch_size} × {seq_len} tokens), and the GPU has "
                    f"{total_memory / _GiB:.1f} GiB; {hint}. (--skip-memory-check runs it anyway.)")


# --------------------------------------------------------------------------- training

def _peak_memory() -> str:
    if torch.cuda.is_available():
        return f"peak {torch.cuda.max_memory_allocated() / _GiB:.2f} GiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def _step_printer(compiling: bool):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StepPrinter(TrainerCallback):
        """A progress bar and, after each optimizer step, one line: loss, tokens/s (non-padding
        tokens; the first step includes compiling), peak memory."""

        def __init__(self):
            self.losses, self.step_times, self.step_tokens = [], [], []

        def on_train_begin(self, args, state, control, **kw):
            self.bar = None  # made after the first step: compiling prints its report meanwhile
            self.t_last, self.tokens_last = time.perf_counter(), state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return  # the end-of-training summary Trainer logs
            now = time.perf_counter()  # logging reads the loss: the step has finished on the GPU
            dt, tokens = now - self.t_last, state.num_input_tokens_seen - self.tokens_last
            self.t_last, self.tokens_last = now, state.num_input_tokens_seen
            self.losses.append(logs["loss"])
            self.step_times.append(dt)
            self.step_tokens.append(tokens)
            note = "  (with compiling)" if compiling and len(self.losses) == 1 else ""
            if self.bar is None:
                self.bar = tqdm(total=state.max_steps, desc="training", unit="step", dynamic_ncols=True)
            self.bar.write(f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                           f"{tokens / dt:,.0f} tokens/s  {_peak_memory()}{note}")
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
            self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return StepPrinter()


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model_dir}: could not load a tokenizer from it ({e})") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"--model {model_dir}: the tokenizer has neither a pad nor an EOS token "
                            "to pad batches with")
        tok.pad_token = tok.eos_token
    return tok


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def _make_temporary_out(out: Path) -> Path:
    """A fresh folder next to ``out`` to train into (renamed to ``out`` once complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; --out gets the usual permissions
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``, replacing what was there."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "out")
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)  # onto a missing or empty folder


def finetune(args) -> int:
    from transformers import AutoConfig

    from .backend import Options

    model_dir, out = Path(args.model), Path(args.out)
    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir}: no such folder (a local Hugging Face model folder, "
                        "as saved by save_pretrained)")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir}: no config.json in it (a local Hugging Face model folder, "
                        "as saved by save_pretrained)")
    cuda = torch.cuda.is_available()
    if args.qlora:
        if not cuda:
            raise UserError("--qlora needs a CUDA GPU (bitsandbytes 4-bit training); none is available")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--qlora needs bitsandbytes: pip install 'lorafuse[qlora]'")
    options = {"verbose": True, **({"passes": tuple(args.passes)} if args.passes else {})}
    try:
        Options.parse(options)
    except ValueError as e:
        raise UserError(f"--passes: {e}") from None
    options.update(_backend_options(args.option))
    try:
        Options.parse(options)
    except (ValueError, TypeError) as e:
        raise UserError(f"--option: {e}") from None
    _check_out(out, args.overwrite)

    tokenizer = _load_tokenizer(model_dir)
    examples, facts = load_dataset(Path(args.data), tokenizer, args.seq_len)
    if len(examples) < args.batch_size:
        raise UserError(f"{args.data}: {len(examples)} usable examples, fewer than --batch-size "
                        f"{args.batch_size}")
    longest = max(len(ex["input_ids"]) for ex in examples)
    length = min(-(-longest // 8) * 8, args.seq_len)  # a multiple of 8 where --seq-len allows
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    max_pos = getattr(config.get_text_config(), "max_position_embeddings", None)
    if max_pos and length > max_pos:
        raise UserError(f"examples are up to {length} tokens, and the model takes at most {max_pos} "
                        f"positions: pass --seq-len {max_pos}")

    bf16 = cuda and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    where = "cpu"
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        where = f"cuda:{torch.cuda.current_device()} ({props.name}, {props.total_memory / _GiB:.0f} GiB"
        if args.skip_memory_check:
            where += ", memory check skipped)"
        else:
            sizes = model_sizes(config, args.target_modules)
            needed = check_gpu_memory(sizes, args, length, props.total_memory, dtype.itemsize)
            where += f"; this run needs about {needed / _GiB:.1f} GiB)"

    tmp = _make_temporary_out(out)
    try:
        model = _load_model(args, model_dir, config, dtype, bf16)
        _print_plan(args, model, config, bf16, where, examples, facts, length)
        if not args.no_compile:
            model.compile(backend="lorafuse", options=options)
        printer = _train(args, model, tmp / "trainer", examples, length, tokenizer.pad_token_id, bf16)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)  # Trainer's output_dir: nothing we keep
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _print_summary(printer, out, args.no_compile)
    return 0


def _load_model(args, model_dir: Path, config, dtype, bf16: bool):
    """The model from ``model_dir`` (4-bit NF4 with --qlora) with LoRA adapters added."""
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.set_seed(args.seed)  # LoRA's random init
    load_kw = dict(dtype=dtype, local_files_only=True, use_cache=False)
    if torch.cuda.is_available():
        load_kw["device_map"] = {"": torch.cuda.current_device()}
    if args.qlora:
        load_kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
    if config.model_type == "gemma2":
        load_kw["attn_implementation"] = "eager"  # its softcapped attention (README)
    try:
        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **load_kw)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model_dir}: could not load the model ({e})") from None
    if config.model_type == "gpt2":
        base.loss_type = "ForCausalLM"  # its default loss logs a warning that breaks the graph
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(base, lora)
    except ValueError as e:  # e.g. target modules not found in the model
        raise UserError(f"--target-modules: {e}") from None


def _print_plan(args, model, config, bf16, where, examples, facts, length) -> None:
    n_all = sum(p.numel() for p in model.parameters())
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cut = [f"{facts['truncated']} truncated to --seq-len {args.seq_len}"] if facts["truncated"] else []
    if facts["dropped"]:
        cut.append(f"{facts['dropped']} dropped: no completion token left within --seq-len")
    steps = f"{args.max_steps} steps" if args.max_steps else f"{args.epochs:g} epochs"
    compiled = ("--no-compile: eager PyTorch, no lorafuse fusion" if args.no_compile else
                'compiled with backend="lorafuse" at the first step; its report follows')
    print(f"lorafuse finetune: {args.model} ({config.model_type}, {n_all / 1e6:,.2f}M params"
          f"{', 4-bit' if args.qlora else ''}, {'bf16' if bf16 else 'fp32'}) on {where}\n"
          f"  LoRA r={args.lora_r} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g} on "
          f"{args.target_modules}: {n_lora:,} trainable parameters\n"
          f"  data: {len(examples)} examples ({', '.join(facts['formats'])}) from {args.data}, padded to "
          f"{length} tokens{' (' + '; '.join(cut) + ')' if cut else ''}\n"
          f"  {steps}, batch {args.batch_size} × grad-accum {args.grad_accum}, lr {args.lr:g}; {compiled}",
          flush=True)


def _train(args, model, output_dir: Path, examples, length: int, pad_id: int, bf16: bool):
    """Train ``model`` with HF Trainer; the StepPrinter that watched it, with its figures."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    targs = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        max_steps=args.max_steps or -1, num_train_epochs=args.epochs, bf16=bf16,
        use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", report_to=[],
        seed=args.seed, dataloader_num_workers=0,
        dataloader_drop_last=True,  # one batch shape: no recompile for a last, smaller batch
        remove_unused_columns=False, label_names=["labels"],
        include_num_input_tokens_seen="non_padding", disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=examples,
                      data_collator=_Collator(length, pad_id))
    trainer.remove_callback(PrinterCallback)  # the StepPrinter prints instead
    trainer.remove_callback(ProgressCallback)
    printer = _step_printer(compiling=not args.no_compile)
    trainer.add_callback(printer)
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        raise UserError(f"out of GPU memory while training ({_peak_memory()}); try --qlora, a smaller "
                        "--batch-size (with a larger --grad-accum) or a smaller --seq-len") from None
    return printer


def _print_summary(printer, out: Path, no_compile: bool) -> None:
    from torch._dynamo.utils import counters

    losses, times, tokens = printer.losses, printer.step_times, printer.step_tokens
    steady = (f"{sum(tokens[1:]) / sum(times[1:]):,.0f} tokens/s after the first step"
              if len(times) > 1 else f"{tokens[0] / times[0]:,.0f} tokens/s")
    fused = "" if no_compile else "; lorafuse fused " + (", ".join(
        f"{k} {v}" for k, v in counters["lorafuse"].items() if not k.endswith("_skipped") and v)
        or "nothing")
    print(f"done: {len(losses)} steps in {sum(times):.1f} s (first step {times[0]:.1f} s"
          f"{'' if no_compile else ', with compiling'}), loss {losses[0]:.4f} → {losses[-1]:.4f}, "
          f"{steady}, {_peak_memory()}{fused}; adapters and tokenizer saved to {out}", flush=True)


# --------------------------------------------------------------------------- command line

def _csv(values):
    return [v for item in values for v in item.split(",") if v]


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="LoRA / QLoRA fine-tuning with HF Trainer, compiled by lorafuse",
                       description="LoRA / QLoRA fine-tuning of a local Hugging Face causal LM on a JSONL "
                                   "file, with HF Trainer and the model compiled by the lorafuse backend; "
                                   "saves the adapters and the tokenizer to --out.")
    p.add_argument("--model", required=True, help="local model folder (config.json, weights, tokenizer)")
    p.add_argument("--data", required=True,
                   help='JSONL, one example a line: {"text"}, {"prompt", "completion"} (loss on the '
                        'completion only) or {"messages": [{"role", "content"}, ...]} (chat template)')
    p.add_argument("--out", required=True, help="folder for the adapters and tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--qlora", action="store_true", help="4-bit NF4 base weights (bitsandbytes; CUDA only)")
    p.add_argument("--lora-r", type=_positive(int), default=16, metavar="R", help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=_positive(float), default=16, metavar="A",
                   help="LoRA alpha: the update is scaled by alpha / r (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.0, metavar="P", help="(default 0)")
    p.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
                   help="module names to adapt (e.g. q_proj v_proj), or all-linear (default)")
    p.add_argument("--max-steps", type=_positive(int), default=None, metavar="N",
                   help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=_positive(float), default=1.0, metavar="E", help="(default 1)")
    p.add_argument("--lr", type=_positive(float), default=2e-4, help="learning rate (default 2e-4)")
    p.add_argument("--batch-size", type=_positive(int), default=4, metavar="B",
                   help="examples per forward pass (default 4)")
    p.add_argument("--grad-accum", type=_positive(int), default=1, metavar="K",
                   help="forward passes per optimizer step (default 1)")
    p.add_argument("--seq-len", type=_positive(int), default=2048, metavar="T",
                   help="longest example in tokens; longer ones are truncated (default 2048)")
    p.add_argument("--no-compile", action="store_true", help="train eagerly, without lorafuse")
    p.add_argument("--passes", nargs="+", default=None, metavar="PASS",
                   help=f"lorafuse passes to run (default: {' '.join(DEFAULT_PASSES)}; "
                        f"available: {' '.join(PASSES)})")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a lorafuse backend option (README, Options), VALUE read as JSON where it "
                        "parses, else as text; repeatable, e.g. --option activation_dtype=fp8 "
                        "--option offload_activations=true --option memory_budget=0.5")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="start even when the GPU memory estimate says the run does not fit")


def _backend_options(pairs) -> dict:
    """``["k=v", ...]`` from ``--option`` → ``{k: v}``, v as JSON where it parses."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--option {pair!r}: expected KEY=VALUE")
        if key in ("passes", "verbose"):
            raise UserError(f"--option {key}: use --passes (the report is always printed)")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def _run_export(argv) -> int:
    try:
        export = importlib.import_module("lorafuse.export")
    except ModuleNotFoundError as e:
        if e.name != "lorafuse.export":
            raise
        raise UserError("export-gguf is not available: this lorafuse install has no lorafuse.export "
                        "module") from None
    return export.main(argv)


def _run_demo(argv) -> int:
    from . import demo

    return demo.main(argv)


_FORWARDED = {"export-gguf": _run_export, "demo": _run_demo}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="lorafuse", description="LoRA / QLoRA fine-tuning with the "
                                     "lorafuse torch.compile backend.")
    sub = parser.add_subparsers(dest="command", metavar="{finetune,export-gguf,demo}")
    _finetune_parser(sub)
    sub.add_parser("export-gguf", help="merge adapters into the model and write a GGUF file "
                   "(lorafuse export-gguf --help)", add_help=False)
    sub.add_parser("demo", help="eager vs lorafuse on a small generated-text run (lorafuse demo --help)",
                   add_help=False)
    try:
        if argv and argv[0] in _FORWARDED:  # their own parsers read the rest
            return _FORWARDED[argv[0]](argv[1:])
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        args.target_modules = _csv(args.target_modules)
        if args.target_modules == ["all-linear"]:
            args.target_modules = "all-linear"
        args.passes = _csv(args.passes) if args.passes else None
        return finetune(args)
    except UserError as e:
        print(f"lorafuse {argv[0]}: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
