"""Generate images with a Stable Diffusion model and LoRAs of any kind at their own multipliers (sd-scripts'
gen_img_diffusers.py, sdxl_gen_img.py for SDXL models: both text encoders, 1024 px by default).

    python recipes/generate.py --ckpt model.safetensors --outdir out --prompt "a photo of a cat" \
        [--negative_prompt "..."] --network_weights a.safetensors b.safetensors --network_mul 0.8 0.5 \
        [--network_merge] [--steps 30] [--scale 7.5] [--seed 1] [--W 512 --H 512] [--images_per_prompt 2] \
        [--sampler ddim|euler|euler_a|dpmsolver++|...] [--v2] [--v_parameterization] [--device cpu|cuda]

LoRA, LoCon, LoHa, LoKr and DoRA files (kohya/LyCORIS, diffusers, PEFT folders) are named PEFT adapters
weighted with diffusers' set_adapters, or merged into the weights with --network_merge. Images are PNGs with the prompt and settings in their text chunk; image j of a run
gets seed --seed + j. An --outdir that is an input or inside one (a model folder) is refused.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sd.cli import run_main  # noqa: E402
from lora_sd.errors import ConfigError  # noqa: E402
from lora_sd.generate import SAMPLERS, GenerationSettings, generate, read_prompt_file  # noqa: E402

NETWORK_MODULES = ("networks.lora", "lora", "lycoris.kohya")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="model: single file or diffusers folder")
    parser.add_argument("--outdir", default="outputs", help="folder for the images")
    parser.add_argument("--prompt", action="append", default=[], help="prompt (repeat for several)")
    parser.add_argument("--from_file", default=None, help="a text file with one prompt per line")
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--network_module", nargs="*", default=None, help="accepted for sd-scripts compatibility (networks.lora, lycoris.kohya): the files say their kind")
    parser.add_argument("--network_weights", nargs="*", default=[], help="LoRA files of any kind (LoRA, LoCon, LoHa, LoKr, DoRA)")
    parser.add_argument("--network_mul", nargs="*", default=None, help="one multiplier per LoRA (default 1.0)")
    parser.add_argument("--network_merge", action="store_true", help="merge the LoRAs into the weights")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scale", type=float, default=7.5, help="guidance scale")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--W", type=int, default=None, help="width (default 512; SDXL 1024)")
    parser.add_argument("--H", type=int, default=None, help="height (default 512; SDXL 1024)")
    parser.add_argument("--images_per_prompt", type=int, default=1)
    parser.add_argument("--sampler", default="ddim", help="one of " + ", ".join(SAMPLERS))
    parser.add_argument("--v2", action="store_true")
    parser.add_argument("--v_parameterization", action="store_true")
    parser.add_argument("--model_config", default=None, help="diffusers-layout config folder for a non-standard single file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", default="float", help="model dtype: float, fp16, bf16")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for module in args.network_module or []:
        if module not in NETWORK_MODULES:
            raise ConfigError(f"--network_module: one of {', '.join(NETWORK_MODULES)}, got {module!r}")
    prompts = list(args.prompt)
    if args.from_file:
        prompts += read_prompt_file(args.from_file)
    settings = GenerationSettings(prompts, args.negative_prompt, args.steps, args.scale, args.seed, args.W, args.H,
                                  args.images_per_prompt, args.sampler)
    generate(args.ckpt, args.outdir, settings, args.network_weights, args.network_mul, args.network_merge,
             v2=args.v2, v_parameterization=args.v_parameterization, model_config=args.model_config,
             device=args.device, dtype=args.precision)


if __name__ == "__main__":
    sys.exit(run_main(main))
