"""Models: configs, towers, the CLIP / CoCa / LIMoE compositions, presets, and building a model from a spec."""
from .build import build_model, list_models, model_class, resolve_config
from .clip import CLIP, CoCa, DecodeCache, ImageTextModel, ImageView, ModelOutput
from .config import (
           AxialRopeConfig,
           DecoderConfig,
           ModelConfig,
           OpenClipSource,
           TextConfig,
           VisionConfig,
)
from .decoder import CaptionDecoder
from .limoe import LIMoE
from .presets import NotNative, get_preset
from .text import TextEmbedHead, TextTower
from .vision import TowerOutput, VisionEmbedHead, VisionTower, naflex_problem

__all__ = ["AxialRopeConfig", "CLIP", "CaptionDecoder", "CoCa", "DecodeCache", "DecoderConfig", "ImageTextModel", "LIMoE",
           "ImageView", "ModelConfig", "ModelOutput", "NotNative", "OpenClipSource", "TextConfig", "TextEmbedHead", "TextTower", "TowerOutput", "VisionConfig",
           "VisionEmbedHead", "VisionTower", "build_model", "naflex_problem", "get_preset", "list_models", "model_class",
           "resolve_config"]
