"""Extraction and SVD merge on a full-size SD 1.5-shaped model: time and reconstruction error.

    python benchmarks/lora_ops.py [--what extract svd_merge] [--dim 64 --conv_dim 32]
        [--new_rank 32 --new_conv_rank 16] [--no_conv]

Random weights, no downloads. Rows (each with the command that makes it):

- extract, full SVD vs ours: a U-Net and text encoder with SD 1.5's shapes, and a
  "tuned" copy where every sd-scripts target weight gets a delta with a decaying
  spectrum (Gaussian factors, k-th direction weighted 1/(1 + k/8), 256 directions).
  `torch.linalg.svd` per module (sd-scripts' way) vs `truncated_svd(method="auto")`
  (randomized where the rank kept is small). Error: ||D - D_r||_F summed over
  modules relative to ||D||_F, and the worst per-module ratio to the optimum
  (the full SVD's error).
- svd_merge, full SVD vs ours: three LoRAs of ranks 16/32/64 (conv 8/16/32) on all
  target modules, merged at ratios 0.7/0.5/-0.3 to --new_rank/--new_conv_rank. Full SVD of
  the summed delta per module (sd-scripts' svd_merge_lora) vs `factorize_product` (QR of
  the concatenated factors, SVD of the small core).

Needs about 9 GB of RAM (two U-Nets in float32).

Measured 2026-11-25 on a 2-core CPU shared with other jobs (torch 2.13 CPU, 350 modules:
U-Net with convs + text encoder), `python benchmarks/lora_ops.py`:

| case | method | seconds | relative error | worst module error / optimum |
|---|---|---:|---:|---:|
| extract dim 64/conv 32 | full torch.linalg.svd | 2208.2 (*) | 0.27629 | 1.00000 |
| extract dim 64/conv 32 | ours (auto: randomized SVD) | 21.4 | 0.27629 | 1.00000 |
| svd_merge 3 LoRAs -> 32/conv 16 | full SVD of the summed delta | 439.9 | 0.61922 | 1.00000 |
| svd_merge 3 LoRAs -> 32/conv 16 | ours (QR of the factors + small SVD) | 1.0 | 0.61922 | 1.00000 |

(*) ran while a test suite competed for the two cores; the svd_merge row does the same full
SVDs (same shapes) in 440 s, the fairer figure for a full SVD per module.
"""

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sd.lora_weights import LoraModule, LoraWeights, key_for_module, model_module_name  # noqa: E402
from lora_sd.models import sd_configs  # noqa: E402
from lora_sd.ops import extract_lora  # noqa: E402
from lora_sd.ops.lowrank import factorize_product, max_rank, truncated_svd  # noqa: E402
from lora_sd.ops.merge import gather_modules  # noqa: E402
from lora_sd.targets import (  # noqa: E402
    TEXT_ENCODER_TARGET_CLASSES,
    UNET_CONV_TARGET_CLASSES,
    UNET_TARGET_CLASSES,
    find_targets,
)


def _peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def build_models(seed=0, tiny=False):
    """SD 1.5-shaped U-Net and text encoder with random weights (no VAE); `tiny`: lora_sd.tiny's shapes."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_sd import tiny as tiny_sd

    configs = sd_configs.shipped_configs("sd1")
    if tiny:
        configs = {"unet": tiny_sd.unet_config(), "text_encoder": tiny_sd.text_encoder_config("sd1", 400)}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        te = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    g = torch.Generator().manual_seed(seed)
    for module in (unet, te):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return {"unet": unet.eval(), "text_encoder": te.eval()}


def targets(models, with_conv):
    """{component: {module name: is_3x3}} of sd-scripts' target modules."""
    unet_classes = UNET_TARGET_CLASSES + (UNET_CONV_TARGET_CLASSES if with_conv else ())
    return {
        "unet": find_targets(models["unet"], unet_classes, with_conv),
        "text_encoder": find_targets(models["text_encoder"], TEXT_ENCODER_TARGET_CLASSES, False),
    }


def decaying_delta(shape, gen, directions=256, scale=1e-3):
    """A delta whose k-th direction is weighted 1/(1 + k/8): a fine-tune-like spectrum."""
    out_dim, in_dim = shape[0], int(torch.tensor(shape[1:]).prod())
    k = min(directions, out_dim, in_dim)
    weights = 1.0 / (1.0 + torch.arange(k) / 8.0)
    left = torch.randn(out_dim, k, generator=gen) * weights
    right = torch.randn(k, in_dim, generator=gen) / in_dim**0.5
    return (scale * left @ right).reshape(shape)


def tuned_copy(models, found, seed=1):
    tuned = {c: copy.deepcopy(m) for c, m in models.items()}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for component, names in found.items():
            named = dict(tuned[component].named_modules())
            for name in names:
                w = named[name].weight
                w += decaying_delta(tuple(w.shape), gen)
    return tuned


def extraction_errors(models, tuned, lora):
    """{key: (||D - D_lora||_F, ||D||_F)} for every extracted module."""
    out = {}
    for component in lora.components:
        org_named, tuned_named = dict(models[component].named_modules()), dict(tuned[component].named_modules())
        for path, m in lora.component(component).items():
            name = model_module_name(component, path, models[component])
            d = (tuned_named[name].weight - org_named[name].weight).double()
            out[f"{component}.{path}"] = (torch.linalg.norm(d - m.delta(torch.float64)).item(), torch.linalg.norm(d).item())
    return out


