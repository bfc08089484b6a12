"""What LoRA users read on Civitai or with lora-inspector, computed from the file: lookup hashes, trigger words,
training parameters, effective rank and strength per block (``lol_engine.report.describe``) and their display."""

from __future__ import annotations

import hashlib
import json
import math
from io import BytesIO
from pathlib import Path

import pytest
import torch
from lora_files import kohya, peft, save, write_config
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from lol_engine.lora.parse import load_lora
from lol_engine.lora.safe_io import safetensors_hashes
from lol_engine.report import block_of, describe, effective_rank

SD1_STEMS = (
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_q",
    "lora_te_text_model_encoder_layers_11_mlp_fc1",
)
SHAPES = {"attn2_to_k": (768, 320), "attn1_to_q": (320, 320), "attn1_to_v": (1280, 1280), "attn2_to_q": (320, 320)}


def _sd1_tensors() -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for i, stem in enumerate(SD1_STEMS):
        d_in, d_out = next((v for k, v in SHAPES.items() if stem.endswith(k)), (768, 3072))
        tensors |= kohya(stem, rank=4, d_in=d_in, d_out=d_out, alpha=2.0, seed=i)
    return tensors


def _data_hash(path: Path) -> str:
    """The kohya/A1111 hash, computed here from the raw bytes: sha256 of everything after [u64 n][n header bytes]."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n :]).hexdigest()


def _kohya_model_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sd-scripts ``precalculate_safetensors_hashes``: the data hash of the file saved with the ss_* metadata only."""
    blob = save_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(BytesIO(blob).getvalue()[8 + n :]).hexdigest()


# ------------------------------------------------------------------------------------------------------------ hashes
def test_hashes_match_an_independent_computation(tmp_path: Path) -> None:
    path = save(tmp_path / "style.safetensors", _sd1_tensors(), {"ss_output_name": "style"})
    report = describe(load_lora(path))
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report["autov2"] == report["sha256"][:10]
    assert report["addnet_sha256"] == _data_hash(path) != report["sha256"]
    assert report["addnet_shorthash"] == report["addnet_sha256"][:12]
    assert safetensors_hashes(path, 2**30) == (report["sha256"], report["addnet_sha256"])
    assert report["sshs_model_hash"] is None and report["sshs_model_hash_matches"] is None


def test_edited_metadata_keeps_the_addnet_hash_but_not_the_sha256(tmp_path: Path) -> None:
    tensors = _sd1_tensors()
    metadata = {"ss_output_name": "style", "ss_network_dim": "4"}
    metadata |= {"sshs_model_hash": _kohya_model_hash(tensors, metadata), "sshs_legacy_hash": "0123abcd"}
    original = save(tmp_path / "original.safetensors", tensors, metadata)
    with safe_open(str(original), framework="pt") as fh:  # what a metadata editor does: same tensors, new header
        loaded = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
        edited_meta = dict(fh.metadata()) | {"ss_output_name": "renamed", "modelspec.title": "Renamed"}
    edited = save(tmp_path / "edited.safetensors", loaded, edited_meta)
    before, after = describe(load_lora(original)), describe(load_lora(edited))
    assert before["sha256"] != after["sha256"]
    assert before["addnet_sha256"] == after["addnet_sha256"] == _data_hash(edited)
    for report in (before, after):  # kohya's own precalculated hash agrees with ours
        assert report["sshs_model_hash_matches"] is True and report["sshs_legacy_hash"] == "0123abcd"
        assert not any("sshs_model_hash" in w for w in report["warnings"])


def test_an_sshs_model_hash_of_other_weights_is_a_warning(tmp_path: Path) -> None:
    tensors = _sd1_tensors()
    other = {k: v * 2 for k, v in tensors.items()}
    metadata = {"ss_output_name": "x"}
    path = save(
        tmp_path / "x.safetensors", tensors, metadata | {"sshs_model_hash": _kohya_model_hash(other, metadata)}
    )
    report = describe(load_lora(path))
    assert report["sshs_model_hash_matches"] is False
    assert any("sshs_model_hash" in w and "not the hash" in w for w in report["warnings"])
    junk = save(tmp_path / "junk.safetensors", tensors, {"sshs_model_hash": "<b>not hex</b>"})
    assert describe(load_lora(junk))["sshs_model_hash"] is None  # junk is not compared, nor echoed


