"""ptedge.defaults: the values training chooses when the user does not, and the dev split
carved from --train (stratified, seeded, recorded in the run folder)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from ptedge import defaults
from ptedge.config import RunConfig
from ptedge.data import read_records

# -- the carve-out itself (no model) -------------------------------------------------------


def test_carved_dev_is_stratified_and_keeps_every_label_in_train():
    labels = ["a"] * 600 + ["b"] * 300 + ["c"] * 97 + ["rare"] * 3
    train, dev = defaults.carve_dev(len(labels), seed=0, strata=labels)
    assert sorted(train + dev) == list(range(len(labels)))  # a partition
    got = Counter(labels[i] for i in dev)
    assert got == {"a": 60, "b": 30, "c": 10}  # each label's 10%; "rare" gives round(0.3)=0
    assert {labels[i] for i in train} == set(labels)


def test_a_label_with_one_record_stays_in_train():
    labels = ["x"] * 300 + ["single"]
    train, dev = defaults.carve_dev(len(labels), seed=0, strata=labels)
    assert "single" not in {labels[i] for i in dev}
    assert "single" in {labels[i] for i in train}


def test_carve_is_seeded():
    labels = [str(i % 7) for i in range(700)]
    assert defaults.carve_dev(700, 1, labels) == defaults.carve_dev(700, 1, labels)
    assert defaults.carve_dev(700, 1, labels)[1] != defaults.carve_dev(700, 2, labels)[1]


def test_carve_is_capped_and_skipped_when_too_small():
    _, dev = defaults.carve_dev(50_000, 0, None)
    assert len(dev) == defaults.DEV_CAP
    assert defaults.carve_dev(150, 0, None) == (list(range(150)), [])  # 15 < DEV_MIN


def test_pool_follows_a_sentence_transformers_config(tmp_path):
    assert defaults.pool(tmp_path).value == "mean"
    assert "1_Pooling" not in defaults.pool(tmp_path).why
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    )
    assert defaults.sentence_transformers_pooling(tmp_path) == "mean"
    assert "1_Pooling" in defaults.pool(tmp_path).why


def test_default_max_length_fits_the_longest_record_within_limits():
    fits = defaults.max_length([12, 40, 105], limit=512)
    assert fits.value == defaults.MAX_LENGTH and "longest 105" in fits.why
    grown = defaults.max_length([12, 300, 140], limit=512)
    assert grown.value == 300 and "2 of 3 would lose" in grown.why
    capped = defaults.max_length([12, 900, 2000], limit=8192)
    assert capped.value == defaults.MAX_LENGTH_CAP == 512
    assert "2 of 3 training records are longer than 512" in capped.why
    by_backbone = defaults.max_length([12, 900], limit=256)
    assert by_backbone.value == 256 and "the backbone reads at most 256" in by_backbone.why
    assert defaults.max_length([12, 100], limit=64).value == 64  # never past the positions
    assert defaults.max_length([12, 300], limit=None).value == 300


def test_default_steps_are_one_epoch_within_bounds():
    assert defaults.steps(16_000, 32).value == 500
    assert defaults.steps(640, 16).value == defaults.STEPS_MIN
    assert defaults.steps(60_000, 16).value == defaults.STEPS_MAX
    assert "epoch" in defaults.steps(640, 16).why


def test_a_linear_head_sees_enough_records_per_label():
    """BANKING77's 9,016 training records over 77 labels: one epoch at 32 is 282 steps,
    250 records per label 602; few labels leave the epoch rule as it was."""
    b77 = defaults.steps(9_016, 32, n_labels=77)
    assert b77.value == -(-defaults.PER_LABEL * 77 // 32) == 602
    assert "per label" in b77.why
    assert defaults.steps(16_000, 32, n_labels=2).value == 500  # one epoch decides
    assert defaults.steps(15_000, 32, n_labels=150).value == defaults.STEPS_MAX
    assert defaults.steps(640, 32, n_labels=3).value == defaults.STEPS_MIN


def test_bench_small_steps_compares_the_shipped_rule_with_the_floor():
    """tools/bench_small_steps.py's first candidate is ptedge's rule, the second the
    300-step floor, and on its small sets (after the 10% dev carve) the two differ."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "tools"))
    import bench_small_steps as bs

    (_, rule), (_, floor) = bs.CANDIDATES.values()
    for labels in (77, 150):
        n = round(bs.PER_LABEL * labels * (1 - defaults.DEV_FRACTION))
        shipped = defaults.steps(n, defaults.LINEAR_BATCH, n_labels=labels).value
        assert rule(n, labels) == shipped > defaults.STEPS_MIN
        assert floor(n, labels) == defaults.STEPS_MIN


