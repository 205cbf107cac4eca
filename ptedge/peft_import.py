"""Import a PEFT P-tuning or prompt-tuning adapter as a ptedge run folder.

A PEFT prompt-learning adapter folder holds ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``.bin``) with ``prompt_embeddings`` (n, H): the
prompt encoder's output, which PEFT itself uses at inference. With task type ``SEQ_CLS``
it also holds the classifier (``modules_to_save``), saved as
``base_model.classifier.weight`` / ``.bias``. That is all ptedge needs: the table
becomes a run with encoder ``none`` and the classifier becomes its linear head.

PEFT's placement is reproduced exactly (run ``layout = "peft"``, see
``ptedge.template.compile_template``): the virtual tokens go in front of everything,
the tokenizer's special tokens included, so the template is ``[P:n] {field}`` and the
encoded sequence is ``P1..Pn [CLS] text [SEP]``. PEFT's forward
(``PeftModelForSequenceClassification.forward``) concatenates the prompts in front of
``inputs_embeds`` and an all-ones mask in front of the attention mask; the BERT model's
pooler then reads position 0, the *first virtual token* (``tanh(dense(h[:, 0]))``), and
dropout (off in eval) and the classifier follow: run ``pool = "pooler"``.
``CAUSAL_LM`` adapters become an open-vocabulary ``lm`` run whose template
``[P:n]{field}[MASK]`` reads the next-token logits after the text, as PEFT's logits at
the last position.

Not supported (refused with the reason): prefix tuning (per-layer key/values, not input
embeddings), multitask prompt tuning, encoder-decoder adapters, classifiers that are
not one Linear on BERT's pooler (RoBERTa's and DistilBERT's heads, Llama's ``score``).

Not responsible for: training, evaluation, export (the run folder goes to those).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from ptedge.config import RunConfig, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_CONFIG_COPY = "peft_adapter_config.json"  # kept in the run folder for provenance
PEFT_TYPES = ("P_TUNING", "PROMPT_TUNING")
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM")
POOLER_MODELS = ("bert", "albert")  # XForSequenceClassification = pooler, dropout, Linear
PROMPT_KEY = "prompt_embeddings"
_CLASSIFIER_RE = re.compile(r"^(?:.*\.)?classifier\.(weight|bias)$")
_DEFAULT_LABEL_RE = re.compile(r"^LABEL_\d+$")


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict]:
    """(adapter config, tensors as contiguous float32 torch tensors) of a PEFT adapter."""
    import torch

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    cfg = read_json(cfg_path)
    weights = next((adapter_dir / n for n in ADAPTER_WEIGHTS if (adapter_dir / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{adapter_dir}: no {' or '.join(ADAPTER_WEIGHTS)}")
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    else:
        tensors = torch.load(str(weights), map_location="cpu", weights_only=True)
    return cfg, {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}


def _check_config(cfg: dict, where: Path) -> tuple[str, int]:
    """(task type, virtual tokens) of a supported adapter config; ValueError otherwise."""
    peft_type = cfg.get("peft_type")
    if peft_type not in PEFT_TYPES:
        why = (
            " (prefix tuning stores per-layer keys and values, not input embeddings)"
            if peft_type == "PREFIX_TUNING"
            else ""
        )
        raise ValueError(
            f"{where}: peft_type {peft_type!r} cannot be imported{why}; "
            f"supported: {', '.join(PEFT_TYPES)}"
        )
    task = cfg.get("task_type")
    if task not in TASK_TYPES:
        raise ValueError(
            f"{where}: task_type {task!r} cannot be imported; supported: {', '.join(TASK_TYPES)}"
        )
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{where}: encoder-decoder adapters (2 submodules) cannot be imported")
    n = cfg.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: num_virtual_tokens {n!r} must be a positive integer")
    return task, n


def _classifier(tensors: dict, where: Path):
    """(weight (L, H), bias (L,)) of a saved single-Linear ``classifier``."""
    found = {m.group(1): k for k in tensors if (m := _CLASSIFIER_RE.match(k))}
    if set(found) != {"weight", "bias"}:
        raise ValueError(
            f"{where}: no classifier.weight and classifier.bias saved with the adapter "
            f"(keys: {sorted(tensors)}); a SEQ_CLS adapter saves its classifier"
        )
    extra = sorted(set(tensors) - {PROMPT_KEY, *found.values()})
    if extra:
        raise ValueError(
            f"{where}: unsupported saved modules {extra}: only a single Linear classifier "
            "on the backbone's pooler (BERT, ALBERT) can be imported"
        )
    return tensors[found["weight"]], tensors[found["bias"]]


def _has_pooler_weights(model_dir: Path) -> bool | None:
    """Whether the backbone's safetensors hold pooler weights; None if it has none to read."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="np") as st:
            if any(k.endswith("pooler.dense.weight") for k in st.keys()):
                return True
    return False


