"""What is inside a LoRA file or folder (recipes/lora_info.py): format, kinds, base model, modules, ranks and
alphas, the norms of the deltas, non-finite values, and the training metadata in readable form.

Every format and kind `lora_sd.formats` reads. A file holding NaN/inf is described, not refused: the
non-finite values are counted per module (read_lora refuses such files everywhere else).
"""

import datetime
import json
import math
from collections import Counter
from pathlib import Path

import torch

from lora_sd import adapter_math
from lora_sd.errors import FormatError
from lora_sd.formats import _read_file, _read_folder  # read_lora's parsers, without its refusal of NaN/inf
from lora_sd.formats.base_model import BASE_NAMES, base_from_modules, note_base
from lora_sd.formats.checks import module_problem
from lora_sd.formats.metadata import lora_version
from lora_sd.ops.lowrank import product_svd


def read_any(path):
    """(LoraWeights, format) as read_lora reads them, NaN/inf kept; FormatError for a file it cannot read."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    lora, fmt = _read_folder(path) if path.is_dir() else _read_file(path)
    if not lora.modules:
        raise FormatError(f"{path}: holds no LoRA modules")
    for key, m in lora.modules.items():
        problem = module_problem(m)
        if problem:
            raise FormatError(f"{path}: module {key} {problem}")
    note_base(lora, path)
    return lora, fmt


def non_finite_count(m) -> int:
    """NaN/inf values in a module's tensors (dora_scale included) and alpha."""
    tensors = [*m.named_tensors().values(), *([m.dora_scale] if m.dora_scale is not None else [])]
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors) + (not math.isfinite(m.alpha))


def delta_norm(m) -> float:
    """||delta||_F of a module (DoRA: of its low-rank part; the magnitude needs the base weight), from the
    singular values of its thin factors: the delta itself is never formed while its rank is low."""
    tensors = {n: t.double() for n, t in m.named_tensors().items()}
    up, down = adapter_math.delta_factors(m.kind, tensors, m.alpha)
    return float(product_svd(up, down)[1].square().sum().sqrt())


def _num(x):
    return int(x) if float(x).is_integer() else round(float(x), 6)


def _histogram(values) -> dict:
    """{value: count} sorted by value, keys as strings (JSON)."""
    counts = Counter(values)
    return {str(k): counts[k] for k in sorted(counts, key=lambda v: (isinstance(v, str), v))}


def lora_info(path, top=10) -> dict:
    """Everything lora_info.py shows, as plain data (what --json prints)."""
    lora, fmt = read_any(path)
    mods = lora.modules
    version = lora_version(lora.metadata)
    base = version or base_from_modules(mods)
    bad = {k: n for k, n in ((k, non_finite_count(m)) for k, m in mods.items()) if n}
    norms = sorted(((k, delta_norm(m)) for k, m in mods.items() if k not in bad), key=lambda kv: -kv[1])
    linear = [m for m in mods.values() if not m.is_3x3]
    conv = [m for m in mods.values() if m.is_3x3]
    return {
        "path": str(path),
        "format": fmt,
        "kinds": dict(Counter(m.label for m in mods.values()).most_common()),
        "base_model": BASE_NAMES.get(base, "unknown"),
        "base_model_from": "metadata" if version else "module names" if base else None,
        "components": {c: len(lora.component(c)) for c in lora.components},
        "modules": len(mods),
        "ranks": _histogram(m.rank if m.rank is not None else "full" for m in linear),
        "alphas": _histogram(_num(m.alpha) for m in linear if math.isfinite(m.alpha)),
        "conv_ranks": _histogram(m.rank if m.rank is not None else "full" for m in conv),
        "conv_alphas": _histogram(_num(m.alpha) for m in conv if math.isfinite(m.alpha)),
        "delta_norms": {
            "largest": [{"module": k, "norm": n} for k, n in norms[:top]],
            "mean": sum(n for _, n in norms) / len(norms) if norms else None,
            "dora_note": "DoRA modules: norm of the low-rank part (the magnitude needs the base weight)"
            if any(m.dora_scale is not None for m in mods.values()) else None,
        },
        "non_finite": {"modules": len(bad), "values": sum(bad.values()), "per_module": bad},
        "metadata": readable_metadata(lora.metadata),
    }


