"""The V3 schema port without ComfyUI: every node's V1 declaration reads into a NodeSchema that
gives the declaration back exactly, declarations V3 would not carry are refused, and the V3
rendering (nodes/v3.py) over a stand-in of ``comfy_api.latest.io`` forwards execution,
validation, fingerprints, lazy inputs and hidden values as ComfyUI 0.3.64 calls them.
The real host is tests/host/test_v3.py."""
from __future__ import annotations

import enum
import inspect
import sys
import types

import pytest

import nodepack

FILES = "<model files>"


@pytest.fixture(scope="module")
def pack():
    return nodepack.load_pack()


@pytest.fixture()
def folder_paths(monkeypatch):
    fake = nodepack.fake_folder_paths({})
    fake.get_filename_list = lambda key: [FILES, "second.safetensors"]
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    return fake


@pytest.fixture()
def schema(pack):
    return pack.nodes.schema


def _schemas(pack):
    names = pack.NODE_DISPLAY_NAME_MAPPINGS
    return {nid: pack.nodes.schema.node_schema(nid, cls, names[nid]) for nid, cls in pack.NODE_CLASS_MAPPINGS.items()}


# ------------------------------------------------------------------------------------ declarations

def test_every_node_reads_into_a_schema_that_gives_back_its_declaration_exactly(pack, folder_paths):
    schemas = _schemas(pack)
    assert set(schemas) == set(pack.NODE_CLASS_MAPPINGS)
    for node_id, s in schemas.items():
        cls = pack.NODE_CLASS_MAPPINGS[node_id]
        declared = cls.INPUT_TYPES()
        assert s.input_types() == declared, node_id
        for section in ("required", "optional"):   # and the order of every section
            assert [i.name for i in s.inputs if i.section == section] == list(declared.get(section, {})), node_id
        assert tuple(o.io_type for o in s.outputs) == cls.RETURN_TYPES
        assert tuple(o.name for o in s.outputs) == cls.RETURN_NAMES
        assert tuple(o.tooltip for o in s.outputs) == cls.OUTPUT_TOOLTIPS
        assert (s.category, s.description, s.function) == (cls.CATEGORY, cls.DESCRIPTION, cls.FUNCTION)
        assert s.display_name == pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert all(i.tooltip for i in s.inputs) and all(o.tooltip for o in s.outputs), node_id


def test_v1_options_become_the_keywords_of_the_v3_inputs(pack, folder_paths):
    sampler = {i.name: i for i in _schemas(pack)["WanCoreSampler"].inputs}
    seed = sampler["seed"].keywords()
    assert seed["control_after_generate"] is True and seed["default"] == 0 and seed["max"] == 2 ** 64 - 1
    assert sampler["cfg"].keywords()["round"] == 0.01 and sampler["cfg"].io_type == "FLOAT"
    assert sampler["sampler"].io_type == "COMBO" and sampler["sampler"].choices == ("unipc", "dpm++", "euler")
    assert sampler["sampler"].keywords() == {"default": "unipc", "tooltip": sampler["sampler"].tooltip}
    assert sampler["latent"].optional and not sampler["latent"].is_widget
    assert [(h.name, h.kind) for h in _schemas(pack)["WanCoreSampler"].hidden] == [("unique_id", "UNIQUE_ID")]
    spec = pack.nodes.schema.InputSpec("x", "required", "STRING", (("forceInput", True), ("dynamicPrompts", False)))
    assert spec.keywords() == {"force_input": True, "dynamic_prompts": False}


def test_validation_names_v1_arguments_and_the_combos_comfyui_no_longer_checks(pack, folder_paths):
    schemas = _schemas(pack)
    sampler = schemas["WanCoreSampler"].validation
    assert sampler.arguments == ("denoise", "latent") and not sampler.any_argument and sampler.has_v1_function
    assert sampler.checked_choices == ("sampler",)
    loader = schemas["WanCoreLoadDiT"].validation     # no VALIDATE_INPUTS, but three combos
    assert not loader.has_v1_function and loader.checked_choices == ("model_name", "weight_dtype", "attention")
    embeds = schemas["WanCoreEmptyVideoEmbeds"].validation
    assert embeds.arguments == ("width", "height", "frames") and embeds.checked_choices == ()


