"""loss_type (l2 / l1 / huber / smooth_l1), huber_schedule, debiased estimation: sd-scripts' formulas, written
out here, against lora_sd.training.loss and the training loss (compute_loss) on the tiny U-Net."""

import math

import pytest
import torch

from lora_sd.config import TrainConfig
from lora_sd.models.load import noise_scheduler
from lora_sd.training import loss as objective
from lora_sd.training.noise import compute_loss
from tests.test_train import assets  # noqa: F401  (a fixture)

T = 1000
# SD's DDPM schedule ("scaled_linear", 0.00085 .. 0.012), written out
ALPHAS = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2, dim=0)


def batch_loss(tiny, **options):
    """compute_loss of one fixed batch (same noise and timesteps whatever the options)."""
    gen = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 77, 32, generator=gen)
    batch = {"latents": latents, "captions": ["a", "b", "c"], "loss_weights": torch.tensor([1.0, 0.5, 1.0])}
    with torch.no_grad():
        return compute_loss(batch, unet=tiny.unet, text_conditioning=lambda captions: (hidden, None), vae=tiny.vae,
                            scheduler=noise_scheduler(options.get("v_parameterization", False)),
                            cfg=TrainConfig(**options), generator=torch.Generator().manual_seed(3),
                            weight_dtype=torch.float32)


def test_huber_equals_l2_for_a_large_threshold(tiny_sd1):
    l2 = batch_loss(tiny_sd1)
    # constant: c = huber_c; exponential: c = huber_scale at t = 0 .. huber_c * huber_scale at t = T
    for options in ({"huber_c": 1e4, "huber_schedule": "constant"},
                    {"huber_c": 1.0, "huber_scale": 1e4, "huber_schedule": "exponential"}):
        huber = batch_loss(tiny_sd1, loss_type="huber", **options)
        torch.testing.assert_close(huber, l2, rtol=1e-4, atol=0)
    small = batch_loss(tiny_sd1, loss_type="huber", huber_c=0.01, huber_schedule="constant")
    assert small < 0.5 * l2  # a small threshold is far from L2 (the option is not ignored)


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1", "l1", "l2"])
def test_elementwise_losses_are_sd_scripts_formulas(loss_type):
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    c = torch.tensor([0.05, 0.3])
    d, cc = pred - target, c[:, None, None, None]
    want = {"huber": 2 * cc * (torch.sqrt(d**2 + cc**2) - cc), "smooth_l1": 2 * (torch.sqrt(d**2 + cc**2) - cc),
            "l1": d.abs(), "l2": d**2}[loss_type]
    torch.testing.assert_close(objective.elementwise_loss(pred, target, loss_type, c), want)


def test_huber_at_a_small_threshold_through_the_training_loss(tiny_sd1):
    """compute_loss with huber: the l2 run's prediction and target give the same loss through the formula."""
    seen = {}
    real = objective.elementwise_loss

    def spy(pred, target, loss_type="l2", huber_c=None):
        seen["d"] = pred - target
        return real(pred, target, loss_type, huber_c)

    objective.elementwise_loss = spy
    try:
        batch_loss(tiny_sd1)
        d = seen["d"]
        got = batch_loss(tiny_sd1, loss_type="huber", huber_c=0.02, huber_schedule="constant", huber_scale=2.0)
    finally:
        objective.elementwise_loss = real
    c = 0.02 * 2.0
    want = ((2 * c * (torch.sqrt(d**2 + c**2) - c)).mean(dim=[1, 2, 3]) * torch.tensor([1.0, 0.5, 1.0])).mean()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_each_huber_schedule_gives_its_definition(schedule):
    t = torch.tensor([0, 250, 500, 999])
    c, scale = 0.1, 1.5
    got = objective.huber_threshold(schedule, c, scale, noise_scheduler(), t)
    if schedule == "constant":
        want = torch.full((4,), c * scale)
    elif schedule == "exponential":  # huber_scale at t = 0 down to c * huber_scale at t = T
        want = torch.tensor([scale * math.exp(math.log(c) * s / T) for s in t.tolist()])
    else:
        a = ALPHAS[t]
        want = (1 - c) / (1 + ((1 - a) / a).sqrt()) ** 2 + c
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-7)
    if schedule == "exponential":
        assert got[0] == pytest.approx(scale) and got[-1] == pytest.approx(c * scale, rel=1e-2)


