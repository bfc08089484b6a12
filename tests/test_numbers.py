"""Numbers checked against independent computations: metrics against sklearn/scipy, regression normalisation
against the training rows, fingerprints against a hand-computed spectrum, zoo and collection splits over many
indices, the baselines beside collection-trained models against their own fit on train + val.

Each test here exists because a wrong formula or the wrong split used to pass every range and key-name check
(issue 13, item 7; STYLE.md anti-pattern 15).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, kendalltau, spearmanr
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import accuracy_score, r2_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from lol_engine.fingerprint import FINGERPRINT_NAMES, fingerprint, module_role
from lol_engine.lora.weights import LoraWeights
from lol_engine.train.collection import SHARES, CollectionData, _splits, baselines
from lol_engine.train.loop import LoadedZoo
from lol_engine.train.tasks import Task, infer_task, metrics
from lol_engine.zoo.recipe import SPLITS, group_split, key_uniform, quota_splits, split_of

# ---------------------------------------------------------------------------------------------------------------
# Metrics on fixed numbers
# ---------------------------------------------------------------------------------------------------------------

_Y = np.array([1.0, 2.5, 4.0, 0.5, 3.0, 6.0, 2.0, 2.0])
_PRED = np.array([1.5, 2.0, 3.0, 1.5, 3.5, 4.0, 2.5, 1.0])  # less spread than _Y: R²'s denominator matters


def test_regression_metrics_match_sklearn_and_scipy() -> None:
    task = Task("t", "regression", 1, ("t",), mean=2.0, std=4.0)
    logits = torch.tensor((_PRED - 2.0) / 4.0, dtype=torch.float64)[:, None]  # decodes to _PRED
    y = torch.tensor(_Y, dtype=torch.float64)
    out = metrics(task, logits, y, torch.ones_like(y, dtype=torch.bool))
    assert out["r2"] == pytest.approx(r2_score(_Y, _PRED), abs=1e-12)
    assert out["r2"] == pytest.approx(1 - 8.0 / 21.375, abs=1e-12)  # by hand: Σ(y-ŷ)² = 8, Σ(y-ȳ)² = 21.375
    assert out["spearman"] == pytest.approx(spearmanr(_Y, _PRED).statistic, abs=1e-12)
    assert out["kendall"] == pytest.approx(kendalltau(_Y, _PRED).statistic, abs=1e-12)
    assert out["loss"] == pytest.approx(np.mean(((_PRED - _Y) / 4.0) ** 2), abs=1e-12)  # MSE in standardised units


# A binary task whose masked-out entries are all predicted wrong: ignoring the mask lowers the accuracy.
_B_TRUTH = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0])
_B_SCORE = np.array([2.0, -1.0, 0.5, -0.3, 0.2, -2.0, 1.0, -0.5, -1.5, 1.2])
_B_MASK = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)


def test_binary_metrics_count_only_masked_in_entries() -> None:
    task = Task("b", "binary", 1, ("b",))
    logits = torch.tensor(_B_SCORE, dtype=torch.float64)[:, None]
    out = metrics(task, logits, torch.tensor(_B_TRUTH, dtype=torch.float64), torch.tensor(_B_MASK))
    truth, score = _B_TRUTH[_B_MASK], _B_SCORE[_B_MASK]
    assert out["accuracy"] == pytest.approx(accuracy_score(truth, score > 0), abs=1e-12)
    assert out["accuracy"] == pytest.approx(6 / 8)  # by hand; with the two masked entries it would be 6 / 10
    assert out["auc"] == pytest.approx(roc_auc_score(truth, score), abs=1e-12)
    p = 1 / (1 + np.exp(-score))
    bce = -(truth * np.log(p) + (1 - truth) * np.log(1 - p)).mean()
    assert out["loss"] == pytest.approx(bce, abs=1e-12)


def test_multilabel_metrics_count_only_masked_in_entries() -> None:
    truth = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]])
    score = np.array(
        [[1.0, -1.0, 0.3], [-0.2, 2.0, -1.0], [0.4, -0.5, 1.0], [-1.0, 0.7, 0.6], [2.0, 1.0, 0.1], [0.3, -0.9, -0.4]]
    )
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 0, 1]], dtype=bool)
    task = Task("m", "multilabel", 3, ("m[0]", "m[1]", "m[2]"), mask_label="m_mask")
    out = metrics(task, torch.tensor(score), torch.tensor(truth, dtype=torch.float64), torch.tensor(mask))
    assert out["accuracy"] == pytest.approx(accuracy_score(truth[mask], score[mask] > 0), abs=1e-12)
    assert out["accuracy"] != pytest.approx(accuracy_score(truth.ravel(), score.ravel() > 0))  # the test can tell
    aucs = [roc_auc_score(truth[mask[:, j], j], score[mask[:, j], j]) for j in range(3)]
    assert out["auc"] == pytest.approx(np.mean(aucs), abs=1e-12)  # macro AUC over masked-in entries per column
    p = 1 / (1 + np.exp(-score))
    bce = -(truth * np.log(p) + (1 - truth) * np.log(1 - p))
    assert out["loss"] == pytest.approx(bce[mask].mean(), abs=1e-12)


def test_multilabel_auc_skips_columns_with_one_class_among_masked_in_entries() -> None:
    truth = np.array([[1, 1], [0, 1], [1, 0], [0, 1]])  # column 1 has a 0 only where masked out
    score = np.array([[0.9, 0.1], [0.2, 0.3], [0.4, 0.8], [0.6, 0.5]])
    mask = np.array([[1, 1], [1, 1], [1, 0], [1, 1]], dtype=bool)
    task = Task("m", "multilabel", 2, ("m[0]", "m[1]"), mask_label="m_mask")
    out = metrics(task, torch.tensor(score), torch.tensor(truth, dtype=torch.float64), torch.tensor(mask))
    assert out["auc"] == pytest.approx(roc_auc_score(truth[:, 0], score[:, 0]), abs=1e-12)


def test_categorical_metrics_match_sklearn() -> None:
    logits = np.array([[2.0, 0.1, -1.0], [0.0, 0.5, 0.2], [0.3, 0.1, 1.5], [1.0, 2.0, 0.0], [0.2, 0.1, 0.0]])
    y = np.array([0, 1, 1, 1, 2])
    task = Task("c", "categorical", 3, ("0", "1", "2"))
    out = metrics(task, torch.tensor(logits), torch.tensor(y, dtype=torch.float64), torch.ones(5, dtype=torch.bool))
    assert out["accuracy"] == pytest.approx(accuracy_score(y, logits.argmax(1)), abs=1e-7)  # counted in float32
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert out["loss"] == pytest.approx(-log_softmax[np.arange(5), y].mean(), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Regression normalisation: the training rows' statistics, not the whole zoo's
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_mask", [False, True], ids=["indices", "mask"])
def test_regression_statistics_come_from_the_training_rows_only(as_mask: bool) -> None:
    values = [0.5, 1.5, 1.0, 2.0, 10.0, 12.0, -3.0, 0.75]
    train_idx = np.array([0, 1, 2, 3, 7])  # the other rows (val/test) have a very different mean and spread
    train = np.isin(np.arange(len(values)), train_idx) if as_mask else train_idx
    task = infer_task([{"y_t": v} for v in values], "t", train)
    assert task.kind == "regression"
    assert task.mean == pytest.approx(np.mean([0.5, 1.5, 1.0, 2.0, 0.75]), abs=1e-12)
    assert task.std == pytest.approx(np.std([0.5, 1.5, 1.0, 2.0, 0.75]), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint of a LoRA with a known spectrum
# ---------------------------------------------------------------------------------------------------------------

_SCALE = 0.5
_SPECTRA = {  # singular values of A's diagonal; ΔW's are these times _SCALE
    "model.layers.10.self_attn.q_proj": [3.0, 0.5, 2.0, 1.0, 0.25, 0.1],
    "model.layers.0.self_attn.q_proj": [4.0, 2.0, 1.0, 0.5, 0.2, 0.05],
    "model.layers.2.self_attn.q_proj": [1.0, 1.0, 0.5, 0.5, 0.5, 0.5],
    "model.layers.0.mlp.up_proj": [2.0, 1.0],
}

_ROLES = {  # modules per role in depth order: layers 0, 2, 10 have depths 0, ½, 1 within their role
    "q": ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj", "model.layers.10.self_attn.q_proj"],
    "mlp": ["model.layers.0.mlp.up_proj"],
}


def _known_lora(gen: torch.Generator) -> LoraWeights:
    """ΔW = scale · U diag(s) Vᵀ with random orthonormal U, V: its singular values are exactly scale · s."""
    factors = {}
    for name, s in _SPECTRA.items():
        r, d_in, d_out = len(s), 9, 8
        u = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64))[0]  # (d_out, r)
        v = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64))[0]  # (d_in, r)
        g = torch.randn(r, r, generator=gen, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
        a = g @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T  # (r, d_in), a GL factor in between
        b = u @ torch.linalg.inv(g)  # (d_out, r)
        factors[name] = (a, b)
    return LoraWeights.from_factors(factors, scale=_SCALE)


def _expected_spectral(sigma: np.ndarray) -> dict[str, float]:
    """The fingerprint's documented per-spectrum quantities, written out with numpy."""
    sigma = np.sort(sigma)[::-1]
    energy = sigma**2
    p = energy / energy.sum()
    ratios = np.zeros(4)
    tail = sigma[1:5] / sigma[0]  # σ_2/σ_1 … σ_5/σ_1
    ratios[: len(tail)] = tail
    return {
        "log_norm": 0.5 * math.log(energy.sum()),
        "log_effective_rank": float(-(p * np.log(p)).sum()),
        "top1_energy": float(p[0]),
        "log_stable_rank": math.log(energy.sum() / energy[0]),
        **{f"sigma{i + 2}_over_sigma1": float(ratios[i]) for i in range(4)},
    }


