"""Schemes compared alike: the same seeds, schedule and evaluation for every run, each trained in
its own ``tools/train_net.py`` process; curves, final values, intervals over seeds and paired
differences (``tools/compare_schemes.py`` is the command line; docs/compare_schemes.md).

:func:`plan_runs` lays out a sweep (schemes x values of one config key x seeds), :func:`run_sweep`
trains what is missing (reusing finished runs, resuming interrupted ones, counting diverged ones),
:func:`collect` reads the metrics, :func:`interval_table` gives means with 95% intervals and the
paired differences to a baseline, :func:`plot_sweep` / :func:`plot_mean_curves` /
:func:`plot_curves` draw them.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from norm_det.config import CONFIGS_DIR, load_config
from norm_det.evaluation.statistics import interval, paired_difference
from norm_det.schemes import get_scheme

# The runs train through the checkout's tools/train_net.py, one process each.
TRAIN_NET = Path(__file__).resolve().parents[2] / "tools" / "train_net.py"
QUICK_DIR = CONFIGS_DIR / "quick"
# Headline metrics, by their name after the dataset prefix, in the order they are plotted.
HEADLINE_METRICS = ("bbox/AP", "segm/AP", "sem_seg/mIoU")
METRIC_TITLES = {
    "bbox/AP": "box AP",
    "segm/AP": "mask AP",
    "sem_seg/mIoU": "mIoU",
    "total_loss": "total loss",
}


def scheme_slug(scheme: str) -> str:
    """The file-name form of a scheme's canonical name: ``"GN+WS"`` -> ``"gn_ws"``."""
    return re.sub(r"[^a-z0-9]+", "_", get_scheme(scheme).name.lower()).strip("_")


def quick_config_for(scheme: str, arch: str = "mask_rcnn", quick_dir: Path = QUICK_DIR) -> Path:
    """``configs/quick/<arch>_<scheme>.yaml``.

    Raises:
        ValueError: there is no quick config of ``arch`` for this scheme (the message lists
            the schemes that have one).
    """
    path = quick_dir / f"{arch}_{scheme_slug(scheme)}.yaml"
    if not path.is_file():
        have = sorted(p.stem[len(arch) + 1 :] for p in quick_dir.glob(f"{arch}_*.yaml"))
        raise ValueError(
            f"--schemes: no quick config for {scheme!r} and --arch {arch!r} ({path} does not "
            f"exist); quick {arch} configs exist for: {', '.join(have) or 'none'}"
        )
    return path


def run_label(config_path: Path) -> str:
    """A run's name in the plot and table: the backbone's scheme, else the config's stem."""
    cfg = load_config(config_path)
    for key in ("RESNETS", "VGG"):
        node = cfg.MODEL.get(key)
        uses_backbone = (key == "VGG") == (cfg.MODEL.META_ARCHITECTURE == "SSD")
        if node is not None and uses_backbone and node.NORM:
            return get_scheme(node.NORM).name
    return config_path.stem


def schedule_overrides(
    config_path: Path, iters: int | None, eval_period: int, seed: int, log_period: int
) -> list[str]:
    """``KEY VALUE`` pairs giving a run the common schedule.

    With ``iters``, ``SOLVER.MAX_ITER`` becomes ``iters`` and ``SOLVER.STEPS`` and
    ``SOLVER.WARMUP_ITERS`` scale by ``iters / MAX_ITER`` of the config, so a shortened run keeps
    the schedule's shape. Checkpoints are written only at the end.
    """
    cfg = load_config(config_path)
    opts = ["SEED", str(seed), "TEST.EVAL_PERIOD", str(eval_period), "LOG_PERIOD", str(log_period)]
    max_iter = cfg.SOLVER.MAX_ITER
    if iters is not None:
        if iters < 1:
            raise ValueError(f"--iters must be >= 1; got {iters}")
        factor = iters / max_iter
        steps = tuple(max(1, round(s * factor)) for s in cfg.SOLVER.STEPS)
        warmup = round(cfg.SOLVER.WARMUP_ITERS * factor)
        opts += ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", repr(steps)]
        opts += ["SOLVER.WARMUP_ITERS", str(warmup)]
        max_iter = iters
    opts += ["SOLVER.CHECKPOINT_PERIOD", str(max_iter)]
    return opts


