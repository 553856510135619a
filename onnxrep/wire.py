"""The protobuf wire format, as far as onnxrep reads and writes it by hand.

onnxrep walks a model file field by field (io.open_model: every field but the large raw_data is
read, those stay in the file) and writes one the same way (io.save_model: each initializer's
payload streamed after its header). Protobuf readers accept a message's fields in any order, so
a file written field by field parses to the same model; a repeated singular field's last value wins.
"""
from __future__ import annotations

import os

# field numbers (onnx.proto): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
GRAPH, INITIALIZER, RAW_DATA = 7, 5, 9


def varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def key(field: int) -> bytes:
    return varint(field << 3 | 2)  # wire type 2: length-delimited


def field_size(field: int, n: int) -> int:
    return len(key(field)) + len(varint(n)) + n


def write_all(f, buf) -> None:
    """Raw (unbuffered) file writes may be short; write until all of `buf` is out."""
    view = memoryview(buf).cast("B")
    while view:
        n = f.write(view)
        view = view[n:]


class Reader:
    """Bytes of a file by index and slice, read with pread 64 KiB at a time: walking the wire format
    touches only the bytes around each field's key, and (unlike an mmap, whose mapped pages count
    as the process's memory) holds one block."""

    BLOCK = 64 << 10

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self.start, self.block = 0, b""

    def __len__(self) -> int:
        return self.size

    def _read(self, start: int, n: int) -> bytes:
        data = os.pread(self.fd, n, start)
        if len(data) != n:
            raise ValueError("file changed while it was read")
        return data

    def __getitem__(self, k):
        if isinstance(k, slice):
            if self.start <= k.start and k.stop <= self.start + len(self.block):
                return self.block[k.start - self.start:k.stop - self.start]
            return self._read(k.start, k.stop - k.start)
        if not self.start <= k < self.start + len(self.block):
            if not 0 <= k < self.size:
                raise IndexError(k)
            self.start = k
            self.block = self._read(k, min(self.BLOCK, self.size - k))
        return self.block[k - self.start]


def fields(buf, start: int, end: int):
    """(field number, wire type, start of key, start of value, end of value) of each field of
    the message in buf[start:end]; ValueError where the bytes are not wire format."""
    pos = start
    while pos < end:
        key_start = pos
        tag, pos = read_varint(buf, pos, end)
        field, wt = tag >> 3, tag & 7
        if field == 0:
            raise ValueError("field number 0")
        if wt == 0:
            _, vend = read_varint(buf, pos, end)
        elif wt == 1:
            vend = pos + 8
        elif wt == 2:
            n, pos = read_varint(buf, pos, end)
            vend = pos + n
        elif wt == 5:
            vend = pos + 4
        else:  # groups (3, 4) are not used by onnx.proto; 6, 7 do not exist
            raise ValueError(f"wire type {wt}")
        if vend > end:
            raise ValueError("truncated")
        yield field, wt, key_start, pos, vend
        pos = vend


def read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("bad varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
