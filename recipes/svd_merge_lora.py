"""Merge LoRAs of any ranks and kinds into one LoRA of a chosen rank by SVD (sd-scripts' networks/svd_merge_lora.py).

    python recipes/svd_merge_lora.py --save_to merged.safetensors --models a.safetensors b.safetensors \
        --ratios 0.8 0.5 --new_rank 16 [--new_conv_rank 8] [--device cpu|cuda] \
        [--precision float|fp16|bf16] [--save_precision ...]

Per module the weighted deltas are summed and truncated to --new_rank (3x3 convs to --new_conv_rank,
default --new_rank) with an exact SVD of the concatenated factors; alpha = rank (scale 1). LoHa and
LoKr files (LyCORIS) merge too, alone or with LoRAs: a module with one has its summed delta formed and
fully SVD'd, so the result is a plain LoRA (networks.lora) that is the best rank-R fit. DoRA is refused
(its change depends on the model: merge it into one with merge_lora.py --sd_model). A rank larger than a
module's merged delta can have (the sum of the input ranks, or the module's size) is clamped to it,
with no zero rows (and reported). A --save_to that is one of --models is refused.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sd.cli import run_main  # noqa: E402
from lora_sd.ops import svd_merge_files  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save_to", required=True, help="output LoRA file (.safetensors or .ckpt)")
    parser.add_argument("--models", nargs="+", required=True, help="LoRA files to merge")
    parser.add_argument("--ratios", nargs="*", default=None, help="one ratio per LoRA (default 1.0 each)")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the merged LoRA")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 convs (default --new_rank)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="float", help="dtype the inputs are rounded to: float, fp16, bf16")
    parser.add_argument("--save_precision", default="float", help="dtype saved: float, fp16, bf16")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    svd_merge_files(args.models, args.ratios, args.save_to, args.new_rank, args.new_conv_rank,
                    device=args.device, precision=args.precision, save_precision=args.save_precision)


if __name__ == "__main__":
    sys.exit(run_main(main))
