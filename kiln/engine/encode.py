"""Output encoding for the engine: PIL images / frame stacks -> encoded bytes.

No HTTP and no storage knowledge here: callers get ``bytes`` plus a media type
from :data:`MEDIA_TYPES` and decide what to do with them.

Images (:func:`encode_image`) come out as 8-bit sRGB RGB (WebP, PNG or JPEG).
Alpha is flattened onto white, 16-bit greyscale is scaled down to 8 bits,
embedded ICC profiles other than sRGB are converted to sRGB, and no metadata
(EXIF, XMP, ICC) is written: untagged output is sRGB by web convention.

Videos (:func:`encode_video`) come out as MP4 / H.264 (libx264 via PyAV),
yuv420p 8-bit, BT.709 limited range (tagged in the stream), constant frame
rate, every input frame kept, ``+faststart`` (moov before mdat) so browsers can
start playing before the download ends.  yuv420p needs even dimensions, so odd
widths/heights are padded by one row/column that repeats the edge pixels: the
output is ``(W + W % 2) x (H + H % 2)``.

Both functions are thread-safe: each call works on private copies and private
encoder / container objects (plus its own temp file for MP4), and the shared
input is only read (a lazily loaded file-backed image is loaded under a lock).
WebP and PNG encoding run with the GIL released (bench/encode.py: ~1.9x
throughput with two threads on two cores), so concurrent calls use several
cores; libx264 runs its own worker threads.
"""

from __future__ import annotations

import io
import numbers
import os
import tempfile
from fractions import Fraction
from typing import Sequence, Union

import numpy as np
from PIL import Image

from kiln.engine.pixels import PixelError, to_rgb8
from kiln.errors import UnsupportedFormat

__all__ = [
    "EncodeError",
    "IMAGE_FORMATS",
    "MEDIA_TYPES",
    "PNG_COMPRESS_LEVEL",
    "VIDEO_CRF",
    "VIDEO_PRESET",
    "WEBP_METHOD",
    "encode_image",
    "encode_video",
    "video_max_bitrate",
]

MEDIA_TYPES: dict[str, str] = {
    "webp": "image/webp",
    "png": "image/png",
    "jpeg": "image/jpeg",
    "mp4": "video/mp4",
}

IMAGE_FORMATS = ("webp", "png", "jpeg")
_ALIASES = {"jpg": "jpeg"}

# libwebp "method" (0 = fastest .. 6 = slowest/smallest; Pillow's default is 4).
# Chosen by bench/encode.py: the fastest setting at quality 90 whose files stay
# within +15% of method 4 on every bench image without losing PSNR.  Method 2:
# ~2.5x faster than method 4 at 1024x1024 (30 ms vs 71 ms on 2 EPYC cores),
# files +1.7% (worst image +3%).  Methods 0/1 are faster (3.4x / 2.55x) but
# their files grow up to +44% / +27% on images with large smooth areas.
# See bench/results/encode-20261121.md (raw timings: encode-20261121.json).
WEBP_METHOD = 2

# zlib level for PNG.  Level 1 is ~4.5x faster than Pillow's default 6 on a
# 1024x1024 image (62 ms vs 275 ms) for ~16% larger files
# (bench/results/encode-20261121.md).
PNG_COMPRESS_LEVEL = 1

# JPEG: baseline (not progressive), no Huffman optimisation pass, 4:2:0 chroma.
_JPEG_SUBSAMPLING = "4:2:0"

# H.264: capped CRF.  CRF 18 is visually near-lossless; the VBV cap keeps the
# rate at or below the API spec (~8 Mbit/s at 720p, ~4 Mbit/s at 480p, see
# video_max_bitrate).  "faster" takes ~0.8 s for 49 frames of 1280x720 on two
# cores vs ~1.2 s for "medium" at a similar bitrate; encoding stays a small
# share of a video generation either way (bench/results/encode-20261121.md).
VIDEO_PRESET = "faster"
VIDEO_CRF = 18
VIDEO_PROFILE = "high"

_WEBP_MAX_DIM = 16383
_JPEG_MAX_DIM = 65535
_MAX_FPS = 240

