"""Labels for a user's own collection: typed tables joined by name, path or sha256, every miss reported, labels from
the files' own metadata, and the shipped zoo ingested as if it were a user's folder with a CSV of its labels."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lora_files import kohya, peft, save, write_config

from lol_engine import BadRequestError, NotFoundError, load_lora
from lol_engine.cli import main
from lol_engine.labels import LabelTable, LoraKeys, match_labels, metadata_labels, read_labels

ZOO = Path(__file__).parent.parent / "data" / "zoo" / "digits"


def _csv(path: Path, rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def test_a_csv_table_is_typed_per_column(tmp_path: Path) -> None:
    table = read_labels(
        _csv(
            tmp_path / "scores.csv",
            [
                ["name", "score", "steps", "style", "tags", "note"],
                ["a", "0.5", "100", "anime", '["girl", "hat"]', ""],
                ["b", "1e-3", "", "photo", "[]", "[not json"],
                ["c", "", "300", "3", '["hat"]', "x"],
            ],
        )
    )
    assert table.key == "name" and table.source == "scores.csv"
    assert table.kinds == {
        "score": "numeric",
        "steps": "numeric",
        "style": "categorical",  # "3" among text stays text: one type per column
        "tags": "multilabel",
        "note": "categorical",
    }
    assert table.rows["a"] == {"score": 0.5, "steps": 100, "style": "anime", "tags": ["girl", "hat"]}
    assert table.rows["b"] == {"score": 0.001, "style": "photo", "tags": [], "note": "[not json"}  # empty: missing
    assert table.rows["c"] == {"steps": 300, "style": "3", "tags": ["hat"], "note": "x"}
    assert isinstance(table.rows["a"]["steps"], int) and isinstance(table.rows["a"]["score"], float)


def test_a_parquet_table_with_a_list_column(tmp_path: Path) -> None:
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"sha256": ["x", "y"], "quality": [0.25, None], "classes": [[0, 1, 1], [1, 0, 0]]}), path)
    table = read_labels(path, key="sha256")
    assert table.kinds == {"quality": "numeric", "classes": "multilabel"}
    assert table.rows == {"x": {"quality": 0.25, "classes": [0, 1, 1]}, "y": {"classes": [1, 0, 0]}}


@pytest.mark.parametrize(
    ("rows", "key", "error", "message"),
    [
        ([["id", "score"], ["a", "1"]], "name", BadRequestError, r"no key column 'name' \(columns: 'id', 'score'\)"),
        ([["name", "score"], ["a", "1"], ["a", "2"]], "name", BadRequestError, "name 'a' appears twice"),
        ([["name", "score"], ["", "1"]], "name", BadRequestError, "row 1 has no name"),
        ([["name", "score"], ["a", "1", "extra"]], "name", BadRequestError, "more cells than the header"),
        ([["name", "name"], ["a", "b"]], "name", BadRequestError, "two columns have the same name"),
        ([["name", "score"], ["a", "1"]], "folder", BadRequestError, "--key 'folder': use one of name, path"),
    ],
)
def test_bad_tables_are_refused_with_the_reason(
    tmp_path: Path, rows: list[list[str]], key: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        read_labels(_csv(tmp_path / "t.csv", rows), key)


def test_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such labels file"):
        read_labels(tmp_path / "missing.csv")
    (tmp_path / "t.xlsx").write_bytes(b"PK")
    with pytest.raises(BadRequestError, match=r"a \.csv or \.parquet file"):
        read_labels(tmp_path / "t.xlsx")
    (tmp_path / "t.parquet").write_bytes(b"not parquet")
    with pytest.raises(BadRequestError, match="not a readable Parquet file"):
        read_labels(tmp_path / "t.parquet", key="name")
    _csv(tmp_path / "big.csv", [["name", "note"], ["a", "x" * 5000]])
    with pytest.raises(BadRequestError, match="a cell of 5,000 characters"):
        read_labels(tmp_path / "big.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(BadRequestError, match="is empty"):
        read_labels(tmp_path / "empty.csv")


def test_matching_reports_every_miss() -> None:
    table = LabelTable("name", {"q": "numeric"}, {"a": {"q": 1}, "twin": {"q": 2}, "ghost": {"q": 3}}, "t.csv")
    loras = [LoraKeys("1", "a"), LoraKeys("2", "twin"), LoraKeys("3", "twin"), LoraKeys("4", "lonely")]
    match = match_labels(table, loras)
    assert match.labelled == {"1": {"q": 1}}
    assert match.unmatched_rows == ["ghost"] and match.ambiguous_rows == [("twin", 2)]
    assert match.unlabelled == ["twin", "twin", "lonely"]
    lines = match.summary(table)
    assert lines[0] == "labels from t.csv: 1 LoRA(s) labelled by name with q (numeric)"
    assert "1 row(s) matched no LoRA: 'ghost'" in lines[1] and "twin (2 LoRAs)" in lines[2]
    assert lines[3] == "3 LoRA(s) have no row: 'twin', 'twin', 'lonely'"


def test_labels_from_kohya_and_peft_metadata(tmp_path: Path) -> None:
    tags = {"10_pixel": {"pixel art": 30, "1girl": 12, "hat": 12}, "5_extra": {"1girl": 5, "sky": 1}}
    metadata = {
        "ss_num_train_images": "120",
        "ss_learning_rate": "0.0001",
        "ss_network_dim": "16",
        "ss_sd_model_name": "v1-5-pruned.safetensors",
        "ss_tag_frequency": json.dumps(tags),
        "modelspec.title": "Pixel",
    }
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = load_lora(save(tmp_path / "pixel.safetensors", kohya(stem, d_in=768, d_out=320), metadata))
    labels = metadata_labels(lora.meta)
    assert labels["ss_num_train_images"] == 120 and labels["ss_learning_rate"] == pytest.approx(1e-4)
    assert labels["ss_network_dim"] == 16 and labels["ss_sd_model_name"] == "v1-5-pruned.safetensors"
    assert labels["tags"] == ["pixel art", "1girl", "hat", "sky"]  # merged over folders: 17, 12, 1; ties by name
    assert labels["modelspec.title"] == "Pixel"
    folder = tmp_path / "peft"
    save(folder / "adapter_model.safetensors", peft("base_model.model.q_proj"))
    write_config(folder, r=4, lora_alpha=8, target_modules=["v_proj", "q_proj"], task_type="CAUSAL_LM")
    peft_labels = metadata_labels(load_lora(folder).meta)
    assert peft_labels["peft.r"] == 4 and peft_labels["peft.lora_alpha"] == 8
    assert peft_labels["peft.target_modules"] == ["q_proj", "v_proj"] and peft_labels["peft.task_type"] == "CAUSAL_LM"
    junk = save(tmp_path / "junk.safetensors", kohya(stem, d_in=768, d_out=320), {"ss_tag_frequency": '{"x": "junk"}'})
    assert "tags" not in metadata_labels(load_lora(junk).meta)  # junk in the metadata: no tags, no crash


# ------------------------------------------------------------------------------------------------ a user's folder
@pytest.fixture(scope="module")
def user_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """12 digits LoRAs copied into a plain folder of PEFT folders (no manifest), with their manifest rows."""
    rows = pq.read_table(ZOO / "manifest.parquet").slice(0, 12).to_pylist()
    folder = tmp_path_factory.mktemp("user") / "my-loras"
    for row in rows:
        shutil.copytree(ZOO / row["path"], folder / f"run-{Path(row['path']).name}")
    return folder, rows


def test_the_zoo_as_a_users_folder_with_a_csv_of_its_labels(
    user_folder: tuple[Path, list[dict]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, rows = user_folder
    table = [["name", "acc_own", "classes"]]
    table += [[f"run-{Path(r['path']).name}", r["y_acc_own"], json.dumps(r["y_classes"])] for r in rows[:10]]
    table += [["run-99999", 0.5, "[1]"]]  # a row for a LoRA that is not there
    labels = _csv(tmp_path / "scores.csv", table)
    db = tmp_path / "lol.duckdb"
    assert main(["ingest", str(folder), "--db", str(db), "--labels", str(labels)]) == 0
    out = capsys.readouterr().out
    assert "labels from scores.csv: 10 LoRA(s) labelled by name with acc_own (numeric), classes (multilabel)" in out
    assert "1 row(s) matched no LoRA: 'run-99999'" in out and "2 LoRA(s) have no row: 'run-00010', 'run-00011'" in out
    from lol_engine.store import LoraStore

    with LoraStore(db) as store:
        stored = {s.name: store.labels(s.id) for s in store.all()}
    assert len(stored) == 12
    for row in rows[:10]:
        got = stored[f"run-{Path(row['path']).name}"]
        assert got["acc_own"] == pytest.approx(row["y_acc_own"]) and got["classes"] == row["y_classes"]
    assert "acc_own" not in stored["run-00010"]


@pytest.mark.parametrize("key", ["path", "sha256"])
def test_tables_keyed_by_path_or_sha256(
    user_folder: tuple[Path, list[dict]], tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    folder, rows = user_folder
    names = [f"run-{Path(r['path']).name}" for r in rows]
    keys = names if key == "path" else [load_lora(folder / n).meta.sha256 for n in names]
    table = [[key, "quality"], *[[k, i / 10] for i, k in enumerate(keys[:3])]]
    db = tmp_path / "lol.duckdb"
    assert (
        main(["ingest", str(folder), "--db", str(db), "--labels", str(_csv(tmp_path / "t.csv", table)), "--key", key])
        == 0
    )
    assert f"3 LoRA(s) labelled by {key}" in capsys.readouterr().out
    from lol_engine.store import LoraStore

    with LoraStore(db) as store:
        quality = {s.name: store.labels(s.id).get("quality") for s in store.all()}
    assert [quality[n] for n in names[:4]] == [0.0, 0.1, 0.2, None]


def test_a_bad_table_stops_the_ingest_before_anything_is_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _csv(tmp_path / "t.csv", [["file", "q"], ["a", "1"]])
    db = tmp_path / "lol.duckdb"
    assert main(["ingest", str(ZOO / "loras" / "00000"), "--db", str(db), "--labels", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no key column 'name'" in err[0] and not db.exists()
