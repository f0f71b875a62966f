"""Command line: ``python -m wan_core generate ...`` and ``python -m wan_core selftest``."""
from __future__ import annotations

import argparse
import logging
import sys
import time

__all__ = ["main"]


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 832x480; got {text!r}") from None
    return w, h


def _image(path: str):
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode not in ("RGB", "RGBA", "L"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        return torch.from_numpy(np.asarray(im).copy()).float().div(255)


class _Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, info) -> None:
        done = int(30 * info.step / info.total)
        rate = (time.perf_counter() - self.start) / info.step
        sys.stderr.write(f"\rsampling [{'#' * done}{'.' * (30 - done)}] {info.step}/{info.total} "
                         f"{rate:.2f}s/step")
        if info.step == info.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .loaders import load_clip_vision, load_dit, load_text_encoder, load_vae
    from .pipeline import generate
    from .video import read_video, write_mp4

    dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dit = load_dit(args.dit, dtype=dtype, device=args.device)
    dit.attention_backend = args.attention
    clip = load_clip_vision(args.clip_vision, device=args.device) if args.clip_vision else None
    width, height = args.size if args.size else (None, None)
    frames = read_video(args.video) if args.video else None
    video = generate(dit=dit, vae=load_vae(args.vae, device=args.device),
                     text_encoder=load_text_encoder(args.text_encoder, device=args.device), clip_vision=clip,
                     prompt=args.prompt, negative_prompt=args.negative_prompt,
                     image=_image(args.image) if args.image else None,
                     end_image=_image(args.end_image) if args.end_image else None, video=frames,
                     width=width, height=height, frames=args.frames, max_area=args.max_area, steps=args.steps,
                     cfg=args.cfg, shift=args.shift, sampler=args.sampler, seed=args.seed, denoise=args.denoise,
                     device=args.device, callback=_Progress())
    out = write_mp4(video, args.out, fps=args.fps)
    print(f"wrote {out} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wan_core", description="Wan 2.1 video generation (Wan Core).")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text/image/video to video, written as an H.264 mp4")
    g.add_argument("--dit", required=True, help="diffusion model file (any published Wan 2.1 layout)")
    g.add_argument("--vae", required=True, help="Wan 2.1 VAE (.pth or .safetensors)")
    g.add_argument("--text-encoder", required=True, help="umT5-XXL encoder (official or ComfyUI file)")
    g.add_argument("--clip-vision", help="CLIP ViT-H/14 (needed for I2V / FLF2V)")
    g.add_argument("--image", help="start image (I2V / FLF2V)")
    g.add_argument("--end-image", help="last frame (FLF2V)")
    g.add_argument("--video", help="input video for video-to-video (use with --denoise < 1)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="", help="empty: the official default")
    g.add_argument("--size", type=_size, help="WIDTHxHEIGHT, multiples of 16 (T2V default 832x480; "
                   "I2V default: from --max-area and the image aspect)")
    g.add_argument("--max-area", type=int, default=832 * 480, help="I2V pixel budget (official: 832*480 or 1280*720)")
    g.add_argument("--frames", type=int, default=81, help="4n+1; 1 gives an image")
    g.add_argument("--steps", type=int, help="default 50 (T2V) / 40 (I2V)")
    g.add_argument("--cfg", type=float, help="guidance scale, default 5.0")
    g.add_argument("--shift", type=float, help="default 5.0; 3.0 for I2V 480p; 16 for FLF2V")
    g.add_argument("--sampler", default="unipc", choices=["unipc", "dpm++", "euler"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--denoise", type=float, default=1.0)
    g.add_argument("--device", default="cuda" if _cuda() else "cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="DiT weight storage dtype (auto: as in the file, fp8 -> bf16)")
    g.add_argument("--attention", default="sdpa", choices=["auto", "sdpa", "sage", "flash"])
    g.add_argument("--fps", type=int, default=16)
    g.add_argument("--out", default="video.mp4")
    s = sub.add_parser("selftest", help="tiny random-weight T2V + I2V run, no downloads")
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", help="also write the selftest videos (mp4)")
    s.add_argument("--frames", type=int, default=9)
    s.add_argument("--steps", type=int, default=4)
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .files import CheckpointError

    try:
        if args.command == "selftest":
            from .selftest import run_selftest

            run_selftest(device=args.device, out=args.out, frames=args.frames, steps=args.steps)
            return 0
        return _generate(args)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
