"""`vssflow-serve`: the runtime as an HTTP service, one `Session` behind one ASGI application.

    vssflow-serve --model models/vssflow --port 8000
    curl -F video=@clip.mp4 -F format=wav -F seed=3 http://127.0.0.1:8000/v1/generate -o clip.wav

`form.py` reads a request: the multipart upload streamed to a private folder, its fields checked
as `vssflow-run` checks its options; `app.py` is the application (auth, limits, the generation in
a worker thread, errors as JSON); `batcher.py` runs the waiting requests' windows together;
`cli.py` is the command; `ray_serve.py` deploys the same application as Ray Serve replicas
(`--ray`). Needs the serve extra (Starlette, uvicorn, python-multipart, prometheus-client; `--ray`:
serve-ray): nothing here imports them until the command runs.
"""
