"""Applicability domain: Morgan fingerprints, batched Tanimoto, embedding distances (issue 12)."""

import numpy as np
import pytest
import torch
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

from workers.ml import domain

torch.set_num_threads(1)

MOLS = ["CCO", "CCCO", "c1ccccc1", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "CCN(CC)CC", "c1ccncc1", "C1CCCCC1",
        "ClCCBr", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "O=C(O)CCl", "NCCN", "c1ccc2ccccc2c1", "COc1ccccc1"]


def _rdkit_fps(smiles):
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    return [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in smiles]


def test_morgan_packed_matches_rdkit_and_zeroes_invalid():
    packed = domain.morgan_packed(["CCO", "C1CC(", "", "c1ccccc1O"])
    assert packed.shape == (4, 256) and packed.dtype == np.uint8
    assert not packed[1].any() and not packed[2].any()
    ref = _rdkit_fps(["CCO"])[0]
    assert np.flatnonzero(np.unpackbits(packed[0])).tolist() == list(ref.GetOnBits())


def test_nearest_similarity_equals_rdkit_bulk_tanimoto(monkeypatch):
    queries, refs = MOLS[:6] + ["CCCCCCCC", "Brc1ccccc1"], MOLS[4:]
    expected = [max(DataStructs.BulkTanimotoSimilarity(q, _rdkit_fps(refs))) for q in _rdkit_fps(queries)]
    qp, rp = domain.morgan_packed(queries), domain.morgan_packed(refs)
    np.testing.assert_allclose(domain.nearest_similarity(qp, rp), expected, atol=1e-6)
    # tiny blocks: several query chunks and reference blocks unpacked on the fly
    monkeypatch.setattr(domain, "BLOCK_ELEMENTS", 6)
    monkeypatch.setattr(domain, "RESIDENT_BYTES", 2048 * 4 * 3)
    index = domain.FingerprintIndex(rp)
    assert index._blocks is None and index.block_rows == 3
    np.testing.assert_allclose(index.nearest(qp), expected, atol=1e-6)
    assert domain.nearest_similarity(np.zeros((2, 256), np.uint8), rp).tolist() == [0.0, 0.0]
    assert domain.nearest_similarity(qp, np.zeros((0, 256), np.uint8)).tolist() == [0.0] * len(queries)


def test_similarity_of_many_queries_is_batched():
    rng = np.random.default_rng(0)
    refs = (rng.random((500, 2048)) < 0.03)
    queries = (rng.random((3000, 2048)) < 0.03)
    sim = domain.nearest_similarity(np.packbits(queries, axis=1), np.packbits(refs, axis=1))
    inter = queries[:50].astype(np.float64) @ refs.T.astype(np.float64)
    union = queries[:50].sum(1)[:, None] + refs.sum(1)[None, :] - inter
    np.testing.assert_allclose(sim[:50], (inter / union).max(1), atol=1e-6)


def test_thresholds_follow_the_documented_percentiles():
    val = np.linspace(0, 1, 101)
    assert domain.similarity_threshold(val) == pytest.approx(0.05)
    assert domain.distance_threshold(val) == pytest.approx(0.95)
    assert domain.subsample(10, 20).tolist() == list(range(10))
    pick = domain.subsample(1000, 50)
    assert len(pick) == 50 and (np.diff(pick) > 0).all() and pick.tolist() == domain.subsample(1000, 50).tolist()


def test_image_embeddings_and_nearest_distance(monkeypatch):
    from workers.ml.models import build_model

    model = build_model("cnn", {"in_channels": 1, "image_size": [8, 8], "num_outputs": 2, "channels": [4],
                                "hidden": 6}, members=2).eval()
    x = torch.randn(5, 1, 8, 8)
    emb = domain.image_embeddings(model, x)
    assert emb.shape == (5, 6) and (emb >= 0).all()
    ref = torch.randn(7, 6)
    monkeypatch.setattr(domain, "BLOCK_ELEMENTS", 14)  # two queries per block
    np.testing.assert_allclose(domain.nearest_distance(emb, ref), torch.cdist(emb, ref).min(1).values.numpy(),
                               atol=1e-5)
