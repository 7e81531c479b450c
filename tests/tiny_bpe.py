"""A tiny byte-level BPE tokenizer (trained in a fraction of a second) with a ChatML template, shared by the
importer and server tests."""
from __future__ import annotations

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_tiny_bpe():
    """A `tokenizers.Tokenizer`: byte-level BPE, 300 pieces, specials <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the capital of France is Paris", "hello world, hello there"] * 20, trainer)
    return tok
