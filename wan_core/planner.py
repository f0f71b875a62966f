"""The offload planner: a VRAM budget, model sizes and a token count -> one frozen plan.

:func:`plan_memory` is a pure function (no torch device calls, no loading): give it the
budget in bytes (free VRAM from :func:`free_vram_bytes`, or a user's figure), the DiT's
sizes (:func:`dit_sizes`, from a config and a storage dtype, built on the meta device), the
token count (:func:`tokens_for`), the attention backend and the text encoder / VAE sizes,
and it returns a :class:`MemoryPlan`: how many DiT blocks stay resident (the rest are
streamed by :class:`wan_core.offload.BlockSwap`), whether the text encoder runs on the CPU,
and the VAE tile size. ``plan.describe()`` is the one log line.

Stages are assumed exclusive on the device (text encoder, then CLIP + the VAE encode of
the guide video, then the DiT, then the VAE decode; each releases its device copies when
done), so each is planned against the whole budget. :class:`StagePeaks` holds each stage's
estimated peak device bytes (the reserve excluded); every figure below was checked against
the real code run at real shapes on a simulated GPU (:mod:`wan_core.memsim`,
``bench/simulated_vram.py``): the estimate is never below the simulated peak and at most
15 % above it.

DiT activation estimate (bytes, batch 1: the CFG passes run one after the other), with L
tokens, d = dim, f = ffn_dim, h = heads, c = bytes of the compute dtype (2 for bf16/fp16):

    act(L) = L * (max(20 d + 2 c d, 12 d + c d + 2 c f) + 4 h + latent) + attn(L) + upcast + context + 64 MiB

- ``8 d`` of both phases: two float32 ``[L, d]`` tensors live through every block: the
  tokens of ``prepare`` (held by the runner for the step cache) and the block input (held
  by the executor);
- ``20 d + 2 c d``: the attention phases: the norm output in the compute dtype and q (or
  the residual stream, float32, in the cross attention), the float32 RMSNorm copy and square
  or the float32 RoPE temporaries of k;
- ``12 d + c d + 2 c f``: the FFN phase (the larger one for both published widths): the
  residual stream, its modulated norm in the compute dtype and the hidden ``[L, f]``
  before and after GELU;
- ``4 h``: the float32 log-sum-exp rows of flash / memory-efficient SDPA (flash-attn: the
  same); ``attn(L)`` is 0 for those and ``h L^2 (c + 4)`` for "math" (full score matrix +
  float32 softmax), which is why the planner only assumes memory-efficient kernels for
  "sdpa". Sage's int8 / fp8 copies of q, k, v (``6 d`` per token,
  :func:`wan_core.memsim.attention_workspace_bytes`) come on top of ``8 d`` + the norm
  output, q, k, v and the output in the compute dtype at the call: ``8 d + 5 c d + 6 d``,
  which the attention phase's ``20 d + 2 c d`` covers for c = 2;
- ``latent``: the float32 RoPE tables (``4 head_dim``) and the latent-sized buffers of the
  step (noisy latent, conditional velocity, I2V ``y``): ``16 (2 out_dim + in_dim - out_dim)``;
- ``upcast``: fp8 (or other non-compute-dtype) weights are upcast per layer: a float32 and a
  compute-dtype copy of the largest Linear, ``n (4 + c)``;
- ``context``: text (512 tokens) and image (257/514) keys and values of the cross attention,
  ``4 c d`` per context token; 64 MiB for the small per-step tensors.

For the 14B models at 480p x 81 (L = 32760, d 5120, f 13824, bf16) this is 4.0 GiB; for
1.3B (d 1536, f 8960) 1.85 GiB.

VAE working sets are per latent pixel of the area decoded / encoded at once (a tile is
``t x t`` latent px, its overlap included), float32 Wan VAE, steady-state chunk with its
feature cache, simulated: decode 1,169,920 B, encode 874,112 B (exactly linear in the area
from 16x16 to 90x160); the planner adds 5 % for what the simulation does not see (cuDNN
convolution workspaces). An untiled decode also holds the whole output video on the
device (:meth:`wan_core.vae.WanVAE.decode`); a tiled one streams it to the CPU.

The Wan 2.2 VAE (TI2V-5B, :mod:`wan_core.vae22`: 16x16 pixels per latent pixel, 48
channels, decoder width 256, 2.82 GB of float32 weights) has its own figures
(:data:`VAE22_FIGURES`), simulated the same way: decode 4,316,928 B, encode 1,643,904 B per
latent pixel (4-frame chunk), and 459,776 B for a one-frame encode (the TI2V first frame);
:class:`VaeFigures` carries a VAE's figures and geometry, :func:`vae_figures` picks them for
a VAE module.
"""
from __future__ import annotations

