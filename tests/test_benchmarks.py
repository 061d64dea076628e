"""The benchmark scripts run (a table nobody can produce is no benchmark): one tiny step of each training row kind,
the speed-floor comparison, the GPU rows' dry mode (FLOP counts, table shape) and the sd-scripts peer plumbing."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks' modules import each other as benchmarks.*


def _train_speed():
    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "benchmarks" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("weights, fp8_base", [("float", False), ("bf16", True)])
def test_train_speed_runs_a_tiny_row(weights, fp8_base):
    row = _train_speed().run_row("tiny", False, 1, None, weights, "adamw", fp8_base)
    assert row["steps"] == 1 and row["s_per_step"] > 0 and row["fp8_base"] is fp8_base and row["lora_params"] > 0


def test_compare_floor_runs_our_training_step_and_prints_a_ratio(monkeypatch):
    from benchmarks.speed_floor import compare_floor
    from lora_sd.training.loop import LoraTraining

    calls, real = [], LoraTraining._train_step
    monkeypatch.setattr(LoraTraining, "_train_step", lambda self, batch: calls.append(1) or real(self, batch))
    lines = []
    result = compare_floor("tiny", 64, rounds=1, steps=1, report=lines.append)
    assert len(calls) == 2  # the warm-up and the timed step: lora-sd's own step, not a copy of it
    assert len(result["ratios"]) == 1 and result["ratios"][0] > 0 and result["median"] == result["ratios"][0]
    assert lines[0].startswith("aten ops per step: bare ") and 0 < result["ops"]["bare"] < result["ops"]["ours"]
    assert "round 1:" in lines[1] and "ratio" in lines[1] and "ours / bare median" in lines[-1]


def test_flop_count_of_a_layer_matches_the_hand_count():
    from benchmarks.gpu_rows import forward_backward_flops

    layer, x = torch.nn.Linear(16, 8, bias=False), torch.randn(4, 16)
    matmul = 2 * 4 * 16 * 8  # multiply-adds of x @ W.T, two FLOPs each
    assert forward_backward_flops(lambda: layer(x)) == (matmul, 2 * matmul)  # + the weight's gradient
    layer.requires_grad_(False)
    assert forward_backward_flops(lambda: layer(x.requires_grad_())) == (matmul, 2 * matmul)  # + the input's


def test_dry_mode_counts_each_rows_step_and_prints_the_tables_shape():
    from benchmarks import gpu_rows

    lines = []
    result = gpu_rows.dry(flops_model="tiny", resolution=64, report=lines.append)
    forward, step = gpu_rows.count_step_flops("tiny", 64, 1)
    # the LoRA's U-Net with its base frozen: the backward is about one more forward (input gradients only)
    assert 1.9 < step / forward < 2.6
    assert gpu_rows.count_step_flops("tiny", 64, 16)[1] == 16 * step
    assert [result["flops"][row] for row in gpu_rows.ROWS] == [16 * step if row.batch == 16 else step
                                                               for row in gpu_rows.ROWS]
    header, _, *rows = lines
    assert header == "| " + " | ".join(gpu_rows.HEADERS) + " |" and "MFU" in header and "peak GiB" in header
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [
        "sd15 512 px, batch 1", "sd15 512 px, batch 1, checkpointing", "sd15 512 px, batch 16",
        "sd15 512 px, batch 16, checkpointing", "sdxl 1024 px, batch 1, checkpointing"]
    for r in rows:  # it/s, images/s, peak and MFU are not measured in the dry mode; the FLOPs are
        cells = r.strip("| ").split(" | ")
        assert cells[1:4] == ["—"] * 3 and cells[5:8] == ["—"] * 3 and float(cells[4]) > 0
    assert "40% MFU" in rows[2] and "4 GiB" in rows[1]


def test_a_gpu_row_runs_our_training_with_its_options_and_the_extra_ones():
    from benchmarks import gpu_rows

    row = gpu_rows.Row("tiny", 64, 2, True)
    options = gpu_rows.row_options(row, {})
    assert options["optimizer_type"] == "AdamW8bit" and options["mixed_precision"] == "bf16"
    # the CPU stand-in for a CUDA row: AdamW instead of AdamW8bit (bitsandbytes' CPU path takes seconds a step)
    timing = gpu_rows.time_row(row, {"optimizer_type": "AdamW", "max_grad_norm": "0.5"}, steps=1, warmup=1,
                               device="cpu")
    cfg = timing["cfg"]
    assert timing["s_per_step"] > 0 and cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing
    assert cfg.cache_latents and cfg.cache_text_encoder_outputs and cfg.train_batch_size == 2
    assert cfg.max_grad_norm == 0.5 and timing["optimizer"] == "torch.optim.adamw.AdamW"
    line = gpu_rows.table_lines([row], {row: 2 * 10**9}, {row: {"s_per_step": 0.5, "peak_gib": 3.0}}, {row: 1.0},
                                peak=4.0)[2]
    # 2 it/s, 4 images/s, 2 GFLOP x 2 it/s / 4 TFLOP/s = 0.1% MFU, sd-scripts 1 it/s: 2x
    assert line.split(" | ")[1:8] == ["2.00", "4.0", "3.00", "2", "0.1%", "1.00", "2.00"]


def test_peak_flops_of_known_gpus():
    from benchmarks.gpu_rows import peak_tflops

    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("NVIDIA L40S") == 362.05
    assert peak_tflops("NVIDIA L4") == 121.0 and peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert peak_tflops("Some New GPU") is None


FAKE_SD_SCRIPTS = '''
import json, sys, time
args = sys.argv[1:]
steps = int(args[args.index("--max_train_steps") + 1])
time.sleep(0.6)  # "setup"
time.sleep(0.5 * steps)
with open(__file__ + f".{steps}.json", "w") as f:
    json.dump(args, f)
'''


def test_peer_runs_sd_scripts_twice_and_takes_the_step_time_from_the_difference(tmp_path):
    from benchmarks import peer
    from benchmarks.gpu_rows import Row

    fake = tmp_path / "sd-scripts"
    fake.mkdir()
    for script in ("train_network.py", "sdxl_train_network.py"):
        (fake / script).write_text(FAKE_SD_SCRIPTS)
    data = {"model": tmp_path / "model", "images": tmp_path / "images"}
    seconds = peer.peer_step_time(fake, Row("sd15", 512, 16, True), data, tmp_path / "out", steps=(1, 3))
    assert 0.4 < seconds < 0.62  # 0.5 s a step; the setup cancels out
    argv = json.loads((fake / "train_network.py.3.json").read_text())
    assert json.loads((fake / "train_network.py.1.json").read_text())[:argv.index("--max_train_steps")] == \
        argv[:argv.index("--max_train_steps")]
    flags = dict(zip(argv, argv[1:]))
    assert flags["--pretrained_model_name_or_path"] == str(tmp_path / "model")
    assert flags["--train_data_dir"] == str(tmp_path / "images") and flags["--resolution"] == "512,512"
    assert flags["--train_batch_size"] == "16" and flags["--optimizer_type"] == "AdamW8bit"
    assert flags["--mixed_precision"] == "bf16" and flags["--network_module"] == "networks.lora"
    assert flags["--network_dim"] == "4" and flags["--max_train_steps"] == "3"
    assert {"--gradient_checkpointing", "--cache_latents", "--sdpa", "--network_train_unet_only"} <= set(argv)
    assert "--cache_text_encoder_outputs" not in argv  # sd-scripts' SD 1.x script has no such cache
    peer.peer_step_time(fake, Row("sdxl", 1024, 1, False), data, tmp_path / "out", steps=(1, 2))
    argv = json.loads((fake / "sdxl_train_network.py.2.json").read_text())
    assert "--cache_text_encoder_outputs" in argv and "--gradient_checkpointing" not in argv
