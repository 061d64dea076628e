"""Read any supported LoRA file into LoraWeights; write LoraWeights in any format.

Formats: `kohya` (single .safetensors/.ckpt/.pt, the default everywhere),
`diffusers` (what `save_lora_weights` writes, and the older names diffusers'
training scripts write; a file or a folder holding `pytorch_lora_weights.safetensors`),
`peft` (adapter folders).
"""

import math
from pathlib import Path

import safetensors.torch
import torch

from lora_sd.errors import FormatError
from lora_sd.formats.base_model import note_base
from lora_sd.formats.checks import module_problem
from lora_sd.formats.diffusers import (FOLDER_FILES, diffusers_file_contents, diffusers_folder_file, diffusers_refusal,
                                      is_diffusers, lora_from_diffusers)
from lora_sd.formats.kohya import is_kohya, kohya_file_contents, lora_from_kohya
from lora_sd.formats.peft import is_peft_folder, read_peft_folder, write_peft_folder
from lora_sd.io import atomic_path, precision_dtype, read_tensor_file
from lora_sd.lora_weights import LoraWeights

FORMATS = ("kohya", "diffusers", "peft")


def read_lora(path) -> tuple[LoraWeights, str]:
    """(the LoRA, its format) from a kohya file, a diffusers LoRA file or folder, or a PEFT adapter folder.

    Every LoRA input of every recipe comes through here: a file of non-finite
    or mismatched tensors is refused, naming the file and the module. An SDXL
    LoRA (by its module names) whose metadata does not say so gets SDXL's
    `ss_base_model_version`, so that it is never mixed with SD 1.x/2.x ones.
    """
    path = Path(path)
    if path.is_dir():
        lora, fmt = _read_folder(path)
    else:
        lora, fmt = _read_file(path)
    if not lora.modules:
        raise FormatError(f"{path}: holds no LoRA modules")
    for key, m in lora.modules.items():  # every tensor of every kind, dora_scale included
        problem = module_problem(m)
        if problem:
            raise FormatError(f"{path}: module {key} {problem}")
    _refuse_non_finite(lora, path)
    note_base(lora, path)
    return lora, fmt


def _read_folder(path):
    weights = diffusers_folder_file(path)
    if is_peft_folder(path):
        if weights is not None:
            raise FormatError(f"{path}: holds both PEFT adapter folders and {weights.name}; give the one to read")
        return read_peft_folder(path), "peft"
    if weights is None:
        raise FormatError(f"{path}: a folder, but neither a PEFT adapter folder (unet/ or text_encoder/ with "
                          f"adapter_config.json) nor a diffusers LoRA folder ({' or '.join(FOLDER_FILES)})")
    return _read_file(weights)


def _read_file(path):
    state, metadata = read_tensor_file(path)
    if is_kohya(state):
        fmt, reader = "kohya", lora_from_kohya
    elif is_diffusers(state):
        fmt, reader = "diffusers", lora_from_diffusers
    else:
        raise FormatError(
            f"{path}: keys of no known LoRA format (first key: {next(iter(state))!r}); expected kohya "
            "(lora_unet_*/lora_te_*), diffusers (unet.*.lora_A.weight, unet.*.lora.down.weight, ...) or a PEFT folder"
        )
    return reader(state, metadata, source=str(path)), fmt


def _refuse_non_finite(lora: LoraWeights, path, advice="the LoRA is broken (a diverged training run?): use an "
                       "earlier save"):
    """NaN/inf in a LoRA would go silently into merged models and generated images (or crash an SVD)."""
    bad = {}
    for key, m in lora.modules.items():
        tensors = [*m.named_tensors().values(), *([m.dora_scale] if m.dora_scale is not None else [])]
        n = sum(int((~torch.isfinite(t)).sum()) for t in tensors) + (not math.isfinite(m.alpha))
        if n:
            bad[key] = n
    if bad:
        key, n = next(iter(bad.items()))
        k = len(bad) - 1
        more = f" (and {k} more module{'s' * (k > 1)}: {sum(bad.values())} in all)" if k else ""
        raise FormatError(f"{path}: module {key} holds {n} non-finite values (NaN/inf){more}; {advice}")


def _savable(lora: LoraWeights, path, save_precision) -> LoraWeights:
    """`lora` in the save precision; FormatError when it holds NaN/inf, or would after the cast (fp16 overflows
    above 65504): every reader refuses such a file, so it is never written."""
    _refuse_non_finite(lora, path, "nothing was written")
    cast = lora.to(precision_dtype(save_precision))
    _refuse_non_finite(cast, path, f"its values overflow save_precision {save_precision}: save in float or bf16; "
                       "nothing was written")
    return cast


def load_lora(path) -> LoraWeights:
    """Read a kohya file, a diffusers LoRA file or a PEFT adapter folder."""
    return read_lora(path)[0]


def save_lora(lora: LoraWeights, path, fmt="kohya", save_precision="float", **kohya_meta):
    """Write `lora` atomically. kohya_meta (kohya only): version, v_parameterization, title, and unet_config
    (the model's U-Net config, for SDXL's original-layout names; SDXL base's layout when not given)."""
    if fmt not in FORMATS:
        raise FormatError(f"--to: format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    path = Path(path)
    lora = _savable(lora, path, save_precision)
    if fmt == "peft" and path.exists() and not is_peft_folder(path):  # replacing it would delete what is there
        raise FormatError(f"{path}: exists and is not a PEFT adapter folder; give a new folder name")
    if fmt != "peft" and path.is_dir():
        raise FormatError(f"{path}: is a folder; a {fmt} LoRA is a file (give a file name)")
    if fmt == "diffusers" and diffusers_refusal(lora):
        raise FormatError(f"{path}: a diffusers LoRA file cannot hold this LoRA: {diffusers_refusal(lora)}")
    with atomic_path(path) as tmp:
        if fmt == "peft":
            tmp.mkdir()
            write_peft_folder(lora, tmp)
            return path
        if fmt == "kohya":
            state, metadata = kohya_file_contents(lora, **kohya_meta)
        else:
            state, metadata = diffusers_file_contents(lora)
        if path.suffix in (".ckpt", ".pt", ".bin"):
            torch.save(state, tmp)  # pickles carry no metadata; sd-scripts' ckpt LoRAs have none either
        else:
            safetensors.torch.save_file(state, str(tmp), metadata=metadata)
    return path
