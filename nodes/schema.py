"""Node declarations as typed data, read from today's V1 class attributes (no ComfyUI needed).

Every node keeps ONE declaration: its V1 class attributes (``INPUT_TYPES``, ``RETURN_TYPES``,
``RETURN_NAMES``, ``OUTPUT_TOOLTIPS``, ``CATEGORY``, ``DESCRIPTION``, ``OUTPUT_NODE``,
``VALIDATE_INPUTS``, ``IS_CHANGED``, ...). :func:`node_schema` reads them into a frozen
:class:`NodeSchema`; :func:`host.v3_nodes` renders that as a ComfyUI V3 ``io.ComfyNode``
(``comfy_api.latest``), so a node added in the V1 style is a V3 node with no work of its own.

The translation is exact or refused: :meth:`NodeSchema.input_types` gives back the V1
``INPUT_TYPES`` dict unchanged, and an option key, class attribute or hidden input that the V3
rendering would not carry raises :class:`SchemaError` naming the node, the input and the key
(nothing is dropped silently). Option keys are renamed to the keywords of the V3 ``Input``
constructors (``forceInput`` -> ``force_input``, ...) by :data:`OPTION_KEYWORDS`.

V1 node classes must keep no state on their instances (the V3 ``execute`` runs on a fresh
instance each time); ``tests/unit/test_nodes_v3.py`` checks it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

__all__ = ["SchemaError", "InputSpec", "OutputSpec", "HiddenSpec", "ValidationSpec", "NodeSchema", "node_schema",
           "WIDGET_TYPES", "HIDDEN_KINDS", "OPTION_KEYWORDS", "CLASS_ATTRIBUTES"]

SECTIONS = ("required", "optional")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# The hidden values ComfyUI fills in (V1 value == V3 ``io.Hidden`` value).
HIDDEN_KINDS = ("UNIQUE_ID", "PROMPT", "EXTRA_PNGINFO", "DYNPROMPT", "AUTH_TOKEN_COMFY_ORG", "API_KEY_COMFY_ORG")

_COMMON = {"tooltip": "tooltip", "lazy": "lazy"}
_WIDGET = {**_COMMON, "default": "default", "forceInput": "force_input", "socketless": "socketless"}
# V1 option key -> keyword of the V3 Input constructor (comfy_api.latest io.<Type>.Input), per input kind;
# "SOCKET" is every non-widget type (LATENT, IMAGE, WANCORE_DIT, ...). A key not listed here is refused.
OPTION_KEYWORDS: dict[str, dict[str, str]] = {
    "INT": {**_WIDGET, "min": "min", "max": "max", "step": "step", "control_after_generate": "control_after_generate",
            "display": "display_mode"},
    "FLOAT": {**_WIDGET, "min": "min", "max": "max", "step": "step", "round": "round", "display": "display_mode"},
    "STRING": {**_WIDGET, "multiline": "multiline", "placeholder": "placeholder", "dynamicPrompts": "dynamic_prompts"},
    "BOOLEAN": {**_WIDGET, "label_on": "label_on", "label_off": "label_off"},
    "COMBO": {**_COMMON, "default": "default", "control_after_generate": "control_after_generate",
              "socketless": "socketless"},
    "SOCKET": dict(_COMMON),
}
# The V1 class attributes ComfyUI reads that the V3 rendering carries; any other upper-case
# class attribute is refused (it would be a V1 feature lost on the V3 path).
CLASS_ATTRIBUTES = ("INPUT_TYPES", "RETURN_TYPES", "RETURN_NAMES", "OUTPUT_TOOLTIPS", "OUTPUT_IS_LIST", "FUNCTION",
                    "CATEGORY", "DESCRIPTION", "OUTPUT_NODE", "INPUT_IS_LIST", "NOT_IDEMPOTENT", "DEPRECATED",
                    "EXPERIMENTAL", "VALIDATE_INPUTS", "IS_CHANGED")
_SET_BY_HOST = ("RELATIVE_PYTHON_MODULE",)   # ComfyUI writes it on classes it registered as V1


class SchemaError(ValueError):
    """A node declaration the V3 rendering cannot carry exactly."""


@dataclass(frozen=True)
class InputSpec:
    """One required or optional input, as declared in ``INPUT_TYPES``.

    io_type: "INT" / "FLOAT" / "STRING" / "BOOLEAN" / "COMBO" (a V1 list of choices) or a
    socket type ("LATENT", "WANCORE_DIT", ...). options: the V1 option dict's items in their
    order (tooltip included). choices: the combo's choices in order, None for other types.
    """

    name: str
    section: str
    io_type: str
    options: tuple[tuple[str, object], ...]
    choices: tuple | None = None

    @property
    def tooltip(self) -> str | None:
        return dict(self.options).get("tooltip")

    @property
    def default(self):
        return dict(self.options).get("default")

    @property
    def optional(self) -> bool:
        return self.section == "optional"

    @property
    def is_widget(self) -> bool:
        return self.io_type in WIDGET_TYPES

    def keywords(self) -> dict[str, object]:
        """The options as keyword arguments of the V3 ``io.<Type>.Input`` constructor."""
        table = OPTION_KEYWORDS[self.io_type if self.is_widget else "SOCKET"]
        return {table[key]: value for key, value in self.options}

    def to_v1(self) -> tuple:
        """The V1 ``INPUT_TYPES`` entry ``(type or [choices], {options})``."""
        return (list(self.choices) if self.choices is not None else self.io_type, dict(self.options))


@dataclass(frozen=True)
class HiddenSpec:
    """A hidden input: the V1 parameter ``name`` the node function takes, filled with ``kind``."""

    name: str
    kind: str


@dataclass(frozen=True)
class OutputSpec:
    io_type: str
    name: str
    tooltip: str | None
    is_list: bool = False


@dataclass(frozen=True)
class ValidationSpec:
    """What the V3 ``validate_inputs`` must accept so that ComfyUI validates as for V1.

    ComfyUI passes a validation function only the inputs its signature names, and skips its
    own min / max / choice checks for exactly those. arguments: the names V1's
    ``VALIDATE_INPUTS`` takes (as ComfyUI reads them: positional-or-keyword, ``input_types``
    included); any_argument: it takes ``**kwargs`` (then it gets every input and ComfyUI checks
    none). checked_choices: combos whose value the V3 node must check itself: ComfyUI 0.3.64
    checks "value in list" only for V1 list types, not for V3 ``COMBO`` inputs.
    """

    arguments: tuple[str, ...]
    any_argument: bool
    checked_choices: tuple[str, ...]
    has_v1_function: bool


@dataclass(frozen=True)
class NodeSchema:
    """A node's whole declaration (the V1 class attributes as typed data)."""

    node_id: str
    display_name: str | None
    category: str
    description: str
    function: str
    inputs: tuple[InputSpec, ...]
    hidden: tuple[HiddenSpec, ...]
    outputs: tuple[OutputSpec, ...]
    sections: tuple[str, ...]          # the INPUT_TYPES sections as declared (an empty one included)
    output_node: bool = False
    input_is_list: bool = False
    not_idempotent: bool = False
    deprecated: bool = False
    experimental: bool = False
    validation: ValidationSpec | None = None
    fingerprint: bool = False          # V1 IS_CHANGED -> V3 fingerprint_inputs
    lazy_status: bool = False          # V1 check_lazy_status -> V3 check_lazy_status

    def input_types(self) -> dict:
        """The V1 ``INPUT_TYPES()`` dict this schema was read from."""
        out: dict[str, dict] = {section: {} for section in self.sections}
        for spec in self.inputs:
            out[spec.section][spec.name] = spec.to_v1()
        for h in self.hidden:
            out["hidden"][h.name] = h.kind
        return out

    def refused_choices(self, values: dict) -> list[str]:
        """The error texts for the ``validation.checked_choices`` combos whose value in
        ``values`` is not one of the choices (a linked input arrives as None: checked later)."""
        names = set(self.validation.checked_choices if self.validation is not None else ())
        errors = []
        for spec in self.inputs:
            value = values.get(spec.name)
            if spec.name not in names or value is None or value in spec.choices:
                continue
            shown = (f"one of {list(spec.choices)}" if len(spec.choices) <= 20
                     else f"one of the {len(spec.choices)} listed values")
            errors.append(f"{spec.name}: '{value}' not in list; choose {shown} (for a model file: put it in its "
                          "models/ folder and refresh the node list).")
        return errors


