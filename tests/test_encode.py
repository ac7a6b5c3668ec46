"""kiln.engine.encode: image (WebP/PNG/JPEG) and video (MP4/H.264) output encoding."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageDraw, ImageFilter

from kiln.engine.encode import (
    MEDIA_TYPES,
    WEBP_METHOD,
    EncodeError,
    encode_image,
    encode_video,
    video_max_bitrate,
)

# --------------------------------------------------------------------------- fixtures


def smooth_render(w: int = 256, h: int = 256, seed: int = 0) -> Image.Image:
    """Diffusion-like picture: gradients, soft shapes, a little grain. Not noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    img = np.array([40, 90, 170], np.float32) * (1 - y) + np.array([250, 190, 140], np.float32) * y
    img = img + 30 * np.sin(6 * x + 3 * y)
    shapes = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(shapes)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(w / 20, w / 6)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c) for c in rng.uniform(40, 255, 3)))
    img = img * 0.6 + np.asarray(shapes.filter(ImageFilter.GaussianBlur(w / 80)), np.float32) * 0.4
    img = img + rng.normal(0, 1.5, img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return out.filter(ImageFilter.GaussianBlur(0.7))


@pytest.fixture(scope="module")
def render() -> Image.Image:
    return smooth_render(192, 128)


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def probe_mp4(data: bytes) -> dict:
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return {
            "codec": s.codec_context.name,
            "rate": s.average_rate,
            "pix_fmt": s.codec_context.pix_fmt,
            "width": s.codec_context.width,
            "height": s.codec_context.height,
            "declared_frames": s.frames,
            "frames": frames,
            "colorspace": s.codec_context.colorspace,
            "format": c.format.name,
        }


def top_level_atoms(data: bytes) -> list[str]:
    out, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        elif size == 0:
            size = len(data) - pos
        out.append(kind)
        pos += size
    return out


# --------------------------------------------------------------------------- images


def test_media_types_and_error_type():
    assert MEDIA_TYPES == {"webp": "image/webp", "png": "image/png", "jpeg": "image/jpeg", "mp4": "video/mp4"}
    assert issubclass(EncodeError, ValueError)


@pytest.mark.parametrize("fmt, pil_format", [("webp", "WEBP"), ("png", "PNG"), ("jpeg", "JPEG")])
def test_image_formats_decode_at_exact_size_as_rgb(render, fmt, pil_format):
    data = encode_image(render, fmt)
    im = decode(data)
    assert im.format == pil_format
    assert im.size == render.size
    assert im.mode == "RGB"
    assert Image.MIME[im.format] == MEDIA_TYPES[fmt]
    assert "icc_profile" not in im.info and "exif" not in im.info


def test_default_is_webp_quality_90(render):
    assert decode(encode_image(render)).format == "WEBP"
    assert encode_image(render) == encode_image(render, "webp", 90)


def test_png_is_lossless(render):
    assert np.array_equal(np.asarray(decode(encode_image(render, "png"))), np.asarray(render))


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_lossy_formats_are_close_to_source(render, fmt):
    out = np.asarray(decode(encode_image(render, fmt, 90)), np.float64)
    mse = np.mean((out - np.asarray(render, np.float64)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 35  # PSNR in dB


def test_webp_size_stays_within_bound_of_method_4():
    """The fast WebP method keeps files within +15% of Pillow's default (method 4) at q90."""
    img = smooth_render(384, 384, seed=3)
    ours = len(encode_image(img, "webp", 90))
    buf = io.BytesIO()
    img.save(buf, "WEBP", quality=90, method=4)
    assert ours <= 1.15 * buf.tell(), (WEBP_METHOD, ours, buf.tell())


def test_quality_changes_size(render):
    assert len(encode_image(render, "webp", 50)) < len(encode_image(render, "webp", 95))
    assert len(encode_image(render, "jpeg", 50)) < len(encode_image(render, "jpeg", 95))


@pytest.mark.parametrize("fmt", ["gif", "mp4", "tiff", "", "WEB P"])
def test_unsupported_image_format_raises(render, fmt):
    with pytest.raises(EncodeError):
        encode_image(render, fmt)


def test_format_is_case_insensitive_and_jpg_alias(render):
    assert decode(encode_image(render, "WebP")).format == "WEBP"
    assert decode(encode_image(render, "jpg")).format == "JPEG"


@pytest.mark.parametrize("quality", [-1, 101, 90.0, "90", True, None])
def test_bad_quality_raises(render, quality):
    with pytest.raises(EncodeError):
        encode_image(render, "webp", quality)


@pytest.mark.parametrize("bad", [None, b"png", np.zeros((4, 4, 3), np.uint8)])
def test_non_image_input_raises(bad):
    with pytest.raises(EncodeError):
        encode_image(bad, "png")


@pytest.mark.parametrize(
    "mode",
    ["L", "LA", "P", "1", "RGBA", "RGBX", "CMYK", "YCbCr", "I;16", "I"],
)
@pytest.mark.parametrize("fmt", ["webp", "png", "jpeg"])
def test_other_modes_become_rgb(render, mode, fmt):
    if mode == "I;16":
        src = Image.fromarray((np.asarray(render.convert("L"), np.uint16) * 257))
        assert src.mode == "I;16"
    elif mode == "I":
        src = render.convert("L").convert("I")
    else:
        src = render.convert(mode)
    im = decode(encode_image(src, fmt))
    assert (im.mode, im.size) == ("RGB", render.size)


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((8, 8), 65535, np.uint16)
    arr[:, :4] = 32896  # 128 * 257
    src = Image.fromarray(arr)
    out = np.asarray(decode(encode_image(src, "png")))
    assert out[0, 0].tolist() == [128, 128, 128]
    assert out[0, 7].tolist() == [255, 255, 255]


def test_alpha_is_flattened_onto_white():
    src = Image.new("RGBA", (16, 8), (255, 0, 0, 255))
    src.paste((0, 0, 255, 0), (8, 0, 16, 8))  # right half fully transparent blue
    out = np.asarray(decode(encode_image(src, "png")))
    assert out[4, 2].tolist() == [255, 0, 0]
    assert out[4, 12].tolist() == [255, 255, 255]


def test_float_image_raises():
    with pytest.raises(EncodeError):
        encode_image(Image.new("F", (8, 8), 0.5), "png")


def _s15(v: float) -> bytes:
    return int(round(v * 65536)).to_bytes(4, "big", signed=True)


def wide_gamut_icc() -> bytes:
    """A minimal ICC v2 RGB display profile (Adobe-RGB-like primaries, gamma 2.2)."""
    def xyz(x, y, z):
        return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)

    curve = b"curv" + bytes(4) + (1).to_bytes(4, "big") + (563).to_bytes(2, "big") + bytes(2)  # 2.2 in u8Fixed8
    text = b"kiln test wide gamut\0"
    desc = b"desc" + bytes(4) + len(text).to_bytes(4, "big") + text + bytes(4 + 4 + 2 + 1 + 67)
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.6097, 0.3111, 0.0195)),
        (b"gXYZ", xyz(0.2053, 0.6257, 0.0609)),
        (b"bXYZ", xyz(0.1492, 0.0632, 0.7446)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + (offset + len(body)).to_bytes(4, "big") + len(data).to_bytes(4, "big")
        body += data
    size = offset + len(body)
    header = (
        size.to_bytes(4, "big") + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12) + b"acsp"
        + bytes(4 * 5 + 8 + 4) + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    )
    header += bytes(128 - len(header))
    return header + len(tags).to_bytes(4, "big") + table + body


