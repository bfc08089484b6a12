"""Ingest: zoos with labels and predictions, bad files refused without trace, and Hub repos from an offline cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("duckdb")

from lol_engine.cli import main
from lol_engine.encoders import FingerprintEncoder, load_predictors
from lol_engine.ingest import ingest
from lol_engine.store import LoraStore
from lol_engine.zoo import ZooSettings, build_zoo

DATA = Path(__file__).parent.parent / "data" / "zoo"


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "digits-small"
    build_zoo("digits", out, ZooSettings(n=6, toy=True), progress=False)
    return out


def test_ingest_zoo_with_labels_predictions_and_fingerprints(small_zoo: Path, tmp_path: Path) -> None:
    (tmp_path / "evil.safetensors").write_bytes(b"\x80\x04K\x01.")
    with LoraStore(tmp_path / "db.duckdb") as store:
        report = ingest([str(small_zoo), str(tmp_path / "evil.safetensors")], store, progress=False)
        assert len(report.ids) == 6 and store.count() == 6
        assert len(report.refused) == 1 and "pickle" in report.refused[0][1]
        lora_id = report.ids[0]
        assert store.get(lora_id).zoo == "digits-small"
        assert {"classes", "acc_own", "probe_member"} <= set(store.labels(lora_id))
        estimates = store.estimates(lora_id)
        assert {"digits-classes", "digits-acc_own"} <= set(estimates)
        assert estimates["digits-acc_own"].kind == "regression" and estimates["digits-classes"].kind == "multilabel"
        assert not any(name.startswith("fashion-gen") for name in estimates)  # spec does not fit: not predicted
        ids, matrix = store.embeddings("fingerprint")
        assert len(ids) == 6 and matrix.shape[1] > 50
        assert ingest([str(small_zoo)], store, progress=False).ids == report.ids  # idempotent
        assert store.count() == 6


def test_a_folder_of_zoos_keeps_each_zoos_labels(small_zoo: Path, tmp_path: Path) -> None:
    """``lol ingest data/zoo``: every built zoo inside the folder comes with its manifest's labels and name; its base
    model files are not offered as LoRAs; a loose LoRA beside the zoos is ingested too."""
    from lol_engine.ingest import lora_sources
    from lol_engine.zoo.manifest import read_manifest

    folder = tmp_path / "zoos"
    shutil.copytree(small_zoo, folder / "first")
    shutil.copytree(small_zoo, folder / "nested" / "second")
    shutil.copy(small_zoo / "loras" / "00000" / "adapter_model.safetensors", folder / "loose.safetensors")
    sources = lora_sources([str(folder)])
    rows = read_manifest(small_zoo)
    assert [s.zoo for s in sources] == ["first"] * len(rows) + ["second"] * len(rows) + [None]
    assert sources[-1].path == folder / "loose.safetensors"
    for source, row in zip(sources, rows + rows, strict=False):
        assert source.labels == {k[2:]: v for k, v in row.items() if k.startswith("y_")} and source.labels
    assert not any("base" in s.path.relative_to(folder).parts for s in sources)


def test_a_batch_is_written_once_its_files_reach_the_byte_bound(
    small_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large LoRAs are not held 256 at a time: a batch goes to the store once its files reach ``BATCH_BYTES``."""
    import lol_engine.ingest as module

    sizes = []
    with LoraStore(tmp_path / "db.duckdb") as store:
        real = store.add_rows
        monkeypatch.setattr(store, "add_rows", lambda rows: sizes.append(len(rows.loras)) or real(rows))
        one_file = (small_zoo / "loras" / "00000" / "adapter_model.safetensors").stat().st_size
        monkeypatch.setattr(module, "BATCH_BYTES", 2 * one_file + 1)  # every third file fills a batch
        report = ingest([str(small_zoo)], store, progress=False)
        assert len(report.ids) == 6 and sizes == [3, 3], sizes
        monkeypatch.setattr(module, "BATCH_BYTES", 10**12)
        sizes.clear()
        ingest([str(small_zoo)], store, progress=False, batch=4)  # the count bound as before
        assert sizes == [4, 2]


def test_shipped_predictors_load() -> None:
    predictors = load_predictors()
    assert {"digits-classes", "fashion-gen-quality"} <= set(predictors)


