"""Our nodes in a real ComfyUI server through its V3 path (level 3, issue 15 part 4).

ComfyUI (0.3.64) registers a module's ``comfy_entrypoint`` extension only when the module has
no ``NODE_CLASS_MAPPINGS``; the pack then exports only the entry point, and every node it
declares (in the V1 style, read by nodes/schema.py) reaches the host as an ``io.ComfyNode``
rendered by nodes/v3.py. Checked here:

- the classes ComfyUI holds for every WanCore id are ``io.ComfyNode`` subclasses (a probe
  node reads ``nodes.NODE_CLASS_MAPPINGS`` inside the server);
- ``/object_info`` of every node equals its V1 declaration (names, order, types, defaults,
  limits, tooltips, options, outputs, category, description, display name) and the frozen
  snapshot; widgets of the saved workflows are checked by tests/host/test_comfyui_host.py,
  which runs against the same V3 registration;
- queue-time validation is V1's: combo values outside their list, min / max, our
  VALIDATE_INPUTS messages;
- V1 features the V3 rendering forwards, on probe nodes rendered by the pack's renderer:
  hidden inputs under the V1 parameter names, ``{"ui", "result"}`` returns, output nodes,
  ``IS_CHANGED`` -> ``fingerprint_inputs`` (a node re-runs when it says so), lazy inputs
  with ``check_lazy_status`` (an input not asked for is never computed).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hosttools  # noqa: E402
from hosttools import ROOT, node_id, tiny  # noqa: E402

hosttools.require_comfyui()
pytestmark = pytest.mark.host

SNAPSHOT = ROOT / "tests" / "data" / "node_inputs_snapshot.json"
FILES = "<model files>"

# V1 probe classes rendered through the pack's own renderer (a second copy of the pack loaded by
# path) and registered with a comfy_entrypoint: the probe module itself is a V3 extension.
_PROBE = r'''
import importlib.util

import nodes as comfy_nodes
from comfy_api.latest import ComfyExtension, io

CALLS = {"count": 0}


def _pack():
    spec = importlib.util.spec_from_file_location("wancore_v3_probe_pack", "ROOT/__init__.py",
                                                  submodule_search_locations=["ROOT"])
    module = importlib.util.module_from_spec(spec)
    import sys
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _node(name, inputs, returns=(), run=None, **attrs):
    return type(name, (), {"CATEGORY": "testing", "DESCRIPTION": name, "FUNCTION": "run", "RETURN_TYPES": returns,
                           "INPUT_TYPES": classmethod(lambda cls: inputs), "run": run, **attrs})


def registry(self, nonce, node=None, graph=None):
    ours = {k: v for k, v in comfy_nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("WanCore")}
    return {"ui": {"v3": sorted(k for k, v in ours.items() if issubclass(v, io.ComfyNode)),
                   "v1": sorted(k for k, v in ours.items() if not issubclass(v, io.ComfyNode)),
                   "node": [node], "graph": [sorted(graph) if isinstance(graph, dict) else None]}}


def count(self, value):
    CALLS["count"] += 1
    return {"ui": {"calls": [CALLS["count"]]}, "result": (value,)}


def fail(self, value):
    raise RuntimeError("V3ProbeFail ran: a lazy input that was not asked for was computed")


def pick(self, use_b, a, b=None):
    return {"ui": {"picked": [b if use_b else a]}}


CLASSES = {
    "V3ProbeRegistry": _node("V3ProbeRegistry", {"required": {"nonce": ("INT", {"default": 0, "tooltip": "n"})},
                                                 "hidden": {"node": "UNIQUE_ID", "graph": "PROMPT"}},
                             run=registry, OUTPUT_NODE=True),
    "V3ProbeCount": _node("V3ProbeCount", {"required": {"value": ("INT", {"default": 0, "tooltip": "v"})}}, ("INT",),
                          run=count, OUTPUT_NODE=True, IS_CHANGED=classmethod(lambda cls, value: CALLS["count"])),
    "V3ProbeFail": _node("V3ProbeFail", {"required": {"value": ("INT", {"default": 0, "tooltip": "v"})}}, ("INT",),
                         run=fail),
    "V3ProbePick": _node("V3ProbePick", {"required": {"use_b": ("BOOLEAN", {"default": False, "tooltip": "u"}),
                                                      "a": ("INT", {"default": 1, "tooltip": "a"})},
                                         "optional": {"b": ("INT", {"lazy": True, "forceInput": True,
                                                                    "tooltip": "b"})}},
                         run=pick, OUTPUT_NODE=True,
                         check_lazy_status=lambda self, use_b, a, b=None: ["b"] if use_b and b is None else []),
}


async def comfy_entrypoint():
    rendered = _pack().nodes.v3.render_nodes(io, CLASSES, {})

    class Probes(ComfyExtension):
        async def get_node_list(self):
            return rendered

    return Probes()
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    probe = _PROBE.replace("ROOT", str(ROOT))
    base = hosttools.base_directory(tmp_path_factory.mktemp("comfy_v3"), "v3_probe.py", probe)
    with hosttools.comfyui(base) as srv:
        yield srv


@pytest.fixture(scope="module")
def v1_server(tmp_path_factory, server):
    """The same pack with WANCORE_V1_NODES=1: the V1 classes, as older hosts load them."""
    probe = _PROBE.replace("ROOT", str(ROOT))
    base = hosttools.base_directory(tmp_path_factory.mktemp("comfy_v1"), "v3_probe.py", probe)
    saved = os.environ.get("WANCORE_V1_NODES")
    os.environ["WANCORE_V1_NODES"] = "1"   # the server process inherits it
    try:
        with hosttools.comfyui(base) as srv:
            yield srv
    finally:
        if saved is None:
            os.environ.pop("WANCORE_V1_NODES", None)
        else:
            os.environ["WANCORE_V1_NODES"] = saved


@pytest.fixture(scope="module")
def pack():
    import nodepack

    return nodepack.load_pack()


@pytest.fixture(scope="module")
def declared(pack):
    """Every node's V1 INPUT_TYPES, model-file combos listing FILES."""
    import nodepack

    fake = nodepack.fake_folder_paths({})
    fake.get_filename_list = lambda key: [FILES]
    saved = sys.modules.get("folder_paths")
    sys.modules["folder_paths"] = fake
    try:
        return {k: cls.INPUT_TYPES() for k, cls in pack.NODE_CLASS_MAPPINGS.items()}
    finally:
        if saved is None:
            sys.modules.pop("folder_paths", None)
        else:
            sys.modules["folder_paths"] = saved


