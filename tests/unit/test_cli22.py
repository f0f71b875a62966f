"""``python -m wan_core generate`` with Wan 2.2: T2V-A14B from two expert files, I2V-A14B from
an official model folder (high_noise_model/ + low_noise_model/), TI2V-5B text and image to
video; the frames written equal the API's with the published defaults of each model, and
every misuse is one ``error:`` line (exit 2) before any model loads (in process)."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import factory
import wan22_factory as f22
from wan_core import cli, cli22
from wan_core.generate22 import generate_a14b, generate_ti2v
from wan_core.loaders import load_dit, load_text_encoder, load_vae
from wan_core.loaders22 import load_expert_pair
from wan_core.moe import MoEOptions
from wan_core.selftest import SELFTEST_CONFIGS, write_selftest_models

pytestmark = pytest.mark.usefixtures("one_thread")
T2V = SELFTEST_CONFIGS["t2v"]
I2V = dataclasses.replace(T2V, in_dim=36, model_type="i2v_noclip")
TI2V = dataclasses.replace(T2V, in_dim=48, out_dim=48, model_type="ti2v")


def _save(path, cfg, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in factory.dit_official(cfg, seed).items()},
              str(path))
    return path


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22_cli")
    base = write_selftest_models(root / "base")
    folder = root / "Wan2.2-I2V-A14B"
    image = root / "start.png"
    Image.fromarray((torch.rand(40, 72, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(image)
    save_file(f22.vae22_official(f22.TINY_VAE22, 3), str(root / "wan2.2_vae.safetensors"))
    return dict(te=str(base.text_encoder), vae=str(base.vae), vae22=str(root / "wan2.2_vae.safetensors"),
                t2v_high=str(_save(root / "wan2.2_t2v_high_noise.safetensors", T2V, 11)),
                t2v_low=str(_save(root / "wan2.2_t2v_low_noise.safetensors", T2V, 12)),
                i2v_folder=str(folder), i2v_high=str(_save(folder / "high_noise_model" / "m.safetensors", I2V, 13)),
                i2v_low=str(_save(folder / "low_noise_model" / "m.safetensors", I2V, 14)),
                ti2v=str(_save(root / "wan2.2_ti2v_5B.safetensors", TI2V, 15)), dit21_i2v=str(base.dit_i2v),
                image=str(image), root=root)


def _image(m):
    """The start image as the CLI decodes it: [H, W, 3] in 0..1."""
    return torch.from_numpy(np.array(Image.open(m["image"]))).float() / 255


@pytest.fixture()
def written(monkeypatch):
    """The frames and fps the CLI writes, instead of encoding an mp4."""
    out = {}

    def write_mp4(frames, path, fps=16):
        out.update(frames=frames, fps=fps)
        return path

    monkeypatch.setattr("wan_core.video.write_mp4", write_mp4)
    return out


def _args(m, tmp_path, *extra):
    return ["generate", "--vae", m["vae"], "--text-encoder", m["te"], "--prompt", "a cat", "--device", "cpu",
            "--out", str(tmp_path / "v.mp4"), "--steps", "3", "--seed", "5", *extra]


def test_t2v_a14b_from_two_expert_files_equals_generate_a14b_with_the_published_defaults(m, tmp_path, written):
    rc = cli.main(_args(m, tmp_path, "--dit", m["t2v_high"], "--dit-low-noise", m["t2v_low"], "--size", "64x32",
                        "--frames", "5"))
    assert rc == 0 and written["fps"] == 16
    pair = load_expert_pair(m["t2v_high"], m["t2v_low"])
    ref = generate_a14b(experts=pair, vae=load_vae(m["vae"]), text_encoder=load_text_encoder(m["te"]),
                        prompt="a cat", width=64, height=32, frames=5, steps=3, seed=5)
    assert torch.equal(written["frames"], ref)   # shift 12, boundary 0.875, cfg 4 / 3: the defaults of both


def test_i2v_a14b_from_an_official_folder_with_its_own_boundary_and_guidance(m, tmp_path, written):
    rc = cli.main(_args(m, tmp_path, "--dit", m["i2v_folder"], "--image", m["image"], "--size", "64x32",
                        "--frames", "5", "--boundary", "0.5", "--cfg-high-noise", "2", "--cfg-low-noise", "1"))
    assert rc == 0
    pair = load_expert_pair(m["i2v_folder"])
    image = _image(m)
    ref = generate_a14b(experts=pair, vae=load_vae(m["vae"]), text_encoder=load_text_encoder(m["te"]),
                        prompt="a cat", image=image, width=64, height=32, frames=5, steps=3, seed=5,
                        moe=MoEOptions(0.5, cfg_low=1.0, cfg_high=2.0))
    assert torch.equal(written["frames"], ref)


@pytest.mark.parametrize("with_image", [False, True], ids=["t2v", "i2v"])
def test_ti2v_5b_runs_at_24_fps_and_equals_generate_ti2v(m, tmp_path, written, with_image):
    extra = ["--image", m["image"], "--max-area", str(64 * 32)] if with_image else ["--size", "64x32"]
    rc = cli.main(_args(m, tmp_path, "--dit", m["ti2v"], "--frames", "5", *extra) + ["--vae", m["vae22"]])
    assert rc == 0 and written["fps"] == 24
    image = None
    if with_image:
        image = _image(m)
    ref = generate_ti2v(dit=load_dit(m["ti2v"]), vae=load_vae(m["vae22"]), text_encoder=load_text_encoder(m["te"]),
                        prompt="a cat", image=image, max_area=64 * 32, frames=5, steps=3, seed=5,
                        **({} if with_image else {"width": 64, "height": 32}))
    assert torch.equal(written["frames"], ref)


@pytest.mark.parametrize(("extra", "message"), [
    (["--dit", "{t2v_high}", "--dit-low-noise", "{t2v_low}", "--cfg", "3"], "--cfg-high-noise and --cfg-low-noise"),
    (["--dit", "{t2v_high}", "--dit-low-noise", "{t2v_low}", "--image", "{image}"], "T2V-A14B takes no --image"),
    (["--dit", "{i2v_folder}"], "I2V-A14B needs the start image"),
    (["--dit", "{i2v_high}", "--image", "{image}"], "give the other one with --dit-low-noise"),
    (["--dit", "{t2v_high}", "--dit-low-noise", "{i2v_low}"], "not the two experts of one"),
    (["--dit", "{dit21_i2v}", "--dit-low-noise", "{i2v_low}", "--image", "{image}"], "not the two experts"),
    (["--dit", "{t2v_high}", "--dit-low-noise", "{t2v_low}", "--vae", "{vae22}"], "needs the Wan 2.1 VAE"),
    (["--dit", "{ti2v}"], "needs the Wan 2.2 VAE"),
    (["--dit", "{ti2v}", "--vae", "{vae22}", "--size", "48x32"], "multiples of 32"),
    (["--dit", "{ti2v}", "--vae", "{vae22}", "--boundary", "0.9"], "for a Wan 2.2 A14B pair"),
    (["--dit", "{t2v_high}", "--boundary", "0.9"], "for a Wan 2.2 A14B pair"),
    (["--dit", "{t2v_high}", "--dit-low-noise", "{t2v_low}", "--boundary", "1.5"], "--boundary 1.5"),
    (["--dit", "{t2v_high}", "--dit-low-noise", "{t2v_low}", "--cfg-low-noise", "-2"], "--cfg-low-noise"),
    (["--dit", "{ti2v}", "--vae", "{vae22}", "--clip-vision", "{te}"], "use no CLIP vision"),
    (["--dit", "{ti2v}", "--vae", "{vae22}", "--denoise", "0.5"], "--denoise"),
], ids=["cfg_for_a_pair", "image_for_t2v", "no_image_for_i2v", "one_i2v_expert", "t2v_and_i2v_experts",
        "wan21_and_expert", "wan22_vae_for_a14b", "wan21_vae_for_ti2v", "ti2v_size", "boundary_for_ti2v",
        "boundary_for_one_model", "boundary_range", "cfg_low_range", "clip_vision", "denoise"])
def test_misuse_is_one_error_line_before_any_model_loads(m, tmp_path, capsys, monkeypatch, extra, message):
    def no_load(*_a, **_k):
        raise AssertionError("a model was loaded before the arguments were checked")

    for name in ("load_dit", "load_vae", "load_text_encoder"):
        monkeypatch.setattr(f"wan_core.loaders.{name}", no_load)
    monkeypatch.setattr("wan_core.loaders22.load_expert_pair", no_load)
    args = _args(m, tmp_path, *[a.format(**m) for a in extra])
    if "--vae" in extra:   # the later --vae wins in argparse
        args += ["--vae", m[extra[extra.index("--vae") + 1].strip("{}")]]
    start = time.perf_counter()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert time.perf_counter() - start < 1.0


def test_wan22_kind_reads_the_header_and_the_folder(m):
    parse = cli.build_parser().parse_args
    base = ["generate", "--vae", "v", "--text-encoder", "t", "--prompt", "p"]
    assert cli22.wan22_kind(parse(base + ["--dit", m["ti2v"]])) == "ti2v"
    assert cli22.wan22_kind(parse(base + ["--dit", m["i2v_folder"]])) == "a14b"
    assert cli22.wan22_kind(parse(base + ["--dit", m["t2v_high"], "--dit-low-noise", m["t2v_low"]])) == "a14b"
    assert cli22.wan22_kind(parse(base + ["--dit", m["t2v_high"]])) is None     # = Wan 2.1 T2V-14B's tensors
    assert cli22.wan22_kind(parse(base + ["--dit", str(m["root"] / "missing.safetensors")])) is None
