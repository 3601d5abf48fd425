"""Module selection (tinylab.adapter.targets): one answer for the adapter, the planner, importance, the widget and the CLI.

On every tiny architecture (fused maps in phi3 and GPT-NeoX, other names in OPT), what a budget
plan promises is what attaching its config gives, and every other reader counts the same modules.
"""

import warnings

import pytest
from testkit import arch_model as other_model
from testkit import block_linear_names

from tinylab.adapter.attach import apply_tinylora
from tinylab.adapter.config import DEFAULT_TARGETS, TinyLoRAConfig
from tinylab.adapter.planner import lora_xs_size, plan_budget
from tinylab.adapter.targets import count_params, kind_order, module_kinds, plan_modules, roles
from tinylab.model.tiny import TINY_ARCHS, tiny_model

BUDGETS = (1, 2, 3, 5, 7, 13, 16)


@pytest.fixture(scope="module", params=TINY_ARCHS)
def arch_model(request):
    model, tok = tiny_model(request.param, seed=0)
    return request.param, model, tok


def _attach(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default targets leave no in-block map of a tiny model out
        return apply_tinylora(model, config)


def _scores(model):
    """A score per adapted module that varies with layer and kind, so `top` and `proportional` pick unevenly."""
    return {(m.layer, m.kind): 1.0 + 3.0 * m.layer + (i % 5) for i, m in enumerate(plan_modules(model, TinyLoRAConfig()))}


@pytest.mark.parametrize("strategy", ["tiled", "top", "proportional"])
def test_a_plan_promises_what_attaching_gives(arch_model, strategy):
    arch, model, _ = arch_model
    importance = None if strategy == "tiled" else _scores(model)
    for n in BUDGETS + (lora_xs_size(model),):
        plan = plan_budget(model, n, importance=importance, strategy=strategy)
        adapter = _attach(model, plan.config)
        try:
            assert plan.achieved == adapter.num_params == count_params(model, plan.config), (arch, n)
            assert plan.modules == tuple(m.name for m in adapter.modules)
            assert [list(g) for g in plan.groups] == list(adapter.groups().values())
        finally:
            adapter.remove()
        if strategy == "tiled":
            assert plan.exact, (arch, n, plan.reason)


def test_phi3_plan_of_four_attaches_four():
    """Reported: the planner matched the literal Llama names, found only o_proj and down_proj on
    phi3 (4 modules), promised 4 numbers, and the config then adapted all 8 maps: 8 numbers."""
    model, _ = tiny_model("phi3")
    plan = plan_budget(model, 4)
    adapter = _attach(model, plan.config)
    assert plan.achieved == adapter.num_params == 4
    assert {m.kind for m in adapter.modules} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_lora_xs_size_counts_the_adapted_modules(arch_model):
    _, model, _ = arch_model
    adapter = _attach(model, TinyLoRAConfig())
    try:
        for r in (1, 2, 3):
            assert lora_xs_size(model, r) == len(adapter.modules) * r * r
    finally:
        adapter.remove()


def test_every_block_linear_has_a_role_and_the_kinds_sort_by_role(arch_model):
    _, model, _ = arch_model
    modules = plan_modules(model, TinyLoRAConfig())
    assert [m.name for m in modules] == block_linear_names(model)
    played = [role for kind in kind_order(m.kind for m in modules) for role in roles(kind)]
    assert sorted(set(played), key=DEFAULT_TARGETS.index) == played  # q, k, v, o, gate, up, down order
    assert set(played) >= {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("arch", ["modernbert_decoder", "minicpm5_moe", "openai_gpt", "ctrl"])
def test_other_names_for_the_seven_maps_are_adapted_by_default(arch):
    """ModernBERT's attn.Wo, Wi (gate and up in one map) and mlp.Wo, MiniCPM5's q_gate_proj (queries
    and output gates), GPT-1's Conv1D maps and CTRL's Wq, Wk, Wv, dense and numbered ffn.0 and ffn.2
    play their roles: the default targets adapt every in-block map, with no warning."""
    model, _ = other_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modules = plan_modules(model, TinyLoRAConfig())
    assert [m.name for m in modules] == block_linear_names(model)
    played = {role for m in modules for role in roles(m.kind)}
    assert played >= {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    _attach(model, TinyLoRAConfig())


def test_a_vision_language_model_adapts_its_language_model_only():
    """Gemma 3 with its vision tower: the plan takes the language model's 2 layers x 7 maps, not the
    tower's attention and MLP maps (whose layers reuse the same numbers), the same decoder the head
    analyses split; attaching adapts those 14 and the tower stays as it was."""
    import torch
    import transformers as tr
    from testkit import seeded_model

    from tinylab.model.attention import attention_blocks

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, vocab_size=128, max_position_embeddings=64, sliding_window=64,
                layer_types=["sliding_attention"] * 2)
    model = seeded_model(tr.Gemma3Config(text_config=text, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=28, patch_size=14)))
    modules = plan_modules(model, TinyLoRAConfig())
    assert len(modules) == 14 and all(".language_model." in m.name for m in modules)
    assert len({(m.layer, m.kind) for m in modules}) == 14
    assert {b.name.rsplit(".", 1)[0] for b in attention_blocks(model)} == {
        m.name.rsplit(".", 2)[0] for m in modules if m.kind == "q_proj"}
    tower = {n: p.detach().clone() for n, p in model.named_parameters() if "vision" in n}
    adapter = _attach(model, TinyLoRAConfig())
    assert len(list(adapter.parameters())) == 14 and adapter.num_params == 14  # default u=1, one vector per map
    assert all(torch.equal(p, tower[n]) for n, p in model.named_parameters() if n in tower)


def test_a_bart_style_decoder_adapts_its_self_attention_and_leaves_cross_attention_frozen():
    """BART as a causal LM: each layer has self_attn and encoder_attn maps of the same names, so their
    kinds are `self_attn.q_proj`, ...: the default targets adapt the self-attention's q, k, v and
    out_proj and fc1/fc2, and warn that the cross-attention maps (never run on text) stay frozen."""
    import transformers as tr
    from testkit import seeded_model

    model = seeded_model(tr.BartConfig(vocab_size=128, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                       decoder_ffn_dim=64, encoder_layers=1, encoder_attention_heads=4,
                                       encoder_ffn_dim=64, max_position_embeddings=64))
    with pytest.warns(UserWarning, match="encoder_attn.k_proj"):
        modules = plan_modules(model, TinyLoRAConfig())
    kinds = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]
    assert sorted((m.layer, m.kind) for m in modules) == sorted((i, k) for i in (0, 1) for k in kinds)
    assert {role for m in modules for role in roles(m.kind)} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}


