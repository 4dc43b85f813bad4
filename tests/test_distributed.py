"""Several processes on one CPU machine (gloo on 127.0.0.1): training and evaluation give what one
process gives. Real processes: ``torchrun`` (what ``accelerate launch --multi_gpu`` runs) for the
CLI, ``torch.multiprocessing`` for the evaluation function. Each test stays well under 30 s."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.conftest import TINY_GPT2, for_model, make_sentences, tiny_overrides
from textvae.cli import main as cli
from textvae.config import load_config, save_config
from textvae.data import TextDataset, build_tokenizer
from textvae.metrics import evaluate
from textvae.models import MODELS
from textvae.rundir import RunDirError
from textvae.train import train

SRC = str(Path(__file__).resolve().parents[1] / "src")
# float32 sums over a batch split in two and DDP's gradient all-reduce round differently from one
# process; after a few Adam steps the losses agree to this (nats per sentence)
LOSS_TOL = 1e-4


def launch(*argv: str, n: int = 2, cwd: Path | None = None) -> None:
    """``torchrun --nproc_per_node n -m textvae.cli argv`` on a free port of 127.0.0.1."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={n}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "textvae.cli",
        *argv,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preset(overrides: list[str], path: Path) -> str:
    """The config of ``overrides`` as a YAML preset for ``textvae train``."""
    save_config(load_config(None, overrides), path)
    return str(path)


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_two_processes_train_as_one_with_the_same_global_batch(tiny_corpus, tmp_path):
    # a model without sampling and without dropout: the only difference left is the sharding
    # (with z ~ q(z|x) or dropout each process draws its own noise, as a GPU cluster does)
    # one epoch of 203 sentences in global batches of 16: twelve split 8 + 8 and a short one of
    # 11 split 6 + 5, whose two shares DDP must weigh 6/11 and 5/11, not 1/2 each
    (tiny_corpus / "train203.txt").write_text("\n".join(make_sentences(203, seed=4)) + "\n")
    overrides = tiny_overrides(
        tiny_corpus,
        **{
            "model.name": "lstm_lm",
            "model.dec_dropout_in": 0,
            "model.dec_dropout_out": 0,
            "data.train_path": tiny_corpus / "train203.txt",
            "train.max_epochs": 1,
            "train.log_every": 1,
            "train.num_samples": 0,
        },
    )
    train(load_config(None, overrides), tmp_path / "one")
    # no --run-dir: every process must agree on the first one's time-stamped folder
    launch("train", preset(overrides, tmp_path / "tiny.yaml"), cwd=tmp_path)
    (run,) = (tmp_path / "runs").iterdir()
    run.rename(tmp_path / "two")
    one, two = records(tmp_path / "one", "train"), records(tmp_path / "two", "train")
    assert [r["step"] for r in two] == list(range(1, 14))
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=LOSS_TOL)
        assert b["rec"] == pytest.approx(a["rec"], abs=LOSS_TOL)
    # the old per-process batch (each process 16 sentences, every other batch) fails this:
    # its second step already sees other sentences; unweighted shares fail it after the short one
    (va,), (vb,) = records(tmp_path / "one", "valid"), records(tmp_path / "two", "valid")
    assert vb["elbo"] == pytest.approx(va["elbo"], abs=LOSS_TOL)
    # the main process alone writes the run folder
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )


def test_two_process_run_resumed_ends_where_the_uninterrupted_run_ends(tiny_corpus, tmp_path):
    # a VAE with dropout: every process's RNG state must come back for the runs to agree
    common = tiny_overrides(
        tiny_corpus, **{"train.eval_every": 4, "train.log_every": 2, "train.num_samples": 0}
    )
    yaml = preset(common, tmp_path / "tiny.yaml")
    launch("train", "--run-dir", str(tmp_path / "full"), yaml, "train.max_steps=8")
    launch("train", "--run-dir", str(tmp_path / "cut"), yaml, "train.max_steps=4")
    ckpt = tmp_path / "cut" / "checkpoints" / "last"
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    launch("train", "--resume", "--run-dir", str(tmp_path / "cut"), "train.max_steps=8")
    full = load_file(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors")
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)
    assert records(tmp_path / "cut", "valid")[-1]["elbo"] == pytest.approx(
        records(tmp_path / "full", "valid")[-1]["elbo"], abs=1e-6
    )
    # one process cannot continue the RNG streams of two
    config = load_config(None, [*common, "train.max_steps=12"])
    with pytest.raises(RunDirError, match="written by 2 process"):
        train(config, tmp_path / "cut", resume=True, overrides=["train.max_steps=12"])


