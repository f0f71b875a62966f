"""Frozen configuration dataclasses for the four Wan 2.1 networks.

Every config is inferred from tensor shapes by ``wan_core.layouts``; nothing here is read
from a file name. ``KNOWN_*`` tables name the published variants so a load can print
"T2V-1.3B" instead of a list of numbers, and so tests can check inference against them.
"""
from __future__ import annotations

from dataclasses import dataclass

DIT_HEAD_DIM = 128  # every published Wan 2.1 DiT; no tensor stores the head count
# The Wan 2.1 VAE's latent space, shared by the VAE, the DiT, conditioning, tiling, planner
# and nodes: 16 channels; stride 4 in time (4n+1 pixel frames <-> n+1 latent frames, the
# first frame alone) and 8 in height and width.
LATENT_CHANNELS = 16
VAE_TIME_STRIDE = 4
VAE_SPACE_STRIDE = 8
VAE_STRIDE: tuple[int, int, int] = (VAE_TIME_STRIDE, VAE_SPACE_STRIDE, VAE_SPACE_STRIDE)


@dataclass(frozen=True)
class DiTConfig:
    """Wan 2.1 diffusion transformer. ``model_type`` is "t2v", "i2v" or "flf2v"."""

    dim: int
    ffn_dim: int
    num_layers: int
    in_dim: int = LATENT_CHANNELS
    out_dim: int = LATENT_CHANNELS
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    model_type: str = "t2v"
    clip_dim: int = 1280          # width of the CLIP tokens fed to img_emb (i2v / flf2v)
    image_pos_len: int = 0        # flf2v: rows of img_emb.emb_pos (2 x 257 = 514)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    head_dim: int = DIT_HEAD_DIM
    # VACE (wan_core.vace): the base layers hint i is added after, one per vace block (() = no
    # VACE branch), and the input width of vace_patch_embedding (16 + 16 latents + 64 mask)
    vace_layers: tuple[int, ...] = ()
    vace_in_dim: int = 96
    # VideoX-Fun (wan_core.fun): "control" = Wan2.1-Fun Control (i2v-shaped, in_dim 48 = noise 16 +
    # control latents 16 + start-image latents 16); "" for every other model (Fun InP has exactly
    # the official I2V tensors and conditioning). ref_in_dim: input width of ``ref_conv`` (Fun
    # V1.1 Control: 16, the reference image's latent prepended as one frame of tokens); 0 = none.
    fun: str = ""
    ref_in_dim: int = 0

    @property
    def num_heads(self) -> int:
        return self.dim // self.head_dim

    @property
    def has_image_input(self) -> bool:
        """Has the CLIP image branch (``img_emb``, image cross-attention): i2v / flf2v."""
        return self.model_type in ("i2v", "flf2v")

    @property
    def needs_image(self) -> bool:
        """Takes a start image: the CLIP models and Wan 2.2 I2V-A14B ("i2v_noclip": mask + image
        latents only, no CLIP tokens). Fun Control has the CLIP branch but its start image is
        optional (zero latents and zero CLIP features without one)."""
        return (self.has_image_input or self.model_type == "i2v_noclip") and not self.fun

    @property
    def variant(self) -> str:
        """Published name when the shapes match one, else a descriptive string."""
        for name, known in KNOWN_DIT.items():
            if _same_arch(known, self):
                if self.ref_in_dim:    # the V1.1 Control release added ref_conv
                    return name.replace("Fun-", "Fun-V1.1-", 1)
                return name if not self.vace_layers else "VACE-" + name.split("-", 1)[1]
        vace = f", vace={len(self.vace_layers)}" if self.vace_layers else ""
        kind = f"fun-{self.fun}{'-ref' if self.ref_in_dim else ''}" if self.fun else self.model_type
        return f"custom-{kind}(dim={self.dim}, layers={self.num_layers}, in={self.in_dim}{vace})"


@dataclass(frozen=True)
class VAEConfig:
    """Wan 2.1 causal 3D VAE (stride ``VAE_STRIDE``: 4 in time, 8 in space)."""

    dim: int = 96
    z_dim: int = LATENT_CHANNELS
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def variant(self) -> str:
        return "Wan2.1-VAE" if self == VAEConfig() else f"custom-VAE(dim={self.dim}, z={self.z_dim})"


@dataclass(frozen=True)
class T5Config:
    """umT5 encoder (official ``T5Encoder`` argument names)."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    shared_pos: bool = False      # umT5: a relative-position table in every layer
    eps: float = 1e-6
    text_len: int = 512

    @property
    def variant(self) -> str:
        return "umT5-XXL" if self == T5Config() else f"custom-umT5(dim={self.dim}, layers={self.num_layers})"


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Visual tower of open-clip xlm-roberta-large ViT-H/14."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    mlp_dim: int = 5120
    num_layers: int = 32
    head_dim: int = 80
    out_dim: int = 1024           # width of the projection ``head`` (unused by Wan)
    eps: float = 1e-5
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def num_heads(self) -> int:
        return self.width // self.head_dim

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def variant(self) -> str:
        return "ViT-H/14" if self == CLIPVisionConfig() else f"custom-ViT(width={self.width}, layers={self.num_layers})"


def _same_arch(a: DiTConfig, b: DiTConfig) -> bool:
    keys = ("dim", "ffn_dim", "num_layers", "in_dim", "out_dim", "text_dim", "model_type", "fun")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


KNOWN_DIT: dict[str, DiTConfig] = {
    "T2V-1.3B": DiTConfig(dim=1536, ffn_dim=8960, num_layers=30),
    "T2V-14B": DiTConfig(dim=5120, ffn_dim=13824, num_layers=40),
    "I2V-14B": DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, in_dim=36, model_type="i2v"),
    "FLF2V-14B": DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, in_dim=36, model_type="flf2v",
                           image_pos_len=514),
    # VideoX-Fun (alibaba-pai Wan2.1-Fun[-V1.1]-*): InP 14B has exactly the I2V-14B tensors (named so)
    "Fun-InP-1.3B": DiTConfig(dim=1536, ffn_dim=8960, num_layers=30, in_dim=36, model_type="i2v"),
    "Fun-Control-1.3B": DiTConfig(dim=1536, ffn_dim=8960, num_layers=30, in_dim=48, model_type="i2v", fun="control"),
    "Fun-Control-14B": DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, in_dim=48, model_type="i2v", fun="control"),
    # Wan 2.2 A14B experts (each of the two has this shape); T2V-A14B experts are T2V-14B-shaped
    "I2V-A14B": DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, in_dim=36, model_type="i2v_noclip"),
    # Wan 2.2 TI2V-5B: the 48-channel latents of the Wan 2.2 VAE, per-token timesteps
    "TI2V-5B": DiTConfig(dim=3072, ffn_dim=14336, num_layers=30, in_dim=48, out_dim=48, model_type="ti2v"),
}

# Latent normalisation of the Wan 2.1 VAE (per channel), published with the model.
VAE_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
VAE_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

__all__ = ["DiTConfig", "VAEConfig", "T5Config", "CLIPVisionConfig", "KNOWN_DIT",
           "VAE_LATENT_MEAN", "VAE_LATENT_STD", "DIT_HEAD_DIM", "LATENT_CHANNELS", "VAE_TIME_STRIDE",
           "VAE_SPACE_STRIDE", "VAE_STRIDE"]
