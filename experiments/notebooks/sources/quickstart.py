# %% [markdown]
# # fastserve quickstart: train, watch, generate, compress, export
#
# This notebook trains the quickstart language model (`configs/quickstart.yaml`: a Llama-style decoder on CPython's
# own documentation, no download) on a mesh over every device it finds, reads the loss and MFU back from the run's
# log, generates text, factorizes the model (low-rank SVD) and recovers it with a short fine-tune, exports it with
# `jax.export`, and loads the export — without fastserve's model code — to generate again.
#
# **Runtime**: made for a Colab TPU runtime (*Runtime → Change runtime type → TPU*: v2-8 or v5e-1), and runs
# anywhere: on a CPU it picks a small model and a few steps (about a minute), on a TPU or GPU the recipe as written.

# %% [markdown]
# ## 1. Install
# On a fresh Colab runtime this clones the repository (set `REPO_URL`) and installs it with `pip install -e`; where
# fastserve is already installed it does nothing.

# %% [shared] install

# %% [markdown]
# ## 2. Devices and size
# `jax.default_backend()` says what this runtime has; `SIZE` is `small` on a CPU and `full` on an accelerator
# (set `FASTSERVE_NOTEBOOK_SIZE` to choose). Runs go under `WORK`.

# %% [shared] devices

# %% [markdown]
# ## 3. Parameters
# Every run is the recipe plus `key=value` overrides, exactly as on the command line
# (`python -m fastserve.train --config configs/quickstart.yaml train.steps=50`). `mesh.data=-1` spreads the batch
# over all devices (data parallelism); `mesh.fsdp=N` or `mesh.tensor=N` would shard the weights instead — the one
# rules table in `fastserve/parallel.py` maps each parameter's logical axes onto this mesh.

# %%
RECIPE = os.path.join(CONFIGS, "quickstart.yaml")
RUN = os.path.join(WORK, "quickstart")
MESH = ["mesh.data=-1"]
if SIZE == "small":   # a 0.1M-parameter model, 20 steps, a 400-piece tokenizer: about a minute on a laptop CPU
    SHAPE = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
             "model.max_seq_len=64", "tokenizer.vocab_size=400"]
    DATA = ["data.seq_len=32", "data.batch_size=8", "train.eval_batches=4"]
    STEPS = ["train.steps=20", "train.eval_every=10", "log.every=5", "checkpoint.every=20",
             "train.task.samples=0", "log.tensorboard=false"]
    RECOVER_STEPS, NEW_TOKENS, EXPORT = 10, 16, ["export.buckets=[32]", "export.max_new_tokens=16"]
else:                 # the recipe as its header states it: 3.9M parameters, 300 steps, held-out perplexity ~120
    SHAPE, DATA, STEPS = [], [], []
    RECOVER_STEPS, NEW_TOKENS, EXPORT = 100, 40, []
PLATFORM = {"gpu": "cuda"}.get(BACKEND, BACKEND)   # export for the platform this runtime has
print(RECIPE, *MESH, *SHAPE, *DATA, *STEPS)

# %% [markdown]
# ## 4. Train
# `fastserve.train` is `python -m fastserve.train`: it trains the tokenizer (cached in the run folder), evaluates the
# untrained model (the baseline: perplexity about the vocabulary size), then trains, with a progress bar showing
# loss, tokens/s and MFU, held-out evaluations and checkpoints. Running the cell again resumes from the last
# checkpoint, so it returns at once once the run is complete.

# %%
result = fastserve.train(RECIPE, *MESH, *SHAPE, *DATA, *STEPS, f"train.workdir={RUN}")
print(f"{result['params'] / 1e6:.2f}M parameters, step {result['step']}")
print("last train record:", {k: round(v, 4) for k, v in result["train"].items()})
print("held-out:", {k: round(v, 4) for k, v in result["eval"].items()})

# %% [markdown]
# ## 5. Watch loss and MFU
# Every run logs to `RUN/metrics.jsonl` (and TensorBoard): train records carry the loss, tokens/s and MFU (model
# FLOPs per second over the device peak: a published figure on TPU / GPU, a measured matmul on CPU); eval records
# the held-out loss and perplexity. Expect the loss to fall from about ln(vocabulary) and MFU to settle after the
# first window, which includes compiling (on a shared CPU the figures are noisy: tiny steps, a busy machine).

# %%
import json

records = [json.loads(line) for line in open(os.path.join(RUN, "metrics.jsonl"))]
train_log = [r for r in records if r["split"] == "train"]
eval_log = [r for r in records if r["split"] == "eval"]
print(f"{'step':>5} {'loss':>7} {'tokens/s':>10} {'MFU':>6}")
for r in train_log:
    print(f"{r['step']:>5} {r['loss']:>7.3f} {r['tokens_per_s']:>10,.0f} {r['mfu']:>6.1%}")
