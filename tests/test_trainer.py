"""The README's Trainer recipe: ``model.compile(backend="lorafuse")``, then HF Trainer."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import lora_sites, make_tiny_model, reset_dynamo


def _train(model, tmp_path, name):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (12, 16), generator=g)]
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
