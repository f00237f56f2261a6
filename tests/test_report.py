"""Reports: the model named on every page, QC against limits, count bands and lesion grades, MNI
coordinates, clinical display conventions, determinism, and layout in a real browser."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cmb_workflow.demo import demo_model_descriptor
from cmb_workflow.interfaces.lesions import label_lesions
from cmb_workflow.interfaces.qc import QC_METRICS, quality_flags
from cmb_workflow.interfaces.report import SubjectReport, qc_rows
from cmb_workflow.mimics import score_lesions
from cmb_workflow.configs import load_config
from cmb_workflow.rendering import cmb_count_band, model_summary, write_index
from cmb_workflow.summary import QC_COLUMNS, SUMMARY_COLUMNS

LIMITS = load_config().as_dict()["qc"]
GOOD_QC = {"brain_volume_ml": 1400.0, "mask_fov_edge_fraction": 0.0,
           "brain_outside_crop_fraction": 0.0, "saturated_fraction": 0.01, "dark_fraction": 0.02,
           "n_clusters": 1, "largest_cluster_mm3": 6.0, "template_brain_dice": 0.9,
           "registration_error": ""}


@pytest.mark.parametrize("n, band", [(0, "0"), (1, "1"), (2, "2-4"), (4, "2-4"), (5, "5-9"),
                                     (9, "5-9"), (10, ">=10"), (250, ">=10"), ("3", "2-4")])
def test_cmb_count_band(n, band):
    assert cmb_count_band(n) == band


def test_lesions_are_definite_from_a_peak_of_0_9():
    probability = np.zeros((10, 10, 10), np.float32)
    probability[2, 2, 2] = 0.9
    probability[7, 7, 7:9] = [0.89, 0.7]
    _, rows = label_lesions(probability, np.eye(4), 0.5, 26, 1)
    assert [(row["max_prob"], row["confidence"]) for row in rows] == [(0.89, "possible"),
                                                                       (0.9, "definite")]


def test_qc_metrics_describe_every_qc_column_and_give_its_limit_unit_and_result():
    assert tuple(QC_METRICS) == QC_COLUMNS[4:-1]
    assert quality_flags(GOOD_QC, LIMITS) == []
    bad = {**GOOD_QC, "brain_volume_ml": 500.0, "dark_fraction": 0.3, "saturated_fraction": 0.2,
           "template_brain_dice": None}
    assert quality_flags(bad, LIMITS) == ["brain_volume_out_of_range",
                                          "unusual_intensity_histogram", "registration_failure"]
    rows = {row["label"]: row for row in qc_rows({**bad, "qc_flags": []}, LIMITS)}
    assert rows["Brain volume (native mask)"] == {
        "label": "Brain volume (native mask)", "value": "500.0\u00a0mL",
        "limit": "800\u00a0mL to 2200\u00a0mL",
        "passed": False, "flag": "brain_volume_out_of_range"}
    dark = rows["Brain voxels below a tenth of the ceiling"]
    assert (dark["value"], dark["limit"], dark["passed"]) == ("30.00\u00a0%", "≤\u00a025.00\u00a0%",
                                                              False)
    dice = rows["Registered template brain vs. mask (Dice)"]
    assert (dice["value"], dice["limit"], dice["passed"]) == ("not measured", "≥\u00a00.75", False)
    assert rows["Template registration error"]["passed"] and rows["Lesions found"]["passed"]


def write_descriptor(folder, **fields):
    (folder / "fold0.h5").write_bytes(b"weights")
    path = folder / "model_info.json"
    path.write_text(json.dumps({"version": "7", "files": [{"name": "fold0.h5", "md5": "abc123"}],
                                **fields}))
    return path


def test_the_demo_model_and_models_marked_not_for_clinical_use_get_a_warning(tmp_path):
    demo = model_summary(demo_model_descriptor())
    assert demo["warning"].startswith("DEMO MODEL") and demo["version"] == "demo-5"
    assert [f["md5"] for f in demo["files"]] == ["1594b04f0099612e91ac96fbe3ec96a3",
                                                 "784a6379f7bf561745df4304ad56b69e"]
    marked = model_summary(write_descriptor(tmp_path, description="Research model. Not for "
                                                                  "clinical use."))
    assert "NOT for clinical use" in marked["warning"]
    plain = model_summary(write_descriptor(tmp_path, name="SWI-CMB"))
    assert plain["warning"] is None and plain["name"] == "SWI-CMB"


def test_to_template_undoes_the_transforms_that_warp_the_template_onto_the_image(tmp_path):
    """A blob at a known template point, warped onto an image grid, lands where to_template
    takes back to that point."""
    import ants

    from cmb_workflow.registration import to_template, warp_to_subject

    transform = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3,
        matrix=np.array([[0.95, 0.1, 0.0], [-0.05, 1.05, 0.0], [0.0, 0.0, 1.0]]),
        translation=(6.0, -4.0, 3.0))
    path = str(tmp_path / "template_to_subject_0GenericAffine.mat")
    ants.write_transform(transform, path)
    template = np.zeros((60, 60, 60), np.float32)
    template[40:43, 20:23, 30:33] = 1.0  # centred on voxel (41, 21, 31)
    template_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    template_affine[:3, 3] = -30.0
    reference = tmp_path / "subject.nii.gz"
    subject_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    subject_affine[:3, 3] = [-35.0, -32.0, -28.0]
    nib.save(nib.Nifti1Image(np.zeros((70, 70, 70), np.float32), subject_affine), reference)
    warped = warp_to_subject(nib.Nifti1Image(template, template_affine), reference, [path])
    data = warped.get_fdata()
    centre = np.indices(data.shape).reshape(3, -1) @ data.ravel() / data.sum()
    subject_point = subject_affine[:3, :3] @ centre + subject_affine[:3, 3]
    expected = template_affine[:3, :3] @ [41, 21, 31] + template_affine[:3, 3]
    np.testing.assert_allclose(to_template([subject_point], [path])[0], expected, atol=0.3)


def synthetic_report_inputs(folder):
    """A small 1 mm RAS head with a 2-voxel and a 27-voxel lesion, and every file the report
    reads, as the pipeline writes them."""
    rng = np.random.default_rng(7)
    shape = (64, 72, 60)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-32.0, -40.0, -25.0]
    grid = np.indices(shape) - (np.array(shape) // 2)[:, None, None, None]
    mask = ((grid / (np.array(shape)[:, None, None, None] * 0.42)) ** 2).sum(axis=0) <= 1
    image = np.where(mask, 0.6, 0.05) + rng.normal(0, 0.03, shape)
    probability = np.zeros(shape, np.float32)
    probability[40, 30, 30:32] = [0.95, 0.8]
    probability[20:23, 45:48, 25:28] = 0.7
    image[probability > 0.5] = 0.15
    labels, rows = label_lesions(probability, affine, 0.5, 26, 1)
    rows = score_lesions(rows, image, labels, mask, affine)
    regions = [{"region": "frontal", "mars_class": "lobar", "hemisphere": "right",
                "x_mni": 20.5, "y_mni": 31.0, "z_mni": 5.5},
               {"region": "unknown", "mars_class": "unknown", "hemisphere": "unknown",
                "x_mni": "n/a", "y_mni": "n/a", "z_mni": "n/a"}]
    rows = [{**row, **region} for row, region in zip(rows, regions)]
    files = {"conformed": image.astype(np.float32), "brain_mask": mask.astype(np.uint8),
             "labels": labels, "source_file": image.astype(np.float32)}
    inputs = {}
    for name, data in files.items():
        inputs[name] = str(folder / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(data, affine), inputs[name])
    for name, content in (("box", {"start": [2, 2, 2], "dimensions": [60, 68, 56],
                                   "brain_voxels_outside_box": 0}),
                          ("lesion_table", rows),
                          ("qc", {**GOOD_QC, "n_clusters": 2, "qc_flags": []})):
        inputs[name] = str(folder / f"{name}.json")
        (folder / f"{name}.json").write_text(json.dumps(content))
    return inputs


def render_report(folder, **settings):
    folder.mkdir(parents=True, exist_ok=True)
    report = SubjectReport(title="sub-01", model_descriptor=str(demo_model_descriptor()),
                           qc_limits=LIMITS, command_line="cmb-workflow demo OUT",
                           lesion_rule="probability above 0.5", **settings,
                           **synthetic_report_inputs(folder))
    return report.run(cwd=str(folder)).outputs.out_file


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    return render_report(tmp_path_factory.mktemp("report"))


def test_report_names_the_model_warns_of_the_demo_and_is_deterministic(report_page,
                                                                      tmp_path):
    text = open(report_page, encoding="utf-8").read()
    assert text.index('class="banner"') < text.index("<h1>")
    assert "DEMO MODEL" in text and "<b>demo_model</b>, version demo-5" in text
    assert "1594b04f0099612e91ac96fbe3ec96a3" in text
    assert "Radiological convention: the subject&#39;s right (R) is on the left" in text
    assert ("Brain voxels at the intensity ceiling</td><td>pass</td><td class=\"number\">1.00\u00a0%"
            in text)
    assert "(20.5, 31, 5.5)" in text and "definite" in text and "possible" in text
    assert "Microbleeds: 2 (band 2-4)" in text
    # Overview, mosaic and one thumbnail per lesion; the command line as the tests' helper strips.
    assert text.count('<img src="data:image/png;base64,') == 2 + 2
    assert "<h2>Command line</h2><pre>cmb-workflow demo OUT</pre>" in text
    again = open(render_report(tmp_path), encoding="utf-8").read()
    assert again.replace(str(tmp_path), "") == text.replace(str(Path(report_page).parent), "")


def test_the_report_lists_lesions_by_mimic_score_and_the_dropped_ones(tmp_path):
    dropped = tmp_path / "dropped.json"
    dropped.write_text(json.dumps([{"label": 3, "x": 1.0, "y": 2.0, "z": 3.0,
                                    "volume_mm3": 9.0, "max_prob": 0.97, "mimic_score": 1.0}]))
    text = open(render_report(tmp_path / "page", dropped_table=str(dropped)),
                encoding="utf-8").read()
    assert "most microbleed-like to the most mimic-like" in text and "mimic score" in text
    assert "Dropped as likely mimics: 1" in text and "(1, 2, 3)" in text


def test_neurological_orientation_mirrors_the_views(report_page, tmp_path):
    neurological = open(render_report(tmp_path, orientation="neurological"),
                        encoding="utf-8").read()
    assert "Neurological convention: the subject&#39;s right (R) is on the right" in neurological
    images = re.findall(r'src="(data:[^"]+)"', neurological)
    assert not set(images) & set(re.findall(r'src="(data:[^"]+)"', open(report_page).read()))


def summary_rows():
    row = {"subject": "01", "session": "", "run": "", "n_cmb": 3, "n_lobar": 2, "n_deep": 1,
           "n_infratentorial": 0, "strictly_lobar": "no", "total_volume_mm3": 40.0,
           "brain_volume_ml": 1400.0, "mask_fov_edge_fraction": 0.0, "qc_flags": "",
           "status": "ok", "message": ""}
    return [{**row, "source": "/data/sub-01/anat/sub-01_swi.nii.gz",
             "report": "sub-01_report.html"},
            {**row, "subject": "02", "n_cmb": 12, "n_lobar": 12, "n_deep": 0,
             "source": "/data/sub-02/anat/sub-02_swi.nii.gz", "report": "sub-02_report.html"},
            {"subject": "03", "source": "/data/sub-03/anat/sub-03_swi.nii.gz", "status": "failed",
             "message": "ImageError: empty image"}]


@pytest.fixture(scope="module")
def index_page(tmp_path_factory):
    return write_index(tmp_path_factory.mktemp("index"), summary_rows(), SUMMARY_COLUMNS,
                       demo_model_descriptor())


def test_index_names_the_model_and_shows_each_images_count_band(index_page):
    text = index_page.read_text()
    assert "DEMO MODEL" in text and "<b>demo_model</b>, version demo-5" in text
    assert '<span class="band band-2-4" data-sort="3">2-4</span>' in text
    assert '<span class="band band-10" data-sort="12">&gt;=10</span>' in text
    assert '<a href="sub-01_report.html">sub-01_swi.nii.gz</a>' in text
    assert "ImageError: empty image" in text


# What sticks out of the page sideways, posted to the frame holding the page; tables scroll
# inside their .table-scroll, so only that box must fit.
_OVERFLOW_SCRIPT = """<script>window.addEventListener("load", function () {
  var width = document.documentElement.clientWidth, out = [];
  document.querySelectorAll("body *").forEach(function (e) {
    if (e.parentElement.closest(".table-scroll")) return;
    var box = e.getBoundingClientRect();
    if (box.width && (box.right > width + 1 || box.left < -1))
      out.push(e.tagName + "." + e.className + " " + Math.round(box.left) + "-"
               + Math.round(box.right));
  });
  parent.postMessage(JSON.stringify(
    {width: width, scroll: document.documentElement.scrollWidth, out: out}), "*");
});</script></body>"""
# Headless Chromium's window is at least 500 px wide: a frame gives the page a phone's width.
_FRAME = """<!DOCTYPE html><html><body style="margin:0"><iframe src="{src}" style="border:0"
width="{width}" height="900"></iframe><script>window.addEventListener("message", function (e) {{
  document.body.dataset.overflow = e.data; }});</script></body></html>"""
# Phone, laptop, and A4 paper within Chromium's 1 cm print margins, at 96 dpi.
WIDTHS = {"phone": 390, "laptop": 1366, "print": 718}


def overflow(browser, page, width, folder, *, print_rules=False):
    """print_rules: the page's print styles apply, as when it is printed."""
    text = page.read_text().replace("</body>", _OVERFLOW_SCRIPT)
    probe = folder / f"{page.stem}-probe.html"
    probe.write_text(text.replace("@media print", "@media all") if print_rules else text)
    frame = folder / f"{page.stem}-{width}.html"
    frame.write_text(_FRAME.format(src=probe.name, width=width))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={folder / 'chromium'}", "--window-size=1400,900",
         "--virtual-time-budget=5000", "--dump-dom", frame.as_uri()],
        check=True, capture_output=True, text=True, timeout=120).stdout
    return json.loads(html.unescape(re.search(r'data-overflow="([^"]*)"', dom).group(1)))


