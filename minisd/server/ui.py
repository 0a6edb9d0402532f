"""The Gradio web UI at /."""
from __future__ import annotations

import gradio as gr

from .worker import GenerationQueue, Request


def build_ui(generation: GenerationQueue, info) -> gr.Blocks:
    with gr.Blocks(title=f"minisd: {info.model_name}") as ui:
        prompt = gr.Textbox(label="Prompt")
        button = gr.Button("Generate", variant="primary")
        gallery = gr.Gallery(label="Images")

        def run(text):
            job = generation.submit(Request(prompt=text, steps=20))
            job.wait()
            if job.error:
                raise gr.Error(str(job.error))
            return job.result.images

        button.click(run, prompt, gallery)
    return ui