print("held-out perplexity by step:", {r["step"]: round(r["perplexity"], 1) for r in eval_log})
assert train_log[-1]["loss"] < eval_log[0]["loss"], "training did not lower the loss"

try:  # a plot when matplotlib is there (it is on Colab)
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3))
    a.plot([r["step"] for r in train_log], [r["loss"] for r in train_log], label="train")
    a.plot([r["step"] for r in eval_log], [r["loss"] for r in eval_log], "o-", label="held-out")
    a.set_xlabel("step"); a.set_ylabel("loss"); a.legend()
    b.plot([r["step"] for r in train_log], [100 * r["mfu"] for r in train_log])
    b.set_xlabel("step"); b.set_ylabel("MFU %")
    plt.show()
except ImportError:
    pass

# %% [markdown]
# ## 6. Generate
# `fastserve.infer` is `python -m fastserve.generate`: prompts are batched, padded to length buckets and decoded
# with a KV cache inside one jitted loop. The small model has seen a few thousand tokens, so expect fragments of
# documentation-like text; the full run writes recognizable Python-doc prose.

# %%
PROMPTS = ["The class statement", "A list comprehension"]
SAMPLING = [f"generate.max_new_tokens={NEW_TOKENS}", "generate.temperature=0.8", "generate.top_p=0.95"]
for prompt, text in zip(PROMPTS, fastserve.infer(os.path.join(RUN, "config.yaml"), PROMPTS, *SAMPLING)):
    print(repr(prompt + text))

# %% [markdown]
# ## 7. Factorize, then recover
# `fastserve.compress` applies the `transforms` of `configs/compress_quickstart.yaml` — a truncated SVD of every
# attention and MLP kernel at 0.21 of its rank — and writes a new run folder with a before / after report. The
# factorized model is an ordinary run: a short fine-tune (`fastserve.train` on its `config.yaml`) recovers most of
# the perplexity the truncation cost (full size, this code: 120 → 147 → 126; see the README's tour).

# %%
LOWRANK = os.path.join(WORK, "quickstart_lowrank")
if not os.path.isdir(os.path.join(LOWRANK, "checkpoints")):
    report = fastserve.compress(os.path.join(CONFIGS, "compress_quickstart.yaml"), LOWRANK, f"source.path={RUN}",
                                *DATA, decode_tokens=0 if SIZE == "small" else 32)   # 0: no decode timing
    before, after, ratio = report["before"], report["after"], report["ratio"]
    print(f"parameters {before['parameters']:,} → {after['parameters']:,} ({ratio['parameters']:.3f}×)")
    print(f"bytes      {before['bytes'] / 1e6:.2f} MB → {after['bytes'] / 1e6:.2f} MB ({ratio['bytes']:.3f}×)")
    print(f"held-out perplexity {before['perplexity']:.2f} → {after['perplexity']:.2f} ({ratio['perplexity']:.3f}×)")

# %%
recovered = fastserve.train(os.path.join(LOWRANK, "config.yaml"), f"train.steps={RECOVER_STEPS}",
                            f"train.eval_every={RECOVER_STEPS}", "train.task.samples=0")
print("recovered held-out perplexity:", round(recovered["eval"]["perplexity"], 2),
      "(dense:", round(result["eval"]["perplexity"], 2), ")")

# %% [markdown]
# ## 8. Export, load, generate again
# `fastserve.export` writes the serving functions (prefill, decode and a whole generate loop per prompt bucket) as
# StableHLO with `jax.export`, the weights beside them, the tokenizer and a manifest with every file's sha256.
# `fastserve.load_exported` runs them without fastserve's model code — the form a server or another process uses.
# Greedy decoding of the export gives the tokens the run folder gives.

# %%
EXPORT_DIR = os.path.join(WORK, "exports", "quickstart_lowrank")
manifest = fastserve.export(os.path.join(LOWRANK, "config.yaml"), EXPORT_DIR, f"export.platforms=[{PLATFORM}]",
                            *EXPORT)
print(len(manifest["functions"]), "functions:", ", ".join(sorted(manifest["functions"]))[:200])
print(f"{sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.2f} MB in {EXPORT_DIR}")

# %%
exported = fastserve.load_exported(EXPORT_DIR)
from_export = exported.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
from_run = fastserve.infer(os.path.join(LOWRANK, "config.yaml"), PROMPTS, f"generate.max_new_tokens={NEW_TOKENS}")
for prompt, a, b in zip(PROMPTS, from_export, from_run):
    print(f"{prompt!r}\n  export: {a!r}\n  run:    {b!r}")
