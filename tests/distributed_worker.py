"""One rank of the distributed tests: `python tests/distributed_worker.py SCENARIO OUT [options]`,
started N times by tests/test_distributed.py with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK, LOCAL_WORLD_SIZE). Each rank measures and writes
OUT/SCENARIO-rank<r>.json; the tests assert on those reports (and on the files written to OUT).

Every sharded result is compared with a single-process reference computed in the same worker on
the whole batch: each rank takes its equal share of the batch, so FSDP's averaged gradients must
equal the single-process ones of the mean loss.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

import deltakit  # noqa: E402
from deltakit import checkpoint  # noqa: E402
from deltakit import distributed as dist  # noqa: E402
from deltakit.backbones import cpm2, cpmant, cpmant_generate  # noqa: E402

BATCH = 4   # examples in the whole batch; each rank takes BATCH / world of them


# ---- the three backbones: builder, batch, loss, the five delta types ----------------------------

def cpmant_model(seed=0):
    torch.manual_seed(seed)
    model = cpmant.build("tiny").eval()
    with torch.no_grad():   # O(1) embeddings and position bias, as in a trained model
        model.position_bias.relative_attention_bias.normal_()
        for emb in (model.input_embedding, model.prompt_embedding, model.segment_embedding):
            emb.weight.normal_()
    return model


def cpmant_batch(step=0):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(8, 96, (BATCH, 7), generator=g).tolist()
    return cpmant.make_inputs(cpmant.CONFIGS["tiny"], ids, task_id=1, context=[3] * BATCH)


def cpmant_loss(model, batch):
    P = cpmant.CONFIGS["tiny"].prompt_length
    logits = model(**batch)[0][:, P:-1]
    return F.cross_entropy(logits.float().flatten(0, 1), batch["input"][:, P + 1:].flatten())


def cpm2_model(seed=0):
    torch.manual_seed(seed)
    return cpm2.build(cpm2.tiny_config(), "cpu").eval()


def cpm2_batch(step=0):
    g = torch.Generator().manual_seed(200 + step)
    return {"input_ids": torch.randint(2, 96, (BATCH, 7), generator=g),
            "labels": torch.randint(2, 96, (BATCH, 5), generator=g)}


def llama_model(seed=0):
    import tiny_models
    return tiny_models.make("llama", seed=1234 + seed)


def llama_batch(step=0):
    g = torch.Generator().manual_seed(300 + step)
    ids = torch.randint(2, 96, (BATCH, 8), generator=g)
    return {"input_ids": ids, "labels": ids}


def hf_loss(model, batch):
    return model(**batch, use_cache=False).loss


COMMON = {"lora": "lora(r=4,alpha=8)@attn.q,attn.v", "adapter": "adapter(dim=8)@ffn", "bitfit": "bitfit@ffn.out"}
MODELS = {
    "cpmant": (cpmant_model, cpmant_batch, cpmant_loss, {**COMMON, "prefix": "prefix(n=3)@attn", "prompt": "prompt@prompt"}),
    "cpm2": (cpm2_model, cpm2_batch, hf_loss, {**COMMON, "prefix": "prefix(n=3)@attn,cross", "prompt": "prompt(n=3)"}),
    "llama": (llama_model, llama_batch, hf_loss, {**COMMON, "prefix": "prefix(n=3)@attn", "prompt": "prompt(n=3)"}),
}


def my_share(batch: dict) -> dict:
    n = BATCH // dist.world_size()
    return {k: v[dist.rank() * n:(dist.rank() + 1) * n] for k, v in batch.items()}


def perturb(handle, seed=7):
    """Non-zero values everywhere (LoRA's B and an adapter's up start at zero: no gradient for A)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(handle.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def count_calls(model) -> list:
    """One entry per call of the first Linear in the last block (twice per step under activation
    checkpointing: forward and recompute; the deltas of earlier blocks need gradients through it)."""
    block = model.get_submodule(dist.find_blocks(model)[-1])
    linear = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
    calls = []
    linear.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def grads(handle) -> dict:
    return {k: dist.full_tensor(p.grad).detach().clone() for k, p in handle.named_parameters()}


def report(out, scenario, data):
    Path(out, f"{scenario}-rank{dist.rank()}.json").write_text(json.dumps(data, indent=1))


def refused(fn) -> str:
    try:
        fn()
    except deltakit.DeltakitError as e:
        return f"{type(e).__name__}: {e}"
    return "not refused"


# ---- scenario: parity (2 ranks) -------------------------------------------------------------------

def reference(make, batch, loss_fn, spec, save_to=None):
    """Single process: the seeded deltas, perturbed (saved by rank 0 to `save_to`); loss and gradients
    on the whole batch; one AdamW step."""
    model = make()
    torch.manual_seed(1)
    h = deltakit.attach(model, spec)
    perturb(h)
    start = {k: v.clone() for k, v in h.state_dict().items()}
    if save_to is not None and dist.is_main():
        h.save(save_to)
    dist.barrier()
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
    loss = loss_fn(model, batch)
    loss.backward()
    g = {k: p.grad.clone() for k, p in h.named_parameters()}
    opt.step()
    return model, h, start, loss.item(), g


def parity(out):
    cases, mesh = [], dist.mesh()
    for name, (make, batch_fn, loss_fn, specs) in MODELS.items():
        batch = batch_fn()
        for kind, spec in specs.items():
            start_dir = Path(out, f"start-{name}-{kind}")   # written by one process, loaded into the shards below
            _, ref, start, ref_loss, ref_grads = reference(make, batch, loss_fn, spec, save_to=start_dir)
            for ac in (False, True):
                model = make()
                torch.manual_seed(1)
                h = deltakit.attach(model, spec)
                dist.shard(model, mesh=mesh, checkpointing=ac)
                h.load_state_dict(checkpoint.read_tensors(start_dir))
                loaded = max_diff(h.state_dict(), start)
                opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
                calls = count_calls(model)
                loss = loss_fn(model, my_share(batch))
                loss.backward()
                mean_loss = dist.reduce({"loss": loss.item()}, "mean")["loss"]
                g = grads(h)
                opt.step()
                after = max_diff(h.state_dict(), ref.state_dict())
                sharded = all(dist.is_dtensor(p) for p in h.parameters())
                cases.append({"model": name, "type": kind, "checkpointing": ac, "loss": mean_loss, "ref_loss": ref_loss,
                              "grad_diff": max_diff(g, ref_grads), "grad_scale": max(v.abs().max().item() for v in g.values()),
                              "loaded_diff": loaded, "step_diff": after, "sharded": sharded,
                              "trainable": h.num_trainable, "first_linear_calls": len(calls)})
                if kind == "lora" and ac:   # the saved deltas, sharded and single-process, after the step
                    h.save(Path(out, f"sharded-{name}"))
                    h.save(Path(out, f"sharded-{name}-peft"), format="peft")
                    if dist.is_main():
                        ref.save(Path(out, f"single-{name}"))
                        ref.save(Path(out, f"single-{name}-peft"), format="peft")
                    dist.barrier()
    data = {"cases": cases, "guards": guards(mesh, out), "mixed_precision": mixed_precision(mesh),
            "beam": beam_in_lockstep(mesh), "helpers": helpers(out)}
    report(out, "parity", data)


def guards(mesh, out) -> dict:
    model = llama_model()
    h = deltakit.attach(model, COMMON["lora"])
    dist.shard(model, mesh=mesh)
    return {"attach": refused(lambda: deltakit.attach(model, "bitfit@ffn.out", name="late")),
            "load": refused(lambda: deltakit.load(model, Path(out, "start-llama-lora"), name="late")),
            "detach": refused(h.detach), "merge": refused(h.merge),
            "shard_twice": refused(lambda: dist.shard(model, mesh=mesh)),
            "late_params": sum(1 for n, p in model.named_parameters() if not dist.is_dtensor(p))}


def mixed_precision(mesh) -> dict:
    """A bf16 backbone with fp32 deltas (LoRA and BitFit in one block), computing in bf16 and
    reducing in fp32, against the fp32 single-process run."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    spec = "lora(r=4,alpha=8)@attn.q,attn.v; bitfit@ffn.out"
    batch = llama_batch()
    _, ref, start, ref_loss, ref_grads = reference(llama_model, batch, hf_loss, spec)
    model = llama_model().to(torch.bfloat16)
    torch.manual_seed(1)
    h = deltakit.attach(model, spec)
    dist.shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    h.load_state_dict(start)
    loss = hf_loss(model, my_share(batch))
    loss.backward()
    g = grads(h)
    rel = max(((g[k] - ref_grads[k]).norm() / ref_grads[k].norm()).item() for k in g)
    return {"loss": dist.reduce({"l": loss.item()}, "mean")["l"], "ref_loss": ref_loss, "grad_rel_err": rel,
            "delta_dtypes": sorted({str(p.dtype) for p in h.parameters()}),
            "grad_dtypes": sorted({str(p.grad.dtype) for p in h.parameters()}),
            "backbone_dtypes": sorted({str(p.dtype) for n, p in deltakit.backbone_params(model)})}


def beam_in_lockstep(mesh) -> dict:
    """Beam search on the sharded native CPM-Ant, with a different number of batches and of steps
    per batch on each rank, against the same search in a single process."""
    spec = COMMON["lora"]
    base = cpmant_model()
    torch.manual_seed(1)
    ref = deltakit.attach(base, spec)
    perturb(ref)
    values = ref.state_dict()
    jobs = {0: [([[11, 12, 13, 14], [20, 21]], 6), ([[30, 31, 32]], 3)], 1: [([[40, 41, 42, 43, 44]], 9)]}
    expected = {r: [cpmant_generate.beam_search(base, s, beam_size=2, max_new_tokens=n) for s, n in js]
                for r, js in jobs.items()}
    model = cpmant_model()
    torch.manual_seed(1)
    h = deltakit.attach(model, spec)
    dist.shard(model, mesh=mesh)
    h.load_state_dict(values)
    idle_batch = model.inputs([[5]])
    got = dist.generate_in_lockstep(
        model, lambda job: cpmant_generate.beam_search(model, job[0], beam_size=2, max_new_tokens=job[1]),
        jobs[dist.rank()], idle=lambda: model(**idle_batch))
    return {"got": got, "expected": expected[dist.rank()]}


def helpers(out) -> dict:
    mine = dist.split(list(range(5)))
    sampler = dist.sampler(list(range(5)), shuffle=False)
    wrote = dist.on_main(lambda: Path(out, "written-by.txt").write_text(str(dist.rank())))

    def fail():
        raise OSError("disk full")
    failed = "not raised"
    try:
        dist.on_main(fail)
    except (OSError, dist.DistributedError) as e:
        failed = f"{type(e).__name__}: {e}"
    return {"split": mine, "gathered": dist.gather(mine), "total": dist.reduce({"n": len(mine)})["n"],
            "max": dist.reduce({"r": dist.rank()}, "max")["r"], "sampler": list(sampler),
            "on_main_result": wrote, "on_main_failure": failed}


# ---- scenario: load (2 ranks): meta build, shard, each rank reads its slices -----------------------

def load(out):
    mesh, data = dist.mesh(), {}
    pt, cfg = Path(out, "cpmant.pt"), cpmant.CONFIGS["tiny"]
    spec = "lora(r=4,alpha=8)@attn.q,attn.v; prompt@prompt; prefix(n=3)@attn; full@ln.final"
    # fp32 file, bf16 model: the single-process run is load_cpmant(bf16) + seed + attach (full copies the
    # final norm's bf16 values: the reference model must convert what a delta reads)
    single = cpmant.load_cpmant(pt, "tiny", dtype=torch.bfloat16)
    torch.manual_seed(5)
    ref = deltakit.attach(single, spec)
    h = dist.load_sharded(lambda d: cpmant.build(cfg, torch.bfloat16, d), pt, lambda m: deltakit.attach(m, spec),
                          seed=5, mesh=mesh, checkpointing=True)
    data["cpmant"] = compare_loaded(h, single, ref, cpmant_loss, cpmant_batch())

    st = Path(out, "cpm2.safetensors")   # converted once from Megatron shards; fp32 file, fp32 model
    spec2 = "lora(r=4,alpha=8)@attn.q,attn.v; prompt(n=3); full@head; prefix(n=3)@cross"
    single2 = cpm2.load_cpm2(Path(out, "cpm2-megatron"), cpm2.tiny_config())
    torch.manual_seed(6)
    ref2 = deltakit.attach(single2, spec2)
    h2 = dist.load_sharded(lambda d: cpm2.build(cpm2.tiny_config(), d), st, lambda m: deltakit.attach(m, spec2),
                           seed=6, mesh=mesh)
    data["cpm2"] = compare_loaded(h2, single2, ref2, hf_loss, cpm2_batch())
    data["missing"] = refused(lambda: dist.load_sharded(lambda d: cpmant.build(cfg, torch.float32, d),
                                                        Path(out, "cpmant-missing.safetensors"),
                                                        lambda m: deltakit.attach(m, spec), mesh=mesh))
    report(out, "load", data)


def compare_loaded(h, single, ref, loss_fn, batch) -> dict:
    model = h.model
    backbone = {dist.tensors.plain_name(n): dist.full_tensor(p.detach()) for n, p in deltakit.backbone_params(model)}
    expected = dict(deltakit.backbone_params(single))
    local = [p.to_local().numel() / p.numel() for _, p in deltakit.backbone_params(model) if p.numel() >= 2]
    with torch.no_grad():
        sharded_loss = dist.reduce({"l": loss_fn(model, my_share(batch)).item()}, "mean")["l"]
        single_loss = loss_fn(single, batch).item()
    return {"backbone_diff": max((backbone[n].float() - p.float()).abs().max().item() for n, p in expected.items()),
            "same_names": sorted(backbone) == sorted(expected),
            "delta_diff": max_diff(h.state_dict(), ref.state_dict()),
            "max_local_fraction": max(local), "on_meta": [n for n, p in model.named_parameters() if p.is_meta],
            "loss": sharded_loss, "single_loss": single_loss}


# ---- scenario: train (any world size): the resumable run for the fault test --------------------------

def train(out, steps: int, kill_step: int | None, hang_step: int | None = None):
    model = cpmant_model()
    torch.manual_seed(1)
    h = deltakit.attach(model, "lora(r=4,alpha=8)@attn.q,attn.v; bitfit@ffn.out")
    dist.shard(model, checkpointing=True)
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
    path = Path(out, "state.safetensors")
    state = dist.load_state(path, h, opt)
    start = state["step"] if state else 0
    log = []
    with dist.guard("training"):
        for step in range(start, steps):
            loss = cpmant_loss(model, my_share(cpmant_batch(step)))
            if step == kill_step and dist.rank() == dist.world_size() - 1:
                os.kill(os.getpid(), signal.SIGKILL)   # dies in the middle of a step
            if step == hang_step and dist.rank() == dist.world_size() - 1:
                time.sleep(2 * args_timeout())         # stops answering, then leaves
                os._exit(3)
            loss.backward()
            opt.step()
            opt.zero_grad()
            log.append(dist.reduce({"loss": loss.item()}, "mean")["loss"])
            dist.save_state(path, h, opt, step + 1)
        h.save(Path(out, "final"))
    report(out, "train", {"start": start, "losses": log})


def args_timeout() -> float:
    return float(os.environ["DELTAKIT_TEST_TIMEOUT"])


# ---- scenario: hsdp (4 ranks = 2 "nodes" x 2): parity, bytes across nodes, CPU offload -------------

COLLECTIVES = ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_gather", "reduce_scatter", "broadcast", "all_to_all_single",
               "all_reduce_coalesced", "all_gather_object", "broadcast_object_list")


def count_collectives(log: list):
    """Record (collective, ranks of its group, bytes of the tensor this rank hands it) of every call."""
    import torch.distributed as tdist
    for fn_name in COLLECTIVES:
        fn = getattr(tdist, fn_name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _name=fn_name, **kwargs):
            group = kwargs.get("group")
            ranks = tuple(tdist.get_process_group_ranks(group)) if group is not None else tuple(range(tdist.get_world_size()))
            tensor = next((a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)), None)
            size = tensor.numel() * tensor.element_size() if tensor is not None else 0
            log.append((_name, ranks, size))
            return _fn(*args, **kwargs)
        setattr(tdist, fn_name, wrapped)


def hsdp(out):
    spec = "lora(r=4,alpha=8)@attn.q,attn.v; bitfit@ffn.out"
    batch = cpmant_batch()
    _, ref, start, ref_loss, ref_grads = reference(cpmant_model, batch, cpmant_loss, spec)
    data = {}
    for name, mesh_nodes, offload in (("hsdp", 2, None), ("offload", None, "cpu")):
        mesh = dist.mesh(nodes=mesh_nodes)
        model = cpmant_model()
        torch.manual_seed(1)
        h = deltakit.attach(model, spec)
        dist.shard(model, mesh=mesh, offload=offload)
        h.load_state_dict(start)
        log = []
        if name == "hsdp":
            count_collectives(log)
        loss = cpmant_loss(model, my_share(batch))
        loss.backward()
        step = list(log)
        g = grads(h)
        entry = {"loss": dist.reduce({"l": loss.item()}, "mean")["l"], "ref_loss": ref_loss,
                 "grad_diff": max_diff(g, ref_grads), "grad_scale": max(v.abs().max().item() for v in g.values()),
                 "num_trainable": h.num_trainable, "placements": sorted({str(p.placements) for p in h.parameters()}),
                 "devices": sorted({str(p.to_local().device) for p in model.parameters()})}
        if name == "hsdp":
            replicate = tuple(int(r) for r in mesh["replicate"].mesh.tolist())
            shard_group = tuple(int(r) for r in mesh["shard"].mesh.tolist())
            entry["replicate_group"], entry["shard_group"] = replicate, shard_group
            entry["replicate_bytes"] = sum(b for _, ranks, b in step if ranks == replicate)
            entry["replicate_calls"] = sorted({n for n, ranks, _ in step if ranks == replicate})
            entry["shard_bytes"] = sum(b for _, ranks, b in step if ranks == shard_group)
            entry["local_trainable_bytes"] = sum(_padded_local_numel(p) * 4 for p in h.parameters())
            entry["backbone_bytes"] = sum(p.numel() * p.element_size() for _, p in deltakit.backbone_params(model))
        data[name] = entry
    report(out, "hsdp", data)


def _padded_local_numel(p) -> int:
    """What FSDP reduces for p on this rank: its dim-0 chunk, padded to an equal share."""
    shards = p.device_mesh["shard"].size() if p.device_mesh.ndim > 1 else p.device_mesh.size()
    rows = -(-p.shape[0] // shards)
    return rows * (p.numel() // p.shape[0])


# ---- main -------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["parity", "load", "train", "hsdp"])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--kill-step", type=int, default=None)
    parser.add_argument("--hang-step", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    os.environ["DELTAKIT_TEST_TIMEOUT"] = str(args.timeout)
    dist.init(timeout=args.timeout)
    if args.scenario == "train":
        train(args.out, args.steps, args.kill_step, args.hang_step)
    else:
        {"parity": parity, "load": load, "hsdp": hsdp}[args.scenario](args.out)
    dist.shutdown()


if __name__ == "__main__":
    main()
