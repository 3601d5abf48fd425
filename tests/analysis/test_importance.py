"""Gradient importance: exact per-prompt gradients, the dominant module first, the model untouched."""

import numpy as np
import pytest
import torch
from testkit import OTHER_ARCHS, NumberTask, arch_model

from tinylab.adapter.attach import apply_tinylora, find_adapter
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.planner import plan_budget
from tinylab.adapter.targets import plan_modules
from tinylab.analysis.importance import SCORES, module_importance, weight_importance
from tinylab.model.generation import completion_logprobs
from tinylab.model.tiny import TINY_ARCHS, tiny_model


class FlatTask(NumberTask):
    def reward(self, completions, answers=None, **kwargs):
        return [1.0] * len(completions)


def _boost_top_directions(weight: torch.Tensor, factor: float, r: int = 2) -> None:
    """Multiply the top-r singular values of `weight` (the directions TinyLoRA adapts) by `factor`.

    Scaling a whole weight also scales the gradient reaching the module that feeds it (through W^T),
    so a (v, o) or (up, down) pair rises together; boosting only the adapted directions makes this
    module, and not its partner, dominate the objective's sensitivity.
    """
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    with torch.no_grad():
        weight += ((factor - 1) * (U[:, :r] * S[:r]) @ Vh[:r]).to(weight.dtype)


