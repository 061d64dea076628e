"""Resize a LoRA to a lower rank by SVD, per module (sd-scripts' networks/resize_lora.py).

    python recipes/resize_lora.py --model lora.safetensors --save_to small.safetensors --new_rank 8 \
        [--new_conv_rank 4] [--dynamic_method sv_ratio|sv_fro|sv_cumulative --dynamic_param P] \
        [--save_precision float|fp16|bf16] [--device cpu|cuda] [--verbose]

Each module's delta is truncated to --new_rank (3x3 convs: --new_conv_rank, default --new_rank): the best
fit of that rank. With --dynamic_method the rank per module is what the method gives (at most --new_rank):
sv_ratio keeps the singular values above the largest / P (P >= 1); sv_fro the fewest keeping a fraction P
of the Frobenius norm; sv_cumulative the fewest whose sum is a fraction P of the sum (P in (0, 1]).
Every delta keeps its scale; every module gets one alpha, scale * --new_rank (the input's most common
alpha / rank), a module's own rank and scale carried in its up weights (diffusers misreads differing
alphas on attention modules). LoHa/LoKr inputs become plain LoRAs (scale 1). DoRA is refused. Any
input format (kohya, diffusers, PEFT folder); the output is a kohya file. --verbose prints per module
the rank and the fraction of the delta's Frobenius norm kept.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sd.cli import run_main  # noqa: E402
from lora_sd.ops.resize import DYNAMIC_METHODS, resize_lora_file, verbose_lines  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="LoRA to resize: a kohya/diffusers file or a PEFT folder")
    parser.add_argument("--save_to", required=True, help="output LoRA file (.safetensors or .ckpt)")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output (the maximum when dynamic)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 convs (default --new_rank)")
    parser.add_argument("--dynamic_method", default=None,  # checked by the library: one error line
                        help=f"choose each module's rank from its singular values: {', '.join(DYNAMIC_METHODS)}")
    parser.add_argument("--dynamic_param", type=float, default=None,
                        help="sv_ratio: >= 1; sv_fro, sv_cumulative: the fraction kept, in (0, 1]")
    parser.add_argument("--save_precision", default=None, help="dtype saved: float (default), fp16, bf16")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument("--verbose", action="store_true", help="print each module's rank and retained norm")
    parser.add_argument("--svd_lowrank_niter", type=int, default=None,
                        help="accepted for sd-scripts command lines; unused: every SVD here is exact and cheap "
                             "(QR of the module's factors, then a small SVD)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.svd_lowrank_niter is not None:
        logging.getLogger(__name__).info("--svd_lowrank_niter is not used: the SVD here is exact")
    _, stats = resize_lora_file(args.model, args.save_to, args.new_rank, args.new_conv_rank, args.dynamic_method,
                                args.dynamic_param, args.save_precision, args.device)
    if args.verbose:
        print("\n".join(verbose_lines(stats, args.dynamic_method is not None)))


if __name__ == "__main__":
    sys.exit(run_main(main))
