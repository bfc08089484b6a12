"""Every bad input gives a LoraFormatError that says what is wrong and where; nothing is ever unpickled."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from lora_files import factors, kohya, pair, peft, raw_file, save, write_config

from lol_engine import LoraFormatError, ReadLimits, load_lora

Q = "base_model.model.model.layers.0.self_attn.q_proj"


class Exploit:
    """Unpickling this would create a marker file: the test proves it never happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_renamed_to_safetensors_is_refused_unopened(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "lora.safetensors"
    path.write_bytes(pickle.dumps({"x": Exploit(marker)}, protocol=4))
    with pytest.raises(LoraFormatError, match="pickle"):
        load_lora(path)
    assert not marker.exists()


def test_a_safetensors_header_that_starts_like_a_pickle_is_read(tmp_path: Path) -> None:
    """A header of 640 bytes begins with 0x80 0x02, a pickle's first two bytes: the JSON after it says safetensors."""
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    tensors = {
        "base_model.model.q.lora_A.weight": torch.ones(2, 3),
        "base_model.model.q.lora_B.weight": torch.ones(4, 2),
    }
    for pad in range(600):
        save_file(tensors, str(path), metadata={"note": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    assert path.read_bytes()[:8] == (640).to_bytes(8, "little")
    assert load_lora(path).spec.names == ("q",)


def test_torch_zip_checkpoint_renamed_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    path = tmp_path / "lora.safetensors"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(LoraFormatError, match="zip archive"):
        load_lora(path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_extensions_are_refused_by_name(tmp_path: Path, suffix: str) -> None:
    path = save(tmp_path / "x.safetensors", peft(Q)).rename(tmp_path / f"x{suffix}")
    with pytest.raises(LoraFormatError, match="pickles and are never loaded"):
        load_lora(path)


def test_folder_with_only_a_pickle_adapter(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(LoraFormatError, match=r"adapter_model\.bin is a pickle"):
        load_lora(tmp_path)


def _valid_header(n_bytes: int = 16) -> dict:
    return {"x.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, n_bytes]}}


HEADER = _valid_header()
GOOD_DATA = bytes(16)


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (b"", b"", 0, "not start with"),
        (b"{", b"", 100, "truncated: the header claims 100"),
        (b'{"a": 1', b"", None, "not valid JSON"),
        (b'{"\xff\xfe": 1}', b"", None, "not UTF-8"),
        (b"[1, 2]", b"", None, "not a safetensors file: its 9th byte is b'\\[', not the '{'"),
        (HEADER, b"\x00" * 8, None, "truncated: tensor 'x.lora_A.weight' needs bytes up to 16"),
        ({"t": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), None, "dtype 'F8_E4M3'"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), None, "needs 12 bytes"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, bytes(8), None, "malformed shape"),
        ({"t": {"dtype": "F32", "shape": [2]}}, bytes(8), None, "lacks dtype, shape or data_offsets"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), None, "malformed data_offsets"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            None,
            "overlaps the previous tensor",
        ),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), None, "leaves a gap"),
        (HEADER, GOOD_DATA + b"junk", None, "data buffer holds 20"),
        (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "t": {}}', bytes(4), None, "names 't' twice"),
        ({"__metadata__": {"lora_adapter_metadata": 1}, **HEADER}, GOOD_DATA, None, "is not a string .* scales"),
        ({"t": {"dtype": "F32", "shape": [1, 1, 1, 1, 1, 1], "data_offsets": [0, 4]}}, bytes(4), None, "6 axes"),
    ],
    ids=[
        "empty-header",
        "header-longer-than-file",
        "bad-json",
        "not-utf8",
        "not-an-object",
        "truncated-data",
        "fp8-dtype",
        "shape-bytes-mismatch",
        "negative-dim",
        "missing-fields",
        "reversed-offsets",
        "overlap",
        "gap",
        "trailing-bytes",
        "duplicate-key",
        "non-string-metadata",
        "too-many-axes",
    ],
)
def test_malformed_containers(tmp_path: Path, header, data: bytes, length, message: str) -> None:
    path = raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(LoraFormatError, match=message) as info:
        load_lora(path)
    assert "bad.safetensors" in str(info.value)  # says where


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"], ids=["empty", "four-bytes"])
def test_tiny_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoraFormatError, match="at least an 8-byte header length"):
        load_lora(path)


def test_limits_are_enforced(tmp_path: Path) -> None:
    path = save(tmp_path / "x.safetensors", peft(Q, rank=4))
    with pytest.raises(LoraFormatError, match="over the limit"):
        load_lora(path, limits=ReadLimits(max_file_bytes=100))
    with pytest.raises(LoraFormatError, match=r"header length .* is over the limit"):
        load_lora(path, limits=ReadLimits(max_header_bytes=16))
    with pytest.raises(LoraFormatError, match="2 tensors, over the limit of 1"):
        load_lora(path, limits=ReadLimits(max_tensors=1))
    with pytest.raises(LoraFormatError, match=r"rank 4 is outside 1..2"):
        load_lora(path, limits=ReadLimits(max_rank=2))


