"""Buckets against hand-computed sd-scripts results, and the bucket batch sampler."""

import random
from collections import Counter

import pytest

from lora_sd.data.buckets import BucketAssigner, BucketSettings, crop_box, make_bucket_resolutions
from lora_sd.data.sampler import BucketBatchSampler

# make_bucket_resolutions((512, 512)) by hand: area 262144; for width w from 256
# to 1024 step 64, height = min(1024, (262144 // w) // 64 * 64), both orientations,
# plus the square floor(sqrt(area) / 64) * 64 = 512.
BUCKETS_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
               (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
               (896, 256), (960, 256), (1024, 256)]


def test_make_bucket_resolutions_512():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == BUCKETS_512


def test_make_bucket_resolutions_non_square():
    resos = make_bucket_resolutions((768, 512), 256, 1024, 64)
    # area 393216: square 576; w=448 -> 877//64*64 = 832; w=576 -> 682 -> 640; w=960 -> 409 -> 384
    for bucket in [(576, 576), (448, 832), (832, 448), (576, 640), (640, 576), (768, 512), (960, 384),
                   (320, 1024), (1024, 320)]:
        assert bucket in resos
    assert all(w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024 for w, h in resos)
    assert max(w * h for w, h in resos) <= 768 * 512


S512 = BucketSettings((512, 512), enable_bucket=True)
S768x512 = BucketSettings((768, 512), enable_bucket=True)
NO_UP = BucketSettings((512, 512), enable_bucket=True, bucket_no_upscale=True)
NO_BUCKET = BucketSettings((512, 512), enable_bucket=False)

# (settings, image size) -> (bucket, resized size), each worked out by hand from sd-scripts' rules
TABLE = [
    # aspect 2.0: nearest ratio 704/320 = 2.2 (640/384 = 1.67 is farther); narrower than the
    # bucket, so widths match: scale 0.704 -> 704 x 352, then 32 rows are cropped
    (S512, (1000, 500), (704, 320), (704, 352)),
    (S512, (512, 512), (512, 512), (512, 512)),
    (S512, (256, 1024), (256, 1024), (256, 1024)),  # an exact bucket size is kept
    # aspect 0.75: nearest 448/576 = 0.778; scale 448/300 enlarges to 448 x 597
    (S512, (300, 400), (448, 576), (448, 597)),
    (S512, (2048, 2048), (512, 512), (512, 512)),
    # non-square resolution [768, 512]
    (S768x512, (1200, 800), (768, 512), (768, 512)),
    (S768x512, (900, 1000), (576, 640), (576, 640)),  # aspect 0.9 = 576/640 exactly
    # aspect 1.4286: nearest 704/512 = 1.375; wider than the bucket so heights match:
    # scale 512/700 -> 731 x 512
    (S768x512, (1000, 700), (704, 512), (731, 512)),
    # bucket_no_upscale: small images keep their size, the bucket is floored to the step
    (NO_UP, (300, 200), (256, 192), (300, 200)),
    # 1024x768 is above the area: sqrt(262144 * 4/3) = 591.2 -> 576 wide would give 576x384
    # (ratio 1.5); 443.4 -> 384 high gives 512x384 (ratio 4/3, exact): the height wins
    (NO_UP, (1024, 768), (512, 384), (512, 384)),
    (NO_UP, (2000, 500), (1024, 256), (1024, 256)),
    (NO_UP, (1000, 100), (960, 64), (1000, 100)),  # no min/max bucket sizes with no_upscale
    # enable_bucket = false: one bucket at resolution; cover it, then crop
    (NO_BUCKET, (640, 480), (512, 512), (683, 512)),
    (NO_BUCKET, (200, 400), (512, 512), (512, 1024)),
]


@pytest.mark.parametrize("settings, size, bucket, resized", TABLE)
def test_bucket_table(settings, size, bucket, resized):
    assert BucketAssigner(settings).select(*size) == (bucket, resized)


def test_crop_box_center_and_random():
    assert crop_box((704, 352), (704, 320)) == (0, 16, 704, 336)
    rng = random.Random(0)
    tops = {crop_box((704, 352), (704, 320), rng)[1] for _ in range(200)}
    assert min(tops) >= 0 and max(tops) <= 32 and len(tops) > 10


def make_sampler(buckets, repeats, datasets=None, batch_sizes=(2,), seed=0):
    datasets = datasets or [0] * len(buckets)
    return BucketBatchSampler(datasets, buckets, repeats, list(batch_sizes), seed)


BUCKETS = [(512, 512)] * 5 + [(704, 320)] * 3 + [(320, 704)] * 2
REPEATS = [1, 2, 3, 1, 1, 2, 2, 1, 4, 1]


def test_batches_never_mix_buckets_and_epoch_covers_each_repeat_once():
    sampler = make_sampler(BUCKETS, REPEATS, batch_sizes=(3,))
    for epoch in range(3):
        batches = sampler.batches(epoch)
        for batch in batches:
            assert len({BUCKETS[row] for row, _, _ in batch}) == 1
            assert 1 <= len(batch) <= 3
        seen = Counter(row for batch in batches for row, _, _ in batch)
        assert seen == Counter({row: r for row, r in enumerate(REPEATS)})
    # buckets of 8, 5 and 5 samples in batches of 3 (the last one short, as in sd-scripts)
    assert len(sampler) == 3 + 2 + 2 == len(sampler.batches(0))


def test_shuffle_is_per_epoch_and_deterministic():
    a, b = make_sampler(BUCKETS, REPEATS), make_sampler(BUCKETS, REPEATS)
    assert a.batches(0) == b.batches(0)
    assert a.batches(0) != a.batches(1)
    assert make_sampler(BUCKETS, REPEATS, seed=1).batches(0) != a.batches(0)


def test_iteration_advances_epoch_and_choose_epoch_resumes():
    sampler = make_sampler(BUCKETS, REPEATS)
    first, second = list(sampler), list(sampler)
    assert first == sampler.batches(0) and second == sampler.batches(1)
    sampler.choose_epoch(5)
    assert list(sampler) == sampler.batches(5)


def test_datasets_keep_their_batch_sizes_and_never_share_a_batch():
    buckets = [(512, 512)] * 6
    sampler = make_sampler(buckets, [1] * 6, datasets=[0, 0, 0, 1, 1, 1], batch_sizes=(3, 1))
    batches = sampler.batches(0)
    sizes = sorted(len(b) for b in batches)
    assert sizes == [1, 1, 1, 3]
    for batch in batches:
        assert len({row < 3 for row, _, _ in batch}) == 1


def test_zero_repeat_rows_are_never_yielded():
    sampler = make_sampler([(512, 512)] * 3, [1, 0, 2])
    rows = [row for batch in sampler.batches(0) for row, _, _ in batch]
    assert sorted(rows) == [0, 2, 2]


def test_min_max_bucket_reso_are_moved_to_multiples_of_steps():
    # sd-scripts' adjust_min_max_bucket_reso_by_steps: 300 -> 256, 1000 -> 1024 at steps 64
    assigner = BucketAssigner(BucketSettings((512, 512), True, min_bucket_reso=300, max_bucket_reso=1000))
    assert assigner.predefined == BUCKETS_512
