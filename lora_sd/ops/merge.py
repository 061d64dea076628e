"""Merge LoRAs: into a model's weights, or into one LoRA.

Into a model (what sd-scripts does too): W' = W + sum_i ratio_i * delta_i, computed in the chosen
precision, 3x3 convs included, for every kind (`LoraModule.merged`: a LoRA's delta is
up @ down * alpha / rank, LoHa's and LoKr's are LyCORIS' formulas, reshaped to the weight; a DoRA
module adds ratio * (DoRA(W) - W), ComfyUI's rule for a strength). LoRAs are applied in order.

LoRA + LoRA, two modes:
- `exact` (the default): ranks concatenated, each up_i scaled by
  ratio_i * alpha_i / rank_i, alpha = the total rank. The result's delta is
  sum_i ratio_i * delta_i for every module, whatever the ranks and alphas.
- `kohya`: sd-scripts' merge_lora.py without --concat. With base alpha = the
  first file's alpha and s_i = sqrt(alpha_i / base_alpha) * ratio_i,
  up = sum |s_i| up_i, down = sum s_i down_i, alpha = base alpha. That is not
  sum_i ratio_i * delta_i (cross terms; one LoRA at ratio r comes out at
  r * |r| * delta), but it keeps the rank. Refused when ranks or alphas differ.

LoRA + LoRA takes plain LoRAs only: a sum of LoHas, LoKrs or DoRAs is no LoRA of any rank
(`svd_merge` fits one to it).

LoRAs made for different base models (SD 1.x, 2.x, SDXL: by metadata, else by
module names) are refused; a module in only some LoRAs is merged exactly (the
others contribute nothing).
"""

import logging
import math
from pathlib import Path

import torch

from lora_sd.errors import ConfigError, ModelMismatchError
from lora_sd.formats import save_lora
from lora_sd.formats.base_model import BASE_NAMES, lora_base, same_base
from lora_sd.formats.metadata import lora_version, version_metadata
from lora_sd.io import precision_dtype
from lora_sd.outputs import LORA_FILE_SUFFIXES, check_output
from lora_sd.lora_weights import LoraModule, LoraWeights, model_module_name
from lora_sd.ops.args import check_model_config, parse_ratios
from lora_sd.ops.fit import fitted_layer
from lora_sd.ops.gather import ModuleParts, checked_pairs, common_version, first_module, gather_modules, load_loras

__all__ = ["check_model_version", "checked_pairs", "load_loras", "merge_into_model_file", "merge_into_models",
           "merge_lora_files", "merge_loras", "model_parts"]

logger = logging.getLogger(__name__)

MODES = ("exact", "kohya")
VERSION_NAMES = BASE_NAMES  # for messages about models as well


