"""Models with weights: the ``--model`` spec parser, save / load (safetensors, never unpickling), exact
conversion from and to open_clip and Hugging Face CLIP, timm's NaFlexVit image towers in, LoRA adapters (peft
layout), ``create_model`` and ``load_model``."""
from .adapter import (
                         AdapterError,
                         base_sha256,
                         is_adapter_dir,
                         load_adapter,
                         read_adapter_meta,
                         save_adapter,
)
from .hf import (
                         HF_MODEL_TYPES,
                         check_hf_clip,
                         from_hf,
                         from_hf_clip,
                         hf_clip_config,
                         to_hf_clip,
)
from .load import create_model, load_model
from .open_clip import (
                         ConversionError,
                         convert_state_dict,
                         export_state_dict,
                         from_open_clip,
                         open_clip_config,
                         to_open_clip,
)
from .pretrained import (
                         PretrainedError,
                         load_config,
                         load_pretrained,
                         load_state_dict_checked,
                         load_weights,
                         read_weights_file,
                         save_pretrained,
)
from .spec import OPEN_CLIP_PREFIX, ModelSpec, parse_spec
from .timm_naflex import NaFlexTower, convert_timm_naflex, from_timm_naflex

__all__ = ["ConversionError", "ModelSpec", "OPEN_CLIP_PREFIX", "PretrainedError", "convert_state_dict",
           "create_model", "export_state_dict", "from_hf_clip", "from_open_clip", "load_config", "load_model",
           "load_pretrained", "load_state_dict_checked", "load_weights", "open_clip_config", "parse_spec", "read_weights_file",
           "save_pretrained", "to_open_clip"]
__all__ += ["HF_MODEL_TYPES", "check_hf_clip", "from_hf", "hf_clip_config", "to_hf_clip"]
__all__ += ["AdapterError", "base_sha256", "is_adapter_dir", "load_adapter", "read_adapter_meta", "save_adapter"]
__all__ += ["NaFlexTower", "convert_timm_naflex", "from_timm_naflex"]