def _run_ok(server, prompt):
    history, events = server.run(prompt)
    errors = [e for e in events if e["type"] == "execution_error"]
    assert not errors, errors[0]["data"].get("exception_message")
    return history, events


def test_every_wancore_node_is_registered_as_a_v3_comfy_node(server, pack):
    history, _ = _run_ok(server, {"7": {"class_type": "V3ProbeRegistry", "inputs": {"nonce": 1}}})
    ui = history["outputs"]["7"]
    assert ui["v3"] == sorted(pack.NODE_CLASS_MAPPINGS) and ui["v1"] == []
    # hidden inputs reach the V1 function under its own parameter names (node=UNIQUE_ID, graph=PROMPT)
    assert ui["node"] == ["7"] and ui["graph"] == [["7"]]
    info = server.get("/object_info/WanCoreSampler")["WanCoreSampler"]
    assert info["deprecated"] is False and info["experimental"] is False   # V3's node info (V1 omits them)
    assert "comfy_entrypoint" not in server.log.read_text()   # ComfyUI's warnings when an entry point fails


def _combo(kind, opts):
    """A V1 (list) or V3 ("COMBO", {"options"}) combo as (choices, options without the V3 additions)."""
    if isinstance(kind, list):
        return kind, opts
    extra = {"options", "multiselect"}
    assert opts.get("multiselect", False) is False
    return opts["options"], {k: v for k, v in opts.items() if k not in extra}


