"""Pixel normalisation shared by input decoding and output encoding.

Everything Kiln reads or writes as a picture passes through here: any Pillow mode in, 8-bit sRGB
RGB (or an 8-bit mask) out, as a new image that never shares state with the caller's.
"""

from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image, ImageFile

_load_lock = threading.Lock()


class PixelError(ValueError):
    """The image cannot be turned into 8-bit RGB (no pixels, float data, a broken profile)."""


def _to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert an RGB / L / CMYK image tagged with a non-sRGB ICC profile to sRGB RGB.

    Untagged and sRGB-tagged images are returned unchanged.  A profile that
    cannot be parsed or does not fit the pixel mode is ignored (the pixels are
    taken as sRGB) rather than failing the whole encode.
    """
    if not icc or image.mode not in ("RGB", "L", "CMYK"):
        return image
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        desc = (ImageCms.getProfileDescription(src) or "").lower()
        if "srgb" in desc or "61966-2" in desc:
            return image
        return ImageCms.profileToProfile(image, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # noqa: BLE001 - ImageCms raises several unrelated types
        return image


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    """RGBA -> RGB composited over white (alpha dropped as-is when fully opaque)."""
    if rgba.getchannel("A").getextrema() == (255, 255):
        return rgba.convert("RGB")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb8(image: Image.Image) -> Image.Image:
    """Return a *new* 8-bit sRGB ``RGB`` image with empty ``info``; never mutates ``image``."""
    if not isinstance(image, Image.Image):
        raise PixelError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise PixelError(f"image has no pixels ({image.width}x{image.height})")
    if isinstance(image, ImageFile.ImageFile):
        with _load_lock:  # ImageFile.load() mutates the shared object
            image.load()

    mode, icc = image.mode, image.info.get("icc_profile")
    if mode == "F":
        raise PixelError("32-bit float images ('F') have no defined range; convert to 8-bit first")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image).astype(np.int64)
        if mode.startswith("I;16") or int(arr.max(initial=0)) > 255:
            arr = (np.clip(arr, 0, 65535) * 255 + 32767) // 65535  # 16-bit -> 8-bit, rounded
        gray = np.clip(arr, 0, 255).astype(np.uint8)
        out = Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    else:
        try:
            if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "1") and image.has_transparency_data):
                work = _flatten_alpha(image.convert("RGBA"))
            elif mode in ("RGB", "L", "CMYK"):
                work = image
            else:  # P, 1, RGBX, YCbCr, LAB, HSV, ...
                work = image.convert("RGB")
            work = _to_srgb(work, icc)
            # copy() when nothing above made a new image: the result must be a
            # private object, because Image.save() stores per-call state
            # (encoderinfo) on it and callers may share their image across threads.
            out = work.convert("RGB") if work.mode != "RGB" else (work.copy() if work is image else work)
        except (ValueError, OSError) as exc:
            raise PixelError(f"cannot convert image mode {mode!r} to RGB: {exc}") from exc
    # Pillow's PNG writer falls back to ``im.info`` for icc_profile,
    # transparency and dpi: clear it so no stale metadata reaches the output.
    out.info = {}
    return out


def to_mask8(image: Image.Image) -> Image.Image:
    """An 8-bit ``L`` mask: 16-bit data scaled (not clipped), transparent pixels count as black (keep)."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image).astype(np.int64)
        if mode.startswith("I;16") or int(arr.max(initial=0)) > 255:
            arr = (np.clip(arr, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if mode == "F":
        raise PixelError("32-bit float masks have no defined range; send an 8-bit mask")
    if "A" in mode or (mode in ("P", "L", "1") and image.has_transparency_data):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    return image.convert("L")
