"""Predictor glossaries: every label a shipped zoo makes is described once, on its recipe; shipped folders carry that
description; scores and baselines are those the folder records (read here independently); a user's label says
its meaning is the user's; numbers are formatted as the description says."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from collection import SHIPPED, ZOOS

from lol_engine import load_lora
from lol_engine.encoders import load_predictors
from lol_engine.glossary import LabelDescription, glossary_of, significant
from lol_engine.zoo import read_manifest
from lol_engine.zoo.datasets import FASHION_CLASSES
from lol_engine.zoo.registry import recipe_class

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_ZOOS = ("digits", "fashion-gen", "minilm-wordnet", "mobilenet-fashion")


@pytest.fixture(scope="module")
def predictors() -> dict:
    found = load_predictors()
    assert set(found) == SHIPPED
    return found


@pytest.mark.parametrize("zoo", SHIPPED_ZOOS)
def test_every_label_of_a_shipped_zoo_is_described_by_its_recipe(zoo: str) -> None:
    rows = read_manifest(ZOOS / zoo)
    labels = {k.removeprefix("y_") for k in rows[0] if k.startswith("y_")}
    recipe = recipe_class(rows[0]["recipe"])
    assert recipe is not None and labels <= set(recipe.label_descriptions), labels - set(recipe.label_descriptions)
    for label, description in recipe.label_descriptions.items():
        assert description.title and description.meaning.endswith("."), label
        value = rows[0].get(f"y_{label}")
        if isinstance(value, list):  # one name per entry of a multi-entry label
            assert len(description.classes) == len(value), label
    # the family the recipe names is the one its LoRAs record
    assert load_lora(ZOOS / zoo / rows[0]["path"]).meta.base_family == recipe.base_family


def test_shipped_folders_carry_their_recipes_descriptions(predictors: dict) -> None:
    for name, predictor in predictors.items():
        config = predictor.config
        recipe = recipe_class(config["recipe"])
        assert recipe is not None and config["zoo"] == f"data/zoo/{recipe.name}", name
        description = recipe.label_descriptions[predictor.task.label]
        assert config["target"] == description.to_json(), f"{name}: rerun `lol predictors reference`"
        glossary = predictor.glossary
        assert glossary.description == description and glossary.title == description.title
        if predictor.task.kind in ("categorical", "multilabel"):
            assert len(description.classes) == predictor.task.out_dim, name
        if predictor.task.kind == "binary":
            assert len(description.classes) == 2, name


def test_a_folder_without_a_copy_reads_the_recipe(predictors: dict) -> None:
    predictor = predictors["fashion-gen-class"]
    config = {k: v for k, v in copy.deepcopy(predictor.config).items() if k not in ("target", "recipe")}
    task = predictor.task
    old = glossary_of("old", task.label, task.kind, task.names, config)  # the recipe named by the zoo folder
    assert old.description == recipe_class("fashion-gen").label_descriptions["class"]  # type: ignore[union-attr]
    assert [old.class_name(str(k)) for k in range(10)] == list(FASHION_CLASSES)  # class 9 is an ankle boot
    unknown = glossary_of("x", "mystery", "regression", ("mystery",), {"zoo": "somewhere/else"})
    assert unknown.title == "mystery" and "No description" in unknown.description.meaning
    assert (unknown.skill, unknown.baseline, unknown.constant, unknown.n_train) == (None, None, None, None)


def test_toy_skill_baseline_and_constant_are_the_recorded_ones(predictors: dict) -> None:
    config = json.loads((ROOT / "lol_engine" / "predictors" / "fashion-gen-class" / "config.json").read_text())
    selection = config["selection"]
    learned = {k: v for k, v in selection["baselines"].items() if k != "constant"}
    best = sorted(learned.items(), key=lambda kv: -kv[1])[0]  # chosen on validation
    g = predictors["fashion-gen-class"].glossary
    assert (g.skill.metric, g.skill.value, g.skill.split) == ("accuracy", config["result"]["test"]["accuracy"], "test")
    assert (g.baseline.who, g.baseline.value, g.baseline.split) == (best[0], best[1], "val")
    assert (g.constant.value, g.constant.split) == (selection["baselines"]["constant"], "val")
    assert g.n_train == sum(r["split"] == "train" for r in read_manifest(ZOOS / "fashion-gen"))
    assert g.coverage == config["calibration"]["coverage"]
    assert g.held_out_coverage == config["calibration"]["test_coverage"]
    # hand-worked: test accuracy .7755, gbt · spectra .3365 on val, constant .0769 on val
    assert g.skill_text() == (
        "test accuracy 77.6 % · best simple baseline (gbt · spectra) 33.7 % on val · constant 7.69 % on val"
    )


def test_real_base_skill_is_beside_the_test_score_of_the_baseline_chosen_on_val(predictors: dict) -> None:
    config = json.loads((ROOT / "lol_engine" / "predictors" / "minilm-wordnet-probe_r10" / "config.json").read_text())
    g = predictors["minilm-wordnet-probe_r10"].glossary
    assert (g.skill.metric, g.skill.value) == ("r2", config["result"]["test"]["r2"])
    assert (g.baseline.who, g.baseline.value, g.baseline.split) == (
        config["selection"]["best_baseline"],
        config["selection"]["best_baseline_test"],
        "test",
    )
    assert (g.constant.value, g.constant.split) == (config["selection"]["constant_val"], "val")
    assert (g.base_name, g.base_family) == (config["base"]["name"], config["base"]["family"])
    assert g.title == "Retrieval recall@10 on the WordNet gloss → lemma probe" and g.description.percent
    assert g.skill_text().startswith("test R² 0.56 · best simple baseline (linear · spectra) 0.52 on test")


def test_a_users_label_says_its_meaning_is_the_users() -> None:
    config = {
        "zoo": None,
        "result": {"val": {"accuracy": 0.5}, "test": {"accuracy": 0.75, "auc": 0.8}},
        "baselines": {"majority accuracy": 0.5, "logistic on fingerprint accuracy": 0.625},
        "provenance": {"collection": "/srv/data/lol.duckdb", "label": "style", "base_family": "sd1"},
        "calibration": {"coverage": 0.9, "split": "val", "test_coverage": 0.8},
    }
    g = glossary_of("style-svd", "style", "categorical", ("anime", "photo"), config)
    assert g.users_label and "yours" in g.description.meaning and "style" in g.title
    assert (g.zoo, g.base_family, g.base_name) == ("your collection", "sd1", None)
    assert g.description.classes == ("anime", "photo") and g.class_name("photo") == "photo"
    assert (g.skill.metric, g.skill.value) == ("accuracy", 0.75)  # the metric its baselines were scored by
    assert (g.baseline.who, g.baseline.value, g.baseline.split) == ("logistic on fingerprint", 0.625, "test")
    assert (g.constant.who, g.constant.value) == ("constant (majority)", 0.5)
    assert "/srv" not in json.dumps(g.to_json())  # no server path
    assert g.to_json()["n_train"] is None and g.calibration_split == "val"


@pytest.mark.parametrize(
    ("value", "digits", "shown"),
    [
        (0.10000000149011612, 3, "0.1"),
        (123456.0, 3, "123000"),
        (-2.0004, 3, "-2"),
        (0.000123456, 3, "0.000123"),
        (1.5e-7, 3, "1.50e-07"),
        (math.inf, 3, "∞"),
        (999.6, 3, "1000"),
    ],
)
def test_significant_digits(value: float, digits: int, shown: str) -> None:
    assert significant(value, digits) == shown


def test_label_description_formats_and_round_trips() -> None:
    share = LabelDescription("Recall", "A share.", percent=True, bounds=(0.0, 1.0))
    assert (share.format(0.6953125), share.format(-0.2), share.format_range(-0.1, 0.25)) == (
        "69.5 %",
        "0 %",
        "0 – 25 %",
    )
    loss = LabelDescription("Loss", "Nats.", unit="nats", bounds=(0.0, None), classes=())
    assert (loss.format(1.23456), loss.format_range(-1.0, 2.0), loss.range_text()) == (
        "1.23 nats",
        "0 – 2 nats",
        "≥ 0 nats",
    )
    for d in (share, loss, LabelDescription("Kind", "Two.", classes=("no", "yes"))):
        assert LabelDescription.from_json(json.loads(json.dumps(d.to_json()))) == d