def test_oversized_metadata_value_is_dropped_with_warning(tmp_path: Path) -> None:
    path = save(tmp_path / "x.safetensors", peft(Q), {"big": "x" * 200, "small": "ok"})
    lora = load_lora(path, limits=ReadLimits(max_metadata_value_chars=100))
    assert lora.meta.safetensors_metadata == {"small": "ok"}
    assert any("'big'" in w and "dropped" in w for w in lora.meta.warnings)


@pytest.mark.parametrize(("bad", "where"), [(float("nan"), ".lora_A.weight"), (float("inf"), ".lora_B.weight")])
def test_non_finite_factors(tmp_path: Path, bad: float, where: str) -> None:
    tensors = peft(Q)
    tensors[Q + where][0, 0] = bad
    role = where[6]
    with pytest.raises(LoraFormatError, match=f"q_proj'?: factor {role} has 1 NaN/Inf"):
        load_lora(save(tmp_path / "x.safetensors", tensors))


def test_nan_alpha(tmp_path: Path) -> None:
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    with pytest.raises(LoraFormatError, match="alpha' is nan; it must be finite"):
        load_lora(save(tmp_path / "x.safetensors", kohya(stem, alpha=float("nan"))))


def test_a_without_b(tmp_path: Path) -> None:
    tensors = peft(Q) | {"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.randn(4, 16)}
    with pytest.raises(LoraFormatError, match=r"k_proj' has A .* but no B factor"):
        load_lora(save(tmp_path / "x.safetensors", tensors))


def test_b_without_a(tmp_path: Path) -> None:
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(4, 2)}
    with pytest.raises(LoraFormatError, match=r"has B .* but no A factor"):
        load_lora(save(tmp_path / "x.safetensors", tensors))


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "message"),
    [
        ((4, 16), (12, 3), "rank mismatch: A .* has rank 4 but B .* has 3"),
        ((4, 16, 3, 3), (12, 4, 3, 3), r"should be \(d_out, r, 1, …, 1\)"),
        ((4, 16), (12, 4, 1, 1), "mix linear and conv shapes"),
        ((4, 16, 3, 3), (12, 4, 1), "conv factors disagree on axes"),
        ((4,), (12, 4), "at least 2 axes"),
    ],
    ids=["rank", "conv-up-kernel", "linear-conv-mix", "conv-axes", "1d-factor"],
)
def test_shape_mismatches(tmp_path: Path, a_shape, b_shape, message: str) -> None:
    tensors = {Q + ".lora_A.weight": torch.randn(*a_shape), Q + ".lora_B.weight": torch.randn(*b_shape)}
    with pytest.raises(LoraFormatError, match=message):
        load_lora(save(tmp_path / "x.safetensors", tensors))


def test_integer_factor_is_refused(tmp_path: Path) -> None:
    tensors = {Q + ".lora_A.weight": torch.ones(2, 4, dtype=torch.int32), Q + ".lora_B.weight": torch.randn(4, 2)}
    with pytest.raises(LoraFormatError, match="integer dtype I32; factors must be floats"):
        load_lora(save(tmp_path / "x.safetensors", tensors))


def test_duplicate_role_keys(tmp_path: Path) -> None:
    a, b = factors(2, 4, 4)
    tensors = peft(Q) | {Q + ".lora_A.default.weight": a}
    with pytest.raises(LoraFormatError, match="has two A tensors"):
        load_lora(save(tmp_path / "x.safetensors", tensors))
    assert b.shape == (4, 2)


def test_two_stems_one_module(tmp_path: Path) -> None:
    stem_k = "lora_unet_down_blocks_0_attentions_0_proj_in"
    stem_d = "unet.down_blocks.0.attentions.0.proj_in"
    a, b = factors(2, 8, 8)
    tensors = kohya(stem_k, d_in=8, d_out=8) | pair(stem_d, ".lora_A.weight", ".lora_B.weight", a, b)
    with pytest.raises(LoraFormatError, match=r"both name module 'down_blocks.0.attentions.0.proj_in'"):
        load_lora(save(tmp_path / "x.safetensors", tensors))


