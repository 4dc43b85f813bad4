"""textvae: text variational autoencoders that keep their latent variables alive.

Shape legend used in every docstring:

    B batch (sentences), T tokens, V vocabulary, H hidden, D latent dimensions,
    L layers, S importance (or Monte Carlo) samples, N rows of a flattened (S * B) batch.

Units: log-likelihoods, KL terms, ELBO and NLL are in **nats per sentence** (summed over the
sentence's predicted tokens, EOS counted, padding never) unless a name says per token or per
word.

Entry points: :func:`load` a trained run (its folder: :mod:`textvae.rundir`);
``textvae.train.train``; ``textvae.metrics``
(``evaluate``, ``z_usage_gap``, ``generation_metrics``, ``probe_accuracy``);
``textvae.generate`` (``sample_prior``, ``reconstruct``, ``interpolate``); ``textvae.report``
(``write_report``, ``compare_runs``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from textvae import threads as _threads  # noqa: E402  (imports neither torch nor textvae)

# Before torch is imported (libgomp reads these once, when torch loads it): OpenMP threads that
# wait at a barrier spin only briefly and then sleep, so a core taken by another process slows
# this one down about in proportion instead of 3-50x (textvae/threads.py, bench/RESULTS.md).
_threads.WAIT_POLICY_APPLIED = _threads.bound_openmp_spinning(torch_loaded="torch" in sys.modules)

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("textvae")
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0.1.0"


def load(run_dir: str | Path, which: str = "best"):
    """Rebuild a trained model and its tokenizer from a run folder.

    Args:
        run_dir: a folder written by ``textvae train``.
        which: ``best`` (best validation ELBO) or ``last`` checkpoint.

    Returns:
        (model, tokenizer): the model in eval mode on CPU, with ``model.encode(texts)`` giving
        the posterior q(z|x) (``.mean``, ``.stddev``: (B, D)).

    Raises:
        FileNotFoundError: no ``config.yaml`` (not a run folder).
        textvae.rundir.RunDirError: no ``tokenizer/`` folder, no such checkpoint, or no weights
            in it (the missing path is named).
    """
    from safetensors.torch import load_file

    from textvae.data import load_tokenizer
    from textvae.models import MODELS
    from textvae.rundir import WEIGHTS, RunDirError, checkpoint_dir, read_config, tokenizer_dir

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    weights = checkpoint_dir(run_dir, which) / WEIGHTS
    if not weights.is_file():
        raise RunDirError(
            f"{run_dir}: no weights in the '{which}' checkpoint ({weights} not found)"
        )
    tokenizer = load_tokenizer(tokenizer_dir(run_dir))
    model = MODELS[config.model.name](config.model, tokenizer)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    model.config = config
    return model, tokenizer


def set_threads(threads: int | None = None) -> tuple[int, str]:
    """PyTorch's CPU thread count from the free cores (:func:`textvae.threads.set_threads`)."""
    return _threads.set_threads(threads)


__all__ = ["load", "set_threads", "__version__"]
