"""Training-state folders: read as untrusted input (no code runs), refusals in one line, every optimizer's
state through our pickle-free format, disk full while saving, stale temporaries of a killed run."""

import errno
import importlib.util
import pickle
from pathlib import Path

import pytest
import torch

from lora_sd.cli import run_main
from lora_sd.state_tree import load_tree, save_tree
from lora_sd.training import checkpoint, optim
from tests.helpers import full_disk_at
from tests.test_train import args, assets, train_recipe  # noqa: F401  (assets: the tiny model + images fixture)


class _TouchOnLoad:
    """Unpickling this creates `marker`: what a malicious state file would do (run code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def _resume(assets, out, state, capsys, *extra):
    code = run_main(train_recipe.main, args(assets, out, "--save_state", "--resume", str(state), *extra, steps=2))
    return code, _error_line(capsys)


def _error_line(capsys) -> str:
    """The one `error:` line a refusal prints (last on stderr, after the model-loading logs), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def state(assets, tmp_path_factory):
    """A state folder written by a one-step run."""
    out = tmp_path_factory.mktemp("state_run")
    train_recipe.main(args(assets, out, "--save_state", steps=1))
    return out / "lora-state"


def _copy(state, tmp_path):
    import shutil

    return Path(shutil.copytree(state, tmp_path / "copy-state"))


def test_state_folder_holds_no_pickle_and_resumes(state, assets, tmp_path):
    assert sorted(p.name for p in state.iterdir()) == ["lora.safetensors", "optimizer.safetensors",
                                                        "rng-0.safetensors", "state.json"]
    for p in state.iterdir():
        assert p.read_bytes()[8:9] == b"{" or p.suffix == ".json"  # safetensors (JSON header) or JSON
    result = train_recipe.main(args(assets, tmp_path / "out", "--save_state", "--resume", str(state), steps=2))
    assert result.steps == 2


@pytest.mark.parametrize("where", ["extra_file", "as_optimizer"])
def test_a_pickle_in_the_state_folder_runs_no_code(state, assets, tmp_path, capsys, where):
    folder, marker = _copy(state, tmp_path), tmp_path / "marker"
    name = "custom_checkpoint_0.pkl" if where == "extra_file" else "optimizer.safetensors"
    torch.save({"x": _TouchOnLoad(marker)}, folder / name)
    code, err = _resume(assets, tmp_path / "out", folder, capsys)
    assert code == 2 and name in err
    assert not marker.exists()


