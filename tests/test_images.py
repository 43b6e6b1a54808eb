"""Tests for pipeline/inputs/images.py: ADM crop parity, mode handling, skip reasons, folder listing."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.inputs.images import (
    DEFAULT_MAX_PIXELS,
    SkipImage,
    center_crop_adm,
    decode_image,
    list_image_folder,
    to_rgb,
)

# ----------------------------------------------------------------------------------------------
# helpers


def _reference_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion image_datasets.py center_crop_arr, transcribed independently."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _random_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth-plus-noise RGB image, so resampling differences would show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], axis=-1)
    arr = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_with_claimed_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is patched to claim width x height (pixel data stays tiny)."""
    data = bytearray(_encode(Image.new("L", (8, 8), 0), "PNG"))
    # Layout: 8-byte signature, then IHDR chunk: length(4) type(4) data(13) crc(4).
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# ----------------------------------------------------------------------------------------------
# center_crop_adm


@pytest.mark.parametrize(
    "w,h,size",
    [(517, 389, 64), (2000, 600, 64), (255, 300, 256), (389, 517, 100), (64, 64, 64), (7, 3, 5)],
)
def test_center_crop_matches_guided_diffusion(w: int, h: int, size: int) -> None:
    img = _random_rgb(w, h, seed=w * h)
    ours = np.asarray(center_crop_adm(img, size))
    ref = _reference_center_crop_arr(img, size)
    assert ours.shape == (size, size, 3)
    np.testing.assert_array_equal(ours, ref)


def test_center_crop_rejects_bad_size() -> None:
    with pytest.raises(ValueError):
        center_crop_adm(_random_rgb(8, 8), 0)


# ----------------------------------------------------------------------------------------------
# modes


