"""Bad base-model inputs: one-line errors that name the file and say what it looks like."""

import os

import pytest
import torch
from safetensors.torch import save_file

from lora_sd.cli import run_main
from lora_sd.errors import ConfigError, FormatError, LoraSdError
from lora_sd.models import load_base, load_state_dict
from lora_sd.tiny import save_tiny_diffusers, save_tiny_single_file


class CodeCarrier:
    """Unpickling this would run `os.makedirs(marker)`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    return save_tiny_single_file(root / "sd1.safetensors", "sd1")


def _vae_only(path, out):
    sd = load_state_dict(path)
    save_file({k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}, str(out))


def _lora(path, out):
    save_file({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0),
    }, str(out))


def _truncated(path, out):
    data = path.read_bytes()
    out.write_bytes(data[: len(data) // 2])


def _truncated_ckpt(path, out):
    torch.save({"state_dict": load_state_dict(path)}, out)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])


def _code_pickle(path, out):
    torch.save({"state_dict": load_state_dict(path), "x": CodeCarrier(str(out) + ".pwned")}, out)


def _no_text_encoder(path, out):
    save_file({k: v for k, v in load_state_dict(path).items() if not k.startswith("cond_stage_model.")}, str(out))


CASES = [  # (name, writer, load_base kwargs, what the message says)
    ("wrong_v2.safetensors", None, {"v2": True}, "looks like SD 1.x"),
    ("vae.safetensors", _vae_only, {}, "VAE only"),
    ("my_lora.safetensors", _lora, {}, "LoRA file"),
    ("truncated.safetensors", _truncated, {}, "not a valid safetensors file: truncated"),
    ("truncated.ckpt", _truncated_ckpt, {}, "a truncated or corrupt torch zip archive"),
    ("evil.ckpt", _code_pickle, {}, "refusing to unpickle"),
    ("no_te.safetensors", _no_text_encoder, {}, "no text encoder"),
    ("missing.safetensors", "missing", {}, "no such file"),
]


@pytest.mark.parametrize("name,writer,kwargs,says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_file(name, writer, kwargs, says, sd1, tmp_path):
    path, config = sd1
    target = tmp_path / name
    if writer is None:
        target.write_bytes(path.read_bytes())
    elif writer != "missing":
        writer(path, target)
    with pytest.raises(LoraSdError) as info:
        load_base(target, model_config=config, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and name in msg and says in msg, msg
    assert not os.path.exists(str(target) + ".pwned")  # the pickle's code never ran


def test_recipe_prints_one_line(sd1, tmp_path, capsys):
    path, config = sd1
    rc = run_main(lambda argv: load_base(path, v2=True, model_config=config), [])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and path.name in err


def test_v2_mismatch_in_diffusers_folder(tmp_path):
    folder = save_tiny_diffusers(tmp_path / "sd1_folder", "sd1")
    with pytest.raises(FormatError, match="looks like SD 1.x"):
        load_base(folder, v2=True)
    with pytest.raises(FormatError, match="not a diffusers model folder"):
        load_base(tmp_path)


def test_model_config_problems(sd1, tmp_path):
    path, _ = sd1
    with pytest.raises(ConfigError, match="unet/config.json is missing"):
        load_base(path, model_config=tmp_path)
    # without model_config the shipped SD 1.5 config does not fit a tiny file: say so, name the file
    with pytest.raises(FormatError, match=r"sd1.safetensors: U-Net weights do not fit"):
        load_base(path)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FormatError, match="no-such-org/no-such-model"):
        load_base("no-such-org/no-such-model")