from dataclasses import dataclass

from .attention import BACKENDS
from .configs import LATENT_CHANNELS, VAE_SPACE_STRIDE, VAE_TIME_STRIDE

__all__ = ["GiB", "DiTSizes", "MemoryPlan", "PlanError", "StagePeaks", "dit_sizes", "dit_sizes_from_module",
           "tokens_for", "dit_activation_bytes", "vae_decode_bytes", "vae_encode_bytes", "clip_vision_bytes_needed",
           "plan_memory", "plan_vae", "VaePlan", "free_vram_bytes", "module_param_bytes", "DEFAULT_RESERVE",
           "VAE_TILES", "TEXT_ENCODER_WORKSPACE", "VaeFigures", "VAE21_FIGURES", "VAE22_FIGURES", "vae_figures"]

GiB = 1 << 30
MiB = 1 << 20
# Kept free for the allocator's fragmentation, cuBLAS workspaces and kernels' scratch.
DEFAULT_RESERVE = 512 * MiB
VAE_TILES: tuple[int, ...] = (128, 96, 64, 48, 32, 24, 16)   # candidate tile sides, latent px
# Device bytes per latent pixel of the float32 Wan VAE (dim 96): simulated + 5 % (module docstring).
VAE_DECODE_BYTES_PER_LATENT_PIXEL = 1_230_000
VAE_ENCODE_BYTES_PER_LATENT_PIXEL = 920_000
# umT5-XXL, both prompts (batch 2) at 512 tokens, bf16: per layer the position bias, the
# scores in bf16 and float32 and the float32 softmax, B H L^2 (2c + 8), plus eight
# [B, L, dim] hidden-state tensors (simulated: 426 MiB).
TEXT_ENCODER_WORKSPACE = 2 * 64 * 512 * 512 * (2 * 2 + 8) + 8 * 2 * 512 * 4096 * 2     # 448 MiB
# CLIP ViT-H/14 on one image: its 257 tokens are tiny; the image itself goes to the device
# in float32 before the resize (3 H W 4 bytes, twice: input and normalised copy) + 16 MiB.
CLIP_WORKSPACE_FIXED = 16 * MiB
DIT_STEP_FIXED = 64 * MiB
# Per-token timesteps (TI2V image-to-video): float32 e [L, d] + e0 [L, 6d] + the three modulation
# vectors of a block's phase [L, 3d] (wan_core.dit.WanBlock adds them per phase)
PER_TOKEN_TIME_BYTES = 4 * (1 + 6 + 3)
_STORAGE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
                  "fp8": 1, "fp8_e4m3fn": 1, "fp8_e5m2": 1}


class PlanError(ValueError):
    """The budget cannot run the job at all; the message names the minimum."""


@dataclass(frozen=True)
class VaeFigures:
    """A VAE family's geometry and device bytes per latent pixel of the area run at once
    (float32, the steady-state chunk with its feature cache; simulated + 5 %, module
    docstring). ``encode_image``: a one-frame encode (None: as ``encode``)."""

    name: str
    space_stride: int             # pixels per latent pixel, each way
    time_stride: int
    latent_channels: int
    decode: int                   # bytes per latent pixel
    encode: int
    encode_image: int | None = None


