"""The CLI checks every argument before it loads a model: one ``error:`` line, exit 2, fast.

Runs ``wan_core.cli.main`` in-process with every loader (and ``generate``) replaced by a
function that fails the test if called, so a check that happened only after loading would
show up as that failure, not as a slow pass. Also: the flags -> ``RunOptions`` translation,
``--help`` groups, Ctrl-C (exit 130, one line), the errors of a run (one line, exit 2;
unexpected ones keep their traceback) and atomic output writes.
"""
from __future__ import annotations

import errno
import math
import os
import time
from pathlib import Path

import factory
import pytest
import torch

import wan_core
from wan_core import cli, cli_checks, video
from wan_core.files import CheckpointError
from wan_core.lora import LoraSpec
from wan_core.planner import PlanError
from wan_core.run_plan import CompileSpec, RunOptions, StepCacheSpec

GiB = 1 << 30
# Measured in-process: every refusal below takes under 0.1 s (median 0.02 s) on 2 cores shared
# with other jobs (load 11); headers and tiny images only. The bound leaves room for worse.
FAST = 2.0


class Loaded(AssertionError):
    """A model was loaded (or generate() ran) although an argument was bad."""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    files = {
        "t2v": factory.write_checkpoint(root, "dit_t2v", "comfy_prefixed"),
        "i2v": factory.write_checkpoint(root, "dit_i2v", "comfy_prefixed"),
        "flf2v": factory.write_checkpoint(root, "dit_flf2v", "comfy_prefixed"),
        "vae": factory.write_checkpoint(root, "vae", "official", ext=".safetensors"),
        "t5": factory.write_checkpoint(root, "t5", "hf_with_spiece"),
        "clip": factory.write_checkpoint(root, "clip", "hf"),
    }
    (root / "notes.pth").write_text("these are my notes, not a checkpoint\n")
    files["text_pth"] = root / "notes.pth"
    from PIL import Image

    Image.new("RGB", (128, 96), (200, 30, 30)).save(root / "start.png")
    files["image"] = root / "start.png"
    (root / "fake.png").write_text("not an image")
    files["fake_png"] = root / "fake.png"
    # torch's first meta-device build imports its decompositions (~5 s on a busy machine); the
    # plan check builds the DiT on meta, as every loader does anyway: pay it once, here.
    from wan_core.planner import dit_sizes

    dit_sizes(wan_core.inspect_checkpoint(files["t2v"]).config)
    return files


@pytest.fixture(autouse=True)
def no_loading(monkeypatch):
    def refuse(*_a, **_k):
        raise Loaded("a model was loaded before the arguments were checked")

    for name in ("load_dit", "load_vae", "load_text_encoder", "load_clip_vision"):
        monkeypatch.setattr(wan_core.loaders, name, refuse)
    monkeypatch.setattr(wan_core.checkpoint, "load_module", refuse)
    monkeypatch.setattr(wan_core.pipeline, "generate", refuse)


def run(capsys, *argv: str) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    try:
        rc = cli.main(list(argv))
    except SystemExit as exc:   # argparse's own exits (usage errors, --help)
        rc = exc.code
    seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    return rc, out, err, seconds


def t2v_args(models, tmp_path, *extra: str) -> list[str]:
    return ["generate", "--dit", str(models["t2v"]), "--vae", str(models["vae"]), "--text-encoder",
            str(models["t5"]), "--prompt", "a cat", "--device", "cpu", "--out", str(tmp_path / "v.mp4"), *extra]


def assert_refused(res, *needles: str) -> None:
    rc, _out, err, seconds = res
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert seconds < FAST, f"took {seconds:.2f}s"


# --- sizes, numbers and flag syntax -------------------------------------------------------------

