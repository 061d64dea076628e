"""torch_compile / dynamo_backend: the U-Net trains compiled over three buckets without compiling per bucket, and
nothing compiled reaches the files (LoRA, EMA, training state, samples); the refusals."""

import json
import random

import pytest
import torch

from lora_sd.demo import draw_image
from lora_sd.training import compile as compile_module
from lora_sd.training import loop
from tests.test_train import args, assets, kohya_file, refused_run, train_recipe  # noqa: F401  (assets: fixture)

BUCKETS = ("--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16",
           "--train_batch_size", "1")


def bucket_args(assets, images, out, *extra, steps=4):  # noqa: F811
    argv = args(assets, out, *BUCKETS, "--network_train_unet_only", *extra, steps=steps)
    argv[argv.index("--train_data_dir") + 1] = str(images)
    return argv


@pytest.fixture(scope="module")
def bucket_images(tmp_path_factory):
    """Three images of three aspect ratios: three buckets at resolution 64."""
    sub = tmp_path_factory.mktemp("buckets") / "1_sks shape"
    sub.mkdir()
    rng = random.Random(0)
    for i, size in enumerate([(64, 64), (128, 64), (64, 128)]):
        draw_image(rng).resize(size).save(sub / f"{i}.png")
        (sub / f"{i}.caption").write_text("a photo of sks shape")
    return sub.parent


def state_keys(folder):
    return {f.name: set(kohya_file(f)[0]) for f in sorted(folder.glob("*.safetensors"))}


def test_compiled_unet_trains_over_buckets_and_files_match_an_uncompiled_run(assets, bucket_images, tmp_path,
                                                                             monkeypatch):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks shape --w 64 --h 64 --s 2\n")
    common = ("--save_state", "--ema_decay", "0.5", "--sample_prompts", str(prompts), "--sample_every_n_steps", "4")
    forwards = []

    def compiled_forward(cfg, models):
        forwards.append(compile_module.compiled_forward(cfg, models))
        return forwards[-1]

    monkeypatch.setattr(loop, "compiled_forward", compiled_forward)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = train_recipe.main(bucket_args(assets, bucket_images, tmp_path / "compiled", *common, "--torch_compile",
                                           "--dynamo_backend", "eager"))
    assert isinstance(forwards[0]["unet"], torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(result.unet, torch._dynamo.eval_frame.OptimizedModule)  # the result: the plain module
    compiled, meta = kohya_file(tmp_path / "compiled" / "lora.safetensors")
    assert len(json.loads(meta["ss_bucket_info"])["buckets"]) == 3
    # dynamic=None: one compilation for the first bucket, one with symbolic sizes for every other (per bucket: 3)
    assert torch._dynamo.utils.counters["frames"]["total"] <= 2

    train_recipe.main(bucket_args(assets, bucket_images, tmp_path / "plain", *common))
    for name in ("lora.safetensors", "lora-ema.safetensors"):
        got, want = kohya_file(tmp_path / "compiled" / name)[0], kohya_file(tmp_path / "plain" / name)[0]
        assert got.keys() == want.keys()
        assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7) for k in want), name
    assert state_keys(tmp_path / "compiled" / "lora-state") == state_keys(tmp_path / "plain" / "lora-state")
    assert (tmp_path / "compiled" / "sample" / "lora_000004_00.png").is_file()


@pytest.mark.parametrize("extra, words", [
    (["--dynamo_backend", "inductr"], "`dynamo_backend` must be one of eager, aot_eager, inductor"),
    (["--torch_compile", "--xformers"], "remove `xformers`"),
    (["--torch_compile", "--network_args", "module_dropout=0.1"], "with module_dropout"),
])
def test_config_refusals(assets, tmp_path, capsys, extra, words):  # noqa: F811
    assert words in refused_run(assets, tmp_path / "out", extra, capsys)


def test_inductor_without_a_cpp_compiler_is_refused_before_the_model_loads(assets, tmp_path, capsys,
                                                                           monkeypatch):  # noqa: F811
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("lora_sd.models.load.load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    err = refused_run(assets, tmp_path / "out", ["--torch_compile"], capsys)
    assert 'dynamo_backend = "inductor"` cannot run here' in err and "no C++ compiler" in err


def test_backends_that_cannot_run_here(monkeypatch):
    registered = {"eager", "aot_eager", "inductor", "cudagraphs"}
    assert compile_module._unavailable("eager", "cpu", registered) is None
    assert "CUDA graphs need a CUDA GPU" in compile_module._unavailable("cudagraphs", "cpu", registered)
    assert "no such backend" in compile_module._unavailable("nvprims_nvfuser", "cuda", registered)
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: False)
    assert "triton is not installed" in compile_module._unavailable("inductor", "cuda", registered)
