"""The training pieces against their definitions: optimizers, schedules, noise, targets, text conditioning."""

import importlib.util

import pytest
import torch

from lora_sd.errors import ConfigError
from lora_sd.models.load import noise_scheduler
from lora_sd.training import noise, optim
from lora_sd.training.text import TextEncoders, encode, tokenize
from lora_sd.training.text_cache import CachedTextEncoder

OPTIONAL = {"Prodigy": "prodigyopt", "DAdaptAdam": "dadaptation"}


@pytest.mark.parametrize("name", list(optim.OPTIMIZERS))
def test_each_optimizer_constructs_and_steps(name):
    if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
        with pytest.raises(ConfigError, match=f"pip install {OPTIONAL[name]}"):
            optim.build_optimizer(name, [{"params": [torch.nn.Parameter(torch.ones(2))]}], 1e-3, [])
        return
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32, 64))
    same_lr = name in OPTIONAL  # D-Adaptation and Prodigy refuse different group learning rates
    groups = [{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-3 if same_lr else 5e-4}]
    args = ["weight_decay=0.01"] if name in ("AdamW", "AdamW8bit") else []
    opt, desc = optim.build_optimizer(name.lower(), groups, 1e-3, args)  # names are case-insensitive
    assert desc.endswith(type(opt).__name__ + ("(weight_decay=0.01)" if args else ""))
    before = a.detach().clone()
    for _ in range(2):
        (a @ b).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, a.detach())
    assert len(optim.current_lrs(opt)) == 2


def test_adaptive_optimizers_refuse_two_learning_rates():
    groups = [{"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1.0},
              {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.5}]
    with pytest.raises(ConfigError, match="one learning rate"):
        optim.build_optimizer("Prodigy", groups, 1.0, [])


def test_optimizer_args_parsing():
    assert optim.parse_optimizer_args(["weight_decay=0.01", "betas=0.9,0.99", "decouple=True", "mode=fast"]) == {
        "weight_decay": 0.01, "betas": (0.9, 0.99), "decouple": True, "mode": "fast"}
    with pytest.raises(ConfigError, match="optimizer_args"):
        optim.build_optimizer("AdamW", [{"params": [torch.nn.Parameter(torch.ones(2))]}], 1e-3, ["nonsense=1"])


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial"])
def test_each_schedule(name):
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = optim.build_scheduler(name, opt, warmup_steps=2, total_steps=10, num_cycles=2, power=2.0)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if name == "constant":
        assert lrs == [1.0] * 10
    else:
        assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1.0)  # linear warmup over 2 steps
    if name in ("linear", "cosine", "polynomial"):
        assert lrs[-1] < 0.2
    if name == "cosine_with_restarts":
        assert lrs[6] > lrs[5]  # the second cycle starts again near the top


