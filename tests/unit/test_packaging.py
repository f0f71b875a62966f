"""``pip install .`` ships the engine and its ``wan-core`` command, nothing else.

Builds a wheel from a copy of the repository with the setuptools already installed
(``--no-build-isolation --no-index``: no network), checks its file list and entry point,
installs it into a folder and runs the command from outside the repository.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")

ROOT = Path(__file__).resolve().parents[2]
_SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", "build", "dist",
                               "*.egg-info", "out")


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_requirements_txt_and_pyproject_list_the_same_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == _requirements()
    assert not any(r.split(">")[0].split("=")[0] == "torch" for r in _requirements())   # the host's torch


def test_pyproject_declares_the_command_and_only_the_engine_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["scripts"] == {"wan-core": "wan_core.cli:main"}
    assert config["tool"]["setuptools"]["packages"] == ["wan_core"]
    assert config["build-system"]["build-backend"] == "setuptools.build_meta"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools installed")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)   # never write build/ or *.egg-info into the checkout
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (whl,) = (tmp / "dist").glob("wan_core-*.whl")
    return whl


def test_the_wheel_holds_the_engine_and_nothing_of_the_node_pack(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("wan_core/")}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "wan_core").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert shipped == sources   # a new subpackage must be added to [tool.setuptools] packages
    others = [n for n in names if not n.startswith(("wan_core/", "wan_core-"))]
    assert others == [], others   # no nodes/, bench/, tests/, workflows/ or root __init__.py
    (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "wan-core = wan_core.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_installed_command_runs_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                          str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    script = site / "bin" / "wan-core"
    assert script.is_file() and "wan_core.cli" in script.read_text()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    code = ("import sys, wan_core; print(wan_core.__file__); "
            "from wan_core.cli import main; sys.argv = ['wan-core']; sys.exit(main(['--version']))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [str(site / "wan_core" / "__init__.py"), "wan-core 0.1.0"]
