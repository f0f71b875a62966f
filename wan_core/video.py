"""Write frames to an H.264 mp4 or an image file (PyAV and Pillow, which ComfyUI ships), read
videos back. Every write is atomic: the data goes to a temporary file in the target's folder
and is renamed over the target only when complete, so a failure (or Ctrl-C) never leaves a
half-written or truncated file, nor the temporary one, and an existing file stays intact.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["write_mp4", "write_image", "read_video", "IMAGE_FORMATS", "atomic_output"]

# Suffix -> Pillow format of the single-frame outputs.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` (same suffix, so writers that pick the
    format from the name still work); on success it is renamed over ``path``
    (:func:`os.replace`, atomic within a folder), on any exception it is removed.

    The parent folder is created when missing. The temporary file is created with the usual
    permissions (0o666 minus the umask), not ``mkstemp``'s 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.part{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _to_uint8(frames: torch.Tensor, what: str) -> torch.Tensor:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{what} needs frames [T, H, W, 3]; got {tuple(frames.shape)}")
    return frames.clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def write_mp4(frames: torch.Tensor, path: str | os.PathLike, fps: int = 16, crf: int = 17) -> Path:
    """Frames ``[T, H, W, 3]`` float in 0..1 -> H.264 (yuv420p) mp4 at ``fps`` (Wan: 16), written
    atomically (see :func:`atomic_output`). Odd widths/heights are padded by one pixel
    (yuv420p needs even sizes). Returns ``path``.
    """
    import av

    data = _to_uint8(frames, "write_mp4")
    t, h, w, _ = data.shape
    if h % 2 or w % 2:
        data = torch.nn.functional.pad(data.permute(0, 3, 1, 2), (0, w % 2, 0, h % 2),
                                       mode="replicate").permute(0, 2, 3, 1)
    path = Path(path)
    with atomic_output(path) as tmp, av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = data.shape[2], data.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in data.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_image(frames: torch.Tensor, path: str | os.PathLike) -> Path:
    """One frame ``[1, H, W, 3]`` (or ``[H, W, 3]``) float in 0..1 -> a .png (lossless), .jpg
    (quality 95) or .webp (lossless) file, chosen by the suffix, written atomically."""
    from PIL import Image

    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path.name}: an image needs a {', '.join(IMAGE_FORMATS)} file name.")
    if frames.ndim == 3:
        frames = frames[None]
    data = _to_uint8(frames, "write_image")
    if data.shape[0] != 1:
        raise ValueError(f"{path.name}: an image file holds one frame, got {data.shape[0]}; write an mp4.")
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    with atomic_output(path) as tmp:
        Image.fromarray(data[0].numpy()).save(tmp, format=fmt, **options)
    return path


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> torch.Tensor:
    """Decode a video file -> frames ``[T, H, W, 3]`` float32 in 0..1.

    ``max_frames``: refuse (``ValueError``) a video with more frames, stopping the decode
    there instead of holding a long clip in memory.
    """
    import av

    frames = []
    with av.open(str(path)) as container:
        for f in container.decode(video=0):
            if max_frames is not None and len(frames) >= max_frames:
                raise ValueError(f"{Path(path).name} has more than {max_frames} frames; cut it first.")
            frames.append(torch.from_numpy(f.to_ndarray(format="rgb24")))
    if not frames:
        raise ValueError(f"{Path(path).name}: no video frames found.")
    return torch.stack(frames).float().div(255)