def train(
    config_path: Path,
    output_dir: Path,
    opts: Sequence[str],
    extra_args: Sequence[str] = (),
    threads: int | None = None,
) -> float:
    """Train one config in a ``tools/train_net.py`` process; returns its wall time (s).

    The process's output (progress bar, log) goes to ``output_dir/stdout.txt`` (appended to when
    the run resumes). ``threads`` sets ``OMP_NUM_THREADS`` of the process (several at once).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(TRAIN_NET),
        "--config-file",
        str(config_path),
        *extra_args,
        *opts,
        "OUTPUT_DIR",
        str(output_dir),
    ]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    mode = "a" if extra_args else "w"
    with open(output_dir / "stdout.txt", mode) as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(
            f"training {config_path} failed (exit code {result.returncode}); "
            f"see {output_dir / 'stdout.txt'}"
        )
    return time.perf_counter() - start


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in file order.

    Raises:
        FileNotFoundError: no such file (the run has not been trained, or wrote elsewhere).
        ValueError: a line is not a JSON object with an ``"iteration"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path}: train the run first (without --no-train)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
        if not isinstance(record, dict) or "iteration" not in record:
            raise ValueError(f"{path}, line {number}: expected an object with an 'iteration'")
        records.append(record)
    return records


def metric_name(key: str) -> str:
    """``"synthetic_coco_val/bbox/AP"`` -> ``"bbox/AP"`` (the last two parts of a key)."""
    return "/".join(key.split("/")[-2:])


def curves(records: Sequence[Mapping]) -> dict[str, list[tuple[int, float]]]:
    """``{"total_loss": [(iteration, value), ...], "bbox/AP": [...], ...}`` of one run.

    Only finite values are kept; of several datasets with the same metric, the first one is used.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    chosen: dict[str, str] = {}
    for record in records:
        iteration = int(record["iteration"])
        for key, value in record.items():
            if value is None or key == "iteration":
                continue
            name = "total_loss" if key == "total_loss" else metric_name(key)
            if name not in ("total_loss", *HEADLINE_METRICS):
                continue
            if chosen.setdefault(name, key) != key or not math.isfinite(value):
                continue
            series.setdefault(name, []).append((iteration, float(value)))
    return series


def training_seconds(records: Sequence[Mapping]) -> float | None:
    """Seconds spent in training steps: each line's mean step ``time`` times the iterations it
    covers (evaluations and start-up excluded)."""
    total, previous, seen = 0.0, 0, False
    for record in records:
        if record.get("time") is None:
            continue
        iteration = int(record["iteration"])
        total += float(record["time"]) * (iteration - previous)
        previous, seen = iteration, True
    return total if seen else None


def summarize(label: str, records: Sequence[Mapping], wall_time: float | None = None) -> dict:
    """The table row of one run: final loss and metrics, best metrics, step times.

    ``wall_time`` (seconds, the whole process with evaluations) is kept when known.
    """
    series = curves(records)
    times = [float(r["time"]) for r in records if r.get("time") is not None]
    row: dict = {
        "run": label,
        "iterations": max((int(r["iteration"]) for r in records), default=0),
        "final_loss": series["total_loss"][-1][1] if "total_loss" in series else None,
        "s_per_iter": statistics.median(times) if times else None,
        "train_time_s": training_seconds(records),
        "wall_time_s": wall_time,
    }
    for name in HEADLINE_METRICS:
        if name in series:
            row[f"final {name}"] = series[name][-1][1]
            row[f"best {name}"] = max(v for _, v in series[name])
    return row