def summarize(errors, reference=None):
    total_err = sum(e * e for e, _ in errors.values()) ** 0.5
    total_norm = sum(n * n for _, n in errors.values()) ** 0.5
    worst = None
    if reference is not None:
        worst = max(errors[k][0] / reference[k][0] for k in errors if reference[k][0] > 0)
    return total_err / total_norm, worst


def bench_extract(args, rows):
    t = time.perf_counter()
    models = build_models(tiny=args.tiny)
    found = targets(models, not args.no_conv)
    tuned = tuned_copy(models, found)
    n_modules = sum(len(v) for v in found.values())
    print(f"# extract: built models + tuned copy ({n_modules} target modules) in {time.perf_counter() - t:.0f} s, "
          f"peak RSS {_peak_rss_gb():.1f} GB", flush=True)
    conv_dim = None if args.no_conv else args.conv_dim
    results = {}
    for method in ("full", "auto"):
        t = time.perf_counter()
        done = []

        def progress(name, t0=t):
            done.append(name)
            if len(done) % 50 == 0:
                print(f"#   {method}: {len(done)} modules, {time.perf_counter() - t0:.0f} s", flush=True)

        lora = extract_lora(models, tuned, args.dim, conv_dim, min_diff=0.0, method=method, progress=progress)
        seconds = time.perf_counter() - t
        results[method] = extraction_errors(models, tuned, lora)
        rel, worst = summarize(results[method], results.get("full"))
        label = "full torch.linalg.svd" if method == "full" else "ours (auto: randomized SVD)"
        rows.append((f"extract dim {args.dim}/conv {conv_dim}", label, seconds, rel, worst))
        print(f"# {rows[-1]}", flush=True)
    del models, tuned


def random_loras(models, found, ranks, conv_ranks, seed=2):
    gen = torch.Generator().manual_seed(seed)
    loras = []
    for rank, conv_rank in zip(ranks, conv_ranks, strict=True):
        lora = LoraWeights()
        for component, names in found.items():
            named = dict(models[component].named_modules())
            for name, is_conv in names.items():
                w = named[name].weight
                r = conv_rank if is_conv else rank
                down = torch.randn(r, *w.shape[1:], generator=gen) / w[0].numel() ** 0.5
                up = torch.randn(w.shape[0], r, *([1, 1] if w.dim() == 4 else []), generator=gen) * 0.01
                lora.modules[key_for_module(component, name)] = LoraModule(down, up, float(r) / 2)
        loras.append(lora)
    return loras


def bench_svd_merge(args, rows):
    models = build_models(tiny=args.tiny)
    found = targets(models, not args.no_conv)
    loras = random_loras(models, found, (16, 32, 64), (8, 16, 32))
    del models
    ratios = [0.7, 0.5, -0.3]
    entries = gather_modules(loras, ratios, ["a", "b", "c"])
    results = {}
    for method in ("full", "ours"):
        errors = {}
        t = time.perf_counter()
        seconds_in_error = 0.0
        for entry in entries:
            ups, downs = torch.cat(entry.scaled_ups(), dim=1), torch.cat(entry.downs(), dim=0)
            is_conv = entry.parts[0][1].is_3x3
            rank = min(args.new_conv_rank if is_conv else args.new_rank, max_rank(entry.weight_shape(ups.shape[0])))
            if method == "full":
                summed = ups @ downs
                up, down = truncated_svd(summed, rank, "full")
            else:
                up, down = factorize_product(ups, downs, rank)
            t_err = time.perf_counter()
            target = (ups.double() @ downs.double())
            errors[entry.key] = (torch.linalg.norm(target - up.double() @ down.double()).item(),
                                 torch.linalg.norm(target).item())
            seconds_in_error += time.perf_counter() - t_err
        seconds = time.perf_counter() - t - seconds_in_error
        results[method] = errors
        rel, worst = summarize(errors, results.get("full"))
        label = "full SVD of the summed delta" if method == "full" else "ours (QR of the factors + small SVD)"
        rows.append((f"svd_merge 3 LoRAs -> {args.new_rank}/conv {args.new_conv_rank}", label, seconds, rel, worst))
        print(f"# {rows[-1]}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", nargs="+", default=["extract", "svd_merge"], choices=["extract", "svd_merge"])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--conv_dim", type=int, default=32)
    parser.add_argument("--new_rank", type=int, default=32)
    parser.add_argument("--new_conv_rank", type=int, default=16)
    parser.add_argument("--no_conv", action="store_true", help="leave the 3x3 convs out")
    parser.add_argument("--tiny", action="store_true", help="tiny models: check that the script runs")
    args = parser.parse_args(argv)
    command = "python benchmarks/lora_ops.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {command.strip()}  (torch {torch.__version__}, {torch.get_num_threads()} threads)", flush=True)
    rows = []
    if "extract" in args.what:
        bench_extract(args, rows)
    if "svd_merge" in args.what:
        bench_svd_merge(args, rows)
    print("\n| case | method | seconds | relative error | worst module error / optimum |")
    print("|---|---|---:|---:|---:|")
    for case, method, seconds, rel, worst in rows:
        print(f"| {case} | {method} | {seconds:.1f} | {rel:.5f} | {'-' if worst is None else f'{worst:.5f}'} |")
    print(f"\npeak RSS {_peak_rss_gb():.1f} GB")


if __name__ == "__main__":
    main()
