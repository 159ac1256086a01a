"""Speed and memory of deltakit against PEFT: LoRA training steps and merged inference.

    python -m benchmarks.speed                      # full run (about 8 min on a 2-core CPU)
    python -m benchmarks.speed --quick              # tiny models, a smoke run of seconds
    python -m benchmarks.speed --device cuda --out speed.json
    python -m benchmarks.speed --overhead --threads 2   # LoRA's overhead over the limit, against PEFT's

Every comparison runs in one process on fresh copies of one backbone with the same batch, with the
variants interleaved after a warm-up, so drift (other load, a noisy VM host) hits all of them alike.
Ratios are medians of per-repetition paired ratios, which cancels most of that drift. Memory is
measured for each (library, model) in its own process, so neither inherits the other's allocator
state: peak RSS (CUDA: max_memory_allocated) over the built model, plus the exact bytes autograd
saves for backward.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers import CpmAntConfig, CpmAntForCausalLM, XLMRobertaConfig, XLMRobertaForSequenceClassification

import deltakit

SPEC = "lora(r=8,alpha=16,dropout=0.1)@attn.q,attn.v"
PEFT_LORA = dict(r=8, lora_alpha=16, lora_dropout=0.1)
PEFT_TARGETS = {"e5": ["query", "value"], "cpmant": ["project_q", "project_v"]}   # = attn.q, attn.v
LIBS = ("deltakit", "peft")
transformers.logging.set_verbosity_error()   # no load reports between the progress bars
warnings.filterwarnings("ignore", category=FutureWarning)   # PEFT reads a deprecated transformers flag


# ---- models and batches ------------------------------------------------------------------------

def build_e5(args):
    """multilingual-e5-small as a sequence classifier; real weights when the asset converts."""
    if not args.quick:
        try:
            from deltakit.assets import e5_small_path
            model = XLMRobertaForSequenceClassification.from_pretrained(e5_small_path(), num_labels=2)
            return model, "multilingual-e5-small"
        except Exception as exc:   # speed depends on the shape only, so a random model of it will do
            print(f"e5 asset unavailable ({exc!r}); random weights of the same shape", file=sys.stderr)
    shape = (dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=1000)
             if args.quick else
             dict(num_hidden_layers=12, hidden_size=384, num_attention_heads=12, intermediate_size=1536, vocab_size=30000))
    return XLMRobertaForSequenceClassification(XLMRobertaConfig(num_labels=2, **shape)), "xlm-r e5-small shape (random)"


def build_cpmant(args):
    """CPM-Ant at its real width (4096, 32x128 heads, FFN 10240) but few layers, to fit a small CPU."""
    shape = (dict(hidden_size=64, num_attention_heads=4, dim_head=16, dim_ff=128, num_hidden_layers=1, vocab_size=1000)
             if args.quick else
             dict(hidden_size=4096, num_attention_heads=32, dim_head=128, dim_ff=10240,
                  num_hidden_layers=args.cpm_layers, vocab_size=30720))
    model = CpmAntForCausalLM(CpmAntConfig(prompt_types=32, prompt_length=32, segment_types=32, **shape))
    return model.to(getattr(torch, args.cpm_dtype)), f"cpm-ant {shape['num_hidden_layers']}L x {shape['hidden_size']} {args.cpm_dtype}"


BUILD = {"e5": build_e5, "cpmant": build_cpmant}


def make_batch(key, model, args, device):
    g = torch.Generator().manual_seed(args.seed)   # the same batch for every variant and process
    vocab = model.config.vocab_size
    if key == "e5":
        n, length = (4, 16) if args.quick else (32, 64)
        ids = torch.randint(5, vocab, (n, length), generator=g)   # ids < 5 are special tokens
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.randint(0, 2, (n,), generator=g))
    else:
        n, length = (1, 16) if args.quick else (args.cpm_batch, args.cpm_len)
        ids = torch.randint(5, vocab, (n, length), generator=g)
        batch = dict(input_ids=ids, labels=ids, use_cache=False)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def with_lora(lib, model, key, fresh=True):
    """(model to call, object that merges). fresh: deltas go on a deep copy, `model` stays bare."""
    model = copy.deepcopy(model) if fresh else model
    torch.manual_seed(0)   # both libraries draw their LoRA init from the same RNG state
    if lib == "deltakit":
        return model, deltakit.attach(model, SPEC)
    wrapped = get_peft_model(model, LoraConfig(target_modules=PEFT_TARGETS[key], **PEFT_LORA))
    return wrapped, wrapped


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model, opt, batch):
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---- timing ------------------------------------------------------------------------------------

def interleave(fns: dict, reps: int, warmup: int, desc: str, device) -> dict:
    """Seconds per call of each fn, run round-robin; the order reverses every repetition (AB BA AB..)
    so that no variant always runs right after the same other one (caches, allocator reuse)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):   # first calls allocate optimizer state, pick kernels, fill caches
            fn()
    times = {k: [] for k in fns}
    for i in tqdm(range(reps), desc=desc, leave=False):
        for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            sync()
            t0 = time.perf_counter()
            fns[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def stats(xs) -> dict:
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(xs)}


