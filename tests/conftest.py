"""Shared test setup: everything runs offline and quietly."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"   # no test may reach the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:   # quiet transformers' config warnings (tiny vocabularies, unused kwargs) without importing it eagerly
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
except ImportError:   # transformers is optional; tests that need it skip themselves
    pass

import torch

# Tiny models gain nothing from intra-op threads, and OpenMP workers spinning on a busy machine
# make every small matmul take milliseconds instead of microseconds.
torch.set_num_threads(1)
