"""From an image file to the tensors a batch holds: resize, crop, flip, color aug (and the loss mask alike).

Follows sd-scripts' trim_and_resize_if_required: scale to the bucket's
covering size, then crop the bucket out (centered, or at random with
`random_crop`).
"""

import random

import numpy as np
import torch
from PIL import Image

from lora_sd.data.buckets import crop_box
from lora_sd.data.images import open_rgb, open_rgb_alpha
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
    return to_batch([image])[0]


def to_batch(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of one size -> float tensor [B, 3, H, W] in [-1, 1]: one uint8 -> float pass into the batch,
    then the scaling in place (per-image tensors stacked afterwards cost two more copies of every pixel)."""
    w, h = images[0].size
    out = torch.empty(len(images), 3, h, w)
    for i, image in enumerate(images):
        out[i].numpy()[...] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # numpy: reads a read-only view
    return out.div_(127.5).sub_(1.0)


def load_pixels(path, bucket, resized, *, crop_rng: random.Random | None = None, flip: bool = False,
                color_rng: random.Random | None = None) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The image as the training step sees it: [3, bucket_h, bucket_w] in [-1, 1], and its crop box.

    `crop_rng` set means random crop; `color_rng` set means color aug.
    """
    pixels, box, _ = load_sample(path, bucket, resized, crop_rng=crop_rng, flip=flip, color_rng=color_rng)
    return pixels, box


def load_sample(path, bucket, resized, *, mask_path=None, alpha_mask: bool = False,
                crop_rng: random.Random | None = None, flip: bool = False, color_rng: random.Random | None = None):
    """load_pixels' (pixels, crop box) and the loss mask [1, bucket_h, bucket_w] in [0, 1] (None without one):
    the red channel of `mask_path`, or the image's alpha with `alpha_mask`, resized, cropped and flipped exactly
    as the image (sd-scripts' conditioning images are always center-cropped; here they follow random_crop too)."""
    image, box, mask = load_sample_image(path, bucket, resized, mask_path=mask_path, alpha_mask=alpha_mask,
                                         crop_rng=crop_rng, flip=flip, color_rng=color_rng)
    return to_tensor(image), box, mask


def load_sample_image(path, bucket, resized, *, mask_path=None, alpha_mask: bool = False,
                      crop_rng: random.Random | None = None, flip: bool = False,
                      color_rng: random.Random | None = None):
    """load_sample with the image still a Pillow image (the latent cache converts a whole batch at once)."""
    image, alpha = open_rgb_alpha(path, alpha=alpha_mask and not mask_path)
    mask = open_rgb(mask_path).getchannel("R") if mask_path else alpha
    image = resize_image(image, resized)
    box = crop_box(resized, bucket, crop_rng)
    image = image.crop(box)
    if color_rng is not None:
        image = color_aug(image, color_rng)
    if mask is not None:
        mask = resize_image(mask, resized).crop(box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
    if mask is not None:
        mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]  # [1, H, W]
    return image, box, mask