class EncodeError(UnsupportedFormat, ValueError):
    """Unsupported output format or input that cannot be encoded."""


# --------------------------------------------------------------------------- helpers


def _norm_format(fmt: object, allowed: Sequence[str]) -> str:
    if not isinstance(fmt, str):
        raise EncodeError(f"format must be a string, got {type(fmt).__name__}")
    key = fmt.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in allowed:
        raise EncodeError(f"unsupported format {fmt!r}; expected one of {', '.join(allowed)}")
    return key


def media_type(fmt: str) -> str:
    """The Content-Type for an output format name (``webp``, ``png``, ``jpeg``/``jpg``, ``mp4``)."""
    return MEDIA_TYPES[_norm_format(fmt, tuple(MEDIA_TYPES))]


def _rgb8(image: Image.Image) -> Image.Image:
    try:
        return to_rgb8(image)
    except PixelError as exc:
        raise EncodeError(str(exc)) from exc


def _check_quality(quality: object) -> int:
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral):
        raise EncodeError(f"quality must be an int in 0..100, got {quality!r}")
    q = int(quality)
    if not 0 <= q <= 100:
        raise EncodeError(f"quality must be in 0..100, got {q}")
    return q


# --------------------------------------------------------------------------- images


def encode_image(image: Image.Image, fmt: str = "webp", quality: int = 90) -> bytes:
    """Encode ``image`` as 8-bit sRGB RGB ``webp``, ``png`` or ``jpeg`` bytes.

    ``quality`` (0..100) applies to WebP (lossy) and JPEG; PNG is lossless and
    ignores it.  The input image is not modified.  Raises :class:`EncodeError`
    for an unsupported format, a bad quality, or an image that cannot be
    represented (float pixels, too large for the format, ...).
    """
    key = _norm_format(fmt, IMAGE_FORMATS)
    q = _check_quality(quality)
    rgb = _rgb8(image)
    w, h = rgb.size
    if key == "webp" and max(w, h) > _WEBP_MAX_DIM:
        raise EncodeError(f"{w}x{h} exceeds WebP's {_WEBP_MAX_DIM}px limit")
    if key == "jpeg" and max(w, h) > _JPEG_MAX_DIM:
        raise EncodeError(f"{w}x{h} exceeds JPEG's {_JPEG_MAX_DIM}px limit")

    buf = io.BytesIO()
    try:
        if key == "webp":
            rgb.save(buf, "WEBP", quality=q, method=WEBP_METHOD, lossless=False)
        elif key == "jpeg":
            rgb.save(buf, "JPEG", quality=q, subsampling=_JPEG_SUBSAMPLING, optimize=False, progressive=False)
        else:
            rgb.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    except (OSError, ValueError) as exc:
        raise EncodeError(f"{key} encoding failed for {w}x{h} image: {exc}") from exc
    return buf.getvalue()


# --------------------------------------------------------------------------- video

FrameInput = Union[Sequence[Image.Image], Sequence[np.ndarray], np.ndarray]


def video_max_bitrate(width: int, height: int, fps: int = 24) -> int:
    """VBV cap in bit/s: ~8 Mbit/s at 1280x720, ~4 Mbit/s at 854x480 (24 fps).

    Grows with pixel count**0.85 (the two spec points) and linearly with fps;
    never below 100 kbit/s.
    """
    scale = (width * height / (1280 * 720)) ** 0.85 * (fps / 24)
    return max(100_000, int(8_000_000 * scale))


