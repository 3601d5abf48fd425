import contextlib
import dataclasses
import math
import re

import pytest
import torch
from testkit import block_linear_names
from torch import nn

from tinylab.adapter.attach import apply_tinylora, find_adapter
from tinylab.adapter.config import DEFAULT_TARGETS, TinyLoRAConfig
from tinylab.adapter.layer import TinyLoRALinear, project
from tinylab.model.tiny import TINY_ARCHS, tiny_model


def _ids(tokenizer, text="The quick brown fox jumps over the lazy dog."):
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.fixture
def llama():
    return tiny_model("llama", seed=0)


def test_noop_at_zero_is_bit_identical(llama):
    model, tok = llama
    ids = _ids(tok)
    with torch.no_grad():
        before = model(ids).logits
    adapter = apply_tinylora(model, TinyLoRAConfig(u=3, n_tie=2))
    assert all(float(v.detach().abs().sum()) == 0.0 for v in adapter.parameters())
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)


def test_update_matches_hand_computed_svd(llama):
    model, tok = llama
    adapter = apply_tinylora(model, TinyLoRAConfig(r=2, u=3, seed=7))
    name, mod = next(adapter.named_modules())
    W = mod.base.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, S, Vh = U[:, :2], S[:2], Vh[:2]
    # same canonical signs as the adapter: largest |entry| of each column of U positive
    signs = torch.sign(U[U.abs().argmax(0), torch.arange(2)])
    U, Vh = U * signs, Vh * signs[:, None]
    torch.testing.assert_close(mod.S.double(), S, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mod.U.double(), U, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        adapter.vectors[0].copy_(torch.tensor([0.5, -1.0, 2.0]))
    R = sum(adapter.vectors[0][i].double() * mod.P[i].double() for i in range(3))
    expected = U @ torch.diag(S) @ R @ Vh  # the paper's W' - W, built by hand
    x = torch.randn(5, mod.in_features)
    with torch.no_grad():
        got = mod(x).double() - mod.base(x).double()
    torch.testing.assert_close(got, x.double() @ expected.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mod.delta_weight().double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("u,n_tie,tie", [(1, 1, "tiled"), (4, 3, "tiled"), (1, 5, "tiled"), (2, 2, "structured"),
                                         (1, "all", "tiled"), (13, "all", "structured")])
def test_exact_counts(arch, u, n_tie, tie):
    model, _ = tiny_model(arch)
    per_layer = len(block_linear_names(model, layer=0))  # 7; phi3's, GPT-NeoX's and GPT-2's fused maps: 4; OPT: 6
    n_modules = model.config.num_hidden_layers * per_layer
    adapter = apply_tinylora(model, TinyLoRAConfig(u=u, n_tie=n_tie, tie=tie))
    assert len(adapter.modules) == n_modules
    k = n_modules if n_tie == "all" else n_tie
    if tie == "tiled":
        expected = math.ceil(n_modules / k) * u
    else:  # each module type is tied across chunks of k consecutive layers
        expected = per_layer * math.ceil(model.config.num_hidden_layers / k) * u
    assert adapter.num_params == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert sum(v.numel() for v in adapter.parameters()) == expected


def test_tiled_and_structured_grouping(llama):
    model, _ = llama
    tiled = apply_tinylora(model, TinyLoRAConfig(n_tie=4))
    assert [m.group for m in tiled.modules] == [i // 4 for i in range(14)]
    assert [m.kind for m in tiled.modules[:7]] == list(DEFAULT_TARGETS)
    tiled.remove()
    structured = apply_tinylora(model, TinyLoRAConfig(n_tie=2, tie="structured"))
    groups = structured.groups()
    assert len(groups) == 7
    for names in groups.values():  # one module type, both layers
        assert len({n.rsplit(".", 1)[-1] for n in names}) == 1 and len(names) == 2


def _other_architecture(name: str):
    import transformers

    small = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    config = {
        "opt": lambda: transformers.OPTConfig(**small, ffn_dim=64, word_embed_proj_dim=32),
        "phi": lambda: transformers.PhiConfig(**small, intermediate_size=64),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**small, intermediate_size=64),
        "starcoder2": lambda: transformers.Starcoder2Config(**small, intermediate_size=64, num_key_value_heads=2),
        "gptj": lambda: transformers.GPTJConfig(vocab_size=96, n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
    }[name]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name", ["opt", "phi", "gpt_neox", "starcoder2", "gptj"])
def test_default_targets_adapt_every_block_linear_under_other_names(name, recwarn):
    """OPT's out_proj/fc1/fc2, Phi's dense, GPT-NeoX's fused query_key_value...: the default targets
    take each architecture's names for the 7 maps, so no linear map of a block is silently left out."""
    model = _other_architecture(name)
    in_blocks = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(r"\.(layers|h)\.\d+\.", n)]
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    adapter = apply_tinylora(model, TinyLoRAConfig(u=2))
    assert [m.name for m in adapter.modules] == in_blocks and len(in_blocks) >= 8
    assert not [w for w in recwarn if "left frozen" in str(w.message)]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # v = 0
        adapter.set_vector(torch.full((adapter.num_params,), 0.5))
        assert not torch.allclose(model(ids).logits, base, atol=1e-4)


def test_default_targets_warn_about_block_linears_left_frozen(llama):
    model, _ = llama
    model.model.layers[0].mlp.router = nn.Linear(64, 4)  # an in-block linear map with no default role
    with pytest.warns(UserWarning, match=r"\['router'\], left frozen"):
        adapter = apply_tinylora(model, TinyLoRAConfig())
    assert len(adapter.modules) == 14 and "router" not in {m.kind for m in adapter.modules}
    adapter.remove()
    adapter = apply_tinylora(model, TinyLoRAConfig(targets=("router", "q_proj")))  # named: adapted
    assert [m.kind for m in adapter.modules].count("router") == 1


def test_only_adapter_requires_grad_and_step_changes_only_v(llama):
    model, tok = llama
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = apply_tinylora(model, TinyLoRAConfig(u=2, n_tie=7))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter.parameters()}
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    ids = _ids(tok)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in adapter.parameters())  # non-zero at v=0
    opt.step()
    assert all(v.abs().sum() > 0 for v in adapter.parameters())
    adapter.remove()
    for n, p in model.named_parameters():
        assert torch.equal(p, frozen[n]), n


