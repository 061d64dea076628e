"""save_last_n_epochs / save_last_n_steps (and their state variants): exactly the last saves kept, never the
final one; save_state_on_train_end writes the final state only."""

import pytest

from lora_sd.training import checkpoint
from lora_sd.training.retention import expired
from tests.test_train import args, make_assets, train_recipe


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("save_last_assets"))


def _names(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith("lora") and not p.name.endswith("config.toml"))


def test_expired_numbers_follow_sd_scripts():
    # train_util.get_remove_epoch_no: epoch - every * n; get_remove_step_no: (step - n - 1) down to a multiple
    assert expired(5, 1, 2, steps=False) == [1, 2, 3] and expired(6, 2, 2, steps=False) == [2]
    assert expired(10, 2, 4, steps=True) == [2, 4] and expired(8, 2, 3, steps=True) == [2, 4]
    assert expired(3, 1, None, steps=True) == [] and expired(2, 2, 3, steps=True) == []


def test_save_last_n_epochs_keeps_the_last_saves_states_and_ema_files(assets, tmp_path):
    """5 epochs of 2 steps, a save every epoch: the last 2 numbered saves (and -ema partners), the last state,
    and the final ones remain."""
    out = tmp_path / "out"
    train_recipe.main(args(assets, out, "--train_batch_size", "4", "--max_train_epochs", "5", "--save_every_n_epochs",
                           "1", "--save_last_n_epochs", "2", "--save_state", "--save_last_n_epochs_state", "1",
                           "--ema_decay", "0.9"))
    assert _names(out) == ["lora-000003-ema.safetensors", "lora-000003.safetensors", "lora-000004-ema.safetensors",
                           "lora-000004-state", "lora-000004.safetensors", "lora-ema.safetensors", "lora-state",
                           "lora.safetensors"]


def test_save_last_n_steps_keeps_the_saves_of_the_last_steps(assets, tmp_path):
    """Saves at steps 2, 4, 6, 8 of 9: the LoRAs of the last 3 steps (6, 8), the states of the last 5 (4, 6, 8),
    and the final LoRA and state."""
    out = tmp_path / "out"
    train_recipe.main(args(assets, out, "--save_every_n_steps", "2", "--save_last_n_steps", "3", "--save_state",
                           "--save_last_n_steps_state", "5", steps=9))
    assert _names(out) == ["lora-state", "lora-step00000004-state", "lora-step00000006-state",
                           "lora-step00000006.safetensors", "lora-step00000008-state",
                           "lora-step00000008.safetensors", "lora.safetensors"]


def test_save_last_n_steps_never_removes_the_final_save(assets, tmp_path):
    """Saves at steps 1, 2, 3 of 4, keeping those of the last step (sd-scripts: steps >= s - n): 2, 3, the final."""
    out = tmp_path / "out"
    train_recipe.main(args(assets, out, "--save_every_n_steps", "1", "--save_last_n_steps", "1", steps=4))
    assert _names(out) == ["lora-step00000002.safetensors", "lora-step00000003.safetensors", "lora.safetensors"]


@pytest.mark.parametrize("on", [True, False])
def test_save_state_on_train_end_writes_only_the_final_state(assets, tmp_path, on):
    out = tmp_path / "out"
    train_recipe.main(args(assets, out, "--save_every_n_steps", "1", *(["--save_state_on_train_end"] if on else []),
                           steps=3))
    assert _names(out) == ["lora-state"] * on + ["lora-step00000001.safetensors", "lora-step00000002.safetensors",
                                                  "lora.safetensors"]
    if on:
        checkpoint.check_state_folder(out / "lora-state")  # a complete state, that resume reads
