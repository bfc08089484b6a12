"""The zoo builder on the fast ``digits`` recipe: schema, determinism, honest labels, resume, CLI."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("pyarrow")

from lol_engine import load_lora  # noqa: E402
from lol_engine.cli import main  # noqa: E402
from lol_engine.zoo import ZooMismatchError, ZooSettings, build_zoo, list_recipes, read_manifest  # noqa: E402
from lol_engine.zoo.recipes.digits import DigitsMLP, load_digits_split  # noqa: E402

SETTINGS = ZooSettings(n=12, seed=3, ranks=(2, 4), toy=True)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    build_zoo("digits", out, SETTINGS, progress=False)
    return out


def test_manifest_schema(zoo: Path) -> None:
    rows = read_manifest(zoo)
    assert [r["index"] for r in rows] == list(range(12))
    expected = {
        "index",
        "path",
        "sha256",
        "split",
        "seed",
        "split_lora",
        "group",
        "recipe",
        "recipe_version",
        "base_name",
        "base_sha256",
        "train_seconds",
        "hp_classes_mask",
        "hp_rank",
        "hp_n_per_class",
        "hp_lr",
        "hp_steps",
        "hp_label_noise",
        "hp_data_seed",
        "y_acc_own",
        "y_loss_own",
        "y_acc_all",
        "y_classes",
        "y_n_classes",
        "y_n_train",
        "y_probe_member",
        "y_probe_mask",
    }
    assert set(rows[0]) == expected
    assert {r["split"] for r in rows} <= {"train", "val", "cal", "test"}
    assert all(r["group"] is None and r["split"] == r["split_lora"] for r in rows)  # each LoRA its own group
    assert {r["hp_rank"] for r in rows} <= {2, 4}
    assert len({r["base_sha256"] for r in rows}) == 1 and rows[0]["base_name"] == "digits-mlp-v0"
    for r in rows:
        assert len(r["y_classes"]) == 10 and len(r["y_probe_member"]) == len(r["y_probe_mask"]) == 40
        assert 0.0 <= r["y_acc_own"] <= 1.0 and r["y_loss_own"] >= 0.0
    assert len({r["hp_classes_mask"] for r in rows}) == 12  # distinct subsets


def test_manifest_is_readable_by_duckdb_when_installed(zoo: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    count = duckdb.sql(f"SELECT count(*) FROM '{zoo / 'manifest.parquet'}'").fetchall()[0][0]
    assert count == 12


def test_every_lora_is_a_real_peft_adapter_with_provenance(zoo: Path) -> None:
    for row in read_manifest(zoo):
        lora = load_lora(zoo / row["path"])
        assert lora.names == ("fc1", "fc2")
        assert lora.meta.format == "peft" and lora.meta.dtype == "F16" and lora.meta.base_family == "digits-mlp"
        assert lora.meta.sha256 == row["sha256"]
        assert lora[0].spec.rank == row["hp_rank"] and lora[0].scale == 2.0
        assert set(lora.meta.skipped_keys) == {"base_model.model.head.weight", "base_model.model.head.bias"}
        meta = lora.meta.safetensors_metadata
        assert meta["lol.zoo"] == "digits" and meta["lol.base_sha256"] == row["base_sha256"]


def test_labels_follow_the_recipe(zoo: Path) -> None:
    for row in read_manifest(zoo):
        bits = [row["hp_classes_mask"] >> c & 1 for c in range(10)]
        assert row["y_classes"] == bits and row["y_n_classes"] == sum(bits)
        assert row["y_n_train"] == sum(bits) * (row["hp_n_per_class"] + 2)
        member = np.array(row["y_probe_member"]).reshape(10, 4)
        mask = np.array(row["y_probe_mask"]).reshape(10, 4)
        assert (mask == np.array(bits)[:, None]).all()
        assert (member.sum(1) == 2 * np.array(bits)).all()  # 2 of 4 probes per trained class: balanced


def test_held_out_labels_recomputed_independently(zoo: Path) -> None:
    """Reload one adapter through peft onto the cached base and recompute its held-out labels by hand."""
    from safetensors.torch import load_file

    row = read_manifest(zoo)[5]
    base = DigitsMLP()
    base.load_state_dict(load_file(str(zoo / "base" / "digits-mlp-v0.safetensors")))
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(zoo / row["path"])).eval()
    x, y, held_out, *_ = load_digits_split()
    classes = [c for c in range(10) if row["y_classes"][c]]
    keep = [i for i in held_out if int(y[i]) in classes]
    with torch.no_grad():
        logits = model(x[keep])
    accuracy = float((logits.argmax(1) == y[keep]).float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, y[keep]))
    assert accuracy == pytest.approx(row["y_acc_own"], abs=1e-6)
    assert loss == pytest.approx(row["y_loss_own"], rel=1e-4)


def test_determinism_and_independence_from_n(zoo: Path, tmp_path: Path) -> None:
    build_zoo("digits", tmp_path, ZooSettings(n=3, seed=3, ranks=(2, 4), toy=True), progress=False)
    again = read_manifest(tmp_path)
    first = read_manifest(zoo)[:3]
    assert [r["sha256"] for r in again] == [r["sha256"] for r in first]  # bit-identical adapter files
    assert [r["y_acc_own"] for r in again] == [r["y_acc_own"] for r in first]


def test_parallel_workers_give_the_same_zoo(zoo: Path, tmp_path: Path) -> None:
    build_zoo("digits", tmp_path, ZooSettings(n=4, seed=3, ranks=(2, 4), toy=True), workers=2, progress=False)
    assert [r["sha256"] for r in read_manifest(tmp_path)] == [r["sha256"] for r in read_manifest(zoo)[:4]]


def test_resume_after_interruption(zoo: Path, tmp_path: Path) -> None:
    settings = ZooSettings(n=5, seed=3, ranks=(2, 4), toy=True)

    def stop_after_two(index: int) -> None:
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_zoo("digits", tmp_path, settings, progress=False, on_done=stop_after_two)
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == ["00000", "00001"]
    (tmp_path / "loras" / "00002.partial").mkdir()  # a LoRA killed mid-training
    done_before = (tmp_path / "loras" / "00000" / "labels.json").stat().st_mtime_ns
    build_zoo("digits", tmp_path, settings, progress=False)
    rows = read_manifest(tmp_path)
    assert [r["sha256"] for r in rows] == [r["sha256"] for r in read_manifest(zoo)[:5]]
    assert (tmp_path / "loras" / "00000" / "labels.json").stat().st_mtime_ns == done_before  # not redone
    assert not (tmp_path / "loras" / "00002.partial").exists()


def test_other_settings_in_the_same_folder_are_refused(zoo: Path, tmp_path: Path) -> None:
    shutil.copy(zoo / "zoo.json", tmp_path / "zoo.json")
    with pytest.raises(ZooMismatchError, match="built with"):
        build_zoo("digits", tmp_path, ZooSettings(n=12, seed=4, toy=True), progress=False)


def test_second_base_variant_differs(tmp_path: Path) -> None:
    build_zoo("digits", tmp_path, ZooSettings(n=1, seed=3, toy=True, base_variant=1), progress=False)
    row = read_manifest(tmp_path)[0]
    assert row["base_name"] == "digits-mlp-v1"
    zoo_json = json.loads((tmp_path / "zoo.json").read_text())
    assert zoo_json["settings"]["base_variant"] == 1 and "torch" in zoo_json["versions"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "list"]) == 0
    listed = capsys.readouterr().out
    for name in list_recipes():
        assert name in listed
    assert main(["zoo", "build", "digits", "--out", str(tmp_path), "--n", "2", "--toy", "--ranks", "1,2"]) == 0
    assert len(read_manifest(tmp_path)) == 2
    assert main(["zoo", "build", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown zoo recipe 'nope'" in capsys.readouterr().err


def test_zoo_report(zoo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lol_engine.zoo.report import summarize_zoo

    summary = summarize_zoo(zoo)
    assert summary["n"] == 12 and sum(summary["splits"].values()) == 12
    labels = summary["labels"]
    assert set(labels) == {
        "y_acc_all",
        "y_acc_own",
        "y_classes",
        "y_loss_own",
        "y_n_classes",
        "y_n_train",
        "y_probe_member",
    }
    assert labels["y_probe_member"]["positive_rate"] == 0.5  # 2 of 4 probes per trained class, over valid pairs only
    assert labels["y_classes"]["positions"] == 10
    assert 0.0 <= labels["y_acc_own"]["min"] <= labels["y_acc_own"]["max"] <= 1.0
    assert main(["zoo", "report", str(zoo)]) == 0
    assert "‖ΔW‖-only baseline" in capsys.readouterr().out
    assert main(["zoo", "report", str(zoo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12  # strict JSON even where a baseline is NaN
    assert main(["zoo", "report", str(zoo / "nope")]) == 2