def test_a_file_changed_after_reading_gets_no_addnet_hash(tmp_path: Path) -> None:
    path = save(tmp_path / "x.safetensors", _sd1_tensors())
    lora = load_lora(path)
    save(path, {k: v + 1 for k, v in _sd1_tensors().items()})
    report = describe(lora)
    assert report["addnet_sha256"] is None and any("changed after it was read" in w for w in report["warnings"])


# ------------------------------------------------------------------------------------------------- trigger words
def test_trigger_words_merge_folders_and_sort_by_count(tmp_path: Path) -> None:
    frequency = {
        "10_mychar": {"mychar": 30, "1girl": 25, "smile": 4},
        "5_extra": {"mychar": 10, "outdoors": 26, "smile": 1},
    }
    many = {f"tag{i:02d}": i for i in range(40)}  # 40 more, counts 0..39
    frequency["3_many"] = many
    path = save(
        tmp_path / "x.safetensors",
        _sd1_tensors(),
        {"ss_tag_frequency": json.dumps(frequency), "ss_output_name": "mychar", "modelspec.trigger_phrase": "mychar"},
    )
    words = describe(load_lora(path))["trigger_words"]
    merged = {"mychar": 40, "1girl": 25, "outdoors": 26, "smile": 5} | many
    expected = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    assert [(t["tag"], t["count"]) for t in words["top_tags"]] == expected
    assert words["top_tags"][0] == {"tag": "mychar", "count": 40} and words["n_tags"] == len(merged)
    assert words["output_name"] == "mychar" and words["trigger_phrase"] == "mychar"


@pytest.mark.parametrize(
    ("value", "warned"),
    [
        ('{"dir": {"a": 1', "not valid JSON"),  # truncated
        ("[" * 200 + "]" * 200, "nested"),  # deeper than the JSON cap
        ('{"dir": {"a": 1e999999}}', "non-finite"),  # an infinite count
        ('{"dir": ["a", "b"]}', "entries are not a tag"),  # a folder that is a list
        ('{"dir": {"a": "many", "b": true, "c": -3, "ok": 2}}', "entries are not a tag"),
        ('{"dir": {"a": ' + "9" * 500 + "}}", "ss_tag_frequency"),  # a 500-digit count
        ("[1, 2, 3]", "not a {folder"),
    ],
    ids=["truncated", "deep", "infinite", "list-folder", "bad-counts", "huge-number", "list"],
)
def test_malformed_tag_frequency_is_a_warning_never_a_crash(tmp_path: Path, value: str, warned: str) -> None:
    path = save(tmp_path / "x.safetensors", _sd1_tensors(), {"ss_tag_frequency": value})
    report = describe(load_lora(path))
    assert any(warned in w for w in report["warnings"]), report["warnings"]
    assert all(t["count"] >= 0 and isinstance(t["count"], int) for t in report["trigger_words"]["top_tags"])
    json.dumps(report, allow_nan=False)  # still strict JSON


def test_a_huge_tag_frequency_is_bounded(tmp_path: Path) -> None:
    from lol_engine.lora.metadata import MAX_TAG_CHARS, MAX_TAG_ENTRIES

    tags = {f"t{i}": 1 for i in range(MAX_TAG_ENTRIES + 5000)}
    tags["x" * (MAX_TAG_CHARS + 1)] = 10**6  # a caption pasted as one "tag": skipped, not shown
    path = save(tmp_path / "x.safetensors", _sd1_tensors(), {"ss_tag_frequency": json.dumps({"d": tags})})
    report = describe(load_lora(path))
    words = report["trigger_words"]
    assert words["n_tags"] == MAX_TAG_ENTRIES and len(words["top_tags"]) == 20
    assert all(len(t["tag"]) <= MAX_TAG_CHARS for t in words["top_tags"])
    assert any(f"more than {MAX_TAG_ENTRIES:,} tags" in w for w in report["warnings"])


