"""`vssflow-run` with many clips, as a user runs it (a subprocess each): the folder of two good
clips and a broken file, a rerun with --skip-existing, the same through --ray; duplicate outputs,
manifests, Ctrl-C."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from tests.batch.conftest import STEPS
from tests.reliability.conftest import CLI_TIMEOUT, assert_one_line_error, interrupt_when_paused, run_cli
from vssflow.runtime.errors import VideoError, describe
from vssflow.runtime.files import partial_path
from vssflow.runtime.runner import EXIT_SOME_FAILED

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'vssflow[ray]')")


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _partials(folder):
    return [p for p in folder.rglob(".*") if ".partial" in p.name]


def _check_outputs(out, singles):
    for name, path in (("a", out / "a.wav"), ("b", out / "sub" / "b.wav")):
        written, sr = sf.read(path, dtype="float32")
        assert sr == 16000 and written.shape == singles[name].audio.shape
        assert np.abs(written - singles[name].audio).max() <= 1e-5


def _done_when(clips, out, tiny_model, singles, *extra):
    """The folder: two outputs equal to their single runs, the broken file reported with exit 10,
    the batch exit 20; then a rerun with --skip-existing skips both good ones."""
    r = run_cli("vssflow.runtime.cli", clips, "--model", tiny_model, "--output-dir", out, "--format", "wav",
                "--steps", STEPS, "--report", out.parent / "report.jsonl", "--json", *extra)
    assert r.returncode == EXIT_SOME_FAILED and "Traceback" not in r.stderr, r.stderr
    assert "logging.cc" not in r.stderr and "\x1b[" not in r.stderr + r.stdout     # none of Ray's own lines
    rows = _lines(r.stdout)
    assert rows == _lines((out.parent / "report.jsonl").read_text())
    *items, summary = rows
    assert [(row["input"], row["status"]) for row in items] == [
        (str(clips / "a.mp4"), "ok"), (str(clips / "broken.mp4"), "failed"), (str(clips / "sub" / "b.mp4"), "ok")]
    assert items[1]["exit_code"] == VideoError.exit_code and "broken.mp4" in items[1]["error"]
    assert items[0]["seconds"] == 4.0 and items[0]["nfe"] == STEPS and items[0]["wall"] > 0
    assert summary == {**summary, "summary": True, "ok": 2, "failed": 1, "skipped": 0, "exit_code": EXIT_SOME_FAILED}
    _check_outputs(out, singles)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["a.wav", "sub", "sub/b.wav"]

    again = run_cli("vssflow.runtime.cli", clips, "--model", tiny_model, "--output-dir", out, "--format", "wav",
                    "--steps", STEPS, "--skip-existing", "--report", out.parent / "report.jsonl", "--json", *extra)
    assert again.returncode == EXIT_SOME_FAILED, again.stderr
    assert [row["status"] for row in _lines(again.stdout)[:-1]] == ["skipped", "failed", "skipped"]
    assert "skipped" in again.stderr
    # the rerun's rows follow the first run's, whose figures stay
    assert _lines((out.parent / "report.jsonl").read_text()) == rows + _lines(again.stdout)


def test_folder_with_a_broken_file(clips, tmp_path, tiny_model, singles):
    _done_when(clips, tmp_path / "out", tiny_model, singles)


@needs_ray
def test_folder_with_a_broken_file_through_ray(clips, tmp_path, tiny_model, singles):
    """The same on a local Ray instance (2 CPUs in CI); none of its processes or files is left."""
    before = set(os.listdir("/tmp"))
    _done_when(clips, tmp_path / "out", tiny_model, singles, "--ray")
    assert {n for n in set(os.listdir("/tmp")) - before if n.startswith("vssflow-ray-")} == set()


def test_without_ray_the_error_names_the_install_line(clips, tmp_path, tiny_model):
    code = ("import sys; sys.modules['ray'] = None; import importlib.util as u; f = u.find_spec; "
            "u.find_spec = lambda n, *a: None if n == 'ray' else f(n, *a); "
            "from vssflow.runtime import cli; sys.argv[0] = 'vssflow-run'; cli.main()")
    r = subprocess.run([sys.executable, "-c", code, str(clips), "--model", str(tiny_model), "--output-dir",
                        str(tmp_path / "out"), "--ray"], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 4 and "pip install 'vssflow[ray]'" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_duplicate_outputs_are_refused_before_anything_runs(clips, tmp_path, tiny_model):
    out = tmp_path / "out"
    r = run_cli("vssflow.runtime.cli", clips / "a.mp4", clips, "--model", tiny_model, "--output-dir", out)
    assert r.returncode == 5 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"vssflow-run: error: {out / 'a.mp4'}: both {clips / 'a.mp4'} and {clips / 'a.mp4'} would be written "
        "there; rename one, or give their outputs in a manifest")
    assert not out.exists()                                       # refused before anything, the folder too
    r = run_cli("vssflow.runtime.cli", clips / "a.mp4", clips / "sub" / "b.mp4", "--model", tiny_model)
    assert r.returncode == 2 and "--output-dir" in r.stderr


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_with_relative_paths_and_per_row_options(kind, clips, tmp_path, tiny_model, singles, ort_session):
    """Inputs relative to the manifest, a row's output relative to --output-dir; a row's seed,
    transcript and output win over the command line's."""
    rows = [{"video": "clips/sub/b.mp4", "seed": 7, "output": "named/b7.wav"},
            {"video": "clips/sub/b.mp4", "transcript": "hello there", "speech_start": 0.5},
            {"video": "clips/a.mp4"}]
    shutil.copytree(clips, tmp_path / "clips")
    manifest = tmp_path / f"list.{kind}"
    if kind == "csv":
        cols = ["video", "transcript", "speech_start", "seed", "output"]
        manifest.write_text(",".join(cols) + "\n" + "".join(
            ",".join(str(row.get(c, "")) for c in cols) + "\n" for row in rows))
    else:
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    r = run_cli("vssflow.runtime.cli", "--manifest", manifest, "--model", tiny_model, "--output-dir", out,
                "--format", "wav", "--steps", STEPS, "--json", "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert [row["output"] for row in _lines(r.stdout)[:-1]] == [
        str(out / "named" / "b7.wav"), str(out / "clips" / "sub" / "b.wav"), str(out / "clips" / "a.wav")]
    speech = ort_session.generate(clips / "sub" / "b.mp4", steps=STEPS, transcript="hello there", speech_start=0.5)
    for path, ref in ((out / "named" / "b7.wav", singles["b7"].audio), (out / "clips" / "sub" / "b.wav", speech.audio),
                      (out / "clips" / "a.wav", singles["a"].audio)):
        written, _ = sf.read(path, dtype="float32")
        assert written.shape == ref.shape and np.abs(written - ref).max() <= 1e-5


