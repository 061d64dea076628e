"""The diffusion training objective as sd-scripts computes it.

Noise: N(0, 1) like the latents, plus `noise_offset * N(0, 1)` per sample and
channel (constant over the image). Timesteps: uniform integers in
[min_timestep, max_timestep). Target: the noise, or with v-parameterization
the velocity `sqrt(a) * noise - sqrt(1 - a) * x0`. Loss: per-sample MSE,
times the sample's loss weight (prior_loss_weight for regularization
images), times the min-SNR weight `min(snr, gamma) / snr` (`/ (snr + 1)` for
v-prediction), then the batch mean. `compute_loss` puts these together for
one batch, as the training loop runs it; on SDXL the U-Net also gets te2's
pooled output and the images' size/crop `time_ids` (`added_cond_kwargs`).
"""

import torch
import torch.nn.functional as F


def sample_noise(latents, noise_offset=None, generator=None):
    """[B, C, h, w] noise; noise_offset adds a per-(sample, channel) constant (sd-scripts' apply_noise_offset)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, dtype=torch.float32)
        noise = noise + noise_offset * offset.to(latents)
    return noise


def sample_timesteps(batch_size, min_timestep=0, max_timestep=1000, generator=None, device="cpu"):
    return torch.randint(min_timestep, max_timestep, (batch_size,), generator=generator).long().to(device)


def min_snr_weight(scheduler, timesteps, gamma, v_prediction=False):
    """sd-scripts' apply_snr_weight factor: min(snr, gamma) / snr, or / (snr + 1) for v-prediction.

    snr = alpha_bar / (1 - alpha_bar), from diffusers' compute_snr (sd-scripts' all_snr, the same formula).
    """
    from diffusers.training_utils import compute_snr

    s = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if v_prediction else clipped / s


def target_for(scheduler, latents, noise, timesteps, v_parameterization=False):
    if v_parameterization:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def diffusion_loss(model_pred, target, loss_weights, scheduler=None, timesteps=None, min_snr_gamma=None,
                   v_parameterization=False):
    """The batch loss: per-sample MSE * loss weight * (min-SNR weight), averaged."""
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])  # [B]
    loss = loss * loss_weights.to(loss)
    if min_snr_gamma:
        loss = loss * min_snr_weight(scheduler, timesteps, min_snr_gamma, v_parameterization).to(loss)
    return loss.mean()


def time_ids(batch) -> torch.Tensor:
    """SDXL's [B, 6] size conditioning: original (h, w), crop (top, left), target (h, w) of each image
    (sd-scripts' get_size_embeddings input; diffusers' `add_time_ids`)."""
    return torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]], dim=1)


def compute_loss(batch, *, unet, text_conditioning, vae, scheduler, cfg, generator, weight_dtype):
    """The diffusion loss of one batch: VAE latents (or cached ones), noise, timesteps, U-Net, target, loss."""
    device = next(vae.parameters()).device
    if "latents" in batch:
        latents = batch["latents"].to(device)
    else:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # a float32 VAE (as the latent cache)
            latents = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist.sample(generator)
    latents = (latents * vae.config.scaling_factor).float()  # [B, 4, h, w]
    eps = sample_noise(latents, cfg.noise_offset, generator)
    timesteps = sample_timesteps(latents.shape[0], cfg.min_timestep, cfg.max_timestep, generator, device)
    noisy = scheduler.add_noise(latents, eps, timesteps)
    context, pooled = text_conditioning(batch["captions"])  # [B, 77 (or 152/227), hidden], SDXL: [B, P]
    added = None
    if pooled is not None:  # SDXL: te2's pooled projection and each image's size/crop ids
        added = {"text_embeds": pooled.to(device, weight_dtype),
                 "time_ids": time_ids(batch).to(device, weight_dtype)}
    pred = unet(noisy.to(weight_dtype), timesteps, context.to(device, weight_dtype), added_cond_kwargs=added).sample
    target = target_for(scheduler, latents, eps, timesteps, cfg.v_parameterization)
    return diffusion_loss(pred, target, batch["loss_weights"].to(device), scheduler, timesteps,
                          cfg.min_snr_gamma, cfg.v_parameterization)
