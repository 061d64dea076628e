"""convert_lora: a LoRA file or folder into another format (what recipes/convert_lora.py runs)."""

import logging
from pathlib import Path

from lora_sd.errors import ConfigError
from lora_sd.formats import read_lora, save_lora
from lora_sd.formats.base_model import lora_base
from lora_sd.outputs import LORA_FILE_SUFFIXES, check_output

logger = logging.getLogger(__name__)


def convert_lora_file(src, dst, to, save_precision="float", v2=False, v_parameterization=False) -> Path:
    """Read `src` (any format we read), write it to `dst` as `to` (kohya | diffusers | peft).

    `dst` is checked before anything is read: never the input, inside it or holding it, and in a
    writable folder. `v2` / `v_parameterization` fill the kohya metadata when the input has none.
    """
    # a diffusers file keeps its alphas in the safetensors header: a pickle would lose them
    suffixes = {"kohya": LORA_FILE_SUFFIXES, "diffusers": (".safetensors",), "peft": None}.get(to)
    check_output(dst, [src], "output", file_suffixes=suffixes, folder=to == "peft")
    lora, fmt_in = read_lora(src)
    version = lora_base(lora)
    if v2 and version == "sdxl":
        raise ConfigError(f"--v2: {src} is an SDXL LoRA (v2 is for SD 2.x); remove --v2")
    version = "sd2" if v2 else version if version in ("sd1", "sd2", "sdxl") else "sd1"
    v_param = v_parameterization or lora.metadata.get("modelspec.prediction_type") == "v"
    out = save_lora(lora, dst, to, save_precision, version=version, v_parameterization=v_param)
    logger.info("%s (%s, %d modules) -> %s (%s)", src, fmt_in, len(lora.modules), out, to)
    if to == "diffusers":
        logger.warning("%s: a diffusers LoRA file loads with diffusers' load_lora_weights (and lora-sd) only; ComfyUI, "
                       "AUTOMATIC1111 and sd-scripts do not load it (other key names, alphas only in the metadata): "
                       "convert with --to kohya for those", out)
    return out
