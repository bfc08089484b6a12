"""Training tiny LoL models on the shipped zoo: tasks, selection on validation, checkpoints, train/predict CLI."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")

from lol_engine import load_lora
from lol_engine.cli import main
from lol_engine.nn import ModelConfig, SpecMismatchError, build_model, registered_models
from lol_engine.nn.batch import LoraBatch
from lol_engine.nn.models import LoLModel
from lol_engine.train import TrainConfig, infer_task, load_predictor, load_zoo, save_predictor, train_on_zoo
from lol_engine.train.calibrate import calibrate
from lol_engine.train.loop import LoadedZoo, Split, fit
from lol_engine.train.tasks import Task

DATA = Path(__file__).parent.parent / "data" / "zoo"
TINY = ModelConfig(hidden=16, width=4, tokens=16, heads=2, dropout=0.0)
FAST = TrainConfig(epochs=2, batch=64)
BUMPY = TrainConfig(epochs=8, batch=16, lr=3e-2)  # gl_net on digits acc_own: validation loss lowest mid-run


@pytest.fixture(scope="module")
def digits():
    return load_zoo(DATA / "digits")


@pytest.fixture(scope="module")
def fashion():
    return load_zoo(DATA / "fashion-gen")


def test_tasks_are_inferred_from_labels(digits, fashion) -> None:
    train = digits.split("train")
    kinds = {
        label: infer_task(digits.rows, label, train).kind
        for label in ("classes", "n_classes", "acc_own", "probe_member")
    }
    assert kinds == {
        "classes": "multilabel",
        "n_classes": "categorical",
        "acc_own": "regression",
        "probe_member": "multilabel",
    }
    assert infer_task(digits.rows, "probe_member", train).mask_label == "probe_mask"
    assert infer_task(fashion.rows, "bold", fashion.split("train")).kind == "binary"
    with pytest.raises(KeyError, match="no label 'nope'"):
        infer_task(digits.rows, "nope", train)


@pytest.mark.parametrize("model_name", registered_models())
def test_every_model_trains_on_the_default_zoo(digits, model_name: str) -> None:
    _model, _task, result = train_on_zoo(digits, "classes", model_name, TINY, FAST)
    assert set(result["test"]) == {"loss", "accuracy", "auc"}
    assert 0.0 <= result["test"]["accuracy"] <= 1.0
    history = result["fit"]["val_loss_history"]
    assert result["fit"]["best_epoch"] == int(np.argmin(history))  # selection on validation only


@pytest.mark.parametrize("label", ["quality", "class", "bold"])
def test_fashion_tasks(fashion, label: str) -> None:
    _, task, result = train_on_zoo(fashion, label, "gl_net", TINY, FAST)
    assert np.isfinite(result["test"]["loss"])
    if task.kind == "regression":
        assert {"r2", "spearman", "kendall"} <= set(result["test"])


def test_checkpoint_round_trip_and_mismatch(digits, fashion, tmp_path: Path) -> None:
    model, task, _ = train_on_zoo(digits, "acc_own", "spectral_glnet", TINY, FAST)
    save_predictor(tmp_path, model, task, "spectral_glnet", True)
    predictor = load_predictor(tmp_path)
    lora = digits.loras[0]
    with torch.no_grad():
        expected = task.decode(model.eval()(LoraBatch.from_loras([lora])))[0]
    estimate = predictor.predict(lora)
    assert (estimate.kind, estimate.label, estimate.in_sample) == ("regression", "acc_own", False)
    assert estimate.value == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(SpecMismatchError, match="missing"):
        predictor.predict(fashion.loras[0])


def test_train_and_predict_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pred"
    args = [
        "train",
        "--zoo",
        str(DATA / "digits"),
        "--task",
        "classes",
        "--model",
        "svd",
        "--seeds",
        "1",
        "--epochs",
        "1",
    ]
    assert main([*args, "--out", str(out)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    lora_dir = DATA / "digits" / "loras" / "00003"
    assert main(["predict", str(lora_dir), "--model", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "multilabel" and set(report["probabilities"]) == {f"classes[{i}]" for i in range(10)}
    assert report["in_sample"] is True  # trained with --out: the predictor recorded the LoRAs it learned from
    assert main(["predict", str(DATA / "fashion-gen" / "loras" / "00000"), "--model", str(out)]) == 2
    assert "does not fit this predictor" in capsys.readouterr().err
    assert main(["train", "--zoo", str(DATA / "digits"), "--task", "nope", "--model", "svd", "--seeds", "1"]) == 2
    assert load_lora(lora_dir).meta.base_family == "digits-mlp"


@pytest.mark.parametrize(
    ("values", "kind", "outputs"),
    [
        ([0, 1, 1, 0], "binary", 1),
        ([0, 3, 9, 2], "categorical", 10),  # class codes 0..9
        ([10, 20, 40, 80, 160, 320], "regression", 1),  # a count with few values is still a number
        ([1, 2, 3, 25], "regression", 1),  # past 20 classes
        ([-1, 0, 1, 2], "regression", 1),  # not codes
        ([0.5, 0.25, 0.5, 0.75], "regression", 1),
    ],
)
def test_infer_task_reads_class_codes_as_classes_and_other_numbers_as_numbers(
    values: list, kind: str, outputs: int
) -> None:
    rows = [{"y_t": v} for v in values]
    task = infer_task(rows, "t", np.ones(len(rows), dtype=bool))
    assert (task.kind, task.out_dim) == (kind, outputs)
    if kind == "regression":
        assert task.mean == pytest.approx(np.mean(values)) and task.std == pytest.approx(np.std(values))


def _loss_on_rows(model: LoLModel, task: Task, zoo: LoadedZoo, split: str) -> float:
    """The task loss on the manifest rows marked ``split``, computed here rather than by the training loop."""
    idx = [i for i, row in enumerate(zoo.rows) if row["split"] == split]
    batch = LoraBatch.from_loras([zoo.loras[i] for i in idx], spec=zoo.loras[0].spec)  # digits: one spec
    y = torch.tensor([zoo.rows[i][f"y_{task.label}"] for i in idx], dtype=torch.float32)
    with torch.no_grad():
        return float(task.loss(model.eval()(batch), y, torch.ones_like(y, dtype=torch.bool)))


def test_fit_keeps_the_epoch_whose_recomputed_validation_loss_is_lowest(digits) -> None:
    """Every epoch's weights are saved and their validation loss recomputed: ``best_epoch == argmin(history)``
    alone would pass whichever split filled the history."""
    train_idx = digits.split("train")
    task = infer_task(digits.rows, "acc_own", train_idx)
    train = Split.make(digits, train_idx, task, True)
    val = Split.make(digits, digits.split("val"), task, True, train.batch.spec)
    torch.manual_seed(BUMPY.seed)
    model = build_model("gl_net", train.batch.spec, task.out_dim, TINY)
    states = []

    def keep(epoch: int, epochs: int, val_loss: float) -> bool:
        states.append(copy.deepcopy(model.state_dict()))
        return True

    info = fit(model, task, train, val, BUMPY, keep)
    probe = copy.deepcopy(model)
    recomputed = []
    for state in states:
        probe.load_state_dict(state)
        recomputed.append(_loss_on_rows(probe, task, digits, "val"))
    assert info["val_loss_history"] == pytest.approx(recomputed, rel=1e-5)
    best = int(np.argmin(recomputed))
    assert 0 < best < BUMPY.epochs - 1  # neither the first nor the last epoch: the choice is visible
    assert info["best_epoch"] == best
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, states[best][key], rtol=0, atol=0)


def test_early_stopping_runs_patience_epochs_past_the_lowest_validation_loss(digits) -> None:
    """With ``patience`` p, training stops p epochs after the epoch of the lowest validation loss (or at the cap),
    and keeps that epoch's weights; without it, every epoch runs."""
    full = train_on_zoo(digits, "acc_own", "gl_net", TINY, BUMPY)[2]["fit"]["val_loss_history"]
    first_stall = next(e for e in range(1, len(full)) if full[e] >= min(full[:e]))  # no new lowest loss
    assert first_stall < len(full) - 1  # the run stops before the cap
    stopped = train_on_zoo(digits, "acc_own", "gl_net", TINY, replace(BUMPY, patience=1))[2]["fit"]
    assert stopped["val_loss_history"] == pytest.approx(full[: first_stall + 1], rel=1e-6)
    assert stopped["best_epoch"] == int(np.argmin(full[: first_stall + 1]))


