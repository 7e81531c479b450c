"""English → Spanish Bible pairs (data.source: bible_pairs) and the translation verbs on them: whole books held
out, clear config errors, and a tiny model trained, scored (BLEU / chrF) and used by fastserve.translate."""
import http.client
import json
import os
import subprocess
import sys
from urllib.parse import urlparse

import pytest

from fastserve.config import ConfigError, load_config
from fastserve.data.packages import MissingPackage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "translate_en_es.yaml")
TINY = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.n_encoder_layers=1", "model.n_decoder_layers=1",
        "tokenizer.vocab_size=400", "data.max_source_len=24", "data.max_target_len=24", "data.max_eval_pairs=8",
        "data.batch_size=8", "train.steps=3", "train.eval_every=3", "checkpoint.every=3", "log.every=1",
        "log.progress=false", "log.tensorboard=false", "log.peak_flops=1e9", "train.task.samples=0"]


@pytest.fixture(scope="module")
def sword():
    from fastserve.data.sword import verses
    try:
        return {m: verses(m) for m in ("engKJV2006eb", "spaRV1909eb")}
    except MissingPackage as e:
        pytest.skip(str(e))


def test_held_out_splits_are_whole_books(sword):
    from fastserve.data.bible_pairs import verse_pairs, verse_text

    cfg = load_config(RECIPE, []).data
    splits = verse_pairs(cfg)
    english = {(v.book, v.chapter, v.verse) for v in sword["engKJV2006eb"] if verse_text(v)}
    paired_books = [v.book for v in sword["spaRV1909eb"] if (v.book, v.chapter, v.verse) in english and verse_text(v)]
    for split, books in (("validation", cfg.validation_books), ("test", cfg.test_books)):
        assert len(splits[split]) == sum(b in books for b in paired_books) > 0
    assert len(splits["train"]) == sum(b not in cfg.validation_books + cfg.test_books for b in paired_books)
    held = {es for split in ("validation", "test") for _, es in splits[split]}
    assert not held & {es for _, es in splits["train"]}            # no held-out verse text among training targets
    en, es = splits["test"][0]                                     # Ruth 1:1, the KJV's footnote dropped
    assert en.startswith("Now it came to pass in the days when the judges ruled,") and en.endswith("two sons.")
    assert es.startswith("Y aconteció en los días que gobernaban los jueces,")


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="test_books.*Jonas"):
        load_config(RECIPE, ["data.test_books=[Ruth,Jonas]"])
    with pytest.raises(ConfigError, match="test_books.*Joel also in validation_books"):
        load_config(RECIPE, ["data.test_books=[Joel]"])
    with pytest.raises(ConfigError, match="vocabulary"):
        load_config(RECIPE, ["data.vocabulary=shared"])


def test_shouted_first_word_is_written_as_a_word():
    from fastserve.data.bible_pairs import spanish_case
    assert spanish_case("EN el principio crió Dios") == "En el principio crió Dios"
    assert spanish_case("Y ACONTECIÓ en los días") == "Y aconteció en los días"
    assert spanish_case("A Jehová") == "A Jehová"                 # no shouted word: untouched


def _run(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=timeout)


