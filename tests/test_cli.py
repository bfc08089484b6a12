"""``lol inspect``: JSON schema, the readable table, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from collection import SHIPPED
from lora_files import factors, kohya, pair, save, write_config

from lol_engine.cli import main

STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.fixture
def kohya_file(tmp_path: Path) -> Path:
    tensors = kohya(STEM, rank=4, d_in=768, d_out=320, alpha=2.0)
    a, b = factors(2, 320, 640, kernel=(3, 3), seed=1)
    tensors |= pair("lora_unet_down_blocks_1_resnets_0_conv1", ".lora_down.weight", ".lora_up.weight", a, b)
    return save(tmp_path / "style.safetensors", tensors, {"ss_base_model_version": "sd_v1", "ss_output_name": "style"})


def test_json_report(kohya_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(kohya_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in (
        "format",
        "base_family",
        "evidence",
        "dtype",
        "n_modules",
        "modules",
        "total_delta_fro_norm",
        "sha256",
        "warnings",
    ):
        assert key in report
    assert (report["format"], report["base_family"], report["dtype"], report["n_modules"]) == (
        "kohya",
        "sd1",
        "F32",
        2,
    )
    first = report["modules"][0]
    assert first["name"] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert (first["kind"], first["rank"], first["alpha"], first["scale"], first["d_in"], first["d_out"]) == (
        "linear",
        4,
        2.0,
        0.5,
        768,
        320,
    )
    assert len(first["singular_values"]) == 4 and first["singular_values"] == sorted(
        first["singular_values"], reverse=True
    )
    conv = report["modules"][1]
    assert (conv["kind"], conv["d_in"], conv["orig_shape"]) == ("conv", 320 * 9, [640, 320, 3, 3])
    total = sum(m["delta_fro_norm"] ** 2 for m in report["modules"]) ** 0.5
    assert report["total_delta_fro_norm"] == pytest.approx(total)
    assert report["kohya_metadata"]["ss_output_name"] == "style"


def test_table_report(kohya_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(kohya_file)]) == 0
    out = capsys.readouterr().out
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in out
    assert "format kohya" in out and "base sd1" in out


def test_peft_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save(
        tmp_path / "adapter_model.safetensors",
        pair(
            "base_model.model.model.layers.0.self_attn.q_proj", ".lora_A.weight", ".lora_B.weight", *factors(4, 16, 16)
        ),
    )
    write_config(tmp_path, r=4, lora_alpha=16, base_model_name_or_path="Qwen/Qwen2-1.5B")
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "peft" and report["base_family"] == "llm-decoder"
    assert report["modules"][0]["scale"] == 4.0 and report["adapter_config"]["r"] == 4


@pytest.mark.parametrize(
    ("content", "message"),
    [(pickle.dumps({"a": 1}), "pickle"), (b"\x00" * 3, "8-byte header"), (None, "no such file")],
    ids=["pickle", "tiny", "missing"],
)
def test_errors_are_one_line_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content, message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    assert main(["inspect", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--zoo", "DIGITS", "--task", "nope", "--model", "svd"], "the zoo has no label 'nope'; known:"),
        (["train", "--zoo", "DIGITS", "--task", "acc_own", "--model", "nope"], "unknown model 'nope'; known:"),
        (["train", "--zoo", "MISSING", "--task", "acc_own", "--model", "svd"], "no zoo there"),
        (["zoo", "build", "nope", "--out", "OUT"], "unknown zoo recipe 'nope'"),
        (["zoo", "build", "digits", "--out", "OUT", "--ranks", "4,x"], "--ranks '4,x': give comma-separated"),
        (["zoo", "build", "digits", "--out", "OUT", "--n", "0"], "n must be positive"),
        (["calibrate", "PREDICTOR", "--zoo", "DIGITS", "--coverage", "1.5"], "coverage must be in (0, 1)"),
    ],
    ids=["label", "model", "zoo", "recipe", "ranks", "n", "coverage"],
)
def test_user_errors_of_every_command_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """A LolError (or a missing file) from any command is one ``error:`` line and status 2, never a traceback."""
    import shutil

    from lol_engine.settings import PREDICTORS_DIR

    shutil.copytree(PREDICTORS_DIR / "digits-acc_own", tmp_path / "predictor")
    where = {
        "DIGITS": str(Path(__file__).parent.parent / "data" / "zoo" / "digits"),
        "MISSING": str(tmp_path / "missing"),
        "OUT": str(tmp_path / "out"),
        "PREDICTOR": str(tmp_path / "predictor"),
    }
    assert main([where.get(a, a) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_a_terminal_without_utf8_gets_output_not_a_crash(kohya_file: Path, json_flag: list[str]) -> None:
    """A Latin-1 locale cannot encode ``‖ΔW‖``: the table and the error line still print, with ``?`` for it."""
    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    lol = [sys.executable, "-m", "lol_engine.cli"]
    good = subprocess.run([*lol, "inspect", str(kohya_file), *json_flag], capture_output=True, env=env, timeout=120)
    assert good.returncode == 0, good.stderr.decode("latin-1")
    assert b"kohya" in good.stdout
    bad = kohya_file.parent / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    refused = subprocess.run([*lol, "inspect", str(bad), *json_flag], capture_output=True, env=env, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith(b"error: ") and refused.stderr.count(b"\n") == 1


def test_console_script_runs(kohya_file: Path) -> None:
    lol = Path(sys.executable).parent / "lol"
    result = subprocess.run(
        [str(lol), "inspect", str(kohya_file), "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n_modules"] == 2
    bad = subprocess.run(
        [str(lol), "inspect", str(kohya_file.parent / "nope")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


# ------------------------------------------------------------------------------------------------ lol info


def test_info_reports_settings_data_and_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOL_DEVICE", "cpu")
    monkeypatch.delenv("LOL_ZOO_DIR", raising=False)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["data_dir"] == {"path": str(tmp_path / "data"), "source": "LOL_DATA_DIR"}
    assert info["collection"] == {"path": str(tmp_path / "data" / "lol.duckdb"), "exists": False}
    assert {p["name"] for p in info["predictors"]} == SHIPPED
    assert {
        "name": "fashion-gen-quality",
        "base": "fashion-gen",
        "task": "quality",
        "kind": "regression",
        "model": "spectral_glnet",
    } in info["predictors"]
    assert info["zoo_dir"]["source"] == "checkout" and len(info["default_zoos"]) == 2
    assert info["device"] == {"setting": "cpu", "resolved": "cpu"}
    assert set(info["versions"]) == {"python", "lol-explorer", "torch", "safetensors", "numpy", "duckdb", "gradio"}
    assert "not installed" not in info["versions"].values()  # the dev environment has them all

    assert main(["info"]) == 0  # the readable form
    text = capsys.readouterr().out
    assert "not created yet" in text and "fashion-gen-quality" in text and "(LOL_DATA_DIR)" in text


def test_info_counts_the_collection_or_says_why_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lol_engine.store import LoraStore

    monkeypatch.setenv("LOL_DATA_DIR", str(tmp_path))
    LoraStore(tmp_path / "lol.duckdb").close()
    assert main(["info", "--json"]) == 0
    collection = json.loads(capsys.readouterr().out)["collection"]
    assert collection["exists"] and collection["loras"] == 0 and collection["bytes"] > 0
    (tmp_path / "lol.duckdb").write_bytes(b"not a database" * 100)
    assert main(["info", "--json"]) == 0
    collection = json.loads(capsys.readouterr().out)["collection"]
    assert "loras" not in collection and "not a DuckDB database" in collection["error"]


@pytest.mark.parametrize(("variable", "value"), [("LOL_MAX_UPLOAD", "banana"), ("LOL_DEVICE", "nonsense")])
@pytest.mark.parametrize("command", [["info"], ["serve"], ["export", "out"]])
def test_a_bad_setting_is_one_error_line_with_status_2(
    variable: str,
    value: str,
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv(variable, value)
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {variable}={value!r} is not a"), err
    assert not (tmp_path / "data").exists()  # refused before anything was opened


def test_serve_without_the_app_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "app.serve", None)  # `import app.serve` raises ModuleNotFoundError
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.strip().endswith("pip install 'lol-explorer[app]'")
    monkeypatch.delitem(sys.modules, "app.serve")

    import importlib.util

    from app import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert serve.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the app needs gradio: install the app extra, pip install 'lol-explorer[app]'"]
