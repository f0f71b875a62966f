"""Write frames to an H.264 mp4 (PyAV, which ComfyUI ships) and read one back."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import torch

__all__ = ["write_mp4", "read_video"]


def write_mp4(frames: torch.Tensor, path: str | os.PathLike, fps: int = 16, crf: int = 17) -> Path:
    """Frames ``[T, H, W, 3]`` float in 0..1 -> H.264 (yuv420p) mp4 at ``fps`` (Wan: 16).

    Odd widths/heights are padded by one pixel (yuv420p needs even sizes).
    """
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_mp4 needs frames [T, H, W, 3]; got {tuple(frames.shape)}")
    data = frames.clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    t, h, w, _ = data.shape
    if h % 2 or w % 2:
        data = torch.nn.functional.pad(data.permute(0, 3, 1, 2), (0, w % 2, 0, h % 2), mode="replicate").permute(0, 2, 3, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
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


def read_video(path: str | os.PathLike) -> torch.Tensor:
    """Decode a video file -> frames ``[T, H, W, 3]`` float32 in 0..1."""
    import av

    with av.open(str(path)) as container:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{Path(path).name}: no video frames found.")
    return torch.stack(frames).float().div(255)
