"""`train_speed.py --peer sd-scripts PATH`: sd-scripts' train_network.py (sdxl_train_network.py for SDXL) on the
same model and images as our GPU rows, as a subprocess, with the equivalent options.

Its step time is (t2 - t1) / (n2 - n1) from two runs of n1 and n2 steps: the setup (model load, latent caching)
cancels out. The model is written once as a diffusers folder (sd-scripts loads those), the images are
bench_setup's dataset (`<repeats>_bench/0.png` + `0.txt`). Option names follow sd-scripts' train_util /
train_network argument parsers. sd-scripts' SD 1.x script has no text-encoder output cache (its text encoder
runs each step under no_grad), so `--cache_text_encoder_outputs` goes to the SDXL script only.
"""

import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_setup import build_model, write_images


def write_peer_data(root: Path, model_name: str, resolution: int) -> dict:
    """{'model': diffusers folder, 'images': train_data_dir} under `root`, written once (kept if there): the
    random model of bench_setup.build_model with its full-size VAE and text encoders, in fp16."""
    from lora_sd.models import save_diffusers

    root = Path(root)
    model = root / f"model-{model_name}"
    if not (model / "unet" / "config.json").is_file():
        save_diffusers(build_model(model_name, "cpu", full_encoders=True), model, save_precision="fp16")
    return {"model": model, "images": write_images(root / f"data-{resolution}", resolution)}


def peer_args(row, data: dict, steps: int, out: Path, extra=()) -> list[str]:
    """sd-scripts' command line (after the script) for `row` (gpu_rows.Row) and `steps` steps."""
    r = row.resolution
    args = ["--pretrained_model_name_or_path", str(data["model"]), "--train_data_dir", str(data["images"]),
            "--caption_extension", ".txt", "--resolution", f"{r},{r}", "--train_batch_size", str(row.batch),
            "--max_train_steps", str(steps), "--network_module", "networks.lora", "--network_dim", "4",
            "--network_alpha", "1", "--network_train_unet_only", "--learning_rate", "1e-4",
            "--optimizer_type", "AdamW8bit", "--mixed_precision", "bf16", "--sdpa", "--cache_latents",
            "--max_data_loader_n_workers", "0", "--seed", "0", "--output_dir", str(out), "--output_name", "bench",
            "--save_model_as", "safetensors"]
    if row.model == "sdxl":
        args.append("--cache_text_encoder_outputs")
    if row.gradient_checkpointing:
        args.append("--gradient_checkpointing")
    return args + list(extra)


def script_for(row) -> str:
    return "sdxl_train_network.py" if row.model == "sdxl" else "train_network.py"


def run_peer(path: Path, row, data: dict, steps: int, out: Path, extra=()) -> float:
    """Seconds of one sd-scripts run of `steps` steps (setup included); a failed run raises with its output's
    last lines."""
    cmd = [sys.executable, str(Path(path) / script_for(row)), *peer_args(row, data, steps, out, extra)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=path, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"sd-scripts failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}")
    return seconds


def peer_step_time(path: Path, row, data: dict, out: Path, steps=(5, 15), extra=()) -> float:
    """sd-scripts' seconds per step: (t2 - t1) / (n2 - n1) over runs of n1 and n2 steps."""
    (n1, n2) = steps
    t1 = run_peer(path, row, data, n1, Path(out) / f"n{n1}", extra)
    t2 = run_peer(path, row, data, n2, Path(out) / f"n{n2}", extra)
    return (t2 - t1) / (n2 - n1)
