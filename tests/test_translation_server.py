"""POST /v1/completions on an encoder–decoder model (fastserve/serve/translations.py): each prompt is translated as
`fastserve.translate` would (greedy, or beam search with best_of), through the official `openai` client;
concurrent requests share decoding runs; bad requests get OpenAI-style 4xx errors."""
import asyncio
import http.client
import json
import types
from urllib.parse import urlparse

import jax
import numpy as np
import pytest
from flax import nnx

from fastserve import parallel
from fastserve.config import ServeConfig, load_config
from fastserve.data.tokenizer import train_tokenizer
from fastserve.generation.seq2seq_decode import translate_tokens
from fastserve.generation.translation import encode_sources
from fastserve.models.seq2seq import Seq2SeqConfig
from fastserve.serve.batcher import Batcher
from fastserve.serve.translations import TranslationServer, Translator

TEXTS = ["the word of the lord came", "and the earth was without form", "love one another"]
MAX_TARGET = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok = train_tokenizer(["the word of the lord came unto jonah and the earth was without form and void, love "
                           "one another as i have loved you"] * 50, 300, str(tmp_path_factory.mktemp("tok") / "t.model"))
    cfg = Seq2SeqConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, d_ff=48, n_encoder_layers=1,
                        n_decoder_layers=1, max_source_len=24, max_target_len=MAX_TARGET, init_std=0.3)
    mesh = parallel.make_mesh(load_config(None, ["mesh.data=1"]).mesh, jax.devices()[:1])
    with nnx.use_eager_sharding(False):
        module = cfg.build(nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    loaded = types.SimpleNamespace(graphdef=graphdef, params=nnx.to_pure_dict(state), mesh=mesh, model_cfg=cfg)
    return module, tok, loaded


def reference(model, texts, **kw):
    """Translations computed directly: translate_tokens on the whole batch, cut at EOS."""
    module, tok, _ = model
    src, mask = encode_sources(tok, texts, 24)
    rows = np.asarray(translate_tokens(module, src, mask, max_len=MAX_TARGET, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                       pad_id=tok.pad_id, **kw)).tolist()
    return [r[:r.index(tok.eos_id)] if tok.eos_id in r else r for r in rows], [tok.eos_id in r for r in rows]


@pytest.fixture(scope="module")
def server(model):
    _, tok, loaded = model
    srv = TranslationServer(Translator(loaded, tok, batch_size=4), ServeConfig(port=0), "tiny_en_es").start()
    yield srv
    srv.stop()


def test_openai_client_gets_the_direct_translations(server, model):
    openai = pytest.importorskip("openai", reason="pip install openai")
    tok = model[1]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    greedy = client.completions.create(model="tiny_en_es", prompt=TEXTS)
    want, ended = reference(model, TEXTS)
    assert [c.text for c in greedy.choices] == [tok.decode(r) for r in want]
    # "stop" at the end token; "length" when the model's max_target_len ran out first
    assert [c.finish_reason for c in greedy.choices] == ["stop" if e else "length" for e in ended]
    assert greedy.usage.completion_tokens == sum(len(r) for r in want)
    beam = client.completions.create(model="tiny_en_es", prompt=TEXTS[0], best_of=4)
    assert beam.choices[0].text == tok.decode(reference(model, TEXTS[:1], beam_size=4)[0][0])
    cut = client.completions.create(model="tiny_en_es", prompt=TEXTS[1], max_tokens=2)
    assert cut.choices[0].text == tok.decode(want[1][:2]) and cut.usage.completion_tokens == min(2, len(want[1]))
    if len(want[1]) > 2:
        assert cut.choices[0].finish_reason == "length"


def post(server, path, body, content_type="application/json"):
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(),
                 {"Content-Type": content_type})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


@pytest.mark.parametrize("body, status, param, words", [
    ({"prompt": ""}, 400, "prompt", "is empty"),
    ({"prompt": "and the word " * 20}, 400, "prompt", "longer than the model's max_source_len=24"),
    ({"prompt": [1, 2, 3]}, 400, "prompt", "array of strings"),
    ({"prompt": "love", "stream": True}, 400, "stream", "whole"),
    ({"prompt": "love", "best_of": 9}, 400, "best_of", "[1, 8]"),
    ({"prompt": "love", "best_of": 2, "temperature": 0.7}, 400, "best_of", "does not sample"),
    ({"prompt": "love", "n": 2}, 400, "n", "not supported"),
    ({"prompt": "love", "stop": ["."]}, 400, "stop", "not supported"),
    ({"prompt": "love", "max_tokens": 11}, 400, "max_tokens", "max_target_len=10"),
    ({"prompt": "love", "model": "gpt-4"}, 404, "model", "does not exist"),
])
def test_bad_requests_get_openai_errors(server, body, status, param, words):
    code, reply = post(server, "/v1/completions", body)
    assert code == status, reply
    assert reply["error"]["param"] == param and words in reply["error"]["message"], reply


def test_chat_and_content_type_are_refused(server):
    code, reply = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert code == 400 and "/v1/completions" in reply["error"]["message"]
    assert post(server, "/v1/completions", {"prompt": "love"}, "text/plain")[0] == 415


def test_waiting_requests_of_one_setting_share_a_run_and_others_wait_their_turn():
    import threading
    busy, release, calls = threading.Event(), threading.Event(), []

    def run(key, items):
        calls.append((key, list(items)))
        busy.set()
        release.wait(10)
        return [f"{key}:{x}" for x in items]

    batcher = Batcher(run, max_items=4)

    async def main():
        first = asyncio.ensure_future(batcher.submit(["x"], key="greedy"))
        await asyncio.get_running_loop().run_in_executor(None, busy.wait, 10)   # the worker holds request 1
        rest = [asyncio.ensure_future(batcher.submit(items, key=key)) for items, key in
                ((["a", "b"], "greedy"), (["c"], "beam"), (["d"], "greedy"), (["e", "f", "g"], "greedy"))]
        await asyncio.sleep(0.05)
        release.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    batcher.close()
    # the oldest waiting request's setting runs first with every later one of that setting that fits in 4 items;
    # the beam request, next oldest, runs before the greedy one that did not fit
    assert calls == [("greedy", ["x"]), ("greedy", ["a", "b", "d"]), ("beam", ["c"]), ("greedy", ["e", "f", "g"])]
    assert first == ["greedy:x"] and rest == [["greedy:a", "greedy:b"], ["beam:c"], ["greedy:d"],
                                              ["greedy:e", "greedy:f", "greedy:g"]]
