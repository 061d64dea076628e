"""Training refuses what would give a silently wrong result: non-finite weights, alpha 0, stale latents,
ignored multipliers, an unwritable output folder. Each test fails when its feature breaks."""

import pytest
import torch

from lora_sd.cli import run_main
from tests.test_train import args, assets, kohya_file, train_recipe  # noqa: F401 (assets is a fixture)


def test_non_finite_weights_are_never_saved(assets, tmp_path, monkeypatch, capsys):  # noqa: F811
    """An update that makes a weight inf at step 4 (its loss was finite): the step-4 save is refused."""
    from lora_sd.training import optim

    real = optim.build_optimizer

    def poisoned(*a, **k):
        optimizer, name = real(*a, **k)
        steps = []

        def after_step(opt, *_):
            steps.append(1)
            if len(steps) == 4:
                with torch.no_grad():
                    opt.param_groups[0]["params"][0].view(-1)[0] = float("inf")

        optimizer.register_step_post_hook(after_step)
        return optimizer, name

    monkeypatch.setattr(optim, "build_optimizer", poisoned)
    out = tmp_path / "out"
    assert run_main(train_recipe.main, args(assets, out, "--save_every_n_steps", "2", "--save_state", steps=6)) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "at step 4" in err and "lora-step00000002.safetensors" in err
    assert sorted(p.name for p in out.iterdir()) == ["lora-config.toml", "lora-step00000002-state",
                                                     "lora-step00000002.safetensors"]


def test_alpha_zero_trains_at_alpha_equals_rank(assets, tmp_path):  # noqa: F811
    """network_alpha = 0 and conv_alpha = 0: alpha = the rank (sd-scripts), so the LoRA trains and the file says so."""
    out = tmp_path / "out"
    train_recipe.main(args(assets, out, "--network_dim", "4", "--network_alpha", "0",
                           "--network_args", "conv_dim=2", "conv_alpha=0"))
    state, meta = kohya_file(out / "lora.safetensors")
    alphas = {k: v.item() for k, v in state.items() if k.endswith(".alpha")}
    convs = {k for k in alphas if state[k.replace(".alpha", ".lora_down.weight")].ndim == 4
             and state[k.replace(".alpha", ".lora_down.weight")].shape[-1] == 3}
    assert convs and set(alphas.values()) == {4.0, 2.0}
    assert all(v == (2.0 if k in convs else 4.0) for k, v in alphas.items())
    assert meta["ss_network_alpha"] == "4" and meta["ss_network_dim"] == "4"
    ups = [v for k, v in state.items() if k.endswith("lora_up.weight")]
    assert all(up.abs().max() > 0 for up in ups)  # every up weight moved from its zero start


def test_disk_cache_alone_never_reuses_another_vaes_latents(assets, tmp_path, monkeypatch):  # noqa: F811
    """cache_latents_to_disk without cache_latents: a second base model (another VAE) encodes its own latents."""
    import datasets

    from lora_sd.data import latents
    from lora_sd.tiny import save_tiny_diffusers

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    save_tiny_diffusers(tmp_path / "other", "sd1", seed=1)
    encoded = []
    real_call = latents.VaeEncoder.__call__
    monkeypatch.setattr(latents.VaeEncoder, "__call__", lambda self, x: encoded.append(len(x)) or real_call(self, x))
    counts = []
    for model in (assets / "model", tmp_path / "other", assets / "model"):
        encoded.clear()
        train_recipe.main(args(assets, tmp_path / "out", "--pretrained_model_name_or_path", str(model),
                               "--cache_latents_to_disk", steps=1))
        counts.append(sum(encoded))
    assert counts == [4, 4, 0]  # 4 images: each VAE encodes them once; the first model's cache is then reused