def _frames_to_array(frames: FrameInput) -> np.ndarray | list[np.ndarray]:
    """Validate input; return a (F,H,W,3) uint8 array or a list of (H,W,3) uint8 arrays."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise EncodeError(f"frame array must have shape (F, H, W, 3), got {frames.shape}")
        if frames.dtype != np.uint8:
            raise EncodeError(f"frame array must be uint8, got {frames.dtype}")
        if frames.shape[0] == 0:
            raise EncodeError("no frames to encode")
        if frames.shape[1] < 1 or frames.shape[2] < 1:
            raise EncodeError(f"frames have no pixels: {frames.shape}")
        return frames
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
        try:
            frames = list(frames)  # type: ignore[arg-type]
        except TypeError:
            raise EncodeError(f"frames must be a list of PIL images or a (F,H,W,3) uint8 array, got {type(frames).__name__}") from None
    if len(frames) == 0:
        raise EncodeError("no frames to encode")
    out: list[np.ndarray] = []
    for i, fr in enumerate(frames):
        if isinstance(fr, Image.Image):
            arr = np.asarray(_rgb8(fr))
        elif isinstance(fr, np.ndarray):
            if fr.ndim != 3 or fr.shape[-1] != 3 or fr.dtype != np.uint8:
                raise EncodeError(f"frame {i}: expected (H, W, 3) uint8 array, got {fr.shape} {fr.dtype}")
            arr = fr
        else:
            raise EncodeError(f"frame {i}: expected PIL image or ndarray, got {type(fr).__name__}")
        if out and arr.shape != out[0].shape:
            raise EncodeError(f"frame {i} is {arr.shape[1]}x{arr.shape[0]}, frame 0 is {out[0].shape[1]}x{out[0].shape[0]}")
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise EncodeError(f"frame {i} has no pixels")
        out.append(arr)
    return out


def encode_video(frames: FrameInput, fps: int = 24) -> bytes:
    """Encode frames as an MP4 (H.264 High, yuv420p, BT.709) at exactly ``fps``.

    ``frames``: a list of PIL images (any mode, converted like
    :func:`encode_image`) or (H, W, 3) uint8 arrays, or one (F, H, W, 3) uint8
    array.  All frames must share one size.  Every frame is encoded, one per
    1/fps second (frame ``i`` has pts ``i``); odd sizes are padded to even by
    repeating the last row/column.  Returns the MP4 bytes.
    """
    import av  # heavy import, only needed for video

    if isinstance(fps, bool) or not isinstance(fps, numbers.Integral) or not 1 <= int(fps) <= _MAX_FPS:
        raise EncodeError(f"fps must be an int in 1..{_MAX_FPS}, got {fps!r}")
    fps = int(fps)
    data = _frames_to_array(frames)
    height, width = data[0].shape[:2]
    pad_h, pad_w = height % 2, width % 2
    out_w, out_h = width + pad_w, height + pad_h
    rate = video_max_bitrate(out_w, out_h, fps)

    # The mp4 muxer's +faststart needs to re-open its output for a second pass,
    # which PyAV's file-like (BytesIO) output cannot do, so write a private
    # temp file and read it back.
    fd, path = tempfile.mkstemp(prefix="kiln-", suffix=".mp4")
    os.close(fd)
    try:
        try:
            with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
                stream = container.add_stream("libx264", rate=fps)
                stream.width, stream.height, stream.pix_fmt = out_w, out_h, "yuv420p"
                cc = stream.codec_context
                cc.time_base = Fraction(1, fps)
                # BT.709 limited range: written into the H.264 VUI so players
                # convert back to RGB with the matrix we used.
                cc.colorspace = 1  # AVCOL_SPC_BT709
                cc.color_primaries = 1  # AVCOL_PRI_BT709
                cc.color_trc = 1  # AVCOL_TRC_BT709
                cc.color_range = 1  # AVCOL_RANGE_MPEG
                stream.options = {
                    "preset": VIDEO_PRESET,
                    "crf": str(VIDEO_CRF),
                    "profile": VIDEO_PROFILE,
                    "maxrate": str(rate),
                    "bufsize": str(2 * rate),
                }
                for i, arr in enumerate(data):
                    if pad_h or pad_w:
                        arr = np.pad(arr, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
                    frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
                    frame.pts = i
                    frame.time_base = Fraction(1, fps)
                    for packet in stream.encode(frame):
                        container.mux(packet)
                for packet in stream.encode(None):
                    container.mux(packet)
        except av.FFmpegError as exc:
            raise EncodeError(f"H.264 encoding failed for {len(data)} frames {out_w}x{out_h}: {exc}") from exc
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
