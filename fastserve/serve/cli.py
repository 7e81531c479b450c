"""The command line and deployment entry points: `python -m fastserve.serve --config FILE [key=value ...]` and
`fastserve.deploy(config)`: load the model of `config.source`, compile the engine of `config.serve`, serve HTTP."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Sequence

from fastserve.config import Config
from fastserve.serve.engine import Engine
from fastserve.serve.server import Server


def model_name(cfg: Config) -> str:
    """The id under which the model is served: the work dir's or the weight file's name."""
    path = cfg.source.path or (cfg.train.workdir if cfg.source.kind == "checkpoint" else "")
    name = os.path.basename(os.path.normpath(path.split("/", 1)[-1] if path.startswith("package:") else path))
    for ext in (".gguf", ".safetensors"):
        name = name[:-len(ext)] if name.endswith(ext) else name
    if path.startswith("package:") and name in ("model", ""):   # a package's generic folder: the package's name
        name = path[len("package:"):].split("/", 1)[0]
    return name or "fastserve"


def serving_config(cfg: Config) -> Config:
    """`cfg` with `serve.mesh`'s axes in its `mesh:` section: a model trained on one mesh serves on another (e.g.
    `serve.mesh={tensor: 2}`: heads and MLP split over 2 devices, the KV pool sharded by the same rules)."""
    if not cfg.serve.mesh:
        return cfg
    return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **cfg.serve.mesh))


def serve(cfg: Config, block: bool = True) -> Server | None:
    """Loads `cfg.source`, compiles the engine of `cfg.serve`, and serves it (block=False: returns the running
    Server, whose `.url` and `.stop()` the caller uses). `cfg.transforms` are applied to loaded weights first.
    source.kind=exported serves an export directory's functions (its buckets and max_cache_len bound serve.buckets
    and serve.max_cache_len)."""
    from fastserve import parallel
    from flax import nnx

    from fastserve.generation.encoders import source_is_encoder
    from fastserve.generation.seq2seq_decode import is_seq2seq
    from fastserve.transforms.report import transformed
    from fastserve.workdir import load_model, resolve_path
    t0 = time.perf_counter()
    cfg = serving_config(cfg)
    parallel.enable_compilation_cache()  # a restarted server compiles its buckets from the on-disk cache
    if cfg.source.kind == "exported":   # the export's functions, weights and tokenizer instead of a model definition
        from fastserve.artifacts.loader import load_exported
        from fastserve.serve.backends import served_model
        if not cfg.source.path:
            raise ValueError("source.kind=exported needs source.path (a directory written by python -m "
                             "fastserve.export)")
        if cfg.transforms:
            raise ValueError("transforms: an export's weights are fixed; apply the transforms when exporting "
                             "(python -m fastserve.export with the same `transforms`), not when serving it")
        exp = load_exported(resolve_path(cfg.source.path))   # verifies the manifest and every file's sha256
        server = Server(Engine.from_exported(exp, cfg.serve), served_model(exp), cfg.serve, model_name(cfg))
    elif source_is_encoder(cfg):          # an encoder: POST /v1/embeddings (fastserve/serve/embeddings.py)
        from fastserve.generation.encoders import EncoderRunner
        from fastserve.serve.embeddings import EmbeddingServer
        runner = EncoderRunner(transformed(load_model(cfg), cfg), cfg.embed.batch_size, cfg.serve.buckets,
                               cfg.embed.max_len)
        server = EmbeddingServer(runner, cfg.serve, model_name(cfg))
    else:
        loaded = transformed(load_model(cfg), cfg)     # cfg.transforms (e.g. W8A8 quantization), in memory
        if is_seq2seq(nnx.merge(loaded.graphdef, loaded.params)):   # translation: POST /v1/completions per sentence
            from fastserve.serve.translations import TranslationServer, Translator
            from fastserve.translate import pair_tokenizer
            translator = Translator(loaded, pair_tokenizer(cfg), cfg.serve.slots)
            server = TranslationServer(translator, cfg.serve, model_name(cfg))
        else:
            server = Server(Engine.from_loaded(loaded, cfg.serve), loaded, cfg.serve, model_name(cfg))
            # the engine keeps the weights it serves (per layer; W8A8 ones repacked into the kernel's panels):
            # holding the loaded ones too while the server runs would keep a second copy alive
            del loaded
    if not block:
        return server.start()
    print(f"fastserve: '{server.model_name}' loaded and compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
          flush=True)
    server.run()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from fastserve import cli
    from fastserve.core.checkpoint import CheckpointError
    cfg = cli.parse(argv, "Serve a model over an OpenAI-compatible HTTP API (POST /v1/completions, "
                    "/v1/chat/completions; POST /v1/embeddings for encoders).")
    try:
        serve(cfg, block=True)
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