def _expected_fingerprint() -> dict[str, float]:
    spectra = {name: _SCALE * np.array(s) for name, s in _SPECTRA.items()}
    total = sum(float((s**2).sum()) for s in spectra.values())
    every = _expected_spectral(np.concatenate(list(spectra.values())))
    out = {
        "log_n_modules": math.log(4),
        "log_total_norm": 0.5 * math.log(total),
        "log_effective_rank_all": every["log_effective_rank"],
        "top1_energy_all": every["top1_energy"],
    }
    for role, names in _ROLES.items():
        stats = [_expected_spectral(spectra[n]) for n in names]
        energy = np.array([(spectra[n] ** 2).sum() for n in names])
        depth = np.linspace(0, 1, len(names)) if len(names) > 1 else np.zeros(1)
        log_norms = np.array([st["log_norm"] for st in stats])
        out |= {
            f"{role}.share_modules": len(names) / 4,
            f"{role}.share_energy": energy.sum() / total,
            f"{role}.mean_log_norm": log_norms.mean(),
            f"{role}.std_log_norm": log_norms.std(),
            f"{role}.energy_weighted_depth": float((energy * depth).sum() / energy.sum()),
        }
        for key in ("log_effective_rank", "top1_energy", "log_stable_rank"):
            out[f"{role}.mean_{key}"] = float(np.mean([st[key] for st in stats]))
        for i in range(2, 6):
            out[f"{role}.mean_sigma{i}_over_sigma1"] = float(np.mean([st[f"sigma{i}_over_sigma1"] for st in stats]))
    return out