def _outputs(model, tokenizer):
    ids = tokenizer(["The number is 3.", "Say hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


@pytest.fixture()
def tiny():
    return tiny_model("llama", seed=0)


@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_model_is_bit_identical_after_importance(tiny, objective):
    model, tok = tiny
    model.train()  # the mode must come back too
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a mixed state to restore
    flags["model.layers.0.mlp.up_proj.weight"] = False
    before = _outputs(model.eval(), tok)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    module_importance(model, tok, NumberTask(), n_prompts=3, objective=objective, n_samples=3)
    weight_importance(model, tok, NumberTask(), n_prompts=3, objective=objective, n_samples=3)
    assert model.training
    assert not find_adapter(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(before, _outputs(model.eval(), tok))


def test_table_layout_and_scores(tiny):
    model, tok = tiny
    imp = module_importance(model, tok, NumberTask(), n_prompts=4, objective="sft")
    assert imp.table.index.names == ["layer", "module"] and len(imp.table) == 14
    assert set(SCORES) <= set(imp.table.columns)
    assert imp.gradients.shape == (4, 14, 2, 2)
    assert imp.per_prompt.shape == (4, 14) and imp.informative == 4
    assert (imp.table.consistency <= 1 + 1e-9).all() and (imp.table.fisher > 0).all()
    norms = imp.gradients.flatten(2).norm(dim=2)  # [N, M]
    assert torch.allclose(torch.tensor(imp.table.fisher.to_list(), dtype=torch.float64), (norms**2).mean(0))
    assert imp.ranked("grad").grad.is_monotonic_decreasing
    plan = plan_budget(model, 1, importance=imp, strategy="top")  # the planner takes it as is
    layer, kind = imp.ranked().index[0]
    assert len(plan.modules) == 1 and f".{layer}." in plan.modules[0] and plan.modules[0].endswith(kind)


@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_per_prompt_gradient_matches_autograd(tiny, objective):
    """The hooks' per-prompt dJ/dR equals autograd of prompt 1 alone through an untied u = r*r probe."""
    model, tok = tiny
    task = NumberTask()
    imp = module_importance(model, tok, task, n_prompts=3, objective=objective, n_samples=4, batch_size=5)
    from tinylab.analysis.importance import _make_batch

    batch = _make_batch(model, tok, task, objective, 3, 4, None, 1.0, 0)
    rows = batch.prompt == 1
    probe = apply_tinylora(model, TinyLoRAConfig(u=4, n_tie=1))
    try:
        keep = int((batch.attention_mask[rows].sum(0) > 0).nonzero()[0])
        logp = completion_logprobs(model, batch.input_ids[rows][:, keep:], batch.attention_mask[rows][:, keep:],
                                   batch.completion_mask[rows])
        (logp.sum(1) * batch.weight[rows]).sum().backward()
        for i, (name, mod) in enumerate(probe.named_modules()):
            P = mod.P.reshape(4, 4).double()  # (u, r*r)
            dR = torch.linalg.solve(P, mod.v.grad.double()).reshape(2, 2)  # v.grad = P vec(dR)
            assert torch.allclose(imp.gradients[1, i], dR, rtol=1e-3, atol=1e-9), name
    finally:
        probe.remove()


@pytest.mark.parametrize("arch", TINY_ARCHS + OTHER_ARCHS)
def test_module_importance_runs_its_self_check_on_every_architecture(arch):
    """OPT feeds fc1/fc2 flattened (batch*time, features); Falcon adds attention into the MLP's output
    in place: the per-prompt hooks still see every gradient, so the probe's own v.grad equals their sum
    (module_importance raises otherwise) and every adapted map has a score."""
    model, tok = arch_model(arch)
    imp = module_importance(model, tok, NumberTask(), n_prompts=3, objective="sft")
    planned = [(m.layer, m.kind) for m in plan_modules(model, TinyLoRAConfig())]
    assert list(imp.table.index) == planned
    assert (imp.table["fisher"] > 0).all() and np.isfinite(imp.table["fisher"]).all()


def test_a_model_whose_text_layers_have_no_default_role_is_named():
    """GIT: its text layers are BERT-style maps with no default role, and its image encoder's layers
    (inside the model, numbered as the text layers) are not the decoder's own: the default targets
    find nothing to adapt and say so, and observing the heads names the block that did not run."""
    import transformers as tr
    from testkit import seeded_model

    from tinylab.analysis.patterns import attention_patterns

    tok = tiny_model()[1]
    model = seeded_model(tr.GitConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=28, patch_size=14),
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    with pytest.raises(ValueError, match=r"match no linear module in this model; its linear module types are \[.*'query'"):
        module_importance(model, tok, NumberTask(), n_prompts=2, objective="sft")
    with pytest.raises(ValueError, match=r"attention block of layer 0 \(git\.image_encoder.*did not run"):
        attention_patterns(model, tok, "Once upon a time", 0, 0)


def test_a_model_whose_adapted_maps_never_run_on_text_is_named(monkeypatch):
    """Adapted maps that a text forward never reaches (here a llama whose layers pass their input
    through): importance says so instead of failing inside the backward."""
    model, tok = tiny_model("llama", seed=0)
    for layer in model.model.layers:
        monkeypatch.setattr(layer, "forward", lambda hidden_states, *args, **kwargs: hidden_states)
    with pytest.raises(ValueError, match="no adapted module takes part in the model's text forward"):
        module_importance(model, tok, NumberTask(), n_prompts=2, objective="sft")


@pytest.mark.parametrize("objective", ["sft", "grpo"])
@pytest.mark.parametrize("arch, module", [("llama", "model.layers.0.self_attn.o_proj"),
                                          ("llama", "model.layers.0.mlp.up_proj"),
                                          ("qwen2", "model.layers.0.self_attn.v_proj")])
def test_the_dominant_module_ranks_first(arch, module, objective):
    model, tok = tiny_model(arch, seed=1)
    _boost_top_directions(model.get_submodule(module).weight, 30.0)
    imp = module_importance(model, tok, NumberTask(), n_prompts=4, objective=objective)
    layer, kind = int(module.split(".")[2]), module.rsplit(".", 1)[1]
    assert imp.ranked("fisher").index[0] == (layer, kind)
    assert imp.ranked("abs_mean").index[0] == (layer, kind)


def test_grpo_importance_is_minus_the_gradient_of_the_training_loss(tiny):
    """Summed over prompts, the grpo gradients are -dLoss/dR of tinylab.train.grpo's first step."""
    from tinylab.model.generation import generate
    from tinylab.train.grpo import GRPOConfig, group_advantages, policy_loss

    model, tok = tiny
    task = NumberTask()
    imp = module_importance(model, tok, task, n_prompts=3, objective="grpo", n_samples=4, temperature=0.8, seed=3)
    examples = task.examples("train", 3, 3)
    rollout = generate(model, tok, [e.prompt for e in examples], n=4, max_new_tokens=6, temperature=0.8, seed=3)
    rewards = torch.tensor(task.reward(rollout.completions, None), dtype=torch.float64)
    advantages = group_advantages(rewards, 4, "group").float()
    probe = apply_tinylora(model, TinyLoRAConfig(u=4, n_tie=1))
    try:
        logp = completion_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.completion_mask,
                                   temperature=0.8)
        n_tokens = rollout.completion_mask.sum()
        loss, _ = policy_loss(logp, logp.detach(), None, advantages, rollout.completion_mask, n_tokens, GRPOConfig())
        loss.backward()
        for i, (name, mod) in enumerate(probe.named_modules()):
            dR = torch.linalg.solve(mod.P.reshape(4, 4).double(), mod.v.grad.double()).reshape(2, 2)
            assert torch.allclose(imp.gradients[:, i].sum(0), -dR, rtol=1e-3, atol=1e-9), name
    finally:
        probe.remove()


def test_equal_rewards_give_zero_gradients(tiny):
    model, tok = tiny
    imp = module_importance(model, tok, FlatTask(), n_prompts=2, objective="grpo")
    assert imp.informative == 0 and float(imp.gradients.abs().sum()) == 0.0
    assert imp.rewards == ((1.0,) * 4,) * 2


def test_weight_importance_matches_autograd_and_splits_heads(tiny):
    model, tok = tiny
    task = NumberTask()
    wi = weight_importance(model, tok, task, n_prompts=2, objective="sft")
    from tinylab.analysis.importance import _make_batch

    batch = _make_batch(model, tok, task, "sft", 2, 4, None, 1.0, 0)
    W = model.model.layers[1].self_attn.o_proj.weight
    expected = 0.0
    for p in range(2):
        W.requires_grad_(True)
        rows = batch.prompt == p
        logp = completion_logprobs(model, batch.input_ids[rows], batch.attention_mask[rows], batch.completion_mask[rows])
        (g,) = torch.autograd.grad((logp.sum(1) * batch.weight[rows]).sum(), W)
        expected += float((W.detach() * g).abs().sum()) / 2
    W.requires_grad_(True)
    assert wi.table.taylor[(1, "o_proj")] == pytest.approx(expected, rel=1e-4)
    heads = wi.heads.taylor
    for kind, n_heads in [("q_proj", 4), ("k_proj", 2), ("v_proj", 2), ("o_proj", 4)]:
        one = heads[(heads.index.get_level_values("layer") == 0) & (heads.index.get_level_values("module") == kind)]
        assert list(one.index.get_level_values("head")) == list(range(n_heads))
        assert one.sum() == pytest.approx(wi.table.taylor[(0, kind)], rel=1e-6)
    assert (0, "gate_proj") not in heads.index.droplevel("head")


@pytest.mark.parametrize("arch", ["opt", "phi3", "gpt_neox"])
def test_weight_importance_splits_heads_of_every_attention_layout(arch):
    """OPT's out_proj, Phi-3's fused qkv_proj and GPT-NeoX's grouped query_key_value are split per
    head too (the rows `AttentionBlock.rows` names), and each map's heads sum to its total."""
    from tinylab.model.attention import attention_blocks

    model, tok = tiny_model(arch, seed=0)
    wi = weight_importance(model, tok, NumberTask(), n_prompts=2, objective="sft")
    heads = wi.heads.taylor
    for block in attention_blocks(model):
        split = dict.fromkeys(block.maps)  # the block's attention maps, fused ones once
        assert len(split) == (2 if block.layout != "separate" else 4)
        for attr in split:
            one = heads[(heads.index.get_level_values("layer") == block.layer)
                        & (heads.index.get_level_values("module") == attr)]
            units = block.n_kv if block.layout == "separate" and attr in block.maps[1:3] else block.n_heads
            assert list(one.index.get_level_values("head")) == list(range(units)), attr
            assert (one > 0).all() and one.sum() == pytest.approx(wi.table.taylor[(block.layer, attr)], rel=1e-5)


@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_scaled_weight_ranks_first_in_taylor(tiny, objective):
    model, tok = tiny
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight *= 30
    wi = weight_importance(model, tok, NumberTask(), n_prompts=4, objective=objective)
    assert wi.table.taylor.idxmax() == (0, "o_proj")


def test_bad_input_is_named(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="objective='rl'"):
        module_importance(model, tok, NumberTask(), objective="rl")
    with pytest.raises(ValueError, match="temperature=0"):
        module_importance(model, tok, NumberTask(), temperature=0)
    with pytest.raises(ValueError, match="n_prompts=0"):
        module_importance(model, tok, NumberTask(), n_prompts=0)
    with pytest.raises(ValueError, match="n_samples=1: must be an integer >= 2"):
        module_importance(model, tok, NumberTask(), n_samples=1)
    with pytest.raises(ValueError, match="batch_size=True"):
        weight_importance(model, tok, NumberTask(), batch_size=True)
    adapter = apply_tinylora(model, TinyLoRAConfig())
    try:
        with pytest.raises(ValueError, match=r"already has a TinyLoRA adapter \(importance probes the base model\)"):
            module_importance(model, tok, NumberTask(), objective="sft")
    finally:
        adapter.remove()


def test_token_attribution_is_complete_and_leaves_the_model_alone(tiny):
    from tinylab.analysis.token_attribution import token_attribution
    from tinylab.model.batch import render_prompts

    model, tok = tiny
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    before = _outputs(model, tok)
    coarse = token_attribution(model, tok, prompt, "Paris is", n_steps=4)
    fine = token_attribution(model, tok, prompt, "Paris is", n_steps=48)
    assert fine.tokens == tok.convert_ids_to_tokens(tok.encode(render_prompts(tok, [prompt])[0]))
    assert fine.answer_tokens and fine.per_answer_token.shape == (len(fine.answer_tokens), len(fine.tokens))
    assert torch.allclose(fine.per_answer_token.sum(0), fine.scores)
    assert fine.delta < coarse.delta and fine.delta < 0.05 * float(fine.scores.abs().sum())  # completeness
    baseline = [i for i, t in enumerate(fine.tokens) if tok.convert_tokens_to_ids(t) == tok.pad_token_id]
    assert baseline and all(float(fine.scores[i]) == 0.0 for i in baseline)  # the baseline token gets nothing
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(before, _outputs(model, tok))
    with pytest.raises(ValueError, match="answer=''"):
        token_attribution(model, tok, prompt, "")
    with pytest.raises(ValueError, match="n_steps=0"):
        token_attribution(model, tok, prompt, "Paris", n_steps=0)
    with pytest.raises(ValueError, match="baseline_id=-1"):
        token_attribution(model, tok, prompt, "Paris", baseline_id=-1)


def test_sft_rows_are_the_rendered_prompt_then_the_solution_and_eos(tiny):
    from tinylab.analysis.importance import _make_batch

    model, tok = tiny
    examples = NumberTask().examples("train", 3)
    batch = _make_batch(model, tok, NumberTask(), "sft", 3, 4, None, 1.0, 0)
    L = batch.completion_mask.shape[1]
    for b, e in enumerate(examples):
        prompt = batch.input_ids[b, :-L][batch.attention_mask[b, :-L].bool()]
        reply = batch.input_ids[b, -L:][batch.completion_mask[b].bool()]
        assert tok.decode(prompt) == tok.apply_chat_template(e.prompt, tokenize=False, add_generation_prompt=True)
        assert tok.decode(reply[:-1]) == e.solution and int(reply[-1]) == tok.eos_token_id
        assert batch.weight[b] == pytest.approx(1 / len(reply))  # J_p is the mean token log-prob
        real = batch.attention_mask[b].nonzero().squeeze(1)  # no hole between prompt and reply
        assert real.tolist() == list(range(int(real[0]), int(real[0]) + len(prompt) + len(reply)))
    assert batch.prompt.tolist() == [0, 1, 2]


def test_self_check_tolerance_follows_the_models_dtype():
    """A rounding-sized gap passes for a bf16 model and fails for fp32; a missed term fails for both."""
    from tinylab.analysis.importance import _check_probe

    gen = torch.Generator().manual_seed(0)
    G = torch.randn(3, 1, 2, 2, generator=gen)  # [N, M, r, r] per-prompt dJ/dR
    G[0] *= 10  # one prompt carries most of the gradient
    P = torch.randn(4, 2, 2, generator=gen)  # (u, r, r)
    scale = G.abs().sum(0)  # [M, r, r]: the summed terms' sizes

    def check(grad, dtype):
        _check_probe(G, scale, ["m"], {"m": grad}, {"m": P}, {"m": dtype})

    exact = torch.einsum("nrs,urs->u", G[:, 0], P)  # (u,)
    check(exact, torch.float32)
    rounded = exact + 2 * torch.finfo(torch.bfloat16).eps * torch.einsum("rs,urs->u", scale[0], P.abs())
    check(rounded, torch.bfloat16)
    with pytest.raises(RuntimeError, match="torch.float32 rounding bound"):
        check(rounded, torch.float32)
    missed = torch.einsum("nrs,urs->u", G[1:, 0], P)  # prompt 0's term never reached the hooks
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        with pytest.raises(RuntimeError, match="do not add up"):
            check(missed, dtype)


def _relative(a, b) -> float:
    """The largest relative difference of a from b, elementwise."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float((np.abs(a - b) / np.abs(b)).max())


def test_bf16_importance_passes_its_self_check_and_follows_fp32():
    """On bf16 the self-check used to fail (the hooks rounded their products to bf16 and the check had
    fp32's tolerance); now the scores stay within bf16 rounding of the fp32 model's."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = tiny_model("llama", seed=0, dtype=dtype)
        results[dtype] = (module_importance(model, tok, NumberTask(), n_prompts=4, objective="sft"),
                          weight_importance(model, tok, NumberTask(), n_prompts=4, objective="sft"))
        module_importance(model, tok, NumberTask(), n_prompts=2, objective="grpo")  # the self-check passes
    (imp32, wi32), (imp16, wi16) = results[torch.float32], results[torch.bfloat16]
    assert imp16.gradients.dtype == torch.float64 and imp16.gradients.device.type == "cpu"
    # bf16 rounding of the weights and activations (the probe's SVD basis is of the rounded weights)
    assert _relative(imp16.table.fisher.to_numpy(), imp32.table.fisher.to_numpy()) < 0.1
    assert _relative(wi16.table.taylor.to_numpy(), wi32.table.taylor.to_numpy()) < 0.02
    assert list(imp16.ranked().index[:3]) == list(imp32.ranked().index[:3])


def _analyses(model, tok):
    from tinylab.analysis.token_attribution import token_attribution

    return (module_importance(model, tok, NumberTask(), n_prompts=3, objective="sft"),
            module_importance(model, tok, NumberTask(), n_prompts=2, objective="grpo", n_samples=3),
            weight_importance(model, tok, NumberTask(), n_prompts=2, objective="grpo", n_samples=3),
            token_attribution(model, tok, "What is the capital of France?", "Paris is", n_steps=8))


def _same_analyses(a, b, rel: float) -> None:
    (sft_a, grpo_a, wi_a, attr_a), (sft_b, grpo_b, wi_b, attr_b) = a, b
    assert _relative(sft_a.table.fisher.to_numpy(), sft_b.table.fisher.to_numpy()) <= rel
    assert grpo_a.rewards == grpo_b.rewards
    assert _relative(wi_a.heads.taylor.to_numpy(), wi_b.heads.taylor.to_numpy()) <= rel
    assert attr_a.tokens == attr_b.tokens
    assert float((attr_a.scores - attr_b.scores).abs().max()) <= rel * float(attr_b.scores.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_public_function_keeps_to_the_models_device(gpu_stand_in, dtype):
    """module_importance (sft, grpo), weight_importance and token_attribution with torch's default
    device elsewhere than the model (meta): a tensor made without the model's device fails there."""
    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    with gpu_stand_in():
        inside = _analyses(model, tok)
    sft, grpo, wi, attr = inside
    assert sft.gradients.device.type == "cpu" and sft.gradients.isfinite().all() and sft.informative == 3
    assert len(grpo.rewards) == 2 and wi.table.taylor.gt(0).all()
    assert attr.scores.dtype == torch.float32 and attr.scores.isfinite().all()
    assert all(p.grad is None for p in model.parameters())
    _same_analyses(inside, _analyses(model, tok), rel=0.0)  # the same numbers as with the default device


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_public_function_on_cuda(dtype):
    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    on_cpu = _analyses(model, tok)
    on_gpu = _analyses(model.to("cuda"), tok)
    assert on_gpu[0].gradients.device.type == "cpu" and on_gpu[0].gradients.isfinite().all()
    _same_analyses(on_gpu, on_cpu, rel=0.05 if dtype == torch.bfloat16 else 1e-3)


def test_a_model_scaling_its_embeddings_in_place_is_scored_and_named_by_token_attribution():
    """CTRL multiplies its embeddings' output in place. weight_importance makes activations require grad
    from a copy of that output, so every map is scored; captum's integrated gradients set that output
    to their own leaves, which CTRL cannot write into: a ValueError naming the model."""
    from tinylab.analysis.token_attribution import token_attribution

    model, tok = arch_model("ctrl")
    wi = weight_importance(model, tok, NumberTask(), n_prompts=2, objective="sft")
    assert list(wi.table.index) == [(m.layer, m.kind) for m in plan_modules(model, TinyLoRAConfig())]
    assert (wi.table.taylor > 0).all()
    with pytest.raises(ValueError, match="CTRLLMHeadModel writes into its input embeddings in place"):
        token_attribution(model, tok, "What is 2 + 3?", "5", n_steps=2)
