"""`cmb-workflow demo`: phantoms with known microbleeds, the whole pipeline, and its evaluation."""

from __future__ import annotations

import shlex
from importlib import resources
from pathlib import Path

DEMO_MODEL_FOLDER = "demo_model"


def demo_model_descriptor() -> Path:
    """The bundled demo model: a small U-Net trained on phantoms by `cmb-workflow train-demo`
    (cmb_workflow/training.py); for synthetic phantoms only, never for real scans."""
    return Path(str(resources.files("cmb_workflow") / "data" / DEMO_MODEL_FOLDER
                    / "model_info_savedmodel.json"))


def add_arguments(parser) -> None:
    parser.add_argument("out_dir", metavar="OUT", nargs="?", default="cmb-workflow-demo",
                        help="folder for the phantoms, results and evaluation "
                             "(default ./cmb-workflow-demo)")
    parser.add_argument("--n-subjects", type=int, default=3, help="phantoms to generate")
    parser.add_argument("--seed", type=int, default=1000, help="phantom seed")


def run_from_args(args) -> int:
    from .configs import load_config
    from .evaluate import evaluate, format_tables
    from .runner import run_study
    from .synthetic import make_phantom_dataset

    out = Path(args.out_dir).resolve()
    phantoms = out / "phantoms"
    results = out / "results"
    print(f"Generating {args.n_subjects} phantoms in {phantoms} ...", flush=True)
    make_phantom_dataset(phantoms, args.n_subjects, seed=args.seed)
    config = load_config(overrides={"models": str(demo_model_descriptor())})
    status = run_study(phantoms, results, config,
                       command_line=shlex.join(["cmb-workflow", *args.argv]))
    tables = evaluate(phantoms / "derivatives" / "phantom-truth", results,
                      out_tsv=out / "evaluation.tsv")
    print(format_tables(tables))
    print(f"\nResults (BIDS derivatives): {results}\nSummary: {results / 'cmb_summary.tsv'}\n"
          f"Reports (open in a browser): {results / 'index.html'}\n"
          f"Evaluation: {out / 'evaluation.tsv'}\nThe demo model was trained on synthetic "
          "phantoms only; use --models with SHIVA-CMB weights for real scans.")
    return status