# ------------------------------------------------------------------------------------------- training parameters
def test_training_parameters_are_named_explained_and_dated_in_utc(tmp_path: Path) -> None:
    metadata = {
        "ss_network_dim": "4",
        "ss_network_alpha": "2.0",
        "ss_learning_rate": "0.0001",
        "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1)",
        "ss_training_started_at": "1700000000.25",
        "ss_training_finished_at": "not a time",
        "ss_resolution": "(512, 512)",
        "ss_seed": "42",
        "ss_clip_skip": "None",  # absent in effect: not listed
        "ss_sd_model_name": "x" * 5000,
    }
    path = save(tmp_path / "x.safetensors", _sd1_tensors(), metadata)
    rows = {r["key"]: r for r in describe(load_lora(path))["training_parameters"]}
    assert set(rows) == set(metadata) - {"ss_clip_skip"}
    assert rows["ss_training_started_at"]["value"] == "2023-11-14 22:13:20 UTC"
    assert rows["ss_training_finished_at"]["value"] == "not a time"  # shown as written, not parsed
    assert rows["ss_network_alpha"]["value"] == "2.0" and rows["ss_learning_rate"]["value"] == "0.0001"
    assert rows["ss_network_dim"]["name"] == "network dim" and "rank" in rows["ss_network_dim"]["meaning"]
    assert len(rows["ss_sd_model_name"]["value"]) <= 200


def test_training_parameters_of_a_peft_adapter(tmp_path: Path) -> None:
    save(tmp_path / "adapter_model.safetensors", peft("base_model.model.model.layers.0.self_attn.q_proj", rank=8))
    write_config(tmp_path, r=8, lora_alpha=16, task_type="CAUSAL_LM", base_model_name_or_path="org/model")
    rows = {r["key"]: r["value"] for r in describe(load_lora(tmp_path))["training_parameters"]}
    assert rows["r"] == "8" and rows["lora_alpha"] == "16" and rows["task_type"] == "CAUSAL_LM"
    assert rows["base_model_name_or_path"] == "org/model" and rows["target_modules"] == '["q_proj"]'


# --------------------------------------------------------------------------------------------- effective rank
def test_effective_rank_of_known_singular_values(tmp_path: Path) -> None:
    sigma = torch.tensor([3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 4, generator=gen, dtype=torch.float64))  # orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(24, 4, generator=gen, dtype=torch.float64))
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {
        f"{stem}.lora_up.weight": (u * sigma).float(),  # B: (d_out, r)
        f"{stem}.lora_down.weight": v.T.float(),  # A: (r, d_in); ΔW = B A = U diag(σ) Vᵀ
        f"{stem}.alpha": torch.tensor(4.0),  # alpha = r: scale 1
    }
    module = describe(load_lora(save(tmp_path / "x.safetensors", tensors)))["modules"][0]
    assert module["singular_values"] == pytest.approx(sigma.tolist(), rel=1e-5)
    # energies 9, 1, 0.25, 0.01 of 10.26: 90 % (9.234) needs 2 values, 99 % (10.157) needs 3
    assert (module["effective_rank_90"], module["effective_rank_99"]) == (2, 3)
    for level, key in ((0.9, "effective_rank_90"), (0.99, "effective_rank_99")):  # kohya's sv_fro, at √level
        squares = sigma**2
        cumulative = torch.cumsum(squares, 0) / squares.sum()
        assert int(torch.searchsorted(cumulative, math.sqrt(level) ** 2)) + 1 == module[key]


def test_effective_rank_edge_cases() -> None:
    assert effective_rank([0.0, 0.0], 0.9) == 0  # ΔW = 0
    assert effective_rank([1.0, 1.0, 1.0, 1.0], 0.99) == 4  # a flat spectrum needs all of it
    assert effective_rank([1.0, 1.0, 1.0, 1.0], 0.75) == 3
    assert effective_rank([0.1, 5.0], 0.9) == 1  # the order given does not matter


