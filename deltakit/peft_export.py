"""Export a handle as a PEFT LoRA adapter: `adapter_config.json` + `adapter_model.safetensors`,
loadable with `peft.PeftModel.from_pretrained(base_model, path)`. PEFT is not imported: the two
files follow the layout that peft 0.21 writes itself.

The mapping (every step is exact, so PEFT's outputs equal the attached model's):
* lora on a whole Linear / Conv1D -> a PEFT LoRA on that module, keys
  `base_model.model.<path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r). Per-module r and
  alpha that differ from the most common pair go to `rank_pattern` / `alpha_pattern`.
* lora on output slices of a fused projection (GPT-2 c_attn q/k/v) -> one LoRA on the fused module:
  A stacks the slices' A, B is block-structured (each slice's B in its rows, zeros elsewhere), so
  B A x = the slices' outputs placed side by side. PEFT has one scale per module: differing
  scales are folded into B (then alpha = r).
* gates are folded into B; Conv1D targets set fan_in_fan_out (only PEFT's merge looks at it).
* full at a module -> `modules_to_save`, holding the merged values (backbone + delta).
"""
from __future__ import annotations

import json
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch import nn

from .distributed.group import on_main
from .distributed.tensors import full_tensor, is_sharded, reshard
from .joins.site import reparam_values, submodule
from .io import atomic_write
from .errors import CheckpointError, listing
from .positions import backbone_modules, is_backbone

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."   # PeftModel.base_model (LoraModel) .model (the backbone)
EXPORTABLE = ("lora", "full")
# PeftModelFor<task> adds these to modules_to_save itself (matched as name suffixes) and then
# requires their weights in the file, so they are saved even without a delta on them.
AUTO_SAVED = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def task_type(model) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"),
                         ("LMHeadModel", "CAUSAL_LM")):
        if name.endswith(suffix):
            return task
    if name.endswith("ForConditionalGeneration") and getattr(model.config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return None


def save(handle, path) -> Path:
    from safetensors.torch import save_file
    model = handle.model
    if not handle.entries:
        raise CheckpointError(f"handle {handle.name!r} has no deltas to save (detached?)")
    bad = [f"{e.position.name} ({e.type.name})" for e in handle.entries if e.type.name not in EXPORTABLE]
    if bad:
        raise CheckpointError(f"handle {handle.name!r} cannot be saved in PEFT format: {listing(bad, 8)} "
                              f"have no PEFT LoRA equivalent; only lora (plus full on whole modules, saved as "
                              f"modules_to_save) export to PEFT. Use h.save(path) for deltakit's own format")
    loras, fulls = defaultdict(list), defaultdict(list)   # module path -> entries there
    for e in handle.entries:
        (loras if e.type.name == "lora" else fulls)[e.position.path].append(e)
    if not loras:
        raise CheckpointError(f"handle {handle.name!r} has no lora deltas; PEFT refuses a LoRA adapter that targets "
                              f"no module (full deltas alone cannot be exported)")
    task = task_type(model)
    reshard(model)   # sharded: each tensor below is gathered whole (a collective), the backbone's only for modules_to_save
    saved = _modules_to_save(model, fulls, task)
    inside = [p for p in loras if any(p == s or p.startswith(f"{s}.") for s in saved)]
    if inside:
        raise CheckpointError(f"lora at {listing(inside, 6)} lies inside a module that PEFT saves whole "
                              f"(modules_to_save: {listing(saved, 6)}); PEFT cannot hold both")

    tensors, shapes, dropouts, conv1d = {}, {}, set(), False
    for p, entries in loras.items():
        module = submodule(model, p)
        A, B, alpha = _lora(module, entries)
        tensors[f"{PREFIX}{p}.lora_A.weight"], tensors[f"{PREFIX}{p}.lora_B.weight"] = A, B
        shapes[p] = (A.shape[0], alpha)
        dropouts.update(e.options.dropout for e in entries)
        conv1d |= not isinstance(module, nn.Linear)
    for p in saved:
        tensors.update({f"{PREFIX}{p}.{k}": v for k, v in _merged_state(model, p, fulls).items()})
    if len(dropouts) > 1:
        warnings.warn(f"PEFT has one lora_dropout per adapter; exporting the largest of {sorted(dropouts)}",
                      stacklevel=3)

    # The most common (r, alpha) is the default; the rest by exact module name (a regex, hence escaped).
    (r, alpha), _ = Counter(shapes.values()).most_common(1)[0]
    config = {
        "peft_type": "LORA", "task_type": task, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r, "lora_alpha": alpha, "lora_dropout": max(dropouts), "bias": "none",
        "target_modules": sorted(loras), "fan_in_fan_out": conv1d,
        "rank_pattern": {re.escape(p): s[0] for p, s in shapes.items() if s[0] != r},
        "alpha_pattern": {re.escape(p): s[1] for p, s in shapes.items() if s[1] != alpha},
        "modules_to_save": saved or None, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
    }
    folder = Path(path)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}   # no shared storage
    text = json.dumps(config, indent=2)

    def write():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        atomic_write(folder / CONFIG, lambda tmp: tmp.write_text(text, encoding="utf-8"))   # last: marks it complete
    if is_sharded(model):   # every rank calls save; rank 0 writes
        on_main(write)
    else:
        write()
    return folder


