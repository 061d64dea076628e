"""PEFT adapter folders: `<out>/unet/`, `<out>/text_encoder/`, each with
`adapter_config.json` and `adapter_model.safetensors` as `PeftModel.save_pretrained` writes
(plus the kohya metadata in the safetensors header, so that kohya -> PEFT -> kohya keeps it).

`lora_modules` (PEFT-named tensors + a LoraConfig dict -> LoraWeights entries)
also reads diffusers' LoRA files, which use the same names per component.
"""

import json
from pathlib import Path

import safetensors.torch
from peft.utils.other import get_pattern_key

from lora_sd.errors import FormatError
from lora_sd.formats.metadata import kohya_metadata_only
from lora_sd.io import read_tensor_file
from lora_sd.lora_weights import COMPONENTS, LoraModule, LoraWeights, key_for_module

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


def lora_modules(component, state, config, source) -> dict[str, LoraModule]:
    """{LoraWeights key: LoraModule} from `<module>.lora_A.weight` / `.lora_B.weight` tensors of one component.

    Alphas come from `config` (a LoraConfig dict: `lora_alpha`, `alpha_pattern`,
    matched as PEFT matches them); none given means alpha = rank. A 0-d
    `<module>[.lora_A.weight].alpha` tensor (diffusers' `network_alphas` names,
    which some tools store in the file) gives that module's alpha.
    """
    pairs, alphas = {}, {}
    for key, tensor in state.items():
        if key.endswith(".alpha"):  # hand-written: diffusers keeps network_alphas in memory, never in its files
            alphas[key.removesuffix(".alpha").split(".lora_")[0]] = tensor
            continue
        name, part = key[: -len(LORA_A)], key[-len(LORA_A):]
        if part not in (LORA_A, LORA_B):
            raise FormatError(f"{source}: {component} key {key!r} is not a LoRA tensor (<module>.lora_A/lora_B.weight)")
        pairs.setdefault(name, {})[part] = tensor
    if set(alphas) - set(pairs):
        raise FormatError(f"{source}: alpha {component}.{sorted(set(alphas) - set(pairs))[0]}.alpha has no LoRA module")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise FormatError(f"{source}: {component} alpha_pattern is a {type(patterns).__name__}, not a {{module: alpha}} table")
    modules = {}
    for name, p in pairs.items():
        if len(p) != 2:
            raise FormatError(f"{source}: module {component}.{name} has only one of lora_A/lora_B")
        down, up = p[LORA_A], p[LORA_B]
        alpha = patterns.get(get_pattern_key(patterns, name), config.get("lora_alpha", down.shape[0]))
        if name in alphas:
            alpha = alphas[name].float() if alphas[name].numel() == 1 else f"of shape {tuple(alphas[name].shape)}"
        try:  # a number, or a one-element tensor; not a string, None, or a tensor of several values
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise FormatError(f"{source}: module {component}.{name} has an alpha {alpha!r}; an alpha is one number") from None
        modules[key_for_module(component, name)] = LoraModule(down, up, alpha)
    return modules


def is_peft_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / c / CONFIG_NAME).is_file() for c in COMPONENTS)


def read_peft_folder(path) -> LoraWeights:
    path = Path(path)
    lora = LoraWeights()
    for component in COMPONENTS:
        folder = path / component
        if not (folder / CONFIG_NAME).is_file():
            if any((folder / n).exists() for n in (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin")):
                # adapter weights without a readable config: skipping them would drop a whole component
                raise FormatError(f"{folder}: has adapter files but no readable {CONFIG_NAME} file")
            continue
        try:
            cfg = json.loads((folder / CONFIG_NAME).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FormatError(f"{folder / CONFIG_NAME}: not a readable adapter config ({e})") from None
        if not isinstance(cfg, dict):
            raise FormatError(f"{folder / CONFIG_NAME}: holds a JSON {type(cfg).__name__}, not an adapter config object")
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            weights = folder / "adapter_model.bin"
        state, metadata = read_tensor_file(weights)
        state = {k.removeprefix(_PREFIX): t for k, t in state.items()}
        lora.modules.update(lora_modules(component, state, cfg, weights))
        lora.metadata.update(kohya_metadata_only(metadata))  # written into each adapter file: see write_peft_folder
    if not lora.modules:
        raise FormatError(f"{path}: no PEFT adapter (expected unet/ or text_encoder/ with {CONFIG_NAME})")
    return lora


def write_peft_folder(lora: LoraWeights, folder):
    """Write the adapter folders into `folder` (which must exist and be empty); tensors as they are in `lora`."""
    folder = Path(folder)
    for component in lora.components:
        sub = folder / component
        sub.mkdir(parents=True)
        lora.peft_config(component).save_pretrained(str(sub))
        state = {_PREFIX + k: t for k, t in lora.peft_state_dict(component).items()}
        # the kohya training metadata (ss_*, modelspec.*) rides in each adapter file's header, where PEFT
        # ignores it and where it stays with the weights when one adapter folder is copied alone
        metadata = {"format": "pt", **kohya_metadata_only(lora.metadata)}
        safetensors.torch.save_file(state, str(sub / WEIGHTS_NAME), metadata=metadata)
