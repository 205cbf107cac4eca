"""ptedge.head_fit: the linear head fitted alone on the step-0 features chooses its lr on
dev, and the run starts from that head, trained on the very batches the run draws."""

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


def test_the_run_starts_from_the_head_fitted_at_the_chosen_lr(tiny, intents, tmp_path, monkeypatch):
    import ptedge.train as tr

    seen = {}
    real_choose, real_fit = head_fit.choose, tr._fit

    def spy_choose(*a):
        lr, head, by_lr = real_choose(*a)
        seen["head"], seen["by_lr"] = {k: v.clone() for k, v in head.state_dict().items()}, by_lr
        return lr, head, by_lr

    def spy_fit(job, *a):
        seen["start"] = {k: v.clone() for k, v in job.model.head.state_dict().items()}
        return real_fit(job, *a)

    monkeypatch.setattr(head_fit, "choose", spy_choose)
    monkeypatch.setattr(tr, "_fit", spy_fit)
    cfg = _train(tiny, intents, tmp_path / "run", steps=6)
    assert all(torch.equal(seen["head"][k], seen["start"][k]) for k in seen["head"])
    assert set(seen["by_lr"]) == set(defaults.HEAD_LRS)
    assert cfg.head_lr == defaults.best_head_lr(seen["by_lr"]) == cfg.defaults["head_lr"]["value"]
    assert "fitted alone" in cfg.defaults["head_lr"]["why"]


@pytest.mark.parametrize("given", [{"head_lr": 0.2}, {"dev": "none"}])
def test_no_fit_when_the_lr_is_given_or_there_is_no_dev(
    tiny, intents, tmp_path, monkeypatch, given
):
    called = []
    monkeypatch.setattr(head_fit, "choose", lambda *a: called.append(a))
    cfg = _train(tiny, intents, tmp_path / "run", **given)
    assert not called
    assert cfg.head_lr == given.get("head_lr", defaults.HEAD_LR)


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
