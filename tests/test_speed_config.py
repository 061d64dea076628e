"""An sd-scripts --config_file TOML using issue 13's speed and memory options loads and trains (tiny SD1, CPU):
full_bf16 with mixed_precision bf16, torch_compile (eager backend), fused_backward_pass, vae_batch_size,
persistent_data_loader_workers, allow_tf32 (a CUDA switch: ignored here), channels_last; and the global gradient
clipping of the step (optim.clip_grad_norm)."""

import pytest
import torch

from tests.test_train import args, assets, kohya_file, train_recipe  # noqa: F401  (assets: fixture)


def test_sd_scripts_config_with_the_speed_options_trains(assets, tmp_path):  # noqa: F811
    config = tmp_path / "speed.toml"
    config.write_text(f"""
[model_arguments]
pretrained_model_name_or_path = "{(assets / 'model').as_posix()}"
[additional_network_arguments]
network_module = "networks.lora"
network_dim = 4
network_alpha = 1
network_train_unet_only = true
[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 0.001
max_grad_norm = 1.0
[dataset_arguments]
train_data_dir = "{(assets / 'images').as_posix()}"
resolution = "64"
cache_latents = true
vae_batch_size = 4
cache_text_encoder_outputs = true
max_data_loader_n_workers = 1
persistent_data_loader_workers = true
[training_arguments]
output_dir = "{(tmp_path / 'out').as_posix()}"
output_name = "speed"
max_train_steps = 6
seed = 1
mixed_precision = "bf16"
full_bf16 = true
torch_compile = true
dynamo_backend = "eager"
fused_backward_pass = true
allow_tf32 = true
channels_last = true
gradient_checkpointing = true
""")
    torch._dynamo.reset()
    result = train_recipe.main(["--config", str(config)])
    assert result.steps == 6 and len(result.losses) == 6 and all(map(torch.isfinite, map(torch.tensor, result.losses)))
    trained = [p for n, p in result.unet.named_parameters() if "lora_" in n]
    assert trained and {p.dtype for p in trained} == {torch.bfloat16}  # full_bf16
    assert any(p.abs().max() > 0 for n, p in result.unet.named_parameters() if "lora_B" in n)  # it learned
    conv = result.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()  # channels_last
    tensors, meta = kohya_file(tmp_path / "out" / "speed.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}  # written in the weights' dtype, as sd-scripts
    assert meta["ss_mixed_precision"] == "bf16" and meta["ss_cache_latents"] == "True"


def test_clip_grad_norm_scales_to_the_global_norm_after_unscaling():
    from lora_sd.training.optim import clip_grad_norm

    class Accelerator:
        unscaled = 0

        def unscale_gradients(self):  # the fp16 scaler's unscale comes first (full_fp16 relies on it)
            self.unscaled += 1

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0, 0.0]), torch.full((2, 2), 2.0)  # global norm 5
    acc = Accelerator()
    assert float(clip_grad_norm(acc, params, 1.0)) == pytest.approx(5.0) and acc.unscaled == 1
    assert torch.allclose(params[0].grad, torch.tensor([0.6, 0.0, 0.0]), atol=1e-6)  # one factor for all: 1/5
    assert torch.allclose(params[1].grad, torch.full((2, 2), 0.4), atol=1e-6)
    clip_grad_norm(acc, params, 10.0)  # under the bound: unchanged
    assert torch.allclose(params[1].grad, torch.full((2, 2), 0.4), atol=1e-6)


def test_max_grad_norm_bounds_the_first_sgd_step(assets, tmp_path):  # noqa: F811
    """SGD's first step moves a weight by lr x (1 + momentum) x its clipped gradient at most: with max_grad_norm
    1e-9 the zero-initialised up matrices stay at ~1e-12; unclipped they move by far more."""
    def up_max(norm):
        result = train_recipe.main(args(assets, tmp_path / norm, "--optimizer_type", "SGDNesterov",
                                        "--max_grad_norm", norm, "--network_train_unet_only", steps=1))
        return max(p.abs().max().item() for n, p in result.unet.named_parameters() if "lora_B" in n)

    assert up_max("1e-9") < 1e-10 < 1e-7 < up_max("0")