def test_a_combo_value_outside_its_list_is_refused_with_the_input_and_value_named(pack, folder_paths):
    s = _schemas(pack)["WanCoreLoadDiT"]
    assert s.refused_choices({"model_name": FILES, "weight_dtype": "bf16", "attention": "sdpa"}) == []
    assert s.refused_choices({"model_name": None}) == []   # linked: checked when it runs
    [error] = s.refused_choices({"model_name": "no_such_model.safetensors", "weight_dtype": "auto"})
    assert "not in list" in error and "model_name" in error and "no_such_model.safetensors" in error
    assert "second.safetensors" in error and "models/ folder" in error


def _v1(**attrs):
    base = {"CATEGORY": "WanCore/testing", "DESCRIPTION": "A test node.", "FUNCTION": "run", "RETURN_TYPES": ("INT",),
            "INPUT_TYPES": classmethod(lambda cls: {"required": {"a": ("INT", {"default": 1, "tooltip": "a"})}}),
            "run": lambda self, a: (a,)}
    return type("WanCoreTest", (), {**base, **attrs})


async def _async_is_changed(cls, a):
    return a


@pytest.mark.parametrize("attrs, words", [
    ({"INPUT_TYPES": classmethod(lambda cls: {"required": {"a": ("INT", {"default": 1, "slider": True})}})},
     ["WanCoreTest", "'a'", "['slider']", "OPTION_KEYWORDS"]),
    ({"INPUT_TYPES": classmethod(lambda cls: {"required": {"a": ("LATENT",)}})}, ["'a'", "tooltip"]),
    ({"INPUT_TYPES": classmethod(lambda cls: {"required": {}, "hidden": {"who": "USER"}})}, ["'who'", "USER"]),
    ({"INPUT_TYPES": classmethod(lambda cls: {"required": {}, "extra": {}})}, ["sections", "extra"]),
    ({"SEARCH_ALIASES": ("x",)}, ["SEARCH_ALIASES", "module level"]),
    ({"__init__": lambda self: None}, ["instance state", "__init__"]),
    ({"FUNCTION": "missing"}, ["FUNCTION", "missing"]),
    ({"RETURN_NAMES": ("a", "b")}, ["RETURN_NAMES", "2 entries"]),
    ({"OUTPUT_NODE": 1}, ["OUTPUT_NODE", "True or False"]),
    ({"VALIDATE_INPUTS": classmethod(lambda cls, b=None: True)}, ["VALIDATE_INPUTS", "['b']"]),
    ({"IS_CHANGED": classmethod(_async_is_changed)}, ["IS_CHANGED is async"]),
], ids=["unknown_option", "bare_type", "unknown_hidden", "unknown_section", "unknown_attribute", "instance_state",
        "missing_function", "names_count", "flag_type", "validate_unknown_input", "async_is_changed"])
def test_a_declaration_v3_would_not_carry_is_refused_naming_node_and_key(schema, attrs, words):
    with pytest.raises(schema.SchemaError) as err:
        schema.node_schema("WanCoreTest", _v1(**attrs))
    for word in words:
        assert word in str(err.value)


# ------------------------------------------------------------------------------- V3 rendering

