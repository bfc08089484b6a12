"""One settings object: every variable parsed and checked, the README table, where data is found."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from collection import SHIPPED

from lol_engine import settings as settings_module
from lol_engine.errors import BadRequestError
from lol_engine.settings import (
    DEFAULT_ZOO_NAMES,
    HOW_TO_GET_ZOOS,
    PREDICTORS_DIR,
    VARIABLES,
    Settings,
    settings_table,
    shipped_predictors_info,
)

ROOT = Path(__file__).resolve().parent.parent


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.data_dir == Path.home() / ".cache" / "lol-explorer" and s.db_path == s.data_dir / "lol.duckdb"
    assert s.uploads_dir == s.data_dir / "uploads"
    assert (s.device, s.max_upload, s.host, s.port, s.temp_dir) == (None, 3 * 2**29, "127.0.0.1", None, None)
    assert s.fashion_mnist_dir == Path("/usr/share/datasets/fashion-mnist")
    assert s.wordnet_dir == Path("/usr/share/wordnet")
    assert s.from_environment == frozenset()


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("LOL_DATA_DIR", "/srv/lol", "data_dir", Path("/srv/lol")),
        ("LOL_DATA_DIR", "~/lol", "data_dir", Path.home() / "lol"),
        ("LOL_MAX_UPLOAD", "200mb", "max_upload", 200 * 2**20),
        ("LOL_MAX_UPLOAD", "1048576", "max_upload", 2**20),
        ("LOL_DEVICE", "cpu", "device", "cpu"),
        ("LOL_DEVICE", "CUDA:1", "device", "cuda:1"),
        ("LOL_DEVICE", "mps", "device", "mps"),
        ("LOL_DEVICE", "auto", "device", None),
        ("LOL_DEVICE", "", "device", None),  # empty: unset
        ("GRADIO_SERVER_NAME", "0.0.0.0", "host", "0.0.0.0"),
        ("GRADIO_SERVER_PORT", "7999", "port", 7999),
        ("GRADIO_TEMP_DIR", "/var/tmp/x", "temp_dir", Path("/var/tmp/x")),
        ("LOL_FASHION_MNIST_DIR", "/data/fm", "fashion_mnist_dir", Path("/data/fm")),
        ("LOL_WORDNET_DIR", "/data/wn", "wordnet_dir", Path("/data/wn")),
    ],
)
def test_each_variable_sets_its_field(variable: str, value: str, field: str, expected: object) -> None:
    s = Settings.from_env({variable: value})
    assert getattr(s, field) == expected
    assert s.from_environment == (frozenset({variable}) if value else frozenset())


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("LOL_MAX_UPLOAD", "banana", "200mb or 1.5gb"),
        ("LOL_MAX_UPLOAD", "-1gb", "positive number of bytes"),
        ("LOL_MAX_UPLOAD", "0", "positive number of bytes"),
        ("LOL_DEVICE", "nonsense", "cpu, cuda, cuda:N (N = 0, 1, …) or mps"),
        ("LOL_DEVICE", "cuda:x", "cpu, cuda, cuda:N"),
        ("GRADIO_SERVER_PORT", "http", "from 1 to 65535"),
        ("GRADIO_SERVER_PORT", "70000", "from 1 to 65535"),
        ("LOL_ZOO_DIR", "/nonexistent/zoos", "point it at a folder that holds the zoos digits, fashion-gen"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_accepts(variable: str, value: str, accepted: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}={value!r}") and accepted in message, message


@pytest.mark.parametrize("variable", ["LOL_DATA_DIR", "GRADIO_TEMP_DIR", "LOL_WORDNET_DIR"])
def test_a_file_where_a_folder_belongs_is_refused(variable: str, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(BadRequestError, match=f"^{variable}=.* is a file, not a folder"):
        Settings.from_env({variable: str(tmp_path / "f")})


def test_the_device_resolves_to_what_torch_has() -> None:
    import torch

    assert Settings.from_env({"LOL_DEVICE": "cpu"}).resolved_device() == "cpu"
    assert Settings.from_env({}).resolved_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    with pytest.raises(BadRequestError, match=rf"^LOL_DEVICE='{missing}': torch sees \d+ CUDA device"):
        Settings.from_env({"LOL_DEVICE": missing}).resolved_device()


# ------------------------------------------------------------------------------------------------ data
def _zoo(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.parquet").write_bytes(b"")
    return folder


def test_zoos_come_from_lol_zoo_dir_then_the_data_dir_then_the_checkout(tmp_path: Path) -> None:
    own = _zoo(tmp_path / "mine" / "digits").parent
    s = Settings.from_env({"LOL_ZOO_DIR": str(own), "LOL_DATA_DIR": str(tmp_path / "data")})
    assert (s.zoo_dir, s.default_zoos, s.zoo_source) == (own, (own / "digits",), "LOL_ZOO_DIR")

    data = tmp_path / "data"
    _zoo(data / "zoo" / "fashion-gen")
    s = Settings.from_env({"LOL_DATA_DIR": str(data)})
    assert (s.zoo_dir, s.default_zoos, s.zoo_source) == (data / "zoo", (data / "zoo" / "fashion-gen",), "data dir")

    s = Settings.from_env({"LOL_DATA_DIR": str(tmp_path / "empty")})  # this test runs in a checkout
    assert s.zoo_dir == ROOT / "data" / "zoo" and s.zoo_source == "checkout"
    assert s.default_zoos == tuple(ROOT / "data" / "zoo" / n for n in DEFAULT_ZOO_NAMES)


def test_outside_a_checkout_with_no_zoo_there_are_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site-packages" / "lol_engine"  # as installed from a wheel: no pyproject.toml beside it
    monkeypatch.setattr(settings_module, "PACKAGE_DIR", site)
    monkeypatch.setattr(settings_module, "CHECKOUT_ZOO_DIR", site.parent / "data" / "zoo")
    s = Settings.from_env({"LOL_DATA_DIR": str(tmp_path / "data")})
    assert (s.zoo_dir, s.default_zoos, s.zoo_source) == (None, (), None)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Settings.from_env({"LOL_ZOO_DIR": str(empty)}).default_zoos == ()
    assert "LOL_ZOO_DIR" in HOW_TO_GET_ZOOS and "lol zoo build" in HOW_TO_GET_ZOOS


def test_the_shipped_predictors_are_package_data() -> None:
    assert PREDICTORS_DIR == ROOT / "lol_engine" / "predictors"
    info = shipped_predictors_info()
    assert {p["name"] for p in info} == SHIPPED
    for p in info:
        assert (PREDICTORS_DIR / p["name"] / "model.safetensors").is_file()
        assert p["name"] == f"{p['base']}-{p['task']}", p  # names are <zoo>-<label>
        assert p["kind"] in ("regression", "binary", "multilabel", "categorical")
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lol_engine"]
    shipped = {f.name for p in info for f in (PREDICTORS_DIR / p["name"]).iterdir() if f.is_file()}
    assert {f"predictors/*/{name}" for name in shipped} <= set(data), shipped  # every file of a folder travels


# ------------------------------------------------------------------------------------------------ documentation
def test_the_readme_table_lists_exactly_the_variables() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settings_table() in readme  # regenerate with: python -m lol_engine.settings
    rows = re.findall(r"^\| `((?:LOL|GRADIO)_[A-Z_]+)` \|", readme, flags=re.M)
    assert rows == [v.name for v in VARIABLES]


# Modules that read os.environ themselves (none of them a setting of ours).
READERS = {
    "lol_engine/settings.py": "every setting",
    "app/serve.py": "puts GRADIO_TEMP_DIR back after the run",
    "lol_engine/scale/pipeline.py": "hands the driver's HF_* and LOL_* variables and PYTHONPATH to the Ray workers",
    "lol_engine/scale/sources.py": "HF_HUB_OFFLINE (huggingface_hub's) also stops plain URL downloads",
}


def test_every_variable_the_code_reads_is_a_setting() -> None:
    named: set[str] = set()
    for path in [*ROOT.glob("lol_engine/**/*.py"), *ROOT.glob("app/**/*.py"), ROOT / "space_app.py"]:
        text = path.read_text()
        named |= set(re.findall(r"[\"'`]((?:LOL|GRADIO)_[A-Z_]+)", text))
        if re.search(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[[^]]+\](?! =)", text):
            assert path.relative_to(ROOT).as_posix() in READERS, path
    # GRADIO_ANALYTICS_ENABLED is Gradio's own, defaulted to False by the app, never read by it; LOL_PREFIX a constant
    assert named - {"GRADIO_ANALYTICS_ENABLED", "LOL_PREFIX"} <= {v.name for v in VARIABLES}
