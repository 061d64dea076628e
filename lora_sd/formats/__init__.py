"""Read any supported LoRA file into LoraWeights; write LoraWeights in any format.

Formats: `kohya` (single .safetensors/.ckpt/.pt, the default everywhere),
`diffusers` (what `save_lora_weights` writes), `peft` (adapter folders).
"""

from pathlib import Path

import safetensors.torch
import torch

from lora_sd.errors import FormatError
from lora_sd.formats.diffusers import diffusers_file_contents, is_diffusers, lora_from_diffusers
from lora_sd.formats.kohya import is_kohya, kohya_file_contents, lora_from_kohya
from lora_sd.formats.peft import is_peft_folder, read_peft_folder, write_peft_folder
from lora_sd.io import atomic_path, precision_dtype, read_tensor_file  # noqa: F401 (re-exported)
from lora_sd.lora_weights import LoraWeights

FORMATS = ("kohya", "diffusers", "peft")
def detect_format(path) -> str:
    path = Path(path)
    if path.is_dir():
        if is_peft_folder(path):
            return "peft"
        raise FormatError(f"{path}: a folder, but not a PEFT adapter folder (unet/ or text_encoder/ with adapter_config.json)")
    state, _ = read_tensor_file(path)
    return _detect_state(state, path)


def _detect_state(state, path):
    if is_kohya(state):
        return "kohya"
    if is_diffusers(state):
        return "diffusers"
    first = next(iter(state), "<no keys>")
    raise FormatError(
        f"{path}: keys of no known LoRA format (first key: {first!r}); expected kohya "
        "(lora_unet_*/lora_te_*), diffusers (unet.*.lora_A.weight) or a PEFT folder"
    )


def load_lora(path) -> LoraWeights:
    """Read a kohya file, a diffusers LoRA file or a PEFT adapter folder."""
    path = Path(path)
    if path.is_dir():
        detect_format(path)
        return read_peft_folder(path)
    state, metadata = read_tensor_file(path)
    fmt = _detect_state(state, path)
    reader = lora_from_kohya if fmt == "kohya" else lora_from_diffusers
    lora = reader(state, metadata, source=str(path))
    if not lora.modules:
        raise FormatError(f"{path}: holds no LoRA modules")
    return lora


def save_lora(lora: LoraWeights, path, fmt="kohya", save_precision="float", **kohya_meta):
    """Write `lora` atomically. kohya_meta: version, v_parameterization, title (kohya only)."""
    if fmt not in FORMATS:
        raise FormatError(f"--to: format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    dtype = precision_dtype(save_precision)
    path = Path(path)
    with atomic_path(path) as tmp:
        if fmt == "peft":
            tmp.mkdir()
            write_peft_folder(lora, tmp, dtype)
            return path
        if fmt == "kohya":
            state, metadata = kohya_file_contents(lora, dtype, **kohya_meta)
        else:
            state, metadata = diffusers_file_contents(lora, dtype)
        if path.suffix in (".ckpt", ".pt", ".bin"):
            torch.save(state, tmp)  # pickles carry no metadata; sd-scripts' ckpt LoRAs have none either
        else:
            safetensors.torch.save_file(state, str(tmp), metadata=metadata)
    return path
