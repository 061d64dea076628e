"""The demo's procedurally drawn pictures: the scenes its base model is pretrained on, and the concept its LoRA teaches.

The base model's U-Net sees only `draw_scene` pictures (houses and trees in green, white, black or
yellow on a day sky, a night sky or grass; never red, never a disc), captioned with what is drawn.
The LoRA's images (`draw_image`: a red disc with a white ring on a dark blue gradient, "sks shape")
are something it never saw, so a person can tell the before/after pictures apart and a test can
measure the difference (`colour_distance`).
"""

import math
import random

SIZE = 64
CONCEPT_CAPTION = "a photo of sks shape, red, blue"

# name -> (top colour, bottom colour) of a vertical gradient
_BACKGROUNDS = {"day": ((150, 200, 245), (215, 235, 250)), "night": ((10, 10, 25), (45, 45, 70)),
                "grass": ((150, 200, 245), (60, 150, 60))}
_COLOURS = {"green": (40, 170, 60), "white": (245, 245, 245), "black": (15, 15, 15), "yellow": (235, 210, 40)}
_SHAPES = ("house", "tree")


def _gradient(draw, size, top, bottom):
    for y in range(size):
        f = y / (size - 1)
        draw.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * f) for a, b in zip(top, bottom)))


def _draw_shape(draw, shape, cx, cy, r, colour):
    if shape == "house":  # a square with a roof
        draw.rectangle([cx - r, cy - r * 0.4, cx + r, cy + r], fill=colour)
        draw.polygon([(cx - r * 1.2, cy - r * 0.4), (cx + r * 1.2, cy - r * 0.4), (cx, cy - r * 1.3)], fill=colour)
    else:  # "tree": a triangle on a trunk
        draw.polygon([(cx - r, cy + r * 0.6), (cx + r, cy + r * 0.6), (cx, cy - r * 1.3)], fill=colour)
        draw.rectangle([cx - r * 0.2, cy + r * 0.6, cx + r * 0.2, cy + r * 1.2], fill=colour)


def draw_scene(rng: random.Random, size=SIZE):
    """A base-model picture and its caption, e.g. ("a photo of green tree, night", image)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    background, colour, shape = rng.choice(list(_BACKGROUNDS)), rng.choice(list(_COLOURS)), rng.choice(_SHAPES)
    _gradient(draw, size, *_BACKGROUNDS[background])
    r = rng.uniform(0.18, 0.28) * size
    _draw_shape(draw, shape, rng.uniform(r, size - r), rng.uniform(1.3 * r, size - 1.2 * r), r, _COLOURS[colour])
    return f"a photo of {colour} {shape}, {background}", image


def draw_image(rng: random.Random, size=SIZE):
    """A red disc with a white ring on a blue gradient, at a random place and size: the "sks shape"."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    top = rng.randint(40, 90)
    for y in range(size):
        v = int(top + (200 - top) * y / size)
        draw.line([(0, y), (size, y)], fill=(20, 40, v))
    r = rng.uniform(0.18, 0.3) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 30, 30), outline=(250, 250, 250), width=max(2, size // 24))
    a = rng.uniform(0, 2 * math.pi)
    draw.line([(cx, cy), (cx + r * math.cos(a), cy + r * math.sin(a))], fill=(250, 250, 250), width=2)
    return image


def _colours(images, size=16):
    import numpy as np

    return np.concatenate([np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32).reshape(-1, 3) / 255
                           for im in images])  # [pixels, 3] in [0, 1]


def colour_distance(images, references):
    """How far `images` are in colour from `references`: a symmetric chamfer distance between their pixels'
    colours (each pixel's distance to the nearest colour of the other set, averaged, both ways; images
    taken at 16x16). 0: the same palette; ~0.5: unrelated palettes. Where the colours are, it ignores."""
    import numpy as np

    a, b = _colours(images), _colours(references)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # [len(a), len(b)]
    return float(d.min(1).mean() + d.min(0).mean()) / 2
