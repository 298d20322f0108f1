"""A training directory packed so that it can travel through a git repository, and unpacked again.

Where nothing survives a machine but the repository (the sessions this project is built in end after 180
minutes on a fresh machine), an unfinished training run can only resume in the next session if its
checkpoint is committed. A LoRA r16 attention+MLP checkpoint is ~60 MB (the adapter in fp32 and AdamW's two
moments), over the per-file limit a repository should hold, so :func:`pack` copies the directory with every
file larger than ``max_file_bytes`` cut into numbered parts, and :func:`unpack` joins them back, checking each
file's SHA-256. Nothing is converted: the resumed run starts from the very bytes the interrupted one wrote, so
it ends with the adapter an uninterrupted run would have (``tests/model_store/test_training.py``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

MANIFEST = "carry.json"
DEFAULT_MAX_FILE_BYTES = 19 * 2**20
_CHUNK = 2**20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def pack(src: Path, dest: Path, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> dict[str, dict]:
    """Copy ``src`` into a new ``dest`` (replaced if it exists), cutting files over ``max_file_bytes`` into
    ``<name>.part000``, ``<name>.part001``…; returns the manifest written to ``dest/carry.json``."""
    if max_file_bytes <= 0:
        raise ValueError("max_file_bytes must be positive")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    files: dict[str, dict] = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        if rel == MANIFEST:
            raise ValueError(f"{src} already holds a {MANIFEST}: pack the training directory, not a packed one")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        size = path.stat().st_size
        entry = {"bytes": size, "sha256": _sha256(path), "parts": 0}
        if size <= max_file_bytes:
            shutil.copy2(path, target)
        else:
            with path.open("rb") as f:
                while block := f.read(max_file_bytes):
                    (target.parent / f"{target.name}.part{entry['parts']:03d}").write_bytes(block)
                    entry["parts"] += 1
        files[rel] = entry
    (dest / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")
    return files


def unpack(src: Path, dest: Path) -> None:
    """Rebuild the directory :func:`pack` wrote in ``src`` as ``dest`` (which must not exist yet); raises
    ``ValueError`` if a file's parts are missing or its bytes differ from what was packed."""
    if dest.exists():
        raise FileExistsError(f"{dest} exists: a carried run is unpacked only where none is in progress")
    files = json.loads((src / MANIFEST).read_text())["files"]
    tmp = dest.with_name(dest.name + ".unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, entry in files.items():
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry["parts"] == 0:
            shutil.copy2(src / rel, target)
        else:
            with target.open("wb") as out:
                for i in range(entry["parts"]):
                    part = src / f"{rel}.part{i:03d}"
                    if not part.exists():
                        raise ValueError(f"{part} is missing")
                    out.write(part.read_bytes())
        if target.stat().st_size != entry["bytes"] or _sha256(target) != entry["sha256"]:
            raise ValueError(f"{rel}: the unpacked bytes differ from the packed file's")
    tmp.rename(dest)
