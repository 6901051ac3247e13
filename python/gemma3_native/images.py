"""Image preprocessing for multimodal Gemma 3, with Pillow and numpy: the same pixel values as
transformers' Gemma3ImageProcessor (its Pillow backend, which transformers 5 uses whenever torchvision
is not installed, and which the `Gemma3ImageProcessor` name then resolves to).

    open (a path: EXIF orientation applied, as transformers' load_image does)
    -> RGB (transparency composited onto white; 16-bit greyscale scaled to 8 bits, see below)
    -> [Pan & Scan crops of the uint8 image]
    -> resize each to size x size with Pillow's bilinear filter (uint8 result, as transformers)
    -> x * (1/255) in float64, then float32; (x - 0.5) / 0.5 in float32      -> [n, 3, size, size]

These are the same operations in the same order and precision as transformers, so the values are
bitwise equal (tests/test_images.py checks max |difference| == 0).

One deliberate difference: a 16-bit greyscale image (Pillow modes I;16*, I) is scaled to 8 bits
(round(v / 257)) before it becomes RGB. transformers hands it to Pillow's convert("RGB"), which clips
every value above 255 and so turns an ordinary 16-bit photo white.

Bad input raises ImageError (a ValueError) naming the file: not an image, an empty or truncated file,
a zero-size image, or one with more pixels than `max_pixels` (Pillow's decompression-bomb limit,
about 89.5 million, by default), which is refused from its header before any pixel is decoded.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# transformers' Gemma3Processor defaults (images_kwargs) and Gemma 3's preprocessor_config.json
PAN_AND_SCAN_MIN_CROP_SIZE = 256
PAN_AND_SCAN_MAX_NUM_CROPS = 4
PAN_AND_SCAN_MIN_RATIO = 1.2
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
RESCALE_FACTOR = 1 / 255


class ImageError(ValueError):
    """An image cannot be read or used: not an image, truncated, empty, zero-size or too large."""


def _pil():
    try:
        from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError  # noqa: F401
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise ImportError("image input needs Pillow: pip install pillow") from e
    return Image


def default_max_pixels() -> int:
    """Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS, read at each call: raise it, or set
    it to None for no limit, to accept larger images)."""
    Image = _pil()
    return 1 << 62 if Image.MAX_IMAGE_PIXELS is None else int(Image.MAX_IMAGE_PIXELS)


def _check_size(img, what: str, max_pixels: int | None) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{what}: zero-size image ({w}x{h})")
    limit = default_max_pixels() if max_pixels is None else max_pixels
    if w * h > limit:
        raise ImageError(f"{what}: {w}x{h} image has {w * h} pixels, more than the limit of {limit} "
                         f"(max_pixels); downscale it first")


def load_image(src: Any, max_pixels: int | None = None):
    """A PIL image from a path (str / PathLike), raw bytes or a PIL image, fully decoded.
    Paths and bytes get their EXIF orientation applied (as transformers' load_image does); a PIL image
    is used as given (as transformers' image processor does)."""
    Image = _pil()
    from PIL import ImageOps, UnidentifiedImageError
    if isinstance(src, Image.Image):
        _check_size(src, "image", max_pixels)
        return src
    if isinstance(src, (bytes, bytearray)):
        what, opener = "image bytes", lambda: Image.open(io.BytesIO(bytes(src)))
        if len(src) == 0:
            raise ImageError("image bytes: empty")
    elif isinstance(src, (str, os.PathLike)):
        p = Path(src)
        what = str(p)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: image file not found")
        if p.stat().st_size == 0:
            raise ImageError(f"{p}: empty file, not an image")
        opener = lambda: Image.open(p)  # noqa: E731
    else:
        raise TypeError(f"an image must be a path, bytes or a PIL image, got {type(src).__name__}")
    try:
        with warnings.catch_warnings():
            # Pillow warns past MAX_IMAGE_PIXELS and raises past twice that; we check the size ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = opener()
            _check_size(img, what, max_pixels)  # from the header: nothing decoded yet
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow refuses twice its own limit whatever ours is
        raise ImageError(f"{what}: image too large ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what}: not an image (or a format Pillow cannot read)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{what}: corrupt or truncated image ({e})") from None
    return img


def to_rgb(img):
    """RGB as transformers' convert_to_rgb does it: an image with an alpha band or a transparency key is
    composited onto white; anything else goes through Pillow's convert("RGB"). 16-bit greyscale is first
    scaled to 8 bits (the one deliberate difference, see the module docstring)."""
    Image = _pil()
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), mode="L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def pan_and_scan_boxes(width: int, height: int, min_crop_size: int = PAN_AND_SCAN_MIN_CROP_SIZE,
                       max_num_crops: int = PAN_AND_SCAN_MAX_NUM_CROPS,
                       min_ratio_to_activate: float = PAN_AND_SCAN_MIN_RATIO) -> list[tuple[int, int, int, int]]:
    """Pan & Scan crop boxes (left, top, right, bottom), transformers' rule: only for an aspect ratio of at
    least min_ratio_to_activate; round(ratio) crops along the long side, limited by min_crop_size, at least
    2 and at most max_num_crops; none if a crop would be smaller than min_crop_size. The last crop is cut
    at the image border (numpy slicing), so it may be narrower."""
    if width >= height:
        if width / height < min_ratio_to_activate:
            return []
        nw = int(math.floor(width / height + 0.5))
        nw = min(int(math.floor(width / min_crop_size)), nw)
        nw = min(max_num_crops, max(2, nw))
        nh = 1
    else:
        if height / width < min_ratio_to_activate:
            return []
        nh = int(math.floor(height / width + 0.5))
        nh = min(int(math.floor(height / min_crop_size)), nh)
        nh = min(max_num_crops, max(2, nh))
        nw = 1
    cw, ch = int(math.ceil(width / nw)), int(math.ceil(height / nh))
    if min(cw, ch) < min_crop_size:
        return []
    return [(x, y, min(x + cw, width), min(y + ch, height))
            for y in (ch * i for i in range(nh)) for x in (cw * j for j in range(nw))]


