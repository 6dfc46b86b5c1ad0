"""`vssflow-serve` under load: N concurrent clients for M requests, beside one batch run.

    python -m vssflow.benchmarks.serve MODEL WORK --requests 8 --clients 4 --seconds 4 --steps 25 --batch 4

Writes M synthetic clips (`media.make_video`, each its own frames, so no feature is shared by
chance) into WORK, then runs each way as a user would (subprocesses, real HTTP on 127.0.0.1), each
in a fresh process after one warm-up request on a clip of its own (a Session's feature cache never
serves a measured clip from an earlier way):

* `/v1/generate` with batching across requests off (`--batch 1`) and on (`--batch B`): the M
  requests sent by N client threads, each sending its next request once its last is answered;
* `/v1/stream` (one request per Session call, never batched): the same, with each answer's
  first-chunk latency (request sent to the first audio bytes after the WAV header);
* one `vssflow-run CLIPS --output-dir` batch of the same clips (`--batch B`).

Prints one JSON line per way: requests (clips) per minute, p50/p95 latency, and for the stream
the p50/p95 first-chunk latency; `--out F.md` writes them as a table too.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import click
import numpy as np

from .media import make_video


class _Server:
    """`vssflow-serve` in a subprocess, on a free port; its lines drained by a thread."""

    def __init__(self, model: Path, batch: int, clients: int):
        cmd = [sys.executable, "-m", "vssflow.serve.cli", "--model", str(model), "--port", "0", "--batch", str(batch),
               "--max-concurrent", str(clients), "--max-upload-mb", "1000", "--request-timeout", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        for line in self.proc.stderr:
            self.lines.append(line)
            if m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                self.port = int(m.group(1))
                break
        else:
            raise SystemExit("vssflow-serve ended before listening:\n" + "".join(self.lines))
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait(timeout=600) != 0:
            raise SystemExit("vssflow-serve did not stop cleanly:\n" + "".join(self.lines[-20:]))


def _form(video: Path, fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="{video.name}"\r\n'
             "Content-Type: video/mp4\r\n\r\n".encode() + video.read_bytes() + b"\r\n"]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
              for k, v in fields.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _request(port: int, path: str, video: Path, fields: dict) -> tuple[float, float | None]:
    """(seconds to the last byte, seconds to the first audio bytes of a stream)."""
    body, content_type = _form(video, fields)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    t0 = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Content-Type": content_type})
    r = conn.getresponse()
    first, got = None, 0
    while piece := r.read1(1 << 16):
        got += len(piece)
        if first is None and got > 44:                     # past the WAV header: sound
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    conn.close()
    if r.status != 200:
        raise SystemExit(f"POST {path} answered {r.status}")
    return total, first


def load(port: int, path: str, clips: list[Path], clients: int, fields: dict) -> dict:
    """The clips through `path` by `clients` threads; requests per minute and latency quantiles."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for clip in clips:
        todo.put(clip)
    done: list[tuple[float, float | None]] = []
    failed: list[BaseException] = []

    def client():
        while True:
            try:
                clip = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.append(_request(port, path, clip, fields))
            except BaseException as e:                      # noqa: BLE001 (reported below)
                failed.append(e)
                return
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if failed:
        raise SystemExit(f"{path}: {failed[0]}")
    latency = np.array([d[0] for d in done])
    out = {"wall_s": round(wall, 2), "per_min": round(60 * len(done) / wall, 1),
           "p50_s": round(float(np.percentile(latency, 50)), 2), "p95_s": round(float(np.percentile(latency, 95)), 2)}
    firsts = [d[1] for d in done if d[1] is not None]
    if path == "/v1/stream" and firsts:
        out |= {"first_chunk_p50_s": round(float(np.percentile(firsts, 50)), 2),
                "first_chunk_p95_s": round(float(np.percentile(firsts, 95)), 2)}
    return out


def batch_cli(model: Path, clips_dir: Path, out: Path, steps: int, batch: int) -> dict:
    cmd = [sys.executable, "-m", "vssflow.runtime.cli", str(clips_dir), "--model", str(model), "--output-dir", str(out),
           "--format", "wav", "--steps", str(steps), "--batch", str(batch), "-q"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"vssflow-run failed ({r.returncode}): {r.stderr[-2000:]}")
    return {"wall_s": round(wall, 2), "per_min": round(60 * len(list(clips_dir.iterdir())) / wall, 1)}


@click.command()
@click.argument("model", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("work", type=click.Path(file_okay=False, path_type=Path))
@click.option("--requests", "n", type=click.IntRange(1, None), default=8, show_default=True,
              help="Requests (each its own clip) per way.")
@click.option("--clients", type=click.IntRange(1, None), default=4, show_default=True,
              help="Concurrent clients (and the server's --max-concurrent).")
@click.option("--seconds", type=float, default=4.0, show_default=True, help="Each clip's length.")
@click.option("--steps", type=int, default=25, show_default=True)
@click.option("--batch", type=click.IntRange(2, None), default=4, show_default=True,
              help="The server's --batch with batching on (and the batch run's).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as a Markdown table here.")
def main(model, work, n, clients, seconds, steps, batch, out):
    """vssflow-serve's throughput and latency with batching across requests off and on, its first-chunk
    latency, and one batch run of the same clips."""
    clips_dir = work / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    clips = [clips_dir / f"clip{k}.mp4" for k in range(n)]
    for k, path in enumerate(clips):
        if not path.exists():
            make_video(path, seconds, 25, (320, 240), texture=k + 1)   # each its own frames
    fields = {"format": "wav", "steps": str(steps)}
    rows = []

    def report(way: str, figures: dict) -> None:
        row = {"way": way, "requests": n, "clients": clients, "seconds": seconds, "steps": steps, **figures,
               "load_1min": round(os.getloadavg()[0], 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    warm = work / "warm.mp4"                          # its own frames: nothing of it is a measured clip's
    if not warm.exists():
        make_video(warm, seconds, 25, (320, 240), texture=n + 1)
    # each way a fresh server: a Session's feature cache would otherwise serve a clip seen by an earlier way
    for label, path, b in (("generate, batching off (--batch 1)", "/v1/generate", 1),
                           (f"generate, batching on (--batch {batch})", "/v1/generate", batch),
                           ("stream", "/v1/stream", 1)):
        server = _Server(model, b, clients)
        try:
            _request(server.port, path, warm, fields if path == "/v1/generate" else {"steps": str(steps)})
            report(label, load(server.port, path, clips, clients,
                               fields if path == "/v1/generate" else {"steps": str(steps)}))
        finally:
            server.stop()
    report(f"vssflow-run batch (--batch {batch})", batch_cli(model, clips_dir, work / "batch", steps, batch))
    if out is not None:
        out.write_text(_markdown(rows, model))
        print(f"wrote {out}", file=sys.stderr)


def _markdown(rows: list[dict], model: Path) -> str:
    r0 = rows[0]
    lines = [f"# vssflow-serve under load: {r0['requests']} requests of {r0['seconds']:g}-s clips, {r0['clients']} "
             f"clients, {r0['steps']} steps ({model.name}, {os.cpu_count()} CPUs)", "",
             "| way | requests/min | p50 latency | p95 latency | first chunk p50 / p95 |", "|---|---|---|---|---|"]
    for r in rows:
        first = (f"{r['first_chunk_p50_s']} / {r['first_chunk_p95_s']} s" if "first_chunk_p50_s" in r else "")
        p50 = f"{r['p50_s']} s" if "p50_s" in r else ""
        p95 = f"{r['p95_s']} s" if "p95_s" in r else ""
        lines.append(f"| {r['way']} | {r['per_min']} | {p50} | {p95} | {first} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