def _accelerate_state(folder, marker):
    """A state folder as lora-sd wrote it before (accelerate.save_state), its custom checkpoint made malicious."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(checkpoint.Progress())
    acc.save_state(str(folder))
    with open(folder / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(_TouchOnLoad(marker), f)
    return folder


def test_an_accelerate_state_folder_is_refused_unread(assets, tmp_path, capsys):
    marker = tmp_path / "marker"
    folder = _accelerate_state(tmp_path / "old-state", marker)
    code, err = _resume(assets, tmp_path / "out", folder, capsys)
    assert code == 2 and "accelerate's pickle format" in err and "re-make it" in err
    assert not marker.exists()


def test_an_unexpected_file_is_refused_by_name(state, assets, tmp_path, capsys):
    folder = _copy(state, tmp_path)
    (folder / "notes.txt").write_text("hello")
    # checked before the model loads: the missing model is not reached
    code, err = _resume(assets, tmp_path / "out", folder, capsys, "--pretrained_model_name_or_path",
                        str(tmp_path / "no-model"))
    assert code == 2 and "unexpected 'notes.txt'" in err


@pytest.mark.parametrize("name", ["state.json", "lora.safetensors", "optimizer.safetensors", "rng-0.safetensors"])
def test_a_truncated_state_file_is_one_line(state, assets, tmp_path, capsys, name):
    folder = _copy(state, tmp_path)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    code, err = _resume(assets, tmp_path / "out", folder, capsys)
    assert code == 2 and name in err


@pytest.mark.parametrize("name", list(optim.OPTIMIZERS))
def test_each_optimizer_state_round_trips_exactly(name, tmp_path):
    """Saved after two steps and loaded into a fresh optimizer: the third step is bit-identical."""
    package = optim.OPTIMIZERS[name][2]
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")

    def make():
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(64, 32))
        b = torch.nn.Parameter(torch.randn(32, 64))
        opt, _ = optim.build_optimizer(name, [{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-3}], 1e-3, [])
        return (a, b), opt

    def step(params, opt):
        (params[0] @ params[1]).square().mean().backward()
        opt.step()
        opt.zero_grad()

    params, opt = make()
    for _ in range(2):
        step(params, opt)
    save_tree(opt.state_dict(), tmp_path / "opt.safetensors")
    params2, opt2 = make()
    with torch.no_grad():
        for p, q in zip(params, params2, strict=True):
            q.copy_(p)
    opt2.load_state_dict(load_tree(tmp_path / "opt.safetensors"))
    step(params, opt)
    step(params2, opt2)
    assert all(torch.equal(p, q) for p, q in zip(params, params2, strict=True))


# the saves of a 2-step run with a save at step 1: LoRA, then the state's rng, lora and optimizer files
@pytest.mark.parametrize("call", [1, 2, 3, 4])
def test_disk_full_while_saving_is_one_line_and_leaves_nothing_partial(assets, tmp_path, monkeypatch, capsys, call):
    out = tmp_path / "out"
    calls = full_disk_at(monkeypatch, call)
    code = run_main(train_recipe.main, args(assets, out, "--save_state", "--save_every_n_steps", "1", steps=2))
    err = _error_line(capsys)
    assert len(calls) == call and code == 2
    assert err.endswith("No space left on device")
    want = ["lora-step00000001.safetensors", "lora-step00000001-state"][call > 1]
    assert want in err  # the message names what could not be written
    left = sorted(p.name for p in out.iterdir())
    assert left == ["lora-config.toml"] + (["lora-step00000001.safetensors"] if call > 1 else [])


def test_stale_temporaries_of_our_naming_are_found(tmp_path):
    ours = [".lora.safetensors.ab_cd123.tmp", ".lora-step00000002.safetensors.x1y2z3w4.tmp", ".lora-state.tmp",
            ".lora-000003-state.tmp.old", ".lora.abcdefgh.tmp", ".lora-config.toml.abcdefgh.tmp",
            ".lora-interrupted-state.tmp", "sample/.lora_000002_00.png.abcdefgh.tmp"]
    others = [".lora2.safetensors.abcdefgh.tmp", ".other-state.tmp", "lora.safetensors", "notes.tmp",
              ".lora.safetensors.abc.tmp", "sample/.other_000002_00.png.abcdefgh.tmp", "lora-state"]
    (tmp_path / "sample").mkdir()
    for name in ours + others:
        path = tmp_path / name
        if "state" in name:
            path.mkdir()
            (path / "state.json").write_text("{}")
        else:
            path.write_text("x")
    removed = checkpoint.remove_stale_temporaries(tmp_path, "lora")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == sorted(ours)
    assert not any((tmp_path / n).exists() for n in ours) and all((tmp_path / n).exists() for n in others)


def test_random_generators_of_this_process_are_restored(tmp_path):
    """python `random`, numpy and torch draw the same numbers after a resume as after the save."""
    import random

    import numpy as np
    from accelerate import Accelerator
    from peft import LoraConfig, inject_adapter_in_model

    acc = Accelerator(cpu=True)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(4, 4)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    state = checkpoint.TrainingState(acc, {"unet": model}, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                                     checkpoint.Progress())
    checkpoint.save_training_state(state, tmp_path / "s")

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    first = draws()
    checkpoint.load_training_state(state, tmp_path / "s")
    assert draws() == first


def test_disk_full_writing_the_resolved_config_names_it(assets, tmp_path, monkeypatch, capsys):
    real = Path.write_text

    def write_text(self, *a, **kw):
        if self.name.startswith(".lora-config.toml."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert run_main(train_recipe.main, args(assets, tmp_path / "out", steps=1)) == 2
    assert _error_line(capsys) == f"error: {tmp_path / 'out' / 'lora-config.toml'}: No space left on device"
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("edit", ["scheduler_attribute", "scheduler_type", "deep_nesting", "not_json"])
def test_a_crafted_state_json_is_one_line(state, assets, tmp_path, capsys, edit):
    """state.json sets nothing the schedule does not have, and never a value of another type."""
    import json

    folder = _copy(state, tmp_path)
    info = json.loads((folder / "state.json").read_text())
    if edit == "scheduler_attribute":
        info["lr_scheduler"]["optimizer"] = {"param_groups": []}
    elif edit == "scheduler_type":
        info["lr_scheduler"]["base_lrs"] = "fast"
    text = json.dumps(info)
    if edit == "deep_nesting":
        text = text.replace('"version": 1', '"version": 1, "x": ' + "[" * 100_000 + "]" * 100_000)
    elif edit == "not_json":
        text = text[:-5]
    (folder / "state.json").write_text(text)
    code, err = _resume(assets, tmp_path / "out", folder, capsys)
    assert code == 2 and "state.json" in err
