"""Aspect-ratio buckets, by sd-scripts' rules (library/model_util.py, train_util.BucketManager).

Predefined buckets keep about `resolution` area with both sides multiples of
`bucket_reso_steps` between `min_bucket_reso` and `max_bucket_reso`; an image
goes to the bucket whose aspect ratio is nearest, is scaled so that it covers
the bucket, then cropped. With `bucket_no_upscale` the bucket comes from the
image's own size instead (shrunk to the area if larger, never enlarged).
All sizes are (width, height).
"""

import math
from dataclasses import dataclass

from lora_sd.errors import DataError


def make_bucket_resolutions(resolution, min_size=256, max_size=1024, steps=64) -> list[tuple[int, int]]:
    """All predefined (width, height) buckets for `resolution`'s area, sorted."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area) // steps) * steps
    resos = {(side, side)}  # sd-scripts always has the square one
    width = min_size
    while width <= max_size:
        height = min(max_size, int((area // width) // steps) * steps)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


def bucket_reso_range(min_bucket_reso: int, max_bucket_reso: int, steps: int) -> tuple[int, int]:
    """sd-scripts' adjust_min_max_bucket_reso_by_steps: min down, max up to multiples of `steps`.

    Without it a `min_bucket_reso` of 300 at steps 64 would give buckets 300, 364, ... wide.
    """
    return min_bucket_reso - min_bucket_reso % steps, max_bucket_reso + (-max_bucket_reso) % steps


@dataclass(frozen=True)
class BucketSettings:
    """What decides an image's bucket (one per dataset)."""

    resolution: tuple[int, int]
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    @classmethod
    def of(cls, ds) -> "BucketSettings":
        return cls(tuple(ds.resolution), ds.enable_bucket, ds.min_bucket_reso, ds.max_bucket_reso,
                   ds.bucket_reso_steps, ds.bucket_no_upscale)


class BucketAssigner:
    """select(width, height) -> (bucket, resized_size), as sd-scripts' BucketManager.select_bucket."""

    def __init__(self, settings: BucketSettings):
        self.settings = settings
        if not settings.enable_bucket:
            # one fixed bucket: the image is scaled to cover `resolution` and cropped
            self.predefined = [tuple(settings.resolution)]
        elif settings.bucket_no_upscale:
            self.predefined = []
        else:
            s = settings
            low, high = bucket_reso_range(s.min_bucket_reso, s.max_bucket_reso, s.bucket_reso_steps)
            self.predefined = make_bucket_resolutions(s.resolution, low, high, s.bucket_reso_steps)
            if not self.predefined:
                raise DataError(f"bucket settings {s} leave no bucket")
        self._predefined_set = set(self.predefined)
        self._ratios = [w / h for w, h in self.predefined]

    def select(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.predefined:
            return self._select_predefined(width, height)
        return self._select_no_upscale(width, height)

    def _select_predefined(self, width, height):
        aspect = width / height
        if (width, height) in self._predefined_set:
            bucket = (width, height)
        else:  # nearest aspect ratio; first one wins a tie, like numpy's argmin
            errors = [abs(r - aspect) for r in self._ratios]
            bucket = self.predefined[errors.index(min(errors))]
        if aspect > bucket[0] / bucket[1]:  # wider than the bucket: match heights
            scale = bucket[1] / height
        else:
            scale = bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        return bucket, resized

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.settings.bucket_reso_steps

    def _select_no_upscale(self, width, height):
        steps = self.settings.bucket_reso_steps
        max_area = self.settings.resolution[0] * self.settings.resolution[1]
        aspect = width / height
        if width * height > max_area:
            # shrink to the area keeping the aspect; round the side whose rounding
            # distorts the aspect ratio least to the step
            rw = math.sqrt(max_area * aspect)
            rh = max_area / rw
            bw = self._round(rw)
            ar_w = bw / self._round(bw / aspect) if self._round(bw / aspect) else math.inf
            bh = self._round(rh)
            ar_h = self._round(bh * aspect) / bh if bh else math.inf
            if abs(ar_w - aspect) < abs(ar_h - aspect):
                resized = (bw, int(bw / aspect + 0.5))
            else:
                resized = (int(bh * aspect + 0.5), bh)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        return bucket, resized


def crop_box(resized, bucket, rng=None) -> tuple[int, int, int, int]:
    """Left, top, right, bottom of the bucket inside the resized image: centered, or random."""
    boxes = []
    for have, want in zip(resized, bucket):
        extra = have - want
        boxes.append(rng.randint(0, extra) if (rng is not None and extra > 0) else extra // 2)
    left, top = boxes
    return left, top, left + bucket[0], top + bucket[1]
