"""LoL models as math: GL invariance / equivariance in float64, sensitivity, and the scale-folding choice."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lol_engine.lora.weights import LoraModule, LoraWeights
from lol_engine.nn import LoraBatch, ModelConfig, SpecMismatchError, build_model, registered_models
from lol_engine.nn.layers import GLLinear, canonicalize, gl_gate
from lol_engine.spec import LayerSpec, LoraSpec
from lol_engine.symmetry import act_gl, random_gl
from lol_engine.testing import assert_gl_equivariant, assert_gl_invariant, assert_gl_sensitive, random_lora

SPEC = LoraSpec((LayerSpec("fc1", d_out=12, d_in=9, rank=3), LayerSpec("fc2", d_out=7, d_in=12, rank=3)))
CONFIG = ModelConfig(hidden=16, width=4, layers=2, tokens=16, heads=2, blocks=1, dropout=0.0)


def _model(name: str, gen: torch.Generator) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, SPEC, out_dim=3, config=CONFIG).double().eval()
    model.prepare(LoraBatch.from_loras([random_lora(SPEC, generator=gen)], dtype=torch.float64))
    return model


def _fn(model: torch.nn.Module):
    return lambda lora: model(LoraBatch.from_loras([lora], dtype=torch.float64))


@pytest.mark.parametrize("name", registered_models())
def test_models_symmetry(name: str, gen: torch.Generator) -> None:
    model = _model(name, gen)
    lora = random_lora(SPEC, generator=gen, scale=[0.7, 1.3])
    fn = _fn(model)
    assert_gl_sensitive(fn, lora, generator=gen)  # every model sees a real change of ΔW
    if model.invariance == "GL(r)":
        assert_gl_invariant(fn, lora, generator=gen, cond_max=10.0, rtol=1e-7, atol=1e-9)
        return
    with pytest.raises(AssertionError, match="GL invariance"):  # mlp and o_align must NOT be GL-invariant
        assert_gl_invariant(fn, lora, generator=gen)
    if model.invariance == "O(r)":
        orthogonal = [torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0] for _ in SPEC.layers]
        torch.testing.assert_close(fn(act_gl(lora, orthogonal)), fn(lora), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", registered_models())
def test_models_batch_equals_single(name: str, gen: torch.Generator) -> None:
    """The batched forward equals one LoRA at a time (a slow reference)."""
    model = _model(name, gen)
    loras = [random_lora(SPEC, generator=gen) for _ in range(4)]
    batched = model(LoraBatch.from_loras(loras, dtype=torch.float64))
    single = torch.cat([model(LoraBatch.from_loras([x], dtype=torch.float64)) for x in loras])
    torch.testing.assert_close(batched, single, rtol=1e-8, atol=1e-10)


def _as_lora(a: list[torch.Tensor], b: list[torch.Tensor]) -> LoraWeights:
    modules = [
        LoraModule(LayerSpec(f"m{i}", b_i.shape[1], a_i.shape[2], a_i.shape[1]), a_i[0], b_i[0], 1.0)
        for i, (a_i, b_i) in enumerate(zip(a, b, strict=True))
    ]
    return LoraWeights(tuple(modules))


def test_gl_linear_and_gate_are_equivariant(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    layer = GLLinear([(12, 9), (7, 12)], width=5).double()

    def linear(lora: LoraWeights) -> LoraWeights:
        a, b = layer([m.a[None] for m in lora], [m.b[None] for m in lora])
        return _as_lora(a, b)

    def gate(lora: LoraWeights) -> LoraWeights:
        out = [gl_gate(m.a[None], m.b[None]) for m in lora]
        return _as_lora([o[0] for o in out], [o[1] for o in out])

    lora = random_lora(SPEC, generator=gen)
    assert_gl_equivariant(linear, lora, generator=gen)
    assert_gl_equivariant(gate, lora, generator=gen)
    pointwise = lambda x: x.map(torch.relu)  # noqa: E731 - the anti-pattern GL-net avoids
    with pytest.raises(AssertionError):
        assert_gl_equivariant(pointwise, lora, generator=gen)


def test_gate_reference() -> None:
    """Fast gate (two matrix-vector products) equals gating by row/column sums of the dense ΔW."""
    gen = torch.Generator().manual_seed(3)
    a, b = (
        torch.randn(4, 3, 6, generator=gen, dtype=torch.float64),
        torch.randn(4, 5, 3, generator=gen, dtype=torch.float64),
    )
    fast_a, fast_b = gl_gate(a, b)
    dense = b @ a
    torch.testing.assert_close(fast_b, b * (dense.sum(-1, keepdim=True) > 0))
    torch.testing.assert_close(fast_a, a * (dense.sum(-2, keepdim=True) > 0))


def test_canonical_form_is_gl_invariant(gen: torch.Generator) -> None:
    a, b = (
        torch.randn(3, 4, 10, generator=gen, dtype=torch.float64),
        torch.randn(3, 8, 4, generator=gen, dtype=torch.float64),
    )
    g = random_gl(4, generator=gen, batch_shape=(3,))
    a_c, b_c = canonicalize(a, b)
    a2, b2 = canonicalize(g @ a, torch.linalg.solve(g.mT, b.mT).mT)
    torch.testing.assert_close(a2, a_c)
    torch.testing.assert_close(b2, b_c)
    torch.testing.assert_close(b_c @ a_c, b @ a)


def _same_update_other_rank(lora: LoraWeights, alpha: float) -> tuple[LoraWeights, LoraWeights]:
    """The same ΔW stored at rank r (scale α/r) and zero-padded to rank 2r with α fixed (scale α/2r)."""

    def at_rank(m: LoraModule, factor: int) -> LoraModule:
        r = m.spec.rank * factor
        scale = alpha / r
        root = (m.scale / scale) ** 0.5  # keep scale·B·A unchanged
        a = torch.cat([m.a * root, torch.zeros(r - m.spec.rank, m.spec.d_in, dtype=m.a.dtype)])
        b = torch.cat([m.b * root, torch.zeros(m.spec.d_out, r - m.spec.rank, dtype=m.b.dtype)], dim=1)
        return replace(m, spec=replace(m.spec, rank=r), a=a, b=b, scale=scale, alpha=alpha)

    return lora.map_modules(lambda m: at_rank(m, 1)), lora.map_modules(lambda m: at_rank(m, 2))


@pytest.mark.parametrize("name", ["gl_net", "spectral_glnet", "dense", "svd", "module_tokens"])
def test_folding_the_scale_makes_rank_changes_invisible(name: str, gen: torch.Generator) -> None:
    """With the scale folded, the same ΔW at rank 3 and 6 gives the same output; raw factors (paper code) do not."""
    model = _model(name, gen)
    low, high = _same_update_other_rank(random_lora(SPEC, generator=gen), alpha=6.0)
    run = lambda x, fold: model(LoraBatch.from_loras([x], dtype=torch.float64, fold_scale=fold))  # noqa: E731
    torch.testing.assert_close(run(high, True), run(low, True), rtol=1e-7, atol=1e-9)

    def raw(x):
        return model(
            LoraBatch(
                x.spec,
                tuple(m.a[None] for m in x),
                tuple(m.b[None] for m in x),
                torch.ones(1, 2, dtype=torch.float64),
                True,
            )
        )

    assert not torch.allclose(raw(high), raw(low), rtol=1e-3)


def test_dense_refuses_large_bases() -> None:
    with pytest.raises(ValueError, match="MLP\\+Dense needs 192 input features"):
        build_model("dense", SPEC, 1, ModelConfig(max_dense_features=100))


def test_batch_refuses_other_modules(gen: torch.Generator) -> None:
    other = LoraSpec((LayerSpec("fc1", 12, 9, 3), LayerSpec("fc3", 7, 12, 3)))
    with pytest.raises(
        SpecMismatchError, match=r"1 module\(s\) missing \(first: fc2\); 1 unexpected module\(s\) \(first: fc3\)"
    ):
        LoraBatch.from_loras([random_lora(SPEC, generator=gen), random_lora(other, generator=gen)])
