"""Command line: ``wan-core generate ...`` / ``wan-core selftest`` (or ``python -m wan_core ...``).

Every argument is checked before any model is loaded (:mod:`wan_core.cli_checks`); the
memory and speed flags become one :class:`wan_core.run_plan.RunOptions`
(:func:`options_from_args`), which ``generate()`` turns into the run plan. Expected
failures (a bad argument or file, a plan that cannot fit, NaN/Inf in the output) end with
one ``error: ...`` line and exit status 2; Ctrl-C with ``interrupted`` and 130. Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from .attention import BACKENDS
from .distributed import SHARD_WEIGHTS
from .cli22 import WAN21_FPS, WAN21_MAX_AREA, add_arguments as add_wan22_arguments, generate22, wan22_kind
from .cli_checks import DEFAULT_FRAMES, T2V_SIZE, split_lora
from .control_preprocess import CONTROL_MODES, ControlOptions, preprocess_control
from .limits import SAMPLER_NAMES
from .lora import LoraSpec
from .context_windows import FUSE_METHODS, SCHEDULES, ContextOptions
from .guidance import GuidanceOptions, parse_blocks, parse_cfg_schedule
from .run_plan import WEIGHT_DTYPES, CompileSpec, RunOptions, StepCacheSpec

__all__ = ["main", "build_parser", "options_from_args", "guidance_from_args", "context_from_args"]

GiB = 1 << 30
STEP_CACHES = ("teacache", "magcache")
CONTROL_PREPROCESS = tuple(m for m in CONTROL_MODES if m != "none")   # canny, scribble, grayscale, blur
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"error: {message} (see {self.prog} --help)\n")


# --- argument types: each raises ArgumentTypeError with the reason --------------------------

def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 832x480; got {text!r}") from None
    return w, h


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"give the budget in GiB, a number above 0 (e.g. 8); got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"give a whole number, 0 or more; got {text!r}")
    return value


def _vae_tile(text: str) -> str | int:
    if text in ("auto", "off"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 64 <= value <= 4096 or value % 8:
        raise argparse.ArgumentTypeError(f"use auto, off or a tile side in pixels (a multiple of 8 from 64 to "
                                         f"4096, e.g. 512); got {text!r}")
    return value


def _lora(text: str) -> LoraSpec:
    try:
        path, strength = split_lora(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return LoraSpec(path, strength)


def _step_cache(text: str) -> StepCacheSpec:
    method, sep, thr = text.partition(":")
    if method not in STEP_CACHES:
        raise argparse.ArgumentTypeError(f"use teacache or magcache, optionally with :THRESHOLD "
                                         f"(e.g. teacache:0.2); got {text!r}")
    threshold = None
    if sep:
        try:
            threshold = float(thr)
        except ValueError:
            threshold = math.nan
        if not math.isfinite(threshold) or threshold < 0:
            raise argparse.ArgumentTypeError(f"the {method} threshold must be a number, 0 or more "
                                             f"(0 never skips a step); got {thr!r}")
    return StepCacheSpec(method=method, threshold=threshold)


# --- the parser -------------------------------------------------------------------------------

def _prog() -> str:
    return "wan-core" if Path(sys.argv[0]).name.startswith("wan-core") else "python -m wan_core"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog=_prog(), description="Wan 2.1 video generation (Wan Core).")
    p.add_argument("--version", action="version", version=f"wan-core {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="text/image/video to video (.mp4) or to an image (--frames 1)",
                       description="Text/image/video to video. Every argument is checked before any model "
                                   "loads; a bad one is one 'error:' line and exit status 2.")
    m = g.add_argument_group("models")
    m.add_argument("--dit", required=True, metavar="PATH",
                   help="diffusion model file or diffusers folder (any published Wan 2.1 layout; T2V / I2V / "
                        "FLF2V is read from the tensors)")
    m.add_argument("--vae", required=True, metavar="PATH", help="Wan 2.1 VAE (.pth or .safetensors)")
    m.add_argument("--text-encoder", required=True, metavar="PATH", help="umT5-XXL encoder (official or ComfyUI file)")
    m.add_argument("--clip-vision", metavar="PATH", help="CLIP ViT-H/14 (needed for I2V / FLF2V)")
    m.add_argument("--lora", action="append", type=_lora, metavar="PATH[:STRENGTH]",
                   help="a LoRA applied for this run (strength default 1.0); repeat for several")

    j = g.add_argument_group("job")
    j.add_argument("--prompt", required=True, metavar="TEXT")
    j.add_argument("--negative-prompt", default="", metavar="TEXT", help="empty: the official default")
    j.add_argument("--image", metavar="PATH", help="start image (I2V / FLF2V models only)")
    j.add_argument("--end-image", metavar="PATH", help="last frame (FLF2V)")
    j.add_argument("--video", metavar="PATH",
                   help="input video for video to video (with --denoise < 1; sets size and frames)")
    j.add_argument("--size", type=_size, metavar="WxH", help=f"multiples of 16 (T2V default "
                   f"{T2V_SIZE[0]}x{T2V_SIZE[1]}; I2V default: from --max-area and the image aspect)")
    j.add_argument("--max-area", type=int, metavar="PIXELS",
                   help="I2V pixel budget (default 832*480; official: 832*480 or 1280*720; Wan 2.2: 1280*720 for "
                        "I2V-A14B, 704*1280 for TI2V-5B)")
    j.add_argument("--frames", type=int, metavar="N",
                   help=f"4n+1, default {DEFAULT_FRAMES}; 1 gives an image (see --out)")
    # VACE (a Wan2.1-VACE model, wan_core.vace_conditioning) and Fun Control (wan_core.fun): the model decides
    j.add_argument("--control-video", metavar="PATH", help="VACE / Fun Control: control frames (depth, pose, edges, "
                   "or frames to keep); sets size and frames unless given. Fun Control: --image is the optional "
                   "start frame")
    j.add_argument("--control-mask", metavar="PATH", help="VACE: mask video, white = generate, black = keep")
    j.add_argument("--control-preprocess", choices=CONTROL_PREPROCESS, metavar="MODE",
                   help="VACE: make the control video from --control-video's frames first (wan_core."
                        "preprocess_control, default settings): canny edges, grayscale, scribble (soft edges) or blur")
    j.add_argument("--reference-image", action="append", default=[], metavar="PATH",
                   help="VACE: a subject / style reference image (repeatable); Fun V1.1 Control: one")
    j.add_argument("--vace-strength", type=float, default=1.0, metavar="S", help="VACE context scale, official 1.0")

    s = g.add_argument_group("sampling")
    s.add_argument("--steps", type=int, metavar="N", help="default 50 (T2V, FLF2V) / 40 (I2V)")
    s.add_argument("--cfg", type=float, help="guidance scale, default 5.0")
    s.add_argument("--shift", type=float, help="default 5.0; 3.0 for I2V 480p; 16 for FLF2V")
    s.add_argument("--sampler", default="unipc", choices=SAMPLER_NAMES)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--denoise", type=float, default=1.0, help="below 1: video to video strength (needs --video)")
    add_wan22_arguments(m, s)   # --dit-low-noise, --boundary, --cfg-high-noise, --cfg-low-noise

    mem = g.add_argument_group("memory")
    mem.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    mem.add_argument("--vram-budget", type=_gib, metavar="GB",
                     help="GPU memory the run may use, in GiB (default: the free memory); the DiT blocks that "
                          "do not fit stream from RAM")
    mem.add_argument("--resident-blocks", type=_count, metavar="K",
                     help="DiT blocks kept on the GPU while sampling (default: the planner's choice)")
    mem.add_argument("--weight-dtype", default="keep", choices=WEIGHT_DTYPES, metavar="DTYPE",
                     help="DiT weight storage: keep (as in the file; fp8 stays fp8), fp8_e4m3fn or fp8_e5m2 "
                          "(quantised at load), bf16, fp16, fp32")
    mem.add_argument("--dtype", dest="weight_dtype", choices=WEIGHT_DTYPES + ("auto",),
                     help=argparse.SUPPRESS)   # the first release's name; auto = keep
    mem.add_argument("--text-encoder-device", default="auto", choices=("auto", "cpu", "gpu"),
                     help="where umT5 runs (auto: the GPU when it fits the budget)")
    mem.add_argument("--vae-tile", type=_vae_tile, default="auto", metavar="auto|off|N",
                     help="VAE tiling of the decode and of an input / guide video's encode: auto (only when a "
                          "frame does not fit), off, or N pixels per tile side")

    sp = g.add_argument_group("speed")
    sp.add_argument("--attention", default="sdpa", choices=BACKENDS,
                    help="attention kernel (auto: the fastest installed; sage and flash are optional packages)")
    sp.add_argument("--step-cache", type=_step_cache, metavar="teacache|magcache[:THR]",
                    help="skip steps whose change is predicted small (default threshold: the published one)")
    sp.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (slow first step)")
    # several GPUs: start N = ulysses x ring (x 2 with --cfg-parallel) processes with
    # torchrun --nproc-per-node N -m wan_core generate ...; rank 0 writes the output
    sp.add_argument("--ulysses", type=_count, default=1, metavar="U",
                    help="under torchrun: attention heads split over U processes (must divide the heads: 12 for "
                         "1.3B, 40 for 14B)")
    sp.add_argument("--ring", type=_count, default=1, metavar="R",
                    help="under torchrun: the tokens' K/V passed round R processes (N = U x R, x 2 with "
                         "--cfg-parallel)")
    sp.add_argument("--cfg-parallel", action="store_true",
                    help="under torchrun: conditional and unconditional passes on two halves of the processes")
    sp.add_argument("--shard-weights", default="auto", choices=SHARD_WEIGHTS,
                    help="under torchrun with --ulysses/--ring: FSDP2-shard the DiT blocks over the processes "
                         "(auto: when the whole DiT does not fit a GPU's budget, before block swap)")

    lv = g.add_argument_group("long video and guidance", "off by default; the defaults change no number")
    lv.add_argument("--context-frames", type=int, metavar="N",
                    help="sample in overlapping windows of N frames (4n+1, e.g. 81) when the video is longer")
    lv.add_argument("--context-overlap", type=int, default=48, metavar="N", help="frames shared by windows")
    lv.add_argument("--context-schedule", default="static", choices=SCHEDULES,
                    help="static windows, uniform (seams move per step) or looped (seamless loop)")
    lv.add_argument("--context-fuse", default="pyramid", choices=FUSE_METHODS, help="blend of overlapping windows")
    lv.add_argument("--context-global-positions", action="store_true",
                    help="RoPE positions of each window in the whole video (default: each window its own clip)")
    lv.add_argument("--freenoise", action="store_true", help="FreeNoise shuffled-repeat initial noise for windows")
    lv.add_argument("--slg-blocks", type=_from(parse_blocks), default=(), metavar="I[,J]",
                    help="Skip Layer Guidance: blocks the unconditional pass skips (published: 9 for 1.3B, 10 for 14B)")
    lv.add_argument("--slg-start", type=float, default=0.2, metavar="FRAC", help="SLG from this fraction of steps")
    lv.add_argument("--slg-end", type=float, default=0.8, metavar="FRAC", help="SLG up to this fraction of steps")
    lv.add_argument("--cfg-zero-star", action="store_true", help="CFG-Zero* optimised guidance scale")
    lv.add_argument("--zero-init-steps", type=_count, default=0, metavar="K",
                    help="CFG-Zero* zero-init: the first K steps output zero (official: 1)")
    lv.add_argument("--cfg-schedule", type=_from(parse_cfg_schedule), default=(), metavar="STEP:CFG,...",
                    help="cfg from each 0-based step on, e.g. 0:6,10:3,30:1 (cfg 1 skips the unconditional pass)")
    lv.add_argument("--extend", metavar="PATH",
                    help="continue this video: the new clip starts with its last --extend-overlap frames; the "
                         "output is the video plus the new frames (size: the video's)")
    lv.add_argument("--extend-overlap", type=int, default=17, metavar="N", help="frames shared with --extend (4n+1)")
    lv.add_argument("--riflex", action="store_true",
                    help="RIFLEx: lower the intrinsic temporal RoPE frequency so > 81 frames do not repeat")

    o = g.add_argument_group("output")
    o.add_argument("--out", metavar="PATH",
                   help="video.mp4 (H.264); with --frames 1 a .png/.jpg/.webp writes an image, .mp4 a one-frame "
                        "video (default: video.mp4, or image.png for --frames 1)")
    o.add_argument("--fps", type=int, help="frames per second of the mp4 (default: Wan 16; Wan 2.2 TI2V-5B 24)")

    t = sub.add_parser("selftest", help="tiny random-weight T2V + I2V run, no downloads")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    t.add_argument("--out", metavar="PATH", help="also write the selftest videos (mp4)")
    t.add_argument("--frames", type=int, default=9)
    t.add_argument("--steps", type=int, default=4)
    return p


def _from(parse):
    """An argparse type from a wan_core parser whose ValueError says what is wrong."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return convert


