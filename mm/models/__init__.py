from .clip import CLIP, ModelOutput, create_model, resolve_config
from .text import TextTower
from .vision import TowerOutput, VisionTower

__all__ = ["CLIP", "ModelOutput", "create_model", "resolve_config", "TextTower", "TowerOutput", "VisionTower"]
