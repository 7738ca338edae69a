"""Per-client aggregate statistics in summaries and reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pf2lora import report
from pf2lora.report import client_stats


def test_client_stats_by_hand():
    clients = {
        "a": {"mse": 1.0, "part": 1.0, "num_train": 1, "flag": True, "note": None, "spectrum": [1.0, 0.5], "nan_only": math.nan},
        "b": {"mse": 2.0, "part": math.nan, "num_train": 3, "nan_only": math.nan},
        "c": {"mse": 4.0, "part": 3.0, "num_train": 4, "nan_only": math.inf},
        "d": {"mse": 9.0, "num_train": 2},
    }
    stats = client_stats(clients)
    assert set(stats) == {"mse", "part"}  # no bools, Nones, lists, all-non-finite metrics or num_train
    m = stats["mse"]
    assert m["mean"] == pytest.approx(4.0)
    assert m["weighted_mean"] == pytest.approx((1 * 1 + 2 * 3 + 4 * 4 + 9 * 2) / 10)
    assert m["std"] == pytest.approx(math.sqrt((9 + 4 + 0 + 25) / 4))  # population std over clients
    assert m["min"] == 1.0 and m["max"] == 9.0
    assert m["p10"] == pytest.approx(1.3)
    assert m["p10"] == pytest.approx(float(np.percentile([1.0, 2.0, 4.0, 9.0], 10)))
    p = stats["part"]  # b's NaN is left out, not propagated
    assert p["mean"] == pytest.approx(2.0)
    assert p["weighted_mean"] == pytest.approx((1 * 1 + 3 * 4) / 5)
    assert p["min"] == 1.0 and p["max"] == 3.0


def test_client_stats_unweighted_without_num_train_and_single_client():
    stats = client_stats({"a": {"acc": 0.5}, "b": {"acc": 0.9}, "c": {"acc": 0.7}})["acc"]
    assert stats["weighted_mean"] == pytest.approx(stats["mean"]) == pytest.approx(0.7)
    assert stats["p10"] == pytest.approx(float(np.percentile([0.5, 0.7, 0.9], 10)))
    one = client_stats({"a": {"acc": 0.25}})["acc"]
    assert one == {"mean": 0.25, "weighted_mean": 0.25, "std": 0.0, "min": 0.25, "p10": 0.25, "max": 0.25}


def test_results_table_reference_row_and_per_client_column():
    """The majority-class floor is shown as its own row (mean and worst client) and per client."""
    clients = {
        "a": {"accuracy": 0.9, "majority_accuracy": 0.6, "num_train": 10},
        "b": {"accuracy": 0.7, "majority_accuracy": 0.8, "num_train": 30},
    }
    entry = {"clients": clients, "stats": report.client_stats(clients), "upload_bytes_per_client_per_round": 12.0}
    entry["mean"] = {m: s["mean"] for m, s in entry["stats"].items()}
    summary = {"methods": {"m1": entry}}
    table = report.results_table(summary, ("accuracy",), "accuracy", True, ("majority_accuracy", "majority class"))
    rows = table.splitlines()
    assert rows[2] == "| m1 | 0.8000 | 0.7000 | 12 |"
    assert rows[3] == "| *majority class* | 0.7000 | 0.6000 |  |"
    per_client = report.per_client_table(summary, "accuracy", ("majority_accuracy",)).splitlines()
    assert per_client[0] == "| client | majority_accuracy | m1 |"
    assert per_client[2:] == ["| a | 0.6000 | 0.9000 |", "| b | 0.8000 | 0.7000 |"]
