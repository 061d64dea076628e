"""SVD merge: LoRAs of any ranks into one LoRA of a chosen rank.

Per module the weighted deltas are summed, sum_i ratio_i * alpha_i / rank_i * up_i @ down_i,
and truncated to `new_rank` (3x3 convs, seen as [out, in*9] matrices, to
`new_conv_rank`). The sum is never formed: it is the product of the
concatenated factors, whose truncated SVD `lowrank.factorize_product` computes
exactly (QR + a small SVD), so the result is the optimal rank-R approximation
at a fraction of the cost of a full SVD. Singular values go into `up` and
alpha = rank, so the file's scale is 1, as sd-scripts' svd_merge_lora writes.
"""

import logging

import torch

from lora_sd.formats import save_lora
from lora_sd.formats.metadata import lora_version, network_metadata, version_metadata
from lora_sd.io import precision_dtype
from lora_sd.outputs import LORA_FILE_SUFFIXES, check_output
from lora_sd.lora_weights import LoraWeights
from lora_sd.ops.args import check_rank, parse_ratios, resolve_device
from lora_sd.ops.lowrank import factorize_product, max_rank
from lora_sd.ops.merge import checked_pairs, common_version, gather_modules, load_loras

logger = logging.getLogger(__name__)


def svd_merge(loras, ratios, new_rank, new_conv_rank=None, device="cpu", precision=torch.float32,
              names=None) -> LoraWeights:
    """LoRAs into one LoRA of rank `new_rank` (3x3 convs: `new_conv_rank`, default `new_rank`).

    `precision` is the dtype the inputs are rounded to before merging (the
    linear algebra itself runs in float32 or wider). A module gets at most the
    rank its merged delta can have, min(sum of the input ranks, out, in*k*k):
    a larger rank would only add zero rows. Clamped modules are reported once.
    """
    new_rank = check_rank(new_rank, "--new_rank")
    new_conv_rank = check_rank(new_conv_rank if new_conv_rank is not None else new_rank, "--new_conv_rank")
    dev = resolve_device(str(device))
    ratios, names = checked_pairs(loras, ratios, names)
    version = common_version(loras, names)
    work = torch.float64 if precision == torch.float64 else torch.float32
    merged = LoraWeights(metadata=version_metadata(version))
    clamped, written = [], {False: 0, True: 0}  # written: the largest rank written, per is-3x3
    for entry in gather_modules(loras, ratios, names):
        ups = [u.to(precision).to(dev, work) for u in entry.scaled_ups(torch.float32)]
        downs = [d.to(precision).to(dev, work) for d in entry.downs(torch.float32)]
        is_conv = entry.parts[0][1].is_3x3
        wanted = new_conv_rank if is_conv else new_rank
        total = sum(d.shape[0] for d in downs)
        rank = min(wanted, total, max_rank(entry.weight_shape(ups[0].shape[0])))
        if rank < wanted:
            clamped.append((entry.key, rank))
        written[is_conv] = max(written[is_conv], rank)
        up, down = factorize_product(torch.cat(ups, dim=1), torch.cat(downs, dim=0), rank)
        merged.modules[entry.key] = entry.as_module(up.float().cpu(), down.float().cpu(), alpha=rank)
    if clamped:
        logger.warning("%d of %d module(s) clamped to a lower rank than asked for: their merged delta has no "
                       "higher rank (the sum of the input ranks, or the module's size), more would be zero rows "
                       "(e.g. %s: rank %d)", len(clamped), len(merged.modules), *clamped[0])
    # the ranks written, not the ones asked for (equal unless clamped everywhere)
    conv_rank = written[True] or None
    merged.metadata.update(network_metadata(written[False] or new_rank, written[False] or new_rank,
                                            conv_rank, conv_rank))
    return merged


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
