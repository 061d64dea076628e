"""diffusers' LoRA file: what `save_lora_weights` writes and `load_lora_weights` reads first.

Keys `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<path>...`;
ranks and alphas travel as LoraConfig dicts in the `lora_adapter_metadata`
header entry, per component (`unet.r`, `unet.lora_alpha`, `unet.alpha_pattern`...).
"""

import json
import re

import torch

from lora_sd.errors import FormatError
from lora_sd.lora_weights import COMPONENTS, LoraModule, LoraWeights, key_for_module

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_A, _B = ".lora_A.weight", ".lora_B.weight"


def is_diffusers(state_dict) -> bool:
    return any(k.split(".", 1)[0] in COMPONENTS and k.endswith((_A, _B)) for k in state_dict)


def _pattern_value(patterns, name, default):
    """PEFT's rule: a pattern matches a module name ending in it (regex allowed)."""
    if name in patterns:
        return patterns[name]
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def lora_from_diffusers(state_dict, metadata=None, source="") -> LoraWeights:
    configs = {}
    raw = (metadata or {}).get(ADAPTER_METADATA_KEY)
    if raw:
        packed = json.loads(raw)
        for k, v in packed.items():
            component, field = k.split(".", 1)
            configs.setdefault(component, {})[field] = v
    pairs = {}
    for key, tensor in state_dict.items():
        component = key.split(".", 1)[0]
        if component not in COMPONENTS or not key.endswith((_A, _B)):
            raise FormatError(f"{source}: key {key!r} is not a diffusers LoRA tensor (<component>.<module>.lora_A/B.weight)")
        pairs.setdefault(key[: -len(_A)], {})[key[-len(_A):]] = tensor
    lora = LoraWeights(metadata={k: v for k, v in (metadata or {}).items() if k.startswith(("ss_", "modelspec."))})
    for name, p in pairs.items():
        if _A not in p or _B not in p:
            raise FormatError(f"{source}: module {name} has only one of lora_A/lora_B")
        component, path = name.split(".", 1)
        down, up = p[_A], p[_B]
        cfg = configs.get(component, {})
        rank = down.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, path, cfg.get("lora_alpha", rank))
        lora.modules[key_for_module(component, path)] = LoraModule(down, up, float(alpha))
    return lora


def diffusers_file_contents(lora: LoraWeights, dtype=torch.float32):
    """(tensors, metadata) as `save_lora_weights` would write them, alphas in the metadata."""
    state = {}
    for key, m in lora.modules.items():
        state[key + _A] = m.down.detach().to("cpu", dtype).contiguous()
        state[key + _B] = m.up.detach().to("cpu", dtype).contiguous()
    packed = {}
    for component in lora.components:
        config = lora.peft_config(component).to_dict()
        for field, value in config.items():
            if isinstance(value, set):
                value = sorted(value)
            if field == "peft_type":
                value = str(value.value if hasattr(value, "value") else value)
            packed[f"{component}.{field}"] = value
    metadata = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True, default=str)}
    metadata.update({k: v for k, v in lora.metadata.items() if k.startswith(("ss_", "modelspec."))})
    return state, metadata
