"""Learning on a user's collection: the shipped digits zoo ingested as a plain folder with a CSV of its labels,
trained from the CLI, compared with baselines and with `lol train --zoo` on the same split, and registered."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("duckdb")

from lol_engine import load_lora
from lol_engine.cli import main
from lol_engine.errors import BadRequestError, NotFoundError
from lol_engine.explorer import Explorer
from lol_engine.train.collection import _splits, collection_data
from lol_engine.train.loop import LoadedZoo, TrainConfig, train_on_zoo

ZOO = Path(__file__).parent.parent / "data" / "zoo" / "digits"
N = 150
EPOCHS = 6


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A folder of N digits LoRAs (no manifest) and a CSV of their labels and split, ingested into a collection."""
    root = tmp_path_factory.mktemp("user")
    rows = pq.read_table(ZOO / "manifest.parquet").slice(0, N).to_pylist()
    with (root / "labels.csv").open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["name", "acc_own", "split", "group"])
        for row in rows:
            name = f"run-{Path(row['path']).name}"
            shutil.copytree(ZOO / row["path"], root / "loras" / name)
            out.writerow([name, row["y_acc_own"], row["split"], int(Path(row["path"]).name) % 40])
    db = root / "data" / "lol.duckdb"
    assert main(["ingest", str(root / "loras"), "--db", str(db), "--labels", str(root / "labels.csv")]) == 0
    return db, rows


