"""Bi-level optimisation of delta weights w (on one half of the training data) and gate logits a
(on the other half), as DARTS / S3PET do it.

First order: a.grad = d L_val(w, a) / da.
Second order: unroll one virtual AdamW step w' = w - step(grad_w L_trn(w, a)) and differentiate
L_val(w'(a), a):
    d/da L_val(w'(a), a) = grad_a L_val(w', a) - H v,  v = J * grad_w' L_val(w', a),
    H v = [grad_a L_trn(w + eps v, a) - grad_a L_trn(w - eps v, a)] / (2 eps),  eps = 0.01 / |v|
J is the (diagonal) derivative of the virtual step with respect to the gradient. `jacobian="lr"`
uses J = lr, as DARTS and the S3PET code do (exact for an SGD virtual step); `jacobian="adamw"`
uses AdamW's exact diagonal derivative, so the result is the true hypergradient up to the
finite difference. One backbone: w is moved in place and restored bit-exactly.
"""
from __future__ import annotations

import torch


def _grads(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def virtual_adamw(weights, grads, optimizer, keys=None):
    """One AdamW step from the optimizer's current state (not modifying it): new values of the
    weights, and the diagonal of d(new value)/d(grad). `keys`: the parameters whose optimizer state
    to use, when `weights` are stand-ins for them."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    values, jac = [], []
    for w, g, key in zip(weights, grads, keys or weights):
        group = groups[id(key)]   # each parameter steps with its own group's settings
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        st = optimizer.state.get(key, {})
        m = st.get("exp_avg", torch.zeros_like(w))
        v = st.get("exp_avg_sq", torch.zeros_like(w))
        t = float(st.get("step", 0)) + 1
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        m1 = b1 * m + (1 - b1) * g
        v1 = b2 * v + (1 - b2) * g * g
        mhat, root = m1 / bc1, (v1 / bc2).sqrt()
        values.append(w * (1 - lr * wd) - lr * mhat / (root + eps))
        droot = torch.where(root > 0, (1 - b2) * g / (bc2 * root.clamp_min(1e-30)), torch.zeros_like(root))
        jac.append(-lr * ((1 - b1) / bc1 / (root + eps) - mhat * droot / (root + eps) ** 2))
    return values, jac


def second_order_grad(alpha, weights, w_optimizer, loss_trn, loss_val, jacobian: str = "lr"):
    """The DARTS second-order gradient for the logits `alpha`. loss_trn()/loss_val() must compute the
    losses from the current weights and alpha with this step's fixed noise (and dropout masks)."""
    saved = [w.detach().clone() for w in weights]
    try:
        g = _grads(loss_trn(), weights)
        values, jac = virtual_adamw(weights, g, w_optimizer)
        with torch.no_grad():
            for w, x in zip(weights, values):
                w.copy_(x)
        grads = _grads(loss_val(), [alpha] + list(weights))
        d_alpha, d_w = grads[0], grads[1:]
        if jacobian == "lr":
            lr = {id(p): group["lr"] for group in w_optimizer.param_groups for p in group["params"]}
            v = [lr[id(w)] * d for w, d in zip(weights, d_w)]
        elif jacobian == "adamw":
            v = [-j * d for j, d in zip(jac, d_w)]
        else:
            raise ValueError(f"jacobian={jacobian!r}: use 'lr' or 'adamw'")
        norm = torch.sqrt(sum((x.double() ** 2).sum() for x in v))
        if not norm > 0:
            return d_alpha
        eps = 0.01 / norm.item()
        ga = []
        for sign in (+1, -1):
            with torch.no_grad():
                for w, s, x in zip(weights, saved, v):
                    w.copy_(s + sign * eps * x)
            ga.append(_grads(loss_trn(), [alpha])[0])
        return d_alpha - (ga[0] - ga[1]) / (2 * eps)
    finally:
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)


def first_order_grad(alpha, loss_val):
    return _grads(loss_val(), [alpha])[0]
