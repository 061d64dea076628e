"""Which base model a LoRA is for (SD 1.x, SD 2.x, SDXL): its metadata, else its module names.

SD 1.x/2.x and SDXL LoRAs must never be mixed (merged together, or applied to
the other kind of model): their module names partly coincide, so a wrong mix
could load without an error. Files without metadata still tell SDXL from SD
by their modules: a second text encoder, SDXL's original-layout U-Net names
(kohya files; noted by the kohya reader), or the U-Net's block structure
(SDXL: attentions on up_blocks.0 and transformer depth above 1; SD 1.x/2.x:
attentions on down_blocks.0, four levels).
"""

import re

from lora_sd.errors import FormatError
from lora_sd.formats.metadata import lora_version, version_metadata

BASE_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sd": "SD 1.x/2.x", "sdxl": "SDXL"}
_SDXL_UNET = re.compile(r"unet\.(up_blocks\.0\.attentions\.|.*transformer_blocks\.[1-9])")
_SD_UNET = re.compile(r"unet\.(down_blocks\.0\.attentions\.|(down|up)_blocks\.3\.)")


def base_from_modules(keys) -> str | None:
    """'sdxl', 'sd' (SD 1.x or 2.x) or None, from LoraWeights module keys alone."""
    keys = list(keys)
    if any(k.startswith("text_encoder_2.") or _SDXL_UNET.match(k) for k in keys):
        return "sdxl"
    if any(_SD_UNET.match(k) for k in keys):
        return "sd"
    return None


def lora_base(lora) -> str | None:
    """'sd1', 'sd2', 'sdxl' from the metadata, else 'sdxl' / 'sd' / None from the modules."""
    return lora_version(lora.metadata) or base_from_modules(lora.modules)


def same_base(a, b) -> bool:
    """Whether LoRAs/models for bases `a` and `b` may meet (None: unknown, agrees with anything)."""
    if a is None or b is None or a == b:
        return True
    return "sd" in (a, b) and "sdxl" not in (a, b)


def note_sdxl(lora, source, why):
    """Record in the metadata that `lora` is an SDXL LoRA (`why`: what in the file says so) when the
    metadata does not say; FormatError when the metadata names another base model."""
    version = lora_version(lora.metadata)
    if version is None:
        lora.metadata.update(version_metadata("sdxl"))
    elif version != "sdxl":
        raise FormatError(f"{source}: metadata says {BASE_NAMES[version]} but {why} are SDXL's; "
                          "the file is inconsistent: fix its ss_base_model_version")


def note_base(lora, source):
    """`note_sdxl` when the modules show an SDXL LoRA (a reader's last step)."""
    if base_from_modules(lora.modules) == "sdxl":
        note_sdxl(lora, source, "its modules (text_encoder_2 or SDXL's U-Net blocks)")