def model_parts(model) -> dict:
    """{'unet': ..., 'text_encoder': ..., 'text_encoder_2': ... (SDXL only)}: the parts LoRAs adapt."""
    parts = {"unet": model.unet, "text_encoder": model.text_encoder}
    if getattr(model, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = model.text_encoder_2
    return parts


def check_model_version(lora, name, model_version):
    """ModelMismatchError when a LoRA is for another base model than the model's (metadata, else module names)."""
    version = lora_base(lora)
    if not same_base(version, model_version):
        raise ModelMismatchError(
            f"{name} is a LoRA for {BASE_NAMES.get(version, version)} but the model is "
            f"{BASE_NAMES.get(model_version, model_version)}: LoRAs do not carry over between them"
        )


# --- LoRA + LoRA --------------------------------------------------------------------


def merge_loras(loras, ratios, mode="exact", names=None, precision=torch.float32) -> LoraWeights:
    """Merge LoRAs into one LoRA ('exact' concatenates ranks; 'kohya' is sd-scripts' weighted sum).

    The factors are converted to `precision` and scaled and summed in it (sd-scripts' merge_dtype).
    """
    if mode not in MODES:
        raise ConfigError(f"merge mode must be one of {MODES}, got {mode!r}")
    ratios, names = checked_pairs(loras, ratios, names)
    _refuse_other_kinds(loras, names)
    version = common_version(loras, names)
    merged = LoraWeights(metadata={"ss_network_module": "networks.lora", **version_metadata(version)})
    merge = _merge_exact if mode == "exact" else _merge_kohya
    for entry in gather_modules(loras, ratios, names):
        merged.modules[entry.key] = merge(entry, precision)
    return merged.with_one_alpha() if mode == "exact" else merged  # exact: alpha = each module's total rank


def _refuse_other_kinds(loras, names):
    """ConfigError naming the first LoHa / LoKr / DoRA module: their sum is no LoRA (nor LoHa, LoKr, DoRA)."""
    found = first_module(loras, names, lambda m: m.kind != "lora" or m.dora_scale is not None)
    if found is None:
        return
    name, key, m = found
    if m.dora_scale is not None:
        where = ("merge it into a model (merge_lora.py --sd_model): its change depends on the model's weight, "
                 "so no LoRA file can hold it")
    else:
        where = "use svd_merge_lora.py, which merges LoRAs of any kinds into a plain LoRA of a chosen rank"
    raise ConfigError(f"{name}: module {key} is a {m.label}; merging into one LoRA takes plain LoRAs only: "
                      f"{where}")


def _merge_exact(entry: ModuleParts, precision) -> LoraModule:
    up = torch.cat(entry.scaled_ups(precision), dim=1)  # [out, sum rank_i]
    down = torch.cat(entry.downs(precision), dim=0)  # [sum rank_i, in*k*k]
    return entry.as_module(up, down, alpha=down.shape[0])  # scale 1: the ratios are in `up`


def _merge_kohya(entry: ModuleParts, precision) -> LoraModule:
    _, first, first_name = entry.parts[0]
    for _, m, name in entry.parts[1:]:
        if m.rank != first.rank or m.alpha != first.alpha:
            raise ConfigError(
                f"module {entry.key}: {first_name} has rank {first.rank}, alpha {first.alpha:g} but {name} "
                f"has rank {m.rank}, alpha {m.alpha:g}; --concat false (sd-scripts' sum) needs equal ranks and "
                "alphas: use the exact merge (--concat true) or svd_merge_lora.py to get one rank"
            )
    base_alpha = first.alpha
    up = torch.zeros_like(first.up, dtype=precision)
    down = torch.zeros_like(first.down, dtype=precision)
    for ratio, m, _ in entry.parts:
        s = math.sqrt(m.alpha / base_alpha) * ratio
        up += abs(s) * m.up.to(precision).reshape(up.shape)
        down += s * m.down.to(precision).reshape(down.shape)
    return LoraModule(down, up, base_alpha)


# --- into a model --------------------------------------------------------------------


def merge_into_models(loras, ratios, models: dict, precision=torch.float32, names=None, model_version=None,
                      save_dtype=None):
    """Add each LoRA's delta times its ratio to the weights of `models` (`model_parts`: unet, text encoder(s)).

    Every kind merges (`LoraModule.merged`; DoRA as ComfyUI applies a strength),
    flattened LoHa/LoKr convs reshaped to the weight. Every module of every
    LoRA is checked to exist and fit (its tensors, kernel and DoRA magnitude)
    before any weight changes; the first that does not is a ModelMismatchError
    naming the file and the module. The sum is computed in `precision` and
    stored in each weight's own dtype. A sum that is not finite there (or in
    `save_dtype`, the dtype the caller will save in: fp16 overflows above
    65504) is a ConfigError naming the module; the models are then partly
    merged (the recipes discard them, nothing is written). Returns the number
    of weights changed.
    """
    ratios, names = checked_pairs(loras, ratios, names)
    plan = []  # (layer, ratio, module, file name, key) for every module, checked first
    for lora, ratio, name in zip(loras, ratios, names, strict=True):
        check_model_version(lora, name, model_version)
        for component in lora.components:
            model = models.get(component)
            if model is None:
                raise ModelMismatchError(f"{name}: has {component} modules but the model has no {component}")
            named = dict(model.named_modules())
            for path, m in lora.component(component).items():
                key = f"{component}.{path}"
                try:
                    layer = fitted_layer(named.get(model_module_name(component, path, model)), m, key)
                except ModelMismatchError as e:
                    raise ModelMismatchError(f"{name}: {e}") from None
                plan.append((layer, ratio, m, name, key))
    with torch.no_grad():
        for layer, ratio, m, name, key in plan:
            weight = layer.weight
            merged = m.merged(weight, ratio, precision).to(weight.dtype)
            _check_finite_merge(merged, save_dtype, name, key, ratio, precision)
            weight.copy_(merged)
    return len({id(plan_item[0]) for plan_item in plan})


def _check_finite_merge(merged, save_dtype, name, key, ratio, precision):
    """A merged weight with NaN/inf (a huge ratio, or an fp16 overflow) would be written as a broken model."""
    for dtype in (merged.dtype, save_dtype):
        if dtype is not None and not torch.isfinite(merged.to(dtype)).all():
            raise ConfigError(
                f"{name}: merging module {key} at ratio {ratio:g} gives weights that are not finite in {dtype} "
                f"(computed in {precision}); use a smaller ratio, or float for --precision / --save_precision. "
                "Nothing was written"
            )


# --- files ---------------------------------------------------------------------------


def merge_lora_files(models, ratios, save_to, concat=True, save_precision=None, precision="float"):
    """merge_lora.py without --sd_model: LoRA files into one kohya LoRA file at `save_to`.

    Merged in `precision`, saved in `save_precision` (default: `precision`).
    """
    ratios = parse_ratios(models, ratios)
    merge_dtype = precision_dtype(precision, "--precision")
    save_precision = save_precision or precision
    precision_dtype(save_precision, "--save_precision")
    check_output(save_to, models, file_suffixes=LORA_FILE_SUFFIXES)
    loras, names = load_loras(models)
    merged = merge_loras(loras, ratios, "exact" if concat else "kohya", names, merge_dtype)
    save_lora(merged, save_to, save_precision=save_precision, version=lora_version(merged.metadata) or "sd1")
    logger.info("wrote %s: %d modules (%s merge)", save_to, len(merged.modules), "exact" if concat else "kohya")
    return merged


def merge_into_model_file(sd_model, save_to, models, ratios, v2=False, precision="float", save_precision=None,
                          model_config=None):
    """merge_lora.py with --sd_model: LoRA files merged into a model, saved as a single file or a folder.

    `save_to` with a single-file suffix (.safetensors, .ckpt, ...) is written in
    the original layout, keeping the other keys of a single-file `sd_model`;
    anything else becomes a diffusers folder. Nothing is written on error.
    """
    from lora_sd.models import load_base, save_diffusers, save_single_file
    from lora_sd.models.load import SINGLE_FILE_SUFFIXES

    ratios = parse_ratios(models, ratios)
    merge_dtype = precision_dtype(precision, "--precision")
    save_precision = save_precision or precision
    precision_dtype(save_precision, "--save_precision")  # a bad value is refused before any work
    single_file = str(save_to).lower().endswith(SINGLE_FILE_SUFFIXES)
    check_model_config([sd_model], model_config)
    check_output(save_to, [sd_model, *models, model_config], file_suffixes=SINGLE_FILE_SUFFIXES if single_file else None)
    if Path(save_to).is_dir() and (single_file or not (Path(save_to) / "model_index.json").is_file()):
        # a diffusers folder replaces the one there: never a folder that is not a model
        raise ConfigError(f"--save_to {save_to}: an existing folder that is not a diffusers model; give a new name")
    loras, names = load_loras(models)
    model = load_base(sd_model, v2=v2, model_config=model_config)
    merge_into_models(loras, ratios, model_parts(model), merge_dtype, names, model_version=model.version,
                      save_dtype=precision_dtype(save_precision))
    for name, ratio in zip(names, ratios, strict=True):
        logger.info("merged %s at ratio %g", name, ratio)
    if single_file:
        original = model.source if model.source_format == "single_file" else None
        save_single_file(model, save_to, save_precision=save_precision, original_state_dict=original)
    else:
        save_diffusers(model, save_to, save_precision)
    logger.info("wrote %s", save_to)
    return model
