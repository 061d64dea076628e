"""recipes/resize_images_to_resolution.py on generated images."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lora_sd.data.resize import fit_to_area, resize_image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))
import resize_images_to_resolution as recipe  # noqa: E402


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    Image.new("RGB", (1000, 600), (200, 10, 10)).save(folder / "big.png")
    Image.new("RGB", (203, 101), (10, 200, 10)).save(folder / "small.jpg")
    Image.new("RGBA", (700, 700), (1, 2, 3, 128)).save(folder / "alpha.webp")
    (folder / "big.caption").write_text("a big red image", encoding="utf-8")
    (folder / "big.txt").write_text("red", encoding="utf-8")
    (folder / "readme.md").write_text("notes", encoding="utf-8")
    return folder


def sizes(folder):
    return {p.name: Image.open(p).size for p in folder.iterdir() if p.suffix in (".png", ".jpg")}


def test_names_areas_and_no_enlargement(src, tmp_path):
    dst = tmp_path / "dst"
    recipe.main([str(src), str(dst), "--max_resolution", "512x512,256x256"])
    got = {name: size for name, size in sizes(dst).items() if "+" in name}
    assert set(got) == {f"{stem}+{res}.jpg" for stem in ("big", "small", "alpha") for res in ("512x512", "256x256")}
    for name, (w, h) in got.items():
        area = 512 * 512 if "+512x512" in name else 256 * 256
        assert w * h <= area
    # 1000x600 -> scale sqrt(262144 / 600000): int(660.99) x int(396.59)
    assert got["big+512x512.jpg"] == (660, 396)
    assert got["big+256x256.jpg"] == (330, 198)
    assert got["small+512x512.jpg"] == (203, 101) == got["small+256x256.jpg"]  # never enlarged
    assert (dst / "readme.md").read_text() == "notes" and (dst / "big.caption").exists()
    assert not (dst / "big+512x512.caption").exists()  # only with --copy_associated_files
    with Image.open(dst / "big+512x512.jpg") as im:
        assert im.format == "JPEG" and abs(im.getpixel((300, 200))[0] - 200) <= 2  # quality 100


def test_divisible_by_png_and_associated_files(src, tmp_path):
    dst = tmp_path / "dst"
    recipe.main([str(src), str(dst), "--max_resolution", "384x384", "--divisible_by", "64", "--save_as_png",
                 "--copy_associated_files", "--interpolation", "lanczos4"])
    got = {name: size for name, size in sizes(dst).items() if "+" in name}
    assert got == {"big+384x384.png": (448, 256), "small+384x384.png": (192, 64), "alpha+384x384.png": (384, 384)}
    assert (dst / "big+384x384.caption").read_text() == "a big red image"
    assert (dst / "big+384x384.txt").read_text() == "red"
    assert not list(dst.glob("small+384x384.*[!g]"))  # small has no associated files


def test_fit_to_area_and_filters():
    assert fit_to_area(1000, 600, 512 * 512) == ((660, 396), (660, 396))
    assert fit_to_area(1000, 600, 512 * 512, 8) == ((660, 396), (656, 392))
    assert fit_to_area(100, 50, 512 * 512, 16) == ((100, 50), (96, 48))
    img = Image.new("L", (4, 1))
    img.putdata([0, 255, 0, 255])
    assert list(resize_image(img, (2, 1), "area").getdata()) == [128, 128]  # area averages
    assert list(resize_image(img, (2, 1), "nearest").getdata()) in ([0, 0], [255, 255])


def test_bad_arguments_exit_2_with_one_line(src, tmp_path):
    run = [sys.executable, str(REPO / "recipes" / "resize_images_to_resolution.py")]
    out = subprocess.run(run + [str(src), str(tmp_path / "d"), "--max_resolution", "512by512"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: `--max_resolution`: '512by512' is not WIDTHxHEIGHT (e.g. 512x512)"]
    from lora_sd.cli import run_main
    assert run_main(recipe.main, [str(tmp_path / "missing"), str(tmp_path / "d")]) == 2
    (src / "broken.png").write_bytes(b"not a png")
    assert run_main(recipe.main, [str(src), str(tmp_path / "d")]) == 2
    assert run_main(recipe.main, [str(src), str(src)]) == 2  # into its own folder: refused, nothing written
    assert not any("+" in p.name for p in src.iterdir())


@pytest.mark.parametrize("png", [False, True])
def test_originals_are_copied_as_they_are(src, tmp_path, png):
    dst = tmp_path / "dst"
    recipe.main([str(src), str(dst), "--max_resolution", "256x256"] + (["--save_as_png"] if png else []))
    for name in ("big.png", "small.jpg", "alpha.webp", "big.caption", "big.txt", "readme.md"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name  # not re-encoded, even as PNG
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        [p.name for p in src.iterdir()] + [f"{s}+256x256.{'png' if png else 'jpg'}" for s in ("alpha", "big", "small")])


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} | {
        p.relative_to(folder): "dir" for p in folder.rglob("*") if p.is_dir()}


def test_corrupt_image_writes_nothing(src, tmp_path):
    (src / "zz_truncated.png").write_bytes((src / "big.png").read_bytes()[:-200])  # sorts last: read after the others
    dst = tmp_path / "new" / "dst"
    run = [sys.executable, str(REPO / "recipes" / "resize_images_to_resolution.py"), str(src), str(dst)]
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 2
    assert [line for line in out.stderr.splitlines() if line.startswith("error")] == [
        f"error: {src / 'zz_truncated.png'}: not a readable image (image file is truncated)"], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "new").exists()  # the folders it made are gone too
    dst.mkdir(parents=True)
    (dst / "keep.txt").write_text("mine")
    before = snapshot(dst)
    from lora_sd.cli import run_main
    assert run_main(recipe.main, [str(src), str(dst)]) == 2
    assert snapshot(dst) == before  # an existing destination: untouched, no temporary left


def test_disk_full_midway_leaves_destination_as_it_was(src, tmp_path, monkeypatch):
    import errno

    from lora_sd.data import resize
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "big+512x512.jpg").write_bytes(b"an older output")
    before = snapshot(dst)
    real_save, calls = resize._save, []

    def save_then_fail(image, path, as_png):
        calls.append(path)
        if len(calls) == 3:
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(image, path, as_png)

    monkeypatch.setattr(resize, "_save", save_then_fail)
    with pytest.raises(OSError):
        resize.resize_images(src, dst, "512x512,256x256")
    assert len(calls) == 3 and snapshot(dst) == before


def test_two_sources_for_one_output_are_refused(src, tmp_path):
    from lora_sd.errors import ConfigError, DataError
    dst = tmp_path / "dst"
    Image.new("RGB", (64, 64)).save(src / "big.jpg")  # big.png and big.jpg -> big+512x512.jpg
    with pytest.raises(DataError, match=r"big.jpg and big.png would both be written as big\+512x512.jpg"):
        recipe.main([str(src), str(dst), "--max_resolution", "512x512"])
    (src / "big.jpg").unlink()
    Image.new("RGB", (64, 64)).save(src / "small+512x512.jpg")  # an earlier output left among the sources
    with pytest.raises(DataError, match=r"small\+512x512.jpg and small.jpg would both be written as small\+512x512.jpg"):
        recipe.main([str(src), str(dst), "--max_resolution", "512x512"])
    with pytest.raises(ConfigError, match="256x256 is given twice"):
        recipe.main([str(src), str(dst), "--max_resolution", "256x256,256x256"])
    assert not dst.exists()


def test_images_are_read_as_training_reads_them(tmp_path):
    """EXIF orientation applied and 16-bit greyscale brought to 8 bits (data.images.open_rgb)."""
    import numpy as np
    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (400, 200), (30, 60, 90)).save(src / "phone.jpg", exif=exif)
    Image.frombytes("I;16", (100, 100), np.full(100 * 100, 25700, "<u2").tobytes()).save(src / "grey16.png")
    dst = tmp_path / "dst"
    recipe.main([str(src), str(dst), "--max_resolution", "100x100", "--save_as_png"])
    with Image.open(dst / "phone+100x100.png") as im:
        assert im.size == (70, 141)  # upright: 200x400 shrunk to an area of 100x100
    with Image.open(dst / "grey16+100x100.png") as im:
        assert im.mode == "RGB" and im.getpixel((50, 50)) == (100, 100, 100)
