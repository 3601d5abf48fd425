"""What several test files share: toy tasks, planted adapters, and the adapter-file fuzzing harness.

One module, imported by name (`from testkit import WordTask`): pytest puts `tests/` on the path.
"""

from __future__ import annotations

import json
import math
import random
import struct
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tinylab.adapter.attach import apply_tinylora, find_adapter
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.file_format import AdapterFileError, load_adapter, read_adapter, save_adapter
from tinylab.model.tiny import tiny_model
from tinylab.tasks.base import Example as TaskExample

# ---------------------------------------------------------------------------------------------
# The linear maps of a model's blocks, found without tinylab's own module selection


def block_linear_names(model, layer: int | None = None) -> list[str]:
    """Names of the `nn.Linear` and transformers `Conv1D` maps inside the numbered blocks
    (`model.layers.<i>.`, GPT-2's `transformer.h.<i>.`), in model order; `layer`: only that block's."""
    import re

    block = re.compile(r"\.(?:layers|h)\.(\d+)\.")
    found = []
    for name, module in model.named_modules():
        is_map = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        match = block.search(name)
        if is_map and match and (layer is None or int(match.group(1)) == layer):
            found.append(name)
    return found


OTHER_ARCHS = ("bloom", "falcon", "falcon_mha", "falcon_new", "falcon_alibi", "gpt_bigcode", "gpt_bigcode_mha",
               "gpt_neo_window_8", "phi", "mpt", "codegen", "qwen3_next", "minicpm5_moe", "modernbert_decoder", "openai_gpt",
               "ctrl", "hrm_text")
"""Tiny random architectures beyond `TINY_ARCHS`, for the tests of what they lay out differently."""
HYBRID_ARCHS = ("qwen3_next_hybrid", "mamba")
"""Tiny random models whose cache holds a recurrent state transformers cannot copy per row: Qwen3-Next
with a linear-attention (gated delta) layer before its full-attention layer, and Mamba (state-space
layers only)."""
MIXED_NORM_ARCH = "olmo2"
"""A tiny random architecture (`other_arch`) whose q_norm and k_norm normalize all heads together."""
UNSPLIT_ARCH = "deepseek_v2"
"""A tiny random architecture (`other_arch`) whose attention tinylab does not split into heads: DeepSeek-V2's
multi-head latent attention (keys and values from one shared low-rank projection)."""


