"""Single-file SD checkpoints: original layout <-> diffusers, offline loading, writing back."""

import socket

import pytest
import torch

from lora_sd.models import load_base, load_state_dict, save_diffusers, save_single_file
from lora_sd.tiny import save_tiny_diffusers, save_tiny_single_file

VERSIONS = ["sd1", "sd2"]


@pytest.fixture
def no_network(monkeypatch):
    """HF_HUB_OFFLINE plus a socket guard: any connection or DNS lookup fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while loading: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """{version: (single file, its model_config folder, the diffusers folder of the same weights)}."""
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for version in VERSIONS:
        path, config = save_tiny_single_file(root / f"{version}.safetensors", version, seed=3)
        folder = save_tiny_diffusers(root / f"{version}_diffusers", version, seed=3)
        out[version] = (path, config, folder)
    return out


def _assert_same_state_dicts(a, b):
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_original_diffusers_original(version, tiny_files, tmp_path):
    path, config, _ = tiny_files[version]
    model = load_base(path, model_config=config)
    assert model.version == version and model.source_format == "single_file"
    out = save_single_file(model, tmp_path / "again.safetensors")
    _assert_same_state_dicts(load_state_dict(path), load_state_dict(out))


@pytest.mark.parametrize("version", VERSIONS)
def test_single_file_loads_offline_like_its_diffusers_folder(version, tiny_files, no_network):
    path, config, folder = tiny_files[version]
    single = load_base(path, model_config=config)
    ref = load_base(folder)
    assert single.version == ref.version == version
    prompts = ["a photo of a cat", "sks dog in the sky, best quality"]
    ids = single.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids_ref = ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ids_ref)
    with torch.no_grad():
        hidden = single.text_encoder(ids).last_hidden_state
        assert torch.equal(hidden, ref.text_encoder(ids).last_hidden_state)
        sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([10, 500])
        assert torch.equal(single.unet(sample, t, hidden).sample, ref.unet(sample, t, hidden).sample)
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        assert torch.equal(single.vae.encode(image).latent_dist.mean, ref.vae.encode(image).latent_dist.mean)


def test_diffusers_reads_our_unet_file(tiny_files):
    """Another tool (diffusers' own single-file loader) reads what we wrote."""
    from diffusers import UNet2DConditionModel

    path, config, folder = tiny_files["sd1"]
    theirs = UNet2DConditionModel.from_single_file(str(path), config=str(config), subfolder="unet", local_files_only=True)
    ref = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
    a, b = theirs.state_dict(), ref.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_training_scheduler_and_flags(tiny_files):
    path, config, _ = tiny_files["sd2"]
    model = load_base(path, v2=True, v_parameterization=True, model_config=config)
    s = model.scheduler.config
    assert type(model.scheduler).__name__ == "DDPMScheduler"
    assert (s.beta_start, s.beta_end, s.beta_schedule, s.num_train_timesteps, s.clip_sample) == (
        0.00085, 0.012, "scaled_linear", 1000, False)
    assert s.prediction_type == "v_prediction" and model.v_parameterization
    assert load_base(path, model_config=config).scheduler.config.prediction_type == "epsilon"
    assert model.tokenizer.pad_token == "!"


def test_ckpt_loads_and_saves(tiny_files, tmp_path):
    path, config, _ = tiny_files["sd1"]
    ckpt, _ = save_tiny_single_file(tmp_path / "tiny.ckpt", "sd1", seed=3, model_config=tmp_path / "cfg")
    model = load_base(ckpt, model_config=config)
    _assert_same_state_dicts(load_state_dict(path), load_state_dict(ckpt))
    legacy = tmp_path / "legacy.ckpt"  # the pre-zip pickle format old checkpoints use (cannot be mmapped)
    torch.save({"state_dict": load_state_dict(path)}, legacy, _use_new_zipfile_serialization=False)
    _assert_same_state_dicts(load_state_dict(path), load_state_dict(legacy))
    out = save_single_file(model, tmp_path / "out.ckpt", save_precision="fp16")
    raw = torch.load(out, weights_only=True)
    assert set(raw) == {"state_dict"}
    assert raw["state_dict"]["model.diffusion_model.out.2.weight"].dtype == torch.float16


def test_lightning_callback_in_ckpt_is_harmless(tiny_files, tmp_path, monkeypatch):
    """Original SD .ckpt files carry PyTorch Lightning's ModelCheckpoint state: load them anyway."""
    import sys
    import types

    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.monitor = None

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__]
    for name in names:  # pickle imports the class's module, parents first
        monkeypatch.setitem(sys.modules, name, mod)
    path, config, _ = tiny_files["sd1"]
    sd = load_state_dict(path)
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, ckpt)
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    assert load_base(ckpt, model_config=config).version == "sd1"


@pytest.mark.parametrize("version", VERSIONS)
def test_unknown_keys_are_kept_and_merged_weights_written(version, tiny_files, tmp_path):
    path, config, _ = tiny_files[version]
    sd = load_state_dict(path)
    extra = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
        "model_ema.diffusion_modelout2weight": torch.randn(4, 8, 3, 3),
        "alphas_cumprod": torch.rand(1000),
    }
    if version == "sd2":  # the last OpenCLIP block is not the copy our writer would make
        last = [k for k in sd if ".resblocks.3." in k]
        extra.update({k: torch.randn_like(sd[k]) for k in last})
    user_file = tmp_path / "user.safetensors"
    from safetensors.torch import save_file

    save_file({**sd, **extra}, str(user_file))
    model = load_base(user_file, model_config=config)
    with torch.no_grad():  # what a LoRA merge does: change weights in place
        model.unet.conv_out.weight += 1.0
    out = save_single_file(model, tmp_path / "merged.safetensors", original_state_dict=user_file)
    written = load_state_dict(out)
    assert set(written) == set(sd) | set(extra)
    for k, v in extra.items():
        assert torch.equal(written[k], v.to(torch.float32) if v.is_floating_point() else v), k
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(written[key], sd[key] + 1.0)
    with pytest.raises(Exception, match="refusing to overwrite"):
        save_single_file(model, user_file, original_state_dict=user_file)


def test_save_precision_and_diffusers_folder(tiny_files, tmp_path):
    path, config, _ = tiny_files["sd2"]
    model = load_base(path, model_config=config)
    out = save_single_file(model, tmp_path / "half.safetensors", save_precision="bf16")
    assert {t.dtype for t in load_state_dict(out).values() if t.is_floating_point()} == {torch.bfloat16}
    folder = save_diffusers(model, tmp_path / "folder")
    again = load_base(folder, v2=True)
    assert again.version == "sd2" and again.source_format == "diffusers"
    _assert_same_state_dicts(model.unet.state_dict(), again.unet.state_dict())
    assert model.pipeline().unet is model.unet


def test_torch_dtype(tiny_files):
    path, config, _ = tiny_files["sd1"]
    model = load_base(path, model_config=config, torch_dtype=torch.float16)
    assert {p.dtype for p in model.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.float16}
