"""Tests for ptedge.prompt_encoder and ptedge.model on tiny random backbones."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ptedge.model import (  # noqa: E402
    ENCODER_FILE,
    HEAD_FILE,
    PTuningModel,
    backbone_ids,
    is_causal,
    load_backbone,
    split_backbone,
)
from ptedge.prompt_encoder import PromptEncoder  # noqa: E402
from ptedge.template import answer_ids, compile_template, encode, load_tokenizer  # noqa: E402

FAMILIES = ["gpt2", "llama", "bert-mlm", "bert"]
LM_FAMILIES = ["gpt2", "llama", "bert-mlm"]
SENTS = [
    {"sentence": "the movie was great"},
    {"sentence": "a terrible boring film with a bad plot"},
    {"sentence": "good fun"},
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and lose a lot on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def backbones(tiny):
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = load_backbone(tiny(kind))
        return cache[kind]

    return get


def setup(tiny, backbones, kind: str, template: str = "[P:3] {sentence} [P:2] It was [MASK]"):
    """(backbone, tokenizer, compiled template, encoded SENTS as tensors)."""
    folder = tiny(kind)
    bb = backbones(kind)
    tok = load_tokenizer(folder)
    mask_id, pad_id = backbone_ids(folder, bb)
    causal = is_causal(bb)
    c = compile_template(
        template,
        tok,
        causal=causal,
        mask_id=mask_id,
        pad_id=pad_id,
        pseudo_base=bb.base_model.get_input_embeddings().weight.shape[0],
    )
    enc = encode(c, tok, SENTS)
    batch = tuple(torch.from_numpy(a) for a in (enc.input_ids, enc.attention_mask, enc.slot))
    return bb, tok, c, batch


# -- PromptEncoder ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "mlp", "none"])
def test_prompt_encoder_shapes(kind):
    torch.manual_seed(0)
    enc = PromptEncoder(5, 16, kind)
    out = enc()
    assert out.shape == (5, 16)
    assert out.dtype == torch.float32
    assert torch.equal(out, enc())  # input-independent and deterministic: a constant table
    if kind == "none":
        assert torch.equal(out, enc.embedding.weight)
    assert (enc.lstm is not None) == (kind == "lstm")
    assert (enc.mlp is not None) == (kind != "none")


def test_prompt_encoder_lstm_layout():
    enc = PromptEncoder(4, 16, "lstm")
    assert enc.lstm.hidden_size == 8 and enc.lstm.num_layers == 2 and enc.lstm.bidirectional
    linears = [m for m in enc.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 16), (16, 16)]


@pytest.mark.parametrize(
    "kind",
    [
        "lstm",
        "mlp",
        "none",
    ],
)
def test_prompt_encoder_zero_pseudo(kind):
    assert PromptEncoder(0, 8, kind)().shape == (0, 8)


def test_prompt_encoder_errors():
    with pytest.raises(ValueError, match="unknown encoder"):
        PromptEncoder(2, 8, "gru")
    with pytest.raises(ValueError, match="even hidden size"):
        PromptEncoder(2, 7, "lstm")
    assert PromptEncoder(2, 7, "mlp")().shape == (2, 7)


# -- backbone helpers ---------------------------------------------------------------------


def test_split_and_causal(backbones):
    for kind, causal, has_head in [
        ("gpt2", True, True),
        ("llama", True, True),
        ("bert-mlm", False, True),
        ("bert", False, False),
    ]:
        bb = backbones(kind)
        base, head = split_backbone(bb)
        assert is_causal(bb) is causal
        assert (head is not None) is has_head
        assert base is bb.base_model
        assert not any(p.requires_grad for p in bb.parameters())
        assert not bb.training


def test_load_backbone_needs_a_transformers_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a transformers folder"):
        load_backbone(tmp_path)


# -- PTuningModel -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LM_FAMILIES)
def test_lm_head_with_verbalizer(tiny, backbones, kind):
    bb, tok, c, batch = setup(tiny, backbones, kind)
    label_ids = answer_ids(c, tok, ["great", "terrible"])
    torch.manual_seed(0)
    m = PTuningModel(bb, c["pseudo_count"], head="lm", label_ids=label_ids).eval()
    with torch.no_grad():
        scores = m(*batch)
        full = PTuningModel(bb, c["pseudo_count"], head="lm")
        full.load_state_dict(m.state_dict())
        logits = full.eval()(*batch)
    assert scores.shape == (3, 2)
    assert logits.shape == (3, m.vocab_size)
    assert torch.allclose(scores, logits[:, label_ids])


@pytest.mark.parametrize("kind", LM_FAMILIES)
def test_lm_head_reads_the_slot(tiny, backbones, kind):
    """The open-vocabulary score equals the backbone's own logits at the slot."""
    bb, tok, c, batch = setup(tiny, backbones, kind, "{sentence} It was [MASK]")  # no [P]
    m = PTuningModel(bb, 0, head="lm").eval()
    ids, mask, slot = batch
    with torch.no_grad():
        scores = m(ids, mask, slot)
        ref = bb(input_ids=ids, attention_mask=mask).logits[torch.arange(3), slot]
    assert torch.allclose(scores, ref, atol=1e-5)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("pool", ["slot", "mean", "text"])
