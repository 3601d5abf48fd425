"""tinylab/model/decoder.py: the language decoder is transformers' answer where it is a module of the
model holding others, else the whole model; its own layers are the stack nearest the top."""

from testkit import arch_model, seeded_model

from tinylab.model.decoder import language_decoder, layer_numbers, layer_offsets, nearest_stacks, stack_of


def test_the_language_decoder_is_get_decoders_answer_unless_that_is_a_single_map():
    llama, _ = arch_model("llama")
    assert language_decoder(llama) == ("model", llama.model)
    gpt2, _ = arch_model("gpt2")
    assert language_decoder(gpt2) == ("transformer", gpt2.transformer)
    modernbert, _ = arch_model("modernbert_decoder")  # get_decoder() answers its LM head, a Linear
    assert type(modernbert.get_decoder()).__name__ == "Linear"
    assert language_decoder(modernbert) == ("", modernbert)

    class NoAnswer(type(llama)):
        def get_decoder(self):
            raise NotImplementedError

    llama.__class__ = NoAnswer
    assert language_decoder(llama) == ("", llama)


def test_the_decoders_own_layers_are_the_stack_nearest_the_top():
    names = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.tower.encoder.layers.0.fc1", "lm_head"]
    assert stack_of(names[0]) == "model.layers" and stack_of("lm_head") is None
    assert nearest_stacks(names) == ["model.layers"]  # the tower's layer 0 shares a number: it gives way
    assert nearest_stacks(names[:2] + ["model.tower.encoder.layers.5.fc1"]) == ["model.layers",
                                                                                "model.tower.encoder.layers"]
    assert nearest_stacks(["m.H.layers.0.q", "m.L.layers.0.q"]) == ["m.H.layers", "m.L.layers"]  # same depth: both


def test_stacks_of_one_class_of_layer_at_one_depth_are_numbered_one_after_the_other():
    """HRM's L and H modules (2 layers each, both numbered from 0, run in turn) are layers 0-3 for the
    module plan, its layer choice and the head analyses alike; XLM's `attentions` and `ffns` (two
    classes: the parts of one layer) keep their index; so does a model with one stack."""
    import pytest
    import transformers as tr

    from tinylab.adapter.config import TinyLoRAConfig
    from tinylab.adapter.targets import plan_modules
    from tinylab.model.attention import attention_blocks

    hrm, tok = arch_model("hrm_text")
    assert layer_offsets(hrm) == {"model.L_module.layers": 0, "model.H_module.layers": 2}
    number = layer_numbers(hrm)
    assert [number(f"model.{s}_module.layers.{i}.mlp.up_proj") for s in "LH" for i in (0, 1)] == [0, 1, 2, 3]
    assert number("lm_head") is None
    plan = plan_modules(hrm, TinyLoRAConfig(targets=("q_proj", "down_proj")))
    assert [(m.layer, m.name) for m in plan if m.kind == "q_proj"] == [
        (b.layer, f"{b.name}.q_proj") for b in attention_blocks(hrm)]  # one numbering
    assert [m.layer for m in plan] == [0, 0, 1, 1, 2, 2, 3, 3]
    chosen = plan_modules(hrm, TinyLoRAConfig(targets=("q_proj",), layers=[3]))
    assert [m.name for m in chosen] == ["model.H_module.layers.1.self_attn.q_proj"]
    looped = seeded_model(tr.HrmTextConfig(**{**hrm.config.to_dict(), "num_layers_per_stack": None, "num_hidden_layers": 2,
                                              "H_cycles": 2}))
    assert looped.config.num_hidden_layers == 8  # its cache slots: 2 per stack x 2 H cycles x (1 L cycle + 1)
    with pytest.raises(ValueError, match=r"layers \[4\] are out of range: this model has layers 0\.\.3"):
        plan_modules(looped, TinyLoRAConfig(targets=("q_proj",), layers=[4]))  # not 0..7

    xlm = seeded_model(tr.XLMConfig(vocab_size=len(tok), emb_dim=32, n_layers=2, n_heads=4, causal=True))
    assert layer_offsets(xlm) == {}
    assert [(m.layer, m.name) for m in plan_modules(xlm, TinyLoRAConfig(targets=("q_lin", "lin2")))] == [
        (0, "transformer.attentions.0.q_lin"), (1, "transformer.attentions.1.q_lin"),
        (0, "transformer.ffns.0.lin2"), (1, "transformer.ffns.1.lin2")]  # model order: attentions, then ffns
    llama, _ = arch_model("llama")
    assert layer_offsets(llama) == {} and layer_numbers(llama)("model.layers.1.mlp.up_proj") == 1


def test_a_towers_layers_inside_the_decoder_are_not_adapted_or_split_into_heads():
    """A tower inside the decoder (Phi-4-multimodal's vision and audio encoders sit in its `model`),
    whose layers share the text layers' numbers: the plan and the head analyses take the text layers
    only, and a target naming only the tower's maps matches nothing."""
    import warnings

    import pytest
    import torch
    from torch import nn

    from tinylab.adapter.config import TinyLoRAConfig
    from tinylab.adapter.targets import plan_modules
    from tinylab.model.attention import attention_blocks

    model, _ = arch_model("llama")
    before = [(m.name, m.kind) for m in plan_modules(model, TinyLoRAConfig())]
    tower = nn.Module()
    tower.layers = nn.ModuleList([nn.Module() for _ in range(2)])
    for layer in tower.layers:
        layer.mlp = nn.Module()
        layer.mlp.fc1 = nn.Linear(8, 8)
        layer.self_attn = type(model.model.layers[0].self_attn)(model.config, layer_idx=0)
    model.model.vision = nn.Module()
    model.model.vision.encoder = tower
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "left frozen" warning about the tower's fc1 either
        assert [(m.name, m.kind) for m in plan_modules(model, TinyLoRAConfig())] == before
    assert [b.name for b in attention_blocks(model)] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with pytest.raises(ValueError, match=r"targets \['fc1'\] match no linear module"):
        plan_modules(model, TinyLoRAConfig(targets=("fc1",)))
    assert torch.is_tensor(model(torch.tensor([[1, 2, 3]])).logits)  # the tower never runs on text
