"""Image preprocessing against transformers' Gemma3ImageProcessor (its Pillow backend, which is what
`Gemma3ImageProcessor` resolves to without torchvision), and bad images.

Tolerance: none. Our pipeline performs the same operations in the same precision (Pillow bilinear
resize to uint8, rescale in float64 -> float32, normalize in float32), so pixel values are bitwise
equal: max |difference| == 0. Crop counts (Pan & Scan) must be equal too."""
from __future__ import annotations

import io
import resource
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from gemma3_native.images import ImageError, expand_prompt, image_text, load_image, pan_and_scan_boxes, preprocess

SIZE = 896
PAS = dict(pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)


@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    return Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE})


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth + noise, so that resampling has structure to get wrong
    yy, xx = np.mgrid[0:h, 0:w]
    base = (127 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None]
            + rng.normal(0, 20, (h, w, 4))).clip(0, 255).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(base[..., :3])
    if mode == "RGBA":
        return Image.fromarray(base)
    if mode == "LA":
        return Image.fromarray(base).convert("LA")
    if mode == "L":
        return Image.fromarray(base[..., 0])
    if mode == "1":
        return Image.fromarray(base[..., 0]).convert("1")
    if mode == "P":
        return Image.fromarray(base[..., :3]).quantize(64)
    if mode == "P+transparency":
        im = Image.fromarray(base[..., :3]).quantize(16)
        im.info["transparency"] = 3
        return im
    if mode == "CMYK":
        return Image.frombytes("CMYK", (w, h), base.tobytes())
    raise ValueError(mode)


def hf_pixels(proc, image, pan_and_scan):
    out = proc(image, do_pan_and_scan=pan_and_scan, **PAS, return_tensors="np")
    return np.asarray(out["pixel_values"]), list(out["num_crops"])


CASES = [  # mode, width, height
    ("RGB", 640, 480), ("RGB", 40, 30), ("RGB", 1000, 300), ("RGB", 300, 1000), ("RGB", 2000, 900),
    ("RGB", 4000, 500), ("RGB", 1203, 57), ("RGB", 900, 760), ("RGB", 896, 896), ("RGBA", 700, 350),
    ("LA", 33, 91), ("L", 520, 1100), ("1", 600, 250), ("P", 333, 333), ("P+transparency", 800, 300),
    ("CMYK", 1200, 400),
]


@pytest.mark.parametrize("pan_and_scan", [False, True])
@pytest.mark.parametrize("mode,w,h", CASES)
def test_pixels_equal_transformers(hf_processor, mode, w, h, pan_and_scan):
    image = make_image(mode, w, h, seed=w * 7 + h)
    ref, ref_crops = hf_pixels(hf_processor, image, pan_and_scan)
    got = preprocess(image, SIZE, pan_and_scan=pan_and_scan)
    assert [got.num_crops] == ref_crops
    assert got.pixel_values.dtype == np.float32 and got.pixel_values.shape == ref.shape
    assert np.abs(got.pixel_values - ref).max() == 0.0


def test_normalize_table_equals_the_arithmetic():
    """The lookup table _normalize uses gives, for every uint8 value in every channel, the bits of transformers'
    arithmetic (rescale in float64, then float32; normalize in float32), in the [3, H, W] layout."""
    from gemma3_native.images import _normalize, _normalize_values
    rng = np.random.default_rng(5)
    u8 = np.concatenate([np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)[None],
                         rng.integers(0, 256, (1, 256, 3), dtype=np.uint8)])  # every value, then noise: [2, 256, 3]
    got = _normalize(u8)
    ref = np.ascontiguousarray(_normalize_values(u8).transpose(2, 0, 1))
    assert got.dtype == np.float32 and got.shape == (3, 2, 256) and got.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_pan_and_scan_crop_counts():
    assert pan_and_scan_boxes(1000, 300) == [(0, 0, 334, 300), (334, 0, 668, 300), (668, 0, 1000, 300)]
    assert len(pan_and_scan_boxes(4000, 500)) == 4          # round(8) limited to 4
    assert len(pan_and_scan_boxes(600, 1000)) == 2          # portrait, ratio 1.67 -> 2
    assert pan_and_scan_boxes(900, 760) == []               # ratio < 1.2
    assert pan_and_scan_boxes(1203, 57) == []               # crops would be 57 high < 256
    assert pan_and_scan_boxes(500, 300) == []               # floor(500 / 256) = 1 -> 2 crops of 250 < 256


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_paths_and_bytes_with_exif_orientation(hf_processor, tmp_path, fmt):
    image = make_image("RGB", 300, 200, seed=1)
    p = tmp_path / f"im.{fmt.lower()}"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(p, fmt, exif=exif.tobytes()) if fmt != "PNG" else image.save(p, fmt)
    upright = ImageOps.exif_transpose(Image.open(p))  # what transformers' load_image gives
    ref, _ = hf_pixels(hf_processor, upright, False)
    assert np.abs(preprocess(p, SIZE).pixel_values - ref).max() == 0.0
    assert np.abs(preprocess(str(p), SIZE).pixel_values - ref).max() == 0.0
    assert np.abs(preprocess(p.read_bytes(), SIZE).pixel_values - ref).max() == 0.0
    if fmt == "JPEG":
        assert load_image(p).size == (200, 300)  # EXIF applied


