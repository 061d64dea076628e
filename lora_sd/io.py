"""Atomic file writes: a temporary file in the target folder, then os.replace."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success move it into place.

    Works for files and folders; on any error the temporary is removed, so
    nothing half-written is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def read_tensor_file(path):
    """(state_dict, metadata) of a `.safetensors` file or a torch pickle (`.ckpt`/`.pt`/`.bin`).

    Pickles load with `weights_only=True`: one that needs code to load is
    refused. Every failure is a FormatError naming the file.
    """
    import pickle

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    from lora_sd.errors import FormatError

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a class or function the file wants called
            raise FormatError(
                f"{path}: this pickle needs code to load (not plain tensors); refusing it for safety. "
                "Convert it to .safetensors with a tool you trust"
            ) from None
        # torch's own text here advises weights_only=False, which we never do
        raise FormatError(f"{path}: not a safetensors or torch file, or truncated (unreadable pickle)") from None
    except Exception as e:  # torch.load raises many types on junk (KeyError, RuntimeError, ...)
        raise FormatError(f"{path}: not a safetensors or torch file, or truncated ({_first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # original SD checkpoints nest the weights
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
        if not tensors:
            raise FormatError(f"{path}: holds no tensors")
        obj = tensors
    return obj, {}


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
