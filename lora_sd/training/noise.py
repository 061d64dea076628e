"""The diffusion training objective as sd-scripts computes it.

Noise: N(0, 1) like the latents, plus `noise_offset * N(0, 1)` per sample and
channel (constant over the image). Timesteps: uniform integers in
[min_timestep, max_timestep). Target: the noise, or with v-parameterization
the velocity `sqrt(a) * noise - sqrt(1 - a) * x0`. Loss: per-sample MSE,
times the sample's loss weight (prior_loss_weight for regularization
images), times the min-SNR weight `min(snr, gamma) / snr` (`/ (snr + 1)` for
v-prediction), then the batch mean.
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
