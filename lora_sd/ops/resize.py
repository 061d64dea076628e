"""Resize a LoRA to a lower rank (sd-scripts' networks/resize_lora.py): per module, the best fit of its delta.

Each module's delta is factorized by an exact SVD of its thin factors (`lowrank.product_svd`: QR of the
factors and a small SVD, never the full delta while its rank is below the weight's) and truncated to
`new_rank` (3x3 convs: `new_conv_rank`), the optimum of the Eckart-Young theorem, or to the rank a
dynamic method gives (capped at `new_rank`), as sd-scripts defines them on the singular values S:
- `sv_ratio` p (>= 1): keep the singular values above S[0] / p;
- `sv_fro` p (in (0, 1]): the fewest that keep a fraction p of the Frobenius norm (cumulative S^2 >= p^2);
- `sv_cumulative` p (in (0, 1]): the fewest whose sum is a fraction p of the sum of S.
The delta is preserved, scale included: the singular values go into `up`, and every module gets one
alpha, sd-scripts' alpha for a module resized to `new_rank`: alpha = scale * new_rank, with the input's
most common scale alpha / rank (LoHa/LoKr: 1). sd-scripts writes alpha = scale * rank per module instead,
which diffusers (0.42.1) misreads: `_get_alpha_name` misnames the alphas of attention projections (U-Net
to_q/k/v/out, text-encoder q/k/v/out_proj), which then get the file's most common alpha, so a dynamic
resize loaded there would be wrong; a module whose rank or scale differs carries the difference in `up`
instead. LoHa and LoKr become plain LoRAs, the best rank-R fit of their delta. DoRA is refused: its
change depends on the base weight, which the file does not have. A module never gets more than its
delta's rank (a larger one would add zero rows).
"""

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass

import torch

from lora_sd import adapter_math
from lora_sd.errors import ConfigError, ModelMismatchError
from lora_sd.formats import load_lora, save_lora
from lora_sd.formats.metadata import lora_version, network_metadata
from lora_sd.io import precision_dtype
from lora_sd.lora_weights import LoraModule, LoraWeights
from lora_sd.ops.args import check_rank, resolve_device
from lora_sd.ops.fit import weight_shape
from lora_sd.ops.lowrank import numerical_rank, product_svd, to_lora_shapes
from lora_sd.outputs import LORA_FILE_SUFFIXES, check_output

logger = logging.getLogger(__name__)

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # sd-scripts: a delta whose largest singular value is below this is a zero matrix (rank 1)
NETWORK_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


@dataclass
class ModuleResize:
    """What resizing did to one module (sd-scripts' --verbose figures)."""

    key: str
    old_rank: int | None
    new_rank: int
    alpha: float
    is_3x3: bool
    fro_retained: float  # ||S[:r]|| / ||S||
    sum_retained: float  # sum(S[:r]) / sum(S)
    max_ratio: float  # S[0] / S[r - 1]


def check_dynamic(method, param):
    """(method, param) checked: ConfigError naming the option when the method is unknown, the param is
    missing or out of its method's range, or a param is given without a method (it would do nothing)."""
    if method is None:
        if param is not None:
            raise ConfigError(f"--dynamic_param {param}: only used with --dynamic_method "
                              f"({', '.join(DYNAMIC_METHODS)})")
        return None, None
    if method not in DYNAMIC_METHODS:
        raise ConfigError(f"--dynamic_method {method}: must be one of {', '.join(DYNAMIC_METHODS)}")
    if param is None or not math.isfinite(param):
        raise ConfigError(f"--dynamic_param: a number is needed with --dynamic_method {method}")
    if method == "sv_ratio" and param < 1:
        raise ConfigError(f"--dynamic_param {param}: sv_ratio keeps the singular values above the largest / "
                          "dynamic_param, so it must be >= 1")
    if method != "sv_ratio" and not 0 < param <= 1:
        raise ConfigError(f"--dynamic_param {param}: {method} is the fraction of the "
                          f"{'Frobenius norm' if method == 'sv_fro' else 'sum of the singular values'} kept, "
                          "in (0, 1]")
    return method, float(param)