def test_linear_head_shapes(tiny, backbones, kind, pool):
    bb, _, c, batch = setup(tiny, backbones, kind)
    m = PTuningModel(bb, c["pseudo_count"], head="linear", n_labels=4, pool=pool).eval()
    with torch.no_grad():
        out = m(*batch)
    assert out.shape == (3, 4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("pool", ["mean", "text"])
def test_mean_pool_ignores_padding(tiny, backbones, pool):
    bb, _, c, (ids, mask, slot) = setup(tiny, backbones, "bert")
    m = PTuningModel(bb, c["pseudo_count"], head="linear", n_labels=2, pool=pool).eval()
    with torch.no_grad():
        batched = m(ids, mask, slot)
        n = int(mask[2].sum())
        alone = m(ids[2:, :n], mask[2:, :n], slot[2:])
    assert torch.allclose(batched[2:], alone, atol=1e-5)


def test_text_pool_averages_the_records_own_tokens(tiny, backbones):
    """pool="text" is the mean over attended positions that are neither pseudo tokens nor
    the slot; pool="mean" averages every attended position."""
    bb, _, c, (ids, mask, slot) = setup(tiny, backbones, "bert")
    text = PTuningModel(bb, c["pseudo_count"], head="linear", n_labels=2, pool="text").eval()
    with torch.no_grad():
        hidden = text.hidden(ids, mask)  # (B, T, H)
        got = text.features(ids, mask, slot)  # (B, H)
    V = text.vocab_size
    for b in range(ids.shape[0]):
        own = [t for t in range(ids.shape[1]) if mask[b, t] and ids[b, t] < V and t != int(slot[b])]
        assert len(own) < int(mask[b].sum())  # something was left out
        assert torch.allclose(got[b], hidden[b, own].mean(0), atol=1e-5)


def test_unknown_head_or_pool(backbones):
    bb = backbones("bert")
    with pytest.raises(ValueError, match="unknown head"):
        PTuningModel(bb, 2, head="mlm")
    with pytest.raises(ValueError, match="unknown pool"):
        PTuningModel(bb, 2, head="linear", n_labels=2, pool="max")


@pytest.mark.parametrize("head", ["lm", "generate"])
def test_lm_head_on_encoder_without_lm_head(backbones, head):
    with pytest.raises(ValueError, match="--head linear"):
        PTuningModel(backbones("bert"), 2, head=head)


@pytest.mark.parametrize(("kind", "head"), [("gpt2", "lm"), ("bert-mlm", "lm"), ("bert", "linear")])
def test_only_encoder_and_head_train(tiny, backbones, kind, head):
    bb, tok, c, batch = setup(tiny, backbones, kind)
    n_labels = 2 if head == "linear" else 0
    label_ids = answer_ids(c, tok, ["great", "bad"]) if head == "lm" else None
    m = PTuningModel(bb, c["pseudo_count"], head=head, n_labels=n_labels, label_ids=label_ids)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable
    assert all(n.startswith(("encoder.", "head.")) for n in trainable)
    assert any(n.startswith("head.") for n in trainable) == (head == "linear")

    before = {k: v.clone() for k, v in bb.state_dict().items()}
    m.train()
    assert not m.backbone.training  # frozen: no dropout in the backbone
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(m(*batch), torch.tensor([0, 1, 0]))
    loss.backward()
    assert all(p.grad is None for p in bb.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder.mlp.parameters())
    opt.step()
    after = bb.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_backbone_dropout_is_on_in_training_only_when_asked(tiny, backbones):
    """backbone_dropout=True leaves the frozen backbone's dropout on in train mode (two
    passes differ, its weights get no gradient); eval mode turns it off again."""
    bb, _, c, batch = setup(tiny, backbones, "bert")
    assert bb.config.hidden_dropout_prob > 0
    m = PTuningModel(bb, c["pseudo_count"], head="linear", n_labels=2, pool="mean")
    try:
        m.train()
        assert not m.backbone.training
        with torch.no_grad():
            assert torch.equal(m(*batch), m(*batch))
        m.backbone_dropout = True
        m.train()
        assert m.backbone.training
        torch.manual_seed(0)
        out = m(*batch)  # (3, 2)
        torch.manual_seed(0)
        assert torch.equal(out, m(*batch))  # the masks come from the global generator
        assert not torch.equal(out, m(*batch))
        out.sum().backward()
        assert all(p.grad is None for p in bb.parameters())
    finally:
        m.eval()  # the backbone is shared with the module's other tests
    assert not m.backbone.training
    with torch.no_grad():
        assert torch.equal(m(*batch), m(*batch))


def test_model_freezes_a_backbone_it_is_given(tiny):
    from transformers import AutoModel

    bb = AutoModel.from_pretrained(tiny("bert"))  # trainable, as transformers loads it
    m = PTuningModel(bb, 2, head="linear", n_labels=2)
    assert not any(p.requires_grad for p in m.backbone.parameters())


@pytest.mark.parametrize("kind", FAMILIES)
def test_embed_places_encoder_rows(tiny, backbones, kind):
    bb, _, c, (ids, _, _) = setup(tiny, backbones, kind)
    torch.manual_seed(0)
    m = PTuningModel(bb, c["pseudo_count"], head="linear", n_labels=2)
    V = m.vocab_size
    with torch.no_grad():
        out = m.embed(ids)
        table = m.encoder()
        words = bb.base_model.get_input_embeddings()(ids.clamp(max=V - 1))
    assert out.shape == (*ids.shape, table.shape[1])
    pseudo = ids >= V
    assert int(pseudo.sum()) == 3 * c["pseudo_count"]
    for b, t in zip(*torch.nonzero(pseudo, as_tuple=True), strict=True):
        assert torch.equal(out[b, t], table[ids[b, t] - V])
    assert torch.equal(out[~pseudo], words[~pseudo])


def test_embed_without_pseudo_tokens_is_word_embedding(backbones):
    bb = backbones("gpt2")
    m = PTuningModel(bb, 3, head="lm")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(m.embed(ids), bb.base_model.get_input_embeddings()(ids))


def test_encoder_none_starts_at_word_embeddings(backbones):
    bb = backbones("gpt2")
    m = PTuningModel(bb, 4, head="lm", encoder="none")
    emb = bb.base_model.get_input_embeddings().weight
    table = m.encoder().detach()
    for row in table:
        assert (emb == row).all(-1).any()


@pytest.mark.parametrize(("kind", "head"), [("llama", "lm"), ("bert", "linear")])
def test_save_load_roundtrip(tiny, backbones, tmp_path, kind, head):
    bb, tok, c, batch = setup(tiny, backbones, kind)
    n_labels = 3 if head == "linear" else 0
    torch.manual_seed(0)
    a = PTuningModel(bb, c["pseudo_count"], head=head, n_labels=n_labels).eval()
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # not the init
    a.save_weights(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == ({ENCODER_FILE, HEAD_FILE} if head == "linear" else {ENCODER_FILE})

    torch.manual_seed(1)
    b = PTuningModel(bb, c["pseudo_count"], head=head, n_labels=n_labels).eval()
    with torch.no_grad():
        assert not torch.equal(a(*batch), b(*batch))
        b.load_weights(tmp_path)
        assert torch.equal(a(*batch), b(*batch))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / ENCODER_FILE))
    assert not any(k.startswith(("backbone", "base")) for k in saved)
    assert set(saved) == set(a.encoder.state_dict())


@pytest.mark.parametrize("kind", FAMILIES)
def test_scores_do_not_depend_on_the_batch(tiny, backbones, kind):
    """Right padding and the attention mask keep each record's scores batch-independent."""
    bb, _, c, (ids, mask, slot) = setup(tiny, backbones, kind)
    head = "lm" if kind != "bert" else "linear"
    torch.manual_seed(0)
    m = PTuningModel(bb, c["pseudo_count"], head=head, n_labels=2).eval()
    with torch.no_grad():
        batched = m(ids, mask, slot)
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            alone = m(ids[b : b + 1, :n], mask[b : b + 1, :n], slot[b : b + 1])
            assert torch.allclose(batched[b : b + 1], alone, atol=1e-4)
