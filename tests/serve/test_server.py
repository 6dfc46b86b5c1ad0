"""`vssflow-serve` as a client meets it: one real server process for the module, real HTTP requests.

The server runs with a token, a 1 MB upload limit and two requests at a time, its TMPDIR a folder of
the test's, so that every upload's folder can be seen to go. Tests wait on events (the line it
prints when it listens, its one line per request, its exit), never on time.
"""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid

import pytest

from tests.runtime.test_packaging import run_blocked

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")

TOKEN = "s3cret-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Server:
    """The server process, its port, and every line it has printed (gathered by a thread)."""

    def __init__(self, args, env, cwd):
        self.proc = subprocess.Popen([sys.executable, "-m", "vssflow.serve.cli", *map(str, args)], cwd=cwd, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        for line in self.proc.stderr:               # until it listens (or dies: the lines say why)
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        else:
            raise AssertionError("the server ended before listening:\n" + "\n".join(self.lines))
        threading.Thread(target=self._gather, daemon=True).start()

    def _gather(self):
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for_lines(self, needle: str, count: int) -> list[str]:
        """The lines holding `needle`, once there are `count` of them."""
        with self.changed:
            ok = self.changed.wait_for(lambda: len(self.matching(needle)) >= count, timeout=120)
        assert ok, f"no {count} lines with {needle!r}:\n" + "\n".join(self.lines)
        return self.matching(needle)

    def served(self) -> int:
        """Requests answered 200 so far, each logged once its upload folder is gone."""
        return len(self.matching("POST /v1/generate 200"))

    def matching(self, needle: str) -> list[str]:
        return [line for line in self.lines if needle in line]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "token").write_text(TOKEN + "\n")
    (root / "tmp").mkdir()
    server = Server(["--model", tiny_model, "--port", 0, "--token-file", root / "token", "--max-upload-mb", 1,
                     "--max-concurrent", 2], env={**os.environ, "TMPDIR": str(root / "tmp")}, cwd=root)
    server.tmp = root / "tmp"
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(timeout=60)


