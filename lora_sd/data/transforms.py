"""From an image file to the tensor a batch holds: resize, crop, flip, color aug.

Follows sd-scripts' trim_and_resize_if_required: scale to the bucket's
covering size, then crop the bucket out (centered, or at random with
`random_crop`).
"""

import random

import numpy as np
import torch
from PIL import Image

from lora_sd.data.buckets import crop_box
from lora_sd.data.images import open_rgb
from lora_sd.data.resize import resize_image


def color_aug(image: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' color_aug: a third of the time, a hue shift of up to 8/180 or a gamma in [0.95, 1.05]."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        hsv = np.array(image.convert("HSV"), dtype=np.int16)
        # Pillow's hue is 0..255 for a full turn; sd-scripts shifts up to 8 of OpenCV's 180
        shift = round(rng.uniform(-8, 8) * 256 / 180)
        hsv[..., 0] = (hsv[..., 0] + shift) % 256
        return Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")
    gamma = rng.uniform(0.95, 1.05)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return Image.fromarray(np.clip(arr**gamma * 255.0 + 0.5, 0, 255).astype(np.uint8))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float tensor [3, H, W] in [-1, 1] (the VAE's input range)."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [H, W, 3]
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


def load_pixels(path, bucket, resized, *, crop_rng: random.Random | None = None, flip: bool = False,
                color_rng: random.Random | None = None) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The image as the training step sees it: [3, bucket_h, bucket_w] in [-1, 1], and its crop box.

    `crop_rng` set means random crop; `color_rng` set means color aug.
    """
    image = resize_image(open_rgb(path), resized)
    box = crop_box(resized, bucket, crop_rng)
    image = image.crop(box)
    if color_rng is not None:
        image = color_aug(image, color_rng)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image), box