def test_object_info_of_every_node_equals_its_v1_declaration_and_the_snapshot(server, pack, declared):
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("WanCore")}
    assert set(ours) == set(pack.NODE_CLASS_MAPPINGS)
    for nid, cls in pack.NODE_CLASS_MAPPINGS.items():
        got, spec = ours[nid], declared[nid]
        for section in ("required", "optional"):
            assert got["input_order"].get(section, []) == list(spec.get(section, {})), (nid, section)
            for name, (kind, opts) in spec.get(section, {}).items():
                g_kind, g_opts = got["input"][section][name]
                if isinstance(kind, list):
                    assert g_kind == "COMBO", (nid, name)
                    choices, g_opts = _combo(g_kind, g_opts)
                    if kind == [FILES]:   # the server's model folders
                        assert isinstance(choices, list) and all(isinstance(c, str) for c in choices), (nid, name)
                    else:
                        assert choices == kind, (nid, name)
                else:
                    assert g_kind == kind, (nid, name)
                if kind == "STRING" and "multiline" not in opts:
                    assert g_opts.pop("multiline") is False      # V3 states the single-line default
                assert g_opts == json.loads(json.dumps(opts)), (nid, name)
        assert list(got["input"].get("hidden", {})) == list(spec.get("hidden", {})), nid
        assert got["output"] == list(cls.RETURN_TYPES) and got["output_name"] == list(cls.RETURN_NAMES)
        assert got["output_tooltips"] == list(cls.OUTPUT_TOOLTIPS) and got["output_is_list"] == [False] * len(
            cls.RETURN_TYPES)
        assert (got["category"], got["description"], got["display_name"]) == (
            cls.CATEGORY, cls.DESCRIPTION, pack.NODE_DISPLAY_NAME_MAPPINGS[nid])
        assert got["output_node"] is False and got["python_module"] == "custom_nodes.wan-core"
    # the frozen record of saved workflows: every recorded input in place (names, order, types, defaults)
    for nid, was in json.loads(SNAPSHOT.read_text()).items():
        got = ours[nid]
        inputs = [(s, n) for s in ("required", "optional") for n in got["input_order"].get(s, [])]
        assert inputs[:len(was["inputs"])] == [(i["section"], i["name"]) for i in was["inputs"]], nid
        for item, (section, name) in zip(was["inputs"], inputs):
            kind, opts = got["input"][section][name]
            assert kind == item["type"], (nid, name)
            assert opts.get("default") == item.get("default"), (nid, name)
            assert bool(opts.get("control_after_generate")) == bool(item.get("control_after_generate")), (nid, name)
            if isinstance(item.get("options"), list):
                assert set(item["options"]) <= set(opts["options"]), (nid, name)
        assert got["output"][:len(was["return_types"])] == was["return_types"], nid


@pytest.mark.parametrize("cls, values, message", [
    ("WanCoreSampler", {"sampler": "ddim"}, "'ddim' not in list"),
    ("WanCoreLoadDiT", {"model_name": "no_such_model.safetensors"}, "not in list"),
    ("WanCoreSampler", {"steps": 0}, "Value 0 smaller than min of 1"),
    ("WanCoreSampler", {"denoise": 0.6}, "connect the input video's LATENT"),
    ("WanCoreEmptyVideoEmbeds", {"frames": 80}, "frames 80 is not 4n+1"),
], ids=["combo", "model_file", "min", "validate_inputs", "size"])
def test_queue_time_validation_is_the_v1_one(server, cls, values, message):
    prompt = tiny("wan_t2v_1.3B")
    prompt[node_id(prompt, cls)]["inputs"].update(values)
    status, body = server.post("/prompt", {"prompt": prompt, "client_id": server.client_id})
    assert status == 400, body
    assert message in json.dumps(body["node_errors"]), body


