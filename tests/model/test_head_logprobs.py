"""The fused output head (tinylab.model.head_logprobs): the same log-probabilities and gradients as the
model's own logits, no [tokens, vocab] tensor kept for the backward, and the plain way wherever the
model's logits are not its head's output."""

import pytest
import torch
import transformers as tr
from testkit import arch_model, seeded_model

from tinylab.adapter.attach import apply_tinylora
from tinylab.model import head_logprobs
from tinylab.model.generation import completion_logprobs, generate
from tinylab.model.head_logprobs import head_scorer
from tinylab.model.tiny import tiny_model

PROMPTS = ["The capital of France is", "Two plus two", "Hello there, how"]


def _reference(model, r, temperature):
    """Each completion token's log-probability from a full unpadded forward of its row: the model's own
    logits, log-softmax in fp64."""
    rows = []
    for row in range(r.input_ids.shape[0]):
        keep = r.attention_mask[row].bool()
        ids = r.input_ids[row][keep][None]  # [1, T]
        n = int(r.completion_mask[row].sum())
        logits = model(input_ids=ids).logits[0, -n - 1:-1].double() / temperature  # [n, V]
        lp = logits.log_softmax(-1).gather(-1, ids[0, -n:, None]).squeeze(-1)  # [n]
        rows.append(torch.nn.functional.pad(lp, (0, r.completion_mask.shape[1] - n)))
    return torch.stack(rows).float()  # [B, L]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "codegen", "falcon", "bloom"])
def test_fused_scores_and_gradients_are_the_model_logits(arch):
    """Values and the vector's gradient against a full forward of each row through the model's own
    logits (CodeGen's head has a bias, GPT-2's and BLOOM's are the tied embeddings), one prompt per row
    and shared by a group."""
    model, tok = arch_model(arch)
    adapter = apply_tinylora(model, u=2, n_tie="all")
    assert head_scorer(model) is not None
    adapter.set_vector([0.3, -0.2])
    r = generate(model, tok, PROMPTS, n=3, max_new_tokens=5, seed=0)
    want = _reference(model, r, 0.7)
    (want_grad,) = torch.autograd.grad(want.sum(), list(adapter.parameters()))
    for g in (1, 3):
        lp = completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, temperature=0.7,
                                 group_size=g)
        (grad,) = torch.autograd.grad(lp.sum(), list(adapter.parameters()))
        torch.testing.assert_close(lp, want, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)
    assert want_grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True])
def test_several_targets_under_one_row_are_each_scored_as_alone(bias, monkeypatch):
    """k targets a row ([N, k], the first completion token of a group): the values and the hidden states'
    gradient of scoring each target with its own copy of the row, fused and the plain way alike."""
    from tinylab.model.generation import token_logprobs

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=bias).requires_grad_(False)
    scorer = head_logprobs.HeadScorer(head)
    hidden = torch.randn(4, 8, generator=g, requires_grad=True)  # [N, d]
    targets = torch.randint(0, 50, (4, 3), generator=g)  # [N, k]
    weights = torch.randn(4, 3, generator=g)  # a loss that weighs every target differently
    want = token_logprobs(head(hidden)[:, None].expand(-1, 3, -1), targets, 0.7)  # [N, k]: each target alone
    (want_grad,) = torch.autograd.grad((want * weights).sum(), hidden)
    for score in (scorer.logprobs, lambda h, t, temp: token_logprobs(head(h), t, temp)):
        got = score(hidden, targets, 0.7)  # [N, k]
        (grad,) = torch.autograd.grad((got * weights).sum(), hidden)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(head_logprobs, "_CHUNK_ELEMENTS", 100)  # two rows of logits at a time
    torch.testing.assert_close(scorer.logprobs(hidden, targets, 0.7), want, atol=1e-6, rtol=1e-6)