def dynamic_rank(s: torch.Tensor, method: str, param: float) -> int:
    """The rank `method` gives for the singular values `s` (descending), between 1 and len(s)."""
    if method == "sv_ratio":
        rank = int((s > s[0] / param).sum())
    elif method == "sv_fro":
        s2 = s.double().square()
        rank = int(torch.searchsorted(s2.cumsum(0) / s2.sum(), torch.tensor(param ** 2, dtype=torch.float64))) + 1
    else:
        s1 = s.double()
        rank = int(torch.searchsorted(s1.cumsum(0) / s1.sum(), torch.tensor(param, dtype=torch.float64))) + 1
    return max(1, min(rank, len(s)))


def resize_lora(lora: LoraWeights, new_rank, new_conv_rank=None, dynamic_method=None, dynamic_param=None,
                device="cpu", name="LoRA") -> tuple[LoraWeights, list[ModuleResize]]:
    """(`lora` as a plain LoRA resized module by module, what was done per module); metadata as sd-scripts'
    resize_lora writes it (network keys, `ss_training_comment`), the rest kept."""
    new_rank = check_rank(new_rank, "--new_rank")
    new_conv_rank = check_rank(new_conv_rank if new_conv_rank is not None else new_rank, "--new_conv_rank")
    dynamic_method, dynamic_param = check_dynamic(dynamic_method, dynamic_param)
    dev = resolve_device(str(device))
    out, stats = LoraWeights(metadata=dict(lora.metadata)), []
    scale = _common([m.scale if m.kind == "lora" else 1.0 for m in lora.modules.values()])
    alpha = scale * new_rank if math.isfinite(scale) and scale != 0 else float(new_rank)
    for key, m in lora.modules.items():
        if m.dora_scale is not None:
            raise ConfigError(f"{name}: module {key} is a {m.label}: its change depends on the base model's weight, "
                              "which the file does not have, so no resized LoRA can be checked to hold it; merge it "
                              "into the model (merge_lora.py --sd_model) and extract a LoRA of the rank wanted "
                              "(extract_lora_from_models.py)")
        try:
            shape = weight_shape(m, key)
        except ModelMismatchError as e:
            raise ConfigError(f"{name}: {e}") from None
        if shape is None:
            raise ConfigError(f"{name}: module {key} is a 3x3 conv whose {m.label} tensors are flattened and do not "
                              "tell its kernel size")
        is_3x3 = len(shape) == 4 and shape[2:] != (1, 1)
        module, stat = _resize_module(key, m, shape, new_conv_rank if is_3x3 else new_rank,
                                      dynamic_method, dynamic_param, dev, alpha)
        out.modules[key], stat.is_3x3 = module, is_3x3
        stats.append(stat)
    clamped = [s for s in stats if s.new_rank < (new_conv_rank if s.is_3x3 else new_rank) and not dynamic_method]
    if clamped:
        logger.warning("%d of %d module(s) kept a lower rank than asked for: their delta has no higher rank (e.g. "
                       "%s: rank %d); more would be zero rows", len(clamped), len(stats), clamped[0].key,
                       clamped[0].new_rank)
    out.metadata = _resized_metadata(lora.metadata, stats, new_rank, new_conv_rank, dynamic_method, dynamic_param)
    return out, stats


def _resize_module(key, m: LoraModule, shape, wanted, method, param, dev, alpha):
    """A plain LoRA of rank <= `wanted` and alpha `alpha` for `m`'s delta, and its figures."""
    tensors = {n: t.to(dev, torch.float32) for n, t in m.named_tensors().items()}
    if m.kind == "lora":  # sd-scripts: SVD of up @ down, the scale kept in alpha
        up, down, scale = tensors["lora_up.weight"].flatten(1), tensors["lora_down.weight"].flatten(1), m.scale
    else:  # LoHa/LoKr: thin factors of the delta with its scale in them (adapter_math.delta_factors)
        (up, down), scale = adapter_math.delta_factors(m.kind, tensors, m.alpha), 1.0
    u, s, vh = product_svd(up, down)
    rank = dynamic_rank(s, method, param) if method else wanted
    rank = min(rank, wanted, numerical_rank(s, (up.shape[0], down.shape[1])))
    if s[0] <= MIN_SV:
        rank = 1
    # alpha / rank * up @ down = scale * U S Vh: the module's own scale, whatever the file's alpha
    down_t, up_t = to_lora_shapes((u[:, :rank] * (s[:rank] * (scale * rank / alpha))).cpu(), vh[:rank].cpu(), shape)
    s2 = s.double().square()
    stat = ModuleResize(key, m.rank, rank, alpha, False, float(s2[:rank].sum().sqrt() / s2.sum().sqrt()),
                        float(s[:rank].sum() / s.sum()), float(s[0] / s[rank - 1]))
    return LoraModule(down_t, up_t, float(alpha), shape=tuple(shape)), stat


