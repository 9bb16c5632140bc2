"""What a sweep leaves behind: a table per fraction, the best config per fraction, AP against every parameter.

Everything is read back from the Tune experiment folder (``ray.tune.ExperimentAnalysis``) and the trials'
``trial.json`` / ``finetune.yaml``, so the same files come out of a finished, an interrupted or a resumed
sweep. Files, in ``EXPERIMENT/results/``:

- ``fraction_<pct>pct.md`` / ``.csv``: one row per trial (status, best metric and its epoch, epochs run,
  every sampled parameter, the pre-training cache key, the best checkpoint, the error of a failed trial);
- ``best_<pct>pct.yaml``: the best trial's resolved fine-tuning config, usable by ``sp-ray finetune``,
  with the command and its best checkpoint in a comment; ``best.json`` sums them up;
- ``ap_vs_params.png``: best metric against the fraction and every sampled parameter.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sp_ray.data.split import fraction_tag
from sp_ray.tune.space import FRACTION, Param
from sp_ray.tune.trial import read_trial_record

DONE, STOPPED, ERROR, UNFINISHED = "done", "stopped", "error", "unfinished"
_ERROR_LINE = re.compile(r"^\s*([\w.]*(Error|Exception|Failure)\w*): (.+)$")


@dataclass
class TrialRecord:
    """One trial of a sweep as the tables show it."""

    trial_id: str
    fraction: float
    status: str  # done | stopped (early, by ASHA) | error | unfinished (interrupted or never started)
    params: dict[str, Any]  # Param.column -> value, for the sampled parameters
    best: float | None  # best value of the metric over the reported epochs
    best_epoch: int | None
    epochs_run: int
    checkpoint: str | None  # the checkpoint reported with the best epoch
    error: str  # the last exception line of a failed trial
    pretrain: str  # the pre-training cache key, "+" when this trial found it cached; "" without pre-training
    config: str | None  # the trial's finetune.yaml
    init: str | None  # the pre-trained checkpoint it started from


def collect_trials(experiment_dir: str | Path, params: list[Param], metric: str) -> list[TrialRecord]:
    """Read every trial of a Tune experiment folder.

    Args:
        experiment_dir: STORAGE/NAME of the sweep.
        params: the sweep's parameters; the sampled ones become the ``params`` of each record.
        metric: the reported key to rank epochs by (maximised).

    Returns:
        The records in Tune's trial order.
    """
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    experiment_dir = Path(experiment_dir)
    analysis = ExperimentAnalysis(str(experiment_dir))
    frames = analysis.trial_dataframes
    records = []
    for trial in analysis.trials:
        info = read_trial_record(experiment_dir / trial.trial_id)
        frame = frames.get(trial.trial_id)
        best = best_epoch = checkpoint = None
        epochs_run = 0
        if frame is not None and metric in frame.columns and frame[metric].notna().any():
            row = frame.loc[frame[metric].idxmax()]
            best, best_epoch = float(row[metric]), int(row["epoch"])
            checkpoint = row.get("checkpoint_path") if isinstance(row.get("checkpoint_path"), str) else None
            epochs_run = int(frame["epoch"].max())
        if trial.status == Trial.ERROR:
            status = ERROR
        elif trial.status == Trial.TERMINATED:
            status = DONE if epochs_run >= info.get("epochs", math.inf) else STOPPED
        else:
            status = UNFINISHED
        error = trial.get_error() if status == ERROR else None
        pretrain = info.get("pretrain", {})
        records.append(TrialRecord(
            trial_id=trial.trial_id,
            fraction=float(trial.config[FRACTION]),
            status=status,
            params={p.column: trial.config[p.stage][p.path] for p in params if p.kind is not None},
            best=best,
            best_epoch=best_epoch,
            epochs_run=epochs_run,
            checkpoint=checkpoint,
            error=error_summary(str(error)) if error else "",
            pretrain=pretrain.get("key", "") + ("+" if pretrain.get("cached") else ""),
            config=info.get("finetune_config"),
            init=info.get("init"),
        ))
    return records


def error_summary(trace: str) -> str:
    """The innermost ``SomeError: message`` line of a traceback text (its last line if there is none)."""
    lines = [line for line in trace.splitlines() if line.strip()]
    matches = [m for m in map(_ERROR_LINE.match, lines) if m]
    if not matches:
        return lines[-1].strip() if lines else ""
    name, _, message = matches[-1].groups()
    return f"{name.rsplit('.', 1)[-1]}: {message.strip()}"


def write_results(
    records: list[TrialRecord], out_dir: str | Path, *, params: list[Param], metric: str, sweep_name: str
) -> dict[str, Path]:
    """Write the tables, the best configs, best.json and the plot (see the module docstring).

    Returns:
        Name -> path of every file written (``table_<pct>``, ``csv_<pct>``, ``best_<pct>``, ``best``, ``plot``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    columns = [p.column for p in params if p.kind is not None]
    best_summary = {}
    for fraction in sorted({r.fraction for r in records}):
        tag = fraction_tag(fraction)
        rows = sorted((r for r in records if r.fraction == fraction),
                      key=lambda r: (r.best is None, -(r.best or 0.0), r.trial_id))
        files[f"table_{tag}"] = out / f"fraction_{tag}pct.md"
        files[f"table_{tag}"].write_text(markdown_table(rows, columns, metric, title=f"{sweep_name}: {tag}% labels"))
        files[f"csv_{tag}"] = out / f"fraction_{tag}pct.csv"
        _write_csv(files[f"csv_{tag}"], rows, columns, metric)
        winner = next((r for r in rows if r.best is not None and r.status in (DONE, STOPPED) and r.config), None)
        if winner is not None:
            files[f"best_{tag}"] = out / f"best_{tag}pct.yaml"
            _write_best_config(files[f"best_{tag}"], winner, metric, sweep_name)
            best_summary[tag] = {"fraction": fraction, "trial_id": winner.trial_id, metric: winner.best,
                                 "epoch": winner.best_epoch, "config": str(files[f"best_{tag}"]),
                                 "checkpoint": winner.checkpoint, "init": winner.init, "params": winner.params}
    files["best"] = out / "best.json"
    files["best"].write_text(json.dumps(best_summary, indent=2, default=str) + "\n")
    files["plot"] = out / "ap_vs_params.png"
    plot_metric_vs_params(records, [p for p in params if p.kind is not None], metric, files["plot"])
    return files


def markdown_table(records: list[TrialRecord], columns: list[str], metric: str, *, title: str) -> str:
    """A markdown table of the records (one row each), under a ``### title`` heading."""
    header = ["trial", "status", metric, "epoch", "epochs", *columns, "pretrain", "checkpoint", "error"]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        cells = [r.trial_id, r.status, _number(r.best, ".2f"), _number(r.best_epoch, "d"), str(r.epochs_run),
                 *(_value(r.params.get(c)) for c in columns), r.pretrain, r.checkpoint or "", r.error]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, records: list[TrialRecord], columns: list[str], metric: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "fraction", "status", metric, "epoch", "epochs", *columns, "pretrain",
                         "checkpoint", "config", "init", "error"])
        for r in records:
            writer.writerow([r.trial_id, r.fraction, r.status, "" if r.best is None else r.best,
                             "" if r.best_epoch is None else r.best_epoch, r.epochs_run,
                             *(r.params.get(c, "") for c in columns), r.pretrain, r.checkpoint or "",
                             r.config or "", r.init or "", r.error])


