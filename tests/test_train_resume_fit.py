"""A state resumed into a run whose epochs are shorter than where the state stopped (fewer images, a larger batch)
is refused (the epoch could never end: the run looped forever); an output_dir inside an input folder and a logging_dir
that cannot be a folder are refused before any work."""

import pytest

from lora_sd.cli import run_main
from tests.test_train import args, assets, train_recipe  # noqa: F401 (assets is a fixture)


def test_a_state_further_into_its_epoch_than_this_run_s_epochs_is_refused(assets, tmp_path, capsys):  # noqa: F811
    first = tmp_path / "first"  # 4 images x 2 repeats, batch 1: 8 batches per epoch; the state is 6 into it
    assert run_main(train_recipe.main, args(assets, first, "--save_state", steps=6)) == 0
    state = first / "lora-state"
    out = tmp_path / "second"  # batch 4: 2 batches per epoch
    assert run_main(train_recipe.main, args(assets, out, "--resume", str(state), "--train_batch_size", "4",
                                            steps=8)) == 2
    err = capsys.readouterr().err
    assert f"error: `resume` {state}: the state is 6 batches into its epoch, but this run's epochs have 2" in err
    assert not (out / "lora.safetensors").exists()
    # the same state with the batch size it was saved with resumes
    assert run_main(train_recipe.main, args(assets, out, "--resume", str(state), steps=8)) == 0


@pytest.mark.parametrize("where", ["images", "images/2_sks shape", "model"])
def test_an_output_dir_inside_an_input_folder_is_refused_before_any_work(assets, tmp_path, capsys, where):  # noqa: F811
    """output_dir = the image folder (or one inside it, or the model folder) added the LoRA and its config to
    that input with exit 0."""
    before = sorted(p.name for p in (assets / where).iterdir())
    assert run_main(train_recipe.main, args(assets, assets / where)) == 2
    assert f"error: `output_dir`/`output_name` {assets / where / 'lora'}: is inside the input" in capsys.readouterr().err
    assert sorted(p.name for p in (assets / where).iterdir()) == before


def test_a_logging_dir_that_cannot_be_a_folder_is_refused_before_any_work(assets, tmp_path, capsys):  # noqa: F811
    """logging_dir = an existing file was an AttributeError traceback from the TensorBoard tracker."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "out"
    assert run_main(train_recipe.main, args(assets, out, "--logging_dir", str(tmp_path / "afile"))) == 2
    assert f"error: `logging_dir` {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file" in capsys.readouterr().err
    assert not out.exists()


def test_an_output_dir_below_the_working_directory_is_fine_without_a_config_file(assets, tmp_path, monkeypatch):  # noqa: F811
    """No config file leaves cfg.source empty: it must not count as an input (Path("") is the working folder)."""
    monkeypatch.chdir(tmp_path)
    assert run_main(train_recipe.main, args(assets, "out", steps=1)) == 0
    assert (tmp_path / "out" / "lora.safetensors").is_file()
