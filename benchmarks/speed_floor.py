"""`train_speed.py --compare-floor`: lora-sd's training step against the bare PEFT U-Net loop, same model, same
inputs, interleaved rounds (this machine's noise is +-10-20%: the median and the range of the per-round ratios).

The bare loop is what any LoRA training must do per step: noise, timesteps, add_noise, the U-Net forward with
the cached context, MSE, backward, AdamW step, zero_grad. Ours is `LoraTraining._train_step` as the loop calls
it (accelerate's accumulate, lora_strength, dropout_rng, the NaN check with its gather, gradient clipping, the
lr scheduler). Both train the same U-Net with the same LoRA parameters (each with its own AdamW state) on the
batch the training's own data loader gives (cached latents) and the training's cached text-encoder outputs.
"""

import statistics
import time
from collections import Counter

import torch
import torch.nn.functional as F

from benchmarks.bench_setup import bench_training, build_model, run_steps


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class BareLoop:
    """The floor: the fewest operations one LoRA training step needs, on the training's own U-Net and inputs."""

    def __init__(self, run, batch):
        self.unet = run.unet
        self.device = run.accelerator.device
        self.latents = (batch["latents"].to(self.device) * run.model.vae.config.scaling_factor).float()
        context, pooled = run.text_conditioning(batch["captions"])
        self.context = context.to(self.device)
        self.added = None
        if pooled is not None:  # SDXL: pooled projection and size/crop ids, cached as well
            from lora_sd.training.noise import time_ids

            self.added = {"text_embeds": pooled.to(self.device), "time_ids": time_ids(batch).to(self.device)}
        self.scheduler = run.model.scheduler
        self.optimizer = torch.optim.AdamW(run.params, lr=run.cfg.learning_rate)
        self.generator = torch.Generator().manual_seed(0)

    def steps(self, n: int):
        for _ in range(n):
            noise = torch.randn(self.latents.shape, generator=self.generator).to(self.device)
            timesteps = torch.randint(0, 1000, (self.latents.shape[0],), generator=self.generator).to(self.device)
            noisy = self.scheduler.add_noise(self.latents, noise, timesteps)
            pred = self.unet(noisy, timesteps, self.context, added_cond_kwargs=self.added).sample
            F.mse_loss(pred.float(), noise).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def op_counts(step) -> Counter:
    """{aten op: calls} of one `step(1)`, forward, backward and optimizer: what the step does, free of this
    machine's timing noise."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Count() as mode:
        step(1)
    return mode.counts


def extra_ops(ours: Counter, bare: Counter) -> str:
    """The ops ours runs more (or fewer) times than the bare loop, as `op +n` (a short list)."""
    diff = {op: ours[op] - bare[op] for op in ours.keys() | bare.keys() if ours[op] != bare[op]}
    return ", ".join(f"{op} {n:+d}" for op, n in sorted(diff.items(), key=lambda kv: -abs(kv[1]))) or "none"


def compare_floor(model="tiny", resolution=64, rounds=5, steps=None, gradient_checkpointing=False, options=None,
                  clock="wall", report=print) -> dict:
    """Interleaved rounds of `steps` bare steps and `steps` of ours (alternating which goes first); each round's
    ratio ours / bare. One untimed warm-up step of each first, its aten ops counted. `clock` "cpu": this
    thread's CPU time (time.thread_time) instead of wall time: with one torch thread (`--threads 1`; CPU
    autograd runs on the calling thread) it leaves out the time other processes hold the cores."""
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    steps = steps or (10 if model == "tiny" else 2)
    options = dict(options or {}, gradient_checkpointing=gradient_checkpointing)
    sd_model = build_model(model)
    with bench_training(sd_model, resolution, 1, options) as (run, batch):
        bare, device = BareLoop(run, batch), run.accelerator.device
        loops = {"bare": bare.steps, "ours": lambda n: run_steps(run, batch, n)}
        counts = {name: op_counts(step) for name, step in loops.items()}  # also the untimed warm-up step
        report(f"aten ops per step: bare {sum(counts['bare'].values())}, ours {sum(counts['ours'].values())}; "
               f"ours - bare: {extra_ops(counts['ours'], counts['bare'])}")
        ratios, seconds = [], {"bare": [], "ours": []}
        for r in range(rounds):
            for name in (("bare", "ours") if r % 2 == 0 else ("ours", "bare")):
                _sync(device)
                start = timer()
                loops[name](steps)
                _sync(device)
                seconds[name].append((timer() - start) / steps)
            ratios.append(seconds["ours"][-1] / seconds["bare"][-1])
            report(f"round {r + 1}: bare {seconds['bare'][-1]:.4f} s/step, ours {seconds['ours'][-1]:.4f} s/step, "
                   f"ratio {ratios[-1]:.3f}")
    result = {"model": model, "resolution": resolution, "gradient_checkpointing": gradient_checkpointing,
              "rounds": rounds, "clock": clock, "steps": steps, "ratios": ratios, "median": statistics.median(ratios),
              "min": min(ratios), "max": max(ratios), "bare_s": statistics.median(seconds["bare"]),
              "ours_s": statistics.median(seconds["ours"]), "threads": torch.get_num_threads(),
              "ops": {name: sum(c.values()) for name, c in counts.items()}}
    report(f"{model} {resolution} px, gradient checkpointing {'on' if gradient_checkpointing else 'off'}, "
           f"{rounds} rounds x {steps} steps, {result['threads']} threads, {clock} clock: ours / bare median "
           f"{result['median']:.3f} (range {result['min']:.3f}-{result['max']:.3f}); median s/step bare "
           f"{result['bare_s']:.4f}, ours {result['ours_s']:.4f}")
    return result
