"""Using models: caption generation, embeddings of many inputs on disk, search over them, int8 quantization,
ONNX / torch.export export, and the image sheets the commands draw. Library code: the ``mm`` commands over
it live in ``mm.cli``."""
from .embed import EmbedError, embed_images, embed_texts, load_index, read_index
from .export import ExportError, export_model
from .generate import GenerationConfig, caption, generate
from .quantize import QuantizeError, quantize
from .search import search

__all__ = ["EmbedError", "ExportError", "GenerationConfig", "QuantizeError", "caption", "embed_images", "embed_texts",
           "export_model", "generate", "load_index", "quantize", "read_index", "search"]
