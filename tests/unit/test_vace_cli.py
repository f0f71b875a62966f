"""``python -m wan_core generate`` with a VACE model: --control-video (size and frames taken
from it), --control-mask, --reference-image, --vace-strength (in-process, tiny files)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import factory
from vace_factory import write_vace
from wan_core.cli import main
from wan_core.video import read_video, write_mp4

pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate_with_control_video_mask_and_reference(tmp_path):
    dit = write_vace(tmp_path)
    vae = factory.write_checkpoint(tmp_path, "vae", "official")
    te = factory.write_checkpoint(tmp_path, "t5", "hf_with_spiece")
    g = torch.Generator().manual_seed(0)
    control = write_mp4(torch.rand(5, 16, 32, 3, generator=g), tmp_path / "depth.mp4")
    mask = write_mp4(torch.ones(5, 16, 32, 3), tmp_path / "mask.mp4")
    ref = tmp_path / "ref.png"
    Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype("uint8")).save(ref)
    out = tmp_path / "vace.mp4"
    code = main(["generate", "--dit", str(dit), "--vae", str(vae), "--text-encoder", str(te), "--prompt", "a dancer",
                 "--steps", "2", "--device", "cpu", "--control-video", str(control), "--control-mask", str(mask),
                 "--reference-image", str(ref), "--vace-strength", "0.8", "--out", str(out)])
    assert code == 0
    assert read_video(out).shape == (5, 16, 32, 3)


def test_control_inputs_with_a_plain_model_are_one_error_line(tmp_path, capsys):
    dit = factory.write_checkpoint(tmp_path, "dit", "official", variant="t2v")
    vae = factory.write_checkpoint(tmp_path, "vae", "official")
    te = factory.write_checkpoint(tmp_path, "t5", "hf_with_spiece")
    control = write_mp4(torch.rand(5, 16, 32, 3), tmp_path / "depth.mp4")
    code = main(["generate", "--dit", str(dit), "--vae", str(vae), "--text-encoder", str(te), "--prompt", "x",
                 "--steps", "1", "--device", "cpu", "--control-video", str(control), "--out", str(tmp_path / "o.mp4")])
    assert code == 2
    assert "need a VACE model" in capsys.readouterr().err
