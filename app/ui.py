"""The Gradio UI: ``build_demo()`` returns a ``gr.Blocks`` and does no I/O; one function per tab."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.handlers import MODULE_COLUMNS, inspect_upload
from lol_engine import LoraFormatError

__all__ = ["build_demo"]


def _inspect(paths: list[str] | None) -> tuple[str, Any, dict[str, Any]]:
    try:
        result = inspect_upload(paths)
    except LoraFormatError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    return result.summary, result.rows, result.report


def _inspect_tab() -> None:
    with gr.Tab("Inspect a LoRA"):
        gr.Markdown(
            "Upload a LoRA as `.safetensors` (PEFT, kohya/A1111/ComfyUI, diffusers or LyCORIS LoCon), optionally with "
            "its `adapter_config.json`. Nothing is run and nothing is unpickled: the file is parsed, checked and "
            "described, with exact singular values of every ΔW computed without forming it."
        )
        files = gr.File(
            file_count="multiple", file_types=[".safetensors", ".json"], type="filepath", label="LoRA file(s)"
        )
        button = gr.Button("Inspect", variant="primary")
        summary = gr.Markdown()
        table = gr.Dataframe(headers=MODULE_COLUMNS, interactive=False, max_height=480, show_search="search")
        with gr.Accordion("Full report (JSON)", open=False):
            report = gr.JSON()
        button.click(_inspect, inputs=files, outputs=[summary, table, report], api_name="inspect")


def build_demo() -> gr.Blocks:
    """Build the app; nothing is loaded until an event runs."""
    with gr.Blocks(title="LoL Explorer", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# 🧭 LoL Explorer\nWhat is in a LoRA, read from its weights alone.")
        _inspect_tab()
    return demo