def _fake_io() -> types.SimpleNamespace:
    """The parts of comfy_api.latest.io that nodes/v3.py uses, recording what it is given."""
    class Hidden(str, enum.Enum):
        unique_id = "UNIQUE_ID"
        prompt = "PROMPT"
        extra_pnginfo = "EXTRA_PNGINFO"
        dynprompt = "DYNPROMPT"

    class NumberDisplay(str, enum.Enum):
        number = "number"
        slider = "slider"

    def comfytype(io_type):
        class Input:
            def __init__(self, id, optional=False, **kw):
                self.id, self.optional, self.kw, self.io_type = id, optional, kw, io_type

        class Output:
            def __init__(self, display_name=None, tooltip=None, is_output_list=False):
                self.display_name, self.tooltip, self.is_output_list, self.io_type = (display_name, tooltip,
                                                                                      is_output_list, io_type)
        return type(io_type, (), {"Input": Input, "Output": Output, "io_type": io_type})

    class NodeOutput:
        def __init__(self, *args, ui=None):
            self.args, self.ui = args, ui

    names = {"Int": "INT", "Float": "FLOAT", "String": "STRING", "Boolean": "BOOLEAN", "Combo": "COMBO",
             "Latent": "LATENT", "Image": "IMAGE", "Mask": "MASK", "Model": "MODEL", "Conditioning": "CONDITIONING",
             "Vae": "VAE", "ClipVisionOutput": "CLIP_VISION_OUTPUT"}
    io = types.SimpleNamespace(**{k: comfytype(v) for k, v in names.items()})
    io.Custom, io.Hidden, io.NumberDisplay, io.NodeOutput = comfytype, Hidden, NumberDisplay, NodeOutput
    io.Schema = lambda **kw: types.SimpleNamespace(**kw)
    io.ComfyNode = type("ComfyNode", (), {"hidden": None})
    return io


