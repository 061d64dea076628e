"""File plumbing: atomic writes under failure, and the check that an output is not an input."""

import errno
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora_sd.errors import ConfigError
from lora_sd.formats import save_lora
from lora_sd.io import atomic_path, refuse_overwriting_inputs
from tests.helpers import full_disk_at, random_lora


class Boom(Exception):
    pass


def snapshot(folder):
    """{relative path: bytes} of every file under `folder` (folders as None): byte-for-byte state."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def write_file_then_fail(tmp, error):
    with open(tmp, "wb") as f:
        f.write(b"half a new file")
    raise error


def write_folder_then_fail(tmp, error):
    tmp.mkdir()
    (tmp / "a.bin").write_bytes(b"new a")
    raise error


ERRORS = [Boom("mid-write"), OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()]


@pytest.mark.parametrize("error", ERRORS, ids=["exception", "ENOSPC", "Ctrl-C"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_failed_write_leaves_the_previous_output_and_no_temporary(tmp_path, kind, error):
    target = tmp_path / "out"
    if kind == "file":
        target.write_bytes(b"previous contents")
    else:
        target.mkdir()
        (target / "a.bin").write_bytes(b"old a")
        (target / "sub").mkdir()
        (target / "sub" / "b.bin").write_bytes(b"old b")
    before = snapshot(tmp_path)
    write = write_file_then_fail if kind == "file" else write_folder_then_fail
    with pytest.raises(type(error)) as raised:
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and not tmp.exists()
            write(tmp, error)
    assert raised.value is error  # the writer's own error, untouched (run_main reports OSError in one line)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_successful_write_replaces_the_output(tmp_path, kind, existing):
    target = tmp_path / "out"
    if existing:
        if kind == "file":
            target.write_bytes(b"previous contents")
        else:
            target.mkdir()
            (target / "stale.bin").write_bytes(b"from the old folder")
    with atomic_path(target) as tmp:
        if kind == "file":
            tmp.write_bytes(b"new contents")
        else:
            tmp.mkdir()
            (tmp / "a.bin").write_bytes(b"new a")
    expected = {"out": b"new contents"} if kind == "file" else {"out": None, "out/a.bin": b"new a"}
    assert snapshot(tmp_path) == expected  # the old folder's files are gone, nothing else beside it


def test_a_failed_final_move_of_a_folder_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.bin").write_bytes(b"old a")
    before = snapshot(tmp_path)
    real_replace, calls = os.replace, []

    def replace(src, dst):  # 1st: old folder aside; 2nd: new folder into place -> fails; 3rd: old one back
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "a.bin").write_bytes(b"new a")
    assert len(calls) == 3 and calls[2][1] == "out"
    assert snapshot(tmp_path) == before


def test_a_folder_written_over_a_symlink_to_a_folder_leaves_no_temporary(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.bin").write_bytes(b"old a")
    (tmp_path / "out").symlink_to(tmp_path / "real", target_is_directory=True)
    with atomic_path(tmp_path / "out") as tmp:
        tmp.mkdir()
        (tmp / "b.bin").write_bytes(b"new b")
    # the link is replaced, as a file output's link is; what it pointed to is left alone
    assert snapshot(tmp_path) == {"out": None, "out/b.bin": b"new b", "real": None, "real/a.bin": b"old a"}


@pytest.mark.parametrize("named", ["nothing", "the temporary", "a file in the temporary"])
def test_a_failed_write_names_the_output_not_the_temporary(tmp_path, named):
    """Disk full inside any writer (PIL, safetensors, a state folder) reads `error: <output>: No space left`."""
    out = tmp_path / "out"

    def fail(tmp):
        where = {"nothing": None, "the temporary": tmp, "a file in the temporary": tmp / "a.bin"}[named]
        raise OSError(errno.ENOSPC, "No space left on device", where)

    with pytest.raises(OSError) as e, atomic_path(out) as tmp:
        fail(tmp)
    assert e.value.filename == str(out)
    other = OSError(errno.EACCES, "Permission denied", "/elsewhere/input")
    with pytest.raises(OSError) as e, atomic_path(out):
        raise other
    assert e.value.filename == "/elsewhere/input"  # an error about another file keeps its name


def make_writer_0600(tmp):
    """A writer that creates its file 0600 (as mkstemp and some savers do)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"data")
    os.close(fd)


