"""Calibrated confidence and out-of-scope rejection: the arithmetic (ptedge.calibration),
the export that fits them on the shipped model, and the runtime that applies them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ptedge import calibration

# -- arithmetic ----------------------------------------------------------------------------


def _sampled(t_true: float, n: int = 20_000, labels: int = 5, seed: int = 0):
    """Scores and labels drawn so that softmax(scores / t_true) is exactly calibrated."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 3, size=(n, labels))
    p = calibration.probabilities(scores, t_true)
    gold = np.array([rng.choice(labels, p=row) for row in p])
    return scores, gold


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_that_generated_the_labels(t_true):
    scores, gold = _sampled(t_true)
    assert calibration.fit_temperature(scores, gold) == pytest.approx(t_true, rel=0.08)


def test_temperature_scaling_lowers_nll_and_ece_of_overconfident_scores():
    scores, gold = _sampled(2.5)
    t = calibration.fit_temperature(scores, gold)
    before = calibration.probabilities(scores)
    after = calibration.probabilities(scores, t)
    assert calibration.nll(scores, gold, t) < calibration.nll(scores, gold)
    correct = after.argmax(-1) == gold
    assert (before.argmax(-1) == after.argmax(-1)).all()  # labels never change
    assert calibration.ece(after.max(-1), correct) < 0.02 < calibration.ece(before.max(-1), correct)


def test_ece_of_a_constant_confidence_is_its_gap_to_accuracy():
    correct = np.array([1, 1, 1, 0] * 25, dtype=bool)
    assert calibration.ece(np.full(100, 0.9), correct) == pytest.approx(0.15)
    assert calibration.ece(np.full(100, 0.75), correct) == pytest.approx(0.0)


def test_ece_floor_is_what_calibrated_labels_score_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.3, 1.0, 200)
    floor = calibration.ece_floor(conf)
    drawn = [calibration.ece(conf, rng.random(200) < conf) for _ in range(400)]
    assert abs(floor - np.mean(drawn)) < 0.01  # an independent draw agrees
    assert 0.02 < floor < 0.12
    assert calibration.ece_floor(np.repeat(conf, 50)) < floor / 4  # 10,000 records
    assert calibration.ece_floor(np.ones(50)) == 0.0