# --- sharded evaluation ------------------------------------------------------------------------

EVAL_MODELS = {  # every way evaluate() collects a batch: Gaussian, flow, layer-wise, no latent
    "gaussian": ["model.name=lstm_vae"],
    "flow": [
        "model.name=lstm_vae",
        "model.posterior_flow=iaf",
        "model.posterior_flow_steps=2",
        "model.flow_hidden=8",
    ],
    "layerwise": ["model.name=della", *TINY_GPT2],
    "lm": ["model.name=lstm_lm"],
}


def _tiny(name: str):
    tokenizer = build_tokenizer(make_sentences(200))
    cfg = load_config(
        None,
        for_model(
            EVAL_MODELS[name][0].split("=")[1],
            ["model.embed_dim=16", "model.hidden_dim=16", "model.latent_dim=4"],
        )
        + EVAL_MODELS[name],
    )
    torch.manual_seed(0)
    model = MODELS[cfg.model.name](cfg.model, tokenizer).eval()
    return model, TextDataset(make_sentences(37, seed=3), tokenizer)


def _evaluate_all(num_processes: int = 1, process_index: int = 0) -> dict:
    # 37 sentences in batches of 8: 5 batches, so the two processes score 3 and 2
    return {
        name: evaluate(
            *_tiny(name),
            iw_samples=12,
            batch_size=8,
            chunk_tokens=200,
            seed=3,
            num_processes=num_processes,
            process_index=process_index,
        )
        for name in EVAL_MODELS
    }


def _sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    from accelerate import PartialState

    state = PartialState(cpu=True)
    result = _evaluate_all(state.num_processes, state.process_index)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def assert_same_evaluation(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    """Every field equal, floats (and lists of floats) to 1e-6 absolute or relative: the
    processes may run another thread count than the single process (accelerate sets 2 where
    OMP_NUM_THREADS is unset), which sums in another order, and one float32 ulp of a sentence's
    25-nat NLL is 1.9e-6 (seen on a 2-core AVX2 machine); a sharding error (a sentence scored
    twice, or in another's place) moves values by whole nats."""
    assert set(a) == set(b)
    for key in a:
        if key in skip:
            continue
        x, y = a[key], b[key]
        if isinstance(x, float) or (isinstance(x, list) and x and isinstance(x[0], float)):
            assert y == pytest.approx(x, abs=1e-6, rel=1e-6), key
        else:
            assert y == x, key


def test_sharded_evaluation_equals_one_process(tmp_path):
    single = _evaluate_all()
    mp.spawn(_sharded_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):  # every process gets the whole result
        sharded = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in EVAL_MODELS:
            assert_same_evaluation(json.loads(json.dumps(single[name])), sharded[name])
    with pytest.raises(ValueError, match="torch.distributed"):  # no silent partial result
        evaluate(*_tiny("lm"), num_processes=2, process_index=1)


def test_nll_per_sentence_is_in_dataset_order():
    # the exact NLL of a language model: sentence i scored alone gives entry i of the list,
    # although the batches are sorted by length
    model, dataset = _tiny("lm")
    values = evaluate(model, dataset, batch_size=8)["nll_per_sentence"]
    assert values != sorted(values, key=lambda v: v)  # not in length order here
    for i in (0, 1, 2, len(dataset) - 1):
        alone = TextDataset([dataset.texts[i]], dataset.tokenizer)
        assert evaluate(model, alone)["nll"] == pytest.approx(values[i], abs=1e-4)


def test_cli_evaluate_on_two_processes_writes_the_one_process_json(tiny_config, tmp_path):
    run = train(tiny_config(**{"train.max_steps": 4, "train.num_samples": 0}), tmp_path / "run")
    args = ["evaluate", str(run), "--iw-samples", "8", "--batch-size", "8"]
    assert cli([*args, "--output", str(tmp_path / "one.json")]) == 0
    launch(*args, "--output", str(tmp_path / "two.json"))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert_same_evaluation(one, two, skip=("seconds",))
