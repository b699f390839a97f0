"""What a comparison trains: the configs of its schemes, the common schedule, and its runs
(schemes x values of one swept config key x seeds), each with the overrides it trains with.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from norm_det.config import CONFIGS_DIR, load_config
from norm_det.schemes import get_scheme

QUICK_DIR = CONFIGS_DIR / "quick"


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