@pytest.mark.parametrize(("extra", "needle"), [
    (["--size", "833x480"], "width 833 is not a multiple of 16"),
    (["--size", "832x479"], "height 479"),
    (["--size", "832by480"], "WIDTHxHEIGHT"),
    (["--size", "8192x480"], "above the maximum"),
    (["--frames", "80"], "frames 80 is not 4n+1"),
    (["--frames", "0"], "frames 0"),
    (["--frames", "100001"], "above the maximum"),
    (["--steps", "0"], "steps 0"),
    (["--steps", "100000000"], "above the maximum 1000"),
    (["--cfg", "nan"], "cfg"),
    (["--shift", "0"], "shift"),
    (["--seed", "-1"], "seed"),
    (["--sampler", "ddim"], "invalid choice"),
    (["--denoise", "0.5"], "needs --video"),
    (["--denoise", "1.5"], "denoise"),
    (["--fps", "0"], "--fps"),
    (["--vram-budget", "-1"], "--vram-budget"),
    (["--vram-budget", "0"], "--vram-budget"),
    (["--vram-budget", "eight"], "--vram-budget"),
    (["--resident-blocks", "-2"], "--resident-blocks"),
    (["--vae-tile", "100"], "multiple of 8"),
    (["--vae-tile", "sometimes"], "--vae-tile"),
    (["--step-cache", "teacash"], "teacache or magcache"),
    (["--step-cache", "teacache:-1"], "threshold"),
    (["--step-cache", "magcache:lots"], "threshold"),
    (["--weight-dtype", "int4"], "invalid choice"),
    (["--attention", "sage"], "--attention sage cannot run here"),
    (["--lora", "x.safetensors:nan"], "finite"),
])
def test_bad_numbers_and_flags_are_one_error_line(models, tmp_path, capsys, extra, needle) -> None:
    assert_refused(run(capsys, *t2v_args(models, tmp_path, *extra)), needle)


# --- files ----------------------------------------------------------------------------------------

def test_missing_dit_file(models, tmp_path, capsys) -> None:
    args = t2v_args(models, tmp_path)
    args[args.index("--dit") + 1] = str(tmp_path / "nope.safetensors")
    assert_refused(run(capsys, *args), "--dit", "nope.safetensors", "no such file")


@pytest.mark.parametrize(("flag", "given", "needle"), [
    ("--dit", "vae", "is a Wan 2.1 VAE; --dit needs a Wan 2.1 diffusion model"),
    ("--dit", "t5", "umT5"),
    ("--vae", "t2v", "--vae needs a Wan 2.1 VAE"),
    ("--text-encoder", "clip", "--text-encoder needs a umT5-XXL text encoder"),
])
def test_a_file_of_another_kind_is_named_with_where_it_belongs(models, tmp_path, capsys, flag, given,
                                                                needle) -> None:
    args = t2v_args(models, tmp_path)
    args[args.index(flag) + 1] = str(models[given])
    assert_refused(run(capsys, *args), needle, "Give this file to")


def test_a_text_file_named_pth_is_an_error_line(models, tmp_path, capsys) -> None:
    args = t2v_args(models, tmp_path)
    args[args.index("--dit") + 1] = str(models["text_pth"])
    rc, _out, err, _s = res = run(capsys, *args)
    assert_refused(res, "--dit", "notes.pth")
    assert "my notes" not in err   # never echo file contents


def test_an_empty_or_garbage_safetensors_is_an_error_line(tmp_path, models, capsys) -> None:
    bad = tmp_path / "zero.safetensors"
    bad.write_bytes(b"")
    args = t2v_args(models, tmp_path)
    args[args.index("--vae") + 1] = str(bad)
    assert_refused(run(capsys, *args), "--vae", "zero.safetensors")


@pytest.mark.parametrize(("lora", "needle"), [
    ("missing_lora.safetensors", "no such file"),
    ("missing_lora.safetensors:0.7", "no such file"),
    ("notes.pth", "--lora"),
    ("vae_official.safetensors", "is a Wan 2.1 VAE (for --vae, from models/vae), not a LoRA"),
])
def test_bad_lora_files_are_refused_before_loading(models, tmp_path, capsys, lora, needle) -> None:
    path = str(models["text_pth"].parent / lora)
    assert_refused(run(capsys, *t2v_args(models, tmp_path, "--lora", path)), "--lora", needle)


