"""SD 1.x/2.x and SDXL LoRAs are never mixed: into the other kind of model, or merged together. Told by
metadata, and without it by module names (lora_te2_, original-layout U-Net names, U-Net block structure)."""

import pytest
import safetensors.torch

from lora_sd.errors import ConfigError, ModelMismatchError
from lora_sd.formats import load_lora, save_lora
from lora_sd.ops.merge import merge_into_models, merge_lora_files
from tests.helpers import random_adapted
from tests.test_sdxl_formats import adapted_sdxl, sdxl  # noqa: F401 (fixture)


def _without_metadata(path):
    """The same tensors with no metadata at all (as many files in the wild)."""
    safetensors.torch.save_file(safetensors.torch.load_file(path), path)
    return path


@pytest.fixture(params=["metadata", "names"])
def files(request, sdxl, tiny_sd1, tmp_path):  # noqa: F811
    """{"sdxl": kohya file, "sd1": kohya file}, with metadata or told apart by their names only."""
    xl = save_lora(adapted_sdxl(sdxl)[0], tmp_path / "xl.safetensors", version="sdxl")
    sd = save_lora(random_adapted(tiny_sd1)[0], tmp_path / "sd.safetensors", version="sd1")
    if request.param == "names":
        xl, sd = _without_metadata(xl), _without_metadata(sd)
    return {"sdxl": xl, "sd1": sd}


def test_sdxl_lora_into_sd1_model_refused(files, tiny_sd1):
    models = {"unet": tiny_sd1.unet, "text_encoder": tiny_sd1.text_encoder}
    with pytest.raises(ModelMismatchError, match=f"{files['sdxl']} is a LoRA for SDXL but the model is SD 1.x"):
        merge_into_models([load_lora(files["sdxl"])], [1.0], models, names=[str(files["sdxl"])], model_version="sd1")


def test_sd1_lora_into_sdxl_model_refused(files, sdxl):  # noqa: F811
    models = {"unet": sdxl.unet, "text_encoder": sdxl.text_encoder, "text_encoder_2": sdxl.text_encoder_2}
    with pytest.raises(ModelMismatchError, match=f"{files['sd1']} is a LoRA for SD 1.x.* but the model is SDXL"):
        merge_into_models([load_lora(files["sd1"])], [1.0], models, names=[str(files["sd1"])], model_version="sdxl")


def test_sd1_and_sdxl_loras_not_merged(files, tmp_path):
    out = tmp_path / "merged.safetensors"
    with pytest.raises(ConfigError, match=f"{files['sd1']} is a LoRA for SD 1.x.* but {files['sdxl']} is for SDXL"):
        merge_lora_files([str(files["sd1"]), str(files["sdxl"])], None, str(out))
    assert not out.exists()


def test_convert_refuses_v2_for_an_sdxl_lora(files, tmp_path):
    from lora_sd.formats.convert import convert_lora_file

    out = tmp_path / "out.safetensors"
    with pytest.raises(ConfigError, match=f"--v2: {files['sdxl']} is an SDXL LoRA"):
        convert_lora_file(files["sdxl"], out, "kohya", v2=True)
    assert not out.exists()


def test_unet_only_sdxl_file_without_metadata_is_sdxl(sdxl, tmp_path):  # noqa: F811
    """A U-Net-only SDXL file without metadata (modules that SD 1.x also has): its original-layout names say
    SDXL, and it is written back so."""
    lora, _ = adapted_sdxl(sdxl)
    unet_only = type(lora)({k: m for k, m in lora.modules.items() if k.startswith("unet.down_blocks.1.attentions.0.transformer_blocks.0.")})
    path = _without_metadata(save_lora(unet_only, tmp_path / "a.safetensors", version="sdxl"))
    back = load_lora(path)
    assert back.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    written = safetensors.torch.load_file(save_lora(back, tmp_path / "b.safetensors"))
    assert set(written) == set(safetensors.torch.load_file(path))
