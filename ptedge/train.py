"""The training loop: P-tune a frozen backbone on a data file and write a run folder.

``train(TrainArgs)`` reads the data, builds the model (``ptedge.model``), runs AdamW
on the encoder (and head) with warm-up and linear decay, evaluates ``--dev``
periodically keeping the latest prompt within a standard error of the best
(``ptedge.defaults.keeps_later_step``), and writes the run folder: ``ptedge.json``,
``prompt_encoder.safetensors`` (``head.safetensors``), ``metrics.jsonl``,
``timing.jsonl``, ``curve.png``. The same command on the same machine with the same
thread count writes the same bytes into every file but ``timing.jsonl``, also when the
run was killed and resumed (``--save-every``, ``--resume``). ``evaluate`` scores a
model on records (also used by ``ptedge eval``).

Not responsible for: argument parsing (``ptedge.cli``), export (``ptedge.export``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import ptedge
from ptedge import checkpoint, defaults, head_fit
from ptedge.checks import check_records
from ptedge.config import RunConfig
from ptedge.data import Records, labels_of, read_records, require_fields, write_jsonl
from ptedge.model import (
    HEAD_FILE,
    HEAD_WITHOUT_DEV_FILE,
    build_for_run,
    compile_for,
    eos_id,
    is_causal,
    load_backbone,
    pad_id,
)
from ptedge.targets import accuracy, class_targets, exact_match, vocab_targets
from ptedge.template import encode, fields_of, lengths, parse, pseudo_count

METRICS = "metrics.jsonl"  # what repeats bit for bit: step, loss, lr, dev metrics
TIMING = "timing.jsonl"  # wall-clock figures (samples_per_s), which never repeat
CURVE = "curve.png"
DEV_MAX = 500  # dev records scored at each periodic evaluation
DEV_NONE = "none"  # --dev none: train without a dev split
DEV_FILE = "dev.jsonl"  # the carved dev split, in the run folder
GEN_MAX_NEW_TOKENS = 32  # greedy decoding budget when evaluating generate runs


@dataclass
class TrainArgs:
    model: str
    train: str
    template: str
    out: str
    dev: str | None = None  # None: carve one from train (ptedge.defaults); DEV_NONE: no dev
    label_field: str = "label"
    verbalizer: dict[str, str] | None = None
    head: str | None = None  # default: lm if the backbone has an LM head, else linear
    encoder: str = "lstm"
    pool: str | None = None  # linear head input; None: ptedge.defaults.pool
    backbone_dropout: bool | None = None  # None: ptedge.defaults.backbone_dropout
    prompt_init: str | None = None  # pad | random; None: ptedge.defaults.prompt_init
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None  # None: ptedge.defaults.batch_size (by head)
    lr: float = 3e-3
    head_lr: float | None = None  # linear head's peak lr; None: ptedge.defaults.head_lr
    warmup: float = 0.06
    seed: int = 0
    max_length: int | None = None  # None: ptedge.defaults.max_length (from the records)
    eval_every: int | None = None
    log_every: int = 10
    save_every: int = 0  # steps between resumable checkpoints (0 = none)
    resume: bool = False  # continue from the run folder's checkpoint, if any
    dtype: str = "fp32"  # frozen backbone precision: fp32 | bf16 | fp16 (encoder stays fp32)
    device: str = "auto"  # auto = cuda when available, else cpu
    force: bool = False


class Job:
    """A run's model with its tokenizer and template: targets, loss, scoring."""

    def __init__(self, cfg: RunConfig, model, tok, compiled, device: str = "cpu"):
        self.cfg, self.model, self.tok, self.compiled = cfg, model, tok, compiled
        self.device = torch.device(device)
        self.forward = model  # the DistributedDataParallel wrapper when distributed

    @property
    def generative(self) -> bool:
        return self.cfg.head == "generate"

    def targets(self, records: Records) -> list:
        """Per record: label index, vocabulary id (None = skipped), or target token ids."""
        if self.generative:
            texts = labels_of(records, self.cfg.label_field)
            prefix = self.compiled["answer_prefix"]
            encs = self.tok.encode_batch([prefix + t for t in texts], add_special_tokens=False)
            return [e.ids + [self.cfg.eos_id] for e in encs]
        if self.cfg.labels is None:
            return vocab_targets(records, self.cfg.label_field, self.compiled, self.tok)
        return class_targets(records, self.cfg.label_field, self.cfg.labels)

    def batch(self, records: list[dict], targets=None, side: str = "right"):
        enc = encode(self.compiled, self.tok, records, targets=targets, padding_side=side)
        return tuple(
            torch.from_numpy(a).to(self.device)
            for a in (enc.input_ids, enc.attention_mask, enc.slot)
        )

    def loss(self, records: list[dict], targets: list) -> torch.Tensor:
        """Cross-entropy of a batch: over labels/vocabulary at the slot, or teacher-forced
        over every target token (``generate``)."""
        if not self.generative:
            scores = self.forward(*self.batch(records))  # (B, L|V)
            gold = torch.tensor(targets, device=self.device)
            return torch.nn.functional.cross_entropy(scores.float(), gold)
        ids, mask, slot = self.batch(records, targets)
        width = max(len(t) for t in targets)
        steps = torch.arange(width, device=self.device)  # (K,)
        positions = (slot.unsqueeze(1) + steps).clamp(max=ids.shape[1] - 1)  # (B, K)
        gold = torch.full((len(targets), width), -100)  # (B, K), -100 = ignored
        for b, t in enumerate(targets):
            gold[b, : len(t)] = torch.tensor(t)
        logits = self.forward(ids, mask, slot, positions=positions)  # (B, K, V)
        gold = gold.to(self.device)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), gold.flatten())

    def generate(self, records: list[dict], max_new_tokens: int, batch_size: int = 32):
        """Greedy texts (torch reference decoder), one per record."""
        texts = []
        for i in range(0, len(records), batch_size):
            ids, mask, _ = self.batch(records[i : i + batch_size], side="left")
            for toks in self.model.greedy(ids, mask, max_new_tokens, self.cfg.eos_id):
                texts.append(self.tok.decode(toks))
        return texts


