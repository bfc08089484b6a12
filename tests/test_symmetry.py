"""GL(r) math tested as math: invariance in float64, sensitivity, and fast paths against dense references."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import TOLERANCES

from lol_engine.fingerprint import FINGERPRINT_NAMES, fingerprint, module_role
from lol_engine.lora.weights import LoraWeights
from lol_engine.report import describe
from lol_engine.spec import LayerSpec, LoraSpec
from lol_engine.symmetry import (
    act_gl,
    delta_fro_norm,
    delta_inner,
    lora_cosine,
    lora_fro_norms,
    lora_inner,
    lora_singular_values,
    qr_singular_values,
    random_gl,
    random_gl_like,
    singular_values,
    total_fro_norm,
)
from lol_engine.testing import assert_gl_equivariant, assert_gl_invariant, assert_gl_sensitive, random_lora

SPEC = LoraSpec(
    (
        LayerSpec("model.layers.0.self_attn.q_proj", d_out=24, d_in=20, rank=4),
        LayerSpec("model.layers.0.self_attn.v_proj", d_out=8, d_in=20, rank=4),
        LayerSpec("model.layers.1.self_attn.q_proj", d_out=24, d_in=20, rank=4),
        LayerSpec("model.layers.1.mlp.down_proj", d_out=20, d_in=30, rank=3),
        LayerSpec("down_blocks.0.resnets.0.conv1", d_out=6, d_in=45, rank=2, kind="conv", orig_shape=(6, 5, 3, 3)),
    )
)


@pytest.fixture
def lora(gen: torch.Generator) -> LoraWeights:
    return random_lora(SPEC, generator=gen, scale=[0.5, 2.0, 1.0, -1.5, 3.0])


def _dense_cosine(x: LoraWeights, y: LoraWeights) -> float:
    dx = torch.cat([m.delta_weight().reshape(-1) for m in x])
    dy = torch.cat([m.delta_weight().reshape(-1) for m in y])
    return float(dx @ dy / (dx.norm() * dy.norm()))


@pytest.mark.parametrize("rank", [1, 2, 4, 16])
def test_random_gl_is_well_conditioned(gen: torch.Generator, rank: int) -> None:
    g = random_gl(rank, generator=gen, cond_max=10.0, batch_shape=(50,))
    cond = torch.linalg.cond(g)
    assert bool((cond <= 10.0 + 1e-8).all())
    if rank > 1:
        assert float(cond.max()) > 2.0  # not trivially orthogonal


def test_action_preserves_delta_and_is_a_group_action(lora: LoraWeights, gen: torch.Generator) -> None:
    g1, g2 = random_gl_like(lora, generator=gen), random_gl_like(lora, generator=gen)
    moved = act_gl(lora, g1)
    for before, after in zip(lora, moved, strict=True):
        torch.testing.assert_close(after.delta_weight(), before.delta_weight(), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(after.a, before.a)
    composed = act_gl(act_gl(lora, g1), g2)  # g2·(g1·x) = (g2 g1)·x
    direct = act_gl(lora, [b @ a for a, b in zip(g1, g2, strict=True)])
    for x, y in zip(composed, direct, strict=True):
        torch.testing.assert_close(x.a, y.a)
        torch.testing.assert_close(x.b, y.b)


@pytest.mark.parametrize(
    ("rank", "d_in", "d_out"),
    [(4, 30, 20), (1, 5, 7), (8, 8, 8), (6, 3, 50), (6, 50, 3), (32, 320, 768)],
    ids=["typical", "rank-1", "square-full-rank", "rank-over-d_in", "rank-over-d_out", "sd-like"],
)
@pytest.mark.parametrize("route", ["chosen", "qr"])
def test_qr_spectra_match_dense_svd(
    dtype: torch.dtype, gen: torch.Generator, rank: int, d_in: int, d_out: int, route: str
) -> None:
    """The spectra :func:`singular_values` gives (float32 on a CPU: the Gram route) and the QR route's, any dtype."""
    a = torch.randn(rank, d_in, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(d_out, rank, generator=gen, dtype=torch.float64).to(dtype)
    fast = singular_values(a, b, scale=-0.7) if route == "chosen" else 0.7 * qr_singular_values(a, b)
    dense = torch.linalg.svdvals(-0.7 * (b.double() @ a.double()))[:rank]
    dense = torch.nn.functional.pad(dense, (0, rank - dense.shape[0]))
    tol = TOLERANCES[dtype] * float(dense[0])
    torch.testing.assert_close(fast.double(), dense, atol=tol, rtol=TOLERANCES[dtype])


def test_batched_spectra_equal_per_module(lora: LoraWeights) -> None:
    batched = lora_singular_values(lora)
    for m in lora:
        torch.testing.assert_close(batched[m.name], singular_values(m.a, m.b, m.scale))
    assert list(batched) == list(lora.names)


def test_norms_inner_products_and_cosines_match_dense(lora: LoraWeights, gen: torch.Generator) -> None:
    other = random_lora(SPEC, generator=gen, scale=0.3)
    for m in lora:
        torch.testing.assert_close(delta_fro_norm(m.a, m.b, m.scale), torch.linalg.norm(m.delta_weight()))
        o = other[m.name]
        dense = (m.delta_weight() * o.delta_weight()).sum()
        torch.testing.assert_close(delta_inner(m.a, m.b, o.a, o.b, m.scale, o.scale), dense)
    total = torch.cat([m.delta_weight().reshape(-1) for m in lora]).norm()
    torch.testing.assert_close(total_fro_norm(lora), total)
    assert lora_cosine(lora, other) == pytest.approx(_dense_cosine(lora, other), rel=1e-10)
    assert lora_cosine(lora, lora) == pytest.approx(1.0)
    assert lora_cosine(lora, lora.map(lambda t: t, lambda b: -b)) == pytest.approx(-1.0)


def test_inner_product_across_ranks(gen: torch.Generator) -> None:
    x = random_lora(LoraSpec((LayerSpec("m", 12, 9, 2),)), generator=gen)
    y = random_lora(LoraSpec((LayerSpec("m", 12, 9, 5),)), generator=gen)
    dense = (x[0].delta_weight() * y[0].delta_weight()).sum()
    torch.testing.assert_close(lora_inner(x, y), dense)


def test_cosine_uses_only_shared_modules_of_equal_shape(lora: LoraWeights, gen: torch.Generator) -> None:
    partial = LoraWeights(lora.modules[:2])
    other = random_lora(LoraSpec((LayerSpec(SPEC.layers[0].name, 24, 20, 2), LayerSpec("x", 3, 3, 1))), generator=gen)
    assert lora_cosine(partial, other) == pytest.approx(
        _dense_cosine(LoraWeights(lora.modules[:1]), LoraWeights(other.modules[:1]))
    )
    with pytest.raises(ValueError, match="share no module"):
        lora_cosine(lora, random_lora(LoraSpec((LayerSpec("zzz", 3, 3, 1),)), generator=gen))


INVARIANTS = {
    "singular_values": lora_singular_values,
    "fro_norms": lora_fro_norms,
    "total_fro_norm": total_fro_norm,
    "fingerprint": fingerprint,
    "describe": lambda x: (
        {k: v for k, v in describe(x).items() if k in ("total_delta_fro_norm",)}
        | {m["name"]: m["singular_values"] + [m["delta_fro_norm"]] for m in describe(x)["modules"]}
    ),
}


@pytest.mark.parametrize("name", list(INVARIANTS))
def test_invariants_are_gl_invariant_and_sensitive(lora: LoraWeights, gen: torch.Generator, name: str) -> None:
    fn = INVARIANTS[name]
    assert_gl_invariant(fn, lora, generator=gen, cond_max=10.0, rtol=1e-9, atol=1e-9)
    assert_gl_sensitive(fn, lora, generator=gen)


def test_cosine_is_invariant_on_either_side(lora: LoraWeights, gen: torch.Generator) -> None:
    other = random_lora(SPEC, generator=gen)
    assert_gl_invariant(lambda x: lora_cosine(x, other), lora, generator=gen)
    assert_gl_invariant(lambda y: lora_cosine(lora, y), other, generator=gen)
    assert_gl_sensitive(lambda x: lora_cosine(x, other), lora, generator=gen)


def test_fold_scale_keeps_delta_and_symmetry(lora: LoraWeights, gen: torch.Generator) -> None:
    folded = lora.fold_scale()
    assert folded.scales == (1.0,) * len(lora)
    for x, y in zip(lora, folded, strict=True):
        torch.testing.assert_close(x.delta_weight(), y.delta_weight())
    assert_gl_invariant(lambda x: lora_singular_values(x.fold_scale()), lora, generator=gen)


def test_fingerprint_is_rank_agnostic_and_fixed_length(lora: LoraWeights, gen: torch.Generator) -> None:
    """Zero-padding the rank leaves ΔW unchanged, and so the fingerprint."""

    def pad(m):
        extra = 3
        a = torch.cat([m.a, torch.zeros(extra, m.spec.d_in, dtype=m.a.dtype)])
        b = torch.cat([m.b, torch.zeros(m.spec.d_out, extra, dtype=m.b.dtype)], dim=1)
        return replace(m, spec=replace(m.spec, rank=m.spec.rank + extra), a=a, b=b)

    torch.testing.assert_close(fingerprint(lora.map_modules(pad)), fingerprint(lora), rtol=1e-9, atol=1e-9)
    small = random_lora(
        LoraSpec((LayerSpec("text_encoder.text_model.encoder.layers.0.mlp.fc1", 7, 5, 2),)), generator=gen
    )
    assert fingerprint(small).shape == fingerprint(lora).shape == (len(FINGERPRINT_NAMES),)
    assert torch.isfinite(fingerprint(small)).all()


@pytest.mark.parametrize(
    ("name", "kind", "orig", "role"),
    [
        ("model.layers.0.self_attn.q_proj", "linear", (), "q"),
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "linear", (), "k"),
        ("encoder.layer.0.attention.self.value", "linear", (), "v"),
        ("double_blocks.0.img_attn.qkv", "linear", (), "qkv"),
        ("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "linear", (), "attn_out"),
        ("model.layers.3.mlp.gate_proj", "linear", (), "mlp"),
        ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", "linear", (), "mlp"),
        ("down_blocks.0.resnets.0.conv1", "conv", (8, 2, 3, 3), "conv"),
        ("down_blocks.0.attentions.0.proj_in", "conv", (8, 18, 1, 1), "other"),
    ],
)
def test_module_roles(name: str, kind: str, orig: tuple[int, ...], role: str) -> None:
    assert module_role(LayerSpec(name, 8, 18, 2, kind, orig)) == role  # type: ignore[arg-type]


# The helpers themselves must be able to fail.
def test_invariance_helper_catches_a_non_invariant_function(lora: LoraWeights, gen: torch.Generator) -> None:
    with pytest.raises(AssertionError, match="GL invariance"):
        assert_gl_invariant(lambda x: torch.stack([m.a.sum() for m in x]), lora, generator=gen)


def test_sensitivity_helper_catches_a_constant(lora: LoraWeights, gen: torch.Generator) -> None:
    with pytest.raises(AssertionError, match="not sensitive"):
        assert_gl_sensitive(lambda x: torch.ones(3), lora, generator=gen)


def _equivariant_linear(x: LoraWeights) -> LoraWeights:
    """The paper's equivariant linear layer per module: B ↦ Φ B, A ↦ A Ψᵀ (fixed Φ, Ψ from the module's shape)."""

    def layer(m):
        gen = torch.Generator().manual_seed(m.spec.d_in * 1000 + m.spec.d_out)
        phi = torch.randn(5, m.spec.d_out, generator=gen, dtype=m.a.dtype)
        psi = torch.randn(6, m.spec.d_in, generator=gen, dtype=m.a.dtype)
        return replace(
            m, spec=replace(m.spec, d_out=5, d_in=6, kind="linear", orig_shape=()), a=m.a @ psi.T, b=phi @ m.b
        )

    return x.map_modules(layer)


def test_equivariance_helper(lora: LoraWeights, gen: torch.Generator) -> None:
    assert_gl_equivariant(_equivariant_linear, lora, generator=gen)
    relu = lambda x: x.map(torch.relu)  # noqa: E731 - pointwise ReLU on factors is the classic non-equivariant layer
    with pytest.raises(AssertionError, match="GL equivariance"):
        assert_gl_equivariant(relu, lora, generator=gen)


def test_spectra_cache_is_exact_and_follows_in_place_changes(gen: torch.Generator) -> None:
    lora = random_lora(LoraSpec((LayerSpec("q", 9, 7, 3), LayerSpec("v", 9, 7, 3))), generator=gen)
    first = lora_singular_values(lora)
    assert lora_singular_values(lora)["q"] is first["q"]  # cached
    torch.testing.assert_close(lora_singular_values(lora, cache=False)["q"], first["q"], rtol=0, atol=0)
    lora["q"].b.mul_(2.0)  # an in-place change bumps the tensor's version: recomputed, not served stale
    torch.testing.assert_close(lora_singular_values(lora)["q"], 2 * first["q"])
