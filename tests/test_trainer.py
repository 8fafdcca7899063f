"""HF ``Trainer`` and TRL's ``SFTTrainer`` on a PEFT model compiled in place with lorafuse
(the README's recipe: ``model.compile(backend="lorafuse")`` before the trainer) give the
eager run's losses.

A tiny random Llama (one layer) in fp32 on CPU, so compiled and eager runs agree to a few
ulps: losses 1e-5 relative (measured 1e-7), LoRA weights after the AdamW steps 1e-4 of
the largest (measured 1e-6; AdamW amplifies ulps where a gradient is tiny, test_models.py).
What the runs cover:
- ``Trainer``: padded batches (right padding, ``attention_mask``, labels -100 on pads, from
  transformers' ``DataCollatorForLanguageModeling``), gradient accumulation, evaluation
  steps, a checkpoint at step 2, and a second compiled model resumed from that checkpoint
  whose step 3 (loss, and weights after it) must be the uninterrupted run's.
- ``SFTTrainer``: ``packing=True`` (padding-free: one row of documents whose position_ids
  restart at 0, no ``attention_mask``) with the ``masked_attention`` pass (a default), gradient
  accumulation; and the packed row's per-token log-probabilities against each document run
  alone, so documents provably do not attend to each other.
CPU compiles cost seconds each, so each run is made once (``run_once``) and the tests
inspect its record; test_workflow.py reuses the Trainer run's trained models.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import assert_close_fp32, lora_params, lora_sites, make_tiny_model, reset_dynamo
from conftest import run_once

pytestmark = pytest.mark.slow

LAYERS = 1
SEQ = 16
STEPS = 3
LR = 1e-2
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
TRAJ_RTOL = 1e-4  # LoRA weights of independently trained copies (measured 1e-6)
_WORDS = "the cat dog bird sat ran saw on a mat log big red".split()
_RUNS: dict = {}


def make_tokenizer():
    """A character-level tokenizer built here (no download): 32 ids, within the model's vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in string.ascii_lowercase + " .,":
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def make_texts(n: int, seed: int, max_chars: int = SEQ) -> list[str]:
    """Random word sequences of 5..max_chars characters: most rows of a batch get padding."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(8))
        texts.append(words[: rng.randint(5, max_chars)])
    return texts


def tiny_model():
    return make_tiny_model("llama", layers=LAYERS)


# --------------------------------------------------------------------------- HF Trainer


@dataclass
class TrainerRun:
    model: object
    out_dir: object
    losses: list
    eval_losses: list
    lorafuse: dict = field(default_factory=dict)  # counters["lorafuse"] after a compiled run
    graph_breaks: int = 0


def _hf_train(model, out_dir, resume_from=None) -> TrainerRun:
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = make_tokenizer()
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        per_device_eval_batch_size=2, max_steps=STEPS, learning_rate=LR, logging_steps=1,
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, seed=0,
        use_cpu=True, report_to=[], dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(
        model=model, args=args,
        train_dataset=[tok(t) for t in make_texts(2 * 2 * STEPS, seed=1)],
        eval_dataset=[tok(t) for t in make_texts(4, seed=2)],
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False, pad_to_multiple_of=SEQ))
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    hist = trainer.state.log_history
    return TrainerRun(model, out_dir,
                      losses=[(h["step"], h["loss"]) for h in hist if "loss" in h],
                      eval_losses=[(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h])


def _hf_runs(tmp) -> dict:
    reset_dynamo()
    runs = {"eager": _hf_train(tiny_model(), tmp / "eager")}
    model = tiny_model()
    model.compile(backend="lorafuse")  # in place: forward's signature stays visible to Trainer
    runs["compiled"] = run = _hf_train(model, tmp / "compiled")
    run.lorafuse = dict(counters["lorafuse"])
    run.graph_breaks = sum(counters["graph_break"].values())
    resumed = tiny_model()
    resumed.compile(backend="lorafuse")
    runs["resumed"] = _hf_train(resumed, tmp / "resumed",
                                resume_from=tmp / "compiled" / "checkpoint-2")
    return runs


def trainer_runs(tmp_path_factory) -> dict:
    """The Trainer runs, made once per session: ``eager``, ``compiled`` (both 3 steps) and
    ``resumed`` (compiled, from ``compiled``'s checkpoint-2). test_workflow.py uses them too."""
    return run_once(_RUNS, "hf", lambda: _hf_runs(tmp_path_factory.mktemp("hf_trainer")))


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    return trainer_runs(tmp_path_factory)


def _assert_losses_close(got: list, want: list, what: str) -> None:
    assert [s for s, _ in got] == [s for s, _ in want], (what, got, want)
    for (step, g), (_, w) in zip(got, want):
        assert torch.isfinite(torch.tensor(g)), (what, step, g)
        torch.testing.assert_close(g, w, **LOSS_TOL, msg=f"{what} at step {step}: {g} vs eager {w}")


def test_trainer_losses_match_eager(hf_runs):
    eager, compiled = hf_runs["eager"], hf_runs["compiled"]
    assert [s for s, _ in eager.losses] == list(range(1, STEPS + 1))
    _assert_losses_close(compiled.losses, eager.losses, "training loss")
    _assert_losses_close(compiled.eval_losses, eager.eval_losses, "eval loss")
    assert len(eager.eval_losses) >= 1


def test_trainer_compiles_the_whole_model_and_fuses_every_site(hf_runs):
    run = hf_runs["compiled"]
    sites = lora_sites(run.model)
    assert run.graph_breaks == 0
    # one graph for training and one for evaluation, each with every LoRA site fused
    assert run.lorafuse["lora"] >= 2 * sites and run.lorafuse["lora"] % sites == 0, run.lorafuse
    assert run.lorafuse["lora_skipped"] == 0, run.lorafuse


def test_trainer_checkpoint_matches_eager(hf_runs):
    from safetensors.torch import load_file

    name = "checkpoint-2/adapter_model.safetensors"
    want = load_file(hf_runs["eager"].out_dir / name)
    got = load_file(hf_runs["compiled"].out_dir / name)
    assert got.keys() == want.keys() and len(want) == 2 * lora_sites(hf_runs["eager"].model)
    for k in want:
        assert_close_fp32(got[k], want[k], rtol=TRAJ_RTOL, what=k)


def test_trainer_resumes_from_checkpoint(hf_runs):
    """A fresh compiled model resumed from checkpoint-2 continues the uninterrupted run."""
    full, resumed = hf_runs["compiled"], hf_runs["resumed"]
    new_steps = [(s, v) for s, v in resumed.losses if s > 2]
    assert [s for s, _ in new_steps] == [3]
    _assert_losses_close(new_steps, full.losses[2:], "resumed loss")
    want = lora_params(full.model)
    for name, p in lora_params(resumed.model).items():
        assert_close_fp32(p.detach(), want[name].detach(), what=name)


def test_torch_compile_backend_name_is_rejected_by_accelerate(tmp_path):
    """Why the README's recipe is ``model.compile(backend="lorafuse")``: Trainer builds
    Accelerate's ``TorchDynamoPlugin``, which checks the name against its fixed
    ``DynamoBackend`` enum. If this starts passing, Accelerate accepts registered backends
    and the README can offer ``TrainingArguments(torch_compile_backend="lorafuse")``."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), torch_compile_backend="lorafuse",
                             use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        Trainer(model=tiny_model(), args=args)


# --------------------------------------------------------------------------- TRL SFTTrainer


def _sft_train(model, out_dir):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out_dir), packing=True, max_length=SEQ, pad_to_multiple_of=2 * SEQ,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=STEPS,
        learning_rate=LR, logging_steps=1, save_strategy="no", seed=0, use_cpu=True,
        report_to=[], dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=False,  # TRL turns it on by default; it breaks graph capture
        bf16=False)  # TRL's default is bf16 autocast; fp32 here for a tight comparison
    texts = make_texts(4 * 2 * STEPS, seed=3, max_chars=SEQ - 2)  # two or three per packed row
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=make_tokenizer())
    trainer.train()
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return trainer, losses


def _sft_runs(tmp) -> dict:
    _, want = _sft_train(tiny_model(), tmp / "eager")
    counters.clear()
    model = tiny_model()
    model.compile(backend="lorafuse")  # the default passes, masked_attention among them
    trainer, got = _sft_train(model, tmp / "compiled")
    return dict(eager=want, compiled=got, lorafuse=dict(counters["lorafuse"]), model=model,
                packed=next(iter(trainer.get_train_dataloader())))


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    return run_once(_RUNS, "sft", lambda: _sft_runs(tmp_path_factory.mktemp("sft_trainer")))


def test_sft_packed_losses_match_eager(sft_runs):
    packed = sft_runs["packed"]
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts[0] == 0 and starts[1] > 1, "the row must hold several documents"
    assert [s for s, _ in sft_runs["eager"]] == list(range(1, STEPS + 1))
    _assert_losses_close(sft_runs["compiled"], sft_runs["eager"], "SFT packed loss")
    report = sft_runs["lorafuse"]
    assert report["lora"] >= lora_sites(sft_runs["model"]) and report["lora_skipped"] == 0, report
    assert report["masked_attention"] >= LAYERS, report


def test_sft_packed_documents_do_not_attend_to_each_other(sft_runs):
    """The compiled model's log-probabilities on a packed row, as SFTTrainer computes them,
    equal those of each document run alone through an eager copy of the same weights."""
    model, packed = sft_runs["model"], sft_runs["packed"]
    model.train()
    out = model(**packed, use_cache=False, fused_lm_head=True)  # SFTTrainer's call: its graph
    eager = tiny_model()
    eager.load_state_dict(model.state_dict())
    ids, pos = packed["input_ids"][0], packed["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [len(ids)]
    want = torch.zeros(len(ids) - 1)
    with torch.no_grad():
        for s, e in zip(starts, starts[1:]):
            if e - s < 2:
                continue
            logp = eager(input_ids=ids[None, s:e]).logits[0].log_softmax(-1)
            want[s:e - 1] = logp[:-1].gather(-1, ids[s + 1:e, None])[:, 0]
    mask = out.label_mask[0]
    assert mask.any() and not mask[[e - 1 for e in starts[1:-1]]].any()
    assert_close_fp32(out.log_probs[0][mask].detach(), want[mask], what="packed log-probs")
