"""bf16 on a device without native bfloat16 runs fp32, and every record says what ran.

On an AVX2-only CPU PyTorch's bf16 autocast cannot run an ``nn.LSTM`` (a oneDNN error) and
emulates bf16 matmuls (a training step 12 times slower than fp32, bench/RESULTS.md); before textvae.precision every bf16 preset
(configs/ptb/lstm-vae-cpu.yaml and its flow siblings) crashed there at the first step. The
tests force "no native bf16" so that they fail on the old code on any machine.
"""

from __future__ import annotations

import json

import pytest
import torch

import textvae.precision
from tests.conftest import make_sentences
from textvae import cli
from textvae.data import TextDataset
from textvae.metrics import evaluate
from textvae.precision import lstm_forward, runnable_precision
from textvae.train import train


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(textvae.precision, "bf16_native", lambda kind: False)


def test_runnable_precision_falls_back_only_for_bf16_without_native_support(monkeypatch):
    monkeypatch.setattr(textvae.precision, "bf16_native", lambda kind: kind == "cuda")
    assert runnable_precision("bf16", "cpu") == "fp32"
    assert runnable_precision("bf16", torch.device("cuda")) == "bf16"
    assert runnable_precision("fp32", "cpu") == "fp32"


def test_an_lstm_under_bf16_autocast_runs_in_float32_without_native_bf16(no_native_bf16):
    lstm = torch.nn.LSTM(4, 3, batch_first=True)
    x = torch.randn(2, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = lstm_forward(lstm, x, (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)))
    assert out.dtype == h.dtype == torch.float32
    torch.testing.assert_close(out, lstm(x)[0])  # the fp32 computation, exactly


def test_bf16_evaluation_without_native_bf16_runs_and_records_fp32(
    no_native_bf16, tiny_model, tokenizer
):
    model = tiny_model()
    ds = TextDataset(make_sentences(8, seed=4), tokenizer)
    b = evaluate(model, ds, iw_samples=5, precision="bf16")
    a = evaluate(model, ds, iw_samples=5, precision="fp32")
    assert b["precision"] == "fp32" and b["nll"] == a["nll"]  # the same computation


def test_bf16_training_and_cli_evaluation_without_native_bf16(
    no_native_bf16, tiny_config, tmp_path
):
    run = train(tiny_config(**{"train.max_steps": 2, "train.precision": "bf16"}), tmp_path / "r")
    assert (run / "checkpoints" / "last" / "model.safetensors").is_file()
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"event": "precision", "requested": "bf16", "ran": "fp32"}.items() <= next(
        e for e in events if e.get("event") == "precision"
    ).items()
    from textvae.report import write_report

    write_report(run, split="valid", max_sentences=8)
    assert "precision bf16 requested, ran fp32" in (run / "report" / "report.md").read_text()
    args = ["evaluate", str(run), "--iw-samples", "3", "--precision", "bf16", "--split", "valid"]
    assert cli.main(args) == 0
    (out,) = run.glob("eval-valid-*.json")
    assert out.name.endswith("-fp32.json") and json.loads(out.read_text())["precision"] == "fp32"