def test_fused_roles_and_order():
    assert roles("qkv_proj") == ("q_proj", "k_proj", "v_proj")
    assert roles("gate_up_proj") == ("gate_proj", "up_proj")
    assert roles("router") == ()
    assert kind_order(["down_proj", "router", "gate_up_proj", "o_proj", "qkv_proj"]) == [
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj", "router"]


@pytest.mark.parametrize("arch", TINY_ARCHS)  # OPT feeds fc1/fc2 flattened (batch*time, features)
def test_weight_importance_scores_the_adapted_modules(arch):
    from tinylab.analysis.importance import weight_importance
    from tinylab.tasks.synthetic import ArithmeticTask

    model, tok = tiny_model(arch, seed=0)
    wi = weight_importance(model, tok, ArithmeticTask(), n_prompts=2, objective="sft")
    planned = [(m.layer, m.kind) for m in plan_modules(model, TinyLoRAConfig())]
    assert list(wi.table.index) == planned
    assert (wi.table.taylor > 0).all()  # every map's hooks ran: each has a score
    heads = wi.heads.taylor
    assert len(heads) > 0 and (heads > 0).all()  # the attention maps, split per head


def test_budget_widget_and_cli_count_the_adapted_modules(arch_model):
    from tinylab.cli import model_info
    from widgets.budget import BudgetSlider

    _, model, _ = arch_model
    slider = BudgetSlider(model, n_params=3)
    info = model_info(model)
    adapter = _attach(model, TinyLoRAConfig())
    try:
        names = [m.name for m in adapter.modules]
        assert [m.name for m in slider._modules] == names
        assert set(slider._kinds) == {m.kind for m in adapter.modules}
        assert slider.maximum == len(names) * 4
        assert info["adaptable_modules"] == len(names)
        untied = next(b for b in info["budgets"] if b["budget"] == "u=1, untied")
        assert untied["params"] == adapter.num_params
    finally:
        adapter.remove()
    slider.apply()
    try:
        assert slider.adapter.num_params == slider.plan.achieved == 3
    finally:
        slider.adapter.remove()


def test_module_kinds_split_a_last_name_shared_by_differently_named_parents_only():
    gpt2 = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
            "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]
    assert list(module_kinds(gpt2).values()) == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "attn.c_proj",
                                                 "mlp.c_proj"]
    experts = [f"model.layers.0.mlp.experts.{e}.w1" for e in range(3)] + ["model.layers.0.self_attn.q_proj"]
    assert list(module_kinds(experts).values()) == ["w1", "w1", "w1", "q_proj"]  # numbered parents share a kind
    llama = ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    assert list(module_kinds(llama).values()) == ["o_proj", "down_proj"]
    ctrl = ["transformer.h.0.ffn.0", "transformer.h.0.ffn.2", "model.layers.0.mlp.experts.3.0", "model.layers.0.mlp.experts.4.0"]
    assert list(module_kinds(ctrl).values()) == ["ffn.0", "ffn.2", "0", "0"]  # a sequence's maps; experts share


