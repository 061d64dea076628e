"""Optional parts of a training state folder (checkpoint.TrainingState.parts), beside its fixed files.

Each part is `<name>.safetensors` written with state_tree.save_tree (no pickle), for an object with
`state_dict()`, `load_state_dict(tree, path)` (refusing a misfit in one line) and `missing(folder)` (the
folder was saved without it: the part starts afresh). A part in the folder that this run does not have is
ignored (a run resumed without `ema_decay` drops the EMA).
"""

from pathlib import Path

from lora_sd.state_tree import load_tree, save_tree

NAMES = ("ema",)
FILES = {f"{name}.safetensors" for name in NAMES}


def save_parts(parts: dict, folder: Path):
    for name, part in parts.items():
        save_tree(part.state_dict(), folder / f"{name}.safetensors")


def read_parts(parts: dict, folder: Path, names: set[str]) -> dict:
    """The saved trees of this run's parts that the folder holds (read before anything is applied)."""
    return {name: load_tree(folder / f"{name}.safetensors") for name in parts if f"{name}.safetensors" in names}


def apply_parts(parts: dict, trees: dict, folder: Path):
    for name, part in parts.items():
        if name in trees:
            part.load_state_dict(trees[name], folder / f"{name}.safetensors")
        else:
            part.missing(folder)
