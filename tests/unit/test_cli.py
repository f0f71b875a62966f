"""The README's commands: ``python -m wan_core selftest`` and a tiny ``generate`` write playable mp4s;
in a real process a bad argument is one ``error:`` line and exit status 2 (the variants are in
test_cli_validation.py, in-process)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wan_core.selftest import write_selftest_models
from wan_core.video import read_video, write_mp4

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wan_core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_selftest_models(tmp_path_factory.mktemp("models"))


def test_selftest_runs_t2v_and_i2v_and_writes_playable_videos(tmp_path: Path) -> None:
    out = tmp_path / "selftest.mp4"
    res = _run("selftest", "--out", str(out), "--frames", "5", "--steps", "2")
    assert res.returncode == 0, res.stderr
    assert "-- OK" in res.stdout
    assert "loaded wan_tiny_i2v.safetensors" in res.stderr     # one load line per model
    assert read_video(out).shape == (5, 48, 64, 3)
    assert read_video(tmp_path / "selftest_i2v.mp4").shape[0] == 5


def test_generate_from_paths_writes_an_mp4_with_every_frame(tmp_path: Path, models) -> None:
    m = models
    out = tmp_path / "t2v.mp4"
    res = _run("generate", "--dit", str(m.dit_t2v), "--vae", str(m.vae), "--text-encoder", str(m.text_encoder),
               "--prompt", "a cat", "--size", "48x32", "--frames", "9", "--steps", "2", "--device", "cpu",
               "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "sampling [" in res.stderr and "2/2" in res.stderr
    video = read_video(out)
    assert video.shape == (9, 32, 48, 3)


@pytest.mark.parametrize(("args", "msg"), [
    (["--size", "50x32"], "width 50 is not a multiple of 16"),
    (["--frames", "8"], "frames 8 is not 4n+1"),
])
def test_generate_refuses_bad_sizes_with_a_message(tmp_path: Path, models, args: list[str], msg: str) -> None:
    m = models
    res = _run("generate", "--dit", str(m.dit_t2v), "--vae", str(m.vae), "--text-encoder", str(m.text_encoder),
               "--prompt", "x", "--device", "cpu", "--out", str(tmp_path / "x.mp4"), *args)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and msg in res.stderr and res.stderr.count("\n") == 1


def test_generate_names_the_wrong_file(models) -> None:
    m = models
    res = _run("generate", "--dit", str(m.vae), "--vae", str(m.vae), "--text-encoder", str(m.text_encoder),
               "--prompt", "x", "--device", "cpu")
    assert res.returncode == 2
    assert "wan_tiny_vae.safetensors is a Wan 2.1 VAE; --dit needs a Wan 2.1 diffusion model" in res.stderr


def test_mp4_round_trip_keeps_frames_and_size(tmp_path: Path) -> None:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 30), torch.linspace(0, 1, 42), indexing="ij")
    frames = torch.stack([torch.stack([xx, yy, (xx + yy + t / 5) % 1], -1) for t in range(5)])
    path = write_mp4(frames, tmp_path / "v.mp4")     # odd width 42/2 fine, height 30 even
    back = read_video(path)
    assert back.shape == (5, 30, 42, 3)
    assert (back - frames).abs().mean() < 0.03     # lossy H.264 (crf 17); measured ~0.01
