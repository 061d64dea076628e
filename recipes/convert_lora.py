"""Convert a LoRA between the kohya single file, diffusers' LoRA file and PEFT adapter folders.

    python recipes/convert_lora.py --to peft  char.safetensors  char_peft/
    python recipes/convert_lora.py --to kohya char_peft/        char-kohya.safetensors

The input format is detected (kohya; diffusers files and folders, the older names
of diffusers' training scripts included; PEFT folders). Nothing is lost in a round
trip: ranks, alphas (per module) and kohya metadata travel.

--to diffusers writes a file for diffusers' `load_lora_weights` (and these tools):
ComfyUI, AUTOMATIC1111 and sd-scripts do not load it (other key names, alphas
only in the metadata). Give those tools kohya files.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sd.cli import run_main  # noqa: E402
from lora_sd.formats import FORMATS, read_lora, save_lora  # noqa: E402
from lora_sd.formats.metadata import lora_version  # noqa: E402
from lora_sd.io import PRECISIONS, refuse_overwriting_inputs  # noqa: E402

logger = logging.getLogger("convert_lora")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="output format; diffusers output loads in diffusers only, not in ComfyUI, "
                        "AUTOMATIC1111 or sd-scripts (use kohya for those)")
    p.add_argument("input", help="kohya/diffusers .safetensors (.ckpt/.pt) file, diffusers LoRA folder or PEFT folder")
    p.add_argument("output", help="output file (kohya, diffusers) or folder (peft)")
    p.add_argument("--save_precision", default="float", choices=PRECISIONS)
    p.add_argument("--v2", action="store_true", help="SD 2.x LoRA (metadata of kohya output, when the input has none)")
    p.add_argument("--v_parameterization", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    refuse_overwriting_inputs(args.output, [args.input], "output")
    lora, fmt_in = read_lora(args.input)
    version = "sd2" if args.v2 else lora_version(lora.metadata) or "sd1"
    v_param = args.v_parameterization or lora.metadata.get("modelspec.prediction_type") == "v"
    out = save_lora(lora, args.output, args.to, args.save_precision, version=version, v_parameterization=v_param)
    logger.info("%s (%s, %d modules) -> %s (%s)", args.input, fmt_in, len(lora.modules), out, args.to)
    if args.to == "diffusers":
        logger.warning("%s: a diffusers LoRA file loads with diffusers' load_lora_weights (and lora-sd) only; ComfyUI, "
                       "AUTOMATIC1111 and sd-scripts do not load it (other key names, alphas only in the metadata): "
                       "convert with --to kohya for those", out)


if __name__ == "__main__":
    sys.exit(run_main(main))
