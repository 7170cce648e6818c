"""Memory footprint, error classes, loss plots, sweep objective (CPU, tiny Llama)."""
from __future__ import annotations

import json

import pytest

from tools.artifact import Stage
from tools.errors import UserError


def test_memory_footprint_is_consistent(tiny_llama):
    from recipes.memory import measure

    full = measure(tiny_llama, "full", batch=2, seq_len=32)
    lora = measure(tiny_llama, "lora", batch=2, seq_len=32)
    qlora = measure(tiny_llama, "qlora", batch=2, seq_len=32)
    # full fine-tuning trains everything
    assert full.frozen_mb == 0 and full.trainable_params == full.total_params
    # LoRA: trainable much smaller than full, frozen + trainable = total, same logical model
    assert lora.trainable_mb < full.trainable_mb / 20
    assert lora.frozen_mb + lora.trainable_mb == pytest.approx(lora.total_param_mb)
    assert lora.total_params == full.total_params + lora.trainable_params
    # r=8 on q_proj and v_proj of 2 layers: A (r x in) + B (out x r) per module
    import json as _j
    cfg = _j.loads((tiny_llama / "config.json").read_text())
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"])
    expected = cfg["num_hidden_layers"] * (8 * h + h * 8 + 8 * h + kv * 8)
    assert lora.trainable_params == expected
    # QLoRA stores the frozen linear weights in 4 bits: less frozen memory, same trainable
    assert qlora.frozen_mb < lora.frozen_mb
    assert qlora.trainable_params == lora.trainable_params
    # activations are measured and grow with the sequence
    assert full.activation_mb > 0
    longer = measure(tiny_llama, "lora", batch=2, seq_len=64)
    assert longer.activation_mb > 1.5 * lora.activation_mb


def _bench_artifact(tmp_path, rows):
    with Stage("bench.pubmedqa", tmp_path / "bench", {"n": len(rows)}) as st:
        st.path("items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        st.path("results.json").write_text(json.dumps({"task": "pubmedqa", "n": len(rows)}))
    return st.result.path


def test_error_classes_and_histogram(tmp_path, tools_cli):
    rows = [
        {"id": "1", "raw_output": "yes. It works.", "parsed": "yes", "gold": "yes", "correct": True},
        {"id": "2", "raw_output": "no, because the trial was small and underpowered", "parsed": "no", "gold": "yes",
         "correct": False},
        {"id": "3", "raw_output": "I cannot say", "parsed": None, "gold": "no", "correct": False},
        {"id": "4", "raw_output": "maybe", "parsed": "maybe", "gold": "no", "correct": False},
    ]
    bench = _bench_artifact(tmp_path, rows)
    p = tools_cli("analyze", "errors", bench, "--json", "--out", tmp_path / "err")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["results"]
    assert res["counts"] == {"correct": 1, "underspecified": 1, "incorrect": 2}
    full = json.loads((tmp_path / "err" / "errors.json").read_text())
    assert sorted(full["incorrect_lengths"]) == [1, 8]
    png = (tmp_path / "err" / "incorrect_lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "underspecified" in (tmp_path / "err" / "report.md").read_text()


def test_free_text_items_use_reference_similarity():
    from evals.analysis import classify
    assert classify({"output": "fever and a dry cough", "reference": "fever, dry cough"}) == "correct"
    assert classify({"output": "the weather is nice", "reference": "fever, dry cough"}) == "incorrect"


def test_plot_needs_logs(tmp_path, tools_cli):
    stage = tmp_path / "stage"
    (stage / "output").mkdir(parents=True)
    p = tools_cli("plot", stage)
    assert p.returncode == 2 and "no training logs" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    hist = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7}]
    (stage / "output" / "log_history.json").write_text(json.dumps(hist))
    p = tools_cli("plot", stage)
    assert p.returncode == 0, p.stderr
    assert (stage / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_objective_rejects_unknown_metrics():
    from evals.sweep import Objective, final_metrics
    with pytest.raises(UserError, match="unknown metric 'entailmnt'"):
        Objective("eval_loss - 0.25*entailmnt")
    with pytest.raises(UserError, match="may call only"):
        Objective("__import__('os').system('true')")
    o = Objective("eval_loss - 0.25*entailment")
    assert o({"eval_loss": 2.0, "entailment": 0.4}) == pytest.approx(1.9)
    m = final_metrics([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "eval_loss": 2.2}])
    assert m["loss"] == 2.0 and m["eval_loss"] == 2.2
    with pytest.raises(UserError, match="logged no 'entailment'"):
        o(m)