def node_schema(node_id: str, cls: type, display_name: str | None = None) -> NodeSchema:
    """Read V1 node class ``cls`` (registered as ``node_id``) into a :class:`NodeSchema`.

    Calls ``cls.INPUT_TYPES()`` (model-file combos list the folders as they are now: call
    again for fresh lists). Raises :class:`SchemaError` for anything the V3 rendering would
    not carry exactly.
    """
    where = f"node {node_id} ({cls.__module__}.{cls.__qualname__})"
    _check_class_attributes(cls, where)
    function = getattr(cls, "FUNCTION", None)
    if not isinstance(function, str) or not callable(getattr(cls, function, None)):
        raise SchemaError(f"{where}: FUNCTION must name a method of the class; got {function!r}.")
    declared = cls.INPUT_TYPES()
    if not isinstance(declared, dict) or not set(declared) <= {*SECTIONS, "hidden"}:
        raise SchemaError(f"{where}: INPUT_TYPES() must return a dict with 'required' / 'optional' / 'hidden' "
                          f"sections; got {sorted(declared) if isinstance(declared, dict) else type(declared)}.")
    inputs = tuple(_input_spec(where, section, name, entry)
                   for section in SECTIONS for name, entry in declared.get(section, {}).items())
    hidden = tuple(_hidden_spec(where, name, kind) for name, kind in declared.get("hidden", {}).items())
    return NodeSchema(
        node_id=node_id, display_name=display_name, category=_text(cls, "CATEGORY", where, "sd"),
        description=_text(cls, "DESCRIPTION", where, ""), function=function, inputs=inputs, hidden=hidden,
        outputs=_outputs(cls, where), sections=tuple(declared),
        output_node=_flag(cls, "OUTPUT_NODE", where), input_is_list=_flag(cls, "INPUT_IS_LIST", where),
        not_idempotent=_flag(cls, "NOT_IDEMPOTENT", where), deprecated=_flag(cls, "DEPRECATED", where),
        experimental=_flag(cls, "EXPERIMENTAL", where), validation=_validation(cls, inputs, hidden, where),
        fingerprint=hasattr(cls, "IS_CHANGED"), lazy_status=callable(getattr(cls, "check_lazy_status", None)))


