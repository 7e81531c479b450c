"""What a serving engine accepts: its ServeConfig checked against the model (KV length, prompt buckets, scheduler,
slots), and each request checked against the resulting shapes. Every refusal is a ValueError naming the setting."""
from __future__ import annotations

from typing import Any, Sequence

from fastserve.config import ServeConfig
from fastserve.serve.active_rows import resolve_widths
from fastserve.serve.request import Request
from fastserve.serve.scheduler import SCHEDULERS


def check_config(cfg: ServeConfig, model_cfg: Any, iteration_cost: str, own_scheduler: bool) -> tuple[int, list[int]]:
    """Returns (KV positions per slot, the sorted prompt buckets that fit them). `own_scheduler`: the engine was
    given a scheduler, so cfg.scheduler is not used."""
    if iteration_cost not in ("measured", "profiled"):
        raise ValueError(f"serve.iteration_cost='{iteration_cost}': choose measured or profiled")
    if not own_scheduler and cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"serve.scheduler='{cfg.scheduler}': choose from {', '.join(SCHEDULERS)}")
    if cfg.mlfq_levels < 0:
        raise ValueError(f"serve.mlfq_levels={cfg.mlfq_levels}: must be >= 0 (0: as many as the longest job needs)")
    if cfg.slots < 1:
        raise ValueError(f"serve.slots={cfg.slots}: must be at least 1")
    if cfg.kv_cache_bytes < 0 or cfg.kv_block < 1 or not 0 <= cfg.kv_cache_memory_fraction <= 1:
        raise ValueError(f"serve.kv_cache_bytes={cfg.kv_cache_bytes} must be >= 0 (0: the slot layout), "
                         f"serve.kv_cache_memory_fraction={cfg.kv_cache_memory_fraction} in [0, 1] and "
                         f"serve.kv_block={cfg.kv_block} >= 1")
    if cfg.kv_cache_bytes and cfg.kv_cache_memory_fraction:
        raise ValueError("set serve.kv_cache_bytes or serve.kv_cache_memory_fraction, not both")
    if (cfg.kv_cache_bytes or cfg.kv_cache_memory_fraction) and cfg.prefix_cache and \
            cfg.prefix_cache_block != cfg.kv_block:
        raise ValueError(f"with paged KV a cached prefix block is copied into one KV block: serve.prefix_cache_block="
                         f"{cfg.prefix_cache_block} must equal serve.kv_block={cfg.kv_block}")
    resolve_widths(cfg.decode_widths, cfg.slots)    # ValueError naming serve.decode_widths
    max_len = cfg.max_cache_len or model_cfg.max_seq_len
    if not 0 < max_len <= model_cfg.max_seq_len:
        raise ValueError(f"serve.max_cache_len={cfg.max_cache_len} must be in (0, model.max_seq_len="
                         f"{model_cfg.max_seq_len}] (0: model.max_seq_len)")
    buckets = sorted({int(b) for b in cfg.buckets if 0 < b <= max_len})
    if not buckets:
        raise ValueError(f"serve.buckets={list(cfg.buckets)}: none fits max_cache_len={max_len}")
    return max_len, buckets


def check_request(req: Request, buckets: Sequence[int], max_len: int, max_new_tokens_limit: int, vocab: int) -> None:
    """A request an engine of these shapes can serve (`buckets` sorted; `max_len`: KV positions; vocab 0: any ids).
    A prompt longer than the largest bucket is served (chunked prefill) as long as it leaves the tokens room."""
    p, n = len(req.tokens), req.max_new_tokens
    if p == 0:
        raise ValueError("the prompt has no tokens")
    if p >= max_len:   # (longer than the largest bucket is fine: prefilled in chunks)
        raise ValueError(f"the prompt has {p} tokens; the KV cache holds {max_len} positions (serve.max_cache_len), "
                         f"so a prompt may have at most {max_len - 1} tokens")
    if n < 1:
        raise ValueError(f"max_new_tokens={n}: must be at least 1")
    if n > max_new_tokens_limit:
        raise ValueError(f"max_new_tokens={n} exceeds serve.max_new_tokens_limit={max_new_tokens_limit}")
    if p + n > max_len:
        raise ValueError(f"the prompt has {p} tokens; with max_new_tokens={n} that exceeds the KV cache's "
                         f"{max_len} positions (serve.max_cache_len)")
    if vocab and any(not 0 <= t < vocab for t in req.tokens):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    if req.temperature < 0 or req.top_k < 0 or not 0 < req.top_p <= 1:
        raise ValueError("sampling: temperature >= 0, top_k >= 0 and 0 < top_p <= 1 are required")
