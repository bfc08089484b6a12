"""Training, evaluating and saving LoL predictors on zoos."""

from lol_engine.glossary import Glossary, LabelDescription
from lol_engine.train.checkpoint import Predictor, load_predictor, save_predictor
from lol_engine.train.domain import DomainReference, reference_folder
from lol_engine.train.loop import LoadedZoo, TrainConfig, evaluate, fit, load_zoo, train_on_zoo
from lol_engine.train.tasks import Task, infer_task, metrics

__all__ = [
    "DomainReference",
    "Glossary",
    "LabelDescription",
    "LoadedZoo",
    "Predictor",
    "Task",
    "TrainConfig",
    "evaluate",
    "fit",
    "infer_task",
    "load_predictor",
    "load_zoo",
    "metrics",
    "reference_folder",
    "save_predictor",
    "train_on_zoo",
]
