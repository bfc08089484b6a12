"""Near-duplicate detection (:mod:`lol_engine.relations`) against dense float64 NumPy references, and its wiring."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lol_engine.lora.weights import LoraMetadata, LoraModule, LoraWeights
from lol_engine.relations import Relation, delta_gram, relate, rounding_noise, truncation_fit
from lol_engine.spec import LayerSpec, LoraSpec
from lol_engine.symmetry import act_gl, random_gl_like
from lol_engine.testing import assert_gl_invariant, random_lora

SPEC = LoraSpec((LayerSpec("q", 14, 11, 4), LayerSpec("v", 12, 11, 6), LayerSpec("o", 11, 12, 5)))
KEYS = ["x", "y", "z", "w"]


def _dense(lora: LoraWeights) -> dict[str, np.ndarray]:
    return {m.name: (m.scale * m.b.double() @ m.a.double()).numpy() for m in lora}


def _flat(lora: LoraWeights, like: LoraWeights) -> np.ndarray:
    """ΔW of ``lora`` over ``like``'s modules, flattened (zeros where it lacks one)."""
    dense = _dense(lora)
    return np.concatenate([dense.get(m.name, np.zeros(m.spec.shape)).ravel() for m in like])


def _truncate(lora: LoraWeights, ranks: dict[str, int]) -> LoraWeights:
    """Per-module SVD truncation of the dense ΔW (kohya's resize: √σ into both factors, scale 1)."""
    modules = []
    for m in lora:
        k = ranks[m.name]
        if k == 0:
            continue
        u, s, vh = np.linalg.svd(m.scale * (m.b.double() @ m.a.double()).numpy())
        root = np.sqrt(s[:k])
        a, b = torch.from_numpy(root[:, None] * vh[:k]), torch.from_numpy(u[:, :k] * root)
        modules.append(LoraModule(replace(m.spec, rank=k), a, b, scale=1.0, alpha=float(k)))
    return LoraWeights(tuple(modules))


def _merge(weights: list[float], loras: list[LoraWeights]) -> LoraWeights:
    """``Σ w_j ΔW_j`` as concatenated factors: A = [A_1; A_2; …], B = [w_1 s_1 B_1, w_2 s_2 B_2, …]."""
    modules = []
    for ms in zip(*loras, strict=True):
        a = torch.cat([m.a for m in ms])
        b = torch.cat([w * m.scale * m.b for w, m in zip(weights, ms, strict=True)], dim=1)
        modules.append(LoraModule(replace(ms[0].spec, rank=a.shape[0]), a, b, scale=1.0))
    return LoraWeights(tuple(modules))


@pytest.fixture
def loras(gen: torch.Generator) -> list[LoraWeights]:
    return [random_lora(SPEC, generator=gen, scale=[0.5, 2.0, 1.0]) for _ in KEYS]


def _only(relations: list[Relation | None], key: str) -> Relation:
    """The relation to candidate ``key``, asserting that every other candidate has none (or the same merge)."""
    found = relations[KEYS.index(key)]
    assert found is not None, relations
    assert all(r is None or key in r.others for r in relations), relations
    return found


# ------------------------------------------------------------------------------------------------ Gram (math)
def test_delta_gram_matches_dense(gen: torch.Generator) -> None:
    x = random_lora(SPEC, generator=gen)
    fewer = random_lora(LoraSpec(SPEC.layers[:2]), generator=gen, scale=[3.0, -0.5])  # lacks "o"
    other_shape = random_lora(LoraSpec((LayerSpec("q", 9, 11, 2), SPEC.layers[2])), generator=gen)  # "q" differs
    loras = [x, fewer, other_shape]
    modules = {(m.name, m.spec.shape) for lora in loras for m in lora}
    vectors = []
    for lora in loras:
        dense = {(m.name, m.spec.shape): m.scale * (m.b @ m.a).numpy() for m in lora}
        vectors.append(np.concatenate([dense.get(k, np.zeros(k[1])).ravel() for k in sorted(modules)]))
    want = np.stack(vectors) @ np.stack(vectors).T
    np.testing.assert_allclose(delta_gram(loras), want, rtol=1e-12, atol=1e-12)
    assert delta_gram(loras)[0, 2] != 0 and np.isclose(want[1, 2], 0.0)  # only "o" is shared by fewer and other


