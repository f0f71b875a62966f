"""The offload planner: a VRAM budget, model sizes and a token count -> one frozen plan.

:func:`plan_memory` is a pure function (no torch device calls, no loading): give it the
budget in bytes (free VRAM from :func:`free_vram_bytes`, or a user's figure), the DiT's
sizes (:func:`dit_sizes`, from a config and a storage dtype, built on the meta device), the
token count (:func:`tokens_for`), the attention backend and the text encoder / VAE sizes,
and it returns a :class:`MemoryPlan`: how many DiT blocks stay resident (the rest are
streamed by :class:`wan_core.offload.BlockSwap`), whether the text encoder runs on the CPU,
and the VAE tile size. ``plan.describe()`` is the one log line.

Stages are assumed exclusive on the device (text encoder, then the DiT, then the VAE; each
releases its device copies when done), so each is planned against the whole budget.

DiT activation estimate (bytes, batch 1: the CFG passes run one after the other), with L
tokens, d = dim, f = ffn_dim, h = heads, c = bytes of the compute dtype (2 for bf16/fp16):

    act(L) = L * (12 d + max(12 d + 4 c d, c d + 2 c f) + 4 h) + attn(L) + upcast + context

- ``12 d``: three float32 ``[L, d]`` tensors live through a block: the block input (held by
  the executor), the updated residual stream and the modulated norm output;
- ``12 d + 4 c d``: the attention phase: q, k, v and the attention output in the compute
  dtype, plus three float32 ``[L, d]`` temporaries of the q/k RMSNorm and RoPE;
- ``c d + 2 c f``: the FFN phase: its input in the compute dtype and the hidden
  ``[L, f]`` before and after GELU;
- ``4 h``: the float32 log-sum-exp rows of memory-efficient SDPA / flash / sage;
  ``attn(L)`` is 0 for those and ``h L^2 (c + 4)`` for "math" (full score matrix + float32
  softmax), which is why the planner only assumes memory-efficient kernels for "sdpa";
- ``upcast``: fp8 (or other non-compute-dtype) weights are upcast per layer: a float32 and a
  compute-dtype copy of the largest Linear, ``n (4 + c)``;
- ``context``: text (512 tokens) and image (257/514) keys and values of the cross attention,
  ``4 c d`` per context token.

For the 14B models at 480p x 81 (L = 32760, d 5120, f 13824, bf16) this is 5.4 GiB; for
1.3B (d 1536, f 8960) 1.8 GiB. It errs high: counted tensors are not all alive at once.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GiB", "DiTSizes", "MemoryPlan", "PlanError", "dit_sizes", "dit_sizes_from_module", "tokens_for",
           "dit_activation_bytes", "vae_decode_bytes", "plan_memory", "free_vram_bytes", "module_param_bytes",
           "DEFAULT_RESERVE", "VAE_TILES"]

GiB = 1 << 30
MiB = 1 << 20
# Kept free for the allocator's fragmentation, cuBLAS workspaces and kernels' scratch.
DEFAULT_RESERVE = 512 * MiB
# VAE decode working set: wan_core.vae_tiling's measured per-latent-pixel figure (vae_decode_bytes).
VAE_TILES: tuple[int, ...] = (128, 96, 64, 48, 32, 24, 16)   # candidate tile sides, latent px
TEXT_ENCODER_WORKSPACE = 256 * MiB  # umT5 activations for 512 tokens, with margin
_STORAGE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
                  "fp8": 1, "fp8_e4m3fn": 1, "fp8_e5m2": 1}
_LINEAR_ATTN = ("sdpa", "auto", "flash", "sage")


class PlanError(ValueError):
    """The budget cannot run the job at all; the message names the minimum."""


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
    with torch.device("meta"):
        model = WanDiT(cfg)
    linear_w = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, CastLinear)}
    per_block = [0] * cfg.num_layers
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
    return DiTSizes(name=f"{cfg.variant} {storage}", block_bytes=tuple(per_block), other_bytes=other, dim=cfg.dim,
                    ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads, largest_linear=largest,
                    upcast=is_fp8 or nbytes != _storage_bytes(compute))


def dit_sizes_from_module(dit, compute_bytes: int = 2) -> DiTSizes:
    """Sizes of a loaded WanDiT, from its actual parameters."""
    from .offload import module_bytes

    blocks = tuple(module_bytes(b) for b in dit.blocks)
    largest = max((m.weight.numel() for b in dit.blocks for m in b.modules() if hasattr(m, "weight")
                   and m.weight is not None and m.weight.dim() == 2), default=0)
    w = dit.blocks[0].self_attn.q.weight
    return DiTSizes(name=dit.cfg.variant, block_bytes=blocks, other_bytes=module_bytes(dit) - sum(blocks),
                    dim=dit.cfg.dim, ffn_dim=dit.cfg.ffn_dim, num_heads=dit.cfg.num_heads, largest_linear=largest,
                    upcast=w.element_size() != compute_bytes)


def module_param_bytes(module_cls, cfg, bytes_per_param: float) -> int:
    """Parameter bytes of ``module_cls(cfg)`` at ``bytes_per_param`` (meta build, no memory)."""
    import torch

    with torch.device("meta"):
        m = module_cls(cfg)
    return int(sum(p.numel() for p in m.parameters()) * bytes_per_param)


def tokens_for(width: int, height: int, frames: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """DiT token count of a video: latent ``((frames-1)/4+1, H/8, W/8)`` over the patch.
    832x480x81 -> 21 * 30 * 52 = 32760."""
    t = (frames - 1) // 4 + 1
    return (t // patch[0]) * (height // 8 // patch[1]) * (width // 8 // patch[2])


def dit_activation_bytes(dit: DiTSizes, tokens: int, attention: str = "sdpa", compute_bytes: int = 2,
                         context_tokens: int = 512 + 257) -> int:
    """The module docstring's activation estimate, in bytes."""
    d, f, h, c, n = dit.dim, dit.ffn_dim, dit.num_heads, compute_bytes, tokens
    per_token = 12 * d + max(12 * d + 4 * c * d, c * d + 2 * c * f) + 4 * h
    attn = 0 if attention in _LINEAR_ATTN else h * n * n * (c + 4)
    upcast = dit.largest_linear * (4 + c) if dit.upcast else 0
    return n * per_token + attn + upcast + context_tokens * 4 * c * d


