"""Example workflows: only known nodes, widget values in the frontend's order, typed links, and
API versions equal to the UI versions.

Widget order follows the ComfyUI frontend: widget inputs (INT, FLOAT, STRING, BOOLEAN,
combos) in definition order, required then optional, sockets skipped; an INT named seed /
noise_seed or with ``control_after_generate`` is followed by its control value; an upload
combo (LoadImage / LoadVideo) by the upload widget's value ``"image"``. Core nodes are
described below as 0.3.64 defines them; with COMFYUI_PATH set, their ids are also looked
up in that checkout (the host tests compare every widget against the live /object_info).
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path

import pytest

import nodepack

ROOT = nodepack.ROOT
UI = sorted((ROOT / "workflows").glob("*.json"))
API_DIR = ROOT / "workflows" / "api"
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CONTROL = {"fixed", "increment", "decrement", "randomize"}
EXPECTED = {"wan_t2v_1.3B_257_context_windows", "wan_i2v_480p_extend_x3", "wan_t2v_1.3B_loop",
            "wan_t2v_14B_fp8_8GB", "wan_i2v_480p", "wan_i2v_720p", "wan_flf2v_720p", "wan_v2v_1.3B", "wan_t2v_1.3B",
            "wan_t2i_1.3B", "wan_t2v_1.3B_core_encoders", "wan_t2v_1.3B_ksampler", "wan_vace_1.3B_reference_to_video",
            "wan_vace_1.3B_control_video", "wan_vace_1.3B_outpainting"}
EXPECTED |= {"wan22_t2v_A14B_fp8_8GB", "wan22_i2v_A14B", "wan22_ti2v_5B_t2v", "wan22_ti2v_5B_i2v"}   # Wan 2.2
EXPECTED |= {"wan_vace_1.3B_edge_control"}   # WanCore Control Preprocess -> VACE
EXPECTED |= {"wan_fun_control_1.3B", "wan_fun_inp_1.3B_first_last_frame"}   # Wan2.1-Fun (workflows/fun_workflows.py)
EXPECTED |= {"wan_t2v_14B_720p_4_gpus"}   # WanCore Multi-GPU Options (workflows/multigpu_workflows.py)

# Core nodes (ComfyUI 0.3.64): inputs in order as (name, type or combo options, widget?), output types.
ANY = None  # a combo listing files: any string
CORE = {
    "Note": ([("text", "STRING", True)], []),
    "LoadImage": ([("image", ANY, True), ("upload", ["image"], True)], ["IMAGE", "MASK"]),
    "LoadVideo": ([("file", ANY, True), ("upload", ["image"], True)], ["VIDEO"]),
    "GetVideoComponents": ([("video", "VIDEO", False)], ["IMAGE", "AUDIO", "FLOAT"]),
    "ImageFromBatch": ([("image", "IMAGE", False), ("batch_index", "INT", True), ("length", "INT", True)], ["IMAGE"]),
    "ImageScale": ([("image", "IMAGE", False),
                    ("upscale_method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], True),
                    ("width", "INT", True), ("height", "INT", True), ("crop", ["disabled", "center"], True)],
                   ["IMAGE"]),
    "CreateVideo": ([("images", "IMAGE", False), ("fps", "FLOAT", True), ("audio", "AUDIO", False)], ["VIDEO"]),
    "SaveVideo": ([("video", "VIDEO", False), ("filename_prefix", "STRING", True), ("format", ["auto", "mp4"], True),
                   ("codec", ["auto", "h264"], True)], []),
    "ImagePadForOutpaint": ([("image", "IMAGE", False), ("left", "INT", True), ("top", "INT", True),
                             ("right", "INT", True), ("bottom", "INT", True), ("feathering", "INT", True)],
                            ["IMAGE", "MASK"]),
    "SaveImage": ([("images", "IMAGE", False), ("filename_prefix", "STRING", True)], []),
    "CLIPLoader": ([("clip_name", ANY, True), ("type", ANY, True), ("device", ["default", "cpu"], True)], ["CLIP"]),
    "CLIPTextEncode": ([("text", "STRING", True), ("clip", "CLIP", False)], ["CONDITIONING"]),
    "VAELoader": ([("vae_name", ANY, True)], ["VAE"]),
    "VAEDecode": ([("samples", "LATENT", False), ("vae", "VAE", False)], ["IMAGE"]),
    "EmptyHunyuanLatentVideo": ([("width", "INT", True), ("height", "INT", True), ("length", "INT", True),
                                 ("batch_size", "INT", True)], ["LATENT"]),
    "KSampler": ([("model", "MODEL", False), ("seed", "INT", True), ("steps", "INT", True), ("cfg", "FLOAT", True),
                  ("sampler_name", ANY, True), ("scheduler", ANY, True), ("positive", "CONDITIONING", False),
                  ("negative", "CONDITIONING", False), ("latent_image", "LATENT", False), ("denoise", "FLOAT", True)],
                 ["LATENT"]),
}
FRONTEND_ONLY = {"Note"}


@pytest.fixture(scope="module")
def specs():
    """Every node type -> (inputs [(name, type | options | ANY, widget?, opts)], output types)."""
    pack = nodepack.load_pack()
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "folder_paths", nodepack.fake_folder_paths({}))
    try:
        out = {k: ([(n, t, w, {}) for n, t, w in ins], outs) for k, (ins, outs) in CORE.items()}
        for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
            d = cls.INPUT_TYPES()
            ins = []
            for section in ("required", "optional"):
                for name, (kind, opts) in d.get(section, {}).items():
                    is_combo = isinstance(kind, list)
                    kind = (kind or ANY) if is_combo else kind
                    ins.append((name, kind, is_combo or kind in WIDGETS, opts))
            out[node_id] = (ins, list(cls.RETURN_TYPES))
        return out
    finally:
        mp.undo()


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _expected_widgets(spec_inputs) -> list[tuple[str, object, dict, bool]]:
    """(name, type, opts, is_control) per widget slot, in the frontend's order."""
    out = []
    for name, kind, widget, opts in spec_inputs:
        if not widget:
            continue
        out.append((name, kind, opts, False))
        if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
            out.append((name, CONTROL, opts, True))
    return out