def test_a_map_keeps_one_kind_in_every_layer_and_a_split_kind_plays_its_parts_role():
    """Beam: every layer's attention has a `gate_proj`, only the dense layers' MLP has one too. The
    attention gate is `self_attn.gate_proj` in every layer (not the MLP gate's plain kind where the
    MLP is sparse), and the MLP's `mlp.gate_proj` is the one playing the gate role."""
    names = ["model.layers.0.self_attn.gate_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.gate_proj",
             "model.layers.1.self_attn.q_proj"]
    assert list(module_kinds(names).values()) == ["self_attn.gate_proj", "mlp.gate_proj", "self_attn.gate_proj",
                                                  "q_proj"]
    assert roles("mlp.gate_proj") == ("gate_proj",) and roles("self_attn.gate_proj") == ()
    assert roles("self_attn.q_proj") == ("q_proj",) and roles("encoder_attn.q_proj") == ()
    assert roles("attn.c_proj") == ("o_proj",) and roles("mlp.c_proj") == ("down_proj",)
    assert roles("attention.dense") == ("o_proj",) and roles("mlp.dense") == ()


def test_beam_adapts_its_mlp_gate_by_default_and_ties_its_attention_gate_across_layers():
    import transformers as tr
    from testkit import seeded_model

    model = seeded_model(tr.BeamConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, layer_types=["full_attention"] * 2, mlp_layer_types=["dense", "sparse"],
        max_position_embeddings=64))
    with pytest.warns(UserWarning, match="self_attn.gate_proj"):  # an attention gate: no default role, frozen
        modules = plan_modules(model, TinyLoRAConfig())
    assert [m.name for m in modules if "gate" in m.kind] == ["model.layers.0.mlp.gate_proj"]
    gates = plan_modules(model, TinyLoRAConfig(targets=("self_attn.gate_proj",), tie="structured", n_tie=2))
    assert [(m.layer, m.kind, m.group) for m in gates] == [(0, "self_attn.gate_proj", 0), (1, "self_attn.gate_proj", 0)]


def test_gpt2_roles_and_targets_by_kind_or_by_last_name():
    model, _ = tiny_model("gpt2")
    modules = plan_modules(model, TinyLoRAConfig())
    assert [m.kind for m in modules[:4]] == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    assert [roles(m.kind) for m in modules[:4]] == [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("up_proj",),
                                                    ("down_proj",)]
    both = plan_modules(model, TinyLoRAConfig(targets=("c_proj",)))  # a last name: both maps of each layer
    assert [m.name for m in both] == [n for n in block_linear_names(model) if n.endswith(".c_proj")]
    attention = plan_modules(model, TinyLoRAConfig(targets=("attn.c_proj",)))
    assert [m.name for m in attention] == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    assert count_params(model, TinyLoRAConfig(targets=("c_proj",), u=3)) == 4 * 3
