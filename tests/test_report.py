"""What people read: the position table, the summary and the tree."""
import io

import deltakit
from tiny_models import make


def test_positions_print_as_a_table():
    table = deltakit.positions(make("llama"))
    text = str(table)
    assert text.splitlines()[0].split()[:3] == ["name", "kind", "shape"]
    assert "layers.1.attn.q" in text and "model.layers.1.self_attn.q_proj" in text
    assert table.names()[0] == "layers.0.attn"


def test_summary_folds_layers_into_ranges():
    model = make("bert", num_hidden_layers=6)
    h = deltakit.attach(model, "lora(r=2)@layers.0-2.attn.q,layers.4-5.attn.q; bitfit@ln.ffn")
    text = h.summary()
    assert "layers.0-2,4-5.attn.q" in text and "layers.0-5.ln.ffn" in text
    assert f"{h.num_trainable:,} trainable" in text


def test_show_folds_identical_layers_and_marks_deltas():
    model = make("gpt2", n_layer=5)
    deltakit.attach(model, "lora@layers.0.attn.q")
    out = io.StringIO()
    deltakit.show(model, file=out)
    text = out.getvalue()
    assert "1-4 GPT2Block x4" in text            # layers 1..4 are alike; layer 0 carries a delta
    assert "default-lora-attn_q LoRA" in text and "deltas" in text
    assert text.count("GPT2Block") == 2
