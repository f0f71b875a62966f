"""``python -m wan_core generate`` with Fun models (in-process, tiny files): Fun Control with
--control-video (size and frames from it), --image (start frame), --reference-image (V1.1);
Fun InP with --image and --end-image; refusals are one error line and exit code 2."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import factory
import tiny
from wan_core.cli import main
from wan_core.video import read_video, write_mp4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fun_cli")
    image = d / "img.png"
    Image.fromarray((np.random.default_rng(0).random((20, 36, 3)) * 255).astype("uint8")).save(image)
    return {"ref": factory.write_checkpoint(d, "dit", "official", cfg=tiny.TINY_DIT_FUN_CONTROL_REF,
                                            name="f.safetensors"),
            "inp": factory.write_checkpoint(d, "dit", "official", variant="i2v"),
            "vae": factory.write_checkpoint(d, "vae", "official"),
            "te": factory.write_checkpoint(d, "t5", "hf_with_spiece"),
            "clip": factory.write_checkpoint(d, "clip", "hf"),
            "control": write_mp4(torch.rand(5, 16, 32, 3, generator=torch.Generator().manual_seed(0)),
                                 d / "pose.mp4"),
            "image": image}


def _args(files, dit, *extra):
    return ["generate", "--dit", str(files[dit]), "--vae", str(files["vae"]), "--text-encoder", str(files["te"]),
            "--prompt", "a dancer", "--steps", "2", "--device", "cpu", *extra]


def test_fun_control_with_control_video_start_and_reference_image(files, tmp_path):
    out = tmp_path / "fun.mp4"
    code = main(_args(files, "ref", "--control-video", str(files["control"]), "--image", str(files["image"]),
                      "--reference-image", str(files["image"]), "--clip-vision", str(files["clip"]), "--out", str(out)))
    assert code == 0
    assert read_video(out).shape == (5, 16, 32, 3)


def test_fun_inp_with_start_and_end_image(files, tmp_path):
    out = tmp_path / "inp.mp4"
    code = main(_args(files, "inp", "--image", str(files["image"]), "--end-image", str(files["image"]),
                      "--clip-vision", str(files["clip"]), "--size", "32x16", "--frames", "5", "--out", str(out)))
    assert code == 0
    assert read_video(out).shape == (5, 16, 32, 3)


@pytest.mark.parametrize(("extra", "needle"), [
    (["--end-image", "{image}", "--image", "{image}", "--clip-vision", "{clip}"], "not a first-last-frame model"),
    (["--reference-image", "{image}"], "needs --clip-vision"),
    (["--reference-image", "{image}", "--reference-image", "{image}", "--clip-vision", "{clip}"],
     "takes one reference image; got 2"),
])
def test_refusals_are_one_error_line(files, tmp_path, capsys, extra, needle):
    extra = [e.format(image=files["image"], clip=files["clip"]) for e in extra]
    code = main(_args(files, "ref", "--control-video", str(files["control"]), *extra, "--out", str(tmp_path / "o.mp4")))
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