def test_disabled_merge_unmerge_remove(llama):
    model, tok = llama
    ids = _ids(tok)
    with torch.no_grad():
        base = model(ids).logits
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    adapter = apply_tinylora(model, TinyLoRAConfig(u=4))
    adapter.set_vector(torch.randn(adapter.num_params) * 0.5)
    with torch.no_grad():
        adapted = model(ids).logits
        assert not torch.allclose(adapted, base)
        with adapter.disabled():
            assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids).logits, adapted)
        adapter.merge()
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)
        with adapter.disabled():
            torch.testing.assert_close(model(ids).logits, base, rtol=1e-4, atol=1e-4)
        adapter.unmerge()
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    adapter.remove()
    assert not find_adapter(model)
    assert not any(isinstance(m, TinyLoRALinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_layers_and_targets_selection(llama):
    model, _ = llama
    adapter = apply_tinylora(model, TinyLoRAConfig(targets=("q_proj", "v_proj"), layers=(1,)))
    assert [m.name for m in adapter.modules] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert adapter.num_params == 2


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"r": 0}, "r=0"), ({"u": -1}, "u=-1"), ({"u": 1.5}, "u=1.5"), ({"n_tie": 0}, "n_tie=0"),
        ({"tie": "diagonal"}, "tie='diagonal'"), ({"svd": "fast"}, "svd='fast'"), ({"targets": ()}, "targets"),
        ({"layers": (-1,)}, "layers"), ({"r": True}, "r=True"),
    ],
)
def test_bad_configs_raise(fields, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        TinyLoRAConfig(**fields)


def test_model_dependent_errors(llama):
    model, _ = llama
    with pytest.raises(ValueError, match=r"qkv_proj.*linear module types are \['q_proj'"):
        apply_tinylora(model, TinyLoRAConfig(targets=("qkv_proj",)))
    with pytest.raises(ValueError, match=r"layers \[5\] are out of range: this model has layers 0..1"):
        apply_tinylora(model, TinyLoRAConfig(layers=(5,)))
    with pytest.raises(ValueError, match=r"n_tie=15 is out of range: allowed 1..14"):
        apply_tinylora(model, TinyLoRAConfig(n_tie=15))
    with pytest.raises(ValueError, match=r"r=100 is too large"):
        apply_tinylora(model, TinyLoRAConfig(r=100))
    with pytest.raises(TypeError, match="unknown TinyLoRAConfig fields"):
        apply_tinylora(model, budget=3)
    adapter = apply_tinylora(model)
    with pytest.raises(ValueError, match="already has a TinyLoRA adapter"):
        apply_tinylora(model)
    adapter.remove()


def test_replace_is_the_sweep_api_and_validates(llama):
    """`dataclasses.replace` runs TinyLoRAConfig's checks (a bad sweep value fails at once, naming
    it) and each swept config attaches with the count it says."""
    model, _ = llama
    base = TinyLoRAConfig(n_tie=7)
    for u in (1, 4, 16):
        adapter = apply_tinylora(model, dataclasses.replace(base, u=u))
        assert adapter.num_params == 2 * u  # 14 modules tied by 7: two vectors
        adapter.remove()
    with pytest.raises(ValueError, match=r"u=0 is not allowed"):
        dataclasses.replace(base, u=0)
    with pytest.raises(ValueError, match=r"tie='diagonal' is not allowed"):
        dataclasses.replace(base, tie="diagonal")


@pytest.mark.parametrize("cfg", [dict(u=2, n_tie=3), dict(n_tie=2, tie="structured"), dict(u=13, n_tie="all"),
                                 dict(layers=(1,), targets=("q_proj", "o_proj"))])
def test_count_params_matches_attached(llama, cfg):
    from tinylab.adapter.targets import count_params, plan_modules

    model, _ = llama
    config = TinyLoRAConfig(**cfg)
    planned = plan_modules(model, config)
    adapter = apply_tinylora(model, config)
    assert count_params(model, config) == adapter.num_params
    assert planned == adapter.modules


def test_explicit_group_sizes(llama):
    model, _ = llama
    adapter = apply_tinylora(model, TinyLoRAConfig(group_sizes=(1, 1, 5, 7)))
    assert [m.group for m in adapter.modules] == [0, 1] + [2] * 5 + [3] * 7
    assert adapter.num_params == 4
    adapter.remove()
    with pytest.raises(ValueError, match="group_sizes sum to 3 but 14 modules"):
        apply_tinylora(model, TinyLoRAConfig(group_sizes=(1, 2)))
    with pytest.raises(ValueError, match=r"group_sizes=\(0,\)"):
        TinyLoRAConfig(group_sizes=(0,))


def test_forward_without_grad_sees_every_change_of_v_and_of_the_frozen_factors(llama):
    """Without grad the rows U diag(S) R and views of Vh and the base weight are kept between calls:
    each way of changing v, a frozen buffer or the base weight must show in the very next forward,
    equal to the autograd path's output."""
    model, tok = llama
    ids = _ids(tok)
    adapter = apply_tinylora(model, TinyLoRAConfig(u=3, n_tie=4))
    opt = torch.optim.Adam(adapter.parameters(), lr=0.1)
    mod = dict(adapter.named_modules())["model.layers.1.mlp.up_proj"]
    g = torch.Generator().manual_seed(0)

    def check():
        with torch.no_grad():
            kept = model(ids).logits
        with torch.inference_mode():
            inference = model(ids).logits
        graph = model(ids).logits.detach()  # autograd path: U diag(S) R rebuilt from v
        torch.testing.assert_close(kept, graph, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inference, graph, rtol=1e-5, atol=1e-5)
        return kept

    seen = [check()]
    model(ids, labels=ids).loss.backward()
    opt.step()  # in place, fused or not
    seen.append(check())
    adapter.set_vector(torch.randn(adapter.num_params, generator=g))
    seen.append(check())
    adapter.vectors[0].data = torch.randn(3, generator=g)  # a .data swap
    seen.append(check())
    with torch.no_grad():
        mod.U.mul_(2.0)  # a frozen buffer written in place
    seen.append(check())
    mod.P = torch.randn_like(mod.P)  # a frozen buffer replaced
    seen.append(check())
    with torch.no_grad():
        mod.Vh.mul_(-1.0)  # the kept path reads Vh and the base weight through views
    seen.append(check())
    mod.Vh = torch.randn_like(mod.Vh)
    seen.append(check())
    with torch.no_grad():
        mod.base.weight.mul_(0.5)
    seen.append(check())
    mod.base.weight.data = torch.randn_like(mod.base.weight)  # new storage, same Parameter
    seen.append(check())
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))


