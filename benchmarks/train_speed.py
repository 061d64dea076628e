"""Seconds per LoRA training step and peak memory: the tiny model, full-size SD 1.5 and SDXL U-Nets.

    python benchmarks/train_speed.py                    # every CPU row, each in its own process
    python benchmarks/train_speed.py --only sdxl        # the SDXL rows (GPU rows: run, or their commands)
    python benchmarks/train_speed.py --model sd15 --gradient_checkpointing --steps 3   # one row
    python benchmarks/train_speed.py --compare-floor --model sd15 --resolution 256 --rounds 3 --steps 2
    python benchmarks/train_speed.py --gpu [--option full_bf16=true] [--peer sd-scripts PATH]   # CUDA rows
    python benchmarks/train_speed.py --dry              # the GPU rows' FLOPs and table shape, no timing

`--compare-floor` (speed_floor.py): our training step against the bare PEFT U-Net loop, same model and
inputs, interleaved rounds, the per-round ratio, its median and range. `--gpu` (gpu_rows.py): our own
training step on CUDA (bf16, SDPA, AdamW8bit, cached latents and text-encoder outputs) for SD 1.5 512 px
batch 1 and 16 (with and without gradient checkpointing) and SDXL 1024 px batch 1: it/s, images/s, peak
memory, MFU; `--peer sd-scripts PATH` (peer.py) runs sd-scripts on the same data beside each row.

Each row trains a U-Net LoRA (network_dim 4, alpha 1, AdamW) with the training
training's own `compute_loss` (sd-scripts' objective: DDPM noise, timesteps, MSE)
at batch 1, with cached latents and cached text-encoder outputs (the text
encoder is not trained), as `cache_latents = true` runs do. The full-size
row is a U-Net with SD 1.5's architecture (860M parameters, random weights,
no download) at 512 px (64x64 latents); the tiny row is lora_sd.tiny's U-Net at
64 px. Peak memory: the process's peak RSS on CPU, torch.cuda.max_memory_allocated
on GPU. The first step (warm-up) is not timed.

SDXL rows: a U-Net with SDXL 1.0's architecture (2.6B parameters, random
weights built in bf16, so 5 GiB) conditioned as SDXL is (both text encoders'
2048-wide context, pooled text_embeds, size/crop time_ids; all cached), base
weights in bf16 and the LoRA in float32 under bf16 autocast, gradient
checkpointing. On CPU at 512 px; on a GPU at 1024 px with AdamW8bit
(bitsandbytes), and once more with `--fp8_base` (the frozen base in float8, the
training option `fp8_base`), reporting torch.cuda.max_memory_allocated.
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

ROWS = [  # (model, gradient_checkpointing, timed steps, extra options)
    ("tiny", False, 20, []), ("tiny", True, 20, []), ("sd15", False, 2, []), ("sd15", True, 2, []),
    ("sdxl", True, 1, ["--resolution", "512", "--weights", "bf16"]),
]
GPU_ROWS = [  # SDXL at 1024 px, U-Net only, cached latents and text-encoder outputs: the low-memory recipe
    ("sdxl", True, 3, ["--resolution", "1024", "--weights", "bf16", "--optimizer", "adamw8bit"]),
    ("sdxl", True, 3, ["--resolution", "1024", "--weights", "bf16", "--optimizer", "adamw8bit", "--fp8_base"]),
]


def build_unet(model: str, weights=torch.float32, device="cpu"):
    """(U-Net, latent side at its default resolution, context width): random weights, built in `weights`."""
    from diffusers import UNet2DConditionModel

    from lora_sd import tiny
    from lora_sd.models import sd_configs, sdxl_configs

    torch.manual_seed(0)
    config = {"tiny": lambda: tiny.unet_config("sd1"), "sd15": lambda: sd_configs.shipped_configs("sd1")["unet"],
              "sdxl": lambda: sdxl_configs.UNET_SDXL}[model]()
    default = torch.get_default_dtype()
    torch.set_default_dtype(weights)  # built in bf16 directly: SDXL's 2.6B float32 weights would be 10 GiB
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(default)
    return unet, {"tiny": 8, "sd15": 64, "sdxl": 128}[model], config["cross_attention_dim"]


def make_optimizer(name, params):
    if name == "adamw8bit":
        import bitsandbytes as bnb  # sd-scripts' AdamW8bit

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def sdxl_loss(unet, latents, context, pooled, time_ids, scheduler, gen, dtype):
    """The training objective with SDXL's conditioning (cached: context, pooled text_embeds, time_ids)."""
    from lora_sd.training.noise import diffusion_loss, sample_noise, sample_timesteps

    eps = sample_noise(latents, None, gen)
    timesteps = sample_timesteps(latents.shape[0], generator=gen, device=latents.device)
    noisy = scheduler.add_noise(latents, eps, timesteps)
    pred = unet(noisy.to(dtype), timesteps, context.to(dtype),
                added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}).sample
    return diffusion_loss(pred, eps, torch.ones(latents.shape[0], device=latents.device))


