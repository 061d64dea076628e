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

Issue 12 options, as sd-scripts' get_noise_noisy_latents_and_timesteps: the
offset's strength uniform in [0, noise_offset] per batch
(`noise_offset_random_strength`); multi-resolution noise (`multires_noise`)
after the offset; input perturbation (`ip_noise_gamma`: the U-Net sees
`add_noise(x0, eps + gamma * N(0, 1), t)`, the target stays eps). The loss
type, Huber threshold, masks and debiased weights: lora_sd.training.loss.
Every draw comes from the step's generator, in the order written here.
"""

import torch
import torch.nn.functional as F

from lora_sd.training import loss as objective


def sample_noise(latents, noise_offset=None, generator=None):
    """[B, C, h, w] noise; noise_offset adds a per-(sample, channel) constant (sd-scripts' apply_noise_offset)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, dtype=torch.float32)
        noise = noise + noise_offset * offset.to(latents)
    return noise


def random_strength(value: float, generator) -> torch.Tensor:
    """`value` x U(0, 1), one per batch (sd-scripts' *_random_strength options)."""
    return torch.rand(1, generator=generator) * value


def multires_noise(noise, iterations: int, discount: float, generator=None):
    """sd-scripts' pyramid_noise_like: level i adds N(0, 1) noise drawn at the size / r**i (r uniform in [2, 4)
    per level), bilinearly upsampled, times discount**i; stops after a 1-pixel level; then divided by the
    whole tensor's std."""
    b, c, h, w = noise.shape
    noise = noise.clone()
    for i in range(iterations):
        r = torch.rand(1, generator=generator).item() * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = torch.randn((b, c, hn, wn), generator=generator, dtype=torch.float32).to(noise)
        noise = noise + F.interpolate(level, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


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
                   v_parameterization=False, *, loss_type="l2", huber_c=None, masks=None, debiased=False):
    """The batch loss: per-element loss (masked), its mean per sample * loss weight * (min-SNR weight)
    * (debiased weight), averaged over the batch."""
    loss = objective.elementwise_loss(model_pred.float(), target.float(), loss_type, huber_c)  # [B, C, h, w]
    if masks is not None:
        loss = objective.apply_masks(loss, masks)
    loss = loss.mean(dim=[1, 2, 3]) * loss_weights.to(loss)  # [B]
    if min_snr_gamma:
        loss = loss * min_snr_weight(scheduler, timesteps, min_snr_gamma, v_parameterization).to(loss)
    if debiased:
        loss = loss * objective.debiased_weight(scheduler, timesteps, v_parameterization).to(loss)
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
    offset = cfg.noise_offset
    if offset and cfg.noise_offset_random_strength:
        offset = random_strength(offset, generator).item()
    eps = sample_noise(latents, offset, generator)
    if cfg.multires_noise_iterations:
        eps = multires_noise(eps, cfg.multires_noise_iterations, cfg.multires_noise_discount, generator)
    timesteps = sample_timesteps(latents.shape[0], cfg.min_timestep, cfg.max_timestep, generator, device)
    noisy = scheduler.add_noise(latents, _perturbed(eps, cfg, generator), timesteps)
    context, pooled = text_conditioning(batch["captions"])  # [B, 77 (or 152/227), hidden], SDXL: [B, P]
    added = None
    if pooled is not None:  # SDXL: te2's pooled projection and each image's size/crop ids
        added = {"text_embeds": pooled.to(device, weight_dtype),
                 "time_ids": time_ids(batch).to(device, weight_dtype)}
    pred = unet(noisy.to(weight_dtype), timesteps, context.to(device, weight_dtype), added_cond_kwargs=added).sample
    target = target_for(scheduler, latents, eps, timesteps, cfg.v_parameterization)
    huber_c = None
    if cfg.loss_type in ("huber", "smooth_l1"):
        huber_c = objective.huber_threshold(cfg.huber_schedule, cfg.huber_c, cfg.huber_scale, scheduler, timesteps)
    masks = batch["masks"].to(device) if "masks" in batch else None
    return diffusion_loss(pred, target, batch["loss_weights"].to(device), scheduler, timesteps,
                          cfg.min_snr_gamma, cfg.v_parameterization, loss_type=cfg.loss_type, huber_c=huber_c,
                          masks=masks, debiased=cfg.debiased_estimation_loss)


def _perturbed(eps, cfg, generator):
    """The noise the U-Net input gets: eps, plus gamma x N(0, 1) with ip_noise_gamma (input perturbation)."""
    if not cfg.ip_noise_gamma:
        return eps
    gamma = cfg.ip_noise_gamma
    if cfg.ip_noise_gamma_random_strength:
        gamma = random_strength(gamma, generator).item()
    return eps + gamma * torch.randn(eps.shape, generator=generator, dtype=torch.float32).to(eps)
