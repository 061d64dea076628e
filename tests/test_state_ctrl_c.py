"""Ctrl-C during training, save_state_on_train_end, and temporaries of a killed run removed at start."""

import logging
import os
import signal
from pathlib import Path

import pytest
import torch

from lora_sd.cli import run_main
from lora_sd.training import noise
from tests.test_state import _error_line
from tests.test_train import args, assets, kohya_file, train_recipe  # noqa: F401  (assets: a fixture)

STEPS = 10  # 8 batches an epoch (4 images x 2 repeats, batch 1)


def _ctrl_c_at_step(monkeypatch, k: int):
    """A real SIGINT to this process while step k computes its loss."""
    real, calls = noise.diffusion_loss, []

    def loss(*a, **kw):
        calls.append(1)
        if len(calls) == k:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(noise, "diffusion_loss", loss)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """One uninterrupted run, saving the LoRA after every step."""
    out = tmp_path_factory.mktemp("reference")
    train_recipe.main(args(assets, out, "--train_batch_size", "1", "--save_every_n_steps", "1", steps=STEPS))
    return out


def _tensors(path):
    return kohya_file(path)[0]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("k", [3, 8])  # inside the first epoch / at its last batch
def test_ctrl_c_saves_lora_and_state_and_the_resumed_run_is_the_same(assets, reference, tmp_path, monkeypatch,
                                                                     capsys, k):
    out, common = tmp_path / "out", ("--train_batch_size", "1", "--save_state")
    _ctrl_c_at_step(monkeypatch, k)
    assert run_main(train_recipe.main, args(assets, out, *common, steps=STEPS)) == 2
    err, state = _error_line(capsys), out / "lora-interrupted-state"
    assert f"interrupted (Ctrl-C) after step {k} of {STEPS}" in err and str(out / "lora-interrupted.safetensors") in err
    assert f"--resume {state}" in err
    assert sorted(p.name for p in out.iterdir()) == ["lora-config.toml", "lora-interrupted-state",
                                                      "lora-interrupted.safetensors"]
    assert _same(_tensors(out / "lora-interrupted.safetensors"), _tensors(reference / f"lora-step{k:08d}.safetensors"))
    monkeypatch.undo()
    result = train_recipe.main(args(assets, out, *common, "--resume", str(state), steps=STEPS))
    assert result.steps == STEPS and _same(_tensors(out / "lora.safetensors"), _tensors(reference / "lora.safetensors"))


def test_ctrl_c_without_save_state_says_it_cannot_resume(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _ctrl_c_at_step(monkeypatch, 2)
    assert run_main(train_recipe.main, args(assets, out, steps=STEPS)) == 2
    assert "no training state was saved (save_state is off)" in _error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["lora-config.toml", "lora-interrupted.safetensors"]


@pytest.mark.parametrize("during", ["lora-interrupted.safetensors", "optimizer.safetensors"])
def test_a_second_ctrl_c_during_that_save_leaves_nothing_partial(assets, tmp_path, monkeypatch, capsys, during):
    import safetensors.torch

    out, real = tmp_path / "out", safetensors.torch.save_file
    _ctrl_c_at_step(monkeypatch, 2)

    def save_file(tensors, filename, metadata=None):
        if Path(filename).name.startswith(f".{during}."):  # atomic_path's temporary of that file
            Path(filename).write_bytes(b"\0" * 100)
            os.kill(os.getpid(), signal.SIGINT)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert run_main(train_recipe.main, args(assets, out, "--save_state", steps=STEPS)) == 130
    assert capsys.readouterr().err.strip().endswith("error: interrupted (Ctrl-C)")
    left = sorted(p.name for p in out.iterdir())
    assert left == ["lora-config.toml"] + (["lora-interrupted.safetensors"] if during.startswith("optimizer") else [])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back


def test_save_state_on_train_end_saves_only_the_final_state(assets, tmp_path):
    out = tmp_path / "out"
    train_recipe.main(args(assets, out, "--save_state_on_train_end", "--save_every_n_steps", "1", steps=2))
    assert sorted(p.name for p in out.iterdir()) == ["lora-config.toml", "lora-state", "lora-step00000001.safetensors",
                                                      "lora.safetensors"]
    result = train_recipe.main(args(assets, out, "--resume", str(out / "lora-state"), steps=3))
    assert result.steps == 3


def test_a_run_removes_temporaries_left_by_a_killed_run(assets, tmp_path, caplog):
    out = tmp_path / "out"
    (out / ".lora-state.tmp").mkdir(parents=True)
    (out / ".lora-state.tmp" / "rng-0.safetensors").write_bytes(b"partial")
    for name in (".lora.safetensors.abcdefgh.tmp", ".other.safetensors.abcdefgh.tmp"):
        (out / name).write_bytes(b"partial")
    with caplog.at_level(logging.WARNING):
        train_recipe.main(args(assets, out, steps=1))
    assert sorted(p.name for p in out.iterdir()) == [".other.safetensors.abcdefgh.tmp", "lora-config.toml",
                                                      "lora.safetensors"]
    assert "removed" in caplog.text and ".lora-state.tmp" in caplog.text
