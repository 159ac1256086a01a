"""What the search trains through: a model, its tokenizer, and how a batch becomes a loss and
predictions. Hugging Face sequence classifiers by default; other kinds override encode / pad_id /
logits / loss (search/cpm.py: CPM-Ant's LM head at label words) or loss / predict alone
(search/cuge.py: a CUGE recipe reading batches of choice rows)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Backbone:
    """A sequence classifier: Hugging Face by default; other kinds override encode/pad_id/logits."""
    model: torch.nn.Module
    tokenizer: object
    prefix: str = ""                 # text prefix the model expects (e5: "query: ")
    fixed: str | None = "full@head"  # always-on deltas (a new task head), outside the budget
    device: torch.device = torch.device("cpu")   # where the model is; batches are built on the CPU

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        return self.tokenizer([self.prefix + t for t in texts], truncation=True, max_length=max_length)["input_ids"]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def logits(self, batch: dict) -> torch.Tensor:
        """(batch, classes) scores of a batch from `data.Encoded.batch`."""
        return self.model(**{k: v.to(self.device) for k, v in batch.items() if k != "labels"}).logits

    def loss(self, batch: dict) -> torch.Tensor:
        return self.model(**{k: v.to(self.device) for k, v in batch.items()}).loss

    def predict(self, batch: dict) -> list[int]:
        """The predicted class (or option) of each example of a batch: what dev and test score."""
        return self.logits(batch).argmax(-1).tolist()
