"""The CLI's checks of ``generate`` arguments, all run before any model is loaded.

Loading a 14B model takes minutes; an argument that cannot work must fail before that, in
well under a second, with one line naming the argument and what to do. Everything here
reads at most file headers (:func:`wan_core.inspect_checkpoint`) and decodes the input
images / video once (they are kept and handed to the job, not decoded twice).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .distributed import ParallelConfig
from .files import CheckpointError
from .layouts import KIND_NAMES, Detected, detect
from .limits import MAX_FRAMES, check_run_arguments
from .parallel_plan import block_shards_for, plan_rank
from .run_plan import RunOptions
from .video import IMAGE_FORMATS

__all__ = ["GenerateJob", "check_generate", "check_device", "check_attention", "check_output", "check_model_file",
           "check_plan", "T2V_SIZE", "DEFAULT_FRAMES"]

log = logging.getLogger("wan_core")

T2V_SIZE = (832, 480)
DEFAULT_FRAMES = 81
VIDEO_SUFFIXES = (".mp4",)
_FLAG_OF_KIND = {"dit": "--dit", "vae": "--vae", "t5": "--text-encoder", "clip_vision": "--clip-vision"}


@dataclass(frozen=True)
class GenerateJob:
    """Validated arguments: the device to run on, the output, the resolved size and the
    decoded inputs (``[H, W, C]`` / ``[T, H, W, 3]`` float in 0..1)."""

    device: str
    dit: Detected
    width: int
    height: int
    frames: int
    out: Path
    out_kind: str                  # "mp4" | "image"
    image: object = None
    end_image: object = None
    video: object = None


def check_device(name: str) -> str:
    """``name`` ("auto", "cpu", "cuda", "cuda:1", "mps", ...) -> a device that exists here.

    A ``ValueError`` with one readable sentence instead of torch's ``AssertionError`` deep in
    the first ``.to(device)``.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or auto.") from None
    if dev.type == "cpu":
        return name
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"--device {name}: this PyTorch ({torch.__version__}) was built without CUDA; "
                             "use --device cpu, or install a CUDA build of PyTorch.")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible (driver not loaded, or hidden by "
                             "CUDA_VISIBLE_DEVICES); use --device cpu.")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {name}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                             f"device{'s' if count != 1 else ''} (cuda:0{f'..cuda:{count - 1}' if count > 1 else ''}).")
        return name
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise ValueError(f"--device {name}: this PyTorch has no usable {dev.type!r} device; use cpu or cuda.")
    return name


def check_attention(backend: str, device: str) -> None:
    """An explicitly chosen optional kernel (sage, flash) must be usable on ``device``; the
    library would fall back to SDPA with a warning, but a user who named it wants to know."""
    from .attention import available_backends

    package = {"sage": "sageattention", "flash": "flash-attn"}.get(backend)
    if package is not None and backend not in available_backends(device):
        raise ValueError(f"--attention {backend} cannot run here: it needs a CUDA device and the '{package}' "
                         "package; use --attention sdpa (or auto: the fastest one available).")


def check_output(out: str, frames: int) -> tuple[Path, str]:
    """The output path -> ``(path, "mp4" | "image")``, refused unless it is writable and names
    a container we write: ``.mp4`` for a video; for ``frames == 1`` also ``.png``, ``.jpg``,
    ``.jpeg`` or ``.webp`` (an image file; ``.mp4`` gives a one-frame video).

    Writability is tested for real (a probe file is created and removed) in the target's
    folder, or in its nearest existing ancestor when the folder is still to be created.
    """
    text = str(out)
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise ValueError(f"--out {text} is a folder; give a file name in it, e.g. {path / 'video.mp4'}.")
    suffix = path.suffix.lower()
    allowed = VIDEO_SUFFIXES + (tuple(IMAGE_FORMATS) if frames == 1 else ())
    if not suffix:
        raise ValueError(f"--out {text} has no file extension; use {path.name}.mp4"
                         f"{f' or {path.name}.png' if frames == 1 else ''}.")
    if suffix not in allowed:
        if suffix in IMAGE_FORMATS:
            raise ValueError(f"--out {text}: an image file holds one frame but --frames is {frames}; "
                             "write a .mp4, or use --frames 1 for an image.")
        raise ValueError(f"--out {text}: unknown output type {suffix!r}; use "
                         f"{' or '.join(allowed)}{' (--frames 1 also writes .png/.jpg/.webp)' if frames != 1 else ''}.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out {text}: {folder} is a file, not a folder.")
    probe = folder / f".wan_core_write_test_{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise ValueError(f"--out {text}: cannot write in {folder} ({err.strerror}); choose another folder.") from None
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return path, "image" if suffix in IMAGE_FORMATS else "mp4"


