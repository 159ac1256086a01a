"""The `deltakit` command: positions, plan and show on the meta device, from every kind of MODEL."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltakit import cli
from deltakit.backbones import cpmant

LORA_QV = "lora(r=8,alpha=16)@attn.q,attn.v"
CPM_LIVE_10B = {"vocab_size": 30720, "dim_model": 4096, "dim_ff": 10240, "num_layers": 48, "num_heads": 32,
                "dim_head": 128, "dropout_p": 0.0, "position_bias_num_buckets": 512,
                "position_bias_max_distance": 2048, "eps": 1e-6, "half": True, "prompt_types": 32,
                "prompt_length": 32, "segment_types": 32}   # CPM-Live's config/cpm-ant-10b.json


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def planned(capsys, model, spec):
    code, out, err = run(capsys, "plan", model, spec, "--json")
    assert code == 0, err
    return json.loads(out)


def test_plan_cpmant_10b_by_name_and_by_cpm_live_json(capsys, tmp_path):
    code, out, _ = run(capsys, "plan", "cpm-ant-10b", LORA_QV)
    assert code == 0
    assert "layers.0-47.attn.q" in out and "layers.0-47.attn.v" in out and "6,291,456 trainable" in out
    path = tmp_path / "cpm-ant-10b.json"
    path.write_text(json.dumps(CPM_LIVE_10B))
    by_json = planned(capsys, path, LORA_QV)
    assert by_json["num_params"] == planned(capsys, "cpm-ant-10b", LORA_QV)["num_params"] == 6_291_456
    assert len(by_json["deltas"]) == 96 and {d["params"] for d in by_json["deltas"]} == {8 * (4096 + 4096)}
    # the compressed 7B has attention in 37 layers only: the count follows the config
    assert planned(capsys, "cpm-ant-7b", LORA_QV)["num_params"] == 37 * 2 * 8 * (4096 + 4096)


def test_plan_cpm2_11b_and_cpm1(capsys):
    assert planned(capsys, "cpm-2", LORA_QV)["num_params"] == 2 * 24 * 2 * 8 * (4096 + 4096)   # both stacks
    code, out, _ = run(capsys, "plan", "cpm-2-11b", "prefix(n=16)@cross")
    assert code == 0 and "decoder.layers.0-23.cross" in out and f"{24 * 2 * 16 * 4096:,} trainable" in out
    # CPM-1 (GPT-2): attn.q is a slice of the fused c_attn
    assert planned(capsys, "cpm-1", LORA_QV)["num_params"] == 32 * 2 * 8 * (2560 + 2560)


def test_positions_folded_and_all(capsys):
    code, out, _ = run(capsys, "positions", "cpm-ant-7b")
    assert code == 0 and "CPMAnt: cpmant" in out
    assert "layers.0-36.attn.q" in out and "layers.0-31.ffn.out" in out and "prompt" in out
    code, out, _ = run(capsys, "positions", "cpm-ant-tiny", "--all")
    table = cpmant.build("tiny", device="meta")
    import deltakit
    names = deltakit.positions(table).names()
    assert code == 0 and all(n in out for n in names) and f"{len(names)} positions" in out


def test_hf_folder_from_config_alone(capsys, tmp_path):
    from transformers import BertConfig
    BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
               architectures=["BertForSequenceClassification"]).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]   # no weights at all
    got = planned(capsys, tmp_path, "lora(r=4)@attn.q,attn.v; full@head")
    assert got["num_params"] == 3 * 2 * 4 * (32 + 32) + (32 * 2 + 2)        # the config's class has a 2-label head
    code, out, err = run(capsys, "plan", tmp_path, "full@head", "--model-class", "BertModel")
    assert code == 2 and "head" in err and "\n" not in err.strip()           # BertModel has no head
    code, out, _ = run(capsys, "show", tmp_path, "adapter(dim=8)@ffn")
    assert code == 0 and "0-2 BertLayer x3" in out and "deltas" in out


def test_show_without_spec(capsys):
    code, out, _ = run(capsys, "show", "cpm-ant-tiny")
    assert code == 0 and "frozen" in out and "deltas" not in out


def test_spec_file(capsys, tmp_path):
    (tmp_path / "structure.spec").write_text("lora(r=2)@layers.0.attn.q\n")
    assert planned(capsys, "cpm-ant-tiny", tmp_path / "structure.spec")["num_params"] == 2 * (32 + 32)


def test_cpmant_checkpoint_is_checked_against_its_config(capsys, tmp_path):
    from safetensors.torch import save_file
    model = cpmant.build("tiny")
    save_file(model.state_dict(), tmp_path / "tiny.safetensors")            # named after a known size
    assert planned(capsys, tmp_path / "tiny.safetensors", LORA_QV)["num_params"] == 2 * 2 * 8 * 64
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "cpm-ant-small.json").write_text(json.dumps({**CPM_LIVE_10B, "vocab_size": 96, "dim_model": 32}))
    code, _, err = run(capsys, "plan", folder, LORA_QV)                      # the JSON says another shape
    assert code == 2 and err.startswith("error: ") and "does not fit the CPM-Ant config" in err
    (folder / "model.json").write_text(json.dumps(cpmant.CONFIGS["tiny"].__dict__))
    code, _, err = run(capsys, "plan", folder / "model.pt", LORA_QV)          # the JSON named after it wins
    assert code == 0, err


def _megatron_cpm2(path, world=2):
    import test_cpm2 as t
    from deltakit.backbones import megatron
    return megatron.save(path, t.shard(t.reference_weights(), world)), t


def test_megatron_folder(capsys, tmp_path, monkeypatch):
    from deltakit.backbones import cpm2
    path, t = _megatron_cpm2(tmp_path / "cpm2")
    code, _, err = run(capsys, "plan", path, LORA_QV)                      # not the published 11B shape
    assert code == 2 and "does not have the published CPM-2 11B shape" in err
    monkeypatch.setattr(cpm2, "SHAPE_11B", dict(d_model=t.D, d_ff=t.FF, d_kv=t.KV, num_heads=t.HEADS,
                                                num_layers=t.LAYERS, num_decoder_layers=t.LAYERS))
    monkeypatch.setattr(cpm2, "COMMON", {**cpm2.COMMON, "relative_attention_num_buckets": t.BUCKETS})
    got = planned(capsys, path, LORA_QV)                                   # read as load_cpm2 would read it
    assert got["num_params"] == 2 * t.LAYERS * 2 * 8 * (t.D + t.HEADS * t.KV)


@pytest.mark.parametrize("argv, says", [
    (("plan", "cpm-ant-11b", "lora"), "Did you mean: cpm-ant-1b, cpm-ant-10b"),
    (("plan", "cpm-ant-tiny", "lroa"), "Did you mean: lora?"),
    (("plan", "cpm-ant-tiny", "lora(rank=8)"), "Did you mean: r?"),
    (("plan", "cpm-ant-tiny", "lora@atn.q"), "Did you mean: attn.q"),
    (("plan", "cpm-ant-tiny", "lora@attn"), "lora cannot go at"),
    (("show", "cpm-ant-tiny", "prefix(n=0)"), "must be at least 1"),
    (("positions", "/no/such/folder"), "unknown model"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, says):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err


def test_bad_folder_and_bad_class(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = run(capsys, "positions", tmp_path)
    assert code == 2 and "notes.txt" in err and "config.json" in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 99, "hidden_size": 32,
                                                      "num_hidden_layers": 1, "num_attention_heads": 4,
                                                      "intermediate_size": 64}))
    code, _, err = run(capsys, "positions", tmp_path, "--model-class", "BertForSequenceClasification")
    assert code == 2 and "Did you mean: BertForSequenceClassification" in err


def test_console_script_and_python_m():
    """The installed `deltakit` script and `python -m deltakit` run the same main: help on each
    command, and an error as one line without a traceback."""
    script = Path(sys.executable).parent / "deltakit"      # what pip install puts beside python
    proc = subprocess.run([str(script) if script.exists() else sys.executable, *([] if script.exists() else
                           ["-m", "deltakit"]), "plan", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: deltakit plan" in proc.stdout and "cpm-ant-10b" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "deltakit", "plan", "cpm-ant-tiny", "lora@nowhere"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: pattern 'nowhere' matches no position") and proc.stderr.count("\n") == 1
