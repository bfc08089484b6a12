"""Predictors on disk: ``model.safetensors`` + ``config.json`` (model, spec, task, normalisation, scale choice)."""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lol_engine.errors import BadRequestError
from lol_engine.estimate import Estimate, Skill
from lol_engine.glossary import Glossary, glossary_of
from lol_engine.lora.weights import LoraWeights
from lol_engine.nn.batch import LoraBatch, ModuleSetBatch, SpecMismatchError, check_compatible
from lol_engine.nn.models import LoLModel, ModelConfig, build_model
from lol_engine.nn.module_tokens import ModuleTokenNet
from lol_engine.spec import LayerSpec, LoraSpec
from lol_engine.train.domain import REFERENCE, DomainReference, load_reference
from lol_engine.train.tasks import Task

if TYPE_CHECKING:
    from lol_engine.train.loop import LoadedZoo

__all__ = [
    "Predictor",
    "declared_base",
    "delta_digest",
    "load_predictor",
    "save_predictor",
    "seen_digests",
    "zoo_base",
]


def save_predictor(
    folder: str | Path,
    model: LoLModel,
    task: Task,
    model_name: str,
    fold_scale: bool,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint folder and return it."""
    from lol_engine.lora.safe_io import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}  # trained anywhere, saved for any
    write_safetensors(weights, folder / "model.safetensors")
    spec = [
        {
            "name": s.name,
            "d_out": s.d_out,
            "d_in": s.d_in,
            "rank": s.rank,
            "kind": s.kind,
            "orig_shape": list(s.orig_shape),
        }
        for s in model.spec.layers
    ]
    config = {
        "model": model_name,
        "model_config": model.config.to_dict(),
        "spec": spec,
        "task": task.to_dict(),
        "fold_scale": fold_scale,
        **({"vocabulary": model.vocabulary()} if isinstance(model, ModuleTokenNet) else {}),
        **(extra or {}),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@dataclass
class Predictor:
    """A trained model with its task: :meth:`predict` gives an :class:`~lol_engine.estimate.Estimate` per LoRA.

    ``name`` is its folder's name. ``config`` is its ``config.json``: the model, spec and task, the held-out
    ``result``, the ``calibration`` and ``seen``, the digests of the LoRAs it learned from (:meth:`has_seen`).
    ``reference``: its training LoRAs in its embedding (:mod:`lol_engine.train.domain`), which puts a domain
    distance and an out-of-domain flag on every estimate; None for a folder without one (both stay unknown).
    """

    model: LoLModel
    task: Task
    fold_scale: bool
    config: dict[str, Any]
    name: str = ""
    reference: DomainReference | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _seen: tuple[frozenset[str], frozenset[str]] | None = field(default=None, repr=False, compare=False)

    @property
    def _last_layer(self) -> torch.nn.Linear:
        """The head's final linear layer (every LoL model ends in ``_head``: … → ReLU → Dropout → Linear)."""
        head = self.model.head
        assert isinstance(head, torch.nn.Sequential) and isinstance(head[-1], torch.nn.Linear)
        return head[-1]

    @property
    def embedding_dim(self) -> int:
        """Length of :meth:`embed`'s vector: the width of the model's head before its last layer."""
        return int(self._last_layer.in_features)

    @property
    def skill(self) -> Skill | None:
        """The held-out score recorded when it was trained."""
        return Skill.from_result(self.config.get("result"))

    @cached_property
    def glossary(self) -> Glossary:
        """What it predicts in words, and what it knows (:mod:`lol_engine.glossary`)."""
        task = self.task
        return glossary_of(self.name, task.label, task.kind, task.names, self.config)

    def to(self, device: str | torch.device) -> Predictor:
        """Move the model to a device (a GPU, say); inputs follow it, outputs come back on the CPU."""
        self.model.to(device)
        return self

    def predict(self, lora: LoraWeights) -> Estimate:
        """The estimate for one LoRA; raises :class:`SpecMismatchError` naming modules that are missing or differ."""
        return self.predict_and_embed(lora)[0]

    def embed(self, lora: LoraWeights) -> torch.Tensor:
        """The encoder's embedding of one LoRA: the head's hidden features (after its ReLU), input to the last layer.

        It inherits the model's symmetry: GL(r)-invariant for GL(r)-invariant models.
        """
        return self.predict_and_embed(lora)[1]

    def predict_and_embed(self, lora: LoraWeights) -> tuple[Estimate, torch.Tensor]:
        """:meth:`predict` and :meth:`embed` from one forward pass."""
        return self.predict_and_embed_many([lora])[0]

    def fits(self, lora: LoraWeights) -> bool:
        """Whether ``lora`` has this predictor's modules (and rank, unless the model is rank-agnostic); for a model
        of module sets (``module_tokens``), whether it has at least one module the model can read."""
        try:
            self._check(lora)
        except SpecMismatchError:
            return False
        return True

    def module_coverage(self, lora: LoraWeights) -> tuple[list[str], list[str]]:
        """The names of ``lora``'s modules the predictor reads, and those it ignores (only a model of module sets
        ignores any: modules of a role, shape or block kind it never saw)."""
        if isinstance(self.model, ModuleTokenNet):
            return self.model.usable(lora.spec)
        return (list(lora.spec.names), []) if self.fits(lora) else ([], list(lora.spec.names))

    def _check(self, lora: LoraWeights) -> None:
        self._check_base(lora)
        if not isinstance(self.model, ModuleTokenNet):
            check_compatible(self.model.spec, lora.spec, same_rank=not self.model.rank_agnostic)
            return
        used, ignored = self.model.usable(lora.spec)
        if not used:
            raise SpecMismatchError(
                f"the LoRA does not fit this predictor: none of its {len(ignored)} module(s) has a role, shape and "
                f"block it learned from (first: {ignored[0] if ignored else 'no module'})"
            )

    def _check_base(self, lora: LoraWeights) -> None:
        """A predictor that records its base (``config["base"]``: the zoo's base model and family) does not apply to
        a LoRA of another family, nor to one whose files name another base model (a Hub id or model name; a local
        path says nothing and is not held against it). Same shapes are not enough: all-MiniLM-L12-v2 has
        all-MiniLM-L6-v2's module shapes, and a predictor of one knows nothing of the other's adapters."""
        base = self.config.get("base") or {}
        family, name = base.get("family"), base.get("name")
        if family and lora.meta.base_family not in ("unknown", family):
            raise SpecMismatchError(
                f"the LoRA does not fit this predictor: it is for {family} LoRAs ({name or 'its zoo base'}), "
                f"and the LoRA is a {lora.meta.base_family} LoRA"
            )
        declared = declared_base(lora)
        if name and declared and _model_key(declared) != _model_key(name):
            raise SpecMismatchError(
                f"the LoRA does not fit this predictor: it learned from LoRAs of {name}, and the LoRA names its base "
                f"model {declared}"
            )

    def has_seen(self, lora: LoraWeights) -> bool:
        """Whether ``lora`` was among the LoRAs this predictor learned from (training and early-stopping splits).

        True when its file's sha256 is recorded, or its exact ΔW is (:func:`delta_digest`: the same factors saved in
        another container or with other metadata). False for predictors that recorded nothing.
        """
        if self.has_seen_file(lora.meta.sha256):
            return True
        return bool(self._digests()[1]) and delta_digest(lora) in self._digests()[1]

    def has_seen_file(self, sha256: str) -> bool:
        """Whether a LoRA file with this sha256 was among the LoRAs this predictor learned from."""
        return bool(sha256) and sha256 in self._digests()[0]

    def _digests(self) -> tuple[frozenset[str], frozenset[str]]:
        if self._seen is None:
            seen = self.config.get("seen") or {}
            self._seen = (frozenset(seen.get("sha256", ())), frozenset(seen.get("delta", ())))
        return self._seen

    def predict_and_embed_many(self, loras: Sequence[LoraWeights]) -> list[tuple[Estimate, torch.Tensor]]:
        """:meth:`predict_and_embed` for many LoRAs in one batched forward (each must fit, else SpecMismatchError)."""
        from lol_engine.train.calibrate import estimate_from

        logits, hidden, pre_norm = self._forward(loras)
        decoded, reference = self.task.decode(logits), self.reference
        distances = [None] * len(loras) if reference is None else reference.distances(pre_norm.numpy()).tolist()
        return [
            (
                estimate_from(
                    self,
                    decoded[i],
                    in_sample=self.has_seen(lora),
                    domain_distance=distance,
                    out_of_domain=None if reference is None or distance is None else reference.out_of_domain(distance),
                ),
                hidden[i],
            )
            for i, (lora, distance) in enumerate(zip(loras, distances, strict=True))
        ]

    def embed_many(self, loras: Sequence[LoraWeights]) -> torch.Tensor:
        """:meth:`embed` for many LoRAs in one batched forward: ``(N, embedding_dim)``."""
        return self._forward(loras)[1]

    def domain_features_many(self, loras: Sequence[LoraWeights]) -> torch.Tensor:
        """What domain distances are measured on (:mod:`lol_engine.train.domain`): the head's hidden layer *before*
        its LayerNorm, ``(N, embedding_dim)``. :meth:`embed` reads the same layer after LayerNorm and ReLU, which
        normalise away how strong a LoRA is (factors ×100 land among the training LoRAs); this keeps it. The same
        symmetry as :meth:`embed`: a linear map of the model's invariant features."""
        return self._forward(loras)[2]

    @property
    def _first_layer(self) -> torch.nn.Linear:
        """The head's first linear layer (Linear → LayerNorm → ReLU → Dropout → Linear)."""
        head = self.model.head
        assert isinstance(head, torch.nn.Sequential) and isinstance(head[0], torch.nn.Linear)
        return head[0]

    @torch.no_grad()
    def _forward(self, loras: Sequence[LoraWeights]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's outputs, the head's hidden features (:meth:`embed`) and its pre-LayerNorm features
        (:meth:`domain_features_many`) for ``loras``, on the CPU; each LoRA must fit."""
        for lora in loras:
            self._check(lora)
        device = next(self.model.parameters()).device
        batch: LoraBatch | ModuleSetBatch
        if isinstance(self.model, ModuleTokenNet):  # its own modules, whatever the others in the batch have
            batch = ModuleSetBatch.from_loras(list(loras), fold_scale=self.fold_scale)
        else:
            batch = LoraBatch.from_loras(list(loras), fold_scale=self.fold_scale, spec=self.model.spec)
        batch = batch.to(device)
        captured: list[torch.Tensor] = []
        with self._lock:  # the hooks see every forward of the shared model: one forward at a time
            hooks = [
                self._last_layer.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach())),
                self._first_layer.register_forward_hook(lambda _, args, out: captured.append(out.detach())),
            ]
            try:
                logits = self.model.eval()(batch)
            finally:
                for hook in hooks:
                    hook.remove()
        pre_norm, hidden = captured  # the first layer runs first
        return logits.cpu(), hidden.cpu(), pre_norm.cpu()


_DIGESTS: weakref.WeakKeyDictionary[LoraWeights, str] = weakref.WeakKeyDictionary()  # one product per LoRA


def delta_digest(lora: LoraWeights) -> str:
    """sha256 of the LoRA's ΔW = scale·B·A per module (float64 product, stored as float32, modules by name).

    Equal for the same factors in any container (PEFT or kohya keys, other metadata, another dtype that holds the
    values exactly); two trainings never collide. Costs one d_out × d_in product per module.
    """
    known = _DIGESTS.get(lora)
    if known is not None:
        return known
    digest = hashlib.sha256()
    for module in sorted(lora, key=lambda m: m.name):
        delta = module.scale * (module.b.to(torch.float64) @ module.a.to(torch.float64))
        digest.update(module.name.encode() + b"\0" + str(tuple(delta.shape)).encode())
        digest.update(delta.to(torch.float32).contiguous().cpu().numpy().tobytes())
    _DIGESTS[lora] = digest.hexdigest()
    return _DIGESTS[lora]


def _model_key(name: str) -> str:
    """``sentence-transformers/all-MiniLM-L6-v2`` and ``all-minilm-l6-v2`` are one model: its last path part."""
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def declared_base(lora: LoraWeights) -> str | None:
    """The base model a LoRA's own files name (PEFT ``base_model_name_or_path``, or lol-explorer's ``lol.base``), or
    None when they name none or only a local path (which says nothing about which model it was)."""
    meta = lora.meta
    name = meta.adapter_config.get("base_model_name_or_path") or meta.safetensors_metadata.get("lol.base")
    if not isinstance(name, str) or not name.strip():
        return None
    name = name.strip()
    if (
        name.startswith(("/", ".", "~", "\\"))
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
        or name.count("/") > 1
    ):
        return None  # a path on someone's disk
    return name


def zoo_base(zoo: LoadedZoo) -> dict[str, str] | None:
    """The ``base`` entry of a predictor trained on ``zoo``: its one base model and family, or None when the zoo
    mixes bases."""
    names = {str(r.get("base_name") or "") for r in zoo.rows}
    families = {lora.meta.base_family for lora in zoo.loras}
    if len(names) != 1 or len(families) != 1 or "" in names:
        return None
    return {"name": names.pop(), "family": families.pop()}


def seen_digests(zoo: LoadedZoo, splits: Sequence[str] = ("train", "val", "cal")) -> dict[str, Any]:
    """The ``seen`` entry of a predictor trained on ``zoo``: file sha256 and :func:`delta_digest` of every LoRA in
    ``splits`` (the weights' training split, the split that chose the epoch, and the one that calibrated the
    ranges; a split without rows adds nothing)."""
    rows = [int(i) for split in splits for i in zoo.split(split)]
    return {
        "splits": list(splits),
        "sha256": sorted(str(zoo.loras[i].meta.sha256) for i in rows),
        "delta": sorted(delta_digest(zoo.loras[i]) for i in rows),
    }


def load_predictor(folder: str | Path) -> Predictor:
    """Read a checkpoint folder written by :func:`save_predictor` (safetensors and JSON only)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    spec = LoraSpec(
        tuple(
            LayerSpec(s["name"], s["d_out"], s["d_in"], s["rank"], s["kind"], tuple(s["orig_shape"]))
            for s in config["spec"]
        )
    )
    task = Task.from_dict(config["task"])
    model = build_model(config["model"], spec, task.out_dim, ModelConfig(**config["model_config"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    predictor = Predictor(model.eval(), task, bool(config["fold_scale"]), config, name=folder.name)
    reference = load_reference(folder, config)
    if reference is not None and reference.embeddings.shape[1] != predictor.embedding_dim:
        raise BadRequestError(
            f"{folder.name}: its {REFERENCE} holds {reference.embeddings.shape[1]}-wide embeddings, the model makes "
            f"{predictor.embedding_dim}-wide ones; rewrite it with `lol predictors reference`"
        )
    predictor.reference = reference
    return predictor
