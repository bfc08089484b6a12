"""The Explore tab's map as data (app/map_view.py): colours, missing values, search in context, compact payloads."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("duckdb")
pytest.importorskip("plotly")

from app.handlers import Filters
from app.map_view import (
    MAX_CATEGORIES,
    MISSING_GREY,
    PALETTE,
    _colour,
    _packed,
    colour_options,
    column_title,
    map_view,
    shipped_ids,
)
from lol_engine.encoders import FINGERPRINT
from lol_engine.explorer import Explorer


def _points(fig: object, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """``{trace name: LoRA ids}`` through ``layout.meta.ids``, the way the page's script reads clicks."""
    ids = shipped_ids(fig.layout.meta)  # type: ignore[attr-defined]
    return {
        t.name: np.array([ids[int(i)] for i in t.customdata])
        for t in fig.data  # type: ignore[attr-defined]
        if t.type == "scattergl" and (names is None or t.name in names)
    }


def _base(fig: object) -> list[object]:
    return [
        t for t in fig.data if t.type == "scattergl" and t.name not in ("search matches", "clicked", "lasso selection")
    ]  # type: ignore[attr-defined]


def test_every_point_once_with_its_stored_coordinates(collection: Explorer) -> None:
    view = map_view(collection, FINGERPRINT, "zoo")
    ids, xy = collection.map_points(FINGERPRINT)
    assert view.shown == len(ids) and view.matches == 0
    at = {lora_id: k for k, lora_id in enumerate(ids)}
    seen = []
    for trace in _base(view.figure):
        for i, x, y in zip(trace.customdata, trace.x, trace.y, strict=True):
            seen.append(ids[int(i)])
            assert np.allclose([x, y], xy[at[ids[int(i)]]], atol=1e-5)  # float32 on the wire
    assert sorted(seen) == sorted(ids)
    zoos = Counter(r["zoo"] for r in collection.records() if r["id"] in at)
    assert sorted(t.name for t in _base(view.figure)) == sorted(f"{z} ({n:,})" for z, n in zoos.items())
    assert [t.marker.color for t in _base(view.figure)] == list(PALETTE[: len(zoos)])


def test_the_payload_is_compact(collection: Explorer) -> None:
    """Coordinates and point indices as typed arrays; each 64-letter id once, packed into ``layout.meta``."""
    text = view_json = map_view(collection, FINGERPRINT, "zoo").figure.to_json()
    payload = json.loads(view_json)
    first = payload["data"][0]
    assert first["x"]["dtype"] == "f4" and first["customdata"]["dtype"] == "i4" and first["type"] == "scattergl"
    ids, _ = collection.map_points(FINGERPRINT)
    assert sorted(shipped_ids(payload["layout"]["meta"])) == sorted(ids) and "ids" not in payload["layout"]["meta"]
    assert text.count(ids[0]) == 0 and len(payload["layout"]["meta"]["id_hex"]) == 4 * math.ceil(32 * len(ids) / 3)
    odd = ["not-hex", "a" * 64]  # any other id: a plain list, in order
    assert _packed(odd) == {"ids": odd} and shipped_ids(_packed(odd)) == odd
    assert shipped_ids(_packed(["ab" * 32, "0f" * 32])) == ["ab" * 32, "0f" * 32]


def test_a_numeric_label_gets_a_scale_and_missing_values_are_grey_and_said(collection: Explorer) -> None:
    """``acc_all`` exists on the digits LoRAs only: they get one continuous scale, the fashion ones a grey trace."""
    view = map_view(collection, FINGERPRINT, "label:acc_all")
    records = {r["id"]: r for r in collection.records()}
    has = [i for i in collection.map_points(FINGERPRINT)[0] if records[i].get("label:acc_all") is not None]
    lacks = [i for i in collection.map_points(FINGERPRINT)[0] if records[i].get("label:acc_all") is None]
    scale, grey = _base(view.figure)
    assert scale.marker.showscale and scale.marker.colorscale and not scale.showlegend
    assert sorted(_points(view.figure, (scale.name,))[scale.name]) == sorted(has)
    by_id = dict(zip(_points(view.figure, (scale.name,))[scale.name], scale.marker.color, strict=True))
    assert all(abs(by_id[i] - records[i]["label:acc_all"]) < 1e-6 for i in has)
    assert grey.marker.color == MISSING_GREY and grey.name == f"no value ({len(lacks)})"
    assert f"{len(lacks)} without a value, in grey" in view.note and "in grey" in view.status("label:acc_all")
    assert "acc_all (label)" in view.status("label:acc_all")


