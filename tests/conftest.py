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

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and OpenMP workers spinning on a busy machine
# make every small matmul take milliseconds instead of microseconds.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _default_dtype_is_restored():
    """Fail the test that leaves torch's default dtype changed, not the unrelated tests after it."""
    old = torch.get_default_dtype()
    yield
    changed = torch.get_default_dtype()
    torch.set_default_dtype(old)
    assert changed == old, f"this test left torch's default dtype at {changed} (was {old})"


def pytest_collection_finish(session):
    """A test module that changes the default dtype when imported would change it for every test."""
    if torch.get_default_dtype() != torch.float32:
        raise pytest.UsageError(f"importing the test modules left torch's default dtype at "
                                f"{torch.get_default_dtype()}; set it in a fixture instead")
