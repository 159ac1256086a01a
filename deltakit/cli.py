"""The `deltakit` command (also `python -m deltakit`): a model's positions, what a spec would add
to it, and its tree, read from a config on the meta device, so a 10B model answers in seconds
without its weights.

    deltakit positions cpm-ant-10b
    deltakit plan cpm-ant-10b "lora(r=8,alpha=16)@attn.q,attn.v"
    deltakit show path/to/hf-folder "adapter(dim=16)@ffn" --depth 4

MODEL is a native CPM name (`deltakit --help` lists them), a Hugging Face folder (its
config.json is enough), a CPM-Live CPM-Ant config JSON or checkpoint (.pt/.bin/.safetensors, with
its config JSON beside it or named after a known size), or a CPM-2 / CPM-1 Megatron checkpoint
folder. SPEC is a spec string or a file holding one (the structure.spec a search writes). A bad
model, spec or pattern is one `error: ...` line and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import shutil
import sys
from pathlib import Path

import torch

from .errors import CheckpointError, DeltakitError, listing, nearest

# ---- where a model comes from ------------------------------------------------------------------

# native CPM names -> (backbone, which config); the CPM-Ant ones are read from cpmant.CONFIGS
CPM2_CONFIGS = {"cpm-2-11b": "zh", "cpm-2-11b-bilingual": "bilingual", "cpm-2-tiny": "tiny"}
CPM1_CONFIGS = {"cpm-1-2.6b": "2.6b", "cpm-1-tiny": "tiny"}
ALIASES = {"cpm-ant": "cpm-ant-10b", "cpm-2": "cpm-2-11b", "cpm-1": "cpm-1-2.6b"}


def native_names() -> dict:
    """Every native CPM name the command takes -> (backbone, config key)."""
    from .backbones import cpmant
    names = {f"cpm-ant-{k.removeprefix('cpm-ant-')}": ("cpmant", k) for k in cpmant.CONFIGS}
    names.update({k: ("cpm2", v) for k, v in CPM2_CONFIGS.items()})
    names.update({k: ("cpm1", v) for k, v in CPM1_CONFIGS.items()})
    names.update({alias: names[target] for alias, target in ALIASES.items()})
    return names


def _transformers():
    try:
        import transformers
    except ImportError:
        raise DeltakitError('this model is built with transformers: pip install "deltakit[hf]"') from None
    return transformers


def _build_native(backbone: str, which) -> torch.nn.Module:
    if backbone == "cpmant":
        from .backbones import cpmant
        return cpmant.build(which, device="meta")
    _transformers()
    if backbone == "cpm2":
        from .backbones import cpm2
        return cpm2.build(cpm2.tiny_config() if which == "tiny" else cpm2.config_11b(which), "meta")
    from .backbones import cpm1
    return cpm1.build(cpm1.tiny_config() if which == "tiny" else cpm1.config_2_6b(), "meta")


def _hf_folder(folder: Path, class_name: str | None) -> torch.nn.Module:
    """The model class of a Hugging Face folder's config.json (or `class_name`), built on meta.
    Nothing is read from the hub and no code from the folder is run."""
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise DeltakitError(f"cannot read the Hugging Face config in {folder}: {e}") from None
    name = class_name or next(iter(config.architectures or ()), None) or "AutoModel"
    cls = getattr(tf, name, None) if not name.startswith("_") else None
    if not isinstance(cls, type):
        known = [n for n in dir(tf) if n.startswith("Auto") or n.endswith(("Model", "LM", "Classification"))]
        raise DeltakitError(f"transformers has no model class {name!r}.{nearest(name, known)} Give one with "
                            f"--model-class, e.g. AutoModelForSequenceClassification")
    try:
        with torch.device("meta"):
            return cls.from_config(config) if name.startswith("Auto") else cls(config)
    except (ValueError, TypeError, AttributeError) as e:
        raise DeltakitError(f"cannot build {name} from {folder / 'config.json'}: {e}") from None


def _checkpoint_shapes(path: Path) -> dict:
    """name -> shape of a checkpoint's tensors, without reading them."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    try:
        sd = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception as e:   # weights_only refuses pickled code; an old format cannot be mapped
        raise CheckpointError(f"{path} could not be read as plain tensors ({e}); re-save it with "
                              f"torch.save(state_dict) or as safetensors") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _cpmant_checkpoint(ckpt: Path) -> torch.nn.Module:
    """A CPM-Ant checkpoint: its config from the JSON beside it or from its name; the model is built
    on meta and every tensor's name and shape is checked against it (none is read)."""
    from .backbones import cpmant
    config = cpmant.native_files(ckpt)[1]
    if config is None and ckpt.stem not in cpmant.CONFIGS:
        raise CheckpointError(f"no CPM-Ant config for {ckpt}: put CPM-Live's config JSON (e.g. cpm-ant-10b.json) "
                              f"next to it, or name the checkpoint after a known size ({listing(cpmant.CONFIGS)})")
    model = cpmant.build(str(config) if config else ckpt.stem, device="meta")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = _checkpoint_shapes(ckpt)
    bad = sorted(set(want) ^ set(have)) + [k for k in want if k in have and want[k] != have[k]]
    if bad:
        raise CheckpointError(f"{ckpt} does not fit the CPM-Ant config {config or ckpt.stem}: "
                              f"{len(bad)} tensors differ in name or shape, e.g. {', '.join(bad[:3])}")
    return model


