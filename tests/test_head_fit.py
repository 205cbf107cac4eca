"""ptedge.head_fit: the linear head fitted alone on the step-0 features, on the very batches
the run draws, chooses its lr on dev."""

from __future__ import annotations

import pytest
import torch
from test_defaults import _train

from ptedge import defaults, head_fit


def test_ties_go_to_the_candidate_nearest_the_default():
    assert defaults.best_head_lr({3e-3: 0.9, 1e-2: 0.95, 3e-2: 0.94, 1e-1: 0.95}) == 1e-2
    assert defaults.best_head_lr({3e-3: 0.9, 1e-2: 0.9, 3e-2: 0.9, 1e-1: 0.9}) == 3e-2
    assert defaults.best_head_lr({3e-3: 0.9, 1e-2: 0.8, 3e-2: 0.8, 1e-1: 0.9}) == 1e-1


def test_fit_head_learns_separable_features_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 3  # (N,)
    x = torch.nn.functional.one_hot(y, 3).float() * 4 + torch.randn(120, 3, generator=gen)
    batches = head_fit.batch_order(120, 60, 8, seed=1)
    a = head_fit.fit_head(x, y, batches, 3, lr=3e-2, seed=0)
    b = head_fit.fit_head(x, y, batches, 3, lr=3e-2, seed=0)
    assert torch.equal(a.weight, b.weight)
    assert (a(x).argmax(-1) == y).float().mean() > 0.95


def test_the_head_is_fitted_on_the_batches_the_run_draws(tiny, intents, tmp_path, monkeypatch):
    import ptedge.train as tr

    drawn, fitted = [], {}
    real_loss, real_choose = tr.Job.loss, head_fit.choose

    def spy_loss(self, records, targets):
        drawn.append([r["text"] for r in records])
        return real_loss(self, records, targets)

    def spy_choose(job, examples, dev, steps, batch, seed, warmup, progress):
        fitted["examples"] = [r["text"] for r, _ in examples]
        fitted["order"] = head_fit.batch_order(len(examples), steps, batch, seed)
        return real_choose(job, examples, dev, steps, batch, seed, warmup, progress)

    monkeypatch.setattr(tr.Job, "loss", spy_loss)
    monkeypatch.setattr(head_fit, "choose", spy_choose)
    _train(tiny, intents, tmp_path / "run", steps=12, seed=3)
    texts = fitted["examples"]
    assert [[texts[i] for i in b] for b in fitted["order"]] == drawn


def test_the_fit_chooses_the_lr_and_leaves_the_run_as_if_it_were_given(
    tiny, intents, tmp_path, monkeypatch
):
    """A run at defaults writes the same weights as one given ``--head-lr`` at the chosen
    value: the head fit changes the lr, not the run's random state or starting point."""
    monkeypatch.setattr(defaults, "keeps_refit", lambda b, c: False)  # the trained head stays
    run, given = tmp_path / "run", tmp_path / "given"
    cfg = _train(tiny, intents, run, steps=6)
    why = cfg.defaults["head_lr"]["why"]
    assert "fitted alone" in why and all(f"{lr:g}: " in why for lr in defaults.HEAD_LRS)
    assert cfg.head_lr == cfg.defaults["head_lr"]["value"] in defaults.HEAD_LRS
    _train(tiny, intents, given, steps=6, head_lr=cfg.head_lr)
    for name in ("head.safetensors", "prompt_encoder.safetensors"):
        assert (run / name).read_bytes() == (given / name).read_bytes()


@pytest.mark.parametrize("given", [{"head_lr": 0.2}, {"dev": "none"}])
def test_no_fit_when_the_lr_is_given_or_there_is_no_dev(
    tiny, intents, tmp_path, monkeypatch, given
):
    called = []
    monkeypatch.setattr(head_fit, "choose", lambda *a: called.append(a))
    monkeypatch.setattr(head_fit, "refit", lambda *a: called.append(a))
    cfg = _train(tiny, intents, tmp_path / "run", **given)
    assert not called
    assert cfg.head_lr == given.get("head_lr", defaults.HEAD_LR)
    assert "head_refit" not in cfg.defaults


def test_the_refit_replaces_the_head_unless_dev_prefers_the_trained_one_beyond_chance():
    assert defaults.keeps_refit(0, 0)
    assert defaults.keeps_refit(11, 6) and defaults.keeps_refit(6, 11)  # 5 of 998: noise
    assert defaults.keeps_refit(50, 24)
    assert not defaults.keeps_refit(24, 50)  # 26 more right with the trained head


