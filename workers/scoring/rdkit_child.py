"""The RDKit side of scoring: row checks and canonicalisation, Morgan fingerprints for the
applicability-domain column, and the loop a pool child runs (`python -m
workers.scoring.rdkit_child`: length-prefixed JSON requests on stdin, replies on stdout,
exit when stdin closes).

This module imports RDKit and, of the platform, only app.chem (the `app` package imports
nothing heavy) and, when a request asks for fingerprints, workers.ml.domain's torch-free
`morgan_packed` (the function the model's domain reference was built with), so a child does
not load Flask, SQLAlchemy, pandas or torch to canonicalise SMILES.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

from app import chem as _chem

REPLACEMENT_CHAR = "\ufffd"  # what undecodable bytes became when the library was read


def check_and_canonicalise(
    texts: Sequence[str], validate: str = "rdkit", max_length: int = 2000
) -> tuple[list[str | None], list[str | None]]:
    """(canonical SMILES or None, error or None) per text. Never raises for bad input.

    validate="none" skips RDKit: the text is scored as is (it must already be the SMILES
    form the model was trained on); only empty, undecodable and over-long rows fail.
    """
    canon: list[str | None] = []
    errors: list[str | None] = []
    canonical_smiles = _chem.canonical_smiles
    with _chem.quiet_rdkit():
        for text in texts:
            if not text:
                canon.append(None)
                errors.append("empty SMILES")
            elif REPLACEMENT_CHAR in text:
                canon.append(None)
                errors.append("invalid text encoding: the row is not valid UTF-8")
            elif len(text) > max_length:
                canon.append(None)
                errors.append(f"SMILES too long: {len(text)} characters (max_length {max_length})")
            elif validate == "none":
                canon.append(text)
                errors.append(None)
            else:
                c, err = canonical_smiles(text)
                canon.append(c)
                errors.append(err)
    return canon, errors


def packed_fingerprints(canonical: Sequence[str | None], fingerprint: dict[str, Any]) -> bytes:
    """Morgan bits of each canonical SMILES, packed (np.packbits) row after row: nbits / 8
    bytes per row, zeros where there is no molecule. fingerprint: {"radius", "nbits"}."""
    import numpy as np

    from workers.ml.domain import morgan_packed

    nbits = int(fingerprint["nbits"])
    present = [(i, c) for i, c in enumerate(canonical) if c]
    rows = np.zeros((len(canonical), nbits // 8), dtype=np.uint8)
    if present:
        packed = morgan_packed([c for _, c in present], radius=int(fingerprint["radius"]), nbits=nbits)
        rows[[i for i, _ in present]] = packed
    return rows.tobytes()


def handle(request: list[Any]) -> list[Any]:
    """One pool request: [texts, validate, max_length] -> [canonical, errors]; with a 4th
    element {"radius", "nbits"} also the packed fingerprints, base64-encoded."""
    texts, validate, max_length = request[:3]
    canonical, errors = check_and_canonicalise(texts, validate, max_length)
    if len(request) < 4 or request[3] is None:
        return [canonical, errors]
    packed = packed_fingerprints(canonical, request[3])
    return [canonical, errors, base64.b64encode(packed).decode("ascii")]


def serve(stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
    header = struct.Struct("!Q")
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    while True:
        head = stdin.read(header.size)
        if len(head) < header.size:
            return  # the worker closed the pipe (or died)
        (size,) = header.unpack(head)
        data = stdin.read(size)
        if len(data) < size:
            return
        reply = json.dumps(handle(json.loads(data))).encode()
        stdout.write(header.pack(len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    serve()
