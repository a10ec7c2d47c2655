import json

import numpy as np
import pytest

from workers.ml.tokenizers import PAD_ID, UNK_ID, SmilesTokenizer, Tokenizer, Vocab, WhitespaceTokenizer

SMILES = [
    "C[C@H](N)C(=O)O",  # chiral bracket atom
    "ClCCBr",  # two-letter halogens
    "C%10CCCCC%10",  # two-digit ring bond
    "[NH4+].[Cl-]",  # charged bracket atoms, dot
    "c1ccc2c(c1)[nH]c1ccccc12",
    "F/C=C/F",
    "O=S(=O)(O)c1ccc(Br)cc1",
    "[2H]C([2H])([2H])I",
]


def test_smiles_tokens_are_atoms():
    tok = SmilesTokenizer()
    assert tok.tokenize("C[C@H](N)C(=O)O") == ["C", "[C@H]", "(", "N", ")", "C", "(", "=", "O", ")", "O"]
    assert tok.tokenize("ClCCBr") == ["Cl", "C", "C", "Br"]
    assert tok.tokenize("C%10CCCCC%10") == ["C", "%10", "C", "C", "C", "C", "C", "%10"]
    assert tok.tokenize("[NH4+].[Cl-]") == ["[NH4+]", ".", "[Cl-]"]


@pytest.mark.parametrize("smiles", SMILES)
def test_smiles_round_trip(smiles):
    tok = SmilesTokenizer().fit(SMILES)
    assert "".join(tok.tokenize(smiles)) == smiles
    assert tok.decode(tok.encode(smiles)) == smiles
    assert UNK_ID not in tok.encode(smiles)


def test_unknown_characters_are_kept_as_unk_not_dropped():
    tok = SmilesTokenizer().fit(["CCO"])
    assert "".join(tok.tokenize("CCX?O")) == "CCX?O"
    assert tok.encode("CClO") == [tok.vocab.stoi["C"], UNK_ID, tok.vocab.stoi["O"]]


def test_vocab_min_freq_and_specials():
    v = Vocab.build([["a", "b", "a"], ["a", "c", "c"]], min_freq=2)
    assert v.itos == ["<pad>", "<unk>", "a", "c"]
    assert v.stoi["<pad>"] == PAD_ID and v.stoi["<unk>"] == UNK_ID
    assert v.lookup(["b", "c"]) == [UNK_ID, 3]


def test_encode_batch_pads_truncates_and_matches_encode():
    tok = SmilesTokenizer().fit(SMILES)
    ids, lengths = tok.encode_batch(SMILES + [""], max_len=12)
    assert ids.dtype == np.int64 and lengths.dtype == np.int64
    assert ids.shape == (len(SMILES) + 1, 12)
    for row, n, s in zip(ids, lengths, SMILES):
        full = tok.encode(s)
        assert n == min(len(full), 12)
        assert row[:n].tolist() == full[:12]
        assert (row[n:] == PAD_ID).all()
    assert lengths[-1] == 0
    ids, lengths = tok.encode_batch(["CC", "C"])
    assert ids.shape == (2, 2) and lengths.tolist() == [2, 1]


def test_to_dict_round_trip_through_json():
    for tok, texts in ((SmilesTokenizer(max_len=64).fit(SMILES), SMILES),
                       (WhitespaceTokenizer().fit(["I10 E11.9", "E11.9 N18.3 Z99"]), ["I10 N18.3 X00"])):
        back = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
        assert type(back) is type(tok) and back.max_len == tok.max_len
        for a, b in zip(tok.encode_batch(texts), back.encode_batch(texts)):
            np.testing.assert_array_equal(a, b)


def test_whitespace_tokenizer():
    tok = WhitespaceTokenizer().fit(["I10 E11.9", "E11.9  N18.3\tZ99"])
    assert tok.tokenize(" E11.9  N18.3\tZ99 ") == ["E11.9", "N18.3", "Z99"]
    assert tok.decode(tok.encode("I10 E11.9")) == "I10 E11.9"
    assert tok.encode("I10 XYZ")[1] == UNK_ID


def test_batch_path_matches_row_by_row_encoding():
    rng = np.random.default_rng(0)
    alphabet = list("CNOcn()=#12[]@+-%0. \t") + ["[Na+]", "%10", "Cl", "Br", "[nH]", "[C"]
    for tok in (SmilesTokenizer().fit(SMILES), WhitespaceTokenizer().fit(["C N", "Cl Br ["])):
        for _ in range(50):
            texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 12))) for _ in range(rng.integers(1, 12))]
            for max_len in (None, 4):
                fast, rows = tok.encode_batch(texts, max_len), tok._encode_rows(texts, max_len)
                np.testing.assert_array_equal(fast[0], rows[0])
                np.testing.assert_array_equal(fast[1], rows[1])
        ids, lengths = tok.encode_batch(["C\nN", "C"])  # a newline inside a text: row path
        assert lengths.tolist() == [2, 1]