def test_a_vocabulary_head_trains_the_same_budget_whatever_the_data_size():
    """The LM head learns only the prompt: SST-2's 60,614 sentences get 300 steps, as a
    LAMA relation's 600 facts do, where the linear head's epoch rule would give 1000."""
    for head in ("lm", "generate"):
        for n in (600, 60_614):
            chosen = defaults.steps(n, 16, head=head)
            assert chosen.value == defaults.VOCAB_STEPS == 300
            assert "vocabulary" in chosen.why
    assert defaults.steps(60_614, 16).value == defaults.STEPS_MAX


def test_default_batch_size_depends_on_the_head(tiny, intents, tmp_path):
    cfg = _train(tiny, intents, tmp_path / "lin", batch_size=None)
    assert cfg.batch_size == defaults.LINEAR_BATCH == 32
    assert cfg.defaults["batch_size"]["value"] == 32
    cfg = _train(tiny, intents, tmp_path / "lin4")
    assert cfg.batch_size == 4 and "batch_size" not in cfg.defaults  # given, not chosen
    assert defaults.batch_size("lm").value == defaults.LM_BATCH == 16


# -- through training (tiny backbone) ------------------------------------------------------


def _train(tiny, data, out, **kw):
    from ptedge.train import TrainArgs, train

    kw.setdefault("steps", 2)
    args = TrainArgs(
        model=str(tiny("bert")),
        train=str(data),
        template="[P:2] {text} [MASK]",
        label_field="intent",
        out=str(out),
        **({"head": "linear", "batch_size": 4} | kw),
    )
    return train(args, progress=False)


def test_training_without_dev_carves_and_records_it(tiny, intents, tmp_path):
    out = tmp_path / "run"
    _train(tiny, intents, out, seed=5)
    cfg = RunConfig.load(out)
    split = cfg.dev_split
    assert split["source"] == "carved" and split["seed"] == 5
    assert split["stratified_by"] == "intent" and split["n"] == 30 and split["of"] == 300
    assert cfg.dev_file == str((out / "dev.jsonl").resolve())
    dev = read_records(cfg.dev_file)
    assert Counter(r["intent"] for r in dev) == {"card": 15, "film": 10, "lang": 5}
    chosen = {"prompt_init", "pool", "head_lr", "head_refit", "max_length", "backbone_dropout"}
    # the dev records join the head's fit when the refit replaced the trained head
    refit = cfg.defaults["head_refit"]["value"] == "refit"
    assert set(cfg.defaults) == chosen | ({"head_data"} if refit else set())
    assert cfg.defaults["max_length"]["value"] == cfg.max_length == defaults.MAX_LENGTH
    assert cfg.defaults["pool"]["value"] == "mean" and cfg.pool == "mean"
    assert cfg.defaults["backbone_dropout"]["value"] is True
    assert cfg.defaults["head_lr"]["value"] == cfg.head_lr in defaults.HEAD_LRS  # on dev
    assert cfg.best["dev_n"] == 30  # selection ran on the carved split


def test_export_rebuilds_the_records_a_carved_run_trained_on(tiny, intents, tmp_path):
    """The rejection distance is fitted on the run's training records: --train less the
    carved dev split, rebuilt from the recorded seed and strata."""
    from types import SimpleNamespace

    from ptedge.export.calibrate import training_records

    out = tmp_path / "run"
    _train(tiny, intents, out, seed=5)
    cfg = RunConfig.load(out)
    dev = list(read_records(cfg.dev_file))
    trained = list(training_records(SimpleNamespace(cfg=cfg)))
    assert len(trained) == 270 and len(dev) == 30
    everything = list(read_records(intents))
    assert sorted(map(str, trained + dev)) == sorted(map(str, everything))
    assert trained == [r for r in everything if r not in dev]


def test_carved_dev_records_are_not_trained_on(tiny, intents, tmp_path, monkeypatch):
    import ptedge.train as tr

    seen = []
    real = tr.Job.loss

    def spy(self, records, targets):
        seen.extend(r["text"] for r in records)
        return real(self, records, targets)

    monkeypatch.setattr(tr.Job, "loss", spy)
    out = tmp_path / "run"
    _train(tiny, intents, out, steps=80)  # 320 draws from 270 training records
    dev = {r["text"] for r in read_records(out / "dev.jsonl")}
    assert seen and not dev & set(seen)


def test_dev_none_opts_out(tiny, intents, tmp_path):
    out = tmp_path / "run"
    cfg = _train(tiny, intents, out, dev="none")
    assert cfg.dev_split["source"] == "none" and cfg.dev_file is None
    assert not (out / "dev.jsonl").exists()


def test_given_values_are_not_defaults(tiny, intents, tmp_path):
    cfg = _train(tiny, intents, tmp_path / "run", pool="slot", head_lr=0.2, steps=None)
    assert cfg.pool == "slot" and cfg.head_lr == 0.2
    assert cfg.defaults["pool"]["why"] == "--pool"
    assert cfg.defaults["steps"]["value"] == cfg.steps == defaults.STEPS_MIN


