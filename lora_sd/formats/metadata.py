"""Metadata that kohya files carry: network and base-model keys, modelspec.* keys and the sshs_* hashes."""

import datetime
import hashlib
import json
import time

import safetensors.torch

ARCHITECTURES = {
    ("sd1", False): "stable-diffusion-v1",
    ("sd2", False): "stable-diffusion-v2-512",
    ("sd2", True): "stable-diffusion-v2-768-v",
    ("sdxl", False): "stable-diffusion-xl-v1-base",
}

BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # ss_base_model_version
# modelspec.implementation, as sd-scripts' sai_model_spec.build_metadata: SDXL LoRAs name the original (SGM) code
IMPLEMENTATIONS = {"sdxl": "https://github.com/Stability-AI/generative-models"}
KOHYA_METADATA_PREFIXES = ("ss_", "modelspec.")  # what travels through diffusers files and PEFT folders


def kohya_metadata_only(metadata) -> dict[str, str]:
    """The kohya training metadata (`ss_*`, `modelspec.*`) of a file's metadata; the sshs_* hashes are
    left out: they are recomputed when a kohya file is written."""
    return {k: v for k, v in (metadata or {}).items() if k.startswith(KOHYA_METADATA_PREFIXES)}


def lora_version(metadata) -> str | None:
    """'sd1', 'sd2', 'sdxl' from a LoRA file's metadata, or None when it does not say."""
    base = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    if base.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if base.startswith("sd_v2") or arch.startswith("stable-diffusion-v2") or metadata.get("ss_v2") == "True":
        return "sd2"
    if base.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def network_metadata(dim, alpha, conv_dim=None, conv_alpha=None, module="networks.lora", args=None) -> dict[str, str]:
    """sd-scripts' `ss_network_*` keys: `ss_network_args` (JSON strings, as sd-scripts writes network_args)
    holds `args` (LyCORIS' algo, ...) and conv_dim/conv_alpha when there are 3x3 convs."""
    meta = {"ss_network_module": module, "ss_network_dim": _num(dim), "ss_network_alpha": _num(alpha)}
    args = dict(args or {})
    if conv_dim is not None:
        args.update(conv_dim=_num(conv_dim), conv_alpha=_num(conv_alpha))
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta


def _num(x) -> str:
    """1 -> "1", 1.0 -> "1", 1.5 -> "1.5"."""
    return str(int(x)) if float(x).is_integer() else str(x)


def version_metadata(version) -> dict[str, str]:
    """sd-scripts' base-model keys (`ss_base_model_version`, `ss_v2`) for a version; none if unknown."""
    if version is None:
        return {}
    return {"ss_base_model_version": BASE_MODEL_VERSIONS.get(version, "sd_v1"), "ss_v2": str(version == "sd2")}


def modelspec_metadata(version="sd1", v_parameterization=False, title=None, resolution=None, timestamp=None):
    """The `modelspec.*` keys sd-scripts writes for a LoRA (values are strings)."""
    timestamp = int(timestamp if timestamp is not None else time.time())
    arch = ARCHITECTURES.get((version, v_parameterization and version == "sd2"), ARCHITECTURES[("sd1", False)])
    if resolution is None:
        resolution = 1024 if version == "sdxl" else 768 if v_parameterization and version == "sd2" else 512
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch + "/lora",
        "modelspec.implementation": IMPLEMENTATIONS.get(version, "diffusers"),
        "modelspec.title": title or f"LoRA@{timestamp}",
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": datetime.datetime.fromtimestamp(timestamp).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }


def safetensors_hashes(tensors, metadata):
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them.

    Both are taken over the file as serialized with only the `ss_*` training
    metadata: the model hash is sha256 of everything after the 8-byte length
    and the JSON header, the legacy hash the first 8 hex digits of sha256 of
    the 0x10000 bytes at offset 0x100000.
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(tensors, ss_only)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def with_hashes(tensors, metadata):
    """metadata plus sshs_model_hash / sshs_legacy_hash for these tensors."""
    model_hash, legacy_hash = safetensors_hashes(tensors, metadata)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
