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


def test_vae_batch_size_sets_images_per_vae_call(assets, tmp_path, monkeypatch):  # noqa: F811
    """vae_batch_size changes the number of VAE calls while caching, not the latents."""
    from lora_sd.data import latents

    real_call = latents.VaeEncoder.__call__
    calls = []
    monkeypatch.setattr(latents.VaeEncoder, "__call__", lambda self, x: calls[-1].append(real_call(self, x)) or
                        calls[-1][-1])
    for size in ("1", "4"):
        calls.append([])
        train_recipe.main(args(assets, tmp_path / "out", "--cache_latents", "--vae_batch_size", size, steps=1))
    assert [len(c) for c in calls] == [4, 1]  # 4 images of one bucket
    torch.testing.assert_close(torch.cat(calls[0]), calls[1][0], rtol=1e-5, atol=1e-5)


def _with_dataset_toml(argv, assets, tmp_path, **dataset):
    toml = tmp_path / "dataset.toml"
    toml.write_text("\n".join(["[general]", "resolution = 64", "[[datasets]]",
                               *(f"{k} = {v}" for k, v in dataset.items()), "  [[datasets.subsets]]",
                               f"  image_dir = '{assets / 'images' / '2_sks shape'}'", "  num_repeats = 2",
                               "  caption_extension = '.caption'"]))
    i = argv.index("--train_data_dir")
    return argv[:i] + ["--dataset_config", str(toml)] + argv[i + 2:]


def test_network_multiplier_is_the_loras_strength_while_training(assets, tmp_path):  # noqa: F811
    """network_multiplier x the dataset's network_multiplier scales the LoRA in each step (sd-scripts'
    set_multiplier): at 0 the LoRA has no effect and no gradient; 0.5 x 2 trains exactly as 1 x 1 (the
    training option alone, or the dataset's alone, would give 0.5 or 2)."""
    def run(name, *extra, **dataset):
        argv = _with_dataset_toml(args(assets, tmp_path / name, *extra), assets, tmp_path, **dataset)
        train_recipe.main(argv)
        return kohya_file(tmp_path / name / "lora.safetensors")[0]

    zero = run("dataset0", network_multiplier=0)
    assert all(not v.any() for k, v in zero.items() if k.endswith("lora_up.weight"))
    plain = run("plain")
    assert any(v.any() for k, v in plain.items() if k.endswith("lora_up.weight"))
    product = run("product", "--network_multiplier", "0.5", network_multiplier=2)
    assert plain.keys() == product.keys() and all(torch.equal(plain[k], product[k]) for k in plain)


@pytest.mark.parametrize("case", ["under_a_file", "read_only"])
def test_unwritable_output_dir_is_refused_before_the_model_loads(assets, tmp_path, monkeypatch, capsys, case):  # noqa: F811
    import errno
    import os
    import tempfile

    from lora_sd.training import loop

    loaded = []
    real_load = loop.load_model
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    (tmp_path / "file.txt").write_text("x")
    blocked = tmp_path / "file.txt" if case == "under_a_file" else tmp_path / "ro"
    out = blocked / "out" / "run"
    if case == "read_only":
        blocked.mkdir()
        if os.geteuid() == 0:  # root writes through a chmod: refuse writes there as a read-only mount would
            real_tmp = tempfile.TemporaryFile

            def read_only(*a, dir=None, **k):
                if dir is not None and os.path.realpath(dir) == os.path.realpath(blocked):
                    raise OSError(errno.EROFS, "Read-only file system", str(dir))
                return real_tmp(*a, dir=dir, **k)

            monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
        else:
            blocked.chmod(0o555)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert run_main(train_recipe.main, args(assets, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `output_dir`") and str(out) in err and err.count("\n") == 1, err
    assert not loaded and sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("name", ["lora.safetensors", "lora-000002.safetensors", "lora-config.toml"])
def test_an_input_named_like_the_run_s_outputs_is_refused(assets, tmp_path, capsys, name):  # noqa: F811
    """network_weights = out/lora.safetensors with output_name lora: the run would overwrite its own input."""
    out = tmp_path / "out"
    first = run_main(train_recipe.main, args(assets, out))
    assert first == 0
    start = out / name
    if not start.exists():
        (out / "lora.safetensors").rename(start)
    before = start.read_bytes()
    if name.endswith(".toml"):  # the resolved config of the first run, repeated into the same folder
        argv, extra = ["--config", str(start)], []
    else:
        extra = ["--network_weights", str(start)]
        argv = args(assets, out, *extra)
    assert run_main(train_recipe.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: `output_name` 'lora'") and str(start) in err, err
    assert start.read_bytes() == before
    other = run_main(train_recipe.main, args(assets, tmp_path / "elsewhere", *extra))  # another output_dir: fine
    assert other == 0


def test_an_image_broken_past_its_header_is_one_line_also_from_a_dataloader_worker(assets, tmp_path, capsys):  # noqa: F811
    """Indexing reads headers only, so a truncated image fails when a worker decodes it: torch re-raises the
    worker's DataError with its traceback in the message; the recipe still prints one line naming the file."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(assets / "images", images)
    sub = images / "2_sks shape"
    (sub / "9.png").write_bytes((sub / "0.png").read_bytes()[:80])  # a valid header, the pixels cut off
    argv = args(assets, tmp_path / "out")
    argv[argv.index("--train_data_dir") + 1] = str(images)
    argv[argv.index("--max_data_loader_n_workers") + 1] = "1"
    assert run_main(train_recipe.main, argv) == 2
    err = capsys.readouterr().err  # progress bars go there too
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert errors[0].startswith(f"error: {sub / '9.png'}: not a readable image"), errors
