"""CPM-Ant 10B (native model, random weights, bf16, frozen): a LoRA training step with deltakit and with
PEFT on the same model and batch, tokens/s and peak GPU memory, plus merged inference against the bare
backbone. Needs a GPU with about 40 GB free for batch 1 at length 1024.

    python -m benchmarks.cpmant_10b --out cpmant_10b.json                 # on a GPU
    python -m benchmarks.cpmant_10b --config tiny --device cpu --seq 32   # smoke run of seconds

One model is built once; each library attaches its LoRA (r=8, alpha=16 on q and v, 6,291,456
parameters), runs its steps and is removed again, round-robin over repetitions with the order reversed
every other round, so drift hits both alike. Peak memory is torch.cuda.max_memory_allocated over the
model's own bytes for the steady-state step of each library.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

import deltakit
from deltakit.backbones import cpmant

SPEC = "lora(r=8,alpha=16)@attn.q,attn.v"
# --libs names: PEFT's LoRA, or a deltakit spec (LoRA as above; prefix and prompt deltas through the
# native model's own key/value path and prompt rows, which PEFT cannot reach on this model).
DELTAKIT = {"deltakit": SPEC, "prefix": "prefix(n=32)@attn", "prompt": "prompt@prompt"}
warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def attach(lib, model):
    """(model to call, remove()) for one library's LoRA on `model`."""
    torch.manual_seed(0)
    if lib in DELTAKIT:
        h = deltakit.attach(model, DELTAKIT[lib])
        return model, [p for p in h.parameters()], h.detach
    from peft import LoraConfig, get_peft_model
    wrapped = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["project_q", "project_v"]))
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad], wrapped.unload


def lm_loss(model, batch, P: int):
    """Next-token loss on the text positions (the first P positions are the task's prompt)."""
    logits = model(**batch)[0][:, P:-1]
    return F.cross_entropy(logits.float().flatten(0, 1), batch["input"][:, P + 1:].flatten())


def make_batch(cfg, batch: int, seq: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, cfg.vocab_size, (batch, seq), generator=g).tolist()
    # A CUGE-style prefix LM: the first half is context, the rest is predicted causally.
    return cpmant.make_inputs(cfg, ids, task_id=1, context=[seq // 2] * batch, device=device)


def measure(model, batch_size: int, args, device) -> dict:
    """Training steps of each library, round-robin, and merged vs bare inference, at one batch size."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg, libs = model.config, args.libs.split(",")
    batch = make_batch(cfg, batch_size, args.seq, device)
    tokens = batch_size * (args.seq + cfg.prompt_length)
    model_bytes = torch.cuda.memory_allocated() if cuda else 0

    def run_steps(lib, n):
        called, params, remove = attach(lib, model)
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        try:
            for i in range(n + 1):   # step 0 allocates the optimizer state: not timed
                if cuda and i == 1:
                    torch.cuda.reset_peak_memory_stats()
                sync(); t = time.perf_counter()
                loss = lm_loss(called, batch, cfg.prompt_length)
                loss.backward()
                opt.step(); opt.zero_grad(set_to_none=True)
                sync()
                if i:
                    times.append(time.perf_counter() - t)
            peak = (torch.cuda.max_memory_allocated() - model_bytes) / 2**30 if cuda else 0.0
            return times, peak, sum(p.numel() for p in params), loss.item()
        finally:
            del opt
            remove()

    times, peaks, counts, losses = {lib: [] for lib in libs}, {}, {}, {}
    for rep in tqdm(range(args.reps), desc=f"batch {batch_size}: train reps"):
        for lib in (libs if rep % 2 == 0 else libs[::-1]):
            t, peak, n, loss = run_steps(lib, args.steps)
            times[lib] += t
            peaks[lib], counts[lib], losses[lib] = max(peaks.get(lib, 0), peak), n, loss

    with torch.no_grad():   # merged inference vs the bare backbone, interleaved the same way
        def fwd():
            sync(); t = time.perf_counter(); model(**batch); sync(); return time.perf_counter() - t

        def merged_lora():   # the LoRA folded into the weights; detach() later unmerges and removes it
            torch.manual_seed(0)
            h = deltakit.attach(model, SPEC)
            for p in h.parameters():
                p.normal_(0, 0.01)
            h.merge()
            return h

        infer = {"bare": [], "merged": []}
        for rep in range(args.reps):
            for state in (("bare", "merged") if rep % 2 == 0 else ("merged", "bare")):
                h = merged_lora() if state == "merged" else None
                fwd()
                infer[state] += [fwd() for _ in range(args.steps)]
                if h is not None:
                    h.detach()

    med = {lib: statistics.median(times[lib]) for lib in libs}
    result = {"batch": batch_size, "tokens_per_step": tokens, "trainable": counts, "last_loss": losses,
              "step_s": {lib: {"median": med[lib], "all": times[lib]} for lib in libs},
              "tokens_per_s": {lib: tokens / med[lib] for lib in libs}, "peak_over_model_gib": peaks,
              "inference_s": {k: statistics.median(v) for k, v in infer.items()}}
    result["merged_over_bare"] = result["inference_s"]["merged"] / result["inference_s"]["bare"]
    if "peft" in libs and "deltakit" in libs:
        result["step_ratio_deltakit_over_peft"] = med["deltakit"] / med["peft"]
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpm-ant-10b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", default="1", help="batch sizes, comma-separated: each is measured in turn")
    ap.add_argument("--seq", type=int, default=1024, help="text tokens per sample (the prompt positions come on top)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per library per repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    ap.add_argument("--libs", default="deltakit,peft", help=f"peft and/or {', '.join(DELTAKIT)}")
    ap.add_argument("--out")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"

    t0 = time.perf_counter()
    model = cpmant.build(args.config, dtype=dtype, device=device)
    model.requires_grad_(False)
    model.encoder.gradient_checkpointing = args.checkpointing
    model.train(args.checkpointing)   # train mode only switches checkpointing on: dropout is 0
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "config": args.config, "dtype": args.dtype, "seq_text": args.seq, "checkpointing": args.checkpointing,
              "backbone_params": sum(p.numel() for p in model.parameters()),
              "model_gib": (torch.cuda.memory_allocated() if cuda else 0) / 2**30,
              "build_s": time.perf_counter() - t0, "runs": []}

    console = Console()
    table = Table(title=f"CPM-Ant {args.config} {args.dtype}, {args.seq}+{model.config.prompt_length} tokens per "
                        f"sample, {report['device']}" + (", checkpointing" if args.checkpointing else ""))
    for col in ("batch", "library", "trainable", "step s", "tokens/s", "peak GiB over model",
                "deltakit/PEFT", "merged/bare infer"):
        table.add_column(col)
    for b in (int(x) for x in args.batch.split(",")):
        r = measure(model, b, args, device)
        report["runs"].append(r)
        for lib in r["trainable"]:
            table.add_row(str(b), lib, f"{r['trainable'][lib]:,}", f"{r['step_s'][lib]['median']:.4f}",
                          f"{r['tokens_per_s'][lib]:,.0f}", f"{r['peak_over_model_gib'][lib]:.2f}",
                          f"{r.get('step_ratio_deltakit_over_peft', float('nan')):.3f}", f"{r['merged_over_bare']:.3f}")
        if args.out:   # written after every batch size, so a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
    console.print(table)
    console.print(f"backbone {report['backbone_params']:,} parameters, {report['model_gib']:.1f} GiB, "
                  f"built in {report['build_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
