"""A model folder written by `vssflow-export`: its manifest, checked before anything runs.

Every file the manifest lists is checked at each open: present, of its size, and, unless it
is unchanged since a check of its sha256 (a stamp of its size, mtime and inode kept beside the
manifest, or in the user's cache where the folder is read-only), its sha256. So a start reads no
gigabytes when nothing changed, and a copied or edited file is hashed again. `verify_hashes=True`
(`vssflow-run --verify`) hashes every file regardless.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

from .contracts import ModelSizes, StageContract
from .errors import ModelFolderError, VssflowError
from .files import write_atomic

FORMAT_VERSION = 1              # of manifest.json: written by the exporter, the newest this reads
STAMP = ".verified.json"        # files whose sha256 was checked, by (size, mtime, inode)
# A file changed within this long before its stamp was written might not change its mtime (the
# clock ticks coarsely): such a file is never taken as verified by that stamp.
RACY_NS = 50_000_000


def vssflow_home() -> Path:
    """Where vssflow keeps models it makes itself (the demo, benchmark models): $VSSFLOW_HOME or ~/.cache/vssflow."""
    return Path(os.environ.get("VSSFLOW_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "vssflow"))


def demo_model_dir() -> Path:
    return vssflow_home() / "demo-model"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    path: Path
    manifest: dict
    sizes: ModelSizes
    contracts: dict[str, StageContract]

    @property
    def is_demo(self) -> bool:
        return bool(self.manifest.get("demo"))

    def file(self, name: str) -> Path:
        """A file of the folder; only files listed (and so checked) in manifest.json are handed out."""
        if name not in self.manifest["files"]:
            raise ModelFolderError(f"{self.path}: {name} is not listed in manifest.json (re-export the model)")
        return self.path / name

    @classmethod
    def open(cls, path: str | Path, verify_hashes: bool = False) -> ModelFolder:
        """Read and check the folder: sizes always; sha256 of every file changed since its
        stamp, or of every file with `verify_hashes`. Raises ModelFolderError (exit 3)."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not path.is_dir():
            raise ModelFolderError(f"{path}: no such model folder (create one with vssflow-export)")
        if not manifest_path.is_file():
            raise ModelFolderError(f"{path}: no manifest.json: not a model folder written by vssflow-export")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise ModelFolderError(f"{manifest_path}: unreadable ({e})") from None
        if not isinstance(manifest, dict):
            raise ModelFolderError(f"{manifest_path}: malformed manifest (not a JSON object)")
        version = manifest.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ModelFolderError(f"{manifest_path}: no format_version")
        if version > FORMAT_VERSION:
            raise ModelFolderError(f"{manifest_path}: format version {version} is newer than this vssflow "
                                   f"reads ({FORMAT_VERSION}); upgrade vssflow or re-export")
        try:
            sizes = ModelSizes(**manifest["sizes"])
            contracts = {k: StageContract.from_json(k, v) for k, v in manifest["contracts"].items()}
            files = manifest["files"]
            if not all(isinstance(e, dict) for e in files.values()):
                raise TypeError("a files entry is not an object")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelFolderError(f"{manifest_path}: malformed manifest ({type(e).__name__}: {e})") from None
        for name, entry in files.items():
            if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
                raise ModelFolderError(f"{manifest_path}: lists {name!r}, which is not a file name inside the folder")
            f = path / name
            if not f.is_file():
                raise ModelFolderError(f"{path}: {name} is listed in manifest.json but missing")
            if f.stat().st_size != entry.get("bytes"):
                raise ModelFolderError(f"{path}: {name} has {f.stat().st_size} bytes, manifest says {entry.get('bytes')}")
        _check_hashes(path, files, sha256(manifest_path), everything=verify_hashes)
        return cls(path, manifest, sizes, contracts)


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _stamp_places(folder: Path) -> list[Path]:
    """In the folder, else (read-only folders) in the user's cache, by the folder's real path."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    return [folder / STAMP, vssflow_home() / "verified" / f"{key}.json"]


def _read_stamp(folder: Path, manifest_sha: str) -> dict[str, list[int]]:
    """The files verified since their last change, as the stamp of this manifest says."""
    for place in _stamp_places(folder):
        try:
            stamp = json.loads(place.read_text())
            if stamp.get("manifest_sha256") != manifest_sha:
                continue
            safe_before = int(stamp["written_ns"]) - RACY_NS
            return {k: v for k, v in stamp["files"].items() if isinstance(v, list) and len(v) == 3
                    and v[1] < safe_before}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return {}


def write_stamp(folder: Path, manifest_sha: str, files: list[str]) -> None:
    """Record `files` (their sha256 just checked) as verified; best effort: a folder and a cache
    that cannot be written only mean the hashes are checked again next time."""
    stamp = json.dumps({"manifest_sha256": manifest_sha, "written_ns": time.time_ns(),
                        "files": {name: _fingerprint(folder / name) for name in files}})
    for place in _stamp_places(folder):
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(place, stamp)
            return
        except (OSError, VssflowError):             # a read-only folder (OutputError), a full disk
            continue


def _check_hashes(folder: Path, files: dict, manifest_sha: str, everything: bool) -> None:
    verified = {} if everything else _read_stamp(folder, manifest_sha)
    checked = []
    for name, entry in files.items():
        if verified.get(name) == _fingerprint(folder / name):
            continue
        if sha256(folder / name) != entry.get("sha256"):
            raise ModelFolderError(f"{folder}: {name} does not match its sha256 in manifest.json (altered or damaged)")
        checked.append(name)
    if checked:
        write_stamp(folder, manifest_sha, list(files))


def update_manifest(folder: Path, added: list[str], merge: dict[str, dict]) -> dict:
    """List `added` (files already in `folder`) in its manifest.json with their size and sha256, and
    merge `merge` into the manifest's top-level objects (`{"report": {"tensorrt": ...}}`); the
    manifest is replaced atomically, the one moment a reader sees the folder change, then stamped.

    Call right after `ModelFolder.open(folder)`, which checked every file already listed: the
    stamp records them, and the added ones hashed here, as verified.
    """
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for name in added:
        manifest["files"][name] = {"sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size}
    for key, value in merge.items():
        manifest[key] = {**manifest.get(key, {}), **value}
    write_atomic(manifest_path, json.dumps(manifest, indent=1))
    write_stamp(folder, sha256(manifest_path), list(manifest["files"]))
    return manifest
