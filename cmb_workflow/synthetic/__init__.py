"""Synthetic SWI / T2*-GRE heads with known cerebral microbleeds (see `phantoms`)."""

from .grids import GRIDS, Grid
from .phantoms import (MODALITIES, STYLES, Phantom, add_arguments, make_phantom, make_phantom_dataset,
                       run_from_args, subject_plan)

__all__ = ["GRIDS", "Grid", "MODALITIES", "STYLES", "Phantom", "add_arguments", "make_phantom",
           "make_phantom_dataset", "run_from_args", "subject_plan"]
