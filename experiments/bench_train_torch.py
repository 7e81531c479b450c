"""The PyTorch baseline of experiments/bench_train.py: an independent implementation of the same decoder, trained
the same way (same init scaling, AdamW with the same hyper-parameters, clipping and the very learning-rate schedule
fastserve's optimizer follows), eager or through `torch.compile`.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def build_torch_bench(model_cfg: dict, seq: int, batch: int, lr_at: Callable[[int], float], *, seed: int = 0,
                      compile: bool = False):
    """A bench object with `run(n) -> step times`, `peak()`, `losses`, `n_params`, `version`, `threads`."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    c = model_cfg
    d, h, L, V, ff = c["d_model"], c["n_heads"], c["n_layers"], c["vocab_size"], c["d_ff"]
    hd = d // h
    std = c.get("init_std", 0.02)

    class RMSNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["norm_eps"]) * self.scale

    def rope(x, cos, sin):  # x: [B, H, T, D], half-split layout like fastserve.models.layers.rope
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, h * hd, bias=False) for _ in range(4))
            self.gate, self.up = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
            self.down = nn.Linear(ff, d, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            y = self.attn_norm(x)
            q = rope(self.q(y).view(b, t, h, hd).transpose(1, 2), cos, sin)
            k = rope(self.k(y).view(b, t, h, hd).transpose(1, 2), cos, sin)
            v = self.v(y).view(b, t, h, hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, h * hd))
            y = self.mlp_norm(x)
            return x + self.down(F.silu(self.gate(y)) * self.up(y))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, d)
            self.layers = nn.ModuleList(Block() for _ in range(L))
            self.final_norm = RMSNorm(d)
            # fastserve's init: normal(init_std) everywhere, the residual projections (o, down) scaled by 1/sqrt(2L)
            for name, p in self.named_parameters():
                if p.ndim == 2:
                    scaled = name.endswith(".o.weight") or name.endswith(".down.weight")
                    nn.init.normal_(p, std=std / (2 * L) ** 0.5 if scaled else std)
            inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            ang = torch.arange(seq, dtype=torch.float32)[:, None] * inv
            self.register_buffer("cos", ang.cos(), persistent=False)
            self.register_buffer("sin", ang.sin(), persistent=False)

        def forward(self, tokens):
            x = self.embed(tokens)
            for layer in self.layers:
                x = layer(x, self.cos, self.sin)
            return self.final_norm(x) @ self.embed.weight.T  # tied embeddings

    model = Decoder()
    forward = torch.compile(model) if compile else model
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr_at(0), betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (batch, seq + 1), generator=g)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    class TorchBench:
        def __init__(self):
            self.losses: list[float] = []
            self.n_params = sum(p.numel() for p in model.parameters())
            self.version = torch.__version__
            self.threads = torch.get_num_threads()

        def run(self, n: int) -> list[float]:
            times = []
            for _ in range(n):
                t = time.perf_counter()
                for group in opt.param_groups:  # fastserve's schedule, step by step
                    group["lr"] = lr_at(len(self.losses))
                opt.zero_grad(set_to_none=True)
                logits = forward(inputs)
                loss = F.cross_entropy(logits.view(-1, V), targets.view(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                self.losses.append(loss.item())
                times.append(time.perf_counter() - t)
            return times

        def peak(self, n: int = 2048, repeats: int = 5) -> float:
            a, b = torch.ones(n, n), torch.ones(n, n)
            torch.matmul(a, b)
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                torch.matmul(a, b)
                ts.append(time.perf_counter() - t)
            return 2 * n ** 3 / statistics.median(ts)

    return TorchBench()