def guidance_from_args(args: argparse.Namespace) -> GuidanceOptions | None:
    """The guidance flags -> :class:`GuidanceOptions`, or None when all are at their defaults."""
    g = GuidanceOptions(slg_blocks=args.slg_blocks, slg_start=args.slg_start, slg_end=args.slg_end,
                        cfg_zero_star=args.cfg_zero_star, zero_init_steps=args.zero_init_steps,
                        cfg_schedule=args.cfg_schedule, riflex=args.riflex)
    return None if g.is_default else g


def context_from_args(args: argparse.Namespace) -> ContextOptions | None:
    """The context-window flags -> :class:`ContextOptions`, or None without ``--context-frames``."""
    if args.context_frames is None:
        return None
    return ContextOptions(args.context_frames, args.context_overlap, args.context_schedule, args.context_fuse,
                          global_positions=args.context_global_positions, freenoise=args.freenoise)


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """The memory and speed flags of ``generate`` -> :class:`RunOptions` (a pure function)."""
    return RunOptions(
        vram_budget=None if args.vram_budget is None else int(args.vram_budget * GiB),
        resident_blocks=args.resident_blocks,
        weight_dtype=None if args.weight_dtype in ("keep", "auto") else args.weight_dtype,
        text_encoder_device=args.text_encoder_device,
        vae_tile=args.vae_tile,
        loras=tuple(args.lora or ()),
        step_cache=args.step_cache,
        compile=CompileSpec() if args.compile else None,
        attention=args.attention,
    )