def save_safetensors(tmp):
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp))


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=oct)
@pytest.mark.parametrize("writer", [make_writer_0600, save_safetensors])
def test_written_files_get_the_permissions_the_umask_gives(tmp_path, umask, writer):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "out.bin") as tmp:
            writer(tmp)
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~umask


# --- save_lora ------------------------------------------------------------------------------------

NAMES = {"kohya": "lora.safetensors", "diffusers": "pytorch_lora_weights.safetensors", "peft": "lora_peft"}


@pytest.fixture(scope="module")
def lora(tiny_sd1):
    return random_lora(tiny_sd1, network_dim=4, network_alpha=2)


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("fmt, on_call", [("kohya", 1), ("diffusers", 1), ("peft", 1), ("peft", 2)])
def test_save_lora_under_a_failure_leaves_nothing_new(tmp_path, monkeypatch, lora, fmt, on_call, existing):
    path = tmp_path / NAMES[fmt]
    if existing:
        save_lora(lora, path, fmt)
    before = snapshot(tmp_path)
    calls = full_disk_at(monkeypatch, on_call)
    with pytest.raises(OSError) as raised:
        save_lora(lora, path, fmt)
    assert raised.value.errno == errno.ENOSPC and len(calls) == on_call
    assert snapshot(tmp_path) == before  # no partial file or folder, no temporary; the old one intact


def test_files_in_a_written_folder_get_the_permissions_the_umask_gives(tmp_path, lora):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "folder") as tmp:
            tmp.mkdir()
            save_safetensors(tmp / "a.safetensors")
        save_lora(lora, tmp_path / "lora_peft", "peft")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes


# --- refuse_overwriting_inputs --------------------------------------------------------------------

@pytest.fixture
def inputs(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"model")
    folder = tmp_path / "lora_peft"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "adapter_model.safetensors").write_bytes(b"adapter")
    return model, folder


def refused(output, inputs):
    with pytest.raises(ConfigError) as e:
        refuse_overwriting_inputs(output, inputs, "--save_to")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--save_to {output}: ")
    return message


def test_the_same_file_is_refused(inputs):
    model, _ = inputs
    assert "is the input" in refused(model, [None, model])
    assert "is the input" in refused(model.parent / "." / model.name, [model])  # another spelling


def test_a_hard_link_to_an_input_is_refused(inputs, tmp_path):
    model, _ = inputs
    link = tmp_path / "elsewhere.safetensors"
    os.link(model, link)
    assert "is the input" in refused(link, [model])


def test_a_symlink_to_an_input_is_refused_either_way(inputs, tmp_path):
    model, folder = inputs
    link = tmp_path / "link.safetensors"
    link.symlink_to(model)
    assert "is the input" in refused(link, [model])
    assert "is the input" in refused(model, [link])
    folder_link = tmp_path / "folder_link"
    folder_link.symlink_to(folder, target_is_directory=True)
    assert "is inside" in refused(folder_link / "unet" / "new.safetensors", [folder])


def test_a_file_inside_an_input_folder_is_refused(inputs):
    _, folder = inputs
    assert "is inside" in refused(folder / "unet" / "adapter_model.safetensors", [folder])
    assert "is inside" in refused(folder / "not_yet" / "x.safetensors", [folder])


def test_a_folder_holding_an_input_is_refused(inputs, tmp_path):
    model, folder = inputs
    assert "holds" in refused(tmp_path, [model])
    assert "holds" in refused(folder, [folder / "unet" / "adapter_model.safetensors"])


def test_unrelated_outputs_are_allowed(inputs, tmp_path):
    model, folder = inputs
    refuse_overwriting_inputs(tmp_path / "merged.safetensors", [model, folder, None])
    refuse_overwriting_inputs(tmp_path / "lora_peft2", [folder])  # a shared name prefix is not "inside"
    refuse_overwriting_inputs(tmp_path / "model.safetensors.bak", [model])
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(model.read_bytes())  # equal bytes, another file
    refuse_overwriting_inputs(copy, [model])