def _common(values):
    return Counter(values).most_common(1)[0][0] if values else None


def _resized_metadata(meta, stats, new_rank, new_conv_rank, method, param) -> dict:
    """The input's metadata with sd-scripts' resize notes: ss_network_* for a plain LoRA (a LoHa/LoKr's
    lycoris.kohya args dropped; other network args kept), `ss_training_comment` prefixed with the resize."""
    meta = dict(meta)
    old = {k: meta.pop(k) for k in NETWORK_KEYS if k in meta}
    args = {}
    if old.get("ss_network_module", "networks.lora") == "networks.lora":
        try:
            args = json.loads(old.get("ss_network_args") or "{}")
        except json.JSONDecodeError:
            args = {}
        args = {k: v for k, v in args.items() if k not in ("conv_dim", "conv_alpha")} if isinstance(args, dict) else {}
    conv = [s for s in stats if s.is_3x3]
    alpha = stats[0].alpha  # every module's
    conv_rank, conv_alpha = (new_conv_rank, alpha) if conv else (None, None)
    meta.update(network_metadata(new_rank, alpha, conv_rank, conv_alpha, args=args))
    old_dim = max((s.old_rank for s in stats if s.old_rank is not None), default="full")
    comment = meta.get("ss_training_comment", "")
    if method:
        meta["ss_network_dim"] = "Dynamic"  # as sd-scripts; the alpha is one number here
        if conv:
            meta["ss_network_args"] = json.dumps({**json.loads(meta["ss_network_args"]), "conv_dim": "Dynamic"})
        meta["ss_training_comment"] = f"Dynamic resize with {method}: {param:g} from {old_dim}; {comment}"
    else:
        conv_desc = f" (conv: {new_conv_rank})" if conv and new_conv_rank != new_rank else ""
        meta["ss_training_comment"] = f"dimension is resized from {old_dim} to {new_rank}{conv_desc}; {comment}"
    return meta


def resize_lora_file(model, save_to, new_rank=4, new_conv_rank=None, dynamic_method=None, dynamic_param=None,
                     save_precision="float", device=None):
    """resize_lora.py: the LoRA at `model` (any format and kind but DoRA) resized into a kohya file `save_to`.
    Every argument and the output path are checked before the file is read. Returns resize_lora's pair."""
    check_rank(new_rank, "--new_rank")
    if new_conv_rank is not None:
        check_rank(new_conv_rank, "--new_conv_rank")
    check_dynamic(dynamic_method, dynamic_param)
    resolve_device(device or "cpu")
    precision_dtype(save_precision or "float", "--save_precision")
    check_output(save_to, [model], file_suffixes=LORA_FILE_SUFFIXES)
    lora = load_lora(model)
    resized, stats = resize_lora(lora, new_rank, new_conv_rank, dynamic_method, dynamic_param, device or "cpu",
                                 name=str(model))
    save_lora(resized, save_to, save_precision=save_precision or "float",
              version=lora_version(resized.metadata) or "sd1")
    logger.info("wrote %s: %d modules, ranks %s", save_to, len(stats),
                ", ".join(f"{r}: {n}" for r, n in sorted(Counter(s.new_rank for s in stats).items())))
    return resized, stats


def verbose_lines(stats: list[ModuleResize], dynamic: bool) -> list[str]:
    """sd-scripts' --verbose report: per module the retained sum and Frobenius fraction, the largest/smallest
    kept singular value ratio and the rank (and alpha when dynamic); then the mean Frobenius retention."""
    lines = []
    for s in stats:
        line = (f"{s.key:75} | rank {s.old_rank if s.old_rank is not None else 'full'} -> {s.new_rank}, "
                f"sum(S) retained: {s.sum_retained:.1%}, fro retained: {s.fro_retained:.1%}, "
                f"max(S) ratio: {s.max_ratio:0.1f}")
        lines.append(line + (f", dynamic | dim: {s.new_rank}, alpha: {s.alpha:g}" if dynamic else ""))
    fro = torch.tensor([s.fro_retained for s in stats if math.isfinite(s.fro_retained)], dtype=torch.float64)
    if len(fro):
        lines.append(f"Average Frobenius norm retention: {fro.mean():.2%} | std: {fro.std(unbiased=False):0.3f}")
    return lines