# ------------------------------------------------------------------------------------------- strength per block
def test_block_strength_is_the_norm_of_each_blocks_updates(tmp_path: Path) -> None:
    lora = load_lora(save(tmp_path / "x.safetensors", _sd1_tensors()))
    report = describe(lora)
    blocks = [b["block"] for b in report["block_strength"]]
    assert blocks == ["text_encoder.layers.11", "down_blocks.0", "mid_block", "up_blocks.3"]
    expected: dict[str, float] = {}
    for m in lora:  # ΔW formed explicitly here, grouped by hand
        delta = m.scale * m.b.double() @ m.a.double()
        group = {"down": "down_blocks.0", "mid_": "mid_block", "up_b": "up_blocks.3"}.get(m.name[:4])
        group = group or "text_encoder.layers.11"
        expected[group] = expected.get(group, 0.0) + float(torch.linalg.matrix_norm(delta)) ** 2
    for b in report["block_strength"]:
        assert b["delta_fro_norm"] == pytest.approx(math.sqrt(expected[b["block"]]), rel=1e-4)
    assert {b["block"]: b["n_modules"] for b in report["block_strength"]}["down_blocks.0"] == 2


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4"),
        ("middle_block.1.proj_in", "middle_block"),
        ("output_blocks.11.1.transformer_blocks.0.attn2.to_k", "output_blocks.11"),
        ("double_blocks.3.img_attn.qkv", "double_blocks.3"),
        ("single_transformer_blocks.7.attn.to_q", "single_transformer_blocks.7"),
        ("transformer_blocks.2.attn.to_q", "transformer_blocks.2"),
        ("text_encoder_2.text_model.encoder.layers.30.self_attn.q_proj", "text_encoder_2.layers.30"),
        ("text_encoder_3.encoder.block.5.layer.0.SelfAttention.q", "text_encoder_3.layers.5"),
        ("model.layers.17.self_attn.v_proj", "model.layers.17"),
        ("bert.encoder.layer.2.attention.self.query", "bert.encoder.layer.2"),
        ("transformer.h.4.attn.c_attn", "transformer.h.4"),
        ("lm_head", "lm_head"),
    ],
)
def test_block_names(name: str, block: str) -> None:
    assert block_of(name)[0] == block


def test_blocks_sort_in_depth_order() -> None:
    names = ["up_blocks.0.x", "mid_block.x", "down_blocks.10.x", "down_blocks.2.x", "text_encoder.layers.1.x"]
    order = sorted(names, key=lambda n: block_of(n)[1])
    assert order == ["text_encoder.layers.1.x", "down_blocks.2.x", "down_blocks.10.x", "mid_block.x", "up_blocks.0.x"]


# ------------------------------------------------------------------------------------------------------- display
def test_card_and_summary_show_the_new_fields_escaped(tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    from app import handlers

    hostile = "<img src=x onerror=alert(1)>|**bold**"
    metadata = {
        "ss_tag_frequency": json.dumps({"d": {hostile: 9, "`tick`": 3}}),
        "ss_output_name": hostile,
        "ss_learning_rate": "0.0001",
    }
    path = save(tmp_path / "x.safetensors", _sd1_tensors(), metadata)
    result = handlers.inspect_upload([str(path)])
    summary = result.summary
    assert f"`{result.report['autov2']}`" in summary and result.report["addnet_sha256"] in summary
    assert "learning rate" in summary and "| parameter | value | meaning | key |" in summary
    assert "<img" not in summary and "&lt;img" in summary and "\\|" in summary  # HTML and table pipes escaped
    assert "\\`tick\\` (3)" in summary  # backticks too: no code span opens
    figure = handlers.block_strength_figure(result.report)
    assert list(figure.data[0].x) == [b["block"] for b in result.report["block_strength"]]
    assert list(figure.data[0].y) == pytest.approx([b["delta_fro_norm"] for b in result.report["block_strength"]])


def test_upload_card_shows_hashes_trigger_words_and_parameters(tmp_path: Path) -> None:
    pytest.importorskip("duckdb")
    from app import handlers
    from lol_engine.explorer import Explorer

    metadata = {"ss_tag_frequency": json.dumps({"d": {"<b>mychar</b>": 9}}), "ss_network_dim": "4", "ss_seed": "7"}
    path = save(tmp_path / "up.safetensors", _sd1_tensors(), metadata)
    explorer = Explorer.open(tmp_path / "data" / "lol.duckdb")
    try:
        result = handlers.analyse_upload(explorer, [str(path)])
    finally:
        explorer.close()
    card, report = result.card, result.analysis.report
    assert f"**AutoV2** `{report['autov2']}`" in card and f"`{report['addnet_shorthash']}`" in card
    assert "**trigger words:**" in card and "&lt;b&gt;mychar&lt;/b&gt; (9)" in card  # shown, not rendered
    assert "| network dim | 4 |" in card and "| seed | 7 |" in card and "| ss\\_seed |" in card
    assert "other training metadata" not in card  # every ss_* key is in the table or the trigger words
