"""The README's Trainer recipe: ``model.compile(backend="lorafuse")``, then HF Trainer."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import lora_sites, make_tiny_model, reset_dynamo


def _train(model, tmp_path, name, with_mask=False):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (12, 16), generator=g)]
    if with_mask:  # as a padding collator gives: all ones, and left padding in some rows
        for i, row in enumerate(data):
            mask = torch.ones(16, dtype=torch.long)
            mask[: 3 * (i % 3 == 1)] = 0
            row.update(attention_mask=mask, labels=row["labels"].masked_fill(mask == 0, -100))
    args = TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=3,
        logging_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
        seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
def test_trainer_with_compiled_model_matches_eager(tmp_path):
    reset_dynamo()
    eager = make_tiny_model("llama")
    fused = copy.deepcopy(eager)
    fused.compile(backend="lorafuse")  # in place: forward's signature stays visible to Trainer
    want = _train(eager, tmp_path, "eager")
    got = _train(fused, tmp_path, "lorafuse")
    assert counters["lorafuse"]["lora"] == lora_sites(eager)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-5 * abs(w), (got, want)
    reset_dynamo()


@pytest.mark.slow
def test_trainer_with_attention_masks_and_masked_attention(tmp_path):
    """The README's Trainer line for batches that carry an attention_mask (padded or not)."""
    reset_dynamo()
    eager = make_tiny_model("llama")
    fused = copy.deepcopy(eager)
    fused.compile(backend="lorafuse",
                  options={"passes": ("lora", "attention", "masked_attention")})
    want = _train(eager, tmp_path, "eager", with_mask=True)
    got = _train(fused, tmp_path, "lorafuse", with_mask=True)
    assert counters["lorafuse"]["masked_attention"] == eager.config.num_hidden_layers
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-5 * abs(w), (got, want)
    reset_dynamo()
