"""Baselines against computations made here with scikit-learn and numpy directly, on the same arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, r2_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from lol_engine.lora.weights import LoraWeights
from lol_engine.train.baselines import (
    GBT_GRID,
    LINEAR_ALPHAS,
    fit_baselines,
    hyperparameter_columns,
    zoo_features,
)
from lol_engine.train.loop import LoadedZoo

SPLIT = ["train"] * 60 + ["val"] * 20 + ["test"] * 20


def _zoo(y: list, extra: dict[str, list] | None = None) -> LoadedZoo:
    rows = [{"split": s, "y_t": v} for s, v in zip(SPLIT, y, strict=True)]
    for key, values in (extra or {}).items():
        for row, value in zip(rows, values, strict=True):
            row[key] = value
    return LoadedZoo(Path("."), rows, [])


def _x(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(size=(100, 5)) * [1.0, 10.0, 0.1, 3.0, 1.0] + [0.0, 50.0, 0.0, -2.0, 1.0]


def test_ridge_and_gbt_regression_match_sklearn_with_the_hyperparameters_chosen_on_val() -> None:
    rng = np.random.default_rng(0)
    x = _x(rng)
    y = x @ [1.0, 0.1, 4.0, -0.3, 0.0] + np.sin(3 * x[:, 0]) + rng.normal(size=100)
    got = fit_baselines(_zoo(y.tolist()), "t", {"f": x})
    tr, va, te = slice(0, 60), slice(60, 80), slice(80, 100)

    assert got["constant"]["test"]["r2"] == pytest.approx(1 - ((y[te] - y[tr].mean()) ** 2).sum() / y[te].var() / 20)

    scaler = StandardScaler().fit(x[tr])
    fits = {a: Ridge(alpha=a).fit(scaler.transform(x[tr]), y[tr]) for a in LINEAR_ALPHAS}
    alpha = min(fits, key=lambda a: ((fits[a].predict(scaler.transform(x[va])) - y[va]) ** 2).mean())
    assert got["linear · f"]["params"] == {"alpha": alpha}
    expected = r2_score(y[te], fits[alpha].predict(scaler.transform(x[te])))
    assert got["linear · f"]["test"]["r2"] == pytest.approx(expected, rel=1e-4)

    trees = [
        HistGradientBoostingRegressor(early_stopping=False, random_state=0, **p).fit(x[tr], y[tr]) for p in GBT_GRID
    ]
    best = min(range(len(trees)), key=lambda i: ((trees[i].predict(x[va]) - y[va]) ** 2).mean())
    assert got["gbt · f"]["params"] == GBT_GRID[best]
    assert got["gbt · f"]["test"]["r2"] == pytest.approx(r2_score(y[te], trees[best].predict(x[te])), rel=1e-4)
    assert got["gbt · f"]["val"]["r2"] == pytest.approx(r2_score(y[va], trees[best].predict(x[va])), rel=1e-4)


def test_logistic_baseline_and_majority_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    x = _x(rng)
    y = ((x[:, 0] + 0.2 * x[:, 3] + rng.normal(size=100)) > 0.3).astype(int)
    got = fit_baselines(_zoo(y.tolist()), "t", {"f": x}, learners=("linear",))
    tr, va, te = slice(0, 60), slice(60, 80), slice(80, 100)
    majority = int(y[tr].mean() >= 0.5)
    assert got["constant"]["test"]["accuracy"] == pytest.approx((y[te] == majority).mean())

    scaler = StandardScaler().fit(x[tr])

    def log_loss(model: LogisticRegression) -> float:
        p = np.clip(model.predict_proba(scaler.transform(x[va]))[:, 1], 1e-6, 1 - 1e-6)
        return float(-(y[va] * np.log(p) + (1 - y[va]) * np.log(1 - p)).mean())

    fits = {a: LogisticRegression(C=1 / a, max_iter=2000).fit(scaler.transform(x[tr]), y[tr]) for a in LINEAR_ALPHAS}
    alpha = min(fits, key=lambda a: log_loss(fits[a]))
    assert got["linear · f"]["params"] == {"alpha": alpha}
    p = fits[alpha].predict_proba(scaler.transform(x[te]))[:, 1]
    assert got["linear · f"]["test"]["accuracy"] == pytest.approx(accuracy_score(y[te], p > 0.5))
    assert got["linear · f"]["test"]["auc"] == pytest.approx(roc_auc_score(y[te], p), rel=1e-4)


def test_categorical_majority_is_the_training_majority() -> None:
    y = [2] * 30 + [1] * 20 + [0] * 10 + [1] * 20 + [1] * 15 + [2] * 5  # train majority 2, test majority 1
    got = fit_baselines(_zoo(y), "t", {}, learners=())
    assert set(got) == {"constant"} and got["constant"]["test"]["accuracy"] == pytest.approx(5 / 20)


def test_masked_multilabel_entries_fit_and_count_only_where_the_mask_is_set() -> None:
    """Entry 0 is learnable; entry 1 is masked out everywhere on the positives it would fit, so it stays constant."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 2))
    bit0 = (x[:, 0] > 0).astype(int)
    bit1 = rng.integers(0, 2, size=100)
    y = [[int(a), int(b)] for a, b in zip(bit0, bit1, strict=True)]
    mask = [[1, int(b == 0)] for b in bit1]  # entry 1 counts only where it is 0
    got = fit_baselines(_zoo(y, {"y_t_mask": mask}), "t", {"f": x}, learners=("linear",))
    te = slice(80, 100)
    scaler = StandardScaler().fit(x[:60])
    model = LogisticRegression(C=1 / got["linear · f"]["params"]["alpha"], max_iter=2000)
    p0 = model.fit(scaler.transform(x[:60]), bit0[:60]).predict_proba(scaler.transform(x[te]))[:, 1]
    hits = list(((p0 > 0.5) == bit0[te]).astype(float)) + [1.0] * int((bit1[te] == 0).sum())  # entry 1: rate 0
    assert got["linear · f"]["test"]["accuracy"] == pytest.approx(np.mean(hits))