def format_info(info: dict) -> str:
    """The text lora_info.py prints."""
    lines = [f"{info['path']}",
             f"  format:      {info['format']}",
             f"  kind:        {', '.join(f'{k} ({n})' for k, n in info['kinds'].items())}",
             f"  base model:  {info['base_model']}" + (f" (from its {info['base_model_from']})"
                                                      if info["base_model_from"] else ""),
             f"  components:  {', '.join(f'{c} ({n})' for c, n in info['components'].items())}",
             f"  modules:     {info['modules']}"]
    for label, key in (("ranks", "ranks"), ("alphas", "alphas"), ("conv ranks", "conv_ranks"),
                       ("conv alphas", "conv_alphas")):
        if info[key]:
            counts = (f"{v}: {n} module{'s' * (n != 1)}" for v, n in info[key].items())
            lines.append(f"  {label + ':':12} " + ", ".join(counts))
    bad = info["non_finite"]
    if bad["modules"]:
        lines.append(f"  NON-FINITE:  {bad['values']} NaN/inf values in {bad['modules']} module(s): the LoRA is broken")
        lines += [f"    {k}: {n}" for k, n in list(bad["per_module"].items())[:10]]
    else:
        lines.append("  non-finite:  none")
    norms = info["delta_norms"]
    if norms["largest"]:
        lines.append(f"  delta norms (Frobenius; mean {norms['mean']:.4g}), largest first:")
        lines += [f"    {d['norm']:12.4g}  {d['module']}" for d in norms["largest"]]
        if norms["dora_note"]:
            lines.append(f"    ({norms['dora_note']})")
    lines.append("  metadata:" + ("" if info["metadata"] else " none"))
    for section, values in info["metadata"].items():
        lines.append(f"    {section}:")
        lines += [f"      {k}: {_short(v)}" for k, v in values.items()]
    return "\n".join(lines)


def _short(value, limit=300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# --- training metadata (sd-scripts' ss_* keys) in readable form ---------------------------------------------

HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_vae_hash",
             "ss_new_vae_hash")
DATE_KEYS = ("ss_training_started_at", "ss_training_finished_at")  # seconds since 1970 (time.time())
DATASET_KEYS = ("ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_datasets", "ss_tag_frequency", "ss_bucket_info")
SUBSET_KEYS = ("image_dir", "img_count", "num_repeats", "class_tokens", "is_reg", "caption_extension")
TOP_TAGS = 10


def readable_metadata(meta: dict) -> dict:
    """{section: {key: value}}: network, training, datasets, hashes, modelspec, other. JSON strings decoded,
    tag frequencies summarised (distinct tags, the most frequent), bucket info as images per resolution,
    training dates as ISO dates (UTC)."""
    sections = {"network": {}, "training": {}, "datasets": {}, "hashes": {}, "modelspec": {}, "other": {}}
    for key in sorted(meta):
        value = meta[key]
        if key in HASH_KEYS:
            sections["hashes"][key] = value
        elif key.startswith("modelspec."):
            sections["modelspec"][key[len("modelspec."):]] = value
        elif key in DATASET_KEYS:
            sections["datasets"][key] = _dataset_value(key, _json(value))
        elif key.startswith("ss_network_"):
            sections["network"][key] = _json(value)
        elif key in DATE_KEYS:
            sections["training"][key] = _date(value)
        elif key.startswith("ss_"):
            sections["training"][key] = _json(value)
        else:
            sections["other"][key] = value
    return {k: v for k, v in sections.items() if v}


def _json(value):
    """A JSON object or list decoded; anything else as it is."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


def _date(value) -> str:
    try:
        stamp = datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc)
    except (ValueError, OverflowError, OSError):
        return value
    return stamp.isoformat(timespec="seconds")


def tag_summary(freq) -> dict:
    """{folder: {"distinct_tags": n, "most_frequent": [[tag, count], ...]}} from sd-scripts' tag frequency."""
    if not isinstance(freq, dict):
        return freq
    out = {}
    for folder, tags in freq.items():
        if isinstance(tags, dict):
            top = sorted(tags.items(), key=lambda kv: -kv[1] if isinstance(kv[1], (int, float)) else 0)[:TOP_TAGS]
            out[folder] = {"distinct_tags": len(tags), "most_frequent": [list(kv) for kv in top]}
        else:
            out[folder] = tags
    return out


def bucket_summary(info) -> dict:
    """{"buckets": n, "images_per_resolution": {"WxH": count}, ...} from sd-scripts' bucket info."""
    if not isinstance(info, dict) or not isinstance(info.get("buckets"), dict):
        return info
    per_reso = {}
    for b in info["buckets"].values():
        reso = b.get("resolution") if isinstance(b, dict) else None
        if isinstance(reso, list) and len(reso) == 2:
            per_reso[f"{reso[0]}x{reso[1]}"] = b.get("count")
    rest = {k: v for k, v in info.items() if k != "buckets"}
    return {"buckets": len(info["buckets"]), "images_per_resolution": per_reso, **rest}


def _dataset_value(key, value):
    if key == "ss_tag_frequency":
        return tag_summary(value)
    if key == "ss_bucket_info":
        return bucket_summary(value)
    if key == "ss_datasets" and isinstance(value, list):  # sd-scripts with a dataset config: one entry per dataset
        return [_dataset(d) for d in value]
    return value


def _dataset(d):
    if not isinstance(d, dict):
        return d
    out = {k: v for k, v in d.items() if k not in ("tag_frequency", "bucket_info", "subsets")}
    if isinstance(d.get("subsets"), list):
        out["subsets"] = [{k: s[k] for k in SUBSET_KEYS if k in s} if isinstance(s, dict) else s for s in d["subsets"]]
    if "tag_frequency" in d:
        out["tag_frequency"] = tag_summary(d["tag_frequency"])
    if "bucket_info" in d:
        out["bucket_info"] = bucket_summary(d["bucket_info"])
    return out
