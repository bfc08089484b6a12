"""``lol inspect``: JSON schema, the readable table, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
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
