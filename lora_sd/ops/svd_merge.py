"""SVD merge: LoRAs of any ranks and kinds (LoRA, LoCon, LoHa, LoKr) into one plain LoRA of a chosen rank.

Per module the weighted deltas are summed, sum_i ratio_i * delta_i, and
truncated to `new_rank` (3x3 convs, seen as [out, in*9] matrices, to
`new_conv_rank`): the optimal rank-R approximation (Eckart-Young). When every
input of a module is a plain LoRA the sum is never formed: it is the product
of the concatenated factors, whose truncated SVD `lowrank.factorize_product`
computes exactly (QR + a small SVD) at a fraction of the cost. LoHa and LoKr
deltas are products of thin factors too (`adapter_math.delta_factors`: LoHa's
inner size is r1 * r2), used the same way while their inner sizes add up to
less than the module's size; otherwise the summed delta is formed and given a
full SVD (`lowrank.svd_factors`), as sd-scripts does for every module.
Singular values go into `up` and each module's scale is 1, as sd-scripts'
svd_merge_lora writes, under one alpha per file (`LoraWeights.with_one_alpha`). DoRA is refused: its change depends on the
base model's weight, which a LoRA file does not have.
"""

import logging

import torch

from lora_sd import adapter_math
from lora_sd.errors import ConfigError
from lora_sd.formats import save_lora
from lora_sd.formats.metadata import lora_version, network_metadata, version_metadata
from lora_sd.io import precision_dtype
from lora_sd.outputs import LORA_FILE_SUFFIXES, check_output
from lora_sd.lora_weights import LoraWeights
from lora_sd.ops.args import check_rank, parse_ratios, resolve_device
from lora_sd.ops.gather import ModuleParts, checked_pairs, common_version, first_module, gather_modules, load_loras
from lora_sd.ops.lowrank import factorize_product, max_rank, svd_factors

logger = logging.getLogger(__name__)


def svd_merge(loras, ratios, new_rank, new_conv_rank=None, device="cpu", precision=torch.float32,
              names=None) -> LoraWeights:
    """LoRAs into one LoRA of rank `new_rank` (3x3 convs: `new_conv_rank`, default `new_rank`).

    `precision` is the dtype the inputs are rounded to before merging (the
    linear algebra itself runs in float32 or wider). A module gets at most the
    rank its merged delta can have (plain LoRAs: min(sum of the input ranks,
    out, in*k*k); with a LoHa/LoKr: the sum of their factors' inner sizes, or
    the numerical rank of the summed delta): a larger rank would
    only add zero rows. Clamped modules are reported once. DoRA is refused
    (ConfigError naming the file and module), and so is a flattened LoHa/LoKr
    3x3 conv whose kernel nothing gives.
    """
    new_rank = check_rank(new_rank, "--new_rank")
    new_conv_rank = check_rank(new_conv_rank if new_conv_rank is not None else new_rank, "--new_conv_rank")
    dev = resolve_device(str(device))
    ratios, names = checked_pairs(loras, ratios, names)
    _refuse_dora(loras, names)
    version = common_version(loras, names)
    work = torch.float64 if precision == torch.float64 else torch.float32
    merged = LoraWeights(metadata=version_metadata(version))
    clamped, written = [], {False: 0, True: 0}  # written: the largest rank written, per is-3x3
    for entry in gather_modules(loras, ratios, names):
        if entry.shape is None:
            raise ConfigError(f"module {entry.key}: a 3x3 conv whose {entry.parts[0][1].label} tensors are "
                              "flattened ([out, in*k*k]) and no input gives its kernel size: the merged LoRA cannot "
                              "be shaped for it; set the module's `shape` (the file readers do)")
        is_conv = len(entry.shape) == 4 and entry.shape[2:] != (1, 1)
        wanted = new_conv_rank if is_conv else new_rank
        if entry.all_lora:
            up, down = _lora_product_svd(entry, wanted, precision, dev, work)
        else:
            up, down = _any_kind_svd(entry, wanted, precision, dev, work)
        rank = up.shape[1]
        if rank < wanted:
            clamped.append((entry.key, rank))
        written[is_conv] = max(written[is_conv], rank)
        merged.modules[entry.key] = entry.as_module(up.float().cpu(), down.float().cpu(), alpha=rank)
    if clamped:
        logger.warning("%d of %d module(s) clamped to a lower rank than asked for: their merged delta has no "
                       "higher rank (the sum of the input ranks, or the module's size), more would be zero rows "
                       "(e.g. %s: rank %d)", len(clamped), len(merged.modules), *clamped[0])
    merged = merged.with_one_alpha()  # each module's scale 1 kept in its up weights
    alpha = next(iter(merged.modules.values())).alpha
    # the ranks written, not the ones asked for (equal unless clamped everywhere)
    conv_rank = written[True] or None
    merged.metadata.update(network_metadata(written[False] or new_rank, alpha, conv_rank, alpha if conv_rank else None))
    return merged


