"""lorafuse: a torch.compile backend for fast, lean LoRA / QLoRA fine-tuning."""

__version__ = "0.1.0"
