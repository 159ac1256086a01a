"""CPM-Ant (native, `deltakit.backbones.cpmant`) tuned as CPM-Live tunes it for CUGE: OpenBMB/CPM-Live,
branch cpm-ant at commit 121a23f (the last one whose inference matches its tuning), cpm-live/examples/.

Every sequence starts with the 32 prompt positions of task id 1 (segment 0), then <s> and the text
(segment 2). The default delta is CPM-Live's: LoRA r=8, alpha=16 on project_q and project_v, 6,291,456
parameters on the 10B; its prompt rows stay frozen, as `freeze_module(exclude=["deltas"])` leaves them
(add `; prompt@prompt` to --delta to tune them too).

* generate / math / tag rows (tune.py `CPMAntNLGTune`): <s> + encode(input) + encode(target) + </s>;
  prompt and input are context (seen bidirectionally), the target is causal, and the loss is the
  cross-entropy of the target tokens (and </s>) alone, averaged over the batch's tokens. A sequence
  longer than max_len loses the start of its input. Predicted by beam search (beam 3,
  `deltakit.backbones.cpmant_generate`) from prompt + <s> + input with <unk> ids dropped, as
  CPMAntGeneration does. Tag rows learn their segmented line as text.
* choice rows (`CPMAntNLUTune`): one sequence per option, <s> + encode(input) + encode(option) +
  encode("[是否正确]"), all context, cut from the left; the option's score is the LM logit of "是" at
  the last position, and the loss the cross-entropy over the row's options. CPM-Live's own CCPM data
  answered with one label token (NLG, --infer-maxlen 1); CUGE's released CCPM has the four
  candidate lines, so CCPM is scored like C3 here.
* rank rows (`CPMAntScoreInfer`): <s> + encode(option) + encode("[是否正确]") per candidate document
  (the option already holds query and title), scored by the "是" logit; Sogou-Log trains on its
  (positive, negative) choice rows exactly as above.

`choice_logits(model, tokenizer, rows)` is the scoring the S3PET search can call on choice rows.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from deltakit.errors import DeltakitError

from ..errors import CugeError
from .common import (GENERATIVE, HParams, check_kind, choice_loss, max_new_tokens, options_of, rank_loss,
                     scatter_options, target_text, weights_dtype)

NAME = "cpm-ant"
TASK_ID = 1                      # CPM-Live tunes with task 1's prompt rows (its generation defaults to 2)
YES, ASK = "是", "[是否正确]"
BEAMS = 3
DEFAULT_DELTA = "lora(r=8,alpha=16)@attn.q,attn.v"
KINDS = ("choice", "rank") + GENERATIVE

# CPM-Live's examples/scripts/*.sh (batch size per GPU, tune max len, lr, epochs, patience, eval
# interval, infer max len); Noam schedule with 50 warm-up steps, weight decay 0.01, gradient clip 10.
_LIVE = dict(warmup=50, schedule="noam", clip=10.0, weight_decay=0.01)
HPARAMS = {
    "ccpm": HParams(batch_size=32, max_len=256, lr=5e-3, epochs=20, patience=10, eval_every=50, **_LIVE),
    "c3": HParams(batch_size=6, max_len=1024, lr=1e-3, epochs=20, patience=10, eval_every=50, **_LIVE),
    "kdconv": HParams(batch_size=12, max_len=1500, lr=5e-3, epochs=100, patience=10, eval_every=50, max_new=50,
                      **_LIVE),
    "lcsts": HParams(batch_size=128, max_len=256, lr=2e-2, epochs=20, patience=20, eval_every=50, max_new=50,
                     **_LIVE),
    "math23k": HParams(batch_size=16, max_len=256, lr=5e-3, epochs=100, patience=10, eval_every=50, max_new=32,
                       **_LIVE),
    "sogou_log": HParams(batch_size=64, max_len=256, lr=3e-3, epochs=20, patience=10, eval_every=100, **_LIVE),
}
OTHER = HParams(batch_size=16, max_len=512, lr=5e-3, epochs=20, patience=10, eval_every=50, **_LIVE)


# ---- finding and loading -----------------------------------------------------------------------

def files(path) -> tuple[Path, Path | None, Path] | None:
    """(checkpoint, config JSON or None, vocab) of a native CPM-Ant path as CPM-Live ships it
    (deltakit.backbones.cpmant.native_files, which search.cpm reads too); None when `path` is not one."""
    from deltakit.backbones.cpmant import native_files
    try:
        found = native_files(path)
    except DeltakitError as e:
        raise CugeError(str(e)) from None
    if found is not None and found[2] is None:
        raise CugeError(f"no CPM-Ant vocab next to {found[0]}: put CPM-Live's cpm_live/vocabs/ant.txt in "
                        f"{found[0].parent}")
    return found


def load(path, device="cpu") -> "CPMAntRecipe":
    from deltakit.backbones import cpmant
    from deltakit.backbones.cpmant_tokenizer import CPMAntTokenizer
    found = files(path)
    if found is None:
        raise CugeError(f"{path} is not a native CPM-Ant checkpoint (a .pt/.bin/.safetensors file, or its "
                        "folder, with CPM-Live's config JSON and ant.txt beside it)")
    ckpt, config, vocab = found
    if config is None and ckpt.stem not in cpmant.CONFIGS:
        raise CugeError(f"no CPM-Ant config for {ckpt}: put CPM-Live's config JSON (e.g. cpm-ant-10b.json) next "
                        f"to it, or name the checkpoint after a known size ({', '.join(cpmant.CONFIGS)})")
    tokenizer = CPMAntTokenizer(vocab)
    model = cpmant.load_cpmant(ckpt, config or ckpt.stem, dtype=weights_dtype(device), device=device)
    return CPMAntRecipe(model, tokenizer)


# ---- scoring -------------------------------------------------------------------------------------

def yes_logits(model, tokenizer, pieces: list[list[int]], max_len: int) -> torch.Tensor:
    """The LM logit of "是" after each token list (all context), cut from the left to fit max_len."""
    from deltakit.backbones.cpmant import make_inputs
    room = max_len - model.config.prompt_length
    if room < 1:
        raise CugeError(f"max_len={max_len} leaves no room after the {model.config.prompt_length} prompt positions")
    device = next(model.parameters()).device
    x = make_inputs(model.config, [p[-room:] for p in pieces], task_id=TASK_ID, device=device)
    logits = model(**x)[0]
    yes = _yes_id(tokenizer)
    return logits[torch.arange(len(pieces), device=device), x["length"] - 1, yes].float()


def _yes_id(tokenizer) -> int:
    ids = tokenizer.encode(YES)
    if not ids or ids[0] == tokenizer.unk_id:
        raise CugeError(f"the CPM-Ant vocab has no token for {YES!r}, which multiple-choice scoring reads")
    return ids[0]


def choice_logits(model, tokenizer, rows, max_len: int = 512) -> torch.Tensor:
    """(rows, most options) scores of choice rows ({"input", "options"}): the "是" logit after
    <s> + input + option + "[是否正确]"; -inf where a row has fewer options."""
    pairs, width = options_of(rows)
    head = {b: [tokenizer.bos_id] + tokenizer.encode(rows[b]["input"]) for b in {b for b, _ in pairs}}
    ask = tokenizer.encode(ASK)
    pieces = [head[b] + tokenizer.encode(rows[b]["options"][k]) + ask for b, k in pairs]
    return scatter_options(yes_logits(model, tokenizer, pieces, max_len), pairs, rows, width)


def rank_logits(model, tokenizer, rows, max_len: int = 512) -> torch.Tensor:
    """(rows, most candidates) scores of rank rows: the "是" logit after <s> + option + "[是否正确]"
    (the option already holds query and title); -inf where a row has fewer candidates."""
    pairs, width = options_of(rows)
    ask = tokenizer.encode(ASK)
    pieces = [[tokenizer.bos_id] + tokenizer.encode(rows[b]["options"][k]) + ask for b, k in pairs]
    return scatter_options(yes_logits(model, tokenizer, pieces, max_len), pairs, rows, width)


# ---- the recipe ----------------------------------------------------------------------------------

class CPMAntRecipe:
    name = NAME
    default_delta = DEFAULT_DELTA
    kinds = KINDS

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.dataset, self.hp = None, OTHER

    def hparams(self, dataset) -> HParams:
        return HPARAMS.get(dataset.name, OTHER)

    def setup(self, dataset, hp: HParams, train_rows=None):
        """Bind the dataset and the hyper-parameters the run settled on (max_len, max_new)."""
        self.dataset, self.hp = dataset, hp

    @property
    def device(self):
        return next(self.model.parameters()).device

    def loss(self, rows, kind: str) -> torch.Tensor:
        check_kind(kind, KINDS, NAME)
        if kind == "choice":
            return choice_loss(choice_logits(self.model, self.tokenizer, rows, self.hp.max_len), rows)
        if kind == "rank":
            return rank_loss(rank_logits(self.model, self.tokenizer, rows, self.hp.max_len), rows)
        return self._lm_loss(rows, kind)

    def _lm_loss(self, rows, kind) -> torch.Tensor:
        from deltakit.backbones.cpmant import make_inputs
        tok, P = self.tokenizer, self.model.config.prompt_length
        seqs, n_ctx = [], []
        for r in rows:
            source = [tok.bos_id] + tok.encode(r["input"])
            target = tok.encode(target_text(r, kind)) + [tok.eos_id]
            room = self.hp.max_len - P - len(target)
            if room > 0:
                source = source[-room:]          # CPM-Live keeps the end of a long input
            else:
                source, target = [], target[-(self.hp.max_len - P):]
            seqs.append(source + target)
            n_ctx.append(len(source))
        x = make_inputs(self.model.config, seqs, task_id=TASK_ID, context=n_ctx, device=self.device)
        logits = self.model(**x)[0]
        # position j predicts token j+1 where j+1 is a target token (not context, not padding)
        valid = torch.arange(x["input"].size(1), device=self.device)[None] < x["length"][:, None]
        is_target = valid & ~x["context"].bool()
        labels = torch.where(is_target[:, 1:], x["input"][:, 1:], -100)
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=-100)

    @torch.no_grad()
    def predict(self, rows, kind: str) -> list:
        check_kind(kind, KINDS, NAME)
        if kind == "choice":
            scores = choice_logits(self.model, self.tokenizer, rows, self.hp.max_len)
            return scores.argmax(-1).tolist()
        if kind == "rank":
            scores = rank_logits(self.model, self.tokenizer, rows, self.hp.max_len)
            return [s[:len(r["options"])].tolist() for s, r in zip(scores, rows)]
        return self.generate(rows, kind)

    def generate(self, rows, kind: str) -> list[str]:
        from deltakit.backbones.cpmant_generate import beam_search
        tok = self.tokenizer
        new = max_new_tokens(self.dataset, self.hp, rows, kind)
        room = max(1, self.hp.max_len - self.model.config.prompt_length - new)
        sources = [([tok.bos_id] + [i for i in tok.encode(r["input"]) if i != tok.unk_id])[-room:] for r in rows]
        out = beam_search(self.model, sources, beam_size=BEAMS, max_new_tokens=new, eos_id=tok.eos_id,
                          task_id=TASK_ID)
        return [tok.decode(ids) for ids in out]
