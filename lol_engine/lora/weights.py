"""The canonical in-memory LoRA: per-module ``(A, B, scale)`` plus file-level metadata."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from lol_engine.spec import LayerSpec, LoraSpec

__all__ = ["LoraMetadata", "LoraModule", "LoraWeights"]


@dataclass(frozen=True)
class LoraMetadata:
    """What a reader learned about a file besides the factors. Every text field is untrusted user content."""

    format: str = "unknown"  # peft | kohya | lycoris | diffusers | diffusers-peft | comfyui | unknown
    base_family: str = "unknown"  # sd1 | sd2 | sdxl | sd3 | flux | llm-decoder | bert-encoder | unknown
    family_evidence: tuple[str, ...] = ()
    dtype: str = ""  # source dtype(s) of the factors, e.g. "F16" or "BF16+F32"
    sha256: str = ""  # of the whole .safetensors file: the LoRA's id
    data_sha256: str = ""  # of its data buffer (the kohya/A1111 "addnet" hash), when computed while reading the file
    size_bytes: int = 0
    source: str = ""
    is_dora: bool = False
    safetensors_metadata: Mapping[str, str] = field(default_factory=dict)  # raw __metadata__, size-capped
    kohya: Mapping[str, Any] = field(default_factory=dict)  # ss_* keys, JSON strings decoded where possible
    modelspec: Mapping[str, str] = field(default_factory=dict)  # modelspec.* keys
    adapter_config: Mapping[str, Any] = field(default_factory=dict)  # PEFT adapter_config.json fields
    skipped_keys: tuple[str, ...] = ()  # tensors that are not LoRA factors (modules_to_save, biases, norms, …)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One adapted module: ``ΔW = scale · b @ a`` with ``a: (rank, d_in)`` and ``b: (d_out, rank)``.

    ``magnitude`` is DoRA's magnitude vector, carried as side data (the true DoRA update needs the base weights).
    """

    spec: LayerSpec
    a: Tensor  # (r, d_in)
    b: Tensor  # (d_out, r)
    scale: float
    alpha: float | None = None  # as stored or implied; None when the format bakes the scale in
    magnitude: Tensor | None = None  # DoRA: (d_out,) or (d_in,), see magnitude_axis
    magnitude_axis: Literal["out", "in"] | None = None

    def __post_init__(self) -> None:
        r, d_out, d_in = self.spec.rank, self.spec.d_out, self.spec.d_in
        if tuple(self.a.shape) != (r, d_in) or tuple(self.b.shape) != (d_out, r):
            raise ValueError(
                f"{self.spec.name}: expected A {(r, d_in)} and B {(d_out, r)}, "
                f"got A {tuple(self.a.shape)} and B {tuple(self.b.shape)}"
            )

    @property
    def name(self) -> str:
        """The canonical module name."""
        return self.spec.name

    def delta_weight(self, reshape: bool = False) -> Tensor:
        """The dense update ``scale · B A`` of shape ``(d_out, d_in)``; with ``reshape``, in the base weight's shape.

        Forms a ``d_out × d_in`` matrix: use :mod:`lol_engine.symmetry` for spectra, norms and inner products.
        """
        delta = self.scale * (self.b @ self.a)  # (d_out, d_in)
        if not reshape:
            return delta
        if self.spec.kind == "embedding":
            return delta.T.contiguous()  # (num_embeddings, dim)
        return delta.reshape(self.spec.orig_shape)


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """An immutable container of :class:`LoraModule` in file order, with the file's :class:`LoraMetadata`.

    >>> a, b = torch.randn(2, 5), torch.randn(3, 2)
    >>> lora = LoraWeights.from_factors({"layer.q": (a, b)}, scale=0.5)
    >>> lora.spec.layers[0].shape, lora["layer.q"].delta_weight().shape
    ((3, 5), torch.Size([3, 5]))
    """

    modules: tuple[LoraModule, ...]
    meta: LoraMetadata = field(default_factory=LoraMetadata)

    def __post_init__(self) -> None:
        LoraSpec(tuple(m.spec for m in self.modules))  # validates unique names

    @classmethod
    def from_factors(
        cls, factors: Mapping[str, tuple[Tensor, Tensor]], scale: float | Mapping[str, float] = 1.0
    ) -> LoraWeights:
        """Build linear modules from ``{name: (A, B)}``; ``scale`` is one number or one per name."""
        modules = []
        for name, (a, b) in factors.items():
            s = scale[name] if isinstance(scale, Mapping) else scale
            spec = LayerSpec(name, d_out=b.shape[0], d_in=a.shape[1], rank=a.shape[0])
            modules.append(LoraModule(spec, a, b, scale=float(s)))
        return cls(tuple(modules))

    @property
    def spec(self) -> LoraSpec:
        """The frozen spec: names, widths, ranks and kinds, in order."""
        return LoraSpec(tuple(m.spec for m in self.modules))

    @property
    def names(self) -> tuple[str, ...]:
        """Module names, in order."""
        return tuple(m.name for m in self.modules)

    @property
    def scales(self) -> tuple[float, ...]:
        """Per-module scales, in order."""
        return tuple(m.scale for m in self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules)

    def __getitem__(self, key: int | str) -> LoraModule:
        if isinstance(key, int):
            return self.modules[key]
        for module in self.modules:
            if module.name == key:
                return module
        raise KeyError(key)

    def map(self, fn_a: Callable[[Tensor], Tensor], fn_b: Callable[[Tensor], Tensor] | None = None) -> LoraWeights:
        """Apply ``fn_a`` to every A and ``fn_b`` (default ``fn_a``) to every B; also to DoRA magnitudes."""
        fn_b = fn_a if fn_b is None else fn_b
        modules = tuple(
            replace(m, a=fn_a(m.a), b=fn_b(m.b), magnitude=None if m.magnitude is None else fn_a(m.magnitude))
            for m in self.modules
        )
        return replace(self, modules=modules)

    def map_modules(self, fn: Callable[[LoraModule], LoraModule]) -> LoraWeights:
        """Apply ``fn`` to every module; names must stay unique."""
        return replace(self, modules=tuple(fn(m) for m in self.modules))

    def to(self, *args: Any, **kwargs: Any) -> LoraWeights:
        """``Tensor.to`` on every tensor, e.g. ``lora.to(torch.float64)`` or ``lora.to(other_tensor)``."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> LoraWeights:
        """Detach every tensor from the autograd graph."""
        return self.map(Tensor.detach)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the factors (of the first module)."""
        return self.modules[0].a.dtype

    @property
    def device(self) -> torch.device:
        """The device of the factors (of the first module)."""
        return self.modules[0].a.device

    def fold_scale(self) -> LoraWeights:
        r"""Fold each scale into the factors: ``A ← sign(s)·√|s|·A``, ``B ← √|s|·B``, ``s ← 1``.

        ΔW is unchanged, and the result still transforms under the same GL(r) action.
        """

        def fold(m: LoraModule) -> LoraModule:
            root = math.sqrt(abs(m.scale))
            sign = -1.0 if m.scale < 0 else 1.0
            return replace(m, a=m.a * (sign * root), b=m.b * root, scale=1.0)

        return self.map_modules(fold)
