"""The linear head fitted alone on frozen features: before training, to choose its lr; after
training, to refit it on the trained prompt's features as a converged logistic regression.

A linear head starts from scratch, and the lr it wants can depend on the data (how many
labels, how separable the features are): a linear probe on plain mean-pooled
all-MiniLM-L6-v2 embeddings does best at 3e-2 on BANKING77 and at 1e-2 on CLINC150. So
``ptedge train`` asks the question the way a probe does: it embeds the training records
once with the prompt at its start (the step-0 features, the template included), fits the
head alone on them at each of ``defaults.HEAD_LRS`` over the same batches and schedule the
run will use, and trains the run's head at the lr with the best dev accuracy. The fit
changes only that lr: the run's random state and starting head are left as they were.

After training, ``refit`` embeds the training records with the trained prompt and solves
the L2-regularised logistic regression on those features to convergence (``fit_converged``,
scikit-learn's default strength, C = 1). The trained head is an SGD snapshot of a head that
learned while its features moved; the converged fit is the regularised optimum on the
features the bundle will compute, with no lr or step count to choose. When the dev split
was carved from the training file, the head that ships is solved once more with the dev
records added: they were lent to judge the run, and a probe fitted on the user's whole
file would have them too.

Also here, because the probe must train exactly as the run does: the seeded batch order
and the warm-up/decay schedule ``ptedge.train`` uses. Benchmarks use the same functions
for their probe baselines.

Not responsible for: the training loop (``ptedge.train``), the prompt, the features'
pooling (``PTuningModel.features``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ptedge import defaults

FEATURE_BATCH = 64  # records per forward pass when embedding
DEV_MAX = 5000  # dev records that judge the candidate lrs (the whole dev split, up to this)
REFIT_C = 1.0  # inverse L2 strength of the refit, per record (scikit-learn's default C)
REFIT_MAX_ITER = 500  # L-BFGS iterations; the convex fits here converge in far fewer


def batch_order(n: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """The record indices of each step's batch, as ``ptedge.train`` draws them: seeded
    permutations of ``range(n)``, popped from the end, one after another."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    batches = []
    for _ in range(steps):
        idx = []
        while len(idx) < batch:
            if not order:
                order = torch.randperm(n, generator=gen).tolist()
            idx.append(order.pop())
        batches.append(idx)
    return batches


