"""LoRA, prefix, prompt and hypernetwork deltas trained end to end on tiny CPM-Ant (native), CPM-2 and CPM-1.

CPM-2 and CPM-1 come through their real loaders from fake Megatron shards (tests/test_cpm2.py,
tests/test_cpm1.py write them). Each case trains the delta alone to memorise a fixed sequence, then
checks that the backbone never moved, that save -> detach -> load gives back the trained model and
that detach gives back the bare one, bit for bit."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

import deltakit
import test_cpm1 as t1
import test_cpm2 as t2
from deltakit.backbones import cpm1, cpm2, cpmant
from deltakit.backbones import megatron as mg
from test_cpmant import tiny as cpmant_tiny
from test_families import backbone_params

VOCAB = 96   # all three tiny configs share it


def fixed_ids(seed, b=1, s=8):
    return torch.randint(2, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


# ---- the three backbones: a fresh model, its LM loss and its outputs on one fixed batch ----------

class CPMAnt:
    """Native CPM-Ant: prompt slots of task 1 first, then the text; next-token cross-entropy."""
    P = 4   # tiny config's prompt_length

    def __init__(self, _path):
        self.seq = fixed_ids(11)
        # context=0: the text is causal (context tokens would see the whole row, leaking the target)
        self.x = cpmant.make_inputs(cpmant.config("tiny"), self.seq.tolist(), task_id=1, context=[0])

    def make(self):
        return cpmant_tiny(seed=0)

    def logits(self, model):
        return model(**self.x)[0]

    def loss(self, model):
        text = self.logits(model)[:, self.P:-1]
        return F.cross_entropy(text.reshape(-1, VOCAB), self.seq[:, 1:].reshape(-1))


class CPM2:
    """CPM-2 (MT5): a fixed source and fixed target labels, teacher forced."""

    def __init__(self, path):
        self.path, self.src, self.labels = path, fixed_ids(12), fixed_ids(13, s=8)

    def make(self):
        return cpm2.load_cpm2(self.path, config=cpm2.tiny_config())

    def logits(self, model):
        return model(input_ids=self.src, labels=self.labels).logits

    def loss(self, model):
        return model(input_ids=self.src, labels=self.labels).loss


class CPM1:
    """CPM-1 (GPT-2): next-token cross-entropy via labels=ids."""

    def __init__(self, path):
        self.path, self.seq = path, fixed_ids(14)

    def make(self):
        return cpm1.load_cpm1(self.path, config=cpm1.tiny_config())

    def logits(self, model):
        return model(self.seq).logits

    def loss(self, model):
        return model(self.seq, labels=self.seq).loss


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpm_shards")
    return {"cpmant": None,
            "cpm2": mg.save(root / "cpm2", t2.shard(t2.reference_weights(), 4), iteration=1000),
            "cpm1": mg.save(root / "cpm1", t1.shard(t1.reference_weights(), 2), iteration=1000)}


BACKBONES = {"cpmant": CPMAnt, "cpm2": CPM2, "cpm1": CPM1}

# (backbone, spec, positions the spec must place) -- counts catch a pattern that silently matches less
CASES = [
    ("cpmant", "lora(r=4)@attn.q,attn.v", 2 * 2),
    ("cpmant", "prefix(n=4)@attn", 2),
    ("cpmant", "prompt@prompt", 1),             # a delta on the native prompt rows of the task
    ("cpm2", "lora(r=4)@attn.q,attn.v", 2 * 2 * 2),   # encoder + decoder self attention
    ("cpm2", "prefix(n=4)@attn,cross", 2 + 2 + 2),    # encoder self, decoder self, decoder cross
    ("cpm2", "prompt(n=4)@embed", 1),
    ("cpm1", "lora(r=4)@attn.q,attn.v", 2 * 2),
    ("cpm1", "prefix(n=4)@attn", 2),
    ("cpm1", "prompt(n=4)@embed", 1),
    # one shared hypernetwork generating each position's weights
    ("cpmant", "hyper(lora,r=2)@attn.q,attn.v", 2 * 2),
    ("cpm2", "hyper(adapter,dim=4)@attn,ffn", 2 * 2 * 2),   # encoder + decoder blocks
    ("cpm1", "hyper(prefix,n=4)@attn", 2),
]

STEPS = 60
# 4 prompt vectors act only through attention of a frozen random 2-layer model: a weak lever that
# needs a larger step to halve the loss in 60 steps (tests/test_prefix.py uses 0.1 for the same reason)
LR = {"lora": 2e-2, "prefix": 5e-2, "prompt": 0.2, "hyper": 2e-2}


def kind(spec):
    return spec.split("(")[0].split("@")[0]


def outputs(case, model):
    with torch.no_grad():
        return case.logits(model)


@pytest.mark.parametrize("backbone,spec,n_positions", CASES, ids=[f"{b}-{kind(s)}" for b, s, _ in CASES])
def test_delta_trains_saves_loads_and_detaches(backbone, spec, n_positions, checkpoints, tmp_path):
    case = BACKBONES[backbone](checkpoints[backbone])
    model = case.make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bare = outputs(case, model)

    torch.manual_seed(0)
    h = deltakit.attach(model, spec)
    assert len(h.entries) == n_positions, [e.position.name for e in h.entries]
    start = {n: p.detach().clone() for n, p in h.named_parameters()}
    opt = torch.optim.AdamW(h.parameters(), lr=LR[kind(spec)])
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = case.loss(model)
        loss.backward()
        if step == 0:   # the gradient reaches every delta tensor and nothing else
            assert all(p.grad is not None for p in h.parameters())
            assert all(p.grad is None for _, p in backbone_params(model))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert all(not torch.equal(p, start[n]) for n, p in h.named_parameters()), "every delta tensor trained"
    for k, v in before.items():   # the backbone, bit for bit (delta keys live under `deltakit.`)
        assert torch.equal(model.state_dict()[k], v), k

    trained = outputs(case, model)
    assert trained.shape == bare.shape   # CPM-1 prompt: the caller's sequence length comes back
    assert not torch.allclose(trained, bare, atol=1e-3)
    h.save(tmp_path / "delta")
    h.detach()
    assert torch.equal(outputs(case, model), bare)

    h2 = deltakit.load(model, tmp_path / "delta")
    assert torch.equal(outputs(case, model), trained)
    h2.detach()
    assert torch.equal(outputs(case, model), bare)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())

