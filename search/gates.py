"""The shifted global sigmoid: one logit a_i per candidate, gate p_i = sigmoid((a_i - b) / beta),
with the global shift b solved at every step so that the expected parameter count
sum_i n_i p_i equals the budget B. b is a constant for autograd (S3PET's `shift_detach`).

The authors solve for b with scipy's fsolve, warm-started and never checked. Here b is the root
of a strictly decreasing function of b, found by bisection in float64 inside an exact bracket:
    lo = min(a) - beta * logit(B/N)   (every p_i >= B/N, so the sum >= B)
    hi = max(a) - beta * logit(B/N)   (every p_i <= B/N, so the sum <= B)
with N = sum n_i. Bisection cannot diverge or stall, needs no starting point, and stops at the
resolution of float64; the equation then holds to about 1e-12 relative for any beta and budget.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .errors import BudgetError, SearchError


def expit(x):
    """The logistic function in float64, without overflow for any x (0.5 (1 + tanh(x/2)))."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def expected_params(a, n, b: float, beta: float) -> float:
    return float(np.dot(n, expit((np.asarray(a, np.float64) - b) / beta)))


def solve_shift(a, n, budget: float, beta: float = 1.0, max_iter: int = 4000) -> float:
    """The shift b with sum_i n_i sigmoid((a_i - b)/beta) = budget (float64 bisection)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    n = np.asarray(n, dtype=np.float64).ravel()
    total = float(n.sum())
    if not (beta > 0 and math.isfinite(beta)):
        raise BudgetError(f"gate temperature beta={beta} must be a positive number")
    if not 0 < budget < total:
        raise BudgetError(f"budget {budget:,.0f} must be between 0 and the whole space ({total:,.0f} params)")
    if not np.all(np.isfinite(a)):
        raise SearchError("the gate logits are no longer finite numbers: the search diverged; lower its learning "
                          "rates (--lr-logits, --lr-weights, --lr-fixed) and start again")
    t = math.log(budget) - math.log(total - budget)     # logit(B/N), exact for tiny and huge ratios
    lo, hi = float(a.min()) - beta * t, float(a.max()) - beta * t
    if lo == hi:                                      # all logits equal: p_i = B/N exactly
        return lo

    def f(b):
        return expected_params(a, n, b, beta) - budget

    f_lo, f_hi = f(lo), f(hi)
    best = min(((abs(f_lo), lo), (abs(f_hi), hi)))
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:                    # adjacent floats: as close as float64 gets
            break
        f_mid = f(mid)
        best = min(best, (abs(f_mid), mid))
        if f_mid == 0 or abs(f_mid) <= 1e-14 * budget:
            break
        if f_mid > 0:
            lo = mid
        else:
            hi = mid
    return best[1]


def logistic_noise(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """log(u/(1-u)), u ~ U(0,1): the noise of a binary-concrete sample at temperature 1."""
    u = torch.rand(n, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return (torch.log(u) - torch.log1p(-u)).to(dtype)


class Gates(nn.Module):
    """Logits (init 0) and the shifted global sigmoid over candidates of sizes `sizes`."""

    def __init__(self, sizes, budget: float, beta: float = 1.0, project: bool = True):
        super().__init__()
        self.sizes = np.asarray(sizes, dtype=np.float64)
        self.budget, self.beta, self.project = float(budget), float(beta), project
        self.logits = nn.Parameter(torch.zeros(len(self.sizes)))
        solve_shift(self.logits.detach().numpy(), self.sizes, self.budget, self.beta)   # validates now

    def shift(self) -> float:
        return solve_shift(self.logits.detach().double().numpy(), self.sizes, self.budget, self.beta)

    def logit_of_p(self, b: float) -> torch.Tensor:
        """logit(p) as a function of the logits, with the optional zero-sum gradient projection
        p~ = p * stopgrad(sum p) / sum p (forward value unchanged; raising one gate lowers the others)."""
        x = (self.logits - b) / self.beta
        if not self.project:
            return x
        p = torch.sigmoid(x)
        s = p.sum()
        p = (p * (s.detach() / s)).clamp(1e-7, 1 - 1e-7)
        return torch.log(p) - torch.log1p(-p)

    def probs(self, b: float | None = None) -> torch.Tensor:
        b = self.shift() if b is None else b
        return torch.sigmoid(self.logit_of_p(b))

    def sample(self, b: float, noise: torch.Tensor | None) -> torch.Tensor:
        """Soft gates z: sigmoid(logit(p) + noise) in training, p itself when noise is None."""
        x = self.logit_of_p(b)
        return torch.sigmoid(x if noise is None else x + noise)
