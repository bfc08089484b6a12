"""The fast paths of issue 15 against slow references: the vectorised fingerprint, the one-pass stacked read with its
hashes, the zero-copy stacking of loaded factors and the batched factor check."""

from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_files import factors, peft, save

from lol_engine import symmetry
from lol_engine.errors import LoraFormatError
from lol_engine.fingerprint import FINGERPRINT_NAMES, ROLES, fingerprint, fingerprints, module_role
from lol_engine.lora import parse, safe_io
from lol_engine.lora.keys import ModuleKeys, NameOrigin
from lol_engine.lora.locate import display_name
from lol_engine.lora.parse import load_lora
from lol_engine.lora.safe_io import file_sha256, safetensors_hashes
from lol_engine.lora.scales import MAX_MAGNITUDE, check_magnitudes
from lol_engine.lora.weights import LoraModule, LoraWeights
from lol_engine.spec import LayerSpec, natural_key
from lol_engine.symmetry import lora_fro_norms, lora_singular_values, singular_values, stacked

# --------------------------------------------------------------------------- the per-module fingerprint (reference)
_TOP = 4


def _reference_stats(sigma: torch.Tensor) -> torch.Tensor:
    energy = sigma.square()
    total = energy.sum()
    if total <= 0:
        return torch.zeros(4 + _TOP, dtype=sigma.dtype)
    p = energy / total
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    ratios = torch.zeros(_TOP, dtype=sigma.dtype)
    tail = sigma[1 : 1 + _TOP] / sigma[0]
    ratios[: tail.numel()] = tail
    return torch.cat([torch.stack([0.5 * torch.log(total), entropy, p[0], torch.log(total / energy[0])]), ratios])


def _reference_fingerprint(lora: LoraWeights) -> torch.Tensor:
    """The fingerprint as it was computed before issue 15: one module at a time, each from its own QR."""
    spectra = {m.name: singular_values(m.a.double(), m.b.double(), m.scale) for m in lora}
    roles = {m.name: module_role(m.spec) for m in lora}
    stats = {name: _reference_stats(s) for name, s in spectra.items()}
    energies = {name: float(s.square().sum()) for name, s in spectra.items()}
    total_energy = sum(energies.values())
    all_sigma = torch.sort(torch.cat(list(spectra.values())), descending=True).values
    out = [
        math.log(len(lora)),
        0.5 * math.log(total_energy) if total_energy > 0 else 0.0,
        float(_reference_stats(all_sigma)[1]),
        float(_reference_stats(all_sigma)[2]),
    ]
    for role in ROLES:
        names = sorted((n for n in spectra if roles[n] == role), key=natural_key)
        if not names:
            out += [0.0] * 12
            continue
        block = torch.stack([stats[n] for n in names])
        energy = torch.tensor([energies[n] for n in names], dtype=torch.float64)
        depth = torch.linspace(0.0, 1.0, len(names), dtype=torch.float64) if len(names) > 1 else torch.zeros(1)
        weighted = float((energy * depth).sum() / energy.sum()) if energy.sum() > 0 else 0.0
        out += [
            len(names) / len(lora),
            float(energy.sum()) / total_energy if total_energy > 0 else 0.0,
            float(block[:, 0].mean()),
            float(block[:, 0].std(unbiased=False)),
            float(block[:, 1].mean()),
            float(block[:, 2].mean()),
            float(block[:, 3].mean()),
            *block[:, 4:].mean(0).tolist(),
            weighted,
        ]
    return torch.tensor(out, dtype=torch.float64)


_NAMES = (
    "layers.{i}.self_attn.q_proj",
    "layers.{i}.self_attn.k_proj",
    "layers.{i}.attn.to_v",
    "layers.{i}.attn.to_out.0",
    "layers.{i}.mlp.fc1",
    "blocks.{i}.qkv",
    "blocks.{i}.norm_thing",
    "down.{i}.resnets.conv1",
)


