"""App handlers called directly; the UI builds without launching; the API answers over HTTP."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from lora_files import kohya, peft, save, write_config

from app.handlers import MODULE_COLUMNS, inspect_upload
from lol_engine import LoraFormatError

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
    with pytest.raises(LoraFormatError, match=message):
        inspect_upload(paths)


def test_inspect_upload_refuses_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(LoraFormatError, match="pickle"):
        inspect_upload(str(path))


def test_build_demo_does_not_launch() -> None:
    gr = pytest.importorskip("gradio")
    from app.ui import build_demo

    demo = build_demo()
    assert isinstance(demo, gr.Blocks)
    assert not getattr(demo, "is_running", False)


@pytest.mark.slow
def test_api_inspect_endpoint(upload: Path, tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    from app.ui import build_demo

    demo = build_demo()
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        client = Client(demo.local_url, verbose=False)
        assert "/inspect" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        summary, table, report = client.predict([handle_file(str(upload))], api_name="/inspect")
        assert "kohya" in summary
        assert table["data"][0][0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        assert report["n_modules"] == 1
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(pickle.dumps({}))
        with pytest.raises(Exception, match="pickle"):
            client.predict([handle_file(str(bad))], api_name="/inspect")
        client.close()
    finally:
        demo.close()