def test_no_vocabulary_sized_tensor_is_kept_for_the_backward(monkeypatch):
    """What autograd saves holds no [.., vocab] tensor, also when the logits are made a few rows at a time;
    the plain way (cross-entropy on the logits) saves one."""
    model, tok = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=2, n_tie="all")
    adapter.set_vector([0.3, -0.2])
    vocab = model.get_output_embeddings().weight.shape[0]
    r = generate(model, tok, PROMPTS, n=2, max_new_tokens=6, seed=1)

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_widths(fn):
        """The last dimension of each tensor autograd saves, apart from the model's own weights."""
        widths = []

        def pack(t):
            if t.dim() and t.untyped_storage().data_ptr() not in weights:
                widths.append(t.shape[-1])
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return widths, out

    widths, lp = saved_widths(lambda: completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask))
    assert widths and vocab not in widths
    monkeypatch.setattr(head_logprobs, "_CHUNK_ELEMENTS", 3 * vocab)  # 3 rows of logits at a time
    chunked = completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask)
    torch.testing.assert_close(chunked, lp, atol=1e-6, rtol=1e-6)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), list(adapter.parameters()))
    (grad,) = torch.autograd.grad(lp.sum(), list(adapter.parameters()))
    torch.testing.assert_close(grad_chunked, grad, atol=1e-5, rtol=1e-4)
    plain_widths, _ = saved_widths(lambda: torch.nn.functional.cross_entropy(
        model(input_ids=r.input_ids).logits[0], r.input_ids[0]))
    assert vocab in plain_widths  # the check above can tell


@pytest.mark.parametrize("config", [
    tr.Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0),
    tr.GraniteConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, logits_scaling=4.0),
], ids=["gemma2_softcap", "granite_scaling"])
def test_logits_changed_after_the_head_are_scored_the_plain_way(config):
    """Soft-capping (Gemma 2) and logit scaling (Granite) act after the head: no fused scorer, and the
    scores are those of the model's own logits."""
    model = seeded_model(config)
    assert head_scorer(model) is None
    ids = torch.tensor([[5, 9, 2, 7, 7, 3], [0, 4, 8, 1, 6, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ours = completion_logprobs(model, ids, mask, torch.ones(2, 3, dtype=torch.long))  # [2, 3]
        full = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    want = torch.log_softmax(full[:, 2:5].float(), -1).gather(-1, ids[:, 3:, None]).squeeze(-1)  # [2, 3]
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_a_trained_replaced_or_hooked_head_is_checked_again():
    model, _ = tiny_model("llama", seed=0)
    model.requires_grad_(False)  # frozen, as apply_tinylora leaves it
    head = model.get_output_embeddings()
    assert head_scorer(model).head is head
    head.weight.requires_grad_(True)  # a trained head: its gradient needs the logits
    assert head_scorer(model) is None
    with torch.no_grad():
        assert head_scorer(model).head is head
    head.weight.requires_grad_(False)
    handle = head.register_forward_hook(lambda module, args, output: output * 2)  # someone else's hook
    assert head_scorer(model) is None
    handle.remove()
    new = torch.nn.Linear(head.in_features, head.out_features, bias=False).requires_grad_(False)
    model.set_output_embeddings(new)
    assert head_scorer(model).head is new


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_check_and_the_fused_scores_make_every_tensor_on_the_model_device(dtype, gpu_stand_in):
    """The first scoring of a model (its check included) under the GPU stand-in, against the same on the CPU."""
    scores = []
    for stand_in in (False, True):
        model, tok = tiny_model("llama", seed=0, dtype=dtype)
        adapter = apply_tinylora(model, u=2, n_tie="all")
        adapter.set_vector([0.3, -0.2])
        r = generate(model, tok, PROMPTS, n=2, max_new_tokens=4, seed=7)
        with gpu_stand_in() if stand_in else torch.device("cpu"):
            lp = completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, group_size=2)
            lp.sum().backward()
        assert head_scorer(model) is not None and lp.dtype == torch.float32
        scores.append((lp.detach(), adapter.vectors[0].grad.clone()))
    torch.testing.assert_close(scores[1], scores[0], atol=0, rtol=0)
