"""Issue 13's data path: pinned memory on CUDA, persistent DataLoader workers in a run, channels_last."""

import copy
from types import SimpleNamespace

import pytest
import torch

from lora_sd.data import build_train_data, pinned_transfers
from lora_sd.training.memory_format import use_channels_last
from tests.test_data_loader import config, make_images
from tests.test_train import args, assets, fixed_batch_loss, train_recipe  # noqa: F401 (the session fixture)


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_batches_are_pinned_and_copied_without_blocking_on_cuda_only(tmp_path, device_type):
    """The decision only: without CUDA nothing is actually pinned (torch warns and skips it)."""
    from accelerate.utils import DataLoaderConfiguration

    make_images(tmp_path / "a", [(64, 64)] * 2)
    data = build_train_data(config([{"image_dir": str(tmp_path / "a")}]), seed=0, max_data_loader_n_workers=0,
                            validation_split=0.5, device_type=device_type)
    on_cuda = device_type == "cuda"
    assert data.dataloader.pin_memory is on_cuda
    assert data.validation_loader(data.validation_batches).pin_memory is on_cuda
    accelerator = SimpleNamespace(device=torch.device(device_type), dataloader_config=DataLoaderConfiguration())
    assert pinned_transfers(accelerator) == device_type
    assert accelerator.dataloader_config.non_blocking is on_cuda


def test_persistent_workers_serve_every_epoch_of_a_run(assets, tmp_path, monkeypatch):  # noqa: F811
    """One worker, two epochs: the worker started for the first epoch serves the second (one iterator made)."""
    from torch.utils.data import DataLoader

    made = []
    real = DataLoader._get_iterator
    monkeypatch.setattr(DataLoader, "_get_iterator", lambda self: made.append(self.persistent_workers) or real(self))
    argv = args(assets, tmp_path / "out", "--persistent_data_loader_workers", "--train_batch_size", "4",
                "--max_train_epochs", "2")
    argv[argv.index("--max_data_loader_n_workers") + 1] = "1"
    result = train_recipe.main(argv)
    assert result.epochs == 2 and result.steps == 4
    assert made == [True]


def _conv_weights(unet):
    """The U-Net's 3x3 base convolution weights (1x1 ones are channels_last either way; adapters keep PEFT's)."""
    from lora_sd.training.network import is_adapter_param

    return {n: p for n, p in unet.named_parameters()
            if p.ndim == 4 and p.shape[-1] > 1 and p.shape[1] > 1 and not is_adapter_param(n)}


KINDS = {"lora": ("networks.lora", ["conv_dim=2"]), "loha": ("lycoris.kohya", ["algo=loha", "conv_dim=2"]),
         "lokr": ("lycoris.kohya", ["algo=lokr", "conv_dim=2"]),
         "dora": ("lycoris.kohya", ["algo=locon", "conv_dim=2", "dora_wd=true"])}


@pytest.mark.parametrize("kind", list(KINDS))
def test_channels_last_changes_the_layout_not_the_output(tiny_sd1, kind):
    """Every adapter kind: weights and the U-Net's input in channels_last, the same prediction and gradients."""
    from lora_sd.config import TrainConfig
    from lora_sd.training.network import add_network

    module, network_args = KINDS[kind]
    cfg = TrainConfig(network_module=module, network_args=network_args, network_train_unet_only=True)
    model = copy.deepcopy(tiny_sd1)
    add_network(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if p.requires_grad:  # adapters start at zero (up) or at the base (DoRA magnitude): make them count
                p.add_(torch.randn_like(p) * 0.1)
    other = copy.deepcopy(model.unet)
    assert use_channels_last(model.unet, True, "cpu")
    weights = _conv_weights(model.unet)
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights.values())
    seen = []
    model.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(
        memory_format=torch.channels_last)))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    outs = []
    for unet in (model.unet, other):
        out = unet(x, t, ctx).sample
        out.square().mean().backward()
        grads = {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}
        outs.append((out.detach(), grads))
    assert seen == [True]
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for name, grad in outs[1][1].items():
        torch.testing.assert_close(outs[0][1][name], grad, atol=1e-5, rtol=1e-4)


def test_channels_last_trains_to_the_same_loss(assets, tmp_path, tiny_sd1):  # noqa: F811
    """A run with channels_last has its convolutions in that layout and the loss of a fixed batch as without."""
    runs = {flag: train_recipe.main(args(assets, tmp_path / str(flag), "--network_args", "conv_dim=2",
                                         *(["--channels_last"] if flag else [])))
            for flag in (True, False)}
    for flag, result in runs.items():
        weights = _conv_weights(result.unet)
        assert all(p.is_contiguous(memory_format=torch.channels_last) is flag for p in weights.values())
    loss = fixed_batch_loss(tiny_sd1, next((assets / "images").rglob("*.png")))
    assert loss(runs[True].unet) == pytest.approx(loss(runs[False].unet), abs=1e-5)
    assert abs(loss(runs[True].unet) - loss(tiny_sd1.unet)) > 1e-4  # the LoRA trained (7e-4 here)


def test_caching_logs_its_speed_and_text_outputs_are_encoded_in_batches(tmp_path, caplog):
    from lora_sd.training.text_cache import CachedTextEncoder
    from tests.test_data_latents import CountingEncoder, build

    calls = []

    def encode(captions):  # a stand-in text encoder: [B, 3, 2] context from each caption's length
        calls.append(len(captions))
        return torch.tensor([float(len(c)) for c in captions])[:, None, None].expand(-1, 3, 2), None

    with caplog.at_level("INFO"):
        build(tmp_path, CountingEncoder())
        cache = CachedTextEncoder(encode)
        assert cache.fill([f"caption {i}" for i in range(10)], batch_size=4) == 10
    assert calls == [4, 4, 2]
    assert cache.cache["caption 3"][0].shape == (3, 2) and cache.cache["caption 3"][0].untyped_storage().nbytes() == 24
    assert "cached 4 latents in " in caplog.text and "images/s)" in caplog.text
    assert "cached 10 text-encoder outputs in " in caplog.text and "captions/s)" in caplog.text


def test_cache_shards_hold_the_latents_exactly_in_bounded_chunks():
    """Arrow lists have 32-bit offsets: a shard over 2**31 values goes in several chunks, each value kept."""
    from lora_sd.data.latents import _float_lists

    tensors = [torch.randn(2, 3), None, torch.randn(5), torch.randn(1, 4)]
    chunked = _float_lists(tensors, max_values=6)
    assert chunked.num_chunks == 3
    assert chunked.to_pylist() == [t.flatten().tolist() if t is not None else [] for t in tensors]


def test_batched_pixels_are_those_of_each_image():
    """The cache's batch conversion gives bit for bit what training's per-image conversion gives."""
    import numpy as np
    from PIL import Image

    from lora_sd.data.transforms import to_batch

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)) for _ in range(3)]
    for image, pixels in zip(images, to_batch(images)):
        want = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(127.5).sub(1.0)
        assert torch.equal(pixels, want)


def test_cache_speed_benchmark_prints_its_table(capsys):
    """benchmarks/cache_speed.py on the stub VAE: every row measured and compared with the floor."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cache_speed.py"
    spec = importlib.util.spec_from_file_location("cache_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--model", "stub", "--images", "4", "--resolution", "64", "--rounds", "2", "--text"])
    out = capsys.readouterr().out
    for row in ("memory", "disk", "te cache"):
        assert f"{row}: " in out and "x the floor (" in out.split(f"{row}: ")[1].splitlines()[0], out
