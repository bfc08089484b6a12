"""Which file is the LoRA: :mod:`lol_engine.lora.locate` for files, adapter folders, Hub snapshots and folder trees.

Locating looks at names only, so most files here are empty; one test reads a located folder end to end.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from lora_files import peft, save, write_config

from lol_engine import LoraFormatError, load_lora
from lol_engine.lora.locate import LoraLocation, display_name, find_loras, locate_lora, scan_tree

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def relative(found: list[LoraLocation], root: Path) -> list[str]:
    return [loc.weights.relative_to(root).as_posix() for loc in found]


def test_a_file_is_itself(tmp_path: Path) -> None:
    file = touch(tmp_path / "pixel_art.safetensors")
    assert locate_lora(file) == LoraLocation(file, None, "pixel_art")
    assert locate_lora(str(file)) == locate_lora(file)


def test_a_peft_folder_reads_its_adapter_and_config(tmp_path: Path) -> None:
    folder = tmp_path / "digits-r4"
    weights = touch(folder / "adapter_model.safetensors")
    touch(folder / "README.safetensors")  # another file beside a known adapter file does not make it ambiguous
    config = write_config(folder)
    assert locate_lora(folder) == LoraLocation(weights, config, "digits-r4")
    assert locate_lora(weights) == LoraLocation(weights, config, "digits-r4")


def test_an_mlx_folder_reads_the_final_adapters_not_a_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "mlx-run"
    touch(folder / "0000100_adapters.safetensors")
    weights = touch(folder / "adapters.safetensors")
    config = write_config(folder)
    assert locate_lora(folder) == LoraLocation(weights, config, "mlx-run")
    checkpoint = locate_lora(folder / "0000100_adapters.safetensors")  # named directly: it keeps the folder's config
    assert (checkpoint.config, checkpoint.name) == (config, "0000100_adapters")


def test_a_diffusers_folder_has_no_config(tmp_path: Path) -> None:
    weights = touch(tmp_path / "sdxl-style" / "pytorch_lora_weights.safetensors")
    assert locate_lora(tmp_path / "sdxl-style") == LoraLocation(weights, None, "sdxl-style")


def test_known_adapter_files_in_order_of_preference(tmp_path: Path) -> None:
    touch(tmp_path / "adapters.safetensors")
    touch(tmp_path / "pytorch_lora_weights.safetensors")
    assert locate_lora(tmp_path).weights.name == "pytorch_lora_weights.safetensors"
    touch(tmp_path / "adapter_model.safetensors")
    assert locate_lora(tmp_path).weights.name == "adapter_model.safetensors"
    assert [loc.weights.name for loc in find_loras(tmp_path)] == ["adapter_model.safetensors"]


def test_a_folder_with_one_file(tmp_path: Path) -> None:
    weights = touch(tmp_path / "only" / "anime.safetensors")
    touch(tmp_path / "only" / "notes.txt")
    assert locate_lora(tmp_path / "only") == LoraLocation(weights, None, "anime")


def test_a_folder_with_several_files_is_refused(tmp_path: Path) -> None:
    touch(tmp_path / "one.safetensors")
    touch(tmp_path / "two.safetensors")
    with pytest.raises(LoraFormatError, match=r"has 2 \.safetensors files; name the one you mean"):
        locate_lora(tmp_path)


def test_a_hub_snapshot_with_its_adapter_in_a_subfolder(tmp_path: Path) -> None:
    touch(tmp_path / "snapshot" / "README.md")
    weights = touch(tmp_path / "snapshot" / "lora" / "adapter_model.safetensors")
    assert locate_lora(tmp_path / "snapshot") == LoraLocation(weights, None, "lora")
    touch(tmp_path / "snapshot" / "other" / "style.safetensors")
    with pytest.raises(LoraFormatError, match=r"snapshot: folder has 2 \.safetensors files"):
        locate_lora(tmp_path / "snapshot")


def test_a_folder_one_level_down_wins_only_without_files_on_top(tmp_path: Path) -> None:
    top = touch(tmp_path / "top.safetensors")
    touch(tmp_path / "sub" / "adapter_model.safetensors")
    assert locate_lora(tmp_path).weights == top


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("adapter_model.bin", r"adapter_model\.bin is a pickle, never loaded"),
        ("pytorch_lora_weights.bin", r"pytorch_lora_weights\.bin is a pickle"),
        ("adapters.npz", r"adapters\.npz is a NumPy archive"),
    ],
)
def test_a_folder_with_only_unread_adapters(tmp_path: Path, name: str, what: str) -> None:
    touch(tmp_path / name)
    write_config(tmp_path)
    with pytest.raises(LoraFormatError, match=rf"holds no \.safetensors adapter; {what}"):
        locate_lora(tmp_path)


def test_an_unread_adapter_in_a_subfolder_is_named(tmp_path: Path) -> None:
    touch(tmp_path / "checkpoint-500" / "adapter_model.bin")
    with pytest.raises(LoraFormatError, match=r"; checkpoint-500/adapter_model\.bin is a pickle"):
        locate_lora(tmp_path)


def test_an_empty_folder_and_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(LoraFormatError, match=r"holds no \.safetensors adapter$"):
        locate_lora(tmp_path)
    with pytest.raises(LoraFormatError, match=r"nope\.safetensors: no such file or folder"):
        locate_lora(tmp_path / "nope.safetensors")
    with pytest.raises(LoraFormatError, match="nope: no such file or folder"):
        find_loras(tmp_path / "nope")
    assert find_loras(tmp_path) == []


def test_find_loras_walks_a_tree(tmp_path: Path) -> None:
    touch(tmp_path / "peft" / "adapter_model.safetensors")
    write_config(tmp_path / "peft")
    touch(tmp_path / "peft" / "checkpoint-10" / "adapter_model.safetensors")  # a checkpoint folder is a LoRA too
    touch(tmp_path / "mlx" / "adapters.safetensors")
    touch(tmp_path / "mlx" / "0000100_adapters.safetensors")  # beside the final file: not counted
    touch(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")
    touch(tmp_path / "kohya" / "a.safetensors")
    touch(tmp_path / "kohya" / "b.safetensors")
    touch(tmp_path / "kohya" / "deep" / "c.safetensors")
    touch(tmp_path / "kohya" / "model.bin")
    (tmp_path / "weird.safetensors").mkdir()  # a folder named like a file is not a LoRA
    found = find_loras(tmp_path)
    assert relative(found, tmp_path) == [
        "diffusers/pytorch_lora_weights.safetensors",
        "kohya/a.safetensors",
        "kohya/b.safetensors",
        "kohya/deep/c.safetensors",
        "mlx/adapters.safetensors",
        "peft/adapter_model.safetensors",
        "peft/checkpoint-10/adapter_model.safetensors",
    ]
    assert [loc.name for loc in found] == ["diffusers", "a", "b", "c", "mlx", "peft", "checkpoint-10"]
    assert [loc.config is not None for loc in found] == [False] * 5 + [True, False]
    assert find_loras(tmp_path / "kohya" / "a.safetensors") == [locate_lora(tmp_path / "kohya" / "a.safetensors")]


def test_find_loras_order_does_not_depend_on_disk_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"set{i % 3}/lora_{i}.safetensors" for i in range(12)] + ["set1/peft/adapter_model.safetensors"]
    lists = []
    real_scandir = os.scandir
    for trial in range(3):
        root = tmp_path / f"trial{trial}"
        for name in random.Random(trial).sample(names, len(names)):  # created in another order each time
            touch(root / name)

        @contextmanager
        def shuffled(top: str, seed: int = trial) -> Iterator[Iterator[os.DirEntry[str]]]:
            with real_scandir(top) as listing:
                entries = list(listing)
            random.Random(f"{seed}:{top}").shuffle(entries)  # folders and files listed in another order
            yield iter(entries)

        with monkeypatch.context() as patch:
            patch.setattr(os, "scandir", shuffled)
            lists.append(relative(find_loras(root), root))
    assert lists[0] == lists[1] == lists[2] == sorted(lists[0], key=lambda p: Path(p).parts)
    assert len(lists[0]) == 13


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("runs/digits-r4/adapter_model.safetensors", "digits-r4"),
        ("runs/sdxl/pytorch_lora_weights.safetensors", "sdxl"),
        ("runs/mlx-run/adapters.safetensors", "mlx-run"),
        ("runs/mlx-run/0000100_adapters.safetensors", "0000100_adapters"),
        ("loras/pixel_art.safetensors", "pixel_art"),
        ("loras/pixel.art.v2.safetensors", "pixel.art.v2"),
    ],
)
def test_display_name(path: str, name: str) -> None:
    assert display_name(path) == name
    assert display_name(Path(path)) == name


def test_display_name_of_a_relative_adapter_file_is_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(touch(tmp_path / "my-adapter" / "adapter_model.safetensors").parent)
    assert display_name("adapter_model.safetensors") == "my-adapter"


def test_display_name_keeps_a_symlinked_file_in_its_folder(tmp_path: Path) -> None:
    """Hub snapshots hold symlinks into ``blobs/``: the name is the snapshot folder's, not the blob's."""
    blob = touch(tmp_path / "blobs" / "0123abcd")
    link = tmp_path / "snapshots" / "f00d" / "adapter_model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert locate_lora(link.parent) == LoraLocation(link, None, "f00d")


def test_a_located_peft_folder_reads(tmp_path: Path) -> None:
    save(tmp_path / "adapter_model.safetensors", peft(Q, rank=4))
    write_config(tmp_path, r=4, lora_alpha=16)
    assert load_lora(tmp_path).scales == (4.0,)


def test_scan_tree_finds_loras_and_marked_folders_in_one_walk(tmp_path: Path) -> None:
    touch(tmp_path / "zoo" / "manifest.parquet")
    touch(tmp_path / "zoo" / "zoo.json")
    touch(tmp_path / "zoo" / "loras" / "0" / "adapter_model.safetensors")
    touch(tmp_path / "half" / "manifest.parquet")  # no zoo.json: not marked
    (tmp_path / "dir" / "zoo.json").mkdir(parents=True)  # a folder named zoo.json is not the file
    touch(tmp_path / "dir" / "manifest.parquet")
    touch(tmp_path / "loose.safetensors")
    (tmp_path / "link").symlink_to(tmp_path / "zoo")  # a link to a folder is not followed
    found, marked = scan_tree(tmp_path, marked_by=("manifest.parquet", "zoo.json"))
    assert relative(found, tmp_path) == ["loose.safetensors", "zoo/loras/0/adapter_model.safetensors"]
    assert marked == [tmp_path / "zoo"]
    assert found == find_loras(tmp_path)
    assert scan_tree(tmp_path / "loose.safetensors", marked_by=("zoo.json",)) == (
        [locate_lora(tmp_path / "loose.safetensors")],
        [],
    )
