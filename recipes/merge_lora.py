"""Merge LoRAs into a Stable Diffusion model, or into one LoRA (sd-scripts' networks/merge_lora.py).

Into a model (W' = W + sum ratio_i * delta_i, computed in --precision; LoRA/LoCon, LoHa, LoKr and DoRA
files alike, DoRA as ComfyUI applies a strength: W + ratio * (DoRA(W) - W)):

    python recipes/merge_lora.py --sd_model model.safetensors --save_to merged.safetensors \
        --models a.safetensors b.safetensors --ratios 0.8 0.5 [--v2] [--precision float|fp16|bf16] \
        [--save_precision ...] [--model_config FOLDER]

--sd_model is a single file (.safetensors/.ckpt, original layout) or a diffusers folder, SD 1.x/2.x or
SDXL (recognised by itself; both text encoders merged); --save_to
ending in .safetensors/.ckpt is written in the original layout (keeping the other keys of a
single-file --sd_model), anything else as a diffusers folder.

LoRAs into one LoRA (no --sd_model):

    python recipes/merge_lora.py --save_to merged.safetensors --models a.safetensors b.safetensors \
        --ratios 0.8 0.5 [--concat true|false] [--save_precision fp16]

--concat true (default): ranks concatenated, exactly sum ratio_i * delta_i for any ranks and alphas.
Plain LoRAs only: a LoHa/LoKr is refused (svd_merge_lora.py fits a plain LoRA to any mix of kinds),
a DoRA too (its change depends on the model: merge it into one with --sd_model).
--concat false: sd-scripts' same-shape weighted sum of ups and downs (not the sum of deltas;
refused when ranks or alphas differ: use svd_merge_lora.py). LoRAs for different base models
(SD 1.x, 2.x, SDXL) are refused, and so is a LoRA for another kind of model than --sd_model.

A --save_to that is an input (a LoRA, --sd_model, --model_config), inside one or a folder holding one
is refused before any work; nothing is ever half-written (a failed write leaves no output).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sd.cli import run_main  # noqa: E402
from lora_sd.errors import ConfigError  # noqa: E402
from lora_sd.ops import merge_into_model_file, merge_lora_files  # noqa: E402


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"--concat: expected true or false, got {value!r}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sd_model", default=None, help="model to merge into (single file or diffusers folder)")
    parser.add_argument("--save_to", required=True, help="output: LoRA file, or model file / folder")
    parser.add_argument("--models", nargs="+", required=True, help="LoRA files to merge")
    parser.add_argument("--ratios", nargs="*", default=None, help="one ratio per LoRA (default 1.0 each)")
    parser.add_argument("--v2", action="store_true", help="the model is SD 2.x")
    parser.add_argument("--precision", default="float", help="dtype the merge is computed in: float, fp16, bf16")
    parser.add_argument("--save_precision", default=None, help="dtype saved: float, fp16, bf16 (default: --precision)")
    parser.add_argument("--model_config", default=None, help="diffusers-layout config folder for a non-standard single file")
    parser.add_argument("--concat", nargs="?", const="true", default=None,
                        help="LoRA+LoRA: true (default) = exact (ranks concatenated), false = sd-scripts' same-shape sum")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # an option of the other mode would be ignored without a word: refuse it
    unused = ["--concat"] * (args.concat is not None) if args.sd_model else \
        [o for o, v in (("--v2", args.v2), ("--model_config", args.model_config)) if v]
    if unused:
        raise ConfigError(f"{unused[0]}: only used when merging " + ("LoRAs into one LoRA (no --sd_model)" if args.sd_model
                          else "into a model (--sd_model)") + "; drop it")
    if args.sd_model is not None:
        merge_into_model_file(args.sd_model, args.save_to, args.models, args.ratios, v2=args.v2,
                              precision=args.precision, save_precision=args.save_precision,
                              model_config=args.model_config)
    else:
        merge_lora_files(args.models, args.ratios, args.save_to, concat=_bool(args.concat or "true"),
                         save_precision=args.save_precision, precision=args.precision)


if __name__ == "__main__":
    sys.exit(run_main(main))