def test_an_encoder_prompt_starts_at_the_padding_embedding(tiny, intents, tmp_path):
    import torch

    from ptedge.model import load_run

    cfg = _train(tiny, intents, tmp_path / "run", steps=0)
    assert cfg.defaults["prompt_init"]["value"] == "pad"
    _, model, *_ = load_run(tmp_path / "run")
    table = model.encoder()  # (n_pseudo, H)
    pad = model.base.get_input_embeddings().weight[0]  # the tiny BERT's [PAD] is id 0
    assert table.shape[0] == 2
    assert torch.equal(table, pad.expand_as(table))


def test_random_prompt_start_and_causal_default(tiny, intents, tmp_path):
    import torch

    from ptedge.model import load_run

    cfg = _train(tiny, intents, tmp_path / "run", steps=0, prompt_init="random")
    assert cfg.defaults["prompt_init"]["why"] == "--prompt-init"
    _, model, *_ = load_run(tmp_path / "run")
    table = model.encoder()
    assert not torch.allclose(table[0], table[1])
    assert defaults.prompt_init(causal=True).value == "random"


@pytest.mark.parametrize("kind", ["lstm", "mlp", "none"])
def test_start_at_gives_every_pseudo_token_the_vector_and_still_trains(kind):
    import torch

    from ptedge.prompt_encoder import PromptEncoder

    enc = PromptEncoder(3, 8, kind)
    v = torch.arange(8.0)
    enc.start_at(v)
    assert torch.equal(enc(), v.expand(3, 8))
    opt = torch.optim.Adam(enc.parameters(), lr=0.1)
    for _ in range(2):  # the tokens part once the gradient reaches them
        loss = (enc() * torch.randn(3, 8, generator=torch.Generator().manual_seed(0))).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = enc()
    assert not torch.allclose(out[0], out[1])


def test_a_later_step_is_kept_unless_an_earlier_one_was_clearly_better():
    # 500 dev records at 0.912: one standard error is 1.27 points
    assert defaults.keeps_later_step(0.910, 500, top=0.912)
    assert defaults.keeps_later_step(0.900, 500, top=0.912)
    assert not defaults.keeps_later_step(0.895, 500, top=0.912)
    # more dev records, a narrower band
    assert not defaults.keeps_later_step(0.900, 10_000, top=0.912)
    assert defaults.keeps_later_step(1.0, 8, top=1.0)


def test_the_shipped_candidate_of_bench_defaults_is_what_ptedge_chooses():
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "tools"))
    import bench_defaults as bd

    flags = bd.CANDIDATES[bd.SHIPPED]
    given = dict(zip(flags[::2], flags[1::2], strict=True))
    assert "--lr" not in given  # the prompt encoder keeps train's --lr default
    assert given["--pool"] == defaults.pool("/nonexistent").value
    import bench_pool as bp

    assert bp.SHIPPED == defaults.pool("/nonexistent").value  # the pool study's shipped one
    import bench_dropout

    on = bench_dropout.SHIPPED == "on"
    assert on == defaults.backbone_dropout("linear").value  # the dropout study's shipped one
    assert float(given["--head-lr"]) == defaults.head_lr(3e-3).value
    assert given["--prompt-init"] == defaults.prompt_init(causal=False).value


