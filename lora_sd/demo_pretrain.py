"""The demo's base model: a tiny SD1 (lora_sd.tiny) pretrained in-process on procedurally drawn scenes.

A random tiny model draws noise, so no LoRA trained on it can show anything. This pretrains it
once (lora_sd.demo caches the folder) in two short stages, on 2 CPU cores in about a minute:
1. the VAE as an image codec (reconstruction + a small KL term) on pictures of every colour;
   its `scaling_factor` is then set so that the scenes' latents have unit variance, as SD's is;
2. the U-Net as a text-to-image denoiser (SD's DDPM epsilon objective) on captioned scenes of
   houses and trees (lora_sd.demo_scenes), 10 % of captions dropped so classifier-free guidance
   works. The text encoder stays as built: its outputs already tell the captions apart, and the
   demo's LoRA trains it.
The result is written with `models.save_diffusers`: a folder StableDiffusionPipeline and the
training path load like any other. Hand-written loops because diffusers has no VAE trainer
and its text-to-image example is a script, not a function.
"""

import logging
import random
from dataclasses import dataclass

import torch

from lora_sd.demo_scenes import draw_codec_image, draw_scene

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainPlan:
    vae_steps: int = 300
    unet_steps: int = 1000
    vae_batch: int = 8
    vae_size: int = 64  # the codec's pictures' size (it is convolutional: it learns at any size)
    unet_batch: int = 32
    scenes: int = 1024  # captioned scenes the U-Net learns from
    lr: float = 2e-3
    seed: int = 0


PLAN = PretrainPlan()


def pretrain_demo_model(folder, plan: PretrainPlan = None):
    """Build the tiny SD1, pretrain its VAE and U-Net as `plan` says, save it as a diffusers folder."""
    from lora_sd.models import save_diffusers
    from lora_sd.tiny import build_tiny_sd

    plan = plan or PLAN
    model = build_tiny_sd("sd1", seed=plan.seed)
    rng = random.Random(plan.seed)
    generator = torch.Generator().manual_seed(plan.seed)
    logger.info("demo: pretraining the tiny base model's VAE (%d steps), once", plan.vae_steps)
    train_codec(model.vae, rng, generator, plan)
    captions, images = zip(*(draw_scene(rng) for _ in range(plan.scenes)))
    with torch.no_grad():
        latents = model.vae.encode(_pixels(images)).latent_dist.mean  # [N, 4, 8, 8]
        model.vae.register_to_config(scaling_factor=float(1 / latents.std()))
        latents = latents * model.vae.config.scaling_factor
        states = _encode_captions(model, sorted(set(captions)) + [""])
    logger.info("demo: pretraining its U-Net (%d steps) on %d scenes", plan.unet_steps, plan.scenes)
    train_denoiser(model, latents, [states[c] for c in captions], states[""], generator, plan)
    for m in (model.unet, model.vae, model.text_encoder):
        m.eval()
    save_diffusers(model, folder)


def train_codec(vae, rng, generator, plan):
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=plan.lr, weight_decay=0)
    for step in range(plan.vae_steps):
        pixels = _pixels([draw_codec_image(rng, plan.vae_size) for _ in range(plan.vae_batch)])
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == plan.vae_steps - 1:
            logger.info("demo: VAE step %d, reconstruction loss %.4f", step, loss.item())
    vae.eval()


def train_denoiser(model, latents, states, empty, generator, plan):
    unet, scheduler = model.unet, model.scheduler
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=plan.lr, weight_decay=0)
    states = torch.stack(states)  # [N, 77, 32]
    for step in range(plan.unet_steps):
        index = torch.randint(0, len(latents), (plan.unet_batch,), generator=generator)
        x0, cond = latents[index], states[index].clone()
        cond[torch.rand(len(index), generator=generator) < 0.1] = empty  # unconditional 10 % of the time
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        prediction = unet(scheduler.add_noise(x0, noise, t), t, cond).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == plan.unet_steps - 1:
            logger.info("demo: U-Net step %d, loss %.4f", step, loss.item())
    unet.eval()


def _encode_captions(model, captions):
    ids = model.tokenizer(captions, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    return dict(zip(captions, model.text_encoder(ids)[0]))


def _pixels(images):
    import numpy as np

    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(array).permute(0, 3, 1, 2)  # [B, 3, H, W] in [-1, 1]
