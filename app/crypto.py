"""Encryption at rest: a segmented AES-GCM file format and data-key wrapping.

A file is a header followed by segments. Each segment holds SEGMENT plaintext bytes
(the last one fewer, possibly none) sealed with AES-256-GCM under a key derived for this
file alone (HKDF-SHA256 of the tenant's data key and a random salt), so nonces never
repeat across files. The nonce is the file's random prefix plus the segment index; the
associated data is the header, the file's binding (tenant and path), the segment index
and a final-segment flag, so an edited header, a segment moved within or between files,
a dropped tail or a file swapped for another all fail authentication.

Segments make the plaintext seekable: reading byte offset n decrypts only the segment that
holds it, so readers never need the whole file in memory.

    header = MAGIC(4) | version(1) | log2(segment size)(1) | reserved(2)
             | tenant id(8) | data key id(8) | salt(16) | nonce prefix(8)    -- 48 bytes
    segment i = AES-GCM(file key, prefix | i(4), plaintext_i, header | binding | i(8) | final(1))
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

MAGIC = b"MMAE"
VERSION = 1
SEGMENT_LOG2 = 16  # 64 KiB plaintext per segment
TAG = 16
KEY_BYTES = 32
_HEADER = struct.Struct(">4sBBH QQ 16s 8s")
HEADER_SIZE = _HEADER.size


class DecryptionError(ValueError):
    """A file that is not what its header says: tampered, truncated, reordered or the wrong key."""


def parse_master_key(text: str) -> bytes:
    """The 32 bytes of a base64 master key; ValueError with the reason otherwise."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("MEDMAAS_ENCRYPTION_KEY is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"MEDMAAS_ENCRYPTION_KEY must be base64 of {KEY_BYTES} bytes, not {len(key)}")
    return key