def test_bench_lm_steps_compares_the_shipped_vocabulary_budget_with_the_epoch_rule():
    """tools/bench_lm_steps.py measures the two budgets SST-2 gets under the two rules."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "tools"))
    import bench_lm_steps as bl

    budgets = [int(flags[flags.index("--steps") + 1]) for flags in bl.CANDIDATES.values()]
    sst2_train = 60_614
    assert budgets == [
        defaults.steps(sst2_train, bl.BATCH).value,  # the epoch rule, capped
        defaults.steps(sst2_train, bl.BATCH, head="lm").value,
    ]
    assert bl.BATCH == defaults.LM_BATCH


def _long(tmp_path, words: int):
    """60 records of 3 intents, each ``words`` words long; the intent's word comes last."""
    from conftest import write_jsonl

    recs = [
        {"text": " ".join(["the movie was great"] * (words // 4)) + f" {lab}", "intent": lab}
        for lab in ("card", "film", "lang")
        for _ in range(20)
    ]
    return write_jsonl(tmp_path / f"long{words}.jsonl", recs)


def test_default_max_length_takes_the_longest_record_whole(tiny, tmp_path, monkeypatch):
    from ptedge.model import build_for_run
    from ptedge.template import encode

    monkeypatch.setattr(defaults, "MAX_LENGTH", 16)  # tiny's 128 positions leave room to grow
    data = _long(tmp_path, 40)
    cfg = _train(tiny, data, tmp_path / "run")
    _, tok, compiled, _ = build_for_run(cfg)
    enc = encode(compiled, tok, read_records(data))
    assert cfg.max_length == compiled["max_length"] == enc.attention_mask.sum(1).max() > 16
    assert not enc.truncated.any()  # the intent's word, at the end, is read
    assert cfg.defaults["max_length"]["value"] == cfg.max_length


def test_records_past_the_backbone_limit_are_cut_and_the_run_says_so(tiny, tmp_path, capsys):
    data = _long(tmp_path, 200)
    cfg = _train(tiny, data, tmp_path / "run")
    assert cfg.max_length == 128  # tiny BERT's positions
    assert "60 of 60 training records are longer than 128" in cfg.defaults["max_length"]["why"]
    from ptedge.train import TrainArgs, train

    args = TrainArgs(
        model=str(tiny("bert")),
        train=str(data),
        template="[P:2] {text} [MASK]",
        label_field="intent",
        out=str(tmp_path / "given"),
        head="linear",
        batch_size=4,
        steps=2,
        max_length=64,
    )
    cfg = train(args, progress=True)
    assert "max_length" not in cfg.defaults and cfg.max_length == 64  # given, not chosen
    err = capsys.readouterr().err
    assert "note: 60 of 60 training records are longer than --max-length 64 tokens" in err


def test_bench_pool_report_leaves_one_task_out():
    """tools/bench_pool.py: each full task gets the pool the other two prefer; each data set
    (its full task and the small sets cut from it) the pool all other sets prefer."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "tools"))
    import bench_pool as bp

    acc = {
        "clinc150": (0.96, 0.97),
        "sst2": (0.88, 0.87),
        "banking77": (0.93, 0.925),
        "banking77-s1": (0.86, 0.88),
        "sst2-1k": (0.81, 0.80),
    }
    runs = [
        {"set": t, "candidate": c, "accuracy": a[i], "n": 100}
        for t, a in acc.items()
        for i, c in enumerate(bp.CANDIDATES)
    ]
    runs.append({"set": "banking77-s1", "candidate": "probe", "accuracy": 0.9, "n": 100})
    result = {"runs": runs, "machine": bp._variants.bc.machine(), "command": "bench_pool"}
    md = bp.markdown(result | {"candidates": bp.CANDIDATES})
    assert "| sst2 (100) | 0.8800 | 0.8700 | -1.00 | - |" in md
    assert "| banking77-s1 (100) | 0.8600 | 0.8800 | +2.00 | 0.9000 |" in md
    assert "- sst2: the others pick `text`, 0.8700" in md  # clinc150 +1.0 beats banking77 -0.5
    assert "- clinc150: the others pick `mean`, 0.9600" in md
    # sst2's two sets left out: +1.0 (clinc150) and +1.5 (banking77's two) pick text
    assert "- sst2 (2 sets): the others pick `text`; against `mean` sst2 -1.00, sst2-1k -1.00" in md
    # banking77's left out: clinc150 +1.0, sst2's -2.0: mean stays
    assert "- banking77 (2 sets): the others pick `mean`; against `mean` banking77 +0.00" in md


def test_small_sets_give_every_clinc150_intent_one_domain():
    """tools/small_sets.py's unseen label set: CLINC150's 150 intents in 10 domains of 15,
    so every in-scope query (the pool study scores its dev split) gets a domain."""
    import sys

    from conftest import ROOT, shared_data

    intents = json.loads(shared_data("clinc150", "intents.json").read_text())
    sys.path.insert(0, str(ROOT / "tools"))
    import small_sets

    domains = {d: s.split() for d, s in small_sets.DOMAINS.items()}
    assert sorted(i for s in domains.values() for i in s) == sorted(intents)
    assert {len(s) for s in domains.values()} == {15} and len(domains) == 10
    dev = small_sets.by_domain_records("dev.csv")
    assert len(dev) == len(read_records(str(shared_data("clinc150", "dev.csv"))))
    assert Counter(r["domain"] for r in dev) == {d: 20 * 15 for d in domains}


def test_backbone_dropout_is_on_for_the_linear_head_only():
    assert defaults.backbone_dropout("linear").value is True
    assert defaults.backbone_dropout("lm").value is False
    assert defaults.backbone_dropout("generate").value is False


def test_step_seeds_differ_by_step_rank_and_seed_and_repeat():
    from ptedge.train import _step_seed

    seeds = {_step_seed(s, t, r) for s in (0, 1) for t in range(1, 50) for r in (0, 1)}
    assert len(seeds) == 2 * 49 * 2
    assert _step_seed(0, 7, 1) == _step_seed(0, 7, 1)
    assert all(0 <= x < 2**64 for x in seeds)