VAE21_FIGURES = VaeFigures("Wan 2.1 VAE", VAE_SPACE_STRIDE, VAE_TIME_STRIDE, LATENT_CHANNELS,
                           VAE_DECODE_BYTES_PER_LATENT_PIXEL, VAE_ENCODE_BYTES_PER_LATENT_PIXEL)
# simulated 4,316,928 / 1,643,904 / 459,776 B per latent pixel (16x16 px), + 5 %
VAE22_FIGURES = VaeFigures("Wan 2.2 VAE", 16, 4, 48, 4_533_000, 1_727_000, 483_000)


def vae_figures(vae=None, space_stride: int | None = None) -> VaeFigures:
    """The figures of ``vae`` (a module: the Wan 2.2 VAE has ``space_stride`` 16), else of a
    VAE with ``space_stride`` (8 or 16), else the Wan 2.1 VAE's."""
    stride = getattr(vae, "space_stride", None) if vae is not None and not isinstance(vae, int) else None
    stride = stride or space_stride or VAE_SPACE_STRIDE
    return VAE22_FIGURES if stride == VAE22_FIGURES.space_stride else VAE21_FIGURES


@dataclass(frozen=True)
class DiTSizes:
    """What the planner needs to know about a DiT, in bytes of its storage dtypes."""

    name: str
    block_bytes: tuple[int, ...]   # per block, in order
    other_bytes: int               # everything outside the blocks (embeddings, time MLPs, head)
    dim: int
    ffn_dim: int
    num_heads: int
    largest_linear: int            # elements of the largest block Linear weight
    upcast: bool                   # weights are stored in another dtype than they compute in
    in_dim: int = 16               # latent channels in (16 T2V, 36 I2V/FLF2V: + mask and image latents)
    out_dim: int = 16
    head_dim: int = 128
    vace: bool = False             # a VACE DiT: its control stream adds activations (wan_core.vace)
    swap_streamed_bytes: int = 0   # part of other_bytes off the device while blocks stream (VACE
                                   # blocks but the largest: block swap runs them one at a time)

    @property
    def num_blocks(self) -> int:
        return len(self.block_bytes)

    @property
    def total_bytes(self) -> int:
        return self.other_bytes + sum(self.block_bytes)


def _storage_bytes(storage: str) -> int:
    try:
        return _STORAGE_BYTES[storage]
    except KeyError:
        raise ValueError(f"unknown storage {storage!r}; valid: {', '.join(_STORAGE_BYTES)}") from None


def dit_sizes(cfg, storage: str = "bf16", compute: str = "bf16") -> DiTSizes:
    """Sizes of a WanDiT of ``cfg`` stored as ``storage`` ("bf16", "fp16", "fp32", "fp8_e4m3fn",
    "fp8_e5m2"), built on the meta device (nothing allocated, nothing loaded).

    Storage rule (the loaders'): float32-policy parameters (``FP32_PARAMS``) 4 bytes; other
    Linear weights ``storage`` (fp8: 1 byte + a 4-byte scale); everything else (biases) the
    storage dtype, or bf16 when that is fp8.
    """
    import torch

    from .dit import WanDiT, keeps_fp32
    from .layers import CastLinear

    nbytes = _storage_bytes(storage)
    is_fp8 = storage.startswith("fp8")
    from .vace import WanVaceDiT

    with torch.device("meta"):   # a VACE model's vace blocks stay resident: counted in ``other``
        model = WanVaceDiT(cfg) if getattr(cfg, "vace_layers", ()) else WanDiT(cfg)
    linear_w = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, CastLinear)}
    per_block = [0] * cfg.num_layers
    per_vace = [0] * len(getattr(cfg, "vace_layers", ()))
    other = 0
    largest = 0
    for name, p in model.named_parameters():
        if keeps_fp32(name):
            size = p.numel() * 4
        elif name in linear_w:
            size = p.numel() * nbytes + (4 if is_fp8 else 0)
        else:
            size = p.numel() * (2 if is_fp8 else nbytes)
        if name.startswith("blocks."):
            per_block[int(name.split(".")[1])] += size
            if name in linear_w:
                largest = max(largest, p.numel())
        else:
            other += size
            if name.startswith("vace_blocks."):
                per_vace[int(name.split(".")[1])] += size
    return DiTSizes(name=f"{cfg.variant} {storage}", block_bytes=tuple(per_block), other_bytes=other, dim=cfg.dim,
                    ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads, largest_linear=largest,
                    upcast=is_fp8 or nbytes != _storage_bytes(compute), in_dim=cfg.in_dim, out_dim=cfg.out_dim,
                    head_dim=cfg.head_dim, vace=bool(per_vace),
                    swap_streamed_bytes=sum(per_vace) - max(per_vace, default=0))


