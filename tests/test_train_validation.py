"""Validation loss: the split (deterministic, never regularization images), the loss at fixed timesteps and
noise (equal to an independent computation, the same across runs, with cached latents too), its logs."""

import math
import random
import sys
from pathlib import Path

import pytest
import torch

from lora_sd.cli import run_main
from tests.test_train import args, make_assets, train_recipe


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("valid_assets"))


def _index(assets, fraction, seed):
    from lora_sd.data.dataset_config import dreambooth_dataset_config
    from lora_sd.data.index import build_index

    configs = dreambooth_dataset_config(assets / "images", assets / "reg", resolution=64)
    return build_index(configs, validation_split=fraction, validation_seed=seed).to_list()


def test_split_is_deterministic_and_never_holds_regularization_images(assets):
    rows = _index(assets, 0.5, 7)
    assert rows == _index(assets, 0.5, 7)
    train = [r for r in rows if not r["is_reg"]]
    held = sorted(r["image_path"] for r in train if r["is_val"])
    # sd-scripts' split_train_val: the subset's images (sorted) shuffled with random.Random(seed), the first
    # ceil(n * (1 - split)) train, the rest validate
    order = sorted(r["image_path"] for r in train)
    random.Random(7).shuffle(order)
    assert held == sorted(order[math.ceil(len(order) * 0.5):]) and len(held) == 2
    assert not any(r["is_val"] for r in rows if r["is_reg"])
    assert held != sorted(r["image_path"] for r in _index(assets, 0.5, 8) if r["is_val"])  # the seed decides
    # the regularization images balance the 2 training images x 2 repeats left, not the 4 x 2 before the split
    assert sum(r["num_repeats"] for r in rows if r["is_reg"]) == 4


def test_a_dataset_toml_sets_its_own_split(assets, tmp_path):
    """sd-scripts' dataset-config keys: validation_split / validation_seed in [general] or a [[datasets]] table
    (the training options are their defaults); a bad value names its table."""
    from lora_sd.data.dataset_config import load_dataset_config
    from lora_sd.data.index import build_index
    from lora_sd.errors import ConfigError

    subsets = [{"image_dir": str(assets / "images" / "2_sks shape")}, {"image_dir": str(assets / "reg" / "1_shape"),
                                                                      "is_reg": True}]
    raw = {"general": {"validation_split": 0.5, "resolution": 64}, "datasets": [{"validation_seed": 7,
                                                                                  "subsets": subsets}]}
    rows = build_index(load_dataset_config(raw, path_for_errors="d.toml"), validation_seed=99).to_list()
    held = sorted(r["image_path"] for r in rows if r["is_val"])
    assert len(held) == 2 and held == sorted(r["image_path"] for r in _index(assets, 0.5, 7) if r["is_val"])
    raw["datasets"][0]["validation_split"] = 1.0
    with pytest.raises(ConfigError, match=r"validation_split.*\[0, 1\)"):
        load_dataset_config(raw, path_for_errors="d.toml")


def test_training_never_sees_the_validation_images(assets):
    from lora_sd.data import build_train_data
    from lora_sd.data.dataset_config import dreambooth_dataset_config

    configs = dreambooth_dataset_config(assets / "images", assets / "reg", resolution=64)
    data = build_train_data(configs, seed=1, max_data_loader_n_workers=0, validation_split=0.5, validation_seed=3)
    rows = _index(assets, 0.5, 3)
    held = {r["image_path"] for r in rows if r["is_val"]}
    seen = {p for epoch in range(3) for batch in (data.set_epoch(epoch) or data.dataloader)
            for p in batch["image_paths"]}
    assert seen and not seen & held
    validated = [p for batch in data.validation_loader(data.validation_batches) for p in batch["image_paths"]]
    assert sorted(validated) == sorted(held)
    assert data.num_train_images == 4 and len(data.index) == len(rows) - 2


