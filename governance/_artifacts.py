"""Content-addressed storage for parametric and activation artifacts (safetensors files).

A file's name is the sha256 of its bytes: ``<data dir>/artifacts/sha256/ab/abcdef....safetensors``.
Writing the same bytes twice stores them once; reading checks the hash again, so a file changed
on disk (bit rot, tampering) is refused instead of being loaded into a model. Only safetensors
is ever written or read: a pickle can run code when it is loaded.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from governance._errors import NotFound, StateConflict

SUFFIX = ".safetensors"


class ArtifactCorrupted(StateConflict):
    """An artifact's bytes no longer hash to its name: it was modified after it was stored."""


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def under(cls, data_dir: str | Path) -> ArtifactStore:
        return cls(Path(data_dir) / "artifacts" / "sha256")

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(ch in "0123456789abcdef" for ch in digest):
            raise NotFound(f"{digest!r} is not an artifact digest (64 hex digits)")
        return self.root / digest[:2] / f"{digest}{SUFFIX}"

    def put(self, data: bytes) -> str:
        """Store ``data`` (durably, in one step) and return its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.is_file() and _sha256_of(target) == digest:
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{digest[:12]}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return digest

    def get(self, digest: str) -> bytes:
        """The artifact's bytes, after checking that they still hash to ``digest``."""
        target = self.path(digest)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"artifact {digest} is not in {self.root} (purged, or another "
                           "machine's data directory)") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise ArtifactCorrupted(f"artifact {digest} was modified on disk (its bytes now hash "
                                    f"to {actual}); refusing to load it: rebuild it")
        return data

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def purge(self, digest: str) -> bool:
        """Delete the file (after an erasure: the weights may reproduce erased text)."""
        target = self.path(digest)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        return True


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
