"""The RDKit side of scoring: row checks and canonicalisation, and the loop a pool child
runs (`python -m workers.scoring.rdkit_child`: length-prefixed JSON requests on stdin,
replies on stdout, exit when stdin closes).

This module imports RDKit and, of the platform, only app.chem (the `app` package imports
nothing heavy), so a child does not load Flask, SQLAlchemy or pandas to canonicalise SMILES.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Sequence
from typing import BinaryIO

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
        texts, validate, max_length = json.loads(data)
        reply = json.dumps(check_and_canonicalise(texts, validate, max_length)).encode()
        stdout.write(header.pack(len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    serve()