def test_train_on_zoo_selects_on_the_manifests_validation_rows(digits) -> None:
    model, task, result = train_on_zoo(digits, "acc_own", "gl_net", TINY, BUMPY)
    val_loss = _loss_on_rows(model, task, digits, "val")
    assert val_loss == pytest.approx(min(result["fit"]["val_loss_history"]), rel=1e-5)  # chosen where val is lowest
    assert result["val"]["loss"] == pytest.approx(val_loss, rel=1e-5)
    assert result["test"]["loss"] == pytest.approx(_loss_on_rows(model, task, digits, "test"), rel=1e-5)
    train_y = [row["y_acc_own"] for row in digits.rows if row["split"] == "train"]
    assert (task.mean, task.std) == pytest.approx((np.mean(train_y), np.std(train_y)), rel=1e-9)


def test_calibration_threshold_and_coverage_from_the_named_splits(digits, tmp_path: Path) -> None:
    model, task, _ = train_on_zoo(digits, "acc_own", "gl_net", TINY, FAST)
    save_predictor(tmp_path, model, task, "gl_net", True)
    cal = calibrate(load_predictor(tmp_path), digits, coverage=0.8, split="cal", check="test")

    def residuals(split: str) -> np.ndarray:
        idx = [i for i, row in enumerate(digits.rows) if row["split"] == split]
        with torch.no_grad():
            pred = task.decode(model.eval()(LoraBatch.from_loras([digits.loras[i] for i in idx]))).numpy()
        return np.abs(np.array([digits.rows[i]["y_acc_own"] for i in idx]) - pred)

    scores = np.sort(residuals("cal"))
    q = scores[math.ceil((len(scores) + 1) * 0.8) - 1]  # split conformal: the ⌈(n + 1)·0.8⌉-th smallest residual
    assert (cal["n"], cal["q"]) == (len(scores), pytest.approx(q, rel=1e-5))
    assert cal["test_coverage"] == pytest.approx(float((residuals("test") <= q).mean()))
    assert cal["test_mean_size"] == pytest.approx(2 * q, rel=1e-5)
