"""A tiny offline model folder and JSONL task for tests and smoke runs (seconds on a CPU):
a 2-layer XLM-R sequence classifier with a word-level tokenizer, a 2-layer native CPM-Ant in
CPM-Live's file layout, and a bag-of-words sentiment task."""
from __future__ import annotations

import json
import random
from pathlib import Path

POS = ["good", "great", "fine", "nice", "love", "superb", "happy", "tasty"]
NEG = ["bad", "awful", "poor", "hate", "broken", "sad", "bland", "slow"]
FILL = ["the", "movie", "food", "very", "it", "was", "and", "a", "is", "this", "service", "room"]


def make_model(folder, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaForSequenceClassification
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + POS + NEG + FILL)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", cls_token="<s>", sep_token="</s>").save_pretrained(folder)
    cfg = XLMRobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
                           num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    XLMRobertaForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def make_cpmant(folder, seed: int = 0, checkpoint: str = "cpm-ant-tiny.pt") -> Path:
    """A native CPM-Ant folder as CPM-Live ships one: config JSON, vocab (specials + the task's
    words) and a torch checkpoint of plain tensors. Returns the checkpoint path."""
    import torch
    from deltakit.backbones import cpmant
    from deltakit.backbones.cpmant_tokenizer import SPECIALS
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = list(SPECIALS) + POS + NEG + FILL + ["neg", "pos"]
    (folder / "ant.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    cfg = cpmant.CPMAntConfig(**{**cpmant.CONFIGS["tiny"].__dict__, "vocab_size": len(vocab)})
    cfg.to_json(folder / (Path(checkpoint).stem + ".json"))
    torch.manual_seed(seed)
    model = cpmant.build(cfg)
    with torch.no_grad():
        for emb in (model.input_embedding, model.prompt_embedding, model.segment_embedding):
            emb.weight.normal_()   # trained CPM-Ant embeddings are O(1), not CPM-Live's init scale
    path = folder / checkpoint
    torch.save(model.state_dict(), path)
    return path


def make_task(path, n: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            label = rng.random() < 0.5
            words = [rng.choice(FILL) for _ in range(rng.randint(3, 8))]
            words += [rng.choice(POS if label else NEG) for _ in range(rng.randint(1, 2))]
            words += [rng.choice(NEG if label else POS) for _ in range(rng.randint(0, 1))]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": "pos" if label else "neg"}) + "\n")
    return path
