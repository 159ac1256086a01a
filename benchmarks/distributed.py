"""FSDP2 sharding of a frozen CPM-Ant with LoRA: step time and memory per rank, 2 processes against
1 (and against the plain, unsharded model in one process).

    python -m benchmarks.distributed --out benchmarks/results/distributed_cpu     # about 3 min on 2 CPU cores
    python -m benchmarks.distributed --config tiny --steps 1 --out /tmp/d         # smoke run of seconds
    python -m benchmarks.distributed --device cuda --config cpm-ant-10b --worlds 1 --out 10b   # one GPU

A random bf16 checkpoint of the config is written once (safetensors). Then each variant runs in its
own processes, started by torchrun: `plain` loads it whole into one process (cpmant.load_cpmant),
`fsdp-N` loads it with deltakit.distributed.load_sharded on N ranks (meta build, shard, each rank
reads its slices), LoRA r=8 on q and v as for the 10B, one global batch split over the ranks, AdamW.
Per rank it reports the exact bytes held (the backbone's shards, the deltas, their gradients and
optimizer state, counted from the tensors), the peak resident memory of the process (CUDA: peak
allocated), and the median step time after a warm-up step. Results: JSON, a table and a picture.
On the CPU the resident set of `plain` counts its weights as pages of the memory-mapped file, those
of `fsdp-N` as the copies of its slices; both are in the peak (VmHWM).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

SPEC = "lora(r=8,alpha=16)@attn.q,attn.v"
# A mid-sized CPM-Ant: the 10B's vocabulary, prompts and position buckets, 1/4 of its width, 12 layers (177 M)
CONFIGS = {"mid": dict(dim_model=1024, dim_ff=2560, num_layers=12, num_heads=16, dim_head=64)}


def config(name):
    from deltakit.backbones import cpmant
    if name in CONFIGS:
        return replace(cpmant.CONFIGS["cpm-ant-10b"], **CONFIGS[name])
    return cpmant.config(name)


# ---- one rank -------------------------------------------------------------------------------------

def tensor_bytes(tensors) -> int:
    from deltakit.distributed import is_dtensor
    return sum((t.to_local() if is_dtensor(t) else t).numel() * t.element_size() for t in tensors)


def memory(device) -> dict:
    """Bytes: CUDA's peak allocation; on the CPU the peak resident set (VmHWM, which counts the pages
    of a memory-mapped checkpoint that were read) and the anonymous memory now (RssAnon: tensors)."""
    if device.type == "cuda":
        return {"peak": torch.cuda.max_memory_allocated(device), "now": torch.cuda.memory_allocated(device)}
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda k: int(fields[k].split()[0]) * 1024
    return {"peak": kib("VmHWM"), "now": kib("RssAnon")}


def reset_peak(device):
    """Start a new peak: CUDA's counter, or the kernel's high-water mark of this process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:   # not allowed here: the peak then includes loading
        pass