def test_fingerprint_of_a_known_spectrum(gen: torch.Generator) -> None:
    lora = _known_lora(gen)
    assert {m.name: module_role(m.spec) for m in lora} == {n: role for role, names in _ROLES.items() for n in names}
    got = dict(zip(FINGERPRINT_NAMES, fingerprint(lora).tolist(), strict=True))
    expected = _expected_fingerprint()
    expected |= {name: 0.0 for name in FINGERPRINT_NAMES if name not in expected}  # roles without modules
    assert set(expected) == set(FINGERPRINT_NAMES)
    wrong = {k: (got[k], v) for k, v in expected.items() if not math.isclose(got[k], v, rel_tol=1e-9, abs_tol=1e-9)}
    assert not wrong, f"fingerprint entries (got, expected): {wrong}"
    # a few by hand, so that the numpy reference above cannot share a mistake with the code
    assert got["q.mean_sigma2_over_sigma1"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert got["q.mean_sigma5_over_sigma1"] == pytest.approx((0.05 + 1 / 12 + 0.5) / 3)
    assert got["mlp.mean_sigma2_over_sigma1"] == pytest.approx(0.5)
    assert got["mlp.mean_sigma3_over_sigma1"] == 0.0  # rank 2: no σ_3
    assert got["mlp.mean_top1_energy"] == pytest.approx(4 / 5)
    assert got["log_n_modules"] == pytest.approx(math.log(4))


# ---------------------------------------------------------------------------------------------------------------
# Zoo splits over many indices
# ---------------------------------------------------------------------------------------------------------------

_N = 10_000
Splits = tuple[dict[int, np.ndarray], tuple[tuple[str, float], ...]]  # split codes per seed, and the shares
_SPLITTERS: dict[str, tuple[Callable[[int, int], list[str]], tuple[tuple[str, float], ...]]] = {
    "zoo": (lambda seed, n: [split_of(seed, i) for i in range(n)], SPLITS),  # a built zoo, per (zoo seed, index)
    "collection": (lambda seed, n: _splits([str(i) for i in range(n)], seed), SHARES),  # a stored collection's ids
    "zoo group": (lambda seed, n: [split_of(seed, i, f"identity-{i}") for i in range(n)], SPLITS),  # per group key
}


@pytest.fixture(scope="module", params=sorted(_SPLITTERS))
def splits(request: pytest.FixtureRequest) -> Splits:
    """Split codes of indices 0 … 9,999 under seeds 0 and 1, and the shares they should have."""
    split, shares = _SPLITTERS[request.param]
    names = [name for name, _ in shares]
    return {seed: np.array([names.index(s) for s in split(seed, _N)]) for seed in (0, 1)}, shares


@pytest.mark.parametrize("seed", [0, 1])
def test_split_proportions_over_many_indices(splits: Splits, seed: int) -> None:
    codes, shares = splits
    counts = np.bincount(codes[seed], minlength=len(shares))
    assert [name for name, _ in shares] == ["train", "val", "cal", "test"]
    for (name, share), count in zip(shares, counts, strict=True):
        sd = math.sqrt(_N * share * (1 - share))
        assert abs(count - _N * share) < 5 * sd, (name, count)  # binomial, 5 σ


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 8, 10, 16])
def test_split_is_independent_of_the_index_modulo_k(splits: Splits, seed: int, k: int) -> None:
    codes, shares = splits
    table = np.zeros((k, len(shares)))
    np.add.at(table, (np.arange(_N) % k, codes[seed]), 1)
    assert chi2_contingency(table).pvalue > 1e-4, table


