"""The command line for Wan 2.2: ``generate`` with an A14B expert pair or TI2V-5B.

:mod:`wan_core.cli` hands a run here when ``--dit`` (read from its header or folder) is a
Wan 2.2 model: ``--dit-low-noise PATH`` beside the high-noise expert's ``--dit``, or an A14B
model folder (official ``high_noise_model/`` + ``low_noise_model/``, diffusers
``transformer/`` + ``transformer_2/``) as ``--dit``, runs T2V-A14B or I2V-A14B
(:func:`wan_core.generate_a14b`); a TI2V-5B ``--dit`` runs :func:`wan_core.generate_ti2v`.
Defaults are the published ones per model (A14B: 40 steps, shift 12 / 5, guidance per expert
and boundary from :func:`wan_core.moe.a14b_defaults`, 81 frames at 16 fps; TI2V-5B: 50 steps,
shift 5, cfg 5, 121 frames at 24 fps, 1280x704 or the image's official size). Like the Wan
2.1 path, every argument is checked before any model loads.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from .cli_checks import _check_lora, _decode_image, check_attention, check_device, check_model_file, check_output
from .files import CheckpointError
from .limits import check_run_arguments
from .loaders22 import check_vae_for_dit, expert_paths
from .run_plan import RunOptions

__all__ = ["add_arguments", "wan22_kind", "check_generate22", "generate22", "Wan22Job"]

WAN21_FPS, WAN21_MAX_AREA = 16, 832 * 480
A14B_MAX_AREA = 1280 * 720      # official I2V-A14B default size class
_STORAGE = ("bf16", "fp16", "fp32")


def add_arguments(models: argparse._ArgumentGroup, sampling: argparse._ArgumentGroup) -> None:
    """The Wan 2.2 flags of ``generate`` (in the models and sampling groups)."""
    models.add_argument("--dit-low-noise", metavar="PATH",
                        help="Wan 2.2 A14B: the low-noise expert (--dit is then the high-noise one); or give the "
                             "A14B model folder (high_noise_model/ + low_noise_model/) as --dit")
    sampling.add_argument("--boundary", type=float, metavar="F",
                          help="Wan 2.2 A14B: the high-noise expert runs while t >= F x 1000 (default: published, "
                               "T2V 0.875, I2V 0.900)")
    sampling.add_argument("--cfg-high-noise", type=float, metavar="S",
                          help="Wan 2.2 A14B: guidance of the high-noise expert (default: T2V 4.0, I2V 3.5)")
    sampling.add_argument("--cfg-low-noise", type=float, metavar="S",
                          help="Wan 2.2 A14B: guidance of the low-noise expert (default: T2V 3.0, I2V 3.5)")


def _experts(args: argparse.Namespace) -> tuple[str, str] | None:
    """(high, low) expert paths when the run is an A14B pair, else None."""
    if args.dit_low_noise is not None:
        return args.dit, args.dit_low_noise
    p = Path(args.dit).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        try:
            high, low = expert_paths(p)
        except CheckpointError:
            return None
        return str(high), str(low)
    return None


def wan22_kind(args: argparse.Namespace) -> str | None:
    """"a14b", "ti2v" or None (a Wan 2.1 run, or a --dit the Wan 2.1 checks will refuse),
    from the arguments and at most the header of ``--dit``."""
    if _experts(args) is not None:
        return "a14b"
    from .checkpoint import inspect_checkpoint

    p = Path(args.dit).expanduser()
    if not p.exists() or not os.access(p, os.R_OK):
        return None
    try:
        det = inspect_checkpoint(p)
    except Exception:   # noqa: BLE001 - the Wan 2.1 checks report it with the flag's name
        return None
    if det.kind != "dit":
        return None
    if det.config.model_type == "ti2v":
        return "ti2v"
    if det.config.model_type == "i2v_noclip":
        raise ValueError(f"--dit {p.name} is one expert of Wan 2.2 I2V-A14B: give the other one with "
                         "--dit-low-noise (the low-noise expert), or the model folder as --dit.")
    return None


@dataclass(frozen=True)
class Wan22Job:
    """Validated Wan 2.2 arguments (nothing loaded yet)."""

    kind: str                      # "a14b" | "ti2v"
    device: str
    dit: tuple[str, ...]           # the model path(s): (high, low) for A14B, (ti2v,) for TI2V-5B
    config: object                 # DiTConfig of the (high-noise) model, from its header
    width: int | None              # None: from the image (I2V)
    height: int | None
    frames: int
    max_area: int
    fps: int
    out: Path
    out_kind: str
    image: object = None
    moe: object = None             # MoEOptions (A14B)
    steps: int | None = None
    shift: float | None = None


_UNSUPPORTED = (("video", "--video (video to video)"), ("end_image", "--end-image"),
                ("control_video", "--control-video"), ("control_mask", "--control-mask"),
                ("extend", "--extend"), ("context_frames", "--context-frames"))


def check_generate22(args: argparse.Namespace, kind: str, options: RunOptions) -> Wan22Job:
    """Every check of a Wan 2.2 ``generate``, before any model loads; ValueError /
    CheckpointError naming the flag at the first problem."""
    from .moe import a14b_defaults, moe_for
    from .ti2v import TI2V_DEFAULTS, ti2v_latent_shape

    name = "A14B" if kind == "a14b" else "TI2V-5B"
    for attr, flag in _UNSUPPORTED:
        if getattr(args, attr, None) is not None:
            raise ValueError(f"{flag} is not available for Wan 2.2 {name} runs yet; drop it.")
    if args.reference_image or args.denoise != 1.0:
        raise ValueError(f"{'--reference-image' if args.reference_image else '--denoise'} is not available for "
                         f"Wan 2.2 {name} runs; drop it.")
    if max(args.ulysses, args.ring) > 1 or args.cfg_parallel:
        raise ValueError(f"several processes (--ulysses / --ring / --cfg-parallel) are not available for Wan 2.2 "
                         f"{name} runs yet; run one process.")
    if kind == "a14b" and args.cfg is not None:
        raise ValueError("an A14B pair has one guidance scale per expert: use --cfg-high-noise and --cfg-low-noise "
                         "(defaults: the published values) instead of --cfg.")
    if kind != "a14b" and (args.boundary, args.cfg_high_noise, args.cfg_low_noise) != (None, None, None):
        raise ValueError("--boundary / --cfg-high-noise / --cfg-low-noise are for a Wan 2.2 A14B pair; TI2V-5B "
                         "has one model: use --cfg.")
    check_run_arguments(max_area=args.max_area, steps=args.steps, cfg=args.cfg, shift=args.shift,
                        sampler=args.sampler, seed=args.seed)
    if args.boundary is not None and not 0.0 < args.boundary <= 1.0:
        raise ValueError(f"--boundary {args.boundary:g}: give a fraction of the 1000 timesteps in (0, 1] "
                         "(published: T2V 0.875, I2V 0.900).")
    for flag, value in (("--cfg-high-noise", args.cfg_high_noise), ("--cfg-low-noise", args.cfg_low_noise)):
        if value is not None:
            try:
                check_run_arguments(cfg=value)
            except ValueError as err:
                raise ValueError(f"{flag}: {err}") from None
    fps = args.fps if args.fps is not None else (TI2V_DEFAULTS["fps"] if kind == "ti2v" else WAN21_FPS)
    if not 0 < fps <= 240:
        raise ValueError(f"--fps {fps}: use a frame rate from 1 to 240 (Wan 2.2: 16 for A14B, 24 for TI2V-5B).")
    frames = args.frames if args.frames is not None else (TI2V_DEFAULTS["frames"] if kind == "ti2v" else 81)
    size = args.size
    if size is None and args.image is None:
        size = (TI2V_DEFAULTS["width"], TI2V_DEFAULTS["height"]) if kind == "ti2v" else (1280, 720)
    check_run_arguments(width=None if size is None else size[0], height=None if size is None else size[1],
                        frames=frames)
    if kind == "ti2v" and size is not None:
        ti2v_latent_shape(size[0], size[1], frames)   # multiples of 32
    if args.out is None:
        args.out = "image.png" if frames == 1 else "video.mp4"
    out, out_kind = check_output(args.out, frames)
    device = check_device(args.device)
    check_attention(args.attention, device)

    experts = _experts(args) if kind == "a14b" else None
    paths = experts if experts is not None else (args.dit,)
    flags = ("--dit", "--dit-low-noise") if kind == "a14b" else ("--dit",)
    dets = [check_model_file(p, f, "dit") for p, f in zip(paths, flags)]
    vae = check_model_file(args.vae, "--vae", "vae")
    check_model_file(args.text_encoder, "--text-encoder", "t5")
    for spec in options.loras:
        _check_lora(str(spec.path))
    cfg = dets[0].config
    check_vae_for_dit(cfg, SimpleNamespace(config=vae.config))
    moe = steps = shift = None
    if kind == "a14b":
        a, b = dets
        if (a.config.model_type, a.config.in_dim, a.config.dim) != (b.config.model_type, b.config.in_dim, b.config.dim):
            raise CheckpointError(f"--dit {Path(paths[0]).name} ({a.config.variant}) and --dit-low-noise "
                                  f"{Path(paths[1]).name} ({b.config.variant}) are not the two experts of one Wan 2.2 "
                                  "A14B model.")
        try:
            default_moe, shift, steps = a14b_defaults(cfg)
        except ValueError as err:
            raise ValueError(f"--dit: {err}") from None
        moe = moe_for(cfg, args.boundary, args.cfg_high_noise, args.cfg_low_noise)
        i2v = cfg.model_type == "i2v_noclip"
        if i2v != (args.image is not None):
            raise ValueError("I2V-A14B needs the start image: give --image." if i2v else
                             "T2V-A14B takes no --image; use the I2V-A14B experts for image to video.")
    if args.clip_vision is not None:
        raise ValueError("Wan 2.2 models use no CLIP vision: drop --clip-vision.")
    image = _decode_image(args.image, "--image") if args.image is not None else None
    max_area = args.max_area or (TI2V_DEFAULTS["max_area"] if kind == "ti2v" else A14B_MAX_AREA)
    if size is None:   # image to video without --size: the official size of the image, as the engine picks it
        from .conditioning import i2v_size
        from .ti2v import ti2v_size

        ih, iw = image.shape[0], image.shape[1]
        size = ti2v_size(iw, ih, max_area) if kind == "ti2v" else i2v_size(ih, iw, max_area)
        check_run_arguments(width=size[0], height=size[1], frames=frames)
    return Wan22Job(kind=kind, device=device, dit=tuple(str(p) for p in paths), config=cfg,
                    width=None if size is None else size[0], height=None if size is None else size[1],
                    frames=frames, max_area=max_area, fps=fps, out=out, out_kind=out_kind, image=image, moe=moe,
                    steps=args.steps or steps, shift=args.shift or shift)


def _dit_kwargs(options: RunOptions) -> dict:
    """load_dit keywords for ``options.weight_dtype`` (as :func:`wan_core.generate` loads a DiT)."""
    import torch

    wd = options.weight_dtype
    if wd in _STORAGE:
        return {"dtype": {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[wd],
                "attention": options.attention}
    return {"weight_dtype": wd if wd is not None and wd.startswith("fp8") else None, "attention": options.attention}


def generate22(args: argparse.Namespace, kind: str, options: RunOptions, progress) -> int:
    """Check, load, run and write a Wan 2.2 job; returns the exit status."""
    from .generate22 import generate_a14b, generate_ti2v
    from .loaders import load_dit, load_text_encoder, load_vae
    from .loaders22 import load_expert_pair
    from .video import write_image, write_mp4

    job = check_generate22(args, kind, options)   # nothing is loaded before this returns
    text_encoder = load_text_encoder(args.text_encoder)
    vae = load_vae(args.vae)
    common = dict(vae=vae, text_encoder=text_encoder, prompt=args.prompt, negative_prompt=args.negative_prompt,
                  image=job.image, width=job.width, height=job.height, frames=job.frames, max_area=job.max_area,
                  sampler=args.sampler, seed=args.seed, device=job.device, options=options, callback=progress)
    if kind == "a14b":
        pair = load_expert_pair(job.dit[0], job.dit[1], **_dit_kwargs(options))
        video = generate_a14b(experts=pair, steps=job.steps, shift=job.shift, moe=job.moe, **common)
    else:
        dit = load_dit(job.dit[0], **_dit_kwargs(options))
        ti2v = {k: v for k, v in (("steps", args.steps), ("cfg", args.cfg), ("shift", args.shift)) if v is not None}
        video = generate_ti2v(dit=dit, **common, **ti2v)
    out = write_image(video, job.out) if job.out_kind == "image" else write_mp4(video, job.out, fps=job.fps)
    what = "image" if job.out_kind == "image" else f"{video.shape[0]} frames at {job.fps} fps"
    print(f"wrote {out} ({what}, {video.shape[2]}x{video.shape[1]})")
    return 0