def _random_lora(seed: int) -> LoraWeights:
    """Mixed shapes and ranks (1 to 9, some above min(d_out, d_in)), zero modules, conv kernels, names out of order."""
    gen = torch.Generator().manual_seed(seed)
    modules = []
    for j in torch.randperm(24, generator=gen).tolist():
        name = _NAMES[j % len(_NAMES)].format(i=j // len(_NAMES) * 5 + 1)
        rank = int(torch.randint(1, 10, (), generator=gen))
        d_out = int(torch.randint(2, 20, (), generator=gen))
        if name.endswith("conv1"):
            c = int(torch.randint(1, 5, (), generator=gen))
            spec = LayerSpec(name, d_out, c * 9, rank, "conv", (d_out, c, 3, 3))
        else:
            spec = LayerSpec(name, d_out, int(torch.randint(2, 20, (), generator=gen)), rank)
        a = torch.randn(rank, spec.d_in, generator=gen)
        b = torch.randn(d_out, rank, generator=gen) * float(torch.rand((), generator=gen) * 3)
        if j % 7 == 3:
            b = torch.zeros_like(b)  # a zero module: every stat of it is zero
        scale = float(torch.randn((), generator=gen))
        modules.append(LoraModule(spec, a, b, scale))
    return LoraWeights(tuple(modules))


@pytest.mark.parametrize("seed", range(6))
def test_fingerprint_matches_the_per_module_reference(seed: int) -> None:
    lora = _random_lora(seed)
    got, want = fingerprint(lora), _reference_fingerprint(lora)
    assert got.shape == (len(FINGERPRINT_NAMES),)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("batch_elements", [2**22, 300])
def test_fingerprints_of_a_batch_match_the_reference(monkeypatch: pytest.MonkeyPatch, batch_elements: int) -> None:
    """Spectra batched across LoRAs (in small chunks, and LoRAs over the bound on their own) change nothing."""
    monkeypatch.setattr(symmetry, "_BATCH_ELEMENTS", batch_elements)
    loras = [_random_lora(seed) for seed in range(4)]
    got = fingerprints(loras)
    for lora, fp in zip(loras, got, strict=True):
        torch.testing.assert_close(fp, _reference_fingerprint(lora), rtol=1e-5, atol=1e-6)
        cached = lora_singular_values(lora)  # filled by the batch, and equal to a fresh computation
        fresh = lora_singular_values(lora, cache=False)
        for name in fresh:
            torch.testing.assert_close(cached[name], fresh[name])


def test_fingerprint_reference_catches_a_wrong_role_order() -> None:
    """Negative control: the depth feature depends on name order within a role, so an unsorted order would fail."""
    lora = _random_lora(0)
    swapped = LoraWeights(lora.modules[::-1])
    assert torch.allclose(fingerprint(swapped), fingerprint(lora))  # the module order of the container is irrelevant
    reverse_depth = {m.name: re.sub(r"\d+", lambda d: str(99 - int(d.group())), m.name) for m in lora}
    renamed = LoraWeights(tuple(replace(m, spec=replace(m.spec, name=reverse_depth[m.name])) for m in lora))
    assert not torch.allclose(fingerprint(renamed), _reference_fingerprint(lora))


# --------------------------------------------------------------------------------------- the one-pass stacked read
def _mixed_file(path: Path, nan_in: str | None = None, big: float | None = None) -> Path:
    """A kohya file: two shape groups of linear modules, a conv module, alphas, an unused tensor; fp16 and fp32."""
    tensors: dict[str, torch.Tensor] = {}
    stems = [(f"lora_unet_blocks_{i}_attn_to_q", 4, 24, 16) for i in range(5)]
    stems += [(f"lora_unet_blocks_{i}_ff_net_2", 8, 40, 24) for i in range(3)]
    for k, (stem, rank, d_in, d_out) in enumerate(stems):
        a, b = factors(rank, d_in, d_out, seed=k)
        if stem == nan_in:
            a[1, 2] = float("nan")
        if big is not None and k == 2:
            b = b * big
        tensors[f"{stem}.lora_down.weight"] = a.half() if k % 2 and big is None else a
        tensors[f"{stem}.lora_up.weight"] = b
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    a, b = factors(4, 3, 6, kernel=(3, 3), seed=99)
    tensors |= {"lora_unet_conv_in.lora_down.weight": a, "lora_unet_conv_in.lora_up.weight": b}
    tensors["lora_unet_conv_in.alpha"] = torch.tensor(2.0)
    tensors["unused.bias"] = torch.arange(7.0)
    return save(path, tensors)


def _expected(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The factors as a plain reader sees them: safetensors' own loader, then the kohya rules by hand."""
    from safetensors.torch import load_file

    raw = load_file(str(path))
    out = {}
    for key in raw:
        if key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            a, b = raw[key].float(), raw[f"{stem}.lora_up.weight"].float()
            out[stem] = (
                a.reshape(a.shape[0], -1),
                b.reshape(b.shape[0], -1),
                float(raw[f"{stem}.alpha"]) / a.shape[0],
            )
    return out


# (read whole below this many bytes, hash on threads, read block): one buffer, or streamed in blocks of whole tensors
READS = [(parse._WHOLE_FILE_BYTES, False, 2**22)] + [(0, t, b) for t in (False, True) for b in (2**22, 300, 1)]


@pytest.mark.parametrize(("whole_under", "threaded", "read_block"), READS)
def test_stacked_read_matches_a_plain_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whole_under: int, threaded: bool, read_block: int
) -> None:
    monkeypatch.setattr(parse, "_WHOLE_FILE_BYTES", whole_under)
    if threaded:  # hash on the background threads even for a small file, with a tiny pending window
        monkeypatch.setattr(safe_io._Hasher, "THREAD_BYTES", 0)
        monkeypatch.setattr(safe_io._Hasher, "MAX_PENDING_BYTES", 64)
    monkeypatch.setattr(safe_io, "READ_BLOCK", read_block)  # the whole file in one read; runs of a few; one each
    path = _mixed_file(tmp_path / "mixed.safetensors")
    lora = load_lora(path)
    expected = _expected(path)
    assert len(lora) == len(expected)
    for m in lora:  # unknown kohya names are kept as written, without the lora_unet_ prefix
        a, b, scale = expected[f"lora_unet_{m.name}"]
        want = scale * (b @ a)
        torch.testing.assert_close(m.delta_weight(), want, rtol=1e-6, atol=1e-6)
    assert lora.meta.sha256 == file_sha256(path)
    assert lora.meta.data_sha256 == safetensors_hashes(path, 2**30)[1]
    assert lora.meta.data_sha256 != lora.meta.sha256


def test_read_runs_cover_the_file_in_order() -> None:
    def info(name: str, begin: int, end: int) -> safe_io.TensorInfo:
        return safe_io.TensorInfo(name, "F16", ((end - begin) // 2,), begin, end)

    infos = [info("a", 0, 10), info("b", 10, 30), info("big", 30, 130), info("c", 130, 131), info("d", 131, 140)]
    runs = safe_io._runs(infos, 32)
    assert [[i.name for i in run] for run in runs] == [["a", "b"], ["big"], ["c", "d"]]
    assert safe_io._runs([], 32) == []
    assert [len(run) for run in safe_io._runs(infos, 1)] == [1] * 5


def test_a_misaligned_tensor_is_read_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3-byte tensor first puts every fp16 factor after it at an odd offset of the read buffer."""
    a, b = factors(4, 24, 16, seed=1)
    path = tmp_path / "odd.safetensors"
    safe_io.write_safetensors(
        {
            "a_flags": torch.tensor([1, 2, 3], dtype=torch.uint8),
            "lora_unet_x.alpha": torch.tensor(4.0).half(),
            "lora_unet_x.lora_down.weight": a.half(),
            "lora_unet_x.lora_up.weight": b.half(),
        },
        path,
    )
    begins = {i.name: i.begin for i in safe_io.read_header(path, safe_io.ReadLimits()).tensors.values()}
    assert begins["lora_unet_x.lora_down.weight"] % 2 == 1
    for whole_under, block in ((parse._WHOLE_FILE_BYTES, 2**22), (0, 2**22), (0, 1)):
        monkeypatch.setattr(parse, "_WHOLE_FILE_BYTES", whole_under)
        monkeypatch.setattr(safe_io, "READ_BLOCK", block)
        lora = load_lora(path)
        torch.testing.assert_close(lora["x"].delta_weight(), b.half().float() @ a.half().float(), rtol=0, atol=0)


def test_loaded_groups_are_used_without_a_copy(tmp_path: Path) -> None:
    lora = load_lora(_mixed_file(tmp_path / "mixed.safetensors"))
    by_shape: dict[tuple[int, int, int], list[LoraModule]] = {}
    for m in lora:
        by_shape.setdefault((m.spec.rank, m.spec.d_out, m.spec.d_in), []).append(m)
    group = by_shape[(4, 16, 24)]
    assert len(group) == 5
    base = stacked([m.a for m in group])
    assert base.data_ptr() == group[0].a.data_ptr()  # the buffer itself
    assert torch.equal(stacked([m.a for m in group[::-1]]), torch.stack([m.a for m in group[::-1]]))  # a copy
    assert torch.equal(stacked([m.a for m in group[1:]]), torch.stack([m.a for m in group[1:]]))
    # the batched spectra and norms over the stacked buffers equal those over separate copies of the factors
    copies = lora.map(torch.clone)
    for fast, slow in ((lora_singular_values, lora_singular_values), (lora_fro_norms, lora_fro_norms)):
        got, want = fast(lora), slow(copies)
        for name in got:
            torch.testing.assert_close(got[name], want[name])


def test_stacked_refuses_look_alike_views() -> None:
    base = torch.randn(3, 4, 4)
    assert stacked(list(base)) is base
    transposed = [t.mT for t in base]  # same buffer, same offsets and shape, other strides
    assert torch.equal(stacked(transposed), torch.stack(transposed))
    assert stacked(transposed) is not base
    grad = torch.randn(2, 3, 3, requires_grad=True)
    assert stacked(list(grad)) is not grad


# ------------------------------------------------------------------------------------ the batched factor check
def _reference_message(path: Path) -> str:
    """What :func:`check_magnitudes` says about the factors of ``path``, read without any check."""
    raw = _expected(path)
    modules = tuple(
        LoraModule(LayerSpec(stem, b.shape[0], a.shape[1], a.shape[0]), a, b, scale)
        for stem, (a, b, scale) in raw.items()
    )
    with pytest.raises(LoraFormatError) as info:
        check_magnitudes(modules, path.name)
    return re.sub(r"module '[^']*'", "module M", str(info.value))


def test_fast_check_is_tight_for_constant_factors() -> None:
    """All-equal factors are the worst case of ‖s·B A‖_F ≤ |s|·m²·√(n_A·n_B): at the fast bound they pass the
    reference check with 1 % to spare; 1 % above it, they fail it."""
    for rank, d_out, d_in, scale in ((4, 400, 20, 1.0), (2, 3, 5, -7.5), (8, 64, 1280, 1e-3)):
        spec = LayerSpec("m", d_out, d_in, rank)
        plan = parse._Plan(spec, ModuleKeys("m", "ab"), None, scale, NameOrigin("ab", "peft"))
        m = parse._fast_check([plan])
        module = LoraModule(spec, torch.full((rank, d_in), m), torch.full((d_out, rank), -m), scale)
        check_magnitudes((module,), "f")  # ‖ΔW‖_F = 0.99e15
        with pytest.raises(LoraFormatError, match="too large"):
            check_magnitudes((LoraModule(spec, module.a * 1.01, module.b * 1.01, scale),), "f")
    assert parse._fast_check([]) == 0.99 * MAX_MAGNITUDE  # no module: the largest entry alone


# The fast bound as computed, and 0 (every file goes through the reference check).
BOUNDS = ["computed", "zero"]


def _bound(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if mode == "zero":
        monkeypatch.setattr(parse, "_fast_check", lambda plans: 0.0)
        monkeypatch.setattr(parse, "_LAYOUTS", parse._Lru(16))  # plans made before carry the computed bound


@pytest.mark.parametrize("bound", BOUNDS)
def test_nan_factor_is_refused_as_by_the_reference(
    tmp_path: Path, bound: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _bound(bound, monkeypatch)
    path = _mixed_file(tmp_path / "nan.safetensors", nan_in="lora_unet_blocks_3_attn_to_q")
    with pytest.raises(LoraFormatError) as info:
        load_lora(path)
    assert "factor A has 1 NaN/Inf value(s)" in str(info.value)
    assert re.sub(r"module '[^']*'", "module M", str(info.value)) == _reference_message(path)
    assert str(tmp_path) not in str(info.value)


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("big", [1e14, 1e16])
def test_huge_factors_are_refused_as_by_the_reference(
    tmp_path: Path, big: float, bound: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1e14: every entry fits, but ‖ΔW‖ passes 1e15 (the fast bound falls back to the exact check); 1e16: entries."""
    _bound(bound, monkeypatch)
    path = _mixed_file(tmp_path / "big.safetensors", big=big)
    with pytest.raises(LoraFormatError) as info:
        load_lora(path)
    assert "too large for float32 arithmetic" in str(info.value)
    assert re.sub(r"module '[^']*'", "module M", str(info.value)) == _reference_message(path)


def test_large_but_fine_factors_pass(tmp_path: Path) -> None:
    """‖A‖_F·‖B‖_F is over the limit but ΔW = B A is zero: the fast bound fails, the exact check passes."""
    a = torch.zeros(2, 5)
    a[:, 0] = 1.0  # two equal rows
    b = torch.tensor([[6e14, -6e14], [1.0, 2.0]])  # first row of B A: 6e14 - 6e14 = 0
    path = save(tmp_path / "cancel.safetensors", {"x.lora_A.weight": a, "x.lora_B.weight": b})
    lora = load_lora(path)
    assert torch.equal(lora["x"].b, b)
    assert torch.equal(lora["x"].delta_weight(), torch.tensor([[0.0] * 5, [3.0, 0, 0, 0, 0]]))


# --------------------------------------------------------------------------- the Gram route of the singular values
def _gram_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    a, b = randn(5, 4, 30), randn(5, 20, 4)
    low_a = randn(5, 2, 30)
    deficient = torch.cat([low_a, low_a[:, :1] * 3, low_a[:, 1:] - low_a[:, :1]], 1)
    g = symmetry.random_gl(4, generator=gen, cond_max=1e3, batch_shape=(5,))
    return {
        "random": (a, b),
        "rank_deficient": (deficient, b),
        "some_rank_deficient": (torch.cat([a[:3], deficient[3:]]), b),  # Cholesky fails for two of five
        "zero_a": (torch.zeros_like(a), b),
        "zero_column_of_b": (a, b * torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)),
        "tiny_and_huge": (a * 1e-30, b * 1e30),
        "rows_of_mixed_scale": (a * torch.tensor([1e3, 1.0, 1e-3, 1e-2], dtype=torch.float64)[:, None], b),
        "ill_conditioned_gauge": symmetry.act_gl_factors(a, b, g),
        "d_in_below_rank": (randn(5, 4, 3), b),
        "rank_one": (randn(5, 1, 30), randn(5, 20, 1)),
    }


@pytest.mark.parametrize("case", list(_gram_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["numpy", "torch"])
def test_gram_route_matches_a_dense_svd(
    case: str, dtype: torch.dtype, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "torch":  # the path of large modules (an SDXL one), here on the same small cases
        monkeypatch.setattr(symmetry, "_GRAM_SMALL_VALUES", 0)
        monkeypatch.setattr(symmetry, "_GRAM_CHUNK", 250)  # a few modules per float64 copy
    a64, b64 = _gram_cases()[case]
    if dtype != torch.float32 and case == "tiny_and_huge":
        pytest.skip("outside the half-precision range")
    a, b = a64.to(dtype), b64.to(dtype)
    if path == "torch":  # called directly: the route would send a rank above d_in to QR (Cholesky fails here)
        sigma = symmetry._gram_singular_values(a, b)
        assert sigma is not None
        got = 0.5 * sigma.double()
    else:
        assert symmetry._gram_route(a, b)
        got = singular_values(a, b, scale=-0.5).double()  # (5, r)
    want = 0.5 * torch.linalg.svdvals(b.double() @ a.double())[:, : a.shape[-2]]  # the same rounded factors
    want = torch.nn.functional.pad(want, (0, a.shape[-2] - want.shape[-1]))
    top = want[:, :1].clamp_min(1e-300)
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=0)
    assert ((got - want).abs() / top).max() <= (1e-6 if dtype == torch.float32 else 1e-2)  # the rest, relative to σ₁
    qr = singular_values(a.double(), b.double(), scale=-0.5)  # float64 factors keep the QR route
    assert not symmetry._gram_route(a.double(), b.double())
    torch.testing.assert_close(qr, want, rtol=1e-9, atol=1e-12 * float(want.max()))


def test_gram_route_is_gl_invariant_and_sensitive() -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 8, 50, generator=gen), torch.randn(6, 40, 8, generator=gen)
    g = symmetry.random_gl(8, generator=gen, cond_max=10.0, batch_shape=(6,), dtype=torch.float32)
    ga, gb = symmetry.act_gl_factors(a, b, g)
    torch.testing.assert_close(singular_values(ga, gb), singular_values(a, b), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(singular_values(ga, b), singular_values(a, b), rtol=1e-2)  # A alone moved: it changes


def test_gram_route_leaves_other_inputs_to_qr(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = torch.randn(3, 4, 10), torch.randn(3, 6, 4)
    assert not symmetry._gram_route(a.requires_grad_(), b)
    assert not symmetry._gram_route(torch.randn(3, 257, 10), torch.randn(3, 6, 257))  # rank above the Gram limit
    assert symmetry._gram_route(torch.randn(3, 32, 640), torch.randn(3, 640, 32))  # large factors: Grams in torch
    assert not symmetry._gram_route(torch.randn(3, 64, 32), torch.randn(3, 640, 64))  # large, rank above d_in: QR
    assert not symmetry._gram_route(torch.randn(3, 64, 640), torch.randn(3, 48, 64))  # large, rank above d_out: QR
    assert symmetry._gram_route(torch.randn(3, 4, 3), torch.randn(3, 20, 4))  # small: rank ≤ 16, whatever d_in
    nan_a = a.detach().clone()
    nan_a[0, 0, 0] = float("nan")
    assert symmetry._gram_singular_values(nan_a, b) is None  # non-finite: the QR route decides
    big_a, big_b = torch.randn(4, 32, 640), torch.randn(4, 640, 32)
    big_b[2, 5, 7] = float("inf")
    assert symmetry._gram_singular_values(big_a, big_b) is None  # the same on the large path
    monkeypatch.setattr(symmetry, "_GRAM_CHUNK", 50)  # chunked conversion gives the same values
    torch.testing.assert_close(singular_values(a.detach(), b), torch.linalg.svdvals(b @ a.detach())[:, :4])
    big_b[2, 5, 7] = 0.0
    monkeypatch.setattr(symmetry, "_GRAM_CHUNK", 640 * 32 * 3)  # three modules per float64 copy: 4 = 3 + 1
    torch.testing.assert_close(
        singular_values(big_a, big_b), torch.linalg.svdvals(big_b.double() @ big_a.double())[:, :32].float()
    )


# --------------------------------------------------------------------------- display names without pathlib
def _reference_display_name(weights: str | Path) -> str:
    path = Path(weights)
    if path.name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapters.safetensors"):
        folder = Path(os.path.abspath(path)).parent.name
        if folder:
            return folder
    return path.stem


@pytest.mark.parametrize(
    "weights",
    [
        "runs/a/adapter_model.safetensors",
        "adapter_model.safetensors",
        "/adapter_model.safetensors",
        "./adapters.safetensors",
        "a/b/pytorch_lora_weights.safetensors/.",
        "a/adapters.safetensors/",
        "x.safetensors",
        ".safetensors",
        "a/.hidden",
        "x.",
        "a//b.c.d",
        "a/b/",
        "a/..",
        "..",
        ".",
        "",
        "/",
        Path("q/r.tar.gz"),
    ],
)
def test_display_name_matches_the_pathlib_reference(weights: str | Path) -> None:
    assert display_name(weights) == _reference_display_name(weights)


# --------------------------------------------------------------------------- column-wise inserts
def test_column_wise_inserts_store_what_the_rows_say(tmp_path: Path) -> None:
    from lol_engine.report import describe
    from lol_engine.store import LoraStore, NewLora, _lora_row

    items = []
    vectors = [torch.randn(5, generator=torch.Generator().manual_seed(i)) * 10.0**i for i in range(3)]
    for i in range(3):
        lora = load_lora(save(tmp_path / f"l{i}.safetensors", peft(f"layers.{i}.q_proj", seed=i)))
        labels = {"n": i, "none": None, "text": "é\n'\"", "nested": {"a": [1, 2.5]}}
        name = None if i == 0 else f"name {i}"
        items.append(NewLora(lora, name, None if i == 1 else "zoo", labels, {"fp": vectors[i]}, {}, describe(lora)))
    items.append(items[0])  # the same LoRA twice in one batch: the first is kept
    with LoraStore(tmp_path / "s.duckdb") as store:
        ids = store.add_many(items)
        assert ids == [item.lora.meta.sha256 for item in items]
        for item in items[:3]:
            want = _lora_row(item.lora, item.name, item.zoo, item.card)
            got = store._con.execute("SELECT * FROM loras WHERE id = ?", [want[0]]).fetchone()
            assert got[:13] == tuple(want[:13]) and got[14] == want[14] and got[13] is not None
            assert store.labels(want[0]) == dict(item.labels)
            stored = store.embedding(want[0], "fp")
            assert stored is not None and np.array_equal(stored, item.embeddings["fp"].numpy())  # float32, exactly
        assert store.has([*ids, "0" * 64, ids[1]]) == set(ids) and store.has([]) == set()
        store.add_projection("m", ids[:3], np.array([[0.5, -1.0], [2.0, 3.0], [1e-300, 1e300]]))
        rows = store._con.execute("SELECT lora_id, x, y FROM projections ORDER BY x").fetchall()
        assert rows == [(ids[2], 1e-300, 1e300), (ids[0], 0.5, -1.0), (ids[1], 2.0, 3.0)]


# --------------------------------------------------------------------------- JSON integers without a Python hook
@pytest.mark.parametrize("binary", [False, True])
def test_parse_json_finds_long_integers_with_or_without_the_hook(binary: bool) -> None:
    limits = safe_io.ReadLimits(max_number_digits=5)

    def parsed(text: str) -> object:
        return safe_io.parse_json(text.encode() if binary else text, "x", limits)

    assert parsed('{"a": -12345, "b": [1, 2.5e10], "c": "1234567"}') == {"a": -12345, "b": [1, 2.5e10], "c": "1234567"}
    huge = parsed('{"a": 1, "b": -123456}')
    assert isinstance(huge, dict) and huge["a"] == 1 and isinstance(huge["b"], safe_io.HugeNumber)
    assert huge["b"].digits == 6
    assert parsed('{"a": 12345.678901}') == {"a": 12345.678901}  # a long float is no integer


@pytest.mark.parametrize(
    "text",
    ["", "12345", "123456", "a123456b", "1234 56789", "١٢٣٤٥٦", "12\ud80034567", "x" * 50 + "0" * 6, "-000000"],
)
@pytest.mark.parametrize("binary", [False, True])
def test_has_digit_run_matches_the_regular_expression(text: str, binary: bool) -> None:
    """ASCII digits only (JSON's; Arabic-Indic digits are not), whatever else the text holds (a lone surrogate)."""
    want = re.search("[0-9]{6}", text) is not None
    raw = text.encode("utf-8", "surrogatepass") if binary else text
    assert safe_io.has_digit_run(raw, 6) == want


# --------------------------------------------------------------------------- fingerprints of one layout together
def test_fingerprints_of_one_layout_together_match_the_reference() -> None:
    gen = torch.Generator().manual_seed(11)
    base = _random_lora(0)

    def variant(zero: bool = False) -> LoraWeights:
        modules = tuple(
            replace(m, a=torch.randn(m.a.shape, generator=gen), b=torch.zeros_like(m.b) if zero else m.b * 2)
            for m in base
        )
        return replace(base, modules=modules)

    loras = [variant(), _random_lora(1), base, variant(zero=True), variant(), _random_lora(2)]
    got = fingerprints(loras)
    assert len(got) == len(loras)
    for lora, fp in zip(loras, got, strict=True):
        torch.testing.assert_close(fp, _reference_fingerprint(lora), rtol=1e-5, atol=1e-6)
    assert float(got[3][FINGERPRINT_NAMES.index("log_total_norm")]) == 0.0  # the all-zero ΔW among live ones
    assert not torch.allclose(got[0], got[4])  # same layout, other values: other fingerprints


def test_stacked_copies_views_of_another_dtype() -> None:
    base = torch.randn(2, 3, 4)
    as_ints = [t.view(torch.int32) for t in base]  # back to back, but not base's dtype
    assert torch.equal(stacked(as_ints), torch.stack(as_ints))
    flat = torch.randn(40)
    views = [flat[4:16].view(3, 4), flat[16:28].view(3, 4)]  # back to back inside a larger buffer: a view of it
    got = stacked(views)
    assert torch.equal(got, torch.stack(views)) and got.data_ptr() == views[0].data_ptr()