def test_training_on_the_collection_matches_training_on_the_zoo(
    user: tuple[Path, list[dict]], capsys: pytest.CaptureFixture[str]
) -> None:
    db, rows = user
    capsys.readouterr()
    args = ["train", "--db", str(db), "--label", "acc_own", "--model", "svd", "--seeds", "2", "--epochs", str(EPOCHS)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{N} LoRAs (digits-mlp), split by the collection's split label" in out
    assert "baseline mean r2" in out and "baseline ridge on fingerprint r2" in out and "registered" in out
    collection_r2 = next(float(line.split()[2]) for line in out.splitlines() if line.startswith("test r2"))
    zoo = LoadedZoo(ZOO, rows, [load_lora(ZOO / r["path"]) for r in rows])
    zoo_r2 = [
        train_on_zoo(zoo, "acc_own", "svd", config=TrainConfig(epochs=EPOCHS, seed=s))[2]["test"]["r2"] for s in (0, 1)
    ]
    assert abs(collection_r2 - float(np.mean(zoo_r2))) < 3 * float(np.std(zoo_r2)) + 0.1  # within seed noise

    folder = db.parent / "predictors" / "acc_own-svd"
    config = json.loads((folder / "config.json").read_text())
    provenance = config["provenance"]
    assert provenance["label"] == "acc_own" and provenance["split"]["by"] == "the collection's split label"
    assert sum(provenance["split"][s] for s in ("train", "val", "cal", "test")) == N and provenance["split"]["cal"] > 0
    assert config["calibration"]["split"] == "cal" and config["calibration"]["n"] == provenance["split"]["cal"]
    assert set(config["baselines"]) == {"mean r2", "ridge on fingerprint r2"} and config["calibration"]["n"] > 0
    assert len(config["seen"]["sha256"]) == sum(provenance["split"][s] for s in ("train", "val", "cal"))
    domain = config["domain"]  # its out-of-domain reference: the collection's train split, threshold on cal + test
    assert (domain["n_reference"], domain["held_out_splits"]) == (provenance["split"]["train"], ["cal", "test"])
    assert "target" not in config and "recipe" not in config  # no recipe describes a user's label

    explorer = Explorer.open(db)  # a restart: the collection's own predictor is loaded beside the shipped ones
    try:
        assert "acc_own-svd" in explorer.predictors
        records = explorer.records()
        assert all("pred:acc_own-svd" in r for r in records)  # applied to every stored LoRA it fits: tables, maps
        assert "lol:acc_own-svd" in explorer.maps()
        fresh = explorer.analyse(ZOO / "loras" / "00900")  # a new upload gets its estimate, not in-sample
        estimate = fresh.estimates["acc_own-svd"]
        assert estimate.kind == "regression" and not estimate.in_sample and estimate.interval is not None
        assert estimate.domain_distance is not None and estimate.out_of_domain is not None
        glossary = explorer.predictors["acc_own-svd"].glossary  # what is known, and whose the label's meaning is
        assert (
            glossary.users_label and "yours" in glossary.description.meaning and glossary.base_family == "digits-mlp"
        )
        assert glossary.n_train == provenance["split"]["train"] and glossary.skill is not None
        assert glossary.skill.value == config["result"]["test"]["r2"]
        assert glossary.baseline is not None and glossary.constant is not None
        assert (glossary.baseline.who, glossary.baseline.value) == (
            "ridge on fingerprint",
            config["baselines"]["ridge on fingerprint r2"],
        )
        assert glossary.constant.value == config["baselines"]["mean r2"]
        seen = explorer.analyse(ZOO / rows[0]["path"]).estimates["acc_own-svd"]
        assert seen.in_sample == (rows[0]["split"] != "test")
    finally:
        explorer.close()


def test_groups_never_straddle_splits_and_misses_are_refused(user: tuple[Path, list[dict]]) -> None:
    db, _ = user
    explorer = Explorer.open(db)
    try:
        data = collection_data(explorer, "acc_own")  # the collection's split label wins
        assert data.split_by == "the collection's split label"
        with explorer.store._cursor() as cur:  # drop the split label: now the group label decides
            cur.execute("DELETE FROM labels WHERE name = 'split'")
        explorer._changed()
        data = collection_data(explorer, "acc_own", seed=3)
        assert data.split_by == "group label 'group'"
        groups = {explorer.labels(r["id"])["group"]: set() for r in data.zoo.rows}
        for r in data.zoo.rows:
            groups[explorer.labels(r["id"])["group"]].add(r["split"])
        assert all(len(s) == 1 for s in groups.values())  # one split per group
        expected = dict(zip(groups, _splits([str(g) for g in groups], 3), strict=True))
        assert all(s == {expected[g]} for g, s in groups.items())  # each group where the quota split puts it
        with pytest.raises(NotFoundError, match="no stored LoRA has the label 'nope'"):
            collection_data(explorer, "nope")
        with pytest.raises(BadRequestError, match=r"passes the filters \(150 whose collection is not elsewhere\)"):
            collection_data(explorer, "acc_own", collection="elsewhere")
        explorer.store.set_labels({r["id"]: {"group": "one subject"} for r in data.zoo.rows})
        explorer._changed()
        with pytest.raises(BadRequestError, match=r"150 LoRAs give splits of .*: every split needs 2; label more"):
            collection_data(explorer, "acc_own")  # one group: everything lands in one split
    finally:
        explorer.close()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 digits LoRAs of three module layouts (fc1 + fc2, fc1 only, fc2 only) with a CSV of labels, ingested."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("mixed")
    rows = pq.read_table(ZOO / "manifest.parquet").slice(0, 60).to_pylist()
    with (root / "labels.csv").open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["name", "acc_own", "split"])
        for k, row in enumerate(rows):
            folder = root / "loras" / f"run-{k:02d}"
            shutil.copytree(ZOO / row["path"], folder)
            drop = ("fc2", "fc1", None)[k % 3]
            if drop is not None:  # the same file without one module's factors (metadata kept)
                path = folder / "adapter_model.safetensors"
                with safe_open(str(path), "pt") as fh_in:
                    meta, keys = fh_in.metadata(), fh_in.keys()  # safe_open is not iterable
                    tensors = {key: fh_in.get_tensor(key) for key in keys if f".{drop}." not in key}
                save_file(tensors, str(path), metadata=meta)
            out.writerow([folder.name, row["y_acc_own"], (("train",) * 8 + ("val", "test"))[k % 10]])
    db = root / "data" / "lol.duckdb"
    assert main(["ingest", str(root / "loras"), "--db", str(db), "--labels", str(root / "labels.csv")]) == 0
    return db


