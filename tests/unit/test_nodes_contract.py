"""Node contract without ComfyUI: metadata, tooltips, import rules, and the saved-workflow snapshot.

A saved workflow stores widget values by position and an API graph by input name, so a node
id, an input's name, type, position or default never changes once released; new inputs are
only appended as optional ones (``tests/data/node_inputs_snapshot.json`` is the record; set
WANCORE_UPDATE_SNAPSHOT=1 to write it after an allowed change).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import sys

import pytest

import nodepack

ROOT = nodepack.ROOT
SNAPSHOT = ROOT / "tests" / "data" / "node_inputs_snapshot.json"
FILES = "<model files>"  # what the fake folder_paths lists, so file combos are recognisable
HOST_MODULES = {"comfy", "folder_paths", "latent_preview", "server", "comfy_api", "comfy_extras", "execution",
                "nodes"}


@pytest.fixture(scope="module")
def pack():
    return nodepack.load_pack()


@pytest.fixture()
def folder_paths(monkeypatch):
    fake = nodepack.fake_folder_paths({})
    fake.get_filename_list = lambda key: [FILES]
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    return fake


def _nodes(pack):
    return sorted(pack.NODE_CLASS_MAPPINGS.items())


def _entries(spec: dict):
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            yield section, name, entry


def test_every_node_id_is_prefixed_registered_and_named(pack):
    assert pack.NODE_CLASS_MAPPINGS, "the pack registers no nodes"
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in _nodes(pack):
        assert node_id.startswith("WanCore") and cls.__name__ == node_id
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("WanCore ")


def test_every_node_has_category_description_function_and_consistent_outputs(pack):
    for node_id, cls in _nodes(pack):
        assert cls.CATEGORY.startswith("WanCore/"), node_id
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20, node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES, node_id
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS), node_id
        assert all(isinstance(t, str) and t for t in cls.OUTPUT_TOOLTIPS), node_id
        for t in cls.RETURN_TYPES:
            assert t in ("IMAGE", "MASK", "LATENT", "MODEL") or t.startswith("WANCORE_"), (node_id, t)


def test_input_types_are_well_formed_with_a_tooltip_on_every_input(pack, folder_paths):
    for node_id, cls in _nodes(pack):
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, node_id
        for section, name, entry in _entries(spec):
            assert isinstance(entry, tuple) and len(entry) == 2, (node_id, name)
            kind, opts = entry
            assert isinstance(opts, dict) and isinstance(opts.get("tooltip"), str) and opts["tooltip"], (node_id, name)
            if isinstance(kind, list):
                assert kind and all(isinstance(o, str) for o in kind), (node_id, name)
                assert opts.get("default", kind[0]) in kind, (node_id, name)
            elif kind in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], (node_id, name)
            else:
                assert isinstance(kind, str) and kind, (node_id, name)
        for name, value in spec.get("hidden", {}).items():
            assert value in ("UNIQUE_ID", "PROMPT", "DYNPROMPT", "EXTRA_PNGINFO"), (node_id, name)


def test_node_functions_accept_exactly_the_declared_inputs(pack, folder_paths):
    import inspect

    for node_id, cls in _nodes(pack):
        spec = cls.INPUT_TYPES()
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        declared = [n for _s, n, _e in _entries(spec)] + list(spec.get("hidden", {}))
        assert [p for p in params if p != "self"] == declared, node_id
        for _s, name, _e in _entries({"optional": spec.get("optional", {})}):
            assert params[name].default is None, (node_id, name)


def test_only_host_module_imports_comfyui_and_all_pack_imports_are_relative():
    for path in sorted((ROOT / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [(node.module or "").split(".")[0]]
            else:
                continue
            assert "wan_core" not in names, f"{path.name}: import wan_core relatively (from ..wan_core)"
            if path.name != "host.py":
                assert not HOST_MODULES & set(names), f"{path.name} imports {names}; only host.py may"
            else:
                # host.py imports the host lazily (inside functions), never at module level
                assert not (HOST_MODULES & set(names)) or node not in tree.body, f"host.py imports {names} eagerly"


def test_video_size_validation_refuses_bad_sizes_at_queue_time(pack):
    nodes = pack.nodes
    for cls in (nodes.WanCoreEmptyVideoEmbeds, nodes.WanCoreImageToVideoEncode):
        assert cls.VALIDATE_INPUTS(width=832, height=480, frames=81) is True
        err = cls.VALIDATE_INPUTS(width=833, height=480, frames=81)
        assert isinstance(err, str) and "width 833" in err and "832" in err and "848" in err
        err = cls.VALIDATE_INPUTS(width=832, height=480, frames=80)
        assert isinstance(err, str) and "frames 80" in err and "77" in err and "81" in err
        assert "above" in cls.VALIDATE_INPUTS(width=8192, height=480, frames=81)
        assert cls.VALIDATE_INPUTS(width=None, height=480, frames=81) is True   # linked: checked at run time


def test_node_side_engine_constants_equal_the_engines(pack):
    """The pack imports no engine at import time, so nodes/types.py repeats a few constants;
    they must stay the engine's (as test_limits checks the widget limits)."""
    types, wc = pack.nodes.types, pack.wan_core
    assert types.SAMPLERS == tuple(wc.schedulers.SAMPLERS)                 # same names, same order
    assert types.LATENT_CHANNELS == wc.configs.LATENT_CHANNELS
    assert types.VAE_SPACE_STRIDE == wc.configs.VAE_SPACE_STRIDE
    assert pack.nodes.WanCoreSampler.INPUT_TYPES()["required"]["sampler"][0] == list(wc.schedulers.SAMPLERS)