def _independent_loss(assets, result, held_image: str, caption: str, seed: int) -> float:
    """The validation loss recomputed from its definition with the trained models (eval mode)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from lora_sd.data.transforms import load_pixels
    from lora_sd.models.load import noise_scheduler
    from lora_sd.training.validation import validation_generator

    vae = AutoencoderKL.from_pretrained(str(assets / "model" / "vae"))
    tokenizer = CLIPTokenizer.from_pretrained(str(assets / "model" / "tokenizer"))
    scheduler = noise_scheduler()
    unet, te = result.unet.eval(), result.text_encoder.eval()
    pixels, _ = load_pixels(held_image, (64, 64), (64, 64))
    ids = tokenizer([caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    losses = []
    with torch.no_grad():
        context = te(ids)[0]
        for j, t in enumerate((200, 400, 600, 800)):  # sd-scripts' four validation timesteps of [0, 1000)
            gen = validation_generator(seed, 0, j)
            latents = vae.encode(pixels[None]).latent_dist.sample(gen) * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=gen)
            timesteps = torch.randint(t, t + 1, (1,), generator=gen)
            pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, context).sample
            losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return sum(losses) / len(losses)


def test_validation_loss_equals_its_definition_and_is_logged(assets, tmp_path, capsys):
    """LoHa with module_dropout: validation runs the adapters in eval mode (no dropout), at the fixed timesteps
    and noise; the loss reaches the progress bar, the result and TensorBoard, and a second run gives it again."""
    extra = ("--validation_split", "0.25", "--validate_every_n_steps", "2", "--validation_seed", "5",
             "--network_module", "lycoris.kohya", "--network_args", "algo=loha", "module_dropout=0.5",
             "--train_batch_size", "1")
    result = train_recipe.main(args(assets, tmp_path / "a", *extra, "--logging_dir", str(tmp_path / "logs")))
    assert [(when, n) for when, n, _ in result.validation] == [("step", 2)]
    loss = result.validation[0][2]
    assert f"val_loss={loss:.4f}" in capsys.readouterr().err

    order = [str(assets / "images" / "2_sks shape" / f"{i}.png") for i in range(4)]
    random.Random(5).shuffle(order)
    held = order[3]
    caption = (assets / "images" / "2_sks shape" / held.replace(".png", ".caption").rsplit("/", 1)[1]).read_text()
    assert loss == pytest.approx(_independent_loss(assets, result, held, caption, 5), rel=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = events.Scalars("loss/validation/step_average")
    assert [(e.step, round(e.value, 5)) for e in logged] == [(2, round(loss, 5))]
    assert "loss/validation/step_divergence" in events.Tags()["scalars"]

    again = train_recipe.main(args(assets, tmp_path / "b", *extra))
    assert again.validation == result.validation


def test_validation_with_cached_latents_is_fixed_within_and_across_runs(assets, tmp_path):
    """Cached latents, every epoch (sd-scripts' default) and every 2 steps: the step-2 and epoch-1 validations
    see the same weights and give the same loss (fixed noise and timesteps); a second run gives every value again."""
    extra = ("--validation_split", "0.5", "--cache_latents", "--train_batch_size", "2", "--max_validation_steps", "1",
             "--validate_every_n_steps", "2")
    a = train_recipe.main(args(assets, tmp_path / "a", *extra, steps=4))  # 2 images x 2 repeats / 2: 2 steps/epoch
    b = train_recipe.main(args(assets, tmp_path / "b", *extra, steps=4))
    assert [(when, n) for when, n, _ in a.validation] == [("step", 2), ("epoch", 1), ("step", 4), ("epoch", 2)]
    losses = [v for *_, v in a.validation]
    assert losses[0] == losses[1] and losses[2] == losses[3] and all(math.isfinite(v) for v in losses)
    assert losses[0] != losses[2]  # the LoRA changed between them
    assert a.validation == b.validation


@pytest.mark.parametrize("option, value, words", [
    ("validation_split", "1", "[0, 1)"), ("validation_split", "-0.1", "[0, 1)"),
    ("validate_every_n_steps", "-1", ">= 1"), ("max_validation_steps", "0", ">= 1"),
    ("save_last_n_epochs", "-2", ">= 1"), ("ema_decay", "1", "(0, 1)"), ("ema_decay", "0", "(0, 1)"),
])
def test_bad_values_are_one_error_line_naming_the_option(assets, tmp_path, capsys, option, value, words):
    extra = ["--validation_split", "0.5"] if option != "validation_split" else []
    extra += ["--save_every_n_epochs", "1"] if option.startswith("save_last") else []
    code = run_main(train_recipe.main, args(assets, tmp_path / "out", *extra, f"--{option}", value))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and option in err[0] and words in err[0]
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("extra, option, words", [
    (("--save_last_n_steps", "2"), "save_last_n_steps", "needs `save_every_n_steps`"),
    (("--save_every_n_epochs", "1", "--save_last_n_epochs_state", "2"), "save_last_n_epochs_state",
     "needs `save_state`"),
    (("--ema_for_samples",), "ema_for_samples", "needs `ema_decay`"),
])
def test_options_without_what_they_need_are_refused(assets, tmp_path, capsys, extra, option, words):
    code = run_main(train_recipe.main, args(assets, tmp_path / "out", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and option in err[0] and words in err[0]
    assert not (tmp_path / "out").exists()

VALIDATION_DDP = ("--validation_split", "0.5", "--validate_every_n_steps", "1", "--learning_rate", "0",
                  "--train_batch_size", "1")


def _ddp_worker(assets, out):
    """Run under accelerate launch (2 processes): one step at learning rate 0, then this rank's validation."""
    import json
    import os

    result = train_recipe.main(args(assets, out / "run", *VALIDATION_DDP, steps=1))
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result.validation))


def test_two_processes_share_the_batches_and_gather_the_loss(assets, tmp_path):
    """2 validation images, one per process: every process reports the mean of both, the single-process value
    (the weights do not move at learning rate 0; each batch's noise depends on its place, not on the process)."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    single = train_recipe.main(args(assets, tmp_path / "single", *VALIDATION_DDP, steps=1)).validation
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__, str(assets),
           str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert "validation: 2 batches (1 on this process)" in proc.stderr
    for got in ranks:
        assert [(w, n) for w, n, _ in got] == [("step", 1)]
        assert got[0][2] == pytest.approx(single[0][2], rel=1e-6)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import logging

    logging.basicConfig(level=logging.INFO)
    _ddp_worker(Path(sys.argv[1]), Path(sys.argv[2]))
