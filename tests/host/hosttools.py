"""What the host tests (tests/host/test_*.py) share: a real ComfyUI server on a temporary base
directory with the tiny selftest models, its HTTP / websocket client, the API workflows
pointed at the tiny models, and the frame of the probe nodes they install.

Not a test module; the test modules put this folder on ``sys.path`` and call
:func:`require_comfyui` first, so they skip cleanly without ``COMFYUI_PATH``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "workflows" / "api"
W = H = 32
FRAMES = 5
STARTUP_S, PROMPT_S = 120, 100
# Wan 2.2 workflows: the tiny model standing in for each published file, by a part of its name
TINY22 = {"t2v_high_noise": "wan22_tiny_t2v_high.safetensors", "t2v_low_noise": "wan22_tiny_t2v_low.safetensors",
          "i2v_high_noise": "wan22_tiny_i2v_high.safetensors", "i2v_low_noise": "wan22_tiny_i2v_low.safetensors",
          "ti2v_5B": "wan22_tiny_ti2v.safetensors", "wan2.2_vae": "wan22_tiny_vae.safetensors"}
TINY = {"WanCoreLoadDiT": ("model_name", "wan_tiny_t2v.safetensors"),
        "WanCoreLoadVAE": ("vae_name", "wan_tiny_vae.safetensors"),
        "WanCoreLoadTextEncoder": ("text_encoder_name", "umt5_tiny.safetensors"),
        "WanCoreLoadCLIPVision": ("clip_name", "clip_vision_tiny.safetensors")}

# The start of every probe module (a custom node file the tests install): ``@probe(inputs, returns)``
# turns a function into a ComfyUI node class of that name (category testing; no returns: an output node).
PROBE_PRELUDE = r'''
def probe(required, returns=(), optional=None):
    def make(fn):
        inputs = {"required": required, **({"optional": optional} if optional else {})}
        return type(fn.__name__, (), {"__doc__": fn.__doc__, "RETURN_TYPES": returns, "FUNCTION": "run",
                                      "OUTPUT_NODE": not returns, "CATEGORY": "testing",
                                      "INPUT_TYPES": classmethod(lambda cls: inputs),
                                      "run": lambda self, **kw: fn(**kw)})
    return make


def mappings(*classes):
    return {c.__name__: c for c in classes}
'''


def require_comfyui():
    """Skip the calling test module unless COMFYUI_PATH names a ComfyUI checkout and
    websocket-client is installed; returns the ``websocket`` module."""
    if not os.environ.get("COMFYUI_PATH"):
        pytest.skip("COMFYUI_PATH is not set (a ComfyUI checkout to test against)", allow_module_level=True)
    return pytest.importorskip("websocket", reason="websocket-client is needed to follow the server's progress")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_models(base: Path) -> None:
    from safetensors.torch import save_file

    import nodepack
    from wan_core.configs import DiTConfig
    from wan_core.dit import WanDiT
    from wan_core.selftest import SELFTEST_CONFIGS, _randomize, write_selftest_models

    paths = write_selftest_models(base / "tmp_models")
    models = base / "models"
    for key, path in (("diffusion_models", paths.dit_t2v), ("diffusion_models", paths.dit_i2v), ("vae", paths.vae),
                      ("text_encoders", paths.text_encoder), ("clip_vision", paths.clip_vision)):
        (models / key).mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), models / key / path.name)
    i2v, clip = SELFTEST_CONFIGS["i2v"], SELFTEST_CONFIGS["clip"]
    flf = DiTConfig(dim=i2v.dim, ffn_dim=i2v.ffn_dim, num_layers=i2v.num_layers, in_dim=36, text_dim=i2v.text_dim,
                    freq_dim=i2v.freq_dim, model_type="flf2v", clip_dim=clip.width, image_pos_len=2 * clip.num_tokens)
    with torch.device("meta"):
        model = WanDiT(flf)
    save_file({"model.diffusion_model." + k: v for k, v in _randomize(model, 5).items()},
              str(models / "diffusion_models" / "wan_tiny_flf2v.safetensors"))
    # a tiny VACE DiT: the selftest T2V shape with one VACE block (hints after base layer 0)
    from wan_core.vace import WanVaceDiT

    with torch.device("meta"):
        vace = WanVaceDiT(dataclasses.replace(SELFTEST_CONFIGS["t2v"], vace_layers=(0,)))
    save_file({"model.diffusion_model." + k: v for k, v in _randomize(vace, 7).items()},
              str(models / "diffusion_models" / "wan_tiny_vace.safetensors"))
    # a tiny Wan2.1-Fun V1.1 Control DiT: the selftest I2V shape with 48 input channels and ref_conv
    with torch.device("meta"):
        fun = WanDiT(dataclasses.replace(i2v, in_dim=48, fun="control", ref_in_dim=16))
    save_file({"model.diffusion_model." + k: v for k, v in _randomize(fun, 8).items()},
              str(models / "diffusion_models" / "wan_tiny_fun_control.safetensors"))
    # a rank-2 LoRA on two Linears of the tiny T2V model (official names, diffusion_model. prefix)
    with torch.device("meta"):
        t2v = WanDiT(SELFTEST_CONFIGS["t2v"])
    (models / "loras").mkdir(parents=True, exist_ok=True)
    nodepack.write_tiny_lora(models / "loras" / "wan_tiny_lora.safetensors", t2v, seed=6)
    write_wan22_models(models)


def write_wan22_models(models: Path) -> None:
    """Tiny Wan 2.2 models (TINY22): A14B expert pairs (T2V, I2V without CLIP), TI2V-5B (48
    channels) at the selftest widths, and a tiny Wan 2.2 VAE, in ComfyUI's single-file layout."""
    from safetensors.torch import save_file

    import wan22_factory
    from wan_core.dit import WanDiT
    from wan_core.selftest import SELFTEST_CONFIGS, _randomize

    t2v = SELFTEST_CONFIGS["t2v"]
    i2v = dataclasses.replace(t2v, in_dim=36, model_type="i2v_noclip")
    ti2v = dataclasses.replace(t2v, in_dim=48, out_dim=48, model_type="ti2v")
    for name, cfg, seed in (("t2v_high", t2v, 21), ("t2v_low", t2v, 22), ("i2v_high", i2v, 23),
                            ("i2v_low", i2v, 24), ("ti2v", ti2v, 25)):
        with torch.device("meta"):
            model = WanDiT(cfg)
        save_file({"model.diffusion_model." + k: v for k, v in _randomize(model, seed).items()},
                  str(models / "diffusion_models" / f"wan22_tiny_{name}.safetensors"))
    save_file(wan22_factory.vae22_official(wan22_factory.TINY_VAE22, 26),
              str(models / "vae" / "wan22_tiny_vae.safetensors"))


