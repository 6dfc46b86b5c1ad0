"""Fixtures of the reliability tests: one shared Session, the hostile media, a CLI runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vssflow.benchmarks.media import make_video

from tests.reliability import hostile

CLI_TIMEOUT = 120     # seconds; a run that takes longer has hung


@pytest.fixture(scope="session")
def session(tiny_model):
    from vssflow.runtime.session import Session
    return Session(tiny_model, backend="ort")


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="session")
def accepted_videos(media) -> dict[str, Path]:
    """Odd but valid videos that must give a correct sound track (each 1-2 s, one window)."""
    folder = media / "accepted"
    folder.mkdir()
    videos = {"one_frame": folder / "one_frame.mp4", "odd_size": folder / "odd_63x47.mp4",
              "vfr": folder / "vfr.mp4", "rotated": folder / "rotated.mp4"}
    make_video(videos["one_frame"], 1 / 25, 25, hostile.SIZE)
    make_video(videos["odd_size"], 1, 25, (63, 47), pix_fmt="yuv444p")   # 4:2:0 needs even sizes
    make_video(videos["vfr"], 2, 25, hostile.SIZE, vfr=True)
    make_video(videos["rotated"], 1, 25, hostile.SIZE, rotate=90)
    return videos


@pytest.fixture(scope="session")
def sequential_results(session, accepted_videos):
    """Each accepted video generated alone (seed = its position): the reference the
    concurrency tests compare with. Computed once, on first use."""
    return {name: session.generate(path, steps=1, seed=i, keep_intermediates=True)
            for i, (name, path) in enumerate(accepted_videos.items())}


def run_cli(module: str, *args, timeout: float = CLI_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def assert_one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str, tool: str = "vssflow-run"):
    """Exit `code`, no traceback, and the last stderr line is the only error line, holding every needle."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{tool}: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def pausing_cli(output: int = 1) -> str:
    """Python code that runs vssflow-run as users run it, except that it stops itself (SIGSTOP)
    once the first chunk of audio of its `output`-th result has gone to the writer (that file's
    temporary name open, every earlier result complete), so a test signals it at a known point
    of the run whatever the load of the machine: no sleeps, no race with the run finishing first.
    Run it as `python -c CODE ARGS...` and wait for the stop with `os.waitpid(pid, os.WUNTRACED)`."""
    return textwrap.dedent(f"""
        import inspect, os, signal, sys
        from vssflow.runtime import output
        calls = []

        def paused(chunks):
            for i, chunk in enumerate(chunks):
                yield chunk
                if i == 0 and len(calls) == {output}:
                    os.kill(os.getpid(), signal.SIGSTOP)              # the test signals us here

        def pausing(write):
            def wrapped(*args, **kwargs):
                calls.append(1)
                call = inspect.signature(write).bind(*args, **kwargs)
                call.arguments["chunks"] = paused(call.arguments["chunks"])
                return write(*call.args, **call.kwargs)
            return wrapped

        output.write_output = pausing(output.write_output)            # before the CLI imports it
        from vssflow.runtime import cli
        sys.argv[0] = "vssflow-run"
        cli.main()
    """)


def interrupt_when_paused(args: list[str], sig: int, output: int = 1, while_stopped=lambda: None
                          ) -> tuple[int, str]:
    """Run `vssflow-run ARGS` as `pausing_cli(output)`, wait for it to stop itself, call
    `while_stopped()` (the checks of that moment), send `sig` and let it run on: its exit code and
    stderr. A run that ends before it pauses fails the test with its stderr."""
    proc = subprocess.Popen([sys.executable, "-c", pausing_cli(output), *map(str, args)],
                            stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)             # returns once it has stopped itself
        assert os.WIFSTOPPED(status), f"the run ended before it paused: {proc.stderr.read()}"
        while_stopped()
        proc.send_signal(sig)                                      # pending until it runs again
        os.kill(proc.pid, signal.SIGCONT)
        err = proc.stderr.read()
        return proc.wait(timeout=CLI_TIMEOUT), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def listing(folder: Path) -> list[str]:
    """Every name in `folder`, hidden ones included (temporary files start with a dot)."""
    return sorted(p.name for p in folder.iterdir())
