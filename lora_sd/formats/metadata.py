"""Metadata that kohya files carry: modelspec.* keys and the sshs_* hashes."""

import datetime
import hashlib
import time

import safetensors.torch

ARCHITECTURES = {
    ("sd1", False): "stable-diffusion-v1",
    ("sd2", False): "stable-diffusion-v2-512",
    ("sd2", True): "stable-diffusion-v2-768-v",
    ("sdxl", False): "stable-diffusion-xl-v1-base",
}


def modelspec_metadata(version="sd1", v_parameterization=False, title=None, resolution=None, timestamp=None):
    """The `modelspec.*` keys sd-scripts writes for a LoRA (values are strings)."""
    timestamp = int(timestamp if timestamp is not None else time.time())
    arch = ARCHITECTURES.get((version, v_parameterization and version == "sd2"), ARCHITECTURES[("sd1", False)])
    if resolution is None:
        resolution = 768 if v_parameterization and version == "sd2" else 512
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch + "/lora",
        "modelspec.implementation": "diffusers",
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
