"""The Gradio web UI at /, laid out as AUTOMATIC1111's: a txt2img and an img2img tab, each with
the prompts and a big Generate button on top, the parameters on the left and the gallery right.

    Generate -> Request -> GenerationQueue.submit -> Job     the API's queue: one model, in turn
    poll the Job every POLL_SECONDS                         "2 ahead of you", then "step 3/20"
    Result -> PNG files with their `parameters` chunk       the gallery shows and downloads them

The UI never calls the Pipeline itself, so web users and API clients wait in the one line.
Everything the page loads comes from this process (Gradio's default theme ships its fonts).
Gradio is an optional dependency (the [ui] extra), imported where it is used. Annotations are
evaluated at definition (no `from __future__ import annotations`): Gradio reads them to pass
gr.Request and gr.SelectData in.
"""
import html
import tempfile
import time
from pathlib import Path

from .. import __version__
from ..pnginfo import png_info
from .worker import GenerationQueue, Job, Request, RequestError

POLL_SECONDS = 0.2  # how often a waiting page looks at its job

# The UI's names for the Request fields a RequestError may name.
LABELS = {"steps": "Sampling steps", "cfg_scale": "CFG scale", "seed": "Seed", "width": "Width",
          "height": "Height", "batch_size": "Batch size", "n_iter": "Batch count", "clip_skip": "Clip skip",
          "init_images": "Image", "denoising_strength": "Denoising strength"}

SYNTAX_NOTE = ("AUTOMATIC1111's syntax: (word:1.2) weighs a word by 1.2, (word) by 1.1, [word] by 1/1.1; "
               "BREAK starts a new 75-token chunk.")


def build_ui(generation: GenerationQueue, info):
    """The page, a gr.Blocks; `info` is the server's ServerInfo (model name, limits, native size)."""
    import gradio as gr

    with gr.Blocks(title=f"minisd: {info.model_name}", delete_cache=(3600, 3600)) as ui:
        gr.Markdown(f"## minisd · {info.model_name}")
        with gr.Tabs():
            with gr.Tab("txt2img", id="txt2img"):
                generation_tab(generation, info, img2img=False)
            with gr.Tab("img2img", id="img2img"):
                generation_tab(generation, info, img2img=True)
        gr.Markdown(f"minisd {__version__} · A1111 API at [/sdapi/v1](/docs)", elem_id="footer")
    return ui


def generation_tab(generation: GenerationQueue, info, img2img: bool) -> None:
    """One tab: its controls, named by the Request fields they fill, and its Generate event."""
    import gradio as gr

    tab, limits, pipe = "img2img" if img2img else "txt2img", info.limits, generation.pipe
    factor = pipe.vae.downscale_factor  # sizes are multiples of it
    fields = {}  # Request field name -> the control that gives it
    with gr.Row():
        with gr.Column(scale=5):
            fields["prompt"] = gr.Textbox(label="Prompt", lines=3, info=SYNTAX_NOTE, elem_id=f"{tab}_prompt",
                                          placeholder="a red circle on a blue background")
            fields["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{tab}_negative_prompt")
        with gr.Column(scale=1, min_width=180):
            generate = gr.Button("Generate", variant="primary", size="lg", elem_id=f"{tab}_generate")
            stop = gr.Button("Stop", variant="stop", size="sm", elem_id=f"{tab}_stop")
    with gr.Row():
        with gr.Column():
            if img2img:
                fields["init_images"] = gr.Image(label="Image", type="pil", sources=["upload", "clipboard"],
                                                 height=260, elem_id="img2img_image")
                fields["denoising_strength"] = gr.Slider(0, 1, 0.75, step=0.01, label="Denoising strength",
                                                         elem_id="img2img_denoising_strength")
            fields["steps"] = gr.Slider(1, limits.max_steps, 20, step=1, label="Sampling steps", elem_id=f"{tab}_steps")
            with gr.Row():
                # img2img: 0 keeps the image's size, as the API's missing width does
                low, size = (0, 0) if img2img else (factor, info.native_size)
                fields["width"] = gr.Slider(low, limits.max_width // factor * factor, size, step=factor,
                                            label="Width", elem_id=f"{tab}_width")
                fields["height"] = gr.Slider(low, limits.max_height // factor * factor, size, step=factor,
                                             label="Height", elem_id=f"{tab}_height")
            if img2img:
                gr.Markdown("Width and height 0: the image's own size.")
            with gr.Row():
                fields["n_iter"] = gr.Slider(1, limits.max_images, 1, step=1, label="Batch count",
                                             elem_id=f"{tab}_batch_count")
                fields["batch_size"] = gr.Slider(1, limits.max_images, 1, step=1, label="Batch size",
                                                 elem_id=f"{tab}_batch_size")
            fields["cfg_scale"] = gr.Slider(1, 30, 7, step=0.5, label="CFG scale", elem_id=f"{tab}_cfg_scale")
            with gr.Row():
                seed = fields["seed"] = gr.Number(-1, precision=0, label="Seed", info="-1: a random one", scale=4,
                                                  elem_id=f"{tab}_seed")
                with gr.Column(scale=1, min_width=100):
                    random_seed = gr.Button("Random", size="sm")
                    reuse_seed = gr.Button("Reuse last", size="sm")
            fields["clip_skip"] = gr.Slider(1, pipe.text_encoder.config.num_hidden_layers, 1, step=1,
                                            label="Clip skip", info="1: the text encoder's last layer",
                                            elem_id=f"{tab}_clip_skip")
        with gr.Column():
            status = gr.HTML(elem_id=f"{tab}_status")
            gallery = gr.Gallery(label="Images", columns=2, height=480, object_fit="contain", format="png",
                                 buttons=["download", "fullscreen"], interactive=False, elem_id=f"{tab}_gallery")
            parameters = gr.Textbox(label="Parameters", lines=4, interactive=False, buttons=["copy"],
                                    elem_id=f"{tab}_parameters")
            shown = gr.State({"infotexts": [], "seeds": []})  # of the gallery's images, in order

    running: dict[str, Job] = {}  # page (Gradio session) -> its job on this tab, for Stop

    def run(request: gr.Request, **values):
        job = running[request.session_hash] = submit(generation, make_request(values))
        try:
            for text in follow(generation, job):
                yield gr.skip(), gr.skip(), text, gr.skip()
        finally:
            running.pop(request.session_hash, None)
        if job.state != "done":
            yield gr.skip(), gr.skip(), "Stopped.", gr.skip()
            return
        result = job.result
        for i in (i for i, flagged in enumerate(result.nsfw) if flagged):
            gr.Warning(f"Image {i + 1} was blacked out by the safety checker.")
        for warning in result.warnings:
            gr.Warning(warning)
        seeds = f"seed {result.seeds[0]}" + (f" to {result.seeds[-1]}" if len(result.seeds) > 1 else "")
        done = f"{len(result.images)} image(s) in {time.monotonic() - job.started:.1f} s, {seeds}"
        shown_now = {"infotexts": result.infotexts, "seeds": result.seeds}
        with tempfile.TemporaryDirectory(prefix="minisd-ui-") as folder:
            # Gradio copies each file into its cache before it resumes this generator, so the
            # folder may go then. Quirk: given PIL images, it would re-encode them without the chunk.
            images = gr.Gallery(png_files(job, folder), selected_index=0)  # the first one large, as A1111
            yield images, result.infotexts[0], html.escape(done), shown_now

    def stop_job(request: gr.Request):
        if (job := running.get(request.session_hash)) is not None:
            job.cancel()  # follow() sees it at once; the worker, at the job's next step

    outputs = [gallery, parameters, status, shown]
    # concurrency_limit=None: every waiting page hears its place; the GenerationQueue does the waiting.
    generate.click(run, inputs_kwargs=fields, outputs=outputs, concurrency_limit=None,
                   show_progress="hidden")  # follow() shows it
    stop.click(stop_job, None, None)
    def selected_parameters(state: dict, event: gr.SelectData) -> str:
        return state["infotexts"][event.index]

    gallery.select(selected_parameters, shown, parameters)
    random_seed.click(lambda: -1, None, seed)
    reuse_seed.click(lambda state: state["seeds"][0] if state["seeds"] else -1, shown, seed)


