"""What LoRA users read on Civitai or with lora-inspector, computed from the file: lookup hashes, trigger words,
training parameters, effective rank and strength per block (``lol_engine.report.describe``) and their display."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import replace
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


def test_a_file_changed_after_reading_keeps_the_hash_of_the_bytes_read(tmp_path: Path) -> None:
    """load_lora hashes the bytes it converts: the addnet hash is of what was analysed, like the sha256."""
    path = save(tmp_path / "x.safetensors", _sd1_tensors())
    read_hashes = safetensors_hashes(path, 2**30)
    lora = load_lora(path)
    save(path, {k: v + 1 for k, v in _sd1_tensors().items()})
    report = describe(lora)
    assert (report["sha256"], report["addnet_sha256"]) == read_hashes
    assert not any("changed after it was read" in w for w in report["warnings"])


def test_a_file_changed_after_reading_gets_no_addnet_hash(tmp_path: Path) -> None:
    """A LoRA whose reader did not hash the data buffer: the hash is computed from the file, if it is unchanged."""
    path = save(tmp_path / "x.safetensors", _sd1_tensors())
    loaded = load_lora(path)
    lora = replace(loaded, meta=replace(loaded.meta, data_sha256=""))
    assert describe(lora)["addnet_sha256"] == loaded.meta.data_sha256
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


# ----------------------------------------------------------------------------------------- one card, kept in the store
HOSTILE_TAG = "<script>alert(1)</script>|[x](javascript:alert(1))**`"
FREQUENCY = {"10_mychar": {"mychar": 30, "1girl": 25, HOSTILE_TAG: 7}, "5_extra": {"mychar": 10, "smile": 2}}
KOHYA_METADATA = {
    "ss_tag_frequency": json.dumps(FREQUENCY),
    "ss_output_name": "mychar",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_learning_rate": "0.0001",
    "ss_num_train_images": "120",
    "ss_seed": "7",
    "ss_custom_field": "<b>kept</b>",  # not in the parameters table: "other training metadata"
    "modelspec.title": "My Char",
    "modelspec.thumbnail": "data:image/png;base64," + "A" * 50_000,
}


def _explorer(root: Path):  # type: ignore[no-untyped-def]
    pytest.importorskip("duckdb")
    from lol_engine.explorer import Explorer

    return Explorer.open(root / "data" / "lol.duckdb")


def _check_stored_card(card, path: Path) -> None:  # type: ignore[no-untyped-def]
    """What the card of the file written with KOHYA_METADATA must hold, computed here independently."""
    merged = {"mychar": 40, "1girl": 25, HOSTILE_TAG: 7, "smile": 2}
    assert [(t.tag, t.count) for t in card.top_tags] == sorted(merged.items(), key=lambda kv: -kv[1])
    assert card.n_tags == 4 and card.output_name == "mychar"
    params = {p.key: p.value for p in card.training_parameters}
    assert params["ss_network_dim"] == "4" and params["ss_learning_rate"] == "0.0001" and params["ss_seed"] == "7"
    other = dict(card.other_metadata)
    assert other["ss_custom_field"] == "<b>kept</b>" and other["modelspec.title"] == "My Char"
    assert other["modelspec.thumbnail"] == "(an image; not kept)" and "ss_tag_frequency" not in other
    blob = path.read_bytes()
    assert card.hashes.sha256 == card.id == hashlib.sha256(blob).hexdigest()
    assert card.hashes.autov2 == hashlib.sha256(blob).hexdigest()[:10]
    assert card.hashes.addnet_sha256 == _data_hash(path) and card.hashes.addnet_shorthash == _data_hash(path)[:12]
    assert card.size_bytes == len(blob) and card.ranks == (4,) and card.scales == (0.5, 0.5)  # alpha 2 / rank 4
    blocks = ["text_encoder.layers.11", "down_blocks.0", "mid_block", "up_blocks.3"]
    assert [b.block for b in card.block_strength] == blocks


def test_a_stored_kohya_loras_card_needs_no_file_and_survives_reopening(tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    from app import handlers

    path = save(tmp_path / "files" / "mychar.safetensors", _sd1_tensors(), KOHYA_METADATA)
    kept = tmp_path / "kept.safetensors"
    kept.write_bytes(path.read_bytes())  # the bytes, to check the hashes against once the file is gone
    explorer = _explorer(tmp_path)
    try:
        (lora_id,) = explorer.ingest([str(path)], progress=False).ids
        first = handlers.stored_card(explorer, lora_id)
    finally:
        explorer.close()
    path.unlink()  # the card is kept in the store: no file is read for it
    reopened = _explorer(tmp_path)
    try:
        card = handlers.stored_card(reopened, lora_id)
        text = handlers.render_card(card)
        data = handlers.card_data(reopened, lora_id)
    finally:
        reopened.close()
    assert card == first and card.collection == "uploads" and card.name == "mychar"
    _check_stored_card(card, kept)
    assert "mychar (40), 1girl (25)" in text and "| network dim | 4 |" in text and "| seed | 7 |" in text
    assert "**other training metadata:** ss\\_custom\\_field = &lt;b&gt;kept&lt;/b&gt;" in text
    assert "{'" not in text and '{"' not in text and "ss\\_tag\\_frequency" not in text  # never a dict dump
    assert "labels:" not in text  # the labels ingest made from the metadata are shown in their sections, not twice
    assert json.loads(json.dumps(data, allow_nan=False)) == data and data["id"] == lora_id
    assert data["top_tags"][0] == {"tag": "mychar", "count": 40} and data["hashes"]["autov2"] == lora_id[:10]


def test_an_upload_and_its_stored_copy_have_the_same_card(tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    from app import handlers

    path = save(tmp_path / "up" / "mychar.safetensors", _sd1_tensors(), KOHYA_METADATA)
    explorer = _explorer(tmp_path)
    try:
        upload = handlers.analyse_upload(explorer, [str(path)])
        handlers.add_upload(explorer, [str(path)])
        stored = handlers.card_data(explorer, upload.analysis.sha256)
        again = handlers.analyse_upload(explorer, [str(path)])
    finally:
        explorer.close()
    file_part = {k: v for k, v in upload.card_data.items() if k not in ("collection", "predictions", "n_predictors")}
    file_part.pop("seconds")
    assert {k: stored[k] for k in file_part} == file_part  # one card: the same facts before and after adding
    assert upload.card_data["collection"] is None and stored["collection"] == "uploads"
    assert again.card_data["stored_as"] == "mychar" and "already in the collection as **mychar**" in again.card


def test_an_older_store_is_migrated_and_its_cards_made_once(tmp_path: Path) -> None:
    import duckdb

    from lol_engine.store import SCHEMA_VERSION, LoraStore

    path = save(tmp_path / "files" / "mychar.safetensors", _sd1_tensors(), KOHYA_METADATA)
    explorer = _explorer(tmp_path)
    try:
        (lora_id,) = explorer.ingest([str(path)], progress=False).ids
    finally:
        explorer.close()
    con = duckdb.connect(str(tmp_path / "data" / "lol.duckdb"))  # back to schema 2: no card_json column
    con.execute("ALTER TABLE loras DROP COLUMN card_json")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.close()
    with LoraStore(tmp_path / "data" / "lol.duckdb") as store:
        assert store.schema_version == SCHEMA_VERSION == 3 and store.card(lora_id) is None
    explorer = _explorer(tmp_path)
    try:
        from app import handlers

        card = handlers.stored_card(explorer, lora_id)  # made from the file, once, and kept
        assert explorer.store.card(lora_id) == explorer.card_facts(lora_id)
    finally:
        explorer.close()
    _check_stored_card(card, path)
    path.unlink()
    explorer = _explorer(tmp_path)
    try:
        assert handlers.stored_card(explorer, lora_id) == card  # kept: the file is no longer needed
    finally:
        explorer.close()


def test_kohyas_structured_fields_are_summarised_never_dumped(tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    from app import handlers
    from lol_engine.card import build_card

    datasets = [
        {
            "is_dreambooth": True,
            "batch_size_per_device": 2,
            "num_train_images": 250,
            "resolution": [512, 512],
            "subsets": [{"image_dir": "10_mychar", "num_repeats": 10}, {"image_dir": "5_extra"}],
            "tag_frequency": FREQUENCY,
        }
    ]
    metadata = {
        "ss_tag_frequency": json.dumps(FREQUENCY),
        "ss_datasets": json.dumps(datasets),
        "ss_dataset_dirs": json.dumps({"10_mychar": {"n_repeats": 10, "img_count": 25}, "5_extra": {"n_repeats": 5}}),
        "ss_bucket_info": json.dumps({"buckets": {"0": {}, "1": {}, "2": {}}, "mean_img_ar_error": 0.0125}),
    }
    report = describe(load_lora(save(tmp_path / "x.safetensors", _sd1_tensors(), metadata)))
    card = build_card(report, name="x")
    other = dict(card.other_metadata)
    assert other["ss_datasets"] == "1 dataset(s): 250 images, resolution [512,512], batch 2, 2 subset(s)"
    assert other["ss_dataset_dirs"] == "10_mychar: 10 repeats × 25 images; 5_extra: 5 repeats × ? images"
    assert other["ss_bucket_info"] == "3 aspect-ratio buckets, mean aspect error 0.0125"
    text = handlers.render_card(card)
    assert "{" not in text and "mychar (40)" in text  # no object dumped, the tags counted once, from their field


def test_card_facts_are_bounded_whatever_the_file_holds(tmp_path: Path) -> None:
    from lol_engine.report import MAX_OTHER_METADATA, card_facts

    metadata = {f"ss_junk_{i:04d}": "x" * 5000 for i in range(2000)}
    metadata["modelspec.thumbnail"] = "data:image/png;base64," + "A" * 500_000
    metadata["ss_tag_frequency"] = json.dumps({"d": {f"tag{i}": i for i in range(20_000)}})
    report = describe(load_lora(save(tmp_path / "x.safetensors", _sd1_tensors(), metadata)))
    facts = card_facts(report)
    assert len(json.dumps(facts, allow_nan=False)) < 150_000 and len(facts["other_metadata"]) == MAX_OTHER_METADATA
    assert all(len(m["value"]) <= 200 for m in facts["other_metadata"])
    assert len(facts["trigger_words"]["top_tags"]) == 20 and facts["trigger_words"]["n_tags"] == 20_000
    assert card_facts(facts) == facts  # the store's copy gives the same facts back


# ------------------------------------------------------------------------------------------------------------ names
GRADIO_FOLDER = "3f" * 32  # Gradio keeps an upload in a folder named by a hash
HELD_FOLDER = "ab" * 16  # the app holds an analysed upload in a folder named by a token


def _peft_folder(folder: Path, **config: object) -> tuple[Path, Path]:
    weights = save(folder / "adapter_model.safetensors", peft("base_model.model.model.layers.0.self_attn.q_proj"))
    return weights, write_config(folder, r=4, lora_alpha=8, **config)


@pytest.mark.parametrize(
    ("weights_dir", "config_dir", "config", "typed", "expected"),
    [
        ("my-adapter", None, {}, None, "my-adapter"),  # its folder
        (GRADIO_FOLDER, "qwen-sql-r4", {}, None, "qwen-sql-r4"),  # the config's folder first
        (GRADIO_FOLDER, HELD_FOLDER, {"base_model_name_or_path": "org/Base-7B"}, None, "Base-7B-lora-{sha}"),
        (HELD_FOLDER, None, {}, None, "llm-decoder-lora-{sha}"),  # nothing but its base family
        (GRADIO_FOLDER, None, {}, "  My   SQL adapter ", "My SQL adapter"),  # what the user typed wins
        ("my-adapter", None, {}, "v2 (final)", "v2 (final)"),
    ],
)
def test_peft_uploads_are_named_never_adapter_model(
    tmp_path: Path, weights_dir: str, config_dir: str | None, config: dict, typed: str | None, expected: str
) -> None:
    from lol_engine.card import lora_name
    from lol_engine.lora.config import read_adapter_config
    from lol_engine.lora.safe_io import ReadLimits

    weights, config_path = _peft_folder(tmp_path / weights_dir, **config)
    if config_dir is not None:  # uploaded from elsewhere: the config lies in another folder
        (tmp_path / config_dir).mkdir()
        config_path = Path(shutil.move(config_path, tmp_path / config_dir))
    lora = load_lora(weights, config=read_adapter_config(config_path, ReadLimits()))
    name = lora_name(weights, config_path, lora.meta, typed=typed)
    assert name == expected.format(sha=lora.meta.sha256[:8])
    with_repo = lora_name(weights, config_path, lora.meta, typed=typed, repo_id="org/sql")
    assert with_repo == (name if typed else "org/sql")  # a typed name wins over the repo id


def test_a_kohya_upload_is_named_by_its_file_or_its_title(tmp_path: Path) -> None:
    from lol_engine.card import lora_name

    path = save(tmp_path / "pixel_art.safetensors", _sd1_tensors(), {"modelspec.title": "Pixel Art"})
    meta = load_lora(path).meta
    assert lora_name(path, None, meta) == "pixel_art"
    hashed = tmp_path / f"{'0' * 64}.safetensors"
    shutil.copyfile(path, hashed)
    assert lora_name(hashed, None, meta) == "Pixel Art"  # a hash says nothing: the file's own title


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ("x" * 101, "at most 100"),
        ("x<script>alert(1)</script>", "may not hold '<'"),
        ("a/../../etc/passwd", "may not hold '/'"),
        ("a`b", "may not hold '`'"),
        ("-rf", "start it with a letter or digit"),
        ("<b>", "start it with a letter or digit"),
        ("line\x00break", "may not hold"),
    ],
)
def test_typed_names_are_checked(typed: str, message: str) -> None:
    from lol_engine.card import check_name
    from lol_engine.errors import BadRequestError

    with pytest.raises(BadRequestError, match=re.escape(message)):
        check_name(typed)


def test_the_upload_tab_names_and_stores_a_peft_upload(tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    from app import handlers
    from lol_engine.errors import BadRequestError

    weights, config = _peft_folder(tmp_path / GRADIO_FOLDER, base_model_name_or_path="org/Base-7B")
    held = tmp_path / HELD_FOLDER  # what Add reads: the analysed upload, held under a token
    held.mkdir()
    files = [str(shutil.copy(weights, held)), str(shutil.copy(config, held))]
    explorer = _explorer(tmp_path)
    try:
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        analysed = handlers.analyse_upload(explorer, [str(weights), str(config)])
        assert analysed.card.startswith(f"### Base\\-7B\\-lora\\-{sha[:8]}") and "adapter_model" not in analysed.card
        inspected = handlers.inspect_upload([str(weights), str(config)]).summary  # the Inspect tab names it alike
        assert inspected.startswith(f"### Base\\-7B\\-lora\\-{sha[:8]}\n")
        with pytest.raises(BadRequestError, match="may not hold"):
            handlers.add_upload(explorer, files, name="x<b>")
        assert explorer.count() == 0  # a refused name stores nothing
        message = handlers.add_upload(explorer, files)
        assert f"Added **Base\\-7B\\-lora\\-{sha[:8]}**" in message
        assert explorer.get(sha).name == f"Base-7B-lora-{sha[:8]}"
        other, other_config = _peft_folder(tmp_path / "second" / GRADIO_FOLDER)
        save(other, peft("base_model.model.model.layers.0.self_attn.q_proj", seed=3))
        handlers.add_upload(explorer, [str(other), str(other_config)], name="SQL adapter v2")
        assert {r["name"] for r in explorer.records()} == {f"Base-7B-lora-{sha[:8]}", "SQL adapter v2"}
    finally:
        explorer.close()


def test_ingest_names_a_hub_repo_by_its_id_and_a_peft_folder_by_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("duckdb")
    from lol_engine import ingest as ingest_module
    from lol_engine.encoders import FINGERPRINT, encoders_for
    from lol_engine.ingest import ingest
    from lol_engine.store import LoraStore

    snapshot = tmp_path / "snapshots" / ("c0ffee" * 6 + "abcd")  # what the Hub cache names a snapshot
    _peft_folder(snapshot)
    monkeypatch.setattr(ingest_module, "fetch_repo", lambda repo_id, cache_dir=None: snapshot)
    _peft_folder(tmp_path / "local" / "sql-adapter")
    save(tmp_path / "local" / "sql-adapter" / "adapter_model.safetensors", peft("base_model.model.q_proj", seed=5))
    with LoraStore(":memory:") as store:
        encoders = [e for e in encoders_for({}) if e.name == FINGERPRINT]
        report = ingest(["someone/sql-lora", str(tmp_path / "local")], store, encoders, progress=False)
        assert not report.refused
        assert sorted(s.name for s in store.all()) == ["someone/sql-lora", "sql-adapter"]


# ------------------------------------------------------------------------------------------------ display, escaped
def test_hostile_metadata_is_inert_on_the_card(tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    from app import handlers
    from lol_engine.card import build_card, lora_name

    hostile = "<img src=x onerror=alert(1)>|[x](javascript:alert(1))**`"
    metadata = {
        "ss_tag_frequency": json.dumps({hostile: {hostile: 9, "# heading": 3}}),
        "ss_output_name": hostile,
        "ss_" + hostile: hostile,  # a hostile key too
        "ss_network_dim": hostile,
        "modelspec.title": hostile,
    }
    path = save(tmp_path / f"{'e' * 64}.safetensors", _sd1_tensors(), metadata)
    lora = load_lora(path)
    assert lora_name(path, None, lora.meta) == "img src=x onerror=alert(1) x (javascript alert(1))"  # its title, cut
    card = build_card(describe(lora), name=hostile, labels={hostile: [hostile], "note": hostile})
    text = handlers.render_card(card)
    for raw in ("<img", "](javascript", "**`", "|[x]", "\n# heading"):
        assert raw not in text, raw
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;\\|\\[x\\]\\(javascript:alert\\(1\\)\\)\\*\\*\\`" in text
    assert "\\# heading (3)" in text  # a tag cannot start a heading either
    table = [line for line in text.splitlines() if line.startswith("| network dim |")]
    assert len(table) == 1 and table[0].count(" | ") == 3  # its pipe is escaped: still four cells
    assert json.loads(json.dumps(card.to_dict())) == card.to_dict()


def test_the_spectrum_is_grouped_by_block_with_block_names_as_ticks(tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    from app import handlers

    report = describe(load_lora(save(tmp_path / "x.safetensors", _sd1_tensors())))
    fig = handlers.spectrum_figure(report)
    blocks = ["text_encoder.layers.11", "down_blocks.0", "mid_block", "up_blocks.3"]
    assert list(fig.layout.xaxis.ticktext) == blocks and list(fig.layout.xaxis.tickvals) == [0, 1.5, 3, 4]
    assert fig.layout.xaxis.tickmode == "array" and "block" in fig.layout.xaxis.title.text
    assert [s.x0 for s in fig.layout.shapes] == [0.5, 2.5, 3.5]  # a line between blocks
    by_name = {m["name"]: m for m in report["modules"]}
    for k, trace in enumerate(fig.data):  # one curve per σ_k, modules in block order, hover naming each in full
        assert list(trace.x) == [0, 1, 2, 3, 4]
        names = [t.split("<br>")[0] for t in trace.text]
        assert [block_of(n)[0] for n in names] == [blocks[0], blocks[1], blocks[1], blocks[2], blocks[3]]
        assert list(trace.y) == pytest.approx([by_name[n]["singular_values"][k] for n in names])
    hostile = "<img src=x onerror=alert(1)>"
    fake = {"modules": [{"name": f"{hostile}.layers.{i}.q", "singular_values": [1.0, 0.5]} for i in range(3)]}
    fig = handlers.spectrum_figure(fake)
    shown = [*fig.layout.xaxis.ticktext, *(t for trace in fig.data for t in trace.text)]
    assert not any("<img" in s for s in shown) and all("&lt;img" in s for s in shown)


def test_compare_without_a_shared_module_has_no_plot(tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    from app import handlers

    tensors = _sd1_tensors()
    one = save(tmp_path / "files" / "one.safetensors", {k: v for k, v in tensors.items() if "down_blocks" in k})
    other = save(tmp_path / "files" / "other.safetensors", {k: v for k, v in tensors.items() if "up_blocks" in k})
    explorer = _explorer(tmp_path)
    try:
        ids = explorer.ingest([str(one), str(other)], progress=False).ids
        result = handlers.compare_loras(explorer, *ids)
    finally:
        explorer.close()
    assert "share no module of the same shape" in result.text and result.figure is None and len(result.table) == 0
    assert result.data["reason"] == "no shared module" and result.data["first"]["base_family"] == "sd1"
    assert result.first_card.startswith("### one") and result.second_card.startswith("### other")