# ---- peak memory, one process per (library, model) ---------------------------------------------

def _rss(field="VmRSS:"):
    """Current (VmRSS) or peak (VmHWM) resident memory in bytes; peak from getrusage off Linux."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    import resource   # macOS: ru_maxrss in bytes, and no current RSS: the peak so far is the baseline
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(conn, lib, key, args):
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, _ = BUILD[key](args)
    model, _ = with_lora(lib, model.to(device), key, fresh=False)   # no copy: the baseline holds one model
    batch = make_batch(key, model, args, device)
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)
    model.train()
    gc.collect()
    if device.type == "cuda":   # allocator statistics: exact, and other processes do not count
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:   # peak RSS after resetting it (Linux clear_refs 5), so building the model is not the peak
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)   # hand freed heap back, else training reuses it unseen
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        base = _rss()
    for _ in range(3):   # step 1 allocates AdamW state; later steps show steady-state reuse
        train_step(model, opt, batch)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss("VmHWM:")
    conn.send({"peak_over_model_mb": (peak - base) / 2**20, "model_mb": base / 2**20,
               "saved_mb": saved_activations(model, batch) / 2**20})


def saved_activations(model, batch) -> int:
    """Bytes autograd keeps for backward in one training forward, weights excluded: exact and free of
    allocator noise, where peak RSS moves by tens of MB from run to run."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(kept.values())


