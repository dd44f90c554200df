"""mm: train and use CLIP-style image-text models.

Public API (see README.md and ARCHITECTURE.md)::

    import mm
    model = mm.create_model("ViT-B-32")
    tok = mm.get_tokenizer(model)
    pre = mm.image_transform(model, train=False)
    out = model(images, tok(["a photo of a cat"]))
    captions = mm.caption(mm.create_model("tiny-coca"), tok, images)   # CoCa models
    fast = mm.quantize(model, "int8")                                  # int8 Linear layers, CPU inference
    mm.export_model(model, "exported/", to="onnx")                     # image + text encoders
"""
from .config import ConfigError, DecoderConfig, ModelConfig, MoEConfig, TextConfig, TransformerConfig, VisionConfig
from .data.transforms import image_transform
from .eval import zero_shot_classifier
from .generate import GenerationConfig, caption
from .losses import ClipLoss, CocaLoss, SigLipLoss, make_loss
from .models import CLIP, CoCa, LIMoE, ModelOutput, create_model
from .presets import get_preset, list_models
from .interop.hf import from_hf_clip
from .interop.open_clip import from_open_clip, to_open_clip
from .pretrained import PretrainedError, load_model, load_pretrained, save_pretrained
from .quantize import quantize
from .export import export_model
from .tokenizer import Tokenizer, get_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CLIP", "ClipLoss", "CoCa", "CocaLoss", "ConfigError", "DecoderConfig", "GenerationConfig", "LIMoE", "ModelConfig", "ModelOutput", "MoEConfig", "PretrainedError",
    "SigLipLoss", "TextConfig", "Tokenizer", "TransformerConfig", "VisionConfig", "caption", "create_model", "from_hf_clip", "from_open_clip", "load_model", "to_open_clip",
    "get_preset", "get_tokenizer", "image_transform", "list_models", "load_pretrained", "make_loss",
    "save_pretrained", "zero_shot_classifier", "quantize", "export_model",
]