def test_split_is_independent_of_neighbours_and_of_the_seed(splits: Splits) -> None:
    codes, shares = splits
    k = len(shares)
    for a, b in [(codes[0][:-1], codes[0][1:]), (codes[0], codes[1])]:
        table = np.zeros((k, k))
        np.add.at(table, (a, b), 1)
        assert chi2_contingency(table).pvalue > 1e-4, table


def test_per_lora_split_is_the_old_draw_and_test_its_top_tenth() -> None:
    """Without a group, a LoRA's split comes from its own draw ``default_rng([seed, index, 7])``, recomputed here;
    test is ``u ≥ .9`` as when the splits were 80 / 10 / 10 train/val/test, so no old test LoRA moved."""
    edges = {"train": (0.0, 0.7), "val": (0.7, 0.8), "cal": (0.8, 0.9), "test": (0.9, 1.0)}
    for seed in (0, 1):
        for index in range(2000):
            u = np.random.default_rng([seed, index, 7]).random()
            low, high = edges[split_of(seed, index)]
            assert low <= u < high, (seed, index, u)


def test_group_split_is_the_sha256_of_seed_and_key() -> None:
    import hashlib

    for key in ("identity-0", "identity-17", "a collection group"):
        u = int.from_bytes(hashlib.sha256(f"3:{key}".encode()).digest()[:8], "big") / 2**64
        expected = "train" if u < 0.7 else "val" if u < 0.8 else "cal" if u < 0.9 else "test"
        assert group_split(3, key) == split_of(3, 12345, key) == expected
        assert key_uniform(3, key) == u


