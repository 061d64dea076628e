"""build_train_data end to end on generated images: index, batches, reg balancing, bad input."""

import json
import logging

import pytest
import torch
from PIL import Image

from lora_sd.data import build_train_data, dreambooth_dataset_config, load_dataset_config
from lora_sd.data.index import build_index
from lora_sd.errors import DataError

SMALL = {"resolution": 64, "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128,
         "bucket_reso_steps": 8}


def make_images(folder, sizes, caption=None, fmt="png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (i * 40 % 256, 90, 200)).save(folder / f"img{i}.{fmt}")
        if caption is not None:
            (folder / f"img{i}.caption").write_text(f"{caption}{i}, tag a, tag b", encoding="utf-8")


def config(subsets, **general):
    return load_dataset_config({"general": {**SMALL, **general}, "datasets": [{"subsets": subsets}]})


def batches(data, epoch=0):
    data.set_epoch(epoch)
    return list(data.dataloader)


def test_index_columns_from_headers(tmp_path):
    make_images(tmp_path / "a", [(64, 64), (128, 64)], caption="cap")
    make_images(tmp_path / "b", [(40, 80)], fmt="jpg")
    index = build_index(config([{"image_dir": str(tmp_path / "a"), "num_repeats": 3},
                                {"image_dir": str(tmp_path / "b"), "class_tokens": "sks dog"}]))
    rows = index.to_list()
    assert [(r["width"], r["height"]) for r in rows] == [(64, 64), (128, 64), (40, 80)]
    assert [r["caption_source"] for r in rows] == ["file", "file", "class_tokens"]
    assert rows[0]["caption"] == "cap0, tag a, tag b" and rows[2]["caption"] == "sks dog"
    assert [r["num_repeats"] for r in rows] == [3, 3, 1]
    assert (rows[1]["bucket_w"], rows[1]["bucket_h"]) == (88, 40)  # 2:1 at area 64^2, steps 8: 88/40 = 2.2 is nearest


def test_every_batch_one_bucket_and_epoch_covers_repeats(tmp_path):
    make_images(tmp_path / "a", [(64, 64), (64, 64), (128, 64), (64, 128), (128, 64)], caption="x")
    data = build_train_data(config([{"image_dir": str(tmp_path / "a"), "num_repeats": 2}], batch_size=2),
                            seed=3, max_data_loader_n_workers=0)
    assert data.num_train_images == 10 and data.num_reg_images == 0
    seen = {}
    got = batches(data)
    assert len(got) == data.batches_per_epoch == 1 + 1 + 2 + 1  # 4, 2 and 4 samples... in pairs
    for batch in got:
        pixels = batch["pixel_values"]
        assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
        assert len(batch["captions"]) == pixels.shape[0] == len(batch["loss_weights"])
        for path in batch["image_paths"]:
            seen[path] = seen.get(path, 0) + 1
    assert sorted(seen.values()) == [2] * 5
    shapes = {b["pixel_values"].shape[2:] for b in got}
    assert shapes == {(64, 64), (40, 88), (88, 40)}  # [H, W]
    # same seed and epoch -> same batches; another epoch -> another order
    assert [b["image_paths"] for b in batches(data, 0)] == [b["image_paths"] for b in got]
    orders = {tuple(tuple(b["image_paths"]) for b in batches(data, e)) for e in range(1, 6)}
    assert len(orders) > 1


def test_reg_balancing_and_prior_loss_weight(tmp_path):
    make_images(tmp_path / "train", [(64, 64)] * 3, caption="t")
    make_images(tmp_path / "reg", [(64, 64)] * 5)
    cfg = config([{"image_dir": str(tmp_path / "train"), "num_repeats": 2},
                  {"image_dir": str(tmp_path / "reg"), "is_reg": True, "class_tokens": "dog"}], batch_size=4)
    data = build_train_data(cfg, seed=0, prior_loss_weight=0.3, max_data_loader_n_workers=0)
    # 6 training samples; reg: one pass over the 5 (n = 5), then one more repeat for the first
    rows = data.index.to_list()
    assert [r["num_repeats"] for r in rows if r["is_reg"]] == [2, 1, 1, 1, 1]
    assert data.num_train_images == 6 and data.num_reg_images == 5
    weights = {}
    for batch in batches(data):
        for path, weight, caption in zip(batch["image_paths"], batch["loss_weights"].tolist(), batch["captions"]):
            weights.setdefault("reg" if "/reg/" in path else "train", []).append(round(weight, 6))
            assert caption == "dog" if "/reg/" in path else caption.startswith("t")
    assert weights["train"] == [1.0] * 6 and weights["reg"] == [0.3] * 6


def test_more_reg_than_train_images_leaves_some_unused(tmp_path, caplog):
    make_images(tmp_path / "train", [(64, 64)] * 2)
    make_images(tmp_path / "reg", [(64, 64)] * 5)
    cfg = config([{"image_dir": str(tmp_path / "train")}, {"image_dir": str(tmp_path / "reg"), "is_reg": True}])
    with caplog.at_level(logging.WARNING):
        data = build_train_data(cfg, seed=0, max_data_loader_n_workers=0)
    assert [r["num_repeats"] for r in data.index.to_list() if r["is_reg"]] == [1, 1, 0, 0, 0]
    assert sum(len(b["captions"]) for b in batches(data)) == 4
    assert "3 regularization images are not used" in caplog.text


def test_metadata_helpers_and_fine_tuning_json(tmp_path):
    make_images(tmp_path / "10_sks dog", [(64, 64), (128, 64)], caption="Sks")
    make_images(tmp_path / "ft", [(64, 64), (64, 64)])
    meta = {"img0": {"caption": "a photo", "tags": "red, Blue"}, str(tmp_path / "ft" / "img1.png"): {"tags": "red"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    cfgs = dreambooth_dataset_config(tmp_path, **SMALL) + load_dataset_config({"datasets": [{**SMALL, "subsets": [
        {"image_dir": str(tmp_path / "ft"), "metadata_file": str(tmp_path / "meta.json")}]}]})
    data = build_train_data(cfgs, seed=0, max_data_loader_n_workers=0)
    assert data.dataset_dirs_info() == {"10_sks dog": {"n_repeats": 10, "img_count": 2},
                                        "meta.json": {"n_repeats": 1, "img_count": 2}}
    freq = data.tag_frequency()
    assert freq["10_sks dog"] == {"sks0": 1, "sks1": 1, "tag a": 2, "tag b": 2}
    # fine-tuning counts only "tags" next to a "caption" (tags alone become the caption), as sd-scripts
    assert freq["meta.json"] == {"red": 1, "blue": 1}
    assert sorted(r["caption"] for r in data.index.to_list()[2:]) == ["a photo, red, Blue", "red"]
    info = data.bucket_info()
    json.dumps(info)
    assert {tuple(b["resolution"]): b["count"] for b in info["buckets"].values()} == {(64, 64): 12, (88, 40): 10}


def test_workers_and_flip_aug(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    img = Image.new("RGB", (64, 64))
    img.paste((255, 255, 255), (0, 0, 32, 64))  # left half white
    img.save(folder / "half.png")
    cfg = config([{"image_dir": str(folder), "num_repeats": 8, "flip_aug": True}], batch_size=8)
    data = build_train_data(cfg, seed=0, max_data_loader_n_workers=1, persistent_data_loader_workers=True)
    assert data.dataloader.persistent_workers  # a run with them: tests/test_speed_data.py
    (batch,) = batches(data)
    assert 0 < sum(batch["flipped"]) < 8
    for flipped, pixels in zip(batch["flipped"], batch["pixel_values"]):
        left_white = pixels[:, :, :32].mean() > pixels[:, :, 32:].mean()
        assert left_white != flipped


def test_random_crop_and_color_aug_vary_pixels(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    img = Image.new("RGB", (128, 64))
    for x in range(128):
        img.paste((x * 2, 255 - x * 2, 60), (x, 0, x + 1, 64))  # a horizontal gradient
    img.save(folder / "wide.png")
    cfg = config([{"image_dir": str(folder), "num_repeats": 12, "random_crop": True, "color_aug": True}],
                 resolution=64, enable_bucket=False, batch_size=12)
    (batch,) = batches(build_train_data(cfg, seed=0, max_data_loader_n_workers=0))
    pixels = batch["pixel_values"]
    assert pixels.shape == (12, 3, 64, 64)
    lefts = {int(t) for t in batch["crop_top_lefts"][:, 1]}
    assert len(lefts) > 3 and max(lefts) <= 64  # random horizontal crops of the 128x64 image
    uniq = {tuple(p[:, 0, 0].tolist()) for p in pixels}
    assert len(uniq) > 3


def test_color_aug_changes_a_third_of_the_images():
    import random

    from lora_sd.data.transforms import color_aug

    img = Image.new("RGB", (8, 8), (200, 80, 40))
    changed = sum(color_aug(img, random.Random(s)).getpixel((0, 0)) != (200, 80, 40) for s in range(300))
    assert 60 < changed < 140  # p = 0.33 (a tiny shift can round back to the same color)


# ---- bad input: each is one line naming what is wrong ----

def one_line_error(cfg, match, **kw):
    with pytest.raises(DataError) as err:
        build_train_data(cfg, seed=0, max_data_loader_n_workers=0, **kw)
    assert "\n" not in str(err.value)
    assert match in str(err.value)


def test_corrupt_image_named_or_skipped(tmp_path, caplog):
    make_images(tmp_path / "a", [(64, 64)])
    (tmp_path / "a" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    cfg = config([{"image_dir": str(tmp_path / "a")}])
    one_line_error(cfg, "broken.jpg")
    with caplog.at_level(logging.WARNING):
        data = build_train_data(cfg, seed=0, max_data_loader_n_workers=0, skip_bad_images=True)
    assert len(data.index) == 1 and "broken.jpg" in caplog.text


def test_truncated_image_fails_when_loaded_naming_it(tmp_path):
    make_images(tmp_path / "a", [(64, 64)])
    path = tmp_path / "a" / "img0.png"
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixels gone
    data = build_train_data(config([{"image_dir": str(tmp_path / "a")}]), seed=0, max_data_loader_n_workers=0)
    with pytest.raises(DataError, match="img0.png"):
        batches(data)


def test_empty_folder_missing_dir_bad_caption_and_tiny_image(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    one_line_error(config([{"image_dir": str(tmp_path / "empty")}]), "has no images")
    one_line_error(config([{"image_dir": str(tmp_path / "missing")}]), "missing does not exist")
    make_images(tmp_path / "a", [(64, 64)])
    (tmp_path / "a" / "img0.caption").write_bytes(b"\xff\xfe bad")
    one_line_error(config([{"image_dir": str(tmp_path / "a")}]), "img0.caption: caption file is not UTF-8")
    make_images(tmp_path / "tiny", [(6, 6)])
    one_line_error(config([{"image_dir": str(tmp_path / "tiny")}], bucket_no_upscale=True), "bucket_reso_steps")


def test_metadata_file_errors(tmp_path):
    sub = {"image_dir": str(tmp_path), "metadata_file": str(tmp_path / "meta.json")}
    one_line_error(config([sub]), "meta.json does not exist")
    (tmp_path / "meta.json").write_text(json.dumps({"nothere": {"caption": "x"}}))
    one_line_error(config([sub]), "no image for key 'nothere'")


def test_accelerate_prepare_resume_and_skip_first_batches(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    make_images(tmp_path / "a", [(64, 64)] * 3 + [(128, 64)] * 3)
    data = build_train_data(config([{"image_dir": str(tmp_path / "a"), "num_repeats": 2}]), seed=1,
                            max_data_loader_n_workers=0)
    rows = data.index["image_path"]
    expected = [[rows[row] for row, _, _ in batch] for batch in data.sampler.batches(3)]
    try:
        accelerator = Accelerator(cpu=True)
        loader = accelerator.prepare(data.dataloader)
        list(loader)  # accelerate's own pass counter must not decide our epoch
        data.set_epoch(3)
        assert [b["image_paths"] for b in loader] == expected
        data.set_epoch(3)  # resume mid-epoch 3
        skipped = accelerator.skip_first_batches(loader, 4)
        assert [b["image_paths"] for b in skipped] == expected[4:]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_caption_dropout_every_n_epochs_counts_epochs_from_one(tmp_path):
    # sd-scripts' current_epoch is 1-based: every 2nd epoch means the 2nd, 4th, ... (set_epoch 1, 3, ...)
    make_images(tmp_path / "a", [(64, 64)], caption="cap")
    data = build_train_data(config([{"image_dir": str(tmp_path / "a"), "caption_dropout_every_n_epochs": 2}]),
                            seed=0, max_data_loader_n_workers=0)
    captions = [batches(data, epoch)[0]["captions"] for epoch in range(4)]
    assert captions == [["cap0, tag a, tag b"], [""], ["cap0, tag a, tag b"], [""]]


def test_metadata_tags_join_every_wildcard_line(tmp_path):
    make_images(tmp_path / "ft", [(64, 64)])
    (tmp_path / "meta.json").write_text(json.dumps({"img0": {"caption": "a cat\nthe cat\n", "tags": "red\nsofa"}}))
    index = build_index(config([{"image_dir": str(tmp_path / "ft"), "metadata_file": str(tmp_path / "meta.json"),
                                 "enable_wildcard": True}]))
    assert index[0]["caption"] == "a cat, red,sofa\nthe cat, red,sofa"  # either line keeps the tags