def test_schedule_counts_processes():
    """accelerate steps a prepared schedule once per process: warmup and length scale like sd-scripts."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    sched = optim.build_scheduler("linear", opt, warmup_steps=2, total_steps=10, num_processes=2)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)


def test_noise_offset_and_timesteps():
    latents = torch.zeros(64, 4, 8, 8)
    plain = noise.sample_noise(latents, None, torch.Generator().manual_seed(0))
    offset = noise.sample_noise(latents, 0.5, torch.Generator().manual_seed(0))
    diff = offset - plain  # constant per (sample, channel), std 0.5
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    assert 0.4 < diff[:, :, 0, 0].std() < 0.6
    t = noise.sample_timesteps(1000, 100, 200, torch.Generator().manual_seed(0))
    assert t.min() >= 100 and t.max() < 200 and t.dtype == torch.long


def test_min_snr_weights_and_v_target():
    sched = noise_scheduler()
    t = torch.tensor([1, 500, 999])
    a = sched.alphas_cumprod[t]
    snr = a / (1 - a)
    gamma = 5.0
    assert torch.allclose(noise.min_snr_weight(sched, t, gamma), torch.minimum(snr, torch.tensor(gamma)) / snr)
    assert torch.allclose(noise.min_snr_weight(sched, t, gamma, v_prediction=True),
                          torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    v = noise.target_for(sched, x0, eps, t, v_parameterization=True)
    want = a.sqrt()[:, None, None, None] * eps - (1 - a).sqrt()[:, None, None, None] * x0
    assert torch.allclose(v, want, atol=1e-6)
    assert noise.target_for(sched, x0, eps, t) is eps
    # loss weights (prior_loss_weight) scale each sample's MSE
    pred = torch.zeros(2, 4, 2, 2)
    target = torch.ones(2, 4, 2, 2)
    assert noise.diffusion_loss(pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx(0.75)


@pytest.mark.parametrize("max_len,chunks", [(None, 1), (75, 1), (150, 2), (225, 3)])
def test_max_token_length_chunks(tiny, max_len, chunks):
    caption = ", ".join(["a photo of a cat"] * 40)  # longer than 225 tokens
    ids = tokenize(tiny.tokenizer, [caption, "a dog"], max_len)
    assert ids.shape == (2, chunks, 77)
    bos, eos = tiny.tokenizer.bos_token_id, tiny.tokenizer.eos_token_id
    assert (ids[:, :, 0] == bos).all() and (ids[0, :, -1] == eos).all()  # every chunk is <BOS> ... <EOS>
    with torch.no_grad():
        hidden = encode(tiny.text_encoder, ids)
    assert hidden.shape == (2, 77 if chunks == 1 else chunks * 75 + 2, 32)
    if chunks > 1:  # the first 75 tokens' states equal those of the first chunk alone
        with torch.no_grad():
            first = tiny.text_encoder(ids[:, 0])[0]
        assert torch.allclose(hidden[:, :76], first[:, :76])


def test_clip_skip_uses_penultimate_layer_through_final_norm(tiny_sd1):
    te = tiny_sd1.text_encoder
    ids = tokenize(tiny_sd1.tokenizer, ["a photo of a cat"])
    with torch.no_grad():
        got = encode(te, ids, clip_skip=2)
        out = te(ids[:, 0], output_hidden_states=True)
        want = te.final_layer_norm(out.hidden_states[-2])
        assert torch.allclose(got, want)
        assert torch.allclose(encode(te, ids, clip_skip=1), out.last_hidden_state)
        cached = CachedTextEncoder(TextEncoders([te], [tiny_sd1.tokenizer], clip_skip=2))
        context, pooled = cached(["a photo of a cat", "a photo of a cat"])
        assert torch.equal(context[1], got[0]) and pooled is None
        assert len(cached.cache) == 1


def test_uncached_latents_are_encoded_in_float32_under_autocast(tiny_sd1, monkeypatch):
    """mixed_precision autocasts the U-Net; the VAE encodes in float32 as for the latent cache (no_half_vae)."""
    from lora_sd.config import TrainConfig
    from lora_sd.training.noise import compute_loss

    vae, seen = tiny_sd1.vae, []
    real_encode = vae.encode

    def encode(x):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real_encode(x)

    monkeypatch.setattr(vae, "encode", encode)
    gen = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1, "captions": ["a photo"],
             "loss_weights": torch.ones(1)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compute_loss(batch, unet=tiny_sd1.unet, text_conditioning=lambda c: (torch.zeros(1, 77, 32), None),
                            vae=vae,
                            scheduler=tiny_sd1.scheduler, cfg=TrainConfig(), generator=gen,
                            weight_dtype=torch.float32)
    assert seen == [False] and torch.isfinite(loss)


def test_lora_strength_scales_the_adapters_and_restores_them(tiny_sd1):
    """sd-scripts' set_multiplier: 0 is the base model, 0.5 equals diffusers' adapter weight 0.5; restored after."""
    from tests.helpers import max_diff, model_outputs, outputs_with_loras, random_adapted

    from lora_sd.training.network import lora_strength

    lora, unet, te = random_adapted(tiny_sd1)
    full = model_outputs(tiny_sd1, unet=unet, text_encoder=te)
    with lora_strength([unet, te], 0.0):
        assert max_diff(model_outputs(tiny_sd1, unet=unet, text_encoder=te), model_outputs(tiny_sd1)) < 1e-6
    with lora_strength([unet, te], 0.5):
        assert max_diff(model_outputs(tiny_sd1, unet=unet, text_encoder=te),
                        outputs_with_loras(tiny_sd1, [lora], [0.5])) < 1e-5
    after = model_outputs(tiny_sd1, unet=unet, text_encoder=te)
    assert all(torch.equal(a, b) for a, b in zip(after, full))


OPTIONS = {"plain": {}, "min_snr_gamma": {"min_snr_gamma": 5.0}, "noise_offset": {"noise_offset": 0.1},
           "v_parameterization": {"v_parameterization": True},
           "all": {"min_snr_gamma": 5.0, "noise_offset": 0.1, "v_parameterization": True}}


def reference_loss(unet, latents, hidden, loss_weights, generator, min_snr_gamma=None, noise_offset=None,
                   v_parameterization=False):
    """sd-scripts' objective from its definitions, on SD's DDPM schedule written out here."""
    alphas_cumprod = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, dim=0)
    eps = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        eps = eps + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
    a = alphas_cumprod[t][:, None, None, None]
    with torch.no_grad():
        pred = unet(a.sqrt() * latents + (1 - a).sqrt() * eps, t, hidden).sample
    target = a.sqrt() * eps - (1 - a).sqrt() * latents if v_parameterization else eps
    loss = ((pred - target) ** 2).mean(dim=[1, 2, 3]) * loss_weights
    if min_snr_gamma:
        snr = (a / (1 - a)).flatten()
        loss = loss * torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if v_parameterization else snr)
    return loss.mean()


@pytest.mark.parametrize("option", list(OPTIONS))
def test_compute_loss_follows_min_snr_noise_offset_and_v_parameterization(tiny_sd1, option):
    """Each option changes the training loss, to exactly the value its definition gives."""
    from lora_sd.config import TrainConfig
    from lora_sd.training.noise import compute_loss

    gen = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 77, 32, generator=gen)
    batch = {"latents": latents, "captions": ["a", "b", "c"], "loss_weights": torch.tensor([1.0, 0.5, 1.0])}
    scale = tiny_sd1.vae.config.scaling_factor

    def loss(options):
        with torch.no_grad():
            return compute_loss(batch, unet=tiny_sd1.unet, text_conditioning=lambda captions: (hidden, None),
                                vae=tiny_sd1.vae, scheduler=noise_scheduler(options.get("v_parameterization", False)),
                                cfg=TrainConfig(**options), generator=torch.Generator().manual_seed(3),
                                weight_dtype=torch.float32)

    got = loss(OPTIONS[option])
    want = reference_loss(tiny_sd1.unet, latents * scale, hidden, batch["loss_weights"],
                          torch.Generator().manual_seed(3), **OPTIONS[option])  # timesteps 310, 738, 59
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if option != "plain":
        assert abs(got.item() - loss({}).item()) > 1e-4 * abs(got.item())


@pytest.mark.parametrize("line, problem", [
    ("a cat --w 0", "`--w 0` must be at least 8"), ("a cat --h 4", "`--h 4` must be at least 8"),
    ("a cat --s 0", "`--s 0` must be at least 1"), ("a cat --l nan", "`--l nan` must be a finite number"),
    ("a cat --l inf", "`--l inf` must be a finite number"), ("a cat --w wide", "`--w wide` is not a number"),
    # each was memory no machine has, a scheduler's ValueError or torch's seed overflow, at the first sample
    ("a cat --w 100000", "`--w 100000` must be at most 8192"), ("a cat --h 8193", "`--h 8193` must be at most 8192"),
    ("a cat --s 1001", "`--s 1001` must be at most 1000"), (f"a cat --d {2**64}", f"`--d {2**64}` must be at most "
                                                                                 f"{2**64 - 1}"),
])
def test_a_bad_sample_prompt_is_refused_when_read(tmp_path, line, problem):
    """Checked when the prompt file is read (at start), not at the first sample hours into the run."""
    from lora_sd.errors import ConfigError
    from lora_sd.training.sampling import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_text(f"# ok\na dog --w 64 --h 64 --s 2 --l 5\n{line}\n")
    with pytest.raises(ConfigError) as e:
        read_prompts(path)
    assert str(e.value) == f"{path}:3: {problem}"
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        read_prompts(path)