def test_a_bad_manifest_is_refused_with_its_line(tmp_path, tiny_model):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"video": "a.mp4"}\n{"video": "b.mp4", "seed": "x"}\n')
    r = run_cli("vssflow.runtime.cli", "--manifest", manifest, "--model", tiny_model, "--output-dir", tmp_path / "o")
    assert r.returncode == 2 and f"{manifest}:2: seed must be an integer, got 'x'" in r.stderr, r.stderr
    manifest.write_text("video,voice\na.mp4,x.wav\n")
    manifest = manifest.rename(tmp_path / "list.csv")
    r = run_cli("vssflow.runtime.cli", "--manifest", manifest, "--model", tiny_model, "--output-dir", tmp_path / "o")
    assert r.returncode == 2 and "unknown column 'voice'" in r.stderr, r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_batch_keeps_finished_outputs_and_leaves_no_partial(sig, clips, tmp_path, tiny_model):
    out = tmp_path / "out"
    def stopped():                      # the first item complete, the second's partial file open
        assert (out / "a.mp4").is_file() and len(_partials(out)) == 1
    rc, rest = interrupt_when_paused([clips, "--model", tiny_model, "--output-dir", out, "--format", "mp4",
                                      "--steps", "1", "-q"], sig, output=2, while_stopped=stopped)
    assert rc == 130 and "Traceback" not in rest, rest
    assert rest.strip().splitlines()[-1] == ("vssflow-run: interrupted; finished outputs were kept, none was left "
                                             "half-written")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["a.mp4", "sub"]


def _bytes(*paths) -> dict:
    return {p: p.read_bytes() for p in paths}