MEGATRON_EMBEDDINGS = {"word_embeds.weight": "cpm2", "word_embeddings.weight": "cpm1"}   # which CPM a folder is


def _megatron(folder: Path) -> torch.nn.Module:
    """A CPM-2 or CPM-1 Megatron folder as `load_cpm2` / `load_cpm1` read it (the published 11B / 2.6B
    shape, the checkpoint's vocabulary), built on meta. The shards are memory-mapped and only their
    shapes are read: merged and converted on the meta device, every tensor is checked against the model."""
    from .backbones import cpm1, cpm2, megatron
    _transformers()
    shards = megatron.load_shards(folder)
    kind = next((MEGATRON_EMBEDDINGS[k] for k in MEGATRON_EMBEDDINGS if k in shards[0]), None)
    if kind is None:
        raise CheckpointError(f"{folder} is a Megatron checkpoint of neither CPM-2 nor CPM-1: it has none of "
                              f"{', '.join(MEGATRON_EMBEDDINGS)} (its first keys: {', '.join(list(shards[0])[:4])})")
    backbone = cpm2 if kind == "cpm2" else cpm1
    merged = {}
    for key, t in shards[0].items():
        if kind == "cpm2" and key != "word_embeds.weight" and key.endswith("word_embeds.weight"):
            continue   # the shared embedding registered again per stack; converting compares it by value
        split = megatron.rule_for(key, backbone.MERGE_RULES)
        shape = list(t.shape)
        if split.dim is not None:
            shape[split.dim] *= len(shards)
        merged[key] = torch.empty(shape, device="meta")
    vocab = merged["word_embeds.weight" if kind == "cpm2" else "word_embeddings.weight"].shape[0]
    cfg = cpm2.config_11b(vocab) if kind == "cpm2" else cpm1.config_2_6b(vocab_size=vocab)
    model = backbone.build(cfg, "meta")
    have = {k: tuple(v.shape) for k, v in backbone.convert_state_dict(merged, cfg).items()}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", ()))
    bad = sorted((set(have) ^ set(want)) - tied) + [k for k in have if k in want and have[k] != want[k]]
    if bad:
        size = "CPM-2 11B" if kind == "cpm2" else "CPM-1 2.6B"
        raise CheckpointError(f"{folder} does not have the published {size} shape it is read as: {len(bad)} tensors "
                              f"differ, e.g. {', '.join(f'{k} {have.get(k)} != {want.get(k)}' for k in bad[:2])}; "
                              f"convert it to a Hugging Face folder (load_{kind}(path, config).save_pretrained) "
                              f"and give that")
    return model