def test_16_bit_greyscale_is_scaled_not_clipped(hf_processor):
    """16-bit images are scaled to 8 bits (transformers clips them to 255: a deliberate difference)."""
    rng = np.random.default_rng(3)
    a16 = rng.integers(0, 65536, (120, 170)).astype(np.uint16)
    im16 = Image.fromarray(a16)
    assert im16.mode == "I;16"
    a8 = np.clip(np.rint(a16 / 257.0), 0, 255).astype(np.uint8)
    ref, _ = hf_pixels(hf_processor, Image.fromarray(a8), False)
    got = preprocess(im16, SIZE).pixel_values
    assert np.abs(got - ref).max() == 0.0
    assert got.std() > 0.3  # not a white page


def test_prompt_text_matches_processor():
    """The expansion Gemma3Processor does (full_image_sequence and the Pan & Scan wording)."""
    full = "\n\n<start_of_image>" + "<image_soft_token>" * 3 + "<end_of_image>\n\n"
    assert image_text(0, 3) == full
    assert image_text(2, 3) == (f"Here is the original image {full} and here are some crops to help you see better "
                                f"{full} {full}")
    assert expand_prompt("A <start_of_image> B <start_of_image>", [0, 1], 3) == f"A {full} B {image_text(1, 3)}"
    assert expand_prompt("Describe.", [0, 0], 3) == f"{full}{full}Describe."
    assert expand_prompt("<bos>Hi", [0], 3) == f"<bos>{full}Hi"
    with pytest.raises(ValueError, match="1 <start_of_image> placeholder"):
        expand_prompt("one <start_of_image> only", [0, 0], 3)


# ---- bad images ----

def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (8-bit greyscale) with a token IDAT: no pixel data to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("this is not an image\n" * 10)
    with pytest.raises(ImageError, match="not an image"):
        preprocess(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        preprocess(p)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    buf = io.BytesIO()
    make_image("RGB", 200, 150, seed=5).save(buf, fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        preprocess(p)


def test_zero_size_image():
    with pytest.raises(ImageError, match="zero-size"):
        preprocess(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError, match="zero-size"):
        preprocess(Image.new("RGB", (10, 0)))


@pytest.mark.parametrize("side", [20000, 10000])
def test_huge_image_refused_from_its_header(tmp_path, side):
    """20000 x 20000 (beyond Pillow's bomb limit) and 10000 x 10000 (between 1x and 2x the limit, where
    Pillow only warns): refused before decoding, so memory stays bounded."""
    p = tmp_path / "huge.png"
    p.write_bytes(png_header_only(side, side))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match="too large|pixels"):
        preprocess(p)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50
    with pytest.raises(ImageError):
        preprocess(p.read_bytes())


def test_pixel_limit_follows_pillow(monkeypatch):
    im = make_image("RGB", 300, 200, seed=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    with pytest.raises(ImageError, match="more than the limit"):
        preprocess(im)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's "no limit"
    assert preprocess(im).pixel_values.shape == (1, 3, SIZE, SIZE)
    with pytest.raises(ImageError, match="more than the limit"):
        preprocess(im, max_pixels=1000)


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(FileNotFoundError):
        preprocess(tmp_path / "nope.png")
    with pytest.raises(TypeError):
        preprocess(12345)