def test_an_output_that_is_another_items_input_refuses_the_batch(clips, tmp_path, tiny_model):
    """`a b --output-dir b` with a/y.mp4 and b/y.mp4: a's output would replace b's input. Refused
    with exit 5 before the model loads (a missing model folder would exit 3), every input intact."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "y.mp4", tmp_path / "b" / "y.mp4"
    shutil.copy(clips / "a.mp4", a)
    shutil.copy(clips / "sub" / "b.mp4", b)
    before = _bytes(a, b)
    for model in (tmp_path / "nomodel", tiny_model):
        r = run_cli("vssflow.runtime.cli", tmp_path / "a", tmp_path / "b", "--model", model,
                    "--output-dir", tmp_path / "b", "--steps", "1")
        assert_one_line_error(r, 5, str(a), str(b))
        assert _bytes(a, b) == before
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "y.mp4", "y.mp4"]


def test_a_manifest_output_that_is_another_rows_video_refuses_the_batch(clips, tmp_path, tiny_model):
    """A row `a.mp4,b.mp4` beside a row for b.mp4 would destroy b.mp4: exit 5, nothing written."""
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    shutil.copy(clips / "a.mp4", a)
    shutil.copy(clips / "sub" / "b.mp4", b)
    manifest = tmp_path / "list.csv"
    manifest.write_text("video,output\na.mp4,b.mp4\nb.mp4,b.wav\n")
    before = _bytes(a, b, manifest)
    r = run_cli("vssflow.runtime.cli", "--manifest", manifest, "--model", tiny_model, "--output-dir", tmp_path,
                "--steps", "1")
    assert_one_line_error(r, 5, str(a), str(b))
    assert _bytes(a, b, manifest) == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.mp4", "b.mp4", "list.csv"]


@pytest.mark.parametrize("link", ["hardlink", "symlink"])
def test_an_output_linked_to_an_input_refuses_the_batch(link, clips, tmp_path, tiny_model):
    """out/y.mp4, the output of a/y.mp4, is a hard link or a symbolic link to another input, c.mp4."""
    (tmp_path / "a").mkdir(), (tmp_path / "out").mkdir()
    c = tmp_path / "c.mp4"
    shutil.copy(clips / "a.mp4", tmp_path / "a" / "y.mp4")
    shutil.copy(clips / "sub" / "b.mp4", c)
    (os.link if link == "hardlink" else os.symlink)(c, tmp_path / "out" / "y.mp4")
    before = _bytes(c)
    r = run_cli("vssflow.runtime.cli", tmp_path / "a", c, "--model", tmp_path / "nomodel",
                "--output-dir", tmp_path / "out")
    assert_one_line_error(r, 5, str(tmp_path / "out" / "y.mp4"), str(tmp_path / "a" / "y.mp4"), str(c))
    assert _bytes(c) == before and (tmp_path / "out" / "y.mp4").read_bytes() == before[c]


def test_a_report_that_is_an_input_refuses_the_batch(clips, tmp_path, tiny_model):
    a = tmp_path / "a.mp4"
    shutil.copy(clips / "a.mp4", a)
    before = _bytes(a)
    r = run_cli("vssflow.runtime.cli", a, "--model", tmp_path / "nomodel", "--output-dir", tmp_path / "out",
                "--report", a)
    assert_one_line_error(r, 5, str(a), "report")
    assert _bytes(a) == before


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can write in, this test's user included: mode 555, and, for root (whom
    modes do not stop), the immutable attribute; skipped where neither holds."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", folder], capture_output=True).returncode == 0
    try:
        probe = folder / "probe"
        try:
            probe.touch()
        except OSError:
            yield folder
        else:
            probe.unlink()
            pytest.skip("cannot make a folder this user cannot write in")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", folder], check=True)
        folder.chmod(0o755)


@pytest.mark.parametrize("how", ["--output-dir", "-o"])
def test_a_read_only_output_folder_is_refused_before_the_model_loads(how, read_only_folder, clips, tmp_path):
    """Exit 5 in one line before anything is generated (a missing model folder would exit 3)."""
    where = ["--output-dir", read_only_folder, "--report", tmp_path / "r.jsonl"] if how == "--output-dir" else \
        ["-o", read_only_folder / "a.wav"]
    r = run_cli("vssflow.runtime.cli", clips / "a.mp4", "--model", tmp_path / "nomodel", *where)
    assert_one_line_error(r, 5, str(read_only_folder), "cannot write")
    assert list(read_only_folder.iterdir()) == []


def test_a_missing_video_has_one_exit_code_in_a_single_run_a_batch_and_python(tmp_path, tiny_model, ort_session):
    """The README's table: 10 for the video, whether a single run, a batch's row or
    `Session.generate_many`'s exception (through `errors.describe`) says it."""
    missing = tmp_path / "missing.mp4"
    single = run_cli("vssflow.runtime.cli", missing, "--model", tiny_model, "-o", tmp_path / "o.wav")
    batch = run_cli("vssflow.runtime.cli", missing, "--model", tiny_model, "--output-dir", tmp_path / "out", "--json")
    row, summary = _lines(batch.stdout)
    [error] = ort_session.generate_many([missing], steps=1)
    assert single.returncode == row["exit_code"] == describe(error)[1] == VideoError.exit_code, single.stderr
    assert_one_line_error(single, VideoError.exit_code, f"{missing}: no such file")
    assert batch.returncode == EXIT_SOME_FAILED and row["error"] == describe(error)[0]


