"""Multi-resolution noise, input perturbation (ip_noise_gamma), random noise-offset / ip strengths: the training
loss equals sd-scripts' definitions written out here, drawing from the same seeded generator in the same order."""

import pytest
import torch
import torch.nn.functional as F

from lora_sd.config import TrainConfig
from lora_sd.models.load import noise_scheduler
from lora_sd.training import noise
from lora_sd.training.noise import compute_loss

ALPHAS = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, dim=0)

OPTIONS = {
    "offset_random": {"noise_offset": 0.2, "noise_offset_random_strength": True},
    "multires": {"multires_noise_iterations": 4, "multires_noise_discount": 0.5},
    "multires_offset": {"multires_noise_iterations": 6, "noise_offset": 0.1},
    "ip_noise": {"ip_noise_gamma": 0.3},
    "ip_noise_random": {"ip_noise_gamma": 0.3, "ip_noise_gamma_random_strength": True},
    "all_v": {"noise_offset": 0.1, "noise_offset_random_strength": True, "multires_noise_iterations": 3,
              "ip_noise_gamma": 0.2, "ip_noise_gamma_random_strength": True, "v_parameterization": True},
}


def pyramid(eps, gen, iterations, discount):
    """Multires noise: level i is N(0, 1) at (h, w) / r**i, r = 2 + 2 U(0, 1), bilinearly upsampled and scaled by
    discount**i, added up; the last level is the one that reaches a side of 1; divided by the std of all."""
    b, c, h, w = eps.shape
    total = eps
    for i in range(iterations):
        r = 2 + 2 * torch.rand(1, generator=gen).item()
        size = (max(1, int(h / r**i)), max(1, int(w / r**i)))
        up = torch.nn.Upsample(size=(h, w), mode="bilinear")(torch.randn((b, c, *size), generator=gen))
        total = total + discount**i * up
        if 1 in size:
            break
    return total / total.std()


def reference_loss(unet, latents, hidden, gen, noise_offset=None, noise_offset_random_strength=False,
                   multires_noise_iterations=None, multires_noise_discount=0.3, ip_noise_gamma=None,
                   ip_noise_gamma_random_strength=False, v_parameterization=False):
    offset = noise_offset
    if offset and noise_offset_random_strength:
        offset = torch.rand(1, generator=gen).item() * noise_offset
    eps = torch.randn(latents.shape, generator=gen)
    if offset:
        eps = eps + offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
    if multires_noise_iterations:
        eps = pyramid(eps, gen, multires_noise_iterations, multires_noise_discount)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
    seen = eps
    if ip_noise_gamma:
        gamma = ip_noise_gamma
        if ip_noise_gamma_random_strength:
            gamma = torch.rand(1, generator=gen).item() * ip_noise_gamma
        seen = eps + gamma * torch.randn(latents.shape, generator=gen)
    a = ALPHAS[t][:, None, None, None]
    with torch.no_grad():
        pred = unet(a.sqrt() * latents + (1 - a).sqrt() * seen, t, hidden).sample
    target = a.sqrt() * eps - (1 - a).sqrt() * latents if v_parameterization else eps  # the target: eps, not seen
    return ((pred - target) ** 2).mean()


def training_loss(tiny, latents, hidden, options):
    batch = {"latents": latents, "captions": ["a", "b"], "loss_weights": torch.ones(2)}
    with torch.no_grad():
        return compute_loss(batch, unet=tiny.unet, text_conditioning=lambda captions: (hidden, None), vae=tiny.vae,
                            scheduler=noise_scheduler(options.get("v_parameterization", False)),
                            cfg=TrainConfig(**options), generator=torch.Generator().manual_seed(5),
                            weight_dtype=torch.float32)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_noise_options_follow_their_definitions(tiny_sd1, option):
    gen = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    scale = tiny_sd1.vae.config.scaling_factor
    got = training_loss(tiny_sd1, latents, hidden, OPTIONS[option])
    want = reference_loss(tiny_sd1.unet, latents * scale, hidden, torch.Generator().manual_seed(5),
                          **OPTIONS[option])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    plain = {k: v for k, v in OPTIONS[option].items() if k == "v_parameterization"}
    assert abs(got.item() - training_loss(tiny_sd1, latents, hidden, plain).item()) > 1e-4 * got.item()


def test_multires_noise_has_unit_std_and_low_frequencies():
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(4, 4, 64, 64, generator=gen)
    out = noise.multires_noise(eps, 8, 0.8, gen)
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)
    assert F.avg_pool2d(out, 16).std() > 2 * F.avg_pool2d(eps, 16).std()  # coarse structure added


def test_random_strengths_are_uniform_below_the_option():
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([noise.random_strength(0.3, gen) for _ in range(2000)])
    assert draws.min() >= 0 and draws.max() <= 0.3 and draws.mean().item() == pytest.approx(0.15, abs=0.01)
