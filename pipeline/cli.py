"""The ``clad`` command line: thin click wrappers over the stages.

Library code raises ``CladError`` for bad input; here it becomes one line on
stderr and exit code 2. Bugs keep their tracebacks.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import click

from core.errors import CladError
from core.settings import PROFILE_NAMES
from pipeline.config import (
    Config,
    DataConfig,
    FeatureConfig,
    TrainConfig,
    config_to_dict,
    load_config,
    save_config,
    with_profile,
)
from pipeline.locks import cache_read_lock, cache_rebuild_lock, extract_lock, run_lock
from pipeline.progress import say
from pipeline.workspace import Workspace
from stages.heads import head_class, head_names


class BadInput(click.ClickException):
    """A CladError on the command line: one line on stderr, exit code 2."""

    exit_code = 2


class CladGroup(click.Group):
    """Maps CladError to a clean one-line message and exit code 2."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except CladError as exc:
            raise BadInput(str(exc)) from None


@click.group(cls=CladGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """CLAD: multi-class anomaly detection on a resumable feature cache.

    Typical use: clad demo-data DATA; clad init WORK --data DATA;
    clad extract WORK; clad train WORK; clad evaluate WORK.
    """


@main.command("demo-data")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Random seed; same seed, same images.")
@click.option("--train", "n_train", default=20, show_default=True, help="Normal training images per class.")
@click.option("--test-good", default=8, show_default=True, help="Normal test images per class.")
@click.option("--test-defect", default=4, show_default=True, help="Test images per defect type.")
@click.option("--classes", default="", help="Comma-separated subset of classes (default: all 5).")
@click.option("--n-classes", default=0, show_default=True,
              help="Generate this many distinct classes (c000-stripes, c001-ring, ...) instead of the "
                   "built-in 5; 0 = the built-in classes.")
def demo_data(out: Path, seed: int, n_train: int, test_good: int, test_defect: int, classes: str,
              n_classes: int) -> None:
    """Write the built-in multi-class data set (MVTec layout) to OUT."""
    from pipeline.progress import progress
    from stages.extract.demo_data import class_specs, write_demo_dataset

    chosen = tuple(c for c in classes.split(",") if c) or None
    total = len(class_specs(out, chosen, n_classes, seed))  # bad arguments fail here, before the bar
    t0 = time.perf_counter()
    with progress(total, "demo-data", unit="classes") as bar:
        write_demo_dataset(out, seed, n_train, test_good, test_defect, chosen, n_classes,
                           on_class=lambda _name: bar.update(1))
    say(f"wrote {total} classes to {out} in {time.perf_counter() - t0:.1f} s")


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.option("--data", "data_root", required=True, type=click.Path(path_type=Path),
              help="Data set root (MVTec/VisA layout or a folder of class folders).")
@click.option("--textures", default="", help="Folder of texture images (DTD); default: built-in textures.")
@click.option("--backbone", default=FeatureConfig.backbone, show_default=True, help="timm model name.")
@click.option("--weights", default=FeatureConfig.weights, show_default=True,
              help="package | hub-cache | path to a state dict.")
@click.option("--labels", type=click.Choice(["classes", "pseudo"]), default="classes", show_default=True)
@click.option("--classes", default="", help="Comma-separated subset of classes.")
@click.option("--force", is_flag=True, help="Overwrite a different existing config.toml.")
def init(work: Path, data_root: Path, textures: str, backbone: str, weights: str, labels: str,
         classes: str, force: bool) -> None:
    """Write WORK/config.toml for a data set."""
    if not data_root.is_dir():
        raise CladError(f"--data {data_root}: folder does not exist")
    if textures and not Path(textures).is_dir():
        raise CladError(f"--textures {textures}: folder does not exist")
    data = DataConfig(root=str(data_root.resolve()), textures=str(Path(textures).resolve()) if textures else "",
                      labels=labels, classes=tuple(c for c in classes.split(",") if c))
    cfg = Config(data=data, features=replace(FeatureConfig(), backbone=backbone, weights=weights),
                 train=with_profile(TrainConfig(), "fast"))
    ws = Workspace(work)
    if ws.config_path.exists():
        old = load_config(ws.config_path)
        if config_to_dict(old) == config_to_dict(cfg):
            say(f"{ws.config_path} already holds this configuration")
            return
        if not force:
            raise CladError(f"{ws.config_path}: exists with a different configuration; "
                            "use --force to overwrite it (or another WORK folder)")
    save_config(cfg, ws.config_path, train_overrides_only=True)
    say(f"wrote {ws.config_path}")


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.option("--scheduler", default="", help="'local' for a Dask LocalCluster, or tcp://host:port; "
              "default: in this process.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--rebuild", is_flag=True, help="Discard a cache made with other settings and start over.")
def extract(work: Path, scheduler: str, device: str, rebuild: bool) -> None:
    """Stage 1: extract patch features of all images into WORK/cache (resumable)."""
    from pipeline.extract_run import extract_run

    with extract_lock(work, say), (cache_rebuild_lock(work, say) if rebuild else nullcontext()):
        extract_run(Workspace(work), scheduler, device, rebuild)


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.option("--run", "run_name", default="main", show_default=True, help="Run name (runs/NAME).")
@click.option("--profile", type=click.Choice(list(PROFILE_NAMES)), default=None,
              help="Training schedule (default: config.toml's train.profile).")
@click.option("--head", default=None, metavar="NAME",
              help="Head to train (default: config.toml's train.head). Registered: "
              + "; ".join(f"{n}: {head_class(n).summary}" for n in head_names()) + ".")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a setting, e.g. --set lr=1e-4 --set use_gas=false; 'clad settings HEAD' lists them.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--restart", is_flag=True, help="Discard this run's checkpoints and train anew.")
def train(work: Path, run_name: str, profile: str | None, head: str | None, sets: tuple[str, ...],
          device: str, restart: bool) -> None:
    """Stage 2: train a head on the cached features into runs/NAME (resumable),
    then calibrate its per-class verdict thresholds.

    On several processes or GPUs: torchrun --standalone --nproc_per_node=N -m pipeline.cli -- train WORK ...
    (the clad head; see the README)."""
    from core import distributed
    from pipeline.train_run import train_run

    if head:
        head_class(head)  # an unknown name is refused with the list
    # a distributed run: rank 0 holds the run's lock (it alone writes the run); every rank reads the cache
    lock = run_lock(work, run_name, "train", say) if distributed.is_main() else nullcontext()
    with lock, cache_read_lock(work, "train", say):
        train_run(Workspace(work), run_name, {"profile": profile, "head": head, "sets": list(sets)},
                  device, restart)


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.option("--run", "run_name", default="main", show_default=True, help="Run name (runs/NAME).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
def evaluate(work: Path, run_name: str, device: str) -> None:
    """Stage 3: metrics, report and pictures of a trained run (runs/NAME/eval)."""
    from pipeline.eval_run import evaluate_run_cli

    with run_lock(work, run_name, "evaluate", say), cache_read_lock(work, "evaluate", say):
        evaluate_run_cli(Workspace(work), run_name, device)


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.option("--run", "run_name", default="main", show_default=True, help="Run name (runs/NAME).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
def calibrate(work: Path, run_name: str, device: str) -> None:
    """Per-class verdict thresholds of a trained run, from training data only (no retraining)."""
    from pipeline.eval_run import calibrate_cli

    with run_lock(work, run_name, "calibrate", say), cache_read_lock(work, "calibrate", say):
        calibrate_cli(Workspace(work), run_name, device)


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.argument("paths", nargs=-1, required=True)
@click.option("--run", "run_name", default="main", show_default=True, help="Run name (runs/NAME).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: WORK/runs/NAME/scores).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--class", "class_name", default="", help="Class of every image (default: predicted by the run; "
              "a folder named like a trained class decides only when the prediction is unsure, and a "
              "confident prediction that disagrees with it is warned about and recorded).")
@click.option("--scheduler", default="", help="'local' for a Dask LocalCluster, or tcp://host:port (workers "
              "must see WORK and --out); default: in this process. Results are the same.")
def score(work: Path, paths: tuple[str, ...], run_name: str, out_dir: Path | None, device: str,
          class_name: str, scheduler: str) -> None:
    """Score new images (files or folders) with a trained run: class, score, verdict, heat map."""
    from pipeline.eval_run import score_cli

    # the cache is read too: a memory-bank run (knn, routed_knn) reads its bank rows from it
    with run_lock(work, run_name, "score", say), cache_read_lock(work, "score", say):
        score_cli(Workspace(work), run_name, list(paths), out_dir, device, class_name, scheduler)


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.option("--run", "run_name", default="main", show_default=True, help="Run name (runs/NAME).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Bundle folder to write (replaced whole if it holds an earlier bundle).")
def export(work: Path, run_name: str, out_dir: Path) -> None:
    """Write a self-contained deploy bundle of a trained run for clad-run: the feature extractor
    as ONNX, the head's part (ONNX graph or per-class arrays), a manifest with preprocessing,
    classes, thresholds, versions, a sha256 per file and the parity measured on golden images."""
    from pipeline.export_run import export_cli

    with run_lock(work, run_name, "export", say), cache_read_lock(work, "export", say):
        export_cli(Workspace(work), run_name, out_dir)


@main.command(name="settings")
@click.argument("tables", nargs=-1, metavar="[TABLE]...")
@click.option("--profile", type=click.Choice(list(PROFILE_NAMES)), default=None,
              help="Show the heads' settings under this schedule (default: each head's own defaults).")
def settings_cmd(tables: tuple[str, ...], profile: str | None) -> None:
    """List every setting with its default, allowed values and meaning, as config.toml and
    --set spell them. TABLE: a section (data, features, synthesis, train, calibrate,
    evaluate) or a head (clad, knn, ...); none: all of them."""
    from core.schema import setting_lines
    from core.settings import Config, head_table

    cfg = Config()
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    heads = head_table()
    unknown = [t for t in tables if t not in sections and t.removeprefix("train.") not in heads]
    if unknown:
        raise click.UsageError(f"unknown table {unknown[0]!r}: choose from {', '.join([*sections, *heads])}")
    for name in tables or [*sections, *heads]:
        if name in sections:
            click.echo(f"[{name}]")
            click.echo("\n".join(setting_lines(sections[name], name)))
        else:
            head = name.removeprefix("train.")
            click.echo(f"[train.{head}]  {head_class(head).summary}")
            click.echo("\n".join(setting_lines(heads[head].defaults(profile or "paper"), f"train.{head}")))


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(work: Path, as_json: bool) -> None:
    """Show each stage and run: done, partial, stale or missing."""
    from pipeline.status import workspace_status

    ws = Workspace(work)
    states = workspace_status(ws)
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in states], indent=2))
        return
    for s in states:
        prog = f" [{s.progress[0]}/{s.progress[1]}]" if s.progress else ""
        click.echo(f"{s.stage:<24} {s.state:<8}{prog} {s.detail}")


def run() -> None:  # pragma: no cover
    main(prog_name="clad")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
