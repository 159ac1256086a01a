"""Read a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) as deltakit deltas,
so `deltakit.load(model, folder)` keeps the adapters a user trained with PEFT. PEFT is not imported.

`read(model, folder)` gives a spec and the delta tensors by the names the handle gives them; load()
attaches the spec and loads them. Every step is exact (the attached model computes what PEFT's
does) or the folder is refused with an error that names the setting:
* LORA: a LoRA on a Linear / GPT-2 Conv1D -> `lora(r, alpha)` at that module (`re:<path>`, or its
  canonical name). The modules are the file's keys; r is the tensors' (checked against
  rank_pattern), alpha is alpha_pattern's or lora_alpha, as PEFT resolves them; use_rslora's
  alpha/sqrt(r) becomes alpha' = alpha*sqrt(r) so that alpha'/r is PEFT's scale. lora_dropout is
  kept (it only acts in training); fan_in_fan_out only matters to PEFT's merge.
  modules_to_save -> `full@<module>` with the saved values.
* PROMPT_TUNING / P_TUNING: the saved prompt embeddings (PEFT saves P-tuning's encoder output) ->
  `prompt(n)@embed`. PEFT's outputs keep the n prompt positions, deltakit's strip them: deltakit's
  logits are PEFT's `[:, n:]` for decoders and classifiers alike.
* PREFIX_TUNING is refused: PEFT passes the prefix as a KV cache, so the model counts the real
  tokens' positions from n (absolute embeddings of GPT-2/BERT, LLaMA's rotary angles, T5's position
  bias over the prefix too), where deltakit's prefix keys carry no position and tokens start at 0.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

from .errors import CheckpointError, listing
from .peft_export import CONFIG, PREFIX, WEIGHTS
from .plan import plan
from .positions import backbone_modules, backbone_params, family, is_linear, module_shape, positions

BIN = "adapter_model.bin"

# LoRA settings that do not change what a loaded adapter computes: bookkeeping, how weights were
# initialised before training (init_lora_weights is checked on its own), and which modules were
# targeted (the file's keys say which modules have weights; target_modules is checked against them).
NO_EFFECT = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
             "auto_mapping", "init_lora_weights", "eva_config", "megatron_core", "qalora_group_size",
             "layers_to_transform", "layers_pattern", "exclude_modules", "target_modules", "fan_in_fan_out",
             "lora_dropout", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save"}
# Settings PEFT gives meaning to that deltakit has no delta for, with the reason shown to the user.
REFUSED = {
    "use_dora": "DoRA rescales each weight column by a learned magnitude; deltakit has no DoRA delta",
    "bias": "it trains the backbone's biases, whose saved values deltakit cannot place as a LoRA",
    "lora_bias": "it gives lora_B a bias, which deltakit's lora has not",
    "layer_replication": "it duplicates layers of the base model",
    "trainable_token_indices": "it trains single rows of the embedding",
    "target_parameters": "it puts LoRA on bare parameters, not on modules",
    "loftq_config": "LoftQ rewrites the base weights the adapter was trained on",
    "corda_config": "CorDA rewrites the base weights the adapter was trained on",
    "lora_ga_config": "LoRA-GA rewrites the base weights the adapter was trained on",
}
# init_lora_weights values that leave the base weights as they were (PiSSA, OLoRA, CorDA, LoftQ, ...
# subtract the initial LoRA from them, so the adapter only fits the rewritten base).
PLAIN_INIT = (True, False, "gaussian", "eva", "orthogonal")
PROMPT_NO_EFFECT = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                    "auto_mapping", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                    "num_attention_heads", "num_layers", "prompt_tuning_init", "prompt_tuning_init_text",
                    "tokenizer_name_or_path", "tokenizer_kwargs", "encoder_reparameterization_type",
                    "encoder_hidden_size", "encoder_num_layers", "encoder_dropout", "modules_to_save"}

# Families where PEFT's prompt (prepended to inputs_embeds, positions counted over it) and deltakit's
# prompt@embed give the same outputs, checked against peft in tests/test_peft_import.py; None: every
# model of the family. RoBERTa / XLM-R (family "bert") number positions from padding_idx + 1 over
# the input ids, which deltakit's prompt join keeps and PEFT's inputs_embeds path does not.
EXACT_PROMPT = {"gpt2": None, "llama": None, "t5": None, "bart": None, "bert": ("bert",)}


def is_peft_folder(path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read(model, path) -> tuple[str, dict]:
    """(spec, tensors named as the handle names its parameters) for the PEFT adapter at `path`."""
    config, tensors = read_config(path), read_tensors(path)
    kind = config.get("peft_type")
    if kind == "LORA":
        return _lora(model, config, tensors, path)
    if kind in ("PROMPT_TUNING", "P_TUNING"):
        return _prompt(model, config, tensors, path)
    if kind == "PREFIX_TUNING":
        raise CheckpointError(
            f"{path}: PEFT prefix tuning cannot be loaded exactly: PEFT passes the prefix as a KV cache, so "
            f"the model counts the real tokens' positions from num_virtual_tokens (and T5 gives the prefix a "
            f"position bias), where deltakit's prefix keys carry no position and tokens start at 0; "
            f"the outputs would differ. Retrain with deltakit's prefix(n=...) or use PEFT")
    raise CheckpointError(f"{path}: PEFT adapter type {kind!r} has no deltakit equivalent; deltakit reads LORA, "
                          f"PROMPT_TUNING and P_TUNING adapters")


def read_config(path) -> dict:
    file = Path(path) / CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise CheckpointError(f"{file} is not a PEFT adapter config (it has no 'peft_type')")
    return config


def read_tensors(path) -> dict:
    """The adapter's tensors: safetensors, or a .bin read with torch.load(weights_only=True), which
    unpickles plain tensors only (a file holding anything else is refused, never executed)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    folder = Path(path)
    if (folder / WEIGHTS).is_file():
        try:
            return load_file(str(folder / WEIGHTS))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {folder / WEIGHTS}: {e}") from None
    if (folder / BIN).is_file():
        try:
            tensors = torch.load(folder / BIN, map_location="cpu", weights_only=True)
        except Exception as e:   # an UnpicklingError names what weights_only refused
            raise CheckpointError(f"{folder / BIN} holds more than plain tensors, so it is not loaded "
                                  f"(torch.load weights_only=True refused it: {e}); save the adapter with "
                                  f"safetensors (PEFT's default)") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise CheckpointError(f"{folder / BIN} is not a dict of tensors")
        return tensors
    raise CheckpointError(f"{folder} has {CONFIG} but no {WEIGHTS} or {BIN}")


