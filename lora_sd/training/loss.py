"""The per-element loss and its weights, as sd-scripts' conditional_loss and post-processing define them.

- `loss_type`: l2 (squared error), l1, huber `2c (sqrt(d^2 + c^2) - c)` (~ d^2 for |d| << c, ~ 2c|d| beyond)
  and smooth_l1 `2 (sqrt(d^2 + c^2) - c)` (the same divided by c), d = prediction - target.
- The threshold c per sample (`huber_threshold`, sd-scripts' get_huber_threshold_if_needed) follows
  `huber_schedule`: constant `huber_c * huber_scale`; exponential `huber_scale * huber_c ** (t / T)`
  (huber_scale at t = 0 down to huber_c * huber_scale at t = T, the scheduler's train timesteps); snr
  `(1 - huber_c) / (1 + sigma_t)^2 + huber_c` with sigma_t = sqrt((1 - a_t) / a_t) (1 at clean images, huber_c
  at pure noise; huber_scale unused, as in sd-scripts).
- Masks [B, 1, H', W'] (1 = trained, 0 = ignored) are area-resized to the latents (an 8x8 pixel block's mean)
  and multiply the elementwise loss before its mean over the image, as sd-scripts' apply_masked_loss (the mean
  stays over the whole image: a half-masked image weighs half).
- `debiased_weight`: sd-scripts' debiased estimation, 1 / sqrt(SNR) (1 / (SNR + 1) with v-prediction), SNR
  capped at 1000.

PyTorch has Huber/SmoothL1 losses, but with another formula (quadratic then linear pieces); sd-scripts'
pseudo-Huber form is written here because users' loss values and thresholds are sd-scripts'.
"""

import math

import torch
import torch.nn.functional as F


def _snr(scheduler, timesteps):
    from diffusers.training_utils import compute_snr  # sd-scripts' all_snr: alpha_bar / (1 - alpha_bar)

    return compute_snr(scheduler, timesteps)


def huber_threshold(schedule: str, huber_c: float, huber_scale: float, scheduler, timesteps) -> torch.Tensor:
    """[B] the threshold c of each sample's timestep."""
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if schedule == "exponential":
        return huber_scale * torch.exp(math.log(huber_c) * t / scheduler.config.num_train_timesteps)
    if schedule == "snr":
        alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1 - alphas) / alphas).sqrt()
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ValueError(f"unknown huber_schedule {schedule!r}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """[B, C, h, w] loss of each element; `huber_c` [B] for huber and smooth_l1."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        c = huber_c.to(pred).view(-1, *[1] * (pred.ndim - 1))
        d2 = (pred - target) ** 2
        # sqrt(d2 + c^2) - c written as d2 / (sqrt(d2 + c^2) + c): the same value without float32's cancellation
        # when c >> |d| (sd-scripts' form loses d2 entirely for c ~ 1e4)
        smooth = 2 * d2 / (torch.sqrt(d2 + c**2) + c)
        return smooth * c if loss_type == "huber" else smooth
    raise ValueError(f"unknown loss_type {loss_type!r}")


def apply_masks(loss: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """`loss` [B, C, h, w] times the masks [B, 1, H, W] (values 0..1) area-resized to h x w."""
    resized = F.interpolate(masks.to(loss), size=loss.shape[-2:], mode="area")
    return loss * resized


def debiased_weight(scheduler, timesteps, v_prediction: bool = False) -> torch.Tensor:
    """[B] sd-scripts' apply_debiased_estimation factor (SNR capped at 1000: SNR at t = 0 is ~1e3)."""
    snr = torch.clamp(_snr(scheduler, timesteps), max=1000)
    return 1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr)


def objective_metadata(cfg) -> dict:
    """sd-scripts' `ss_*` keys of these options."""
    return {"ss_loss_type": cfg.loss_type, "ss_huber_schedule": cfg.huber_schedule, "ss_huber_c": cfg.huber_c,
            "ss_huber_scale": cfg.huber_scale, "ss_multires_noise_iterations": cfg.multires_noise_iterations,
            "ss_multires_noise_discount": cfg.multires_noise_discount, "ss_ip_noise_gamma": cfg.ip_noise_gamma,
            "ss_ip_noise_gamma_random_strength": cfg.ip_noise_gamma_random_strength,
            "ss_noise_offset_random_strength": cfg.noise_offset_random_strength,
            "ss_debiased_estimation": bool(cfg.debiased_estimation_loss), "ss_masked_loss": cfg.masked_loss}
