"""Stable Diffusion 1.x / 2.x / XL base models: load from a diffusers folder, a single file or a hub id; save back.

- `load_base(path, v2=False, v_parameterization=False, model_config=None, torch_dtype=None)` -> SDModel
  (the version, SDXL included, is recognised from the folder or the file's keys)
- `save_single_file(model, path, save_precision="float", original_state_dict=None)`: original layout
  (SDXL: Stability's SGM layout)
- `save_diffusers(model, folder)`: a diffusers folder that transformers 4 and 5 both load
  (text encoders under transformers 4's `text_model.` names, tokenizers with vocab.json/merges.txt)
"""

from .load import (
    SDModel,
    load_base,
    noise_scheduler,
    original_layout_state_dict,
    save_diffusers,
    save_single_file,
)
from .state_dict_io import load_state_dict, save_state_dict
from .tokenizer import load_clip_tokenizer

__all__ = [
    "SDModel",
    "load_base",
    "load_clip_tokenizer",
    "load_state_dict",
    "noise_scheduler",
    "original_layout_state_dict",
    "save_diffusers",
    "save_single_file",
    "save_state_dict",
]
