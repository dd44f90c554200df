from .clip import CLIP, CoCa, DecodeCache, ModelOutput, create_model, model_class, resolve_config
from .decoder import CaptionDecoder
from .limoe import LIMoE
from .text import TextTower
from .vision import TowerOutput, VisionTower

__all__ = ["CLIP", "CoCa", "CaptionDecoder", "DecodeCache", "LIMoE", "model_class", "ModelOutput", "create_model", "resolve_config", "TextTower", "TowerOutput", "VisionTower"]