def _normalize_values(u8: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 [..., 3]: rescale in float64 then float32, normalize in float32 (transformers'
    order of operations, so its bits)."""
    x = (u8.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    return (x - np.array(IMAGE_MEAN, np.float32)) / np.array(IMAGE_STD, np.float32)


# Every (value, channel) pair's result, computed once: normalizing an image is then one lookup per pixel and
# channel, with the same bits as the arithmetic (which costs ~4x more on a 896 x 896 image).
_NORMALIZE_LUT = np.ascontiguousarray(
    _normalize_values(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)).T)  # [3, 256]


def _normalize(u8_hwc: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] (see _normalize_values), through the lookup table."""
    return np.stack([_NORMALIZE_LUT[c][u8_hwc[:, :, c]] for c in range(3)])


@dataclass
class ProcessedImage:
    pixel_values: np.ndarray  # [1 + num_crops, 3, size, size] float32: the whole image, then its crops
    num_crops: int


def preprocess(image: Any, size: int = 896, pan_and_scan: bool = False, max_pixels: int | None = None,
               min_crop_size: int = PAN_AND_SCAN_MIN_CROP_SIZE, max_num_crops: int = PAN_AND_SCAN_MAX_NUM_CROPS,
               min_ratio_to_activate: float = PAN_AND_SCAN_MIN_RATIO) -> ProcessedImage:
    """One image (path, bytes or PIL image) -> pixel values for the vision encoder."""
    Image = _pil()
    rgb = to_rgb(load_image(image, max_pixels))
    boxes = pan_and_scan_boxes(*rgb.size, min_crop_size, max_num_crops, min_ratio_to_activate) if pan_and_scan else []
    views = [rgb] + [rgb.crop(b) for b in boxes]
    out = np.empty((len(views), 3, size, size), np.float32)
    for i, v in enumerate(views):
        r = v.resize((size, size), resample=Image.BILINEAR)
        out[i] = _normalize(np.asarray(r, dtype=np.uint8))
    return ProcessedImage(out, len(boxes))


def image_text(num_crops: int, tokens_per_image: int, boi: str = "<start_of_image>",
               soft: str = "<image_soft_token>", eoi: str = "<end_of_image>") -> str:
    """The text one image becomes in a prompt, as transformers' Gemma3Processor writes it."""
    full = f"\n\n{boi}{soft * tokens_per_image}{eoi}\n\n"
    if not num_crops:
        return full
    return (f"Here is the original image {full} and here are some crops to help you see better "
            + " ".join([full] * num_crops))


def expand_prompt(text: str, num_crops: Sequence[int], tokens_per_image: int, boi: str = "<start_of_image>",
                  soft: str = "<image_soft_token>", eoi: str = "<end_of_image>") -> str:
    """Replace each `<start_of_image>` placeholder of `text` with its image's text (in order). A prompt
    without placeholders gets one per image at its start (after a leading <bos>); a prompt with some
    placeholders must have exactly one per image, as transformers' processor requires."""
    n = len(num_crops)
    found = text.count(boi)
    if found == 0 and n:
        head = "<bos>" if text.startswith("<bos>") else ""
        text = head + boi * n + text[len(head):]
    elif found != n:
        raise ValueError(f"the prompt has {found} {boi} placeholder(s) for {n} image(s)")
    parts = text.split(boi)
    out = [parts[0]]
    for i, rest in enumerate(parts[1:]):
        out.append(image_text(num_crops[i], tokens_per_image, boi, soft, eoi))
        out.append(rest)
    return "".join(out)