# --- running ----------------------------------------------------------------------------------

class _Progress:
    """A one-line text progress bar on stderr; the rate is the mean since the first step ended
    (earlier work, loading and text encoding, would distort it)."""

    def __init__(self) -> None:
        self.first: tuple[int, float] | None = None
        self.line_open = False

    def __call__(self, info) -> None:
        now = time.perf_counter()
        self.first = self.first or (info.step, now)
        done = int(30 * info.step / info.total)
        steps = info.step - self.first[0]
        rate = f" {(now - self.first[1]) / steps:.2f}s/step" if steps else ""
        sys.stderr.write(f"\rsampling [{'#' * done}{'.' * (30 - done)}] {info.step}/{info.total}{rate}")
        self.line_open = info.step != info.total
        if not self.line_open:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _generate(args: argparse.Namespace, progress: _Progress) -> int:
    from .cli_checks import check_generate
    from .pipeline import generate
    from .video import write_image, write_mp4

    kind = wan22_kind(args)   # header of --dit only
    if kind is not None:      # Wan 2.2 A14B pair / TI2V-5B: wan_core.cli22
        return generate22(args, kind, options_from_args(args), progress)
    if (args.boundary, args.cfg_high_noise, args.cfg_low_noise) != (None, None, None):
        raise ValueError("--boundary / --cfg-high-noise / --cfg-low-noise are for a Wan 2.2 A14B pair (give both "
                         "experts: --dit and --dit-low-noise, or the A14B model folder); this model uses --cfg.")
    args.fps = WAN21_FPS if args.fps is None else args.fps
    args.max_area = WAN21_MAX_AREA if args.max_area is None else args.max_area
    if args.out is None:
        args.out = "image.png" if args.frames == 1 else "video.mp4"
    from .distributed import cli_parallel

    parallel = cli_parallel(args)   # None for one process; under torchrun: joins, one GPU per rank
    quiet = parallel is not None and parallel.rank != 0
    options = options_from_args(args)
    guidance, context = guidance_from_args(args), context_from_args(args)   # ValueError before any load
    job = check_generate(args, options)   # nothing is loaded before this returns
    extend = None
    if args.extend is not None:
        from .extend import check_overlap
        from .video import read_video

        extend = read_video(args.extend)
        check_overlap(args.extend_overlap, extend.shape[0], job.frames)
    vace = _vace_inputs(args, job.device)
    own_size = job.video is not None or extend is not None or (vace.get("control_video") is not None
                                                                and args.size is None)
    # Paths, not modules: generate() loads each model resting on the CPU when its stage comes
    # (the DiT with options.weight_dtype / options.attention) and moves it per stage.
    video = generate(dit=args.dit, vae=args.vae, text_encoder=args.text_encoder, clip_vision=args.clip_vision,
                     prompt=args.prompt, negative_prompt=args.negative_prompt, image=job.image,
                     end_image=job.end_image, video=job.video,
                     width=None if own_size else job.width, height=None if own_size else job.height,
                     frames=job.frames, max_area=args.max_area, steps=args.steps, cfg=args.cfg, shift=args.shift,
                     sampler=args.sampler, seed=args.seed, denoise=args.denoise, device=job.device,
                     callback=None if quiet else progress, options=options, guidance=guidance, context=context,
                     extend=extend, extend_overlap=args.extend_overlap, parallel=parallel, **vace)
    if quiet:   # every rank holds the same frames; rank 0 writes them
        return 0
    if job.out_kind == "image":
        out = write_image(video, job.out)
    else:
        out = write_mp4(video, job.out, fps=args.fps)
    what = "image" if job.out_kind == "image" else f"{video.shape[0]} frames"
    print(f"wrote {out} ({what}, {video.shape[2]}x{video.shape[1]})")
    return 0


