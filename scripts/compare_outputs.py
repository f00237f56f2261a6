"""Compare two output folders of `cmb-workflow demo` or `cmb-workflow run`, file by file.

    python scripts/compare_outputs.py OUT_A OUT_B

The check that a refactor changed no result (docs/pipeline.md, "Refactoring safely"): run the
demo, or the same run on the same images, with both checkouts, then compare the two folders.

Every NIfTI must have the same shape, data type, affine, other header fields and voxels, exactly;
every other file the same content once what differs from one run to the next is set aside:
- paths into the compared folder or into the installed package (the demo model), and the
  command line in the reports: the folders, and the checkouts, lie in different places;
- the logs folder (times, durations, process ids, the execution settings) and Nipype's work
  folder (caches and intermediate files, whose results are in the outputs).
For `demo`, compare the demo folders (OUT), not their results/, so that paths to the phantoms
are seen as the same. Prints one verdict per file; exits with 1 on any difference, or a file
present in only one folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

SKIPPED_FOLDERS = {"logs", "work"}
# The package's own files, such as the demo model, are referred to where each checkout lies.
PACKAGE_PATH = re.compile(r"/[^\s\"'<>,:]*/cmb_workflow/")
# The report's last section (cmb_workflow/templates/report.html).
COMMAND_LINE = re.compile(r"(<h2>Command line</h2><pre>).*?(</pre>)", re.DOTALL)


def output_files(root: Path) -> dict[str, Path]:
    """The output files under `root`, by their path relative to it."""
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not SKIPPED_FOLDERS.intersection(relative.parts[:-1]):
            files[relative.as_posix()] = path
    return files


def normalised_text(path: Path, root: Path) -> str:
    text = path.read_text()
    for form in sorted({str(root.absolute()), str(root.resolve())}, key=len, reverse=True):
        text = re.sub(re.escape(form) + r"(?![\w.-])", "<OUT>", text)
    text = PACKAGE_PATH.sub("<package>/", text)
    return COMMAND_LINE.sub(r"\1<command line>\2", text)


def compare_nifti(a: Path, b: Path) -> str | None:
    image_a, image_b = nib.load(a), nib.load(b)
    if image_a.shape != image_b.shape:
        return f"shape {image_a.shape} vs {image_b.shape}"
    if image_a.get_data_dtype() != image_b.get_data_dtype():
        return f"data type {image_a.get_data_dtype()} vs {image_b.get_data_dtype()}"
    if not np.array_equal(image_a.affine, image_b.affine):
        return f"affine differs by up to {np.abs(image_a.affine - image_b.affine).max():.3g}"
    header_a, header_b = image_a.header, image_b.header
    if type(header_a) is not type(header_b):
        return f"header {type(header_a).__name__} vs {type(header_b).__name__}"
    fields = [key for key in header_a.keys() if header_a[key].tobytes() != header_b[key].tobytes()]
    if fields:
        return f"header fields differ: {', '.join(fields)}"
    data_a, data_b = np.asanyarray(image_a.dataobj), np.asanyarray(image_b.dataobj)
    differ = data_a != data_b
    if np.issubdtype(data_a.dtype, np.floating):
        differ &= ~(np.isnan(data_a) & np.isnan(data_b))
    if differ.any():
        largest = np.abs(data_a[differ].astype(float) - data_b[differ].astype(float)).max()
        return f"{int(differ.sum())} voxels differ, by up to {largest:.3g}"
    return None


def first_json_difference(a, b, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"key {where}/{key} in one file only"
            found = first_json_difference(a[key], b[key], f"{where}/{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where or '/'}: {len(a)} vs {len(b)} items"
        for index, (item_a, item_b) in enumerate(zip(a, b)):
            found = first_json_difference(item_a, item_b, f"{where}/{index}")
            if found:
                return found
        return None
    # As written: 1 and 1.0, or 1 and true, differ; NaN equals NaN.
    return None if json.dumps(a) == json.dumps(b) else f"{where or '/'}: {a!r} vs {b!r}"


def first_tsv_difference(text_a: str, text_b: str) -> str | None:
    rows_a = list(csv.reader(text_a.splitlines(), delimiter="\t"))
    rows_b = list(csv.reader(text_b.splitlines(), delimiter="\t"))
    if len(rows_a) != len(rows_b):
        return f"{len(rows_a)} vs {len(rows_b)} lines"
    header = rows_a[0] if rows_a else []
    for number, (row_a, row_b) in enumerate(zip(rows_a, rows_b), start=1):
        if row_a != row_b:
            columns = [header[i] if i < len(header) else str(i)
                       for i in range(max(len(row_a), len(row_b)))
                       if row_a[i:i + 1] != row_b[i:i + 1]]
            return f"line {number}, columns {', '.join(columns)}"
    return None


def first_line_difference(text_a: str, text_b: str) -> str | None:
    lines_a, lines_b = text_a.splitlines(), text_b.splitlines()
    for number, (line_a, line_b) in enumerate(zip(lines_a, lines_b), start=1):
        if line_a != line_b:
            return f"line {number} differs"
    return None if len(lines_a) == len(lines_b) else f"{len(lines_a)} vs {len(lines_b)} lines"


def compare_file(a: Path, root_a: Path, b: Path, root_b: Path) -> str | None:
    """None when the two files hold the same output, else what differs."""
    name = a.name
    if name.endswith((".nii", ".nii.gz")):
        return compare_nifti(a, b)
    if a.read_bytes() == b.read_bytes():
        return None
    try:
        text_a, text_b = normalised_text(a, root_a), normalised_text(b, root_b)
    except UnicodeDecodeError:
        return "bytes differ"
    if name.endswith(".json"):
        return first_json_difference(json.loads(text_a), json.loads(text_b))
    if name.endswith(".tsv"):
        return first_tsv_difference(text_a, text_b)
    return first_line_difference(text_a, text_b)


def compare_folders(root_a: Path, root_b: Path) -> int:
    """Print a verdict per file; the number of files that differ or are in one folder only."""
    files_a, files_b = output_files(root_a), output_files(root_b)
    differences = 0
    for relative in sorted(set(files_a) | set(files_b)):
        if relative not in files_b or relative not in files_a:
            verdict = f"only in {root_a if relative in files_a else root_b}"
        else:
            verdict = compare_file(files_a[relative], root_a, files_b[relative], root_b)
        differences += verdict is not None
        print(f"{'same' if verdict is None else 'DIFFERENT'}  {relative}"
              + ("" if verdict is None else f": {verdict}"))
    print(f"{differences} of {len(set(files_a) | set(files_b))} files differ")
    return differences


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_a", type=Path, metavar="OUT_A")
    parser.add_argument("out_b", type=Path, metavar="OUT_B")
    args = parser.parse_args(argv)
    for root in (args.out_a, args.out_b):
        if not root.is_dir():
            parser.error(f"{root} is not a folder")
    return 1 if compare_folders(args.out_a, args.out_b) else 0


if __name__ == "__main__":
    sys.exit(main())
