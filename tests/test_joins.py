"""The reparam fast path: for modules linear in their parameters (Linear, Embedding, norms) a weight
delta's contribution is computed as f(x; delta), one extra cheap call, rather than by running the
module again with w + delta."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import deltakit
from deltakit.joins import linear_in_params


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)

    def forward(self, x):
        return self.norm(self.proj(x))


def test_fast_path_applies_with_deltas_attached():
    model = Tiny()
    h = deltakit.attach(model, "lnfit@norm; full@proj")
    assert linear_in_params(model.norm) and linear_in_params(model.proj)   # the deltakit child is ignored
    h.detach()


def test_fast_path_equals_running_with_updated_weights():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(4, 64)
    h = deltakit.attach(model, "lnfit@norm; full@proj")
    for p in h.parameters():
        torch.nn.init.normal_(p, std=0.1)   # full holds values, lnfit a delta
    lnfit, full = (e.module for e in h.entries)
    with torch.no_grad():
        y = torch.nn.functional.linear(x, full.values()["weight"], full.values()["bias"])
        want = torch.nn.functional.layer_norm(y, (64,), model.norm.weight + lnfit.weight, model.norm.bias)
        assert torch.allclose(model(x), want, atol=1e-5)
