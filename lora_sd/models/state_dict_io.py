"""Reading and writing single-file state dicts (.safetensors, .ckpt).

Reading (safe unpickling included) lives in `lora_sd.io.read_tensor_file`.
"""

import logging
from pathlib import Path

import torch

from ..io import atomic_path, precision_dtype, read_tensor_file

logger = logging.getLogger(__name__)


def load_state_dict(path, allow_pickle=False):
    """{key: tensor} of a .safetensors or .ckpt/.pt/.pth/.bin file (see `lora_sd.io.read_tensor_file`)."""
    return read_tensor_file(path, allow_pickle=allow_pickle)[0]


def cast_for_save(state_dict, save_precision="float"):
    """Floating tensors to the save precision; contiguous, no shared storage (safetensors needs both)."""
    dtype = precision_dtype(save_precision)
    out, seen = {}, set()
    for key, t in state_dict.items():
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_state_dict(state_dict, path, save_precision="float", metadata=None):
    """Write a state dict atomically: .safetensors, or a pickle (`{"state_dict": ...}`) otherwise."""
    path = Path(path)
    sd = cast_for_save(state_dict, save_precision)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata={"format": "pt", **(metadata or {})})
        else:
            torch.save({"state_dict": sd}, str(tmp))
    logger.info("wrote %s (%d tensors, %s)", path, len(sd), save_precision)
    return path