def test_categories_beyond_the_palette_fold_into_other_and_say_so() -> None:
    values = [f"style {k % 20}" for k in range(200)] + [None] * 5  # 20 values of 10 LoRAs each
    names = [f"lora {k}" for k in range(len(values))]
    import plotly.graph_objects as go

    fig = go.Figure()
    note = _colour(
        fig,
        np.arange(len(values)),
        np.zeros((len(values), 2), np.float32),
        np.arange(len(values)),
        [{}] * len(values),
        values,
        names,
        "label:style",
        0.85,
    )
    traces = {t.name: len(t.customdata) for t in fig.data}
    named = [n for n in traces if n.startswith("style")]
    assert len(named) == MAX_CATEGORIES - 1 and all(traces[n] == 10 for n in named)
    assert traces["other: 9 values (90)"] == 90 and traces["no value (5)"] == 5
    assert "9 less common values shown as “other”" in note and "5 without a value" in note
    fig = go.Figure()
    zeros, at = np.zeros((3, 2), np.float32), np.arange(3)
    note = _colour(fig, at, zeros, at, [{}] * 3, [1, 1, 1], ["a", "b", "c"], "rank", 1.0)
    assert "every LoRA shown has the same rank: 1" in note


def test_colour_choices_are_those_that_vary_on_that_map(collection: Explorer) -> None:
    """The digits predictor's map offers digits labels only, never one every LoRA shares (a one-colour map)."""
    everything = dict((c, t) for t, c in colour_options(collection, FINGERPRINT))
    digits_map = dict((c, t) for t, c in colour_options(collection, "lol:digits-classes"))
    assert next(iter(everything)) == "zoo" and "label:quality" in everything and "label:acc_all" in everything
    assert "label:quality" not in digits_map and "label:acc_all" in digits_map
    assert "base_family" in everything and "base_family" not in digits_map  # one family there
    assert "label:peft.r" not in everything  # the same rank in both zoos
    assert everything["label:acc_all"] == "acc_all (label)" == column_title("label:acc_all")
    assert column_title("pred:digits-classes") == "digits-classes (predicted)" and column_title("zoo") == "collection"


def test_search_highlights_in_context_and_zooms_to_the_matches(collection: Explorer) -> None:
    ids, xy = collection.map_points(FINGERPRINT)
    records = {r["id"]: r for r in collection.records()}
    text = records[ids[5]]["name"][:4]
    expected = sorted(i for i in ids if text.lower() in records[i]["name"].lower() or i.startswith(text))
    view = map_view(collection, FINGERPRINT, "zoo", search=text)
    assert view.shown == len(ids) and view.matches == len(expected) > 0  # nothing filtered out: highlighted
    assert sorted(_points(view.figure, ("search matches",))["search matches"]) == expected
    assert all(t.marker.opacity < 0.5 for t in _base(view.figure))  # the rest dimmed
    assert view.figure.layout.xaxis.range is None
    zoomed = map_view(collection, FINGERPRINT, "zoo", search=text, zoom=True)
    (x0, x1), (y0, y1) = zoomed.figure.layout.xaxis.range, zoomed.figure.layout.yaxis.range
    at = [ids.index(i) for i in expected]
    assert (x0 <= xy[at, 0]).all() and (xy[at, 0] <= x1).all() and (y0 <= xy[at, 1]).all() and (xy[at, 1] <= y1).all()
    assert f"{len(expected)} matches" in zoomed.status("zoo", text)
    one = map_view(collection, FINGERPRINT, "zoo", search=ids[7][:12], zoom=True)  # an id prefix: one LoRA
    (x0, x1), (y0, y1) = one.figure.layout.xaxis.range, one.figure.layout.yaxis.range
    assert one.matches == 1 and x0 < xy[7, 0] < x1 and y0 < xy[7, 1] < y1
    assert x1 - x0 < 0.2 * np.ptp(xy[:, 0]) and y1 - y0 < 0.2 * np.ptp(xy[:, 1])  # zoomed in around it


def test_the_clicked_lora_is_ringed_and_filters_still_filter(collection: Explorer) -> None:
    ids, xy = collection.map_points(FINGERPRINT)
    view = map_view(collection, FINGERPRINT, "zoo", picked=ids[3], selected=ids[:4])
    clicked = next(t for t in view.figure.data if t.name == "clicked")
    assert np.allclose([clicked.x[0], clicked.y[0]], xy[3], atol=1e-5)
    assert sorted(_points(view.figure, ("lasso selection",))["lasso selection"]) == sorted(ids[:4])
    digits = map_view(collection, FINGERPRINT, "zoo", Filters(collections=("digits",)))
    n_digits = sum(r["zoo"] == "digits" for r in collection.records())
    assert digits.shown == n_digits and [t.name for t in _base(digits.figure)] == [f"digits ({n_digits})"]
    assert map_view(collection, FINGERPRINT, "zoo", Filters(search="zzz-not-a-name")).shown == len(ids)


def test_faceted_maps_say_so(collection: Explorer) -> None:
    fig = map_view(collection, FINGERPRINT, "zoo").figure
    assert "each base model on its own" in fig.layout.title.text
    assert sorted(a.text for a in fig.layout.annotations) == ["digits-mlp", "fashion-vae"]
    lol = map_view(collection, "lol:digits-classes", "zoo").figure
    assert not lol.layout.annotations and "each base model" not in lol.layout.title.text


