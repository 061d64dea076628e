"""PEFT adapter folders: `<out>/unet/`, `<out>/text_encoder/`, each with
`adapter_config.json` and `adapter_model.safetensors` as `PeftModel.save_pretrained` writes."""

import json
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig

from lora_sd.errors import FormatError
from lora_sd.lora_weights import COMPONENTS, LoraWeights, key_for_module, model_module_name
from lora_sd.formats.diffusers import _pattern_value
from lora_sd.lora_weights import LoraModule

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _transformers_has_text_model() -> bool:
    """transformers < 5 keeps `text_model.` in CLIPTextModel's module names."""
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


def is_peft_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / c / CONFIG_NAME).is_file() for c in COMPONENTS)


def read_peft_folder(path) -> LoraWeights:
    path = Path(path)
    lora = LoraWeights()
    for component in COMPONENTS:
        folder = path / component
        if not (folder / CONFIG_NAME).is_file():
            continue
        try:
            cfg = json.loads((folder / CONFIG_NAME).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FormatError(f"{folder / CONFIG_NAME}: not a readable adapter config ({e})") from None
        weights = folder / WEIGHTS_NAME
        from lora_sd.io import read_tensor_file

        state, _ = read_tensor_file(weights if weights.is_file() else folder / "adapter_model.bin")
        pairs = {}
        for key, tensor in state.items():
            name = key.removeprefix(_PREFIX)
            for part in (".lora_A.weight", ".lora_B.weight"):
                if name.endswith(part):
                    pairs.setdefault(name[: -len(part)], {})[part] = tensor
                    break
            else:
                raise FormatError(f"{weights}: key {key!r} is not a LoRA tensor (lora_A/lora_B)")
        for name, p in pairs.items():
            if len(p) != 2:
                raise FormatError(f"{weights}: module {name} has only one of lora_A/lora_B")
            down, up = p[".lora_A.weight"], p[".lora_B.weight"]
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", down.shape[0]))
            lora.modules[key_for_module(component, name)] = LoraModule(down, up, float(alpha))
    if not lora.modules:
        raise FormatError(f"{path}: no PEFT adapter (expected unet/ or text_encoder/ with {CONFIG_NAME})")
    return lora


def write_peft_folder(lora: LoraWeights, folder, dtype=torch.float32):
    """Write the adapter folders into `folder` (which must exist and be empty)."""
    folder = Path(folder)
    for component in lora.components:
        sub = folder / component
        sub.mkdir(parents=True)
        # module names as the installed transformers spells them, so PeftModel loads the folder
        te_model = _NamingProbe() if component.startswith("text_encoder") and _transformers_has_text_model() else None
        config: LoraConfig = lora.peft_config(component, te_model)
        config.save_pretrained(str(sub))
        state = {}
        for name, m in lora.component(component).items():
            mname = model_module_name(component, name, te_model)
            state[f"{_PREFIX}{mname}.lora_A.weight"] = m.down.detach().to("cpu", dtype).contiguous()
            state[f"{_PREFIX}{mname}.lora_B.weight"] = m.up.detach().to("cpu", dtype).contiguous()
        safetensors.torch.save_file(state, str(sub / WEIGHTS_NAME), metadata={"format": "pt"})


class _NamingProbe:
    """Stands for a transformers-4 CLIPTextModel in `model_module_name` (it has `text_model`)."""

    text_model = True