# --- inputs vs model type -------------------------------------------------------------------------

def test_i2v_model_without_image(models, tmp_path, capsys) -> None:
    args = t2v_args(models, tmp_path)
    args[args.index("--dit") + 1] = str(models["i2v"])
    assert_refused(run(capsys, *args), "image-to-video model", "--image")


def test_image_with_a_t2v_model(models, tmp_path, capsys) -> None:
    res = run(capsys, *t2v_args(models, tmp_path, "--image", str(models["image"]), "--clip-vision",
                                str(models["clip"])))
    assert_refused(res, "text-to-video model", "takes no --image")


@pytest.mark.parametrize(("dit", "extra", "needle"), [
    ("i2v", ["--image", "{image}"], "needs --clip-vision"),
    ("i2v", ["--image", "{missing}", "--clip-vision", "{clip}"], "--image"),
    ("i2v", ["--image", "{fake_png}", "--clip-vision", "{clip}"], "cannot decode it as an image"),
    ("flf2v", ["--end-image", "{image}", "--clip-vision", "{clip}"], "--end-image needs --image"),
    ("flf2v", ["--image", "{image}", "--end-image", "{fake_png}", "--clip-vision", "{clip}"], "--end-image"),
    ("i2v", ["--image", "{image}", "--clip-vision", "{clip}", "--size", "100x64"], "width 100"),
    ("i2v", ["--image", "{image}", "--clip-vision", "{clip}", "--max-area", "0"], "max_area"),
])
def test_image_inputs_are_checked_and_decoded_before_loading(models, tmp_path, capsys, dit, extra,
                                                             needle) -> None:
    names = {k: str(v) for k, v in models.items()} | {"missing": str(tmp_path / "missing.png")}
    args = t2v_args(models, tmp_path, *[e.format(**names) for e in extra])
    args[args.index("--dit") + 1] = str(models[dit])
    assert_refused(run(capsys, *args), needle)


def test_video_inputs_are_checked_before_loading(models, tmp_path, capsys) -> None:
    clip = tmp_path / "in.mp4"
    video.write_mp4(torch.rand(6, 48, 64, 3), clip)          # 6 frames: not 4n+1
    assert_refused(run(capsys, *t2v_args(models, tmp_path, "--video", str(clip), "--denoise", "0.5")),
                   "frames 6")
    odd = tmp_path / "odd.mp4"
    video.write_mp4(torch.rand(5, 40, 50, 3), odd)          # 50x40: not multiples of 16
    assert_refused(run(capsys, *t2v_args(models, tmp_path, "--video", str(odd))), "odd.mp4 is 50x40")
    assert_refused(run(capsys, *t2v_args(models, tmp_path, "--video", str(models["fake_png"]))),
                   "cannot decode it as a video")
    assert_refused(run(capsys, *t2v_args(models, tmp_path, "--video", str(clip), "--size", "64x48")),
                   "--video sets the size")