def test_the_converged_fit_is_the_regularised_optimum_and_needs_no_seed():
    """At the returned head the objective's gradient vanishes (so it is the unique optimum
    of the strictly convex objective), and no random state enters the fit."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=gen)  # (N, H)
    y = (x[:, :4] + 0.5 * torch.randn(300, 4, generator=gen)).argmax(-1)  # (N,), noisy labels
    torch.manual_seed(1)
    a = head_fit.fit_converged(x, y, 4)
    torch.manual_seed(2)
    b = head_fit.fit_converged(x, y, 4)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    l2 = 1.0 / (head_fit.REFIT_C * len(x))
    loss = torch.nn.functional.cross_entropy(a(x), y) + 0.5 * l2 * a.weight.square().sum()
    grads = torch.autograd.grad(loss, [a.weight, a.bias])
    assert max(float(g.abs().max()) for g in grads) < 1e-4
    sgd = head_fit.fit_head(x, y, head_fit.batch_order(300, 60, 32, 0), 4, lr=3e-2, seed=0)
    with torch.no_grad():
        sgd_ce = torch.nn.functional.cross_entropy(sgd(x), y)
        sgd_loss = sgd_ce + 0.5 * l2 * sgd.weight.square().sum()
    assert loss < sgd_loss


def test_refit_beats_a_spoiled_head_on_the_final_features(tiny, intents, tmp_path):
    from ptedge.data import read_records
    from ptedge.model import load_run
    from ptedge.train import Job

    run = tmp_path / "run"
    _train(tiny, intents, run, steps=20)
    cfg, model, tok, compiled, _ = load_run(run)
    job = Job(cfg, model, tok, compiled)
    recs = read_records(intents)
    pairs = list(zip(recs, job.targets(recs), strict=True))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))  # always the third label
    refit = head_fit.refit(job, pairs[::2], pairs[1::2], 40, 8, 0)
    (b, c), acc = refit.counts, refit.dev_accuracy
    assert refit.head is not None and b > c and acc["refit"] > 0.9 > acc["trained"]
    assert refit.with_dev is None  # not asked for
    both = head_fit.refit(job, pairs[::2], pairs[1::2], 40, 8, 0, with_dev=True).with_dev
    assert both is not None and not torch.equal(both.weight, refit.head.weight)


@pytest.mark.parametrize("kept", [True, False])
def test_the_run_saves_the_head_the_refit_chose(tiny, intents, tmp_path, monkeypatch, kept):
    """Kept: the run's head is the refit solved with the carved dev records too, and the
    refit dev judged is saved beside it; not kept: the trained head, alone."""
    from safetensors.torch import load_file

    seen = {}
    real_refit = head_fit.refit

    def spy(job, *a, **kw):
        seen["trained"] = {k: v.clone() for k, v in job.model.head.state_dict().items()}
        seen["refit"] = real_refit(job, *a, **kw)
        return seen["refit"]

    monkeypatch.setattr(head_fit, "refit", spy)
    monkeypatch.setattr(defaults, "keeps_refit", lambda b, c: kept)
    run = tmp_path / "run"
    cfg = _train(tiny, intents, run, steps=6)
    saved = load_file(run / "head.safetensors")
    refit = seen["refit"]
    assert (refit.head is not None) == kept == (refit.with_dev is not None)
    want = refit.with_dev.state_dict() if kept else seen["trained"]
    assert all(torch.equal(v, want[k.split(".")[-1]]) for k, v in saved.items())
    assert (run / "head.without_dev.safetensors").is_file() == kept
    if kept:
        judged = load_file(run / "head.without_dev.safetensors")
        assert all(torch.equal(v, refit.head.state_dict()[k]) for k, v in judged.items())
    assert cfg.defaults["head_refit"]["value"] == ("refit" if kept else "trained")
    assert "dev records" in cfg.defaults["head_refit"]["why"]
    assert ("head_data" in cfg.defaults) == kept


def test_features_come_back_in_the_records_order(tiny, intents, tmp_path):
    from ptedge.data import read_records
    from ptedge.model import load_run
    from ptedge.train import Job

    run = tmp_path / "run"
    _train(tiny, intents, run, steps=2)
    cfg, model, tok, compiled, _ = load_run(run)
    job = Job(cfg, model, tok, compiled)
    recs = read_records(intents)[::7]
    recs = [dict(r, text=r["text"] + " and more" * (i % 5)) for i, r in enumerate(recs)]
    x = head_fit.features(job, recs)  # sorted by length inside, in batches of FEATURE_BATCH
    one = torch.cat([head_fit.features(job, [r]) for r in recs[:5]])
    assert x.shape == (len(recs), cfg.hidden_size)
    assert torch.allclose(x[:5], one, atol=1e-5)