def write_inputs(base: Path) -> None:
    from PIL import Image

    from wan_core.video import write_mp4

    inputs = base / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(48, 64, 3, generator=g) * 255).byte().numpy()).save(inputs / "example.png")
    write_mp4(torch.rand(9, 48, 64, 3, generator=g), inputs / "example.mp4", fps=16)


def base_directory(base: Path, probe_name: str, probe_body: str) -> Path:
    """``base`` made a ComfyUI base directory: this repository linked into custom_nodes with the
    probe module ``probe_name`` (:data:`PROBE_PRELUDE` + ``probe_body``) beside it, the tiny
    models in models/, example.png / example.mp4 in input/."""
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "wan-core")
    (base / "custom_nodes" / probe_name).write_text(PROBE_PRELUDE + probe_body)
    write_models(base)
    write_inputs(base)
    return base


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, base: Path, log: Path):
        self.url, self.proc, self.base, self.log = url, proc, base, log
        self.client_id = str(uuid.uuid4())
        self.ws = None
        self.previews = 0  # binary preview frames received

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return r.status, json.loads(body) if body else {}
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def connect(self) -> None:
        import websocket

        self.ws = websocket.create_connection(f"{self.url.replace('http', 'ws')}/ws?clientId={self.client_id}",
                                              timeout=PROMPT_S)

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        assert status == 200, body
        return body["prompt_id"]

    def wait(self, prompt_id: str, on_event=None, timeout: float = PROMPT_S) -> list[dict]:
        """Read events until the prompt ends; returns them (text messages only)."""
        events, end = [], time.monotonic() + timeout
        while time.monotonic() < end:
            msg = self.ws.recv()
            if isinstance(msg, bytes):
                self.previews += 1
                continue
            event = json.loads(msg)
            data = event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            events.append(event)
            if on_event is not None:
                on_event(event)
            if event["type"] in ("execution_error", "execution_interrupted", "execution_success"):
                return events
            if event["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return events
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s; log: {self.log}")

    def run(self, prompt: dict) -> tuple[dict, list[dict]]:
        prompt_id = self.queue(prompt)
        events = self.wait(prompt_id)
        end = time.monotonic() + 20
        while True:  # the history entry is stored just after the last event is sent
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history or time.monotonic() > end:
                return history[prompt_id], events
            time.sleep(0.2)


@contextlib.contextmanager
def comfyui(base: Path, *flags: str) -> Iterator[Server]:
    """ComfyUI (COMFYUI_PATH, run by COMFYUI_PYTHON or this interpreter) on the CPU serving the
    base directory ``base`` on a free port, with the extra command-line ``flags``; connected
    to its websocket, stopped on exit. Its output goes to ``base/server.log``."""
    port = free_port()
    log = base / "server.log"
    cmd = [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
           "--port", str(port), "--base-directory", str(base), "--disable-auto-launch",
           "--database-url", "sqlite:///:memory:", *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=os.environ["COMFYUI_PATH"], stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", proc, base, log)
    try:
        end = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > end:
                    pytest.fail(f"ComfyUI did not answer in {STARTUP_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        srv.connect()
        yield srv
    finally:
        if srv.ws is not None:
            srv.ws.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def tiny(name: str, steps: int = 2, seed: int | None = None, **changes) -> dict:
    """An API workflow pointed at the tiny models and inputs, tiny sizes, ``steps`` steps."""
    prompt = json.loads((API / f"{name}.json").read_text())
    for node in prompt.values():
        cls, inputs = node["class_type"], node["inputs"]
        wan22 = None   # a Wan 2.2 file's own tiny stand-in (set after the name rules below)
        if cls in TINY:
            key, value = TINY[cls]
            wan22 = next((v for part, v in TINY22.items() if part in str(inputs.get(key))), None)
            inputs[key] = value
        if cls == "WanCoreLoadDiT" and "i2v" in name:
            inputs["model_name"] = "wan_tiny_i2v.safetensors"
        if cls == "WanCoreLoadDiT" and "flf2v" in name:
            inputs["model_name"] = "wan_tiny_flf2v.safetensors"
        if cls == "WanCoreLoadDiT" and "vace" in name:
            inputs["model_name"] = "wan_tiny_vace.safetensors"
        if cls == "WanCoreLoadDiT" and "fun_control" in name:
            inputs["model_name"] = "wan_tiny_fun_control.safetensors"
        if cls == "WanCoreLoadDiT" and "fun_inp" in name:   # Fun InP has the I2V shapes
            inputs["model_name"] = "wan_tiny_i2v.safetensors"
        if wan22 is not None:
            inputs[TINY[cls][0]] = wan22
        if cls in ("WanCoreEmptyVideoEmbeds", "WanCoreImageToVideoEncode", "WanCoreVACEEncode", "ImageScale",
                   "WanCoreImageToVideoEncode22", "WanCoreFunControlEncode"):
            inputs.update(width=W, height=H)
            if "frames" in inputs:
                inputs["frames"] = 1 if inputs["frames"] == 1 else FRAMES
        if cls == "ImageFromBatch":
            inputs["length"] = FRAMES
        if cls == "WanCoreExtendVideo":   # FRAMES-frame clips overlapping by one
            inputs.update(frames=FRAMES, overlap=1, steps=steps)
        if cls == "WanCoreMultiGPUOptions":   # two CPU processes (the server has no GPU); 2 heads of 128
            inputs.update(devices="cpu,cpu", ulysses=2, ring=1, cfg_parallel=False)
        if cls == "WanCoreSampler":
            inputs["steps"] = steps
            # distinct per workflow: graphs that shrink to the same one still run (not cached)
            inputs["seed"] = zlib.crc32(name.encode()) if seed is None else seed
        if cls == "LoadImage":
            inputs["image"] = "example.png"
        if cls == "LoadVideo":
            inputs["file"] = "example.mp4"
    for node in prompt.values():
        if node["class_type"] == "ImagePadForOutpaint":   # its scaled source padded by 8 a side to W x H
            node["inputs"].update(left=8, top=8, right=8, bottom=8)
            prompt[node["inputs"]["image"][0]]["inputs"].update(width=W - 16, height=H - 16)
    for node_id, values in changes.items():
        prompt[node_id]["inputs"].update(values)
    return prompt


def uses_core_loaders(path: Path) -> bool:
    """Core Load CLIP / Load VAE build fixed full-size architectures and cannot read the tiny models:
    tests/host/test_core_types.py runs those workflows with probes over the tiny files instead."""
    return any(n["class_type"] in ("CLIPLoader", "VAELoader") for n in json.loads(path.read_text()).values())


def node_id(prompt: dict, cls: str) -> str:
    """The id of the (first) node of class ``cls`` in ``prompt``."""
    return next(k for k, v in prompt.items() if v["class_type"] == cls)


def video_frames(server: Server, item: dict) -> torch.Tensor:
    """The RGB frames [T, H, W, 3] (uint8) of a video the server saved (a history output item)."""
    import av

    path = server.base / "output" / item.get("subfolder", "") / item["filename"]
    with av.open(str(path)) as f:
        return torch.stack([torch.from_numpy(fr.to_ndarray(format="rgb24")) for fr in f.decode(video=0)])