def other_arch(name: str, tok):
    """A tiny random model of `OTHER_ARCHS` (2 layers, hidden 64, 4 heads) for the tokenizer `tok`:
    ALiBi from the mask (BLOOM, Falcon alibi=True), local windows (GPT-Neo, 8 tokens), fused q/k/v
    maps of other layouts (Falcon: multi-query, one head per group, 2 KV groups; GPTBigCode with and
    without multi-query; MPT's Wqkv; GPT-1's c_attn, whose block returns a list; CodeGen's qkv_proj
    in 4 shards of q, v, k, here 8 heads so that a shard holds two), q/k/v with a `dense` output
    (Phi) or a `Wo` output (ModernBERT's decoder, a local window of 8 tokens in its first layer; CTRL's
    Wq, Wk, Wv and dense, whose forward scales the embeddings' output in place), two stacks of layers
    at the same depth, both numbered from 0, that run in turn (HRM's L and H modules, 2 layers each, one
    cycle: each layer runs once), and
    a q_proj that also holds a per-head output gate (Qwen3-Next, both layers full attention,
    mixture-of-experts MLPs; MiniCPM5's q_gate_proj). `HYBRID_ARCHS` and the single-purpose models
    named beside it (`MIXED_NORM_ARCH`, `UNSPLIT_ARCH`) are built here too."""
    import transformers as tr

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vocab = len(tok)
    falcon = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **ids)
    bigcode = dict(vocab_size=vocab, n_positions=512, n_embd=64, n_layer=2, n_head=4, n_inner=128, **ids)
    config = {
        "bloom": lambda: tr.BloomConfig(vocab_size=vocab, hidden_size=64, n_layer=2, n_head=4, **ids),
        "falcon": lambda: tr.FalconConfig(**falcon),  # multi-query
        "falcon_mha": lambda: tr.FalconConfig(**falcon, multi_query=False),
        "falcon_new": lambda: tr.FalconConfig(**falcon, new_decoder_architecture=True, num_kv_heads=2),
        "falcon_alibi": lambda: tr.FalconConfig(**falcon, multi_query=False, alibi=True),
        "gpt_bigcode": lambda: tr.GPTBigCodeConfig(**bigcode, multi_query=True),
        "gpt_bigcode_mha": lambda: tr.GPTBigCodeConfig(**bigcode, multi_query=False),
        "gpt_neo_window_8": lambda: tr.GPTNeoConfig(
            vocab_size=vocab, max_position_embeddings=512, hidden_size=64, num_layers=2, num_heads=4,
            attention_types=[[["global", "local"], 1]], intermediate_size=128, window_size=8, **ids),
        "phi": lambda: tr.PhiConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=512, **ids),
        "mpt": lambda: tr.MptConfig(vocab_size=vocab, d_model=64, n_heads=4, n_layers=2, max_seq_len=512,
                                    expansion_ratio=2, **ids),
        "olmo2": lambda: tr.Olmo2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **ids),
        "deepseek_v2": lambda: tr.DeepseekV2Config(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
            q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8, first_k_dense_replace=1, **ids),
        "qwen3_next": lambda: tr.Qwen3NextConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, layer_types=["full_attention"] * 2, max_position_embeddings=512, **ids),
        "minicpm5_moe": lambda: tr.MiniCPM5MoeConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            first_k_dense_replace=1, max_position_embeddings=512, **ids),
        "modernbert_decoder": lambda: tr.ModernBertDecoderConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, local_attention=8, layer_types=["sliding_attention", "full_attention"],
            **ids),
        "openai_gpt": lambda: tr.OpenAIGPTConfig(vocab_size=vocab, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                                                 **ids),
        "hrm_text": lambda: tr.HrmTextConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
            num_hidden_layers=2, H_cycles=1, L_cycles=1, max_position_embeddings=512, **ids),  # 2 per stack, each run once
        "ctrl": lambda: tr.CTRLConfig(vocab_size=vocab, n_positions=512, n_embd=64, dff=128, n_layer=2, n_head=4, **ids),
        "qwen3_next_hybrid": lambda: tr.Qwen3NextConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"],
            linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
            max_position_embeddings=512, **ids),
        "mamba": lambda: tr.MambaConfig(vocab_size=vocab, hidden_size=64, state_size=8, num_hidden_layers=2,
                                        expand=2, conv_kernel=4, **ids),
        "codegen": lambda: tr.CodeGenConfig(vocab_size=vocab, n_positions=512, n_ctx=512, n_embd=64, n_layer=2,
                                            n_head=8, rotary_dim=4, n_inner=128, **ids),
    }[name]()
    return seeded_model(config)


def seeded_model(config):
    """A causal LM of `config` with weights from seed 0, in eval mode; the global RNG is left alone."""
    import transformers as tr

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tr.AutoModelForCausalLM.from_config(config).eval()


def observe_layer(model, blocks, ids, layer: int):
    """(attention patterns [H, T, T], head outputs [T, H, d]) of `layer` for the first row of `ids`, in
    one forward with eager attention (tinylab.model.attention's own hooks)."""
    from tinylab.model.attention import eager_attention, observe_heads

    with torch.no_grad(), eager_attention(model), observe_heads(blocks) as (patterns, outputs):
        model(input_ids=ids)
    return patterns[layer][0], outputs[layer][0]


def arch_model(name: str):
    """(model, tokenizer) of a tiny architecture: `TINY_ARCHS` through `tiny_model(name)`, `OTHER_ARCHS`
    through `other_arch`, both with the embedded model's tokenizer."""
    from tinylab.model.tiny import TINY_ARCHS

    if name in TINY_ARCHS:
        return tiny_model(name, seed=0)
    tokenizer = tiny_model()[1]
    return other_arch(name, tokenizer), tokenizer


