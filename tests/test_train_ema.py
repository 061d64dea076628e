"""EMA of the LoRA weights: its definition over the raw weights' trajectory (LoRA and LoHa, with and without
warm-up), a bit-identical resume, and its use for samples and validation when asked (the raw weights untouched)."""

import pytest
import torch

from tests.test_train import args, kohya_file, make_assets, stopped_after_first_state, train_recipe


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("ema_assets"))


def _raw(out, step, steps):
    return kohya_file(out / ("lora.safetensors" if step == steps else f"lora-step{step:08d}.safetensors"))[0]


def _ema_file(out, step, steps):
    return kohya_file(out / ("lora-ema.safetensors" if step == steps else f"lora-step{step:08d}-ema.safetensors"))[0]


def _expected_ema(trajectory: list[dict], decays: list[float], start: dict) -> list[dict]:
    """ema_k = d_k * ema_{k-1} + (1 - d_k) * w_k, from ema_0 = the weights at the start."""
    ema, out = {k: v.double() for k, v in start.items()}, []
    for weights, d in zip(trajectory, decays):
        ema = {k: d * ema[k] + (1 - d) * weights[k].double() for k in ema}
        out.append(ema)
    return out


def _assert_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k].double(), want[k], rtol=1e-6, atol=1e-8), k


@pytest.mark.parametrize("network", [(), ("--network_module", "lycoris.kohya", "--network_args", "algo=loha")])
def test_ema_with_warmup_equals_its_definition(assets, tmp_path, network):
    """decay_1 = 0, decay_k = min(ema_decay, k / (9 + k)): 0, 2/11, 0.2, 0.2 with ema_decay 0.2."""
    steps, out = 4, tmp_path / "out"
    train_recipe.main(args(assets, out, *network, "--ema_decay", "0.2", "--save_every_n_steps", "1", steps=steps))
    trajectory = [_raw(out, k, steps) for k in range(1, steps + 1)]
    want = _expected_ema(trajectory, [0, 2 / 11, 0.2, 0.2], trajectory[0])  # decay 0 ignores the start
    for k in range(1, steps + 1):
        _assert_close(_ema_file(out, k, steps), want[k - 1])
    final = _ema_file(out, steps, steps)
    assert any(not torch.equal(final[k], trajectory[-1][k]) for k in final)  # not the raw weights


def test_ema_without_warmup_starts_from_the_initial_weights(assets, tmp_path):
    """ema_warmup false: ema_decay from the first step, from the weights training started with (network_weights)."""
    train_recipe.main(args(assets, tmp_path / "start", steps=1))
    start = kohya_file(tmp_path / "start" / "lora.safetensors")[0]
    steps, out = 3, tmp_path / "out"
    train_recipe.main(args(assets, out, "--network_weights", str(tmp_path / "start" / "lora.safetensors"),
                           "--ema_decay", "0.6", "--ema_warmup", "false", "--save_every_n_steps", "1", steps=steps))
    trajectory = [_raw(out, k, steps) for k in range(1, steps + 1)]
    start = {k: v for k, v in start.items() if k in trajectory[0]}  # alphas are not weights
    want = _expected_ema([{k: t[k] for k in start} for t in trajectory], [0.6] * steps, start)
    for k in range(1, steps + 1):
        _assert_close({n: v for n, v in _ema_file(out, k, steps).items() if n in start}, want[k - 1])


def test_ema_survives_resume_bit_identically(assets, tmp_path, monkeypatch):
    """Stopped after the step-3 state, then resumed: the same EMA (and LoRA) as one uninterrupted run."""
    common = ("--save_every_n_steps", "3", "--save_state", "--ema_decay", "0.7", "--lr_scheduler", "cosine")
    train_recipe.main(args(assets, tmp_path / "a", *common, steps=6))
    state = stopped_after_first_state(assets, tmp_path / "b", common, monkeypatch)
    assert state.name == "lora-step00000003-state"
    assert (state / "ema.safetensors").is_file()
    train_recipe.main(args(assets, tmp_path / "b", *common, "--resume", str(state), steps=6))
    for name in ("lora-ema.safetensors", "lora.safetensors"):
        a, b = kohya_file(tmp_path / "a" / name)[0], kohya_file(tmp_path / "b" / name)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_ema_is_used_for_samples_and_validation_when_asked(assets, tmp_path):
    """ema_for_samples / ema_for_validation change the samples and the validation loss (decay 0.99, no warm-up:
    the EMA stays near the start), and the trained weights after them are the same as without."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks shape --w 64 --h 64 --d 3 --s 2\n")
    common = ("--ema_decay", "0.99", "--ema_warmup", "false", "--validation_split", "0.25",
              "--validate_every_n_steps", "3", "--sample_prompts", str(prompts), "--sample_every_n_steps", "3")
    raw = train_recipe.main(args(assets, tmp_path / "raw", *common, steps=3))
    ema = train_recipe.main(args(assets, tmp_path / "ema", *common, "--ema_for_samples", "--ema_for_validation",
                                 steps=3))
    assert raw.validation[0][2] != ema.validation[0][2]
    (a,), (b,) = raw.samples, ema.samples
    assert a.read_bytes() != b.read_bytes()
    x, y = kohya_file(tmp_path / "raw" / "lora.safetensors")[0], kohya_file(tmp_path / "ema" / "lora.safetensors")[0]
    assert all(torch.equal(x[k], y[k]) for k in x)
