"""Issue 13's precision and speed options: full_bf16 / full_fp16, fused AdamW on CUDA, allow_tf32.

full_bf16 trains here (CPU bf16 autocast); float16 autocast needs CUDA, so full_fp16 is tested by its parts:
its refusals, the cast of every adapter kind, and the GradScaler permission (torch's CPU GradScaler). Fused
AdamW and TF32 are decided from the device type, so the CUDA decision is tested on CPU (torch's fused AdamW runs
on CPU too).
"""

import copy
import math
import types

import pytest
import torch

from lora_sd.config import TrainConfig
from lora_sd.formats import load_lora
from lora_sd.lora_weights import LoraWeights
from lora_sd.state_tree import load_tree
from lora_sd.training import optim, precision
from tests.test_train import (args, assets, kohya_file, refused_run,  # noqa: F401 (fixture)
                              stopped_after_first_state, train_recipe)

BF16 = ("--mixed_precision", "bf16", "--full_bf16")
LYCORIS = ("--network_module", "lycoris.kohya", "--network_args")
KINDS = {"lora": [], "dora": [*LYCORIS, "algo=locon", "dora_wd=true", "conv_dim=2"],
         "loha": [*LYCORIS, "algo=loha", "conv_dim=2"], "lokr": [*LYCORIS, "algo=lokr", "factor=4"]}


def _weights(path) -> dict:
    return {k: v for k, v in kohya_file(path)[0].items() if not k.endswith(".alpha")}


@pytest.mark.parametrize("kind", list(KINDS))
def test_full_bf16_trains_every_kind_in_bfloat16(assets, tmp_path, kind):  # noqa: F811
    """The LoRA parameters and AdamW's moments are bfloat16; the weights move, the loss stays finite, and the file
    (no save_precision: the weights' dtype, as sd-scripts writes it) holds exactly the trained weights."""
    out = tmp_path / "out"
    result = train_recipe.main(args(assets, out, *BF16, "--network_train_unet_only", "--save_every_n_steps", "1",
                                    "--save_state_on_train_end", *KINDS[kind], steps=2))
    assert {p.dtype for p in result.unet.parameters() if p.requires_grad} == {torch.bfloat16}
    moments = [t for s in load_tree(out / "lora-state" / "optimizer.safetensors")["state"].values()
               for name, t in s.items() if name in ("exp_avg", "exp_avg_sq")]
    assert moments and {t.dtype for t in moments} == {torch.bfloat16}
    assert all(math.isfinite(loss) for loss in result.losses)
    first, last = _weights(out / "lora-step00000001.safetensors"), _weights(out / "lora.safetensors")
    assert {v.dtype for v in last.values()} == {torch.bfloat16}
    assert any(not torch.equal(first[k], last[k]) for k in last)  # the second step moved the weights
    trained, loaded = LoraWeights.from_peft_models(unet=result.unet), load_lora(out / "lora.safetensors")
    assert loaded.modules.keys() == trained.modules.keys()
    for key, m in trained.modules.items():
        assert all(torch.equal(t, loaded.modules[key].tensors[n]) for n, t in m.tensors.items()), key


