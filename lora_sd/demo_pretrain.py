"""The demo's base model: a tiny SD1 (lora_sd.tiny) whose U-Net is pretrained in-process on drawn scenes.

A random tiny model draws noise, so no LoRA trained on it can show anything. Two parts:
1. the VAE is set by hand, not trained, to an exact pixel codec (`pixel_codec`): its latent is
   the picture's 8x8 thumbnail (RGB in [-1, 1] + a zero channel) and it decodes by nearest
   upsampling. So the model draws 8x8 mosaics, but draws them from the first step; a tiny VAE
   trained here for minutes still washed every colour out (its 4-channel GroupNorms drop them);
2. the U-Net is pretrained as a text-to-image denoiser (SD's DDPM epsilon objective) on captioned
   scenes of houses and trees (lora_sd.demo_scenes), 10 % of captions dropped so that
   classifier-free guidance works. The text encoder stays as built (its outputs already tell
   the captions apart); the demo's LoRA trains it.
lora_sd.demo caches the result, written with `models.save_diffusers`: a folder that
StableDiffusionPipeline and the training path load like any other. Hand-written loop: diffusers'
text-to-image trainer is an example script, not a function.
"""

import logging
import random
from dataclasses import dataclass

import torch

from lora_sd.demo_scenes import draw_scene

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainPlan:
    unet_steps: int = 1000
    unet_batch: int = 32
    scenes: int = 512  # captioned scenes the U-Net learns from
    lr: float = 3e-3
    seed: int = 0


PLAN = PretrainPlan()
CODEC_WIDTH = 16  # four GroupNorm groups of four channels: [x, -x, A, -A] per colour, see pixel_codec
_A, _B = 100.0, 30.0  # the groups' constant (keeps their mean 0 and std A/sqrt(2)); SiLU's linear offset


def pretrain_demo_model(folder, plan: PretrainPlan = None):
    """Build the tiny SD1 with the pixel codec as its VAE, pretrain its U-Net as `plan` says, save it (diffusers)."""
    from lora_sd.models import save_diffusers
    from lora_sd.tiny import build_tiny_sd

    plan = plan or PLAN
    model = build_tiny_sd("sd1", seed=plan.seed)
    model.vae = pixel_codec()
    rng = random.Random(plan.seed)
    generator = torch.Generator().manual_seed(plan.seed)
    captions, images = zip(*(draw_scene(rng) for _ in range(plan.scenes)))
    with torch.no_grad():
        latents = model.vae.encode(_pixels(images)).latent_dist.mean  # [N, 4, 8, 8]
        model.vae.register_to_config(scaling_factor=float(1 / latents[:, :3].std()))  # unit variance, as SD's
        latents = latents * model.vae.config.scaling_factor
        states = _encode_captions(model, sorted(set(captions)) + [""])
    logger.info("demo: pretraining the tiny base model's U-Net (%d steps) on %d scenes, once", plan.unet_steps,
                plan.scenes)
    train_denoiser(model, latents, [states[c] for c in captions], states[""], generator, plan)
    for m in (model.unet, model.vae, model.text_encoder):
        m.eval()
    save_diffusers(model, folder)


def pixel_codec():
    """An AutoencoderKL set by hand to an exact codec: latent = the 8x8 average-pooled RGB (+ a zero channel),
    decoded by nearest upsampling.

    Every resnet and attention branch is zeroed (their residual paths pass through), the downsamplers
    average 2x2, the upsamplers' convs are the identity. The GroupNorms before the output convs would
    normalise colours away; each colour x travels in a group [x, -x, A, -A], whose mean is 0 and whose
    std is A/sqrt(2) whatever x is, so the norm is linear, and +B keeps the SiLU after it linear too.
    """
    from diffusers import AutoencoderKL
    from diffusers.models.resnet import Downsample2D, Upsample2D

    from lora_sd.tiny import vae_config

    vae = AutoencoderKL(**dict(vae_config(), block_out_channels=(CODEC_WIDTH,) * 4, norm_num_groups=4))
    eye = torch.eye(CODEC_WIDTH)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for m in vae.modules():
            if isinstance(m, Downsample2D):
                m.conv.weight[:, :, 0:2, 0:2] = 0.25 * eye[:, :, None, None]  # taps on x[2i], x[2i+1]: 2x2 mean
            elif isinstance(m, Upsample2D):
                m.conv.weight[:, :, 1, 1] = eye
            elif isinstance(m, torch.nn.GroupNorm):
                m.weight.fill_(_A / 2**0.5)
                m.bias.fill_(_B)
        for conv in (vae.encoder.conv_in, vae.decoder.conv_in):  # RGB (latent) channel c -> group c
            for c in range(3):
                conv.weight[4 * c, c, 1, 1], conv.weight[4 * c + 1, c, 1, 1] = 1, -1
            conv.bias[2::4], conv.bias[3::4] = _A, -_A
        for conv in (vae.encoder.conv_out, vae.decoder.conv_out):  # group c -> channel c, less the offset
            for c in range(3):
                conv.weight[c, 4 * c, 1, 1] = 1
            conv.bias[:3] = -_B
        vae.encoder.conv_out.bias[4:] = -30  # the log-variances: a deterministic latent
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight[:, :, 0, 0] = torch.eye(conv.weight.shape[0])
    return vae.eval()


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
