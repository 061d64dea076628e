"""Merge LoRAs: into a model's weights, or into one LoRA.

Into a model (what sd-scripts does too): W' = W + sum_i ratio_i * up_i @ down_i * alpha_i / rank_i,
computed in the chosen precision, 3x3 convs included.

LoRA + LoRA, two modes:
- `exact` (the default): ranks concatenated, each up_i scaled by
  ratio_i * alpha_i / rank_i, alpha = the total rank. The result's delta is
  sum_i ratio_i * delta_i for every module, whatever the ranks and alphas.
- `kohya`: sd-scripts' merge_lora.py without --concat. With base alpha = the
  first file's alpha and s_i = sqrt(alpha_i / base_alpha) * ratio_i,
  up = sum |s_i| up_i, down = sum s_i down_i, alpha = base alpha. That is not
  sum_i ratio_i * delta_i (cross terms; one LoRA at ratio r comes out at
  r * |r| * delta), but it keeps the rank. Refused when ranks or alphas differ.

LoRAs made for different base models (SD 1.x, 2.x, SDXL: by metadata, else by
module names) are refused; a module in only some LoRAs is merged exactly (the
others contribute nothing).
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_sd.errors import ConfigError, ModelMismatchError
from lora_sd.formats import load_lora, save_lora
from lora_sd.formats.base_model import BASE_NAMES, lora_base, same_base
from lora_sd.formats.metadata import lora_version, version_metadata
from lora_sd.io import precision_dtype
from lora_sd.outputs import LORA_FILE_SUFFIXES, check_output
from lora_sd.lora_weights import LoraModule, LoraWeights, fit_to_layer, model_module_name
from lora_sd.ops.args import check_model_config, check_pairs, parse_ratios
from lora_sd.ops.lowrank import to_lora_shapes

logger = logging.getLogger(__name__)

MODES = ("exact", "kohya")
VERSION_NAMES = BASE_NAMES  # for messages about models as well


def lora_names(loras, names=None) -> list[str]:
    """The names messages use for `loras`: the given ones (file paths) or "LoRA #1", "LoRA #2", ..."""
    if not names:
        return [f"LoRA #{i + 1}" for i in range(len(loras))]
    check_pairs(names, loras, "names", "LoRA")
    return list(names)


def checked_pairs(loras, ratios, names, option="ratios"):
    """(ratios, names) for `loras`, one each (ConfigError naming the counts otherwise)."""
    check_pairs(ratios, loras, option, "LoRA")
    return list(ratios), lora_names(loras, names)


def load_loras(paths) -> tuple[list[LoraWeights], list[str]]:
    """(the LoRA files read, their paths as names for messages). Modules that change nothing are reported."""
    loras = [load_lora(p) for p in paths]
    for lora, path in zip(loras, paths, strict=True):
        _report_idle_modules(lora, path)
    return loras, [str(p) for p in paths]


def _report_idle_modules(lora: LoraWeights, name):
    """A warning for modules whose delta is zero (alpha 0, or all-zero up weights: an untrained or broken LoRA):
    merged or applied they do nothing, which would otherwise pass without a word."""
    alpha0 = [k for k, m in lora.modules.items() if m.alpha == 0]
    zero_up = [k for k, m in lora.modules.items() if m.alpha != 0 and not m.up.any()]
    for keys, why in ((alpha0, "alpha 0: scale alpha / rank = 0, as in sd-scripts' merge, ComfyUI and "
                       "AUTOMATIC1111"), (zero_up, "all-zero up weights (untrained?)")):
        if keys:
            logger.warning("%s: %d of %d module(s) change nothing (%s), e.g. %s",
                           name, len(keys), len(lora.modules), why, keys[0])


def common_version(loras, names) -> str | None:
    """The base-model version all LoRAs agree on ('sd1', 'sd2', 'sdxl'; None if none says); ConfigError
    naming two files if they differ. A LoRA without metadata counts by its module names (`lora_base`)."""
    seen = {}
    for lora, name in zip(loras, names, strict=True):
        version = lora_base(lora)
        if version is not None:
            seen.setdefault(version, name)
    for (v1, n1) in seen.items():
        for (v2, n2) in seen.items():
            if not same_base(v1, v2):
                raise ConfigError(f"{n1} is a LoRA for {BASE_NAMES[v1]} but {n2} is for {BASE_NAMES[v2]}: "
                                  "LoRAs for different base models cannot be merged")
    return next((v for v in seen if v != "sd"), None)


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


@dataclass
class ModuleParts:
    """One module as found in several LoRAs: [(ratio, module, file name)], 2-D views checked to agree."""

    key: str
    parts: list

    @property
    def shape(self) -> tuple:
        """The first LoRA's down shape minus the rank: (in,) or (in, k, k)."""
        return tuple(self.parts[0][1].down.shape[1:])

    def downs(self, dtype=torch.float32):
        return [m.down.to(dtype).flatten(1) for _, m, _ in self.parts]  # [rank_i, in*k*k]

    def scaled_ups(self, dtype=torch.float32):
        return [m.up.to(dtype).flatten(1) * (r * m.scale) for r, m, _ in self.parts]  # [out, rank_i]

    def weight_shape(self, out_dim):
        return (out_dim, *self.shape)

    def as_module(self, up_2d, down_2d, alpha) -> LoraModule:
        """A LoraModule from 2-D factors, shaped as this module's first LoRA has it."""
        down, up = to_lora_shapes(up_2d, down_2d, self.weight_shape(up_2d.shape[0]))
        return LoraModule(down, up, float(alpha))


