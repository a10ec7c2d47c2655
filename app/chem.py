"""The one RDKit helper: SMILES validation and canonicalisation with RDKit's own reason
when a SMILES is rejected, and Murcko scaffolds. Shared by dataset ingestion, training
data, online prediction and library scoring (whose RDKit child processes import only
this module and RDKit: the `app` package itself imports nothing heavy)."""

from __future__ import annotations

import contextlib
import re

from rdkit import Chem, rdBase
from rdkit.Chem.Scaffolds import MurckoScaffold

_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ?")
_CAPTURE = getattr(rdBase, "CaptureErrorLog", None)  # RDKit >= 2025.09


def quiet_rdkit() -> contextlib.AbstractContextManager[object]:
    """Context manager that keeps RDKit from printing to stderr (one per batch, not per molecule)."""
    return rdBase.BlockLogs() if hasattr(rdBase, "BlockLogs") else contextlib.nullcontext()


def parse_smiles(smiles: str) -> tuple[Chem.Mol | None, str | None]:
    """(mol, None) or (None, reason). Call inside quiet_rdkit() for batches."""
    if not isinstance(smiles, str) or not smiles.strip():
        return None, "empty SMILES"
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None, _explain(smiles)
    if mol.GetNumAtoms() == 0:
        return None, "SMILES has no atoms"
    return mol, None


def canonical_smiles(smiles: str) -> tuple[str | None, str | None]:
    """Return (canonical SMILES, None) or (None, reason). Call inside quiet_rdkit() for batches."""
    mol, reason = parse_smiles(smiles)
    return (Chem.MolToSmiles(mol), None) if mol is not None else (None, reason)


def murcko_scaffold(smiles: str) -> str:
    """Bemis-Murcko scaffold SMILES (no chirality); "" for acyclic or unparsable molecules."""
    with quiet_rdkit():
        mol, _ = parse_smiles(smiles)
    if mol is None:
        return ""
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)


def _explain(smiles: str) -> str:
    # Parsing again only for the (rare) failures keeps the happy path fast.
    if _CAPTURE is not None:
        with _CAPTURE() as capture:
            Chem.MolFromSmiles(smiles)
        reason = _clean_log(capture.messages, smiles)
        if reason:
            return reason
    mol = Chem.MolFromSmiles(smiles, sanitize=False)
    if mol is None:
        return "SMILES parse error: syntax error"
    problems = Chem.DetectChemistryProblems(mol)
    if problems:
        return "invalid molecule: " + "; ".join(p.Message() for p in problems[:3])
    return "invalid molecule: RDKit could not sanitize it"


def _clean_log(text: str, smiles: str) -> str:
    lines = []
    parse_error = False
    for line in text.splitlines():
        line = _TIMESTAMP.sub("", line).strip()
        if line.startswith("SMILES Parse Error:"):
            parse_error = True
            line = line[len("SMILES Parse Error:") :].strip()
        # skip RDKit's echo of the input, its caret marker and the generic summary line
        if not line or line in smiles or set(line) <= set("~^ ") or line.startswith("Failed parsing SMILES"):
            continue
        line = line.rstrip(":")
        if line not in lines:
            lines.append(line)
    if not lines:
        return ""
    reason = ("SMILES parse error: " if parse_error else "invalid molecule: ") + "; ".join(lines[:3])
    return reason if len(reason) <= 300 else reason[:297] + "..."
