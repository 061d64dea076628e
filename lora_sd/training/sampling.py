"""Sample images during training, with the LoRA being trained applied.

The prompt file is sd-scripts' format: one prompt per line (`#` starts a
comment line), with inline options `--n negative prompt`, `--w width`,
`--h height`, `--d seed`, `--l guidance scale`, `--s steps`. Images go to
`<output_dir>/sample/<output_name>_<step:06d>_<i:02d>.png`; the training RNG
is not touched (every prompt draws from its own seeded generator). The
pipeline and the scheduler by sampler name are generation's
(`SDModel.pipeline`, `lora_sd.generate.make_scheduler`).
"""

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_sd.config.coerce import MAX_SIDE
from lora_sd.errors import ConfigError
from lora_sd.generate import make_scheduler
from lora_sd.io import atomic_path

logger = logging.getLogger(__name__)


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    guidance_scale: float = 7.5
    steps: int = 30


_OPTION = re.compile(r"\s--(n|w|h|d|l|s)\s+")


def read_prompts(path) -> list[SamplePrompt]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"`sample_prompts` {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"`sample_prompts` {path}: not a UTF-8 text file ({e.reason})") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = _OPTION.split(" " + line)
        p = SamplePrompt(parts[0].strip())
        for key, value in zip(parts[1::2], parts[2::2]):
            value = value.strip()
            try:
                if key == "n":
                    p.negative_prompt = value
                elif key in ("w", "h", "d", "s"):
                    setattr(p, {"w": "width", "h": "height", "d": "seed", "s": "steps"}[key], int(value))
                else:
                    p.guidance_scale = float(value)
            except ValueError:
                raise ConfigError(f"{path}:{n}: `--{key} {value}` is not a number") from None
        _check_prompt(p, f"{path}:{n}")  # here, not hours later at the first sample
        prompts.append(p)
    return prompts


def _check_prompt(p: SamplePrompt, where: str):
    # the largest: an image side training accepts (more is memory no machine has), the schedulers' 1000
    # training timesteps (DDIM refuses more steps, at the first sample), and what torch takes as a seed
    for key, value, least, most in (("w", p.width, 8, MAX_SIDE), ("h", p.height, 8, MAX_SIDE),
                                    ("s", p.steps, 1, 1000), ("d", p.seed, -2**63, 2**64 - 1)):
        if value is not None and value < least:
            raise ConfigError(f"{where}: `--{key} {value}` must be at least {least}")
        if value is not None and value > most:
            raise ConfigError(f"{where}: `--{key} {value}` must be at most {most}")
    if not math.isfinite(p.guidance_scale):
        raise ConfigError(f"{where}: `--l {p.guidance_scale}` must be a finite number")


@torch.no_grad()
def sample_images(accelerator, model, *, models: dict, cfg, prompts, step: int) -> list[Path]:
    """Write one image per prompt (main process only) with the LoRA being trained; returns the paths.

    `model` is the SDModel trained on; `models` its (prepared) parts with the adapters ({"unet": ...,
    "text_encoder": ..., "text_encoder_2": ...}). SDXL samples with StableDiffusionXLPipeline (SDModel.pipeline).
    """
    if not accelerator.is_main_process:
        return []
    trained = dataclasses.replace(model, **{name: accelerator.unwrap_model(m) for name, m in models.items()})
    pipe = trained.pipeline(make_scheduler(cfg.sample_sampler, model.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    folder = Path(cfg.output_dir) / "sample"
    folder.mkdir(parents=True, exist_ok=True)
    clip_skip = cfg.clip_skip - 1 if cfg.clip_skip and cfg.clip_skip > 1 else None  # diffusers counts from 0
    if model.version == "sdxl":
        clip_skip = None  # SDXL's pipeline already takes the penultimate layers (what training used)
    paths = []
    for i, p in enumerate(prompts):
        seed = p.seed if p.seed is not None else cfg.seed + i
        generator = torch.Generator(device=accelerator.device).manual_seed(seed)
        with accelerator.autocast():
            image = pipe(p.prompt, negative_prompt=p.negative_prompt or None, width=p.width - p.width % 8,
                         height=p.height - p.height % 8, num_inference_steps=p.steps, guidance_scale=p.guidance_scale,
                         generator=generator, clip_skip=clip_skip).images[0]
        path = folder / f"{cfg.output_name}_{step:06d}_{i:02d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        paths.append(path)
    logger.info("wrote %d sample image(s) to %s", len(paths), folder)
    return paths