@pytest.mark.parametrize("r", [2, 6])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_many_rows_without_grad_match_the_autograd_path_and_are_exact_at_zero(arch, r):
    """Prefill-sized inputs (120 rows) without grad take the kept-rows path (F.linear, then the
    rank-r update added in place); it must agree with the autograd path (biases included: qwen2's
    q/k/v have them) and be bit-identical to the base model at v = 0. Both are also checked against
    the merged weight W + U diag(S) R Vh, which neither path builds."""
    model, _ = tiny_model(arch, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    adapter = apply_tinylora(model, TinyLoRAConfig(r=r, u=4, n_tie=3))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, base)  # v = 0
    adapter.set_vector(torch.randn(adapter.num_params, generator=torch.Generator().manual_seed(1)) * 0.3)
    with torch.inference_mode():
        fast = model(ids).logits
    graph = model(ids).logits.detach()
    assert not torch.allclose(graph, base, atol=1e-3)
    torch.testing.assert_close(fast, graph, rtol=1e-5, atol=1e-5)
    adapter.merge()
    with torch.no_grad():
        merged = model(ids).logits
    adapter.unmerge()
    torch.testing.assert_close(graph, merged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 31, 32, 300])
def test_project_is_x_times_vh_transposed_with_its_gradient(rows, dtype):
    """`project` picks a kernel by shape (the transposed product on the CPU in fp32 from 32 rows):
    every choice gives x Vh^T, (N, r), and the gradient with respect to x of F.linear."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=g).to(dtype).requires_grad_()
    Vh = torch.randn(3, 48, generator=g).to(dtype)
    h = project(x, Vh)
    assert h.shape == (rows, 3) and h.dtype == dtype
    weights = torch.randn(rows, 3, generator=g).to(dtype)
    (grad,) = torch.autograd.grad((h * weights).sum(), x)
    x_ref = x.detach().double().requires_grad_()
    h_ref = x_ref @ Vh.double().T
    (grad_ref,) = torch.autograd.grad((h_ref * weights.double()).sum(), x_ref)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(h.double(), h_ref.detach(), **tol)
    torch.testing.assert_close(grad.double(), grad_ref, **tol)


def test_forward_without_grad_under_cpu_autocast(llama):
    """Autocast casts F.linear's output but not an in-place addmm_'s operands: the fast paths must
    step aside (decode- and prefill-sized inputs). The bf16 logits must match the fp32 reference
    and the autograd path under the same autocast to bf16 rounding, well below the adapter's own
    effect on them (which must show)."""
    model, _ = llama
    adapter = apply_tinylora(model, TinyLoRAConfig(u=2))
    adapter.set_vector(torch.full((adapter.num_params,), 0.3))
    for shape in [(1, 5), (3, 40)]:
        ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            reference = model(ids).logits  # fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            graph = model(ids).logits.detach().float()  # the autograd path
            with torch.no_grad():
                cast = model(ids).logits.float()
                with adapter.disabled():
                    base = model(ids).logits.float()
        tolerance = 0.02  # bf16 rounding of these logits
        torch.testing.assert_close(cast, reference, rtol=0, atol=tolerance)
        torch.testing.assert_close(cast, graph, rtol=0, atol=tolerance)
        assert (cast - base).abs().max() > 3 * tolerance  # the adapter's effect is far above the tolerance


def test_forward_without_grad_when_the_base_is_not_a_plain_linear(llama):
    """A Linear subclass, or a base with a forward hook, takes the general path (the base called as
    a module, hooks seeing its output); without grad it must still agree with the autograd path,
    and follow a change of v."""

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 1.5

    model, tok = llama
    ids = _ids(tok)
    mlp = model.model.layers[0].mlp
    old = mlp.up_proj
    mlp.up_proj = ScaledLinear(old.in_features, old.out_features, bias=False)
    mlp.up_proj.weight.data.copy_(old.weight.data)
    seen = []
    hook = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(1) or o * 0.5)
    adapter = apply_tinylora(model, TinyLoRAConfig(u=2, n_tie="all"))
    for values in ([0.4, -0.3], [-0.2, 0.6]):
        adapter.set_vector(torch.tensor(values))
        with torch.inference_mode():
            kept = model(ids).logits
        graph = model(ids).logits.detach()
        torch.testing.assert_close(kept, graph, rtol=1e-5, atol=1e-5)
    assert seen  # the hook ran on the wrapped base
    hook.remove()


def _run_on(device: str, dtype: torch.dtype, context):
    """Attach, train one step, and use every forward path of a tiny model on `device` in `dtype`,
    inside `context` (the GPU stand-in: torch's default device "meta", or a real device)."""
    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    model.to(device)
    short = _ids(tok).to(device)  # few rows: the decode path
    long = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)).to(device)
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.05}[dtype]
    with context():
        with torch.no_grad():
            base = [model(ids).logits for ids in (short, long)]
        adapter = apply_tinylora(model, TinyLoRAConfig(u=3, n_tie=4))
        for _, module in adapter.named_modules():
            w = module.base.weight
            assert {t.device for t in (module.U, module.S, module.Vh, module.P)} == {w.device}
            assert module.U.dtype == module.S.dtype == module.Vh.dtype == dtype and module.P.dtype == torch.float32
        assert all(v.dtype == torch.float32 and v.device == torch.device(device) for v in adapter.vectors)
        with torch.no_grad():
            assert all(torch.equal(model(ids).logits, b) for ids, b in zip((short, long), base))  # v = 0
        model(short, labels=short).loss.backward()
        assert all(v.grad is not None and v.grad.dtype == torch.float32 and v.grad.abs().sum() > 0
                   for v in adapter.vectors)
        step = torch.cat([v.grad.cpu() for v in adapter.vectors])  # (n,) fp32
        adapter.set_vector(-4.0 * step / step.abs().max())  # a large step down the loss
        for ids, b in zip((short, long), base):
            graph = model(ids).logits.detach()  # the autograd path
            with torch.no_grad():
                kept = model(ids).logits  # kept rows, F.linear + addmm_
            torch.testing.assert_close(kept, graph, rtol=0, atol=tol)
            assert (kept.float() - b.float()).abs().max() > 10 * tol  # the update shows
        with torch.no_grad():
            before = model(long).logits
            adapter.merge()
            merged = model(long).logits
            adapter.unmerge()
            assert torch.equal(model(long).logits, before)  # unmerge restores the weights exactly
        effect = (before.float() - base[1].float()).abs().max()
        assert (merged.float() - before.float()).abs().max() < 0.2 * effect  # merged: the same update
        adapter.remove()
        with torch.no_grad():
            assert torch.equal(model(long).logits, base[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_step_follows_the_models_device(gpu_stand_in, device, dtype):
    """On the CPU under the GPU stand-in (torch's default device meta), and on CUDA where there is one."""
    _run_on(device, dtype, gpu_stand_in if device == "cpu" else contextlib.nullcontext)


def test_a_trained_vector_and_its_adam_state_stay_fp32_on_a_bf16_model():
    model, tok = tiny_model("llama", seed=0, dtype=torch.bfloat16)
    adapter = apply_tinylora(model, TinyLoRAConfig(u=2, n_tie=7))
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    ids = _ids(tok)
    model(ids, labels=ids).loss.backward()
    opt.step()
    for v in adapter.vectors:
        assert v.dtype == torch.float32 and v.abs().sum() > 0
        assert opt.state[v]["exp_avg"].dtype == opt.state[v]["exp_avg_sq"].dtype == torch.float32


def test_offloaded_weights_are_refused_by_name():
    model, _ = tiny_model("llama", seed=0)
    model.model.layers[1].mlp.to("meta")  # what a device_map with offload leaves behind
    with pytest.raises(ValueError, match=r"on the meta device \(e\.g\. model\.layers\.1\.mlp\.gate_proj\)"):
        apply_tinylora(model, TinyLoRAConfig())
    assert all(p.requires_grad for p in model.model.layers[0].parameters())  # nothing changed


def test_projections_keep_the_seed_bits_of_earlier_versions():
    """P comes from seeds.derived_seed(seed, name) now; saved adapters only keep their meaning if
    that is the generator seed earlier versions computed by hand: blake2b("{seed}:{name}"), 63 bits."""
    import hashlib

    from tinylab.adapter.layer import projection

    for seed, name in ((0, "model.layers.0.self_attn.q_proj"), (12345, "model.layers.1.mlp.down_proj")):
        digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        assert torch.equal(projection(seed, name, 5, 2), torch.randn(5, 2, 2, generator=g) / math.sqrt(2))