def _lora(module, entries):
    """(A, B, alpha) of one PEFT LoRA on `module` equal to the sum of deltakit's LoRAs there:
    sum_i s_i B_i A_i = [s_1 B_1 | s_2 B_2 ...] [A_1; A_2 ...], each B_i padded to its slice's rows."""
    width = module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]   # Conv1D: (in, out)
    scales = {e.module.scale for e in entries}
    fold = len(scales) > 1
    As, Bs = [], []
    for e in entries:
        A, B = full_tensor(e.module.lora_A.detach()), full_tensor(e.module.lora_B.detach())
        if e.gate is not None:   # the engine multiplies the delta's output (per feature or overall)
            B = B * torch.as_tensor(e.gate).detach().to(B).reshape(-1, 1)
        if fold:
            B = B * e.module.scale
        lo, hi = e.position.slice or (0, width)
        block = B.new_zeros(width, B.shape[1])
        block[lo:hi] = B
        As.append(A)
        Bs.append(block)
    r = sum(a.shape[0] for a in As)
    alpha = r if fold else scales.pop() * r   # PEFT's scaling is lora_alpha / r
    alpha = int(alpha) if float(alpha).is_integer() else alpha   # 16, not 16.0, as PEFT writes it
    return torch.cat(As), torch.cat(Bs, dim=1), alpha


def _modules_to_save(model, fulls, task) -> list[str]:
    """Paths of the modules PEFT saves whole: those with a full delta, and the ones its task class
    adds by itself. Nested ones are covered by their outermost module."""
    auto = AUTO_SAVED.get(task, ())   # str.endswith(()) is False: no task, no extra modules
    paths = set(fulls) | {n for n in backbone_modules(model) if n.endswith(auto)}
    if "" in paths:
        raise CheckpointError("full on the whole model cannot be exported to PEFT; save the model itself")
    return sorted(p for p in paths if not any(p.startswith(f"{q}.") for q in paths))


def _merged_state(model, path, fulls) -> dict:
    """The state_dict of the module at `path` as the attached model computes with it: backbone
    values, replaced by what the (unmerged, gated) full deltas on it or on its submodules make of
    them, by the engine's own rule (one ungated full delta: its values exactly)."""
    state = {k: full_tensor(v.detach()).clone() for k, v in submodule(model, path).state_dict().items() if is_backbone(k)}
    for q, entries in fulls.items():
        live = [e for e in entries if not e.merged]   # merged ones are in the backbone values read above
        if (q != path and not q.startswith(f"{path}.")) or not live:
            continue
        rel = q[len(path) + 1:]
        params = {n: p for n, p in live[0].target.named_parameters() if is_backbone(n)}
        for name, value in reparam_values(live, params).items():
            key = f"{rel}.{name}" if rel else name
            state[key] = full_tensor(value.detach()).to(state[key]).clone()
    return state
