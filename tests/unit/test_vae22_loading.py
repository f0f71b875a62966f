"""The Wan 2.2 VAE is detected from its tensors in every published layout and
``load_vae`` returns a :class:`WanVAE22`; tiling works on it with its own strides."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import wan22_factory as f22
from wan_core.checkpoint import inspect_checkpoint
from wan_core.loaders import load_vae
from wan_core.vae22 import WanVAE22
from wan_core.vae_tiling import decode_tiled, encode_tiled

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = f22.TINY_VAE22


@pytest.fixture(scope="module")
def official():
    return f22.vae22_official(CFG, 3)


def _write(tmp_path, name, sd):
    path = tmp_path / name
    if name.endswith(".pth"):
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("layout, name, convert", [
    ("official", "Wan2.2_VAE.pth", lambda sd: sd),
    ("official", "wan2.2_vae.safetensors", lambda sd: {k: v.half() for k, v in sd.items()}),   # ComfyUI, fp16
    ("official", "vae_prefixed.safetensors", lambda sd: {"vae." + k: v for k, v in sd.items()}),
    ("diffusers", "diffusion_pytorch_model.safetensors", lambda sd: f22.vae22_to_diffusers(sd, CFG)),
])
def test_every_layout_loads_as_the_wan22_vae(tmp_path, official, layout, name, convert):
    path = _write(tmp_path, name, convert(official))
    det = inspect_checkpoint(path)
    assert det.kind == "vae" and det.layout == layout and det.config == CFG
    vae = load_vae(path)
    assert isinstance(vae, WanVAE22) and vae.dtype == torch.float32
    sd = vae.state_dict()
    tol = 1e-3 if "safetensors" in name and layout == "official" and name.startswith("wan2.2") else 0
    assert set(sd) == set(official)
    assert all((sd[k] - official[k]).abs().max() <= tol * official[k].abs().max() for k in official)


def test_full_size_config_is_inferred_as_the_published_vae(tmp_path):
    """Shapes only (a meta model's keys with 1-element stand-ins would not do): infer from the
    real widths of a full-size state dict built on meta, written as zero-size-free tensors."""
    from wan_core.vae22 import VAE22Config
    cfg = VAE22Config(dim=16, dec_dim=24, z_dim=48)
    sd = f22.vae22_official(cfg, 0)
    det = inspect_checkpoint(_write(tmp_path, "v.safetensors", sd))
    assert det.config == cfg and "custom-VAE22" in det.config.variant
    assert VAE22Config().variant == "Wan2.2-VAE"


def test_a_truncated_file_is_refused(tmp_path, official):
    from wan_core.files import CheckpointError
    broken = {k: v for k, v in official.items() if not k.startswith("decoder.upsamples.1.")}
    with pytest.raises(CheckpointError):
        load_vae(_write(tmp_path, "cut.safetensors", broken))


@pytest.fixture(scope="module")
def vae(official):
    with torch.device("meta"):
        model = WanVAE22(CFG)
    model.load_state_dict(official, strict=True, assign=True)
    return model.eval()


def test_one_tile_plan_is_the_untiled_decode_and_tiles_use_stride_16(vae):
    z = torch.randn(1, 48, 2, 4, 6, generator=torch.Generator().manual_seed(1))
    whole = vae.decode(z)
    assert torch.equal(decode_tiled(vae, z, tile=None), whole)
    tiled = decode_tiled(vae, z, tile=(4, 4), overlap=2)
    assert tiled.shape == whole.shape == (1, 3, 5, 64, 96)
    assert (tiled - whole).abs().mean() < 0.2


def test_tiled_encode_uses_stride_16_and_the_48_value_normalisation(vae):
    video = torch.rand(1, 3, 5, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    whole = vae.encode(video)
    assert torch.equal(encode_tiled(vae, video, tile=None), whole)
    tiled = encode_tiled(vae, video, tile=(4, 4), overlap=2)
    assert tiled.shape == whole.shape == (1, 48, 2, 4, 6)
    assert (tiled - whole).abs().mean() < 0.5 * whole.abs().mean()
    with pytest.raises(ValueError, match="multiples of 16"):
        encode_tiled(vae, video[..., :56], tile=None)


def test_decode_memory_estimate_scales_with_the_decoder_width():
    from wan_core.configs import VAEConfig
    from wan_core.vae22 import VAE22Config
    from wan_core.vae_tiling import decode_activation_bytes, encode_activation_bytes
    tile = (32, 32)
    d21, d22 = decode_activation_bytes(VAEConfig(), tile), decode_activation_bytes(VAE22Config(), tile)
    e21, e22 = encode_activation_bytes(VAEConfig(), tile), encode_activation_bytes(VAE22Config(), tile)
    # decoder 256 vs 96 channels, encoder 160 vs 96, at the same 8x8 positions per latent pixel
    assert d22 / d21 > 2.5 and e22 / e21 > 1.6
