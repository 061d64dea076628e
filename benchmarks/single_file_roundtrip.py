"""Full-size single-file round trip: original layout -> diffusers -> original layout.

Builds SD 1.5 / SD 2.1 models from the shipped configs with random weights,
writes them as one original-layout .safetensors file (U-Net, VAE and text
encoder: 4-5 GB each), loads that file with `load_base` (offline) and writes
it back with `save_single_file`, then checks that both files hold the same
keys and bit-identical tensors. Prints a table of timings and peak memory.

    python benchmarks/single_file_roundtrip.py --versions sd1 sd2 --workdir /tmp/sf_bench

Needs ~6 GB of RAM per version and ~10 GB of free disk in --workdir.
"""

import argparse
import gc
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lora_sd.io import open_tensor_file
from lora_sd.models import load_base, save_single_file, sd_configs
from lora_sd.models.single_file import empty_components

logger = logging.getLogger("single_file_roundtrip")


def _peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def _random_model(version, v_parameterization):
    """unet / vae / text_encoder / version (what save_single_file needs) with random weights."""
    unet, vae, text_encoder = empty_components(sd_configs.shipped_configs(version, v_parameterization))
    g = torch.Generator().manual_seed(0)
    for module in (unet, vae, text_encoder):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return SimpleNamespace(unet=unet, vae=vae, text_encoder=text_encoder, version=version)


def _compare_files(a, b):
    (ka, get_a, _), (kb, get_b, _) = open_tensor_file(a), open_tensor_file(b)
    if set(ka) != set(kb):
        return False, f"key sets differ: {sorted(set(ka) ^ set(kb))[:5]}"
    for k in sorted(ka):
        ta, tb = get_a(k), get_b(k)
        if ta.dtype != tb.dtype or not torch.equal(ta, tb):
            return False, f"tensor differs: {k}"
    return True, f"{len(ka)} keys identical"


def run(version, workdir):
    v_pred = version == "sd2"  # SD 2.1 768-v
    rows = []
    t = time.perf_counter()
    model = _random_model(version, v_pred)
    n_params = sum(p.numel() for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters())
    rows.append(("build random model", time.perf_counter() - t))

    src = workdir / f"{version}_random.safetensors"
    t = time.perf_counter()
    save_single_file(model, src)
    rows.append(("diffusers -> original file", time.perf_counter() - t))
    del model
    gc.collect()

    os.environ["HF_HUB_OFFLINE"] = "1"
    t = time.perf_counter()
    loaded = load_base(src, v2=version == "sd2", v_parameterization=v_pred)
    rows.append(("load_base(single file)", time.perf_counter() - t))

    out = workdir / f"{version}_roundtrip.safetensors"
    t = time.perf_counter()
    save_single_file(loaded, out, original_state_dict=src)
    rows.append(("save_single_file", time.perf_counter() - t))
    del loaded
    gc.collect()

    t = time.perf_counter()
    same, detail = _compare_files(src, out)
    rows.append(("compare files", time.perf_counter() - t))
    size_gb = src.stat().st_size / 1e9
    print(f"\n{version}: {n_params / 1e6:.0f}M parameters, file {size_gb:.2f} GB, round trip "
          f"{'IDENTICAL' if same else 'DIFFERENT'} ({detail}), peak RSS {_peak_rss_gb():.1f} GB")
    print(f"{'step':<30}{'seconds':>10}")
    for name, seconds in rows:
        print(f"{name:<30}{seconds:>10.1f}")
    for f in (src, out):
        f.unlink()
    return same


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", nargs="+", default=["sd1", "sd2"], choices=["sd1", "sd2"])
    parser.add_argument("--workdir", default=None, help="folder for the temporary files (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sf_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        ok = all([run(v, workdir) for v in args.versions])
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
