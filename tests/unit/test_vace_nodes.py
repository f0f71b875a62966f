"""WanCore VACE Encode and WanCore Sampler on a tiny VACE model (no ComfyUI): the nodes give
the numbers of wan_core.encode_vace / sample(vace=...)."""
from __future__ import annotations

import pytest
import torch

import factory
import nodepack
from vace_factory import write_vace

W, H, FRAMES = 32, 16, 5
SETTINGS = dict(seed=7, steps=2, cfg=5.0, shift=5.0, sampler="unipc", denoise=1.0)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pack():
    return nodepack.load_pack()


@pytest.fixture(scope="module")
def models(pack, tmp_path_factory):
    d = tmp_path_factory.mktemp("vace_nodes")
    wc = pack.wan_core
    return {"dit": wc.load_dit(write_vace(d), dtype=torch.float32),
            "vae": wc.load_vae(factory.write_checkpoint(d, "vae", "official")),
            "te": wc.load_text_encoder(factory.write_checkpoint(d, "t5", "hf_with_spiece"), dtype=torch.float32)}


def test_vace_encode_node_and_sampler_give_the_engine_numbers(pack, models):
    g = torch.Generator().manual_seed(0)
    video = torch.rand(FRAMES, H, W, 3, generator=g)
    mask = (torch.rand(FRAMES, H, W, generator=g) > 0.5).float()
    refs = torch.rand(1, 24, 24, 3, generator=g)
    embeds = pack.nodes.WanCoreVACEEncode().encode(models["vae"], W, H, FRAMES, 0.9, 0.0, 1.0, control_video=video,
                                                   control_mask=mask, reference_images=refs)[0]
    wc = pack.wan_core
    direct = wc.encode_vace(models["vae"], W, H, FRAMES, control_video=video, control_mask=mask,
                            reference_images=list(refs), strength=0.9)
    assert torch.equal(embeds.latents, direct.latents) and embeds.strength == 0.9 and embeds.reference_frames == 1

    text = wc.TextEmbeds(*models["te"].encode(["a dancer", ""]))
    loaded = pack.nodes.types.LoadedDiT(models["dit"])
    latent = pack.nodes.WanCoreSampler().sample(loaded, text, embeds, **SETTINGS)[0]["samples"]
    settings = wc.SamplerSettings(steps=2, cfg=5.0, shift=5.0, seed=7)
    expected = wc.sample(models["dit"], text, settings, vace=embeds)
    from importlib import import_module

    vae_mod = import_module(pack.wan_core.__name__ + ".vae")
    assert latent.shape == (1, 16, 2, H // 8, W // 8)
    assert torch.equal(latent, vae_mod.denormalize_latents(expected[None]))


def test_vace_encode_node_refuses_an_empty_step_range(pack):
    assert "start_percent" in pack.nodes.WanCoreVACEEncode.VALIDATE_INPUTS(832, 480, 81, 0.5, 0.5)
    assert pack.nodes.WanCoreVACEEncode.VALIDATE_INPUTS(832, 480, 81, 0.0, 1.0) is True
