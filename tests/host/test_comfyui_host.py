"""The pack inside a real ComfyUI server (level 3): node listing, every example workflow end
to end on tiny models, interrupt and resume, bad input through the HTTP API, memory shared
with the host's own models, the template browser's listing, and the UI workflows in the
real frontend (headless Chromium, when installed).

Runs when COMFYUI_PATH points to a ComfyUI checkout (checked with 0.3.64); the server runs
under COMFYUI_PYTHON (default: this interpreter), which needs ComfyUI's requirements and
ours. The server is started once per module on a free port with a temporary base
directory (models, input, output, custom_nodes with this repository linked in) and
stopped at the end. Needs ``websocket-client`` for the progress events.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hosttools  # noqa: E402
from hosttools import API, FRAMES, ROOT, H, W, free_port, node_id, tiny, uses_core_loaders, video_frames  # noqa: E402

websocket = hosttools.require_comfyui()
pytestmark = pytest.mark.host


# A core-managed model for the memory test: a tiny custom node loads a ModelPatcher through
# ComfyUI's own memory manager and another reports whether it is still loaded.
_PROBE = """
import torch
import comfy.model_management as mm
import comfy.model_patcher

_HELD = []


@probe({"size": ("INT", {"default": 64})})
def HostProbeLoadModel(size):
    patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(size, size), load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    mm.load_models_gpu([patcher])
    _HELD.append(patcher)
    return {"ui": {"loaded": [len(mm.current_loaded_models)]}}


@probe({"nonce": ("INT", {"default": 0})})
def HostProbeLoadedModels(nonce):
    loaded = [any(m.model is p for m in mm.current_loaded_models) for p in _HELD]
    return {"ui": {"loaded": loaded}}


NODE_CLASS_MAPPINGS = mappings(HostProbeLoadModel, HostProbeLoadedModels)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = hosttools.base_directory(tmp_path_factory.mktemp("comfy"), "host_probe.py", _PROBE)
    with hosttools.comfyui(base, "--preview-method", "latent2rgb") as srv:
        yield srv


# ----------------------------------------------------------------------------------------- tests