def dit_sizes_from_module(dit, compute_bytes: int = 2) -> DiTSizes:
    """Sizes of a loaded WanDiT, from its actual parameters (bytes as stored: fp8 with its
    scales, GGUF blocks as quantized; ``largest_linear`` in real ``out * in`` elements)."""
    from torch import nn

    from .offload import module_bytes

    blocks = tuple(module_bytes(b) for b in dit.blocks)
    vace = [module_bytes(b) for b in getattr(dit, "vace_blocks", ())]
    largest = max((m.in_features * m.out_features for b in dit.blocks for m in b.modules()
                   if isinstance(m, nn.Linear)), default=0)
    w = dit.blocks[0].self_attn.q.weight
    return DiTSizes(name=dit.cfg.variant, block_bytes=blocks, other_bytes=module_bytes(dit) - sum(blocks),
                    dim=dit.cfg.dim, ffn_dim=dit.cfg.ffn_dim, num_heads=dit.cfg.num_heads, largest_linear=largest,
                    upcast=w.element_size() != compute_bytes, in_dim=dit.cfg.in_dim, out_dim=dit.cfg.out_dim,
                    head_dim=dit.cfg.head_dim, vace=bool(vace),
                    swap_streamed_bytes=sum(vace) - max(vace, default=0))


def module_param_bytes(module_cls, cfg, bytes_per_param: float) -> int:
    """Parameter bytes of ``module_cls(cfg)`` at ``bytes_per_param`` (meta build, no memory)."""
    import torch

    with torch.device("meta"):
        m = module_cls(cfg)
    return int(sum(p.numel() for p in m.parameters()) * bytes_per_param)


