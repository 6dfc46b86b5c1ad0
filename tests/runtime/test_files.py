"""Partial files: named after their writer, removed once it is gone, never a live or a remote one's."""

import os
import subprocess
import sys

from vssflow.runtime.files import HOST, partial_path, remove_stale_partials


def test_only_partials_of_gone_processes_of_this_machine_are_removed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "sub").mkdir()
    dead, below = partial_path(tmp_path / "a.wav", pid=gone.pid), partial_path(tmp_path / "sub" / "b.mp4", pid=gone.pid)
    live = partial_path(tmp_path / "c.wav")                                 # this process
    remote = dead.with_name(dead.name.replace(f".{HOST}-", ".another_host-"))  # a shared filesystem's
    unnamed = tmp_path / ".d.0123456789ab.partial.wav"                      # written before names held a pid
    for p in (dead, below, live, remote, unnamed):
        p.write_bytes(b"")
    assert remove_stale_partials(tmp_path) == [dead]
    assert remove_stale_partials(tmp_path, recursive=True) == [below]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, remote.name, unnamed.name, "sub"])