def test_full_bf16_resumes_bit_identically_with_ema_loraplus_block_lr_and_max_norm(assets, tmp_path,  # noqa: F811
                                                                                  monkeypatch):
    """Stopped after the step-2 state, then resumed: the same LoRA and EMA as one run. The state keeps the
    bfloat16 weights, the EMA its float32 shadow; LoRA+, block lr weights and scale_weight_norms run on them."""
    common = (*BF16, "--save_every_n_steps", "2", "--save_state", "--ema_decay", "0.7", "--loraplus_lr_ratio", "4",
              "--network_args", "mid_lr_weight=0.5", "--scale_weight_norms", "0.01", "--train_batch_size", "1")
    train_recipe.main(args(assets, tmp_path / "a", *common, steps=4))
    state = stopped_after_first_state(assets, tmp_path / "b", common, monkeypatch, steps=4)
    assert state.name == "lora-step00000002-state"
    assert {v.dtype for v in kohya_file(state / "lora.safetensors")[0].values()} == {torch.bfloat16}
    assert {v.dtype for v in load_tree(state / "ema.safetensors")["shadow"].values()} == {torch.float32}
    train_recipe.main(args(assets, tmp_path / "b", *common, "--resume", str(state), steps=4))
    for name in ("lora.safetensors", "lora-ema.safetensors"):
        a, b = kohya_file(tmp_path / "a" / name)[0], kohya_file(tmp_path / "b" / name)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("extra, message", [
    ([*BF16, "--full_fp16"], "`full_bf16` and `full_fp16` are both set"),
    (["--full_bf16"], '`full_bf16` needs `mixed_precision = "bf16"`'),
    (["--mixed_precision", "bf16", "--full_fp16"], '`full_fp16` needs `mixed_precision = "fp16"`'),
    (["--mixed_precision", "fp16", "--full_fp16", "--optimizer_type", "prodigy"],
     '`full_fp16` cannot train with `optimizer_type = "Prodigy"`'),
    (["--mixed_precision", "fp16", "--full_fp16", "--optimizer_type", "DAdaptAdam"], "cannot train with"),
    (["--mixed_precision", "fp16", "--full_fp16", "--optimizer_args", "fused=False"], "cannot train with fused=False"),
    (["--mixed_precision", "fp16", "--full_fp16", "--optimizer_args", "foreach=True"], "cannot train with fused=False"),
    (["--mixed_precision", "fp16", "--full_fp16"], '`mixed_precision = "fp16"` needs a CUDA GPU'),  # this CPU
])
def test_precision_refusals(assets, tmp_path, capsys, extra, message):  # noqa: F811
    assert message in refused_run(assets, tmp_path / "out", extra, capsys)


@pytest.mark.parametrize("options", [dict(optimizer_args=["fused=True"]), dict(optimizer_type="AdamW8bit"),
                                     dict(optimizer_type="Lion")])
def test_full_fp16_config_with_an_optimizer_that_steps_float16(assets, options):  # noqa: F811
    from lora_sd.config.load import load_config

    cfg = load_config(overrides=dict(pretrained_model_name_or_path="m", train_data_dir=str(assets / "images"),
                                     mixed_precision="fp16", full_fp16=True, **options))
    assert cfg.full_fp16


@pytest.mark.parametrize("full, dtype", [({}, torch.float32), ({"full_bf16": True}, torch.bfloat16),
                                         ({"full_fp16": True}, torch.float16)])
@pytest.mark.parametrize("kind", list(KINDS))
def test_adapters_of_every_kind_are_made_in_the_lora_dtype(tiny_sd1, kind, full, dtype):
    """add_network casts every trained adapter parameter (DoRA's magnitude, LoHa, LoKr factors) to the LoRA dtype;
    the frozen base keeps its own."""
    from lora_sd.training.network import add_network

    lycoris = KINDS[kind]
    model = copy.deepcopy(tiny_sd1)
    cfg = TrainConfig(network_module=lycoris[1] if lycoris else "networks.lora", network_args=lycoris[3:], **full)
    add_network(model, cfg)
    for part in (model.unet, model.text_encoder):
        trained = {n: p.dtype for n, p in part.named_parameters() if p.requires_grad}
        assert trained and set(trained.values()) == {dtype}
        assert {p.dtype for p in part.parameters() if not p.requires_grad} == {torch.float32}
    if kind == "dora":
        assert any("lora_magnitude_vector" in n for n, _ in model.unet.named_parameters())


