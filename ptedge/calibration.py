"""Confidence users can threshold: temperature scaling, calibration error, and the
probability threshold below which a record is rejected as out of scope.

- ``fit_temperature``: the T that minimises the negative log-likelihood of
  ``softmax(scores / T)`` on labelled dev records (Guo et al., 2017). It divides every
  score by one number, so no label changes; only how sure the scores say they are.
- ``ece``: expected calibration error, the gap between confidence and accuracy averaged
  over equal-width confidence bins, weighted by how many records fall in each;
  ``ece_floor``: what a perfectly calibrated model would score on the same records.
- ``rejection_threshold``: the largest top probability a record may fall below and be
  rejected (``label: null``) while in-scope accuracy loses at most a stated number of
  points, on new records as well as on dev: the dev loss plus its one-sided 95% margin
  stays within the budget.
- ``distance_model`` / ``distances``: a second way to tell records of no label, the
  relative Mahalanobis distance of a record's scores (Ren et al., 2021): how far they lie
  from the nearest label's training scores, in units of the scores' spread within a
  label, less how far from all training scores together. It sees a record whose scores
  look like no label's even when softmax is sure of one.
- ``in_scope``: how in scope a record looks under a rejection rule: the top probability
  at a rejection temperature, the distance, or the two combined.
- ``rejection_rule``: of those rules (the temperatures among multiples of the
  calibration temperature), the one whose threshold rejects the most out-of-scope dev
  records.

``probabilities`` is the one place that turns scores into the probabilities every
client reports (``docs/bundle-format.md`` §7 says the same for other languages).

Torch-free: numpy only, so the runtime uses it. Not responsible for: producing scores,
choosing which records to fit on (``ptedge.export``).
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
REJECT_FACTORS = (1, 2, 4, 8, 16)  # rejection temperatures tried, x the calibration one
# A rejection threshold's in-scope loss on dev is one draw: on CLINC150, thresholds spending
# a 2-point budget exactly on 2,000 dev records lost 1.6-2.3 points on test. The budget is
# held by the loss's one-sided 95% upper bound, l + z sqrt(l (1 - l) / n), instead.
REJECT_Z = 1.645
T_MIN, T_MAX = 0.05, 20.0  # temperatures searched (log-uniform bisection)
# Ridge added to the distance's covariances, x their mean variance: keeps them invertible
# (labels with few records, more labels than the backbone's hidden size). CLINC150, int8
# bundle, out-of-scope test recall at the 2-point budget: 0.748 / 0.746 / 0.743 at
# 0.001 / 0.01 / 0.1 (docs/results/analyses.md).
DISTANCE_RIDGE = 0.01


def probabilities(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(scores / temperature) over the last axis, in float64. scores: (N, L)."""
    x = np.asarray(scores, dtype=np.float64) / temperature
    if x.size == 0:
        return x
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def can_reject(spec: dict) -> bool:
    """Whether a bundle task entry's ``reject`` rule can reject a record (a probability
    threshold of 0 never does)."""
    reject = spec.get("reject") or {}
    if not reject:
        return False
    return reject.get("score", "probability") != "probability" or reject["threshold"] > 0


def _nll_slope(scores: np.ndarray, targets: np.ndarray, beta: float) -> float:
    """d/dbeta of the mean NLL of softmax(beta * scores): E_p[s] - s_gold, averaged."""
    p = probabilities(scores * beta)
    expected = (p * scores).sum(-1)  # (N,)
    return float(np.mean(expected - scores[np.arange(len(targets)), targets]))


