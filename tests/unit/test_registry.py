"""pyproject.toml meets the Comfy Registry specification (docs.comfy.org, "Registry
specifications"; the field names as ComfyUI 0.3.64's own comfy_config parser reads them),
and the example workflows sit where ComfyUI's template browser finds them."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
# the folder names ComfyUI's custom node manager serves example workflows from (0.3.64)
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")


def test_the_node_id_follows_the_registry_rules() -> None:
    name = PROJECT["name"]
    assert len(name) < 100
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", name), "letters, digits, - _ . only; starts with a letter"
    assert not re.search(r"[._-]{2}", name), "no consecutive special characters"
    assert "comfyui" not in name.lower()


def test_version_is_semantic_x_y_z() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"])


def test_description_and_license_are_given_in_the_registry_form() -> None:
    assert PROJECT["description"].strip()
    license = PROJECT["license"]
    assert isinstance(license, dict), 'license = { file = "LICENSE" } or { text = "..." }, not a bare string'
    if "file" in license:
        assert (ROOT / license["file"]).is_file()
    else:
        assert license["text"].strip()


def test_the_repository_url_is_given() -> None:
    repository = PROJECT["urls"]["Repository"]
    assert re.fullmatch(r"https://[^\s/]+/\S+", repository)


def test_tool_comfy_has_publisher_display_name_and_an_icon_in_this_repository() -> None:
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", COMFY["PublisherId"])
    assert COMFY["DisplayName"].strip()
    icon = COMFY["Icon"]
    assert icon.startswith("https://") and icon.lower().endswith((".svg", ".png", ".jpg", ".jpeg", ".gif"))
    # served from the repository's main branch: the file must be in the repository, <= 800x400 px
    path = ROOT / icon.split("/main/", 1)[1]
    assert path.is_file(), f"{icon} names {path}, which is missing"
    svg = ET.parse(path).getroot()
    width, height = (float(svg.get(k, "0").removesuffix("px")) for k in ("width", "height"))
    assert 0 < width <= 800 and 0 < height <= 400


def test_includes_names_existing_folders_only() -> None:
    includes = COMFY.get("includes", [])
    assert isinstance(includes, list)
    assert all((ROOT / folder).is_dir() for folder in includes)


def test_the_example_workflows_are_in_a_folder_the_template_browser_lists() -> None:
    folders = [f for f in TEMPLATE_FOLDERS if list((ROOT / f).glob("*.json"))]
    assert folders, f"no *.json directly inside any of {TEMPLATE_FOLDERS}"