def test_an_export_of_a_shown_table_has_full_precision_and_stored_names(collection: Explorer) -> None:
    """The page shows rounded numbers under names for people; what it exports is the stored rows, in its order."""
    import pandas as pd

    from app import handlers
    from app.ui import _export

    shown = handlers.collection_frame(collection, Filters(collections=("digits",)))
    shown = shown.iloc[[5, 1, 3]]  # sorted in the page
    out = pd.read_csv(_export(collection, shown, "csv"))
    stored = handlers.collection_frame(collection, for_people=False).set_index("id")
    assert list(out["id"]) == list(shown["id"]) and "label:acc_all" in out.columns
    assert out["label:acc_all"].tolist() == pytest.approx(
        stored.loc[list(shown["id"]), "label:acc_all"].tolist(), rel=1e-12
    )


class _BigMap:
    """The three things a map view asks of the explorer, for a synthetic map of ``n`` LoRAs in three clusters."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.ids = [f"{k:064x}" for k in rng.permutation(10 * n)[:n]]  # hex ids, as the store's sha256 ones
        centres = np.array([[-5.0, 0.0], [5.0, 0.0], [0.0, 8.0]])
        self.zoo = np.repeat(np.array(["a", "b", "c"]), [n // 2, n // 3, n - n // 2 - n // 3])
        self.xy = centres[np.searchsorted(["a", "b", "c"], self.zoo)] + rng.normal(size=(n, 2))

    def map_points(self, encoder: str) -> tuple[list[str], np.ndarray]:
        return self.ids, self.xy

    def records(self) -> list[dict[str, object]]:
        return [
            {"id": i, "name": f"lora {k}", "zoo": z, "base_family": "sd1", "format": "kohya", "rank": 4}
            for k, (i, z) in enumerate(zip(self.ids, self.zoo, strict=True))
        ]

    def map_tiles(self, encoder: str) -> dict[str, tuple[float, float, float, float]]:
        return {}


def test_a_map_beyond_the_cap_ships_a_sample_over_a_density_of_all() -> None:
    import zlib

    from app.map_view import MAX_POINTS

    big = _BigMap(300_000)
    outside = max(big.ids, key=lambda i: zlib.crc32(i.encode()))  # hashes highest: never in the plain sample
    view = map_view(big, "lol:x", "zoo", picked=outside, search="lora 299999")  # type: ignore[arg-type]
    assert (view.shown, view.total, view.matches) == (MAX_POINTS, 300_000, 1) and view.sampled
    assert view.status("zoo").startswith("showing 100,000 of 300,000 LoRAs (sampled); density shows all")
    payload = json.loads(view.figure.to_json())
    shipped = shipped_ids(payload["layout"]["meta"])
    assert len(shipped) == len(set(shipped)) <= MAX_POINTS
    base = _base(view.figure)
    assert sum(len(t.x) for t in base) == MAX_POINTS
    heat = [t for t in view.figure.data if t.type == "heatmap"]
    assert len(heat) == 1 and heat[0].z.sum() == 300_000  # the density counts every LoRA, not only the sample
    # the heatmap's densest cell sits on the biggest cluster's centre (-5, 0)
    row, column = np.unravel_index(np.argmax(heat[0].z), heat[0].z.shape)
    assert abs(heat[0].x[column] + 5) < 0.5 and abs(heat[0].y[row]) < 0.5
    # the sample: the clicked LoRA and the search match first, then the ids whose CRC-32 is lowest
    at = {lora_id: k for k, lora_id in enumerate(big.ids)}
    seen = np.concatenate(list(_points(view.figure, tuple(t.name for t in base)).values()))
    match = big.ids[299_999]
    lowest = sorted((i for i in big.ids if i not in (outside, match)), key=lambda i: zlib.crc32(i.encode()))
    assert set(seen) == {outside, match, *lowest[: MAX_POINTS - 2]}
    for trace in base[:1]:  # coordinates travel with the right ids
        rows = [at[shipped[int(i)]] for i in trace.customdata]
        np.testing.assert_allclose(np.c_[trace.x, trace.y], big.xy[rows], atol=1e-5)
    rings = _points(view.figure, ("clicked", "search matches"))
    assert list(rings["clicked"]) == [outside] and list(rings["search matches"]) == [match]
    # filters narrow what is sampled; a LoRA of the sample stays in it
    only_a = map_view(big, "lol:x", "zoo", Filters(collections=("a",)))  # type: ignore[arg-type]
    assert (only_a.shown, only_a.total) == (MAX_POINTS, 150_000)
    kept = set(np.concatenate(list(_points(only_a.figure).values())))
    assert {i for i in lowest[: MAX_POINTS - 2] if big.zoo[at[i]] == "a"} <= kept
    small = map_view(big, "lol:x", "zoo", Filters(collections=("c",)))  # type: ignore[arg-type]
    assert (small.shown, small.total) == (50_000, 50_000) and not small.sampled
    assert not [t for t in small.figure.data if t.type == "heatmap"] and "sampled" not in small.status("zoo")
