"""Nested training state (optimizer, LR schedule, RNG) stored without pickle, so that reading it runs no code.

The structure goes into JSON, the tensors into one safetensors file (torch.save and accelerate pickle them).
Only dict, list, tuple, str, int, float, bool, None and tensors are stored; tuples and non-string dict keys
are tagged.
"""

from pathlib import Path

from lora_sd.io import _open_safetensors, atomic_path

_TREE_KEY = "lora_sd.tree"
_TAGS = ("__tensor__", "__tuple__", "__items__")


def _encode_tree(obj, tensors: dict | None, where: str):
    import torch

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor) and tensors is not None:
        name = str(len(tensors))
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(obj, (list, tuple)):
        items = [_encode_tree(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode_tree(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode_tree(k, None, where), _encode_tree(v, tensors, f"{where}.{k}")]
                              for k, v in obj.items()]}
    raise TypeError(f"{where} is a {type(obj).__name__}")


def _decode_tree(obj, tensors):
    if isinstance(obj, list):
        return [_decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if len(obj) == 1 and "__tuple__" in obj:
        return tuple(_decode_tree(v, tensors) for v in obj["__tuple__"])
    if len(obj) == 1 and "__items__" in obj:
        return {_decode_tree(k, None): _decode_tree(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode_tree(v, tensors) for k, v in obj.items()}


def tree_to_json(obj, path) -> str:
    """JSON text of a nested state without tensors (FormatError naming `path` for anything else)."""
    import json

    from lora_sd.errors import FormatError

    try:
        return json.dumps(_encode_tree(obj, None, "state"), indent=1)
    except TypeError as e:
        raise FormatError(f"{path}: cannot store this state as JSON: {e}") from None


def tree_from_json(text: str, path):
    """The nested state of `tree_to_json` text; a one-line FormatError naming `path` if it is not one."""
    import json

    from lora_sd.errors import FormatError

    try:
        return _decode_tree(json.loads(text), None)
    except (ValueError, TypeError, KeyError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise FormatError(f"{path}: not a readable JSON state (truncated or corrupt?): {e}") from None


def save_tree(obj, path):
    """Write a nested state holding tensors as one safetensors file (atomically): see `load_tree`."""
    import json

    from safetensors.torch import save_file

    from lora_sd.errors import FormatError

    tensors = {}
    try:
        tree = json.dumps(_encode_tree(obj, tensors, "state"))
    except TypeError as e:
        raise FormatError(f"{path}: cannot store this state without pickle: {e}") from None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_TREE_KEY: tree})
    return Path(path)


def load_tree(path):
    """The nested state in a `save_tree` file: safetensors and JSON only, so no code runs. Every failure is a
    one-line FormatError naming the file."""
    import json

    from safetensors import SafetensorError

    from lora_sd.errors import FormatError

    keys, get, metadata = _open_safetensors(path)  # a broken file: one line saying how
    tree = metadata.get(_TREE_KEY)
    if tree is None:
        raise FormatError(f"{path}: a safetensors file without a lora-sd state in it")
    try:
        tensors = {k: get(k) for k in keys}
    except SafetensorError as e:
        raise FormatError(f"{path}: a tensor cannot be read (truncated or corrupt?): {str(e)[:160]}") from None
    try:
        return _decode_tree(json.loads(tree), tensors)
    except (ValueError, TypeError, KeyError, RecursionError) as e:  # bad JSON, a bad tag, a tensor not in the file
        raise FormatError(f"{path}: its state structure is not readable: {type(e).__name__}: {str(e)[:160]}") from None