@pytest.mark.slow
def test_reports_fit_phone_laptop_and_a4_widths_in_chromium(report_page, index_page, tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed: the layout check needs a browser")
    for page in (Path(report_page), index_page):
        for device, width in WIDTHS.items():
            result = overflow(browser, page, width, tmp_path, print_rules=device == "print")
            assert result["width"] == width, result  # the window is the viewport asked for
            assert not result["out"] and result["scroll"] <= width, (page.name, device, result)


@pytest.mark.parametrize("orientation, right_on_left", [("radiological", True),
                                                        ("neurological", False)])
def test_views_put_the_subjects_right_where_the_convention_says(orientation, right_on_left):
    """The subject's right half (high x on the RAS grid) bright: in radiological views it shows
    on the viewer's left of the coronal and axial panels."""
    from cmb_workflow.interfaces.report import _overview_figure

    data = np.zeros((40, 48, 36), np.float32)
    data[20:] = 1.0  # the subject's right
    data[:, 24:] += 0.5  # anterior: sagittal views show it on the left either way
    mask = np.ones(data.shape, bool)
    box = {"start": [0, 0, 0], "dimensions": list(data.shape)}
    fig = _overview_figure(data, mask, box, (0.0, 1.5), orientation)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., 0].astype(float)
    height = pixels.shape[0]
    halves = []
    for ax in fig.axes:
        extent = ax.get_window_extent()
        panel = pixels[int(height - extent.y1) + 20:int(height - extent.y0) - 20,
                       int(extent.x0) + 20:int(extent.x1) - 20]
        middle = panel.shape[1] // 2
        halves.append(panel[:, :middle].mean() > panel[:, middle:].mean())
    assert halves == [True, right_on_left, right_on_left]
