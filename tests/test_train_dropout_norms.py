"""network_dropout, rank_dropout and module_dropout on LoRA/DoRA (sd-scripts' LoRAModule semantics on PEFT's layers),
scale_weight_norms (bounds and figures, every kind but DoRA) and network_multiplier (training and per dataset).
"""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from lora_sd.cli import run_main
from lora_sd.training.regularize import add_lora_dropouts
from tests.test_train import args, assets, kohya_file, refused_run, train_recipe  # noqa: F401 (the session fixture)

P = 0.5


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 5)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)


def _adapted(dora=False, rank=4, alpha=2.0):
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj", "conv"], use_dora=dora,
                        init_lora_weights=False)
    return inject_adapter_in_model(config, Two())


def _mask(batch, rank, seed):
    torch.manual_seed(seed)
    return (torch.rand((batch, rank)) > P).float() / (1 - P)


@pytest.mark.parametrize("dora", [False, True])
def test_rank_dropout_masks_each_samples_down_output_per_rank(dora):
    model = _adapted(dora)
    plain = copy.deepcopy(model)
    add_lora_dropouts(model, P, 0.0)
    x = torch.randn(3, 7, 6)
    layer = plain.proj  # its lora_A has no hook
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    with torch.no_grad():
        lora = B(A(x) * _mask(3, 4, seed=5)[:, None, :]) * s
        if dora:  # PEFT's DoRA: magnitude / ||W + s BA|| (the unmasked weights) on the base and the LoRA output
            W = layer.base_layer.weight
            scale = layer.lora_magnitude_vector["default"].weight / (W + s * B.weight @ A.weight).norm(dim=1)
            expected = x @ W.T * scale + lora * scale + layer.base_layer.bias
        else:
            expected = layer.base_layer(x) + lora
        torch.manual_seed(5)
        got = model.proj(x)
        assert torch.allclose(got, expected, atol=1e-6)
        assert not torch.allclose(got, plain.proj(x), atol=1e-4)  # it trains with something else
        model.eval(), plain.eval()
        assert torch.equal(model.proj(x), plain.proj(x))  # inference: no dropout