def vae_decode_bytes(vae_bytes: int, tile_hw: tuple[int, int]) -> int:
    """Weights + decode working set for a ``(h, w)`` latent area decoded at once (the Wan
    2.1 VAE in float32, its default; the per-pixel figure measured in :mod:`wan_core.vae_tiling`)."""
    import torch

    from .configs import VAEConfig
    from .vae_tiling import decode_activation_bytes

    return vae_bytes + decode_activation_bytes(VAEConfig(), tile_hw, torch.float32)


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
    vae_peak_bytes: int

    @property
    def device_weight_bytes(self) -> int:
        """DiT weight bytes resident on the device during sampling (non-block + K blocks;
        blocks assumed equal, the largest counted)."""
        return self.other_bytes + self.resident_blocks * self.block_bytes

    @property
    def dit_peak_bytes(self) -> int:
        return self.device_weight_bytes + self.streaming_bytes + self.activation_bytes + self.reserve_bytes

    def describe(self) -> str:
        g = GiB
        swap = ("all blocks resident" if self.resident_blocks == self.num_blocks else
                f"{self.resident_blocks}/{self.num_blocks} blocks resident, rest streamed")
        te = "CPU" if self.text_encoder_on_cpu else "device"
        tile = "untiled" if self.vae_tile is None else f"tiles of {self.vae_tile} latent px"
        return (f"wan_core memory plan: budget {self.budget / g:.2f} GiB; DiT {swap} "
                f"({self.block_bytes / g:.2f} GiB/block; weights on device {self.device_weight_bytes / g:.2f} GiB "
                f"+ streaming {self.streaming_bytes / g:.2f} GiB; activations {self.activation_bytes / g:.2f} GiB "
                f"for {self.tokens} tokens, {self.attention}; peak {self.dit_peak_bytes / g:.2f} GiB); "
                f"text encoder on {te} ({self.text_encoder_bytes / g:.2f} GiB); VAE {tile} "
                f"(peak {self.vae_peak_bytes / g:.2f} GiB)")


