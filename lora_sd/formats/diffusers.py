"""diffusers' LoRA file: what `save_lora_weights` writes and `load_lora_weights` reads first.

Keys `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<path>...`;
ranks and alphas travel as LoraConfig dicts in the `lora_adapter_metadata`
header entry, per component (`unet.r`, `unet.lora_alpha`, `unet.alpha_pattern`...).
"""

import json

from lora_sd.errors import FormatError
from lora_sd.formats.peft import LORA_A, LORA_B, lora_modules
from lora_sd.lora_weights import COMPONENTS, LoraWeights

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
KEPT_METADATA = ("ss_", "modelspec.")  # kohya metadata travels through diffusers files


def is_diffusers(state_dict) -> bool:
    return any(k.split(".", 1)[0] in COMPONENTS and k.endswith((LORA_A, LORA_B)) for k in state_dict)


def lora_from_diffusers(state_dict, metadata=None, source="") -> LoraWeights:
    metadata = metadata or {}
    configs = {}
    try:
        for k, v in json.loads(metadata.get(ADAPTER_METADATA_KEY) or "{}").items():
            component, field = k.split(".", 1)
            configs.setdefault(component, {})[field] = v
    except (ValueError, AttributeError) as e:
        raise FormatError(f"{source}: unreadable {ADAPTER_METADATA_KEY} metadata ({e})") from None
    by_component = {}
    for key, tensor in state_dict.items():
        component, _, name = key.partition(".")
        if component not in COMPONENTS:
            raise FormatError(f"{source}: key {key!r} is not a diffusers LoRA tensor (<component>.<module>.lora_A/B.weight)")
        by_component.setdefault(component, {})[name] = tensor
    lora = LoraWeights(metadata={k: v for k, v in metadata.items() if k.startswith(KEPT_METADATA)})
    for component, state in by_component.items():
        lora.modules.update(lora_modules(component, state, configs.get(component, {}), source))
    return lora


def diffusers_file_contents(lora: LoraWeights):
    """(tensors, metadata) as `save_lora_weights` would write them, alphas in the metadata; tensors as in `lora`."""
    state = {}
    for key, m in lora.modules.items():
        state[key + LORA_A] = m.down
        state[key + LORA_B] = m.up
    packed = {}
    for component in lora.components:
        for field, value in lora.peft_config(component).to_dict().items():
            if isinstance(value, set):
                value = sorted(value)
            if field == "peft_type":
                value = str(value.value if hasattr(value, "value") else value)
            packed[f"{component}.{field}"] = value
    metadata = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True, default=str)}
    metadata.update({k: v for k, v in lora.metadata.items() if k.startswith(KEPT_METADATA)})
    return state, metadata