def test_sampler_refuses_partial_denoise_without_an_input_latent_at_queue_time(pack):
    sampler = pack.nodes.WanCoreSampler
    assert sampler.VALIDATE_INPUTS(denoise=1.0) is True
    assert "latent" in sampler.VALIDATE_INPUTS(denoise=0.6)
    assert sampler.VALIDATE_INPUTS(denoise=0.6, latent=None) is True    # connected, value not computed yet
    assert isinstance(sampler.VALIDATE_INPUTS(denoise=0.0, latent=None), str)


# ------------------------------------------------------------------------------------------ snapshot

def describe(pack) -> dict:
    """Every node's inputs (section, name, type, default; combo options) and return types, in order."""
    out = {}
    for node_id, cls in _nodes(pack):
        inputs = []
        for section, name, (kind, opts) in _entries(cls.INPUT_TYPES()):
            item = {"section": section, "name": name}
            if isinstance(kind, list):
                item["type"] = "COMBO"
                item["options"] = "files" if kind == [FILES] else kind
            else:
                item["type"] = kind
            if "default" in opts:
                item["default"] = opts["default"]
            if opts.get("control_after_generate"):
                item["control_after_generate"] = True
            inputs.append(item)
        out[node_id] = {"inputs": inputs, "return_types": list(cls.RETURN_TYPES)}
    return out


def _compatible(old: dict, new: dict) -> list[str]:
    problems = []
    for node_id, was in old.items():
        now = new.get(node_id)
        if now is None:
            problems.append(f"{node_id}: node removed or renamed")
            continue
        if now["return_types"][:len(was["return_types"])] != was["return_types"]:
            problems.append(f"{node_id}: outputs changed {was['return_types']} -> {now['return_types']}")
        for i, a in enumerate(was["inputs"]):
            if i >= len(now["inputs"]):
                problems.append(f"{node_id}: input {a['name']} removed")
                continue
            b = now["inputs"][i]
            for key in ("name", "section", "type", "default", "control_after_generate"):
                if a.get(key) != b.get(key):
                    problems.append(f"{node_id}: input #{i} {a['name']}: {key} {a.get(key)!r} -> {b.get(key)!r}")
            if isinstance(a.get("options"), list):
                lost = [o for o in a["options"] if o not in (b.get("options") or [])]
                if lost:
                    problems.append(f"{node_id}: {a['name']} lost options {lost}")
        for b in now["inputs"][len(was["inputs"]):]:
            if b["section"] != "optional":
                problems.append(f"{node_id}: new input {b['name']} must be optional (appended at the end)")
    return problems


def test_node_inputs_match_the_recorded_snapshot(pack, folder_paths):
    current = describe(pack)
    if os.environ.get("WANCORE_UPDATE_SNAPSHOT") == "1" or not SNAPSHOT.exists():
        if SNAPSHOT.exists():
            assert not _compatible(json.loads(SNAPSHOT.read_text()), current)
        SNAPSHOT.write_text(json.dumps(current, indent=1, ensure_ascii=False) + "\n")
    recorded = json.loads(SNAPSHOT.read_text())
    problems = _compatible(recorded, current)
    assert not problems, "saved workflows would break:\n" + "\n".join(problems)


def test_snapshot_rule_allows_appending_optional_inputs_only():
    base = {"N": {"inputs": [{"section": "required", "name": "a", "type": "INT", "default": 1}],
                  "return_types": ["LATENT"]}}
    grown = json.loads(json.dumps(base))
    grown["N"]["inputs"].append({"section": "optional", "name": "b", "type": "INT", "default": 0})
    assert _compatible(base, grown) == []
    required = json.loads(json.dumps(grown))
    required["N"]["inputs"][1]["section"] = "required"
    assert _compatible(base, required)
    renamed = json.loads(json.dumps(base))
    renamed["N"]["inputs"][0]["name"] = "x"
    assert _compatible(base, renamed)
    reordered = {"N": {"inputs": list(reversed(grown["N"]["inputs"])), "return_types": ["LATENT"]}}
    assert _compatible(grown, reordered)
    assert _compatible(base, {})


def test_memory_lora_and_step_cache_reach_existing_nodes_as_optional_sockets_only(pack, folder_paths):
    """Saved workflows keep their widget values: the options arrive as WANCORE_* sockets, and
    the DiT loader's new fp8 storage choices are appended after the original options."""
    nodes = pack.NODE_CLASS_MAPPINGS
    expected = {"WanCoreLoadDiT": ["memory", "loras"], "WanCoreSampler": ["latent", "memory", "loras", "step_cache", "compile",
                                                                          "context", "guidance"],
                "WanCoreTextEncode": ["memory"], "WanCoreDecode": ["memory"]}
    for node_id, names in expected.items():
        optional = nodes[node_id].INPUT_TYPES()["optional"]
        assert list(optional)[:len(names)] == names, node_id   # later ones appended after these
        assert all(t == "LATENT" or t.startswith("WANCORE_") for t, *_ in optional.values()), node_id
    options = nodes["WanCoreLoadDiT"].INPUT_TYPES()["required"]["weight_dtype"][0]
    assert options == ["auto", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2", "keep (file)"]
    memory = nodes["WanCoreMemoryOptions"]().options(8.0, -1, "auto", "auto", 512)[0]
    assert memory.budget_bytes == 8 << 30 and nodes["WanCoreMemoryOptions"]().options(0, -1, "no", "off", 64)[0] \
        .budget_bytes is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        memory.vram_budget_gb = 1.0  # frozen: ComfyUI may share one output between nodes
