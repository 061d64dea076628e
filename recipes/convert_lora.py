"""Convert a LoRA between the kohya single file, diffusers' LoRA file and PEFT adapter folders.

    python recipes/convert_lora.py --to peft  char.safetensors  char_peft/
    python recipes/convert_lora.py --to kohya char_peft/        char-kohya.safetensors

The input format is detected (kohya, LyCORIS' LoCon/LoHa/LoKr and DoRA included;
diffusers files and folders, the older names of diffusers' training scripts
included; PEFT folders). Nothing is lost in a round trip: kinds, ranks, alphas
(per module), DoRA magnitudes and kohya metadata travel.

--to diffusers writes a file for diffusers' `load_lora_weights` (and these tools):
LoRA and DoRA only (LoHa/LoKr are refused: diffusers cannot load them); ComfyUI,
AUTOMATIC1111 and sd-scripts do not load it (other key names, alphas only in the
metadata). Give those tools kohya files.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sd.cli import run_main  # noqa: E402
from lora_sd.formats import FORMATS  # noqa: E402
from lora_sd.formats.convert import convert_lora_file  # noqa: E402
from lora_sd.io import PRECISIONS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="output format; diffusers output (LoRA and DoRA only) loads in diffusers only, not in "
                        "ComfyUI, AUTOMATIC1111 or sd-scripts (use kohya for those)")
    p.add_argument("input", help="kohya/diffusers .safetensors (.ckpt/.pt) file, diffusers LoRA folder or PEFT folder")
    p.add_argument("output", help="output file (kohya, diffusers) or folder (peft)")
    p.add_argument("--save_precision", default="float", choices=PRECISIONS)
    p.add_argument("--v2", action="store_true", help="SD 2.x LoRA (metadata of kohya output, when the input has none)")
    p.add_argument("--v_parameterization", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    convert_lora_file(args.input, args.output, args.to, args.save_precision, v2=args.v2,
                      v_parameterization=args.v_parameterization)


if __name__ == "__main__":
    sys.exit(run_main(main))
