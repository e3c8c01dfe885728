"""A bundle on disk: its manifest, every file checked against the manifest's sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "clad-bundle"
FORMAT_VERSION = 1


class BundleError(Exception):
    """A bundle, image or option that cannot be used; the message names the file or option and the fix."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Bundle:
    """An exported run: ``manifest.json`` and the files it lists (checked when opened)."""

    def __init__(self, root: str | Path, check: bool = True):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise BundleError(f"{path}: no manifest; give the folder written by 'clad export WORK --out DIR'")
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: unreadable manifest ({exc}); export the run again") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest; export the run again with this "
                              "version of clad, or install the clad-run that matches the bundle")
        if check:
            self.verify_files()

    def verify_files(self) -> None:
        """Every listed file present with its recorded sha256; anything else is refused naming the file."""
        for rel, digest in self.manifest["files"].items():
            p = self.root / rel
            if not p.is_file():
                raise BundleError(f"{p}: missing from the bundle; copy the whole bundle again or re-export it")
            if sha256(p) != digest:
                raise BundleError(f"{p}: changed since export (sha256 differs from manifest.json); copy the "
                                  "bundle again or re-export it with 'clad export'")

    def path(self, rel: str) -> Path:
        return self.root / rel

    def array(self, rel: str) -> np.ndarray:
        return np.load(self.root / rel, allow_pickle=False)