def test_a_workflow_runs_with_progress_on_the_sampler_node(server):
    prompt = tiny("wan_t2v_1.3B")
    history, events = _run_ok(server, prompt)
    assert history["status"]["status_str"] == "success"
    sampler = node_id(prompt, "WanCoreSampler")
    progress = [e for e in events if e["type"] == "progress" and e["data"]["node"] == sampler]
    assert progress and progress[-1]["data"]["value"] == progress[-1]["data"]["max"]   # unique_id reached it


def test_is_changed_makes_a_node_run_again_through_fingerprint_inputs(server):
    prompt = {"1": {"class_type": "V3ProbeCount", "inputs": {"value": 5}}}
    first, _ = _run_ok(server, prompt)
    second, _ = _run_ok(server, prompt)   # same inputs; IS_CHANGED returns the call count: runs again
    assert second["outputs"]["1"]["calls"] == [first["outputs"]["1"]["calls"][0] + 1]


def test_a_lazy_input_is_computed_only_when_check_lazy_status_asks_for_it(server):
    prompt = {"1": {"class_type": "V3ProbeFail", "inputs": {"value": 3}},
              "2": {"class_type": "V3ProbePick", "inputs": {"use_b": False, "a": 4, "b": ["1", 0]}}}
    history, _ = _run_ok(server, prompt)
    assert history["outputs"]["2"]["picked"] == [4]
    prompt["2"]["inputs"]["use_b"] = True
    history, events = server.run(prompt)
    errors = [e for e in events if e["type"] == "execution_error"]
    assert errors and "V3ProbeFail ran" in errors[0]["data"]["exception_message"]


def _comparable(info: dict) -> dict:
    """A node's /object_info entry with the differences of form between V1 and V3 taken out:
    combos as V1 lists (V3: ("COMBO", {"options", "multiselect"})), hidden values as strings,
    V3's explicit False for single-line strings and for deprecated / experimental / api_node."""
    out = {k: v for k, v in info.items() if not (k in ("deprecated", "experimental", "api_node") and v is False)}
    inputs = {}
    for section, entries in info["input"].items():
        inputs[section] = {}
        for name, entry in entries.items():
            if section == "hidden":
                inputs[section][name] = entry[0] if isinstance(entry, list) else entry
                continue
            kind, opts = entry[0], dict(entry[1]) if len(entry) > 1 else {}
            if kind == "COMBO":
                kind = opts.pop("options")
                assert opts.pop("multiselect", False) is False
            if opts.get("multiline") is False:
                del opts["multiline"]
            inputs[section][name] = [kind, opts]
    out["input"] = inputs
    out["input_order"] = {k: v for k, v in info["input_order"].items() if v}
    return out


def test_the_v1_fallback_registers_the_same_nodes_and_runs_the_same_workflow(server, v1_server, pack):
    history, _ = _run_ok(v1_server, {"7": {"class_type": "V3ProbeRegistry", "inputs": {"nonce": 2}}})
    assert history["outputs"]["7"]["v1"] == sorted(pack.NODE_CLASS_MAPPINGS)
    assert history["outputs"]["7"]["v3"] == []
    v1_info, v3_info = v1_server.get("/object_info"), server.get("/object_info")
    for nid in pack.NODE_CLASS_MAPPINGS:   # every field, every input, as the frontend reads them
        assert _comparable(v3_info[nid]) == _comparable(v1_info[nid]), nid
    prompt = tiny("wan_t2v_1.3B", seed=2024)
    save = node_id(prompt, "SaveVideo")
    outputs = []
    for srv in (v1_server, server):
        history, _ = _run_ok(srv, prompt)
        outputs.append(hosttools.video_frames(srv, history["outputs"][save]["images"][0]))
    assert outputs[0].shape == outputs[1].shape and (outputs[0] == outputs[1]).all()