def _check_value(where: str, kind, opts: dict, value) -> None:
    if kind is ANY:
        assert isinstance(value, str) and value, where
    elif isinstance(kind, (list, set)):
        assert value in kind, f"{where}: {value!r} not in {sorted(kind)}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where


def test_every_example_workflow_exists_in_ui_and_api_format():
    assert {p.stem for p in UI} == EXPECTED
    assert {p.stem for p in API_DIR.glob("*.json")} == EXPECTED


@pytest.mark.parametrize("path", UI, ids=lambda p: p.stem)
def test_workflow_uses_only_known_nodes_and_has_a_download_note(path, specs):
    wf = _load(path)
    assert wf["version"] == 0.4 and {"nodes", "links", "last_node_id", "last_link_id"} <= set(wf)
    types = [n["type"] for n in wf["nodes"]]
    assert set(types) <= set(specs), set(types) - set(specs)
    assert any(t.startswith("WanCore") for t in types)
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    for n in wf["nodes"]:
        for key, folder in (("model_name", "diffusion_models"), ("vae_name", "vae"),
                            ("text_encoder_name", "text_encoders"), ("clip_name", "clip_vision")):
            names = [name for name, *_ in specs[n["type"]][0]]
            if key in names:
                value = n["widgets_values"][names.index(key)]
                folder = "text_encoders" if n["type"] == "CLIPLoader" else folder   # core Load CLIP: umT5
                assert f"{folder}/{value}" in notes[0] and f"models/{folder}/" in notes[0], (path.stem, value)


@pytest.mark.parametrize("path", UI, ids=lambda p: p.stem)
def test_widget_values_follow_each_nodes_widget_order_with_fixed_seed_control(path, specs):
    for n in _load(path)["nodes"]:
        expected = _expected_widgets(specs[n["type"]][0])
        values = n.get("widgets_values", [])
        where = f"{path.stem} node {n['id']} {n['type']}"
        assert len(values) == len(expected), f"{where}: {len(values)} widget values, expected {len(expected)}"
        for (name, kind, opts, is_control), value in zip(expected, values):
            _check_value(f"{where}.{name}", kind, opts, value)
            if is_control:
                assert value == "fixed", f"{where}: example workflows use 'fixed' seeds"


