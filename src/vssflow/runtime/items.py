"""A batch's items, from the command line: videos, folders searched for videos, or a manifest;
each item's output planned before anything runs.

    planned = plan_items([Path("clips/")], output_dir=Path("out"), format=None)
    # clips/a.mp4 -> out/a.mp4, clips/sub/b.mov -> out/sub/b.mov (`output.plan_output(relative=)`)

A manifest is CSV (a header row) or JSON Lines (one object a line), by its extension; its columns
are `MANIFEST_COLUMNS`, only `video` required; relative input paths are relative to the manifest's
folder. An output named in a row is a path below the output folder (one that resolves outside
it, by `..`, an absolute path or a symbolic link, is refused with its line: exit 2); any other
goes into the output folder, named after its input (its path below the folder searched or the
manifest's folder, else its name).

Refused before anything runs: an output folder this process cannot write in (exit 5); an
output (or the report) that would replace any item's input, its video or reference voice, found
by real path and by device and inode, so that symbolic and hard links count (exit 5); two items
that would write the same file (exit 5); a batch with nowhere to write (exit 2); a manifest that
cannot be read (exit 2). An item whose own output
cannot be planned (a codec its container cannot hold, say) fails alone, with exit code 5 in its row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import typing
from collections.abc import Sequence
from pathlib import Path

from .batch import Item
from .errors import OutputError, VssflowError, VssflowInputError
from .files import check_writable
from .output import VIDEO_EXTENSIONS, OutputPlan, plan_output

# Files a folder is searched for: every container written here, and common ones only read.
INPUT_EXTENSIONS = VIDEO_EXTENSIONS + (".mpg", ".mpeg", ".m2ts", ".mts", ".wmv", ".flv", ".3gp", ".ogv", ".gif")
MANIFEST_COLUMNS = ("video", "transcript", "speech_start", "speech_end", "ref_audio", "seed", "output")
MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclasses.dataclass(frozen=True)
class Planned:
    """One item of a batch with its output: `plan`, or the `error` that item alone fails with."""

    index: int
    item: Item
    name: Path                                 # how the item is shown: its path as given or found
    plan: OutputPlan | None = None
    error: VssflowError | None = None

    @property
    def input(self) -> str:
        return os.fspath(self.item.video)

    @property
    def output(self) -> str | None:
        return None if self.plan is None else os.fspath(self.plan.path)


def find_videos(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Video files below `folder` (by extension, any case), sorted; hidden files and folders
    (an interrupted write's `.NAME.partial.EXT`) and everything under `exclude` (the output
    folder, so that a rerun does not take its outputs for inputs) are left out."""
    exclude = exclude.resolve() if exclude is not None else None
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or Path(root, d).resolve() != exclude))
        found += [Path(root, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in INPUT_EXTENSIONS]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


class Row(typing.NamedTuple):
    """One manifest row: its item, the output it names (as written, relative to --output-dir) and
    the line it starts on."""

    item: Item
    output: Path | None
    line: int


def read_manifest(path: Path) -> list[Row]:
    """The rows of a CSV or JSON Lines manifest, read as their formats define them: CSV by the csv
    module, with its own newline handling (a quoted newline is data); JSON Lines split on "\\n"
    only (U+2028 and the other breaks of `str.splitlines` may stand in a JSON string)."""
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise VssflowInputError(f"{path}: a manifest is .csv or .jsonl, got {path.suffix or 'no extension'}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = _csv_rows(path, f) if kind == "csv" else _jsonl_rows(path, f.read())
    except (OSError, UnicodeDecodeError) as e:
        raise VssflowInputError(f"{path}: cannot read the manifest ({getattr(e, 'strerror', None) or e})") from None
    except csv.Error as e:
        raise VssflowInputError(f"{path}: not CSV ({e})") from None
    if not rows:
        raise VssflowInputError(f"{path}: the manifest has no rows")
    return [_manifest_item(path, n, row) for n, row in rows]


def _csv_rows(path: Path, f) -> list[tuple[int, dict]]:
    """(line the row starts on, its cells by column) per row; a quoted value may span lines."""
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        raise VssflowInputError(f"{path}: the manifest is empty")
    _check_columns(path, header)
    rows, start = [], reader.line_num + 1
    for record in reader:
        if len(record) > len(header):
            raise VssflowInputError(f"{path}:{start}: {len(record)} values for {len(header)} columns")
        if record:                              # a blank line is no row
            rows.append((start, dict(zip(header, record))))
        start = reader.line_num + 1
    return rows


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise VssflowInputError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise VssflowInputError(f"{path}:{n}: a row is a JSON object, got {type(row).__name__}")
            _check_columns(path, row, n)
            rows.append((n, row))
    return rows


def _check_columns(path: Path, columns, line: int | None = None) -> None:
    where = f"{path}:{line}" if line else str(path)
    unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
    if unknown:
        raise VssflowInputError(f"{where}: unknown column {unknown[0]!r}: the columns are {', '.join(MANIFEST_COLUMNS)}")
    if "video" not in columns:
        raise VssflowInputError(f"{where}: no 'video' column")


def _manifest_item(path: Path, line: int, row: dict) -> Row:
    """One row: empty cells are absent; input paths relative to the manifest's folder."""
    row = {k: v for k, v in row.items() if v is not None and (not isinstance(v, str) or v.strip() != "")}
    where = f"{path}:{line}"

    def as_path(key: str) -> Path | None:
        if key not in row:
            return None
        p = Path(os.path.expanduser(str(row[key])))
        return p if p.is_absolute() else path.parent / p

    def as_number(key: str, kind):
        if key not in row:
            return None
        value = row[key]
        try:
            if kind is int and (isinstance(value, float) or isinstance(value, bool)):
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            raise VssflowInputError(f"{where}: {key} must be {'an integer' if kind is int else 'a number'}, "
                                    f"got {value!r}") from None

    video = as_path("video")
    if video is None:
        raise VssflowInputError(f"{where}: no video")
    transcript = row.get("transcript")
    item = Item(video, transcript=None if transcript is None else str(transcript),
                speech_start=as_number("speech_start", float), speech_end=as_number("speech_end", float),
                seed=as_number("seed", int), ref_audio=as_path("ref_audio"))
    output = row.get("output")
    return Row(item, None if output is None else Path(os.path.expanduser(str(output))), line)


def plan_items(inputs: Sequence[Path], *, manifest: Path | None = None, output_dir: Path | None = None,
               format: str | None = None, fields: dict | None = None, report: Path | None = None) -> list[Planned]:
    """The batch's items in order (the inputs, each folder's videos, then the manifest's rows),
    each with its output planned. `fields` (the command line's transcript, seed, ...) go to every
    item; a manifest row's own values win. `report`: the report's path, checked like an output.
    Raises before anything runs (and before any folder is made) for a batch that cannot run."""
    # (item, shown as, its output's path below the output folder, that output's format)
    entries: list[tuple[Item, Path, Path, str | None]] = []
    fields = {k: v for k, v in (fields or {}).items() if v is not None}
    if output_dir is None:
        raise VssflowInputError("several inputs: --output-dir DIR says where their results go "
                                "(-o names the output of one input)")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"{output_dir}: not a folder")
    for p in inputs:
        if p.is_dir():
            videos = find_videos(p, exclude=output_dir)
            if not videos:
                raise VssflowInputError(f"{p}: no video files in this folder (looked for {', '.join(INPUT_EXTENSIONS)})")
            entries += [(Item(v, **fields), v, v.relative_to(p), format) for v in videos]
        else:                                   # a missing or unreadable file fails as its own item
            entries.append((Item(p, **fields), p, Path(p.name), format))
    if manifest is not None:
        for row in read_manifest(manifest):
            item = dataclasses.replace(row.item, **{k: v for k, v in fields.items() if getattr(row.item, k) is None})
            video = Path(item.video)
            if row.output is None:
                entries.append((item, video, _below(video, manifest.parent), format))
            else:                               # its extension names its format
                entries.append((item, video, _inside(output_dir, row.output, f"{manifest}:{row.line}"),
                                row.output.suffix.lstrip(".")))
    if not entries:
        raise VssflowInputError("no input: give videos, folders or --manifest FILE")
    planned = []
    for k, (item, name, below, fmt) in enumerate(entries):
        try:
            if fmt == "":                       # a row's output with no extension: refused as -o refuses it
                plan = plan_output(item.video, output_dir / below)
            else:
                plan = plan_output(item.video, format=fmt, folder=output_dir, relative=below)
        except VssflowError as e:
            planned.append(Planned(k, item, name, error=e))
        else:
            planned.append(Planned(k, item, name, plan))
    _refuse_overwriting_inputs(planned, report)
    _refuse_duplicates(planned)
    for folder in sorted({output_dir} | {p.plan.path.parent for p in planned if p.plan is not None}):
        check_writable(folder)                  # or its nearest existing parent: before any model loads
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{output_dir}: cannot make the output folder ({e.strerror or e})") from None
    return planned


def _inside(output_dir: Path, output: Path, where: str) -> Path:
    """A row's `output`'s path below `output_dir` (real paths: `..` and symbolic links resolved),
    or VssflowInputError when it is not there: a manifest must not reach any other file."""
    root = Path(os.path.realpath(output_dir))
    target = Path(os.path.realpath(output_dir / output))
    if target == root or not target.is_relative_to(root):
        raise VssflowInputError(f"{where}: output {output} is outside --output-dir {output_dir}; a row's "
                                "output is a path below it")
    return target.relative_to(root)


def _below(video: Path, folder: Path) -> Path:
    """`video`'s path below `folder` when it is there, else its name."""
    try:
        return video.resolve().relative_to(folder.resolve())
    except ValueError:
        return Path(video.name)


def _refuse_duplicates(planned: list[Planned]) -> None:
    seen: dict[Path, Planned] = {}
    for p in planned:
        if p.plan is None:
            continue
        key = p.plan.path.resolve()
        if key in seen:
            raise OutputError(f"{p.plan.path}: both {seen[key].name} and {p.name} would be written there; "
                              "rename one, or give their outputs in a manifest")
        seen[key] = p


def _identities(path: os.PathLike) -> set[tuple]:
    """What makes two paths one file: the real path (symbolic links followed), and the device and
    inode of an existing file (hard links)."""
    keys = {("path", os.path.realpath(path))}
    try:
        st = os.stat(path)
    except OSError:
        return keys
    return keys | {("inode", st.st_dev, st.st_ino)}


def _refuse_overwriting_inputs(planned: list[Planned], report: Path | None) -> None:
    """Raise OutputError when an output or the report is a file some item reads. An output that
    is its own item's video is left to `plan_output` (that item fails alone; its rename would not
    touch the input's bytes anyway)."""
    inputs: dict[tuple, tuple[Planned, str, object]] = {}        # identity -> (item, what, path)
    for p in planned:
        for what, path in (("video", p.item.video), ("reference voice", p.item.ref_audio)):
            if isinstance(path, (str, os.PathLike)):
                for key in _identities(path):
                    inputs.setdefault(key, (p, what, path))
    writes = [(p.plan.path, p) for p in planned if p.plan is not None]
    writes += [(report, None)] if report is not None else []
    for path, writer in writes:
        for key in _identities(path):
            if key not in inputs:
                continue
            reader, what, source = inputs[key]
            if reader is writer and what == "video":
                continue
            by = f"the output of {writer.name}" if writer is not None else "the report"
            linked = "" if os.fspath(path) == os.fspath(source) else " (the same file, linked)"
            read = f"{reader.name}{linked}, an input of this batch" if what == "video" else \
                f"{source}{linked}, the reference voice of {reader.name}"
            raise OutputError(f"{path}: {by} would replace {read}; choose another "
                              f"{'--output-dir or output name' if writer is not None else '--report'}")
