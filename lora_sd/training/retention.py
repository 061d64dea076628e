"""save_last_n_epochs / save_last_n_steps (and their `_state` variants): older numbered saves removed.

sd-scripts' rules (train_util.get_remove_epoch_no / get_remove_step_no), applied after each numbered save:
- epochs: the last `save_last_n_epochs` every-n-epochs saves are kept (at epoch e, those of epochs up to
  e - save_every_n_epochs * n are removed);
- steps: the saves of the last `save_last_n_steps` steps are kept (at step s, those of steps up to
  s - n - 1 are removed);
- state folders alike with `save_last_n_epochs_state` / `save_last_n_steps_state` (default: the LoRA counts).
A LoRA save's `-ema` partner goes with it. The final save (`<output_name>`), its state and `-interrupted`
saves carry no number and are never removed. Unlike sd-scripts (which removes one name per save), every
expired number of the schedule is looked for, so a resumed run or a changed n leaves no stragglers.
"""

import logging
import shutil
from pathlib import Path

from lora_sd.training.checkpoint import lora_file_name, state_dir_name

logger = logging.getLogger(__name__)


def expired(number: int, every: int, keep: int | None, steps: bool) -> list[int]:
    """The numbers of the schedule `every` whose saves are removed after the save at `number`."""
    if not keep:
        return []
    last = number - keep - 1 if steps else number - every * keep
    return list(range(every, last + 1, every))


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    else:
        return
    logger.info("removed %s (an older save; save_last_n_*)", path)


def remove_old_saves(cfg, *, epoch: int | None = None, step: int | None = None):
    """After the save at `epoch` or `step` (main process only): remove what save_last_n_* no longer keeps."""
    out = Path(cfg.output_dir)
    if step is not None:
        number, every, key, keep, keep_state = (step, cfg.save_every_n_steps, "step", cfg.save_last_n_steps,
                                                cfg.save_last_n_steps_state or cfg.save_last_n_steps)
    else:
        number, every, key, keep, keep_state = (epoch, cfg.save_every_n_epochs, "epoch", cfg.save_last_n_epochs,
                                                cfg.save_last_n_epochs_state or cfg.save_last_n_epochs)
    for n in expired(number, every, keep, steps=step is not None):
        for suffix in ("", "-ema"):
            _remove(out / lora_file_name(cfg, suffix=suffix, **{key: n}))
    if cfg.save_state:
        for n in expired(number, every, keep_state, steps=step is not None):
            _remove(out / state_dir_name(cfg, **{key: n}))
