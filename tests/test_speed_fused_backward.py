"""fused_backward_pass: the same LoRA as stepping after backward, no gradient left after backward, resume exact,
sd-scripts' per-weight clipping, and the refusals."""

import pytest
import torch

from lora_sd.config.options import TrainConfig
from lora_sd.config.validate import PER_WEIGHT_OPTIMIZERS
from lora_sd.errors import ConfigError
from lora_sd.training import fused_backward
from lora_sd.training.fused_backward import FusedBackward, check_processes
from tests.test_train import assets  # noqa: F401  (the tiny model + images fixture)
from tests.test_train import args, kohya_file, refused_run, stopped_after_first_state, train_recipe

# max_grad_norm 0: sd-scripts' fused clipping is per weight, the usual one global (test_clipping_is_per_weight)
COMMON = ("--max_grad_norm", "0", "--save_every_n_steps", "3", "--save_state", "--train_batch_size", "1",
          "--lr_scheduler", "cosine")


@pytest.fixture(scope="module")
def fused_run(assets, tmp_path_factory):  # noqa: F811
    """A 6-step fused run: its output folder, and whether every gradient was None right after each backward."""
    from accelerate import Accelerator

    hooks, grads_freed = [], []
    real_attach, real_backward = fused_backward.attach, Accelerator.backward

    def attach(cfg, optimizer):
        hooks.append(real_attach(cfg, optimizer))
        return hooks[-1]

    def backward(self, loss, **kwargs):
        real_backward(self, loss, **kwargs)
        grads_freed.append(all(p.grad is None for p in hooks[-1].group_of))

    out = tmp_path_factory.mktemp("fused") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_backward, "attach", attach)
        mp.setattr(Accelerator, "backward", backward)
        train_recipe.main(args(assets, out, *COMMON, "--fused_backward_pass", steps=6))
    return out, grads_freed


def test_fused_gives_the_same_lora_and_frees_every_gradient(assets, tmp_path, fused_run):  # noqa: F811
    out, grads_freed = fused_run
    assert grads_freed == [True] * 6
    train_recipe.main(args(assets, tmp_path / "plain", *COMMON, steps=6))
    fused, _ = kohya_file(out / "lora.safetensors")
    plain, _ = kohya_file(tmp_path / "plain" / "lora.safetensors")
    assert fused.keys() == plain.keys()
    assert all(torch.allclose(fused[k], plain[k], rtol=1e-6, atol=1e-7) for k in plain)
    start, _ = kohya_file(out / "lora-step00000003.safetensors")
    assert any(not torch.equal(fused[k], start[k]) for k in fused)  # it trained


def test_fused_resume_is_bit_identical(assets, tmp_path, monkeypatch, fused_run):  # noqa: F811
    options = (*COMMON, "--fused_backward_pass")
    state = stopped_after_first_state(assets, tmp_path / "b", options, monkeypatch)
    train_recipe.main(args(assets, tmp_path / "b", *options, "--resume", str(state), steps=6))
    straight, _ = kohya_file(fused_run[0] / "lora.safetensors")
    resumed, _ = kohya_file(tmp_path / "b" / "lora.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_clipping_is_per_weight():
    """As sd-scripts: each weight's gradient is clipped by its own norm (SGD at lr 1: the step is the gradient)."""
    layer = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    fused = FusedBackward(optimizer, max_grad_norm=1.0)
    (layer(torch.full((4, 3), 10.0)).sum()).backward()  # gradient norms ~69 (weight) and ~11 (bias)
    for p, p0 in zip(layer.parameters(), before):
        assert p.grad is None
        assert torch.allclose((p0 - p.detach()).norm(), torch.tensor(1.0))  # each clipped to 1 on its own
    fused.remove()


def _trained_weights(optimizer_type: str, fused: bool) -> list[torch.Tensor]:
    """Three steps of a two-layer model in two parameter groups (8-bit optimizers: 8-bit state from 4096 weights)."""
    from lora_sd.training.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 16))
    groups = [{"params": list(model[0].parameters()), "lr": 1e-3}, {"params": list(model[1].parameters()), "lr": 2e-3}]
    optimizer, _ = build_optimizer(optimizer_type, groups, 1e-3, [])
    hooks = FusedBackward(optimizer, max_grad_norm=0) if fused else None
    for i in range(3):
        model(torch.randn(8, 128, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if hooks:
        hooks.remove()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("optimizer_type", PER_WEIGHT_OPTIMIZERS)
def test_every_per_weight_optimizer_steps_as_without(optimizer_type):
    from lora_sd.config.choices import OPTIMIZERS

    package = OPTIMIZERS[optimizer_type][2]
    if package:
        pytest.importorskip(package.replace("-", "_"))
    plain, fused = _trained_weights(optimizer_type, False), _trained_weights(optimizer_type, True)
    torch.manual_seed(0)
    start = [p.detach() for p in torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 16)).parameters()]
    assert all(torch.equal(a, b) for a, b in zip(plain, fused))
    assert not torch.equal(fused[0], start[0])  # it trained (the start is the same seed's model)


@pytest.mark.parametrize("extra, words", [
    (["--gradient_accumulation_steps", "2"], "`gradient_accumulation_steps` 2"),
    (["--optimizer_type", "Prodigy"], "Prodigy sets its step size from all weights"),
    (["--optimizer_type", "dadaptadam"], "DAdaptAdam"),
    (["--mixed_precision", "fp16"], "gradient scaler"),
])
def test_refusals(assets, tmp_path, capsys, extra, words):  # noqa: F811
    err = refused_run(assets, tmp_path / "out", ["--fused_backward_pass", *extra], capsys)
    assert "fused_backward_pass" in err and words in err


def test_more_than_one_process_is_refused():
    cfg = TrainConfig(fused_backward_pass=True)
    with pytest.raises(ConfigError, match="runs on one process, this run has 2"):
        check_processes(cfg, 2)
    check_processes(cfg, 1)
    check_processes(TrainConfig(), 2)
