"""The search space: candidates = (position x delta type), read from a deltakit spec string.

Any registered delta type (`deltakit.delta_types`) may be a candidate, including ones added later:
the space is whatever `deltakit.plan(model, spec)` resolves, with its parameter counts known before
anything is built. Presets mirror the paper's two spaces:

* `M` (S3PET-M): LoRA r=1 on the attention and FFN projections, BitFit on those and on the norms,
  LNFit on the norms, low-rank adapters (bottleneck 32, rank 1) after the attention and FFN blocks.
* `L` (S3PET-L): LoRA r=1 on the attention and FFN projections only.
"""
from __future__ import annotations

from dataclasses import dataclass

import deltakit

from .errors import SearchError

PRESETS = {
    "M": "lora(r=1,alpha=16)@attn.*,ffn.*; bitfit@attn.*,ffn.*,ln.*; lnfit@ln.*; lowrank_adapter(dim=32,rank=1)@attn,ffn",
    "L": "lora(r=1,alpha=16)@attn.*,ffn.*",
}


@dataclass(frozen=True)
class Candidate:
    index: int
    key: str            # "<position>.<type>", as Handle entries name it
    position: str       # the position's name (canonical, or its raw path for a `re:` position)
    pattern: str        # a pattern that selects exactly this position again (deltakit Position.pattern)
    local: str          # name inside a layer ("attn.q"), or the model-level name
    layer: int | None
    stack: str | None
    type: str
    head: str           # the rule's "type(options)" part
    num_params: int
    rule: str           # the rule it came from

    @property
    def column(self) -> str:
        """The heat-map column: where in a layer, and which type."""
        return f"{self.stack + '.' if self.stack else ''}{self.local} {self.type}"


@dataclass
class Space:
    spec: str
    candidates: list
    rule_params: dict   # rule text -> parameters shared by all candidates of the rule (hypernetworks)

    @property
    def sizes(self) -> list:
        return [c.num_params for c in self.candidates]

    @property
    def total(self) -> int:
        return sum(self.sizes) + sum(self.rule_params.values())

    def __len__(self):
        return len(self.candidates)

    def spec_for(self, chosen) -> str:
        """A deltakit spec string that attaches exactly the chosen candidates (indices or Candidates)."""
        chosen = sorted({c if isinstance(c, int) else c.index for c in chosen})
        groups: dict = {}
        for i in chosen:
            c = self.candidates[i]
            groups.setdefault(c.head, []).append(c.pattern)
        return "; ".join(f"{head}@{','.join(names)}" for head, names in groups.items())


def resolve_spec(space: str) -> str:
    return PRESETS.get(space.strip().upper(), space) if isinstance(space, str) else space


def build_space(model, space: str = "M", fixed: str | None = None) -> Space:
    """Plan the candidates of `space` (a preset name or a spec string) on `model` without building
    them. `fixed` is the always-on part (e.g. a task head); a candidate may not repeat it."""
    if not isinstance(space, str) or not space.strip():
        raise SearchError(f"search space must be M, L or a deltakit spec string, got {space!r}")
    spec = resolve_spec(space)
    planned = deltakit.plan(model, spec)   # raises deltakit's SpecError/PatternError/KindError
    fixed_keys = {p.key for p in deltakit.plan(model, fixed)} if fixed else set()
    candidates = []
    for i, p in enumerate(planned):
        if p.key in fixed_keys:
            raise SearchError(f"candidate {p.key!r} is also in the fixed part {fixed!r}; drop it from one of them")
        head = p.rule.split("@", 1)[0].strip()
        pos = p.position
        candidates.append(Candidate(i, p.key, pos.name, pos.pattern, pos.local or pos.name, pos.layer, pos.stack,
                                    p.type.name, head, int(p.num_params), p.rule))
    if not candidates:
        raise SearchError(f"search space {spec!r} has no candidates on this model")
    rule_params = {rule: int(s.num_params) for rule, s in planned.shared.items()}
    return Space(spec, candidates, rule_params)