def _streaming(blocks: tuple[int, ...], k: int) -> int:
    rest = sorted(blocks[k:], reverse=True)
    return sum(rest[:2])


def plan_memory(budget: int, dit: DiTSizes, tokens: int, *, attention: str = "sdpa", compute_bytes: int = 2,
                text_encoder_bytes: int = 0, vae_bytes: int = 0, latent_hw: tuple[int, int] | None = None,
                reserve: int = DEFAULT_RESERVE, vae_overlap: int = 8) -> MemoryPlan:
    """Choose K resident blocks, text-encoder placement and VAE tile for ``budget`` bytes.

    K is the largest count whose weights fit beside the non-block weights, two streamed
    blocks (none when K = N), the activation estimate and ``reserve``. The text encoder runs
    on the CPU when its weights + workspace do not fit the budget. The VAE decodes untiled
    when the whole latent frame ``latent_hw`` fits, else with the largest tile of
    ``VAE_TILES`` (+ ``vae_overlap`` on each side) that fits.

    Raises :class:`PlanError` naming the minimum budget when even K = 0 (or the smallest
    VAE tile) does not fit.
    """
    if budget <= 0:
        raise PlanError(f"memory budget must be positive, got {budget} bytes")
    act = dit_activation_bytes(dit, tokens, attention, compute_bytes)
    blocks = dit.block_bytes
    n = len(blocks)

    def need(k: int) -> int:
        return dit.other_bytes + sum(blocks[:k]) + (_streaming(blocks, k) if k < n else 0) + act + reserve

    min_dit = need(0) if n else dit.other_bytes + act + reserve
    min_vae = vae_decode_bytes(vae_bytes, (min(VAE_TILES) + 2 * vae_overlap,) * 2) + reserve if vae_bytes else 0
    minimum = max(min_dit, min_vae)
    if budget < minimum:
        g = GiB
        raise PlanError(
            f"a budget of {budget / g:.2f} GiB cannot run {dit.name} at {tokens} tokens: the minimum is "
            f"{minimum / g:.2f} GiB (non-block weights {dit.other_bytes / g:.2f} + two streamed blocks "
            f"{_streaming(blocks, 0) / g:.2f} + activations {act / g:.2f} ({attention}) + reserve {reserve / g:.2f}"
            f"{f'; VAE with the smallest tile {min_vae / g:.2f}' if min_vae > min_dit else ''}). "
            "Lower the resolution or frame count, store the weights in fp8, or free GPU memory.")
    k = n if need(n) <= budget else max(i for i in range(n + 1) if need(i) <= budget)
    te_on_cpu = text_encoder_bytes + TEXT_ENCODER_WORKSPACE + reserve > budget if text_encoder_bytes else False
    tile: int | None = None
    vae_peak = 0
    if vae_bytes and latent_hw is not None:
        vae_peak = vae_decode_bytes(vae_bytes, latent_hw)
        if vae_peak + reserve > budget:
            h, w = latent_hw
            for t in VAE_TILES:
                area = (min(h, t + 2 * vae_overlap), min(w, t + 2 * vae_overlap))
                if t < max(h, w) and vae_decode_bytes(vae_bytes, area) + reserve <= budget:
                    tile, vae_peak = t, vae_decode_bytes(vae_bytes, area)
                    break
            else:
                tile = min(VAE_TILES)
                vae_peak = vae_decode_bytes(vae_bytes, (min(h, tile + 2 * vae_overlap), min(w, tile + 2 * vae_overlap)))
    return MemoryPlan(budget=budget, resident_blocks=k, num_blocks=n, text_encoder_on_cpu=te_on_cpu,
                      vae_tile=tile, tokens=tokens, attention=attention, block_bytes=max(blocks, default=0),
                      other_bytes=dit.other_bytes, streaming_bytes=_streaming(blocks, k) if k < n else 0,
                      activation_bytes=act, reserve_bytes=reserve, text_encoder_bytes=text_encoder_bytes,
                      vae_peak_bytes=vae_peak)


def free_vram_bytes(device="cuda") -> int | None:
    """Free memory of a CUDA device in bytes (``torch.cuda.mem_get_info``); None without CUDA."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)

