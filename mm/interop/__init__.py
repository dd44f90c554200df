"""Weight conversion between mm and other model libraries (open_clip)."""
from .open_clip import ConversionError, convert_state_dict, export_state_dict, from_open_clip, open_clip_config, to_open_clip

__all__ = ["ConversionError", "convert_state_dict", "export_state_dict", "from_open_clip", "open_clip_config", "to_open_clip"]
