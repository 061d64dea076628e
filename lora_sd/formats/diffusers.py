"""diffusers' LoRA file: what `save_lora_weights` writes and `load_lora_weights` reads.

Keys `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<path>...`;
ranks and alphas travel as LoraConfig dicts in the `lora_adapter_metadata`
header entry, per component (`unet.r`, `unet.lora_alpha`, `unet.alpha_pattern`...).

Also read: the older names diffusers' own training scripts write (and still
write: `convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`):
- `unet.<...>.attn1.processor.to_q_lora.down.weight` (`save_attn_procs`,
  LoraLoaderMixin 0.12-0.16; `save_attn_procs` leaves out the `unet.`),
  `text_encoder.<...>.self_attn.to_q_lora.down.weight` (0.15-0.16);
- `unet.<...>.to_q.lora.down.weight`,
  `text_encoder.<...>.q_proj.lora_linear_layer.down.weight` (0.17 on).
They are renamed by diffusers' own converters, as its loaders do.
A diffusers LoRA folder (`load_lora_weights(folder)`) is read as the file in it.
"""

import json
from pathlib import Path

from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                              convert_unet_state_dict_to_peft)

from lora_sd import adapter_math
from lora_sd.errors import FormatError
from lora_sd.formats.metadata import kohya_metadata_only
from lora_sd.formats.peft import LORA_A, LORA_B, lora_modules
from lora_sd.lora_weights import COMPONENTS, KIND_NAMES, LoraWeights, key_for_module


ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
# diffusers.loaders.lora_base LORA_WEIGHT_NAME_SAFE / LORA_WEIGHT_NAME, in the order load_lora_weights tries them
FOLDER_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_LEGACY = (".lora.down.weight", ".lora.up.weight", "_lora.down.weight", "_lora.up.weight",
           ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.", "add_embedding.")


def diffusers_folder_file(folder) -> Path | None:
    """The LoRA file of a diffusers LoRA folder (`pytorch_lora_weights.safetensors`, else `.bin`), or None."""
    return next((Path(folder) / n for n in FOLDER_FILES if (Path(folder) / n).is_file()), None)


def is_diffusers(state_dict) -> bool:
    keys = list(state_dict)
    if all(k.startswith(_UNET_ROOTS) for k in keys):  # `save_attn_procs`: U-Net keys without `unet.`
        return any(k.endswith((LORA_A, LORA_B, *_LEGACY)) for k in keys)
    return any(k.split(".", 1)[0] in COMPONENTS and k.endswith((LORA_A, LORA_B, *_LEGACY)) for k in keys)


def _peft_names(component, state, source):
    """`state` (one component) with diffusers' older names renamed to PEFT's, by diffusers' own converters."""
    if all(k.endswith((LORA_A, LORA_B, ".alpha")) for k in state):
        return state
    try:
        if component == "unet":  # as UNet2DConditionModel.load_lora_adapter does
            return convert_unet_state_dict_to_peft(state)
        # as diffusers.loaders.lora_base._load_lora_into_text_encoder does
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    except ValueError as e:  # "Could not automatically infer state dict type"
        raise FormatError(f"{source}: {component} keys of no diffusers LoRA layout ({e}; first key "
                          f"{next(iter(state))!r})") from None


def lora_from_diffusers(state_dict, metadata=None, source="") -> LoraWeights:
    metadata = metadata or {}
    configs = {}
    try:
        for k, v in json.loads(metadata.get(ADAPTER_METADATA_KEY) or "{}").items():
            component, field = k.split(".", 1)
            configs.setdefault(component, {})[field] = v
    except (ValueError, AttributeError) as e:
        raise FormatError(f"{source}: unreadable {ADAPTER_METADATA_KEY} metadata ({e})") from None
    if all(k.startswith(_UNET_ROOTS) for k in state_dict):  # `save_attn_procs` wrote the U-Net alone, unprefixed
        state_dict = {f"unet.{k}": t for k, t in state_dict.items()}
    by_component = {}
    for key, tensor in state_dict.items():
        component, _, name = key.partition(".")
        if component not in COMPONENTS:
            raise FormatError(f"{source}: key {key!r} is not a diffusers LoRA tensor (<component>.<module>.lora_A/B.weight)")
        by_component.setdefault(component, {})[name] = tensor
    lora = LoraWeights(metadata=kohya_metadata_only(metadata))
    for component, state in by_component.items():
        magnitudes = {k.removesuffix(".weight")[: -len(MAGNITUDE)]: state.pop(k) for k in list(state)
                      if k.removesuffix(".weight").endswith(MAGNITUDE)}
        state = _peft_names(component, state, source)
        modules = lora_modules(component, state, configs.get(component, {}), source)
        for name, magnitude in magnitudes.items():
            key = key_for_module(component, name)
            if key not in modules:
                raise FormatError(f"{source}: {component}.{name}{MAGNITUDE} has no LoRA module")
            m = modules[key]  # PEFT's [out] / [1, out, 1, 1] as the output-axis [out, 1...] kohya files hold
            m.dora_scale = magnitude.flatten().reshape(-1, *[1] * (len(m.weight_shape()) - 1))
        lora.modules.update(modules)
    return lora


# PEFT's DoRA magnitude. diffusers 0.42 loads it under this name into the U-Net; into a text encoder (through
# transformers 5's adapter loading) only with `.weight` after it: without, the magnitudes are silently re-initialised
MAGNITUDE = ".lora_magnitude_vector"
_MAGNITUDE_NAMES = {"unet": MAGNITUDE, "text_encoder": MAGNITUDE + ".weight", "text_encoder_2": MAGNITUDE + ".weight"}


def peft_magnitude(m):
    """An output-axis dora_scale as PEFT's lora_magnitude_vector: [out] for a Linear, [1, out, 1, 1] for a Conv2d
    (peft 0.21's DoRA conv layer keeps it so; a diffusers file of another shape fails to load)."""
    if len(m.weight_shape()) == 4:
        return m.dora_scale.reshape(1, -1, 1, 1)
    return m.dora_scale.flatten()


def diffusers_refusal(lora: LoraWeights) -> str | None:
    """Why `lora` cannot be a diffusers LoRA file, or None. diffusers' `load_lora_weights` loads plain LoRA and
    DoRA (PEFT's output-axis magnitudes, one LoraConfig per component); not LoHa/LoKr, input-axis DoRA, or a
    component where some modules are DoRA and others not."""
    where = ("write --to kohya (ComfyUI, AUTOMATIC1111, sd-scripts + LyCORIS) or --to peft (PEFT, lora-sd), or load "
             "the file into a diffusers pipeline with lora-sd's loader (generate.py --network_weights)")
    for key, m in lora.modules.items():
        if m.kind != "lora":
            return f"module {key} is a {KIND_NAMES[m.kind]}; diffusers' load_lora_weights loads LoRA and DoRA only: {where}"
        if m.dora_scale is not None and adapter_math.dora_axis(m.dora_scale, m.weight_shape()) != "output":
            return (f"module {key} is a DoRA with per-input-column magnitudes, which diffusers (PEFT) cannot hold: "
                    f"{where}, or merge it into a model (merge_lora)")
    for component in lora.components:
        dora = {m.dora_scale is not None for m in lora.component(component).values()}
        if len(dora) == 2:
            return (f"the {component} has DoRA and plain LoRA modules; a diffusers file holds one LoraConfig per "
                    f"component (use_dora for all or none): {where}")
    return None


def diffusers_file_contents(lora: LoraWeights):
    """(tensors, metadata) as `save_lora_weights` would write them, alphas in the metadata, DoRA magnitudes as
    PEFT's `lora_magnitude_vector` [out]; tensors as in `lora` (`save_lora` refuses what `diffusers_refusal` names)."""
    state = {}
    for key, m in lora.modules.items():
        state[key + LORA_A] = m.down
        state[key + LORA_B] = m.up
        if m.dora_scale is not None:
            state[key + _MAGNITUDE_NAMES[key.split(".", 1)[0]]] = peft_magnitude(m)
    packed = {}
    for component in lora.components:
        config = lora.peft_config(component).to_dict()
        config["use_dora"] = any(m.dora_scale is not None for m in lora.component(component).values())
        for field, value in config.items():
            if isinstance(value, set):
                value = sorted(value)
            if field == "peft_type":
                value = str(value.value if hasattr(value, "value") else value)
            packed[f"{component}.{field}"] = value
    metadata = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True, default=str)}
    metadata.update(kohya_metadata_only(lora.metadata))
    return state, metadata