def test_rank_dropout_on_convs_masks_channels():
    model = _adapted()
    layer = copy.deepcopy(model).conv  # without the hook
    add_lora_dropouts(model, P, 0.0)
    x = torch.randn(2, 3, 5, 5)
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    with torch.no_grad():
        expected = layer.base_layer(x) + B(A(x) * _mask(2, 4, seed=3)[:, :, None, None]) * s
        torch.manual_seed(3)
        assert torch.allclose(model.conv(x), expected, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_module_dropout_skips_the_whole_lora_with_its_probability(dora):
    model = _adapted(dora)
    add_lora_dropouts(model, 0.0, P)
    x = torch.randn(2, 6)
    with torch.no_grad():
        base, full = model.proj.base_layer(x), copy.deepcopy(model).eval().proj(x)
        outcomes = []
        for seed in range(20):
            torch.manual_seed(seed)
            skipped = torch.rand(1).item() < P
            torch.manual_seed(seed)
            got = model.proj(x)
            assert torch.allclose(got, base if skipped else full, atol=1e-6)
            outcomes.append(skipped)
        assert any(outcomes) and not all(outcomes)
        assert not model.proj.disable_adapters  # the adapter is back on after each call
        model.eval()
        torch.manual_seed(0)
        assert torch.allclose(model.proj(x), full)


def _unet_input():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([10]), torch.randn(1, 77, 32, generator=gen)


DROPOUTS = {"lora": ["--network_args", "rank_dropout=0.5", "module_dropout=0.3"],
            "dora": ["--network_module", "lycoris.kohya", "--network_args", "dora_wd=true", "rank_dropout=0.5",
                     "module_dropout=0.3"],
            "network_dropout": ["--network_dropout", "0.5"]}


@pytest.mark.parametrize("case", list(DROPOUTS))
def test_dropouts_change_training_but_not_inference(assets, tmp_path, case):  # noqa: F811
    from diffusers import UNet2DConditionModel

    from lora_sd.formats import load_lora

    base = {"lora": [], "dora": DROPOUTS["dora"][:4], "network_dropout": []}[case]
    plain = train_recipe.main(args(assets, tmp_path / "plain", *base, "--network_train_unet_only", steps=3))
    dropped = train_recipe.main(args(assets, tmp_path / "dropped", *DROPOUTS[case], "--network_train_unet_only",
                                     steps=3))
    a, _ = kohya_file(tmp_path / "plain" / "lora.safetensors")
    b, _ = kohya_file(tmp_path / "dropped" / "lora.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # training changed
    if case == "network_dropout":
        layer = dropped.unet.get_submodule("down_blocks.0.attentions.0.proj_in")
        assert layer.lora_dropout["default"].p == 0.5 and isinstance(plain.unet.get_submodule(
            "down_blocks.0.attentions.0.proj_in").lora_dropout["default"], torch.nn.Identity)
    # inference: the trained model (dropouts attached, eval) is the saved file on a fresh U-Net
    fresh = UNet2DConditionModel.from_pretrained(str(assets / "model" / "unet")).eval()
    load_lora(tmp_path / "dropped" / "lora.safetensors").apply_to(unet=fresh)
    dropped.unet.eval()
    with torch.no_grad():
        assert torch.allclose(dropped.unet(*_unet_input()).sample, fresh(*_unet_input()).sample, atol=1e-6)


def test_rank_and_module_dropout_resume_draws_the_same(assets, tmp_path):  # noqa: F811
    common = ("--save_state", "--train_batch_size", "1", "--network_args", "rank_dropout=0.5", "module_dropout=0.3")
    train_recipe.main(args(assets, tmp_path / "a", *common, steps=5))
    train_recipe.main(args(assets, tmp_path / "b", *common, steps=3))
    train_recipe.main(args(assets, tmp_path / "b", *common, "--resume", str(tmp_path / "b" / "lora-state"), steps=5))
    a, _ = kohya_file(tmp_path / "a" / "lora.safetensors")
    b, _ = kohya_file(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KINDS = {"lora": [], "loha": ["--network_module", "lycoris.kohya", "--network_args", "algo=loha"],
         "lokr": ["--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "factor=4"]}
BOUND = 0.02


@pytest.mark.parametrize("kind", list(KINDS))
def test_scale_weight_norms_bounds_every_module_and_reports_the_figures(assets, tmp_path, monkeypatch, kind):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_sd.formats import load_lora
    from lora_sd.training import loop

    figures = []
    real = loop.apply_max_norm
    monkeypatch.setattr(loop, "apply_max_norm", lambda models, bound: figures.append(real(models, bound)) or
                        figures[-1])
    train_recipe.main(args(assets, tmp_path / "out", *KINDS[kind], "--scale_weight_norms", str(BOUND),
                           "--learning_rate", "3e-2", "--logging_dir", str(tmp_path / "logs"), steps=3))
    assert len(figures) == 3
    norms = [float(m.delta().norm()) for m in load_lora(tmp_path / "out" / "lora.safetensors").modules.values()]
    assert max(norms) <= BOUND * (1 + 1e-5)
    at_bound = sum(abs(n - BOUND) < 1e-5 * BOUND for n in norms)
    assert at_bound >= 1  # the bound was reached and held
    last = figures[-1]
    assert last["keys_scaled"] == at_bound
    assert last["max_key_norm"] == pytest.approx(max(norms), rel=1e-4)
    assert last["average_key_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-4)
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"max_norm/keys_scaled", "max_norm/average_key_norm", "max_norm/max_key_norm"} <= \
        set(events.Tags()["scalars"])


def test_without_scale_weight_norms_the_same_run_goes_above_the_bound(assets, tmp_path):  # noqa: F811
    from lora_sd.formats import load_lora

    train_recipe.main(args(assets, tmp_path / "out", "--learning_rate", "3e-2", steps=3))
    norms = [float(m.delta().norm()) for m in load_lora(tmp_path / "out" / "lora.safetensors").modules.values()]
    assert max(norms) > 2 * BOUND


def test_network_multiplier_and_the_datasets_scale_the_training_strength(assets, tmp_path):  # noqa: F811
    """One SGD step moves the up matrices by lr x gradient, and the gradient is proportional to the strength:
    network_multiplier 0.5, or a dataset's 0.5, halves the step; both together quarter it."""
    toml = tmp_path / "data.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\nnetwork_multiplier = 0.5\n[[datasets.subsets]]\n'
                    f'image_dir = "{assets / "images" / "2_sks shape"}"\nclass_tokens = "sks shape"\n'
                    'caption_extension = ".caption"\n')
    sgd = ("--optimizer_type", "SGDNesterov", "--network_train_unet_only")

    def up(name, *extra, dataset=False):
        argv = args(assets, tmp_path / name, *sgd, *extra, steps=1)
        if dataset:
            i = argv.index("--train_data_dir")
            argv[i:i + 2] = ["--dataset_config", str(toml)]
        train_recipe.main(argv)
        state, _ = kohya_file(tmp_path / name / "lora.safetensors")
        return torch.cat([v.flatten() for k, v in sorted(state.items()) if "lora_up" in k])

    full, half = up("full", dataset=False), up("half", "--network_multiplier", "0.5")
    assert full.abs().max() > 0
    assert torch.allclose(half, 0.5 * full, rtol=1e-4, atol=1e-9)
    assert torch.allclose(up("dataset", dataset=True), 0.5 * full, rtol=1e-4, atol=1e-9)
    assert torch.allclose(up("both", "--network_multiplier", "0.5", dataset=True), 0.25 * full, rtol=1e-4, atol=1e-9)


REFUSALS = {
    "rank_dropout_negative": (["--network_args", "rank_dropout=-0.1"], "rank_dropout must be >= 0, got '-0.1'"),
    "module_dropout_one": (["--network_args", "module_dropout=1"], "module_dropout must be below 1"),
    "rank_dropout_text": (["--network_args", "rank_dropout=half"], "rank_dropout must be a number, got 'half'"),
    "network_dropout_one": (["--network_dropout", "1"], "`network_dropout` must be in [0, 1)"),
    "network_dropout_negative": (["--network_dropout", "-0.5"], "`network_dropout` must be in [0, 1)"),
    "network_dropout_text": (["--network_dropout", "lots"], "`network_dropout` must be a finite number, got 'lots'"),
    "network_dropout_loha": (["--network_dropout", "0.1", "--network_module", "lycoris.kohya", "--network_args",
                              "algo=loha"], "`network_dropout` applies to LoRA/DoRA layers"),
    "scale_weight_norms_zero": (["--scale_weight_norms", "0"], "`scale_weight_norms` must be > 0"),
    "scale_weight_norms_dora": (["--scale_weight_norms", "1", "--network_module", "lycoris.kohya", "--network_args",
                                 "dora_wd=true"], "`scale_weight_norms` does not apply to DoRA"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_dropout_and_norm_refusals_are_one_line(assets, tmp_path, case, capsys):  # noqa: F811
    extra, message = REFUSALS[case]
    assert message in refused_run(assets, tmp_path / "out", extra, capsys)


@pytest.mark.parametrize("network_args, expect", [([], False), (["module_dropout=0.1"], True)])
def test_module_dropout_makes_ddp_expect_unused_lora_weights(network_args, expect):
    """A module skipped for a step leaves its LoRA weights without gradients: multi-process DDP must be told
    (find_unused_parameters), or the first step errors. U-Net only, where nothing else asks for it."""
    from accelerate.utils import DistributedDataParallelKwargs

    from lora_sd.config import TrainConfig
    from lora_sd.training.setup import make_accelerator

    cfg = TrainConfig(network_train_unet_only=True, network_module="lycoris.kohya" if network_args else "networks.lora",
                      network_args=network_args)
    handlers = make_accelerator(cfg).ddp_handler
    assert isinstance(handlers, DistributedDataParallelKwargs) == expect
    assert not expect or handlers.find_unused_parameters
