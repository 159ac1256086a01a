"""Reading and merging Megatron model-parallel checkpoints (deltakit.backbones.megatron).

Shards are written the way Megatron's `mpu/layers.py::_initialize_affine_weight` splits a master weight
(stride * world chunks, rank r keeps chunks r, r+world, ...), independently of the code under test."""
import argparse
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from deltakit.backbones import megatron as mg
from deltakit.errors import CheckpointError

RULES = [(r"qkv\.weight", mg.Split(0, 3)), (r"kv\.weight", mg.Split(0, 2)), (r"col\.(weight|bias)", mg.COLUMN),
         (r"row\.weight", mg.ROW), (r"emb\.weight", mg.VOCAB), (r"(norm|row\.bias)", mg.REPLICATED)]


def megatron_split(master, world, dim, stride=1):
    """Megatron: split into chunks of per_partition_size/stride; rank r takes chunks r::world."""
    per_stride = master.shape[dim] // world // stride
    chunks = torch.split(master, per_stride, dim=dim)
    return [torch.cat(chunks[r::world], dim=dim) for r in range(world)]


def reference(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return {"a.qkv.weight": r(24, 8), "a.kv.weight": r(16, 8), "a.col.weight": r(16, 8), "a.col.bias": r(16),
            "a.row.weight": r(8, 16), "a.row.bias": r(8), "emb.weight": r(32, 8), "a.norm": r(8)}


SPEC = {"a.qkv.weight": (0, 3), "a.kv.weight": (0, 2), "a.col.weight": (0, 1), "a.col.bias": (0, 1),
        "a.row.weight": (1, 1), "emb.weight": (0, 1)}


def shards_of(ref, world):
    ranks = [{} for _ in range(world)]
    for k, t in ref.items():
        parts = megatron_split(t, world, *SPEC[k]) if k in SPEC else [t.clone()] * world
        for sd, p in zip(ranks, parts):
            sd[k] = p.clone()
    return ranks


@pytest.mark.parametrize("world", [1, 2, 4])
def test_merge_inverts_megatron_split_exactly(tmp_path, world):
    ref = reference()
    ranks = shards_of(ref, world)
    if world > 1:   # rank 0 holds [q_0; k_0; v_0]: the first rows of q, then of k, then of v
        q, k, v = ref["a.qkv.weight"].chunk(3)
        n = 8 // world
        assert torch.equal(ranks[0]["a.qkv.weight"], torch.cat([q[:n], k[:n], v[:n]]))
        naive = torch.cat([sd["a.qkv.weight"] for sd in ranks])
        assert not torch.equal(naive, ref["a.qkv.weight"])   # a plain concat interleaves q/k/v
    for a, b in zip(mg.split(ref, world, RULES), ranks):   # the library's split is Megatron's
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mg.save(tmp_path / "ckpt", ranks, iteration=80000)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "80000"
    merged = mg.load_merged(tmp_path / "ckpt", RULES)
    assert merged.keys() == ref.keys() and all(torch.equal(merged[k], ref[k]) for k in ref)
    half = mg.load_merged(tmp_path / "ckpt" / "80000", RULES, dtype=torch.float16)   # the iteration folder works too
    assert half["a.qkv.weight"].dtype == torch.float16


def _write(tmp_path, ranks, blob=lambda sd: {"module": sd}):
    folder = tmp_path / "ckpt" / "100"
    folder.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("100")
    for r, sd in enumerate(ranks):
        torch.save(blob(sd), folder / f"mp_rank_{r:02d}_model_states.pt")
    return tmp_path / "ckpt"


def test_deepspeed_extras_numpy_rng_and_model_key_load(tmp_path):
    ranks = shards_of(reference(), 2)
    extras = lambda sd: {"model": sd, "np_rng_state": np.random.get_state(), "iteration": 100,
                         "cuda_rng_state": torch.zeros(4, dtype=torch.uint8), "optimizer": None,
                         "csr_tensor_module_names": set(), "random_rng_state": (3, (1, 2), None)}
    merged = mg.load_merged(_write(tmp_path, ranks, extras), RULES)
    assert torch.equal(merged["emb.weight"], reference()["emb.weight"])


def test_missing_shard(tmp_path):
    path = _write(tmp_path, shards_of(reference(), 4))
    (path / "100" / "mp_rank_02_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"misses model-parallel shard\(s\) mp_rank_02_model_states.pt"):
        mg.load_merged(path, RULES)


def test_damaged_shard(tmp_path):
    path = _write(tmp_path, shards_of(reference(), 2))
    shard = path / "100" / "mp_rank_01_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt could not be read"):
        mg.load_merged(path, RULES)


def test_inconsistent_replicated_tensor(tmp_path):
    ranks = shards_of(reference(), 2)
    ranks[1]["a.norm"] = ranks[1]["a.norm"] + 1e-3
    with pytest.raises(CheckpointError, match=r"'a.norm' should be replicated .* rank 1 differs"):
        mg.load_merged(_write(tmp_path, ranks), RULES)


def test_shape_mismatch_between_ranks(tmp_path):
    ranks = shards_of(reference(), 2)
    ranks[1]["a.col.weight"] = ranks[1]["a.col.weight"][:4]
    with pytest.raises(CheckpointError, match=r"'a.col.weight' has different shapes on different ranks"):
        mg.load_merged(_write(tmp_path, ranks), RULES)


def test_ranks_with_different_keys(tmp_path):
    ranks = shards_of(reference(), 2)
    del ranks[1]["a.norm"]
    with pytest.raises(CheckpointError, match="rank 1 and rank 0 hold different tensors"):
        mg.load_merged(_write(tmp_path, ranks), RULES)


def test_unknown_key_has_no_rule(tmp_path):
    ranks = [{**sd, "b.mystery": torch.ones(2)} for sd in shards_of(reference(), 2)]
    with pytest.raises(CheckpointError, match="unexpected tensor 'b.mystery'"):
        mg.load_merged(_write(tmp_path, ranks), RULES)


def test_wrong_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a Megatron checkpoint folder.*latest_checkpointed_iteration"):
        mg.load_shards(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="is not a folder"):
        mg.load_shards(tmp_path / "nowhere")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "latest_checkpointed_iteration.txt").write_text("5000\n")
    with pytest.raises(CheckpointError, match="names iteration '5000'.*does not exist"):
        mg.load_shards(tmp_path / "t")


def test_no_weights_key(tmp_path):
    path = _write(tmp_path, shards_of(reference(), 1), blob=lambda sd: {"weights": sd})
    with pytest.raises(CheckpointError, match="no weights under 'module' or 'model'"):
        mg.load_shards(path)


class Payload:
    ran = False

    def __reduce__(self):
        return (Payload._run, ())

    @staticmethod
    def _run():
        Payload.ran = True
        return "pwned"


def test_non_tensor_pickles_are_refused_not_executed(tmp_path):
    path = _write(tmp_path, shards_of(reference(), 1),
                  blob=lambda sd: {"module": sd, "args": argparse.Namespace(lr=1.0), "x": Payload()})
    Payload.ran = False
    with pytest.raises(CheckpointError, match=r"pickled Python objects other than tensors .*Namespace.*"
                                              r"weights_only=True.*re-save"):
        mg.load_shards(path)
    assert not Payload.ran
