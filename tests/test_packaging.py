"""The package installs like one: the wheel carries every subpackage and the config tree, and an installed
copy (not the checkout) composes its config from any directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

SOURCES = ["pyproject.toml", "setup.py", "README.md", "llmk_lab", "conf"]


def build_wheel(into: Path) -> Path:
    """Build from a copy of the sources, so the build leaves nothing (build/, egg-info) in the checkout."""
    source = into / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(path, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(into / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (into / "dist").glob("llmk_lab-*.whl")
    return wheel


def test_the_wheel_ships_every_subpackage_and_the_whole_config_tree(tmp_path):
    names = set(zipfile.ZipFile(build_wheel(tmp_path)).namelist())
    configs = {f"llmk_lab/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert "llmk_lab/conf/config.yaml" in configs and configs <= names, sorted(configs - names)[:5]
    modules = {f"{p.relative_to(ROOT)}" for p in (ROOT / "llmk_lab").rglob("*.py")}
    assert modules <= names, sorted(modules - names)[:5]


@pytest.mark.slow  # a venv and an install
def test_an_installed_copy_prints_its_config_from_the_filesystem_root(tmp_path):
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    # The dependencies come from the running environment, listed after the new venv's own site-packages
    # (a path in a .pth file: that environment's own .pth files, such as an editable llmk_lab, are not run).
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "llmk_lab_test_deps.pth").write_text("\n".join(deps) + "\n")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)  # a wheel install is an unzip (pip needs network-free build deps otherwise)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import llmk_lab.cli as c; print(c.__file__); print(c.config_dir())"],
                           capture_output=True, text=True, cwd="/", env=env, check=True).stdout.split()
    assert where[0].startswith(site) and where[1] == str(Path(site) / "llmk_lab" / "conf")
    result = subprocess.run([str(python), "-m", "llmk_lab", "--cfg", "job"], capture_output=True, text=True,
                            cwd="/", env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "name_or_path: asset:minilm-l6" in result.stdout and "method: lora" in result.stdout