@torch.inference_mode()
def predict_ids(job: Job, records: list[dict], batch_size: int = 32) -> list[int]:
    """Top-1 index (label or vocabulary id) per record, in order."""
    job.model.eval()
    out: list[int] = []
    for i in range(0, len(records), batch_size):
        scores = job.model(*job.batch(records[i : i + batch_size]))  # (B, L|V)
        out.extend(scores.argmax(-1).tolist())
    return out


def evaluate(job: Job, records: Records, batch_size: int = 32) -> dict:
    """{"accuracy", "n", "skipped"} of the job's model on records (exact match for
    ``generate``)."""
    if job.generative:
        job.model.eval()
        texts = job.generate(records, GEN_MAX_NEW_TOKENS, batch_size)
        return exact_match(texts, labels_of(records, job.cfg.label_field))
    targets = job.targets(records)
    keep = [i for i, t in enumerate(targets) if t is not None]
    preds = predict_ids(job, [records[i] for i in keep], batch_size)
    return accuracy(preds, [targets[i] for i in keep]) | {"skipped": len(targets) - len(keep)}


def _check_data(args: TrainArgs, train: Records, dev: Records | None) -> None:
    """Fields and labels of the data, before the backbone loads: every record has the
    template's fields and a label; labels are the verbalizer's, and dev labels are
    training labels for a linear head (its classes are the training labels)."""
    known = list(args.verbalizer) if args.verbalizer and args.head != "linear" else None
    for recs in (train, dev) if dev is not None else (train,):
        check_records(
            recs,
            fields_of(args.template),
            label_field=args.label_field,
            labels=known,
            needed_by="the template",
        )
    if dev is not None and args.head == "linear":
        classes = sorted(set(labels_of(train, args.label_field)))
        check_records(dev, [], label_field=args.label_field, labels=classes)


def _labels_for(args: TrainArgs, head: str, train: Records) -> list[str] | None:
    if head == "generate":
        return None
    if head == "linear":
        return sorted({r[args.label_field] for r in train})
    if args.verbalizer:
        return list(args.verbalizer)
    return None


def _subsample(records: Records, n: int, seed: int) -> Records:
    if len(records) <= n:
        return records
    idx = sorted(random.Random(seed).sample(range(len(records)), n))
    return Records(records.path, [records[i] for i in idx], [records.lines[i] for i in idx])