# ---------------------------------------------------------------------------------------------
# Toy tasks (the Task protocol, on a tiny model)


class Example(NamedTuple):
    prompt: object
    answer: str
    solution: str | None = None


class Score(NamedTuple):
    formatted: bool
    correct_strict: bool
    correct_flexible: bool
    extracted: str | None


class WordTask:
    """Follows the Task protocol; rewards the number of distinct characters (always some spread)."""

    name = "toy"
    max_new_tokens = 6
    WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "peach"]

    def __init__(self, nan_on_call: int | None = None):
        self.calls = 0
        self.nan_on_call = nan_on_call

    def examples(self, split, n, seed):
        words = self.WORDS[:6] if split == "train" else self.WORDS[6:]
        rng = random.Random(seed)
        words = rng.sample(words, len(words))[:n]  # n=None: all
        return [Example([{"role": "user", "content": f"Say {w}."}], w, f"{w}.") for w in words]

    def reward(self, completions, answers, **kwargs):
        self.calls += 1
        if self.calls == self.nan_on_call:
            return [math.nan] * len(completions)
        return [len(set(c)) / 10 for c in completions]

    def score(self, completion, answer):
        first = completion.strip().split("\n")[0] if completion.strip() else ""
        return Score(bool(first), first == answer, answer in completion, first or None)


class NumberTask:
    """A tiny task following the Task protocol; its reward varies between samples (reply length)."""

    name = "toy"
    max_new_tokens = 6

    def examples(self, split="train", n=None, seed=0):
        n = 8 if n is None else n
        return [TaskExample([{"role": "user", "content": f"Say the number {i}."}], str(i), f"The number is {i}.")
                for i in range(n)]

    def reward(self, completions, answers=None, **kwargs):
        return [float(len(c) % 5) for c in completions]


DISTINCT_TASK_SOURCE = '''
from tinylab.tasks import Example, Score


class Distinct:
    """Reward: distinct characters in the reply / 10 (some spread in every group)."""

    name = "distinct"
    max_new_tokens = 4

    def examples(self, split, n, seed):
        words = ["apple", "pear", "plum", "fig", "kiwi", "lime"]
        return [Example([{"role": "user", "content": f"Say {w}."}], w, f"{w}.") for w in words][:n]

    def reward(self, completions, answers, **kwargs):
        return [len(set(c)) / 10 for c in completions]

    def score(self, completion, answer):
        return Score(bool(completion), completion == answer, answer in completion, completion or None)
'''


# ---------------------------------------------------------------------------------------------
# Planted adapters: updates placed where the tests know they are


CHAT_AND_RAW_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi"}],
    "a raw prompt with no chat template around it",
]
"""Prompts of different lengths: two chat conversations and a raw string (no chat template)."""
EXAMPLES = [TaskExample([{"role": "user", "content": f"What is {i} + {i + 1}?"}], str(2 * i + 1)) for i in range(3)]
EXAMPLES += [TaskExample("Once upon a time", " there was")]
PLANTED = (1, 2)  # layer, head
KEY = 1  # the one number that acts


def planted_knobs(dtype=torch.float32):
    """u=3 tied over all 14 modules; every update is zero except q_proj rows of layer 1, head 2, which
    only number 1 reaches (its P slices for numbers 0 and 2 are zero). Numbers 0 and 2 are non-zero
    but act on nothing."""
    model, tokenizer = tiny_model("llama", seed=0, dtype=dtype)
    adapter = apply_tinylora(model, u=3, n_tie="all")
    layer, head = PLANTED
    name = f"model.layers.{layer}.self_attn.q_proj"
    d = model.model.layers[layer].self_attn.head_dim
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module_name, m in adapter.named_modules():
            m.U.zero_()
            if module_name == name:
                m.U[head * d:(head + 1) * d] = torch.randn(d, m.U.shape[1], generator=g).to(m.U.dtype)  # (d, r)
                m.P.zero_()
                m.P[KEY] = torch.eye(m.U.shape[1])  # (r, r): R = v_1 I
    adapter.set_vector([0.7, 6.0, -0.4])
    return model, tokenizer, adapter