def multipart(files: dict, fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = []
    for name, (filename, data) in files.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    for name, value in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def post(server, files: dict, fields: dict, headers=AUTH):
    """(status, headers, body) of POST /v1/generate."""
    body, content_type = multipart(files, fields)
    request = urllib.request.Request(server.url("/v1/generate"), data=body,
                                     headers={**headers, "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def healthz(server) -> dict:
    with urllib.request.urlopen(server.url("/healthz"), timeout=60) as r:
        return json.loads(r.read())


def test_without_the_serve_extra_one_line_names_it(tmp_path):
    """Checked before the model folder is even opened: exit 4, the install line, no traceback."""
    r = run_blocked(("starlette",), "vssflow.serve.cli", "--model", tmp_path / "none", cwd=tmp_path)
    assert r.returncode == 4 and r.stderr.strip() == ("vssflow-serve: error: vssflow-serve needs the serve extra: "
                                                      "pip install 'vssflow[serve]' (missing: starlette)"), r.stderr


def test_a_port_in_use_is_one_line(tiny_model, tmp_path):
    import socket
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "vssflow.serve.cli", "--model", str(tiny_model), "--port", str(port)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().endswith(
        f"vssflow-serve: error: cannot listen on 127.0.0.1 port {port} (Address already in use)"), r.stderr


def test_a_batch_over_the_folders_most_is_one_line(tiny_model, tmp_path):
    r = subprocess.run([sys.executable, "-m", "vssflow.serve.cli", "--model", str(tiny_model), "--port", "0",
                        "--batch", "99"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "vssflow-serve: error: --batch 99: this model folder's graphs take at most 4 windows at once"), r.stderr


def test_healthz_says_what_is_loaded(server):
    assert healthz(server) == {"model": "tiny", "backend": "ort", "precision": "fp32", "ready": True,
                               "in_flight": 0, "demo_model": False}


def test_the_same_wav_as_the_cli(server, tiny_model, clip4, tmp_path):
    before = server.served()
    cli = subprocess.Popen([sys.executable, "-m", "vssflow.runtime.cli", clip4, "--model", tiny_model, "--seed", "3",
                            "--steps", "1", "-o", tmp_path / "x.wav", "-q"], cwd=tmp_path, stderr=subprocess.PIPE)
    status, headers, body = post(server, {"video": ("clip4.mp4", clip4.read_bytes())},
                                 {"format": "wav", "seed": "3", "steps": "1"})
    assert status == 200, body
    assert headers["Content-Type"] == "audio/wav"
    assert headers["X-Audio-Seconds"] == "4.000" and headers["X-NFE"] == "1"
    assert cli.wait(timeout=300) == 0, cli.stderr.read()
    assert body == (tmp_path / "x.wav").read_bytes()
    server.wait_for_lines("POST /v1/generate 200", before + 1)   # logged once its folder is gone
    assert list(server.tmp.iterdir()) == []
    server.cli_wav = body


def stream(server, files: dict, fields: dict, headers=AUTH):
    """(status, headers, the body's pieces as they arrived) of POST /v1/stream."""
    body, content_type = multipart(files, fields)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    conn.request("POST", "/v1/stream", body=body, headers={**headers, "Content-Type": content_type})
    r = conn.getresponse()
    pieces = []
    while piece := r.read1(1 << 16):
        pieces.append(piece)
    conn.close()
    return r.status, r.headers, pieces


def test_stream_sends_the_clis_samples_as_they_are_made(server, tiny_model, clip4, tmp_path):
    """/v1/stream: a WAV header of unknown length, then the CLI's own float samples, in pieces."""
    import numpy as np
    import soundfile as sf
    before = len(server.matching("POST /v1/stream 200"))
    out = tmp_path / "x.wav"
    cli = subprocess.run([sys.executable, "-m", "vssflow.runtime.cli", clip4, "--model", tiny_model, "--seed", "4",
                          "--steps", "1", "-o", out, "-q"], cwd=tmp_path, capture_output=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    status, headers, pieces = stream(server, {"video": ("clip4.mp4", clip4.read_bytes())}, {"seed": "4", "steps": "1"})
    assert status == 200 and headers["Content-Type"] == "audio/wav" and headers["X-Sample-Rate"] == "16000"
    assert headers["Transfer-Encoding"] == "chunked"
    body = b"".join(pieces)
    assert body[:4] == b"RIFF" and body[8:16] == b"WAVEfmt " and body[40:44] == b"\xff\xff\xff\xff"
    expected, rate = sf.read(out, dtype="float32")
    assert rate == 16000 and np.array_equal(np.frombuffer(body[44:], "<f4"), expected)
    line = server.wait_for_lines("POST /v1/stream 200", before + 1)[-1]
    assert "4.000 s of audio streamed, 1 NFE" in line
    assert list(server.tmp.iterdir()) == []


def test_stream_refuses_before_the_first_byte_with_a_status(server, clip4):
    video = {"video": ("clip4.mp4", clip4.read_bytes())}
    status, _, pieces = stream(server, video, {"format": "mp3"})
    assert status == 422 and "/v1/stream sends WAV only" in json.loads(b"".join(pieces))["error"]
    status, _, pieces = stream(server, {"video": ("clip.mp4", b"not a video " * 100)}, {})
    assert status == 422 and json.loads(b"".join(pieces))["exit_code"] == 10
    assert stream(server, video, {}, headers={})[0] == 401
    server.wait_for_lines("POST /v1/stream 422", 2)
    assert list(server.tmp.iterdir()) == [] and healthz(server)["in_flight"] == 0


def test_a_client_leaving_mid_stream_frees_its_slot_and_folder(server, clip12):
    """Gone after the header: the stream ends (499, or 200 if it was already made), the slot and the
    upload's folder are freed, and the next request is served."""
    body, content_type = multipart({"video": ("clip12.mp4", clip12.read_bytes())}, {"steps": "2"})
    ended = len(server.matching("POST /v1/stream 499")) + len(server.matching("POST /v1/stream 200"))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    conn.request("POST", "/v1/stream", body=body, headers={**AUTH, "Content-Type": content_type})
    r = conn.getresponse()
    assert r.status == 200 and r.read1(44)[:4] == b"RIFF"
    conn.sock.shutdown(2)
    conn.close()
    with server.changed:
        assert server.changed.wait_for(lambda: len(server.matching("POST /v1/stream 499"))
                                       + len(server.matching("POST /v1/stream 200")) > ended, timeout=300)
    assert list(server.tmp.iterdir()) == [] and healthz(server)["in_flight"] == 0


def test_concurrent_requests_each_get_their_own_result(server, clip4):
    """Two at once share the Session (taking turns stage by stage): each answer is its own seed's."""
    from concurrent.futures import ThreadPoolExecutor
    video = {"video": ("clip4.mp4", clip4.read_bytes())}
    before = server.served()
    alone = getattr(server, "cli_wav", None)
    if alone is None:                            # run alone (-k): seed 3 on its own first
        alone = post(server, video, {"format": "wav", "seed": "3", "steps": "1"})[2]
        before += 1
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda seed: post(server, video, {"format": "wav", "seed": seed, "steps": "1"}),
                                ["3", "5"]))
    assert [status for status, _, _ in answers] == [200, 200]
    assert answers[0][2] == alone and answers[1][2] != alone
    server.wait_for_lines("POST /v1/generate 200", before + 2)
    assert list(server.tmp.iterdir()) == []


def test_bad_uploads_get_the_clis_line_and_the_next_request_is_served(server, clip4):
    video = {"video": ("clip4.mp4", clip4.read_bytes())}
    cases = [({"video": ("clip.mp4", b"not a video " * 100)}, {}, 422, 10,
              "video.mp4: not a readable video file"),
             (video, {"steps": "x"}, 422, 2, "Invalid value for 'steps': 'x' is not a valid integer."),
             (video, {"seed": "-1"}, 422, 2, "seed must be a whole number from 0 up"),
             (video, {"speech_start": "1"}, 422, 2, "speech start/end given without a transcript"),
             (video, {"format": "webm"}, 422, 5, "cannot hold the input's h264 video"),
             (video, {"bogus": "1"}, 400, 2, "unknown field 'bogus'"),
             ({}, {"steps": "1"}, 400, 2, "no video: send the clip as the multipart file part 'video'")]
    for files, fields, want_status, want_code, needle in cases:
        status, headers, body = post(server, files, fields)
        answer = json.loads(body)
        assert (status, answer["exit_code"]) == (want_status, want_code), answer
        assert headers["Content-Type"] == "application/json" and needle in answer["error"], answer
        assert "vssflow-serve-" not in answer["error"]              # the server's folders are its own
    before = server.served()
    status, headers, body = post(server, video, {"format": "flac", "steps": "1"})
    assert status == 200 and headers["Content-Type"] == "audio/flac" and body[:4] == b"fLaC"
    server.wait_for_lines("POST /v1/generate 200", before + 1)
    assert list(server.tmp.iterdir()) == []


def test_a_request_without_the_token_gets_401(server, clip4):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        status, answer_headers, body = post(server, {"video": ("clip4.mp4", clip4.read_bytes())}, {}, headers)
        assert status == 401 and answer_headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(body) == {"error": "a valid token is needed: send the header 'Authorization: Bearer TOKEN'",
                                    "exit_code": 2}
    assert healthz(server)["ready"]                                  # health needs no token
    with pytest.raises(urllib.error.HTTPError) as e:                 # Starlette's own refusals: JSON too
        urllib.request.urlopen(server.url("/v1/nothing"), timeout=60)
    assert e.value.code == 404
    assert json.loads(e.value.read()) == {"error": "GET /v1/nothing: Not Found", "exit_code": 2}
    assert not server.matching(TOKEN)                                # never logged


def test_an_upload_over_the_limit_gets_413_before_it_is_read(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest("POST", "/v1/generate")                          # 2 MB announced, none sent
    for k, v in {**AUTH, "Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(2 << 20)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"].endswith("larger than this server's limit of 1 MB")
    conn.close()
    # no length announced (chunked): refused once 1 MB has streamed in
    body, content_type = multipart({"video": ("big.mp4", bytes(3 << 19))}, {})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/generate", body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                 headers={**AUTH, "Content-Type": content_type}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["exit_code"] == 2
    conn.close()
    server.wait_for_lines("POST /v1/generate 413", 2)             # answered, and folders removed
    assert list(server.tmp.iterdir()) == []


def test_metrics_count_what_was_served(server, clip4):
    """Prometheus' text format: requests by path and status, seconds, in flight, audio, the model."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        with urllib.request.urlopen(server.url("/metrics"), timeout=60) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def served(m, status="200"):
        return m.get(("vssflow_requests_total", (("path", "/v1/generate"), ("status", status))), 0)
    before, logged = scrape(), server.served()
    assert post(server, {"video": ("clip4.mp4", clip4.read_bytes())}, {"format": "wav", "steps": "1"})[0] == 200
    assert post(server, {"video": ("clip4.mp4", clip4.read_bytes())}, {}, headers={})[0] == 401
    urllib.request.urlopen(server.url("/healthz"), timeout=60).close()
    server.wait_for_lines("POST /v1/generate 200", logged + 1)             # logged (after its last byte): counted
    after = scrape()
    assert served(after) == served(before) + 1 and served(after, "401") == served(before, "401") + 1
    audio = ("vssflow_audio_seconds_total", ())
    assert after[audio] == pytest.approx(before.get(audio, 0) + 4.0)
    assert after[("vssflow_requests_in_flight", ())] == 0 and after[("vssflow_requests_waiting", ())] == 0
    batches = ("vssflow_batch_requests_count", ())
    assert after[batches] == before.get(batches, 0) + 1            # --batch 1 on a CPU: one request a batch
    assert after[("vssflow_batch_requests_bucket", (("le", "1.0"),))] == after[batches]
    assert after[("vssflow_model_info", (("backend", "ort"), ("model", "tiny"), ("precision", "fp32")))] == 1
    count = ("vssflow_request_seconds_count", (("path", "/v1/generate"),))
    assert after[count] == before.get(count, 0) + 2
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(server.url("/no/such/path"), timeout=60)
    assert scrape()[("vssflow_requests_total", (("path", "other"), ("status", "404")))] >= 1


def test_a_client_leaving_before_its_answer_frees_its_slot_and_folder(server, clip12):
    """Gone once its upload is read: its work is cancelled (499), or it was done already (200)."""
    body, content_type = multipart({"video": ("clip12.mp4", clip12.read_bytes())}, {"format": "wav", "steps": "2"})
    ended = len(server.matching("POST /v1/generate 499")) + server.served()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    conn.request("POST", "/v1/generate", body=body, headers={**AUTH, "Content-Type": content_type})
    conn.sock.shutdown(2)
    conn.close()
    with server.changed:
        assert server.changed.wait_for(lambda: len(server.matching("POST /v1/generate 499"))
                                       + server.served() > ended, timeout=300)
    assert list(server.tmp.iterdir()) == [] and healthz(server)["in_flight"] == 0


def test_busy_is_503_and_sigterm_finishes_the_request_in_flight(server, clip4):
    """Last: it stops the module's server. Two requests half uploaded hold both places: a third
    gets 503; SIGTERM then lets both finish (200) and the server exit 0, leaving no file."""
    body, content_type = multipart({"video": ("clip4.mp4", clip4.read_bytes())}, {"format": "wav", "steps": "1"})
    conns = []
    for _ in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        conn.putrequest("POST", "/v1/generate")
        for k, v in {**AUTH, "Content-Type": content_type, "Content-Length": str(len(body))}.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(body[:1000])
        conns.append(conn)
    assert any(healthz(server)["in_flight"] == 2 for _ in range(10_000))  # once the server has admitted both
    status, headers, answer = post(server, {"video": ("clip4.mp4", clip4.read_bytes())}, {})
    assert status == 503 and headers["Retry-After"] and json.loads(answer)["exit_code"] == 75
    server.proc.send_signal(signal.SIGTERM)
    for conn in conns:
        conn.send(body[1000:])
    for conn in conns:
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "audio/wav" and r.read()[:4] == b"RIFF"
        conn.close()
    assert server.proc.wait(timeout=120) == 0, "\n".join(server.lines)
    assert server.lines[-1].endswith("stopped")
    assert list(server.tmp.iterdir()) == []



@pytest.fixture(scope="module")
def limited(tiny_model, tmp_path_factory):
    """A server whose requests have 1 ms for their answer, clips of 5 s and transcripts of 10 characters."""
    root = tmp_path_factory.mktemp("limited")
    (root / "tmp").mkdir()
    server = Server(["--model", tiny_model, "--port", 0, "--request-timeout", 0.001, "--max-seconds", 5,
                     "--max-transcript", 10], env={**os.environ, "TMPDIR": str(root / "tmp")}, cwd=root)
    server.tmp = root / "tmp"
    yield server
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=120) == 0, "\n".join(server.lines)


def test_limits_are_refused_before_the_model_runs(limited, clip4, clip12):
    status, _, body = post(limited, {"video": ("clip12.mp4", clip12.read_bytes())}, {})
    assert status == 422 and json.loads(body) == {
        "error": "the video is 12.0 s long; this server takes clips of at most 5 s (--max-seconds)", "exit_code": 2}
    status, _, body = post(limited, {"video": ("clip4.mp4", clip4.read_bytes())}, {"transcript": "eleven char"})
    assert status == 422 and "at most 10 (--max-transcript)" in json.loads(body)["error"]
    status, _, pieces = stream(limited, {"video": ("clip12.mp4", clip12.read_bytes())}, {})
    assert status == 422 and "--max-seconds" in json.loads(b"".join(pieces))["error"]
    limited.wait_for_lines(" 422 ", 3)
    assert list(limited.tmp.iterdir()) == []


def test_past_the_request_timeout_504_and_the_work_is_cancelled(limited, clip4):
    """No answer within --request-timeout: 504 (exit 124) before any byte, the slot and folder freed,
    for both paths (the work dropped or stopped: `test_batcher`; the tiny model may be done first)."""
    status, headers, body = post(limited, {"video": ("clip4.mp4", clip4.read_bytes())}, {"steps": "8"})
    assert status == 504 and json.loads(body)["exit_code"] == 124 and "--request-timeout" in json.loads(body)["error"]
    status, _, pieces = stream(limited, {"video": ("clip4.mp4", clip4.read_bytes())}, {"steps": "8"})
    assert status == 504 and json.loads(b"".join(pieces))["exit_code"] == 124
    limited.wait_for_lines("POST /v1/stream 504", 1)
    assert list(limited.tmp.iterdir()) == [] and healthz(limited)["in_flight"] == 0
