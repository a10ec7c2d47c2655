"""Row checks and RDKit canonicalisation for scoring, in line and in the child-process pool."""
from __future__ import annotations

import os
import signal

import pytest

from workers.scoring import canon

ROWS = ["OCC", "c1ccccc1", "C1CC(", "C(C)(C)(C)(C)C", "", "CC\ufffdO", "C" * 50, "c1cccc1", "[Na+].[Cl-]"]


def test_reasons_for_each_kind_of_bad_row() -> None:
    out, errors = canon.check_and_canonicalise(ROWS, "rdkit", max_length=40)
    assert out[:2] == ["CCO", "c1ccccc1"] and errors[:2] == [None, None]
    assert errors[2].startswith("SMILES parse error") and "C1CC(" in errors[2]
    assert errors[3].startswith("invalid molecule") and "valence" in errors[3]
    assert errors[4] == "empty SMILES"
    assert errors[5] == "invalid text encoding: the row is not valid UTF-8"
    assert errors[6] == "SMILES too long: 50 characters (max_length 40)"
    assert "kekulize" in errors[7].lower()
    assert out[8] == "[Cl-].[Na+]" and errors[8] is None
    assert all(o is None for o, e in zip(out, errors) if e)


def test_validate_none_scores_text_as_is() -> None:
    out, errors = canon.check_and_canonicalise(["OCC", "C1CC(", "", "x" * 9], "none", max_length=8)
    assert out[:2] == ["OCC", "C1CC("] and errors[:2] == [None, None]
    assert errors[2] == "empty SMILES" and errors[3].startswith("SMILES too long")


def test_pool_matches_in_line_and_survives_a_dead_child() -> None:
    pool = canon.RDKitPool(2)
    try:
        rows = ROWS * 50
        assert canon.canonicalise(rows, pool=pool) == canon.check_and_canonicalise(rows)
        pids = pool.pids()
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)  # e.g. an RDKit segfault
        futures = [pool.submit(["CCO"], "rdkit", 100) for _ in range(6)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=60))
            except canon.ChildDied:
                outcomes.append("died")
        assert outcomes == [(["CCO"], [None])] * 6  # the dead child's work is retried on a fresh one
        assert canon.canonicalise(rows, pool=pool) == canon.check_and_canonicalise(rows)  # restarted
    finally:
        pool.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
