"""No folder of the repository is importable as a top-level module while the tests run.

A registry package named like one of our folders (`kernels` is one: transformers imports it) would
otherwise be shadowed by the folder, or shadow it. The packages live under src/ and import only as
vssflow.*; pytest runs with --import-mode=importlib from its script, so the root is not on sys.path.
"""

import importlib.machinery
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_root_is_not_on_sys_path():
    on_path = [p for p in sys.path if Path(p or ".").resolve() == ROOT]
    assert on_path == [], f"the repository root is on sys.path: {on_path}"


def test_no_top_level_folder_is_importable():
    folders = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier())
    assert {"src", "tests", "scripts"} <= set(folders)
    found = {}
    for name in folders:
        spec = importlib.machinery.PathFinder.find_spec(name)     # sys.path only, not sys.modules
        locations = list(spec.submodule_search_locations or []) if spec else []
        ours = [loc for loc in locations + [spec.origin if spec else None]
                if loc and Path(loc).resolve().is_relative_to(ROOT)]
        if ours:
            found[name] = ours
    assert found == {}, f"folders of the repository importable as top-level modules: {found}"


def test_vssflow_is_the_installed_package():
    import vssflow.kernels
    import vssflow.runtime
    assert Path(vssflow.runtime.__file__).resolve().is_relative_to(ROOT / "src" / "vssflow")
    assert Path(vssflow.kernels.__file__).resolve().is_relative_to(ROOT / "src" / "vssflow")