def run_row(model: str, gradient_checkpointing: bool, steps: int, resolution=None, weights="float",
            optimizer="adamw", fp8_base=False) -> dict:
    from accelerate import Accelerator

    from lora_sd.config import TrainConfig
    from lora_sd.io import precision_dtype
    from lora_sd.targets import NetworkSpec, lora_configs
    from lora_sd.training.network import store_base_in_fp8
    from lora_sd.tiny import build_tiny_sd
    from lora_sd.training.noise import compute_loss
    from lora_sd.models.load import noise_scheduler

    weight_dtype = precision_dtype(weights, "--weights")
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(weight_dtype, "no")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # rows of other precisions may run in one process (the tests do)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed)
    device = accelerator.device
    unet, latent_side, hidden_size = build_unet(model, weight_dtype, device)
    if resolution:
        latent_side = resolution // 8
    unet_params = sum(p.numel() for p in unet.parameters())
    unet.requires_grad_(False)
    unet.add_adapter(lora_configs(unet, None, NetworkSpec(4, 1.0), train_text_encoder=False)["unet"])
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # the LoRA trains in float32 (sd-scripts without full_bf16), the base stays in `weights`
        p.data = p.data.float()
    if fp8_base:
        store_base_in_fp8([unet])  # the training's fp8_base: frozen Linear/Conv weights in float8
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = make_optimizer(optimizer, params)
    optimizer_name = type(optimizer).__name__
    unet, optimizer = accelerator.prepare(unet, optimizer)
    vae = build_tiny_sd("sd1").vae.to(device)  # only its scaling factor and device are used (latents are cached)
    cfg = TrainConfig(seed=0)
    gen = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(1, 4, latent_side, latent_side, generator=gen), "captions": ["a photo"],
             "loss_weights": torch.ones(1)}
    hidden = torch.randn(1, 77, hidden_size, generator=gen).to(device)
    pooled = torch.randn(1, 1280, generator=gen).to(device)  # text encoder 2's projection (SDXL)
    side = latent_side * 8
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32, device=device)
    scheduler = noise_scheduler()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with accelerator.autocast():
            if model == "sdxl":
                latents = batch["latents"].to(device) * 0.13025
                loss = sdxl_loss(unet, latents, hidden, pooled, time_ids, scheduler, gen, weight_dtype)
            else:
                loss = compute_loss(batch, unet=unet, text_conditioning=lambda captions: (hidden, None), vae=vae,
                                    scheduler=scheduler, cfg=cfg, generator=gen, weight_dtype=weight_dtype)
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
            "threads": torch.get_num_threads(), "resolution": latent_side * 8, "weights": weights,
            "optimizer": optimizer_name, "fp8_base": fp8_base,
            "unet_params": unet_params}


def row_args(model, gc, steps, threads, extra=()):
    return (["--model", model, "--steps", str(steps)] + (["--gradient_checkpointing"] if gc else [])
            + list(extra) + (["--threads", str(threads)] if threads else []))


def describe(r):
    if r["model"] == "tiny":
        return "64 px (tiny U-Net)", "float32, AdamW"
    if r["model"] == "sd15":
        return "512 px (SD 1.5 U-Net, 860M)", "float32, AdamW"
    extra = ", fp8_base" if r["fp8_base"] else ""
    return (f"{r['resolution']} px (SDXL U-Net, {r['unet_params'] / 1e9:.1f}B)",
            f"{r['weights']} base, float32 LoRA, {r['optimizer']}{extra}")


