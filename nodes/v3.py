"""Our V1 node declarations rendered as ComfyUI V3 nodes (``io.ComfyNode`` of ``comfy_api.latest``).

The host's ``io`` module arrives as an argument (:func:`host.v3_extension` imports it; this
module imports nothing of ComfyUI). Each class of ``NODE_CLASS_MAPPINGS`` becomes an
``io.ComfyNode`` subclass of the same name whose ``define_schema`` is its V1 declaration read
by :func:`.schema.node_schema`:

- inputs: ``io.Int/Float/String/Boolean.Input`` with the V1 options under their V3 keywords,
  V1 choice lists as ``io.Combo.Input(options=...)``, sockets as the core io class of the type
  (``io.Latent``, ``io.Image``, ...) or ``io.Custom("WANCORE_DIT")``; ``optional`` per section;
  hidden inputs as ``io.Hidden``; outputs with RETURN_NAMES as display names and the tooltips.
- ``execute`` calls the V1 function on a fresh instance with the hidden values (V3 keeps them
  on ``cls.hidden``) and wraps a tuple or ``{"ui": ..., "result": ...}`` into ``io.NodeOutput``.
- ``validate_inputs`` / ``fingerprint_inputs`` / ``check_lazy_status`` forward to
  ``VALIDATE_INPUTS`` / ``IS_CHANGED`` / ``check_lazy_status`` when the V1 class has them.

What differs in ComfyUI 0.3.64's V3 path and is handled here: combo values are not checked
against their list for V3 ``COMBO`` inputs (the node checks them in ``validate_inputs``);
validation functions receive only the inputs their signature names (``validate_inputs`` gets
a signature naming exactly V1's arguments plus those combos); ``NodeOutput.from_dict`` cannot
convert a ``result`` (wrapped here); hidden values are not keyword arguments.
"""
from __future__ import annotations

import inspect

from .schema import InputSpec, NodeSchema, node_schema

__all__ = ["render_nodes", "CORE_IO"]

# Socket types rendered with ComfyUI's own io class (the same io_type as io.Custom(name); the
# class documents what travels); every other type (WANCORE_DIT, ...) is io.Custom(name).
CORE_IO = {"IMAGE": "Image", "MASK": "Mask", "LATENT": "Latent", "MODEL": "Model", "CONDITIONING": "Conditioning",
           "VAE": "Vae", "CLIP": "Clip", "CLIP_VISION": "ClipVision", "CLIP_VISION_OUTPUT": "ClipVisionOutput",
           "CONTROL_NET": "ControlNet", "SIGMAS": "Sigmas", "SAMPLER": "Sampler", "NOISE": "Noise",
           "GUIDER": "Guider", "VIDEO": "Video", "AUDIO": "Audio", "INT": "Int", "FLOAT": "Float",
           "STRING": "String", "BOOLEAN": "Boolean"}


def render_nodes(io, classes: dict[str, type], display_names: dict[str, str]) -> list[type]:
    """Each V1 class of ``classes`` (``NODE_CLASS_MAPPINGS``) as an ``io.ComfyNode`` subclass of the
    same name: same id, inputs (names, order, types, defaults, limits, tooltips), hidden inputs,
    outputs, category, description. Raises :class:`.schema.SchemaError` for a declaration V3
    cannot carry (before any class is made)."""
    return [_render(io, node_id, cls, display_names.get(node_id)) for node_id, cls in classes.items()]


