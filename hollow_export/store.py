"""Files that are never half-written and are checked when read back.

In:  tensors, JSON values or a finished temporary folder.
Out: files replaced atomically (write to a temporary name in the same folder,
     fsync, rename), their sha256, and safetensors loads that verify a hash;
     safetensors written with sorted metadata, so the same tensors give the same bytes.
Output folders (`atomic_dir`): written whole or not at all, marked with the command that wrote
them and their file list; a later run refuses a non-empty folder that is not its own earlier
output, replaces its own only when asked (`overwrite`) and only if nothing else was put there,
and removes work folders that killed runs of the same command left (never one in use).
A write the operating system refuses (read-only folder, full disk) is a StoreError naming the
path. Every stage that writes weights, buffers, checkpoints or bundles goes through here;
weights are safetensors or ONNX, never pickle.
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


def _write_error(path: Path, err: OSError) -> StoreError:
    """The one-line message for a write the operating system refused (read-only folder, full disk)."""
    reason = err.strerror or str(err)
    return StoreError(f"cannot write {path} ({reason}); choose a folder you can write to "
                      "(or free space) and run again")


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it vanishes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        yield Path(tmp)
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as err:
            raise _write_error(path, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value) -> None:
    """JSON in the dict's own key order (callers build it in a fixed order): same value, same bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


def canonical_safetensors(path: Path) -> None:
    """Rewrite a safetensors header in place with its metadata keys sorted.

    The safetensors writer keeps `__metadata__` in a hash map, so two saves of the same tensors
    and metadata can differ in the header's key order; sorting it makes the bytes reproducible.
    Tensor data and offsets are untouched (offsets count from the end of the header).
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    metadata = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the writer pads the header to 8 bytes
    with atomic_path(path) as tmp:
        tmp.write_bytes(len(text).to_bytes(8, "little") + text + data)


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> str:
    """Atomically write torch tensors as safetensors (same tensors, same bytes); return the file's sha256."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    canonical_safetensors(path)
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


OUTPUT_MARKER = ".hollow-export-output.json"  # in every finished output folder: command and files
WORK_LOCK = ".lock"  # beside a work folder `.OUT.xxxx.tmp`: names the command, locked while in use


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def _output_record(folder: Path) -> dict | None:
    """The marker of a finished output folder, or None when there is none (or it is unreadable)."""
    try:
        record = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), list) else None


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be made in it (before any long work)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise _write_error(folder, err) from err


def check_output_dir(path: Path, command: str, overwrite: bool = False) -> None:
    """Refuse an output folder the command may not replace.

    Allowed: a new path, an empty folder, or (with `overwrite`) a finished output of the same command
    holding only the files it wrote, in a folder that can be written. Anything else stays untouched
    and the message names the fix. Called before any long work, and again by `atomic_dir`. First
    settles a replace a kill interrupted (`settle_interrupted_replace`).
    """
    path = Path(path)
    check_writable(path.parent)
    settle_interrupted_replace(path, command)
    if not path.exists():
        return
    if not path.is_dir():
        raise StoreError(f"--out {path} is a file; pass a folder path for the `{command}` output")
    if not any(path.iterdir()):
        return
    record = _output_record(path)
    if record is None or record.get("command") != command:
        raise StoreError(f"--out {path} is not empty and is not an earlier `{command}` output; "
                         "pass a new or empty folder (nothing was written)")
    if not overwrite:
        raise StoreError(f"--out {path} holds an earlier `{command}` output; pass --overwrite to replace it "
                         "or choose another folder")
    foreign = sorted(set(_files_under(path)) - set(record["files"]) - {OUTPUT_MARKER})
    if foreign:
        raise StoreError(f"--out {path} holds files `{command}` did not write ({', '.join(foreign[:3])}); "
                         "move them out or choose another folder (nothing was replaced)")


def settle_interrupted_replace(path: Path, command: str) -> list[Path]:
    """Finish what a killed `atomic_dir` replace left: it moves the earlier output aside (`.NAME.*.old`),
    renames the new one in, then deletes the aside copy. Killed between the renames, `path` is gone and the
    earlier output waits aside: it is put back (the killed run never finished, so its output does not
    count). Killed before the delete, the aside copy is removed. Only folders holding a finished output
    of `command`, and only while no writer of `command` is at work beside `path`; returns what it moved
    or removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    if any(_writer(w, command) == "live" for w in path.parent.glob(f".{path.name}.*.tmp")):
        return []  # a live writer may be between its two renames right now
    settled = []
    for old in sorted(path.parent.glob(f".{path.name}.*.old")):
        record = _output_record(old)
        if not old.is_dir() or record is None or record.get("command") != command:
            continue
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
            _fsync_dir(path.parent)
        settled.append(old)
    return settled


def check_apart(out: Path, inputs: dict[str, Path | None]) -> None:
    """Refuse an output folder that is, contains or lies inside one of the command's inputs."""
    out = Path(out).resolve()
    for option, given in inputs.items():
        if given is None:
            continue
        folder = Path(given).resolve()
        if out == folder or folder in out.parents or out in folder.parents:
            raise StoreError(f"--out {out} overlaps {option} {given}; write the output to a folder "
                             "outside the inputs")


def _writer(folder: Path, command: str) -> str | None:
    """The state of a work folder's writer: "live" (its lock file names `command` and is locked), "gone"
    (it names `command` and is not locked: the writer was killed), None (no such lock file: not provably ours)."""
    import fcntl

    try:
        fd = os.open(_lock_of(folder), os.O_RDONLY)
    except OSError:
        return None
    try:
        if os.read(fd, 200).decode(errors="replace") != command:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return "live"
        return "gone"
    finally:
        os.close(fd)


def _lock_of(work: Path) -> Path:
    return work.with_name(work.name + WORK_LOCK)


def clean_stale_work(path: Path, command: str) -> list[Path]:
    """Remove work folders a killed `command` left beside `path` (only provably ours and unused)."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for folder in path.parent.glob(f".{path.name}.*.tmp"):
        if folder.is_dir() and _writer(folder, command) == "gone":
            shutil.rmtree(folder, ignore_errors=True)
            _lock_of(folder).unlink(missing_ok=True)
            removed.append(folder)
    return removed


@contextmanager
def atomic_dir(path: Path, command: str, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success it becomes `path` whole.

    `command` names the writer (e.g. "build"): the finished folder records it with its file list,
    so a later run replaces it only with `overwrite` and only if it holds nothing else
    (`check_output_dir`). While in use the work folder holds a locked file naming the command, so a
    later run removes work folders of killed runs and never one still being written.
    """
    import fcntl

    path = Path(path)
    check_output_dir(path, command, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_work(path, command)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        lock = os.open(_lock_of(tmp), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.write(lock, command.encode())
        yield tmp
        files = _files_under(tmp)
        with open(tmp / OUTPUT_MARKER, "w") as f:
            f.write(json.dumps({"command": command, "files": files}, indent=2) + "\n")
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700
            check_output_dir(path, command, overwrite)  # again: something may have appeared meanwhile
            if path.exists() and any(path.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)  # only files this command wrote (checked above)
            else:
                os.replace(tmp, path)  # a missing or empty folder
            _fsync_dir(path.parent)
        except OSError as err:
            raise _write_error(path, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _lock_of(tmp).unlink(missing_ok=True)
        os.close(lock)
