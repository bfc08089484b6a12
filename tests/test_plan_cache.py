"""Files alike in their tensor table share one module plan (``parse._module_plan``): what differs between them must
still come out per file (factors, hashes, informational metadata), and what sets scales or names must not be shared.

Every comparison is against the same file read with empty caches, or against values worked out by hand.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from lora_files import factors, kohya, peft, save, write_config

from lol_engine import LoraFormatError, load_lora
from lol_engine.lora import parse, safe_io
from lol_engine.lora.locate import find_loras
from lol_engine.lora.parse import inspect_lora
from lol_engine.lora.safe_io import ReadLimits, file_sha256, safetensors_hashes

STEMS = ("base_model.model.layers.0.q_proj", "base_model.model.layers.0.v_proj", "base_model.model.layers.1.q_proj")


def _peft_folder(folder: Path, seed: int, metadata: dict[str, str] | None = None, **config: object) -> Path:
    tensors = {}
    for i, stem in enumerate(STEMS):
        tensors |= peft(stem, rank=4, d_in=16, d_out=12, seed=seed * 10 + i)
    save(folder / "adapter_model.safetensors", tensors, metadata)
    write_config(folder, r=4, **({"lora_alpha": 8} | config))
    return folder


def _fresh(path: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> object:
    """``load_lora(path)`` with empty plan caches (restored afterwards)."""
    with monkeypatch.context() as patch:
        patch.setattr(parse, "_LAYOUTS", parse._Lru(16))
        return load_lora(path, **kwargs)  # type: ignore[arg-type]


def _same(got: object, want: object) -> None:
    assert got.meta == want.meta  # type: ignore[attr-defined]
    assert got.names == want.names  # type: ignore[attr-defined]
    for m, w in zip(got, want, strict=True):  # type: ignore[call-overload]
        assert (m.spec, m.scale, m.alpha, m.magnitude_axis) == (w.spec, w.scale, w.alpha, w.magnitude_axis)
        assert torch.equal(m.a, w.a) and torch.equal(m.b, w.b)


def test_adapters_of_one_run_share_a_plan_and_keep_their_own_facts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = _peft_folder(tmp_path / "one", 1, {"format": "pt", "lol.seed": "1"})
    two = _peft_folder(tmp_path / "two", 2, {"format": "pt", "lol.seed": "2", "lol.base_family": "llm-decoder"})
    limits = ReadLimits()
    plan_one = parse._prepare(one, limits, None)[0]
    plan_two = parse._prepare(two, limits, None)[0]
    assert plan_one is plan_two  # one plan for both: the informational metadata is not part of it
    first, second = load_lora(one), load_lora(two)
    _same(first, _fresh(one, monkeypatch))
    _same(second, _fresh(two, monkeypatch))
    assert first.meta.safetensors_metadata["lol.seed"] == "1" and second.meta.safetensors_metadata["lol.seed"] == "2"
    assert first.meta.base_family != second.meta.base_family == "llm-decoder"  # the metadata's family wins
    assert second.meta.sha256 == file_sha256(two / "adapter_model.safetensors") != first.meta.sha256
    assert second.meta.data_sha256 == safetensors_hashes(two / "adapter_model.safetensors", 2**30)[1]
    assert first.meta.source.endswith("one/adapter_model.safetensors")
    assert not torch.equal(first[0].a, second[0].a)  # the factors are each file's own
    assert all(m.scale == 2.0 for m in first)  # lora_alpha 8 / r 4


def test_a_loras_metadata_is_its_own(tmp_path: Path) -> None:
    one = _peft_folder(tmp_path / "one", 1)
    first = load_lora(one)
    first.meta.adapter_config["lora_alpha"] = 99  # type: ignore[index]
    first.meta.safetensors_metadata["x"] = "y"  # type: ignore[index]
    again = load_lora(one)
    assert again.meta.adapter_config["lora_alpha"] == 8 and "x" not in again.meta.safetensors_metadata
    assert again.meta.warnings == first.meta.warnings


def test_a_config_that_changes_scales_is_not_shared(tmp_path: Path) -> None:
    eight = load_lora(_peft_folder(tmp_path / "eight", 1))
    sixteen = load_lora(_peft_folder(tmp_path / "sixteen", 1, lora_alpha=16))
    rs = load_lora(_peft_folder(tmp_path / "rs", 1, lora_alpha=16, use_rslora=True))
    assert [m.scale for m in eight] == [2.0] * 3 and [m.scale for m in sixteen] == [4.0] * 3
    assert [m.scale for m in rs] == [8.0] * 3  # 16 / √4
    explicit = load_lora(tmp_path / "eight", config=parse.read_adapter_config(tmp_path / "rs" / "adapter_config.json"))
    assert [m.scale for m in explicit] == [8.0] * 3


def test_kohya_alphas_are_read_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = []
    for alpha in (4.0, 1.0, 0.0):
        tensors = kohya("lora_unet_a", rank=4, alpha=alpha) | kohya("lora_unet_b", rank=2, alpha=alpha, seed=3)
        paths.append(save(tmp_path / f"alpha{alpha:g}.safetensors", tensors))
    scales = [[m.scale for m in load_lora(p)] for p in paths]
    assert scales == [[1.0, 2.0], [0.25, 0.5], [1.0, 1.0]]  # alpha / r; alpha 0 means alpha = r
    for path in paths:
        _same(load_lora(path), _fresh(path, monkeypatch))


def test_diffusers_scale_metadata_is_read_per_file(tmp_path: Path) -> None:
    stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = peft(stem, rank=4)
    scales = []
    for alpha in (4, 8):
        packed = json.dumps({"unet.r": 4, "unet.lora_alpha": alpha})
        path = save(tmp_path / f"d{alpha}.safetensors", tensors, {"lora_adapter_metadata": packed})
        scales.append(load_lora(path)[0].scale)
    assert scales == [1.0, 2.0]


def test_tighter_limits_still_refuse_after_a_plan_was_made(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path / "one", 1)
    load_lora(folder)
    with pytest.raises(LoraFormatError, match=r"rank 4 is outside 1\.\.2"):
        load_lora(folder, limits=ReadLimits(max_rank=2))
    with pytest.raises(LoraFormatError, match="over the limit"):
        load_lora(folder, limits=ReadLimits(max_factor_values=100))


def test_errors_name_the_file_that_has_them(tmp_path: Path) -> None:
    good = _peft_folder(tmp_path / "good", 1)
    load_lora(good)
    bad = _peft_folder(tmp_path / "bad", 1)
    weights = bad / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + n : 8 + n + 4] = torch.tensor([float("nan")]).numpy().tobytes()  # the first factor value
    weights.write_bytes(bytes(raw))
    with pytest.raises(LoraFormatError, match="NaN/Inf") as info:
        load_lora(bad)
    assert str(info.value).startswith("adapter_model.safetensors: module")
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes((good / "adapter_model.safetensors").read_bytes())
    no_config = "no adapter_config.json: assumed lora_alpha = r (scale 1)"
    assert load_lora(renamed).meta.warnings == (*load_lora(good).meta.warnings, no_config)


def test_a_table_in_another_byte_order_gets_its_own_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same names, dtypes and shapes at other offsets: the plan (which reads by offset) is not shared."""
    a1, b1 = factors(4, 16, 12, seed=1)
    a2, b2 = factors(4, 16, 12, seed=2)
    tensors = {"x.lora_A.weight": a1, "x.lora_B.weight": b1, "y.lora_A.weight": a2, "y.lora_B.weight": b2}
    sorted_path = tmp_path / "sorted.safetensors"
    safe_io.write_safetensors(tensors, sorted_path)
    offsets: dict[str, list[int]] = {}
    blobs, offset = [], 0
    for name in sorted(tensors, reverse=True):  # data in reverse name order
        blob = tensors[name].numpy().tobytes()
        offsets[name] = [offset, offset + len(blob)]
        blobs.append(blob)
        offset += len(blob)
    header = {  # the header lists the names in the same order as the sorted file's
        name: {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": offsets[name]}
        for name in sorted(tensors)
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    reversed_path = tmp_path / "reversed.safetensors"
    reversed_path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    for path in (sorted_path, reversed_path):
        lora = load_lora(path)
        torch.testing.assert_close(lora["x"].delta_weight(), b1 @ a1, rtol=0, atol=0)
        torch.testing.assert_close(lora["y"].delta_weight(), b2 @ a2, rtol=0, atol=0)
        _same(lora, _fresh(path, monkeypatch))


@pytest.mark.parametrize("whole_under", [0, parse._WHOLE_FILE_BYTES])
def test_every_kind_of_module_reads_alike_whole_or_streamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whole_under: int
) -> None:
    """Plain, DoRA, Tucker and mlx-lm modules, read from one buffer and streamed by blocks, equal the reference."""
    monkeypatch.setattr(parse, "_WHOLE_FILE_BYTES", whole_under)
    monkeypatch.setattr(safe_io, "READ_BLOCK", 300)  # streamed: runs of a few tensors
    stem = "base_model.model.layers.0.q_proj"
    dora = peft(stem, rank=2, d_in=8, d_out=6) | {stem + ".lora_magnitude_vector": torch.rand(6) + 0.5}
    down, mid, up = torch.randn(4, 3, 1, 1), torch.randn(4, 4, 3, 3), torch.randn(5, 4, 1, 1)
    tucker = {
        "lora_unet_conv.lora_down.weight": down,
        "lora_unet_conv.lora_mid.weight": mid,
        "lora_unet_conv.lora_up.weight": up,
    } | kohya("lora_unet_proj", rank=4)
    lora_a, lora_b = torch.randn(16, 4), torch.randn(4, 12)  # mlx-lm: (d_in, r) and (r, d_out)
    mlx = {"model.layers.0.self_attn.q_proj.lora_a": lora_a, "model.layers.0.self_attn.q_proj.lora_b": lora_b}
    files = {
        "dora": save(tmp_path / "dora.safetensors", dora),
        "tucker": save(tmp_path / "tucker.safetensors", tucker),
        "mlx": save(tmp_path / "mlx.safetensors", mlx),
    }
    loaded = {name: load_lora(path) for name, path in files.items()}
    for name, path in files.items():
        assert loaded[name].meta.sha256 == file_sha256(path)
        assert loaded[name].meta.data_sha256 == safetensors_hashes(path, 2**30)[1]
    assert torch.equal(loaded["dora"][0].magnitude, dora[stem + ".lora_magnitude_vector"])
    expected_a = torch.einsum("abkl,bc->ackl", mid, down.reshape(4, 3)).reshape(4, -1)
    torch.testing.assert_close(loaded["tucker"]["conv"].a, expected_a)
    torch.testing.assert_close(loaded["mlx"][0].a, lora_a.T, rtol=0, atol=0)
    torch.testing.assert_close(loaded["mlx"][0].b, lora_b.T, rtol=0, atol=0)


def test_inspect_and_load_agree(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path / "one", 1)
    summary, lora = inspect_lora(folder), load_lora(folder)
    assert summary.spec == lora.spec and summary.scales == tuple(m.scale for m in lora)
    assert summary.meta.sha256 == lora.meta.sha256 and summary.meta.data_sha256 == ""
    assert summary.meta.warnings == lora.meta.warnings and summary.meta.base_family == lora.meta.base_family


def test_threads_reading_alike_files_get_the_same_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = [_peft_folder(tmp_path / f"f{i}", i, {"lol.seed": str(i)}) for i in range(8)]
    monkeypatch.setattr(parse, "_LAYOUTS", parse._Lru(16))
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            for _ in range(5):
                results[i] = load_lora(folders[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, folder in enumerate(folders):
        _same(results[i], _fresh(folder, monkeypatch))


def test_the_plan_cache_is_bounded() -> None:
    cache: parse._Lru[int, str] = parse._Lru(3)
    for i in range(5):
        cache.put(i, str(i))
    assert [cache.get(i) for i in range(5)] == [None, None, "2", "3", "4"]
    cache.get(2)  # used: now the most recent
    cache.put(5, "5")
    assert cache.get(3) is None and cache.get(2) == "2"


def test_a_location_found_by_a_walk_reads_as_its_path(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path / "runs" / "one", 1)
    save(tmp_path / "runs" / "plain.safetensors", peft(STEMS[0]))
    found = find_loras(tmp_path / "runs")
    assert [loc.name for loc in found] == ["one", "plain"]
    _same(load_lora(found[0]), load_lora(folder))
    _same(load_lora(found[1]), load_lora(tmp_path / "runs" / "plain.safetensors"))
    assert found[0].config is not None and found[1].config is None