# --- output path ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("out", "extra", "needle"), [
    ("{tmp}/outdir/", [], "is a folder"),
    ("{tmp}", [], "is a folder"),
    ("{tmp}/video", [], "no file extension"),
    ("{tmp}/video.avi", [], "unknown output type '.avi'"),
    ("{tmp}/video.MKV", [], "unknown output type"),
    ("{tmp}/video.png", [], "holds one frame"),
    ("{tmp}/image.gif", ["--frames", "1"], "unknown output type"),
    ("{tmp}/afile/video.mp4", [], "is a file, not a folder"),
])
def test_output_paths_that_cannot_be_written_are_refused(models, tmp_path, capsys, out, extra, needle) -> None:
    (tmp_path / "afile").write_text("x")
    args = t2v_args(models, tmp_path, *extra)
    args[args.index("--out") + 1] = out.format(tmp=tmp_path)
    assert_refused(run(capsys, *args), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]   # no probe file left behind


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes in read-only folders")
def test_a_read_only_folder_is_refused(models, tmp_path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        args = t2v_args(models, tmp_path)
        args[args.index("--out") + 1] = str(ro / "video.mp4")
        assert_refused(run(capsys, *args), "cannot write in")
    finally:
        ro.chmod(0o700)


def test_an_unwritable_folder_is_refused_by_a_real_probe(models, tmp_path, capsys, monkeypatch) -> None:
    real_open = os.open

    def denied(path, flags, *a, **k):   # what a read-only mount or ACL does, even to root
        if ".wan_core_write_test_" in os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(cli_checks.os, "open", denied)
    assert_refused(run(capsys, *t2v_args(models, tmp_path)), "cannot write in", "Permission denied")


@pytest.mark.parametrize(("name", "kind"), [("still.png", "PNG"), ("still.JPG", "JPEG"), ("still.webp", "WEBP"),
                                            ("still.mp4", "mp4")])
def test_frames_1_writes_an_image_for_image_names_and_a_one_frame_mp4_otherwise(
        models, tmp_path, capsys, monkeypatch, name, kind) -> None:
    seen = {}

    def fake_generate(**kw):
        seen.update(kw)
        return torch.rand(kw["frames"], kw["height"], kw["width"], 3)

    monkeypatch.setattr(wan_core.pipeline, "generate", fake_generate)
    args = t2v_args(models, tmp_path, "--frames", "1", "--size", "64x48")
    args[args.index("--out") + 1] = str(tmp_path / name)
    rc, out, err, _s = run(capsys, *args)
    assert rc == 0, err
    assert seen["frames"] == 1 and seen["dit"] == str(models["t2v"])   # paths go to generate()
    assert isinstance(seen["options"], RunOptions)
    if kind == "mp4":
        assert video.read_video(tmp_path / name).shape == (1, 48, 64, 3)
    else:
        from PIL import Image

        with Image.open(tmp_path / name) as im:
            assert (im.format, im.size) == (kind, (64, 48))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]   # no temporary file left