def planted_head(arch="llama", kind="q_proj", layer=1, slot=2, scale=6.0, dtype=torch.float32):
    """A tiny model whose only non-zero update is on the rows of one head (q) or KV group (k, v) of one layer."""
    model, tokenizer = tiny_model(arch, seed=0, dtype=dtype)
    adapter = apply_tinylora(model, n_tie=1, u=1)
    m = dict(adapter.named_modules())[f"model.layers.{layer}.self_attn.{kind}"]
    d = model.model.layers[layer].self_attn.head_dim
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.U.zero_()
        m.U[slot * d:(slot + 1) * d] = torch.randn(d, m.U.shape[1], generator=g)  # (d, r) only this head's rows
        m.P.copy_(torch.eye(m.U.shape[1])[None])  # (1, r, r): R = v * I
        m.v.fill_(scale)
    assert (adapter.vector() != 0).sum() == 1
    return model, tokenizer, adapter


# ---------------------------------------------------------------------------------------------
# Fuzzing the adapter-file loader (tests/adapter/test_file_format_fuzz*.py)


BUDGET = {
    "truncated": 700,  # every cut point of the 6 valid files: exhaustive
    "wrong_length": 1000,
    "huge_sizes": 1100,
    "nan_inf": 1000,
    "dtype_version": 600,
    "random_bytes": 1000,
    "random_bytes_after_magic": 1200,
    "random_json_header": 1500,
    "deep_json": 200,
    "mutated": 1500,
    "load_foreign_fingerprint": 150,
    "load_random_config": 400,
    "load_mutated": 300,
}
PARSE_PEAK_BYTES = 16 << 20  # a file is at most 1 MiB; parsing may copy it a few times
LOAD_PEAK_BYTES = 96 << 20  # the loader allows at most 64 MiB of projections P, plus slack
TIME_LIMIT_S = 1.0  # CPU seconds of the calling thread per input
HANG_LIMIT_S = 10.0  # wall seconds per input

COUNTS: Counter = Counter()  # inputs run per strategy in this session
LOADED: Counter = Counter()  # of which loaded (the rest raised AdapterFileError)
SLOWEST: dict[str, float] = defaultdict(float)  # CPU seconds of the slowest input
PEAK: dict[str, int] = defaultdict(int)

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,  # the loader call alone is timed, in measured
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ---------------------------------------------------------------------------------------------
# Measuring one call


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> int:
    """Set VmHWM (peak RSS) to the current RSS; return the RSS in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kb("VmRSS")


class measured:
    """Count one input; on exit assert the body took < 1 CPU second and raised peak RSS by < `limit` bytes
    (the message names every bound it broke)."""

    def __init__(self, strategy: str, limit: int):
        self.strategy, self.limit = strategy, limit

    def __enter__(self):
        self.rss = reset_peak()
        self.start, self.cpu_start = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc):
        elapsed = time.thread_time() - self.cpu_start
        wall = time.perf_counter() - self.start
        grown = (status_kb("VmHWM") - self.rss) * 1024
        COUNTS[self.strategy] += 1
        SLOWEST[self.strategy] = max(SLOWEST[self.strategy], elapsed)
        PEAK[self.strategy] = max(PEAK[self.strategy], grown)
        broken = [  # every bound the input broke, so one bound's check never hides another's
            f"took {elapsed:.3f} s of CPU time" if elapsed >= TIME_LIMIT_S else "",
            f"took {wall:.1f} s" if wall >= HANG_LIMIT_S else "",
            f"raised peak memory by {grown / 2**20:.1f} MiB" if grown >= self.limit else "",
        ]
        assert not any(broken), f"{self.strategy}: one input " + "; ".join(b for b in broken if b)
        return False


def parse_file(blob: bytes, path: Path, strategy: str):
    """read_adapter on `blob`: (config, header, values), checked against the bytes, or the AdapterFileError."""
    path.write_bytes(blob)
    with measured(strategy, PARSE_PEAK_BYTES):
        try:
            result = read_adapter(path)
        except AdapterFileError as err:
            return err
    LOADED[strategy] += 1
    config, header, values = result
    assert isinstance(config, TinyLoRAConfig) and set(header) == {"n", "cfg", "arch", "fp"}
    assert values.dtype == torch.float32 and values.shape == (header["n"],) and torch.isfinite(values).all()
    assert header["n"] % config.u == 0
    (header_len,) = struct.unpack("<H", blob[6:8])
    assert len(blob) == 8 + header_len + header["n"] * (4 if blob[5] == 0 else 2)
    return result


def load_file(model, blob: bytes, path: Path, strategy: str):
    """load_adapter on `blob`: a success gives exactly the file's vector, a refusal attaches nothing."""
    path.write_bytes(blob)
    with measured(strategy, LOAD_PEAK_BYTES):
        try:
            adapter = load_adapter(model, path)
        except AdapterFileError as err:
            assert not find_adapter(model), "a refused file left an adapter attached"
            return err
    LOADED[strategy] += 1
    try:
        config, header, values = read_adapter(path)
        assert adapter.config == config and adapter.num_params == header["n"]
        assert torch.equal(adapter.vector(), values)
    finally:
        adapter.remove()
    return adapter