def test_module_tokens_learns_from_every_layout(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    args = ["train", "--db", str(mixed), "--label", "acc_own", "--model", "module_tokens", "--seeds", "1"]
    assert main([*args, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "60 LoRAs (digits-mlp), split by the collection's split label: train 48, val 6, test 6" in out
    assert "no cal split: the ranges are calibrated on val" in out
    config = json.loads((mixed.parent / "predictors" / "acc_own-module_tokens" / "config.json").read_text())
    assert config["calibration"]["split"] == "val" and config["domain"]["held_out_splits"] == ["test"]
    assert "left out" not in out and "registered as acc_own-module_tokens" in out
    config = json.loads((mixed.parent / "predictors" / "acc_own-module_tokens" / "config.json").read_text())
    assert config["vocabulary"]["roles"] == ["fc1", "fc2"] and config["provenance"]["left_out"] == {}
    explorer = Explorer.open(mixed)
    try:
        assert all("pred:acc_own-module_tokens" in r for r in explorer.records())  # fc1 only, fc2 only, both
        fixed = collection_data(explorer, "acc_own")  # a fixed-layout model still gets one layout, and says so
        assert len(fixed.ids) == 20 and fixed.left_out == {"another module layout": 40}
    finally:
        explorer.close()


# ------------------------------------------------------------------------------ the metadata path, SD 1.5 shapes
SD15_MODULES = (  # kohya names of SD 1.5 UNet attention modules, with their (d_out, d_in)
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", 320, 768),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", 1280, 1280),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k", 320, 768),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v", 320, 768),
)
IMAGES = (10, 20, 40, 80, 160, 320)


def _sd_lora(images: int, rank: int, modules: tuple[tuple[str, int, int], ...], seed: int) -> dict:
    """A kohya SD 1.5 LoRA whose spectra flatten as its dataset grows (the DSiRe effect), in a random GL(r) basis."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    decay = 1.6 / np.log2(images)
    out = {}
    for stem, d_out, d_in in modules:
        sigma = torch.exp(-decay * torch.arange(rank, dtype=torch.float64)) * (
            1 + 0.05 * torch.randn(rank, generator=gen)
        )
        u = torch.linalg.qr(torch.randn(d_out, rank, generator=gen, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(d_in, rank, generator=gen, dtype=torch.float64))[0]
        g = torch.randn(rank, rank, generator=gen, dtype=torch.float64) + 3 * torch.eye(rank, dtype=torch.float64)
        a, b = g @ (sigma[:, None] * v.T), u @ torch.linalg.inv(g)  # ΔW = B A = U diag(σ) Vᵀ
        out[f"{stem}.lora_down.weight"] = (0.05 * a).to(torch.float16)
        out[f"{stem}.lora_up.weight"] = (0.05 * b).to(torch.float16)
        out[f"{stem}.alpha"] = torch.tensor(float(rank))
    return out


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """72 kohya SD 1.5 LoRAs of two layouts and two ranks: 60 keep their metadata (ss_num_train_images, …), 12 were
    stripped before sharing. Returns the collection and the stripped files' hidden dataset sizes."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sd")
    hidden = {}
    for k in range(72):
        images, rank = IMAGES[k % len(IMAGES)], (4, 8)[(k // 6) % 2]
        modules = SD15_MODULES if k % 3 else SD15_MODULES[1:3] + SD15_MODULES[4:]  # all, or cross-attention only
        name = f"style-{k:02d}"
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_base_model_version": "sd_v1",
            "ss_num_train_images": str(images),
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(rank),
        }
        stripped = k >= 60
        if stripped:
            hidden[name] = images
        save_file(
            _sd_lora(images, rank, modules, seed=k), str(root / f"{name}.safetensors"), None if stripped else metadata
        )
    db = root / "data" / "lol.duckdb"
    assert main(["ingest", str(root), "--db", str(db)]) == 0
    return db, hidden


def test_a_model_trained_on_metadata_labels_predicts_them_for_stripped_files(
    sd_folder: tuple[Path, dict[str, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    """kohya metadata becomes labels at ingest; module_tokens learns ss_num_train_images (a count: regression, not 321
    classes) from the 60 files that keep it, of both layouts and ranks, and predicts it for the 12 stripped ones."""
    db, hidden = sd_folder
    capsys.readouterr()
    args = ["train", "--db", str(db), "--label", "ss_num_train_images", "--model", "module_tokens"]
    assert main([*args, "--base-family", "sd1", "--seeds", "1", "--epochs", "4"]) == 0
    out = capsys.readouterr().out
    assert "60 LoRAs (sd1), split by LoRA" in out and "left out" not in out, out
    assert "test r2" in out and "baseline ridge on fingerprint r2" in out  # the baselines stand beside it
    explorer = Explorer.open(db)
    try:
        records = {r["name"]: r for r in explorer.records()}
        assert len(records) == 72 and all(r["base_family"] == "sd1" for r in records.values())  # stripped: by shape
        predictor = "ss_num_train_images-module_tokens"
        for name, record in records.items():
            estimate = explorer.estimates(record["id"])[predictor]
            assert estimate.kind == "regression" and np.isfinite(estimate.value)
            if name in hidden:  # never labelled, never seen: predicted from the weights alone
                assert "ss_num_train_images" not in explorer.labels(record["id"]) and not estimate.in_sample
        assert any(explorer.estimates(r["id"])[predictor].in_sample for r in records.values())  # its training LoRAs
    finally:
        explorer.close()
