"""Saving LoRA files during and after training, and the training state for resume.

LoRA files: `<output_name>.safetensors` at the end, `<output_name>-<epoch:06d>`
every n epochs and `<output_name>-step<step:08d>` every n steps (sd-scripts'
names), `<output_name>-interrupted` on Ctrl-C; kohya `.safetensors`/`.ckpt`, a
diffusers folder (`pytorch_lora_weights.safetensors`, what
`pipe.load_lora_weights(folder)` reads) or PEFT adapter folders. Only the main
process writes; writes are atomic.

Training state (`save_state`, `save_state_on_train_end`): a `<name>-state`
folder in our own format (`TrainingState`), written through `.<name>-state.tmp`.
It holds no pickle: `--resume` reads it as untrusted input and runs no code.
The resolved config (`resolved_config.config_toml`) is written beside the outputs.
"""

import dataclasses
import logging
import os
import random
import re
import shutil
from pathlib import Path

import torch

from lora_sd.errors import ConfigError, FormatError
from lora_sd.formats import save_lora
from lora_sd.io import atomic_path, failures_name, open_tensor_file, refuse_overwriting_inputs, replace
from lora_sd.lora_weights import LoraWeights
from lora_sd.training import precision, state_parts
from lora_sd.training.network import is_adapter_param
from lora_sd.state_tree import load_tree, save_tree, tree_from_json, tree_to_json

logger = logging.getLogger(__name__)


def _stem(cfg, epoch: int | None = None, step: int | None = None, interrupted: bool = False) -> str:
    if interrupted:
        return f"{cfg.output_name}-interrupted"
    if step is not None:
        return f"{cfg.output_name}-step{step:08d}"
    if epoch is not None:
        return f"{cfg.output_name}-{epoch:06d}"
    return cfg.output_name


def lora_file_name(cfg, epoch: int | None = None, step: int | None = None, interrupted: bool = False,
                   suffix: str = "") -> str:
    """`<output_name>[-<epoch>|-step<step>|-interrupted][suffix]` plus `.safetensors`/`.ckpt`; folders
    (diffusers, peft) have none. `suffix` "-ema": the EMA weights' save beside it."""
    stem = _stem(cfg, epoch, step, interrupted) + suffix
    return stem if cfg.save_model_as in ("diffusers", "peft") else f"{stem}.{cfg.save_model_as}"


def state_dir_name(cfg, epoch=None, step=None, interrupted: bool = False) -> str:
    return _stem(cfg, epoch, step, interrupted) + "-state"


def refuse_outputs_over_inputs(cfg):
    """A run writes `<output_name>` and `<output_name>-*` (LoRAs, states, config, interrupted saves) in
    `output_dir`: refuse, before any work, an input there under such a name (`network_weights =
    "out/last.safetensors"` with `output_name = "last"` would be overwritten by the run). The `resume` folder
    is not an input to protect: a run resumed from a state writes later states beside it."""
    out = Path(cfg.output_dir).resolve()
    inputs = [cfg.pretrained_model_name_or_path, cfg.network_weights, cfg.model_config, cfg.sample_prompts,
              cfg.source, cfg.dataset_config, cfg.train_data_dir, cfg.reg_data_dir]
    inputs += [p for ds in cfg.datasets for sub in ds.subsets for p in (sub.image_dir, sub.metadata_file)]
    # and no output_dir that is (or is inside) an input folder: the run would add its files to the images or model
    refuse_overwriting_inputs(out / cfg.output_name, [p for p in inputs if p], "`output_dir`/`output_name`")
    for given in filter(None, inputs):
        path = Path(given).resolve()
        name = path.name
        if path.parent == out and (name == cfg.output_name or name.startswith((f"{cfg.output_name}.",
                                                                              f"{cfg.output_name}-"))):
            raise ConfigError(f"`output_name` {cfg.output_name!r}: the run writes {out / cfg.output_name}* and "
                              f"would overwrite the input {given}; give another output_name or output_dir")


def trained_lora(accelerator, models: dict) -> LoraWeights:
    """The LoRA being trained, read from the (unwrapped) PEFT-adapted models {"unet": ..., "text_encoder": ...,
    "text_encoder_2": ...} (the parts trained)."""
    return LoraWeights.from_peft_models(**{name: accelerator.unwrap_model(m) for name, m in models.items()})