def new_master_key() -> str:
    """A fresh master key as MEDMAAS_ENCRYPTION_KEY expects it (base64 of 32 random bytes)."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def key_fingerprint(key: bytes) -> str:
    """A short public id of a key (it names the master key a data key is wrapped with)."""
    return hashlib.sha256(b"medmaas-key-id\x00" + key).hexdigest()[:16]


def _wrap_aad(tenant_id: int) -> bytes:
    return b"medmaas-data-key\x00" + struct.pack(">Q", tenant_id)


def wrap_key(master: bytes, tenant_id: int, data_key: bytes) -> bytes:
    """nonce | AES-GCM(master, data key), bound to the tenant."""
    nonce = os.urandom(12)
    return nonce + AESGCM(master).encrypt(nonce, data_key, _wrap_aad(tenant_id))


def unwrap_key(master: bytes, tenant_id: int, wrapped: bytes) -> bytes:
    try:
        return AESGCM(master).decrypt(wrapped[:12], wrapped[12:], _wrap_aad(tenant_id))
    except InvalidTag:
        raise DecryptionError(f"the data key of tenant {tenant_id} does not open with this master key") from None


@dataclass(frozen=True)
class Header:
    tenant_id: int
    key_id: int
    salt: bytes
    prefix: bytes
    segment_log2: int = SEGMENT_LOG2

    @property
    def segment(self) -> int:
        return 1 << self.segment_log2

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, self.segment_log2, 0, self.tenant_id, self.key_id, self.salt, self.prefix)

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) < HEADER_SIZE or not raw.startswith(MAGIC):
            raise DecryptionError("not an encrypted file (no header)")
        _magic, version, log2, _, tenant_id, key_id, salt, prefix = _HEADER.unpack(raw[:HEADER_SIZE])
        if version != VERSION or not 12 <= log2 <= 24:
            raise DecryptionError(f"unsupported encrypted file (version {version}, segment 2^{log2})")
        return cls(tenant_id, key_id, salt, prefix, log2)


def is_encrypted(head: bytes) -> bool:
    return head[:4] == MAGIC


class _Sealer:
    """Seals and opens the segments of one file."""

    def __init__(self, data_key: bytes, header: Header, binding: bytes) -> None:
        self.header = header
        packed = header.pack()
        self._aad = packed + struct.pack(">I", len(binding)) + binding
        file_key = HKDF(hashes.SHA256(), KEY_BYTES, salt=header.salt, info=b"medmaas-file-v1\x00" + binding).derive(
            data_key
        )
        self._aead = AESGCM(file_key)

    def _nonce(self, index: int) -> bytes:
        return self.header.prefix + struct.pack(">I", index)

    def _segment_aad(self, index: int, final: bool) -> bytes:
        return self._aad + struct.pack(">QB", index, final)

    def seal(self, index: int, plaintext: bytes, final: bool) -> bytes:
        if index >= 1 << 32:
            raise ValueError("file too large for the encrypted format")
        return self._aead.encrypt(self._nonce(index), plaintext, self._segment_aad(index, final))

    def open(self, index: int, ciphertext: bytes, final: bool) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(index), ciphertext, self._segment_aad(index, final))
        except InvalidTag:
            raise DecryptionError(
                f"segment {index} fails authentication: the file was modified, truncated, reordered, "
                "moved, or is opened with the wrong key"
            ) from None


class EncryptedWriter(io.RawIOBase):
    """Write-only, append-only plaintext sink that stores segments to ``sink``. ``close()``
    seals the final segment; ``tell()`` is the plaintext position (Parquet writers use it)."""

    def __init__(
        self, sink: io.RawIOBase | io.BufferedIOBase, data_key: bytes, tenant_id: int, key_id: int, binding: bytes
    ) -> None:
        header = Header(tenant_id, key_id, os.urandom(16), os.urandom(8))
        self._sealer = _Sealer(data_key, header, binding)
        self._sink = sink
        self._sink.write(header.pack())
        self._buf = bytearray()
        self._index = 0
        self._written = 0
        self._segment = header.segment

    def writable(self) -> bool:
        return True

    def write(self, b: ReadableBuffer) -> int:
        data = memoryview(b).cast("B")
        self._buf += data
        self._written += len(data)
        seg = self._segment
        # Keep at least one byte buffered (or a full segment) so close() always has the final one.
        if len(self._buf) > seg:
            cut = (len(self._buf) - 1) // seg * seg
            for start in range(0, cut, seg):
                self._sink.write(self._sealer.seal(self._index, bytes(self._buf[start : start + seg]), False))
                self._index += 1
            del self._buf[:cut]
        return len(data)

    def tell(self) -> int:
        return self._written

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._sink.write(self._sealer.seal(self._index, bytes(self._buf), True))
            self._buf.clear()
            self._sink.close()
        finally:
            super().close()

    def discard(self) -> None:
        """Close the sink without sealing the final segment (the file stays unreadable)."""
        if not self.closed:
            self._sink.close()
            super().close()


class EncryptedReader(io.RawIOBase):
    """Seekable, read-only plaintext view of an encrypted file. Decrypts one segment at a
    time; opening it checks the last segment, so a truncated file fails at once."""

    def __init__(
        self, source: io.RawIOBase | io.BufferedIOBase, key_for: Callable[[Header], bytes], binding: bytes
    ) -> None:
        self._src = source
        try:
            header = Header.unpack(source.read(HEADER_SIZE))
            self._sealer = _Sealer(key_for(header), header, binding)
            self._segment = header.segment
            self._stride = self._segment + TAG
            body = source.seek(0, io.SEEK_END) - HEADER_SIZE
            if body < TAG:
                raise DecryptionError("truncated encrypted file (no final segment)")
            self._count = -(-body // self._stride)
            last = body - (self._count - 1) * self._stride
            if last < TAG:
                raise DecryptionError("truncated encrypted file (partial segment)")
            self._size = (self._count - 1) * self._segment + last - TAG
            self._pos = 0
            self._cached: tuple[int, bytes] = (-1, b"")
            self._load(self._count - 1)
        except BaseException:
            source.close()
            raise

    @property
    def header(self) -> Header:
        return self._sealer.header

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        pos = base + offset
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def _load(self, index: int) -> bytes:
        if self._cached[0] != index:
            self._src.seek(HEADER_SIZE + index * self._stride)
            final = index == self._count - 1
            want = self._size - index * self._segment + TAG if final else self._stride
            raw = self._src.read(want)
            if len(raw) != want:
                raise DecryptionError(f"segment {index} is short: the file changed while it was read")
            self._cached = (index, self._sealer.open(index, raw, final))
        return self._cached[1]

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._size:
            index, within = divmod(self._pos, self._segment)
            plain = self._load(index)
            n = min(len(view) - done, len(plain) - within)
            view[done : done + n] = memoryview(plain)[within : within + n]
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        if not self.closed:
            self._src.close()
        super().close()
