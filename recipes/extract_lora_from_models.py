"""Extract a LoRA from the difference of two models (sd-scripts' networks/extract_lora_from_models.py).

    python recipes/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \
        --save_to extracted.safetensors --dim 32 [--conv_dim 16] [--v2] [--device cpu|cuda] \
        [--save_precision float|fp16|bf16] [--min_diff 0.01] [--model_config FOLDER]

Models are single files or diffusers folders. Per sd-scripts target module the difference
tuned - org is truncated by SVD to --dim (3x3 convs to --conv_dim; without it they are left out);
a text encoder (SDXL: each of the two) is left out when no weight of it differs by more than --min_diff
(and the log says so);
models of which no weight differs by more than --min_diff are refused (nothing is written).
The output is a kohya LoRA file with sd-scripts' metadata; a --save_to that is (or is inside) one
of the models is refused before any work.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sd.cli import run_main  # noqa: E402
from lora_sd.ops import extract_lora_files  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_org", required=True, help="original model (single file or diffusers folder)")
    parser.add_argument("--model_tuned", required=True, help="fine-tuned model (single file or diffusers folder)")
    parser.add_argument("--save_to", required=True, help="output LoRA file (.safetensors or .ckpt)")
    parser.add_argument("--dim", type=int, default=4, help="rank of Linear and 1x1 conv modules")
    parser.add_argument("--conv_dim", type=int, default=None, help="rank of 3x3 convs (default: not extracted)")
    parser.add_argument("--v2", action="store_true", help="the models are SD 2.x")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--save_precision", default="float", help="dtype saved: float, fp16, bf16")
    parser.add_argument("--min_diff", type=float, default=0.01,
                        help="a text encoder is left out when no weight of it differs by more than this; "
                        "models that differ by no more than this are refused")
    parser.add_argument("--model_config", default=None, help="diffusers-layout config folder for non-standard single files")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    extract_lora_files(args.model_org, args.model_tuned, args.save_to, args.dim, args.conv_dim, v2=args.v2,
                       device=args.device, save_precision=args.save_precision, min_diff=args.min_diff,
                       model_config=args.model_config)


if __name__ == "__main__":
    sys.exit(run_main(main))