def _check_class_attributes(cls: type, where: str) -> None:
    for klass in cls.__mro__[:-1]:   # without object
        for name in vars(klass):
            if name.isupper() and not name.startswith("_") and name not in CLASS_ATTRIBUTES + _SET_BY_HOST:
                raise SchemaError(f"{where}: class attribute {name} is not carried to the V3 node (known: "
                                  f"{', '.join(CLASS_ATTRIBUTES)}); move a constant to module level, or teach "
                                  "nodes/schema.py and nodes/v3.py the new attribute.")
    if "__init__" in vars(cls):
        raise SchemaError(f"{where}: node classes keep no instance state (the V3 execute builds a fresh instance "
                          "per run); remove __init__.")
    for name in ("VALIDATE_INPUTS", "IS_CHANGED", "check_lazy_status"):
        if inspect.iscoroutinefunction(getattr(cls, name, None)):
            raise SchemaError(f"{where}: {name} is async; the V3 rendering forwards it synchronously (only FUNCTION "
                              "may be async). Make it a plain function.")


def _input_spec(where: str, section: str, name: str, entry) -> InputSpec:
    if not isinstance(entry, tuple) or len(entry) != 2:
        raise SchemaError(f"{where}: input '{name}' must be declared as (type, {{'tooltip': ...}}); got {entry!r}.")
    kind, options = entry
    if not isinstance(options, dict):
        raise SchemaError(f"{where}: input '{name}': the options must be a dict; got {type(options).__name__}.")
    choices = None
    if isinstance(kind, list):
        choices, kind = tuple(kind), "COMBO"
        if not all(isinstance(c, (str, int, float)) for c in choices):
            raise SchemaError(f"{where}: combo '{name}' has choices that are not str / int / float.")
    elif not isinstance(kind, str) or not kind:
        raise SchemaError(f"{where}: input '{name}': the type must be a type name or a list of choices; got "
                          f"{kind!r}.")
    elif kind == "COMBO":
        raise SchemaError(f"{where}: input '{name}': declare a combo as a list of choices (V1), not 'COMBO'.")
    table = OPTION_KEYWORDS[kind if kind in WIDGET_TYPES else "SOCKET"]
    unknown = [key for key in options if key not in table]
    if unknown:
        raise SchemaError(f"{where}: input '{name}' ({kind}) has option(s) {unknown} that the V3 node would drop "
                          f"(carried for {kind}: {sorted(table)}); add them to nodes/schema.py OPTION_KEYWORDS "
                          "with their V3 keyword, or remove them.")
    return InputSpec(name=name, section=section, io_type=kind, options=tuple(options.items()), choices=choices)


