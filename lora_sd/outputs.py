"""The one check of an output path, before any work: what every writer (merge, SVD merge, extraction,
conversion, generation) calls with its inputs and the suffixes its output may have."""

from pathlib import Path

from lora_sd.errors import ConfigError
from lora_sd.io import check_writable_folder, refuse_overwriting_inputs, special_file_kind

TENSOR_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LORA_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")  # what formats.save_lora writes (pickle unless .safetensors)


def check_output(output, inputs, option="--save_to", file_suffixes=None, folder=False):
    """Before any work, every check of an output path, one ConfigError naming `option`:

    - it is not an input, inside one or a folder holding one (`refuse_overwriting_inputs`);
    - it is no FIFO, device or socket (an atomic write would replace it with a file: /dev/null included);
    - a file output ends in one of `file_suffixes` (exactly: the suffix decides the format written, and
      other tools pick their reader by it), a `folder` output in none of TENSOR_FILE_SUFFIXES;
    - its folder can be created and written (`check_writable_folder`).
    The write itself can still fail (a full disk): `atomic_path` then leaves nothing behind."""
    refuse_overwriting_inputs(output, inputs, option)
    kind = special_file_kind(output)
    if kind not in (None, "a folder") or (kind and file_suffixes):
        raise ConfigError(f"{option} {output}: is {kind}; this output is a file (give a file path)")
    name = Path(output).name
    if file_suffixes and not name.endswith(tuple(file_suffixes)):
        raise ConfigError(f"{option} {output}: the file name must end in {' or '.join(file_suffixes)} "
                          "(the suffix says what the file holds, to this tool and to others)")
    if folder and name.lower().endswith(TENSOR_FILE_SUFFIXES):
        raise ConfigError(f"{option} {output}: this output is a folder; give a folder name without a file suffix "
                          f"({Path(name).suffix})")
    check_writable_folder(Path(output).absolute().parent, f"{option} {output}")
