"""Training, evaluating and saving LoL predictors on zoos."""

from lol_engine.train.checkpoint import Predictor, load_predictor, save_predictor
from lol_engine.train.loop import LoadedZoo, TrainConfig, evaluate, fit, load_zoo, train_on_zoo
from lol_engine.train.tasks import Task, infer_task, metrics

__all__ = [
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
    "save_predictor",
    "train_on_zoo",
]
