"""Image checks on real photos (scikit-image data): formats, modes, reasons, hashes."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from vlmflow.images import BadImage, CheckedImage, check_image, sha256_bytes, to_rgb

REASONS = {"zero-byte-image", "unreadable-image", "truncated-image", "decompression-bomb"}


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def small(array: np.ndarray, size: int = 64) -> Image.Image:
    image = Image.fromarray(array)
    image.thumbnail((size, size))
    return image


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return small(skdata.astronaut())


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return small(skdata.coffee(), 80)


def checked(data: bytes) -> CheckedImage:
    result = check_image(data)
    assert isinstance(result, CheckedImage), result
    return result


def bad(data: bytes) -> BadImage:
    result = check_image(data)
    assert isinstance(result, BadImage), result
    assert result.reason in REASONS
    assert result.detail
    return result


@pytest.mark.parametrize(
    ("fmt", "ext", "kept"),
    [
        ("PNG", "png", True),
        ("JPEG", "jpg", True),
        ("WEBP", "webp", True),
        ("BMP", "png", False),
        ("TIFF", "png", False),
    ],
)
def test_formats_decode_and_non_web_formats_become_png(coffee, fmt, ext, kept):
    data = encode(coffee, fmt)
    result = checked(data)
    assert result.ext == ext
    assert (result.width, result.height) == coffee.size
    assert (result.data == data) is kept
    stored = Image.open(io.BytesIO(result.data))
    assert stored.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext]
    assert stored.size == coffee.size
    assert len(result.pixel_sha256) == 64
    assert 0 <= result.phash < 2**64
    assert len(result.thumb) == 8 * 8 * 3


def test_converted_png_keeps_the_pixels(coffee):
    result = checked(encode(coffee, "BMP"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.data))), np.asarray(coffee))


def test_grayscale_photo(coffee):
    camera = small(skdata.camera())
    result = checked(encode(camera, "PNG"))
    assert result.mode == "L"
    assert (result.width, result.height) == camera.size


def test_zero_bytes():
    result = bad(b"")
    assert result.reason == "zero-byte-image"


def test_random_junk():
    junk = np.random.default_rng(0).integers(0, 256, size=2000, dtype=np.uint8).tobytes()
    assert bad(junk).reason == "unreadable-image"
    assert bad(b"this is a caption, not an image").reason == "unreadable-image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_image(astronaut, fmt, keep):
    data = encode(astronaut, fmt)
    result = bad(data[: int(len(data) * keep)])
    assert result.reason in {"truncated-image", "unreadable-image"}


def test_truncated_image_is_named_truncated(astronaut):
    data = encode(astronaut, "PNG")
    assert bad(data[: len(data) // 2]).reason == "truncated-image"


def png_header(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG header claiming `width` x `height`, with a tiny IDAT: a few bytes on disk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


def test_decompression_bomb_over_twice_the_limit():
    data = png_header(20000, 20000)
    assert len(data) < 100
    result = bad(data)
    assert result.reason == "decompression-bomb"
    assert "400000000" in result.detail


def test_decompression_bomb_between_limit_and_twice_the_limit():
    side = int((Image.MAX_IMAGE_PIXELS * 1.2) ** 0.5)  # Pillow only warns here; the check refuses it too
    assert bad(png_header(side, side)).reason == "decompression-bomb"


def test_decompression_bomb_guard_is_on():
    assert Image.MAX_IMAGE_PIXELS is not None


def test_pillow_made_bomb_png():
    side = int((Image.MAX_IMAGE_PIXELS * 1.1) ** 0.5)
    data = encode(Image.new("1", (side, side)), "PNG")  # ~99M pixels, a few kB on disk
    assert len(data) < 50_000
    assert bad(data).reason == "decompression-bomb"


def test_sixteen_bit_grayscale():
    camera = skdata.camera()[::4, ::4]
    wide = Image.fromarray(camera.astype(np.uint16) * 257)
    data = encode(wide, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    result = checked(data)
    assert result.ext == "png"
    rgb = to_rgb(Image.open(io.BytesIO(data)))
    assert rgb.mode == "RGB"
    pixels = np.asarray(rgb)
    assert int(camera.max()) == 255
    for channel in range(3):
        assert np.array_equal(pixels[..., channel], camera)  # scaled back to 8 bits exactly


def test_sixteen_bit_with_small_values_is_not_scaled():
    values = np.array([[0, 10], [100, 200]], dtype=np.uint16)
    rgb = to_rgb(Image.fromarray(values))
    assert np.asarray(rgb)[..., 0].tolist() == [[0, 10], [100, 200]]


def test_cmyk_jpeg(astronaut):
    data = encode(astronaut.convert("CMYK"), "JPEG", quality=95)
    result = checked(data)
    assert result.mode == "CMYK"
    assert result.ext == "jpg" and result.data == data
    rgb = to_rgb(Image.open(io.BytesIO(data)))
    assert rgb.mode == "RGB" and rgb.size == astronaut.size
    difference = np.abs(np.asarray(rgb, dtype=int) - np.asarray(astronaut, dtype=int)).mean()
    assert difference < 20


def test_palette_png_with_transparency(coffee):
    palette = coffee.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent_index = palette.getpixel((0, 0))
    data = encode(palette, "PNG", transparency=transparent_index)
    result = checked(data)
    assert result.mode == "P"
    rgb = to_rgb(Image.open(io.BytesIO(data)))
    assert rgb.mode == "RGB"
    indices = np.asarray(palette)
    pixels = np.asarray(rgb)
    assert (pixels[indices == transparent_index] == 255).all()  # transparent -> white
    opaque = indices != transparent_index
    assert opaque.any()
    expected = np.asarray(palette.convert("RGB"))
    assert np.array_equal(pixels[opaque], expected[opaque])


def test_rgba_composited_on_white(astronaut):
    rgba = astronaut.convert("RGBA")
    alpha = np.full(astronaut.size[::-1], 255, dtype=np.uint8)
    alpha[:, : astronaut.width // 2] = 0
    rgba.putalpha(Image.fromarray(alpha))
    data = encode(rgba, "PNG")
    result = checked(data)
    assert result.mode == "RGBA"
    pixels = np.asarray(to_rgb(Image.open(io.BytesIO(data))))
    assert pixels.shape == (astronaut.height, astronaut.width, 3)
    assert (pixels[:, : astronaut.width // 2] == 255).all()
    assert np.array_equal(pixels[:, astronaut.width // 2 :], np.asarray(astronaut)[:, astronaut.width // 2 :])


def test_grayscale_with_alpha():
    camera = small(skdata.camera(), 32).convert("LA")
    pixels = np.asarray(to_rgb(camera))
    assert pixels.shape == (camera.height, camera.width, 3)
    assert np.array_equal(pixels[..., 1], np.asarray(camera.convert("L")))


def test_same_pixels_in_two_encodings_share_pixel_hash(coffee):
    png, bmp = checked(encode(coffee, "PNG")), checked(encode(coffee, "BMP"))
    assert png.pixel_sha256 == bmp.pixel_sha256
    assert png.phash == bmp.phash
    assert png.thumb == bmp.thumb
    rgb = coffee.convert("RGB")
    expected = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode() + rgb.tobytes()).hexdigest()
    assert png.pixel_sha256 == expected


def test_different_photos_have_different_hashes(coffee, astronaut):
    a, b = checked(encode(coffee, "PNG")), checked(encode(astronaut, "PNG"))
    assert a.pixel_sha256 != b.pixel_sha256
    assert bin(a.phash ^ b.phash).count("1") > 10


def test_same_pixels_different_shape_differ():
    flat = np.asarray(small(skdata.camera(), 32))
    tall = flat.reshape(flat.shape[1], flat.shape[0]) if flat.shape[0] != flat.shape[1] else flat.reshape(-1, 16)
    a, b = checked(encode(Image.fromarray(flat), "PNG")), checked(encode(Image.fromarray(tall), "PNG"))
    assert a.pixel_sha256 != b.pixel_sha256


def test_one_changed_pixel_is_a_near_duplicate(coffee):
    pixels = np.asarray(coffee).copy()
    pixels[10, 10] = 255 - pixels[10, 10]
    original, changed = checked(encode(coffee, "PNG")), checked(encode(Image.fromarray(pixels), "PNG"))
    assert original.pixel_sha256 != changed.pixel_sha256
    assert bin(original.phash ^ changed.phash).count("1") <= 4


def test_jpeg_recompression_is_a_near_duplicate(coffee):
    high, low = checked(encode(coffee, "JPEG", quality=95)), checked(encode(coffee, "JPEG", quality=60))
    assert high.pixel_sha256 != low.pixel_sha256
    assert bin(high.phash ^ low.phash).count("1") <= 8


def test_sha256_bytes():
    assert sha256_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest()
