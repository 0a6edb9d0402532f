"""`minisd serve`: one process, one loaded Pipeline, two faces to it.

    worker.py   the one queue: requests wait their turn for the model, one generation at a time
    a1111.py    AUTOMATIC1111's REST API, /sdapi/v1/txt2img, /img2img, /progress, ...
    ui.py       the Gradio web UI at /
    app.py      both on one FastAPI app, served by uvicorn

Gradio, FastAPI and uvicorn come from the optional extra `pip install -e ".[ui]"`; `import minisd`
never imports this package.
"""