def _labels(labels: list[str] | None, backbone, n: int) -> list[str]:
    if labels is not None:
        labels = [str(x) for x in labels]
        if len(labels) != n:
            raise ValueError(f"labels: {len(labels)} given, the adapter's classifier has {n}")
        return labels
    id2label = getattr(backbone.config, "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(n)]
    if len(id2label) == n and all(x and not _DEFAULT_LABEL_RE.match(str(x)) for x in names):
        return [str(x) for x in names]
    return [str(i) for i in range(n)]  # the label ids PEFT was trained on


def _max_positions(backbone) -> int | None:
    c = backbone.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


def import_peft(
    adapter_dir: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    force: bool = False,
    *,
    field: str = "sentence",
    label_field: str = "label",
    labels: list[str] | None = None,
    data: str | Path | None = None,
    max_length: int | None = None,
) -> RunConfig:
    """Write a ptedge run folder reproducing a PEFT prompt adapter; returns its config.

    ``model_dir``: the base model the adapter was trained on (a transformers folder).
    ``field``: the record field holding the text PEFT's tokenizer was given.
    ``labels``: class names by classifier index (default: the base config's
    ``id2label`` if it names them, else ``"0".."L-1"``). ``data``: records kept as the
    run's dev file, which ``ptedge export`` uses for its parity check. ``max_length``:
    tokens including the virtual ones (default: n + 128, within the position limit).
    The folder is written atomically; a non-empty ``out_dir`` needs ``force``.
    """
    import torch
    import transformers

    import ptedge
    from ptedge.checks import check_records
    from ptedge.data import read_records
    from ptedge.model import ENCODER_FILE, HEAD_FILE, backbone_hash, build_for_run, load_backbone
    from ptedge.template import DEFAULT_MAX_LENGTH

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out}: output folder is not empty (use --force to replace it)")
    if data is not None:  # export reads it with the template [P:n] {field}
        check_records(read_records(data), [field], needed_by="--field")
    acfg, tensors = read_adapter(adapter_dir)
    where = adapter_dir / ADAPTER_CONFIG
    task, n = _check_config(acfg, where)
    table = tensors.get(PROMPT_KEY)
    if table is None or table.ndim != 2 or table.shape[0] != n:
        shape = None if table is None else tuple(table.shape)
        raise ValueError(f"{adapter_dir}: expected {PROMPT_KEY} of shape ({n}, H), found {shape}")

    model_dir = Path(model_dir).resolve()
    backbone = load_backbone(model_dir)
    emb = backbone.base_model.get_input_embeddings().weight
    V, H = emb.shape
    if table.shape[1] != H:
        raise ValueError(
            f"{adapter_dir}: prompt width {table.shape[1]} != hidden size {H} of {model_dir} "
            "(was the adapter trained on another base model?)"
        )
    if task == "SEQ_CLS":
        weight, bias = _classifier(tensors, where)
        model_type = getattr(backbone.config, "model_type", "")
        if model_type not in POOLER_MODELS or getattr(backbone.base_model, "pooler", None) is None:
            raise ValueError(
                f"{model_dir}: SEQ_CLS import needs a BERT-style backbone whose classifier "
                f"reads its pooler ({', '.join(POOLER_MODELS)}), not {model_type!r}"
            )
        if _has_pooler_weights(model_dir) is False:
            raise ValueError(
                f"{model_dir}: the checkpoint has no pooler weights, so the pooler PEFT used "
                "was randomly initialised and cannot be reproduced"
            )
        if weight.shape[1] != H:
            raise ValueError(f"{adapter_dir}: classifier width {weight.shape[1]} != {H}")
        head, pool, causal = "linear", "pooler", False
        template = f"[P:{n}] {{{field}}}"
        labels = _labels(labels, backbone, weight.shape[0])
    else:
        extra = sorted(set(tensors) - {PROMPT_KEY})
        if extra:
            raise ValueError(f"{adapter_dir}: unsupported saved modules {extra}")
        if backbone.base_model is backbone:
            raise ValueError(f"{model_dir}: a CAUSAL_LM adapter needs a causal LM backbone")
        head, pool, causal = "lm", "slot", True
        template = f"[P:{n}]{{{field}}}[MASK]"
        labels = None
    limit = _max_positions(backbone)
    if max_length is None:
        max_length = n + DEFAULT_MAX_LENGTH
        max_length = min(max_length, limit) if limit else max_length
    cfg = RunConfig(
        model=str(model_dir),
        template=template,
        head=head,
        encoder="none",
        label_field=label_field,
        labels=labels,
        pool=pool,
        layout="peft",
        max_length=max_length,
        n_pseudo=n,
        vocab_size=int(V),
        hidden_size=int(H),
        causal=causal,
        model_sha256=backbone_hash(model_dir),
        train_file="",
        dev_file=str(Path(data).resolve()) if data else None,
        versions={
            "ptedge": ptedge.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": acfg.get("peft_version"),
            "imported_from": str(adapter_dir.resolve()),
        },
    )
    state = {ENCODER_FILE: {"embedding.weight": table}}
    if head == "linear":
        state[HEAD_FILE] = {"weight": weight, "bias": bias}
    model, _, _, _ = build_for_run(cfg, backbone)  # template and shapes checked here
    model.load_trainable_state(state)  # strict: the files will load the same way
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_weights(tmp)
        cfg.save(tmp)
        (tmp / PEFT_CONFIG_COPY).write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg
