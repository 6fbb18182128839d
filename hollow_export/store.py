"""Files that are never half-written and are checked when read back.

In:  tensors, JSON values or a finished temporary folder.
Out: files replaced atomically (write to a temporary name in the same folder,
     fsync, rename), their sha256, and safetensors loads that verify a hash.
Every stage that writes weights, buffers, checkpoints or bundles goes
through here; weights are safetensors or ONNX, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import HollowError


class StoreError(HollowError):
    """A file that is missing, truncated or fails its hash (message names the file and the fix)."""


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> str:
    """Atomically write torch tensors as safetensors; return the file's sha256."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return sha256(path)


def load_tensors(path: Path, expected_sha256: str | None = None) -> dict:
    """Read safetensors as torch tensors, refusing a file whose hash is not the expected one."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    if expected_sha256 is not None and sha256(path) != expected_sha256:
        raise StoreError(f"{path} fails its sha256 check (corrupted or replaced); write it again")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncation
        raise StoreError(f"{path} is not a readable safetensors file ({err}); write it again") from err


@contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