def gather_modules(loras, ratios, names) -> list[ModuleParts]:
    """Every module key of the LoRAs, in order of first appearance, with the LoRAs that have it.

    Shapes are checked across LoRAs (a 1x1 conv and a Linear of the same size
    agree, as SD 2 files have either); a mismatch is a ConfigError naming the
    module and both files. Modules or components found in only some LoRAs
    are reported.
    """
    ratios, names = checked_pairs(loras, ratios, names)
    gathered: dict[str, ModuleParts] = {}
    for lora, ratio, name in zip(loras, ratios, names, strict=True):
        for key, m in lora.modules.items():
            entry = gathered.get(key)
            if entry is None:
                gathered[key] = ModuleParts(key, [(ratio, m, name)])
                continue
            _, first, first_name = entry.parts[0]
            if _flat_shape(m) != _flat_shape(first):
                raise ConfigError(
                    f"module {key}: {first_name} has {_describe(first)} but {name} has {_describe(m)}: "
                    "these LoRAs are for different models (SD 1.x and 2.x?) and cannot be merged"
                )
            entry.parts.append((ratio, m, name))
    _report_partial(gathered, loras, names)
    return list(gathered.values())


def _flat_shape(m: LoraModule):
    return m.up.shape[0], m.down[0].numel(), tuple(m.down.shape[2:]) if m.is_3x3 else ()


def _describe(m: LoraModule):
    return f"down {tuple(m.down.shape)}, up {tuple(m.up.shape)}"


def _report_partial(gathered, loras, names):
    for component in {c for lora in loras for c in lora.components}:
        missing = [n for lora, n in zip(loras, names, strict=True) if component not in lora.components]
        if missing:
            logger.info("%s has no %s modules: the %s is merged from the other LoRAs only",
                        ", ".join(missing), component, component)
    partial = [e.key for e in gathered.values() if len(e.parts) < len(loras)]
    if partial:
        logger.info("%d module(s) are in only some of the LoRAs (e.g. %s): merged from those", len(partial), partial[0])


# --- LoRA + LoRA --------------------------------------------------------------------


def merge_loras(loras, ratios, mode="exact", names=None, precision=torch.float32) -> LoraWeights:
    """Merge LoRAs into one LoRA ('exact' concatenates ranks; 'kohya' is sd-scripts' weighted sum).

    The factors are converted to `precision` and scaled and summed in it (sd-scripts' merge_dtype).
    """
    if mode not in MODES:
        raise ConfigError(f"merge mode must be one of {MODES}, got {mode!r}")
    ratios, names = checked_pairs(loras, ratios, names)
    version = common_version(loras, names)
    merged = LoraWeights(metadata={"ss_network_module": "networks.lora", **version_metadata(version)})
    merge = _merge_exact if mode == "exact" else _merge_kohya
    for entry in gather_modules(loras, ratios, names):
        merged.modules[entry.key] = merge(entry, precision)
    return merged


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

    Every module of every LoRA is checked to exist and fit before any weight
    changes; the first that does not is a ModelMismatchError naming the file
    and the module. The sum is computed in `precision` and stored in each
    weight's own dtype. A sum that is not finite there (or in `save_dtype`, the
    dtype the caller will save in: fp16 overflows above 65504) is a ConfigError
    naming the module; the models are then partly merged (the recipes discard
    them, nothing is written). Returns the number of weights changed.
    """
    ratios, names = checked_pairs(loras, ratios, names)
    plan = []  # (layer, ratio, LoraModule shaped for the layer) for every module, checked first
    for lora, ratio, name in zip(loras, ratios, names, strict=True):
        check_model_version(lora, name, model_version)
        for component in lora.components:
            model = models.get(component)
            if model is None:
                raise ModelMismatchError(f"{name}: has {component} modules but the model has no {component}")
            named = dict(model.named_modules())
            for path, m in lora.component(component).items():
                try:
                    layer, fitted = fit_to_layer(named.get(model_module_name(component, path, model)), m,
                                                 f"{component}.{path}")
                except ModelMismatchError as e:
                    raise ModelMismatchError(f"{name}: {e}") from None
                plan.append((layer, ratio, fitted, name, f"{component}.{path}"))
    with torch.no_grad():
        for layer, ratio, m, name, key in plan:
            weight = layer.weight
            merged = (weight.to(precision) + ratio * m.delta(precision)).to(weight.dtype)
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