# ---- LoRA --------------------------------------------------------------------------------------

def _check_settings(config: dict, path):
    for key, value in config.items():
        if key == "bias" and value == "none":
            continue
        if key in REFUSED and value:
            raise CheckpointError(f"{path}: PEFT setting {key}={value!r} cannot be loaded exactly: {REFUSED[key]}")
        if key not in NO_EFFECT and value:   # an unknown setting at its off value (null/false/{}) changes nothing
            raise CheckpointError(f"{path}: PEFT setting {key}={value!r} has no exact deltakit equivalent "
                                  f"(deltakit reads plain LoRA: r, lora_alpha, use_rslora, rank/alpha_pattern, "
                                  f"lora_dropout, modules_to_save)")
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INIT:
        raise CheckpointError(f"{path}: PEFT setting init_lora_weights={init!r} rewrites the base weights when the "
                              f"adapter is made, so the adapter only fits the rewritten base; convert it to a plain "
                              f"LoRA first (PEFT: save_pretrained(path_initial_model_for_weight_conversion=...))")


def pattern_key(patterns, name: str) -> str | None:
    """The rank_pattern / alpha_pattern key PEFT applies to module `name` (peft.utils.other.get_pattern_key)."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)


def _targeted(config: dict, name: str) -> bool:
    """Does PEFT's target_modules select module `name` (peft's check_target_module_exists, by name)?"""
    target = config.get("target_modules")
    if target is None or target == "all-linear":
        return True
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target)


def _split_keys(tensors: dict, path) -> tuple[dict, dict]:
    """{module path: {'A', 'B'}} of the LoRA weights and {key: tensor} of everything else."""
    loras, rest = defaultdict(dict), {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        if name == key:
            raise CheckpointError(f"{path}: tensor {key!r} does not start with {PREFIX!r} as PEFT's LoRA keys do")
        if re.search(r"\.lora_(embedding_)?[AB]\.|lora_magnitude_vector", name):
            m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
            if m is None:
                what = "DoRA magnitudes" if "magnitude" in name else "a LoRA on an embedding"
                raise CheckpointError(f"{path}: tensor {key!r} is {what}, which deltakit's lora does not take "
                                      f"(it goes on Linear and Conv1D projections)")
            loras[m.group(1)][m.group(2)] = value
        else:
            rest[name] = value
    return loras, rest


def _lora(model, config, tensors, path):
    _check_settings(config, path)
    loras, rest = _split_keys(tensors, path)
    if not loras:
        raise CheckpointError(f"{path}: the PEFT LoRA adapter holds no lora_A / lora_B weights")
    modules = backbone_modules(model)
    rules, values = defaultdict(list), {}   # (r, alpha) -> module paths; path -> (A, B)
    for name, ab in sorted(loras.items()):
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"{path}: the adapter has LoRA weights for {name!r}, which this "
                                  f"{type(model).__name__} has no module named")
        if not is_linear(module):
            raise CheckpointError(f"{path}: the adapter puts LoRA on {name!r}, a {type(module).__name__}; deltakit's "
                                  f"lora goes on Linear and Conv1D modules")
        if not _targeted(config, name):
            raise CheckpointError(f"{path}: the adapter has weights for {name!r}, which its target_modules "
                                  f"{config.get('target_modules')!r} do not select (PEFT would not load them)")
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: {name!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        fan_in, fan_out = module_shape(module)
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (r, fan_in) or tuple(B.shape) != (fan_out, r):
            raise CheckpointError(f"{path}: LoRA weights of {name!r} are A {tuple(A.shape)}, B {tuple(B.shape)}; "
                                  f"this module needs A (r, {fan_in}) and B ({fan_out}, r)")
        ranks = config.get("rank_pattern") or {}
        key = pattern_key(ranks, name)
        want = ranks[key] if key is not None else config.get("r", 8)
        if want != r:
            raise CheckpointError(f"{path}: the LoRA on {name!r} has rank {r} in the file but {want} by the config "
                                  f"(r / rank_pattern); the file and its config do not belong together")
        alphas = config.get("alpha_pattern") or {}
        key = pattern_key(alphas, name)
        alpha = alphas[key] if key is not None else config.get("lora_alpha", 8)
        if config.get("use_rslora"):   # PEFT's scale alpha/sqrt(r) as deltakit's alpha'/r
            alpha = alpha * r / math.sqrt(r)
        rules[(r, alpha)].append(name)
        values[name] = (A, B)

    fulls = _modules_to_save(model, config, rest, loras, path)
    dropout = config.get("lora_dropout") or 0
    names = _pattern_names(model)
    rules = [(f"lora(r={r},alpha={_num(alpha)}{f',dropout={dropout}' if dropout else ''})", paths)
             for (r, alpha), paths in rules.items()]
    spec = _spec(rules + ([("full", list(fulls))] if fulls else []), names)
    out = {}
    for item in plan(model, spec):
        p = item.position.path
        if item.type.name == "lora":
            out[f"{item.key}.lora_A"], out[f"{item.key}.lora_B"] = values[p]
        else:
            out.update(_full_tensors(item, fulls[p]))
    return spec, out


def _pattern_names(model) -> dict:
    """module path -> the canonical position name that selects exactly that whole module."""
    names = {}
    for p in positions(model):
        if p.slice is None and p.kind in ("linear", "embed", "module", "norm"):
            names.setdefault(p.path, p.name)
    return names


def _spec(rules, names: dict) -> str:
    """rules: (type with options, module paths); each path by its canonical name or as `re:<path>`."""
    return "; ".join(f"{head}@" + ",".join(names.get(p) or f"re:{re.escape(p)}" for p in paths)
                     for head, paths in rules)


def _full_tensors(item, values: dict) -> dict:
    return {f"{item.key}.value.{n.replace('.', '__')}": v for n, v in values.items()}


def _modules_to_save(model, config, rest: dict, loras: dict, path) -> dict:
    """{module path: {param name: saved value}} of the modules PEFT saved whole. A module is one
    whose name ends with a modules_to_save entry (PEFT's rule), the outermost of nested ones."""
    names = tuple(config.get("modules_to_save") or ())
    modules = backbone_modules(model)
    chosen = [n for n in modules if n and names and n.endswith(names)]
    chosen = [n for n in chosen if not any(n.startswith(f"{q}.") for q in chosen)]
    saved, stray = defaultdict(dict), []
    for key, value in rest.items():
        owner = next((n for n in chosen if key.startswith(f"{n}.")), None)
        if owner is None:
            stray.append(key)
        else:
            saved[owner][key[len(owner) + 1:]] = value
    if stray:
        raise CheckpointError(f"{path}: the adapter holds {listing(stray, 4)}, which are neither LoRA weights nor "
                              f"of a module in modules_to_save {list(names)} (saved embedding layers or other "
                              f"trained backbone tensors); deltakit cannot place them exactly")
    for owner, params in saved.items():
        own = dict(backbone_params(modules[owner]))
        if set(own) != set(params):
            raise CheckpointError(f"{path}: modules_to_save {owner!r} has {listing(sorted(params), 4)} in the file, "
                                  f"but the module's parameters are {listing(sorted(own), 4)}")
        wrong = [n for n in own if tuple(own[n].shape) != tuple(params[n].shape)]
        if wrong:
            raise CheckpointError(f"{path}: modules_to_save {owner!r}: {wrong[0]} is {tuple(params[wrong[0]].shape)} "
                                  f"in the file, {tuple(own[wrong[0]].shape)} here")
        inside = [p for p in loras if p.startswith(f"{owner}.")]
        if inside:
            raise CheckpointError(f"{path}: LoRA at {listing(inside, 4)} lies inside modules_to_save {owner!r}")
    return dict(saved)


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# ---- prompt tuning -----------------------------------------------------------------------------

def _prompt(model, config, tensors, path):
    for key, value in config.items():
        if key not in PROMPT_NO_EFFECT and value:
            raise CheckpointError(f"{path}: PEFT setting {key}={value!r} has no exact deltakit equivalent")
    if "prompt_embeddings" not in tensors:
        raise CheckpointError(f"{path}: a PEFT prompt tuning adapter holds 'prompt_embeddings'; this one holds "
                              f"{listing(sorted(tensors), 4)}")
    rest = {}
    for key, value in tensors.items():   # modules_to_save of a prompt learner: base_model.<path>.<param>
        if key != "prompt_embeddings":
            rest[key.removeprefix("base_model.")] = value
    fulls = _modules_to_save(model, config, rest, {}, path)
    fam, model_type = family(model), getattr(getattr(model, "config", None), "model_type", None)
    if fam is None or fam.name not in EXACT_PROMPT or model_type not in (EXACT_PROMPT[fam.name] or (model_type,)):
        raise CheckpointError(f"{path}: a PEFT prompt on a {type(model).__name__} ({model_type}) is not known to give "
                              f"deltakit's outputs (position ids may be counted differently); prompt tuning adapters "
                              f"load for GPT-2, LLaMA-style, T5/MT5, BART/mBART and BERT models")
    n = config.get("num_virtual_tokens")
    emb = tensors["prompt_embeddings"]
    subs = config.get("num_transformer_submodules") or 1
    if not isinstance(n, int) or emb.dim() != 2 or emb.shape[0] != n * subs:
        raise CheckpointError(f"{path}: prompt_embeddings is {tuple(emb.shape)}, expected "
                              f"(num_virtual_tokens x num_transformer_submodules = {n} x {subs}, dim)")
    if subs == 2 and not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise CheckpointError(f"{path}: the prompt has two parts (encoder and decoder), but this "
                              f"{type(model).__name__} is not an encoder-decoder")
    # An encoder-decoder uses only the first n rows when the decoder input comes as ids (PEFT's
    # PeftModelForSeq2SeqLM): the encoder's prompt, which is what deltakit's prompt@embed gives.
    spec = f"prompt(n={n})@embed" + (f"; {_spec([('full', list(fulls))], _pattern_names(model))}" if fulls else "")
    out = {}
    for item in plan(model, spec):
        if item.type.name == "prompt":
            if item.position.width != emb.shape[1]:
                raise CheckpointError(f"{path}: prompt_embeddings has width {emb.shape[1]}, this model's embedding "
                                      f"{item.position.width}")
            out[f"{item.key}.prompt"] = emb[:n]
        else:
            out.update(_full_tensors(item, fulls[item.position.path]))
    return spec, out