def test_rounding_noise_predicts_the_fp16_error(loras: list[LoraWeights]) -> None:
    for x in loras:
        rounded = x.to(torch.float16)
        measured = np.linalg.norm(_flat(rounded, x) - _flat(x, x))
        assert 0.3 < measured / rounding_noise(rounded) < 1.2  # the estimate is the expected error, not a bound


# ------------------------------------------------------------------------------------------------ the four relations
def _alpha_trade(x: LoraWeights) -> LoraWeights:
    return x.map_modules(lambda m: replace(m, b=m.b / 4, scale=m.scale * 4, alpha=None))


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda x, g: act_gl(x, random_gl_like(x, generator=g)), id="gl"),
        pytest.param(lambda x, g: act_gl(x, random_gl_like(x, generator=g)).to(torch.float16), id="gl+fp16"),
        pytest.param(lambda x, g: act_gl(x, random_gl_like(x, generator=g)).to(torch.bfloat16), id="gl+bf16"),
        pytest.param(lambda x, g: _alpha_trade(x), id="alpha-B"),
        pytest.param(lambda x, g: x.fold_scale().to(torch.float32), id="folded-f32"),
    ],
)
def test_a_conversion_is_the_same_delta(loras: list[LoraWeights], gen: torch.Generator, convert) -> None:  # type: ignore[no-untyped-def]
    query = convert(loras[1], gen)
    found = _only(relate(query, loras, KEYS), "y")
    assert (found.kind, found.others, found.weights, found.text) == ("same", ("y",), (1.0,), "same ΔW as y")
    want = np.linalg.norm(_flat(query, loras[1]) - _flat(loras[1], loras[1])) / np.linalg.norm(
        _flat(loras[1], loras[1])
    )
    assert found.residual == pytest.approx(want, rel=1e-6, abs=1e-7) and found.residual <= found.tolerance  # √ε: Gram


@pytest.mark.parametrize("c", [0.5, 2.0, -1.0, 1.25])
def test_an_alpha_change_is_a_rescale(loras: list[LoraWeights], c: float) -> None:
    query = loras[2].map_modules(lambda m: replace(m, scale=m.scale * c))
    found = _only(relate(query, loras, KEYS, names=["X", "Y", "Z", "W"]), "z")
    q, x = _flat(query, loras[2]), _flat(loras[2], loras[2])
    assert found.kind == "rescale" and found.weights[0] == pytest.approx(q @ x / (x @ x), rel=1e-10)
    assert found.text == f"rescaled copy of Z (×{c:.3g})"