def test_unknown_key_layout(tmp_path: Path) -> None:
    tensors = {"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4), "lm_head.weight": torch.randn(4, 4)}
    with pytest.raises(LoraFormatError, match=r"no LoRA modules found .*unknown key layout"):
        load_lora(save(tmp_path / "x.safetensors", tensors))


def _variant(kind: str) -> dict[str, torch.Tensor]:
    s = "lora_unet_down_blocks_0_attentions_0_proj_in"
    t = torch.randn
    return {
        "LoHa": {
            f"{s}.hada_w1_a": t(8, 2),
            f"{s}.hada_w1_b": t(2, 8),
            f"{s}.hada_w2_a": t(8, 2),
            f"{s}.hada_w2_b": t(2, 8),
        },
        "LoKr": {f"{s}.lokr_w1": t(2, 2), f"{s}.lokr_w2_a": t(4, 2), f"{s}.lokr_w2_b": t(2, 4)},
        "OFT": {f"{s}.oft_blocks": t(4, 2, 2)},
        "IA3": {f"{s}.weight": t(8), f"{s}.on_input": t(1)},
        "full (dense diff)": {f"{s}.diff": t(8, 8), f"{s}.diff_b": t(8)},
        "BOFT": {"base_model.model.q.boft_R": t(1, 2, 2, 2), "base_model.model.q.boft_s": t(1, 8)},
    }[kind]


@pytest.mark.parametrize("variant", ["LoHa", "LoKr", "OFT", "IA3", "full (dense diff)", "BOFT"])
def test_non_low_rank_variants_are_refused_by_name(tmp_path: Path, variant: str) -> None:
    with pytest.raises(LoraFormatError, match=f"not a low-rank B·A adapter: found {variant.split()[0]}"):
        load_lora(save(tmp_path / "x.safetensors", _variant(variant)))


def test_loha_mixed_with_lora_is_refused(tmp_path: Path) -> None:
    tensors = _variant("LoHa") | kohya("lora_unet_mid_block_attentions_0_proj_out")
    with pytest.raises(LoraFormatError, match="LoHa"):
        load_lora(save(tmp_path / "x.safetensors", tensors))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"peft_type": "LOHA"}, "peft_type is 'LOHA'"),
        ({"r": "eight"}, "r must be a number"),
        ({"r": 0}, "r must be a positive integer"),
        ({"rank_pattern": {"(unclosed": 2}}, "not a valid regular expression"),
        ({"rank_pattern": {"x" * 600: 2}}, "over the cap"),
        ({"alpha_pattern": ["q_proj"]}, "alpha_pattern must be an object"),
    ],
    ids=["loha", "r-string", "r-zero", "bad-regex", "long-regex", "pattern-list"],
)
def test_bad_adapter_config(tmp_path: Path, config: dict, message: str) -> None:
    save(tmp_path / "adapter_model.safetensors", peft(Q))
    write_config(tmp_path, **config)
    with pytest.raises(LoraFormatError, match=message) as info:
        load_lora(tmp_path)
    assert "adapter_config.json" in str(info.value)


def test_adapter_config_not_json_or_too_big(tmp_path: Path) -> None:
    save(tmp_path / "adapter_model.safetensors", peft(Q))
    (tmp_path / "adapter_config.json").write_text("{'r': 8}")  # a Python literal, not JSON: never eval'd
    with pytest.raises(LoraFormatError, match=r"adapter_config\.json is not valid JSON"):
        load_lora(tmp_path)
    (tmp_path / "adapter_config.json").write_text(" " * 2000 + "{}")
    with pytest.raises(LoraFormatError, match="over the limit"):
        load_lora(tmp_path, limits=ReadLimits(max_config_bytes=1000))


def test_catastrophic_regex_is_matched_in_linear_time(tmp_path: Path) -> None:
    """``(a|aa)+b`` backtracks exponentially in Python's ``re`` on a run of a's; RE2 answers at once, no timeout."""
    name = "base_model.model." + "a" * 900 + ".q_proj"
    save(tmp_path / "adapter_model.safetensors", peft(name, rank=4))
    write_config(tmp_path, r=4, lora_alpha=8, rank_pattern={"(a|aa)+b": 2}, alpha_pattern={"(a|aa)+\\.q_proj": 2})
    lora = load_lora(tmp_path)
    assert lora.scales == (0.5,)  # the rank pattern matches nothing; the alpha pattern matches: 2 / 4


@pytest.mark.parametrize("key", ["(?=q)q_proj", "(q)\\1", "(?>q_proj)"], ids=["lookahead", "backreference", "atomic"])
def test_patterns_without_a_linear_time_match_are_refused(tmp_path: Path, key: str) -> None:
    save(tmp_path / "adapter_model.safetensors", peft(Q))
    write_config(tmp_path, rank_pattern={key: 2})
    with pytest.raises(LoraFormatError, match="cannot be matched in linear time"):
        load_lora(tmp_path)


def test_missing_path_and_ambiguous_folder(tmp_path: Path) -> None:
    with pytest.raises(LoraFormatError, match="no such file or folder"):
        load_lora(tmp_path / "nope.safetensors")
    save(tmp_path / "one.safetensors", peft(Q))
    save(tmp_path / "two.safetensors", peft(Q))
    with pytest.raises(LoraFormatError, match=r"has 2 \.safetensors files; name the one you mean"):
        load_lora(tmp_path)