def _render(io, node_id: str, v1: type, display_name: str | None) -> type:
    # Class-level facts (function, hidden, validation) are read once; the inputs again on every
    # define_schema call, as V1's INPUT_TYPES is, so model-file combos list the folders as they are.
    first = node_schema(node_id, v1, display_name)
    io_types: dict[str, type] = {}

    def io_class(name: str) -> type:
        if name not in io_types:
            io_types[name] = getattr(io, CORE_IO[name]) if name in CORE_IO else io.Custom(name)
        return io_types[name]

    def hidden_values(cls, names=None) -> dict:
        # V3 hands hidden inputs over on the class (cls.hidden, None outside a run), V1 as keywords
        holder = getattr(cls, "hidden", None)
        return {h.name: getattr(holder, io.Hidden(h.kind).name, None) if holder is not None else None
                for h in first.hidden if names is None or h.name in names}

    def define_schema(cls):
        return _schema(io, io_class, node_schema(node_id, v1, display_name))

    if inspect.iscoroutinefunction(getattr(v1, first.function)):
        async def execute(cls, **values):
            result = await getattr(v1(), first.function)(**values, **hidden_values(cls))
            return _node_output(io, node_id, result)
    else:
        def execute(cls, **values):
            return _node_output(io, node_id, getattr(v1(), first.function)(**values, **hidden_values(cls)))

    attrs = {"__doc__": v1.__doc__, "__module__": v1.__module__, "__qualname__": node_id,
             "define_schema": classmethod(define_schema), "execute": classmethod(execute)}
    if first.validation is not None:
        attrs["validate_inputs"] = classmethod(_validate_inputs(node_id, v1, display_name, first, hidden_values))
    if first.fingerprint:
        def fingerprint_inputs(cls, **values):
            return v1.IS_CHANGED(**values, **hidden_values(cls))   # V1's IS_CHANGED got the hidden inputs too
        attrs["fingerprint_inputs"] = classmethod(fingerprint_inputs)
    if first.lazy_status:
        def check_lazy_status(cls, **values):
            return v1().check_lazy_status(**values, **hidden_values(cls))
        attrs["check_lazy_status"] = classmethod(check_lazy_status)
    return type(node_id, (io.ComfyNode,), attrs)


def _schema(io, io_class, schema: NodeSchema):
    return io.Schema(
        node_id=schema.node_id, display_name=schema.display_name, category=schema.category,
        description=schema.description, inputs=[_input(io, io_class, spec) for spec in schema.inputs],
        outputs=[io_class(o.io_type).Output(display_name=o.name, tooltip=o.tooltip, is_output_list=o.is_list)
                 for o in schema.outputs],
        hidden=[io.Hidden(h.kind) for h in schema.hidden], is_input_list=schema.input_is_list,
        is_output_node=schema.output_node, is_deprecated=schema.deprecated, is_experimental=schema.experimental,
        not_idempotent=schema.not_idempotent)


def _input(io, io_class, spec: InputSpec):
    keywords = spec.keywords()
    if "display_mode" in keywords:
        keywords["display_mode"] = io.NumberDisplay(keywords["display_mode"])
    if spec.choices is not None:
        return io.Combo.Input(spec.name, options=list(spec.choices), optional=spec.optional, **keywords)
    return io_class(spec.io_type).Input(spec.name, optional=spec.optional, **keywords)


def _validate_inputs(node_id: str, v1: type, display_name: str | None, first: NodeSchema, hidden_values):
    """``validate_inputs`` whose signature names exactly what V1's VALIDATE_INPUTS took, plus the
    combos it did not: ComfyUI passes a validation function only the inputs it names (and skips
    its own min / max checks for those), and does not check V3 combo values at all."""
    spec = first.validation

    def validate_inputs(cls, **values):
        errors = node_schema(node_id, v1, display_name).refused_choices(values) if spec.checked_choices else []
        result = True
        if spec.has_v1_function:
            taken = {k: v for k, v in values.items() if spec.any_argument or k in spec.arguments}
            result = v1.VALIDATE_INPUTS(**taken, **hidden_values(cls, None if spec.any_argument else spec.arguments))
        if not errors:
            return result
        return " ".join(errors + ([] if isinstance(result, bool) else [str(result)]))

    P = inspect.Parameter
    validate_inputs.__signature__ = inspect.Signature(
        [P("cls", P.POSITIONAL_OR_KEYWORD)]
        + [P(name, P.POSITIONAL_OR_KEYWORD, default=None) for name in (*spec.arguments, *spec.checked_choices)]
        + ([P("values", P.VAR_KEYWORD)] if spec.any_argument else []))
    return validate_inputs


def _node_output(io, node_id: str, result):
    """A V1 return value (a tuple, or ``{"ui": ..., "result": (...)}``) as an ``io.NodeOutput``
    (ComfyUI 0.3.64's own dict conversion, ``NodeOutput.from_dict``, fails on ``result``)."""
    if isinstance(result, io.NodeOutput):
        return result
    if result is None:
        return io.NodeOutput()
    if isinstance(result, dict):
        unknown = sorted(set(result) - {"ui", "result"})
        if unknown:
            raise TypeError(f"{node_id} returned a dict with {unknown}; a node returns a tuple or "
                            "{'ui': ..., 'result': (...)}.")
        return io.NodeOutput(*result.get("result", ()), ui=result.get("ui"))
    if isinstance(result, (tuple, list)):
        return io.NodeOutput(*result)
    raise TypeError(f"{node_id} returned {type(result).__name__}; a node returns a tuple of its outputs or "
                    "{'ui': ..., 'result': (...)}.")
