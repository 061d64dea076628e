"""A real LoraTraining around a random full-size (or tiny) model, set up without a download: shared by the
speed-floor comparison, the GPU rows and the sd-scripts peer (which gets the same model and images on disk).

The model is built in memory and handed to the training through a patched `lora_sd.models.load.load_base`
(not written to a folder and loaded back): a full-size SDXL in a diffusers folder is 10 GiB of disk and a
minute of loading per row, and the training's setup after the load (dtype, attention, adapters, fp8, gradient
checkpointing, caching, optimizer, accelerate.prepare) is the real one either way. Only the peer writes the
model to disk, once, because sd-scripts reads it from there.
"""

import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

# The dataset: one image repeated (folder "<repeats>_bench"), so a batch of 16 fills from one image and the
# latent cache encodes one image per epoch, for us and for sd-scripts alike.
REPEATS = 16
CAPTION = "a photo of a cat"


def build_model(model: str, device="cpu", full_encoders=None):
    """A random SDModel: 'tiny' (lora_sd.tiny), 'sd15' or 'sdxl' (the shipped full-size configs).

    `full_encoders` (default: on CUDA): the full-size VAE and text encoders, so that the GPU rows' peak memory
    is a real run's. Off (the CPU speed floor), the VAE is the tiny one (same 8x downscale, 4 latent channels)
    and the text encoders have their real width but one layer: with cached latents and text-encoder outputs
    neither runs in a step, and building or running the full ones on 2 CPU cores costs minutes.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_sd import tiny
    from lora_sd.models import sd_configs
    from lora_sd.models.load import SDModel, noise_scheduler
    from lora_sd.models.tokenizer import load_clip_tokenizer

    if model == "tiny":
        return tiny.build_tiny_sd("sd1")
    full = torch.device(device).type == "cuda" if full_encoders is None else full_encoders
    version = "sdxl" if model == "sdxl" else "sd1"
    configs = sd_configs.shipped_configs(version)
    layers = {} if full else {"num_hidden_layers": 1}
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**(configs["vae"] if full else tiny.vae_config(version)))
        text_encoder = CLIPTextModel(CLIPTextConfig(**dict(configs["text_encoder"], **layers)))
        text_encoder_2 = tokenizer_2 = None
        if version == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(configs["text_encoder_2"], **layers)))
            tokenizer_2 = load_clip_tokenizer("sdxl_2")
    for m in (unet, vae, text_encoder, text_encoder_2):
        if m is not None:
            m.eval()
    return SDModel(unet, vae, text_encoder, load_clip_tokenizer(version), noise_scheduler(), version,
                   source=f"random-{model}", source_format="benchmark", text_encoder_2=text_encoder_2,
                   tokenizer_2=tokenizer_2)


def write_images(root: Path, resolution: int) -> Path:
    """`root/images/<REPEATS>_bench/0.png` (+ .txt and .caption): one `resolution` px image and its caption."""
    from lora_sd.demo import draw_image

    sub = Path(root) / "images" / f"{REPEATS}_bench"
    sub.mkdir(parents=True, exist_ok=True)
    draw_image(random.Random(0)).resize((resolution, resolution)).save(sub / "0.png")
    for ext in (".txt", ".caption"):  # sd-scripts' caption_extension default, and ours
        (sub / f"0{ext}").write_text(CAPTION)
    return sub.parent


def train_config(root: Path, resolution: int, batch: int, options: dict):
    """The run's TrainConfig: rank-4 U-Net LoRA, AdamW, fp32, cached latents and text-encoder outputs, then
    `options` (command-line strings or typed values, e.g. mixed_precision=bf16, optimizer_type=AdamW8bit)."""
    from lora_sd.config import load_config

    base = {"pretrained_model_name_or_path": str(root / "model"), "train_data_dir": str(write_images(root, resolution)),
            "resolution": str(resolution), "train_batch_size": batch, "output_dir": str(root / "out"),
            "output_name": "bench", "max_train_steps": 10**6, "seed": 0, "max_data_loader_n_workers": 0,
            "network_dim": 4, "network_alpha": 1.0, "network_train_unet_only": True, "learning_rate": 1e-4,
            "optimizer_type": "AdamW", "cache_latents": True, "cache_text_encoder_outputs": True}
    return load_config(None, {**base, **options})


@contextmanager
def bench_training(sd_model, resolution=64, batch=1, options=None, root=None):
    """(LoraTraining after setup(), one batch of its data loader): the training's own setup on `sd_model`."""
    from lora_sd.training.loop import LoraTraining

    with tempfile.TemporaryDirectory(prefix="lora_sd-bench-") as tmp:
        cfg = train_config(Path(root or tmp), resolution, batch, options or {})
        run = LoraTraining(cfg)
        with mock.patch("lora_sd.models.load.load_base", lambda *a, **k: sd_model):
            run.setup()
        run.bar = None
        try:
            yield run, next(iter(run.dataloader))
        finally:
            run.cleanup()


def run_steps(run, batch, steps: int):
    """`steps` calls of the training's own `_train_step` on `batch`, counted as the loop counts them."""
    for _ in range(steps):
        run._train_step(batch)
        run.progress.batches_in_epoch += 1
        run.progress.global_step += 1
