"""Every shipped predictor is GL(r)-invariant: the same ΔW gives the same prediction, however it is factored.

For LoRAs of each predictor's own zoo (its test split), in float64: a random GL(r_i) re-factorisation per module
``(A, B) ↦ (G A, B G⁻¹)``, zero rank padding ``r → r + 3`` (α follows so the scale is kept), and moving a factor
``c`` between α and B (``B ↦ c B``, ``α ↦ α / c``) each leave the output, and the domain distance (the mean distance to
the 5 nearest training LoRAs in the head's pre-LayerNorm features, :mod:`lol_engine.train.domain`), unchanged to
1e-4; the shipped float32 path (:meth:`Predictor.predict`) accepts each variant and agrees. A negative control:
moving A alone (a different ΔW) changes the output and the distance, so the check is not vacuous.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lol_engine import load_lora
from lol_engine.lora.weights import LoraModule, LoraWeights
from lol_engine.nn import LoraBatch
from lol_engine.nn.batch import ModuleSetBatch
from lol_engine.nn.module_tokens import ModuleTokenNet
from lol_engine.symmetry import act_gl, random_gl_like
from lol_engine.train import Predictor, load_predictor
from lol_engine.zoo import read_manifest

ROOT = Path(__file__).resolve().parent.parent
PREDICTORS = sorted(p for p in (ROOT / "lol_engine" / "predictors").iterdir() if (p / "config.json").exists())
TOL = 1e-4


def pad_rank(lora: LoraWeights, extra: int) -> LoraWeights:
    """Append ``extra`` zero rows to every A and zero columns to every B; α grows so the scale (and ΔW) is kept."""

    def pad(m: LoraModule) -> LoraModule:
        r = m.spec.rank + extra
        a = torch.cat([m.a, m.a.new_zeros(extra, m.spec.d_in)])  # (r + extra, d_in)
        b = torch.cat([m.b, m.b.new_zeros(m.spec.d_out, extra)], dim=1)  # (d_out, r + extra)
        return replace(m, spec=replace(m.spec, rank=r), a=a, b=b, alpha=None if m.alpha is None else m.scale * r)

    return lora.map_modules(pad)


def move_to_b(lora: LoraWeights, c: float) -> LoraWeights:
    """``B ↦ c B`` with ``α ↦ α / c`` and ``scale ↦ scale / c``: the same ΔW."""

    def move(m: LoraModule) -> LoraModule:
        return replace(m, b=c * m.b, scale=m.scale / c, alpha=None if m.alpha is None else m.alpha / c)

    return lora.map_modules(move)


def outputs(predictor: Predictor, model: torch.nn.Module, loras: list[LoraWeights]) -> torch.Tensor:
    """The float64 model's raw outputs, batched the way :meth:`Predictor.predict` batches them."""
    batch: LoraBatch | ModuleSetBatch
    if isinstance(model, ModuleTokenNet):
        batch = ModuleSetBatch.from_loras(loras, fold_scale=predictor.fold_scale, dtype=torch.float64)
    else:
        batch = LoraBatch.from_loras(loras, fold_scale=predictor.fold_scale, spec=model.spec, dtype=torch.float64)
    with torch.no_grad():
        return model(batch)


def domain_distances(predictor: Predictor, model: torch.nn.Module, loras: list[LoraWeights]) -> torch.Tensor:
    """The float64 model's domain distances: its head's first layer's output, measured against the reference."""
    seen: list[torch.Tensor] = []
    hook = model.head[0].register_forward_hook(lambda _, args, out: seen.append(out.detach()))
    try:
        outputs(predictor, model, loras)
    finally:
        hook.remove()
    assert predictor.reference is not None, f"{predictor.name}: no reference; run `lol predictors reference`"
    return torch.from_numpy(predictor.reference.distances(seen[0].numpy()))


def estimate_vector(predictor: Predictor, lora: LoraWeights) -> torch.Tensor:
    """The shipped float32 estimate as numbers: the value (regression) or the probabilities."""
    est = predictor.predict(lora)
    if est.kind == "regression":
        return torch.tensor([float(est.value)], dtype=torch.float64)  # type: ignore[arg-type]
    return torch.tensor([est.probabilities[k] for k in sorted(est.probabilities)], dtype=torch.float64)


@pytest.fixture(scope="module", params=PREDICTORS, ids=[p.name for p in PREDICTORS])
def shipped(request: pytest.FixtureRequest) -> tuple[Predictor, torch.nn.Module, list[LoraWeights]]:
    predictor = load_predictor(request.param)
    zoo = ROOT / predictor.config["zoo"]
    rows = [r for r in read_manifest(zoo) if r["split"] == "test"][:3]
    loras = [load_lora(zoo / r["path"]).to(torch.float64) for r in rows]
    return predictor, copy.deepcopy(predictor.model).double().eval(), loras


def test_every_shipped_model_claims_gl_invariance() -> None:
    assert len(PREDICTORS) >= 1
    for folder in PREDICTORS:
        model = load_predictor(folder).model
        assert model.invariance == "GL(r)" and model.rank_agnostic, folder.name


@pytest.mark.parametrize("variant", ["gl", "pad", "alpha_b"])
def test_same_delta_w_same_prediction(shipped: tuple, variant: str) -> None:
    predictor, model, loras = shipped
    gen = torch.Generator().manual_seed(0)
    if variant == "gl":
        moved = [act_gl(lora, random_gl_like(lora, generator=gen, cond_max=10.0)) for lora in loras]
    elif variant == "pad":
        moved = [pad_rank(lora, 3) for lora in loras]
    else:
        moved = [move_to_b(lora, 3.0) for lora in loras]  # not a power of 2: no exact float shortcut
    for lora, other in zip(loras, moved, strict=True):  # the variant really is the same ΔW
        for m, n in zip(lora, other, strict=True):
            torch.testing.assert_close(n.delta_weight(), m.delta_weight(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(outputs(predictor, model, moved), outputs(predictor, model, loras), rtol=0, atol=TOL)
    distances = domain_distances(predictor, model, loras)
    torch.testing.assert_close(domain_distances(predictor, model, moved), distances, rtol=0, atol=TOL)
    for lora, other, distance in zip(loras, moved, distances, strict=True):  # the shipped float32 path agrees
        lora32, other32 = lora.to(torch.float32), other.to(torch.float32)
        torch.testing.assert_close(
            estimate_vector(predictor, other32), estimate_vector(predictor, lora32), rtol=0, atol=1e-3
        )
        want, got = predictor.predict(lora32), predictor.predict(other32)
        assert got.domain_distance == pytest.approx(want.domain_distance, abs=1e-4)
        assert want.domain_distance == pytest.approx(float(distance), abs=1e-3)
        assert got.out_of_domain == want.out_of_domain


def test_moving_a_alone_changes_the_prediction(shipped: tuple) -> None:
    predictor, model, loras = shipped
    gen = torch.Generator().manual_seed(1)
    moved = []
    for lora in loras:  # only the first module's A moves: a different ΔW, which the model must see
        g, first = random_gl_like(lora, generator=gen)[0], lora.modules[0].name
        moved.append(lora.map_modules(lambda m, g=g, first=first: replace(m, a=g @ m.a) if m.name == first else m))
    change = (outputs(predictor, model, moved) - outputs(predictor, model, loras)).abs().max()
    assert change > 10 * TOL
    moved_away = (domain_distances(predictor, model, moved) - domain_distances(predictor, model, loras)).abs().max()
    assert moved_away > 10 * TOL