def test_frames_1_without_out_writes_image_png(models, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(wan_core.pipeline, "generate", lambda **kw: torch.rand(1, 48, 64, 3))
    monkeypatch.chdir(tmp_path)
    args = t2v_args(models, tmp_path, "--frames", "1", "--size", "64x48")
    del args[args.index("--out"):args.index("--out") + 2]
    rc, out, err, _s = run(capsys, *args)
    assert rc == 0, err
    assert (tmp_path / "image.png").is_file() and "wrote image.png (image, 64x48)" in out


# --- device ---------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_cuda_on_a_cpu_only_torch_is_one_line(models, tmp_path, capsys) -> None:
    args = t2v_args(models, tmp_path)
    args[args.index("--device") + 1] = "cuda"
    assert_refused(run(capsys, *args), "--device cuda", "use --device cpu")


@pytest.mark.parametrize(("device", "cuda_build", "count", "needle"), [
    ("cuda", None, 0, "built without CUDA"),
    ("cuda", "12.4", 0, "no CUDA GPU is visible"),
    ("cuda:3", "12.4", 2, "only 2 CUDA devices"),
    ("gpu", None, 0, "not a device name"),
    ("cuda:x", None, 0, "not a device name"),
])
def test_unavailable_devices_are_refused(models, tmp_path, capsys, monkeypatch, device, cuda_build, count,
                                         needle) -> None:
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    args = t2v_args(models, tmp_path)
    args[args.index("--device") + 1] = device
    assert_refused(run(capsys, *args), needle)


def test_a_budget_that_cannot_fit_names_the_minimum_before_loading(models, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli_checks, "check_device", lambda name: "cuda")
    res = run(capsys, *t2v_args(models, tmp_path, "--vram-budget", "0.0001"))
    assert_refused(res, "the minimum is", "GiB")


def test_plan_check_is_skipped_off_the_gpu_or_with_explicit_blocks(models) -> None:
    det = wan_core.inspect_checkpoint(models["t2v"])
    tiny_budget = RunOptions(vram_budget=1000)
    with pytest.raises(PlanError, match="minimum"):
        cli_checks.check_plan(det, tiny_budget, 64, 48, 5, "sdpa", "cuda")
    cli_checks.check_plan(det, tiny_budget, 64, 48, 5, "sdpa", "cpu")
    cli_checks.check_plan(det, RunOptions(vram_budget=1000, resident_blocks=0), 64, 48, 5, "sdpa", "cuda")
    cli_checks.check_plan(det, RunOptions(vram_budget=64 * GiB), 832, 480, 81, "sdpa", "cuda")


# --- errors during the run, Ctrl-C ----------------------------------------------------------------

@pytest.mark.parametrize("error", [
    wan_core.NonFiniteError("NaN in the prediction at step 3 of 50:\nlikely fp16 overflow"),
    PlanError("a budget of 1.00 GiB cannot run T2V-14B: the minimum is 6.20 GiB"),
    CheckpointError("model.safetensors: truncated download"),
    OSError(errno.ENOSPC, "No space left on device", "/out/video.mp4"),
])
def test_expected_failures_of_a_run_are_one_error_line(models, tmp_path, capsys, monkeypatch, error) -> None:
    def failing(**_kw):
        raise error

    monkeypatch.setattr(wan_core.pipeline, "generate", failing)
    rc, _out, err, _s = run(capsys, *t2v_args(models, tmp_path, "--size", "64x48", "--frames", "5"))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert ("No space left on device" in err) if isinstance(error, OSError) else (str(error).split()[0] in err)


def test_an_unexpected_error_keeps_its_traceback(models, tmp_path, capsys, monkeypatch) -> None:
    def bug(**_kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(wan_core.pipeline, "generate", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(t2v_args(models, tmp_path, "--size", "64x48", "--frames", "5"))


def test_ctrl_c_is_one_line_and_exit_130(models, tmp_path, capsys, monkeypatch) -> None:
    def interrupted(**kw):
        kw["callback"](type("Info", (), {"step": 1, "total": 4})())   # a half-drawn progress bar
        raise KeyboardInterrupt

    monkeypatch.setattr(wan_core.pipeline, "generate", interrupted)
    rc, out, err, _s = run(capsys, *t2v_args(models, tmp_path, "--size", "64x48", "--frames", "5"))
    assert rc == 130
    assert err.endswith("\ninterrupted\n") and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_ctrl_c_while_loading_is_one_line(models, tmp_path, capsys, monkeypatch) -> None:
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_checks, "check_model_file", interrupted)
    rc, _out, err, _s = run(capsys, *t2v_args(models, tmp_path))
    assert (rc, err) == (130, "interrupted\n")


# --- flags -> RunOptions --------------------------------------------------------------------------

def parse(*extra: str):
    return cli.build_parser().parse_args(["generate", "--dit", "d", "--vae", "v", "--text-encoder", "t",
                                          "--prompt", "p", *extra])


def test_no_memory_or_speed_flags_give_the_default_options() -> None:
    assert cli.options_from_args(parse()) == RunOptions()


def test_every_memory_and_speed_flag_reaches_run_options() -> None:
    args = parse("--vram-budget", "7.5", "--resident-blocks", "12", "--weight-dtype", "fp8_e4m3fn",
                 "--text-encoder-device", "cpu", "--vae-tile", "512", "--lora", "a.safetensors:0.8",
                 "--lora", "b.safetensors", "--step-cache", "magcache:0.1", "--compile", "--attention", "auto")
    assert cli.options_from_args(args) == RunOptions(
        vram_budget=int(7.5 * GiB), resident_blocks=12, weight_dtype="fp8_e4m3fn", text_encoder_device="cpu",
        vae_tile=512, loras=(LoraSpec("a.safetensors", 0.8), LoraSpec("b.safetensors", 1.0)),
        step_cache=StepCacheSpec("magcache", 0.1), compile=CompileSpec(), attention="auto")


@pytest.mark.parametrize(("extra", "field", "value"), [
    (["--weight-dtype", "keep"], "weight_dtype", None),
    (["--weight-dtype", "bf16"], "weight_dtype", "bf16"),
    (["--dtype", "fp16"], "weight_dtype", "fp16"),        # the first release's flag
    (["--dtype", "auto"], "weight_dtype", None),
    (["--vae-tile", "off"], "vae_tile", "off"),
    (["--step-cache", "teacache"], "step_cache", StepCacheSpec("teacache", None)),
    (["--step-cache", "teacache:0"], "step_cache", StepCacheSpec("teacache", 0.0)),
    (["--resident-blocks", "0"], "resident_blocks", 0),
])
def test_flag_values_translate(extra, field, value) -> None:
    assert getattr(cli.options_from_args(parse(*extra)), field) == value


@pytest.mark.parametrize(("text", "path", "strength"), [
    ("style.safetensors", "style.safetensors", 1.0),
    ("style.safetensors:0.5", "style.safetensors", 0.5),
    ("style.safetensors:-1", "style.safetensors", -1.0),
    ("style.safetensors:1e-1", "style.safetensors", 0.1),
    (r"C:\loras\style.safetensors", r"C:\loras\style.safetensors", 1.0),
    (r"C:\loras\style.safetensors:0.75", r"C:\loras\style.safetensors", 0.75),
    ("loras/v2:final.safetensors", "loras/v2:final.safetensors", 1.0),
    ("dir:2/x.safetensors:2", "dir:2/x.safetensors", 2.0),
])
def test_lora_strength_is_read_only_from_a_numeric_last_part(text, path, strength) -> None:
    assert cli_checks.split_lora(text) == (path, strength)
    assert math.isclose(parse("--lora", text).lora[0].strength, strength)


def test_help_groups_the_flags(capsys) -> None:
    rc, out, _err, _s = run(capsys, "generate", "--help")
    assert rc == 0
    headers = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headers[-7:] == ["models", "job", "sampling", "memory", "speed", "long video and guidance", "output"]
    for flag in ("--vram-budget GB", "--resident-blocks K", "--weight-dtype DTYPE", "--text-encoder-device",
                 "--vae-tile auto|off|N", "--lora PATH[:STRENGTH]", "--step-cache teacache|magcache[:THR]",
                 "--compile", "--attention"):
        assert flag in out


# --- atomic writes --------------------------------------------------------------------------------

def test_a_failing_mp4_writer_leaves_no_partial_and_no_temporary_file(tmp_path, monkeypatch) -> None:
    import av

    real = av.VideoFrame.from_ndarray
    calls = []

    def fail_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("encoder died")
        return real(*a, **k)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", fail_third)
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="encoder died"):
        video.write_mp4(torch.rand(5, 32, 32, 3), target)
    assert not list(tmp_path.iterdir())
    target.write_bytes(b"the previous video")
    with pytest.raises(RuntimeError):
        calls.clear()
        video.write_mp4(torch.rand(5, 32, 32, 3), target)
    assert target.read_bytes() == b"the previous video"       # an existing file stays intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_ctrl_c_during_an_image_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    from PIL import Image

    def half_written(self, fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        video.write_image(torch.rand(1, 16, 16, 3), tmp_path / "still.png")
    assert not list(tmp_path.iterdir())


def test_a_written_file_gets_the_usual_permissions(tmp_path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path = video.write_image(torch.rand(16, 16, 3), tmp_path / "sub" / "still.png")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["still.png"]
