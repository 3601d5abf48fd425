"""tinylab/train/run_folder.py: what a checkpoint saves is what loading gives back."""

import torch

from tinylab.adapter.attach import apply_tinylora
from tinylab.model.tiny import tiny_model
from tinylab.train.run_folder import load_run_folder, save_run_folder


def test_a_vector_that_never_had_a_gradient_is_saved_with_zero_moments(tmp_path):
    """Adam keeps no state for a vector whose modules never ran (a vision tower's, on text): the
    checkpoint saves zero moments for it instead of failing, and loading gives every other vector its
    own moments back."""
    model, _ = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=2)  # one vector per module
    params = list(adapter.parameters())
    optimizer = torch.optim.Adam(params, lr=0.1)
    params[0].grad = torch.ones_like(params[0])
    params[2].grad = torch.full_like(params[2], -2.0)
    optimizer.step()  # params[1] (and the rest) had no gradient: no state
    save_run_folder(tmp_path, adapter, optimizer, {"step": 1, "status": "stopped", "config": {}, "history": []})
    restored = torch.optim.Adam(params, lr=0.1)
    load_run_folder(tmp_path, adapter, restored)
    state = restored.state_dict()["state"]
    for i in (0, 2):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[i][key], optimizer.state[params[i]][key])
            assert state[i][key].abs().sum() > 0
    assert not state[1]["exp_avg"].any() and not state[1]["exp_avg_sq"].any()
    assert float(state[1]["step"]) == float(optimizer.state[params[0]]["step"]) == 1.0