def tokens_for(width: int, height: int, frames: int, patch: tuple[int, int, int] = (1, 2, 2),
               space_stride: int = VAE_SPACE_STRIDE) -> int:
    """DiT token count of a video: latent ``((frames-1)/4+1, H/s, W/s)`` over the patch, s the
    VAE's ``space_stride`` (8; 16 for the Wan 2.2 VAE). 832x480x81 -> 21 * 30 * 52 = 32760;
    TI2V-5B 1280x704x121 (s 16) -> 31 * 22 * 40 = 27280."""
    t = (frames - 1) // VAE_TIME_STRIDE + 1
    return (t // patch[0]) * (height // space_stride // patch[1]) * (width // space_stride // patch[2])


def dit_activation_bytes(dit: DiTSizes, tokens: int, attention: str = "sdpa", compute_bytes: int = 2,
                         context_tokens: int = 512 + 257, per_token_timesteps: bool = False) -> int:
    """The module docstring's activation estimate, in bytes. ``per_token_timesteps`` (Wan 2.2
    TI2V image-to-video): the time embedding ``e`` ``[L, d]`` and projection ``e0`` ``[L, 6 d]``
    live through the step and each block phase adds its three modulation vectors to ``e0``
    (``[L, 3 d]``), all float32: ``PER_TOKEN_TIME_BYTES`` ``d`` more per token."""
    d, f, h, c, n = dit.dim, dit.ffn_dim, dit.num_heads, compute_bytes, tokens
    latent = 4 * dit.head_dim + 16 * (2 * dit.out_dim + dit.in_dim - dit.out_dim)
    per_token = max(20 * d + 2 * c * d, 12 * d + c * d + 2 * c * f) + 4 * h + latent
    if per_token_timesteps:
        per_token += PER_TOKEN_TIME_BYTES * d
    if dit.vace:   # VACE: the control stream c (float32) and one hint (compute dtype) live beside x
        per_token += 4 * d + c * d + 16 * 96
    attn = 0 if attention in BACKENDS else h * n * n * (c + 4)   # every backend but "math" is memory-efficient
    upcast = dit.largest_linear * (4 + c) if dit.upcast else 0
    return n * per_token + attn + upcast + context_tokens * 4 * c * d + DIT_STEP_FIXED


def vae_decode_bytes(vae_bytes: int, tile_hw: tuple[int, int], figures: VaeFigures = VAE21_FIGURES) -> int:
    """Weights + device working set of a decode of ``(h, w)`` latent pixels at once (a tile,
    or the whole frame), the float32 VAE of ``figures``; the output video is not included."""
    return vae_bytes + figures.decode * tile_hw[0] * tile_hw[1]


def vae_encode_bytes(vae_bytes: int, tile_hw: tuple[int, int], figures: VaeFigures = VAE21_FIGURES,
                     frames: int | None = None) -> int:
    """Weights + device working set of an encode of ``(h, w)`` latent pixels at once (4-frame
    chunks of ``s h x s w`` pixels with the feature cache; ``frames`` 1: one image), the
    float32 VAE of ``figures``."""
    per_pixel = figures.encode_image if frames == 1 and figures.encode_image else figures.encode
    return vae_bytes + per_pixel * tile_hw[0] * tile_hw[1]


def clip_vision_bytes_needed(clip_bytes: int, width: int, height: int) -> int:
    """Weights + device working set of one CLIP vision encode of a ``width x height`` image."""
    return clip_bytes + 2 * 3 * width * height * 4 + CLIP_WORKSPACE_FIXED


@dataclass(frozen=True)
class StagePeaks:
    """Estimated peak device bytes of each stage of a run (the reserve excluded; 0 for a
    stage that does not run on the device or does not run at all)."""

    text_encoder: int = 0
    clip_vision: int = 0      # CLIP + the VAE weights (the image-encode stage places both)
    vae_encode: int = 0       # the I2V guide video (VAE + CLIP weights on the device)
    dit_step: int = 0         # one step, both CFG passes, under the block swap
    vae_decode: int = 0

    def items(self) -> list[tuple[str, int]]:
        return [("text encoder", self.text_encoder), ("CLIP", self.clip_vision), ("VAE encode", self.vae_encode),
                ("DiT step", self.dit_step), ("VAE decode", self.vae_decode)]

    @property
    def peak(self) -> int:
        return max(v for _, v in self.items())


@dataclass(frozen=True)
class MemoryPlan:
    """Where everything runs, and the estimates the decision used (bytes)."""

    budget: int
    resident_blocks: int          # K: blocks kept on the device; the rest are streamed
    num_blocks: int
    text_encoder_on_cpu: bool
    vae_tile: int | None          # tile side in latent pixels; None = decode untiled
    tokens: int
    attention: str
    block_bytes: int              # largest block
    other_bytes: int              # non-block DiT weights (always on the device)
    streaming_bytes: int          # streamed blocks on the device at once (0 when K = N)
    activation_bytes: int
    reserve_bytes: int
    text_encoder_bytes: int
    vae_peak_bytes: int           # VAE decode: weights + working set of one tile (+ output when untiled)
    vae_encode_tile: int | None = None   # I2V guide-video encode tile side, latent px; None = untiled
    stages: StagePeaks = StagePeaks()
    # the run's text K/V cache (wan_core.runner.ContextKVCache, context_kv_bytes): asked-for bytes,
    # and whether it is on (counted in the DiT peak) or off because it does not fit beside K blocks
    context_cache_bytes: int = 0
    context_cache: bool = False

    @property
    def device_weight_bytes(self) -> int:
        """DiT weight bytes resident on the device during sampling (non-block + K blocks;
        blocks assumed equal, the largest counted)."""
        return self.other_bytes + self.resident_blocks * self.block_bytes

    @property
    def dit_peak_bytes(self) -> int:
        cache = self.context_cache_bytes if self.context_cache else 0
        return self.device_weight_bytes + self.streaming_bytes + self.activation_bytes + cache + self.reserve_bytes

    def describe_context_cache(self) -> str:
        """The text K/V cache decision in words ("" when none was asked for)."""
        if not self.context_cache_bytes:
            return ""
        size = f"{self.context_cache_bytes / GiB:.2f} GiB"
        if self.context_cache:
            return f"text K/V cache on ({size})"
        return f"text K/V cache off ({size} does not fit beside {self.resident_blocks} resident blocks)"

    def describe(self) -> str:
        g = GiB
        swap = ("all blocks resident" if self.resident_blocks == self.num_blocks else
                f"{self.resident_blocks}/{self.num_blocks} blocks resident, rest streamed")
        te = "CPU" if self.text_encoder_on_cpu else "device"
        tile = "untiled" if self.vae_tile is None else f"tiles of {self.vae_tile} latent px"
        return (f"wan_core memory plan: budget {self.budget / g:.2f} GiB; DiT {swap} "
                f"({self.block_bytes / g:.2f} GiB/block; weights on device {self.device_weight_bytes / g:.2f} GiB "
                f"+ streaming {self.streaming_bytes / g:.2f} GiB; activations {self.activation_bytes / g:.2f} GiB "
                f"for {self.tokens} tokens, {self.attention}"
                f"{'; ' + self.describe_context_cache() if self.context_cache_bytes else ''}; "
                f"peak {self.dit_peak_bytes / g:.2f} GiB); "
                f"text encoder on {te} ({self.text_encoder_bytes / g:.2f} GiB); VAE {tile} "
                f"(peak {self.vae_peak_bytes / g:.2f} GiB)")


def _streaming(blocks: tuple[int, ...], k: int) -> int:
    rest = sorted(blocks[k:], reverse=True)
    return sum(rest[:2])


def _tile_for(latent_hw: tuple[int, int], fits) -> tuple[int | None, tuple[int, int]]:
    """(tile side or None for untiled, the area decoded at once): the whole frame when
    ``fits(area, untiled=True)``, else the largest ``VAE_TILES`` side that fits (a tile is
    ``t x t`` latent px, its overlap included), else the smallest tile."""
    h, w = latent_hw
    if fits((h, w), True):
        return None, (h, w)
    for t in VAE_TILES:
        area = (min(h, t), min(w, t))
        if t < max(h, w) and fits(area, False):
            return t, area
    t = min(VAE_TILES)
    return t, (min(h, t), min(w, t))


@dataclass(frozen=True)
class VaePlan:
    """The VAE stages of a job (bytes exclude the reserve): the decode tile, and with
    ``encode_video`` the encode tile of the I2V / FLF2V guide video or the V2V input video
    (None = untiled), their peaks, the image-encode stage's CLIP peak, and ``minimum``: the
    largest of these stages with the smallest tile (what the budget must hold at least)."""

    decode_tile: int | None = None
    decode_peak: int = 0
    encode_tile: int | None = None
    encode_peak: int = 0
    clip_stage: int = 0
    minimum: int = 0


def plan_vae(budget: int, vae_bytes: int, latent_hw: tuple[int, int] | None, latent_frames: int, *,
             clip_vision_bytes: int = 0, encode_video: bool = False, reserve: int = DEFAULT_RESERVE,
             figures: VaeFigures = VAE21_FIGURES, encode_frames: int | None = None) -> VaePlan:
    """The VAE tiles for ``budget`` bytes (``reserve`` kept free) of a ``latent_hw`` latent
    frame, ``latent_frames`` latent frames: untiled when the whole frame (and, for a decode,
    the output video an untiled decode keeps on the device) fits, else the largest tile of
    ``VAE_TILES`` that fits, else the smallest. :func:`plan_memory` uses it for its VAE
    figures; the run plan's image-encode and decode stages use it too, so the tiles of a
    stage are the memory plan's. ``figures``: the VAE's (:func:`vae_figures`; a one-frame
    encode, ``latent_frames`` 1, uses its image figure; ``encode_frames``: the latent frames
    encoded when not ``latent_frames``, 1 for the TI2V first frame). Never raises: compare ``minimum +
    reserve`` with the budget."""
    if latent_hw is None:
        return VaePlan()
    h, w = latent_hw
    room = budget - reserve
    s, frames = figures.space_stride, (latent_frames - 1) * figures.time_stride + 1
    encoded = latent_frames if encode_frames is None else encode_frames
    out_video = 3 * frames * h * w * s * s * 4
    clip_stage = clip_vision_bytes_needed(clip_vision_bytes, w * s, h * s) + vae_bytes if encode_video else 0

    def decode_need(area: tuple[int, int], untiled: bool) -> int:
        return vae_decode_bytes(vae_bytes, area, figures) + (out_video if untiled else 0)

    def encode_need(area: tuple[int, int], untiled: bool) -> int:
        latents = 2 * figures.latent_channels * encoded * area[0] * area[1] * 4
        return vae_encode_bytes(vae_bytes, area, figures, encoded) + clip_vision_bytes + latents

    if not vae_bytes:
        return VaePlan(clip_stage=clip_stage)
    tile, area = _tile_for(latent_hw, lambda a, u: decode_need(a, u) <= room)
    smallest = (min(h, min(VAE_TILES)), min(w, min(VAE_TILES)))
    plan = VaePlan(decode_tile=tile, decode_peak=decode_need(area, tile is None), clip_stage=clip_stage,
                   minimum=decode_need(smallest, False))
    if not encode_video:
        return plan
    encode_tile, area = _tile_for(latent_hw, lambda a, u: encode_need(a, u) <= room)
    return VaePlan(decode_tile=tile, decode_peak=plan.decode_peak, encode_tile=encode_tile,
                   encode_peak=encode_need(area, encode_tile is None), clip_stage=clip_stage,
                   minimum=max(plan.minimum, encode_need(smallest, False), clip_stage))


def plan_memory(budget: int, dit: DiTSizes, tokens: int, *, attention: str = "sdpa", compute_bytes: int = 2,
                text_encoder_bytes: int = 0, vae_bytes: int = 0, latent_hw: tuple[int, int] | None = None,
                reserve: int = DEFAULT_RESERVE, vae_overlap: int = 8, clip_vision_bytes: int = 0,
                encode_video: bool = False, vae: VaeFigures = VAE21_FIGURES,
                per_token_timesteps: bool = False, encode_frames: int | None = None,
                context_cache_bytes: int = 0) -> MemoryPlan:
    """Choose K resident blocks, text-encoder placement and VAE tiles for ``budget`` bytes.

    K is the largest count whose weights fit beside the non-block weights, two streamed
    blocks (none when K = N), the activation estimate and ``reserve``. The text encoder runs
    on the CPU when its weights + workspace do not fit the budget. The VAE decodes untiled
    when the whole latent frame ``latent_hw`` (and the output video, which an untiled decode
    keeps on the device) fits, else with the largest tile of ``VAE_TILES`` that fits.
    ``encode_video`` (I2V / FLF2V: the guide video is encoded with CLIP vision and the VAE on
    the device together, ``clip_vision_bytes`` of CLIP weights; V2V: the input video, no
    CLIP): the same choice for the encode tile (``vae_encode_tile``); see :func:`plan_vae`.
    ``vae_overlap`` is kept for callers; a tile includes
    its overlap. ``vae``: the VAE's figures (:data:`VAE22_FIGURES` for TI2V-5B);
    ``per_token_timesteps``: the DiT gets one timestep per token (TI2V image-to-video), see
    :func:`dit_activation_bytes`; ``encode_frames``: see :func:`plan_vae`. ``plan.stages``
    holds every stage's estimated peak (reserve excluded).
    ``context_cache_bytes``: the run's text K/V cache (:func:`wan_core.runner.context_kv_bytes`);
    it is on (``plan.context_cache``, counted in the DiT step) only when it fits beside the K
    chosen without it: resident blocks save more time than the K/V of a 512-token text.

    Raises :class:`PlanError` naming the minimum budget when even K = 0 (or the smallest
    VAE tile) does not fit.
    """
    if budget <= 0:
        raise PlanError(f"memory budget must be positive, got {budget} bytes")
    act = dit_activation_bytes(dit, tokens, attention, compute_bytes, per_token_timesteps=per_token_timesteps)
    blocks = dit.block_bytes
    n = len(blocks)
    room = budget - reserve

    def other_at(k: int) -> int:   # a VACE model's control blocks stream with the blocks (K < N)
        return dit.other_bytes - (dit.swap_streamed_bytes if k < n else 0)

    def dit_need(k: int) -> int:
        return other_at(k) + sum(blocks[:k]) + (_streaming(blocks, k) if k < n else 0) + act

    # VAE and CLIP stages (only with a latent frame to size them)
    latent_frames = 0
    if latent_hw is not None:
        h, w = latent_hw
        latent_frames = max(1, tokens // max(1, (h // 2) * (w // 2)))
    vplan = plan_vae(budget, vae_bytes, latent_hw, latent_frames, clip_vision_bytes=clip_vision_bytes,
                     encode_video=encode_video, reserve=reserve, figures=vae, encode_frames=encode_frames)
    tile, encode_tile, clip_stage, min_vae = vplan.decode_tile, vplan.encode_tile, vplan.clip_stage, vplan.minimum
    vae_peak, vae_encode_peak = vplan.decode_peak, vplan.encode_peak

    min_dit = dit_need(0) if n else other_at(0) + act
    minimum = max(min_dit, min_vae) + reserve
    if budget < minimum:
        g = GiB
        raise PlanError(
            f"a budget of {budget / g:.2f} GiB cannot run {dit.name} at {tokens} tokens: the minimum is "
            f"{minimum / g:.2f} GiB (non-block weights {other_at(0) / g:.2f} + two streamed blocks "
            f"{_streaming(blocks, 0) / g:.2f} + activations {act / g:.2f} ({attention}) + reserve {reserve / g:.2f}"
            f"{f'; VAE with the smallest tile {(min_vae + reserve) / g:.2f}' if min_vae > min_dit else ''}). "
            "Lower the resolution or frame count, store the weights in fp8, or free GPU memory.")
    k = n if dit_need(n) <= room else max(i for i in range(n + 1) if dit_need(i) <= room)
    te_need = text_encoder_bytes + TEXT_ENCODER_WORKSPACE if text_encoder_bytes else 0
    te_on_cpu = te_need > room if text_encoder_bytes else False
    cache_on = 0 < context_cache_bytes <= room - dit_need(k)
    stages = StagePeaks(text_encoder=0 if te_on_cpu else te_need, clip_vision=clip_stage, vae_encode=vae_encode_peak,
                        dit_step=dit_need(k) + (context_cache_bytes if cache_on else 0), vae_decode=vae_peak)
    return MemoryPlan(budget=budget, resident_blocks=k, num_blocks=n, text_encoder_on_cpu=te_on_cpu,
                      vae_tile=tile, tokens=tokens, attention=attention, block_bytes=max(blocks, default=0),
                      other_bytes=other_at(k), streaming_bytes=_streaming(blocks, k) if k < n else 0,
                      activation_bytes=act, reserve_bytes=reserve, text_encoder_bytes=text_encoder_bytes,
                      vae_peak_bytes=vae_peak, vae_encode_tile=encode_tile, stages=stages,
                      context_cache_bytes=context_cache_bytes, context_cache=cache_on)


def free_vram_bytes(device="cuda") -> int | None:
    """Free memory of a CUDA device in bytes (``torch.cuda.mem_get_info``); None without CUDA."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)

