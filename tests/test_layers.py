"""The layers of vmfs_crypt import downwards only (README "Layout", docs/ARCHITECTURE.md).

crypto -> format -> config -> providers -> agent -> fs (the FUSE-free core) -> fuse (adapter) | ops -> cli,
with errors.py, sysutil.py, procs.py and daemon.py below everything. Only the FUSE adapter imports the FUSE
library, only the KMIP provider imports PyKMIP, and nothing in the installed package imports the
development tooling.
"""

import ast
import os

import pytest

from support import REPO

PACKAGE = os.path.join(REPO, "vmfs_crypt")
LAYER = {"errors": 0, "sysutil": 0, "procs": 0, "daemon": 0, "__init__": 0, "crypto": 1, "format": 2, "config": 3,
         "runtime": 3, "providers": 4, "agent": 5, "fs": 6, "fuse": 7, "ops": 7, "cli": 8, "_native": 1}
SIBLINGS_APART = {("fuse", "ops"), ("ops", "fuse")}  # the two users of the core do not import each other


def modules():
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, PACKAGE)[:-3].split(os.sep)
                yield path, rel


def imports(path: str, rel: list[str]):
    """(top-level vmfs_crypt part, external module) of every import in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                yield (parts[1] if parts[0] == "vmfs_crypt" and len(parts) > 1 else None), parts[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                parts = base + (node.module.split(".") if node.module else [])
                if parts:
                    yield parts[0], "vmfs_crypt"
                else:  # "from .. import x": x is a module of the package, or a name of its __init__
                    for alias in node.names:
                        yield (alias.name if alias.name in LAYER else "__init__"), "vmfs_crypt"
            else:
                parts = node.module.split(".")
                yield (parts[1] if parts[0] == "vmfs_crypt" and len(parts) > 1 else None), parts[0]


def layer_of(rel: list[str]) -> str:
    return rel[0]


ALL = sorted(modules(), key=lambda m: m[0])


@pytest.mark.parametrize("path, rel", ALL, ids=[os.path.relpath(p, REPO) for p, _ in ALL])
def test_imports_point_down(path, rel):
    here = layer_of(rel)
    for part, external in imports(path, rel):
        if part is not None:
            assert part in LAYER, f"{path}: imports an unknown part vmfs_crypt.{part}"
            assert LAYER[part] <= LAYER[here], f"{path} ({here}) imports {part}, a higher layer"
            assert (here, part) not in SIBLINGS_APART, f"{path} ({here}) imports its sibling {part}"
        if external in ("mfusepy", "fuse"):
            assert here == "fuse", f"{path}: only the FUSE adapter (vmfs_crypt/fuse) imports the FUSE library"
        if external == "kmip":
            assert rel == ["providers", "kmip"], f"{path}: only providers/kmip.py imports PyKMIP"
        assert external not in ("kmip_tls", "kmip_admin", "support"), f"{path}: imports development tooling"


def test_crypto_and_format_stay_low():
    """crypto imports nothing of ours but errors; format never imports agent, fs, fuse or ops."""
    for path, rel in ALL:
        parts = {p for p, _ in imports(path, rel) if p is not None}
        if rel[0] == "crypto":
            assert parts <= {"errors", "crypto", "_native"}, (path, parts)
        if rel[0] == "format":
            assert not parts & {"agent", "fs", "fuse", "ops", "cli", "providers", "config"}, (path, parts)


def test_every_module_says_what_it_is_for():
    for path, _ in ALL:
        doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read()))
        assert doc and doc.strip(), f"{path} has no module docstring"
