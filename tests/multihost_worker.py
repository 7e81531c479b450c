"""One process of the multi-host test (tests/test_multihost.py): runs `fastserve.core.trainer.train` and writes a JSON report.

    python tests/multihost_worker.py --out report.json --local-devices 2 [key=value ...]

The overrides are passed to `fastserve.config.load_config(None, overrides)` untouched (the test supplies the
`distributed.*` keys). Nothing in fastserve is changed; two test-only wrappers observe what each process does:

- the batch iterator returned by `prepare_lm_data` is wrapped to record this process's slice of the first batches
  (to compare the slices of N processes with the global batch of a 1-process run), and the tokenizer's hashes;
- the compiled train step is wrapped to record every step's loss on *every* process (only process 0 writes
  metrics.jsonl, and `train()` returns only the last step's metrics).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

RECORDED_BATCHES = 2  # local slices of the first batches kept in the report (small: local_batch × seq_len ints)


class _RecordingBatches:
    """Forwards to an `LMBatches`, keeping a copy of the first local batches it hands out."""

    def __init__(self, inner, sink: list):
        self._inner, self._sink = inner, sink

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._inner)
        if len(self._sink) < RECORDED_BATCHES:
            self._sink.append({k: v.tolist() for k, v in batch.items() if k in ("inputs", "targets")})
        return batch

    def get_state(self):
        return self._inner.get_state()

    def set_state(self, state):
        return self._inner.set_state(state)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local-devices", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import jax

    if args.local_devices > 1:
        jax.config.update("jax_num_cpu_devices", args.local_devices)  # before any array exists

    from fastserve.core import trainer as train_mod
    from fastserve.data import text as text_data
    from fastserve.config import load_config

    cfg = load_config(None, args.overrides)
    t0 = time.perf_counter()
    report: dict = {"losses": [], "batches": []}

    prepare_lm_data = text_data.prepare_lm_data

    def recording_prepare_lm_data(c):
        t = time.perf_counter()
        data = prepare_lm_data(c)
        report["data_seconds"] = time.perf_counter() - t
        report["tokenizer_sha256"] = hashlib.sha256(data.tokenizer.model_proto).hexdigest()
        # The serialized model also records the trainer's num_threads (= this machine's CPU count), so hosts with
        # different core counts write different bytes for the same vocabulary: compare pieces and scores too.
        sp = data.tokenizer._sp
        vocab = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.vocab_size())]
        report["vocab_sha256"] = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
        report["train_rows"], report["eval_rows"] = data.train_rows, data.eval_rows
        report["eval_batches"] = len(data.eval)
        data.train = _RecordingBatches(data.train, report["batches"])
        return data

    make_train_step = train_mod.make_train_step

    def recording_make_train_step(*a, **kw):
        step_fn = make_train_step(*a, **kw)

        def step(state, batch, task_state):
            state, metrics = step_fn(state, batch, task_state)
            m = jax.device_get(metrics)  # train() fetches the same values right after; no extra sync point
            report.setdefault("first_step_seconds", time.perf_counter() - t0)
            report["losses"].append(float(m["loss_sum"]) / max(float(m["weight"]), 1e-9))
            return state, metrics

        return step

    text_data.prepare_lm_data = recording_prepare_lm_data
    train_mod.make_train_step = recording_make_train_step

    results = train_mod.train(cfg)
    report.update(
        seconds=time.perf_counter() - t0,
        step=results["step"],
        train=results["train"],
        eval=results["eval"],
        stopped_early=results["stopped_early"],
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
    )
    with open(args.out, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