def schedule(opt: torch.optim.Optimizer, steps: int, warmup: float = 0.06):
    """Linear warm-up over ``warmup`` of the steps, then linear decay to 0."""
    warm = max(1, int(steps * warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )


def fit_head(
    x: torch.Tensor,
    y: torch.Tensor,
    batches: list[list[int]],
    n_labels: int,
    lr: float,
    seed: int,
    warmup: float = 0.06,
) -> torch.nn.Linear:
    """Linear(H, n_labels) trained on features x (N, H) with labels y (N,) as ptedge trains
    its head: AdamW without weight decay, ``schedule`` over len(batches) steps, gradients
    clipped at norm 1, ``batches`` indexing rows of x."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], n_labels)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = schedule(opt, len(batches), warmup)
    for rows in batches:
        loss = torch.nn.functional.cross_entropy(head(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
    return head


@torch.no_grad()
def features(
    job, records: list[dict], progress: bool = False, desc: str = "step-0 features"
) -> torch.Tensor:
    """The head's input (N, H) for ``records`` under ``job``'s model as it is now."""
    from tqdm import tqdm

    was_training = job.model.training
    job.model.eval()
    # batches of similar length pad less; rows go back to the records' order at the end
    order = sorted(range(len(records)), key=lambda i: len(str(records[i])))
    out = torch.empty(len(records), job.model.head.in_features)  # (N, H)
    with tqdm(
        total=len(records),
        desc=desc,
        unit="rec",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for i in range(0, len(records), FEATURE_BATCH):
            rows = order[i : i + FEATURE_BATCH]
            out[rows] = job.model.features(*job.batch([records[r] for r in rows])).cpu()
            bar.update(len(rows))
    job.model.train(was_training)
    return out


def choose(
    job,
    examples: list,
    dev: list,
    steps: int,
    batch: int,
    seed: int,
    warmup: float,
    progress: bool = False,
):
    """Fit the head alone on the step-0 features at each of ``defaults.HEAD_LRS``; returns
    (lr, dev accuracy by lr), the lr being the one ``defaults.best_head_lr`` picks.

    examples: (record, label index) pairs the run trains on; dev: (record, label index).
    Only the training records the run's ``steps`` batches draw are embedded.
    """
    _, by_lr = _fit_candidates(
        job, examples, dev, steps, batch, seed, warmup, progress, "step-0 features"
    )
    return defaults.best_head_lr(by_lr), by_lr


def fit_converged(x: torch.Tensor, y: torch.Tensor, n_labels: int, c: float = REFIT_C):
    """Linear(H, n_labels) minimising mean cross-entropy on features x (N, H) with labels
    y (N,) plus ||W||^2 / (2 C N): scikit-learn's ``LogisticRegression(C=c)`` objective
    divided by N (the bias is not penalised), solved by L-BFGS from zero, so the result
    does not depend on any random state."""
    head = torch.nn.Linear(x.shape[1], n_labels)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    l2 = 1.0 / (c * len(x))
    opt = torch.optim.LBFGS(
        head.parameters(),
        lr=1.0,
        max_iter=REFIT_MAX_ITER,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def objective():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + 0.5 * l2 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(objective)
    return head


def _fit_candidates(job, examples, dev, steps, batch, seed, warmup, progress, desc):
    """({lr: head}, {lr: dev accuracy}): the head fitted alone at each of
    ``defaults.HEAD_LRS`` on the features ``job``'s model gives now."""
    batches = batch_order(len(examples), steps, batch, seed)
    used = sorted({i for b in batches for i in b})
    row = {i: k for k, i in enumerate(used)}
    x, y, x_dev, y_dev = _embed(job, [examples[i] for i in used], dev, progress, desc)
    mapped = [[row[i] for i in b] for b in batches]
    heads, by_lr = {}, {}
    with torch.random.fork_rng():  # the run's own random state is left as it was
        for lr in defaults.HEAD_LRS:
            heads[lr] = fit_head(x, y, mapped, job.model.head.out_features, lr, seed, warmup)
            with torch.no_grad():
                by_lr[lr] = float((heads[lr](x_dev).argmax(-1) == y_dev).float().mean())
    return heads, by_lr


def _embed(job, pairs, dev, progress, desc):
    """(x (U, H), y (U,), x_dev (D, H), y_dev (D,)): features of the (record, label) pairs
    and of the dev pairs under ``job``'s model as it is now."""
    x_all = features(job, [r for r, _ in pairs] + [r for r, _ in dev], progress, desc)
    y = torch.tensor([t for _, t in pairs])  # (U,)
    y_dev = torch.tensor([t for _, t in dev])  # (D,)
    return x_all[: len(pairs)], y, x_all[len(pairs) :], y_dev


@dataclass
class Refit:
    """What ``refit`` found. ``head``: the refit, or None when the trained head stays;
    ``with_dev``: the same fit on the training records and the dev records together (only
    when asked for and the refit replaces the trained head); ``dev_accuracy``: {"refit",
    "trained"}; ``counts``: (b, c), dev records only the refit / only the trained head gets
    right; ``n_fit``, ``n_dev``: training and dev records the fits saw."""

    head: torch.nn.Linear | None
    with_dev: torch.nn.Linear | None
    dev_accuracy: dict[str, float]
    counts: tuple[int, int]
    n_fit: int
    n_dev: int


def refit(job, examples, dev, steps, batch, seed, progress: bool = False, with_dev: bool = False):
    """The head fitted anew on the trained prompt's features (``fit_converged``), unless dev
    prefers the trained head beyond chance; a ``Refit``.

    The refit sees the training records the run's ``steps`` batches drew, as the head did.
    ``with_dev`` (the dev records were carved from the training file): when the refit
    replaces the trained head, it is also solved on those records and the dev records
    together, so that the head the run ships learns from every labelled record the user
    gave; the fit without them is what dev judged, and what export calibrates on.
    """
    used = sorted({i for b in batch_order(len(examples), steps, batch, seed) for i in b})
    x, y, x_dev, y_dev = _embed(job, [examples[i] for i in used], dev, progress, "final features")
    n_labels = job.model.head.out_features
    head = fit_converged(x, y, n_labels)
    with torch.no_grad():
        new = head(x_dev).argmax(-1) == y_dev  # (D,)
        old = job.model.head(x_dev.to(job.device)).argmax(-1).cpu() == y_dev  # (D,)
    counts = (int((new & ~old).sum()), int((~new & old).sum()))
    acc = {"refit": float(new.float().mean()), "trained": float(old.float().mean())}
    if not defaults.keeps_refit(*counts):
        return Refit(None, None, acc, counts, len(used), len(dev))
    both = None
    if with_dev:
        both = fit_converged(torch.cat([x, x_dev]), torch.cat([y, y_dev]), n_labels)
    return Refit(head, both, acc, counts, len(used), len(dev))
