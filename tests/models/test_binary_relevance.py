"""Binary relevance (one single-logit model per label, source report 3) as a trial option:
the model, its independence under the masked loss, its checkpoint through the predictor, and
the search-space choice."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch

from raysearch.config import TrialConfig
from raysearch.models.factory import PerLabelModels, create_model
from raysearch.train.loop import make_optimizer, masked_bce


@pytest.fixture(scope="module")
def built() -> torch.nn.Module:
    """One 3-label binary-relevance model (each test works on a copy)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return create_model("mobilenet_v3_small", num_labels=3, binary_relevance=True)


def test_k_single_logit_models_give_k_logits_and_one_label_is_the_plain_model(built):
    model = copy.deepcopy(built)
    assert isinstance(model, PerLabelModels) and len(model.per_label) == 3
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    out = model(x)
    assert out.shape == (2, 3)
    for k, sub in enumerate(model.per_label):  # column k is model k's logit
        assert torch.allclose(out[:, k : k + 1], sub(x))
    one = create_model("mobilenet_v3_small", num_labels=1, binary_relevance=True)
    plain = create_model("mobilenet_v3_small", num_labels=1)
    assert one.state_dict().keys() == plain.state_dict().keys()


def test_a_labels_loss_trains_its_own_model_only(built):
    model = copy.deepcopy(built)
    model.train()
    x = torch.rand(2, 3, 32, 32)
    nan = float("nan")
    y = torch.tensor([[nan, 1.0, nan], [nan, 0.0, nan]])
    before = [{n: p.detach().clone() for n, p in sub.named_parameters()}
              for sub in model.per_label]
    opt = make_optimizer(TrialConfig(lr=1e-2), model.parameters())
    opt.zero_grad(set_to_none=True)
    masked_bce(model(x).float(), y, torch.ones_like(y)).backward()
    opt.step()
    for k, sub in enumerate(model.per_label):
        changed = any(not torch.equal(p, before[k][n]) for n, p in sub.named_parameters())
        assert changed == (k == 1), k  # only label 1 is known: only model 1 moves


def test_a_binary_relevance_checkpoint_is_rebuilt_by_the_predictor(tmp_path, built):
    from raysearch.data.dataset import Task
    from raysearch.experiment import read_trial_checkpoint
    from raysearch.inference.predictor import load_member_model

    task = Task(name="chest", labels=("Edema", "Effusion", "Atelectasis"), group="view")
    model = copy.deepcopy(built).eval()
    ckpt = tmp_path / "checkpoint_000001"
    ckpt.mkdir()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    (ckpt / "model.pt").write_bytes(buf.getvalue())
    cfg = TrialConfig(arch="mobilenet_v3_small", weights="none", image_size=32,
                      binary_relevance=True)
    (ckpt / "trial.json").write_text(json.dumps(cfg.to_dict()))
    (ckpt / "task.json").write_text(json.dumps(task.to_dict()))
    member = read_trial_checkpoint("t1", str(ckpt), with_val=False)
    assert member.config.binary_relevance is True
    again = load_member_model(member, k=3, device=torch.device("cpu"))
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(again(x), model(x))
    # a checkpoint from before the option (no key in trial.json) is a joint model
    (ckpt / "trial.json").write_text(json.dumps(
        {k: v for k, v in cfg.to_dict().items() if k != "binary_relevance"}))
    assert read_trial_checkpoint("t1", str(ckpt), with_val=False).config.binary_relevance is False


def test_binary_relevance_is_a_search_space_choice(tmp_path, tiny_root):
    from raysearch.errors import ConfigError
    from raysearch.search.space import load_search_space

    text = f"""
name: br
data: {{root: {tiny_root}}}
search: {{num_samples: 4, algorithm: random, seed: 0}}
scheduler: {{kind: fifo, max_epochs: 1, grace_period: 1}}
storage: {tmp_path}/reports
trial: {{weights: none, arch: mobilenet_v3_small, image_size: 32}}
space:
  binary_relevance: {{choice: [false, true]}}
"""
    path = tmp_path / "br.yaml"
    path.write_text(text)
    spec = load_search_space(str(path))
    assert {spec.trial_config({"binary_relevance": v}).binary_relevance
            for v in (False, True)} == {False, True}
    path.write_text(text.replace("[false, true]", "[false, maybe]"))
    with pytest.raises(ConfigError, match="binary_relevance"):
        load_search_space(str(path))
