"""App handlers called directly (no gradio): uploads, predictions, maps, cards, tables, exports, compare, escaping."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from collection import SHIPPED, TOY_SHIPPED, ZOOS
from lora_files import kohya, peft, save, write_config

pytest.importorskip("duckdb")
pytest.importorskip("plotly")

from app import handlers
from app.handlers import MODULE_COLUMNS, Filters, inspect_upload
from lol_engine.encoders import FINGERPRINT
from lol_engine.errors import BadRequestError, LolError, LoraFormatError, NotFoundError
from lol_engine.estimate import Estimate
from lol_engine.explorer import Explorer
from lol_engine.glossary import glossary_of
from lol_engine.lora.parse import load_lora
from lol_engine.zoo.datasets import FASHION_CLASSES

DIGIT = ZOOS / "digits" / "loras" / "00011"
FASHION = ZOOS / "fashion-gen" / "loras" / "00005"
HOSTILE = '<img src=x onerror="alert(1)">`**[x](javascript:alert(1))**'

STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.fixture
def upload(tmp_path: Path) -> Path:
    return save(tmp_path / "upload.safetensors", kohya(STEM, rank=4, d_in=768, d_out=320, alpha=1.0))


def test_inspect_upload(upload: Path) -> None:
    result = inspect_upload([str(upload)])
    assert "format** `kohya`" in result.summary and "base** `sd1`" in result.summary
    assert len(result.rows) == 1 and len(result.rows[0]) == len(MODULE_COLUMNS)
    assert result.rows[0][0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert result.rows[0][4] == 0.25  # scale = alpha / r
    assert result.report["n_modules"] == 1


def test_inspect_upload_with_adapter_config(tmp_path: Path) -> None:
    file = save(tmp_path / "a" / "adapter_model.safetensors", peft("base_model.model.model.layers.0.self_attn.q_proj"))
    config = write_config(tmp_path, r=4, lora_alpha=12)  # uploaded separately, not next to the file
    result = inspect_upload([str(file), str(config)])
    assert result.report["modules"][0]["scale"] == 3.0


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "no file uploaded"),
        (["x.pt"], "only .safetensors files and adapter_config.json"),
        (["a.safetensors", "b.safetensors"], "exactly one .safetensors"),
        (["a.json", "b.json", "c.safetensors"], "at most one adapter_config.json"),
    ],
)
def test_inspect_upload_refuses_bad_selections(tmp_path: Path, names: list[str], message: str) -> None:
    paths = []
    for name in names:
        (tmp_path / name).write_bytes(b"{}")
        paths.append(str(tmp_path / name))
    with pytest.raises(BadRequestError, match=message):  # the request is wrong, not a file
        inspect_upload(paths)


def test_inspect_upload_refuses_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(LoraFormatError, match="pickle"):
        inspect_upload(str(path))


def test_analyse_upload_predicts_with_calibrated_ranges(collection: Explorer) -> None:
    before = collection.count()
    result = handlers.analyse_upload(
        collection, [str(FASHION / "adapter_model.safetensors"), str(FASHION / "adapter_config.json")]
    )
    assert collection.count() == before  # analysing stores nothing
    frame = result.predictions
    assert list(frame.columns) == handlers.PREDICTION_COLUMNS
    assert set(frame["predictor"]) == {"fashion-gen-bold", "fashion-gen-class", "fashion-gen-quality"}
    rows = {row["predictor"]: row for _, row in frame.iterrows()}
    lora = load_lora(FASHION)  # the same LoRA, predicted here by each predictor on its own
    est = {name: collection.predictors[name].predict(lora) for name in rows}

    quality, q = rows["fashion-gen-quality"], est["fashion-gen-quality"]
    clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731  (a share: 0 to 100 %)
    lo, hi = q.interval  # type: ignore[misc]
    assert quality["what it predicts"] == "Generation quality (judge score)"
    assert quality["prediction"] == f"{100 * clip(q.value):.3g} %"  # type: ignore[arg-type]
    assert quality["likely range (90 %)"] == f"{100 * clip(lo):.3g} – {100 * clip(hi):.3g} %"
    # hand-worked from config.json: test R² .820, gbt · spectra .700 on val (the best of the baselines), constant
    assert quality["held-out skill"] == (
        "test R² 0.82 · best simple baseline (gbt · spectra) 0.70 on val · constant −0.00 on val"
    )
    klass, c = rows["fashion-gen-class"], est["fashion-gen-class"]
    assert klass["prediction"] == f"{FASHION_CLASSES[int(c.value)]} ({100 * c.probabilities[c.value]:.3g} %)"  # type: ignore[index,arg-type]
    assert klass["likely range (90 %)"] == ", ".join(FASHION_CLASSES[int(k)] for k in c.sets["class"])  # type: ignore[index]
    bold, b = rows["fashion-gen-bold"], est["fashion-gen-bold"]
    p_bold = b.probabilities["bold"]
    shown = f"bold ({100 * p_bold:.3g} %)" if p_bold >= 0.5 else f"not bold ({100 * (1 - p_bold):.3g} %)"
    assert bold["what it predicts"] == "Bold: finetuned on heavily inked images" and bold["prediction"] == shown
    for name, row in rows.items():
        seen = collection.predictors[name].has_seen(lora)
        assert row["in its training set"] == ("yes — in-sample, optimistic" if seen else "no")
        assert est[name].out_of_domain is not None
        assert row["domain"].startswith("⚠️ far" if est[name].out_of_domain else "✅ near its training LoRAs")
    assert "fashion" in result.card and f"3 of {len(SHIPPED)} fit" in result.card
    assert "already in the collection" in result.card
    assert len(result.spectrum.data) == 4  # rank 4: σ1…σ4
    assert result.neighbours.iloc[0]["by"] == "ΔW cosine" and len(result.neighbours) == 10
    assert result.analysis.sha256 not in set(result.neighbours["id"])  # itself excluded


def test_analyse_upload_of_an_unknown_base(collection: Explorer, upload: Path) -> None:
    result = handlers.analyse_upload(collection, [str(upload)])
    assert len(result.predictions) == 0 and f"0 of {len(SHIPPED)} fit" in result.card
    assert len(result.neighbours) == 0 and "No comparable LoRA in this collection" in result.card  # not digits
    assert result.modules[0][0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def test_upload_names_and_metadata_are_escaped(collection: Explorer, tmp_path: Path) -> None:
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    file = save(tmp_path / "evil.safetensors", kohya(stem), metadata={"ss_output_name": HOSTILE, "ss_seed": "1"})
    named = tmp_path / f"{HOSTILE.replace('/', '_')}.safetensors"
    shutil.copyfile(file, named)
    card = handlers.analyse_upload(collection, [str(named)]).card
    assert "<img" not in card and "&lt;img" in card and "ss\\_output\\_name" in card
    assert "](javascript" not in card  # the link syntax is broken by escaping
    assert handlers.code("a`b<c>") == "`a'b<c>`"  # code spans: the renderer escapes HTML, backticks cannot close


@pytest.mark.parametrize(
    ("content", "name", "message", "kind"),
    [
        (pickle.dumps({"a": 1}), "x.safetensors", "pickle", LoraFormatError),
        (b"not a lora", "x.safetensors", "safetensors", LoraFormatError),
        (b"{}", "x.bin", "only .safetensors", BadRequestError),
    ],
)
def test_bad_uploads_are_refused_and_nothing_is_stored(
    collection: Explorer, tmp_path: Path, content: bytes, name: str, message: str, kind: type[LolError]
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    before = collection.count()
    with pytest.raises(kind, match=message):
        handlers.analyse_upload(collection, [str(path)])
    with pytest.raises(kind, match=message):
        handlers.add_upload(collection, [str(path)])
    assert collection.count() == before


def test_repo_ids_are_checked_and_offline_fetches_fail_cleanly(collection: Explorer) -> None:
    with pytest.raises(BadRequestError, match="not a Hugging Face repo id"):
        handlers.analyse_upload(collection, None, "../../etc/passwd")
    with pytest.raises(NotFoundError, match="could not fetch nobody/missing") as caught:
        handlers.analyse_upload(collection, None, "nobody/missing")  # HF_HUB_OFFLINE=1 and not cached
    assert "works offline (HF_HUB_OFFLINE) and the repo is not in its local cache" in str(caught.value)
    assert "LocalEntryNotFoundError" not in str(caught.value)  # a reason people read, not an exception's name
    with pytest.raises(BadRequestError, match="no file uploaded"):
        handlers.analyse_upload(collection, None, "")


def test_map_options(collection: Explorer) -> None:
    maps, columns, choices = handlers.map_options(collection)
    assert maps[0] == ("fingerprint (every LoRA, any base)", FINGERPRINT) and len(maps) == 1 + len(TOY_SHIPPED)
    assert {"zoo", "label:quality", "pred:fashion-gen-quality", "pred:digits-classes"} <= set(columns)
    assert choices["zoo"][:2] == ["digits", "fashion-gen"]


def test_lora_card_and_neighbours(collection: Explorer) -> None:
    lora_id = next(r["id"] for r in collection.records() if r["zoo"] == "digits")
    card, neighbours = handlers.lora_card(collection, lora_id)
    assert "labels:" in card and "predicted:" in card and lora_id in card
    assert len(neighbours) == 10 and lora_id not in set(neighbours["id"])
    _, by_map = handlers.lora_card(collection, lora_id, by="lol:digits-classes")
    assert len(by_map) == 10 and set(by_map["by"]) == {"lol:digits-classes cosine"}
    assert list(by_map["similarity"]) == sorted(by_map["similarity"], reverse=True)
    with pytest.raises(NotFoundError, match="no LoRA '<script>' in the collection"):
        handlers.lora_card(collection, "<script>")


def test_collection_table_and_exports(collection: Explorer, tmp_path: Path) -> None:
    shown = handlers.collection_frame(collection, Filters(collections=("fashion-gen",)))
    frame = handlers.collection_frame(collection, Filters(collections=("fashion-gen",)), for_people=False)
    assert len(frame) == len(shown) == 30 and frame.columns[0] == "name" and frame.columns[-1] == "id"
    assert "label:quality" in frame.columns and "pred:fashion-gen-quality" in frame.columns
    assert [handlers.column_title(c) for c in frame.columns] == list(shown.columns)  # names for people
    assert "quality (label)" in shown.columns and "collection" in shown.columns
    for raw, people in zip(frame["label:quality"], shown["quality (label)"], strict=True):
        assert people == float(f"{raw:.4g}") and abs(people - raw) <= 5e-4 * abs(raw)  # rounded for reading
    csv = handlers.export_frame(frame, "csv", tmp_path)
    parquet = handlers.export_frame(frame, "parquet", tmp_path, "collection")
    assert re.fullmatch(r"lol-fashion-gen-30loras-\d{8}-\d{4}\.csv", csv.name), csv.name  # its one collection
    assert re.fullmatch(r"lol-fashion-gen-30loras-\d{8}-\d{4}\.parquet", parquet.name), parquet.name
    assert csv.parent.parent == tmp_path and list(pd.read_csv(csv)["id"]) == list(frame["id"])
    assert pd.read_parquet(parquet)["label:quality"].tolist() == pytest.approx(frame["label:quality"].tolist())
    chosen = list(frame["id"][:3])
    assert list(handlers.collection_frame(collection, ids=chosen)["id"]) == chosen
    both = handlers.collection_frame(collection, for_people=False)  # two collections: named after the rows
    capped = handlers.collection_frame(collection, for_people=False, limit=7)  # a page gets the newest rows only
    assert list(capped["id"]) == list(both["id"][-7:]) and len(both) > 7
    picks = handlers.lora_choices(collection, limit=5)
    assert [v for _, v in picks] == list(both["id"][-5:]) and len(handlers.lora_choices(collection, None)) == len(both)
    named = handlers.export_frame(both, "csv", tmp_path, "collection").name
    assert named.startswith(f"lol-collection-{len(both)}loras-")
    assert handlers.export_frame(both.iloc[:5], "csv", tmp_path).name.startswith("lol-digits-5loras-")
    mixed = both.iloc[[0, -1]]
    assert handlers.export_frame(mixed, "csv", tmp_path).name.startswith("lol-selection-2loras-")
    with pytest.raises(BadRequestError, match="empty"):
        handlers.export_frame(frame.iloc[:0], "csv", tmp_path)
    with pytest.raises(BadRequestError, match="unknown export format"):
        handlers.export_frame(frame, "xlsx", tmp_path)


def test_compare_loras(collection: Explorer) -> None:
    options = handlers.lora_choices(collection)
    digits = [v for label, v in options if " · digits · " in label]
    result = handlers.compare_loras(collection, digits[0], digits[1])
    assert "ΔW cosine over 2 shared modules" in result.text and list(result.table["module"]) == ["fc1", "fc2"]
    assert result.figure is not None and len(result.figure.data) == 1
    assert list(result.figure.data[0].y) == pytest.approx(list(result.table["ΔW cosine"]), abs=1e-4)
    for card, lora_id in ((result.first_card, digits[0]), (result.second_card, digits[1])):  # both cards, in full
        assert card.startswith("### ") and lora_id in card and "**AutoV2**" in card
    data = result.data
    assert json.loads(json.dumps(data, allow_nan=False)) == data  # strict JSON for the API
    assert data["first"]["id"] == digits[0] and data["second"]["id"] == digits[1] and data["reason"] is None
    assert data["overall_cosine"] == pytest.approx(collection.compare(digits[0], digits[1])[0])
    assert [m["module"] for m in data["modules"]] == ["fc1", "fc2"]
    fashion = next(v for label, v in options if " · fashion-gen · " in label)
    across = handlers.compare_loras(collection, digits[0], fashion)  # a sentence, two cards, and no (empty) plot
    assert "LoRAs of different base models cannot be compared" in across.text
    assert across.figure is None and len(across.table) == 0
    assert across.data["reason"] == "different base models" and across.data["overall_cosine"] is None
    assert across.data["modules"] == [] and across.data["second"]["id"] == fashion
    assert fashion in across.second_card
    with pytest.raises(BadRequestError, match="pick two"):
        handlers.compare_loras(collection, digits[0], None)
    with pytest.raises(NotFoundError, match="no LoRA 'nope' in the collection"):
        handlers.compare_loras(collection, digits[0], "nope")


def test_build_demo_does_not_launch(collection: Explorer) -> None:
    gr = pytest.importorskip("gradio")
    from app.ui import build_demo

    before = collection.count()
    demo = build_demo(collection)
    assert isinstance(demo, gr.Blocks)
    assert not getattr(demo, "is_running", False)
    assert collection.count() == before


def test_inspect_summary_escapes_the_file_name(tmp_path: Path) -> None:
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    path = save(tmp_path / f"{HOSTILE.replace('/', '_')}.safetensors", kohya(stem))
    summary = inspect_upload([str(path)]).summary
    assert "<img" not in summary and "&lt;img" in summary


def test_events_show_user_errors_and_hide_bugs_behind_an_id(caplog: pytest.LogCaptureFixture) -> None:
    """One error tree: every LolError kind reaches the page as its message; anything else is logged with an id."""
    gr = pytest.importorskip("gradio")
    from app.ui import _guard
    from lol_engine.errors import StoreError

    def raising(exc: BaseException):
        @_guard
        def event() -> None:
            raise exc

        return event

    for exc in (
        LoraFormatError("/srv/app/x.safetensors: not a LoRA"),
        BadRequestError("pick two LoRAs to compare"),
        NotFoundError("no LoRA 'abc' in the collection"),
        StoreError("/srv/data/lol.duckdb: the write failed"),
    ):
        with pytest.raises(gr.Error) as info:
            raising(exc)()
        assert info.value.message == handlers.public_message(str(exc)) and "/srv" not in info.value.message
    assert str(NotFoundError("no LoRA 'abc'")) == "no LoRA 'abc'"  # a KeyError, printed without quotes
    for bug in (KeyError("fc1"), ValueError("shapes (3,) and (4,) not aligned"), RuntimeError("boom")):
        with caplog.at_level("ERROR", logger="app.ui"), pytest.raises(gr.Error) as info:
            raising(bug)()
        ref = info.value.message.rsplit("internal error ", 1)[-1].rstrip(")")
        assert len(ref) == 8 and str(bug) not in info.value.message  # no internals in the page...
        assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)  # ...but in the log, with its id
    with pytest.raises(gr.Error, match=r"No space left on device; internal error"):
        raising(OSError(28, "No space left on device", "/srv/data/lol.duckdb"))()


def test_a_hub_snapshot_is_read_like_any_folder(
    collection: Explorer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "0123abcd"
    (snapshot / "unet").mkdir(parents=True)
    digits = Path(__file__).parent.parent / "data" / "zoo" / "digits" / "loras" / "00005"
    shutil.copyfile(digits / "adapter_model.safetensors", snapshot / "unet" / "style.safetensors")
    monkeypatch.setattr("lol_engine.explorer.fetch_repo", lambda repo_id: snapshot)
    result = handlers.analyse_upload(collection, None, "someone/style")  # the one LoRA, found in a subfolder
    n_digits = sum(n.startswith("digits-") for n in SHIPPED)
    assert result.card.startswith("### someone/style") and len(result.predictions) == n_digits
    # the same bytes as a LoRA of the digits zoo's training split: every estimate says it is a memory
    assert set(result.predictions["in its training set"]) == {"yes — in-sample, optimistic"}
    shutil.copyfile(digits / "adapter_model.safetensors", snapshot / "unet" / "other.safetensors")
    with pytest.raises(LoraFormatError, match=r"^someone/style: folder has 2 \.safetensors files"):
        handlers.analyse_upload(collection, None, "someone/style")


def test_an_sd15_lora_gets_no_neighbour_from_another_base(collection: Explorer, tmp_path: Path) -> None:
    """A kohya SD 1.5 LoRA in a collection of digits and fashion LoRAs: no neighbour, and the card says why."""
    stems = [f"lora_unet_down_blocks_{b}_attentions_0_transformer_blocks_0_attn2_to_{p}" for b in (0, 1) for p in "kv"]
    tensors = {}
    for i, stem in enumerate(stems):
        tensors |= kohya(stem, rank=4, d_in=768, d_out=320, alpha=4.0, seed=i)
    path = save(tmp_path / "pixel-style.safetensors", tensors, {"ss_base_model_version": "sd_v1"})
    result = handlers.analyse_upload(collection, [str(path)])
    assert result.analysis.lora.meta.base_family == "sd1"
    assert len(result.neighbours) == 0 and "No comparable LoRA in this collection" in result.card
    assert "none is a `sd1` LoRA" in result.card and f"0 of {len(SHIPPED)} fit this LoRA" in result.card


def test_a_labels_table_labels_the_stored_loras(tmp_path: Path) -> None:
    from collection import mini_zoo

    explorer = Explorer.open(tmp_path / "data" / "lol.duckdb")
    try:
        explorer.start([mini_zoo(tmp_path / "zoos", "digits", 6)], progress=False)
        names = sorted(r["name"] for r in explorer.records())
        table = tmp_path / "scores.csv"
        table.write_text(
            "name,my_score,style\n"
            + "".join(f"{n},{i / 10},{'ab'[i % 2]}\n" for i, n in enumerate(names[:4]))
            + "<b>ghost</b>,1,a\n"
        )
        report = handlers.apply_labels(explorer, str(table), "name")
        assert "4 LoRA\\(s\\) labelled by name with my\\_score \\(numeric\\), style \\(categorical\\)" in report
        assert "matched no LoRA" in report and "<b>" not in report and "2 LoRA\\(s\\) have no row" in report
        frame = handlers.collection_frame(explorer, for_people=False).set_index("name")
        assert frame.loc[names[:4], "label:my_score"].tolist() == [0.0, 0.1, 0.2, 0.3]
        assert frame.loc[names[1], "label:style"] == "b" and pd.isna(frame.loc[names[5], "label:my_score"])
        with pytest.raises(BadRequestError, match="no labels table uploaded"):
            handlers.apply_labels(explorer, None)
        with pytest.raises(BadRequestError, match="no key column 'sha256'"):
            handlers.apply_labels(explorer, str(table), "sha256")
    finally:
        explorer.close()


def test_neighbours_show_the_relation_the_explorer_found() -> None:
    from lol_engine.explorer import Neighbour
    from lol_engine.relations import Relation

    merge = Relation("merge", ("id1", "id2"), ("*x*", "y"), (0.6, 0.4), 1e-9, 1e-3)
    found = [
        Neighbour("id1", "*x*", None, 0.83, "ΔW cosine", "sd1", merge),
        Neighbour("id2", "y", "zoo", 0.55, "ΔW cosine", "sd1", merge),
        Neighbour("id3", "z", "zoo", 0.2, "ΔW cosine", "sd1"),
    ]
    frame = handlers.neighbours_frame(found)
    assert list(frame.columns) == handlers.NEIGHBOUR_COLUMNS
    assert list(frame["relation"]) == ["≈ 0.6·*x* + 0.4·y", "≈ 0.6·*x* + 0.4·y", ""]
    assert handlers.relations_note(found) == "\n\n**Near-duplicate of the collection:** ≈ 0\\.6·\\*x\\* \\+ 0\\.4·y"
    assert handlers.relations_note(found[2:]) == ""


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("GatedRepoError", "the repo is gated"),
        ("RepositoryNotFoundError", "no such repo on the Hub, or it is private"),
        ("LocalEntryNotFoundError", "not in its local cache"),
    ],
)
def test_a_failed_hub_fetch_says_why_in_words(monkeypatch: pytest.MonkeyPatch, error: str, reason: str) -> None:
    import huggingface_hub
    import huggingface_hub.errors

    from lol_engine.hub import fetch_repo

    cls = getattr(huggingface_hub.errors, error)
    raised = cls.__new__(cls)  # as the Hub client raises it, without a real HTTP response to build it from
    Exception.__init__(raised, "https://huggingface.co/api/models/owner/name failed at /srv/cache")

    def fail(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(NotFoundError) as caught:
        fetch_repo("owner/name")
    assert reason in str(caught.value) and error not in str(caught.value) and "/srv" not in str(caught.value)


def test_predictions_frame_in_words_hand_worked() -> None:
    """Each kind of estimate against strings worked out by hand from its glossary."""
    share = {"title": "Recall", "meaning": "A share.", "percent": True, "bounds": [0.0, 1.0]}
    loss = {"title": "Loss", "meaning": "Nats.", "unit": "nats", "bounds": [0.0, None]}
    bold = {"title": "Bold", "meaning": "Ink.", "classes": ["not bold", "bold"]}
    digits = {"title": "Digits", "meaning": "Which.", "classes": ["digit 0", "digit 1", "digit 2"]}
    recorded = {"result": {"test": {"r2": 0.5}}, "domain": {"threshold": 2.0, "k": 5}}
    glossaries = {
        "share": glossary_of("share", "r", "regression", ("r",), {**recorded, "target": share}),
        "loss": glossary_of("loss", "l", "regression", ("l",), {"target": loss}),
        "bold": glossary_of("bold", "bold", "binary", ("bold",), {"target": bold}),
        "digits": glossary_of("digits", "d", "multilabel", ("d[0]", "d[1]", "d[2]"), {"target": digits}),
    }
    estimates = [
        Estimate(
            "share",
            "r",
            "regression",
            1.0234,
            interval=(0.93, 1.12),
            coverage=0.9,
            domain_distance=5.0,
            out_of_domain=True,
        ),
        Estimate("loss", "l", "regression", 0.123456, interval=(-0.1, 0.35), coverage=0.8, in_sample=True),
        Estimate(
            "bold",
            "bold",
            "binary",
            "0",
            {"bold": 0.1},
            sets={"bold": ("0", "1")},
            coverage=0.9,
            domain_distance=0.5,
            out_of_domain=False,
        ),
        Estimate(
            "digits",
            "d",
            "multilabel",
            ("d[0]", "d[2]"),
            {"d[0]": 0.9, "d[1]": 0.2, "d[2]": 0.6},
            sets={"d[0]": ("1",), "d[1]": ("0", "1"), "d[2]": ("1", "0")},
            coverage=0.9,
        ),
        Estimate("raw", "class", "categorical", "7", {"7": 0.75, "3": 0.25}, sets={"class": ()}, coverage=0.9),
    ]
    frame = handlers.predictions_frame(estimates, glossaries)
    rows = frame.to_dict("records")
    assert [r["what it predicts"] for r in rows] == ["Recall", "Loss", "Bold", "Digits", "class"]
    assert [r["prediction"] for r in rows] == [
        "100 %",
        "0.123 nats",
        "not bold (90 %)",
        "digit 0, digit 2",
        "7 (75 %)",
    ]
    assert [r["likely range (90 %)"] for r in rows] == [
        "93 – 100 %",  # clipped to the label's bounds
        "0 – 0.35 nats (80 %)",  # another coverage is said
        "not bold or bold",
        "1 surely yes · 0 surely no · 2 unsure",
        "none (∅)",
    ]
    assert [r["in its training set"] for r in rows] == ["no", "yes — in-sample, optimistic", "no", "no", "no"]
    assert rows[0]["domain"] == "⚠️ far from its training LoRAs (2.5× its limit)"  # 5.0 / 2.0
    assert rows[2]["domain"] == "✅ near its training LoRAs" and rows[1]["domain"] == "unknown (no reference)"
    assert rows[0]["held-out skill"] == "test R² 0.50" and rows[4]["held-out skill"] == ""
    assert handlers.predictions_frame([], glossaries).columns.tolist() == handlers.PREDICTION_COLUMNS


def test_glossary_for_the_app_is_json_and_escapes_a_users_words(collection: Explorer) -> None:
    import json

    entries = handlers.predictor_glossary(collection)
    assert [e["predictor"] for e in entries] == sorted(collection.predictors)
    assert json.loads(json.dumps(entries, allow_nan=False)) == entries
    quality = next(e for e in entries if e["predictor"] == "fashion-gen-quality")
    assert quality["title"] == "Generation quality (judge score)" and quality["n_train"] == 717
    text = handlers.glossary_markdown(entries)
    assert "Retrieval recall@10 on the WordNet gloss → lemma probe" in text and "Ankle boot" in text
    hostile = {
        "zoo": None,
        "provenance": {"collection": "/srv/x/lol.duckdb", "collection_filter": HOSTILE, "base_family": HOSTILE},
        "baselines": {"mean r2": 0.0},
    }
    users = glossary_of(HOSTILE, HOSTILE, "categorical", (HOSTILE, "b"), hostile).to_json()
    shown = handlers.glossary_markdown([users])
    unescaped = shown.replace("\\`", "")  # escaped backticks are text
    outside_code = re.sub(r"`[^`]*`", "", unescaped)  # a code span shows its text as it is: markup there is inert
    assert unescaped.count("`") % 2 == 0 and "<img" not in outside_code and "](javascript" not in outside_code
    assert "/srv" not in shown
    assert "what it means is yours" in shown