def check_model_file(path: str, flag: str, kind: str) -> Detected:
    """``path`` exists, is readable and holds a network of ``kind`` ("dit", "vae", "t5",
    "clip_vision"), judged from its header only. Raises :class:`CheckpointError`."""
    from .checkpoint import inspect_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{flag} {path}: no such file.")
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"{flag} {path}: not readable (check the file's permissions).")
    try:
        det = inspect_checkpoint(p)
    except CheckpointError as err:
        raise CheckpointError(f"{flag}: {err}") from err
    except MemoryError:
        raise
    except Exception as err:   # a hostile or foreign file: name it, never echo its bytes
        raise CheckpointError(f"{flag}: {p.name} is not a checkpoint this program can read "
                              f"({type(err).__name__}).") from err
    if det.kind != kind:
        what, _ = KIND_NAMES[det.kind]
        want, folder = KIND_NAMES[kind]
        raise CheckpointError(f"{flag}: {p.name} is {what}; {flag} needs {want}, from {folder}. "
                              f"Give this file to {_FLAG_OF_KIND[det.kind]} instead.")
    if kind == "t5":
        from .checkpoint import find_tokenizer

        try:
            find_tokenizer(p, det)   # the loader too looks for it before reading any weight
        except CheckpointError as err:
            raise CheckpointError(f"{flag}: {err}") from err
    return det


def _check_lora(path: str) -> None:
    from .files import open_checkpoint

    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"--lora {path}: no such file.")
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"--lora {path}: not readable (check the file's permissions).")
    try:
        with open_checkpoint(p) as tf:
            try:
                det = detect(tf)   # a whole network given as a LoRA (the header says so)
            except CheckpointError:
                det = None         # a LoRA, or a file apply_loras will judge key by key
    except CheckpointError as err:
        raise CheckpointError(f"--lora: {err}") from err
    except MemoryError:
        raise
    except Exception as err:
        raise CheckpointError(f"--lora {p.name}: not a LoRA file this program can read "
                              f"({type(err).__name__}).") from err
    if det is not None:
        what, folder = KIND_NAMES[det.kind]
        raise CheckpointError(f"--lora: {p.name} is {what} (for {_FLAG_OF_KIND[det.kind]}, from {folder}), "
                              "not a LoRA.")


def _decode_image(path: str, flag: str):
    """Decode ``path`` -> ``[H, W, C]`` float32 in 0..1 (C = 1, 3 or 4; the pipeline handles each)."""
    import numpy as np
    import torch
    from PIL import Image

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{flag} {path}: no such file.")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "L"):
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            data = np.asarray(im).copy()
    except Exception as err:   # PIL raises many kinds (UnidentifiedImageError, DecompressionBombError, ...)
        raise ValueError(f"{flag} {p.name}: cannot decode it as an image ({type(err).__name__}); "
                         "use a .png, .jpg or .webp file.") from None
    if data.ndim == 2:
        data = data[..., None]
    return torch.from_numpy(data).float().div(255)


def _decode_video(path: str):
    """Decode ``path`` -> ``[T, H, W, 3]`` float32 in 0..1, refusing sizes Wan cannot sample
    from the stream header first, so a long full-HD clip is not decoded only to be refused."""
    import av

    from .conditioning import check_video_size
    from .video import read_video

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"--video {path}: no such file.")
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            ctx = container.streams.video[0].codec_context
            width, height = int(ctx.width), int(ctx.height)
            if width <= 0 or height <= 0:   # what a demuxer that guessed wrong reports
                raise ValueError("no picture size")
    except Exception as err:
        raise ValueError(f"--video {p.name}: cannot decode it as a video ({type(err).__name__}).") from None
    try:
        check_video_size(width, height, 1)
    except ValueError as err:
        raise ValueError(f"--video {p.name} is {width}x{height}: {err} Resize the video first.") from None
    try:
        frames = read_video(p, max_frames=MAX_FRAMES)
    except av.error.FFmpegError as err:   # some are ValueErrors too: caught first, never echoed
        raise ValueError(f"--video {p.name}: cannot decode it as a video ({type(err).__name__}).") from None
    except ValueError as err:             # read_video's own: too many frames, none at all
        raise ValueError(f"--video {err}") from None
    except Exception as err:
        raise ValueError(f"--video {p.name}: cannot decode it as a video ({type(err).__name__}).") from None
    return frames