def batch(cfg, size: int, seq: int, device, rank: int, world: int):
    from deltakit.backbones import cpmant
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, cfg.vocab_size, (size, seq), generator=g).tolist()
    share = size // world
    mine = ids[rank * share:(rank + 1) * share]
    return cpmant.make_inputs(cfg, mine, task_id=1, context=[seq // 2] * len(mine), device=device)


def lm_loss(model, x, P):
    logits = model(**x)[0][:, P:-1]
    return F.cross_entropy(logits.float().flatten(0, 1), x["input"][:, P + 1:].flatten())


def worker(args):
    import deltakit
    from deltakit import distributed as dist
    from deltakit.backbones import cpmant
    cfg = config(args.config)
    sharded = args.worker == "fsdp"
    if sharded:
        dist.init()
    device = dist.device() if sharded else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = dist.rank(), dist.world_size()
    start = memory(device)
    t0 = time.perf_counter()
    if sharded:
        h = dist.load_sharded(lambda d: cpmant.build(cfg, torch.bfloat16, d), args.checkpoint,
                              lambda m: deltakit.attach(m, SPEC), seed=0, checkpointing=args.checkpointing)
    else:
        model = cpmant.load_cpmant(args.checkpoint, cfg, dtype=torch.bfloat16, device=str(device))
        torch.manual_seed(0)
        h = deltakit.attach(model, SPEC)
    load_s = time.perf_counter() - t0
    gc.collect()
    loaded = memory(device)
    reset_peak(device)
    model = h.model.train()
    opt = torch.optim.AdamW(h.parameters(), lr=1e-4)
    x = batch(cfg, args.batch, args.seq, device, rank, world)
    times, losses = [], []
    for step in range(args.steps + 1):   # step 0 allocates gradients and optimizer state: not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = lm_loss(model, x, cfg.prompt_length)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)   # keep the gradients, to count them below
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t)
        losses.append(dist.reduce({"l": loss.item()}, "mean")["l"] if sharded else loss.item())
    backbone = [p for _, p in deltakit.backbone_params(model)]
    state = [v for p in h.parameters() for v in opt.state[p].values() if torch.is_tensor(v)]
    report = {
        "variant": f"fsdp-{world}" if sharded else "plain", "rank": rank, "world": world, "config": args.config,
        "backbone_params": sum(p.numel() for p in backbone), "trainable": h.num_trainable,
        "backbone_bytes": tensor_bytes(backbone), "delta_bytes": tensor_bytes(h.parameters()),
        "grad_bytes": tensor_bytes(p.grad for p in h.parameters() if p.grad is not None),
        "backbone_grads": sum(p.grad is not None for p in backbone),
        "optimizer_bytes": tensor_bytes(state), "optimizer_tensors": len(opt.state),
        "delta_tensors": len(h.parameters()), "start_bytes": start["now"], "load_peak_bytes": loaded["peak"],
        "step_peak_bytes": memory(device)["peak"], "after_bytes": memory(device)["now"],
        "load_s": load_s, "step_s": statistics.median(times), "steps": times, "losses": losses,
        "tokens_per_step": args.batch * (args.seq + cfg.prompt_length), "device": str(device.type),
        "threads": torch.get_num_threads(),
    }
    Path(args.report).with_name(f"{Path(args.report).stem}-rank{rank}.json").write_text(json.dumps(report, indent=1))
    if sharded:
        dist.shutdown()


# ---- the launcher ------------------------------------------------------------------------------------

def write_checkpoint(cfg, path: Path):
    from deltakit.backbones import cpmant
    from deltakit.distributed import to_safetensors
    torch.manual_seed(0)
    model = cpmant.build(cfg, torch.bfloat16)
    to_safetensors(model.state_dict(), path)


def run_variant(variant: str, world: int, args, ckpt: Path, out: Path) -> list[dict]:
    report = out / f"{variant}.json"
    common = ["--checkpoint", str(ckpt), "--report", str(report), "--config", args.config, "--steps", str(args.steps),
              "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device]
    common += ["--checkpointing"] if args.checkpointing else []
    # glibc keeps freed blocks of up to 32 MiB in its heap once its threshold has adapted (FSDP frees a
    # gathered block after each use): a fixed small threshold hands them back, so RSS follows the tensors
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if variant == "plain":
        cmd = [sys.executable, "-m", "benchmarks.distributed", "--worker", "plain", *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "benchmarks.distributed", "--worker", "fsdp", *common]
    subprocess.run(cmd, env=env, check=True)
    return [json.loads((out / f"{variant}-rank{r}.json").read_text()) for r in range(world)]


def computed(cfg, shards: int) -> dict:
    """deltakit.distributed.memory_per_rank of the config on the meta device (what the table compares)."""
    import deltakit
    from deltakit import distributed as dist
    from deltakit.backbones import cpmant
    model = cpmant.build(cfg, torch.bfloat16, "meta")
    deltakit.attach(model, SPEC)
    return dist.memory_per_rank(model, shards)


def summarise(results: dict, out: Path):
    from rich.console import Console
    from rich.table import Table
    mib = 2 ** 20
    table = Table(title=f"CPM-Ant {next(iter(results.values()))[0]['config']}: LoRA step, per rank")
    for col in ("variant", "backbone MiB", "computed", "deltas+grads+Adam MiB", "load peak MiB", "step peak MiB",
                "step s", "loss"):
        table.add_column(col, justify="right")
    for variant, ranks in results.items():
        r = ranks[0]
        table.add_row(variant, f"{r['backbone_bytes'] / mib:.1f}", f"{r['computed']['backbone_shard'] / mib:.1f}",
                      f"{(r['delta_bytes'] + r['grad_bytes'] + r['optimizer_bytes']) / mib:.2f}",
                      f"{max(x['load_peak_bytes'] for x in ranks) / mib:.0f}",
                      f"{max(x['step_peak_bytes'] for x in ranks) / mib:.0f}",
                      f"{max(x['step_s'] for x in ranks):.3f}", f"{r['losses'][-1]:.4f}")
    Console(width=150).print(table)
    plot(results, out / "distributed.png")


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mib = 2 ** 20
    names = list(results)
    first = [results[n][0] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    backbone = [r["backbone_bytes"] / mib for r in first]
    extra = [(r["delta_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]) / mib for r in first]
    ax1.bar(names, backbone, label="backbone (shard)")
    ax1.bar(names, extra, bottom=backbone, label="deltas + grads + AdamW")
    ax1.plot(names, [max(x["step_peak_bytes"] for x in results[n]) / mib for n in names], "ko-",
             label="peak in the steps (RSS / CUDA)")
    ax1.set_ylabel("MiB per rank")
    ax1.legend()
    ax2.bar(names, [max(x["step_s"] for x in results[n]) for n in names], color="tab:green")
    ax2.set_ylabel("step time, s (slowest rank)")
    fig.suptitle(f"CPM-Ant {first[0]['config']}, {SPEC}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="mid", help="mid (177 M), tiny, or a CPM-Ant config name or JSON")
    ap.add_argument("--worlds", default="1,2", help="numbers of ranks to shard over")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="global batch (split over the ranks)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--out", default="benchmarks/results/distributed_cpu")
    ap.add_argument("--worker", choices=["plain", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    from deltakit.io import write_json
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    worlds = [int(w) for w in args.worlds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp, "backbone.safetensors")
        write_checkpoint(config(args.config), ckpt)
        results = {"plain": run_variant("plain", 1, args, ckpt, out)}
        for world in worlds:
            results[f"fsdp-{world}"] = run_variant(f"fsdp-{world}", world, args, ckpt, out)
    for variant, ranks in results.items():
        for r in ranks:
            r["computed"] = computed(config(args.config), r["world"])
    write_json(out / "summary.json", {"command": " ".join(["python -m benchmarks.distributed", *(argv or sys.argv[1:])]),
                                      "spec": SPEC, "results": results})
    summarise(results, out)


if __name__ == "__main__":
    main()
