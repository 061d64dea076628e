"""Generate images with a diffusers pipeline and any number of LoRAs (any kind) at their own multipliers.

LoRAs are injected as named PEFT adapters (`lora0`, `lora1`, ...; LoHa and
LoKr through PEFT's LoHa/LoKr layers, DoRA through LoraConfig(use_dora)) and
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
from lora_sd.errors import ConfigError, FormatError, ModelMismatchError
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
    """Put LoRAs of any kind (LoRA, LoCon, LoHa, LoKr, DoRA) on a pipeline: PEFT adapters weighted by
    `multipliers` (returns their adapter names, in the files' order), or merged into the weights (returns []).

    Adapters of different kinds may share a layer: PEFT nests a LoHa/LoKr layer
    around a LoRA one, each adding its own delta at its own weight. Files go on
    in the order `application_order` gives (the weights stay each file's own):
    DoRA files first, so that each DoRA acts on the base weight and the other
    files' deltas add to it, with adapters as merged (merging uses the same
    order); then LoRA files, which PEFT cannot wrap around LoHa/LoKr layers;
    then LoHa and LoKr. Every module of every file is checked before the
    pipeline changes. A DoRA adapter at weight w is PEFT's DoRA of W + w*dW;
    merged, it is ComfyUI's W + w*(DoRA(W) - W): the two agree at w = 1.
    """
    from lora_sd import peft_bridge
    from lora_sd.ops.merge import check_model_version, checked_pairs, merge_into_models, model_parts

    multipliers, names = checked_pairs(loras, multipliers, names, "multipliers")
    if not loras:
        return []
    order = application_order(loras)
    if merge:
        merge_into_models([loras[i] for i in order], [multipliers[i] for i in order], model_parts(pipe),
                          names=[names[i] for i in order], model_version=model_version)
        return []
    parts = model_parts(pipe)
    for lora, name in zip(loras, names, strict=True):
        check_model_version(lora, name, model_version)
        _named_error(name, peft_bridge.plan, lora, **parts)
    adapters = _free_adapter_names(pipe, len(loras))
    for i in order:
        _named_error(names[i], loras[i].apply_to, adapters[i], **parts)
        logger.info("%s: %d module(s) as adapter %s at weight %g", names[i], len(loras[i].modules), adapters[i],
                    multipliers[i])
    # PEFT runs a layer's adapters in the order they are activated: DoRA's first (see above)
    pipe.set_adapters([adapters[i] for i in order], adapter_weights=[multipliers[i] for i in order])
    return adapters


def application_order(loras) -> list[int]:
    """Indices of `loras`: DoRA files, then plain LoRA/LoCon, then LoHa/LoKr (stable within each)."""
    def rank(lora):
        mods = lora.modules.values()
        return 0 if any(m.dora_scale is not None for m in mods) else 1 if all(m.kind == "lora" for m in mods) else 2

    return sorted(range(len(loras)), key=lambda i: rank(loras[i]))


def _named_error(name, call, *args, **kwargs):
    """`call(...)`, its ModelMismatchError / FormatError prefixed with the file's name."""
    try:
        return call(*args, **kwargs)
    except (ModelMismatchError, FormatError) as e:
        raise type(e)(f"{name}: {e}") from None


def _free_adapter_names(pipe, n) -> list[str]:
    """`lora0`, `lora1`, ... skipping names the pipeline's models already hold (networks added earlier)."""
    taken = {a for model in _peft_models(pipe) for a in model.peft_config}
    free = (f"lora{i}" for i in range(len(taken) + n + 1) if f"lora{i}" not in taken)
    return [next(free) for _ in range(n)]


def _peft_models(pipe):
    from lora_sd.ops.merge import model_parts

    return [m for m in model_parts(pipe).values() if getattr(m, "peft_config", None)]


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