def test_non_srgb_icc_is_converted_and_not_embedded():
    src = Image.new("RGB", (8, 8), (180, 60, 60))
    tagged = src.copy()
    tagged.info["icc_profile"] = wide_gamut_icc()
    assert "kiln test" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(tagged.info["icc_profile"])))
    out = decode(encode_image(tagged, "png"))
    assert "icc_profile" not in out.info
    r, g, b = np.asarray(out)[0, 0].tolist()
    assert r > 190 and g < 60  # wide-gamut red is more saturated in sRGB

    srgb = src.copy()
    srgb.info["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = decode(encode_image(srgb, "png"))
    assert np.asarray(out)[0, 0].tolist() == [180, 60, 60]
    assert "icc_profile" not in out.info
    assert "icc_profile" in srgb.info and "icc_profile" in tagged.info  # caller's images untouched


def test_input_image_is_not_modified(render):
    before = render.tobytes()
    src = render.copy()
    encode_image(src, "webp")
    encode_image(src.convert("RGBA"), "jpeg")
    assert src.tobytes() == before and src.mode == "RGB" and not getattr(src, "encoderinfo", None)


def test_file_backed_image(tmp_path, render):
    path = tmp_path / "in.png"
    render.save(path)
    with Image.open(path) as lazy:
        assert decode(encode_image(lazy, "webp")).size == render.size


def test_shared_lazy_file_image_across_threads(tmp_path, render):
    path = tmp_path / "in.webp"
    render.save(path, quality=90)
    with Image.open(path) as lazy:  # not loaded yet: first encode triggers the load
        with ThreadPoolExecutor(max_workers=4) as pool:
            outs = list(pool.map(lambda fmt: encode_image(lazy, fmt), ["png"] * 8))
    assert len(set(outs)) == 1


def test_concurrent_image_encodes_match_serial(render):
    shared = render.copy()
    jobs = [("webp", 90), ("png", 90), ("jpeg", 90), ("webp", 70)] * 4
    serial = [encode_image(shared, f, q) for f, q in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda job: encode_image(shared, *job), jobs))
    assert parallel == serial