def test_every_node_renders_as_a_comfy_node_of_the_same_id_inputs_and_outputs(pack, folder_paths):
    io = _fake_io()
    rendered = pack.nodes.v3.render_nodes(io, pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert [n.__name__ for n in rendered] == list(pack.NODE_CLASS_MAPPINGS)
    for node in rendered:
        v1 = pack.NODE_CLASS_MAPPINGS[node.__name__]
        assert issubclass(node, io.ComfyNode)
        s = node.define_schema()
        assert s.node_id == node.__name__ and s.category == v1.CATEGORY and s.description == v1.DESCRIPTION
        declared = v1.INPUT_TYPES()
        expected = [(name, section == "optional") for section in ("required", "optional")
                    for name in declared.get(section, {})]
        assert [(i.id, i.optional) for i in s.inputs] == expected
        for i in s.inputs:
            kind, opts = declared["optional" if i.optional else "required"][i.id]
            assert i.io_type == ("COMBO" if isinstance(kind, list) else kind)
            assert i.kw.get("tooltip") == opts["tooltip"] and i.kw.get("default") == opts.get("default")
            if isinstance(kind, list):
                assert i.kw["options"] == kind
        assert [(o.io_type, o.display_name, o.tooltip) for o in s.outputs] == list(
            zip(v1.RETURN_TYPES, v1.RETURN_NAMES, v1.OUTPUT_TOOLTIPS))
        assert [h.value for h in s.hidden] == list(declared.get("hidden", {}).values())


def _render(pack, v1):
    io = _fake_io()
    [node] = pack.nodes.v3.render_nodes(io, {"WanCoreTest": v1}, {"WanCoreTest": "WanCore Test"})
    return io, node


def test_execute_gets_hidden_values_and_wraps_tuples_and_ui_dicts(pack):
    calls = []

    def run(self, a, node=None):
        calls.append((a, node))
        return {"ui": {"seen": [a]}, "result": (a + 1,)} if a else (a,)

    io, node = _render(pack, _v1(INPUT_TYPES=classmethod(lambda cls: {
        "required": {"a": ("INT", {"default": 1, "tooltip": "a"})}, "hidden": {"node": "UNIQUE_ID"}}), run=run))
    node.hidden = types.SimpleNamespace(unique_id="17")   # what ComfyUI sets on the class clone
    out = node.execute(a=2)
    assert isinstance(out, io.NodeOutput) and out.args == (3,) and out.ui == {"seen": [2]}
    assert node.execute(a=0).args == (0,) and node.execute(a=0).ui is None
    assert calls[0] == (2, "17")
    with pytest.raises(TypeError, match="WanCoreTest returned a dict with \\['expand'\\]"):
        _render(pack, _v1(run=lambda self, a: {"expand": {}}))[1].execute(a=1)


def test_validate_inputs_names_exactly_what_comfyui_must_pass_and_forwards_to_v1(pack, folder_paths):
    io = _fake_io()
    classes = {k: pack.NODE_CLASS_MAPPINGS[k] for k in ("WanCoreSampler", "WanCoreLoadDiT",
                                                         "WanCoreTextEmbedsFromConditioning")}
    sampler, loader, plain = pack.nodes.v3.render_nodes(io, classes, {})
    # ComfyUI reads getfullargspec(...).args: those inputs are passed and skip its min/max checks
    assert inspect.getfullargspec(sampler.validate_inputs).args == ["cls", "denoise", "latent", "sampler"]
    assert inspect.getfullargspec(sampler.validate_inputs).varkw is None
    assert sampler.validate_inputs(denoise=1.0, sampler="euler") is True
    assert "connect the input video's LATENT" in sampler.validate_inputs(denoise=0.6, sampler="euler")
    assert sampler.validate_inputs(denoise=0.6, latent=None) is True          # linked latent: not computed yet
    both = sampler.validate_inputs(denoise=0.6, sampler="ddim")
    assert "'ddim' not in list" in both and "LATENT" in both
    assert inspect.getfullargspec(loader.validate_inputs).args == ["cls", "model_name", "weight_dtype", "attention"]
    assert "not in list" in loader.validate_inputs(model_name="nope.safetensors", weight_dtype="auto")
    assert "validate_inputs" not in vars(plain)   # nothing to validate: ComfyUI's default path


def test_fingerprint_and_lazy_status_forward_to_is_changed_and_check_lazy_status(pack):
    seen = []

    def is_changed(cls, a, node=None):
        seen.append(("changed", a, node))
        return a * 10

    def lazy(self, a, b=None, node=None):
        seen.append(("lazy", a, b, node))
        return ["b"] if a > 0 else []

    v1 = _v1(INPUT_TYPES=classmethod(lambda cls: {
        "required": {"a": ("INT", {"default": 1, "tooltip": "a"})},
        "optional": {"b": ("INT", {"tooltip": "b", "lazy": True, "forceInput": True})},
        "hidden": {"node": "UNIQUE_ID"}}), IS_CHANGED=classmethod(is_changed), check_lazy_status=lazy,
        run=lambda self, a, b=None, node=None: (a,))
    io, node = _render(pack, v1)
    assert node.fingerprint_inputs(a=3) == 30
    assert node.check_lazy_status(a=1, b=None) == ["b"] and node.check_lazy_status(a=0) == []
    assert seen[0] == ("changed", 3, None) and seen[1] == ("lazy", 1, None, None)
    b = node.define_schema().inputs[1]
    assert b.kw == {"tooltip": "b", "lazy": True, "force_input": True} and b.optional


def test_async_node_functions_render_as_async_execute(pack):
    async def run(self, a):
        return (a * 2,)

    io, node = _render(pack, _v1(run=run))
    assert inspect.iscoroutinefunction(node.execute.__func__)
    import asyncio

    assert asyncio.run(node.execute(a=4)).args == (8,)


# --------------------------------------------------------------------------------- the entry point

def test_without_comfyui_the_pack_exports_the_v1_mappings_and_the_v3_entry_point(pack):
    assert pack.nodes.host.v3_available() is False
    assert pack.NODE_CLASS_MAPPINGS is pack.nodes.NODE_CLASS_MAPPINGS
    assert inspect.iscoroutinefunction(pack.comfy_entrypoint)
    assert set(pack.__all__) == {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint"}


def test_v3_needs_comfyui_0_3_64_with_comfy_api_latest(pack, monkeypatch):
    host = pack.nodes.host
    latest = types.ModuleType("comfy_api.latest")
    latest.ComfyExtension = object
    latest.io = types.SimpleNamespace(**{n: object for n in host._V3_NAMES})
    version = types.ModuleType("comfyui_version")
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    monkeypatch.setitem(sys.modules, "comfyui_version", version)
    for found, expected in (("0.3.64", True), ("0.3.65", True), ("1.0.0", True), ("0.3.63", False),
                            ("0.3.9", False), ("", False)):
        version.__version__ = found
        assert host.v3_available() is expected, found
    version.__version__ = "0.3.64"
    del latest.io.Combo
    assert host.v3_available() is False
