"""Seconds per LoRA training step and peak memory: the tiny model and a full-size SD 1.5 U-Net.

    python benchmarks/train_speed.py                    # every row, each in its own process
    python benchmarks/train_speed.py --model sd15 --gradient_checkpointing --steps 3   # one row

Each row trains a U-Net LoRA (network_dim 4, alpha 1, AdamW) with the training
training's own `compute_loss` (sd-scripts' objective: DDPM noise, timesteps, MSE)
at batch 1, with cached latents and cached text-encoder outputs (the text
encoder is not trained), as `cache_latents = true` runs do. The full-size
row is a U-Net with SD 1.5's architecture (860M parameters, random weights,
no download) at 512 px (64x64 latents); the tiny row is lora_sd.tiny's U-Net at
64 px. Peak memory: the process's peak RSS on CPU, torch.cuda.max_memory_allocated
on GPU. The first step (warm-up) is not timed.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = [  # (model, gradient_checkpointing, timed steps)
    ("tiny", False, 20), ("tiny", True, 20), ("sd15", False, 2), ("sd15", True, 2),
]


def build_unet(model: str):
    from diffusers import UNet2DConditionModel

    from lora_sd import tiny
    from lora_sd.models import sd_configs

    torch.manual_seed(0)
    if model == "tiny":
        return UNet2DConditionModel(**tiny.unet_config("sd1")), 8, 32
    return UNet2DConditionModel(**sd_configs.shipped_configs("sd1")["unet"]), 64, 768


def run_row(model: str, gradient_checkpointing: bool, steps: int, mixed_precision="no") -> dict:
    from accelerate import Accelerator

    from lora_sd.config import TrainConfig
    from lora_sd.targets import NetworkSpec, lora_configs
    from lora_sd.tiny import build_tiny_sd
    from lora_sd.training.noise import compute_loss
    from lora_sd.models.load import noise_scheduler

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)
    device = accelerator.device
    unet, latent_side, hidden_size = build_unet(model)
    unet.requires_grad_(False)
    unet.add_adapter(lora_configs(unet, None, NetworkSpec(4, 1.0), train_text_encoder=False)["unet"])
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    vae = build_tiny_sd("sd1").vae.to(device)  # only its scaling factor and device are used (latents are cached)
    cfg = TrainConfig(seed=0)
    gen = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(1, 4, latent_side, latent_side, generator=gen), "captions": ["a photo"],
             "loss_weights": torch.ones(1)}
    hidden = torch.randn(1, 77, hidden_size, generator=gen).to(device)
    scheduler = noise_scheduler()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with accelerator.autocast():
            loss = compute_loss(batch, unet=unet, text_conditioning=lambda captions: hidden, vae=vae,
                                scheduler=scheduler, cfg=cfg, generator=gen, weight_dtype=torch.float32)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        peak_kind = "cuda max allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak_kind = "peak RSS"
    return {"model": model, "gradient_checkpointing": gradient_checkpointing, "steps": steps,
            "s_per_step": sum(times) / len(times), "peak_gib": peak, "peak_kind": peak_kind,
            "lora_params": sum(p.numel() for p in params), "device": str(device),
            "threads": torch.get_num_threads()}


def row_args(model, gc, steps, threads):
    return (["--model", model, "--steps", str(steps)] + (["--gradient_checkpointing"] if gc else [])
            + (["--threads", str(threads)] if threads else []))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "sd15"], help="run one row (default: all, each in a subprocess)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--only", choices=["tiny", "sd15"], help="table run: only this model's rows")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on shared cores 1 avoids OpenMP contention")
    parser.add_argument("--json", action="store_true", help="print the row as JSON (used by the table run)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        steps = args.steps or (20 if args.model == "tiny" else 2)
        row = run_row(args.model, args.gradient_checkpointing, steps)
        print(json.dumps(row) if args.json else row)
        return
    rows = []
    for model, gc, steps in ROWS:
        if args.steps:
            steps = args.steps
        if args.only and model != args.only:
            continue
        row = row_args(model, gc, steps, args.threads)
        cmd = "python benchmarks/train_speed.py " + " ".join(row)
        out = subprocess.run([sys.executable, __file__, *row, "--json"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])
        if out.returncode:
            print(f"{cmd}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append((json.loads(out.stdout.strip().splitlines()[-1]), cmd))
    device = rows[0][0]["device"] if rows else "?"
    print(f"device: {device}, torch threads: {rows[0][0]['threads'] if rows else '?'}, batch 1, "
          "cached latents and text-encoder outputs, U-Net LoRA dim 4, AdamW, float32")
    print("| model | resolution | gradient checkpointing | s/step | peak memory (GiB) | command |")
    print("|---|---|---|---|---|---|")
    for r, cmd in rows:
        reso = "64 px (tiny U-Net)" if r["model"] == "tiny" else "512 px (SD 1.5 U-Net, 860M)"
        print(f"| {r['model']} | {reso} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['s_per_step']:.3f} | "
              f"{r['peak_gib']:.2f} ({r['peak_kind']}) | `{cmd}` |")


if __name__ == "__main__":
    main()