def build_model(text: str, model_class: str | None = None) -> torch.nn.Module:
    """The model MODEL names, with its parameters on the meta device (no memory, no weights read)."""
    from .backbones import cpmant
    names = native_names()
    if text in names:
        return _build_native(*names[text])
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and not cpmant.is_config_file(path / "config.json"):
        return _hf_folder(path, model_class)
    if path.is_file() and cpmant.is_config_file(path):
        return cpmant.build(str(path), device="meta")
    if path.is_file() and path.suffix in cpmant.CHECKPOINT_SUFFIXES:
        return _cpmant_checkpoint(path)
    if path.is_dir():
        from .backbones import megatron
        if (path / megatron.TRACKER).is_file() or any(megatron.SHARD.fullmatch(p.name) for p in path.iterdir()):
            return _megatron(path)
        found = sorted(p for p in path.iterdir() if p.suffix in cpmant.CHECKPOINT_SUFFIXES)
        if len(found) == 1 and any(cpmant.is_config_file(p) for p in path.glob("*.json")):
            return _cpmant_checkpoint(found[0])
        raise DeltakitError(f"{path} is none of: a Hugging Face folder (config.json), a CPM-Ant folder (one "
                            f"checkpoint and its config JSON), a Megatron checkpoint folder "
                            f"({megatron.TRACKER}); it holds {listing(p.name for p in path.iterdir()) or 'nothing'}")
    if path.exists():
        raise DeltakitError(f"{path} is not a model: give a .json CPM-Live config, a {'/'.join(cpmant.CHECKPOINT_SUFFIXES)} "
                            f"CPM-Ant checkpoint or a folder")
    raise DeltakitError(f"unknown model {text!r}: no such file or folder and no native CPM name.{nearest(text, names)} "
                        f"Native names: {listing(names, 20)}")


def read_spec(text: str) -> str:
    """A spec string, or the spec in a file (e.g. a search's structure.spec)."""
    path = Path(text)
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    return text


# ---- tables ------------------------------------------------------------------------------------

def _where(stack, layers, local) -> str:
    from .report import layer_ranges
    where = local if layers[0] is None else f"layers.{layer_ranges(layers)}.{local}"
    return f"{stack}.{where}" if stack else where


def _fold(items, key) -> dict:
    """Group items over their layers: key(item) -> [layer, ...] in first-seen order."""
    groups: dict = {}
    for item, layer in items:
        groups.setdefault(key(item), []).append(layer)
    return groups


def _options(opts) -> str:
    """Every option with its value, defaults included: what the plan would build."""
    return ",".join(f"{f.name}={getattr(opts, f.name)}" for f in dataclasses.fields(opts))


def _table(title: str, columns, rows, caption: str = ""):
    """A rich table with the caption below it as its own line (a caption does not wrap to the table's width)."""
    from rich.console import Group
    from rich.table import Table
    table = Table(title=title, title_justify="left")
    for name in columns:
        table.add_column(name, justify="right" if name in ("n", "params", "params each") else "left",
                         overflow="fold")
    for row in rows:
        table.add_row(*map(str, row))
    return Group(table, caption) if caption else table


def _print(renderable):
    from rich.console import Console
    Console(width=max(shutil.get_terminal_size().columns, 120), highlight=False).print(renderable)


def _title(model, table) -> str:
    family = table.family.name if table.family is not None else "no family table (raw module names)"
    return f"{type(model).__name__}: {family}"


def positions_table(model, every: bool = False):
    from . import positions
    table = positions(model)
    if every:
        rows = [(p.name, p.kind, p.shape, f"{p.params:,}", p.path) for p in table]
    else:
        groups = _fold(((p, p.layer) for p in table),
                       lambda p: (p.stack, p.local, p.kind, p.shape, p.params, re.sub(r"\.\d+\.", ".{i}.", p.path, 1)
                                  if p.layer is not None else p.path))
        rows = [(_where(stack, layers, local), kind, shape, f"{params:,}", path)
                for (stack, local, kind, shape, params, path), layers in groups.items()]
    caption = f"{len(table)} positions" + (f"; {table.note}" if table.note else "")
    return _table(_title(model, table), ("position", "kind", "shape", "params", "module"), rows, caption)