def write_lora(lora: LoraWeights, path: Path, cfg, *, version: str, unet_config=None) -> Path:
    """Write one LoRA file or folder in cfg.save_model_as, atomically (a failed write names `path`)."""
    dtype = precision.file_precision(cfg)  # save_precision, else the weights' dtype
    if cfg.save_model_as in ("safetensors", "ckpt", "pt"):
        return save_lora(lora, path, "kohya", dtype, version=version, unet_config=unet_config,
                         v_parameterization=cfg.v_parameterization, title=cfg.output_name)
    if cfg.save_model_as == "peft":
        return save_lora(lora, path, "peft", dtype)
    with atomic_path(path) as tmp:  # diffusers: a folder that load_lora_weights(folder) reads
        tmp.mkdir()
        save_lora(lora, tmp / "pytorch_lora_weights.safetensors", "diffusers", dtype)
    return path


def save_lora_file(accelerator, models: dict, cfg, metadata: dict, *, version: str, unet_config=None,
                   epoch=None, step=None, interrupted=False, suffix="") -> Path | None:
    """Save the current LoRA of `models` (the trained parts; main process only); returns its path.
    `unet_config`: the U-Net's, for SDXL's original-layout names."""
    accelerator.wait_for_everyone()
    path = Path(cfg.output_dir) / lora_file_name(cfg, epoch, step, interrupted, suffix)
    if accelerator.is_main_process:
        lora = trained_lora(accelerator, models)
        lora.metadata = dict(metadata)
        write_lora(lora, path, cfg, version=version, unet_config=unet_config)
        logger.info("saved %s", path)
    accelerator.wait_for_everyone()
    return path


class Progress:
    """Where the run is: optimizer steps done, epoch, batches done in that epoch (saved with the state)."""

    def __init__(self):
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0

    @property
    def epochs_begun(self) -> int:
        """Epochs done plus the one in progress: what ss_epoch and the summary report."""
        return self.epoch + (self.batches_in_epoch > 0)

    def state_dict(self):
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state):
        self.global_step, self.epoch = counter(state, "global_step"), counter(state, "epoch")
        self.batches_in_epoch = counter(state, "batches_in_epoch")


def counter(table: dict, key: str) -> int:
    """A saved count: a JSON integer from 0 to 2**63 - 1. int() would take -3 (a run that trains past its end),
    1.7 or true (silently truncated) and 10**30 (an absurd summary) from a hand-edited state.json."""
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"`{key}` must be an integer from 0 to {2**63 - 1}, got {value!r}")
    return value


STATE_FORMAT, STATE_VERSION = "lora-sd training state", 1
_ACCELERATE_NAMES = re.compile(r"(custom_checkpoint_\d+\.pkl|random_states_\d+\.pkl|(optimizer|scheduler|sampler|"
                               r"pytorch_model|dl_state_dict)(_\d+)?\.bin|scaler\.pt|model(_\d+)?\.safetensors)")


@dataclasses.dataclass
class TrainingState:
    """What `--resume` needs to continue a run bit-identically, in a folder that holds no pickle.

    The folder (all names fixed; anything else in it is refused on resume):
      state.json              JSON: format, version, num_processes, optimizer class, progress counters,
                              accelerate's micro-batch counter, the LR schedule's and the GradScaler's state_dict
      lora.safetensors        the adapter tensors, `<unet|text_encoder>.<PEFT parameter name>` (any kind)
      optimizer.safetensors   the optimizer's state_dict (io.save_tree: tensors + its structure as JSON metadata)
      rng-<rank>.safetensors  one per process (io.save_tree): python `random`, numpy and torch CPU (+ CUDA)
      ema.safetensors         (with ema_decay) the EMA of the LoRA weights (state_parts.py, ema.py)
                              generator states
    "Only the main process writes" means: the main process writes state.json, lora and optimizer (the same on
    every process under DDP); every process writes its own rng-<rank> file into the shared temporary folder (the
    output folder must be shared by the processes, as for accelerate); once all have written, the main process
    moves the folder into place. accelerate's save_state/load_state are not used: they pickle these objects and
    unpickle them with weights_only=False (code from the folder would run).
    """

    accelerator: object
    models: dict  # "unet" / "text_encoder" -> the (prepared) model carrying the LoRA
    optimizer: object
    lr_scheduler: object
    progress: Progress
    parts: dict = dataclasses.field(default_factory=dict)  # optional parts: see state_parts.py


def _lora_params(state: TrainingState) -> dict:
    return {f"{name}.{k}": v for name, m in state.models.items()
            for k, v in state.accelerator.unwrap_model(m).state_dict(keep_vars=True).items() if is_adapter_param(k)}


