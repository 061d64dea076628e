"""Resize every image of a folder to one or more areas, as sd-scripts' tools/resize_images_to_resolution.py.

    python recipes/resize_images_to_resolution.py SRC DST --max_resolution 512x512,384x384,256x256 \
        [--save_as_png] [--copy_associated_files] [--divisible_by N] [--interpolation area|cubic|lanczos4]

The destination gets every file of SRC as it is (images included, never
re-encoded) plus each image once per area as `name+512x512.jpg` (JPEG quality
100, or .png): shrunk to the area keeping its aspect ratio, never enlarged,
then center-cropped to multiples of --divisible_by. --copy_associated_files
also copies captions etc. beside each resized image under its new name.
Every image is read before anything reaches DST: an unreadable one stops the
run with DST as it was. Images are read as the trainer reads them (EXIF
orientation applied, transparency on white, 16-bit to 8-bit).
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sd.cli import run_main  # noqa: E402
from lora_sd.data.resize import INTERPOLATIONS, resize_images  # noqa: E402

logger = logging.getLogger("resize_images_to_resolution")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src_img_folder", help="folder with the source images")
    parser.add_argument("dst_img_folder", help="folder for the originals and the resized images (created if missing)")
    parser.add_argument("--max_resolution", default="512x512,384x384,256x256,128x128",
                        help="areas as WIDTHxHEIGHT, comma separated")
    parser.add_argument("--divisible_by", type=int, default=1, help="crop sides to multiples of this")
    parser.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default=None,
                        help="resampling filter (default: area when shrinking)")
    parser.add_argument("--save_as_png", action="store_true", help="write .png instead of .jpg")
    parser.add_argument("--copy_associated_files", action="store_true",
                        help="copy files with the image's name (captions...) beside each resized image")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    written = resize_images(args.src_img_folder, args.dst_img_folder, args.max_resolution,
                            divisible_by=args.divisible_by, interpolation=args.interpolation,
                            save_as_png=args.save_as_png, copy_associated_files=args.copy_associated_files)
    logger.info("wrote %d files to %s", len(written), args.dst_img_folder)


if __name__ == "__main__":
    sys.exit(run_main(main))
