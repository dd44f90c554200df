"""mm: train and use CLIP-style image-text models.

Public API (see README.md and ARCHITECTURE.md)::

    import mm
    model = mm.create_model("ViT-B-32")
    tok = mm.get_tokenizer(model)
    pre = mm.image_transform(model, train=False)
    out = model(images, tok(["a photo of a cat"]))
    naflex = mm.image_transform(model, seq_len=256)                    # each image at its own aspect ratio
    emb = model.encode_image(mm.stack_images([naflex(im) for im in pil_images]))   # mm.Patches, padded
    captions = mm.caption(mm.create_model("tiny-coca"), tok, images)   # CoCa models
    fast = mm.quantize(model, "int8")                                  # int8 Linear layers, CPU inference
    mm.export_model(model, "exported/", to="onnx")                     # image + text encoders

The names below are imported on first use, so ``import mm`` stays light (no torch until a name needs it).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

# public name -> the module that defines it
_EXPORTS = {
    "ConfigError": "mm.config",
    "DecoderConfig": "mm.models", "ModelConfig": "mm.models", "TextConfig": "mm.models", "VisionConfig": "mm.models",
    "MoEConfig": "mm.layers", "TransformerConfig": "mm.layers",
    "CLIP": "mm.models", "CoCa": "mm.models", "ImageTextModel": "mm.models", "LIMoE": "mm.models",
    "ModelOutput": "mm.models", "get_preset": "mm.models", "list_models": "mm.models",
    "create_model": "mm.hub", "load_model": "mm.hub", "load_pretrained": "mm.hub", "save_pretrained": "mm.hub",
    "PretrainedError": "mm.hub", "from_open_clip": "mm.hub", "to_open_clip": "mm.hub", "from_hf_clip": "mm.hub",
    "Tokenizer": "mm.tokenizer", "get_tokenizer": "mm.tokenizer",
    "ClipLoss": "mm.losses", "CocaLoss": "mm.losses", "SigLipLoss": "mm.losses", "make_loss": "mm.losses",
    "image_transform": "mm.data.transforms", "stack_images": "mm.data.transforms", "Patches": "mm.models.patches",
    "GenerationConfig": "mm.inference.generate", "caption": "mm.inference.generate",
    "quantize": "mm.inference.quantize", "export_model": "mm.inference.export",
    "zero_shot_classifier": "mm.eval.zeroshot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mm' has no attribute {name!r}")
    if module != "mm.config":
        # The first name that needs torch loads the interop layer too: importing mm.hub registers open_clip's
        # registry as a preset source of mm.models (which imports nothing above itself), so that get_preset,
        # list_models and get_tokenizer know open_clip's model names whichever name is used first.
        importlib.import_module("mm.hub")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from .config import ConfigError  # noqa: F401
    from .data.transforms import image_transform, stack_images  # noqa: F401
    from .eval.zeroshot import zero_shot_classifier  # noqa: F401
    from .hub import (  # noqa: F401  # noqa: F401
        PretrainedError,
        create_model,
        from_hf_clip,
        from_open_clip,
        load_model,
        load_pretrained,
        save_pretrained,
        to_open_clip,
    )
    from .inference.export import export_model  # noqa: F401
    from .inference.generate import GenerationConfig, caption  # noqa: F401
    from .inference.quantize import quantize  # noqa: F401
    from .layers import MoEConfig, TransformerConfig  # noqa: F401
    from .losses import ClipLoss, CocaLoss, SigLipLoss, make_loss  # noqa: F401
    from .models.patches import Patches  # noqa: F401
    from .models import (  # noqa: F401  # noqa: F401
        CLIP,
        CoCa,
        DecoderConfig,
        ImageTextModel,
        LIMoE,
        ModelOutput,
        TextConfig,
        VisionConfig,
        get_preset,
        list_models,
    )
    from .tokenizer import Tokenizer, get_tokenizer  # noqa: F401
