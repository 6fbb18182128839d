"""The buffer file: the collected samples the device trains on, checksummed record by record.

In:  a header (bundle id, photo digest, capacity, seed, dtype, shapes) and records (index,
     timestep, clean latent, noise, buffered hidden state).
Out: the file's bytes (`BufferHeader.to_bytes`, `encode_record`), and back (`read_header`,
     `BufferReader`: random access to complete records, never the whole buffer in memory);
     `open_for_append` resumes a partly written buffer after checking the records it holds.
     Layout: android_demo/PROTOCOL.md.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import store
from .errors import RuntimeFault

BUFFER_MAGIC = b"HLWBUF01"
BUFFER_VERSION = 1


@dataclass
class BufferHeader:
    bundle: str  # sha256 of the bundle's manifest.json
    photos: str  # digest of the photo files
    capacity: int
    seed: int
    dtype: str  # float32 | float16 (noise and hidden; latents stay float32)
    latent_shape: list[int]
    hidden_shape: list[int]

    @property
    def record_bytes(self) -> int:
        item = np.dtype(self.dtype).itemsize
        latent, hidden = int(np.prod(self.latent_shape)), int(np.prod(self.hidden_shape))
        return 4 + 4 + 4 * latent + item * latent + item * hidden + 4

    def to_bytes(self) -> bytes:
        body = json.dumps({"format_version": BUFFER_VERSION, **self.__dict__, "record_bytes": self.record_bytes},
                          sort_keys=True).encode()
        return BUFFER_MAGIC + struct.pack("<I", len(body)) + body


def encode_record(header: BufferHeader, index: int, timestep: int, latent, noise, hidden) -> bytes:
    """One record: u32 index, i32 timestep, f32 latent, noise, hidden (header dtype), u32 crc32."""
    body = (struct.pack("<Ii", index, timestep) + np.ascontiguousarray(latent, "<f4").tobytes()
            + np.ascontiguousarray(noise, np.dtype(header.dtype).newbyteorder("<")).tobytes()
            + np.ascontiguousarray(hidden, np.dtype(header.dtype).newbyteorder("<")).tobytes())
    return body + struct.pack("<I", zlib.crc32(body))


def decode_record(header: BufferHeader, raw: bytes, where: str) -> dict:
    body, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
    if zlib.crc32(body) != crc:
        raise RuntimeFault(f"{where} is corrupted (checksum mismatch); delete the buffer and run "
                           "`hollow-export device collect` again")
    index, timestep = struct.unpack("<Ii", body[:8])
    n_lat, n_hid = int(np.prod(header.latent_shape)), int(np.prod(header.hidden_shape))
    item = np.dtype(header.dtype).itemsize
    dt = np.dtype(header.dtype).newbyteorder("<")
    off = 8
    latent = np.frombuffer(body, "<f4", n_lat, off).reshape(header.latent_shape)
    off += 4 * n_lat
    noise = np.frombuffer(body, dt, n_lat, off).reshape(header.latent_shape).astype(np.float32)
    off += item * n_lat
    hidden = np.frombuffer(body, dt, n_hid, off).reshape(header.hidden_shape).astype(np.float32)
    return {"index": index, "timestep": timestep, "latent": latent, "noise": noise, "hidden": hidden}


def read_header(path: Path) -> tuple[BufferHeader, int]:
    """(header, byte offset of the first record); refuses files that are not buffers."""
    path = Path(path)
    if not path.exists():
        raise RuntimeFault(f"buffer {path} does not exist; run `hollow-export device collect` first")
    with open(path, "rb") as f:
        head = f.read(len(BUFFER_MAGIC) + 4)
        if len(head) < len(BUFFER_MAGIC) + 4 or head[:len(BUFFER_MAGIC)] != BUFFER_MAGIC:
            raise RuntimeFault(f"{path} is not a hollow-export buffer (bad magic); pass the file that "
                               "`device collect` wrote")
        (size,) = struct.unpack("<I", head[len(BUFFER_MAGIC):])
        try:
            data = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RuntimeFault(f"{path} has a damaged header; delete it and collect again") from err
    if data.get("format_version") != BUFFER_VERSION:
        raise RuntimeFault(f"{path} is buffer format v{data.get('format_version')}, this tool reads "
                           f"v{BUFFER_VERSION}; collect again")
    try:
        header = BufferHeader(**{k: data[k] for k in BufferHeader.__dataclass_fields__})
    except KeyError as err:
        raise RuntimeFault(f"{path} has a header without {err}; delete it and collect again") from err
    if data.get("record_bytes") != header.record_bytes:
        raise RuntimeFault(f"{path} declares {data.get('record_bytes')}-byte records, its shapes make "
                           f"{header.record_bytes}; delete it and collect again")
    return header, len(BUFFER_MAGIC) + 4 + size


class BufferReader:
    """Random access to complete, checksummed records, never holding the whole buffer in memory."""

    def __init__(self, path: Path, bundle_id: str):
        self.path = Path(path)
        self.header, self.start = read_header(self.path)
        if self.header.bundle != bundle_id:
            raise RuntimeFault(f"{self.path} was collected for another bundle; collect again with this bundle "
                               "(`hollow-export device collect --bundle ...`)")
        complete = (self.path.stat().st_size - self.start) // self.header.record_bytes
        if complete < self.header.capacity:
            raise RuntimeFault(f"{self.path} holds {complete} of {self.header.capacity} samples (truncated or "
                               "unfinished); run `hollow-export device collect` again to finish it")
        check_records(self.path, self.header, self.start, self.header.capacity)  # fails now, not at 3 a.m.
        self.file = open(self.path, "rb")

    def __len__(self):
        return self.header.capacity

    def __getitem__(self, i: int) -> dict:
        self.file.seek(self.start + i * self.header.record_bytes)
        raw = self.file.read(self.header.record_bytes)
        record = decode_record(self.header, raw, f"{self.path} sample {i}")
        if record["index"] != i:
            raise RuntimeFault(f"{self.path} sample {i} is out of place; delete the buffer and collect again")
        return record

    def close(self):
        self.file.close()


def open_for_append(path: Path, header: BufferHeader) -> int:
    """Create the buffer, or check an existing one matches and its records are intact (dropping a record torn
    by a kill). Returns the samples done."""
    if not path.exists() or path.stat().st_size == 0:
        with store.atomic_path(path) as tmp:
            tmp.write_bytes(header.to_bytes())
        return 0
    old, start = read_header(path)
    if old != header:
        what = [k for k in header.__dict__ if getattr(old, k) != getattr(header, k)]
        raise RuntimeFault(f"{path} was collected with other settings ({', '.join(what)} differ); pass a new "
                           "--buffer path or delete this one")
    size = path.stat().st_size
    done = min((size - start) // header.record_bytes, header.capacity)
    if start + done * header.record_bytes != size:
        os.truncate(path, start + done * header.record_bytes)  # a record torn by a kill
    check_records(path, header, start, done)
    return done


def check_records(path: Path, header: BufferHeader, start: int, count: int) -> None:
    """Read the first `count` records once, checking each one's checksum and place (the buffer is never
    held in memory); a damaged record raises the fix."""
    with open(path, "rb") as f:
        f.seek(start)
        for i in range(count):
            record = decode_record(header, f.read(header.record_bytes), f"{path} sample {i}")
            if record["index"] != i:
                raise RuntimeFault(f"{path} sample {i} is out of place; delete the buffer and collect again")


def append_record(f, path: Path, record: bytes) -> None:
    try:
        f.write(record)
        f.flush()
        os.fsync(f.fileno())
    except OSError as err:
        raise RuntimeFault(f"cannot write {path} ({err.strerror}); free disk space and run collect again: "
                           "finished samples are kept") from err
