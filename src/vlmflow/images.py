"""Decode and check image bytes; every failure is a reason code, never an exception (whatever
exception type a decoder raises on a hostile file).

Pillow's decompression-bomb guard stays on: images over Image.MAX_IMAGE_PIXELS are refused
(Pillow warns between 1x and 2x the limit; that warning is treated as a refusal too).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
THUMB = 8


@dataclass(frozen=True)
class CheckedImage:
    data: bytes  # bytes to store: the original file, or PNG when the format is not kept
    ext: str
    width: int
    height: int
    mode: str
    pixel_sha256: str  # sha256 of the decoded RGB pixels (exact-duplicate key)
    phash: int  # 64-bit perceptual hash (near-duplicate candidates; blind to colour)
    thumb: bytes  # 8x8 RGB thumbnail (near-duplicate check of colour)


@dataclass(frozen=True)
class BadImage:
    reason: str
    detail: str


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any mode: alpha composited on white, 16-bit scaled to 8-bit, CMYK/P converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.uint32)
        peak = max(int(array.max()), 1)
        scaled = (array * 255 // peak) if peak > 255 else array
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def check_image(data: bytes) -> CheckedImage | BadImage:
    """The decoded, hashed image, or why it cannot be used. Never raises for bad bytes: any
    exception a decoder throws (formats raise ValueError, struct.error, EOFError, SyntaxError,
    ZeroDivisionError, IndexError...) is `unreadable-image`, keeping `decompression-bomb` and
    `truncated-image` as their own reasons."""
    if not data:
        return BadImage("zero-byte-image", "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return _checked(data, image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return BadImage("decompression-bomb", str(exc))
    except UnidentifiedImageError:
        return BadImage("unreadable-image", "not an image format Pillow can identify")
    except OSError as exc:
        reason = "truncated-image" if "truncated" in str(exc) else "unreadable-image"
        return BadImage(reason, str(exc) or type(exc).__name__)
    except Exception as exc:  # any decoder exception is a property of the file, not a bug here
        return BadImage("unreadable-image", f"{type(exc).__name__}: {exc}")


def _checked(data: bytes, image: Image.Image) -> CheckedImage:
    fmt = image.format or ""
    rgb = to_rgb(image)
    stored, ext = data, KEEP_FORMATS.get(fmt)
    if ext is None:
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        stored, ext = buffer.getvalue(), "png"
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode() + rgb.tobytes()).hexdigest()
    phash = int(str(imagehash.phash(rgb)), 16)
    thumb = rgb.resize((THUMB, THUMB), Image.Resampling.BOX).tobytes()
    return CheckedImage(stored, ext, image.width, image.height, image.mode, digest, phash, thumb)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
