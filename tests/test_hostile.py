"""The reader's error contract on hostile input, and its work budget.

Every input of :mod:`hostile` (each one crashed, hung or was accepted at great cost before) is refused with a
:class:`LoraFormatError` that names the file and the problem, or read with a warning where reading it is right; the
CLI answers exit 2 and one ``error:`` line. Budgets are asserted as counts (modules, patterns × modules, bytes);
the times are in ``benchmarks/bench_hostile.py``.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from hostile import Case, cases, write_raw
from lora_files import peft, save, write_config

from lol_engine import LoraFormatError, ReadLimits, load_lora
from lol_engine.cli import main
from lol_engine.lora import config as config_module
from lol_engine.report import describe

Q = "base_model.model.model.layers.0.self_attn.q_proj"
CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_refused_or_read(tmp_path: Path, case: Case) -> None:
    target = case.make(tmp_path)
    if not case.loads:
        with pytest.raises(LoraFormatError, match=case.expect) as info:
            load_lora(target)
        assert str(tmp_path) not in str(info.value)  # names the file, never the server's path
        assert len(str(info.value)) < 600
        return
    lora = load_lora(target)
    if case.expect:
        assert any(re.search(case.expect, w) for w in lora.meta.warnings), lora.meta.warnings
    json.dumps(describe(lora), allow_nan=False)  # what `lol inspect --json` prints must stay strict JSON


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_answers_hostile_input_with_one_error_line(
    tmp_path: Path, case: Case, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["inspect", str(case.make(tmp_path)), "--json"])
    out, err = capsys.readouterr()
    if case.loads:
        assert status == 0 and json.loads(out)["n_modules"] >= 1
    else:
        assert status == 2 and out == ""
        assert err.startswith("error: ") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ the work budget
def _modules(path: Path, n: int) -> Path:
    tensors = {}
    for i in range(n):
        tensors |= peft(f"base_model.model.model.layers.{i}.mlp.up_proj", rank=1, d_in=4, d_out=4, seed=i)
    return save(path, tensors)


def test_module_budget_is_a_count(tmp_path: Path) -> None:
    path = _modules(tmp_path / "x.safetensors", 11)
    assert len(load_lora(path, limits=ReadLimits(max_modules=11))) == 11
    with pytest.raises(LoraFormatError, match="11 modules, over the limit of 10"):
        load_lora(path, limits=ReadLimits(max_modules=10))


def test_pattern_budget_is_counted_before_any_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _modules(tmp_path / "adapter_model.safetensors", 10)
    patterns = {f"layers\\.{i}\\.mlp\\.up_proj": 1 for i in range(5)}
    write_config(tmp_path, r=1, lora_alpha=1, rank_pattern=patterns, alpha_pattern={"up_proj": 2})
    lookups = []
    real = config_module.PatternTable.lookup
    monkeypatch.setattr(config_module.PatternTable, "lookup", lambda self, m: lookups.append(m) or real(self, m))
    assert set(load_lora(tmp_path, limits=ReadLimits(max_pattern_pairs=60)).scales) == {2.0}  # 6 keys × 10 modules
    lookups.clear()
    with pytest.raises(LoraFormatError, match="60 regex matches, over the limit of 59"):
        load_lora(tmp_path, limits=ReadLimits(max_pattern_pairs=59))
    assert lookups == []  # refused before a single pattern was matched
    with pytest.raises(LoraFormatError, match="6 rank_pattern/alpha_pattern keys, over the limit of 5"):
        load_lora(tmp_path, limits=ReadLimits(max_patterns=5))


def test_byte_and_name_budgets(tmp_path: Path) -> None:
    path = save(tmp_path / "x.safetensors", peft(Q))
    with pytest.raises(LoraFormatError, match="over the limit of 100"):
        load_lora(path, limits=ReadLimits(max_file_bytes=100))
    with pytest.raises(LoraFormatError, match=r"a tensor name of 62 characters .* over the limit of 61"):
        load_lora(path, limits=ReadLimits(max_name_chars=61))
    factors = {f"{Q}.lora_A.weight": np.ones((1, 4)), f"{Q}.lora_B.weight": np.ones((4, 1))}
    nested = write_raw(tmp_path / "m.safetensors", '"__metadata__":{"lora_adapter_metadata":"[[1]]"}', factors)
    with pytest.raises(LoraFormatError, match="nested more than 1 levels deep"):
        load_lora(nested, limits=ReadLimits(max_json_depth=1))


def test_factor_value_and_spectrum_budgets_are_counts(tmp_path: Path) -> None:
    path = save(tmp_path / "x.safetensors", peft(Q, rank=4, d_in=16, d_out=12))  # r(d_in + d_out) = 112, r²(…) = 448
    assert len(load_lora(path, limits=ReadLimits(max_factor_values=112, max_spectrum_work=448))) == 1
    with pytest.raises(LoraFormatError, match=r"expand to 112 values .* over the limit of 111"):
        load_lora(path, limits=ReadLimits(max_factor_values=111))
    with pytest.raises(LoraFormatError, match=r"cost 448 operations .* over the limit of 447"):
        load_lora(path, limits=ReadLimits(max_spectrum_work=447))


def test_cpu_budget_refuses_once_spent(tmp_path: Path) -> None:
    path = save(tmp_path / "x.safetensors", peft(Q))
    with pytest.raises(LoraFormatError, match=r"s of CPU \(.*\), over the budget of 1e-09 s"):
        load_lora(path, limits=ReadLimits(max_cpu_seconds=1e-9))


def test_harmless_pattern_is_never_refused_under_concurrent_load(tmp_path: Path) -> None:
    """The old per-match wall-clock timeout refused ``zz1949(x|y)*w`` under 4 concurrent requests; RE2 needs none."""
    _modules(tmp_path / "adapter_model.safetensors", 50)
    write_config(tmp_path, r=1, lora_alpha=3, rank_pattern={f"zz{i}(x|y)*w": 2 for i in range(2000)})
    results: list[object] = []

    def read() -> None:
        try:
            results.append(set(load_lora(tmp_path).scales))
        except LoraFormatError as exc:
            results.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [{3.0}] * 4


# --------------------------------------------------------------------------- pattern semantics, checked against PEFT
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PARTS = ["model", "layers", "0", "1", "12", "self_attn", "q_proj", "v_proj", "mlp", "down_proj", "lora"]
_NAMES = st.lists(st.sampled_from(_PARTS), min_size=1, max_size=5).map(".".join)
_PATTERN_BITS = st.sampled_from(
    [
        "q_proj",
        "v_proj",
        r"\.",
        ".",
        ".*",
        r"\d+",
        "layers",
        "(q|v)_proj",
        "[0-9]",
        "mlp",
        "_",
        "proj",
        "+",
        "?",
        "self_attn",
        "(",
        ")",
        "|",
    ]
)
_PATTERNS = st.lists(_PATTERN_BITS, min_size=1, max_size=6).map("".join)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    patterns=st.lists(_PATTERNS, min_size=1, max_size=8, unique=True), names=st.lists(_NAMES, min_size=1, max_size=6)
)
def test_pattern_table_matches_peft(patterns: list[str], names: list[str]) -> None:
    """First match wins, as ``peft.utils.other.get_pattern_key`` decides it (Python ``re``)."""
    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key
    valid = []
    for p in patterns:
        try:
            re.compile(p)
            valid.append(p)
        except re.error:
            pass
    try:
        table = config_module.PatternTable.parse(
            {p: i + 1 for i, p in enumerate(valid)}, "rank_pattern", "cfg", ReadLimits()
        )
    except LoraFormatError:
        return  # a key only Python's re accepts (none of these bits builds one, but the contract allows it)
    for name in names:
        key = get_pattern_key(valid, name)
        expected = valid.index(key) + 1 if key in valid else None
        assert table.lookup(name) == expected, (valid, name)


# ------------------------------------------------------------------------------------------------------ in the app
@pytest.fixture(scope="module")
def app_explorer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """An empty collection with the shipped predictors: what an upload meets in the app."""
    pytest.importorskip("duckdb")
    pytest.importorskip("plotly")
    from lol_engine.explorer import Explorer

    explorer = Explorer.open(tmp_path_factory.mktemp("app") / "lol.duckdb")
    yield explorer
    explorer.close()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_app_answers_hostile_uploads_in_one_plain_line_and_stores_nothing(
    tmp_path: Path, case: Case, app_explorer
) -> None:  # type: ignore[no-untyped-def]
    from app import handlers

    target = case.make(tmp_path)
    files = sorted(str(p) for p in (target.iterdir() if target.is_dir() else [target]))
    stored = app_explorer.store.count()
    if case.loads:
        assert handlers.analyse_upload(app_explorer, files).card
        return
    for action in (handlers.analyse_upload, handlers.add_upload):
        with pytest.raises(LoraFormatError) as info:
            action(app_explorer, files)
        shown = handlers.public_message(str(info.value))  # what the page and the API show
        assert re.search(case.expect, shown) and "\n" not in shown and "\\" not in shown
        assert str(tmp_path) not in shown
    assert app_explorer.store.count() == stored
    assert not app_explorer.uploads_dir.exists() or not any(app_explorer.uploads_dir.iterdir())
