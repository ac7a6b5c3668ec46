"""What a generation produces, before any storage: pictures and videos that know how to encode."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from kiln.engine.encode import EncodeError, encode_image, encode_video, media_type


@dataclass(frozen=True)
class ImageOutput:
    image: Image.Image
    seed: int

    def encode(self, fmt: str = "webp") -> bytes:
        """WebP quality 90 by default (the render API's output); ``png`` and ``jpeg`` for other dialects."""
        return encode_image(self.image, fmt)

    @staticmethod
    def media_type(fmt: str = "webp") -> str:
        return media_type(fmt)


@dataclass(frozen=True)
class VideoOutput:
    frames: list[Image.Image] = field(repr=False)
    fps: int
    seed: int

    def encode(self, fmt: str = "mp4") -> bytes:
        """MP4, H.264, 8-bit 4:2:0, at ``fps`` frames per second with every frame kept."""
        if media_type(fmt) != "video/mp4":
            raise EncodeError(f"videos are encoded as mp4, not {fmt!r}")
        return encode_video(self.frames, fps=self.fps)

    @staticmethod
    def media_type(fmt: str = "mp4") -> str:
        return media_type(fmt)

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].size


Output = ImageOutput | VideoOutput
