"""deltakit.io: atomic writes and the state files runs resume from."""
import random

import numpy as np
import pytest
import torch

from deltakit.errors import CheckpointError
from deltakit.io import atomic_write, read_state, rng_state, set_rng_state, write_json, write_state


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json(tmp_path / "a.json", {"v": 1})

    def half(tmp):
        tmp.write_text('{"v": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == '{\n  "v": 1\n}' and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_state_round_trip_and_refusals(tmp_path):
    path = tmp_path / "state.safetensors"
    assert read_state(path, "fmt", "test state", CheckpointError) is None        # a fresh start
    write_state(path, {"w": torch.arange(6.).view(2, 3)}, {"step": 3, "best": [0.5]}, "fmt")
    tensors, state = read_state(path, "fmt", "test state", CheckpointError)
    assert torch.equal(tensors["w"], torch.arange(6.).view(2, 3)) and state == {"step": 3, "best": [0.5]}
    with pytest.raises(CheckpointError, match="is not a other state .*'fmt'.*expected 'other'"):
        read_state(path, "other", "other state", CheckpointError)
    path.write_bytes(path.read_bytes()[:40])                                       # damaged
    with pytest.raises(CheckpointError, match="cannot read the test state .*; start over here"):
        read_state(path, "fmt", "test state", CheckpointError, "start over here")


def test_rng_states_restore_every_generator(tmp_path):
    tensors, state = rng_state()
    write_state(tmp_path / "s", tensors, {"rng": state}, "fmt")
    first = torch.rand(3), random.random(), np.random.rand()
    tensors, saved = read_state(tmp_path / "s", "fmt", "state", CheckpointError)
    set_rng_state(tensors, saved["rng"])
    again = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
