"""The budget planner: exact counts, placements an adapter reproduces, nearest counts, bad input."""

import pytest
import torch
import transformers

from tinylab.adapter.attach import apply_tinylora
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.planner import STRATEGIES, lora_xs_size, plan_budget
from tinylab.adapter.targets import plan_modules

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_LAYERS = 5


@pytest.fixture(scope="module")
def model():
    """A 5-layer Llama small enough to attach hundreds of adapters (35 modules, LoRA-XS size 140)."""
    torch.set_num_threads(1)
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _importance(hot=(3, "v_proj")):
    """Scores growing with the layer, one module far above the rest."""
    scores = {(layer, kind): 1.0 + layer + 0.1 * i for layer in range(N_LAYERS) for i, kind in enumerate(KINDS)}
    scores[hot] = 100.0
    return scores


def test_lora_xs_size_counts_r_squared_per_module(model):
    assert len(plan_modules(model, TinyLoRAConfig())) == 35
    assert lora_xs_size(model) == 35 * 4
    assert lora_xs_size(model, r=1) == 35


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_count_is_reached_exactly(model, strategy):
    importance = None if strategy == "tiled" else _importance()
    for n in range(1, lora_xs_size(model) + 1):
        plan = plan_budget(model, n, importance=importance, strategy=strategy)
        assert plan.achieved == n, (n, plan.reason)
        assert plan.exact and plan.reason.startswith("exact")
        assert len(plan.groups) * plan.u == n
        assert all(plan.groups)  # no empty group
        assert len(set(plan.modules)) == len(plan.modules)
        assert plan.nbytes("bf16") == 2 * n and plan.nbytes("fp32") == 4 * n


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n", [1, 2, 6, 7, 13, 17, 35, 36, 70, 139, 140])
def test_the_config_attaches_to_the_planned_placement(model, strategy, n):
    plan = plan_budget(model, n, importance=_importance(), strategy=strategy)
    adapter = apply_tinylora(model, plan.config)
    try:
        assert adapter.num_params == n
        assert tuple(tuple(names) for _, names in sorted(adapter.groups().items())) == plan.groups
    finally:
        adapter.remove()


def test_tiled_matches_the_paper_and_prefers_u_1(model):
    plan = plan_budget(model, 5)
    assert (plan.u, plan.config.n_tie) == (1, 7)  # ceil(35/7) = 5: one vector per layer
    assert plan_budget(model, 35).config.n_tie == 1
    assert (plan_budget(model, 70).u, plan_budget(model, 70).config.n_tie) == (2, 1)  # u up, n_tie stays 1


def test_u_13_with_13_params_is_one_shared_vector(model):
    plan = plan_budget(model, 13, u=13)
    assert plan.u == 13 and len(plan.groups) == 1 and len(plan.modules) == 35


def test_top_puts_the_budget_on_the_most_important_modules(model):
    plan = plan_budget(model, 1, importance=_importance(), strategy="top")
    assert plan.modules == ("model.layers.3.self_attn.v_proj",)
    assert plan.config.layers == (3,) and plan.config.targets == ("v_proj",)
    plan = plan_budget(model, 4, importance=_importance(), strategy="top")
    assert plan.config.n_tie == 1 and plan.u == 1
    assert "model.layers.3.self_attn.v_proj" in plan.modules


def test_top_accepts_module_names_and_a_series(model):
    import pandas as pd

    by_name = {m.name: _importance()[(m.layer, m.kind)] for m in plan_modules(model, TinyLoRAConfig())}
    series = pd.Series(_importance())
    for importance in (by_name, series):
        plan = plan_budget(model, 1, importance=importance, strategy="top")
        assert plan.modules == ("model.layers.3.self_attn.v_proj",)


def test_proportional_ties_less_where_importance_is_high(model):
    plan = plan_budget(model, 6, importance=_importance(), strategy="proportional")
    assert plan.achieved == 6
    assert ("model.layers.3.self_attn.v_proj",) in plan.groups  # the hot module has its own vector
    assert plan.modules == tuple(m.name for m in plan_modules(model, TinyLoRAConfig()))  # all, in model order
    assert plan.config.group_sizes == tuple(len(g) for g in plan.groups)
    sizes = [len(g) for g in plan.groups]
    assert max(sizes) > 3 * min(sizes)


def test_proportional_with_equal_groups_is_attachable(model):
    plan = plan_budget(model, 35, importance=_importance(), strategy="proportional")
    adapter = apply_tinylora(model, plan.config)
    try:
        assert adapter.num_params == 35
    finally:
        adapter.remove()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unreachable_counts_give_the_nearest_with_a_reason(model, strategy):
    plan = plan_budget(model, 3, importance=_importance(), strategy=strategy, u=5)
    assert plan.achieved == 5 and not plan.exact
    assert plan.reason.startswith("nearest") and "u >= 5" in plan.reason
    assert len(plan.groups) * plan.u == plan.achieved


@pytest.mark.parametrize("bad", [0, -1, 141, 10_000, 13.5, 13.0, True, "13", None])
def test_counts_outside_the_range_name_it(model, bad):
    with pytest.raises(ValueError, match=r"allowed 1\.\.140 for this model \(35 modules"):
        plan_budget(model, bad)


def test_bad_options_are_named(model):
    with pytest.raises(ValueError, match="strategy='best'"):
        plan_budget(model, 13, strategy="best")
    with pytest.raises(ValueError, match="needs importance"):
        plan_budget(model, 13, strategy="top")
    with pytest.raises(ValueError, match="u=0"):
        plan_budget(model, 13, u=0)
    with pytest.raises(ValueError, match="no score for"):
        plan_budget(model, 13, importance={(0, "q_proj"): 1.0}, strategy="top")
    with pytest.raises(ValueError, match="finite and >= 0"):
        plan_budget(model, 13, importance={**_importance(), (0, "q_proj"): -1.0}, strategy="proportional")
    with pytest.raises(TypeError, match="importance must be"):
        plan_budget(model, 13, importance=[1, 2], strategy="top")
    with pytest.raises(ValueError, match="r=9 is too large"):
        plan_budget(model, 13, r=9)


def _plan_and_attach(device, dtype, context):
    from tinylab.model.tiny import tiny_model

    tiny, _ = tiny_model("phi3", seed=0, dtype=dtype)
    tiny.to(device)
    scores = {(m.layer, m.kind): 1.0 + m.layer + i for i, m in enumerate(plan_modules(tiny, TinyLoRAConfig()))}
    with context():
        for strategy in STRATEGIES:
            plan = plan_budget(tiny, 5, importance=scores, strategy=strategy)
            adapter = apply_tinylora(tiny, plan.config)
            assert adapter.num_params == plan.achieved == 5
            assert all(v.dtype == torch.float32 and v.device == torch.device(device) for v in adapter.vectors)
            adapter.remove()
        assert lora_xs_size(tiny) == 8 * 4  # phi3: 4 maps a layer, 2 layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_plans_attach_on_the_models_device(gpu_stand_in, device, dtype):
    """On the CPU under the GPU stand-in (torch's default device meta), and on CUDA where there is one."""
    import contextlib

    _plan_and_attach(device, dtype, gpu_stand_in if device == "cpu" else contextlib.nullcontext)