def fuzz(strategy: str, test, *args) -> None:
    """Run the hypothesis `test` for BUDGET[strategy] inputs and check that they all ran."""
    before = COUNTS[strategy]
    settings(FUZZ, max_examples=BUDGET[strategy])(test)(*args)
    ran = COUNTS[strategy] - before
    assert ran >= BUDGET[strategy], f"{strategy}: ran {ran} < {BUDGET[strategy]} inputs"
    print(f"\n{strategy:26s} {ran:6d} inputs, {LOADED[strategy]:5d} loaded, "
          f"slowest {SLOWEST[strategy] * 1e3:7.2f} ms CPU, peak +{PEAK[strategy] / 2**20:5.1f} MiB")


# ---------------------------------------------------------------------------------------------
# Valid files to start from


def blob_of(header, payload: bytes, *, dtype: int = 0, version: int = 1) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return b"TLRA" + struct.pack("<BBH", version, dtype, len(h)) + h + payload


def split_blob(blob: bytes) -> tuple[dict, bytes]:
    (header_len,) = struct.unpack("<H", blob[6:8])
    return json.loads(blob[8 : 8 + header_len]), blob[8 + header_len :]


CONFIGS = [
    (TinyLoRAConfig(u=13, n_tie="all"), "fp32"),
    (TinyLoRAConfig(u=13, n_tie="all"), "bf16"),
    (TinyLoRAConfig(), "fp32"),
    (TinyLoRAConfig(u=2, n_tie=2, tie="structured"), "bf16"),
    (TinyLoRAConfig(r=4, u=3, layers=(1,), targets=("q_proj", "v_proj")), "fp32"),
    (TinyLoRAConfig(u=1, n_tie=7, svd="lowrank", seed=5), "fp32"),
]


def make_corpus(tiny, folder: Path) -> list[bytes]:
    """Valid files for the tiny llama (seed 0): fp32 and bf16, tied and untied, both tying styles."""
    blobs = []
    for i, (config, dtype) in enumerate(CONFIGS):
        adapter = apply_tinylora(tiny, config)
        adapter.set_vector(torch.randn(adapter.num_params, generator=torch.Generator().manual_seed(i)))
        blobs.append(save_adapter(adapter, folder / f"{i}.tlra", dtype=dtype).read_bytes())
        adapter.remove()
    return blobs


@st.composite
def mutated(draw, corpus):
    """A valid file with 1-8 random bit flips, byte overwrites, insertions or deletions."""
    blob = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = draw(st.integers(0, max(0, len(blob) - 1)))
        if op == "insert":
            blob[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif not blob:
            continue
        elif op == "flip":
            blob[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            blob[i] = draw(st.integers(0, 255))
        else:
            del blob[i : i + draw(st.integers(1, 4))]
    return bytes(blob)
