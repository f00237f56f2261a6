"""Tests for cmb_workflow.evaluate: lesion-wise matching, metrics and tables."""

import argparse
import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from cmb_workflow import evaluate as ev

# Flipped, anisotropic, offset grid so that voxel and world coordinates differ.
AFFINE = np.array(
    [
        [-0.5, 0.0, 0.0, 30.0],
        [0.0, 0.5, 0.0, -20.0],
        [0.0, 0.0, 2.0, -8.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPE = (40, 40, 10)  # x 30..10.5, y -20..-0.5, z -8..10 mm
WORLD = nib.affines.apply_affine(AFFINE, np.indices(SHAPE).reshape(3, -1).T).reshape(*SHAPE, 3)
CENTRE = (20.0, -10.0, 0.0)  # a voxel centre


def ball(centre, diameter):
    return np.linalg.norm(WORLD - np.asarray(centre), axis=-1) <= diameter / 2


def sphere_volume(diameter):
    return math.pi * diameter**3 / 6


def shifted(dx=0.0, dy=0.0, dz=0.0, centre=CENTRE):
    return (centre[0] + dx, centre[1] + dy, centre[2] + dz)


def write_nifti(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.int16), affine), path)


def write_truth(root, key, lesions, grid="0.5x0.5x2.0"):
    """lesions: (x, y, z, diameter_mm) tuples."""
    root.mkdir(parents=True, exist_ok=True)
    document = {
        "source": "test",
        "modality": "swi",
        "lesions": [
            {"label": i, "x": x, "y": y, "z": z, "diameter_mm": d, "location": "lobar"}
            for i, (x, y, z, d) in enumerate(lesions, start=1)
        ],
    }
    if grid is not None:
        document["grid"] = {"label": grid}
    (root / f"{key}_desc-cmb_lesions.json").write_text(json.dumps(document))


def write_results(root, key, lesions, peaks=None, mimics=None):
    """lesions: (x, y, z, volume_mm3) tuples; peaks: their max_prob (default 0.9 each);
    mimics: their likely_mimic (default: no column)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["label\tx\ty\tz\tvolume_mm3\tmax_prob\tmean_prob"
             + ("\tlikely_mimic" if mimics else "")]
    for i, ((x, y, z, v), peak) in enumerate(zip(lesions, peaks or [0.9] * len(lesions)), 1):
        mimic = f"\t{'yes' if mimics[i - 1] else 'no'}" if mimics else ""
        lines.append(f"{i}\t{x}\t{y}\t{z}\t{v}\t{peak}\t0.7{mimic}")
    (root / f"{key}_desc-cmb_lesions.tsv").write_text("\n".join(lines) + "\n")


def row(tables, table, view="distance", **match):
    rows = [
        r
        for r in tables[table]
        if r["view"] == view and all(r[k] == v for k, v in match.items())
    ]
    assert len(rows) == 1, rows
    return rows[0]


def counts(r):
    return r["tp"], r["fp"], r["fn"]


@pytest.fixture
def dirs(tmp_path):
    return tmp_path / "truth", tmp_path / "results"


@pytest.mark.parametrize("offset, hit", [(0.0, True), (4.9, True), (5.1, False)])
def test_prediction_hits_within_5mm_only(dirs, offset, hit):
    truth, results = dirs
    write_truth(truth, "sub-01", [(*CENTRE, 4.0)])
    write_results(results, "sub-01", [(*shifted(dy=offset), sphere_volume(4.0))])

    r = row(ev.evaluate(truth, results), "subjects", group="sub-01")

    assert counts(r) == ((1, 0, 0) if hit else (0, 1, 1))
    assert r["status"] == "ok"


def test_exact_hits_plus_one_false_positive(dirs):
    truth, results = dirs
    refs = [(*CENTRE, 4.0), (*shifted(dx=-6, dy=5, dz=2), 2.0)]
    write_truth(truth, "sub-01", refs)
    predictions = [(x, y, z, sphere_volume(d)) for x, y, z, d in refs] + [(12, -2, 8, 1.0)]
    write_results(results, "sub-01", predictions)

    r = row(ev.evaluate(truth, results), "subjects", group="sub-01")

    assert counts(r) == (2, 1, 0)
    assert r["sensitivity"] == 1.0
    assert (r["precision"], r["f1"]) == (pytest.approx(2 / 3), pytest.approx(0.8))
    assert (r["fp_per_scan"], r["fp_per_lesion"], r["abs_count_diff"]) == (1.0, 0.5, 1)
    assert math.isnan(r["dice"])  # no masks


def test_one_prediction_between_two_references_counts_once(dirs):
    truth, results = dirs
    write_truth(truth, "sub-01", [(*shifted(dx=-3), 3.0), (*shifted(dx=3), 3.0)])
    write_results(results, "sub-01", [(*CENTRE, sphere_volume(6.0))])

    r = row(ev.evaluate(truth, results), "subjects", group="sub-01")

    assert counts(r) == (1, 0, 1)


def test_global_assignment_beats_nearest_first(dirs):
    # Nearest-first would pair the first prediction with the first reference
    # (2.0 mm) and leave the second prediction 7.3 mm from the other one.
    truth, results = dirs
    write_truth(truth, "sub-01", [(*CENTRE, 3.0), (*shifted(dx=4.5), 3.0)])
    write_results(results, "sub-01", [(*shifted(dx=2.0), 10.0), (*shifted(dx=-2.8), 10.0)])

    assert counts(row(ev.evaluate(truth, results), "subjects", group="sub-01")) == (2, 0, 0)


def test_subject_without_lesions_or_predictions(dirs):
    truth, results = dirs
    write_truth(truth, "sub-01", [(*CENTRE, 4.0)])
    write_results(results, "sub-01", [(*CENTRE, 30.0), (12, -2, 8, 5.0)])
    write_truth(truth, "sub-02", [])
    write_results(results, "sub-02", [])  # header only

    tables = ev.evaluate(truth, results)
    empty = row(tables, "subjects", group="sub-02")
    pooled = row(tables, "summary", scope="pooled")
    median = row(tables, "summary", scope="median")

    assert counts(empty) == (0, 0, 0)
    assert all(math.isnan(empty[k]) for k in ("sensitivity", "precision", "f1", "fp_per_lesion"))
    assert (empty["fp_per_scan"], empty["abs_count_diff"]) == (0.0, 0)
    # The empty scan still counts as a scan for FPavg ...
    assert pooled["fp_per_scan"] == 0.5
    # ... but its undefined ratios stay out of the medians.
    assert (median["sensitivity"], median["precision"]) == (1.0, 0.5)


def test_subject_missing_from_results_counts_all_lesions_as_misses(dirs):
    truth, results = dirs
    write_truth(truth, "sub-01", [(*CENTRE, 4.0)])
    write_results(results, "sub-01", [(*CENTRE, 30.0)])
    write_truth(truth, "sub-02", [(*CENTRE, 4.0), (*shifted(dz=6), 4.0)])
    write_results(results, "sub-03", [(*CENTRE, 30.0)])

    tables = ev.evaluate(truth, results)
    missing = row(tables, "subjects", group="sub-02")

    assert missing["status"] == "missing_results"
    assert counts(missing) == (0, 0, 2)
    assert counts(row(tables, "summary", scope="pooled")) == (1, 0, 2)
    assert tables["results_without_truth"] == [
        {"subject": "sub-03", "path": str((results / "sub-03_desc-cmb_lesions.tsv").resolve())}
    ]
    text = ev.format_tables(tables)
    assert "No results (all lesions counted as misses): sub-02" in text
    assert "Results without truth (ignored): sub-03" in text


def test_truth_from_binary_mask_uses_world_centres_of_components(dirs):
    truth, results = dirs
    second = shifted(dx=-6, dy=4, dz=4)
    write_nifti(truth / "sub-01_desc-cmb_mask.nii.gz", ball(CENTRE, 4.0) | ball(second, 3.0))
    write_results(results, "sub-01", [(*CENTRE, 30.0), (*second, 14.0)])

    tables = ev.evaluate(truth, results)
    r = row(tables, "subjects", group="sub-01")

    assert counts(r) == (2, 0, 0)
    assert r["grid"] == "unknown"
    assert not [t for t in tables["subjects"] if t["view"] == "overlap"]  # no predicted dseg


def test_truth_from_labelled_mask_keeps_labels_whole(dirs):
    # Label 5 is two separate pieces of one lesion; its centre lies between them.
    truth, results = dirs
    labels = np.zeros(SHAPE, np.int16)
    labels[ball(shifted(dx=-2.5), 1.5) | ball(shifted(dx=2.5), 1.5)] = 5
    labels[ball(shifted(dz=6), 3.0)] = 9
    write_nifti(truth / "sub-01_desc-cmb_dseg.nii.gz", labels)
    write_results(results, "sub-01", [(*CENTRE, 5.0), (*shifted(dz=6), 14.0)])

    r = row(ev.evaluate(truth, results), "subjects", group="sub-01")

    assert r["n_ref"] == 2
    assert counts(r) == (2, 0, 0)


def test_overlap_view_matches_on_shared_voxels_one_to_one(dirs):
    truth, results = dirs
    # Reference 1: a 12 mm rod along x; reference 2 and 3: small balls 3 mm apart.
    rod = (np.abs(WORLD[..., 0] - 20) <= 6) & (WORLD[..., 1] == -10) & (WORLD[..., 2] == 0)
    near, far = shifted(dz=6, dx=-1.5), shifted(dz=6, dx=1.5)
    ref = np.zeros(SHAPE, np.int16)
    ref[rod], ref[ball(near, 2.0)], ref[ball(far, 2.0)] = 1, 2, 3
    write_nifti(truth / "sub-01_desc-cmb_dseg.nii.gz", ref)
    write_truth(truth, "sub-01", [(*CENTRE, 4.0), (*near, 2.0), (*far, 2.0)])
    # Prediction 1 touches only the rod's end, 6.5 mm from its centre;
    # prediction 2 covers both balls.
    pred = np.zeros(SHAPE, np.int16)
    pred[ball(shifted(dx=6.5), 1.0)] = 1
    pred[ball(shifted(dz=6), 5.0)] = 2
    write_nifti(results / "sub-01_desc-cmb_dseg.nii.gz", pred)
    write_results(results, "sub-01", [(*shifted(dx=6.5), 1.0), (*shifted(dz=6), 30.0)])

    tables = ev.evaluate(truth, results)
    overlap = row(tables, "subjects", view="overlap", group="sub-01")
    distance = row(tables, "subjects", view="distance", group="sub-01")

    assert counts(overlap) == (2, 0, 1)
    assert counts(distance) == (1, 1, 2)  # the blob is 1.5 mm from both balls
    expected_dice = 2 * np.count_nonzero((ref > 0) & (pred > 0)) / (
        np.count_nonzero(ref) + np.count_nonzero(pred)
    )
    assert overlap["dice"] == pytest.approx(expected_dice)
    assert 0 < expected_dice < 1
    pooled = row(tables, "summary", view="overlap", scope="pooled")
    assert pooled["dice"] == pytest.approx(expected_dice)


def test_min_peak_probability_scores_only_confident_predictions_in_both_views(dirs):
    truth, results = dirs
    hit, faint_hit, faint_fp, confident_fp = CENTRE, shifted(dz=8), shifted(dx=-8), (12, -2, -6)
    write_nifti(truth / "sub-01_desc-cmb_mask.nii.gz", ball(hit, 4.0) | ball(faint_hit, 4.0))
    write_truth(truth, "sub-01", [(*hit, 4.0), (*faint_hit, 4.0)])
    pred = np.zeros(SHAPE, np.int16)
    for label, centre in enumerate((hit, faint_hit, faint_fp, confident_fp), start=1):
        pred[ball(centre, 4.0)] = label
    write_nifti(results / "sub-01_desc-cmb_dseg.nii.gz", pred)
    volume = sphere_volume(4.0)
    write_results(results, "sub-01",
                  [(*centre, volume) for centre in (hit, faint_hit, faint_fp, confident_fp)],
                  peaks=[0.99, 0.6, 0.7, 0.95])

    every = ev.evaluate(truth, results)
    confident = ev.evaluate(truth, results, min_peak_probability=0.9)

    for view in ("distance", "overlap"):
        assert counts(row(every, "subjects", view=view, group="sub-01")) == (2, 2, 0)
        assert counts(row(confident, "subjects", view=view, group="sub-01")) == (1, 1, 1)
    # The dropped faint hit's voxels no longer count towards Dice.
    expected_dice = 2 * np.count_nonzero(ball(hit, 4.0)) / (
        np.count_nonzero(ball(hit, 4.0) | ball(faint_hit, 4.0))
        + np.count_nonzero(np.isin(pred, (1, 4))))
    dice = row(confident, "subjects", view="overlap", group="sub-01")["dice"]
    assert dice == pytest.approx(expected_dice)


def test_min_peak_probability_needs_the_max_prob_column(dirs):
    truth, results = dirs
    write_truth(truth, "sub-01", [(*CENTRE, 4.0)])
    results.mkdir()
    (results / "sub-01_desc-cmb_lesions.tsv").write_text("label\tx\ty\tz\tvolume_mm3\n")

    assert counts(row(ev.evaluate(truth, results), "subjects", group="sub-01")) == (0, 0, 1)
    with pytest.raises(ev.EvaluationInputError,
                       match="sub-01_desc-cmb_lesions.tsv: missing column.s. max_prob"):
        ev.evaluate(truth, results, min_peak_probability=0.9)


def test_drop_likely_mimics_adds_views_without_them(dirs):
    truth, results = dirs
    hit, flagged_hit, flagged_fp, fp = CENTRE, shifted(dz=8), shifted(dx=-8), (12, -2, -6)
    write_truth(truth, "sub-01", [(*hit, 4.0), (*flagged_hit, 4.0)])
    write_results(results, "sub-01", [(*centre, sphere_volume(4.0))
                                      for centre in (hit, flagged_hit, flagged_fp, fp)],
                  mimics=[False, True, True, False])

    tables = ev.evaluate(truth, results, drop_likely_mimics=True)

    assert counts(row(tables, "subjects", view="distance", group="sub-01")) == (2, 2, 0)
    assert counts(row(tables, "subjects", view="distance_no_mimics", group="sub-01")) == (1, 1, 1)
    assert "distance_no_mimics" not in {r["view"] for r in ev.evaluate(truth, results)["summary"]}
    write_results(results, "sub-01", [(*hit, sphere_volume(4.0))])
    with pytest.raises(ev.EvaluationInputError, match="missing column likely_mimic"):
        ev.evaluate(truth, results, drop_likely_mimics=True)


def test_overlap_view_for_missing_results_and_empty_masks(dirs):
    truth, results = dirs
    write_nifti(truth / "sub-01_desc-cmb_mask.nii.gz", ball(CENTRE, 4.0))
    write_nifti(truth / "sub-02_desc-cmb_mask.nii.gz", np.zeros(SHAPE))
    write_nifti(results / "sub-02_desc-cmb_dseg.nii.gz", np.zeros(SHAPE))
    write_results(results, "sub-02", [])

    tables = ev.evaluate(truth, results)
    missing = row(tables, "subjects", view="overlap", group="sub-01")
    empty = row(tables, "subjects", view="overlap", group="sub-02")

    assert (counts(missing), missing["dice"]) == ((0, 0, 1), 0.0)
    assert math.isnan(empty["dice"])  # two empty masks: Dice undefined, not 1
    assert row(tables, "summary", view="overlap", scope="median")["dice"] == 0.0


def test_min_diameter_excludes_small_references_and_their_matches(dirs):
    truth, results = dirs
    small_hit, large, small_missed = CENTRE, shifted(dz=8), shifted(dx=-8)
    write_truth(truth, "sub-01", [(*small_hit, 2.0), (*large, 4.0), (*small_missed, 2.0)])
    write_results(
        results,
        "sub-01",
        [(*small_hit, 4.0), (*large, 30.0), (12, -2, -6, 4.0)],
    )

    unfiltered = row(ev.evaluate(truth, results), "summary", scope="pooled")
    filtered = row(ev.evaluate(truth, results, min_diameter_mm=3.0), "summary", scope="pooled")

    assert counts(unfiltered) == (2, 1, 1)
    assert counts(filtered) == (1, 1, 0)
    assert (filtered["n_ref"], filtered["n_ref_excluded"], filtered["n_pred_excluded"]) == (1, 2, 1)
    assert filtered["fp_per_lesion"] == 1.0


def test_min_diameter_lets_counted_lesions_pick_first(dirs):
    # The prediction is nearer the small lesion, but the lesion that counts gets it.
    truth, results = dirs
    write_truth(truth, "sub-01", [(*shifted(dx=-1), 2.0), (*shifted(dx=3), 4.0)])
    write_results(results, "sub-01", [(*CENTRE, 10.0)])

    r = row(ev.evaluate(truth, results, min_diameter_mm=3.0), "subjects", group="sub-01")

    assert counts(r) == (1, 0, 0)
    assert r["n_pred_excluded"] == 0


def test_breakdown_by_lesion_size(dirs):
    truth, results = dirs
    write_truth(truth, "sub-01", [(*CENTRE, 2.0), (*shifted(dz=8), 4.0), (*shifted(dx=-8), 7.0)])
    write_results(
        results,
        "sub-01",
        [
            (*CENTRE, sphere_volume(8.0)),  # large, but binned by its 2 mm reference
            (*shifted(dx=-8), sphere_volume(7.0)),
            (12, -2, -6, sphere_volume(6.0)),  # unmatched: binned by its own size
        ],
    )

    by_size = {r["group"]: r for r in ev.evaluate(truth, results)["by_size"]}

    assert list(by_size) == ["<3mm", "3-5mm", "5-10mm", ">=10mm"]
    assert counts(by_size["<3mm"]) == (1, 0, 0)
    assert counts(by_size["3-5mm"]) == (0, 0, 1)
    assert counts(by_size["5-10mm"]) == (1, 1, 0)
    assert by_size["5-10mm"]["precision"] == 0.5
    assert counts(by_size[">=10mm"]) == (0, 0, 0)
    assert math.isnan(by_size["3-5mm"]["abs_count_diff"])


def test_breakdown_by_grid(dirs):
    truth, results = dirs
    write_truth(truth, "sub-01", [(*CENTRE, 4.0)], grid="0.5x0.5x2.0")
    write_results(results, "sub-01", [(*CENTRE, 30.0)])
    write_truth(truth, "sub-02", [(*CENTRE, 4.0)], grid="1.0x1.0x1.0")
    write_results(results, "sub-02", [])
    write_truth(truth, "sub-03", [(*CENTRE, 4.0)], grid=None)
    write_results(results, "sub-03", [(12, -2, -6, 4.0)])

    by_grid = {r["group"]: r for r in ev.evaluate(truth, results)["by_grid"]}

    assert list(by_grid) == ["0.5x0.5x2.0", "1.0x1.0x1.0", "unknown"]
    assert counts(by_grid["0.5x0.5x2.0"]) == (1, 0, 0)
    assert counts(by_grid["1.0x1.0x1.0"]) == (0, 0, 1)
    assert counts(by_grid["unknown"]) == (0, 1, 1)
    assert by_grid["unknown"]["n_subjects"] == 1


def test_pooled_ratios_differ_from_subject_median(dirs):
    truth, results = dirs
    write_truth(truth, "sub-01", [(*CENTRE, 4.0)])
    write_results(results, "sub-01", [(*CENTRE, 30.0)])
    write_truth(truth, "sub-02", [(*shifted(dz=k * 4), 4.0) for k in (-1, 1, 2)])
    write_results(results, "sub-02", [])

    summary = ev.evaluate(truth, results)["summary"]

    assert row({"t": summary}, "t", scope="pooled")["sensitivity"] == 0.25
    assert row({"t": summary}, "t", scope="median")["sensitivity"] == 0.5
    assert row({"t": summary}, "t", scope="median")["abs_count_diff"] == 1.5


def test_pooled_rows_carry_wilson_and_poisson_intervals(dirs):
    truth, results = dirs
    write_truth(truth, "sub-01", [(*shifted(dx=k * 7), 4.0) for k in (-1, 0, 1)], grid="a")
    write_results(results, "sub-01", [(*shifted(dx=-7), 30.0), (*CENTRE, 30.0), (12, -2, 8, 4.0)])
    write_truth(truth, "sub-02", [(*CENTRE, 4.0)], grid="a")
    write_results(results, "sub-02", [(*CENTRE, 30.0), (12, -2, -6, 4.0)])
    write_truth(truth, "sub-03", [], grid="b")
    write_results(results, "sub-03", [])

    tables = ev.evaluate(truth, results)
    by_grid = {r["group"]: r for r in tables["by_grid"]}

    # 3 of 4 found, 2 false positives on 2 scans; textbook values of both intervals.
    assert counts(by_grid["a"]) == (3, 2, 1)
    assert by_grid["a"]["sensitivity_ci_low"] == pytest.approx(0.3006, abs=1e-4)
    assert by_grid["a"]["sensitivity_ci_high"] == pytest.approx(0.9544, abs=1e-4)
    assert by_grid["a"]["fp_per_scan_ci_low"] == pytest.approx(0.2422 / 2, abs=1e-4)
    assert by_grid["a"]["fp_per_scan_ci_high"] == pytest.approx(7.2247 / 2, abs=1e-4)
    # No false positive on one scan still leaves up to 3.69 per scan possible; no reference
    # lesion leaves the sensitivity and its interval undefined.
    assert (by_grid["b"]["fp_per_scan_ci_low"], by_grid["b"]["fp_per_scan_ci_high"]) == \
        (0.0, pytest.approx(3.6889, abs=1e-4))
    assert math.isnan(by_grid["b"]["sensitivity_ci_low"])
    median = row(tables, "summary", scope="median")
    assert all(math.isnan(median[name]) for name in ev.CI_COLUMNS)
    assert "0.30-0.95" in ev.format_tables(tables)


def test_discovery_skips_nested_results_and_unrelated_files(tmp_path):
    truth = tmp_path / "derivatives" / "phantom-truth" / "sub-01" / "anat"
    results = tmp_path / "derivatives" / "cmb-workflow" / "sub-01" / "anat"
    write_truth(truth, "sub-01", [(*CENTRE, 4.0)])
    write_nifti(truth / "sub-01_desc-cmb_mask.nii.gz", ball(CENTRE, 4.0))
    write_results(results, "sub-01", [(*CENTRE, 30.0)])
    write_nifti(results / "sub-01_desc-cmb_dseg.nii.gz", ball(CENTRE, 4.0))
    write_nifti(results / "sub-01_desc-cmb_probseg.nii.gz", ball(CENTRE, 5.0))
    write_nifti(results / "sub-01_desc-brain_mask.nii.gz", np.ones(SHAPE))
    (results.parents[1] / "cmb_summary.tsv").write_text("subject\tn\nsub-01\t1\n")
    (results.parents[1] / "dataset_description.json").write_text("{}")

    for truth_dir, results_dir in [
        (tmp_path, tmp_path / "derivatives" / "cmb-workflow"),  # results inside truth
        (tmp_path / "derivatives", tmp_path / "derivatives"),  # same folder
    ]:
        tables = ev.evaluate(truth_dir, results_dir)
        assert [r["group"] for r in tables["subjects"]] == ["sub-01", "sub-01"]
        assert counts(row(tables, "subjects", view="overlap")) == (1, 0, 0)
        assert row(tables, "subjects", view="overlap")["dice"] == 1.0


def test_cli_prints_tables_and_writes_tsv(dirs, tmp_path, capsys):
    truth, results = dirs
    write_truth(truth, "sub-01", [(*CENTRE, 4.0)])
    write_results(results, "sub-01", [(*CENTRE, 30.0)])
    write_truth(truth, "sub-02", [])
    write_results(results, "sub-02", [])
    out = tmp_path / "eval.tsv"
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    args = parser.parse_args(
        ["--truth", str(truth), "--results", str(results), "--out", str(out), "--size-bins", "2,4"]
    )

    assert ev.run_from_args(args) == 0

    printed = capsys.readouterr().out
    assert "Summary" in printed and "By acquisition grid" in printed
    with out.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        written = list(reader)
    assert tuple(reader.fieldnames) == ev.COLUMNS
    # 2 subjects + pooled + median + 3 size bins (< 2, 2-4, >= 4 mm) + 1 grid, distance view only.
    assert [r["scope"] for r in written].count("size") == 3
    assert len(written) == 2 + 2 + 3 + 1
    empty = next(r for r in written if r["group"] == "sub-02")
    assert (empty["sensitivity"], empty["tp"]) == ("n/a", "0")


@pytest.mark.parametrize(
    "content, message",
    [
        ("label\tx\ty\tz\n1\t0\t0\t0\n", "missing column(s) volume_mm3"),
        ("label\tx\ty\tz\tvolume_mm3\n1\t0\tabc\t0\t3\n", "line 2: y 'abc' is not a number"),
        ("", "empty file"),
    ],
)
def test_bad_results_table_names_file_and_problem(dirs, content, message):
    truth, results = dirs
    write_truth(truth, "sub-01", [(*CENTRE, 4.0)])
    results.mkdir()
    bad = results / "sub-01_desc-cmb_lesions.tsv"
    bad.write_text(content)

    with pytest.raises(ev.EvaluationInputError) as error:
        ev.evaluate(truth, results)

    assert str(bad.resolve()) in str(error.value) and message in str(error.value)


def test_bad_truth_reports_one_line_on_cli(dirs, capsys):
    truth, results = dirs
    truth.mkdir()
    (truth / "sub-01_desc-cmb_lesions.json").write_text('{"lesions": [{"x": 1, "y": 2}]}')
    write_results(results, "sub-01", [])
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)

    status = ev.run_from_args(parser.parse_args(["--truth", str(truth), "--results", str(results)]))

    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1
    assert "sub-01_desc-cmb_lesions.json: lesion #1 needs numeric 'x', 'y' and 'z'" in error


def test_mismatched_grids_are_refused(dirs):
    truth, results = dirs
    write_nifti(truth / "sub-01_desc-cmb_mask.nii.gz", ball(CENTRE, 4.0))
    write_nifti(results / "sub-01_desc-cmb_dseg.nii.gz", ball(CENTRE, 4.0)[:, :, :8])
    write_results(results, "sub-01", [(*CENTRE, 30.0)])

    with pytest.raises(ev.EvaluationInputError, match="sub-01_desc-cmb_dseg.nii.gz: voxel grid"):
        ev.evaluate(truth, results)
