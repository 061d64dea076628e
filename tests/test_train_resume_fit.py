"""A state resumed into a run whose epochs are shorter than where the state stopped (fewer images, a larger batch)
is refused: the epoch could never end, and the run looped forever."""

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
