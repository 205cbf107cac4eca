"""Quality at defaults: the plain `ptedge train` command against manual prompts, PEFT
P-tuning and a linear probe, with calibration and out-of-scope rejection (issue 12).

Every ptedge run is the command a user types, run as a subprocess: only the backbone, the
data files, the template, the label field (and the verbalizer, where the task scores
words) — no lr, pool, head-lr, steps or batch-size flags: ptedge's defaults choose the
budget of every task (`ptedge.defaults.steps` and `batch_size`; `--quick` alone gives 10
steps). `ptedge export
--quantize int8` (and, for CLINC150, `--reject oos_dev.csv`) makes the bundle that is
scored. Baselines get the same budget, seed, training records and dev records (for
keeping their best step): for a task without a dev file, the split ptedge carves
(`ptedge.defaults.carve_dev`, seed 0, stratified by label), rebuilt here and checked
against the run's `dev.jsonl`. Test splits are only ever scored.

Tasks:

- **banking77**, **clinc150**, **sst2-minilm**: all-MiniLM-L6-v2 with the linear head,
  template `[P:3] {text} [P:3] [MASK]`. PEFT: `SEQ_CLS` P-tuning, 6 virtual tokens, lr 3e-3
  (its classifier trains too). Linear probe: `Linear(H, labels)` on mean-pooled frozen
  embeddings, the better on dev of SGD at ptedge's budget (lr chosen on dev) and a
  logistic regression solved to convergence (C = 1, scikit-learn's default). CLINC150 also
  reports out-of-scope recall on `oos_test.csv` with the threshold chosen at export on
  `oos_dev.csv`, against Larson et al. (EMNLP 2019, Table 2, "Full", oos-threshold).
- **sst2**: SmolLM2-135M, LM head over {"0": "negative", "1": "positive"}, ptedge
  `[P:10] Review: {sentence}\\nSentiment: [MASK]`; the manual prompt
  `Review: {sentence}\\nSentiment: [MASK]`; PEFT `CAUSAL_LM` with 10 virtual tokens in front
  of the manual prompt's text.
- **lama**: SmolLM2-135M, LAMA protocol on T-REx relations chosen up front (N-1: P37,
  P30, P103, P138, P279; N-M: P1412, P27, P101; `--relations all` for all 41): only facts
  whose object with a leading space is one token are scored; precision@1 over the whole
  vocabulary, macro-averaged. ptedge `[P:3] {sub_label} [P:3] [MASK]`, all relations in ONE
  multi-task bundle; the manual prompt is LAMA's template up to `[Y]`; PEFT `CAUSAL_LM`, 6
  virtual tokens before the subject.

Each task also reports the expected calibration error (15 bins) of the bundle's top-label
probabilities on its test split, before (softmax of the raw scores) and after the
temperature fitted at export.

- **your own data** (`--data DIR`): a classification folder holding `train`, `test` and
  optionally `dev` files (`.csv`, `.tsv`, `.jsonl` or `.json`), run exactly as the MiniLM
  tasks above: the README's command with `--field` (default `text`) in the template and
  `--label-field` (default `label`), beside PEFT and the probe at the budget ptedge
  chooses. Its report goes to `runs/bench/quality-NAME/` unless `--out` says otherwise.

Run folders, bundles and baseline results are kept under `--work` and reused while their
parameters hold (`--fresh` rebuilds). A `--tasks` subset run keeps the other tasks'
results already in `--out`'s quality.json (same mode).

    python tools/bench_quality.py                    # full run (docs/results/quality.md)
    python tools/bench_quality.py --quick            # smoke-test sizes
    python tools/bench_quality.py --tasks lama --relations P37,P30
    python tools/bench_quality.py --data ~/my_intents --field utterance --label-field intent

Writes quality.json, quality.md and quality.png to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _bench_common as bc
import numpy as np

RELATIONS = ["P37", "P30", "P103", "P138", "P279", "P1412", "P27", "P101"]
QUICK_RELATIONS = ["P37", "P30"]
# LAMA's relation types for its 41 T-REx relations (LAMA's relations.jsonl, "type").
LAMA_TYPES = {
    **dict.fromkeys(["P1376", "P36"], "1-1"),
    **dict.fromkeys(
        "P103 P127 P131 P136 P138 P140 P159 P17 P176 P19 P20 P264 P276 P279 P30 P361 "
        "P364 P37 P407 P413 P449 P495 P740".split(),
        "N-1",
    ),
    **dict.fromkeys(
        "P101 P106 P108 P1303 P1412 P178 P190 P27 P31 P39 P463 P47 P527 P530 P937 P1001".split(),
        "N-M",
    ),
}
MINILM_TASKS = {
    "banking77": {
        "dir": "banking77",
        "train": "train.csv",
        "dev": None,  # none published: ptedge carves its own
        "test": "test.csv",
        "field": "text",
        "label": "category",
        "goal": 0.92,
    },
    "clinc150": {
        "dir": "clinc150",
        "train": "train.csv",
        "dev": "dev.csv",
        "test": "test.csv",
        "field": "text",
        "label": "intent",
        "reject_dev": "oos_dev.csv",
        "reject_test": "oos_test.csv",
        "goal": 0.934,  # Larson et al. 2019, Table 2, Full, MLP in-scope accuracy
    },
    "sst2-minilm": {
        "dir": "sst2",
        "train": "train.tsv",
        "dev": "dev.tsv",
        "test": "test.tsv",
        "field": "sentence",
        "label": "label",
        "goal": None,
    },
}
# CLINC150's paper figures (Larson et al., EMNLP 2019, Table 2, "Full", oos-threshold)
CLINC_PAPER = {
    "bert": {"in_scope": 0.962, "oos_recall": 0.523},
    "mlp": {"in_scope": 0.934, "oos_recall": 0.491},
}
TASKS = ("banking77", "clinc150", "sst2-minilm", "sst2", "lama")
PROBE_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
CONVERGED = "converged, C = 1"  # the probe's logistic regression solved to convergence
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def data_task(folder: Path, field: str, label: str) -> tuple[str, dict]:
    """A task spec (as ``MINILM_TASKS``'s) for a user's folder of train/dev/test files.

    ``dev`` is optional (ptedge then carves one, as for BANKING77); ``train`` and ``test``
    are required, one file each. Exits with a one-line message naming the folder otherwise.
    """
    folder = folder.expanduser().resolve()
    if not folder.is_dir():
        sys.exit(f"--data {folder}: not a folder")
    name = folder.name
    if name in TASKS:
        sys.exit(f"--data {folder}: its name {name!r} is one of the built-in tasks; rename it")
    spec: dict = {"dir": str(folder), "field": field, "label": label, "goal": None}
    for split in ("train", "dev", "test"):
        found = [
            folder / f"{split}{x}" for x in DATA_SUFFIXES if (folder / f"{split}{x}").is_file()
        ]
        if len(found) > 1:
            sys.exit(f"--data {folder}: several {split} files ({', '.join(p.name for p in found)})")
        if not found and split != "dev":
            want = ", ".join(split + x for x in DATA_SUFFIXES)
            sys.exit(f"--data {folder}: no {split} file (looked for {want})")
        spec[split] = found[0].name if found else None
    return name, spec


FULL = {
    "minilm_steps": None,  # none: ptedge's default budget (batch size and step rule)
    "minilm_batch": None,
    "smollm2_steps": None,  # none: ptedge's default step rule
    "test_max": None,  # every test record
    "dev_max": None,
    "int8": ["--quantize", "int8"],  # the int8 guard at ptedge's default --max-drop
}
QUICK = {
    "minilm_steps": 10,
    "minilm_batch": 32,
    "smollm2_steps": 10,
    "test_max": 40,
    "dev_max": 60,
    # one of 60 dev records is 1.7 points: a 10-step prompt's guard may lose one
    "int8": ["--quantize", "int8", "--max-drop", "5"],
}
DEV_MAX = 500  # as ptedge.train: dev records scored per periodic evaluation
SEED = 0
LR = 3e-3  # PEFT's lr (ptedge's own default --lr)
SMOLLM2_BATCH = 16  # ptedge's default --batch-size, used by the SmolLM2 baselines too


class Bench:
    def __init__(self, cfg: dict, cache: bc.Cache, times: dict, threads: int = 2):
        self.cfg, self.cache, self.times, self.threads = cfg, cache, times, threads
        self.work = cache.work
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
        }

    # -- data, subsampled to files in quick mode ------------------------------------------

    def split_file(self, src: Path, kind: str, tag: str) -> Path:
        """``src`` itself, or (when the mode caps ``kind``) a seeded sample written as a file."""
        from ptedge.data import read_records

        cap = self.cfg["test_max" if kind == "test" else "dev_max"]
        if cap is None:
            return src
        recs = read_records(src)
        out = self.work / "data" / f"{tag}-{kind}{src.suffix}"
        if not out.is_file():
            bc.write_records(out, bc.subsample(recs, cap, seed=SEED), recs.fields)
        return out

    # -- ptedge, as a user runs it ---------------------------------------------------------

    def cli(self, *args: str) -> dict:
        """``ptedge ARGS`` in a fresh process; its last stdout line, parsed as JSON."""
        cmd = [sys.executable, "-m", "ptedge.cli", *args]
        bc.log("$ ptedge " + " ".join(args))
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=bc.ROOT, env=self.env)
        if res.returncode:
            sys.exit(f"ptedge {' '.join(args)} failed:\n{res.stderr[-4000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    def train(self, out: Path, flags: list[str], rev: str | None = None) -> Path:
        """``ptedge train FLAGS --out OUT`` (cached by its flags and ``rev``, what training
        does beyond them)."""
        return self.cache.get(
            out,
            {"train": flags} | ({"rev": rev} if rev else {}),
            lambda: self.cli("train", *flags, "--force", "--out", str(out)),
            "ptedge.json",
        )

    def export(self, runs: list[Path], out: Path, flags: list[str]) -> Path:
        params = {
            "runs": {str(r): self.cache.index.get(str(r.resolve())) for r in runs},
            "flags": flags,
            "export": bc.EXPORT_REV,
        }
        args = ["export", *map(str, runs), "--out", str(out), "--force", *flags]
        return self.cache.get(out, params, lambda: self.cli(*args), "ptedge.json")

    def scored(self, bundle: Path, task: str, test: Path, pooled: list | None = None) -> dict:
        """``Predictor.evaluate`` on the test records, and the top-label ECE before and
        after the bundle's temperature. ``pooled`` (a list) gets the (N, L) scores, gold
        ids and temperature, for an ECE over several tasks' records together."""
        from ptedge import calibration
        from ptedge.data import read_records
        from ptedge.runtime import Predictor
        from ptedge.targets import class_targets, vocab_targets

        p = Predictor(bundle, threads=self.threads)
        recs = read_records(test)
        res = p.evaluate(recs, task=task)
        _, spec = p.task(task)
        if spec["kind"] == "classify":
            targets = class_targets(recs, spec["label_field"], spec["labels"], unknown_ok=True)
        else:
            targets = vocab_targets(recs, spec["label_field"], spec["template"], p.tokenizer)
        keep = [i for i, t in enumerate(targets) if t is not None and t >= 0]
        scores, _ = p.scores([recs[i] for i in keep], task)
        gold = [targets[i] for i in keep]
        t = (spec.get("calibration") or {}).get("temperature", 1.0)
        for name, temp in (("ece_before", 1.0), ("ece_after", t)):
            probs = calibration.probabilities(scores, temp)
            ok = probs.argmax(-1) == gold if keep else []
            res[name] = calibration.ece(probs.max(-1), ok) if keep else None
        res["ece_floor"] = calibration.ece_floor(probs.max(-1)) if keep else None
        res["temperature"] = t
        if pooled is not None and keep:
            pooled.append((scores, np.asarray(gold), t))
        res["accuracy_without_rejection"] = (
            float((scores.argmax(-1) == gold).mean()) if keep else None
        )
        return res

    @staticmethod
    def run_stats(run: Path) -> dict:
        """The run's recorded choices (defaults and dev split), dev metrics of the kept
        prompt, and seconds per step: the median over timing.jsonl's logging windows (a
        window that follows a dev evaluation also holds that evaluation's time)."""
        cfg = json.loads((run / "ptedge.json").read_text())
        rows = []
        if (run / "timing.jsonl").is_file():
            rows = [json.loads(x) for x in (run / "timing.jsonl").read_text().splitlines() if x]
        rows = [r for r in rows if "samples_per_s" in r]
        per_step = sorted(cfg["batch_size"] / r["samples_per_s"] for r in rows)
        s_step = per_step[len(per_step) // 2] if per_step else None
        return {
            "best": cfg.get("best") or {},
            "steps": cfg["steps"],
            "batch_size": cfg["batch_size"],
            "defaults": cfg.get("defaults") or {},
            "dev_split": {k: v for k, v in (cfg.get("dev_split") or {}).items() if k != "file"},
            "s_per_step": s_step,
        }

    # -- PEFT ---------------------------------------------------------------------------------

    def peft_job(self, name: str, params: dict, fn) -> dict:
        """Train and score a PEFT model once; its result is kept as ``result.json``."""
        out = self.work / "peft" / name

        def build():
            out.mkdir(parents=True, exist_ok=True)
            bc.write_json(out / "result.json", fn(out))

        self.cache.get(out, params, build, "result.json")
        return json.loads((out / "result.json").read_text())

    def peft_causal(
        self, out, model_dir, n_virtual, text, recs, label_field, steps, batch, verbalizer=None
    ):
        tok = bc.hf_tokenizer(model_dir)
        label_ids = None
        if verbalizer:
            labels = list(verbalizer)
            label_ids = bc.single_token_ids(tok, [verbalizer[k] for k in labels])
            index = {lab: i for i, lab in enumerate(labels)}

            def targets(rs):
                return [index[r[label_field]] for r in rs]
        else:

            def targets(rs):
                return bc.single_token_ids(tok, [r[label_field] for r in rs])

        def pairs(rs):
            return [(r, t) for r, t in zip(rs, targets(rs), strict=True) if t is not None]

        task = bc.PeftTask("causal", tok, text, label_ids=label_ids, n_virtual=n_virtual)
        train, dev, test = (pairs(recs[s]) for s in ("train", "dev", "test"))
        return self._peft_fit(
            out,
            "causal",
            model_dir,
            n_virtual,
            None,
            task,
            train,
            dev,
            test,
            len(recs["test"]),
            steps,
            batch,
        )

    def _peft_fit(
        self,
        out,
        kind,
        model_dir,
        n_virtual,
        n_labels,
        task,
        train,
        dev,
        test,
        n_test,
        steps,
        batch,
    ) -> dict:
        pm = bc.peft_new(kind, model_dir, n_virtual, n_labels, seed=SEED)
        t0 = time.perf_counter()
        res = bc.peft_train(
            pm, task, train, steps=steps, batch_size=batch, lr=LR, seed=SEED, dev=dev_sample(dev)
        )
        train_s = time.perf_counter() - t0
        pred = task.predict(pm, [r for r, _ in test])
        pm.save_pretrained(str(out / "adapter"))
        return {
            "accuracy": bc.accuracy_of(pred, [t for _, t in test]),
            "n": len(test),
            "skipped": n_test - len(test),
            "best": res["best"],
            "dev_history": res["dev_history"],
            "train_s": train_s,
            "s_per_step": sorted(res["step_s"])[len(res["step_s"]) // 2],  # median
        }

    # -- the encoder tasks: MiniLM, linear head -------------------------------------------

    def minilm_task(self, name: str) -> dict:
        from ptedge.backbones import fetch
        from ptedge.data import Records, read_records
        from ptedge.defaults import carve_dev

        spec = MINILM_TASKS[name]
        src = bc.need_data(spec["dir"])
        model = fetch("minilm-l6")
        train = src / spec["train"]
        test = self.split_file(src / spec["test"], "test", name)
        dev = self.split_file(src / spec["dev"], "dev", name) if spec["dev"] else None
        template = f"[P:3] {{{spec['field']}}} [P:3] [MASK]"
        flags = ["--model", str(model), "--train", str(train)]
        flags += ["--dev", str(dev)] if dev else []
        flags += ["--template", template, "--label-field", spec["label"]]
        if self.cfg["minilm_steps"] is not None:
            flags += ["--steps", str(self.cfg["minilm_steps"])]
            flags += ["--batch-size", str(self.cfg["minilm_batch"])]
        res: dict = {
            "backbone": "minilm-l6",
            "command": "ptedge train " + " ".join(_shown(flags)),
            "peft_input": f"{bc.B77_VIRTUAL} virtual tokens + [CLS] {{{spec['field']}}} [SEP]",
        }
        runs = self.work / "minilm" / name
        with bc.Timer(self.times, f"{name}: ptedge train"):
            run = self.train(runs / "run", flags, bc.LINEAR_HEAD_REV)
            res["ptedge_run"] = self.run_stats(run)
        steps, batch = res["ptedge_run"]["steps"], res["ptedge_run"]["batch_size"]
        res["budget"] = {"steps": steps, "batch_size": batch, "seed": SEED}
        bundles = {}
        reject = ["--reject", str(src / spec["reject_dev"])] if spec.get("reject_dev") else []
        with bc.Timer(self.times, f"{name}: export"):
            bundles["fp32"] = self.export([run], runs / "fp32", reject)
            bundles["int8"] = self.export([run], runs / "int8", [*self.cfg["int8"], *reject])
        res["export_commands"] = {
            p: f"ptedge export RUN --out B {' '.join(_shown(f))}".strip()
            for p, f in (("fp32", reject), ("int8", [*self.cfg["int8"], *reject]))
        }
        with bc.Timer(self.times, f"{name}: score bundles"):
            for prec, b in bundles.items():
                res[f"ptedge_{prec}"] = self.scored(b, "run", test)
                if spec.get("reject_test"):
                    oos = self.split_file(src / spec["reject_test"], "test", f"{name}-oos")
                    res[f"ptedge_{prec}_oos"] = self.scored(b, "run", oos)
        # the baselines' records: ptedge's training records and dev split, exactly
        recs = read_records(train)
        if dev is None:
            keep, held = carve_dev(len(recs), SEED, [r[spec["label"]] for r in recs])
            carved = [json.loads(x) for x in (run / "dev.jsonl").read_text().splitlines()]
            if carved != [recs[i] for i in held]:
                sys.exit(f"{name}: the carved dev split differs from the run's dev.jsonl")
            dev_recs = Records(recs.path, [recs[i] for i in held])
            recs = Records(recs.path, [recs[i] for i in keep])
        else:
            dev_recs = read_records(dev)
        test_recs = read_records(test)
        labels = sorted({r[spec["label"]] for r in recs})
        index = {lab: i for i, lab in enumerate(labels)}

        def pairs(rs):
            return [(r, index[r[spec["label"]]]) for r in rs]

        field = spec["field"]
        with bc.Timer(self.times, f"{name}: peft"):
            tok = bc.hf_tokenizer(model)
            task = bc.PeftTask("seq_cls", tok, lambda r: r[field], n_virtual=bc.B77_VIRTUAL)
            res["peft"] = self.peft_job(
                name,
                {
                    "steps": steps,
                    "batch": batch,
                    "n_virtual": bc.B77_VIRTUAL,
                    "dev": str(dev),
                    "test": str(test),
                    "lr": LR,
                    "n_train": len(recs),
                },
                lambda out: self._peft_fit(
                    out,
                    "seq_cls",
                    model,
                    bc.B77_VIRTUAL,
                    len(labels),
                    task,
                    pairs(recs),
                    pairs(dev_recs),
                    pairs(test_recs),
                    len(test_recs),
                    steps,
                    batch,
                ),
            )
        with bc.Timer(self.times, f"{name}: linear probe"):
            res["linear_probe"] = linear_probe(
                model,
                field,
                pairs(recs),
                pairs(dev_recs),
                pairs(test_recs),
                len(labels),
                steps,
                batch,
                with_dev=dev is None,
            )
        res["bundle"] = bundle_info(bundles)
        return res

    # -- SST-2 on SmolLM2 -----------------------------------------------------------------

    def smollm2_flags(self) -> list[str]:
        steps = self.cfg["smollm2_steps"]
        return [] if steps is None else ["--steps", str(steps)]

    def sst2(self) -> dict:
        from ptedge.backbones import fetch
        from ptedge.data import read_records

        src = bc.need_data("sst2")
        model = fetch("smollm2-135m")
        train = src / "train.tsv"
        dev = self.split_file(src / "dev.tsv", "dev", "sst2")
        test = self.split_file(src / "test.tsv", "test", "sst2")
        runs = self.work / "smollm2" / "sst2"
        common = ["--model", str(model), "--train", str(train), "--dev", str(dev)]
        verb = ["--verbalizer", json.dumps(bc.SST2_VERBALIZER)]
        flags = common + ["--template", bc.SST2_TEMPLATE] + verb + self.smollm2_flags()
        res: dict = {
            "backbone": "smollm2-135m",
            "command": "ptedge train " + " ".join(_shown(flags)),
            "verbalizer": bc.SST2_VERBALIZER,
            "manual_template": bc.SST2_MANUAL,
            "ptedge_template": bc.SST2_TEMPLATE,
            "peft_input": f"{bc.SST2_VIRTUAL} virtual tokens + {bc.SST2_PEFT_TEXT!r}",
        }
        with bc.Timer(self.times, "sst2: manual"):
            manual = self.train(
                runs / "sst2-manual",
                common + ["--template", bc.SST2_MANUAL] + verb + ["--steps", "0"],
            )
        with bc.Timer(self.times, "sst2: ptedge train"):
            run = self.train(runs / "sst2", flags)
            res["ptedge_run"] = self.run_stats(run)
        steps, batch = res["ptedge_run"]["steps"], res["ptedge_run"]["batch_size"]
        res["budget"] = {"steps": steps, "batch_size": batch, "seed": SEED}
        with bc.Timer(self.times, "sst2: peft"):
            recs = {s: read_records(f) for s, f in (("train", train), ("dev", dev), ("test", test))}
            res["peft"] = self.peft_job(
                "sst2",
                {
                    "steps": steps,
                    "batch": batch,
                    "n_virtual": bc.SST2_VIRTUAL,
                    "dev": str(dev),
                    "test": str(test),
                    "lr": LR,
                    "text": bc.SST2_PEFT_TEXT,
                },
                lambda out: self.peft_causal(
                    out,
                    model,
                    bc.SST2_VIRTUAL,
                    lambda r: bc.SST2_PEFT_TEXT.format(sentence=r["sentence"]),
                    recs,
                    "label",
                    steps,
                    batch,
                    verbalizer=bc.SST2_VERBALIZER,
                ),
            )
        bundles = {}
        with bc.Timer(self.times, "sst2: export"):
            bundles["fp32"] = self.export([run, manual], runs / "fp32", [])
            bundles["int8"] = self.export([run, manual], runs / "int8", self.cfg["int8"])
        with bc.Timer(self.times, "sst2: score bundles"):
            for prec, b in bundles.items():
                res[f"ptedge_{prec}"] = self.scored(b, "sst2", test)
                res[f"manual_{prec}"] = self.scored(b, "sst2-manual", test)
        res["manual"] = res["manual_fp32"]
        res["bundle"] = bundle_info(bundles)
        return res

    # -- LAMA on SmolLM2 ------------------------------------------------------------------

    def lama(self, relations: list[str]) -> dict:
        from ptedge.backbones import fetch
        from ptedge.data import read_records

        trex = bc.need_data("trex")
        templates = {
            r["relation"]: r["template"]
            for r in map(json.loads, (trex / "relations.jsonl").read_text().splitlines())
        }
        missing = [r for r in relations if r not in templates]
        if missing:
            sys.exit(f"unknown relation(s) {missing}; trex has {sorted(templates)}")
        model = fetch("smollm2-135m")
        runs_dir = self.work / "smollm2" / "lama"
        per: dict[str, dict] = {}
        ptedge_runs = []
        for rel in relations:
            train = trex / "train" / f"{rel}.jsonl"
            dev = self.split_file(trex / "dev" / f"{rel}.jsonl", "dev", rel)
            test = self.split_file(trex / "test" / f"{rel}.jsonl", "test", rel)
            manual = manual_template(templates[rel])
            row: dict = {"category": LAMA_TYPES.get(rel, "?"), "manual_template": manual}
            common = [
                "--model",
                str(model),
                "--train",
                str(train),
                "--dev",
                str(dev),
                "--label-field",
                "obj_label",
            ]
            with bc.Timer(self.times, "lama: manual"):
                mrun = self.train(
                    runs_dir / f"{rel}-manual", common + ["--template", manual, "--steps", "0"]
                )
                row["manual"] = self.cli("eval", str(mrun), "--data", str(test))
            flags = common + ["--template", bc.LAMA_TEMPLATE] + self.smollm2_flags()
            with bc.Timer(self.times, "lama: ptedge train"):
                run = self.train(runs_dir / rel, flags)
                row["ptedge_run"] = self.run_stats(run)
            ptedge_runs.append(run)
            steps, batch = row["ptedge_run"]["steps"], row["ptedge_run"]["batch_size"]
            with bc.Timer(self.times, "lama: peft"):
                recs = {
                    s: read_records(f) for s, f in (("train", train), ("dev", dev), ("test", test))
                }
                row["peft"] = self.peft_job(
                    f"lama-{rel}",
                    {
                        "rel": rel,
                        "steps": steps,
                        "batch": batch,
                        "n_virtual": bc.LAMA_VIRTUAL,
                        "dev": str(dev),
                        "test": str(test),
                        "lr": LR,
                    },
                    lambda out, recs=recs, steps=steps, batch=batch: self.peft_causal(
                        out,
                        model,
                        bc.LAMA_VIRTUAL,
                        lambda r: r["sub_label"],
                        recs,
                        "obj_label",
                        steps,
                        batch,
                    ),
                )
            row["test_file"] = str(test)
            per[rel] = row
        bundles = {}
        with bc.Timer(self.times, "lama: export (one multi-task bundle)"):
            bundles["fp32"] = self.export(ptedge_runs, self.work / "smollm2" / "lama-fp32", [])
            bundles["int8"] = self.export(
                ptedge_runs, self.work / "smollm2" / "lama-int8", self.cfg["int8"]
            )
        pooled: list = []  # the int8 bundle's (scores, gold, temperature) per relation
        with bc.Timer(self.times, "lama: score bundles"):
            for prec, b in bundles.items():
                for rel in relations:
                    per[rel][f"ptedge_{prec}"] = self.scored(
                        b, rel, Path(per[rel]["test_file"]), pooled if prec == "int8" else None
                    )
        methods = ["manual", "ptedge_fp32", "ptedge_int8", "peft"]
        macro = {m: sum(per[r][m]["accuracy"] for r in relations) / len(relations) for m in methods}
        first = per[relations[0]]["ptedge_run"]
        return {
            "backbone": "smollm2-135m",
            "relations": relations,
            "command": "ptedge train "
            + " ".join(
                _shown(common + ["--template", bc.LAMA_TEMPLATE] + self.smollm2_flags())
            ).replace(relations[-1], "REL"),
            "categories": {r: LAMA_TYPES.get(r, "?") for r in relations},
            "budget": {"steps": first["steps"], "batch_size": first["batch_size"], "seed": SEED},
            "ptedge_template": bc.LAMA_TEMPLATE,
            "peft_input": f"{bc.LAMA_VIRTUAL} virtual tokens + {{sub_label}}",
            "per_relation": per,
            "macro_p_at_1": macro,
            "macro_ece": {
                k: sum(per[r]["ptedge_int8"][k] for r in relations) / len(relations)
                for k in ("ece_before", "ece_after", "ece_floor")
            },
            "pooled_ece": pooled_ece(pooled),
            "bundle": bundle_info(bundles),
        }


def pooled_ece(parts: list) -> dict | None:
    """Top-label ECE before and after each part's temperature, and its floor, over the
    records of every (scores (N, L), gold (N,), temperature) part together."""
    from ptedge import calibration

    if not parts:
        return None
    res = {"n": sum(len(g) for _, g, _ in parts)}
    for name, calibrated in (("ece_before", False), ("ece_after", True)):
        conf, ok = [], []
        for scores, gold, t in parts:
            probs = calibration.probabilities(scores, t if calibrated else 1.0)
            conf.append(probs.max(-1))
            ok.append(probs.argmax(-1) == gold)
        res[name] = calibration.ece(np.concatenate(conf), np.concatenate(ok))
    res["ece_floor"] = calibration.ece_floor(np.concatenate(conf))
    return res


ECE_NOTE = (
    "ECE: raw softmax → with the bundle's temperature (floor: the mean ECE a perfectly "
    "calibrated model with the same confidences scores on the same number of records, "
    "`ptedge.calibration.ece_floor`; an ECE near its floor is binning noise)."
)


def _ece(r: dict) -> str:
    """'raw → calibrated (floor x)' for a scored bundle's ECE fields."""
    floor = r.get("ece_floor")
    tail = f" (floor {floor:.3f})" if floor is not None else ""
    return f"{r['ece_before']:.3f} → {r['ece_after']:.3f}{tail}"


def _shown(flags: list[str]) -> list[str]:
    """Command-line flags as a user would type them: data paths from the repo root,
    the backbone by name, arguments with spaces quoted."""
    out = []
    for f in flags:
        f = f.replace(str(bc.DATA), "../shared/data")
        if "/models/" in f and Path(f).is_dir():
            f = Path(f).name
        if "\n" in f:  # bash's $'...' keeps the newline readable
            out.append("$'" + f.replace("\n", "\\n") + "'")
        else:
            out.append(f"'{f}'" if any(c in f for c in ' {["') else f)
    return out


def dev_sample(pairs: list, n: int = DEV_MAX) -> list:
    """The dev records ptedge.train scores (the same seeded sample of at most 500)."""
    import random

    if len(pairs) <= n:
        return pairs
    idx = sorted(random.Random(SEED).sample(range(len(pairs)), n))
    return [pairs[i] for i in idx]


def manual_template(lama: str) -> str:
    """LAMA's ``[X] ... [Y] ...`` as a causal-LM template: everything up to ``[Y]``."""
    head = lama.split("[Y]")[0]
    return head.replace("[X]", "{sub_label}").rstrip() + " [MASK]"


def bundle_info(bundles: dict[str, Path]) -> dict:
    from ptedge.runtime import load_manifest

    out = {}
    for prec, b in bundles.items():
        m = load_manifest(b, verify=False)
        q = m.get("quantization") or {}
        out[prec] = {
            "path": str(b),
            "mb": bc.folder_bytes(b) / 1e6,
            "tasks": sorted(m["tasks"]),
            "int8_guard": q.get("guard"),
            "int8_recipe": q.get("recipe"),
            "calibration": {t: s.get("calibration") for t, s in m["tasks"].items()},
        }
        rejects = [s["reject"] for s in m["tasks"].values() if s.get("reject")]
        if rejects:  # the rule, less a distance's matrices
            out[prec]["reject"] = {k: v for k, v in rejects[0].items() if k != "distance"}
    return out


def mean_embeddings(model_dir: Path, texts: list[str], batch: int = 64):
    """Mask-weighted mean of frozen MiniLM's last hidden states (sentence-transformers' pooling)."""
    import torch
    from transformers import AutoModel

    tok = bc.hf_tokenizer(model_dir)
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), model.config.hidden_size)
    with torch.inference_mode():
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            enc = tok(
                [texts[j] for j in idx],
                padding=True,
                truncation=True,
                max_length=bc.BASELINE_TOKENS,
                return_tensors="pt",
            )
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out[idx] = (h * m).sum(1) / m.sum(1)
    return out


def linear_probe(
    model_dir, field, train, dev, test, n_labels, steps, batch, seed: int = SEED, with_dev=False
) -> dict:
    """Linear(H, labels) on frozen mean-pooled embeddings of the training records the run's
    batches draw, the better on dev of two fits: trained like everything else (AdamW,
    warm-up/decay, clipping, the batch order ``seed`` draws) at each of ``PROBE_LRS``, and
    the L2 logistic regression solved to convergence (scikit-learn's default, C = 1;
    ``ptedge.head_fit.fit_converged``). ``with_dev`` (dev was carved from the training
    file): the converged fit is judged on dev as fitted without it, and scored on test as
    fitted with it too, as a probe fitted on the whole file is (and ptedge's head)."""
    import torch

    from ptedge import head_fit

    batches = head_fit.batch_order(len(train), steps, batch, seed)
    used = sorted({i for b in batches for i in b})
    row = {i: k for k, i in enumerate(used)}
    t0 = time.perf_counter()
    texts = [train[i][0][field] for i in used] + [r[field] for r, _ in dev + test]
    emb = mean_embeddings(model_dir, texts)
    n_tr, n_dev = len(used), len(dev)
    x_tr, x_dev, x_te = emb[:n_tr], emb[n_tr : n_tr + n_dev], emb[n_tr + n_dev :]
    y_tr = torch.tensor([train[i][1] for i in used])
    y_dev, y_te = (torch.tensor([t for _, t in s]) for s in (dev, test))
    embed_s = time.perf_counter() - t0
    heads = {}
    mapped = [[row[i] for i in b] for b in batches]
    for lr in PROBE_LRS:
        heads[f"lr {lr:g}"] = head_fit.fit_head(x_tr, y_tr, mapped, n_labels, lr, seed)
    heads[CONVERGED] = head_fit.fit_converged(x_tr, y_tr, n_labels)
    tested = dict(heads)
    if with_dev:
        tested[CONVERGED] = head_fit.fit_converged(
            torch.cat([x_tr, x_dev]), torch.cat([y_tr, y_dev]), n_labels
        )
    by_fit = {}
    with torch.no_grad():
        for name, head in heads.items():
            by_fit[name] = {
                "dev_accuracy": float((head(x_dev).argmax(-1) == y_dev).float().mean()),
                "test_accuracy": float((tested[name](x_te).argmax(-1) == y_te).float().mean()),
            }
    best = max(heads, key=lambda k: by_fit[k]["dev_accuracy"])  # ties: the first, by lr
    return {
        "accuracy": by_fit[best]["test_accuracy"],
        "n": len(test),
        "fit": best,
        "dev_accuracy_by_fit": {k: v["dev_accuracy"] for k, v in by_fit.items()},
        "test_accuracy_by_fit": {k: v["test_accuracy"] for k, v in by_fit.items()},
        "converged_with_dev": with_dev,
        "pooling": "mean over tokens (attention mask), frozen all-MiniLM-L6-v2",
        "embedded_train_records": n_tr,
        "embed_s": embed_s,
    }


# -- reports ---------------------------------------------------------------------------------


def merge_earlier(result: dict, path: Path, tasks: list[str]) -> None:
    """Take the tasks this run did not do from an earlier quality.json of the same mode.

    ``result["parts"]`` then lists every contributing run (command, tasks, wall time,
    load average) so the report says where each table came from.
    """
    part = {
        "command": result["command"],
        "tasks": tasks,
        "wall_s": result["wall_s"],
        "timings": result["timings"],
        "load_avg_at_end": result["machine"]["load_avg_at_end"],
    }
    result["parts"] = [part]
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if old.get("quick") != result["quick"]:
        return
    kept = [t for t in TASKS if t not in tasks and t in old]
    if not kept:
        return
    for t in kept:
        result[t] = old[t]
    earlier = old.get("parts") or [
        {k: old.get(k) for k in ("command", "wall_s", "timings")}
        | {"tasks": [t for t in TASKS if t in old], "load_avg_at_end": None}
    ]
    result["parts"] = [
        p | {"tasks": [t for t in p["tasks"] if t in kept]}
        for p in earlier
        if any(t in kept for t in p["tasks"])
    ] + [part]


def _acc(x) -> float | None:
    return None if x is None else x.get("accuracy")


def markdown(result: dict) -> str:
    f = bc.fmt
    lines = [
        "# Quality at defaults: ptedge against manual prompts, PEFT P-tuning and a linear probe",
        "",
        f"Machine: {bc.machine_line(result['machine'])}.",
        f"Mode: {'quick (smoke test sizes, not for comparison)' if result['quick'] else 'full'}; "
        + "; ".join(
            f"{', '.join(p['tasks'])}: `{p['command']}`, wall time {p['wall_s'] / 60:.1f} min"
            for p in result.get("parts") or [{**result, "tasks": [t for t in TASKS if t in result]}]
        )
        + ".",
        "Every ptedge run is the command shown, with ptedge's defaults (no lr, pool, head-lr, "
        "steps or batch-size flags); baselines get the same budget, seed and records; test "
        "splits are only scored. ECE: expected calibration error (15 bins) of the bundle's "
        "top-label probability on the test split, raw softmax → with the temperature fitted "
        "at export; its floor is the mean ECE a perfectly calibrated model with the same "
        "confidences scores on as many records (`ptedge.calibration.ece_floor`).",
        "",
    ]
    for note in (bc.busy_note(result["machine"]), bc.reuse_note(result.get("reused", []))):
        if note:
            lines += [note, ""]
    enc = [t for t in MINILM_TASKS if t in result]
    if enc:
        lines += [
            "## all-MiniLM-L6-v2, linear head, test accuracy at ptedge's default budget",
            "",
            "| task | steps × batch | ptedge fp32 | ptedge int8 | PEFT P-tuning | linear probe "
            "| ECE (int8) | goals: int8 ≥ best baseline; ≥ the issue's bar |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for t in enc:
            r = result[t]
            i8 = r["ptedge_int8"]
            in8 = i8.get("accuracy_without_rejection", i8["accuracy"])
            base = max(_acc(r["peft"]), r["linear_probe"]["accuracy"])
            goal = MINILM_TASKS[t]["goal"]
            verdict = f"{'met' if in8 >= base else 'not met'} ({100 * (in8 - base):+.1f} pt)"
            extra = f"; ≥ {goal}: {'met' if in8 >= goal else 'not met'}" if goal else ""
            fp = r["ptedge_fp32"].get("accuracy_without_rejection", r["ptedge_fp32"]["accuracy"])
            b = r["budget"]
            lines.append(
                f"| {t} (n={i8.get('n_in_scope', i8['n'])}) | {b['steps']} × {b['batch_size']} "
                f"| {f(fp)} | **{f(in8)}** | "
                f"{f(_acc(r['peft']))} | {f(r['linear_probe']['accuracy'])} | "
                f"{_ece(i8)} | {verdict}{extra} |"
            )
        fits = "; ".join(f"{t}: {result[t]['linear_probe'].get('fit', 'SGD')}" for t in enc)
        lines += [
            "",
            "Linear probe: `Linear(H, labels)` on mean-pooled frozen all-MiniLM-L6-v2 embeddings "
            "of the same training records, the better on dev of SGD at ptedge's budget (lr "
            f"{', '.join(f'{lr:g}' for lr in PROBE_LRS)}) and a logistic regression solved to "
            f"convergence (`{CONVERGED}`, scikit-learn's default strength); picked: {fits}. "
            "Where ptedge carved its dev split from the training file, the converged fit is "
            "judged on dev as fitted without it and tested as fitted with it too (a probe "
            "fitted on the whole file, as ptedge's shipped head is).",
            "",
            "Commands (one per task; `ptedge export RUN --out B --quantize int8` after):",
            "",
        ]
        lines += [f"- {t}: `{result[t]['command']}`" for t in enc]
        lines += ["", "Chosen by ptedge for each task (recorded in its run's ptedge.json):", ""]
        for t in enc:
            chosen = result[t]["ptedge_run"]["defaults"]
            lines.append(
                f"- {t}: "
                + "; ".join(f"{k} = {v['value']} ({v['why']})" for k, v in chosen.items())
                + "."
            )
        lines.append("")
    clinc = result.get("clinc150")
    if clinc and "ptedge_int8_oos" in clinc:
        i8, oos = clinc["ptedge_int8"], clinc["ptedge_int8_oos"]
        rej = clinc["bundle"]["int8"].get("reject") or {}
        paper = CLINC_PAPER
        drop = 100 * (i8["accuracy_without_rejection"] - i8["in_scope_accuracy"])
        ok = oos["oos_recall"] >= paper["bert"]["oos_recall"] and drop <= 2
        dev = rej.get("dev", {})
        dev_loss = 100 * (dev.get("accuracy", 0) - dev.get("accuracy_kept", 0))
        bound = dev.get("loss_bound_points")
        spent = f"{dev_loss:.2f} points on {dev.get('n')} dev records" + (
            f", one-sided 95% upper bound {bound:.2f}" if bound is not None else ""
        )
        from ptedge.calibration import describe_rule

        what = f"the {describe_rule(rej)}"
        rule = (
            f"threshold {f(rej.get('threshold'), 4)} on {what} (chosen on dev among the "
            "rule's candidates"
        )
        lines += [
            "## CLINC150 out-of-scope rejection (int8 bundle)",
            "",
            f"`{clinc['export_commands']['int8']}`: {rule}: the most of `oos_dev.csv` "
            f"rejected, losing at most {rej.get('max_drop_points')} in-scope points; it lost "
            f"{spent}).",
            "",
            "| system | in-scope accuracy | out-of-scope recall |",
            "|---|---:|---:|",
            f"| ptedge int8, no rejection | {f(i8['accuracy_without_rejection'])} | 0 |",
            f"| ptedge int8, with the threshold | {f(i8['in_scope_accuracy'])} | "
            f"**{f(oos['oos_recall'])}** |",
            f"| Larson et al. 2019, BERT (oos-threshold) | {paper['bert']['in_scope']} | "
            f"{paper['bert']['oos_recall']} |",
            f"| Larson et al. 2019, MLP (oos-threshold) | {paper['mlp']['in_scope']} | "
            f"{paper['mlp']['oos_recall']} |",
            "",
            f"Goal (out-of-scope recall ≥ {paper['bert']['oos_recall']}, in-scope accuracy "
            f"falling ≤ 2 points): {'met' if ok else 'not met'} ({drop:.2f} points; "
            f"n = {i8['n']} in scope, {oos['n']} out of scope).",
            "",
        ]
    sst = result.get("sst2")
    if sst:
        b = sst["budget"]
        lines += [
            f"## SST-2, SmolLM2-135M, LM head, test accuracy — {b['steps']} steps × "
            f"{b['batch_size']} (ptedge's default step rule)",
            "",
            f"`{sst['command']}`. Verbalizer {json.dumps(sst['verbalizer'])}; manual "
            f"`{sst['manual_template']!r}`; PEFT: {sst['peft_input']}.",
            "",
            "| method | fp32 | int8 | ECE (int8) | n |",
            "|---|---:|---:|---:|---:|",
            f"| manual prompt | {f(_acc(sst['manual_fp32']))} | {f(_acc(sst['manual_int8']))} | "
            f"{_ece(sst['manual_int8'])} | "
            f"{sst['manual_fp32']['n']} |",
            f"| ptedge P-tuning | {f(_acc(sst['ptedge_fp32']))} | "
            f"**{f(_acc(sst['ptedge_int8']))}** | "
            f"{_ece(sst['ptedge_int8'])} | "
            f"{sst['ptedge_fp32']['n']} |",
            f"| PEFT P-tuning (PyTorch) | {f(_acc(sst['peft']))} | | | {sst['peft']['n']} |",
            "",
        ]
    lama = result.get("lama")
    if lama:
        b = lama["budget"]
        lines += [
            f"## LAMA (T-REx), SmolLM2-135M, precision@1 — {b['steps']} steps × "
            f"{b['batch_size']} per relation (ptedge's default step rule)",
            "",
            f"`{lama['command']}`, one prompt per relation, all in one multi-task bundle (fp32 "
            f"{lama['bundle']['fp32']['mb']:.0f} MB, int8 {lama['bundle']['int8']['mb']:.0f} MB, "
            f"recipe `{lama['bundle']['int8'].get('int8_recipe')}`); PEFT: {lama['peft_input']}; "
            "manual: LAMA's template up to [Y].",
            "",
            "| relation | type | n (skipped) | manual | ptedge fp32 | ptedge int8 | PEFT | "
            "ECE (int8) |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for rel in lama["relations"]:
            r = lama["per_relation"][rel]
            n = r["ptedge_fp32"]
            lines.append(
                f"| {rel} | {r['category']} | {n['n']} ({n['skipped']}) | "
                f"{f(_acc(r['manual']))} | {f(_acc(r['ptedge_fp32']))} | "
                f"{f(_acc(r['ptedge_int8']))} | {f(_acc(r['peft']))} | {_ece(r['ptedge_int8'])} |"
            )
        m = lama["macro_p_at_1"]
        e = lama["macro_ece"]
        lines += [
            f"| **macro** | | | **{f(m['manual'])}** | **{f(m['ptedge_fp32'])}** | "
            f"**{f(m['ptedge_int8'])}** | **{f(m['peft'])}** | {_ece(e)} |",
            "",
            ECE_NOTE,
            "",
        ]
        pe = lama.get("pooled_ece")
        if pe:
            lines += [
                f"ECE of the int8 bundle over every relation's test facts together (n = "
                f"{pe['n']}; each relation at its own temperature): {_ece(pe)}; goal ≤ 0.05 "
                f"after temperature scaling: {'met' if pe['ece_after'] <= 0.05 else 'not met'}.",
                "",
            ]
    timings = {}
    for p in result.get("parts") or [result]:
        timings |= p["timings"]
    lines += [f"Wall time per stage (s): {', '.join(f'{k} {v}' for k, v in timings.items())}.", ""]
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {
        "manual": "tab:gray",
        "ptedge_fp32": "tab:blue",
        "ptedge_int8": "tab:green",
        "peft": "tab:red",
        "linear_probe": "tab:orange",
    }
    groups = [t for t in (*MINILM_TASKS, "sst2") if t in result]
    cols = ["manual", "ptedge_fp32", "ptedge_int8", "peft", "linear_probe"]
    fig, ax = plt.subplots(figsize=(2.2 * max(2, len(groups) + 1), 4.2))
    x = np.arange(len(groups) + ("lama" in result))
    labels = []
    for k, c in enumerate(cols):
        vals = []
        for t in groups:
            r = result[t]
            v = r.get(c) if c != "manual" else r.get("manual_fp32")
            if isinstance(v, dict) and c.startswith("ptedge"):
                v = v.get("accuracy_without_rejection", v.get("accuracy"))
            vals.append(_acc(v) if isinstance(v, dict) else v)
        if "lama" in result:
            vals.append(result["lama"]["macro_p_at_1"].get(c))
        vals = [np.nan if v is None else v for v in vals]
        ax.bar(x + (k - 2) * 0.16, vals, 0.16, label=c, color=colors[c])
    labels = groups + (["LAMA (macro P@1)"] if "lama" in result else [])
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    m = result["machine"]
    ax.set_title(
        f"ptedge at defaults — {m['cpu']}, {m['date'][:10]}"
        + (" (quick mode)" if result["quick"] else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="smoke-test sizes (10 steps, 40 test records)"
    )
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ",".join(TASKS))
    ap.add_argument(
        "--relations",
        help="comma-separated T-REx relations, or 'all' (default: "
        + ",".join(RELATIONS)
        + "; quick: "
        + ",".join(QUICK_RELATIONS)
        + ")",
    )
    ap.add_argument(
        "--data",
        type=Path,
        help="your own classification folder (train, test, optional dev files): run it as "
        "the MiniLM tasks instead of --tasks",
    )
    ap.add_argument("--field", default="text", help="--data: the text field (default text)")
    ap.add_argument(
        "--label-field", default="label", help="--data: the label field (default label)"
    )
    ap.add_argument(
        "--out",
        help="folder for quality.json/.md/.png (default docs/results; with --data, "
        "runs/bench/quality-NAME)",
    )
    ap.add_argument("--work", help="runs, bundles, baselines (default runs/bench/quality[-quick])")
    ap.add_argument("--fresh", action="store_true", help="rebuild every artifact")
    ap.add_argument(
        "--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)"
    )
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    cpu0 = bc.cpu_mark()
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        sys.exit(f"unknown task(s) {bad}; choose from {', '.join(TASKS)}")
    tasks = [t for t in TASKS if t in tasks]  # run in TASKS' order
    if a.data is not None:
        if a.tasks != ",".join(TASKS):
            sys.exit("--data runs one folder in place of the built-in tasks: drop --tasks")
        name, spec = data_task(a.data, a.field, a.label_field)
        MINILM_TASKS[name] = spec
        tasks = [name]
    out = Path(
        a.out or (bc.ROOT / "runs" / "bench" / f"quality-{tasks[0]}" if a.data else "docs/results")
    )
    cfg = QUICK if a.quick else FULL
    if a.relations == "all":
        relations = sorted(p.stem for p in (bc.need_data("trex") / "test").glob("P*.jsonl"))
    elif a.relations:
        relations = [r.strip() for r in a.relations.split(",") if r.strip()]
    else:
        relations = QUICK_RELATIONS if a.quick else RELATIONS
    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(a.work or bc.ROOT / "runs" / "bench" / ("quality-quick" if a.quick else "quality"))
    times: dict = {}
    bench = Bench(cfg, bc.Cache(work, fresh=a.fresh), times, a.threads)
    cmd = "python tools/bench_quality.py" + (" --quick" if a.quick else "")
    if a.data is not None:
        cmd += f" --data {a.data} --field {a.field} --label-field {a.label_field}"
    elif a.tasks != ",".join(TASKS):
        cmd += f" --tasks {a.tasks}"
    if a.relations:
        cmd += f" --relations {a.relations}"
    if a.threads != 2:
        cmd += f" --threads {a.threads}"
    result: dict = {
        "benchmark": "quality",
        "quick": a.quick,
        "command": cmd,
        "machine": bc.machine(),
        "settings": cfg,
        "timings": times,
    }
    for t in tasks:
        t0 = time.perf_counter()
        if t == "lama":
            result[t] = bench.lama(relations)
        elif t == "sst2":
            result[t] = bench.sst2()
        else:
            result[t] = bench.minilm_task(t)
        times[f"{t} (total)"] = round(time.perf_counter() - t0, 1)
    result["wall_s"] = time.perf_counter() - t_start
    result["machine"]["load_avg_at_end"] = list(os.getloadavg())
    result["machine"]["others_cpu_share"] = bc.others_cpu_share(cpu0)
    result["reused"] = bench.cache.reused
    out.mkdir(parents=True, exist_ok=True)
    merge_earlier(result, out / "quality.json", tasks)
    bc.write_report(out, "quality", result, markdown(result))
    chart(result, out / "quality.png")
    bc.log(
        f"wrote {out / 'quality.json'}, quality.md, quality.png in {result['wall_s'] / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
