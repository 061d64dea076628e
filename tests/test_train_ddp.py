"""Two processes with DDP on CPU (gloo): gradients are synchronised, and only the main process writes.

The test launches this file with `python -m accelerate.commands.launch` (no `accelerate` on PATH needed);
as the launched script, it trains twice in each process, one SGD step with and one without gradient
sync, and saves every rank's LoRA weights. With plain SGD one step is linear in the gradient, so the
synchronised update must equal the mean of the two unsynchronised ones.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("sync", "nosync")
# clip_skip 2: the text encoder's last layer gets no gradient (DDP must expect unused LoRA weights)
OPTIONS = ("--train_batch_size", "1", "--clip_skip", "2", "--optimizer_type", "SGDNesterov", "--max_grad_norm", "0",
           "--learning_rate", "1")


def lora_tensors(result) -> dict:
    return {f"{part}.{n}": p.detach().cpu().contiguous() for part, model in (("unet", result.unet),
            ("te", result.text_encoder)) for n, p in model.named_parameters() if "lora_" in n}


def worker(assets: Path, out: Path):
    """Run under accelerate launch: the three trainings in this process, then its weights per run."""
    import logging

    from accelerate import Accelerator
    from safetensors.torch import save_file

    from tests.test_train import args, train_recipe

    logging.basicConfig(level=logging.INFO)
    Accelerator.end_training = lambda self: None  # the runs share one process group (end_training destroys it)
    real_accumulate = Accelerator.accumulate
    rank = int(os.environ["RANK"])  # set by the launcher (a PartialState made here would not be the CPU one)
    for run in RUNS:
        if run == "nosync":
            @contextlib.contextmanager
            def accumulate_without_sync(self, *models):
                with real_accumulate(self, *models), contextlib.ExitStack() as stack:
                    for m in models:
                        stack.enter_context(self.no_sync(m))
                    yield

            Accelerator.accumulate = accumulate_without_sync
        result = train_recipe.main(args(assets, out / run, *OPTIONS, steps=1))
        save_file(lora_tensors(result), str(out / f"{run}-rank{rank}.safetensors"))
    import torch.distributed

    torch.distributed.destroy_process_group()


def test_two_processes_ddp_synchronise_gradients(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: DDP over gloo, only the main process writes."""
    import torch
    from safetensors.torch import load_file

    from tests.test_train import kohya_file, make_assets

    assets = make_assets(tmp_path / "assets")
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__, str(assets), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the recipe's outputs: written once, by the main process
    assert sorted(p.name for p in (out / "sync").iterdir()) == ["lora-config.toml", "lora.safetensors"]
    _, meta = kohya_file(out / "sync" / "lora.safetensors")
    assert meta["ss_total_batch_size"] == "2" and meta["ss_steps"] == "1"
    assert "2 process(es)" in proc.stderr and proc.stdout.count("trained 1 steps") == 2  # once per run
    # gradient sync: both ranks hold the same weights after the synchronised step ...
    w = {(run, r): load_file(str(out / f"{run}-rank{r}.safetensors")) for run in RUNS for r in (0, 1)}
    assert all(torch.equal(w["sync", 0][k], w["sync", 1][k]) for k in w["sync", 0])
    # ... which without sync they would not (each rank saw other images and noise) ...
    ups = [k for k in w["sync", 0] if "lora_B" in k]
    assert any(not torch.allclose(w["nosync", 0][k], w["nosync", 1][k]) for k in ups)
    # ... and the synchronised step is the mean of the two local ones (up weights start at 0: they are the update)
    for k in ups:
        mean = (w["nosync", 0][k] + w["nosync", 1][k]) / 2
        torch.testing.assert_close(w["sync", 0][k], mean, rtol=1e-4, atol=1e-6 * (1 + mean.abs().max().item()))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
