"""Package hygiene: a light import, a curated public API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from collection import SHIPPED

import lol_engine

ROOT = Path(__file__).resolve().parent.parent


def test_import_is_light() -> None:
    heavy = ("gradio", "duckdb", "umap", "peft", "transformers")
    code = f"import sys, lol_engine; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == ""


def test_public_api_is_sorted_and_importable() -> None:
    assert lol_engine.__all__ == sorted(lol_engine.__all__)
    for name in lol_engine.__all__:
        assert hasattr(lol_engine, name)


def test_the_cli_and_the_settings_do_not_import_the_app() -> None:
    heavy = ("app", "gradio", "duckdb", "umap", "ray")
    code = (
        "import sys, lol_engine.cli, lol_engine.settings; "
        f"print(' '.join(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == ""


def test_a_wheel_install_finds_the_shipped_predictors(tmp_path: Path) -> None:
    """``pip install .`` (not editable) into a clean environment, then ``lol info --json`` from another folder."""
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("lol_engine", "app"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)])
    (wheel,) = wheels.glob("lol_explorer-*.whl")
    with zipfile.ZipFile(wheel) as zipped:
        carried = {n for n in zipped.namelist() if n.startswith("lol_engine/predictors/")}
    files = ("config.json", "model.safetensors", "reference.safetensors")  # reference: its out-of-domain check
    assert carried == {f"lol_engine/predictors/{name}/{f}" for name in SHIPPED for f in files}

    env_dir = tmp_path / "clean"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    (site,) = env_dir.glob("lib/python3*/site-packages")
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co. from this venv
    _run([*pip, "--python", str(env_dir / "bin" / "python"), "install", "--no-deps", "-q", str(wheel)])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "LOL_DATA_DIR": str(tmp_path / "data"), "HOME": str(tmp_path)}
    env.pop("LOL_ZOO_DIR", None)
    python = str(env_dir / "bin" / "python")
    where = _run([python, "-c", "import lol_engine; print(lol_engine.__file__)"], elsewhere, env)
    assert Path(where.strip()).is_relative_to(site)  # the installed wheel, not the source tree
    info = json.loads(_run([str(env_dir / "bin" / "lol"), "info", "--json"], elsewhere, env))
    assert {p["name"] for p in info["predictors"]} == SHIPPED
    assert Path(info["predictors_dir"]).is_relative_to(site)
    assert (info["zoo_dir"], info["default_zoos"]) == ({"path": None, "source": None}, [])
    assert "LOL_ZOO_DIR" in info["how_to_get_zoos"]


def _run(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout
