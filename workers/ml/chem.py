"""RDKit helpers: SMILES canonicalisation with RDKit's own error messages, Murcko scaffolds."""

from __future__ import annotations

import re
from collections.abc import Iterable

from rdkit import Chem, rdBase
from rdkit.Chem.Scaffolds import MurckoScaffold

_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


_PARSE_PREFIX = "SMILES Parse Error: "


def _rdkit_message(captured: str, smiles: str) -> str:
    """RDKit's log lines as one line: "SMILES Parse Error: syntax error while parsing: C1CC(;
    check for mistakes around position 5", "Explicit valence for atom # 1 N, 5, is ..."."""
    lines = [_TIMESTAMP.sub("", ln).strip() for ln in captured.splitlines()]
    parse_error = any(ln.startswith(_PARSE_PREFIX) for ln in lines)
    lines = [ln.removeprefix(_PARSE_PREFIX).rstrip(":") for ln in lines]
    # Drop RDKit's echo of the input, its ~~~^ marker and the closing "Failed parsing" recap.
    keep = [ln for ln in lines if ln and ln != smiles and not set(ln) <= set("~^ ")
            and not ln.startswith("Failed parsing SMILES")]
    message = "; ".join(dict.fromkeys(keep)) or "invalid SMILES"
    return _PARSE_PREFIX + message if parse_error else message


def parse_smiles(smiles: str) -> tuple[Chem.Mol | None, str | None]:
    """(mol, None) or (None, reason). The reason is RDKit's message where it gives one."""
    if not isinstance(smiles, str) or not smiles.strip():
        return None, "empty SMILES"
    with rdBase.CaptureErrorLog() as capture:
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None, _rdkit_message(capture.messages, smiles)
    if mol.GetNumAtoms() == 0:
        return None, "SMILES has no atoms"
    return mol, None


def canonicalize(smiles: str) -> tuple[str | None, str | None]:
    """(canonical SMILES, None) or (None, reason)."""
    mol, err = parse_smiles(smiles)
    if mol is None:
        return None, err
    return Chem.MolToSmiles(mol), None


def canonicalize_many(smiles: Iterable[str]) -> tuple[list[str | None], list[str | None]]:
    canon, errors = [], []
    for s in smiles:
        c, e = canonicalize(s)
        canon.append(c)
        errors.append(e)
    return canon, errors


def murcko_scaffold(smiles: str) -> str:
    """Bemis-Murcko scaffold SMILES (no chirality); "" for acyclic or unparsable molecules."""
    mol, _ = parse_smiles(smiles)
    if mol is None:
        return ""
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)