@pytest.mark.parametrize("n", [1, 7, 15, 20, 60, 61, 99, 1000])
def test_collection_splits_take_their_shares_exactly(n: int) -> None:
    """A collection's keys sorted by their sha256 uniform and cut by largest remainder, recomputed by hand: 60 keys are
    42 / 6 / 6 / 6, 15 are 11 / 2 / 1 / 1 (the .5 remainders go to train and val, in order), 99 are 69 / 10 / 10 / 10
    (val, cal and test have the larger remainders)."""
    import hashlib

    keys = [f"lora-{i}" for i in range(n)]
    u = {k: int.from_bytes(hashlib.sha256(f"5:{k}".encode()).digest()[:8], "big") / 2**64 for k in keys}
    ordered = sorted(keys, key=u.__getitem__)
    hand = {
        60: [42, 6, 6, 6],
        15: [11, 2, 1, 1],
        1: [1, 0, 0, 0],
        7: [5, 1, 1, 0],
        20: [14, 2, 2, 2],
        99: [69, 10, 10, 10],
    }
    sizes = hand.get(n)
    if sizes is None:  # the largest-remainder sizes in integer tenths of n: remainders 7n mod 10 and n mod 10
        sizes = [7 * n // 10, n // 10, n // 10, n // 10]
        remainders = [7 * n % 10, n % 10, n % 10, n % 10]
        for i in sorted(range(4), key=lambda i: (-remainders[i], i))[: n - sum(sizes)]:
            sizes[i] += 1
    expected = {}
    for (name, _), start, size in zip(SPLITS, np.cumsum([0, *sizes[:-1]]), sizes, strict=True):
        expected.update(dict.fromkeys(ordered[start : start + size], name))
    got = quota_splits(5, keys)
    assert got == expected
    assert [sum(v == name for v in got.values()) for name, _ in SPLITS] == sizes
    assert quota_splits(5, list(reversed(keys)) + keys[:3]) == got  # order and repeats do not matter
    assert _splits(keys + keys[:2], 5) == [got[k] for k in keys + keys[:2]]  # every LoRA of a group together
    if n >= 60:
        assert quota_splits(6, keys) != got  # the seed reshuffles


def test_shipped_fashion_gen_keeps_identities_in_one_split() -> None:
    """Every identity's LoRAs share one split; the per-LoRA column ``split_lora`` is the draw that ignores them, and
    under it nearly every test LoRA shares its identity with a training LoRA (the leak the grouped split removes)."""
    from lol_engine.zoo import read_manifest

    rows = read_manifest(Path(__file__).parent.parent / "data" / "zoo" / "fashion-gen")
    by_group: dict[str, set[str]] = {}
    for r in rows:
        assert r["group"] == f"identity-{r['hp_identity']}"
        assert r["split_lora"] == split_of(0, r["index"])
        by_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_group.values())
    train_ids = {r["hp_identity"] for r in rows if r["split"] == "train"}
    assert not any(r["hp_identity"] in train_ids for r in rows if r["split"] == "test")
    lora_train_ids = {r["hp_identity"] for r in rows if r["split_lora"] == "train"}
    lora_test = [r for r in rows if r["split_lora"] == "test"]
    assert sum(r["hp_identity"] in lora_train_ids for r in lora_test) > 0.9 * len(lora_test)
    zoo = LoadedZoo(Path("."), rows, [])
    per_lora = zoo.resplit("split_lora")
    assert per_lora.loras is zoo.loras and [r["split"] for r in per_lora.rows] == [r["split_lora"] for r in rows]
    for name in ("train", "val", "cal", "test"):  # the view's splits are the column's, the zoo's stay grouped
        assert per_lora.split(name).tolist() == [i for i, r in enumerate(rows) if r["split_lora"] == name]
        assert zoo.split(name).tolist() == [i for i, r in enumerate(rows) if r["split"] == name]


# ---------------------------------------------------------------------------------------------------------------
# Baselines beside a collection-trained model: fitted on train + val, scored on test
# ---------------------------------------------------------------------------------------------------------------


def _collection(split: list[str], y: list) -> CollectionData:
    rows = [{"id": str(i), "split": s, "y_t": v} for i, (s, v) in enumerate(zip(split, y, strict=True))]
    return CollectionData(LoadedZoo(Path("."), rows, []), [r["id"] for r in rows], "LoRA")