def _refuse_dora(loras, names):
    found = first_module(loras, names, lambda m: m.dora_scale is not None)
    if found is not None:
        name, key, m = found
        raise ConfigError(f"{name}: module {key} is a {m.label}: its change depends on the base model's "
                          "weight, so no plain LoRA holds it; merge it into a model instead (merge_lora.py --sd_model)")


def _lora_product_svd(entry: ModuleParts, rank, precision, dev, work):
    """Plain LoRAs only: the exact truncated SVD of the concatenated factors (rank <= the sum of their ranks)."""
    ups = [u.to(precision).to(dev, work) for u in entry.scaled_ups(torch.float32)]
    downs = [d.to(precision).to(dev, work) for d in entry.downs(torch.float32)]
    return factorize_product(torch.cat(ups, dim=1), torch.cat(downs, dim=0), min(rank, max_rank(entry.shape)))


def _any_kind_svd(entry: ModuleParts, rank, precision, dev, work):
    """A module with a LoHa/LoKr: every part as thin factors (`adapter_math.delta_factors`, tensors rounded to
    `precision`); when their inner sizes add up to less than the module's size, the exact truncated SVD of their
    product (cheap), else the full SVD of the summed delta (as sd-scripts does every module)."""
    ups, downs = [], []
    for ratio, m, _ in entry.parts:
        tensors = {n: t.to(precision).to(dev, work) for n, t in m.named_tensors().items()}
        up, down = adapter_math.delta_factors(m.kind, tensors, m.alpha)
        ups.append(up * ratio)
        downs.append(down)
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    if up.shape[1] < max_rank(entry.shape):
        return factorize_product(up, down, min(rank, max_rank(entry.shape)))
    return svd_factors(up @ down, rank)


def svd_merge_files(models, ratios, save_to, new_rank, new_conv_rank=None, device="cpu", precision="float",
                    save_precision="float"):
    """svd_merge_lora.py: LoRA files into one kohya LoRA file of rank `new_rank` at `save_to`."""
    ratios = parse_ratios(models, ratios)
    check_rank(new_rank, "--new_rank")
    if new_conv_rank is not None:
        check_rank(new_conv_rank, "--new_conv_rank")
    resolve_device(device)
    dtype = precision_dtype(precision, "--precision")
    precision_dtype(save_precision, "--save_precision")
    check_output(save_to, models, file_suffixes=LORA_FILE_SUFFIXES)
    loras, names = load_loras(models)
    merged = svd_merge(loras, ratios, new_rank, new_conv_rank, device, dtype, names)
    save_lora(merged, save_to, save_precision=save_precision, version=lora_version(merged.metadata) or "sd1")
    logger.info("wrote %s: %d modules at rank %s", save_to, len(merged.modules), merged.metadata["ss_network_dim"])
    return merged
