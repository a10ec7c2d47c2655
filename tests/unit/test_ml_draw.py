"""Drawings (workers/ml/draw.py): standalone SVG and PNG of weighted molecules, heat-map PNGs."""

import io
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from workers.ml.draw import heatmap_png, mol_from_smiles, molecule_png, molecule_svg

SVG_NS = "{http://www.w3.org/2000/svg}"


def test_svg_is_standalone_and_parses():
    svg = molecule_svg("CC(=O)Oc1ccccc1C(=O)O", {0: 1.0, 3: -0.6, "5": 0.3}, size=(300, 200), legend="aspirin")
    assert svg.startswith("<svg")
    assert "<?xml" not in svg
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG_NS}svg"
    assert root.get("width") == "300px"
    fills = {e.get("class"): re.search(r"fill:#(\w{6})", e.get("style", "")) for e in root.iter(f"{SVG_NS}ellipse")}
    assert set(fills) == {"atom-0", "atom-3", "atom-5"}
    red, blue = (bytes.fromhex(fills[a].group(1)) for a in ("atom-0", "atom-3"))  # type: ignore[union-attr]
    assert red[0] > red[2]
    assert blue[2] > blue[0]


def test_svg_without_weights_and_hostile_legend():
    svg = molecule_svg("c1ccccc1", legend='<script>alert("x")</script>&')
    ET.fromstring(svg)
    assert "<script" not in svg.lower()
    assert "alert" not in svg
    assert "<ellipse" not in svg  # nothing highlighted


def test_png_opens_and_invalid_input_is_refused():
    png = molecule_png("[NH3+]CC(=O)[O-]", {0: 0.5, 4: -1.0}, size=(240, 180))
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG"
        assert img.size == (240, 180)
    with pytest.raises(ValueError, match="invalid SMILES"):
        molecule_svg("C1CC(")
    with pytest.raises(ValueError, match="out of range"):
        molecule_svg("CCO", {7: 1.0})  # atom index out of range


def test_mol_from_smiles_keeps_atom_order_and_explicit_hydrogens():
    mol = mol_from_smiles("[H][H]")
    assert mol is not None
    assert mol.GetNumAtoms() == 2
    mol = mol_from_smiles("OCC(Cl)Br")
    assert mol is not None
    assert [a.GetSymbol() for a in mol.GetAtoms()] == ["O", "C", "C", "Cl", "Br"]
    assert mol_from_smiles("C(C)(C)(C)(C)C") is None  # pentavalent carbon


@pytest.mark.parametrize(
    ("image", "size"),
    [
        (np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8), (224, 224)),
        (np.random.default_rng(1).random((3, 32, 48)), (240, 160)),  # channels-first floats, x5
        (np.full((300, 400, 4), 60000, dtype=np.uint16), (400, 300)),  # RGBA, 16-bit: no upscale
    ],
)
def test_heatmap_png_overlays_and_upscales(image, size):
    heat = np.linspace(-1, 1, 7 * 5, dtype=np.float32).reshape(7, 5)  # resized to the image
    png = heatmap_png(image, heat)
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG"
        assert img.mode == "RGB"
        assert img.size == size
        pixels = np.asarray(img, dtype=np.int32)
    top_left, bottom_right = pixels[0, 0], pixels[-1, -1]
    assert top_left[2] > top_left[0]  # -1: blue
    assert bottom_right[0] > bottom_right[2]  # +1: red


def test_heatmap_png_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        heatmap_png(np.zeros((8, 8)), np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="expected an image"):
        heatmap_png(np.zeros((2, 2, 2, 2)), np.zeros((8, 8)))
