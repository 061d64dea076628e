"""File plumbing: atomic writes, precision names, and reading tensor files (safe unpickling)."""

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path


def replace(tmp, path):
    """os.replace(tmp, path), also for a folder over a folder: the old one is moved aside (and back
    if the move fails), then deleted, so `path` is never left half-deleted."""
    tmp, path = Path(tmp), Path(path)
    if not (path.is_dir() and tmp.is_dir()):
        os.replace(tmp, path)
        return
    old = tmp.with_name(tmp.name + ".old")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old, path)
        raise
    if old.is_symlink():  # the output was a link to a folder: drop the link, not what it points to
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def _umask_permissions(path: Path):
    """mkstemp and safetensors create 0600 files: give the written file(s) the permissions the umask gives."""
    umask = os.umask(0)
    os.umask(umask)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in files:
        os.chmod(f, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success move it into place.

    Works for files and folders; on any error the temporary is removed, so
    nothing half-written is left behind. A failed write that names no file, or
    names the temporary (disk full, quota), is made to name `path`, so that the
    recipe's one error line says what could not be written.
    """
    path = Path(path)
    with failures_name(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    try:
        with failures_name(path, tmp):
            yield tmp
            _umask_permissions(tmp)
            replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def refuse_overwriting_inputs(output, inputs, option="--save_to"):
    """ConfigError when writing `output` would destroy one of `inputs`: the same file or folder (links and
    hard links resolved), an output inside an input folder, or an output folder that holds an input.
    Called before any work, so that nothing is read or computed for a run that must not write."""
    from lora_sd.errors import ConfigError

    out = Path(output).resolve()
    for given in inputs:
        if given is None:
            continue
        inp = Path(given).resolve()
        same = out == inp or (out.exists() and inp.exists() and os.path.samefile(out, inp))
        if same or inp in out.parents or out in inp.parents:
            how = "is" if same else ("is inside" if inp in out.parents else "holds")
            raise ConfigError(f"{option} {output}: {how} the input {given}; writing it would overwrite or change that input "
                              "(give another output path)")


def check_writable_folder(folder, what):
    """ConfigError unless `folder` can be created and written (`what` names the option for the message).

    Writes nothing but a temporary file in the nearest existing folder (creating one is the only check that
    sees read-only mounts, ACLs and permissions alike, also for root), removed at once."""
    import tempfile

    from lora_sd.errors import ConfigError

    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:  # where mkdir would start creating folders
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what}: {existing} is a file, not a folder; give a folder path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"{what}: cannot write in {existing} ({e.strerror or e}); give a writable folder") from None


PRECISIONS = {"float": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def precision_dtype(name: str, option="save_precision"):
    """torch dtype for a kohya precision name (float | fp16 | bf16)."""
    import torch

    from lora_sd.errors import FormatError

    if name not in PRECISIONS:
        raise FormatError(f"{option}: must be one of float, fp16, bf16; got {name!r}")
    return getattr(torch, PRECISIONS[name])


class _InertObject:
    """Stand-in for a known harmless pickled class; keeps its state, runs nothing."""

    def __setstate__(self, state):
        self.__dict__["state"] = state


# Classes seen in the `callbacks` entry of original SD .ckpt files.
_HARMLESS_GLOBALS = [
    (_InertObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_InertObject, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
]


# torch's RuntimeError texts for a broken file -> what they mean
_TORCH_PROBLEMS = {
    "failed finding central directory": "a truncated or corrupt torch zip archive (its end is missing)",
    "unexpected EOF": "a truncated torch checkpoint (its data ends early)",
}


def _load_pickle(path, allow_pickle):
    """torch.load with weights_only=True (mmap when the file allows it); a corrupt file or one that
    needs code to load is a one-line FormatError. Only the exceptions torch raises for a bad file are
    caught (each seen by loading broken files): anything else is a bug and goes through."""
    import errno
    import pickle

    import torch

    from lora_sd.errors import FormatError

    try:
        if allow_pickle:
            logging.getLogger(__name__).warning("%s: loading a pickle with arbitrary code allowed", path)
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_HARMLESS_GLOBALS):
            try:  # mmap: a 4 GB checkpoint is not read into memory twice
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # only the old (non-zip) format cannot be mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # "Unsupported global: GLOBAL x" or "unsupported GLOBAL x ... is blocked"
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            names = [n for n in names if n not in {g for _, g in _HARMLESS_GLOBALS}]
            raise FormatError(
                f"{path}: refusing to unpickle this file: it needs arbitrary code to load "
                f"({', '.join(names[:3]) or 'unknown globals'}); convert it to .safetensors with a tool you trust"
            ) from None
        # torch's text advises weights_only=False (which we never do); keep only its reason
        reason = str(e).partition("WeightsUnpickler error:")[2].strip().splitlines() or str(e).splitlines()
        raise FormatError(f"{path}: not a torch checkpoint, or a corrupt one: unpickling failed "
                          f"({(reason or ['unknown reason'])[0][:120]})") from None
    except EOFError:  # the pickle stream stops early
        raise FormatError(f"{path}: not a torch checkpoint, or a truncated one: its data ends early") from None
    except OSError as e:  # torch's zip reader (PyTorchFileReader) says EINVAL for a truncated archive
        if e.errno != errno.EINVAL:
            raise
        raise FormatError(f"{path}: a truncated or corrupt torch zip archive (its end is missing)") from None
    except RuntimeError as e:  # torch: "unexpected EOF ... might be corrupted", "PytorchStreamReader failed ..."
        text = str(e)
        problem = next((v for k, v in _TORCH_PROBLEMS.items() if k in text), None)
        raise FormatError(f"{path}: {problem or 'a corrupt torch checkpoint: ' + text.split('. ')[0][:160]}") from None
    except (KeyError, IndexError, ValueError) as e:  # the unpickler on bytes that are no pickle (stack/memo
        # lookups fail), or a zip archive with undecodable names (UnicodeDecodeError)
        raise FormatError(f"{path}: not a torch checkpoint (its bytes are no valid pickle or torch archive: "
                          f"{type(e).__name__} {str(e)[:80]})") from None


# safetensors' own reasons (SafetensorError text) -> what they mean for a user's file
_SAFETENSORS_PROBLEMS = {
    "header too small": "shorter than the 8-byte header length (empty or truncated)",
    "invalid header length": "truncated inside its header",
    "file not fully covered": "truncated: its header lists more tensor data than the file holds",
    "header too large": "its first 8 bytes are no safetensors header length (not a safetensors file?)",
    "invalid JSON in header": "its header is not valid JSON",
}


def _open_safetensors(path):
    """(keys, get, metadata) of a .safetensors file; a broken file is a one-line FormatError saying how."""
    from safetensors import SafetensorError, safe_open

    from lora_sd.errors import FormatError

    try:
        f = safe_open(str(path), framework="pt")  # checks the header against the file size
    except SafetensorError as e:
        text = str(e).removeprefix("Error while deserializing header: ")
        problem = next((v for k, v in _SAFETENSORS_PROBLEMS.items() if k in text), text[:160])
        raise FormatError(f"{path}: not a valid safetensors file: {problem}") from None
    return list(f.keys()), f.get_tensor, dict(f.metadata() or {})


# the first bytes of what torch.save writes: a zip archive (torch >= 1.6), a pickle (protocol 2+)
_PICKLE_HEADS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def special_file_kind(path) -> str | None:
    """"a folder", "a FIFO", "a device", "a socket" for an existing path that is no regular file; None else."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None


def open_tensor_file(path, allow_pickle=False):
    """(keys, get(key), metadata) of a `.safetensors` file or a torch pickle (`.ckpt`/`.pt`/`.bin`).

    A .safetensors file is read lazily, one tensor per `get`. Pickles load
    with `weights_only=True`: one that needs code to load is refused. A nested
    `state_dict` (original SD checkpoints) is unwrapped. A missing, empty,
    truncated or corrupt file is a one-line FormatError naming the file.
    """
    import torch

    from lora_sd.errors import FormatError

    path = Path(path)
    if not path.is_file():  # opening a FIFO or /dev/zero would block or read forever
        kind = special_file_kind(path)
        raise FormatError(f"{path}: " + (f"is {kind}, not a tensor file" if kind else "no such file"))
    if path.stat().st_size == 0:
        raise FormatError(f"{path}: is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(16)
    # a safetensors header of 640, 896, 1152 or 1408 bytes starts with b"\x80\x02".. too: its JSON follows
    if path.suffix == ".safetensors" and head.startswith(_PICKLE_HEADS) and head[8:9] != b"{":
        raise FormatError(f"{path}: named .safetensors but holds a zip archive or pickle (a torch .ckpt/.pt?), not "
                          "safetensors; if it is a torch checkpoint, rename it to .ckpt")
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        keys, get, metadata = _open_safetensors(path)
    else:
        sd = _load_pickle(path, allow_pickle)
        while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise FormatError(f"{path}: holds a {type(sd).__name__}, not a state dict")
        tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        keys, get, metadata = list(tensors), tensors.__getitem__, {}
    if not keys:
        raise FormatError(f"{path}: holds no tensors")
    return keys, get, metadata


def read_tensor_file(path, allow_pickle=False):
    """(tensors, metadata) of a `.safetensors` file or a torch pickle: see `open_tensor_file`."""
    keys, get, metadata = open_tensor_file(path, allow_pickle)
    return {k: get(k) for k in keys}, metadata


def read_toml(path, what="config file", shown_as=None) -> dict:
    """A TOML file as a dict; a missing or invalid file is a one-line ConfigError naming it."""
    import tomllib

    from lora_sd.errors import ConfigError

    where = shown_as or path
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: {what} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: not a valid TOML file ({e})") from None


@contextlib.contextmanager
def failures_name(path, tmp=None):
    """An OSError raised inside that names no file (a failed write(): disk full, quota), or names the
    temporary `tmp` or a file in it, is made to name `path`, so that the one error line says what could
    not be written."""
    try:
        yield
    except OSError as e:
        if not e.filename or (tmp is not None and str(e.filename).startswith(str(tmp))):
            e.filename = str(path)
        raise