def fit_temperature(scores: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimising the NLL of ``softmax(scores / T)``; scores (N, L) float,
    targets (N,) gold column indices. The NLL is convex in 1/T, so bisection on the sign
    of its slope finds the minimum (clipped to [T_MIN, T_MAX])."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    if len(t) == 0:
        raise ValueError("no labelled records to fit a temperature on")
    lo, hi = np.log(1 / T_MAX), np.log(1 / T_MIN)  # log beta
    if _nll_slope(s, t, np.exp(lo)) >= 0:
        return T_MAX
    if _nll_slope(s, t, np.exp(hi)) <= 0:
        return T_MIN
    for _ in range(60):
        mid = (lo + hi) / 2
        if _nll_slope(s, t, np.exp(mid)) < 0:
            lo = mid
        else:
            hi = mid
    return float(1 / np.exp((lo + hi) / 2))


def nll(scores: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    p = probabilities(scores, temperature)[np.arange(len(targets)), targets]
    return float(-np.mean(np.log(np.maximum(p, 1e-300))))


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of top-label confidences (N,) against correctness (N,)."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if len(conf) == 0:
        return 0.0
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)  # bin of each record
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(conf[inside].mean() - ok[inside].mean())
    return float(total / len(conf))


def ece_floor(confidence: np.ndarray, bins: int = ECE_BINS, draws: int = 1000) -> float:
    """The ECE a perfectly calibrated model would still show on these records: the mean
    ``ece`` over ``draws`` outcomes drawn as Bernoulli(confidence) (seeded). On a few
    hundred records it is several points (binning noise), so an ECE is only read against
    it: 193 LAMA facts at confidences near 0.78 give a floor of about 0.066."""
    conf = np.asarray(confidence, dtype=np.float64)
    if len(conf) == 0:
        return 0.0
    rng = np.random.default_rng(0)
    return float(np.mean([ece(conf, rng.random(len(conf)) < conf, bins) for _ in range(draws)]))


def loss_bound(lost: int, n: int, z: float = REJECT_Z) -> float:
    """One-sided upper bound, in points, on the in-scope accuracy a threshold costs on new
    records, when it rejects ``lost`` of ``n`` dev records that were right (normal
    approximation to the binomial: l + z sqrt(l (1 - l) / n), l = lost / n)."""
    loss = lost / n
    return 100 * (loss + z * np.sqrt(loss * (1 - loss) / n))


def rejection_threshold(
    confidence: np.ndarray, correct: np.ndarray, max_drop: float, z: float = REJECT_Z
) -> float:
    """The largest threshold t such that rejecting (counting as wrong) the records with
    confidence < t (top probability, or any ``in_scope`` value) costs in-scope accuracy at
    most ``max_drop`` points, by the upper bound ``loss_bound`` (``z`` = 0: the dev loss
    itself). confidence, correct: (N,) over in-scope dev records. Rejecting below the
    lowest confidence rejects nothing, so some threshold always fits.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if len(conf) == 0:
        raise ValueError("no in-scope records to choose a rejection threshold on")
    # rejecting below t = conf[k] (sorted ascending) loses the correct records under it
    order = np.argsort(conf, kind="stable")
    conf, ok = conf[order], ok[order]
    lost = np.concatenate([[0], np.cumsum(ok)])  # lost[k] = correct records below conf[k]
    best = float(conf[0])
    for k in range(len(conf)):
        if k and conf[k] == conf[k - 1]:
            continue  # a threshold rejects every record with a lower probability
        if loss_bound(int(lost[k]), len(conf), z) <= max_drop + 1e-9:
            best = float(conf[k])
        else:
            break
    return best


def _whitener(cov: np.ndarray) -> np.ndarray:
    """W (L, L) with ||W x||^2 = x^T (cov + ridge)^-1 x: the inverse of the Cholesky factor
    of the covariance, ridged by ``DISTANCE_RIDGE`` x its mean variance."""
    n = cov.shape[0]
    ridge = DISTANCE_RIDGE * max(float(np.trace(cov)) / n, 1e-12)
    return np.linalg.inv(np.linalg.cholesky(cov + ridge * np.eye(n)))


def distance_model(scores: np.ndarray, targets: np.ndarray) -> dict:
    """The relative Mahalanobis distance fitted on training records' scores (N, L) and
    gold column indices (N,): one covariance shared by the labels (the scores less their
    label's mean), and the covariance of all scores (the background).

    Returns, as lists (the manifest's ``reject.distance``, docs/bundle-format.md §7):
    ``whiten`` (L, L), ``centres`` (K, L), the whitened mean of each of the K labels with
    training records, ``background_whiten`` (L, L) and ``background_centre`` (L,).
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    present = np.unique(t)
    if len(present) < 2:
        raise ValueError("a distance needs training records of two labels at least")
    means = np.stack([s[t == k].mean(0) for k in present])  # (K, L)
    within = s - means[np.searchsorted(present, t)]  # (N, L)
    w = _whitener(within.T @ within / len(s))
    centre = s.mean(0)  # (L,)
    w0 = _whitener((s - centre).T @ (s - centre) / len(s))
    model = {
        "whiten": w,
        "centres": means @ w.T,
        "background_whiten": w0,
        "background_centre": w0 @ centre,
    }
    return {k: _short(v) for k, v in model.items()}


def _short(a: np.ndarray) -> list:
    """``a`` as (nested) lists of floats of 8 significant digits: the manifest stays about
    half the size, and every client computes with the very numbers the threshold was
    chosen with."""
    return np.vectorize(lambda v: float(f"{v:.8g}"), otypes=[float])(a).tolist()


def distances(scores: np.ndarray, model: dict) -> np.ndarray:
    """(N,) relative Mahalanobis distance of each row of scores (N, L) under ``model``:
    min over labels of ||W z - c_k||^2, less ||W0 z - c0||^2. Larger: further from every
    label than from the training scores as a whole, i.e. less like any label."""
    z = np.asarray(scores, dtype=np.float64)
    w, c = np.asarray(model["whiten"]), np.asarray(model["centres"])
    w0, c0 = np.asarray(model["background_whiten"]), np.asarray(model["background_centre"])
    a = z @ w.T  # (N, L)
    near = ((a * a).sum(1, keepdims=True) - 2 * a @ c.T + (c * c).sum(1)).min(1)  # (N,)
    b = z @ w0.T - c0  # (N, L)
    return near - (b * b).sum(1)


def in_scope(scores: np.ndarray, rule: dict) -> np.ndarray:
    """(N,) how in scope each row of scores (N, L) looks under a rejection ``rule`` (the
    manifest's ``reject``, docs/bundle-format.md §7); a record is rejected when this is
    below ``rule["threshold"]``. By ``rule["score"]``:

    - ``probability`` (or absent): the top probability at ``rule["temperature"]``;
    - ``distance``: minus ``distances`` under ``rule["distance"]``;
    - ``combined``: the mean of the two, each standardized by the mean and standard
      deviation it has on in-scope dev records (``rule["standardize"]``), the probability
      taken as its logarithm.
    """
    kind = rule.get("score", "probability")
    if kind not in ("probability", "distance", "combined"):
        raise ValueError(f"unknown rejection score {kind!r} (a newer ptedge wrote the bundle?)")
    if kind == "distance":
        return -distances(scores, rule["distance"])
    top = probabilities(scores, rule["temperature"]).max(-1)
    if kind == "probability":
        return top
    (mp, sp), (md, sd) = (rule["standardize"][k] for k in ("log_probability", "distance"))
    log_top = np.log(np.maximum(top, 1e-300))
    return ((log_top - mp) / sp + (-distances(scores, rule["distance"]) - md) / sd) / 2


def describe_rule(rule: dict) -> str:
    """In words, what a rejection ``rule`` thresholds (``in_scope``'s value), for logs and
    reports: e.g. "top probability at temperature 1.471"."""
    at = f" at temperature {rule['temperature']:.3f}" if "temperature" in rule else ""
    return {
        "distance": "minus the relative Mahalanobis distance of the scores",
        "combined": f"mean of the standardized log top probability{at} and minus the distance",
    }.get(rule.get("score"), f"top probability{at}")


def rejection_rule(
    scores: np.ndarray,
    correct: np.ndarray,
    oos_scores: np.ndarray,
    temperature: float,
    max_drop: float,
    distance: dict | None = None,
) -> dict:
    """The rejection rule and threshold that reject the most out-of-scope records while
    in-scope accuracy loses at most ``max_drop`` points (by ``loss_bound`` on dev).

    The top probability at a higher temperature than the calibrated one separates records
    of no label better (ODIN, Liang et al. 2018: softened softmax scores rank in- and
    out-of-distribution inputs better than T = 1). Temperatures tried: ``temperature`` x
    ``REJECT_FACTORS``. With a ``distance_model`` (``distance``), the distance alone and,
    at each temperature, its mean with the log top probability (``in_scope``'s
    ``combined``) are tried too. Ties go to the first tried. scores: (N, L) in-scope dev
    scores, correct: (N,), oos_scores: (M, L). Returns the chosen rule, as ``in_scope``
    reads it, with "threshold", "recall", "accuracy_kept" (in-scope dev accuracy with
    rejection), "loss_bound" (points), and "tried": [the same for each candidate, less
    the distance's matrices].
    """
    oos = np.asarray(oos_scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    rules = [{"score": "probability", "temperature": temperature * f} for f in REJECT_FACTORS]
    if distance is not None:
        rules.append({"score": "distance", "distance": distance})
        far = -distances(scores, distance)  # (N,)
        far_stats = [float(far.mean()), max(float(far.std()), 1e-12)]
        for f in REJECT_FACTORS:
            t = temperature * f
            log_top = np.log(np.maximum(probabilities(scores, t).max(-1), 1e-300))
            stats = {
                "log_probability": [float(log_top.mean()), max(float(log_top.std()), 1e-12)],
                "distance": far_stats,
            }
            rules.append(
                {"score": "combined", "temperature": t, "standardize": stats, "distance": distance}
            )
    tried = [_candidate(scores, correct, oos, rule, max_drop) for rule in rules]
    best = max(tried, key=lambda r: r["recall"])  # max() keeps the first of equals
    rows = [{k: v for k, v in r.items() if k != "distance"} for r in tried]
    return best | {"tried": rows}


def _candidate(scores, correct, oos, rule: dict, max_drop: float) -> dict:
    """``rule`` with its threshold (the largest within ``max_drop``), its out-of-scope
    recall and what it costs in scope on dev."""
    conf = in_scope(scores, rule)  # (N,)
    threshold = rejection_threshold(conf, correct, max_drop)
    kept = correct & (conf >= threshold)  # (N,) right and not rejected
    return rule | {
        "threshold": threshold,
        "recall": float(np.mean(in_scope(oos, rule) < threshold)) if len(oos) else 0.0,
        "accuracy_kept": float(kept.mean()),
        "loss_bound": float(loss_bound(int(correct.sum() - kept.sum()), len(conf))),
    }
