"""The shifted global sigmoid (shift solves the budget equation), the gate relaxation, and the
discretisation (greedy knapsack never over budget; random structures too)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from search.discretize import greedy_knapsack, random_structure, structure_cost
from search.errors import BudgetError
from search.gates import Gates, expected_params, solve_shift


@pytest.mark.parametrize("beta", [1e-3, 0.05, 1.0, 30.0, 1e3])
@pytest.mark.parametrize("ratio", [1e-7, 1e-4, 0.01, 0.3, 0.9, 0.999999])
def test_shift_solves_budget_equation(beta, ratio):
    rng = np.random.default_rng(int(beta * 1000) + int(ratio * 1e7))
    for trial in range(6):
        n = rng.integers(1, 10 ** rng.integers(1, 7), size=rng.integers(1, 2000)).astype(np.float64)
        scale = [0.0, 0.01, 1.0, 10.0, 300.0, 1e4][trial]
        a = rng.normal(0, scale, size=n.shape)
        budget = max(0.5, ratio * n.sum())
        if budget >= n.sum():
            continue
        b = solve_shift(a, n, budget, beta)
        assert expected_params(a, n, b, beta) == pytest.approx(budget, rel=1e-6)


def test_shift_ties_and_errors():
    n = np.array([10.0, 20.0, 30.0])
    b = solve_shift(np.zeros(3), n, 6.0, 1.0)     # all logits equal: p = B/N
    assert expected_params(np.zeros(3), n, b, 1.0) == pytest.approx(6.0, rel=1e-12)
    for bad in (0.0, -1.0, 60.0, 100.0):
        with pytest.raises(BudgetError):
            solve_shift(np.zeros(3), n, bad)
    with pytest.raises(BudgetError):
        solve_shift(np.zeros(3), n, 6.0, beta=0.0)


def test_gates_init_eval_and_projection():
    sizes = [768, 1920, 384, 384, 1248]
    g = Gates(sizes, budget=1000, beta=1.0, project=True)
    p = g.probs()
    assert torch.allclose(p, torch.full((5,), 1000 / sum(sizes)), atol=1e-6)   # logits start at 0
    assert torch.equal(g.sample(g.shift(), None), p)                           # evaluation: p itself
    with torch.no_grad():
        g.logits.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]))
    b = g.shift()
    assert float((g.probs(b).detach().double() * torch.tensor(sizes, dtype=torch.float64)).sum()) == pytest.approx(1000, rel=1e-5)
    # the projection leaves values alone and makes the gradient of sum(p) vanish (zero-sum)
    p = g.probs(b)
    plain = torch.sigmoid((g.logits - b) / g.beta)
    assert torch.allclose(p, plain.clamp(1e-7, 1 - 1e-7), atol=1e-6)
    grad, = torch.autograd.grad(g.probs(b).sum(), g.logits)
    assert grad.abs().max() < 1e-5
    # noise: a sample is a proper relaxation in (0, 1), different from p
    z = g.sample(b, torch.randn(5))
    assert ((z > 0) & (z < 1)).all() and not torch.allclose(z, p)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(1, 10 ** 6)), min_size=1, max_size=60),
       st.integers(1, 3 * 10 ** 7))
def test_knapsack_never_exceeds_budget(items, budget):
    p = [x for x, _ in items]
    sizes = [n for _, n in items]
    chosen = greedy_knapsack(p, sizes, budget)
    used = structure_cost(chosen, sizes)
    assert used <= budget
    assert len(set(chosen)) == len(chosen)
    for i in set(range(len(sizes))) - set(chosen):   # greedy: nothing left out would still fit
        assert used + sizes[i] > budget
    rand = random_structure(sizes, budget, seed=budget)
    assert structure_cost(rand, sizes) <= budget


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=2, max_size=30), st.integers(1, 50_000), st.integers(0, 3000))
def test_knapsack_with_shared_groups(sizes, budget, shared):
    groups = ["g" if i % 2 else None for i in range(len(sizes))]
    p = np.linspace(1, 0, len(sizes))
    for chosen in (greedy_knapsack(p, sizes, budget, groups, {"g": shared}),
                   random_structure(sizes, budget, 0, groups, {"g": shared})):
        assert structure_cost(chosen, sizes, groups, {"g": shared}) <= budget


def test_knapsack_prefers_high_p():
    assert greedy_knapsack([0.1, 0.9, 0.5, 0.8], [10, 10, 10, 25], 30) == [0, 1, 2]   # 0.8's 25 no longer fits: skipped
    assert greedy_knapsack([0.1, 0.9, 0.5, 0.8], [10, 10, 10, 20], 30) == [1, 3]