def _optimizer_class(state: TrainingState) -> str:
    opt = getattr(state.optimizer, "optimizer", state.optimizer)  # accelerate's AcceleratedOptimizer wraps it
    return f"{type(opt).__module__}.{type(opt).__name__}"


def save_training_state(state: TrainingState, folder):
    """Write `state` into `folder` (see TrainingState) through `.<folder>.tmp`: a failure or a Ctrl-C leaves
    neither a partial folder nor a temporary; an older state of that name is replaced only when complete."""
    acc, folder = state.accelerator, Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp"
    acc.wait_for_everyone()
    with failures_name(folder):
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            save_tree(_rng_state(), tmp / f"rng-{acc.process_index}.safetensors")
            if acc.is_main_process:
                _write_shared_parts(state, tmp)
            acc.wait_for_everyone()
            if acc.is_main_process:
                replace(tmp, folder)  # an older state of that name is moved aside, never left half-deleted
                logger.info("saved training state %s", folder)
        except BaseException:  # disk full, Ctrl-C: no half-written state folder is left
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    acc.wait_for_everyone()


def _write_shared_parts(state: TrainingState, folder: Path):
    """lora.safetensors, optimizer.safetensors and state.json: the same on every process."""
    from safetensors.torch import save_file

    acc = state.accelerator
    with atomic_path(folder / "lora.safetensors") as part:
        save_file({k: v.detach().to("cpu", copy=True) for k, v in _lora_params(state).items()}, part)
    save_tree(state.optimizer.state_dict(), folder / "optimizer.safetensors")
    state_parts.save_parts(state.parts, folder)
    info = {"format": STATE_FORMAT, "version": STATE_VERSION, "num_processes": acc.num_processes,
            "optimizer": _optimizer_class(state), "progress": state.progress.state_dict(),
            "accelerator_step": acc.step, "lr_scheduler": state.lr_scheduler.state_dict(),
            "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None}
    with atomic_path(folder / "state.json") as part:
        part.write_text(tree_to_json(info, folder / "state.json"), encoding="utf-8")


def load_training_state(state: TrainingState, folder):
    """Read `folder` completely, then apply it; every refusal is one line naming the folder or file."""
    folder = Path(folder)
    names, info = check_state_folder(folder)
    misfit = (f"`resume` {folder}: the saved state does not fit this run (network_dim, network_args, "
              "optimizer or trained parts changed?)")
    if info.get("optimizer") != _optimizer_class(state):
        raise ConfigError(f"{misfit}: saved with {info.get('optimizer')}, this run uses {_optimizer_class(state)}")
    keys, get, _ = open_tensor_file(folder / "lora.safetensors")
    saved, params = {k: get(k) for k in keys}, _lora_params(state)
    mismatch = sorted(saved.keys() ^ params.keys()) or [k for k in params if saved[k].shape != params[k].shape]
    if mismatch:
        raise ConfigError(f"{misfit}: first difference at {mismatch[0]}")
    optimizer_state = load_tree(folder / "optimizer.safetensors")
    rng_file = folder / f"rng-{state.accelerator.process_index}.safetensors"
    rng = load_tree(rng_file) if rng_file.name in names else None
    parts = state_parts.read_parts(state.parts, folder, names)

    try:
        state.optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{misfit}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    state_parts.apply_parts(state.parts, parts, folder)
    try:
        # load_state_dict sets whatever attributes it is given: only the keys and types the object has now
        _check_like(info["lr_scheduler"], state.lr_scheduler.state_dict(), "lr_scheduler")
        state.lr_scheduler.load_state_dict(info["lr_scheduler"])
        if state.accelerator.scaler is not None and info["grad_scaler"]:
            _check_like(info["grad_scaler"], state.accelerator.scaler.state_dict(), "grad_scaler")
            state.accelerator.scaler.load_state_dict(info["grad_scaler"])
        state.progress.load_state_dict(info["progress"])
        state.accelerator.step = counter(info, "accelerator_step")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{folder / 'state.json'}: a bad value in the state ({type(e).__name__}: {e})") from None
    if rng is None:
        logger.warning("%s: no random-generator state for process %d (saved by %s processes): not restored",
                       folder, state.accelerator.process_index, info.get("num_processes"))
    else:
        _set_rng_state(rng, rng_file)
    logger.info("resumed from %s (step %d)", folder, state.progress.global_step)


def _check_like(saved, current: dict, key: str):
    """ValueError unless `saved` is a dict with the keys of `current`, each value of the same type."""
    if not isinstance(saved, dict) or saved.keys() != current.keys():
        raise ValueError(f"`{key}` must have the keys {sorted(current)}")
    for k, v in current.items():
        if type(saved[k]) is not type(v) and not (isinstance(v, float) and type(saved[k]) is int):
            raise ValueError(f"`{key}.{k}` must be a {type(v).__name__}, not a {type(saved[k]).__name__}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not a readable JSON state (truncated or corrupt?): {e}") from None


def check_state_folder(folder) -> tuple[set[str], dict]:
    """(file names, state.json) of a state folder written by `save_training_state`, before anything else is read
    (cheap: called before the model loads). Refused in one line: no folder, accelerate's pickle format, a bad
    state.json, a missing file, or any file the format does not have."""
    folder = Path(folder)
    names = _state_file_names(folder)
    info = tree_from_json(_read_text(folder / "state.json"), folder / "state.json")
    if not isinstance(info, dict) or info.get("format") != STATE_FORMAT:
        raise FormatError(f"{folder / 'state.json'}: not a {STATE_FORMAT} (no `format` key of that value)")
    if info.get("version") != STATE_VERSION:
        raise FormatError(f"{folder / 'state.json'}: state format version {info.get('version')!r}; this "
                          f"lora-sd reads version {STATE_VERSION}")
    expected = {"state.json", "lora.safetensors", "optimizer.safetensors"}
    processes = info.get("num_processes")
    if not isinstance(processes, int) or processes < 1:
        raise FormatError(f"{folder / 'state.json'}: `num_processes` must be a positive integer; got {processes!r}")
    unexpected = sorted(names - expected - state_parts.FILES - {f"rng-{i}.safetensors" for i in range(processes)})
    if unexpected:
        raise ConfigError(f"`resume` {folder}: unexpected {unexpected[0]!r} in a training state folder (it holds "
                          "only state.json, lora.safetensors, optimizer.safetensors, rng-<rank>.safetensors, "
                          "ema.safetensors); nothing is read from a folder holding anything else")
    missing = sorted(expected - names)
    if missing:
        raise ConfigError(f"`resume` {folder}: {missing[0]} is missing: not a complete training state folder")
    return names, info


def _state_file_names(folder: Path) -> set[str]:
    """The names in a state folder; an accelerate (pickle) state or a folder without state.json is refused."""
    if not folder.is_dir():
        raise ConfigError(f"`resume` {folder}: no such folder (give a `<name>-state` folder written by save_state)")
    names = {p.name for p in folder.iterdir()}
    if "state.json" not in names:
        if any(_ACCELERATE_NAMES.fullmatch(n) for n in names):
            raise ConfigError(f"`resume` {folder}: a training state in accelerate's pickle format (lora-sd before "
                              "its own state format); it is not read, as unpickling it could run code: re-make it "
                              "by training again with save_state")
        raise ConfigError(f"`resume` {folder}: not a training state folder written by save_state (no state.json)")
    return names


def _rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state, path):
    import numpy as np

    try:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise FormatError(f"{path}: not a random-generator state ({type(e).__name__}: {e})") from None