def _prepare_out(out: Path, force: bool, resume: bool) -> None:
    """An empty run folder, or one with a checkpoint to resume from."""
    if resume and checkpoint.load(out) is not None:
        return
    if out.exists() and any(out.iterdir()):
        if not (force or resume):
            raise FileExistsError(
                f"{out}: output folder is not empty (use --resume to continue it, "
                "--force to replace it)"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _distributed(device: str) -> Iterator[tuple[int, int]]:
    """(rank, world size) while inside; joins the process group under torchrun or
    accelerate launch, and leaves it on the way out.

    A group this joined is destroyed before the process ends: a rank that exits with
    gloo's worker threads still alive can abort in interpreter shutdown ("terminate called
    without an active exception"), which the launcher reports as a failed run. No barrier
    first: the ranks other than 0 leave right after the last step, while rank 0 may spend
    longer than the group's timeout writing the run. A group the caller had joined is
    left to it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield dist.get_rank(), world
    finally:
        if own:
            dist.destroy_process_group()


def _device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _versions() -> dict:
    import transformers

    return {
        "ptedge": ptedge.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _read_dev(args: TrainArgs, need: list[str]) -> Records | None:
    """The --dev file's records (checked), or None when none was given or ``none``."""
    if args.dev is None or args.dev == DEV_NONE:
        return None
    dev = read_records(args.dev)
    require_fields(dev, need, reason="template or --label-field needs it")
    return dev


def _carve_dev(args: TrainArgs, train_recs: Records, stratify: bool):
    """(train records, carved dev records or None, what was done) when --dev is absent."""
    if args.dev == DEV_NONE:
        return train_recs, None, {"source": "none", "why": "--dev none"}
    strata = labels_of(train_recs, args.label_field) if stratify else None
    keep, dev = defaults.carve_dev(len(train_recs), args.seed, strata)
    if not dev:
        why = f"--train has too few records to carve a dev split ({len(train_recs)})"
        return train_recs, None, {"source": "none", "why": why}

    def pick(idx: list[int]) -> Records:
        return Records(
            train_recs.path, [train_recs[i] for i in idx], [train_recs.lines[i] for i in idx]
        )

    info = {
        "source": "carved",
        "file": DEV_FILE,
        "n": len(dev),
        "of": len(train_recs),
        "fraction": defaults.DEV_FRACTION,
        "cap": defaults.DEV_CAP,
        "seed": args.seed,
        "stratified_by": args.label_field if stratify else None,
    }
    return pick(keep), pick(dev), info


def _choose(
    args: TrainArgs, head: str, model_dir: Path, causal: bool
) -> dict[str, defaults.Choice]:
    """The values the user left to ptedge, each with its reason."""
    chosen = {
        "prompt_init": (
            defaults.prompt_init(causal)
            if args.prompt_init is None
            else defaults.Choice(args.prompt_init, "--prompt-init")
        )
    }
    if head == "linear":
        chosen["pool"] = (
            defaults.pool(model_dir) if args.pool is None else defaults.Choice(args.pool, "--pool")
        )
        chosen["head_lr"] = (
            defaults.head_lr(args.lr)
            if args.head_lr is None
            else defaults.Choice(args.head_lr, "--head-lr")
        )
    chosen["backbone_dropout"] = (
        defaults.backbone_dropout(head)
        if args.backbone_dropout is None
        else defaults.Choice(
            args.backbone_dropout,
            "--backbone-dropout" if args.backbone_dropout else "--no-backbone-dropout",
        )
    )
    if args.batch_size is None:
        chosen["batch_size"] = defaults.batch_size(head)
    return chosen


def train(args: TrainArgs, progress: bool = True) -> RunConfig:
    """Run ``ptedge train``; returns the saved run config. Validates before writing."""
    from ptedge.model import backbone_hash

    if args.steps is not None and args.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    parse(args.template)  # template errors before any heavy work
    need = fields_of(args.template) + [args.label_field]
    train_recs = read_records(args.train)
    require_fields(train_recs, need, reason="template or --label-field needs it")
    dev_recs = _read_dev(args, need)
    _check_data(args, train_recs, dev_recs)

    model_dir = Path(args.model).resolve()
    backbone = load_backbone(model_dir)
    causal = is_causal(backbone)
    has_lm = backbone.base_model is not backbone
    head = args.head or ("lm" if has_lm else "linear")
    labels = _labels_for(args, head, train_recs)
    if head == "generate" and not causal:
        raise ValueError("--head generate needs a causal LM backbone")
    if args.head_lr is not None and head != "linear":
        raise ValueError(f"--head-lr is for the linear head; this run's head is {head!r}")
    if dev_recs is None:
        train_recs, dev_recs, dev_split = _carve_dev(args, train_recs, labels is not None)
    else:
        dev_split = {"source": "given", "file": str(Path(args.dev).resolve())}
    chosen = _choose(args, head, model_dir, causal)
    if "batch_size" in chosen:
        args = replace(args, batch_size=chosen["batch_size"].value)
    sizes = _record_lengths(args.template, backbone, model_dir, causal, train_recs)
    if args.max_length is None:
        limit = getattr(backbone.config, "max_position_embeddings", None)
        chosen["max_length"] = defaults.max_length(sizes, limit)
        args = replace(args, max_length=chosen["max_length"].value)
    cut = sum(n > args.max_length for n in sizes)
    emb = backbone.base_model.get_input_embeddings().weight
    cfg = RunConfig(
        model=str(model_dir),
        template=args.template,
        head=head,
        encoder=args.encoder,
        label_field=args.label_field,
        labels=labels,
        verbalizer=args.verbalizer,
        pool=chosen["pool"].value if "pool" in chosen else (args.pool or "slot"),
        max_length=args.max_length,
        n_pseudo=pseudo_count(args.template),
        vocab_size=emb.shape[0],
        hidden_size=emb.shape[1],
        causal=causal,
        model_sha256=backbone_hash(model_dir),
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        head_lr=chosen["head_lr"].value if "head_lr" in chosen else None,
        train_file=str(Path(args.train).resolve()),
        dev_file=dev_split.get("file") if dev_recs is not None else None,
        dev_split=dev_split,
        versions=_versions(),
        eos_id=eos_id(backbone),
    )
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = _device(args.device)
    with _distributed(device) as (rank, world):
        if args.batch_size % world:
            raise ValueError(f"--batch-size {args.batch_size} must divide among {world} processes")
        model, tok, compiled, _ = build_for_run(cfg, backbone)
        model.backbone_dropout = chosen["backbone_dropout"].value
        if chosen["prompt_init"].value == "pad":
            model.encoder.start_at(emb[pad_id(backbone)].detach())
        model.backbone.to(device=device, dtype=DTYPES[args.dtype])
        model.to(device)
        job = Job(cfg, model, tok, compiled, device)
        targets = job.targets(train_recs)
        examples = [(r, t) for r, t in zip(train_recs, targets, strict=True) if t is not None]
        if not examples:
            raise ValueError(
                f"{args.train}: no usable training records (labels not single tokens?)"
            )
        dev_eval = _subsample(dev_recs, DEV_MAX, args.seed) if dev_recs is not None else None
        if dev_eval is not None:
            job.targets(dev_eval)  # unknown dev labels fail now, not after training

        if args.steps != 0 and cfg.n_pseudo == 0 and head != "linear":
            raise ValueError(
                "the template has no [P] tokens, so there is nothing to train; "
                "use --steps 0 to measure it as a manual-prompt baseline"
            )
        if args.steps is not None:
            steps = args.steps
        elif args.epochs is not None:
            steps = math.ceil(math.ceil(len(examples) / args.batch_size) * args.epochs)
        else:
            n_labels = len(labels) if head == "linear" else None
            chosen["steps"] = defaults.steps(len(examples), args.batch_size, n_labels, head)
            steps = chosen["steps"].value
        head_dev = None  # dev (record, label index) pairs that judge the head's fits
        if head == "linear" and args.head_lr is None and dev_eval is not None and steps > 0:
            head_dev = _head_dev(job, dev_recs, args.seed)
            chosen["head_lr"] = _start_head(job, examples, head_dev, steps, args, progress)
            cfg.head_lr = chosen["head_lr"].value
        cfg.defaults = {k: c.as_dict() for k, c in chosen.items()}
        out = Path(args.out)
        if rank == 0:
            _prepare_out(out, args.force, args.resume)
            if dev_split["source"] == "carved":
                write_jsonl(out / DEV_FILE, dev_recs)
            if progress:
                _say_choices(chosen, dev_split, args)
                if cut and "max_length" not in chosen:
                    print(
                        f"note: {cut} of {len(sizes)} training records are longer than "
                        f"--max-length {args.max_length} tokens and lose the end of their text",
                        file=sys.stderr,
                    )
        cfg.steps = steps
        best_state = _fit(job, examples, steps, args, dev_eval, out, progress, (rank, world))
        if rank != 0:
            return cfg
        if best_state is not None:
            model.load_trainable_state(best_state["weights"])
            # the kept step's dev metrics, and the best dev accuracy of any evaluated step
            cfg.best = best_state["metrics"] | {"top_dev_accuracy": best_state["top"]}
        elif dev_eval is not None:
            cfg.best = {
                "step": steps,
                **{f"dev_{k}": v for k, v in evaluate(job, dev_eval).items()},
            }
        if head_dev is not None:
            carved = dev_split["source"] == "carved"
            refit, choice = _refit_head(job, examples, head_dev, steps, args, progress, carved)
            cfg.defaults["head_refit"] = choice.as_dict()
            if refit.head is not None and cfg.best is not None:
                # dev metrics of the kept step's prompt with the refit (dev records not in it)
                cfg.best |= {f"dev_{k}": v for k, v in evaluate(job, dev_eval).items()}
            if refit.with_dev is not None:
                _ship_head_with_dev(job, refit, out, progress)
                cfg.defaults["head_data"] = defaults.head_data(
                    refit.n_fit, refit.n_dev, HEAD_WITHOUT_DEV_FILE
                ).as_dict()
        model.save_weights(out)
        cfg.save(out)
        _plot(out / METRICS, out / CURVE)
        shutil.rmtree(out / checkpoint.CHECKPOINT, ignore_errors=True)  # finished: not needed
        return cfg


def _record_lengths(
    template: str, backbone, model_dir: Path, causal: bool, records: Records
) -> list[int]:
    """Tokens each record takes under ``template`` with nothing truncated."""
    tok, compiled = compile_for(
        model_dir, backbone, template, causal=causal, max_length=sys.maxsize
    )
    return lengths(compiled, tok, list(records))


def _head_dev(job, dev_recs: Records, seed: int) -> list:
    """(record, label index) pairs of the dev split, up to ``head_fit.DEV_MAX``."""
    recs = _subsample(dev_recs, head_fit.DEV_MAX, seed)
    return [(r, t) for r, t in zip(recs, job.targets(recs), strict=True) if t is not None]


def _start_head(job, examples, dev, steps, args, progress) -> defaults.Choice:
    """The linear head's lr: fitted alone on the step-0 features at each candidate lr, the
    one best on ``dev`` (``ptedge.head_fit``)."""
    if progress:
        print(
            "choosing the linear head's lr: the head alone, fitted on the step-0 features of "
            f"the training records this run draws, at lr "
            f"{', '.join(f'{lr:g}' for lr in defaults.HEAD_LRS)}, judged on {len(dev)} "
            "dev records",
            file=sys.stderr,
        )
    lr, by_lr = head_fit.choose(
        job, examples, dev, steps, args.batch_size, args.seed, args.warmup, progress
    )
    return defaults.head_lr_on_dev(lr, by_lr, args.lr)


def _refit_head(
    job, examples, dev, steps, args, progress, carved: bool
) -> tuple[head_fit.Refit, defaults.Choice]:
    """The head fitted anew on the trained prompt's features; it replaces the trained head
    in ``job.model`` unless dev prefers the trained head beyond chance (``head_fit.refit``).
    ``carved``: dev was carved from --train, so the fit is also solved with it."""
    if progress:
        print(
            "refitting the linear head on the trained prompt's features (a logistic "
            f"regression solved to convergence), checked against the trained head on {len(dev)} "
            "dev records",
            file=sys.stderr,
        )
    refit = head_fit.refit(
        job, examples, dev, steps, args.batch_size, args.seed, progress, with_dev=carved
    )
    if refit.head is not None:
        job.model.head.load_state_dict(refit.head.state_dict())
    choice = defaults.head_refit(refit.head is not None, refit.dev_accuracy, refit.counts, len(dev))
    if progress:
        print(f"head refit: {choice.why}", file=sys.stderr)
    return refit, choice


def _ship_head_with_dev(job, refit: head_fit.Refit, out: Path, progress: bool) -> None:
    """Save the refit dev judged as ``HEAD_WITHOUT_DEV_FILE`` (export calibrates on it), and
    make the fit with the dev records the run's head."""
    from safetensors.torch import save_file

    save_file(job.model.trainable_state()[HEAD_FILE], str(out / HEAD_WITHOUT_DEV_FILE))
    job.model.head.load_state_dict(refit.with_dev.state_dict())
    if progress:
        print(
            f"head: solved again with the dev records added ({refit.n_fit} training + "
            f"{refit.n_dev} dev records); the fit dev judged is kept as {HEAD_WITHOUT_DEV_FILE} "
            "for export's calibration",
            file=sys.stderr,
        )


def _say_choices(chosen: dict[str, defaults.Choice], dev_split: dict, args: TrainArgs) -> None:
    """Tell the user, on stderr, what ptedge chose for them and why."""
    for name, c in chosen.items():
        if c.why.startswith("--"):
            continue
        print(f"default {name} = {c.value}: {c.why}", file=sys.stderr)
    if dev_split["source"] == "carved":
        strat = (
            f", stratified by {dev_split['stratified_by']!r}" if dev_split["stratified_by"] else ""
        )
        print(
            f"dev split: {dev_split['n']} of {dev_split['of']} records of {args.train} held out "
            f"(seed {dev_split['seed']}{strat}), saved as {Path(args.out) / DEV_FILE}; "
            "give --dev FILE for your own, --dev none for no dev split",
            file=sys.stderr,
        )
    elif dev_split["source"] == "none":
        print(f"no dev split ({dev_split['why']}): the last step's prompt is kept", file=sys.stderr)


def _fit(job, examples, steps, args, dev_eval, out: Path, progress, dist_info) -> dict | None:
    """The optimisation loop. Returns the best dev state {"weights", "metrics"} or None.

    Rank 0 of a distributed run logs, evaluates and checkpoints; every rank takes its
    share of each global batch, and DistributedDataParallel averages the gradients.
    """
    rank, world = dist_info
    model = job.model
    params = [p for p in model.parameters() if p.requires_grad]
    if steps == 0 or not params:
        return None
    with _data_parallel(job, world):
        head_ids = {id(p) for p in model.head.parameters()} if model.head is not None else set()
        groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": args.lr}]
        if head_ids:  # the linear head: its own peak lr (--head-lr)
            groups.append(
                {
                    "params": [p for p in params if id(p) in head_ids],
                    "lr": job.cfg.head_lr or args.lr,
                }
            )
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        sched = head_fit.schedule(opt, steps, args.warmup)
        eval_every = args.eval_every or max(steps // 5, 1)
        gen = torch.Generator().manual_seed(args.seed)
        start, order, best = 0, [], None
        loss_sum, loss_n = 0.0, 0  # training loss since the last logged row
        saved = checkpoint.load(out) if args.resume else None
        if saved is not None:
            model.load_trainable_state(saved["weights"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            gen.set_state(saved["generator"])
            start, order, best = saved["step"], saved["order"], saved["best"]
            loss_sum, loss_n = saved.get("loss_sum", 0.0), saved.get("loss_n", 0)
            for name in (METRICS, TIMING):  # rows logged after the checkpoint come again
                _truncate_log(out / name, start)
        lead = rank == 0
        metrics_path = out / METRICS
        bar = _bar(steps, progress and lead, start)
        seen, t0 = 0, time.perf_counter()
        model.train()
        for step in range(start + 1, steps + 1):
            batch_idx = []
            while len(batch_idx) < args.batch_size:
                if not order:
                    order = torch.randperm(len(examples), generator=gen).tolist()
                batch_idx.append(order.pop())
            mine = batch_idx[rank::world]  # this rank's share of the global batch
            torch.manual_seed(_step_seed(args.seed, step, rank))  # dropout's masks: see there
            loss = job.loss([examples[i][0] for i in mine], [examples[i][1] for i in mine])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            loss_sum += loss.item()
            loss_n += 1
            seen += len(batch_idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if not lead:
                continue
            row = None
            if step % args.log_every == 0 or step == steps:
                dt = time.perf_counter() - t0
                row = {
                    "step": step,
                    "loss": loss_sum / loss_n,
                    "lr": sched.get_last_lr()[0],
                    "world_size": world,
                }
                _append_row(out / TIMING, {"step": step, "samples_per_s": seen / dt})
                loss_sum, loss_n, seen, t0 = 0.0, 0, 0, time.perf_counter()
            if dev_eval is not None and (step % eval_every == 0 or step == steps):
                t_eval = time.perf_counter()
                dev = evaluate(job, dev_eval)
                model.train()
                t0 += time.perf_counter() - t_eval  # samples_per_s counts training time only
                row = (row or {"step": step, "world_size": world}) | {
                    f"dev_{k}": v for k, v in dev.items()
                }
                top = max(dev["accuracy"], best["top"] if best else dev["accuracy"])
                if best is None or defaults.keeps_later_step(dev["accuracy"], dev["n"], top):
                    best = {
                        "weights": model.trainable_state(),
                        "metrics": {"step": step, **{f"dev_{k}": v for k, v in dev.items()}},
                    }
                best["top"] = top
                bar.set_postfix(loss=f"{loss.item():.3f}", dev=f"{dev['accuracy']:.3f}")
            if row is not None:
                _append_row(metrics_path, row)
            if args.save_every and step % args.save_every == 0 and step < steps:
                state = {
                    "step": step,
                    "order": order,
                    "best": best,
                    "weights": model.trainable_state(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "generator": gen.get_state(),
                    "loss_sum": loss_sum,
                    "loss_n": loss_n,
                }
                t_save = time.perf_counter()
                checkpoint.save(out, state)
                t0 += time.perf_counter() - t_save
        model.eval()
    return best


def _step_seed(seed: int, step: int, rank: int) -> int:
    """The global RNG's seed for one training step of one rank.

    The backbone's dropout draws its masks from torch's global generator. Seeding it from
    (seed, step, rank) at every step makes the masks a function of where training is, so a
    resumed run draws what an uninterrupted one draws without any generator state in the
    checkpoint, and data-parallel ranks draw independent masks.
    """
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def _data_parallel(job, world: int) -> Iterator[None]:
    """``job.forward`` as DistributedDataParallel while inside (world > 1), and back to the
    plain model on the way out, also when training fails.

    Dropped there, not left to the process's end, so that DDP's Reducer never holds the
    process group's last reference: the Reducer's destructor keeps the GIL while the group
    joins gloo's worker threads, one of which may need the GIL to free its last work, and
    the process hangs. ``_distributed`` then destroys the group itself.
    """
    if world <= 1:
        yield
        return
    from torch.nn.parallel import DistributedDataParallel

    job.forward = DistributedDataParallel(job.model, broadcast_buffers=False)
    try:
        yield
    finally:
        job.forward = job.model
        gc.collect()  # the wrapper and its Reducer go now, whatever cycles hold them


def _append_row(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Keep the rows of a .jsonl log up to ``step`` (a resumed run logs the rest again)."""
    if not path.is_file():
        return
    whole = [x for x in path.read_text().splitlines(keepends=True) if x.endswith("\n")]
    path.write_text("".join(x for x in whole if x.strip() and json.loads(x)["step"] <= step))


def _bar(total: int, enabled: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(
        initial=initial,
        total=total,
        desc="train",
        unit="step",
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
    )


def _plot(metrics_path: Path, png: Path) -> None:
    """Loss and dev accuracy against step; skipped when there is nothing to draw."""
    if not metrics_path.is_file():
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    devs = [(r["step"], r["dev_accuracy"]) for r in rows if "dev_accuracy" in r]
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*losses, strict=True), label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if devs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*devs, strict=True), "o-", label="dev accuracy", color="tab:orange")
        ax2.set_ylabel("dev accuracy")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
