"""S3PET structure search: find where deltas go under a parameter budget, retrain that structure
from scratch, report its test score.

    python -m search.s3pet --budget 0.01%
    python -m search.s3pet --budget 25k --space L --order 2 --output-dir runs/s3pet-L
    python -m search.s3pet --model cpm-ant-10b.pt --task my.jsonl --verbalizer 否,是 --device cuda
    python -m search.s3pet --model cpm-ant-10b.pt --task cuge:ccpm --data-dir DIR --device cuda   # search/cuge.py

As an API (notebooks):

    from search.s3pet import Config, run
    result = run(Config(budget="0.01%", space="M"))
    result.spec, result.test["accuracy"]

Writes into --output-dir: structure.json, structure.spec (a deltakit spec string that
deltakit.attach re-applies), gates.png (heat map), metrics.json, deltas/ (the retrained deltas,
handle.save format) and search.ckpt.safetensors (the resumable search state: rerunning the same
command after a crash continues from it and finishes with the same result).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import typing
from dataclasses import fields
from pathlib import Path

import torch

import deltakit
from deltakit import distributed as dist

from . import extras, outputs, ranks
from .budget import check_fits
from .config import Config, Result
from .discretize import greedy_knapsack, random_structure, structure_cost
from .errors import BudgetError, SearchError
from .prepare import needs, prepare
from .retrain import evaluate, train_structure
from .space import build_space
from .supernet import CKPT, search


def run(cfg: Config) -> Result:
    """Search (or draw a random structure), retrain it from scratch, report. See the module doc."""
    if not isinstance(cfg, Config):
        raise SearchError(f"run() takes a search.s3pet.Config, got {type(cfg).__name__}; "
                          f"build one with Config(...) or Config.from_dict(...)")
    extras.require(needs(cfg))             # a missing package fails now, not after the search
    ranks.start(cfg)                       # under torchrun (WORLD_SIZE > 1): join the process group
    out = Path(cfg.output_dir) if cfg.output_dir else None
    heatmap = out is not None and extras.optional("matplotlib", f"the gate heat map {out / 'gates.png'}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()

    setup = prepare(cfg)
    backbone, budget, fixed = setup.backbone, setup.budget, setup.fixed
    space = build_space(backbone.model, cfg.space, fixed)
    check_fits(budget, space.sizes, sum(space.rule_params.values()))
    groups = [c.rule if c.rule in space.rule_params else None for c in space.candidates]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    logger = outputs.logger(cfg, out)
    setup_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    probs, search_info = None, {}
    if cfg.strategy == "search":
        probs, search_info = search(cfg, backbone, space, budget, fixed, setup.trn, setup.dev,
                                    out / CKPT if out is not None else None, logger)
        chosen = greedy_knapsack(probs, space.sizes, budget.params, groups, space.rule_params)
    else:
        chosen = random_structure(space.sizes, budget.params, cfg.seed, groups, space.rule_params)
    if dist.is_sharded(backbone.model):    # torchrun: a sharded model takes no new deltas; retrain on a fresh one
        setup = backbone = None
        setup = prepare(cfg)
        backbone = setup.backbone
    search_s = time.perf_counter() - t1
    cost = structure_cost(chosen, space.sizes, groups, space.rule_params)
    if cost > budget.params:   # never, unless a discretiser is wrong: then no structure over budget is trained
        raise BudgetError(f"the chosen structure costs {cost:,} parameters, over the budget {budget}: a bug in "
                          f"search/discretize.py, not in the settings; please report it with this command")

    t2 = time.perf_counter()
    structure_spec = space.spec_for(chosen)
    spec = "; ".join(s for s in (structure_spec, fixed) if s)
    retrain = train_structure(cfg, backbone, spec, setup.trn, setup.dev, logger)
    handle = retrain.pop("handle")
    retrain_s = time.perf_counter() - t2
    test_scores = evaluate(backbone, setup.test, cfg.batch_size)
    logger.log({f"test/{k}": v for k, v in test_scores.items()})

    seconds = {"setup": round(setup_s, 1), "search": round(search_s, 1), "retrain": round(retrain_s, 1),
               "total": round(time.perf_counter() - t0, 1)}
    metrics = outputs.metrics(cfg, setup, space, chosen, cost, handle, test_scores, retrain, search_info, seconds)
    result = Result(spec, structure_spec, fixed, [space.candidates[i].key for i in chosen], cost, budget,
                    test_scores, retrain["dev"], metrics, out, probs or [], backbone.model, handle)
    if out is not None:
        outputs.write_outputs(result, space, chosen, probs, search_info, handle, heatmap)
    outputs.log_result(logger, result, space, probs)     # after the files: the heat map goes in too
    logger.finish()
    return result


# ---- command line: one flag per Config field, its parser read from the field's type ------------

def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true/false")


def _reader(hint):
    """A flag's parser for a field annotation: int, float or str; 'none' is None where the type allows it."""
    kinds = typing.get_args(hint) or (hint,)
    read = str if str in kinds else next(k for k in kinds if k is not type(None))
    if type(None) not in kinds:
        return read

    def read_or_none(text: str):
        return None if text.lower() == "none" else read(text)
    read_or_none.__name__ = read.__name__   # argparse names the type in its errors
    return read_or_none


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.s3pet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        if hint is bool and f.default is False:     # an off-by-default switch: --wandb, --fresh
            p.add_argument(flag, action="store_true", default=False)
        elif hint is bool:                          # on by default: --progress false
            p.add_argument(flag, type=_bool, default=f.default, metavar="true|false", help="(default: true)")
        else:
            p.add_argument(flag, type=_reader(hint), default=f.default, help="(default: %(default)s)")
    return p


def main(argv=None) -> int:
    args = vars(parser().parse_args(argv))
    with extras.one_line_warnings():
        try:
            with dist.guard("the search"):           # torchrun: a rank that died is an error here, not a hang
                result = run(Config(**args))
        except (deltakit.DeltakitError, OSError) as e:   # what the user can fix: one line, no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            main_rank = dist.is_main()
            if dist.world_size() > 1:
                dist.shutdown()
    if not main_rank:
        return 0
    summary = {"spec": result.spec, "cost": result.cost, "budget": result.budget.params, "test": result.test,
               "dev": result.dev, "seconds": result.metrics["seconds"], "output_dir": str(result.output_dir)}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
