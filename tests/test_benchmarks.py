"""The benchmark scripts run (a table nobody can produce is no benchmark): one tiny step of each training row kind."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train_speed():
    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "benchmarks" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("weights, fp8_base", [("float", False), ("bf16", True)])
def test_train_speed_runs_a_tiny_row(weights, fp8_base):
    row = _train_speed().run_row("tiny", False, 1, None, weights, "adamw", fp8_base)
    assert row["steps"] == 1 and row["s_per_step"] > 0 and row["fp8_base"] is fp8_base and row["lora_params"] > 0
