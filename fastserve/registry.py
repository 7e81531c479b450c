"""Every model family, task and data source, by the name a config selects it with.

Each entry points (lazily, as "module:ConfigClass") at the config dataclass of that family / task / source; the
dataclass builds the rest (`build()` for models and tasks, `load()` for data), so adding a family is its own files
plus one line here, and nothing in the core. Lazy so that reading a config does not import JAX.
"""
from __future__ import annotations

import importlib

MODELS: dict[str, str] = {
    "decoder": "fastserve.models.decoder:DecoderConfig",
    "seq2seq": "fastserve.models.seq2seq:Seq2SeqConfig",
    "cnn": "fastserve.models.cnn:CNNConfig",
    "resnet": "fastserve.models.resnet:ResNetConfig",
    "encoder": "fastserve.models.encoder:EncoderConfig",
    "sequential": "fastserve.models.sequential:SequentialConfig",
    "ensemble": "fastserve.fusion.model:EnsembleConfig",     # N models averaged (python -m fastserve.fuse --ensemble)
}

TASKS: dict[str, str] = {
    "lm": "fastserve.tasks.lm:LMConfig",
    "distill": "fastserve.tasks.distill:DistillConfig",
    "classify": "fastserve.tasks.classify:ClassifyConfig",
    "mlm": "fastserve.tasks.mlm:MLMConfig",
    "tag": "fastserve.tasks.tag:TagConfig",
    "seq2seq": "fastserve.tasks.seq2seq:Seq2SeqTaskConfig",
    "keras_loss": "fastserve.tasks.keras_loss:KerasLossConfig",
}

DATA_SOURCES: dict[str, str] = {
    "pydoc": "fastserve.data.text:TextDataConfig",
    "text": "fastserve.data.text:TextDataConfig",
    "synthetic_pairs": "fastserve.data.synthetic_pairs:SyntheticPairsConfig",
    "bible_pairs": "fastserve.data.bible_pairs:BiblePairsConfig",
    "synthetic_images": "fastserve.data.images:SyntheticImagesConfig",
    "synthetic_classes": "fastserve.data.synthetic_text:SyntheticClassesConfig",
    "arrays": "fastserve.data.arrays:ArraysDataConfig",
    "mlm_text": "fastserve.data.mlm_text:MLMTextConfig",
    "strongs": "fastserve.data.strongs:StrongsDataConfig",
    "reviews": "fastserve.data.reviews:ReviewsDataConfig",
    "fashion_mnist": "fastserve.data.vision:FashionMNISTConfig",
    "digits": "fastserve.data.vision:DigitsConfig",
}

KINDS = {"model": MODELS, "task": TASKS, "data": DATA_SOURCES}

# The Keras-style face (fastserve/keras/) under the names Keras users look for (`fs.models.Sequential`,
# `fs.models.load_model`): `fastserve.models` resolves them from here, lazily, because the face trains on the core,
# which builds models from `fastserve.models` (a direct import there would be a cycle).
KERAS_FACE: dict[str, str] = {
    "Sequential": "fastserve.keras.model:Sequential",
    "load_model": "fastserve.keras.model:load_model",
}


def resolve(ref: str) -> type:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