def make_request(values: dict) -> Request:
    """The UI's values, keyed by Request field, as a Request: sliders give floats, 0 sizes mean
    "the image's", an image is a list of one."""
    import gradio as gr

    image = values.get("init_images")
    if "init_images" in values and image is None:
        raise gr.Error("Image: upload one to start from.", print_exception=False)
    integers = {name: int(values[name]) for name in ("steps", "n_iter", "batch_size", "clip_skip")}
    return Request(prompt=values["prompt"], negative_prompt=values["negative_prompt"], **integers,
                   cfg_scale=float(values["cfg_scale"]), seed=-1 if values["seed"] is None else int(values["seed"]),
                   width=int(values["width"]) or None, height=int(values["height"]) or None,
                   init_images=None if image is None else [image],
                   denoising_strength=float(values.get("denoising_strength", 0.75)))


def submit(generation: GenerationQueue, request: Request) -> Job:
    """Queue the request; a field it cannot have is shown under the UI's name for it."""
    import gradio as gr

    try:
        return generation.submit(request)
    except RequestError as e:
        problem = str(e).removeprefix(f"{e.field}: ")
        raise gr.Error(html.escape(f"{LABELS.get(e.field, e.field)}: {problem}"), print_exception=False) from None


def follow(generation: GenerationQueue, job: Job):
    """Yield the job's status as HTML, every POLL_SECONDS until it ends or is cancelled (Stop, or
    the API's /interrupt): its place in the queue, then its steps. Gradio closes this generator
    when the page goes away, and that cancels the job, so it never holds up the queue.
    Quirk: a yield from the event hides gr.Progress's bar, so the bar is ours."""
    import gradio as gr

    try:
        while not job.wait(POLL_SECONDS) and not job.cancelled:
            if job.state == "queued":
                ahead = generation.position(job)
                yield status_html(None, f"Waiting: {ahead} ahead of you" if ahead else "Waiting: next in the queue")
            else:
                n = job.request.n_iter
                batch = f"batch {job.iteration + 1}/{n}, " if n > 1 else ""
                yield status_html(job.fraction, f"Generating: {batch}step {job.step}/{job.steps}")
    finally:
        if not job.done.is_set():
            job.cancel()
    if job.state == "failed":
        raise gr.Error(html.escape(f"The generation failed: {type(job.error).__name__}: {job.error}"))


def status_html(fraction: float | None, text: str) -> str:
    """A progress bar (moving, without a value, for None) and a line of text."""
    bar = "<progress" + ("" if fraction is None else f' value="{fraction:.3f}"') + ' style="width:100%"></progress>'
    return f"{bar}<div>{html.escape(text)}</div>"


def png_files(job: Job, folder: str) -> list[str]:
    """Each image as a PNG file with its `parameters` chunk, as `minisd generate` writes them."""
    paths = []
    for i, (image, seed, text) in enumerate(zip(job.result.images, job.result.seeds, job.result.infotexts)):
        path = Path(folder) / f"minisd-{job.number:05d}-{i}-{seed}.png"
        image.save(path, pnginfo=png_info(text))
        paths.append(str(path))
    return paths
