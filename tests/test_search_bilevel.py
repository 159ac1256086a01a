"""The second-order (DARTS) logit gradient against direct finite differences on a tiny float64
problem, the virtual AdamW step against torch's AdamW, and bit-exact restoring of the weights."""
import pytest
import torch

from search.bilevel import first_order_grad, second_order_grad, virtual_adamw



@pytest.fixture(autouse=True)
def _float64():
    # float64 for this module only: a module-level set_default_dtype would leak into every other test
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(3, 4, generator=g, requires_grad=True)
    W2 = torch.randn(3, generator=g, requires_grad=True)
    alpha = torch.randn(3, generator=g, requires_grad=True)
    Xt, Xv = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    yt, yv = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def loss(X, y, w1, w2, a):
        z = torch.sigmoid(a)
        pred = (torch.tanh(X @ w1.t()) * z) @ w2 + 0.1 * (z ** 2).sum()
        return ((pred - y) ** 2).mean()

    opt = torch.optim.AdamW([W1, W2], lr=0.05, weight_decay=0.0)
    for _ in range(3):   # give AdamW some moments
        opt.zero_grad()
        loss(Xt, yt, W1, W2, alpha).backward()
        opt.step()
    opt.zero_grad()
    return W1, W2, alpha, (Xt, yt), (Xv, yv), loss, opt


def test_virtual_adamw_matches_torch_adamw():
    W1, W2, alpha, (Xt, yt), _, loss, opt = _problem()
    grads = torch.autograd.grad(loss(Xt, yt, W1, W2, alpha), [W1, W2])
    values, _ = virtual_adamw([W1, W2], grads, opt)
    for w, gr in zip([W1, W2], grads):
        w.grad = gr.clone()
    opt.step()
    assert torch.allclose(values[0], W1, atol=1e-12) and torch.allclose(values[1], W2, atol=1e-12)


@pytest.mark.parametrize("jacobian", ["adamw", "lr"])
def test_second_order_matches_direct_finite_differences(jacobian):
    W1, W2, alpha, (Xt, yt), (Xv, yv), loss, opt = _problem(1)
    lr = opt.param_groups[0]["lr"]

    def grad_trn(a):
        w = [W1.detach().clone().requires_grad_(), W2.detach().clone().requires_grad_()]
        return w, torch.autograd.grad(loss(Xt, yt, *w, a), w)

    w0, g0 = grad_trn(alpha.detach())
    fixed, _ = virtual_adamw(w0, g0, opt, keys=[W1, W2])

    def unrolled(a):   # L_val(w'(a), a) with the virtual AdamW step w'(a)
        w, gr = grad_trn(a)
        if jacobian == "adamw":    # exact: AdamW's step as a function of the gradient
            new, _ = virtual_adamw(w, gr, opt, keys=[W1, W2])
        else:   # DARTS/S3PET: the step at a0, moved by -lr * (change of the gradient)
            new = [f - lr * (x - x0) for f, x, x0 in zip(fixed, gr, g0)]
        return loss(Xv, yv, *new, a).item()

    before = [W1.detach().clone(), W2.detach().clone()]
    got = second_order_grad(alpha, [W1, W2], opt, lambda: loss(Xt, yt, W1, W2, alpha),
                            lambda: loss(Xv, yv, W1, W2, alpha), jacobian=jacobian)
    assert torch.equal(W1, before[0]) and torch.equal(W2, before[1])     # weights restored bit-exactly
    h = 1e-6
    direct = torch.zeros(3)
    for j in range(3):
        e = torch.zeros(3); e[j] = h
        direct[j] = (unrolled(alpha.detach() + e) - unrolled(alpha.detach() - e)) / (2 * h)
    first = first_order_grad(alpha, lambda: loss(Xv, yv, W1, W2, alpha))
    assert not torch.allclose(direct, first, rtol=1e-3)    # the second-order term matters here
    assert torch.allclose(got, direct, rtol=2e-4, atol=1e-7), (got, direct)
