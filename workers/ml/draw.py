"""Drawings of attributions: atom highlights on a molecule (RDKit rdMolDraw2D, SVG or PNG)
and a heat map over an image (PNG). Red is a positive weight, blue a negative one; the
colour's opacity and the highlight's radius grow with |weight| (weights in [-1, 1])."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image
from rdkit import Chem
from rdkit.Chem.Draw import rdMolDraw2D

from app.chem import quiet_rdkit

__all__ = ["heatmap_png", "mol_from_smiles", "molecule_png", "molecule_svg"]

POSITIVE = (0.86, 0.08, 0.08)  # red
NEGATIVE = (0.10, 0.30, 0.90)  # blue
_MIN_SHOWN = 0.02  # |weight| below this is not highlighted
_XML_PROLOG = re.compile(r"^<\?xml[^>]*\?>\s*")
_LEGEND_UNSAFE = re.compile(r"[<>&\x00-\x1f\x7f]")
_MAX_IMAGE_SIDE = 1024


def mol_from_smiles(smiles: str) -> Chem.Mol | None:
    """Parse a SMILES keeping explicit hydrogen atoms, so atom i is the SMILES's i-th atom
    token (the numbering workers/ml/explain.py maps weights to); None if RDKit fails."""
    with quiet_rdkit():
        mol = Chem.MolFromSmiles(smiles, sanitize=False)  # sanitize=True would also drop [H] atoms
        if mol is None:
            return None
        try:
            Chem.SanitizeMol(mol)
        except ValueError:  # RDKit's MolSanitizeException
            return None
    Chem.AssignStereochemistry(mol, cleanIt=True, force=True)
    return mol


def _weights(mol: Chem.Mol, atom_weights: Mapping[Any, float] | None) -> dict[int, float]:
    """{atom index: weight clipped to [-1, 1]}; keys may be ints or their strings (JSON)."""
    out: dict[int, float] = {}
    for key, value in (atom_weights or {}).items():
        idx, w = int(key), float(value)
        if not 0 <= idx < mol.GetNumAtoms():
            raise ValueError(f"atom index {idx} out of range for a molecule of {mol.GetNumAtoms()} atoms")
        if math.isfinite(w):
            out[idx] = max(-1.0, min(1.0, w))
    return out


def _draw(drawer: rdMolDraw2D.MolDraw2D, smiles: str, atom_weights: Mapping[Any, float] | None, legend: str) -> None:
    mol = mol_from_smiles(smiles)
    if mol is None:
        raise ValueError(f"cannot draw an invalid SMILES: {smiles!r}")
    weights = _weights(mol, atom_weights)
    shown = {i: w for i, w in weights.items() if abs(w) >= _MIN_SHOWN}
    colours = {i: (*(POSITIVE if w > 0 else NEGATIVE), 0.15 + 0.7 * abs(w)) for i, w in shown.items()}
    radii = {i: 0.25 + 0.2 * abs(w) for i, w in shown.items()}
    drawer.DrawMolecule(
        mol,
        legend=_LEGEND_UNSAFE.sub("", legend),
        highlightAtoms=list(shown),
        highlightAtomColors=colours,
        highlightAtomRadii=radii,
        highlightBonds=[],
    )
    drawer.FinishDrawing()


def molecule_svg(
    smiles: str,
    atom_weights: Mapping[Any, float] | None = None,
    size: tuple[int, int] = (360, 280),
    legend: str = "",
) -> str:
    """A standalone SVG (root `<svg xmlns=...>`, no XML prolog, so it can be inlined in
    HTML) of the molecule with atoms highlighted by weight. The legend is drawn below it;
    `<`, `>`, `&` and control characters are dropped from it."""
    drawer = rdMolDraw2D.MolDraw2DSVG(int(size[0]), int(size[1]))
    _draw(drawer, smiles, atom_weights, legend)
    return _XML_PROLOG.sub("", drawer.GetDrawingText())


def molecule_png(
    smiles: str,
    atom_weights: Mapping[Any, float] | None = None,
    size: tuple[int, int] = (360, 280),
    legend: str = "",
) -> bytes:
    """PNG bytes of the same drawing as `molecule_svg`."""
    drawer = rdMolDraw2D.MolDraw2DCairo(int(size[0]), int(size[1]))
    _draw(drawer, smiles, atom_weights, legend)
    return bytes(drawer.GetDrawingText())


def _rgb(image: np.ndarray) -> np.ndarray:
    """An image (H,W), (H,W,C) or (C,H,W), C <= 4, any numeric dtype -> float [H, W, 3] in [0, 1]."""
    from .data import unit_scale
    from .predict import channels_last

    a = channels_last(image)
    if a.shape[-1] in (2, 4):  # drop alpha
        a = a[..., :-1]
    x = a.astype(np.float32)
    if a.dtype == np.uint8:
        x /= 255.0
    else:
        x /= unit_scale(float(np.nanmax(x)) if x.size else 0.0, a.dtype.kind == "f")
    x = np.clip(np.nan_to_num(x), 0.0, 1.0)
    return np.repeat(x, 3, axis=2) if x.shape[-1] == 1 else x


def heatmap_png(image: np.ndarray, heatmap: np.ndarray, *, min_side: int = 224, opacity: float = 0.6) -> bytes:
    """PNG of `heatmap` (values in [-1, 1]: red positive, blue negative, opacity growing
    with |value|) over `image` (grayscale or RGB). The image is enlarged by a whole factor
    (nearest neighbour, pixels stay sharp) until its longer side reaches `min_side`, or
    shrunk to at most 1024 px; the heat map is resized (bilinear) to the same size."""
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    factor = max(1, math.ceil(min_side / max(h, w)))
    out_h, out_w = h * factor, w * factor
    shrink = min(1.0, _MAX_IMAGE_SIDE / max(out_h, out_w))
    out_h, out_w = max(1, round(out_h * shrink)), max(1, round(out_w * shrink))
    base = Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")
    resample = Image.Resampling.NEAREST if shrink == 1.0 else Image.Resampling.BILINEAR
    pixels = np.asarray(base.resize((out_w, out_h), resample), dtype=np.float32) / 255.0

    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D [H, W], got shape {heat.shape}")
    heat = np.clip(np.nan_to_num(heat), -1.0, 1.0)
    heat_img = Image.fromarray(np.ascontiguousarray(heat), "F").resize((out_w, out_h), Image.Resampling.BILINEAR)
    heat = np.asarray(heat_img, dtype=np.float32)[..., None]
    colour = np.where(heat >= 0, np.asarray(POSITIVE, np.float32), np.asarray(NEGATIVE, np.float32))
    alpha = opacity * np.abs(heat)
    blended = pixels * (1.0 - alpha) + colour * alpha
    buffer = io.BytesIO()
    Image.fromarray((blended * 255).round().astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
