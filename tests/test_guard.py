"""The int8/int4 guard's verdict (``ptedge.export.guard``): a loss past --max-drop refuses
a recipe only when the guard records can tell it from chance, and several tasks' records
are also judged together."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")

from ptedge.export.guard import (  # noqa: E402
    ALL_TASKS,
    SIGNIFICANCE,
    counts,
    judge,
    loss,
    records_needed,
)


def _pairs(n: int, lost: int, gained: int, both_wrong: int = 0) -> tuple[list, list]:
    """fp32 and quantized correctness on ``n`` records with that many disagreements."""
    base = [True] * lost + [False] * gained + [False] * both_wrong
    quant = [False] * lost + [True] * gained + [False] * both_wrong
    rest = n - len(base)
    return base + [True] * rest, quant + [True] * rest


def test_loss_counts_the_disagreements_and_their_sign_test():
    cost = loss(*_pairs(1000, lost=8, gained=2, both_wrong=30))
    assert cost["lost"] == 8 and cost["gained"] == 2
    assert cost["points"] == pytest.approx(0.6)
    # P(X >= 8) for X ~ Binomial(10, 1/2): (45 + 10 + 1) / 1024
    assert cost["p"] == pytest.approx(56 / 1024, abs=1e-6)
    assert loss(*_pairs(50, 0, 0)) == {"points": 0.0, "lost": 0, "gained": 0, "p": 1.0}
    gained_more = loss(*_pairs(50, lost=1, gained=3))
    assert gained_more["points"] == pytest.approx(-4.0) and gained_more["p"] == 15 / 16
    tail = sum(math.comb(30, k) for k in range(20, 31)) / 2**30
    assert loss(*_pairs(500, 20, 10))["p"] == pytest.approx(tail, abs=1e-6)


def test_one_fact_of_a_small_dev_set_is_chance_a_clear_loss_is_not():
    one_of_19 = loss(*_pairs(19, lost=1, gained=0))
    assert one_of_19["points"] > 5 and not counts(one_of_19, max_drop=1)
    five_of_19 = loss(*_pairs(19, lost=5, gained=0))  # p = 1/32
    assert five_of_19["p"] <= SIGNIFICANCE and counts(five_of_19, max_drop=1)
    # a thousand records: past the limit and many records, so it counts
    assert counts(loss(*_pairs(1000, lost=15, gained=3)), max_drop=1)
    # within the limit never counts, however sure
    assert not counts(loss(*_pairs(1000, lost=9, gained=0)), max_drop=1)


def test_losses_that_each_pass_as_chance_add_up_over_the_tasks():
    base, quant = {}, {}
    for t in range(20):
        base[f"P{t}"], quant[f"P{t}"] = _pairs(20, lost=1, gained=0)
    costs, failing = judge(base, quant, max_drop=1)
    assert set(failing) == {ALL_TASKS}
    assert costs[ALL_TASKS]["lost"] == 20 and costs[ALL_TASKS]["points"] == pytest.approx(5.0)
    assert all(costs[f"P{t}"]["p"] == 0.5 for t in range(20))
    # the same losses offset by gains elsewhere: nothing counts
    for t in range(10):
        base[f"P{t}"], quant[f"P{t}"] = _pairs(20, lost=0, gained=1)
    assert judge(base, quant, max_drop=1)[1] == {}
    # one task alone is not judged twice
    costs, failing = judge({"a": [True, True]}, {"a": [True, False]}, max_drop=1)
    assert ALL_TASKS not in costs and failing == {}


def test_records_needed_to_hold_a_loss_against_a_recipe():
    assert records_needed(1) == 500 and records_needed(10) == 50 and records_needed(2) == 250
    # on that many records a loss of max_drop points, all lost, is 5 records: it counts
    # once past the limit; on 20 records even 4 lost (20 points) is chance
    assert counts(loss(*_pairs(500, lost=6, gained=0)), max_drop=1)
    assert not counts(loss(*_pairs(20, lost=4, gained=0)), max_drop=1)
    assert counts(loss(*_pairs(20, lost=5, gained=0)), max_drop=1)  # 25 points
