"""Run reports and run comparison: is the latent alive, and what does it encode?

:func:`write_report` turns a run folder into ``RUN_DIR/report/`` (``report.md`` plus PNG plots
drawn with matplotlib); :func:`compare_runs` puts several runs' evaluation JSONs side by side
and overlays their training curves. Everything is read from the run folder (``config.yaml``,
``log.jsonl``, ``eval-*.json``, the best checkpoint); nothing in it is changed except the
``report/`` folder, which is rebuilt in a temporary folder and renamed into place.

One module per concern: :mod:`~textvae.report.plots` (the figures),
:mod:`~textvae.report.tables` (table cells, the evaluation table, the latent status),
:mod:`~textvae.report.paired` (paired per-sentence differences),
:mod:`~textvae.report.run_report` (``report.md``) and :mod:`~textvae.report.compare`
(``compare.md``). What the report says about a model comes from the model
(:meth:`textvae.models.TextVAE.describe`, ``latent_shape_of``): no module here names a model.

Units: nats per sentence (EOS counted) unless stated; BLEU 0-100; accuracies in percent.
"""

from textvae.report.compare import compare_runs, default_compare_dir
from textvae.report.paired import paired_differences, paired_nll
from textvae.report.plots import (
    CURVES,
    PER_DIMENSION_FLOORS,
    TRAIN_WINDOWS,
    plot_curves,
    plot_kl_per_dim,
    plot_projection,
    plot_rate_distortion,
)
from textvae.report.run_report import write_report
from textvae.report.tables import (
    au_dimensions,
    evaluation_table,
    exact_nll,
    format_value,
    latent_status,
)

__all__ = [
    "CURVES",
    "PER_DIMENSION_FLOORS",
    "TRAIN_WINDOWS",
    "au_dimensions",
    "compare_runs",
    "default_compare_dir",
    "evaluation_table",
    "exact_nll",
    "format_value",
    "latent_status",
    "paired_differences",
    "paired_nll",
    "plot_curves",
    "plot_kl_per_dim",
    "plot_projection",
    "plot_rate_distortion",
    "write_report",
]