def measure_memory(lib, key, args) -> dict:
    # fork on CPU Linux: no re-import (seconds each), and it happens before the parent runs any torch
    # op, so no OpenMP pool is forked. CUDA or other systems: spawn a clean interpreter.
    use_fork = args.device == "cpu" and sys.platform.startswith("linux")
    ctx = mp.get_context("fork" if use_fork else "spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=memory_child, args=(send, lib, key, args))
    proc.start()
    send.close()   # so that recv() fails instead of hanging if the child dies
    result = recv.recv()
    proc.join()
    return result


# ---- one model ---------------------------------------------------------------------------------

def bench_model(key, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    bare, label = BUILD[key](args)
    bare = bare.to(device)
    batch = make_batch(key, bare, args, device)
    models = {lib: with_lora(lib, bare, key) for lib in LIBS}
    counts = {lib: sum(p.numel() for p in trainable(m)) for lib, (m, _) in models.items()}
    assert counts["deltakit"] == counts["peft"], f"different LoRA sizes: {counts}"
    reps = args.reps or (3 if args.quick else {"e5": 15, "cpmant": 14}[key])
    warmup = 1 if args.quick else 2
    out = {"label": label, "trainable": counts["deltakit"], "reps": reps, "times": {}}
    times = out["times"]

    opts = {lib: torch.optim.AdamW(trainable(m), lr=1e-4) for lib, (m, _) in models.items()}
    for m, _ in models.values():
        m.train()   # LoRA dropout and the backbone's own dropout on, as in real training
    step = {lib: (lambda m=m, o=opts[lib]: train_step(m, o, batch)) for lib, (m, _) in models.items()}
    times["train"] = interleave(step, reps, warmup, f"{key} train", device)

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    calls = {"bare": bare.eval(), **{lib: m.eval() for lib, (m, _) in models.items()}}
    forward = {name: (lambda m=m: m(**inputs)) for name, m in calls.items()}

    with torch.inference_mode():
        before = {lib: m(**inputs).logits for lib, (m, _) in models.items()}
        times["unmerged"] = interleave(forward, reps, warmup, f"{key} infer unmerged", device)
        models["deltakit"][1].merge()
        models["peft"][1].merge_adapter()
        # merging must not change the outputs, else the timing compares different computations
        out["merge_rel_diff"] = {lib: ((m(**inputs).logits - before[lib]).abs().max() / before[lib].abs().max()).item()
                                 for lib, (m, _) in models.items()}
        times["merged"] = interleave(forward, reps, warmup, f"{key} infer merged", device)
    return out


# ---- overhead over the physical limit ------------------------------------------------------------

OVERHEAD_SPEC = "lora(r=8,alpha=16)@attn.q,attn.v"   # dropout 0: the cost of LoRA itself


def limit_model(model):
    """The bare frozen backbone with its embeddings' output requiring grad: a training step of it is
    the forward plus the input-gradient backward that every delta method pays, and nothing else."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    return model


def bench_overhead(args) -> dict:
    """LoRA r=8 on q,v of e5-small (dropout 0 everywhere, backbone dropout off) against the limit, in
    one process, interleaved: overhead = step / limit - 1, paired per repetition."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    bare, label = BUILD["e5"](args)
    bare = bare.to(device).eval()   # eval(): no backbone dropout; gradients still flow
    batch = make_batch("e5", bare, args, device)
    limit = limit_model(bare)
    ours = copy.deepcopy(bare)
    torch.manual_seed(0)
    deltakit.attach(ours, OVERHEAD_SPEC)
    theirs = get_peft_model(copy.deepcopy(bare), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=PEFT_TARGETS["e5"]))
    opts = {"deltakit": torch.optim.AdamW(trainable(ours), lr=1e-4),
            "peft": torch.optim.AdamW(trainable(theirs), lr=1e-4)}
    steps = {"limit": lambda: limit(**batch).loss.backward(),
             "deltakit": lambda: train_step(ours, opts["deltakit"], batch),
             "peft": lambda: train_step(theirs, opts["peft"], batch)}
    reps = args.reps or (3 if args.quick else 40)
    times = interleave(steps, reps, 1 if args.quick else 3, "e5 overhead", device)
    over = {lib: stats([t / l - 1 for t, l in zip(times[lib], times["limit"])]) for lib in LIBS}
    return {"label": label, "reps": reps, "times": times, "overhead": over,
            "deltakit_over_peft": stats([d / p for d, p in zip(times["deltakit"], times["peft"])])}


def print_overhead(result, console):
    table = Table(title=f"LoRA r=8 on q,v over the limit (bare frozen forward + input-gradient backward): "
                        f"{result['label']}, {result['reps']} interleaved reps")
    for col in ("variant", "step ms (median, IQR)", "overhead = step / limit - 1 (median \\[quartiles])"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    table.add_row("limit", ms(result["times"]["limit"]), "")
    for lib, name in (("deltakit", "deltakit"), ("peft", "PEFT")):
        o = result["overhead"][lib]
        table.add_row(name, ms(result["times"][lib]), f"{100 * o['median']:+.1f} % [{100 * o['q1']:+.1f}, {100 * o['q3']:+.1f}]")
    console.print(table)
    d, p = result["overhead"]["deltakit"]["median"], result["overhead"]["peft"]["median"]
    r = result["deltakit_over_peft"]
    console.print(f"deltakit's overhead / PEFT's: {d / p:.2f}; deltakit step / PEFT step: {r['median']:.3f} "
                  f"[{r['q1']:.3f}, {r['q3']:.3f}]")


# ---- report ------------------------------------------------------------------------------------

def ms(xs):
    s = stats(xs)
    return f"{1e3 * s['median']:.1f} (IQR {1e3 * s['iqr']:.1f})"


def ratio(a, b):   # median and quartiles of the per-repetition ratios a_i / b_i
    s = stats([x / y for x, y in zip(a, b)])
    return f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]"


def summarize(results) -> list[tuple]:
    rows = []
    for key, r in results.items():
        t = r["times"]
        for phase, title in (("train", "train step"), ("unmerged", "infer unmerged"), ("merged", "infer merged")):
            d, p = t[phase]["deltakit"], t[phase]["peft"]
            rows.append((key, f"{title}: deltakit / PEFT", ms(d), ms(p), ratio(d, p)))
        for lib, name in (("deltakit", "deltakit"), ("peft", "PEFT")):
            m, b = t["merged"][lib], t["merged"]["bare"]
            rows.append((key, f"infer merged / bare: {name}", ms(m), ms(b), ratio(m, b)))
        if "memory" in r:
            m = r["memory"]
            d, p = m["deltakit"]["peak_over_model_mb"], m["peft"]["peak_over_model_mb"]
            rows.append((key, "train peak memory MB: deltakit / PEFT", f"{d:.0f}", f"{p:.0f}", f"{d / p:.3f}"))
            d, p = m["deltakit"]["saved_mb"], m["peft"]["saved_mb"]
            rows.append((key, "train saved activations MB: deltakit / PEFT", f"{d:.1f}", f"{p:.1f}", f"{d / p:.3f}"))
    return rows


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", choices=list(BUILD), default=list(BUILD))
    ap.add_argument("--quick", action="store_true", help="tiny models and 3 repetitions: a smoke run")
    ap.add_argument("--reps", type=int, help="timed repetitions per variant (default: per model)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--overhead", action="store_true",
                    help="only LoRA's overhead over the limit on e5-small (deltakit and PEFT, dropout 0)")
    ap.add_argument("--cpm-layers", type=int, default=2)
    ap.add_argument("--cpm-batch", type=int, default=1)
    ap.add_argument("--cpm-len", type=int, default=128)
    ap.add_argument("--cpm-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's; --quick: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write all raw times and statistics to this JSON file")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    # Tiny ops on 2 threads cost a scheduler slice each when another process holds a core: a smoke
    # run on a busy CI machine would take minutes. Real runs keep torch's default.
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    load_before = os.getloadavg()   # other processes on the machine make every timing noisier
    console = Console(width=None if sys.stdout.isatty() else 150)   # no wrapping when piped
    if args.overhead:
        result = bench_overhead(args)
        print_overhead(result, console)
        console.print(f"load average (1 min) before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")
        if args.out:
            result["stats"] = {k: stats(v) for k, v in result["times"].items()}
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "torch": torch.__version__, "overhead": result}, f, indent=1)
        return

    results = {key: {} for key in args.models}
    if not args.no_memory:   # first: forked children must start before the parent has used OpenMP
        for key in args.models:
            results[key]["memory"] = {lib: measure_memory(lib, key, args) for lib in LIBS}
    for key in args.models:
        results[key].update(bench_model(key, args))
    load = {"before": load_before, "after": os.getloadavg()}

    table = Table(title=f"deltakit vs PEFT, LoRA r=8 on attn.q,attn.v ({args.device}, threads={torch.get_num_threads()}); "
                        "ms: median (IQR); A / B: median \\[quartiles] of the paired per-repetition ratios")
    for col in ("model", "measurement", "A", "B", "A / B"):
        table.add_column(col, justify="left" if col in ("model", "measurement") else "right")
    for row in summarize(results):
        table.add_row(*row)
    console.print(table)
    for key, r in results.items():
        diff = ", ".join(f"{lib} {v:.1e}" for lib, v in r["merge_rel_diff"].items())
        console.print(f"{key}: {r['label']}, {r['trainable']:,} trainable, {r['reps']} reps; "
                      f"max |merged - unmerged| / max |logits|: {diff}")
    console.print(f"load average (1 min) before/after: {load['before'][0]:.2f} / {load['after'][0]:.2f}")
    if args.out:
        for r in results.values():
            r["stats"] = {phase: {k: stats(v) for k, v in ts.items()} for phase, ts in r["times"].items()}
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "load": load, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