# --------------------------------------------------------------------------- video


def moving_frames(n: int, w: int = 64, h: int = 48) -> np.ndarray:
    """A bright square sliding over a gradient: every frame is different."""
    base = np.zeros((h, w, 3), np.uint8)
    base[..., 0] = np.linspace(0, 200, w, dtype=np.uint8)[None, :]
    base[..., 1] = np.linspace(30, 160, h, dtype=np.uint8)[:, None]
    out = np.repeat(base[None], n, axis=0)
    for i in range(n):
        x = (i * 3) % max(1, w - 8)
        out[i, 4:12, x : x + 8] = 255
    return out


@pytest.mark.parametrize("n", [1, 5, 49])
def test_mp4_h264_24fps_exact_frame_count_and_size(n):
    data = encode_video(moving_frames(n), fps=24)
    info = probe_mp4(data)
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert info["rate"] == 24
    assert len(info["frames"]) == n
    assert (info["width"], info["height"]) == (64, 48)
    assert all(f.shape == (48, 64, 3) for f in info["frames"])
    assert "mp4" in info["format"]


def test_mp4_is_faststart():
    atoms = top_level_atoms(encode_video(moving_frames(5)))
    assert atoms[0] == "ftyp"
    assert atoms.index("moov") < atoms.index("mdat")


def test_video_frames_are_kept_in_order_and_colours_survive():
    n = 12
    frames = np.zeros((n, 48, 64, 3), np.uint8)
    levels = np.linspace(20, 235, n).astype(np.uint8)
    for i, v in enumerate(levels):
        frames[i, ..., 0] = v  # red ramps over time
        frames[i, ..., 2] = 255 - v
    info = probe_mp4(encode_video(frames))
    assert info["colorspace"] == 1  # BT.709 tagged
    got = np.array([f[..., 0].mean() for f in info["frames"]])
    assert np.all(np.diff(got) > 0)  # same order, nothing dropped or duplicated
    assert np.abs(got - levels).max() < 6
    assert np.abs(np.array([f[..., 2].mean() for f in info["frames"]]) - (255 - levels)).max() < 6


def test_pil_frame_list_and_other_fps():
    frames = [Image.fromarray(f) for f in moving_frames(7)]
    frames[3] = frames[3].convert("RGBA")  # mixed modes are converted
    info = probe_mp4(encode_video(frames, fps=16))
    assert info["rate"] == 16 and len(info["frames"]) == 7


@pytest.mark.parametrize("w, h", [(65, 47), (63, 48), (64, 49), (1, 1)])
def test_odd_sizes_are_padded_to_even(w, h):
    frames = moving_frames(3, w, h)
    info = probe_mp4(encode_video(frames))
    ew, eh = w + w % 2, h + h % 2
    assert (info["width"], info["height"]) == (ew, eh)
    assert len(info["frames"]) == 3
    if w > 8 and w % 2:  # padded column repeats the last real column
        last = info["frames"][0][:, w - 1].astype(int)
        pad = info["frames"][0][:, w].astype(int)
        assert np.abs(last - pad).mean() < 8


@pytest.mark.parametrize(
    "frames",
    [
        [],
        np.zeros((0, 48, 64, 3), np.uint8),
        np.zeros((2, 48, 64, 3), np.float32),
        np.zeros((2, 48, 64), np.uint8),
        np.zeros((2, 48, 64, 4), np.uint8),
        [np.zeros((48, 64, 3), np.uint8), np.zeros((48, 66, 3), np.uint8)],
        [Image.new("RGB", (64, 48)), Image.new("RGB", (32, 48))],
        ["not a frame"],
        42,
    ],
    ids=["empty-list", "empty-array", "float", "no-channels", "rgba-array", "mixed-array-sizes", "mixed-pil-sizes", "str", "int"],
)
def test_bad_video_input_raises(frames):
    with pytest.raises(EncodeError):
        encode_video(frames)


@pytest.mark.parametrize("fps", [0, -24, 24.0, True, "24", 10_000])
def test_bad_fps_raises(fps):
    with pytest.raises(EncodeError):
        encode_video(moving_frames(2), fps=fps)


def test_concurrent_video_encodes():
    clips = [moving_frames(n) for n in (3, 6, 9, 12)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        outs = list(pool.map(encode_video, clips))
    assert [len(probe_mp4(d)["frames"]) for d in outs] == [3, 6, 9, 12]


def test_video_bitrate_cap_matches_spec_points():
    assert video_max_bitrate(1280, 720) == pytest.approx(8_000_000, rel=0.01)
    assert video_max_bitrate(854, 480) == pytest.approx(4_000_000, rel=0.05)
    assert video_max_bitrate(1280, 720, fps=48) == pytest.approx(16_000_000, rel=0.01)