@pytest.mark.slow
def test_train_score_and_translate_a_tiny_model(sword, tmp_path):
    """Separate vocabularies on the way: the target side gets its own embedding table."""
    run = [f"train.workdir={tmp_path / 'run'}", *TINY, "data.vocabulary=separate"]
    train = _run("fastserve.train", "--config", RECIPE, *run)
    assert train.returncode == 0, train.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3] and all(0 <= r["bleu"] <= 100 and 0 <= r["chrf"] <= 100 for r in evals)
    assert (tmp_path / "run" / "source_tokenizer" / "tokenizer.model").is_file()

    ev = _run("fastserve.evaluate", "--config", RECIPE, *run)
    assert ev.returncode == 0, ev.stderr[-3000:]
    scores = json.loads(ev.stdout.strip().splitlines()[-1])
    assert scores["step"] == 3 and scores["bleu"] == pytest.approx(evals[-1]["bleu"], abs=1e-6)

    src = tmp_path / "in.txt"
    src.write_text("God is love.\n\nJesus wept.\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    tr = _run("fastserve.translate", "--config", RECIPE, *run, "--input", str(src), "--output", str(out))
    assert tr.returncode == 0, tr.stderr[-3000:]
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""    # one line per input line, the empty one kept

    import fastserve
    assert fastserve.infer(RECIPE, ["God is love."], *run) == [lines[0]]   # greedy, like --beam 1
    bad = _run("fastserve.translate", "--config", RECIPE, *run, "--text", "")
    assert bad.returncode == 2 and "source sentence 1 is empty" in bad.stderr
    long = _run("fastserve.translate", "--config", RECIPE, *run, "--text", "and the word " * 40)
    assert long.returncode == 2 and "longer than the model's max_source_len=24" in long.stderr

    # served as `python -m fastserve.serve` would: POST /v1/completions translates each prompt (same batch shape)
    from fastserve.serve.translations import TranslationServer
    srv = fastserve.deploy(RECIPE, *run, "serve.port=0", "serve.slots=16", block=False)
    try:
        assert isinstance(srv, TranslationServer)
        u = urlparse(srv.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": ["God is love."]}),
                     {"Content-Type": "application/json"})
        reply = json.loads(conn.getresponse().read())
        assert reply["choices"][0]["text"] == lines[0], reply
    finally:
        srv.stop()


@pytest.mark.parametrize("group", [0, 4])
def test_pair_batches_cut_to_buckets_lose_no_token_and_resume(group):
    import numpy as np

    from fastserve.data.bible_pairs import PairBatches, pad_examples

    r = np.random.default_rng(0)
    lengths = np.where(r.random(100) < 0.9, r.integers(1, 12, 100), r.integers(30, 40, 100))   # mostly short
    src = [list(r.integers(4, 99, n)) for n in lengths]
    tgt = [list(r.integers(4, 99, max(1, n + r.integers(-2, 3)))) for n in lengths]
    ex = pad_examples(src, tgt, 48, 48)
    batches = PairBatches(ex, 10, seed=3, shuffle=True, process_index=0, process_count=1, bucket_count=3,
                          group_by_length=group)
    seen, shapes = [], set()
    for _ in range(batches.batches_per_epoch):
        b = next(batches)
        s, t = b["src"].shape[1], b["tgt_in"].shape[1]
        shapes.add((s, t))
        assert s == t and s in (16, 32, 48)
        for row in range(10):                          # each row is a whole pair: its EOS made the cut
            n = int(b["src_mask"][row].sum())
            seen.append(tuple(b["src"][row, :n]))
            assert int(b["tgt_weights"][row].sum()) == int((b["tgt_out"][row] > 0).sum()) and b["tgt_out"][row][
                int(b["tgt_weights"][row].sum()) - 1] == 3
    assert sorted(seen) == sorted(tuple(ex["src"][i, :int(ex["src_mask"][i].sum())]) for i in range(100))
    assert len(shapes) > 1                              # the cut varies: some batches are shorter than the maximum
    state = batches.get_state()
    nxt = next(batches)
    again = PairBatches(ex, 10, seed=3, shuffle=True, process_index=0, process_count=1, bucket_count=3,
                        group_by_length=group)
    again.set_state(state)
    resumed = next(again)
    assert all(np.array_equal(v, resumed[k]) for k, v in nxt.items())
    halves = [PairBatches(ex, 10, 3, True, i, 2, 3, group) for i in range(2)]
    for h in halves:
        h.set_state(state)
    parts = [next(h) for h in halves]
    assert all(np.array_equal(np.concatenate([p[k] for p in parts]), v) for k, v in nxt.items())