def _cell(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Mapping]) -> str:
    """A markdown table of :func:`summarize` rows; metric columns only where a run has them."""
    metrics = [m for m in HEADLINE_METRICS if any(f"final {m}" in row for row in rows)]
    header = ["run", "iterations", "final loss"]
    for name in metrics:
        header += [f"final {METRIC_TITLES[name]}", f"best {METRIC_TITLES[name]}"]
    header += ["s / iter", "training min"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [str(row["run"]), str(row["iterations"]), _cell(row["final_loss"], 3)]
        for name in metrics:
            cells += [_cell(row.get(f"final {name}"), 1), _cell(row.get(f"best {name}"), 1)]
        train = row["train_time_s"]
        cells += [_cell(row["s_per_iter"], 2), _cell(None if train is None else train / 60, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(
    runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike, title: str = ""
) -> list[str]:
    """Draw every run's total loss and headline metrics into one PNG; returns the panels.

    Args:
        runs: label -> the run's metrics records.
        path: the PNG to write (its folder is created).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    all_series = {label: curves(records) for label, records in runs.items()}
    panels = ["total_loss"] + [
        m for m in HEADLINE_METRICS if any(m in s for s in all_series.values())
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for label, series in all_series.items():
            points = series.get(panel)
            if not points:
                continue
            xs, ys = zip(*points)
            axis.plot(xs, ys, marker="o" if panel != "total_loss" else ".", ms=3, label=label)
        axis.set_title(METRIC_TITLES[panel])
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if panel == "total_loss":
            axis.set_yscale("log")
            axis.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axis.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0][0].legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, path)
    return panels


# ---------------------------------------------------------------------------------------------
# Several seeds and sweeps: every scheme on the same seeds, intervals, paired differences.


@dataclass(frozen=True)
class Run:
    """One training of a sweep: a config (its scheme ``label``), a seed and a swept value."""

    config: Path
    label: str
    seed: int
    value: str | None
    directory: Path

    def describe(self, key: str | None) -> str:
        swept = f" {key}={self.value}" if key else ""
        return f"{self.label} seed {self.seed}{swept}"


def seed_list(seeds: Sequence[int] | None, seed: int) -> list[int]:
    """``--seeds K`` -> seeds 1..K; ``--seeds 3 7 9`` -> those; none -> ``[--seed]``.

    Raises:
        ValueError: a count below 1, or a repeated seed.
    """
    if not seeds:
        return [seed]
    if len(seeds) == 1:
        if seeds[0] < 1:
            raise ValueError(f"--seeds: a count must be >= 1; got {seeds[0]}")
        return list(range(1, seeds[0] + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: seeds repeat in {list(seeds)}")
    return list(seeds)


def plan_runs(
    configs: Sequence[tuple[Path, str, str]],
    seeds: Sequence[int],
    output_dir: Path,
    sweep_key: str | None = None,
    sweep_values: Sequence[str] = (),
) -> list[Run]:
    """Every (config, swept value, seed), in ``OUTPUT/<folder>[/<KEY>=<value>]/seed_<s>``.

    Args:
        configs: ``(config file, scheme label, folder name)`` of each compared scheme.
    """
    values: Sequence[str | None] = list(sweep_values) if sweep_key else [None]
    runs = []
    for value in values:
        for config, label, folder in configs:
            for seed in seeds:
                directory = output_dir / folder
                if sweep_key:
                    directory = directory / f"{sweep_key}={value}"
                runs.append(Run(config, label, seed, value, directory / f"seed_{seed}"))
    return runs


# The sweep key of the batch a normalization sees, all else equal: every run keeps the config's
# SOLVER.IMS_PER_BATCH images per optimizer step, LR and schedule, and splits the step into
# IMS_PER_BATCH / value accumulated passes (SOLVER.ACCUMULATE_STEPS) of `value` images.
IMAGES_PER_PASS = "IMAGES_PER_PASS"


def accumulate_steps(config: Path, images_per_pass: str) -> int:
    """``SOLVER.ACCUMULATE_STEPS`` that gives passes of ``images_per_pass`` images.

    Raises:
        ValueError: the value is not a divisor of the config's ``SOLVER.IMS_PER_BATCH``.
    """
    batch = load_config(config).SOLVER.IMS_PER_BATCH
    try:
        images = int(images_per_pass)
    except ValueError:
        images = 0
    if images < 1 or batch % images:
        raise ValueError(
            f"--sweep {IMAGES_PER_PASS}: {images_per_pass!r} does not divide the "
            f"SOLVER.IMS_PER_BATCH = {batch} images of {config.name}"
        )
    return batch // images


DONE, FAILED = "done.json", "failed.json"
# What train_net prints when training stopped on NaN / inf: NonFiniteLossError,
# NonFiniteStateError, and a whitening layer's FloatingPointError on a non-finite input.
DIVERGED_MARKERS = (
    "non-finite loss at iteration",
    "tensors hold NaN or inf",
    "NaN or Inf reached this layer",
)


def run_overrides(
    run: Run,
    schedule: tuple[int | None, int, int],
    norm_keys: Sequence[str],
    sweep_key: str | None,
    opts: Sequence[str],
) -> list[str]:
    """The ``KEY VALUE`` overrides of one run: its schedule (``(iters, eval_period,
    log_period)``, see :func:`schedule_overrides`) and seed, its scheme in ``norm_keys`` (one
    base config for every scheme), its sweep value, then the user's ``opts``."""
    iters, eval_period, log_period = schedule
    overrides = schedule_overrides(run.config, iters, eval_period, run.seed, log_period)
    for key in norm_keys:
        overrides += [f"MODEL.{key}.NORM", run.label]
    if sweep_key == IMAGES_PER_PASS:
        overrides += ["SOLVER.ACCUMULATE_STEPS", str(accumulate_steps(run.config, run.value))]
    elif sweep_key:
        overrides += [sweep_key, str(run.value)]
    return [*overrides, *opts]


def run_state(run: Run) -> dict | None:
    """``done.json`` or ``failed.json`` of a finished run (``{"diverged": ...}``), else None."""
    for name in (DONE, FAILED):
        path = run.directory / name
        if path.is_file():
            state = json.loads(path.read_text())
            state["status"] = "done" if name == DONE else "failed"
            return state
    return None


def execute(run: Run, opts: Sequence[str], threads: int | None) -> dict:
    """Train ``run`` (resuming a run an interruption left half done); record how it ended.

    A run that stopped on a non-finite loss or state is *diverged*: a result, recorded and not
    retried. Any other failure is recorded in ``failed.json`` and retried by the next sweep.
    """
    resume = ["--resume"] if any(run.directory.glob("model_*.pth")) else []
    start = time.perf_counter()
    try:
        wall = train(run.config, run.directory, [*opts], extra_args=resume, threads=threads)
        state = {"status": "done", "diverged": False, "wall_time_s": wall}
    except RuntimeError as error:
        log = (run.directory / "stdout.txt").read_text(errors="replace")
        diverged = any(marker in log for marker in DIVERGED_MARKERS)
        state = {
            "status": "done" if diverged else "failed",
            "diverged": diverged,
            "wall_time_s": time.perf_counter() - start,
            "error": str(error),
        }
    name = DONE if state["status"] == "done" else FAILED
    (run.directory / FAILED).unlink(missing_ok=True)
    (run.directory / name).write_text(json.dumps(state) + "\n")
    return state


def run_sweep(
    runs: Sequence[Run],
    opts_of: Callable[[Run], list[str]],
    jobs: int = 1,
    sweep_key: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[Run, dict]:
    """Train the runs that are not finished, ``jobs`` at a time; returns every run's state.

    A progress line per run says which it is, of how many, and about how long the rest takes
    (the mean time of the runs trained so far).
    """
    states: dict[Run, dict] = {}
    todo = []
    for run in runs:
        state = run_state(run)
        if state is not None and state["status"] == "done":
            states[run] = state
        else:
            todo.append(run)
    if len(todo) < len(runs):
        log(f"{len(runs) - len(todo)} of {len(runs)} runs already finished: reused")
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    started = time.perf_counter()
    times: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(execute, run, opts_of(run), threads): run for run in todo}
        for count, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            run = futures[future]
            state = states[run] = future.result()
            times.append(state["wall_time_s"])
            left = (len(todo) - count) * (time.perf_counter() - started) / count
            outcome = (
                "diverged" if state["diverged"] else state["status"]
            ) + f" in {state['wall_time_s'] / 60:.1f} min"
            if state["status"] == "failed":
                outcome += f" ({state['error']})"
            log(
                f"[{len(runs) - len(todo) + count}/{len(runs)}] {run.describe(sweep_key)}: "
                f"{outcome}; about {left / 60:.0f} min left"
            )
    return states


def final_value(records: Sequence[Mapping], metric: str) -> float | None:
    """The last value of ``metric`` in a run's records.

    ``metric`` is a headline name (``bbox/AP``), ``total_loss``, or any key of the records,
    where ``KEY/*`` means the mean over the keys ``KEY/<layer>`` of the last record having them
    (the diagnostics: ``diag_filter_mean_shift/*``).
    """
    if metric.endswith("/*"):
        prefix = metric[:-1]
        for record in reversed(records):
            values = [float(v) for k, v in record.items() if k.startswith(prefix) and v is not None]
            if values:
                return statistics.fmean(values)
        return None
    series = curves(records).get(metric)
    if series:
        return series[-1][1]
    for record in reversed(records):
        if record.get(metric) is not None:
            return float(record[metric])
    return None


def collect(
    runs: Sequence[Run], states: Mapping[Run, dict], metrics: Sequence[str]
) -> dict[tuple[str | None, str], dict]:
    """``(swept value, label) -> {"seeds": {metric: {seed: value}}, "diverged": n, ...}``.

    A diverged run scores 0 in every headline metric (AP, mIoU): a diverged model has no
    detections worth counting, and leaving it out would flatter its scheme. Its loss and other
    metrics are left out. So does a finished run whose evaluation had no prediction at all (the
    evaluator writes its AP as null), counted in ``"empty"``. A run that failed otherwise, or
    was never trained, is counted apart.
    """
    groups: dict[tuple[str | None, str], dict] = {}
    for run in runs:
        group = groups.setdefault(
            (run.value, run.label),
            {
                "values": {m: {} for m in metrics},
                "diverged": 0,
                "failed": 0,
                "missing": 0,
                "empty": 0,
            },
        )
        state = states.get(run) or run_state(run)
        if state is None:
            group["missing"] += 1
            continue
        if state["status"] == "failed":
            group["failed"] += 1
            continue
        if state["diverged"]:
            group["diverged"] += 1
            for metric in metrics:
                if metric in HEADLINE_METRICS:
                    group["values"][metric][run.seed] = 0.0
            continue
        records = read_metrics(run.directory / "metrics.jsonl")
        empty = False
        for metric in metrics:
            value = final_value(records, metric)
            if value is not None and math.isfinite(value):
                group["values"][metric][run.seed] = value
            elif metric in HEADLINE_METRICS and _evaluated_empty(records, metric):
                # Evaluated, no prediction at all: the evaluator reports NaN; it scores 0.
                group["values"][metric][run.seed] = 0.0
                empty = True
        group["empty"] += empty
    return groups


def _evaluated_empty(records: Sequence[Mapping], metric: str) -> bool:
    """Whether the last evaluation wrote ``metric`` as null (no predictions to score)."""
    for record in reversed(records):
        keys = [k for k in record if k != "iteration" and metric_name(k) == metric]
        if keys:
            return all(record[k] is None for k in keys)
    return False


def interval_table(
    groups: Mapping[tuple[str | None, str], dict],
    metrics: Sequence[str],
    baseline: str | None,
    sweep_key: str | None,
) -> tuple[str, list[dict]]:
    """A markdown table: per group and metric, mean ± sd [95% CI]; against ``baseline`` (on the
    same swept value) the paired difference over seeds [95% CI] and whether it excludes 0."""
    header = ([sweep_key] if sweep_key else []) + ["scheme", "seeds", "diverged"]
    for metric in metrics:
        title = METRIC_TITLES.get(metric, metric)
        header.append(f"{title}: mean ± sd [95% CI]")
        if baseline:
            header.append(f"{title} − {baseline} (paired) [95% CI]")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for (value, label), group in groups.items():
        seeds = max((len(v) for v in group["values"].values()), default=0)
        row = {"value": value, "scheme": label, "seeds": seeds, "diverged": group["diverged"]}
        cells = ([str(value)] if sweep_key else []) + [label, str(seeds), str(group["diverged"])]
        if group["failed"] or group["missing"]:
            cells[-2] += f" (+{group['failed']} failed, {group['missing']} missing)"
        if group["empty"]:
            cells[-1] += f" (+{group['empty']} without predictions)"
            row["empty"] = group["empty"]
        for metric in metrics:
            values = group["values"][metric]
            digits = 3 if metric == "total_loss" else 1
            if values:
                summary = interval(list(values.values()))
                row[metric] = vars(summary)
                cells.append(summary.format(digits))
            else:
                cells.append("—")
            if baseline:
                reference = groups.get((value, baseline), {}).get("values", {}).get(metric, {})
                if label == baseline or not values or not reference:
                    cells.append("")
                    continue
                try:
                    difference = paired_difference(values, reference)
                except ValueError:
                    cells.append("no common seed")
                    continue
                row[f"{metric} - {baseline}"] = vars(difference)
                verdict = "excludes 0" if difference.excludes_zero else "includes 0"
                cells.append(f"{difference.format(digits)}, {verdict}")
        lines.append("| " + " | ".join(cells) + " |")
        rows.append(row)
    return "\n".join(lines), rows


def plot_sweep(
    groups: Mapping[tuple[str | None, str], dict],
    metric: str,
    sweep_key: str,
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """The metric against the swept value, one line per scheme with its 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.6, 4.0))
    labels = list(dict.fromkeys(label for _, label in groups))
    values = list(dict.fromkeys(value for value, _ in groups))
    numeric = all(_is_number(v) for v in values)
    xs_all = [float(v) if numeric else i for i, v in enumerate(values)]
    for label in labels:
        xs, means, lows, highs = [], [], [], []
        for x, value in zip(xs_all, values):
            found = groups.get((value, label), {}).get("values", {}).get(metric, {})
            if not found:
                continue
            summary = interval(list(found.values()))
            xs.append(x)
            means.append(summary.mean)
            lows.append(summary.low if summary.n > 1 else summary.mean)
            highs.append(summary.high if summary.n > 1 else summary.mean)
        if xs:
            (line,) = axis.plot(xs, means, marker="o", label=label)
            axis.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15)
    if numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
        axis.set_xscale("log", base=2)
    axis.set_xticks(xs_all, [str(v) for v in values])
    axis.set_xlabel(sweep_key)
    axis.set_ylabel(f"final {METRIC_TITLES.get(metric, metric)} (mean, 95% CI band)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title, fontsize=9)
    _save(figure, path)


def metric_series(records: Sequence[Mapping], metric: str) -> list[tuple[int, float]]:
    """``(iteration, value)`` of a metric over a run (``KEY/*``: the mean over its layers)."""
    if not metric.endswith("/*"):
        series = curves(records).get(metric)
        if series:
            return series
    points = []
    for record in records:
        if metric.endswith("/*"):
            found = [
                float(v)
                for k, v in record.items()
                if k.startswith(metric[:-1]) and v is not None and math.isfinite(v)
            ]
            value = statistics.fmean(found) if found else None
        else:
            value = record.get(metric)
        if value is not None and math.isfinite(value):
            points.append((int(record["iteration"]), float(value)))
    return points


def plot_mean_curves(
    runs: Sequence[Run],
    states: Mapping[Run, dict],
    path: str | os.PathLike,
    title: str = "",
    metrics: Sequence[str] = (),
) -> None:
    """Per scheme, the mean over seeds of each curve (loss, ``metrics``) with its 95% band; a
    metric measured once (at the end) is drawn as a point with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label: dict[str, list[dict[str, list[tuple[int, float]]]]] = {}
    for run in runs:
        state = states.get(run) or run_state(run)
        if state is None or state["status"] != "done" or state["diverged"]:
            continue
        records = read_metrics(run.directory / "metrics.jsonl")
        panels = ["total_loss", *[m for m in metrics if m != "total_loss"]]
        by_label.setdefault(run.label, []).append({m: metric_series(records, m) for m in panels})
    panels = ["total_loss", *[m for m in metrics if m != "total_loss"]]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for label, all_curves in by_label.items():
            points: dict[int, list[float]] = {}
            for series in all_curves:
                for iteration, value in series.get(panel, []):
                    points.setdefault(iteration, []).append(value)
            xs = sorted(points)
            if not xs:
                continue
            summaries = [interval(points[x]) for x in xs]
            means = [s.mean for s in summaries]
            name = f"{label} ({len(all_curves)} seeds)"
            if len(xs) == 1:
                spread = 0.0 if summaries[0].n < 2 else summaries[0].high - summaries[0].mean
                axis.errorbar(
                    [len(axis.lines) + len(axis.containers)], means, yerr=[spread],
                    fmt="o", capsize=4, label=name,
                )  # fmt: skip
                axis.set_xlabel("run (final value, 95% CI)")
                axis.set_xticks([])
                continue
            (line,) = axis.plot(xs, means, label=name)
            if all(s.n > 1 for s in summaries):
                axis.fill_between(
                    xs, [s.low for s in summaries], [s.high for s in summaries],
                    color=line.get_color(), alpha=0.15,
                )  # fmt: skip
        axis.set_title(METRIC_TITLES.get(panel, panel))
        if not axis.get_xlabel():
            axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if panel == "total_loss":
            axis.set_yscale("log")
        axis.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, path)


def _save(figure: Any, path: str | os.PathLike) -> None:
    """Write ``figure`` as a PNG at ``path`` (its folder created) and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _is_number(value: str | None) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def present_metrics(runs: Sequence[Run], states: Mapping[Run, dict]) -> list[str]:
    """The headline metrics some finished run has, else the total loss."""
    found: list[str] = []
    for run in runs:
        state = states.get(run)
        if state and state["status"] == "done" and not state["diverged"]:
            series = curves(read_metrics(run.directory / "metrics.jsonl"))
            found += [m for m in HEADLINE_METRICS if m in series and m not in found]
    return found or ["total_loss"]