def _vace_inputs(args: argparse.Namespace, device) -> dict:
    """generate()'s VACE keywords from --control-video (made a control video on ``device`` by
    --control-preprocess) / --control-mask / --reference-image."""
    from .cli_checks import _decode_image
    from .video import read_video

    out: dict = {}
    if args.control_preprocess is not None and args.control_video is None:
        raise ValueError(f"--control-preprocess {args.control_preprocess} needs --control-video (the frames to "
                         "turn into edges / grey-scale / ...).")
    if args.control_video is not None:
        out["control_video"] = read_video(args.control_video)
        if args.control_preprocess is not None:
            control = preprocess_control(out["control_video"], ControlOptions(mode=args.control_preprocess),
                                         device=device)
            out["control_video"] = control.frames
    if args.control_mask is not None:
        out["control_mask"] = read_video(args.control_mask).mean(dim=-1)   # grey levels, 0..1
    if args.reference_image:
        out["reference_images"] = [_decode_image(p, "--reference-image") for p in args.reference_image]
    if out or args.vace_strength != 1.0:
        out["vace_strength"] = args.vace_strength
    return out


def _selftest(args: argparse.Namespace) -> int:
    from .cli_checks import check_device, check_output
    from .limits import check_run_arguments
    from .selftest import SELFTEST_SIZE, run_selftest

    check_run_arguments(width=SELFTEST_SIZE[0], height=SELFTEST_SIZE[1], frames=args.frames, steps=args.steps)
    device = check_device(args.device)
    if args.out is not None and check_output(args.out, args.frames)[1] != "mp4":
        raise ValueError(f"--out {args.out}: the selftest writes videos; give a .mp4 name.")
    run_selftest(device=device, out=args.out, frames=args.frames, steps=args.steps)
    return 0


def _expected_errors() -> tuple[type[BaseException], ...]:
    from . import NonFiniteError
    from .files import CheckpointError
    from .planner import PlanError

    return CheckpointError, PlanError, NonFiniteError, ValueError, OSError


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for errors, 130 for Ctrl-C)."""
    progress = _Progress()
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        if args.command == "selftest":
            return _selftest(args)
        return _generate(args, progress)
    except KeyboardInterrupt:
        sys.stderr.write(("\n" if progress.line_open else "") + "interrupted\n")
        return EXIT_INTERRUPTED
    except _expected_errors() as err:
        sys.stderr.write(("\n" if progress.line_open else "") + f"error: {_one_line(err)}\n")
        return EXIT_ERROR