def _hidden_spec(where: str, name: str, kind) -> HiddenSpec:
    if kind not in HIDDEN_KINDS:
        raise SchemaError(f"{where}: hidden input '{name}' is {kind!r}; V3 nodes get only {list(HIDDEN_KINDS)}.")
    return HiddenSpec(name, kind)


def _outputs(cls: type, where: str) -> tuple[OutputSpec, ...]:
    types = getattr(cls, "RETURN_TYPES", ())
    if not isinstance(types, tuple) or not all(isinstance(t, str) and t for t in types):
        raise SchemaError(f"{where}: RETURN_TYPES must be a tuple of type names; got {types!r}.")
    names = getattr(cls, "RETURN_NAMES", types)
    tips = getattr(cls, "OUTPUT_TOOLTIPS", (None,) * len(types))
    lists = getattr(cls, "OUTPUT_IS_LIST", (False,) * len(types))
    for attr, value in (("RETURN_NAMES", names), ("OUTPUT_TOOLTIPS", tips), ("OUTPUT_IS_LIST", lists)):
        if len(value) != len(types):
            raise SchemaError(f"{where}: {attr} has {len(value)} entries for {len(types)} RETURN_TYPES.")
    return tuple(OutputSpec(t, n, tip, bool(is_list)) for t, n, tip, is_list in zip(types, names, tips, lists))


def _validation(cls: type, inputs: tuple[InputSpec, ...], hidden: tuple[HiddenSpec, ...],
                where: str) -> ValidationSpec | None:
    function = getattr(cls, "VALIDATE_INPUTS", None)
    arguments: tuple[str, ...] = ()
    any_argument = False
    if function is not None:
        spec = inspect.getfullargspec(function)   # what ComfyUI reads
        arguments = tuple(spec.args[1:] if inspect.ismethod(function) else spec.args)
        any_argument = spec.varkw is not None
        known = {i.name for i in inputs} | {h.name for h in hidden} | {"input_types"}
        stray = [a for a in arguments if a not in known]
        if stray:
            raise SchemaError(f"{where}: VALIDATE_INPUTS takes {stray}, which are not inputs of the node.")
    checked = () if any_argument else tuple(i.name for i in inputs if i.choices is not None and i.name not in arguments)
    if function is None and not checked:
        return None
    return ValidationSpec(arguments, any_argument, checked, function is not None)


def _flag(cls: type, attr: str, where: str) -> bool:
    value = getattr(cls, attr, False)
    if not isinstance(value, bool):
        raise SchemaError(f"{where}: {attr} must be True or False; got {value!r}.")
    return value


def _text(cls: type, attr: str, where: str, default: str) -> str:
    value = getattr(cls, attr, default)
    if not isinstance(value, str):
        raise SchemaError(f"{where}: {attr} must be a string; got {value!r}.")
    return value