FULL_AFTER_ONE_ROW = """
import errno, sys
from vssflow.runtime import runner

class FullDisk:                       # a report file on a disk that fills after its first row
    def __init__(self, file):
        self.file, self.rows = file, 0
    def write(self, text):
        if self.rows == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.rows += 1
        return self.file.write(text)
    def __getattr__(self, name):
        return getattr(self.file, name)

class Report(runner.Report):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.file = FullDisk(self.file)

runner.Report = Report
from vssflow.runtime import cli
sys.argv[0] = "vssflow-run"
cli.main()
"""


@pytest.mark.parametrize("disk", ["dev_full", "full_after_one_row"])
def test_a_report_that_cannot_be_written_ends_the_batch_with_exit_5(disk, clips, tmp_path, tiny_model):
    """One line, exit 5; the finished output and the rows written before stay, no partial file."""
    out = tmp_path / "out"
    args = [clips, "--model", tiny_model, "--output-dir", out, "--format", "wav", "--steps", "1"]
    if disk == "dev_full":
        r = run_cli("vssflow.runtime.cli", *args, "--report", "/dev/full")
    else:
        report = tmp_path / "report.jsonl"
        r = subprocess.run([sys.executable, "-c", FULL_AFTER_ONE_ROW, *map(str, args), "--report", report],
                           capture_output=True, text=True, timeout=CLI_TIMEOUT)
        assert [row["input"] for row in _lines(report.read_text())] == [str(clips / "a.mp4")]
    assert_one_line_error(r, 5, "cannot write the report", "No space left on device")
    assert (out / "a.wav").is_file() and sf.info(out / "a.wav").duration == 4.0 and _partials(out) == []


def test_a_second_run_on_the_same_report_is_refused_while_the_first_writes_it(clips, tmp_path, tiny_model):
    """Two runs sharing one --report would interleave into invalid JSON: the second is refused in one
    line (exit 5) while the first (stopped mid-batch) holds the report, and the first ends intact."""
    report = tmp_path / "report.jsonl"
    second = {}
    def stopped():
        second["run"] = run_cli("vssflow.runtime.cli", clips, "--model", tiny_model, "--output-dir", tmp_path / "out2",
                                "--format", "wav", "--steps", "1", "--report", report)
    rc, err = interrupt_when_paused([clips, "--model", tiny_model, "--output-dir", tmp_path / "out", "--format", "wav",
                                     "--steps", "1", "--report", report], signal.SIGCONT, while_stopped=stopped)
    assert_one_line_error(second["run"], 5, str(report), "another vssflow-run is writing this report")
    assert [p for p in (tmp_path / "out2").rglob("*")] == []                # nothing written
    assert rc == EXIT_SOME_FAILED, err
    *items, summary = _lines(report.read_text())
    assert [row["status"] for row in items] == ["ok", "failed", "ok"] and summary["summary"]


def test_partial_files_of_a_run_that_is_gone_are_removed_by_the_next_run(clips, tmp_path):
    """A SIGKILL leaves a `.partial` file; the next batch into that folder removes it (its writer's
    process is gone), never one of a live run (this test's own process stands for one)."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()                                                    # ended and reaped: its pid names no process
    dead = partial_path(out / "sub" / "b.wav", pid=gone.pid)
    live = partial_path(out / "a.wav", pid=os.getpid())
    for p in (dead, live):
        p.write_bytes(b"half a file")
    assert dead.name.startswith(".b.") and dead.name.endswith(".partial.wav") and _partials(out) != []
    r = run_cli("vssflow.runtime.cli", clips, "--model", tmp_path / "nomodel", "--output-dir", out)
    assert_one_line_error(r, 3, "no such model folder")           # after the clean-up, before any model
    assert _partials(out) == [live]


def test_quiet_hides_progress_never_failures_in_the_format_of_a_single_run(clips, tmp_path, tiny_model):
    """-q: the broken file's line alone on stderr, the line a single run of it prints; its row names
    no output (none was written)."""
    broken = clips / "broken.mp4"
    single = run_cli("vssflow.runtime.cli", broken, "--model", tiny_model, "-o", tmp_path / "b.wav", "-q")
    batch = run_cli("vssflow.runtime.cli", clips, "--model", tiny_model, "--output-dir", tmp_path / "out",
                    "--format", "wav", "--steps", "1", "-q", "--json")
    assert batch.returncode == EXIT_SOME_FAILED
    assert batch.stderr.splitlines() == single.stderr.splitlines() and len(single.stderr.splitlines()) == 1
    assert single.stderr.startswith(f"vssflow-run: error: {broken}: ")
    assert [row["output"] for row in _lines(batch.stdout)[:-1]] == [
        str(tmp_path / "out" / "a.wav"), None, str(tmp_path / "out" / "sub" / "b.wav")]
