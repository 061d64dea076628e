"""Extract a LoRA from two models: the truncated SVD of tuned - original, per module.

The modules are those sd-scripts' networks.lora adapts (`lora_sd.targets`):
Linear and 1x1 convs of the U-Net's transformer blocks and of the text
encoder's attention and MLP at rank `dim`; with `conv_dim` also the resnet and
sampler convs (3x3 at `conv_dim`, their Linear/1x1 at `dim`). A text encoder
is left out when no weight of it differs by more than `min_diff` (sd-scripts' rule);
models of which no weight differs by more than that are refused.
Singular values go into `up` with scale 1 per module, as sd-scripts writes, under one alpha per file
(`LoraWeights.with_one_alpha`: conv_dim and clamped modules keep their scale in `up`).
"""

import logging
import math

import torch

from lora_sd.errors import ConfigError, ModelMismatchError
from lora_sd.formats import save_lora
from lora_sd.formats.metadata import network_metadata, version_metadata
from lora_sd.io import precision_dtype
from lora_sd.outputs import LORA_FILE_SUFFIXES, check_output
from lora_sd.lora_weights import LoraModule, LoraWeights, key_for_module
from lora_sd.ops.lowrank import as_matrix, max_rank, to_lora_shapes, truncated_svd
from lora_sd.ops.args import check_model_config, check_rank, resolve_device
from lora_sd.ops.merge import VERSION_NAMES, model_parts
from lora_sd.targets import target_modules

logger = logging.getLogger(__name__)


def _target_weights(component, org, tuned, with_conv):
    """[(module name, is_3x3, original weight, tuned weight)] for sd-scripts' targets of a component."""
    targets = target_modules(component, org, with_conv)
    tuned_modules = dict(tuned.named_modules())
    org_modules = dict(org.named_modules())
    found = []
    for name, is_conv in targets.items():
        w_org = org_modules[name].weight
        other = tuned_modules.get(name)
        if other is None or not hasattr(other, "weight"):
            raise ModelMismatchError(f"--model_tuned has no module {component}.{name}: the two models differ in structure")
        if other.weight.shape != w_org.shape:
            raise ModelMismatchError(
                f"{component}.{name}: --model_org has shape {tuple(w_org.shape)}, --model_tuned "
                f"{tuple(other.weight.shape)}: the two models are not the same architecture"
            )
        found.append((name, is_conv, w_org, other.weight))
    return found


def max_difference(pairs, device) -> float:
    """The largest |tuned - original| over the given weight pairs."""
    biggest = 0.0
    with torch.no_grad():
        for _, _, w_org, w_tuned in pairs:
            diff = w_tuned.to(device, torch.float32) - w_org.to(device, torch.float32)
            biggest = max(biggest, diff.abs().max().item())
    return biggest


def check_min_diff(min_diff):
    if not (isinstance(min_diff, (int, float)) and math.isfinite(min_diff) and min_diff >= 0):
        raise ConfigError(f"--min_diff: must be a number >= 0, got {min_diff!r}")


TEXT_ENCODERS = {"text_encoder": "text encoder", "text_encoder_2": "text encoder 2"}


def _differing_components(org, tuned, with_conv, min_diff, device, names):
    """{component: weight pairs} of the components to extract, by sd-scripts' rule and ours:

    a text encoder only when a weight differs by more than `min_diff` (sd-scripts; SDXL's two
    each on its own); the U-Net unless it does not differ at all. When no weight of any differs
    by more than `min_diff` the LoRA would be all zeros (or noise): a ConfigError naming both models.
    """
    found, biggest = {}, {}
    for component in (*TEXT_ENCODERS, "unet"):
        if org.get(component) is None or tuned.get(component) is None:
            continue
        pairs = _target_weights(component, org[component], tuned[component], with_conv)
        biggest[component] = max_difference(pairs, device)
        found[component] = pairs
    if found and max(biggest.values()) <= min_diff:
        raise ConfigError(
            f"the models do not differ: no weight of {names[1]} differs from {names[0]} by more than "
            f"--min_diff {min_diff:g} (largest difference {max(biggest.values()):.3g}); nothing to extract "
            "(lower --min_diff to extract smaller differences)"
        )
    for component, what in TEXT_ENCODERS.items():
        te = biggest.get(component)
        if te is None:
            continue
        if te <= min_diff:
            logger.info("%s: largest weight difference %.3g is not above --min_diff %g: "
                        "the %s is left out of the LoRA", what, te, min_diff, what)
            del found[component]
        else:
            logger.info("%s: largest weight difference %.3g: extracting it", what, te)
    if biggest.get("unet") == 0:
        logger.info("U-Net: no weight differs: the U-Net is left out of the LoRA")
        del found["unet"]
    return found


