"""Train a LoRA for Stable Diffusion 1.x / 2.x / XL (sd-scripts' train_network.py / sdxl_train_network.py).

    accelerate launch recipes/train.py --config configs/char.toml [--option value ...]
    python recipes/train.py                      # the demo: configs/demo.toml, output/demo/demo-report.png

Every option of the TOML can be given on the command line with the same
name (`--network_dim 8`, `--xformers`, `--network_args conv_dim=4 conv_alpha=1`);
`--config_file` (sd-scripts' name) and `--dataset_config` work as in sd-scripts.
Features: DDPM noise, v-parameterization, noise_offset, min_snr_gamma,
prior_loss_weight, clip_skip, max_token_length, mixed precision with float32
LoRA weights, gradient checkpointing/accumulation, 8 optimizers, 6 schedules,
saves every n epochs/steps in kohya/diffusers/PEFT formats with ss_* metadata,
save_state/resume, TensorBoard, sample images, multi-process with accelerate.
SDXL is recognised from the model (configs/sdxl_char.toml, the low-memory recipe):
both text encoders, size/crop conditioning, text_encoder_lr as one value or two,
cache_text_encoder_outputs(_to_disk), fp8_base.
Refused with a one-line error and exit code 2: unknown or mistyped options,
a missing model or dataset, an unwritable output_dir (checked before the model
loads), fp16 on CPU, both network_train_*_only, a NaN loss, non-finite LoRA
weights at a save (never written), fp8_base without mixed precision,
cache_text_encoder_outputs with trained text encoders or changing captions, an
SD 1.x/2.x network_weights on SDXL (and the reverse).

Multi-process on CPU: `accelerate launch --multi_gpu --num_processes 2 recipes/train.py ...`.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sd.cli import run_main  # noqa: E402
from lora_sd.config import add_config_arguments, check_unknown_flags, load_config, overrides_from_args  # noqa: E402

logger = logging.getLogger("train")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--config_file", dest="config", default=None,
                        help=f"training TOML (with no options at all: the demo, {DEMO_CONFIG.name})")
    add_config_arguments(parser)
    args, unknown = parser.parse_known_args(argv)
    check_unknown_flags(unknown)
    return args


def main(argv=None):
    args = parse_args(argv)
    overrides = overrides_from_args(args)
    config = args.config or (None if overrides else DEMO_CONFIG)  # nothing given: the demo
    cfg = load_config(config, overrides)

    from accelerate import PartialState

    from lora_sd import demo
    from lora_sd.training import train

    result = train(cfg)
    if not PartialState().is_main_process:
        return result
    print(f"trained {result.steps} steps ({result.epochs} epochs); LoRA: {result.lora_path}")
    if result.losses:
        k = max(1, len(result.losses) // 10)
        print(f"loss: first {k} steps {sum(result.losses[:k]) / k:.4f}, last {k} {sum(result.losses[-k:]) / k:.4f}")
    if demo.is_demo_path(cfg.pretrained_model_name_or_path) and cfg.save_model_as == "safetensors":
        report, sample = demo.write_demo_report(cfg.output_dir, cfg.output_name, result.lora_path, result.losses)
        print(f"loaded it with pipe.load_lora_weights: before/after and loss curve in {report}, a sample in {sample}")
    return result


if __name__ == "__main__":
    sys.exit(run_main(main))