def test_hyperparameter_columns_leave_out_data_choices_and_seeds() -> None:
    row = {
        "hp_classes_mask": 5,
        "hp_rank": 4,
        "hp_lr": 1e-3,
        "hp_identity": 3,
        "hp_image_seed": 9,
        "hp_data_seed": 1,
        "hp_prompt": 2,
        "hp_name": "x",
        "y_t": 1.0,
    }
    assert hyperparameter_columns([row]) == ["hp_rank", "hp_lr", "hp_prompt"]


def test_spectra_features_are_the_sorted_singular_values_of_each_scaled_delta_w() -> None:
    gen = torch.Generator().manual_seed(0)
    loras = [
        LoraWeights.from_factors(
            {
                f"m{j}": (
                    torch.randn(r, 6, generator=gen, dtype=torch.float64),
                    torch.randn(5, r, generator=gen, dtype=torch.float64),
                )
                for j in range(2)
            },
            scale=0.5,
        )
        for r in (2, 3)
    ]
    rows = [{"split": "train", "y_t": 0.0}] * 2
    feats = zoo_features(LoadedZoo(Path("."), rows, loras))
    assert feats["spectra"].shape == (2, 6) and "hyperparameters" not in feats
    for i, lora in enumerate(loras):
        for j in range(2):
            module = lora[f"m{j}"]
            sigma = np.linalg.svd(0.5 * (module.b @ module.a).numpy(), compute_uv=False)[:3]
            padded = np.zeros(3)
            padded[: min(3, len(sigma))] = sigma[:3]
            padded[module.a.shape[0] :] = 0.0  # rank 2: its third value is a zero pad
            assert feats["spectra"][i, 3 * j : 3 * j + 3] == pytest.approx(padded, abs=1e-9)