def check_plan(det: Detected, options: RunOptions, width: int, height: int, frames: int, attention: str,
               device: str, parallel: ParallelConfig | None = None) -> None:
    """With an explicit ``--vram-budget`` on a GPU, refuse (:class:`wan_core.PlanError`, naming
    the minimum budget) a job whose DiT stage cannot fit, from the header's config alone;
    with ``parallel`` (sequence parallelism) the budget is a rank's and the plan the rank's
    (:func:`wan_core.parallel_plan.plan_rank`: token chunk, sharded weights or block swap)."""
    if options.vram_budget is None or options.resident_blocks is not None or not device.startswith("cuda"):
        return
    from .fun import reference_tokens
    from .planner import dit_sizes, plan_memory, tokens_for

    storage = options.weight_dtype
    if storage in (None, "keep"):   # as in the file; bf16 errs low for an fp32 file, never high
        storage = next((f for f in ("fp8_e4m3fn", "fp8_e5m2") if f in det.quant),
                       "bf16" if det.quant == "none" else None)
        if storage is None:
            return   # other quantisations (GGUF): the run plan judges the loaded model's real size
    tokens = tokens_for(width, height, frames, tuple(det.config.patch_size))
    tokens += reference_tokens(det.config, (height // 8, width // 8))   # a Fun V1.1 reference frame
    if parallel is not None and parallel.sequence_degree > 1:
        plan_rank(options.vram_budget, dit_sizes(det.config, storage), tokens, parallel,
                  block_shards_for(det.config, storage), attention=attention)
        return
    plan_memory(options.vram_budget, dit_sizes(det.config, storage), tokens, attention=attention)


def check_generate(args: argparse.Namespace, options: RunOptions) -> GenerateJob:
    """Every check of ``generate``'s arguments, cheapest first; raises ``ValueError``,
    :class:`CheckpointError` or :class:`wan_core.PlanError` at the first problem."""
    check_run_arguments(max_area=args.max_area, steps=args.steps, cfg=args.cfg, shift=args.shift,
                        sampler=args.sampler, seed=args.seed, denoise=args.denoise)
    if args.fps <= 0 or args.fps > 240:
        raise ValueError(f"--fps {args.fps}: use a frame rate from 1 to 240 (Wan: 16).")
    if args.video is not None and (args.size is not None or args.frames is not None):
        raise ValueError("--video sets the size and frame count; drop --size / --frames.")
    if args.video is None and args.denoise < 1.0:
        raise ValueError(f"--denoise {args.denoise:g} needs --video to start from (video to video); "
                         "without one use --denoise 1.")
    if args.end_image is not None and args.image is None:
        raise ValueError("--end-image needs --image too (first-last-frame to video).")
    if args.video is None:   # frames and the output's kind are known now; with --video after decoding it
        frames = DEFAULT_FRAMES if args.frames is None else args.frames
        width, height = args.size if args.size is not None else T2V_SIZE   # I2V sizes: checked below
        check_run_arguments(width=width, height=height, frames=frames)
        check_output(args.out, frames)
    device = check_device(args.device)
    check_attention(args.attention, device)

    det = check_model_file(args.dit, "--dit", "dit")
    check_model_file(args.vae, "--vae", "vae")
    check_model_file(args.text_encoder, "--text-encoder", "t5")
    if args.clip_vision is not None:
        check_model_file(args.clip_vision, "--clip-vision", "clip_vision")
    for spec in options.loras:
        _check_lora(str(spec.path))
    cfg, name = det.config, Path(args.dit).name
    if cfg.needs_image and args.image is None:
        raise ValueError(f"--dit {name} is an image-to-video model ({cfg.variant}); give the start image "
                         "with --image (and --clip-vision), or use a text-to-video model.")
    if not cfg.has_image_input and args.image is not None:
        raise ValueError(f"--dit {name} is a text-to-video model ({cfg.variant}); it takes no --image. "
                         "Use an I2V model for image to video.")
    if args.end_image is not None and (cfg.model_type not in ("flf2v", "i2v") or cfg.fun):
        raise ValueError(f"--dit {name} is not a first-last-frame model ({cfg.variant}); --end-image needs "
                         "an FLF2V or Fun InP (I2V) model.")
    fun_reference = bool(cfg.fun and getattr(args, "reference_image", None))   # Fun V1.1: CLIP of the reference
    if (args.image is not None or fun_reference) and args.clip_vision is None:
        raise ValueError("image to video (and Fun Control with --image or --reference-image) needs --clip-vision "
                         "(CLIP ViT-H/14, e.g. clip_vision_h.safetensors).")
    if args.clip_vision is not None and args.image is None and not fun_reference:
        log.warning("wan_core: --clip-vision is not used by a text-to-video model; ignoring it.")

    image = _decode_image(args.image, "--image") if args.image is not None else None
    end_image = _decode_image(args.end_image, "--end-image") if args.end_image is not None else None
    video = _decode_video(args.video) if args.video is not None else None
    if video is not None:
        frames, height, width = video.shape[0], video.shape[1], video.shape[2]
    elif args.size is not None:
        width, height = args.size
    elif image is not None:
        from .conditioning import i2v_size

        width, height = i2v_size(image.shape[0], image.shape[1], args.max_area)
    else:
        width, height = T2V_SIZE
    check_run_arguments(width=width, height=height, frames=frames)
    out, out_kind = check_output(args.out, frames)
    check_plan(det, options, width, height, frames, args.attention, device)
    return GenerateJob(device=device, dit=det, width=width, height=height, frames=frames, out=out,
                       out_kind=out_kind, image=image, end_image=end_image, video=video)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def split_lora(text: str) -> tuple[str, float]:
    """``PATH[:STRENGTH]`` -> ``(path, strength)``. The strength is read only when the part
    after the last ':' is a number, so Windows paths (``C:\\loras\\x.safetensors``) and names
    with colons stay whole; strength defaults to 1.0."""
    path, sep, tail = text.rpartition(":")
    if sep and path and _is_number(tail):
        strength = float(tail)
        if not math.isfinite(strength):
            raise ValueError(f"--lora {text}: the strength must be a finite number.")
        return path, strength
    return text, 1.0
