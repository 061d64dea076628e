"""`train_speed.py --gpu` (and `--dry`): lora-sd's own training step on a CUDA GPU, with MFU and peak memory.

Each row is a real LoraTraining (bench_setup.py) with mixed_precision bf16, SDPA, AdamW8bit, cached latents and
text-encoder outputs, U-Net LoRA rank 4, and the row's batch size and gradient checkpointing; `--option key=value`
adds training options (e.g. full_bf16=true, torch_compile=true). Timed: `steps` calls of `_train_step` after
`warmup` ones, between CUDA synchronizations. Peak: torch.cuda.max_memory_allocated from after the setup (the
model is on the GPU, the caches filled) to the last step. MFU: the FLOPs of one step (the U-Net's forward and
backward with the LoRA, counted once with torch.utils.flop_counter.FlopCounterMode on the meta device, without
gradient checkpointing's recomputation: model FLOPs) / the step time / the GPU's peak dense bf16 FLOP/s.
"""

import re
import time
from dataclasses import dataclass

import torch

from benchmarks.bench_setup import bench_training, build_model, run_steps

# Peak dense (no 2:4 sparsity) bf16 tensor FLOP/s, in TFLOP/s, from the vendors' datasheets; the first pattern
# that matches torch.cuda.get_device_name() wins (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = [
    (r"H200", 989.4), (r"H100.*PCIe", 756.0), (r"H100.*NVL", 835.0), (r"H100|H800", 989.4),
    (r"A100|A800", 312.0), (r"L40S", 362.05), (r"L40\b", 181.05), (r"\bL4\b", 121.0), (r"\bA10\b", 125.0),
    (r"RTX 4090", 165.2), (r"RTX 3090", 71.0), (r"RTX A6000", 154.8), (r"RTX 6000 Ada", 364.2),
    (r"\bT4\b", 65.0),  # T4 has no bf16 tensor cores: its fp16 figure
]

GOALS = {  # issue 13's goals, printed beside the rows they are about
    "sd15 512 px, batch 16": "goal: >= 40% MFU",
    "sd15 512 px, batch 1, checkpointing": "goal: peak <= 4 GiB",
}
PEER_GOAL = "goal: >= 1.3x sd-scripts' it/s"


@dataclass(frozen=True)
class Row:
    model: str  # sd15 | sdxl (the dry test: tiny)
    resolution: int
    batch: int
    gradient_checkpointing: bool

    @property
    def name(self):
        return (f"{self.model} {self.resolution} px, batch {self.batch}"
                + (", checkpointing" if self.gradient_checkpointing else ""))


ROWS = [Row("sd15", 512, 1, False), Row("sd15", 512, 1, True), Row("sd15", 512, 16, False),
        Row("sd15", 512, 16, True), Row("sdxl", 1024, 1, True)]
HEADERS = ["row", "it/s", "images/s", "peak GiB", "GFLOP/step", "MFU", "sd-scripts it/s", "ours / sd-scripts",
           "goal"]


def peak_tflops(device_name: str):
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def row_options(row: Row, extra: dict) -> dict:
    """The row's training options (TrainConfig names), then `extra` (`--option key=value`) over them."""
    return {"mixed_precision": "bf16", "sdpa": True, "optimizer_type": "AdamW8bit", "cache_latents": True,
            "cache_text_encoder_outputs": True, "gradient_checkpointing": row.gradient_checkpointing, **extra}


def count_step_flops(model: str, resolution: int, batch: int, device="meta") -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of the U-Net with a rank-4 LoRA (base frozen) at `batch` x
    `resolution` px, counted by FlopCounterMode. On the meta device nothing is computed or allocated."""
    from diffusers import UNet2DConditionModel

    from lora_sd import tiny
    from lora_sd.models import sd_configs
    from lora_sd.targets import NetworkSpec, lora_configs

    config = tiny.unet_config("sd1") if model == "tiny" else sd_configs.shipped_configs(
        "sdxl" if model == "sdxl" else "sd1")["unet"]
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
        unet.requires_grad_(False)
        unet.add_adapter(lora_configs(unet, None, NetworkSpec(4, 1.0), train_text_encoder=False)["unet"])
        side = resolution // 8
        latents = torch.randn(batch, 4, side, side)
        context = torch.randn(batch, 77, config["cross_attention_dim"])
        timesteps = torch.zeros(batch, dtype=torch.long)
        added = None
        if config.get("addition_embed_type") == "text_time":  # SDXL: pooled projection and six size/crop ids
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            added = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.zeros(batch, 6)}
    return forward_backward_flops(lambda: unet(latents, timesteps, context, added_cond_kwargs=added).sample)


def forward_backward_flops(forward) -> tuple[int, int]:
    """(FLOPs of `forward()`, FLOPs of it and the backward of a scalar loss on its output), by FlopCounterMode.
    Frozen weights get no weight gradient, so a frozen base's backward is about one forward (input gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = forward()
        flops = counter.get_total_flops()
        out.float().square().mean().backward()
    return flops, counter.get_total_flops()