def test_object_info_lists_every_node_with_the_workflows_widgets(server):
    info = server.get("/object_info")
    ours = {k for k in info if k.startswith("WanCore")}
    import nodepack

    assert ours == set(nodepack.load_pack().NODE_CLASS_MAPPINGS)   # every node the pack registers, no other
    # ... among them every node of the frozen record, which saved workflows rely on
    assert ours >= set(json.loads((ROOT / "tests" / "data" / "node_inputs_snapshot.json").read_text()))
    kind, opts = info["WanCoreLoadDiT"]["input"]["required"]["model_name"]
    assert "wan_tiny_t2v.safetensors" in (opts["options"] if kind == "COMBO" else kind)   # V3 / V1 combo form
    for path in sorted((ROOT / "workflows").glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "Note":
                continue
            spec = info[node["type"]]
            widgets = []
            for section in ("required", "optional"):
                for name in spec["input_order"].get(section, []):
                    kind, opts = (spec["input"][section][name] + [{}])[:2]
                    if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                        widgets.append(name)
                        if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                            widgets.append(name + ":control")
                        if opts.get("image_upload") or opts.get("video_upload"):
                            widgets.append("upload")
            assert len(node["widgets_values"]) == len(widgets), (path.stem, node["type"], widgets)


@pytest.mark.parametrize("name", sorted(p.stem for p in API.glob("*.json") if not uses_core_loaders(p)))
def test_each_api_workflow_runs_on_tiny_models_and_saves_its_output(server, name):
    prompt = tiny(name)
    history, events = server.run(prompt)
    errors = [e for e in events if e["type"] == "execution_error"]
    assert not errors, errors[0]["data"].get("exception_message")
    assert history["status"]["status_str"] == "success"
    save = node_id(prompt, "SaveImage" if "t2i" in name else "SaveVideo")
    items = history["outputs"][save]["images"]
    assert len(items) == 1
    if "t2i" in name:
        assert items[0]["filename"].endswith(".png")
    else:
        assert history["outputs"][save].get("animated") == [True]
        frames = video_frames(server, items[0])
        assert frames.shape == (FRAMES, H, W, 3)
    progress = [e for e in events if e["type"] == "progress" and e["data"]["node"] == node_id(prompt, "WanCoreSampler")]
    assert progress and progress[-1]["data"]["value"] == progress[-1]["data"]["max"] >= 1  # one tick per step


def test_an_interrupted_run_can_be_run_again_and_gives_the_uninterrupted_output(server):
    steps = 30
    prompt = tiny("wan_t2v_1.3B", steps=steps)
    sampler, save, dit = (node_id(prompt, c) for c in ("WanCoreSampler", "SaveVideo", "WanCoreLoadDiT"))
    prompt[save]["inputs"]["filename_prefix"] = "interrupted"
    seen = []

    def on_event(event):
        if event["type"] == "progress" and event["data"]["node"] == sampler:
            seen.append(event["data"]["value"])
            if len(seen) == 3:
                assert server.post("/interrupt", {})[0] == 200

    events = server.wait(server.queue(prompt), on_event)
    assert events[-1]["type"] == "execution_interrupted", events[-1]
    assert 3 <= max(seen) < steps, seen
    prompt[save]["inputs"]["filename_prefix"] = "after_interrupt"
    after, _ = server.run(prompt)
    # Another storage dtype (same numbers for these fp32 files) makes ComfyUI load and sample afresh.
    fresh_prompt = json.loads(json.dumps(prompt))
    fresh_prompt[dit]["inputs"]["weight_dtype"] = "fp32"
    fresh_prompt[save]["inputs"]["filename_prefix"] = "uninterrupted"
    fresh, fresh_events = server.run(fresh_prompt)
    assert any(e["type"] == "executing" and e["data"].get("node") == sampler for e in fresh_events)
    a = video_frames(server, after["outputs"][save]["images"][0])
    b = video_frames(server, fresh["outputs"][save]["images"][0])
    assert torch.equal(a, b)


@pytest.mark.parametrize("change, message", [
    ({"WanCoreLoadDiT": {"model_name": "no_such_model.safetensors"}}, "not in list"),
    ({"WanCoreEmptyVideoEmbeds": {"width": 833}}, "width 833 is not a multiple of 16"),
    ({"WanCoreEmptyVideoEmbeds": {"frames": 80}}, "frames 80 is not 4n+1"),
], ids=["missing_model", "width_833", "frames_80"])
def test_bad_input_is_refused_at_queue_time_and_the_server_keeps_serving(server, change, message):
    prompt = tiny("wan_t2v_1.3B")
    for cls, values in change.items():
        prompt[node_id(prompt, cls)]["inputs"].update(values)
    status, body = server.post("/prompt", {"prompt": prompt, "client_id": server.client_id})
    assert status == 400
    assert message in json.dumps(body["node_errors"]), body
    history, _ = server.run(tiny("wan_t2v_1.3B"))
    assert history["status"]["status_str"] == "success"


def test_an_i2v_graph_with_a_t2v_model_fails_with_a_clear_error_and_the_server_keeps_serving(server):
    prompt = tiny("wan_i2v_480p")
    prompt[node_id(prompt, "WanCoreLoadDiT")]["inputs"]["model_name"] = "wan_tiny_t2v.safetensors"
    history, events = server.run(prompt)
    errors = [e for e in events if e["type"] == "execution_error"]
    assert errors and errors[0]["data"]["node_type"] == "WanCoreSampler"
    assert "is a text-to-video model" in errors[0]["data"]["exception_message"]
    assert history["status"]["status_str"] == "error"
    ok, _ = server.run(tiny("wan_t2i_1.3B"))
    assert ok["status"]["status_str"] == "success"


@pytest.mark.parametrize("name, loader, index, value, node_type, message", [
    ("wan22_ti2v_5B_t2v", "WanCoreLoadVAE", 0, "wan_tiny_vae.safetensors", "WanCoreDecode", "Wan 2.2 VAE"),
    ("wan22_t2v_A14B_fp8_8GB", "WanCoreLoadDiT", 1, "wan22_tiny_i2v_low.safetensors", "WanCoreSampler",
     "not the two experts of one Wan 2.2 A14B model"),
], ids=["wan21_vae_in_ti2v_graph", "mismatched_experts"])
def test_a_wan21_wan22_mismatch_fails_with_a_clear_error_and_the_server_keeps_serving(
        server, name, loader, index, value, node_type, message):
    prompt = tiny(name)
    node = [k for k, v in prompt.items() if v["class_type"] == loader][index]
    prompt[node]["inputs"][hosttools.TINY[loader][0]] = value
    history, events = server.run(prompt)
    errors = [e for e in events if e["type"] == "execution_error"]
    assert errors and errors[0]["data"]["node_type"] == node_type
    assert message in errors[0]["data"]["exception_message"]
    ok, _ = server.run(tiny("wan22_ti2v_5B_t2v", seed=5))
    assert ok["status"]["status_str"] == "success"


def test_sampler_latents_round_trip_through_core_save_latent_and_load_latent(server):
    """A long sampling run saved with core Save Latent decodes later to the same video."""
    prompt = tiny("wan_t2v_1.3B", seed=1234)
    sampler, decode, save = (node_id(prompt, c) for c in ("WanCoreSampler", "WanCoreDecode", "SaveVideo"))
    prompt["100"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": "latents/wan"}}
    prompt[save]["inputs"]["filename_prefix"] = "direct"
    direct, _ = server.run(prompt)
    saved = direct["outputs"]["100"]["latents"][0]
    shutil.copy(server.base / "output" / saved["subfolder"] / saved["filename"], server.base / "input" / "wan.latent")
    later = {k: v for k, v in prompt.items() if k not in ("100", sampler)}
    later["101"] = {"class_type": "LoadLatent", "inputs": {"latent": "wan.latent"}}
    later[decode]["inputs"]["latent"] = ["101", 0]
    later[save]["inputs"]["filename_prefix"] = "from_latent"
    loaded, _ = server.run(later)
    assert loaded["status"]["status_str"] == "success"
    a = video_frames(server, direct["outputs"][save]["images"][0])
    b = video_frames(server, loaded["outputs"][save]["images"][0])
    assert torch.equal(a, b)


def test_memory_lora_step_cache_and_compile_options_run_through_the_server(server):
    prompt = tiny("wan_t2v_1.3B", steps=6, seed=4321)
    sampler, save = node_id(prompt, "WanCoreSampler"), node_id(prompt, "SaveVideo")
    prompt[save]["inputs"]["filename_prefix"] = "plain_options"
    plain, _ = server.run(prompt)
    prompt["200"] = {"class_type": "WanCoreLoraLoader",
                     "inputs": {"lora_name": "wan_tiny_lora.safetensors", "strength": 0.7}}
    prompt["201"] = {"class_type": "WanCoreStepCache",
                     "inputs": {"method": "teacache", "threshold": 0.0, "start_step": -1, "end_step": -1,
                                "mode": "e", "magcache_k": 2, "retention_ratio": 0.2}}
    prompt["202"] = {"class_type": "WanCoreMemoryOptions",
                     "inputs": {"vram_budget_gb": 8.0, "resident_blocks": 1, "text_encoder_on_cpu": "auto",
                                "vae_tile": "auto", "vae_tile_size": 512}}
    prompt["203"] = {"class_type": "WanCoreCompileOptions",
                     "inputs": {"backend": "eager", "mode": "default", "dynamic": "auto"}}
    prompt[sampler]["inputs"].update(loras=["200", 0], step_cache=["201", 0], memory=["202", 0], compile=["203", 0])
    prompt[save]["inputs"]["filename_prefix"] = "with_options"
    history, events = server.run(prompt)
    errors = [e for e in events if e["type"] == "execution_error"]
    assert not errors, errors[0]["data"].get("exception_message")
    a = video_frames(server, plain["outputs"][save]["images"][0])
    b = video_frames(server, history["outputs"][save]["images"][0])
    assert a.shape == b.shape and not torch.equal(a, b)   # the LoRA changed the video
    del prompt["200"], prompt[sampler]["inputs"]["loras"]
    prompt[save]["inputs"]["filename_prefix"] = "no_lora_options"
    again, _ = server.run(prompt)
    # step cache at threshold 0, block swap and a traced compile: the plain video, bit for bit
    assert torch.equal(video_frames(server, again["outputs"][save]["images"][0]), a)


def test_sampling_sends_latent_previews_when_the_server_has_a_preview_method(server):
    before = server.previews
    history, _ = server.run(tiny("wan_t2v_1.3B", steps=3, seed=99))
    assert history["status"]["status_str"] == "success"
    assert server.previews - before >= 3


def test_a_core_model_loaded_before_our_workflow_is_still_loaded_after_it(server):
    """Our nodes ask ComfyUI's memory manager for the bytes they need (free_memory) instead of
    unloading every model it holds: a core-managed model loaded first stays loaded (the
    server runs with --cpu, where the old unload_all_models() evicted it too)."""
    loaded, _ = server.run({"1": {"class_type": "HostProbeLoadModel", "inputs": {"size": 64}}})
    assert loaded["status"]["status_str"] == "success"
    history, _ = server.run(tiny("wan_t2v_1.3B", seed=777))
    assert history["status"]["status_str"] == "success"
    check, _ = server.run({"1": {"class_type": "HostProbeLoadedModels", "inputs": {"nonce": 777}}})
    assert check["outputs"]["1"]["loaded"] == [True]


def test_the_template_browser_lists_our_ui_workflows(server):
    templates = server.get("/api/workflow_templates")
    ours = {p.stem for p in (ROOT / "workflows").glob("*.json")}
    assert ours and set(templates["wan-core"]) == ours   # UI format only: workflows/api/ is not listed
    served = server.get("/api/workflow_templates/wan-core/wan_t2v_1.3B.json")
    assert served == json.loads((ROOT / "workflows" / "wan_t2v_1.3B.json").read_text())


# ------------------------------------------------------------------------- the graph editor itself

_LOAD_JS = r"""
(async (text) => {
  document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());
  await window.app.loadGraphData(JSON.parse(text), true, true, 'check');
  await new Promise(r => setTimeout(r, 300));
  const g = window.app.graph;
  const saved = Object.fromEntries(g.serialize().nodes.map(n => [n.id, n.widgets_values || []]));
  return JSON.stringify({
    // widgets: what the editor would save for the node after loading it
    nodes: g._nodes.map(n => ({id: n.id, type: n.type, registered: !!window.LiteGraph.registered_node_types[n.type],
                              has_errors: !!n.has_errors, widgets: saved[n.id]})),
    links: g.links.size ?? Object.keys(g.links).length,
    // the template browser opens by itself for a new user; any other dialog is a load problem
    dialogs: Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 300))
                  .filter(t => !t.startsWith('Get Started with a Template'))});
})
"""


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                return msg

    def eval(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        result = r.get("result", {})
        if "exceptionDetails" in result:
            raise AssertionError(result["exceptionDetails"])
        return result.get("result", {}).get("value")


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium to load the workflows in the ComfyUI frontend (apt-get install chromium)")
    port = free_port()
    proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
                             f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
                page = next(p for p in pages if p["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > end or proc.poll() is not None:
                    pytest.fail("headless Chromium did not start")
                time.sleep(0.5)
        b = Browser(websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60))
        b.call("Page.navigate", url=server.url + "/")
        end = time.monotonic() + 60
        while b.eval("!!(window.app && window.app.graph && window.LiteGraph)") is not True:
            if time.monotonic() > end:
                pytest.fail("the ComfyUI frontend did not load")
            time.sleep(0.5)
        yield b
        b.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _load_in_editor(browser: Browser, workflow: dict) -> dict:
    return json.loads(browser.eval(_LOAD_JS + f"({json.dumps(json.dumps(workflow))})"))


# ... and a workflow saved by the first release (before the memory / LoRA / step-cache inputs)
@pytest.mark.parametrize("path", sorted((ROOT / "workflows").glob("*.json"))
                         + [ROOT / "tests" / "data" / "saved_workflow_first_release.json"], ids=lambda p: p.stem)
def test_each_ui_workflow_loads_in_the_frontend_without_missing_nodes_or_widget_changes(browser, path):
    workflow = json.loads(path.read_text())
    loaded = _load_in_editor(browser, workflow)
    assert not loaded["dialogs"], loaded["dialogs"]
    assert loaded["links"] == len(workflow["links"])
    by_id = {n["id"]: n for n in loaded["nodes"]}
    assert sorted(by_id) == sorted(n["id"] for n in workflow["nodes"])
    for node in workflow["nodes"]:
        got = by_id[node["id"]]
        assert got["registered"] and not got["has_errors"], (path.stem, node["type"])
        assert got["widgets"] == node["widgets_values"], (path.stem, node["type"])


def test_the_frontend_check_notices_a_missingnode_id(browser):
    workflow = json.loads((ROOT / "workflows" / "wan_t2i_1.3B.json").read_text())
    workflow["nodes"][1]["type"] = "WanCoreNoSuchNode"
    loaded = _load_in_editor(browser, workflow)
    assert any("WanCoreNoSuchNode" in d for d in loaded["dialogs"])
    assert not next(n for n in loaded["nodes"] if n["type"] == "WanCoreNoSuchNode")["registered"]
