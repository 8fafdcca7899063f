"""lorafuse: a torch.compile backend for fast, lean LoRA / QLoRA fine-tuning.

``torch.compile(model, backend="lorafuse")`` works after ``pip install lorafuse``
(the backend is registered through the ``torch_dynamo_backends`` entry point).
"""

__version__ = "0.1.0"

from .backend import Options, backend, lorafuse_backend  # noqa: E402
from .explain import explain  # noqa: E402
from .export import export_gguf  # noqa: E402

__all__ = ["Options", "backend", "explain", "lorafuse_backend"]
