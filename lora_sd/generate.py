"""Generate images with a diffusers pipeline and any number of LoRAs at their own multipliers.

LoRAs are injected as named PEFT adapters (`lora0`, `lora1`, ...) and
weighted with the pipeline's `set_adapters`, or, with `merge=True`, added
into the model weights (`ops.merge_into_models`, sd-scripts' --network_merge).
Each image is a PNG whose text chunk holds the prompt and settings: one key
per setting, and an AUTOMATIC1111-style `parameters` string.
"""

import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lora_sd.config.choices import SAMPLERS  # sd-scripts' --sampler names, also for training samples
from lora_sd.errors import ConfigError, ModelMismatchError
from lora_sd.io import atomic_path, precision_dtype

logger = logging.getLogger(__name__)

def _sampler(name: str):
    if name not in SAMPLERS:
        raise ConfigError(f"--sampler: {name!r} is not one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def make_scheduler(sampler: str, base_config):
    """A diffusers scheduler for an sd-scripts sampler name, on the model's noise schedule."""
    import diffusers

    class_name, extra = _sampler(sampler)
    return getattr(diffusers, class_name).from_config(base_config, steps_offset=1, **extra)


@dataclass
class GenerationSettings:
    """What generate.py takes besides the model and the LoRAs (sd-scripts' option names)."""

    prompts: list
    negative_prompt: str | None = None
    steps: int = 50
    scale: float = 7.5
    seed: int | None = None
    W: int | None = None  # None: the model's size (512; SDXL 1024, as sd-scripts' sdxl_gen_img.py)
    H: int | None = None
    images_per_prompt: int = 1
    sampler: str = "ddim"
    extra: dict = field(default_factory=dict)

    def check(self):
        if not self.prompts:
            raise ConfigError("--prompt: give a prompt (or --from_file)")
        for name in ("steps", "images_per_prompt", "W", "H"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"--{name}: must be positive, got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed < 2**32:  # training's range (numpy's); -1 is not "random"
            raise ConfigError(f"--seed: must be in [0, {2**32 - 1}] (leave it out for a random seed), got {self.seed}")
        if not math.isfinite(self.scale):
            raise ConfigError(f"--scale: must be a finite number, got {self.scale}")
        if (self.W or 0) % 8 or (self.H or 0) % 8:
            raise ConfigError(f"--W/--H: must be multiples of 8, got {self.W or 'default'}x{self.H or 'default'}")
        _sampler(self.sampler)


def read_prompt_file(path, option="--from_file") -> list[str]:
    """The prompts of a text file, one per line; blank lines and `#` comments skipped, as sd-scripts'
    gen_img does. ConfigError naming the file when it is missing, no regular file, or not UTF-8."""
    from lora_sd.io import special_file_kind

    path = Path(path)
    kind = special_file_kind(path)
    if kind is not None or not path.is_file():  # a FIFO would block the read
        raise ConfigError(f"{option} {path}: " + (f"is {kind}, not a text file" if kind else "no such file"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{option} {path}: not a UTF-8 text file (byte {e.start}: {e.reason}); save it as UTF-8") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def add_networks(pipe, loras, multipliers, merge=False, names=None, model_version=None):
    """Put LoRAs on a pipeline: adapters weighted by `multipliers`, or merged into the weights."""
    from lora_sd.ops.merge import check_model_version, checked_pairs, merge_into_models, model_parts

    multipliers, names = checked_pairs(loras, multipliers, names, "multipliers")
    if not loras:
        return []
    if merge:
        merge_into_models(loras, multipliers, model_parts(pipe), names=names, model_version=model_version)
        return []
    adapters = []
    for i, (lora, name) in enumerate(zip(loras, names, strict=True)):
        check_model_version(lora, name, model_version)
        try:
            lora.apply_to(**model_parts(pipe), adapter_name=f"lora{i}")
        except ModelMismatchError as e:
            raise ModelMismatchError(f"{name}: {e}") from None
        adapters.append(f"lora{i}")
    pipe.set_adapters(adapters, adapter_weights=list(multipliers))
    return adapters


def png_info(settings: GenerationSettings, prompt, seed, networks):
    """The PNG text chunk: one key per setting plus an AUTOMATIC1111-style `parameters`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    fields = {
        "prompt": prompt, "negative-prompt": settings.negative_prompt or "", "steps": settings.steps,
        "scale": settings.scale, "seed": seed, "sampler": settings.sampler, "W": settings.W, "H": settings.H,
        **settings.extra,
    }
    if networks:
        fields["networks"] = ", ".join(f"{n}:{m:g}" for n, m in networks)
    for k, v in fields.items():
        info.add_text(k, str(v))
    params = prompt
    if settings.negative_prompt:
        params += f"\nNegative prompt: {settings.negative_prompt}"
    params += (f"\nSteps: {settings.steps}, Sampler: {settings.sampler}, CFG scale: {settings.scale:g}, "
               f"Seed: {seed}, Size: {settings.W}x{settings.H}")
    if networks:
        params += ", Networks: " + ", ".join(f"{Path(n).stem}:{m:g}" for n, m in networks)
    info.add_text("parameters", params)
    return info


@dataclass
class PlannedImage:
    prompt: str
    seed: int
    path: Path


def plan_images(settings: GenerationSettings, outdir) -> list[PlannedImage]:
    """Every image of a run, before any is made: image j of the run gets seed `seed + j` (a random
    seed when none is given), and a name with its prompt's index, its index and its seed."""
    seed = settings.seed if settings.seed is not None else random.randint(0, 2**31 - 1)
    stamp = time.strftime("%Y%m%d%H%M%S")
    plan = []
    for p, prompt in enumerate(settings.prompts):
        for j in range(settings.images_per_prompt):
            image_seed = seed + len(plan)
            plan.append(PlannedImage(prompt, image_seed, Path(outdir) / f"im_{stamp}_{p:03d}_{j:03d}_{image_seed}.png"))
    return plan


def run_pipeline(pipe, settings: GenerationSettings, plan, networks=()):
    """Make the planned images (`plan_images`), each on a CPU generator seeded with its seed, so the
    same settings give the same images; returns the PNG paths."""
    written = []
    for planned in plan:
        generator = torch.Generator("cpu").manual_seed(planned.seed)
        image = pipe(
            planned.prompt, negative_prompt=settings.negative_prompt, num_inference_steps=settings.steps,
            guidance_scale=settings.scale, width=settings.W, height=settings.H, generator=generator,
        ).images[0]
        with atomic_path(planned.path) as tmp:
            image.save(tmp, format="PNG", pnginfo=png_info(settings, planned.prompt, planned.seed, networks))
        written.append(planned.path)
    return written


def generate(ckpt, outdir, settings: GenerationSettings, network_weights=(), network_mul=None, network_merge=False,
             v2=False, v_parameterization=False, model_config=None, device=None, dtype="float"):
    """generate.py: load a model and LoRA files, write PNG images to `outdir`; returns their paths."""
    from lora_sd.models import load_base
    from lora_sd.outputs import check_output
    from lora_sd.ops.args import check_model_config, parse_ratios, resolve_device
    from lora_sd.ops.merge import load_loras

    settings.check()
    muls = parse_ratios(network_weights, network_mul, option="--network_mul")
    dev = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = precision_dtype(dtype, "--precision")
    check_model_config([ckpt], model_config)
    plan = plan_images(settings, outdir)
    for planned in plan:  # an image never replaces an input, nor goes into an input's folder (a model folder)
        check_output(planned.path, [ckpt, *network_weights, model_config], "--outdir")
    loras, names = load_loras(network_weights)
    model = load_base(ckpt, v2=v2, v_parameterization=v_parameterization, model_config=model_config,
                      torch_dtype=torch_dtype)
    size = 1024 if model.version == "sdxl" else 512
    settings = replace(settings, W=settings.W or size, H=settings.H or size)
    pipe = model.pipeline(scheduler=make_scheduler(settings.sampler, model.scheduler.config))
    add_networks(pipe, loras, muls, network_merge, names, model_version=model.version)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    networks = list(zip(names, muls, strict=True))
    if network_merge and networks:
        settings = replace(settings, extra={**settings.extra, "network_merge": "true"})
    Path(outdir).mkdir(parents=True, exist_ok=True)
    paths = run_pipeline(pipe, settings, plan, networks)
    logger.info("wrote %d image(s) to %s", len(paths), outdir)
    return paths