def _p_with_transparency() -> bytes:
    img = Image.new("P", (40, 30), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (10, 10, 30, 20))
    return _encode(img, "PNG", transparency=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _encode(Image.new("CMYK", (50, 40), (0, 255, 255, 0)), "JPEG"),
        lambda: _encode(Image.new("L", (50, 40), 77), "PNG"),
        lambda: _encode(Image.new("LA", (50, 40), (77, 10)), "PNG"),
        _p_with_transparency,
        lambda: _encode(Image.new("RGBA", (50, 40), (10, 200, 30, 0)), "PNG"),
        lambda: _encode(Image.new("1", (50, 40), 1), "PNG"),
        lambda: _encode(_random_rgb(50, 40).convert("RGB"), "WEBP"),
        lambda: _encode(_random_rgb(50, 40), "BMP"),
        lambda: _encode(_random_rgb(50, 40).convert("P"), "GIF"),
        lambda: _encode(_random_rgb(50, 40), "TIFF"),
    ],
    ids=["cmyk-jpeg", "L", "LA", "P-transparency", "RGBA", "1bit", "webp", "bmp", "gif", "tiff"],
)
def test_decode_modes_give_rgb_uint8(make) -> None:
    out = decode_image(make(), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_cmyk_red_stays_red() -> None:
    out = decode_image(_encode(Image.new("CMYK", (50, 40), (0, 255, 255, 0)), "JPEG"), 8)
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_alpha_is_dropped_not_composited() -> None:
    # Fully transparent green: dropping alpha (guided-diffusion/edm2 behaviour) keeps the green;
    # compositing on white would give white.
    out = decode_image(_encode(Image.new("RGBA", (20, 20), (10, 200, 30, 0)), "PNG"), 8)
    np.testing.assert_array_equal(out[0, 0], [10, 200, 30])


def test_16bit_grey_is_scaled_not_clipped() -> None:
    img16 = Image.fromarray(np.full((30, 40), 32896, dtype=np.uint16))
    data = _encode(img16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, 16)
    assert out.shape == (16, 16, 3)
    assert np.all(np.abs(out.astype(int) - 128) <= 1)


def test_int32_and_float_modes() -> None:
    as_i = to_rgb(Image.fromarray(np.full((4, 4), 65535, dtype=np.int32)))
    assert as_i.mode == "RGB" and np.asarray(as_i).min() == 255
    as_f = to_rgb(Image.fromarray(np.full((4, 4), 100.0, dtype=np.float32)))
    assert as_f.mode == "RGB" and np.all(np.asarray(as_f) == 100)


def _exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    """A 40x20 JPEG, left half red / right half blue, tagged orientation 6 (rotate 90 CW)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    raw = Image.open(io.BytesIO(data))
    raw.load()
    return data, raw


def test_exif_orientation_is_applied() -> None:
    data, raw = _exif_rotated_jpeg()
    upright = to_rgb(Image.open(io.BytesIO(data)))
    expected = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert upright.size == (20, 40)
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(expected))
    # Rotating 90 degrees clockwise puts the red left half on top.
    top, bottom = np.asarray(upright)[:20], np.asarray(upright)[20:]
    assert top[..., 0].mean() > 200 and bottom[..., 2].mean() > 200
    np.testing.assert_array_equal(decode_image(data, 16), np.asarray(center_crop_adm(expected, 16)))


def test_exif_can_be_ignored_for_upstream_parity() -> None:
    data, raw = _exif_rotated_jpeg()
    out = decode_image(data, 16, apply_exif=False)
    np.testing.assert_array_equal(out, _reference_center_crop_arr(raw.convert("RGB"), 16))


# ----------------------------------------------------------------------------------------------
# skip reasons


def test_skip_empty_bytes() -> None:
    with pytest.raises(SkipImage, match="empty file") as info:
        decode_image(b"", 16)
    assert info.value.reason == "empty file" == str(info.value)


def test_skip_garbage_bytes() -> None:
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(SkipImage, match="cannot identify image"):
        decode_image(garbage, 16)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_skip_truncated(fmt: str) -> None:
    data = _encode(_random_rgb(200, 150), fmt)
    with pytest.raises(SkipImage) as info:
        decode_image(data[: len(data) // 2], 16)
    assert info.value.reason


def test_skip_garbage_after_valid_header() -> None:
    data = bytearray(_encode(_random_rgb(64, 64), "JPEG"))
    data[300:] = b"\xff" * (len(data) - 300)
    with pytest.raises(SkipImage):
        decode_image(bytes(data), 16)


def test_skip_pil_decompression_bomb() -> None:
    # 20000 x 20000 = 4e8 pixels > PIL's 2 * MAX_IMAGE_PIXELS: PIL itself refuses at open.
    with pytest.raises(SkipImage, match="decompression bomb"):
        decode_image(_png_with_claimed_size(20000, 20000), 16)


def test_skip_bomb_by_our_threshold_without_warning() -> None:
    # 12000^2 lies between PIL's warning and error thresholds; neither may leak out.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SkipImage, match="decompression bomb"):
            decode_image(_png_with_claimed_size(12000, 12000), 16, max_pixels=10**6)


def test_max_pixels_threshold_on_a_real_image() -> None:
    data = _encode(_random_rgb(100, 100), "PNG")
    assert decode_image(data, 16, max_pixels=10_000).shape == (16, 16, 3)
    with pytest.raises(SkipImage, match="100x100"):
        decode_image(data, 16, max_pixels=9_999)


def test_skip_extreme_aspect_ratio() -> None:
    data = _encode(Image.new("L", (5000, 1), 3), "PNG")
    with pytest.raises(SkipImage, match="aspect"):
        decode_image(data, 256, max_pixels=10**6)


def test_global_pil_state_unchanged() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    data = _encode(_random_rgb(80, 60), "JPEG")
    inputs = [b"", b"junk", data, data[: len(data) // 2], _png_with_claimed_size(20000, 20000)]
    inputs.append(_png_with_claimed_size(12000, 12000))
    for blob in inputs:
        try:
            decode_image(blob, 16, max_pixels=DEFAULT_MAX_PIXELS)
        except SkipImage:
            pass
    after = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    assert after == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----------------------------------------------------------------------------------------------
# list_image_folder


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_list_image_folder_order_and_labels(tmp_path: Path) -> None:
    for rel in [
        "n02/b.JPEG",
        "n02/a.jpg",
        "n01/z.png",
        "n01/sub/y.PNG",
        "n03/c.webp",
        "n01/notes.txt",
        "n01/._z.png",
        "n01/.hidden/q.jpg",
        "top.jpg",
        ".cache/x.jpg",
    ]:
        _touch(tmp_path / rel)
    classes, items = list_image_folder(tmp_path)
    assert classes == ["n01", "n02", "n03"]
    assert items == [
        ("n01/sub/y.PNG", 0),
        ("n01/z.png", 0),
        ("n02/a.jpg", 1),
        ("n02/b.JPEG", 1),
        ("n03/c.webp", 2),
    ]


def test_list_image_folder_keeps_empty_class(tmp_path: Path) -> None:
    _touch(tmp_path / "a" / "1.jpg")
    (tmp_path / "b").mkdir()
    _touch(tmp_path / "c" / "2.jpg")
    classes, items = list_image_folder(tmp_path)
    assert classes == ["a", "b", "c"] and items == [("a/1.jpg", 0), ("c/2.jpg", 2)]


def test_list_image_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        list_image_folder(missing)
    flat = tmp_path / "flat"
    _touch(flat / "img.jpg")
    with pytest.raises(ValueError, match="no class subdirectories"):
        list_image_folder(flat)
    noimg = tmp_path / "noimg"
    _touch(noimg / "cls" / "readme.txt")
    with pytest.raises(ValueError, match="no images") as info:
        list_image_folder(noimg)
    assert "noimg" in str(info.value)
