"""fastlora compare's table, plot and argument checks (the full comparison is a documented
command, not a CI test: CI trains each method a few steps in test_peft_methods.py)."""
import pytest

from fastlora.train.compare import CompareConfig, format_table, plot


def _rows():
    base = dict(lr=1e-3, accuracy_before=0.0, accuracy_after=0.9, retention=0.95, eval_loss=0.3, train_seconds=100.0,
                train_cpu_seconds=150.0, peak_rss_mb=900.0, total=134_515_008, notes=[])
    return [
        {**base, "method": "lora", "method_used": "lora", "trainable": 4_884_480, "trainable_percent": 3.6},
        {**base, "method": "bitfit", "method_used": "ln", "trainable": 17_856, "trainable_percent": 0.013},
        {"method": "prefix", "method_used": "prefix", "error": "RuntimeError: boom"},
    ]


def test_table_says_what_ran_and_what_failed(tmp_path):
    text = format_table(_rows())
    assert "| lora | 4,884,480 | 3.600 | 900 | 100 (150) | 0.001 | 0.0% → 90.0% | 95.0% | 0.300 |" in text
    assert "| bitfit → ln |" in text  # BitFit on a model without biases ran LN tuning: said so
    assert "| prefix | failed: RuntimeError: boom |" in text
    png = plot(_rows(), tmp_path / "compare.png")
    assert png.stat().st_size > 10_000


def test_config_checks():
    assert list(CompareConfig(methods="lora, ia3").methods) == ["lora", "ia3"]
    with pytest.raises(ValueError, match="is not one of"):
        CompareConfig(methods="lora,houlsby")
    with pytest.raises(ValueError, match="set per method"):
        CompareConfig(sft_options={"peft": "ia3"})