@pytest.mark.parametrize("v_prediction", [False, True])
def test_debiased_estimation_weights(tiny_sd1, v_prediction):
    t = torch.tensor([0, 10, 500, 999])
    snr = torch.clamp(ALPHAS[t] / (1 - ALPHAS[t]), max=1000)
    want = 1 / (snr + 1) if v_prediction else 1 / snr.sqrt()
    got = objective.debiased_weight(noise_scheduler(v_prediction), t, v_prediction)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)
    assert snr[0] == 1000  # t = 0 is capped
    plain = batch_loss(tiny_sd1, v_parameterization=v_prediction)
    debiased = batch_loss(tiny_sd1, v_parameterization=v_prediction, debiased_estimation_loss=True)
    assert abs(debiased.item() - plain.item()) > 1e-3 * plain.item()


def test_metadata_names_the_objective():
    meta = objective.objective_metadata(TrainConfig(loss_type="huber", huber_c=0.2, debiased_estimation_loss=True))
    assert meta["ss_loss_type"] == "huber" and meta["ss_huber_c"] == 0.2 and meta["ss_huber_schedule"] == "snr"
    assert meta["ss_debiased_estimation"] is True and meta["ss_multires_noise_discount"] == 0.3


@pytest.mark.parametrize("extra, named", [
    (["--huber_c", "0"], "`huber_c` must be > 0, got 0.0"), (["--huber_c", "-1"], "`huber_c` must be > 0"),
    (["--huber_scale", "0"], "`huber_scale` must be > 0"),
    (["--loss_type", "l3"], "`loss_type` must be one of l2, l1, huber, smooth_l1; got 'l3'"),
    (["--huber_schedule", "cosine"], "`huber_schedule` must be one of constant, exponential, snr"),
    (["--multires_noise_iterations", "-1"], "`multires_noise_iterations` must be >= 0 (0: off"),
    (["--multires_noise_discount", "1.5"], "`multires_noise_discount` must be in [0, 1]"),
    (["--ip_noise_gamma", "-0.1"], "`ip_noise_gamma` must be >= 0"),
    (["--noise_offset_random_strength"], "`noise_offset_random_strength` draws a strength in [0, `noise_offset`]"),
    (["--ip_noise_gamma_random_strength"], "set `ip_noise_gamma` too"),
])
def test_bad_objective_options_exit_2_and_write_nothing(assets, tmp_path, capsys, extra, named):
    from lora_sd.cli import run_main
    from tests.test_train import _no_outputs, args, train_recipe

    out = tmp_path / "out"
    assert run_main(train_recipe.main, args(assets, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "Traceback" not in err and err.count("\n") == 1
    assert _no_outputs(out)


KINDS = {"lora": [], "loha": ["--network_module", "lycoris.kohya", "--network_args", "algo=loha"],
         "lokr": ["--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "factor=4"],
         "dora": ["--network_module", "lycoris.kohya", "--network_args", "algo=locon", "dora_wd=true"]}
EVERY_OPTION = ["--loss_type", "smooth_l1", "--huber_schedule", "exponential", "--huber_c", "0.2",
                "--multires_noise_iterations", "3", "--noise_offset", "0.05", "--noise_offset_random_strength",
                "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength", "--debiased_estimation_loss",
                "--weighted_captions"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_objective_option_trains_every_adapter_kind(assets, tmp_path, kind):
    from tests.test_train import args, kohya_file, train_recipe

    out = tmp_path / "out"
    result = train_recipe.main(args(assets, out, *KINDS[kind], *EVERY_OPTION))
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
    meta = kohya_file(out / "lora.safetensors")[1]
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_debiased_estimation"]) == \
        ("smooth_l1", "exponential", "True")
    assert meta["ss_multires_noise_iterations"] == "3" and meta["ss_ip_noise_gamma_random_strength"] == "True"
