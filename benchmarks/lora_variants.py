"""Ways to compute LoRA on q and v of one attention, each against the bare projections (the limit).

    python -m benchmarks.lora_variants                 # e5-small's width: 2048 tokens x 384, r=8, 2 threads
    python -m benchmarks.lora_variants --reps 200 --threads 1

One attention's q, k, v projections (frozen) on an input that requires grad, forward + backward; the
variants add LoRA r=8 at q and v the way PEFT writes it, and the ways deltakit's engine does
(deltas/lora.py, joins/shared_input.py). Interleaved, order reversed every repetition; the overhead is
the median of the paired per-repetition ratios to the limit.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    N, H, r, s = args.tokens, args.width, args.r, 2.0
    g = torch.Generator().manual_seed(0)
    W = [torch.randn(H, H, generator=g) * 0.05 for _ in range(3)]
    b = [torch.zeros(H) for _ in range(3)]
    Aq, Av = (torch.randn(r, H, generator=g).requires_grad_() for _ in range(2))
    Bq, Bv = (torch.randn(H, r, generator=g).mul_(0.01).requires_grad_() for _ in range(2))
    x0, G = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)

    def run(q_v):
        x = x0.clone().requires_grad_()
        base = [F.linear(x, w, bias) for w, bias in zip(W, b)]
        q, v = q_v(x, base[0], base[2])
        ((q + base[1] + v) * G).sum().backward()

    variants = {
        "limit": lambda x, q, v: (q, v),
        "peft: (x A^T B^T) * s": lambda x, q, v: (q + (x @ Aq.t() @ Bq.t()) * s, v + (x @ Av.t() @ Bv.t()) * s),
        "scale on B": lambda x, q, v: (q + x @ Aq.t() @ (Bq.t() * s), v + x @ Av.t() @ (Bv.t() * s)),
        "addmm into the output": lambda x, q, v: (torch.addmm(q, x @ Aq.t(), Bq.t(), alpha=s),
                                                  torch.addmm(v, x @ Av.t(), Bv.t(), alpha=s)),
        "addmm + one x [A_q; A_v]^T (deltakit)": lambda x, q, v: _shared(x, q, v, Aq, Av, Bq, Bv, r, s),
    }
    fns = {name: (lambda f=f: run(f)) for name, f in variants.items()}
    for fn in fns.values():
        for _ in range(3):
            fn()
    times = {k: [] for k in fns}
    for i in range(args.reps):
        for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    print(f"{N} tokens x {H}, r={r}, {args.threads} threads, {args.reps} reps; limit "
          f"{1e3 * statistics.median(times['limit']):.2f} ms")
    for k in list(fns)[1:]:
        over = [t / l - 1 for t, l in zip(times[k], times["limit"])]
        q1, med, q3 = statistics.quantiles(over, n=4)
        print(f"  {k:40s} {100 * med:+6.1f} % [{100 * q1:+.1f}, {100 * q3:+.1f}]")


def _shared(x, q, v, Aq, Av, Bq, Bv, r, s):
    tq, tv = (x @ torch.cat([Aq, Av]).t()).split(r, dim=-1)
    return torch.addmm(q, tq, Bq.t(), alpha=s), torch.addmm(v, tv, Bv.t(), alpha=s)


if __name__ == "__main__":
    main()