def extract_lora(org: dict, tuned: dict, dim, conv_dim=None, min_diff=0.01, device="cpu", method="auto",
                 progress=None, names=("the original model", "the tuned model")) -> LoraWeights:
    """A LoRA whose deltas approximate tuned - org, from {'unet': ..., 'text_encoder': ...[, 'text_encoder_2']}.

    `dim` / `conv_dim`: ranks of Linear-and-1x1 / 3x3 modules (clamped to what
    each module allows, reported). `method`: 'auto' | 'full' | 'randomized'
    (see `lowrank.truncated_svd`). `progress(name)` is called per module.
    `names` (original, tuned) name the models in messages. Models that do not
    differ are refused (see `_differing_components`).
    """
    dim = check_rank(dim, "--dim")
    if conv_dim is not None:
        conv_dim = check_rank(conv_dim, "--conv_dim")
    check_min_diff(min_diff)
    dev = resolve_device(str(device))
    lora = LoraWeights(metadata=network_metadata(dim, dim, conv_dim, conv_dim))
    clamped = []
    for component, pairs in _differing_components(org, tuned, conv_dim is not None, min_diff, dev, names).items():
        for name, is_conv, w_org, w_tuned in pairs:
            wanted = conv_dim if is_conv else dim
            rank = min(wanted, max_rank(w_org.shape))
            if rank < wanted:
                clamped.append((f"{component}.{name}", rank))
            with torch.no_grad():
                diff = w_tuned.to(dev, torch.float32) - w_org.to(dev, torch.float32)
                up, down = truncated_svd(as_matrix(diff), rank, method)
            down, up = to_lora_shapes(up.cpu(), down.cpu(), tuple(w_org.shape))
            lora.modules[key_for_module(component, name)] = LoraModule(down, up, float(rank))
            if progress is not None:
                progress(name)
    if clamped:
        logger.warning("%d module(s) allow less than the rank asked for and were clamped (e.g. %s to rank %d)",
                       len(clamped), *clamped[0])
    if not lora.modules:
        raise ConfigError("nothing to extract: the models have no target modules")
    lora = lora.with_one_alpha()  # conv_dim and clamped modules would carry other alphas (scale 1 each)
    alpha = next(iter(lora.modules.values())).alpha
    lora.metadata.update(network_metadata(dim, alpha, conv_dim, alpha if conv_dim is not None else None))
    return lora


def extract_lora_files(model_org, model_tuned, save_to, dim, conv_dim=None, v2=False, device="cpu",
                       save_precision="float", min_diff=0.01, model_config=None):
    """extract_lora_from_models.py: two model files/folders -> a kohya LoRA file at `save_to`."""
    from lora_sd.models import load_base

    check_rank(dim, "--dim")
    if conv_dim is not None:
        check_rank(conv_dim, "--conv_dim")
    check_min_diff(min_diff)
    resolve_device(device)
    precision_dtype(save_precision, "--save_precision")
    check_model_config([model_org, model_tuned], model_config)
    check_output(save_to, [model_org, model_tuned, model_config], file_suffixes=LORA_FILE_SUFFIXES)
    org = load_base(model_org, v2=v2, model_config=model_config)
    tuned = load_base(model_tuned, v2=v2, model_config=model_config)
    if org.version != tuned.version:
        raise ModelMismatchError(f"--model_org is {VERSION_NAMES[org.version]} but --model_tuned is "
                                 f"{VERSION_NAMES[tuned.version]}: not two versions of one model")
    lora = extract_lora(model_parts(org), model_parts(tuned), dim, conv_dim, min_diff, device,
                        names=(f"--model_org {model_org}", f"--model_tuned {model_tuned}"))
    lora.metadata.update(version_metadata(org.version))
    save_lora(lora, save_to, save_precision=save_precision, version=org.version,
              v_parameterization=org.v_parameterization)
    logger.info("wrote %s: %d modules (%s)", save_to, len(lora.modules), ", ".join(lora.components))
    return lora