@pytest.mark.parametrize("path", UI, ids=lambda p: p.stem)
def test_links_connect_matching_types_and_agree_with_the_nodes(path, specs):
    wf = _load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max((link[0] for link in wf["links"]), default=0)
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out_types = specs[nodes[src]["type"]][1]
        assert out_types[src_slot] == kind, (path.stem, link_id)
        socket = nodes[dst]["inputs"][dst_slot]
        assert socket["link"] == link_id and socket["type"] == kind, (path.stem, link_id)
        sockets = [(name, k) for name, k, widget, _ in specs[nodes[dst]["type"]][0] if not widget]
        assert (socket["name"], kind) in sockets, (path.stem, link_id, socket["name"])
        assert link_id in nodes[src]["outputs"][src_slot]["links"], (path.stem, link_id)
    for n in wf["nodes"]:
        required = [name for name, kind, widget, opts in specs[n["type"]][0] if not widget]
        linked = {s["name"] for s in n["inputs"] if s["link"] is not None}
        optional = {"audio", "end_image", "latent", "memory", "loras", "step_cache", "compile", "context", "guidance",
                    "control_video", "control_mask", "reference_images", "low_noise_model", "moe", "multi_gpu",
                    "reference_image"}
        assert set(required) - optional <= linked, (path.stem, n["type"], set(required) - linked)


@pytest.mark.parametrize("path", UI, ids=lambda p: p.stem)
def test_api_version_equals_the_ui_version(path, specs):
    ui, api = _load(path), _load(API_DIR / path.name)
    nodes = [n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY]
    assert sorted(api) == sorted(str(n["id"]) for n in nodes)
    links = {link[0]: link for link in ui["links"]}
    for n in nodes:
        entry = api[str(n["id"])]
        assert entry["class_type"] == n["type"]
        expected = {}
        values = iter(n["widgets_values"])
        for name, kind, opts, is_control in _expected_widgets(specs[n["type"]][0]):
            value = next(values)
            if not is_control and name != "upload":
                expected[name] = value
        for s in n["inputs"]:
            if s["link"] is not None:
                link = links[s["link"]]
                expected[s["name"]] = [str(link[1]), link[2]]
        assert entry["inputs"] == expected, (path.stem, n["id"])


@pytest.mark.parametrize("path", UI, ids=lambda p: p.stem)
def test_sizes_in_the_workflows_pass_the_nodes_queue_time_checks(path):
    pack = nodepack.load_pack()
    for entry in _load(API_DIR / path.name).values():
        cls = pack.NODE_CLASS_MAPPINGS.get(entry["class_type"])
        if cls is not None and hasattr(cls, "VALIDATE_INPUTS"):
            names = inspect.signature(cls.VALIDATE_INPUTS).parameters
            args = {k: v for k, v in entry["inputs"].items() if k in names and not isinstance(v, list)}
            if "latent" in names and "latent" in entry["inputs"]:
                args["latent"] = None
            assert cls.VALIDATE_INPUTS(**args) is True, (path.stem, entry["class_type"])


def test_workflow_files_are_what_the_builder_writes(specs):
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "workflows" / "build_workflows.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "folder_paths", nodepack.fake_folder_paths({}))
    try:
        graphs = builder.graphs(builder.all_specs())
    finally:
        mp.undo()
    for name, g in graphs.items():
        assert _load(ROOT / "workflows" / f"{name}.json") == json.loads(json.dumps(g.ui())), name
        assert _load(API_DIR / f"{name}.json") == json.loads(json.dumps(g.api())), name


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set")
def test_core_node_ids_exist_in_the_comfyui_checkout():
    src = Path(os.environ["COMFYUI_PATH"])
    text = (src / "nodes.py").read_text() + "".join(p.read_text() for p in (src / "comfy_extras").glob("*.py"))
    for node_id in set(CORE) - FRONTEND_ONLY:
        assert re.search(rf'node_id="{node_id}"|"{node_id}":\s*\w+', text), node_id


def test_a_workflow_saved_by_the_first_release_still_matches_every_node(specs):
    """tests/data/saved_workflow_first_release.json is wan_i2v_480p as first shipped (before the
    memory / LoRA / step-cache inputs): its widget values must still line up with each node's
    widgets (new inputs are sockets, or optional widgets after all old ones) and its sockets
    must still exist with the same types."""
    wf = _load(ROOT / "tests" / "data" / "saved_workflow_first_release.json")
    for n in wf["nodes"]:
        expected = _expected_widgets(specs[n["type"]][0])
        values = n.get("widgets_values", [])
        where = f"first-release node {n['id']} {n['type']}"
        assert len(values) <= len(expected), where
        assert all(not isinstance(kind, str) or kind in WIDGETS or kind is ANY
                   for _name, kind, _opts, _c in expected[len(values):]), where
        for (name, kind, opts, _is_control), value in zip(expected, values):
            _check_value(f"{where}.{name}", kind, opts, value)
        sockets = {(name, k) for name, k, widget, _ in specs[n["type"]][0] if not widget}
        assert {(s["name"], s["type"]) for s in n["inputs"]} <= sockets, where
