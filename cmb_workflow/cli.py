"""Command line: `cmb-workflow run IN OUT`, and the tools around it."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shlex
import sys

from . import __version__
from .configs import PRECISIONS


def _add_run_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="detect microbleeds in every SWI / T2*-GRE image of a folder",
        description="Detect cerebral microbleeds in every SWI or T2*-GRE image of IN and write "
                    "probability maps, lesion label maps and lesion tables in each image's own "
                    "(native) space to OUT, BIDS-Derivatives style, plus OUT/cmb_summary.tsv. "
                    "Re-running with the same work directory resumes where it stopped.")
    parser.add_argument("in_dir", metavar="IN", help="BIDS-like folder: sub-<label>/[ses-<label>/]"
                        "anat/*_swi.nii.gz or *_T2starw.nii.gz")
    parser.add_argument("out_dir", metavar="OUT", help="output folder (a BIDS derivatives dataset)")
    parser.add_argument("--models", metavar="NAME|JSON",
                        help="an installed model's name (cmb-workflow models list) or the "
                             "model_info*.json of a SHIVA-CMB ensemble (.h5 or SavedModel); "
                             "default: the bundled demo model, for synthetic data only")
    parser.add_argument("--config", metavar="YAML",
                        help="settings overriding cmb_workflow/configs/default.yml")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="intermediate files; the same folder resumes a run (default OUT/work)")
    parser.add_argument("--plugin", help="Nipype plugin: Linear, MultiProc (default), SLURM, "
                        "SLURMGraph, ...; or slurm-array: job arrays, returns once they are "
                        "queued (docs/slurm.md; SLURM settings: the config's slurm keys)")
    parser.add_argument("--nprocs", type=int, help="processes for MultiProc (default: all cores)")
    parser.add_argument("--threshold", type=float,
                        help="probability above which a voxel is lesion (default 0.5)")
    parser.add_argument("--min-peak-probability", type=float, metavar="P",
                        help="keep only lesions whose highest probability reaches P (default: "
                             "the model descriptor's min_peak_probability, else no such limit)")
    parser.add_argument("--participant-label", nargs="+", metavar="LABEL",
                        help="process only these subjects (with or without 'sub-')")
    parser.add_argument("--session-label", nargs="+", metavar="LABEL",
                        help="process only these sessions (with or without 'ses-')")
    parser.add_argument("--input-type", choices=["bids", "standard"],
                        help="bids (default) or SHiVAi's standard layout IN/<subject>/swi/<file>")
    parser.add_argument("--masks-dir", metavar="DIR",
                        help="derivatives folder with sub-*/[ses-*/]anat/*_desc-brain_mask.nii.gz")
    parser.add_argument("--brain-mask", choices=["auto", "supplied", "none"],
                        help="for images without a supplied mask: auto (default: the MNI152 "
                             "template registered to the image, or --brain-mask-model), supplied "
                             "(such images fail) or none (the whole image)")
    parser.add_argument("--brain-mask-model", metavar="NAME|JSON",
                        help="installed model name or model_info*.json of a SHIVA brain-mask "
                             "model for --brain-mask auto")
    parser.add_argument("--echo", type=int, help="echo of multi-echo data to use (default 1)")
    parser.add_argument("--preprocessing", choices=["shivai", "cmb-workflow-1"],
                        help="how images are prepared for the model (default: as its descriptor "
                             "says; SHIVA models: shivai, the authors' pipeline)")
    parser.add_argument("--save-model-input", action="store_true", default=None,
                        help="also write the exact array given to the model and its mask "
                             "(desc-modelinput), to check what the model saw")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="CPU prediction arithmetic (default auto: bfloat16 only where the "
                             "CPU computes it natively and it finds float32's lesions)")
    parser.add_argument("--drop-likely-mimics", action=argparse.BooleanOptionalAction,
                        help="remove lesions that look like veins, edges or dark nuclei "
                             "(mimic_score >= 0.5) from the maps, tables and counts (default: "
                             "as the model descriptor says, else keep them; the demo model "
                             "drops them)")
    parser.add_argument("--clean-work", action="store_true", default=None,
                        help="when every image succeeded, delete the intermediate files of the "
                             "work folder (a re-run then recomputes everything)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Nipype's and TensorFlow's own messages on the terminal "
                             "(they always go to the run log)")
    parser.add_argument("--allow-unverified-models", action="store_true", default=None,
                        help="load model files whose md5 does not match their descriptor. Model "
                             "files execute code: only for files you trust")
    parser.set_defaults(handler=_run)


def _run(args) -> int:
    from .configs import load_config
    from .runner import run_study

    overrides = {key: getattr(args, key) for key in (
        "models", "work_dir", "plugin", "nprocs", "threshold", "min_peak_probability",
        "participant_label", "session_label", "input_type", "masks_dir", "brain_mask",
        "brain_mask_model", "echo", "allow_unverified_models", "preprocessing",
        "save_model_input", "drop_likely_mimics", "clean_work", "precision")}
    config = load_config(args.config, overrides)
    if not config.models:
        from .demo import demo_model_descriptor

        config = config.replace(models=str(demo_model_descriptor()))
        logging.getLogger("cmb_workflow").warning(
            "no --models given: using the bundled DEMO model, trained on synthetic phantoms "
            "only; it is not for real scans")
    return run_study(args.in_dir, args.out_dir, config,
                     command_line=shlex.join(["cmb-workflow", *args.argv]))


def _add_array_parsers(subparsers) -> None:
    status = subparsers.add_parser(
        "status", help="images of OUT done, failed, running or queued (SLURM job arrays)",
        description="Count the images of OUT by state (done, failed, skipped, running, pending, "
                    "unfinished), from their summary rows and squeue, and give each failure's "
                    "reason.")
    status.add_argument("out_dir", metavar="OUT")
    status.set_defaults(handler=lambda args: _array().status(args.out_dir))
    summarize = subparsers.add_parser(
        "summarize", help="rebuild OUT's cmb_summary.tsv, qc.tsv and index.html",
        description="Rebuild cmb_summary.tsv, qc.tsv and index.html of OUT from the summary rows "
                    "every run and SLURM array task recorded (OUT/logs/rows).")
    summarize.add_argument("out_dir", metavar="OUT")
    summarize.set_defaults(handler=_summarize)
    # Not listed (no help): what each task of a slurm-array submission runs.
    task = subparsers.add_parser("run-task")
    task.add_argument("plan", help="OUT/logs/array/<submission>/plan.json")
    task.add_argument("phase", choices=("preprocess", "predict", "summary"))
    task.add_argument("--index", type=int, help="task (default: $SLURM_ARRAY_TASK_ID)")
    task.set_defaults(handler=_run_task)


def _array():
    from . import slurm_array

    return slurm_array


def _run_task(args) -> int:
    import os

    index = args.index
    if index is None and args.phase != "summary":
        index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    return _array().run_task(args.plan, args.phase, index)


def _summarize(args) -> int:
    from pathlib import Path

    from .configs import ConfigError
    from .execution import RunLock
    from .summary import rows_dir, summarize

    out_dir = Path(args.out_dir).resolve()
    if not any(rows_dir(out_dir).glob("*.json")):
        raise ConfigError(f"{out_dir}: no image recorded (OUT/logs/rows is empty); is this a "
                          "cmb-workflow OUT?")
    with RunLock(out_dir, out_dir / "logs", shared=True):
        rows = summarize(out_dir)
    print(f"{out_dir / 'cmb_summary.tsv'}: {len(rows)} image(s), "
          f"{sum(row['status'] == 'ok' for row in rows)} done")
    return 0


# Subcommands whose module provides add_arguments(parser) and run_from_args(args): name, module,
# summary. A module is imported only when its command is the one given, so --help stays fast.
TOOLS = (
    ("demo", "demo", "generate phantoms, run the whole pipeline on them and evaluate the result"),
    ("phantoms", "synthetic", "write a BIDS-like dataset of synthetic heads with known microbleeds"),
    ("evaluate", "evaluate", "lesion-wise metrics (VALDO 5 mm matching) of results against a truth"),
    ("models", "registry", "list, install (from a release zip or its url) and verify the models"),
    ("train-demo", "training", "train the demo model (synthetic phantoms only) on CPU from a seed"),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; command: the subcommand given, whose own arguments it then knows."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="cmb-workflow",
        description="Cerebral microbleed detection on SWI / T2*-GRE MRI with SHIVA-CMB models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_parser(subparsers)
    _add_array_parsers(subparsers)
    for name, module, summary in TOOLS:
        tool_parser = subparsers.add_parser(name, help=summary,
                                            description=summary[0].upper() + summary[1:] + ".")
        if name == command:
            tool = importlib.import_module(f".{module}", __package__)
            tool.add_arguments(tool_parser)
            tool_parser.set_defaults(handler=tool.run_from_args)
    return parser


def main(argv=None) -> int:
    # A worker process of a run imports the main script again while it starts; a script that
    # calls main() at its top level would start a second run there, writing into the same OUT.
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit("cmb-workflow: not started inside a starting worker process: the "
                         "script that calls cmb_workflow.cli.main needs "
                         "`if __name__ == \"__main__\":` around that call")
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(next((a for a in arguments if not a.startswith("-")), None)) \
        .parse_args(arguments)
    args.argv = arguments
    terminal = logging.StreamHandler()
    terminal.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s",
                                            datefmt="%H:%M:%S"))
    if getattr(args, "verbose", False):
        os.environ["CMB_WORKFLOW_VERBOSE"] = "1"
    else:
        # Nipype's per-node lines and crash tracebacks go to the run's log file only.
        terminal.addFilter(lambda record: not record.name.startswith("nipype"))
    logging.basicConfig(level=logging.INFO, handlers=[terminal])
    from .bids import InputError
    from .configs import ConfigError
    from .execution import Interrupted
    from .models import ModelError

    try:
        return args.handler(args)
    except (InputError, ConfigError, ModelError) as exc:
        print(f"cmb-workflow: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
