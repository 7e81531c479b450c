# %% [markdown]
# # Images and the Keras-like API: Fashion-MNIST
#
# Two ways to train on the same core. First the Keras-like face, `fs.models.Sequential` — the snippet fastserve
# promises to run exactly as written (`compile` / `fit` / `predict`): a 784-128-64-10 MLP. Then the convolutional
# recipe `configs/fashion_mnist_cnn.yaml`, the same kind of layer list written as YAML and trained by
# `python -m fastserve.train`, evaluated on the test images and exported.
#
# Data: Fashion-MNIST from the Debian package `dataset-fashion-mnist` (60,000 training and 10,000 test images of
# 28×28 clothing, 10 classes). **Runtime**: made for a Colab TPU runtime (v2-8 or v5e-1); on a CPU it trains on a
# slice of the images for a few steps (about a minute), on an accelerator the full recipe (test accuracy 0.916).

# %% [markdown]
# ## 1. Install
# Where fastserve is not importable: the repository, and Fashion-MNIST when this runtime can `apt-get`.

# %% [shared] install {"extra_apt": ["dataset-fashion-mnist"]}

# %% [markdown]
# ## 2. Devices and size

# %% [shared] devices

# %% [markdown]
# ## 3. Parameters and data
# `fs.datasets.fashion_mnist.load_data()` returns Keras-style arrays (uint8 images, int labels); the snippet's MLP
# wants flat pixels in [0, 1] and one-hot labels. The last 5,000 training images are the validation set (as in the
# recipe). Small: 2,000 training images for the snippet and 30 CNN steps of 32.

# %%
import numpy as np
import fastserve as fs

(x_all, y_all), (x_test_img, y_test_label) = fs.datasets.fashion_mnist.load_data()
N_TRAIN = 2000 if SIZE == "small" else 55000
CNN = (["train.steps=30", "train.eval_every=30", "checkpoint.every=30", "data.batch_size=32",
        "train.eval_batches=8", "optimizer.warmup_steps=5", "log.every=10", "log.tensorboard=false"]
       if SIZE == "small" else [])

flat = lambda a: a.reshape(len(a), 784).astype(np.float32) / 255.0
onehot = lambda a: np.eye(10, dtype=np.float32)[a]
x_train, y_train = flat(x_all[:N_TRAIN]), onehot(y_all[:N_TRAIN])
x_val, y_val = flat(x_all[-5000:]), onehot(y_all[-5000:])
x_test, y_test = flat(x_test_img), onehot(y_test_label)
print(x_train.shape, y_train.shape, x_val.shape, x_test.shape)

# %% [markdown]
# ## 4. The Sequential snippet, as written
# `fit` builds the same jitted train step as `fastserve.train`, data parallel over every device of this runtime,
# and prints a progress line per epoch; for a model without convolutions an epoch runs as one `lax.scan` on the
# device. With all 55,000 images the test accuracy is about 0.87 (experiments/results/bench_vision.md); the small
# run's 2,000 images give less.

# %%
model = fs.models.Sequential()
model.add(fs.layers.Dense(128, activation='relu', input_shape=(784,)))
model.add(fs.layers.Dense(64, activation='relu'))
model.add(fs.layers.Dense(10, activation='softmax'))
model.compile(optimizer='adam', loss='categorical_crossentropy', metrics=['accuracy'])
model.fit(x_train, y_train, batch_size=32, epochs=10, validation_data=(x_val, y_val))
predictions = model.predict(x_test)

# %%
model.summary()
accuracy = float((predictions.argmax(1) == y_test_label).mean())
print(f"test accuracy {accuracy:.4f} on {len(x_test):,} images")
assert accuracy > 0.5

# %% [markdown]
# `model.save(DIR)` writes an ordinary run folder (config and checksummed checkpoint), `fs.models.load_model(DIR)`
# reads it back, and `model.export(DIR)` writes `predict` as a StableHLO export that `fs.load_exported` runs without
# the model code.

# %%
MLP_DIR = os.path.join(WORK, "fashion_mlp")
model.save(MLP_DIR)
again = fs.models.load_model(MLP_DIR)
print("reloaded model predicts the same:", np.allclose(again.predict(x_test[:64]), predictions[:64], atol=1e-5))

# %% [markdown]
# ## 5. The CNN recipe
# `configs/fashion_mnist_cnn.yaml` is conv 32 → batch norm → relu → pool → conv 64 → … → softmax as a YAML layer
# list (the `sequential` family), trained by the core's trainer on `data.source: fashion_mnist` (standardized
# pixels, held-out validation). Batch-norm statistics are carried in the train state and checkpointed. The full
# recipe takes 6 epochs (2,580 steps) and reaches test accuracy 0.916.

# %%
import subprocess, sys
print(subprocess.run([sys.executable, "-m", "fastserve.data", "prepare", "fashion_mnist"], capture_output=True,
                     text=True, check=True).stdout)
RUN = os.path.join(WORK, "fashion_mnist_cnn")
result = fastserve.train(os.path.join(CONFIGS, "fashion_mnist_cnn.yaml"), *CNN, f"train.workdir={RUN}")
print("held-out (validation):", {k: round(v, 4) for k, v in result["eval"].items()})

# %%
test = fastserve.evaluate(os.path.join(RUN, "config.yaml"), "data.eval_split=test")
print("test:", {k: round(v, 4) if isinstance(v, float) else v for k, v in test.items()})

# %% [markdown]
# ## 6. Export the CNN and run it without the model code
# A classifier exports a `forward` function (batch-norm statistics included): images in, class probabilities out.
# The recipe standardizes pixels by the training images' mean and standard deviation, so the export gets them the
# same way.

# %%
PLATFORM = {"gpu": "cuda"}.get(BACKEND, BACKEND)
CNN_EXPORT = os.path.join(WORK, "exports", "fashion_mnist_cnn")
fastserve.export(os.path.join(RUN, "config.yaml"), CNN_EXPORT, f"export.platforms=[{PLATFORM}]")
cnn = fastserve.load_exported(CNN_EXPORT)
pixels = x_all[:20000].astype(np.float64) / 255.0   # the statistics data.normalize=standardize uses
images = ((x_test_img[:256].astype(np.float32) / 255.0 - pixels.mean()) / pixels.std())[..., None]
probs = np.asarray(cnn.forward(images))
print("exported CNN accuracy on 256 test images:", float((probs.argmax(-1) == y_test_label[:256]).mean()))
