"""Loader nodes list diffusers model folders (``.../transformer/``) beside the files and load them.

ComfyUI's file lists hold files only; a diffusers download keeps each model in its own folder
(a ``config.json`` and one weights file or a sharded ``*.safetensors.index.json``). The nodes
show such a folder as a relative name ending in ``/`` and hand its full path to the engine,
which opens the folder's weights (``wan_core.files.weights_in_folder``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import factory
import nodepack

pytestmark = pytest.mark.usefixtures("one_thread")

PIPE = "Wan2.1-T2V-1.3B-Diffusers"


def _sharded(folder: Path, sd: dict[str, torch.Tensor]) -> None:
    """``sd`` as a diffusers shard set of two parts with its index and config."""
    folder.mkdir(parents=True)
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(folder / fname))
        weight_map.update({k: fname for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")


@pytest.fixture()
def models(tmp_path, monkeypatch):
    dit_root, vae_root = tmp_path / "diffusion_models", tmp_path / "vae"
    _sharded(dit_root / PIPE / "transformer", factory.make_checkpoint("dit", "diffusers"))
    (dit_root / PIPE / "model_index.json").write_text("{}")           # the pipeline folder: not a model
    factory.write_checkpoint(dit_root, "dit", "official", name="wan_file.safetensors")
    factory.write_checkpoint(dit_root / "loose", "dit", "official", name="only.safetensors")  # no config.json
    for i in range(2):                                                  # two weights files: ambiguous
        factory.write_checkpoint(dit_root / "two", "dit", "official", name=f"w{i}.safetensors")
    (dit_root / "two" / "config.json").write_text("{}")
    factory.write_checkpoint(vae_root / PIPE / "vae", "vae", "diffusers", name="diffusion_pytorch_model.safetensors")
    (vae_root / PIPE / "vae" / "config.json").write_text("{}")
    fake = nodepack.fake_folder_paths({"diffusion_models": dit_root, "vae": vae_root})
    fake.get_folder_paths = lambda key: [str({"diffusion_models": dit_root, "vae": vae_root}[key])]
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    return dit_root, vae_root


def test_loader_lists_diffusers_model_folders_after_the_files(models) -> None:
    pack = nodepack.load_pack()
    listed = pack.nodes.loaders.WanCoreLoadDiT.INPUT_TYPES()["required"]["model_name"][0]
    assert f"{PIPE}/transformer/" in listed
    assert listed[-1] == f"{PIPE}/transformer/"                 # folders after the files
    assert "wan_file.safetensors" in listed and "loose/only.safetensors" in listed   # files stay listed
    assert not any(n.endswith("/") and n != f"{PIPE}/transformer/" for n in listed)  # loose/, two/, the pipeline
    vae_listed = pack.nodes.loaders.WanCoreLoadVAE.INPUT_TYPES()["required"]["vae_name"][0]
    assert f"{PIPE}/vae/" in vae_listed


def test_loader_loads_a_listed_folder_like_its_index_file(models) -> None:
    pack = nodepack.load_pack()
    dit_root, _ = models
    (loaded,) = pack.nodes.loaders.WanCoreLoadDiT().load(f"{PIPE}/transformer/", "fp32", "sdpa")
    direct = pack.wan_core.load_dit(dit_root / PIPE / "transformer" / "diffusion_pytorch_model.safetensors.index.json",
                                    dtype=torch.float32)
    got, want = loaded.model.state_dict(), direct.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    shards = sorted((dit_root / PIPE / "transformer").glob("*.safetensors"))
    # what a GPU offload device makes room for before loading: every shard
    assert pack.nodes.host._weights_bytes(str(shards[0].parent)) == sum(p.stat().st_size for p in shards)
    (vae,) = pack.nodes.loaders.WanCoreLoadVAE().load(f"{PIPE}/vae/", "fp32")
    assert isinstance(vae, pack.wan_core.vae.WanVAE)


@pytest.mark.parametrize("name", ["../vae/", "/etc/", "\\etc/", f"{PIPE}/../../vae/", "missing/", "C:/x/"])
def test_folder_names_outside_the_model_folder_are_not_found(models, name) -> None:
    pack = nodepack.load_pack()
    with pytest.raises(FileNotFoundError, match="models/diffusion_models"):
        pack.nodes.host.full_path("diffusion_models", name)