def plan_table(model, spec: str):
    from . import plan, positions
    from .positions import backbone_params
    table = positions(model)
    planned = plan(model, spec, table)
    groups = _fold(((p, p.position.layer) for p in planned),
                   lambda p: (p.position.stack, p.position.local, p.type.name, _options(p.options), p.num_params))
    rows = [(_where(stack, layers, local), name, opts, len(layers), f"{each:,}", f"{each * len(layers):,}")
            for (stack, local, name, opts, each), layers in groups.items()]
    rows += [(f"shared by {len(s.positions)} positions", s.type.name, _options(s.options), 1,
              f"{s.num_params:,}", f"{s.num_params:,}") for s in planned.shared.values()]
    backbone = sum(p.numel() for _, p in backbone_params(model))
    pct = 100 * planned.num_params / backbone if backbone else 0.0
    caption = f"{planned.num_params:,} trainable delta params = {pct:.4f}% of {backbone:,} backbone params"
    return _table(f"{_title(model, table)}: {spec}", ("position", "delta", "options", "n", "params each", "params"),
                  rows, caption), planned


# ---- the command -------------------------------------------------------------------------------

def _model_args(p: argparse.ArgumentParser):
    p.add_argument("model", metavar="MODEL", help="a native CPM name, a Hugging Face folder, a CPM-Ant config "
                                                  "JSON or checkpoint, or a CPM-2/CPM-1 Megatron folder")
    p.add_argument("--model-class", metavar="NAME", help="Hugging Face folders: the transformers class to build, "
                   "e.g. AutoModelForSequenceClassification (default: the config's architectures[0])")


def parser() -> argparse.ArgumentParser:
    names = sorted({*native_names()} - set(ALIASES)) + [f"{a} (= {t})" for a, t in ALIASES.items()]
    p = argparse.ArgumentParser(prog="deltakit", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="A model's positions, what a spec would add to it, and its tree, built "
                                            "from its config\non the meta device (no weights are read).\n\n"
                                            + __doc__.split("\n\n")[2],
                                epilog=f"native CPM names: {', '.join(names)}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, epilog=p.epilog)   # each command's --help names them too
    pos = sub.add_parser("positions", help="the canonical positions of MODEL, folded over layers",
                         description="The canonical positions of MODEL (what spec patterns name), folded over layers.")
    _model_args(pos)
    pos.add_argument("--all", action="store_true", help="one row per position, every layer")
    pl = sub.add_parser("plan", help="what SPEC would add to MODEL: the per-position table and the count",
                        description="What SPEC would add to MODEL, per position and in total, built on the meta device.")
    _model_args(pl)
    pl.add_argument("spec", metavar="SPEC", help="a spec string, e.g. 'lora(r=8)@attn.q,attn.v', or a file holding one")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (one object per delta) instead")
    sh = sub.add_parser("show", help="MODEL as a tree, repeated layers folded; with SPEC, its deltas marked",
                        description="MODEL as a tree with parameter counts, repeated layers folded; with SPEC, "
                                    "the deltas it would add marked.")
    _model_args(sh)
    sh.add_argument("spec", metavar="SPEC", nargs="?", help="a spec string or a file holding one")
    sh.add_argument("--depth", type=int, metavar="N", help="print N levels of modules (default: all)")
    return p


def _plan_json(planned) -> str:
    items = [{"position": p.position.name, "module": p.position.path, "delta": p.type.name,
              "options": _options(p.options), "params": p.num_params} for p in planned]
    shared = [{"rule": s.rule, "delta": s.type.name, "positions": len(s.positions), "params": s.num_params}
              for s in planned.shared.values()]
    return json.dumps({"num_params": planned.num_params, "deltas": items, "shared": shared}, indent=1)


def run(args) -> None:
    model = build_model(args.model, args.model_class)
    if args.command == "positions":
        _print(positions_table(model, args.all))
    elif args.command == "plan":
        table, planned = plan_table(model, read_spec(args.spec))
        if args.json:
            print(_plan_json(planned))
        else:
            _print(table)
    else:
        from . import attach, show
        model.requires_grad_(False)   # the backbone as deltakit tunes it: frozen, with or without deltas
        if args.spec:
            attach(model, read_spec(args.spec))
        show(model, max_depth=args.depth)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except DeltakitError as e:   # what the user can fix: one line, no traceback
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0
