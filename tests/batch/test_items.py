"""A batch's items as `items.plan_items` reads them: manifests as their formats define them, and a
row's output kept inside --output-dir."""

from __future__ import annotations

import json

import pytest

from vssflow.runtime.errors import VssflowInputError
from vssflow.runtime.items import plan_items, read_manifest


def test_csv_keeps_quoted_newlines_in_values_and_file_names(tmp_path):
    """The csv module reads the file with its own newline handling (a quoted newline is data)."""
    manifest = tmp_path / "list.csv"
    with open(manifest, "w", newline="") as f:
        f.write('video,transcript\r\n"two\nlines.mp4","hello\nthere"\r\nb.mp4,"one, two"\r\nc.mp4,\r\n')
    planned = plan_items([], manifest=manifest, output_dir=tmp_path / "out", format="wav")
    assert [(p.item.video, p.item.transcript) for p in planned] == [
        (tmp_path / "two\nlines.mp4", "hello\nthere"), (tmp_path / "b.mp4", "one, two"), (tmp_path / "c.mp4", None)]
    assert [row.line for row in read_manifest(manifest)] == [2, 5, 6]       # where each row starts


def test_json_lines_split_on_newline_only(tmp_path):
    """U+2028 and U+2029 are line breaks to str.splitlines, not to JSON Lines: a row may hold them."""
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"video": "a.mp4", "transcript": "hi\u2028there\u2029"}, ensure_ascii=False)
                        + "\n\n" + json.dumps({"video": "b\x85.mp4"}, ensure_ascii=False) + "\r\n",
                        encoding="utf-8")
    planned = plan_items([], manifest=manifest, output_dir=tmp_path / "out", format="wav")
    assert [(p.item.video, p.item.transcript) for p in planned] == [
        (tmp_path / "a.mp4", "hi\u2028there\u2029"), (tmp_path / "b\x85.mp4", None)]
    assert [row.line for row in read_manifest(manifest)] == [1, 3]


def test_a_rows_output_is_relative_to_the_output_folder(tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("video,output\na.mp4,named/a.wav\nb.mp4,\n")
    out = tmp_path / "out"
    planned = plan_items([], manifest=manifest, output_dir=out, format="wav")
    assert [p.output for p in planned] == [str(out / "named" / "a.wav"), str(out / "b.wav")]


@pytest.mark.parametrize("output", ["../x.wav", "sub/../../x.wav", "{tmp}/x.wav", "~/x.wav", "link/x.wav"])
def test_a_rows_output_outside_the_output_folder_is_refused_with_its_line(output, tmp_path):
    """An untrusted manifest must not be able to replace a file elsewhere (`link`: a symbolic link
    in the output folder to a folder outside it)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"video": "a.mp4"}) + "\n" +
                        json.dumps({"video": "b.mp4", "output": output.format(tmp=tmp_path)}) + "\n")
    with pytest.raises(VssflowInputError, match=rf"^{manifest}:2: output .* is outside --output-dir") as e:
        plan_items([], manifest=manifest, output_dir=out, format="wav")
    assert e.value.exit_code == 2
    assert not (tmp_path / "x.wav").exists()