def test_hub_repo_from_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1 (set by conftest before import)."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--style-lora"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(DATA / "digits" / "loras" / "00000" / "adapter_model.safetensors", snapshot)
    shutil.copy(DATA / "digits" / "loras" / "00000" / "adapter_config.json", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with LoraStore(":memory:") as store:
        report = ingest(
            ["someone/style-lora"],
            store,
            encoders=[FingerprintEncoder()],
            progress=False,
            cache_dir=str(tmp_path / "hub"),
        )
        assert len(report.ids) == 1 and store.get(report.ids[0]).format == "peft"


def test_ingest_cli(small_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "cli.duckdb"
    assert main(["ingest", str(small_zoo / "loras" / "00000"), "--db", str(db)]) == 0
    assert "1 LoRA(s) in the store" in capsys.readouterr().out
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    assert main(["ingest", str(tmp_path / "bad.safetensors"), "--db", str(db)]) == 2
    assert "refused" in capsys.readouterr().err


def test_ingest_unfreezes_the_heap_even_when_the_store_fails(
    small_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heap frozen for the ingest is handed back to the collector, also when a write fails mid-way."""
    import gc

    from lol_engine.errors import StoreError

    with LoraStore(tmp_path / "db.duckdb") as store:
        frozen: list[int] = []
        real = store.add_rows

        def failing(rows: object) -> list[str]:
            frozen.append(gc.get_freeze_count())
            raise StoreError("disk full")

        monkeypatch.setattr(store, "add_rows", failing)
        with pytest.raises(StoreError, match="disk full"):
            ingest([str(small_zoo)], store, [FingerprintEncoder()], progress=False, batch=2)
        assert frozen and frozen[0] > 0 and gc.get_freeze_count() == 0
        assert store.count() == 0  # the failing batch, and nothing after it
        monkeypatch.setattr(store, "add_rows", real)
        assert len(ingest([str(small_zoo)], store, [FingerprintEncoder()], progress=False).ids) == 6
        assert gc.get_freeze_count() == 0


def test_ingests_in_two_threads_keep_the_heap_frozen_until_the_last_one_ends(
    small_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The freeze is the process's: when one of two overlapping ingests ends, the other's heap stays frozen."""
    import gc
    import threading

    seen: dict[str, int] = {}
    first_in, first_out = threading.Event(), threading.Event()
    stores = [LoraStore(tmp_path / f"{k}.duckdb") for k in ("a", "b")]
    real = stores[0].add_rows

    def held(rows: object) -> list[str]:  # the first ingest waits inside its write until the second has ended
        first_in.set()
        assert first_out.wait(60)
        seen["after the other ended"] = gc.get_freeze_count()
        return real(rows)

    monkeypatch.setattr(stores[0], "add_rows", held)
    failed: list[BaseException] = []

    def run_first() -> None:
        try:
            ingest([str(small_zoo)], stores[0], [FingerprintEncoder()], progress=False)
        except BaseException as e:  # shown by the assertion below, not lost in the thread
            failed.append(e)
            first_in.set()

    first = threading.Thread(target=run_first)
    first.start()
    assert first_in.wait(60)
    ingest([str(small_zoo)], stores[1], [FingerprintEncoder()], progress=False)
    first_out.set()
    first.join(60)
    assert not failed, failed
    assert seen["after the other ended"] > 0 and gc.get_freeze_count() == 0
    assert [s.count() for s in stores] == [6, 6]
    for store in stores:
        store.close()


def test_loras_sharing_a_config_text_share_its_parse_not_their_metadata(tmp_path: Path) -> None:
    from lora_files import peft, save, write_config

    from lol_engine.lora.config import read_adapter_config
    from lol_engine.lora.parse import load_lora

    folders = [tmp_path / name for name in ("a", "b", "c")]
    for i, folder in enumerate(folders):
        save(folder / "adapter_model.safetensors", peft("model.layers.0.self_attn.q_proj", seed=i))
        write_config(folder, r=4, lora_alpha=16 if i < 2 else 8, rank_pattern={"q_proj": 4})
    configs = [read_adapter_config(folder / "adapter_config.json") for folder in folders]
    assert configs[0] is configs[1] and configs[1] is not configs[2]  # parsed once per distinct text
    loras = [load_lora(folder) for folder in folders]
    assert [lora.modules[0].scale for lora in loras] == [4.0, 4.0, 2.0]
    loras[0].meta.adapter_config["r"] = 99  # type: ignore[index]  # one LoRA's metadata is its own
    assert loras[1].meta.adapter_config["r"] == 4 and configs[0].raw["r"] == 4