def test_rejection_threshold_keeps_accuracy_within_the_stated_loss():
    conf = np.array([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    correct = np.array([0, 1, 0, 1, 1, 1, 1, 1, 1, 1], dtype=bool)  # 8 of 10 right
    # rejecting below 0.3 loses nothing (0.2 was wrong); below 0.4 loses one right record
    assert calibration.rejection_threshold(conf, correct, max_drop=0, z=0) == 0.3
    assert calibration.rejection_threshold(conf, correct, max_drop=10, z=0) == 0.5
    assert calibration.rejection_threshold(conf, correct, max_drop=20, z=0) == 0.6
    # with the margin, losing one of ten counts as 10 + 1.645 * 9.5 = 25.6 points
    assert calibration.rejection_threshold(conf, correct, max_drop=0) == 0.3
    assert calibration.rejection_threshold(conf, correct, max_drop=20) == 0.3
    assert calibration.rejection_threshold(conf, correct, max_drop=26) == 0.5


def test_rejection_threshold_holds_the_loss_on_new_records_within_the_budget():
    """A threshold chosen on 2,000 dev records to lose at most 2 points, applied to new
    records of the same kind: spending the budget exactly on dev overshoots it on about
    half of the draws; with the margin, on few (a one-sided 95% bound)."""
    rng = np.random.default_rng(0)

    def draw(n):  # confidence, correct: right records are surer on average
        ok = rng.random(n) < 0.95
        return np.where(ok, rng.beta(8, 1, n), rng.beta(2, 2, n)), ok

    test_conf, test_ok = draw(200_000)
    over = {0.0: 0, calibration.REJECT_Z: 0}
    for _ in range(40):
        conf, ok = draw(2000)
        for z in over:
            t = calibration.rejection_threshold(conf, ok, max_drop=2, z=z)
            over[z] += 100 * np.mean(test_ok & (test_conf < t)) > 2
    assert over[0.0] >= 10 and over[calibration.REJECT_Z] <= 6, over


def test_loss_bound():
    assert calibration.loss_bound(0, 2000) == 0.0
    assert calibration.loss_bound(40, 2000, z=0) == pytest.approx(2.0)
    margin = 164.5 * (0.015 * 0.985 / 2000) ** 0.5  # points
    assert calibration.loss_bound(30, 2000) == pytest.approx(1.5 + margin)


def _clusters(rng, n: int, labels: int = 4, off: float = 0.0):
    """Scores (n, labels + 1): label k's column at 5, noise 0.3 elsewhere; the last column
    is 0 in scope, ``off`` for records that look like a label but lie off every cluster."""
    gold = np.arange(n) % labels
    z = rng.normal(0, 0.3, (n, labels + 1))
    z[np.arange(n), gold] += 5.0
    z[:, -1] = rng.normal(0, 0.05, n) + off
    return z, gold


def test_distance_is_the_relative_mahalanobis_distance():
    """min_k (z - m_k)' S^-1 (z - m_k) - (z - m)' S0^-1 (z - m), the covariances ridged by
    DISTANCE_RIDGE x their mean variance, computed directly."""
    rng = np.random.default_rng(1)
    z, gold = _clusters(rng, 400)
    model = calibration.distance_model(z, gold)
    means = np.stack([z[gold == k].mean(0) for k in range(4)])
    r = z - means[gold]
    ridge = lambda c: c + calibration.DISTANCE_RIDGE * np.trace(c) / len(c) * np.eye(len(c))  # noqa: E731
    p_in = np.linalg.inv(ridge(r.T @ r / len(z)))
    p_all = np.linalg.inv(ridge(np.cov(z.T, bias=True)))
    q, _ = _clusters(rng, 7, off=2.0)
    want = [
        min((x - m) @ p_in @ (x - m) for m in means) - (x - z.mean(0)) @ p_all @ (x - z.mean(0))
        for x in q
    ]
    assert calibration.distances(q, model) == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert json.loads(json.dumps(model)) == model  # plain lists: the manifest holds it


def test_rejection_rule_takes_the_distance_when_it_rejects_more():
    """Out-of-scope records as sure of a label as in-scope ones (softmax cannot tell them
    apart) but off every label's cluster: the distance rejects them within the budget."""
    rng = np.random.default_rng(2)
    train, gold = _clusters(rng, 800)
    ins, ins_gold = _clusters(rng, 400)
    oos, _ = _clusters(rng, 100, off=-3.0)
    correct = np.ones(len(ins), dtype=bool)
    model = calibration.distance_model(train, gold)
    prob_only = calibration.rejection_rule(ins, correct, oos, 1.0, max_drop=2)
    rule = calibration.rejection_rule(ins, correct, oos, 1.0, max_drop=2, distance=model)
    assert prob_only["score"] == "probability" and prob_only["recall"] < 0.2
    assert rule["score"] == "distance" and rule["recall"] > 0.95
    assert rule["tried"][:5] == prob_only["tried"]
    kinds = [t["score"] for t in rule["tried"]]
    assert kinds == ["probability"] * 5 + ["distance"] + ["combined"] * 5
    assert all("distance" not in t for t in rule["tried"])  # no matrices in the summary
    kept = calibration.in_scope(ins, rule) >= rule["threshold"]
    assert (kept == (-calibration.distances(ins, model) >= rule["threshold"])).all()
    assert rule["accuracy_kept"] == kept.mean() >= 0.98
    assert calibration.loss_bound(int((~kept).sum()), len(ins)) <= 2


def test_the_combined_score_averages_the_two_standardized_scores():
    """``combined``: the log top probability and minus the distance, each standardized by
    its mean and standard deviation on the in-scope dev records, averaged; the rule keeps
    the candidate that rejects most."""
    rng = np.random.default_rng(3)
    train, gold = _clusters(rng, 800)
    ins, _ = _clusters(rng, 400)
    oos, _ = _clusters(rng, 100, off=-1.0)
    model = calibration.distance_model(train, gold)
    rule = calibration.rejection_rule(ins, np.ones(400, bool), oos, 1.0, max_drop=2, distance=model)
    assert rule["recall"] == max(t["recall"] for t in rule["tried"])
    row = next(t for t in rule["tried"] if t["score"] == "combined" and t["temperature"] == 2.0)
    log_top = np.log(calibration.probabilities(ins, 2.0).max(-1))
    far = -calibration.distances(ins, model)
    (mp, sp), (md, sd) = row["standardize"]["log_probability"], row["standardize"]["distance"]
    assert (mp, sp, md, sd) == pytest.approx((log_top.mean(), log_top.std(), far.mean(), far.std()))
    want = ((log_top - mp) / sp + (far - md) / sd) / 2
    assert calibration.in_scope(ins, row | {"distance": model}) == pytest.approx(want)


def test_can_reject():
    assert not calibration.can_reject({"reject": None})
    assert not calibration.can_reject({"reject": {"threshold": 0.0, "temperature": 1.0}})
    assert calibration.can_reject({"reject": {"threshold": 0.3}})
    assert calibration.can_reject({"reject": {"score": "distance", "threshold": -2.5}})
    assert calibration.can_reject({"reject": {"score": "combined", "threshold": -2.5}})


# -- export and runtime (tiny backbone) ----------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    """A tiny linear-head bundle calibrated on a dev file, with a rejection threshold."""
    pytest.importorskip("torch")
    from conftest import write_jsonl

    from ptedge.export import ExportArgs, export
    from ptedge.train import TrainArgs, train

    tmp = tmp_path_factory.mktemp("calib")
    good = ["good fun for the whole family", "the movie was great", "wonderful actors"]
    bad = ["a terrible boring film", "bad plot", "the film was terrible"]
    recs = [{"sentence": s, "label": "pos"} for s in good] + [
        {"sentence": s, "label": "neg"} for s in bad
    ]
    data = write_jsonl(tmp / "train.jsonl", recs * 3)
    oos = write_jsonl(tmp / "oos.jsonl", [{"sentence": "paris london rome"}] * 4)
    run = tmp / "run"
    train(
        TrainArgs(
            model=str(tiny("bert")),
            train=str(data),
            template="[P:2] {sentence} [MASK]",
            head="linear",
            steps=20,
            batch_size=4,
            out=str(run),
        ),
        progress=False,
    )
    out = tmp / "bundle"
    export(ExportArgs(runs=[str(run)], out=str(out), eval_file=str(data), reject=str(oos)))
    return out, data, oos


def test_manifest_carries_temperature_and_threshold_without_paths(bundle):
    out, data, oos = bundle
    task = json.loads((out / "ptedge.json").read_text())["tasks"]["run"]
    cal, rej = task["calibration"], task["reject"]
    assert cal["temperature"] > 0 and cal["data"]["file"] == "train.jsonl"
    assert cal["data"]["n"] == 18 and len(cal["data"]["sha256"]) == 64
    assert rej["out_of_scope"]["file"] == "oos.jsonl"
    if rej["score"] == "probability":
        assert 0 < rej["threshold"] <= 1
    else:  # what the clients need to compute the distance
        assert set(rej["distance"]) == {
            "whiten",
            "centres",
            "background_whiten",
            "background_centre",
        }
    assert str(data.parent) not in json.dumps(task)


def test_runtime_reports_calibrated_probabilities(bundle):
    from ptedge.data import read_records
    from ptedge.runtime import Predictor

    out, data, _ = bundle
    p = Predictor(out)
    spec = p.tasks["run"]
    records = list(read_records(data))
    raw, _ = p.scores(records)
    want = calibration.probabilities(raw, spec["calibration"]["temperature"])
    got = p.predict(records)
    for row, r in zip(want, got, strict=True):
        assert r["score"] == pytest.approx(row.max(), abs=1e-12)
        assert [r["scores"][lab] for lab in spec["labels"]] == pytest.approx(row.tolist())


def test_a_record_below_the_threshold_comes_back_as_null(bundle):
    """Rejection compares the top probability at the rejection temperature, not the
    reported (calibrated) score, with the threshold; a rejected record keeps its scores."""
    from ptedge.data import read_records
    from ptedge.runtime import Predictor

    out, data, _ = bundle
    p = Predictor(out)
    records = list(read_records(data))
    rule = p.tasks["run"]["reject"]
    if rule["score"] == "probability":
        assert rule["temperature"] in [t.get("temperature") for t in rule["tried"]]
    assert {t["score"] for t in rule["tried"]} == {"probability", "distance", "combined"}
    rule["score"] = "probability"
    raw, _ = p.scores(records)
    rule["temperature"] = 7.5  # far from the calibration temperature
    top = calibration.probabilities(raw, 7.5).max(-1)
    rule["threshold"] = float(np.median(top))
    got = p.predict(records)
    assert 0 < sum(r["label"] is None for r in got) < len(records)
    for r, t in zip(got, top, strict=True):
        if t < rule["threshold"]:
            assert r["label"] is None
        else:
            assert r["label"] == max(r["scores"], key=r["scores"].get)
    # raise the threshold above every probability: every record is rejected
    rule["threshold"] = 1.01
    assert {r["label"] for r in p.predict(records)} == {None}


def test_rejection_rule_picks_the_temperature_that_rejects_most_out_of_scope():
    """In-scope records: one label at 5, a runner-up at 2; out-of-scope: one label at
    4.5, none runner-up. At T = 1 both tops are ~0.91 (out of scope even a little surer);
    softened (T >= 2) the in-scope tops stand above. Ties keep the lowest temperature."""
    rng = np.random.default_rng(0)
    ins = rng.normal(0, 0.05, (200, 10))
    ins[np.arange(200), np.arange(200) % 10] += 5.0
    ins[np.arange(200), (np.arange(200) + 1) % 10] += 2.0
    correct = np.ones(200, dtype=bool)
    oos = rng.normal(0, 0.05, (100, 10))
    oos[np.arange(100), np.arange(100) % 10] += 4.5
    rule = calibration.rejection_rule(ins, correct, oos, temperature=1.0, max_drop=2)
    recalls = {t["temperature"]: t["recall"] for t in rule["tried"] if "temperature" in t}
    assert sorted(recalls) == [1.0 * f for f in calibration.REJECT_FACTORS]
    assert rule["recall"] == max(recalls.values()) and rule["recall"] > recalls[1.0]
    assert rule["temperature"] == min(t for t, r in recalls.items() if r == rule["recall"])
    kept = calibration.probabilities(ins, rule["temperature"]).max(-1) >= rule["threshold"]
    assert kept.mean() >= 0.98 - 1e-12
    none = calibration.rejection_rule(ins, correct, oos[:0], temperature=1.0, max_drop=2)
    assert none["recall"] == 0.0 and none["temperature"] == 1.0


def test_evaluate_counts_out_of_scope_records(bundle):
    from ptedge.data import read_records
    from ptedge.runtime import Predictor

    out, data, oos = bundle
    p = Predictor(out)
    ins = list(read_records(data))
    outs = [{"sentence": r["sentence"], "label": "oos"} for r in read_records(oos)]
    everything = {"score": "probability", "temperature": 1.0, "threshold": 1.01}
    p.tasks["run"]["reject"] = everything
    res = p.evaluate(ins + outs)
    assert res["n_in_scope"] == 18 and res["n_oos"] == 4
    assert res["in_scope_accuracy"] == 0.0 and res["oos_recall"] == 1.0
    assert res["accuracy"] == pytest.approx(4 / 22)
    p.tasks["run"]["reject"] = everything | {"threshold": 0.0}  # rejects nothing, so
    with pytest.raises(ValueError, match="not one of the task's labels"):
        p.evaluate(outs)


def test_cli_eval_scores_out_of_scope_records_of_a_rejecting_bundle(bundle, tmp_path):
    """`ptedge eval B --data oos.jsonl` (labels none of the task's) reports oos_recall."""
    from click.testing import CliRunner
    from conftest import write_jsonl

    from ptedge.cli import main

    out, _, oos = bundle
    labelled = write_jsonl(tmp_path / "oos_test.jsonl", [{"sentence": "paris", "label": "oos"}])
    res = CliRunner().invoke(main, ["eval", str(out), "--data", str(labelled)])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output.strip().splitlines()[-1])
    assert got["n_oos"] == 1 and got["oos_recall"] in (0.0, 1.0)


def test_info_shows_calibration_and_rejection(bundle):
    from click.testing import CliRunner

    from ptedge.cli import main

    out, _, _ = bundle
    res = CliRunner().invoke(main, ["info", str(out)])
    assert res.exit_code == 0, res.output
    task = json.loads((out / "ptedge.json").read_text())["tasks"]["run"]
    lines = {line.split()[0]: line for line in res.output.splitlines()}
    assert (
        f"temperature {task['calibration']['temperature']:.3f} on 18 records" in lines["calibrated"]
    )
    assert f"below {task['reject']['threshold']:.4g}" in lines["rejects"]
    assert "of oos.jsonl" in lines["rejects"] and "whiten" not in res.output


def test_reject_file_missing_a_field_fails_before_export(tiny, bundle, tmp_path):
    from conftest import write_jsonl

    from ptedge.export import ExportArgs, export

    out, data, _ = bundle
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no sentence field"}])
    run = out.parent / "run"
    with pytest.raises(ValueError, match="bad.jsonl:1: missing field 'sentence'"):
        export(ExportArgs(runs=[str(run)], out=str(tmp_path / "b"), reject=str(bad)))
    assert not (tmp_path / "b").exists()


def test_the_rejection_budget_defaults_to_the_stated_two_points():
    from ptedge import defaults
    from ptedge.cli import main
    from ptedge.export.pipeline import ExportArgs

    option = next(p for p in main.commands["export"].params if p.name == "reject_max_drop")
    assert option.default == ExportArgs.reject_max_drop == defaults.REJECT_MAX_DROP == 2.0


def test_no_distance_for_tasks_with_too_many_labels(monkeypatch, capsys):
    """The distance's L x L matrices would swell the manifest: beyond
    DISTANCE_MAX_LABELS labels only the top probability is tried."""
    from types import SimpleNamespace

    from ptedge.export import calibrate

    monkeypatch.setattr(calibrate, "DISTANCE_MAX_LABELS", 2)
    run = SimpleNamespace(name="t", cfg=SimpleNamespace(labels=["a", "b", "c"]))
    assert calibrate._distance(None, run) is None
    assert "3 labels, more than 2" in capsys.readouterr().err