def test_grad_scaler_unscales_float16_gradients_once_allowed():
    """torch's GradScaler refuses float16 gradients; allow_fp16_unscale (full_fp16) lets it unscale them (the true
    gradient comes out) and step float16 weights with fused AdamW (its inf check and scale handling)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    w = torch.nn.Parameter(torch.tensor([0.5, -0.25, 0.0], dtype=torch.float16))
    optimizer = torch.optim.AdamW([w], lr=1e-2, fused=True)
    scaler.scale((w.float() ** 2).sum()).backward()
    assert w.grad.dtype == torch.float16
    with pytest.raises(ValueError, match="FP16"):
        scaler.unscale_(optimizer)
    precision.allow_fp16_unscale(types.SimpleNamespace(scaler=scaler))
    scaler.unscale_(optimizer)
    assert torch.equal(w.grad, 2 * w.detach())  # d(w^2)/dw, the scale removed
    before = w.detach().clone()
    scaler.step(optimizer)
    scaler.update()
    assert w.dtype == torch.float16 and torch.isfinite(w).all() and not torch.equal(w, before)
    assert w[2] == 0  # a zero gradient leaves its weight alone (the non-fused float16 AdamW makes it NaN)


def test_configure_run_allows_fp16_unscaling_only_with_full_fp16():
    def accelerator():
        return types.SimpleNamespace(scaler=torch.amp.GradScaler("cpu"), device=torch.device("cpu"))

    plain, full = accelerator(), accelerator()
    precision.configure_run(TrainConfig(mixed_precision="fp16"), plain)
    precision.configure_run(TrainConfig(mixed_precision="fp16", full_fp16=True), full)
    assert "_unscale_grads_" not in vars(plain.scaler) and "_unscale_grads_" in vars(full.scaler)


def test_make_accelerator_configures_the_run(monkeypatch):
    from lora_sd.training import setup

    seen = []
    monkeypatch.setattr(setup, "configure_run", lambda cfg, acc: seen.append((cfg, acc)))
    cfg = TrainConfig(allow_tf32=True)
    accelerator = setup.make_accelerator(cfg)
    assert seen == [(cfg, accelerator)]


def test_file_precision_follows_save_precision_else_the_weights():
    assert precision.file_precision(TrainConfig()) == "float"
    assert precision.file_precision(TrainConfig(full_bf16=True)) == "bf16"
    assert precision.file_precision(TrainConfig(full_fp16=True)) == "fp16"
    assert precision.file_precision(TrainConfig(full_bf16=True, save_precision="float")) == "float"


def test_metadata_says_full_fp16(assets):  # noqa: F811
    from lora_sd.config.load import load_config
    from lora_sd.training.metadata import training_metadata

    data = types.SimpleNamespace(num_train_images=1, num_reg_images=0, batches_per_epoch=1, configs=[],
                                 tag_frequency=dict, bucket_info=dict, dataset_dirs_info=dict)

    def meta(**options):
        cfg = load_config(overrides=dict(pretrained_model_name_or_path="m", train_data_dir=str(assets / "images"),
                                         **options))
        return training_metadata(cfg, data, total_batch_size=1, max_train_steps=1, num_epochs=1,
                                 optimizer_name="AdamW", started_at=0.0)

    assert meta()["ss_full_fp16"] == "False"
    assert meta(mixed_precision="fp16", full_fp16=True)["ss_full_fp16"] == "True"


@pytest.mark.parametrize("name, given, device, fused", [
    ("AdamW", [], "cuda", True), ("AdamW", [], "cpu", None), ("AdamW", ["fused=False"], "cuda", False),
    ("AdamW", ["foreach=True"], "cuda", None), ("SGDNesterov", [], "cuda", None),
])
def test_adamw_is_fused_on_cuda_unless_chosen(monkeypatch, name, given, device, fused):
    """build_optimizer asks fused_adamw with the parameters' device type (here told "cuda"; torch's fused AdamW also
    runs on CPU, so the optimizer is really built)."""
    monkeypatch.setattr(optim, "params_device_type", lambda groups: device)
    optimizer, _ = optim.build_optimizer(name, [{"params": [torch.nn.Parameter(torch.ones(2))]}], 1e-3, given)
    assert optimizer.defaults.get("fused") == fused


def test_params_device_type():
    assert precision.params_device_type([{"params": []}, {"params": [torch.nn.Parameter(torch.ones(1))]}]) == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adamw_trains_as_the_plain_one(dtype):
    """Five steps of a small regression: the fused AdamW (what CUDA gets) ends where the foreach one does."""
    def train(**kwargs):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4).to(dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, **precision.fused_adamw("AdamW", kwargs, "cuda"))
        x, y = torch.randn(16, 8, dtype=dtype), torch.randn(16, 4, dtype=dtype)
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
            optimizer.step()
        return optimizer, torch.cat([p.detach().float().flatten() for p in model.parameters()])

    (fused, a), (plain, b) = train(), train(foreach=True)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2  # bfloat16: the plain one rounds every op
    assert (a - b).abs().max() <= tolerance


@pytest.fixture
def tf32_flags():
    """The two TF32 flags, restored after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("allow, device, on", [(True, "cuda", True), (True, "cpu", False), (False, "cuda", False)])
def test_allow_tf32_sets_the_flags_only_on_cuda(tf32_flags, allow, device, on):
    assert precision.set_tf32(allow, device) == on
    assert tf32_flags() == (on, on)


def test_configure_run_sets_tf32_on_a_cuda_accelerator(tf32_flags):
    accelerator = types.SimpleNamespace(scaler=None, device=torch.device("cuda"))  # never used as a device here
    precision.configure_run(TrainConfig(allow_tf32=True), accelerator)
    assert tf32_flags() == (True, True)