def run_table(rows_wanted, args):
    rows = []
    for model, gc, steps, extra in rows_wanted:
        if args.only and model != args.only:
            continue
        row = row_args(model, gc, args.steps or steps, args.threads, extra)
        cmd = "python benchmarks/train_speed.py " + " ".join(row)
        out = subprocess.run([sys.executable, __file__, *row, "--json"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])
        if out.returncode:
            print(f"{cmd}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append((json.loads(out.stdout.strip().splitlines()[-1]), cmd))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "sd15", "sdxl"],
                        help="run one row (default: all, each in a subprocess)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--only", choices=["tiny", "sd15", "sdxl"], help="table run: only this model's rows")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (after one warm-up step)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: 64 tiny, 512 SD 1.5, 1024 SDXL)")
    parser.add_argument("--weights", default="float", help="dtype of the base weights: float, bf16, fp16 (autocast)")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    parser.add_argument("--fp8_base", action="store_true",
                        help="frozen base weights in float8 (the training's fp8_base)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on shared cores 1 avoids OpenMP contention")
    parser.add_argument("--json", action="store_true", help="print the row as JSON (used by the table run)")
    parser.add_argument("--compare-floor", action="store_true",
                        help="our training step against the bare PEFT U-Net loop (--model tiny|sd15)")
    parser.add_argument("--rounds", type=int, default=5, help="--compare-floor: interleaved rounds")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="--compare-floor: wall time, or this thread's CPU time (with --threads 1: robust to "
                             "other processes on the cores)")
    parser.add_argument("--gpu", action="store_true", help="the CUDA rows (our training step, bf16, MFU, peak)")
    parser.add_argument("--dry", action="store_true", help="the CUDA rows' FLOPs and table shape, without timing")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a training option for --gpu/--compare-floor rows (repeatable), e.g. full_bf16=true")
    parser.add_argument("--peer", nargs=2, metavar=("sd-scripts", "PATH"),
                        help="--gpu: sd-scripts' train_network.py at PATH on the same data, side by side")
    parser.add_argument("--peer_steps", default="5,15", help="--peer: the two step counts n1,n2")
    parser.add_argument("--peer_dir", default=None, help="--peer: where its model and images are written once")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the GPU's peak dense bf16 TFLOP/s (default: known for common GPUs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_floor or args.gpu or args.dry:
        from lora_sd.errors import LoraSdError

        from benchmarks.modes import new_modes

        try:
            return new_modes(args, parser)
        except LoraSdError as e:  # a bad --option: one line, as the recipes say it
            parser.error(str(e))
    if args.model:
        steps = args.steps or (20 if args.model == "tiny" else 2)
        row = run_row(args.model, args.gradient_checkpointing, steps, args.resolution, args.weights,
                      args.optimizer, args.fp8_base)
        print(json.dumps(row) if args.json else row)
        return
    rows = run_table(ROWS, args)
    gpu_commands = ["python benchmarks/train_speed.py " + " ".join(row_args(m, gc, args.steps or n, None, extra))
                    for m, gc, n, extra in GPU_ROWS if not args.only or m == args.only]
    if torch.cuda.is_available():
        rows += run_table(GPU_ROWS, args)
        from benchmarks.modes import new_modes

        new_modes(parser.parse_args(["--gpu"]), parser)
    device = rows[0][0]["device"] if rows else "?"
    print(f"device: {device}, torch threads: {rows[0][0]['threads'] if rows else '?'}, batch 1, "
          "cached latents and text-encoder outputs, U-Net LoRA dim 4")
    print("| model | resolution | gradient checkpointing | precision, optimizer | s/step | peak memory (GiB) "
          "| command |")
    print("|---|---|---|---|---|---|---|")
    for r, cmd in rows:
        reso, precision = describe(r)
        print(f"| {r['model']} | {reso} | {'on' if r['gradient_checkpointing'] else 'off'} | {precision} | "
              f"{r['s_per_step']:.3f} | {r['peak_gib']:.2f} ({r['peak_kind']}) | `{cmd}` |")
    if not torch.cuda.is_available() and gpu_commands:
        print("\nGPU rows (no CUDA GPU here; on one, the table run includes them, or run each):")
        for cmd in gpu_commands:
            print(f"    {cmd}")


if __name__ == "__main__":
    main()
