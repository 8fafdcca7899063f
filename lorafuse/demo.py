"""``python -m lorafuse.demo`` (or ``lorafuse``): fine-tune a small model with LoRA,
eagerly and under ``torch.compile(backend="lorafuse")``, and compare.

The model is built from a config shipped in the package (random init: nothing is
downloaded); the data is generated text, read byte by byte (vocab 256), so the run
needs no network. On CPU it uses a tiny model; on a GPU a larger one in bf16.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from importlib import resources

import torch

_WORDS = ("the cat dog bird fox sat ran saw ate on under near a mat log tree box "
          "red big small quick lazy happy and then").split()


def make_corpus(n_chars: int, seed: int = 0) -> bytes:
    """Sentences from a small grammar: learnable structure with no download."""
    rng = random.Random(seed)
    out = []
    while sum(map(len, out)) < n_chars:
        out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 9))).capitalize() + ". ")
    return "".join(out).encode()[:n_chars]


def build_model(size: str, device: str, dtype: torch.dtype, r: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = json.loads(resources.files("lorafuse").joinpath(f"configs/{size}_llama.json").read_text())
    cfg.pop("model_type")
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=dtype)
    lora = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(base, lora)


def train(model, batches, steps, device, autocast_dtype, label):
    from tqdm import tqdm

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses, first_step_s, t_start = [], None, None
    bar = tqdm(range(steps), desc=label, unit="step", dynamic_ncols=True)
    for i in bar:
        t0 = time.perf_counter()
        ids = batches[i % len(batches)]
        with torch.autocast(device, autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # syncs: each step is timed whole
        if i == 0:
            first_step_s, t_start = time.perf_counter() - t0, time.perf_counter()
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    elapsed = time.perf_counter() - t_start if steps > 1 else float("nan")
    tokens = batches[0].numel() * (steps - 1)
    return losses, first_step_s, tokens / elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=["tiny", "small"], default=None,
                   help="model config shipped in the package (default: tiny on CPU, small on GPU)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    size = args.size or ("small" if gpu else "tiny")
    steps = args.steps or (50 if gpu else 30)
    batch, seq = args.batch or (8 if gpu else 4), args.seq or (1024 if gpu else 64)
    dtype = torch.bfloat16 if gpu else torch.float32
    autocast_dtype = torch.bfloat16 if gpu else None

    corpus = torch.tensor(list(make_corpus(batch * seq * 8)), dtype=torch.long)
    batches = [corpus[i * batch * seq:(i + 1) * batch * seq].view(batch, seq).to(args.device)
               for i in range(8)]
    model = build_model(size, args.device, dtype, args.rank)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"lorafuse demo: {size} Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{n_train / 1e3:.0f}k trainable LoRA r={args.rank}) on {args.device}, "
          f"batch {batch}×{seq}, {steps} steps", flush=True)

    eager_model, fused_model = model, copy.deepcopy(model)
    l_eager, t1_eager, tps_eager = train(eager_model, batches, steps, args.device, autocast_dtype, "eager   ")
    compiled = torch.compile(fused_model, backend="lorafuse", options={"verbose": True})
    l_fused, t1_fused, tps_fused = train(compiled, batches, steps, args.device, autocast_dtype, "lorafuse")

    print("\nstep  eager      lorafuse   |Δ|")
    for i in sorted({0, 1, 2, steps // 4, steps // 2, 3 * steps // 4, steps - 1}):
        print(f"{i + 1:>4}  {l_eager[i]:.5f}  {l_fused[i]:.5f}  {abs(l_eager[i] - l_fused[i]):.2e}")
    print(f"\n{'':10}{'tokens/s':>12}{'first step (s)':>16}")
    print(f"{'eager':10}{tps_eager:>12,.0f}{t1_eager:>16.1f}")
    print(f"{'lorafuse':10}{tps_fused:>12,.0f}{t1_fused:>16.1f}   (first step includes compilation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
