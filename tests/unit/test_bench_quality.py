"""Smoke tests of the model-quality, explain-speed and ensemble-scoring benchmark harnesses
(bench/model_quality.py, bench/explain_speed.py, bench/ensemble_scoring.py): data loading,
the bare fingerprint reference, the summaries and the table rows. No model is trained here."""

from __future__ import annotations

import math

import pytest

from bench import ensemble_scoring, explain_speed, model_quality


def test_freesolv_and_b3db_load_from_the_installed_packages():
    freesolv = model_quality.load_frame("freesolv")
    assert len(freesolv) == 642
    assert list(freesolv.columns) == ["text", "expt"]
    b3db = model_quality.load_frame("b3db")
    assert len(b3db) > 7000
    assert set(b3db["bbb"].unique()) == {0, 1}
    with pytest.raises(ValueError, match="unknown benchmark"):
        model_quality.load_frame("tox21")


def test_morgan_matrix_has_a_zero_row_for_unparsable_smiles():
    x = model_quality.morgan_matrix(["CCO", "not a smiles", "c1ccccc1"], nbits=256)
    assert x.shape == (3, 256)
    assert x[0].sum() > 0
    assert x[1].sum() == 0
    assert x[2].sum() > 0


def _cell(benchmark, split, seed, config, metric, **extra):
    return {
        "benchmark": benchmark,
        "split": split,
        "seed": seed,
        "config": config,
        "metric": metric,
        "seconds": 1.0,
        **extra,
    }


def test_summary_gives_mean_and_sample_std_and_skips_failed_cells():
    package = {"calibration": {"test_coverage": 0.9}, "uncertainty": {"spread_error_spearman": 0.3}}
    cells = [
        _cell("freesolv", "random", 0, "ensemble_aug", 1.0, spread_error_spearman=0.2, package=package),
        _cell("freesolv", "random", 1, "ensemble_aug", 2.0, spread_error_spearman=0.4, package=package),
        _cell("freesolv", "random", 2, "ensemble_aug", 3.0, spread_error_spearman=0.3, package=package),
        {"benchmark": "freesolv", "split": "random", "seed": 3, "config": "ensemble_aug", "error": "boom"},
    ]
    entry = model_quality.summarise(cells)["freesolv"]["random"]["ensemble_aug"]
    assert entry["n"] == 3
    assert entry["mean"] == pytest.approx(2.0)
    assert entry["std"] == pytest.approx(1.0)
    assert entry["spread_error_spearman"][0] == pytest.approx(0.3)
    assert entry["test_coverage"] == (pytest.approx(0.9), 0.0)


def test_table_rows_compare_with_the_references_and_this_runs_forest():
    cells = [_cell("freesolv", "random", s, "rnn", 1.1) for s in range(3)]
    cells += [_cell("b3db", "random", s, "rnn", 0.90) for s in range(3)]
    cells += [_cell("b3db", "random", s, "rf", 0.92 + s / 100) for s in range(3)]
    rows = model_quality.table_rows(model_quality.summarise(cells))
    freesolv = next(r for r in rows if r["metric"].startswith("FreeSolv") and "single GRU" in r["metric"])
    assert freesolv["bare"] == 1.15
    assert freesolv["met"] is True  # 1.1 < every published figure
    b3db = next(r for r in rows if r["metric"].startswith("B3DB") and "single GRU" in r["metric"])
    assert b3db["bare"] == pytest.approx(0.93)
    assert b3db["met"] is False
    published = next(r for r in rows if "bare = published RF" in r["metric"])
    assert published["bare"] == 0.957


def test_plan_crosses_every_axis_and_keys_are_unique():
    cells = model_quality.plan(["freesolv", "b3db"], ["random", "scaffold"], [0, 1, 2], ["rnn", "rf"])
    assert len(cells) == 24
    assert len({c.key for c in cells}) == 24


def test_alternate_times_every_function_the_same_number_of_times():
    calls: list[str] = []
    wall, cpu = explain_speed.alternate(4, {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1)
    assert {k: len(v) for k, v in wall.items()} == {k: len(v) for k, v in cpu.items()} == {"a": 4, "b": 4}
    assert calls.count("a") == calls.count("b") == 5
    assert all(t >= 0 for times in (wall, cpu) for v in times.values() for t in v)


def test_speed_rows_apply_the_targets():
    ms = {k: {"p50": v} for k, v in {"plain": 10.0, "explained": 45.0, "ig_only": 30.0, "svg_only": 5.0}.items()}
    rows = explain_speed.result_rows({"ms": ms, "tokens": 40, "calls": 50}, None, None)
    assert rows[0]["ratio"] == pytest.approx(4.5)
    assert rows[0]["met"] is True
    median = {"full": {1: 2.0, 5: 6.0}, "worker": {1: 1.0, 5: 5.0}, "forward": {1: 1.0, 5: 6.0}}
    rows = ensemble_scoring.result_rows({"rows": 1000, "rounds": 3, "median_s": median}, {"median_s": {1: 2.0, 5: 4.0}})
    assert [r["met"] for r in rows] == [True, True, False, True]
    assert math.isclose(rows[2]["ratio"], 6.0)
