"""``wan-core generate --control-video V --control-preprocess MODE``: the VACE control video is
``preprocess_control(V)`` with that mode's defaults; without --control-video, or with an unknown
mode, one error line (in-process, tiny files)."""
from __future__ import annotations

import pytest
import torch

import factory
from vace_factory import write_vace
from wan_core import ControlOptions, preprocess_control
from wan_core import pipeline
from wan_core.cli import main
from wan_core.video import read_video, write_mp4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("control_cli")
    g = torch.Generator().manual_seed(0)
    video = torch.rand(5, 2, 4, 3, generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)   # 16x32 blocks
    return {"dit": write_vace(d), "vae": factory.write_checkpoint(d, "vae", "official"),
            "te": factory.write_checkpoint(d, "t5", "hf_with_spiece"),
            "control": write_mp4(video, d / "source.mp4"), "dir": d}


def _args(files, *extra):
    return ["generate", "--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text-encoder", str(files["te"]),
            "--prompt", "a dancer", "--steps", "1", "--device", "cpu", "--control-video", str(files["control"]),
            "--out", str(files["dir"] / "out.mp4"), *extra]


@pytest.mark.parametrize("mode", ["canny", "grayscale", "scribble", "blur"])
def test_the_control_video_given_to_generate_is_the_preprocessed_source(files, monkeypatch, mode):
    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs)
        return torch.zeros(5, 16, 32, 3)

    monkeypatch.setattr(pipeline, "generate", fake_generate)
    assert main(_args(files, "--control-preprocess", mode)) == 0
    expected = preprocess_control(read_video(files["control"]), ControlOptions(mode=mode)).frames
    assert torch.equal(seen["control_video"], expected)
    assert seen["width"] is None and seen["height"] is None   # size and frames still taken from the video


def test_a_preprocessed_control_video_runs_through_a_tiny_vace_model(files):
    assert main(_args(files, "--control-preprocess", "canny")) == 0
    assert read_video(files["dir"] / "out.mp4").shape == (5, 16, 32, 3)


def test_preprocess_without_a_control_video_or_with_an_unknown_mode_is_one_error_line(files, capsys):
    args = [a for a in _args(files, "--control-preprocess", "canny")]
    i = args.index("--control-video")
    del args[i:i + 2]
    assert main(args) == 2
    assert "--control-preprocess canny needs --control-video" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(_args(files, "--control-preprocess", "depth"))
    assert err.value.code == 2
    assert "invalid choice: 'depth'" in capsys.readouterr().err