def stale_temporaries(output_dir, output_name: str) -> list[Path]:
    """Temporaries of our own naming for `output_name` left in `output_dir` (and its `sample/`) by a killed run:
    `.<output>.<8 random>.tmp[.old]` (io.atomic_path, io.replace) and `.<output>-state.tmp[.old]` (state saves)."""
    name = re.escape(output_name)
    stem = rf"{name}(-\d{{6}}|-step\d{{8}}|-interrupted)?(-ema)?"
    final = rf"({stem}(\.safetensors|\.ckpt|\.pt|-state)?|{name}-config\.toml|{name}-sample\.png)"
    ours = re.compile(rf"\.{final}(\.[a-z0-9_]{{8}})?\.tmp(\.old)?")
    samples = re.compile(rf"\.{name}_\d{{6}}_\d{{2}}\.png\.[a-z0-9_]{{8}}\.tmp")
    found = []
    for folder, pattern in ((Path(output_dir), ours), (Path(output_dir) / "sample", samples)):
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))
    return found


def remove_stale_temporaries(output_dir, output_name: str) -> list[Path]:
    """Remove `stale_temporaries` (call on the main process before a run writes anything); log each."""
    removed = stale_temporaries(output_dir, output_name)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            os.unlink(path)
        logger.warning("removed %s, a temporary left by an interrupted run", path)
    return removed