def _features(rng: np.random.Generator, n_fit: int, n_test: int) -> np.ndarray:
    """Fingerprint-like features on unequal scales; the test rows are shifted, so statistics over every row differ."""
    x = rng.normal(size=(n_fit + n_test, 4)) * [1.0, 10.0, 0.1, 5.0] + [0.0, 100.0, 0.0, -3.0]
    x[n_fit:] += [2.0, 30.0, 0.5, 10.0]
    return x


def test_regression_baselines_fit_on_train_and_val_and_score_on_test() -> None:
    rng = np.random.default_rng(0)
    split = ["train"] * 40 + ["val"] * 10 + ["test"] * 10
    x = _features(rng, 50, 10)
    y = x @ [1.0, 0.05, 3.0, -0.2] + rng.normal(size=60)
    got = baselines(_collection(split, y.tolist()), Task("t", "regression", 1, ("t",)), x)
    fit_x, fit_y, test_x, test_y = x[:50], y[:50], x[50:], y[50:]
    assert got["mean r2"] == pytest.approx(
        1 - ((test_y - fit_y.mean()) ** 2).sum() / ((test_y - test_y.mean()) ** 2).sum()
    )
    scaler = StandardScaler().fit(fit_x)
    ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(scaler.transform(fit_x), fit_y)
    assert got["ridge on fingerprint r2"] == pytest.approx(r2_score(test_y, ridge.predict(scaler.transform(test_x))))


def test_classification_baselines_take_the_majority_of_train_and_val() -> None:
    rng = np.random.default_rng(1)
    split = ["train"] * 40 + ["val"] * 10 + ["test"] * 10
    y = [0] * 26 + [1] * 24 + [1] * 9 + [0] * 1  # majority 0 where fitted, 1 on test and over every row
    x = _features(rng, 50, 10) + np.array(y)[:, None]
    got = baselines(_collection(split, y), Task("t", "binary", 1, ("t",)), x)
    assert got["majority accuracy"] == pytest.approx(1 / 10)
    scaler = StandardScaler().fit(x[:50])
    logistic = LogisticRegression(max_iter=2000).fit(scaler.transform(x[:50]), y[:50])
    expected = accuracy_score(y[50:], logistic.predict(scaler.transform(x[50:])))
    assert got["logistic on fingerprint accuracy"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------------
# `lol zoo report`'s trivial baselines: fitted on the manifest's train rows, scored on its test rows
# ---------------------------------------------------------------------------------------------------------------


def test_zoo_report_regression_baselines_match_sklearn() -> None:
    from sklearn.linear_model import LinearRegression

    from lol_engine.zoo.report import _regression

    rng = np.random.default_rng(2)
    x = _features(rng, 50, 10)[:, :1]
    y = 0.7 * x[:, 0] + rng.normal(size=60)
    train, test = np.arange(60) < 40, np.arange(60) >= 50  # rows 40..49 are validation: in neither
    got = _regression(x, y, train, test)
    assert got["test_r2_mean_baseline"] == pytest.approx(r2_score(y[test], np.full(10, y[train].mean())), abs=1e-12)
    norm_only = LinearRegression().fit(x[train], y[train]).predict(x[test])
    assert got["test_r2_norm_only"] == pytest.approx(r2_score(y[test], norm_only), abs=1e-12)


def test_zoo_report_majority_and_masked_positions() -> None:
    from lol_engine.zoo.report import _classification, _multilabel

    y = np.array([0] * 21 + [1] * 19 + [1] * 9 + [0] * 1)  # majority 0 on train, 1 on test and over every row
    x = np.arange(50, dtype=float)[:, None] % 7
    train, test = np.arange(50) < 40, np.arange(50) >= 40
    assert _classification(x, y, train, test)["test_acc_majority"] == pytest.approx(1 / 10)
    # two positions; position 1 (train majority 1) keeps test rows 48 (0) and 49 (1) only: 1 of 2 right
    y2 = np.stack([y, 1 - y], axis=1)
    mask = np.ones_like(y2, dtype=bool)
    mask[40:48, 1] = False  # all 8 masked-out entries are wrong: unmasked, the accuracy would be (1 + 1) / 20
    got = _multilabel(x, y2, mask, train, test)
    assert got["test_acc_majority"] == pytest.approx((1 + 1) / (10 + 2))
    assert got["positive_rate"] == pytest.approx(y2[mask].mean())