def _write_best_config(path: Path, record: TrialRecord, metric: str, sweep_name: str) -> None:
    init = f" --init {record.init}" if record.init else ""
    header = [
        f"# Best trial of sweep {sweep_name} on {fraction_tag(record.fraction)}% labels: {record.trial_id}, "
        f"val {metric} {record.best:.2f} at epoch {record.best_epoch}.",
        f"# Best checkpoint: {record.checkpoint}",
        f"# Run it again: sp-ray finetune --config {path}{init}",
    ]
    path.write_text("\n".join(header) + "\n" + Path(record.config).read_text())


def plot_metric_vs_params(records: list[TrialRecord], params: list[Param], metric: str, path: Path) -> None:
    """One panel per parameter (the fraction first): each trial's best metric, coloured by fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in records if r.best is not None]
    panels = [(FRACTION, None), *((p.column, p) for p in params)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    fractions = sorted({r.fraction for r in scored})
    colours = {f: plt.get_cmap("viridis")(i / max(1, len(fractions) - 1)) for i, f in enumerate(fractions)}
    for ax, (column, param) in zip(axes[0], panels, strict=True):
        values = [r.fraction if param is None else r.params[column] for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = values
            if param is None or param.log_scale:
                ax.set_xscale("log")
            if param is None:
                ax.set_xticks(fractions, [f"{fraction_tag(f)}%" for f in fractions])
                ax.minorticks_off()
        else:
            labels = sorted({str(v) for v in values})
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels)
        for fraction in fractions:
            picked = [(x, r.best) for x, r in zip(xs, scored, strict=True) if r.fraction == fraction]
            ax.scatter([x for x, _ in picked], [y for _, y in picked], color=colours[fraction],
                       label=f"{fraction_tag(fraction)}%")
        ax.set_xlabel(column)
        ax.set_ylabel(f"best val {metric}")
        ax.grid(alpha=0.3)
    if fractions:
        axes[0][0].legend(title="labels", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _number(value: float | int | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".4g")
    return "" if value is None else str(value)