def time_row(row: Row, extra: dict, steps=10, warmup=3, device="cuda") -> dict:
    """Our training step on this row: s/step and peak GiB (CUDA: max_memory_allocated; the CPU test: None)."""
    cuda = device == "cuda"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 (the training casts to it anyway): SDXL is 10 GiB in fp32
    try:
        sd_model = build_model(row.model, device)
    finally:
        torch.set_default_dtype(default)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with bench_training(sd_model, row.resolution, row.batch, row_options(row, extra)) as (run, batch):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        run_steps(run, batch, warmup)
        sync()
        start = time.perf_counter()
        run_steps(run, batch, steps)
        sync()
        seconds = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        cfg, optimizer = run.cfg, run.optimizer_name
    del sd_model, run
    if cuda:
        torch.cuda.empty_cache()
    return {"s_per_step": seconds, "peak_gib": peak, "cfg": cfg, "optimizer": optimizer}


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def table_lines(rows: list[Row], flops: dict, timings: dict, peers: dict, peak: float | None) -> list[str]:
    """The markdown table: one line per row; a figure not measured (dry, no peer) is `—`."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        t, step_flops, peer = timings.get(row), flops.get(row), peers.get(row)
        its = 1 / t["s_per_step"] if t else None
        mfu = step_flops * its / (peak * 1e12) if its and step_flops and peak else None
        peer_its = 1 / peer if peer else None
        goal = "; ".join(g for g in (GOALS.get(row.name), PEER_GOAL) if g)
        lines.append("| " + " | ".join([
            row.name, fmt(its, ".2f"), fmt(its * row.batch if its else None, ".1f"),
            fmt(t["peak_gib"] if t else None, ".2f"),
            fmt(step_flops / 1e9 if step_flops else None, ".0f" if step_flops and step_flops >= 1e11 else ".4g"),
            fmt(mfu * 100 if mfu else None, ".1f") + ("%" if mfu else ""), fmt(peer_its, ".2f"),
            fmt(its / peer_its if its and peer_its else None, ".2f"), goal]) + " |")
    return lines


def count_all(rows: list[Row], flops_model=None, resolution=None, report=print) -> dict:
    """{row: forward + backward FLOPs}; `flops_model` (the test: 'tiny') counts that model at `resolution`
    instead of each row's own. A count that fails on the meta device is left out (the table shows `—`)."""
    counted = {}
    for row in rows:
        key = (flops_model or row.model, resolution or row.resolution, row.batch)
        if key not in counted:
            try:
                counted[key] = count_step_flops(*key)[1]
            except (RuntimeError, NotImplementedError) as e:  # an op without a meta kernel
                report(f"FLOPs of {row.name}: not counted on the meta device ({type(e).__name__}: {e})")
                counted[key] = None
    return {row: counted[(flops_model or row.model, resolution or row.resolution, row.batch)] for row in rows}


def dry(rows=ROWS, flops_model=None, resolution=None, report=print) -> dict:
    """No timing: the FLOPs of one step of each row's model and the table's shape, figures as `—`."""
    flops = count_all(rows, flops_model, resolution, report)
    lines = table_lines(rows, flops, {}, {}, None)
    for line in lines:
        report(line)
    return {"flops": flops, "lines": lines}


def gpu(rows=ROWS, extra=None, steps=10, peer=None, peak=None, report=print) -> list[str]:
    """Every row timed on CUDA (and by `peer(row)` -> sd-scripts' s/step, when given); the table."""
    name = torch.cuda.get_device_name()
    peak = peak or peak_tflops(name)
    report(f"device: {name}, peak dense bf16 {fmt(peak, '.1f')} TFLOP/s (--peak_tflops to set), torch "
           f"{torch.__version__}, options {extra or {}}")
    flops = count_all(rows, report=report)
    timings, peers = {}, {}
    for row in rows:
        timings[row] = time_row(row, extra or {}, steps)
        report(f"{row.name}: {timings[row]['s_per_step']:.4f} s/step, peak {timings[row]['peak_gib']:.2f} GiB")
        if peer:
            peers[row] = peer(row)
    lines = table_lines(rows, flops, timings, peers, peak)
    for line in lines:
        report(line)
    return lines