@pytest.mark.parametrize(
    "ranks",
    [{"q": 2, "v": 2, "o": 2}, {"q": 1, "v": 4, "o": 3}, {"q": 3, "v": 0, "o": 2}],
    ids=["rank-2", "per-module", "module-dropped"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_resize_is_a_truncation_keeping_the_dense_svd_energy(
    loras: list[LoraWeights], ranks: dict[str, int], dtype: torch.dtype
) -> None:
    source = loras[0]
    query = _truncate(source, ranks).to(dtype)
    found = _only(relate(query, loras, KEYS), "x")
    spectra = {
        m.name: np.linalg.svd(d, compute_uv=False) for m, d in zip(source, _dense(source).values(), strict=True)
    }
    energy = sum((s[: ranks[n]] ** 2).sum() for n, s in spectra.items()) / sum((s**2).sum() for s in spectra.values())
    assert found.kind == "truncation" and found.ranks == tuple(ranks.values())
    assert found.energy == pytest.approx(energy, rel=1e-9 if dtype == torch.float64 else 1e-3)
    kept = sorted(k for k in ranks.values() if k)
    rank = f"rank-{kept[0]}" if kept[0] == kept[-1] else f"rank-{kept[0]}…{kept[-1]} (per module)"
    assert found.text.startswith(f"{rank} truncation of x keeping {100 * energy:.1f} % of its energy")
    assert ("without 1 of its 3 modules" in found.text) == (0 in ranks.values())


def test_truncation_fit_residual_matches_dense(loras: list[LoraWeights]) -> None:
    source, other = loras[0], loras[1]
    query = _truncate(other, {"q": 2, "v": 3, "o": 2})  # not a truncation of source: a real residual
    fit = truncation_fit(query, source)
    best = _flat(_truncate(source, {"q": 2, "v": 3, "o": 2}), source)
    assert fit.residual == pytest.approx(np.linalg.norm(_flat(query, source) - best), rel=1e-9)
    assert fit.ranks == (2, 3, 2) and fit.source_ranks == (4, 6, 5)


@pytest.mark.parametrize(
    ("weights", "members"),
    [([0.6, 0.4], ["x", "y"]), ([0.5, 0.3, 0.2], ["w", "y", "x"]), ([1.0, -0.5], ["z", "w"])],
    ids=["0.6x+0.4y", "three", "difference"],
)
def test_a_weighted_merge_is_recovered_by_least_squares(
    loras: list[LoraWeights], weights: list[float], members: list[str]
) -> None:
    parts = [loras[KEYS.index(k)] for k in members]
    query = _merge(weights, parts)
    relations = relate(query, loras, KEYS)
    found = relations[KEYS.index(members[0])]
    assert found is not None and found.kind == "merge" and set(found.others) == set(members)
    assert [r is found for r in relations] == [k in members for k in KEYS]  # each term carries the same merge
    basis = np.stack([_flat(loras[KEYS.index(k)], query) for k in found.others], axis=1)
    want, *_ = np.linalg.lstsq(basis, _flat(query, query), rcond=None)
    np.testing.assert_allclose(found.weights, want, rtol=1e-8)
    np.testing.assert_allclose(found.weights, [dict(zip(members, weights, strict=True))[k] for k in found.others])
    if members == ["x", "y"]:
        assert found.text == "≈ 0.6·x + 0.4·y"
    if members == ["z", "w"]:
        assert found.text == "≈ 1·z − 0.5·w"


def test_relations_are_gl_invariant(loras: list[LoraWeights], gen: torch.Generator) -> None:
    query = _merge([0.7, 0.3], [loras[3], loras[1]])

    def weights(q: LoraWeights) -> tuple[float, ...]:
        found = relate(q, loras, KEYS)[3]
        assert found is not None
        return found.weights

    assert_gl_invariant(weights, query, generator=gen, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------------------------ what is not related
def test_unrelated_and_near_misses_get_no_relation(loras: list[LoraWeights], gen: torch.Generator) -> None:
    x = loras[0]
    unrelated = random_lora(SPEC, generator=gen)
    retrained = _merge([1.0, 0.02], [x, unrelated])  # X moved by 2 % of an unrelated ΔW: a fine-tune, not a copy
    outsider = _merge([0.6, 0.4], [x, random_lora(SPEC, generator=gen)])  # a merge with a LoRA not stored
    for query in (unrelated, retrained, outsider):
        assert relate(query, loras, KEYS) == [None] * len(KEYS)


def test_same_spectrum_other_directions_is_not_the_same(loras: list[LoraWeights], gen: torch.Generator) -> None:
    """A spectra-only comparison would call this the same ΔW: equal σ per module, random singular vectors."""
    x = loras[0]
    twisted = act_gl(x, random_gl_like(x, generator=gen)).map_modules(
        lambda m: replace(
            m, b=torch.linalg.qr(torch.randn(m.spec.d_out, m.spec.d_out, generator=gen, dtype=torch.float64))[0] @ m.b
        )
    )
    assert relate(twisted, loras, KEYS) == [None] * len(KEYS)


def test_a_truncation_of_y_is_not_called_a_truncation_of_x(loras: list[LoraWeights], gen: torch.Generator) -> None:
    x = loras[0]
    y = _merge([1.0, 0.3], [x, random_lora(SPEC, generator=gen)])  # close to x (cosine ≈ 0.96), rank 2r
    query = _truncate(y, {"q": 4, "v": 6, "o": 5})  # y resized to x's ranks
    found = relate(query, [x, y], ["x", "y"])
    assert found[0] is None and found[1] is not None and found[1].kind == "truncation" and found[1].others == ("y",)
    assert found[1].ranks == (4, 6, 5) and truncation_fit(query, x).residual > 0.05 * np.linalg.norm(_flat(query, x))


def test_a_full_rank_copy_is_same_not_truncation(loras: list[LoraWeights]) -> None:
    x = loras[0]
    query = _truncate(x, {"q": 4, "v": 6, "o": 5})  # "resized" to its own ranks: nothing dropped
    assert _only(relate(query, loras, KEYS), "x").kind == "same"


def test_dora_and_bad_arguments(loras: list[LoraWeights]) -> None:
    dora = LoraWeights(loras[0].modules, LoraMetadata(is_dora=True))
    assert relate(dora, loras, KEYS) == [None] * len(KEYS)
    with pytest.raises(ValueError, match="one key and name per candidate"):
        relate(loras[0], loras, KEYS[:2])


def test_relation_texts() -> None:
    assert Relation("rescale", ("i",), ("X",), (0.5,), 0.0, 1e-3).text == "rescaled copy of X (×0.5)"
    cut = Relation("truncation", ("i",), ("X",), (1.0,), 0.0, 1e-3, energy=0.9734, ranks=(8, 8, 0))
    assert cut.text == "rank-8 truncation of X keeping 97.3 % of its energy, without 1 of its 3 modules"
    merge = Relation("merge", ("i", "j", "k"), ("X", "Y", "Z"), (-0.6, 0.3, -0.1), 0.0, 1e-3)
    assert merge.text == "≈ −0.6·X + 0.3·Y − 0.1·Z"
    assert merge.to_json()["ids"] == ["i", "j", "k"] and merge.to_json()["ranks"] is None


# ------------------------------------------------------------------------------------------------ explorer and CLI
def _write_truncated(source: Path, out: Path, rank: int) -> Path:
    """A PEFT folder holding ``source``'s ΔW truncated to ``rank`` (dense SVD in float64), saved in fp16."""
    out.mkdir(parents=True)
    config = json.loads((source / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = {}
    with safe_open(str(source / "adapter_model.safetensors"), "pt") as f:
        metadata = f.metadata()
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if key.endswith("lora_A.weight"):
                a, b = f.get_tensor(key).double(), f.get_tensor(key.replace("lora_A", "lora_B")).double()
                u, s, vh = np.linalg.svd(scale * (b @ a).numpy())
                root = np.sqrt(s[:rank])
                tensors[key] = torch.from_numpy(root[:, None] * vh[:rank]).half()
                tensors[key.replace("lora_A", "lora_B")] = torch.from_numpy(u[:, :rank] * root).half()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata=metadata)
    (out / "adapter_config.json").write_text(
        json.dumps(config | {"r": rank, "lora_alpha": rank, "modules_to_save": None})
    )
    return out


def test_a_truncated_upload_names_its_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("duckdb")
    from collection import mini_zoo

    from lol_engine import load_lora
    from lol_engine.cli import main
    from lol_engine.explorer import Explorer

    db = tmp_path / "data" / "lol.duckdb"
    explorer = Explorer.open(db)
    try:
        explorer.start([mini_zoo(tmp_path / "zoos", "digits", 6)], progress=False)
        source = explorer.records()[3]
        folder = Path(explorer.get(source["id"]).source).parent
        upload = _write_truncated(folder, tmp_path / "resized", rank=2)
        query = load_lora(upload)
        found = {n.id: n for n in explorer.neighbours(query, k=5)}
        relation = found[source["id"]].relation
        assert relation is not None and relation.kind == "truncation" and relation.others == (source["id"],)
        stored = load_lora(folder)
        spectra = [np.linalg.svd(d, compute_uv=False) for d in _dense(stored).values()]
        energy = sum((s[:2] ** 2).sum() for s in spectra) / sum((s**2).sum() for s in spectra)
        assert relation.energy == pytest.approx(energy, rel=1e-3) and relation.ranks == (2, 2)
        assert relation.text == f"rank-2 truncation of {source['name']} keeping {100 * energy:.1f} % of its energy"
        assert [n.relation for n in found.values() if n.id != source["id"]] == [None] * 4
    finally:
        explorer.close()
    assert main(["analyse", str(upload), "--db", str(db), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    carried = {n["id"]: n["relation"] for n in out["neighbours"]}
    assert carried[source["id"]]["kind"] == "truncation" and carried[source["id"]]["ids"] == [source["id"]]
    assert carried[source["id"]]["text"] == relation.text
    assert sum(r is not None for r in carried.values()) == 1
    shutil.rmtree(upload)
