"""Reading and writing single-file state dicts (.safetensors, .ckpt), safely.

`.ckpt` files are pickles: they load with `torch.load(weights_only=True)`,
which refuses anything that would run code. The one harmless class SD
checkpoints carry (PyTorch Lightning's ModelCheckpoint callback state) is
read into an inert stand-in so that real `.ckpt` files still load.
"""

import logging
import pickle
from pathlib import Path

import torch

from ..errors import FormatError
from ..io import atomic_path

logger = logging.getLogger(__name__)

SAVE_PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _InertObject:
    """Stand-in for a known harmless pickled class; keeps its state, runs nothing."""

    def __setstate__(self, state):
        self.__dict__["state"] = state


# Classes seen in the `callbacks` entry of original SD .ckpt files.
_HARMLESS_GLOBALS = [
    (_InertObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_InertObject, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
]


def _load_ckpt(path, allow_pickle):
    if allow_pickle:
        logger.warning("%s: loading a pickle with arbitrary code allowed (--allow_pickle)", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_HARMLESS_GLOBALS):
            try:  # mmap: a 4 GB checkpoint is not read into memory twice
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # only the old (non-zip) format cannot be mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            names = [n for n in names if n not in {g for _, g in _HARMLESS_GLOBALS}]
            detail = f"it needs arbitrary code to load ({', '.join(names[:3]) or 'unknown globals'})"
        raise FormatError(
            f"{path}: refusing to unpickle this .ckpt: {detail}; convert it to .safetensors "
            "with a tool you trust (or pass allow_pickle=True if you trust this file)"
        ) from None


def load_state_dict(path, allow_pickle=False):
    """{key: tensor} of a .safetensors or .ckpt/.pt/.pth/.bin file, unwrapping `state_dict`.

    Every failure (missing, truncated, not a checkpoint, code-carrying pickle)
    is a one-line FormatError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = _load_ckpt(path, allow_pickle)
    except FormatError:
        raise
    except Exception as e:  # safetensors, zipfile and torch all raise their own types
        msg = (str(e).splitlines()[0] if str(e) else type(e).__name__).split(". ")[0]
        raise FormatError(f"{path}: not a readable checkpoint (truncated or corrupt?): {msg}") from None
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise FormatError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise FormatError(f"{path}: holds no tensors")
    return tensors


def cast_for_save(state_dict, save_precision="float"):
    """Floating tensors to the save precision; contiguous, no shared storage (safetensors needs both)."""
    if save_precision not in SAVE_PRECISIONS:
        raise FormatError(f"save_precision must be one of {sorted(SAVE_PRECISIONS)}, got {save_precision!r}")
    dtype = SAVE_PRECISIONS[save_precision]
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
