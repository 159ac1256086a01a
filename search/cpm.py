"""Native CPM-Ant as a search backbone: `--model` a CPM-Live checkpoint (or its folder) with its
config JSON and vocab next to it.

    folder/cpm-ant-10b.pt     the checkpoint (.pt/.bin from CPM-Live, or .safetensors), read as tensors
    folder/cpm-ant-10b.json   CPM-Live's config (config/cpm-ant-10b.json); optional when the file
                              is named after a known size (cpm-ant-10b.pt, cpm-ant-3b.pt, ...)
    folder/ant.txt            CPM-Live's vocab (cpm_live/vocabs/ant.txt; any single .txt vocab)

No head is added: the task is read through the language-model head, laid out as CPM-Live's CUGE
tuning does (cpm-ant branch, examples/): the prompt rows of task_id 1, <s> and the text, all context;
the class scores are the LM logits, at the position that generates the first answer token, of each
label word's first token (a verbaliser; CPM-Live's CCPM answers with one label token the same way).
The backbone stays whole and frozen, and the budget counts all of it, embeddings too.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .backbone import Backbone
from .errors import SearchError

TASK_ID = 1   # CPM-Live tunes with the prompt rows of task 1 (its generation defaults to 2)


class CPMAntBackbone(Backbone):
    """Label words scored by the LM head at the last text position."""

    def __init__(self, model, tokenizer, word_ids: list[int], device=torch.device("cpu")):
        super().__init__(model, tokenizer, prefix="", fixed=None, device=device)
        self.word_ids = torch.tensor(word_ids, device=device)

    def encode(self, texts, max_length):
        bos = self.tokenizer.bos_id
        return [[bos] + self.tokenizer.encode(t)[:max_length - 1] for t in texts]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def logits(self, batch):
        from deltakit.backbones.cpmant import make_inputs
        lengths = batch["attention_mask"].sum(1)
        rows = [ids[:n].tolist() for ids, n in zip(batch["input_ids"], lengths)]
        x = make_inputs(self.model.config, rows, task_id=TASK_ID, device=self.device)
        logits = self.model(**x)[0]                                   # (B, P + L, vocab)
        last = x["length"] - 1                                        # padding is on the right
        return logits[torch.arange(len(rows), device=self.device), last][:, self.word_ids].float()

    def loss(self, batch):
        return F.cross_entropy(self.logits(batch), batch["labels"].to(self.device))


def _files(path: Path) -> tuple[Path, Path | None, Path | None] | None:
    """(checkpoint, config JSON, vocab) of a native CPM-Ant path, or None when it is not one."""
    from deltakit.backbones.cpmant import native_files
    from deltakit.errors import DeltakitError
    try:
        return native_files(path)
    except DeltakitError as e:
        raise SearchError(str(e)) from None


def is_native_cpmant(path) -> bool:
    """Whether `path` is a native CPM-Ant checkpoint or folder (an ambiguous folder is one too: loading it says why)."""
    try:
        return _files(Path(path)) is not None
    except SearchError:
        return True


def _word_ids(tokenizer, words: list[str]) -> list[int]:
    ids = []
    for word in words:
        toks = tokenizer.encode(word)
        if not toks or tokenizer.unk_id in toks:
            raise SearchError(f"label word {word!r} is not spelled by the CPM-Ant vocab (it gives <unk>); "
                              f"give words it has with --verbalizer (one per label, comma-separated)")
        ids.append(toks[0])
    if len(set(ids)) < len(ids):
        first = [tokenizer.convert_ids_to_tokens([i])[0] for i in ids]
        raise SearchError(f"label words {words} start with the same token ({first}); the verbaliser scores "
                          f"first tokens, so give words that differ there with --verbalizer")
    return ids


def weights_dtype(device) -> torch.dtype:
    """bf16 on a GPU (CPM-Live's half precision); fp32 on a CPU, where bf16 matmuls are slow.
    The deltas are float32 either way (deltakit.attach)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_cpmant_backbone(path, words, seed, device) -> CPMAntBackbone | None:
    from deltakit.backbones import cpmant
    from deltakit.backbones.cpmant_tokenizer import CPMAntTokenizer
    from deltakit.errors import DeltakitError

    found = _files(Path(path))
    if found is None:
        return None
    ckpt, config, vocab = found
    if config is None and ckpt.stem not in cpmant.CONFIGS:
        raise SearchError(f"no CPM-Ant config for {ckpt}: put CPM-Live's config JSON (e.g. config/cpm-ant-10b.json) "
                          f"next to it, or name the checkpoint after a known size ({', '.join(cpmant.CONFIGS)})")
    if vocab is None:
        raise SearchError(f"no CPM-Ant vocab next to {ckpt}: put CPM-Live's cpm_live/vocabs/ant.txt "
                          f"in {ckpt.parent} (as ant.txt or the only .txt file there)")
    try:
        tokenizer = CPMAntTokenizer(vocab)
        model = cpmant.load_cpmant(ckpt, config or ckpt.stem, dtype=weights_dtype(device), device=device)
    except DeltakitError as e:
        raise SearchError(f"cannot load native CPM-Ant from {str(path)!r}: {e}") from None
    return CPMAntBackbone(model, tokenizer, _word_ids(tokenizer, words), device)
