"""A model folder written by `vssflow-export`: its manifest, checked before anything runs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from .contracts import ModelSizes, StageContract
from .errors import ModelFolderError

SUPPORTED_FORMAT = 1


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
    def open(cls, path: str | Path, verify_hashes: bool = True) -> ModelFolder:
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
        if version > SUPPORTED_FORMAT:
            raise ModelFolderError(f"{manifest_path}: format version {version} is newer than this vssflow "
                                   f"reads ({SUPPORTED_FORMAT}); upgrade vssflow or re-export")
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
            if verify_hashes and sha256(f) != entry.get("sha256"):
                raise ModelFolderError(f"{path}: {name} does not match its sha256 in manifest.json (altered or damaged)")
        return cls(path, manifest, sizes, contracts)
