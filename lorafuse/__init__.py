"""lorafuse: a torch.compile backend for fast, lean LoRA / QLoRA fine-tuning.

``torch.compile(model, backend="lorafuse")`` works after ``pip install lorafuse``
(the backend is registered through the ``torch_dynamo_backends`` entry point).
"""

__version__ = "0.3.0"

from .backend import Options, backend, lorafuse_backend  # noqa: E402
from .explain import explain  # noqa: E402

__all__ = ["Options", "backend", "explain", "export_gguf", "lorafuse_backend"]


def __getattr__(name):
    # export_gguf imports gguf and PEFT's merge paths: loaded on first use only (and
    # `python -m lorafuse.export` then does not see its module imported twice).
    if name == "export_gguf":
        from .export import export_gguf

        return export_gguf
    raise AttributeError(f"module 'lorafuse' has no attribute {name!r}")
