"""Vision on Fashion-MNIST: fastserve's Keras-like face against Keras 3 on its JAX backend, and the ResNet's speed.

    python experiments/bench_vision.py            # full: MLP 10 epochs on 55,000 images, CNN 3 epochs on 10,000,
                                                  # each for seeds 0-9 (~25 min on an idle 2-core CPU)
    python experiments/bench_vision.py --quick    # ~2 minutes: MLP 6,000 images, CNN 2,000, 2 epochs, seed 0

Two models, each built twice — `fs.models.Sequential` and `keras.Sequential`, the same layers, Keras's default
initializers in both (Glorot-uniform kernels, zero biases, BN γ=1 β=0), Adam (Keras's defaults), the same batch
size, epochs and data (the first N of the 55,000 training images, pixels / 255, one-hot labels; the 10,000 test
images):
  - mlp: the issue's seed snippet, 784 → 128 relu → 64 relu → 10, batch 32;
  - cnn: configs/fashion_mnist_cnn.yaml's layers (conv 32 - BN - relu - pool - conv 64 - BN - relu - pool - flatten -
    dropout - dense 128 - dropout - dense 10; BN momentum 0.9 for the short run), batch 128.
Both end in `Dense(10)` with the softmax inside the loss (`CategoricalCrossentropy(from_logits=True)`), the form in
which the two frameworks compute the same loss (see "Same work" below); `--softmax` races the snippet's literal form.
The two frameworks train interleaved, one epoch each in turn (`fit(epochs=1)` repeatedly), so machine load hits both
alike. Reported per framework: training examples/s from wall time and from CPU time (this process's, summed over
threads: robust to other processes on a shared machine), over the epochs after the first (which compiles), the step
time, and the test accuracy (the mean over the seeds: one seed's draw moves it by about a point); the ratio is
fastserve / Keras. Goal: ratio ≥ 1.0 at equal accuracy (± 0.5 point).

ResNet: configs/fashion_mnist_resnet.yaml's model (ResNet-18 v1.5, width 16, small_pool stem) in the core's train step
(`make_train_step`, batch 128 of random images): images/s and MFU against the measured float32 matmul peak.

Recipes (`--recipe cnn|resnet`): trains configs/fashion_mnist_{cnn,resnet}.yaml as its header says (or, with
`--workdir DIR`, takes a run already trained with that recipe), scores the final checkpoint on the 10,000 test
images (`python -m fastserve.evaluate ... data.eval_split=test`) and checks the header's claim: test accuracy, and
for the CNN at most 20 CPU-minutes (10 minutes of 2 cores). Writes experiments/results/bench_vision_recipe_NAME.json.

Same work (`--same-work`, ~1 minute): the CNN built in both with dropout off, Keras's initial weights copied into
fastserve, no shuffling, the softmax folded into the loss (from_logits) in both, 2 epochs on 1,000 images: losses,
weights and test logits must agree up to float rounding (measured: epoch losses 2.36207 / 2.36207 and
0.84090 / 0.84089, weights within 0.8 % relative, test logits within 0.0036). With the softmax layer they do not
(2.2547 / 2.3705 for the first epoch, from the second step on): Keras's JAX backend clips probabilities to
[1e-7, 1 − 1e-7], so confidently wrong examples give it no gradient, where fastserve's keras_loss takes the exact
log-softmax — why the races use the logits form.

Prints one JSON object on the last line; writes experiments/results/bench_vision.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments.provenance import provenance  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load(n_train: int):
    import fastserve as fs
    (x, y), (xt, yt) = fs.datasets.fashion_mnist.load_data()
    x, y = x[:55000][:n_train], y[:55000][:n_train]          # the tail 5,000 are the recipes' validation split
    img = lambda a: (a.astype(np.float32) / 255.0)[..., None]
    onehot = lambda a: np.eye(10, dtype=np.float32)[a]
    return img(x), onehot(y), img(xt), onehot(yt)


def layers_of(kind: str, lib, logits: bool = True) -> list:
    """The same layer list in fastserve.layers or keras.layers (`lib`); with `logits` the last Dense has no softmax
    (the loss takes it, `from_logits=True`), so both frameworks compute the same loss (see the module docstring)."""
    head = lib.Dense(10) if logits else lib.Dense(10, activation="softmax")
    if kind == "mlp":
        return [lib.Flatten(), lib.Dense(128, activation="relu"), lib.Dense(64, activation="relu"), head]
    # BN momentum 0.9 (the recipe keeps Keras's 0.99): a few hundred steps leave 0.99's running statistics
    # far from the data's (measured: test accuracy 0.28 / 0.57 for fastserve / Keras after 237 steps)
    return [lib.Conv2D(32, 3, padding="same", use_bias=False), lib.BatchNormalization(momentum=0.9),
            lib.Activation("relu"), lib.MaxPool2D(2), lib.Conv2D(64, 3, padding="same", use_bias=False),
            lib.BatchNormalization(momentum=0.9),
            lib.Activation("relu"), lib.MaxPool2D(2), lib.Flatten(), lib.Dropout(0.3),
            lib.Dense(128, activation="relu"), lib.Dropout(0.3), head]


def build(kind: str, framework: str, seed: int, logits: bool = True):
    if framework == "fastserve":
        import fastserve as fs
        model = fs.models.Sequential([fs.layers.Input(shape=(28, 28, 1)), *layers_of(kind, fs.layers, logits)],
                                     seed=seed)
        loss = fs.keras.losses.CategoricalCrossentropy(from_logits=logits)
        model.compile(optimizer=fs.keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
        return model
    import keras
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((28, 28, 1)), *layers_of(kind, keras.layers, logits)])
    loss = keras.losses.CategoricalCrossentropy(from_logits=logits)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    return model


def same_work(kind: str, data, batch: int, epochs: int) -> dict:
    """Whether both frameworks do the same work: Keras's initial weights copied into fastserve, dropout off (rate
    0), no shuffling, the final softmax folded into the loss in both (`Dense(10)` + `from_logits=True`: Keras's JAX
    backend otherwise clips probabilities to [1e-7, 1 − 1e-7], dropping the gradient of confidently wrong examples,
    where fastserve takes the exact log-softmax), then `epochs` epochs each; per epoch both training losses, and the
    largest weight difference and test-prediction difference at the end. Equal up to float rounding means the
    layers, initial state, batch norm, Adam and the loss reduction match."""
    x, y, xt, yt = data
    import fastserve as fs
    import keras

    def spec(lib):
        out = [lib.Dropout(0.0) if type(layer).__name__ == "Dropout" else layer for layer in layers_of(kind, lib)]
        return out[:-1] + [lib.Dense(10)]
    keras.utils.set_random_seed(0)
    k = keras.Sequential([keras.Input((28, 28, 1)), *spec(keras.layers)])
    f = fs.models.Sequential([fs.layers.Input(shape=(28, 28, 1)), *spec(fs.layers)], seed=0)
    k.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    f.compile(optimizer=fs.keras.optimizers.Adam(1e-3), loss=fs.keras.losses.CategoricalCrossentropy(from_logits=True))
    f.set_weights(k.get_weights())
    losses = {"fastserve": [], "keras": []}
    for _ in range(epochs):
        for fw, model in (("fastserve", f), ("keras", k)):
            losses[fw].append(float(model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False
                                              ).history["loss"][-1]))
    diffs = [float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
             for a, b in zip(f.get_weights(), k.get_weights())]
    pf, pk = (np.asarray(m.predict(xt, batch_size=1000, verbose=0)) for m in (f, k))
    return {"examples": len(x), "epochs": epochs, "train_loss": losses,
            "max_weight_diff_relative": max(diffs), "max_logit_diff": float(np.abs(pf - pk).max())}


def race(kind: str, data, batch: int, epochs: int, seed: int = 0, logits: bool = True) -> dict:
    """Both frameworks, one epoch each in turn; per framework: per-epoch wall / CPU seconds, test accuracy."""
    x, y, xt, yt = data
    models = {fw: build(kind, fw, seed, logits) for fw in ("fastserve", "keras")}
    times = {fw: {"wall": [], "cpu": [], "loss": []} for fw in models}
    for epoch in range(epochs):
        for fw, model in models.items():
            wall, cpu = time.perf_counter(), time.process_time()
            h = model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True)
            times[fw]["wall"].append(time.perf_counter() - wall)
            times[fw]["cpu"].append(time.process_time() - cpu)
            times[fw]["loss"].append(float(h.history["loss"][-1]))
            print(f"{kind} {fw} epoch {epoch + 1}: {times[fw]['wall'][-1]:.1f} s wall, {times[fw]['cpu'][-1]:.1f} s "
                  f"CPU, loss {times[fw]['loss'][-1]:.4f}", file=sys.stderr, flush=True)
    steps = -(-len(x) // batch)
    out = {"examples": len(x), "batch_size": batch, "epochs": epochs, "steps_per_epoch": steps}
    for fw, model in models.items():
        pred = np.asarray(model.predict(xt, batch_size=1000, verbose=0))
        steady = slice(1, None) if epochs > 1 else slice(0, None)   # after the compiling first epoch
        wall, cpu = sum(times[fw]["wall"][steady]), sum(times[fw]["cpu"][steady])
        n = len(x) * len(times[fw]["wall"][steady])
        out[fw] = {"examples_per_s_wall": n / wall, "examples_per_s_cpu": n / cpu,
                   "step_ms_wall": 1000 * wall / (steps * len(times[fw]["wall"][steady])),
                   "first_epoch_s_wall": times[fw]["wall"][0], "epoch_s_wall": times[fw]["wall"],
                   "epoch_s_cpu": times[fw]["cpu"], "train_loss": times[fw]["loss"],
                   "test_accuracy": float((pred.argmax(1) == yt.argmax(1)).mean())}
    return out


def race_seeds(kind: str, data, batch: int, epochs: int, seeds: tuple[int, ...], logits: bool = True) -> dict:
    """`race` once per seed (the initial weights, dropout and shuffling differ); examples/s pooled over every
    steady epoch of every seed, test accuracy as the mean over seeds (and each seed's value)."""
    runs = [race(kind, data, batch, epochs, seed, logits) for seed in seeds]
    out = {k: runs[0][k] for k in ("examples", "batch_size", "epochs", "steps_per_epoch")}
    out["seeds"] = list(seeds)
    steady = slice(1, None) if epochs > 1 else slice(0, None)
    for fw in ("fastserve", "keras"):
        per = [r[fw] for r in runs]
        wall = sum(sum(p["epoch_s_wall"][steady]) for p in per)
        cpu = sum(sum(p["epoch_s_cpu"][steady]) for p in per)
        n_epochs = sum(len(p["epoch_s_wall"][steady]) for p in per)
        accs = [p["test_accuracy"] for p in per]
        out[fw] = {"examples_per_s_wall": out["examples"] * n_epochs / wall,
                   "examples_per_s_cpu": out["examples"] * n_epochs / cpu,
                   "step_ms_wall": 1000 * wall / (out["steps_per_epoch"] * n_epochs),
                   "test_accuracy": float(np.mean(accs)), "test_accuracy_per_seed": accs,
                   "test_accuracy_std": float(np.std(accs)), "runs": per}
    f, k = out["fastserve"], out["keras"]
    out["ratio_wall"] = f["examples_per_s_wall"] / k["examples_per_s_wall"]
    out["ratio_cpu"] = f["examples_per_s_cpu"] / k["examples_per_s_cpu"]
    out["accuracy_gap_points"] = 100 * (f["test_accuracy"] - k["test_accuracy"])
    out["goal_met"] = bool(out["ratio_cpu"] >= 1.0 and abs(out["accuracy_gap_points"]) <= 0.5)
    return out


def resnet_speed(steps: int, batch: int = 128) -> dict:
    """Images/s and MFU of the ResNet recipe's model in the core's train step (random images; compile excluded)."""
    import jax
    from fastserve import parallel
    from fastserve.config import MeshConfig, OptimizerConfig, load_config
    from fastserve.core.optim import make_optimizer
    from fastserve.core.perf import measure_matmul_peak
    from fastserve.core.state import create_train_state
    from fastserve.core.steps import make_train_step, split_micro_batches
    from fastserve.data.dataset import fill_model_config
    from fastserve.tasks import make_task

    cfg = load_config(os.path.join(os.path.dirname(RESULTS), "..", "configs", "fashion_mnist_resnet.yaml"))
    model_cfg = fill_model_config(cfg.model, {"image_size": 28, "channels": 1, "num_classes": 10})
    mesh = parallel.make_mesh(MeshConfig(data=-1))
    tx, schedule = make_optimizer(OptimizerConfig(name="adamw"), 1000)
    graphdef, state, shardings = create_train_state(model_cfg, tx, mesh, 0)
    task = make_task(cfg.train.task)
    step = make_train_step(graphdef, task, tx, schedule, shardings, mesh)
    r = np.random.default_rng(0)
    batch = {"inputs": r.standard_normal((batch, 28, 28, 1)).astype(np.float32),
             "labels": r.integers(0, 10, batch).astype(np.int32), "weights": np.ones(batch, np.float32)}
    batch = parallel.host_to_global(split_micro_batches(batch, 1), mesh, leading=1)
    state, m = step(state, batch, {})
    jax.block_until_ready(m)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state, m = step(state, batch, {})
    jax.block_until_ready(m)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = measure_matmul_peak()
    flops = model_cfg.flops_per_example()
    ips = steps * len(batch["labels"][0]) / wall
    m = cfg.model
    return {"model": f"resnet{m.depth} v1.5, width {m.width}, {m.stem} stem, 28×28×1", "batch_size": len(batch["labels"][0]),
            "steps": steps, "train_gflop_per_image": flops / 1e9, "images_per_s_wall": ips,
            "images_per_s_cpu": steps * len(batch["labels"][0]) / cpu, "peak_gflops_matmul": peak / 1e9,
            "mfu": flops * ips / (peak * len(jax.devices()))}


RECIPES = {"cnn": ("configs/fashion_mnist_cnn.yaml", 0.91, 20 * 60.0),   # claim, CPU seconds allowed
           "resnet": ("configs/fashion_mnist_resnet.yaml", 0.93, None)}


def check_recipe(name: str, workdir: str | None) -> dict:
    """Trains the recipe (unless `workdir` holds a finished run of it), then its test accuracy against the claim."""
    import resource

    import fastserve as fs

    recipe, claim, cpu_budget = RECIPES[name]
    root = os.path.dirname(RESULTS)
    recipe = os.path.join(root, "..", recipe)
    out = {"recipe": os.path.basename(recipe), "claim_test_accuracy": claim, "cpu_budget_s": cpu_budget,
           "load_average_start": round(os.getloadavg()[0], 2)}
    if workdir is None:
        workdir = os.path.join(root, "..", "runs", f"bench_vision_{name}")
        wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        fs.train(recipe, f"train.workdir={workdir}", "log.progress=false")
        after = resource.getrusage(resource.RUSAGE_SELF)
        out.update(train_wall_s=time.perf_counter() - wall,
                   train_cpu_s=(after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime))
    out["workdir"] = os.path.abspath(workdir)
    scores = fs.evaluate(recipe, f"train.workdir={workdir}", "data.eval_split=test")
    out.update(step=scores["step"], test_accuracy=scores["accuracy"], test_loss=scores["loss"])
    out["met"] = bool(out["test_accuracy"] >= claim and (
        cpu_budget is None or "train_cpu_s" not in out or out["train_cpu_s"] <= cpu_budget))
    return out


def markdown(result: dict) -> str:
    lines = ["# bench_vision: fastserve vs Keras 3 (JAX backend) on Fashion-MNIST", "",
             f"commit {result['provenance']['commit'][:10]} (dirty: {result['provenance']['dirty']}), "
             f"quick: {result['quick']}, load average at start {result['load_average']}, "
             f"loss: {result.get('loss_form', 'softmax layer + categorical_crossentropy')}", "",
             "| model | framework | examples/s (wall) | examples/s (CPU) | step ms | test accuracy |",
             "|---|---|---|---|---|---|"]
    notes = []
    for kind in ("mlp", "cnn"):
        r = result[kind]
        for fw in ("fastserve", "keras"):
            f = r[fw]
            lines.append(f"| {kind} | {fw} | {f['examples_per_s_wall']:.0f} | {f['examples_per_s_cpu']:.0f} | "
                         f"{f['step_ms_wall']:.2f} | {f['test_accuracy']:.4f} |")
        lines.append(f"| {kind} | ratio | {r['ratio_wall']:.2f}× | {r['ratio_cpu']:.2f}× | | "
                     f"{r['accuracy_gap_points']:+.2f} pt |")
        per_seed = "; ".join(f"{fw} " + ", ".join(f"{a:.4f}" for a in r[fw]["test_accuracy_per_seed"])
                             for fw in ("fastserve", "keras"))
        notes.append(f"- {kind}: test accuracy per seed {r['seeds']}: {per_seed}")
    rn = result["resnet"]
    lines += ["", f"ResNet ({rn['model']}): {rn['images_per_s_wall']:.0f} images/s wall, "
              f"{rn['images_per_s_cpu']:.0f} per CPU-second, MFU {100 * rn['mfu']:.1f}% of a "
              f"{rn['peak_gflops_matmul']:.0f} GFLOP/s measured matmul peak ({rn['train_gflop_per_image']:.3f} "
              "GFLOP per training image).", "", "Accuracy is the mean over seeds (examples/s pooled over them):",
              *notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer images, 2 epochs each (~2 minutes)")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="check a recipe's header claim instead")
    p.add_argument("--workdir", help="with --recipe: a finished run of it to score (default: train it now)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per model in the full run (default 10: one seed's "
                   "draw moves test accuracy by ~0.7 point, so fewer cannot resolve the ±0.5 point check)")
    p.add_argument("--softmax", action="store_true", help="race the seed snippet's form (softmax layer + "
                   "categorical_crossentropy) instead of the logits form; Keras then clips probabilities")
    p.add_argument("--same-work", action="store_true", help="check that both CNNs take the same steps from the same "
                   "weights (no dropout, no shuffling; 1,000 images, 2 epochs) and print the JSON")
    args = p.parse_args()
    if args.same_work:
        data = load(1000)
        print(json.dumps(same_work("cnn", data, 128, 2)))
        return 0
    if args.recipe:
        result = {"benchmark": "bench_vision_recipe", "provenance": provenance(),
                  **check_recipe(args.recipe, args.workdir)}
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, f"bench_vision_recipe_{args.recipe}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result))
        return 0 if result["met"] else 1
    load_avg = os.getloadavg()[0]
    data = load(6000 if args.quick else 55000)
    cnn_examples = 2000 if args.quick else 10000
    result = {"benchmark": "bench_vision", "quick": args.quick, "provenance": provenance(),
              "load_average": round(load_avg, 2), "cpu_count": os.cpu_count(),
              "loss_form": "softmax layer + categorical_crossentropy" if args.softmax
              else "Dense(10) + CategoricalCrossentropy(from_logits=True)"}
    seeds = (0,) if args.quick else tuple(range(args.seeds))
    result["mlp"] = race_seeds("mlp", data, 32, 2 if args.quick else 10, seeds, not args.softmax)
    result["cnn"] = race_seeds("cnn", (data[0][:cnn_examples], data[1][:cnn_examples], *data[2:]), 128,
                               2 if args.quick else 3, seeds, not args.softmax)
    result["resnet"] = resnet_speed(3 if args.quick else 10)
    os.makedirs(RESULTS, exist_ok=True)
    name = "bench_vision_quick" if args.quick else "bench_vision"
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(markdown(result))
    summary = {"mlp_ratio_cpu": result["mlp"]["ratio_cpu"], "cnn_ratio_cpu": result["cnn"]["ratio_cpu"],
               "mlp_acc": [result["mlp"][fw]["test_accuracy"] for fw in ("fastserve", "keras")],
               "cnn_acc": [result["cnn"][fw]["test_accuracy"] for fw in ("fastserve", "keras")],
               "resnet_images_per_s": result["resnet"]["images_per_s_wall"], "resnet_mfu": result["resnet"]["mfu"]}
    print(json.dumps({**summary, "provenance": result["provenance"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
