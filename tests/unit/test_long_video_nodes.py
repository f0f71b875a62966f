"""WanCore Context Options / Guidance Options nodes into the sampler node (no ComfyUI)."""
from __future__ import annotations

import pytest
import torch

import nodepack
import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(seed=7, steps=2, cfg=5.0, shift=5.0, sampler="euler", denoise=1.0)


@pytest.fixture(scope="module")
def pack():
    return nodepack.load_pack()


@pytest.fixture(scope="module")
def extension(pack, tmp_path_factory):
    """A tiny T2V DiT and VAE (float32), text embeddings and a 9-frame 32x32 video to extend."""
    import factory

    wc, d = pack.wan_core, tmp_path_factory.mktemp("extend")
    dit = wc.load_dit(factory.write_checkpoint(d, "dit", "official", variant="t2v"), dtype=torch.float32)
    vae = wc.load_vae(factory.write_checkpoint(d, "vae", "official"))
    g = torch.Generator().manual_seed(1)
    text = wc.TextEmbeds(torch.randn(5, dit.cfg.text_dim, generator=g), torch.randn(3, dit.cfg.text_dim, generator=g))
    return dit, vae, text, torch.rand(9, 32, 32, 3, generator=g)


def test_option_nodes_drive_the_sampler_like_wan_core(pack) -> None:
    n, wc = pack.nodes, pack.wan_core
    context = n.WanCoreContextOptions().options(17, 8, "uniform", "overlap-linear", False, True)[0]
    guidance = n.WanCoreGuidanceOptions().options("1", 0.0, 1.0, True, 0, "0:5,1:1", False)[0]
    assert (context.latent_length, context.latent_overlap, context.freenoise) == (5, 2, True)
    assert guidance.slg_blocks == (1,) and guidance.cfg_schedule == ((0, 5.0), (1, 1.0))
    assert n.WanCoreGuidanceOptions.VALIDATE_INPUTS(slg_blocks="x") != True  # noqa: E712 (text = refused)
    assert n.WanCoreGuidanceOptions.VALIDATE_INPUTS(slg_blocks="9,10", cfg_schedule="0:6") is True

    torch.manual_seed(0)
    dit = wc.dit.WanDiT(wc.DiTConfig(**{f: getattr(tiny.TINY_DIT_T2V, f)
                                        for f in tiny.TINY_DIT_T2V.__dataclass_fields__})).eval()
    g = torch.Generator().manual_seed(1)
    text = wc.TextEmbeds(torch.randn(5, tiny.TINY_T5.dim, generator=g), torch.randn(3, tiny.TINY_T5.dim, generator=g))
    size = n.types.VideoSize(32, 32, 33)            # 9 latent frames: two windows of 5
    loaded = n.types.LoadedDiT(dit)
    out = n.WanCoreSampler().sample(loaded, text, size, context=context, guidance=guidance, **SETTINGS)[0]["samples"]
    settings = wc.SamplerSettings(steps=2, cfg=5.0, shift=5.0, sampler="euler", seed=7)
    ref = wc.sample(dit, text, settings, shape=(16, 9, 4, 4), context=context, guidance=guidance)
    assert torch.equal(out, wc.vae.denormalize_latents(ref[None]))
    plain = n.WanCoreSampler().sample(loaded, text, size, **SETTINGS)[0]["samples"]
    assert not torch.equal(plain, out)


def test_extend_video_node_continues_a_video(pack, extension) -> None:
    n, wc = pack.nodes, pack.wan_core
    dit, vae, text, source = extension
    out = n.WanCoreExtendVideo().extend(n.types.LoadedDiT(dit), vae, text, source, 9, 5, 1, 2, 5.0, 5.0, "unipc")[0]
    ref = wc.extend.continue_video(dit, vae, text, source, 9, 5, wc.SamplerSettings(steps=2, seed=1))
    assert out.shape == (13, 32, 32, 3) and torch.equal(out[:4], source[:4])
    assert torch.allclose(out, ref, atol=1e-5)


def test_extend_video_node_encodes_in_the_plans_tiles(pack, extension, monkeypatch) -> None:
    """The overlap (and I2V guide) encode uses the image-encode stage's tile, as generate() does:
    "auto" on the CPU (encode_tiled's RAM rule: one tile here, so the numbers above are unchanged),
    and the memory options' custom tile when given."""
    n, wc = pack.nodes, pack.wan_core
    dit, vae, text, source = extension
    tiles, encode_tiled = [], wc.vae_tiling.encode_tiled

    def spy(vae_, video, *args, tile="auto", **kw):
        tiles.append(tile)
        return encode_tiled(vae_, video, *args, tile=tile, **kw)

    monkeypatch.setattr(wc.vae_tiling, "encode_tiled", spy)
    node = n.WanCoreExtendVideo()
    plain = node.extend(n.types.LoadedDiT(dit), vae, text, source, 9, 5, 1, 2, 5.0, 5.0, "unipc")[0]
    memory = n.types.MemoryOptions(vae_tile="custom", vae_tile_size=128)
    custom = node.extend(n.types.LoadedDiT(dit, memory), vae, text, source, 9, 5, 1, 2, 5.0, 5.0, "unipc")[0]
    assert tiles == ["auto", 16]                     # 128 px -> 16 latent px
    assert torch.equal(plain, custom)                # a 4x4 latent frame is one tile either way
    known, _image, _shape = wc.extend.extension_inputs(dit, vae, source, 9, 5)   # untiled by default
    assert tiles == ["auto", 16]
    assert torch.equal(known, wc.extend.extension_inputs(dit, vae, source, 9, 5, vae_tile=16)[0])
