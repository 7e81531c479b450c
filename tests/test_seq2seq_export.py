"""A seq2seq export (encode / translate / beam functions per source bucket) run by `load_exported` in a fresh
process without the model code gives the in-process translations token for token."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
from flax import nnx

from fastserve.artifacts.options import ExportOptions
from fastserve.artifacts.writer import export_params
from fastserve.data.tokenizer import train_tokenizer
from fastserve.generation.seq2seq_decode import translate_tokens
from fastserve.generation.translation import encode_sources
from fastserve.models.seq2seq import Seq2SeqConfig

sys.path.insert(0, os.path.dirname(__file__))
from fresh_process import WITHOUT_MODEL_CODE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["the word of the lord came", "and the earth was without form", "love one another"]


def test_exported_translations_equal_in_process(tmp_path):
    tok = train_tokenizer(["the word of the lord came unto jonah and the earth was without form and void, love "
                           "one another as i have loved you"] * 50, 300, str(tmp_path / "tok.model"))
    cfg = Seq2SeqConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, d_ff=48, n_encoder_layers=1,
                        n_decoder_layers=1, max_source_len=24, max_target_len=10, init_std=0.3)
    with nnx.use_eager_sharding(False):
        model = cfg.build(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model))
    out = tmp_path / "export"
    manifest = export_params(cfg, params, tok, str(out), ExportOptions(platforms=("cpu",), buckets=(16,),
                                                                       batch_sizes=(4,)))
    assert sorted(manifest["functions"]) == ["beam_16_b4", "beam_24_b4", "encode_16_b4", "encode_24_b4",
                                             "translate_16_b4", "translate_24_b4"]

    src, mask = encode_sources(tok, TEXTS, 24)
    ids = dict(max_len=10, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    greedy = np.asarray(jax.jit(lambda s, m: translate_tokens(model, s, m, **ids))(src, mask))
    beam = np.asarray(jax.jit(lambda s, m: translate_tokens(model, s, m, beam_size=4, length_penalty=0.6, **ids))(
        src, mask))
    script = WITHOUT_MODEL_CODE + textwrap.dedent(f"""
        import numpy as np
        from fastserve.artifacts.loader import load_exported
        t = load_exported({str(out)!r})
        src, mask = t.encode_sources({TEXTS!r})
        print(json.dumps({{"greedy": t.translate_tokens(src, mask).tolist(),
                          "beam": t.translate_tokens(src, mask, beam=True, length_penalty=0.6).tolist(),
                          "text": t.translate({TEXTS!r}), "bucket": t._pick("translate", 3, 9)[0]}}))
        try:
            t.translate([""])
        except ValueError as e:
            print(json.dumps({{"error": str(e)}}))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, err = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    np.testing.assert_array_equal(np.array(got["greedy"]), greedy)
    np.testing.assert_array_equal(np.array(got["beam"]), beam)
    assert got["text"][0] == tok.decode([i for i in greedy[0] if i > tok.eos_id])
    assert got["bucket"] == "translate_16_b4"              # the smallest bucket holding 9 tokens
    assert err["error"] == "source sentence 1 is empty"
