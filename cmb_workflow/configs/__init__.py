"""Settings: typed, frozen, documented field by field, validated when they are loaded.

Layers, later ones winning: the defaults below, a user YAML (`--config`), command-line flags.
Every value is checked here, so a wrong one stops the run at once with one line naming the key,
the value and what is allowed, before any image is touched. Paths are made absolute here: a
flag's against the working folder, a YAML's against the YAML's own folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


# The `precision` setting's values (models.bfloat16_candidate says what each does).
PRECISIONS = ("auto", "float32", "bfloat16")
# The `preprocessing` setting's values (preprocessing.py says what each does), and what the model
# is fed per convention: its input masked by the brain or not, and the floor under which each
# fold's probability is set to 0 before the folds are averaged.
CONVENTIONS = ("shivai", "cmb-workflow-1")
MASK_INPUT = {"shivai": False, "cmb-workflow-1": True}
PREDICTION_FLOOR = {"shivai": 0.001, "cmb-workflow-1": 0.0}


def setting(default, doc: str, *, kind: str = "", choices=(), minimum=None, maximum=None,
            optional: bool = False, exclusive_minimum: bool = False):
    """A settings field: its default, its one-line documentation and what values it takes.

    kind: bool, int, float, str, path, model (a path or an installed model's name), labels
    (list of str), dimensions (3 positive ints),
    range (two numbers, low <= high); default: the type of the default value.
    """
    return field(default=default, metadata={
        "doc": doc, "kind": kind or type(default).__name__, "choices": tuple(choices),
        "minimum": minimum, "maximum": maximum, "optional": optional,
        "exclusive_minimum": exclusive_minimum})


def _section(cls):
    return field(default_factory=cls, metadata={"section": cls})


@dataclass(frozen=True)
class SlurmSettings:
    """sbatch settings of the SLURM, SLURMGraph and slurm-array plugins (None: the cluster's
    default)."""

    partition: str | None = setting(None, "partition of every job", kind="str", optional=True)
    account: str | None = setting(None, "account charged for every job", kind="str",
                                  optional=True)
    time: str | None = setting(None, "wall-time limit of a preprocessing job, e.g. 01:00:00",
                               kind="str", optional=True)
    cpus: int = setting(1, "--cpus-per-task of every job", minimum=1)
    memory: str = setting("4G", "--mem of a preprocessing or post-processing job")
    predict_partition: str | None = setting(
        None, "partition of the prediction jobs (one per batch), e.g. a GPU partition; "
        "None: partition", kind="str", optional=True)
    predict_time: str | None = setting(None, "wall-time limit of a prediction job; None: time",
                                       kind="str", optional=True)
    predict_memory: str = setting("8G", "--mem of a prediction job")
    gpu: bool = setting(True, "prediction jobs ask for a GPU with gpu_sbatch_args")
    gpu_sbatch_args: str = setting("--gres=gpu:1", "how a prediction job asks for a GPU")
    extra_sbatch_args: str = setting("", "added to every sbatch call as written, e.g. --qos=long")
    array_throttle: int = setting(50, "slurm-array: tasks of one job array running at once "
                                  "(sbatch --array=...%N)", minimum=1)
    task_command: str = setting("", "slurm-array: the command a task runs for cmb-workflow, e.g. "
                                "'apptainer exec --nv cmb-workflow.sif cmb-workflow'; empty: "
                                "this Python's cmb-workflow")


@dataclass(frozen=True)
class QCLimits:
    """Quality control: an image outside a limit gets the flag named in brackets in the
    qc_flags column of cmb_summary.tsv and qc.tsv (it is still processed)."""

    brain_volume_ml: tuple = setting((800, 2200), "[brain_volume_out_of_range] native brain "
                                     "mask volume, mL", kind="range", minimum=0)
    max_fov_edge_fraction: float = setting(0.02, "[brain_cut_by_fov] share of the mask's surface "
                                           "on the field of view's edge", minimum=0, maximum=1)
    max_outside_crop_fraction: float = setting(0.001, "[brain_cut_by_crop_box] share of the "
                                               "brain outside the box", minimum=0, maximum=1)
    max_saturated_fraction: float = setting(0.05, "[unusual_intensity_histogram] brain voxels at "
                                            "the normalised ceiling", minimum=0, maximum=1)
    max_dark_fraction: float = setting(0.25, "[unusual_intensity_histogram] brain voxels below a "
                                       "tenth of the ceiling", minimum=0, maximum=1)
    max_lesions: int = setting(50, "[many_clusters] lesions per image", minimum=0)
    max_lesion_volume_mm3: float = setting(1000, "[very_large_cluster] largest lesion, mm^3 "
                                           "(a 10 mm microbleed is about 520)", minimum=0)
    min_template_brain_dice: float = setting(0.75, "[registration_failure] registered template "
                                             "brain vs the brain mask", minimum=0, maximum=1)


@dataclass(frozen=True)
class InputLimits:
    """Images outside these limits are refused before resampling: no head needs more, and
    memory and time grow with the field of view cubed."""

    max_fov_mm: float = setting(400.0, "longest side of the field of view, mm, along the image's "
                                "own axes", minimum=1)
    max_voxel_size_mm: float = setting(6.0, "largest voxel side, mm", minimum=0.1)
    max_voxels: int = setting(150_000_000, "voxels of one 3D volume", minimum=1)


@dataclass(frozen=True)
class ReportSettings:
    """How the reports show images."""

    orientation: str = setting("radiological", "radiological (the patient's left on the right, "
                               "as clinical viewers show it) or neurological",
                               choices=("radiological", "neurological"))


@dataclass(frozen=True)
class Settings:
    """Everything a run can be told. Read as settings.<name>; sections as settings.slurm.cpus."""

    # Models
    models: str | None = setting(None, "model_info*.json of the CMB ensemble, or an installed "
                                 "model's name (cmb-workflow models list); None: the bundled "
                                 "demo model (synthetic data only)", kind="model", optional=True)
    allow_unverified_models: bool = setting(False, "load model files whose md5 does not match "
                                            "their descriptor (model files execute code)")
    # Inputs
    input_type: str = setting("bids", "bids: sub-*/[ses-*/]anat/*_swi|_T2starw.nii[.gz]; "
                              "standard: IN/<subject>/swi/<file>", choices=("bids", "standard"))
    participant_label: tuple = setting((), "only these subjects (without sub-); empty: all",
                                      kind="labels")
    session_label: tuple = setting((), "only these sessions (without ses-); empty: all",
                                  kind="labels")
    echo: int = setting(1, "echo (1-based) taken from multi-echo data", minimum=1)
    masks_dir: str | None = setting(None, "derivatives tree holding *_desc-brain_mask.nii[.gz] "
                                    "per image", kind="path", optional=True)
    brain_mask: str = setting("auto", "without a supplied mask: auto (brain_mask_model if set, "
                              "else the registered MNI152 template), supplied (the image fails) "
                              "or none (the whole image)", choices=("auto", "supplied", "none"))
    brain_mask_model: str | None = setting(None, "model_info*.json (or installed name) of a "
                                           "SHIVA brain-mask model for brain_mask auto",
                                           kind="model", optional=True)
    input_limits: InputLimits = _section(InputLimits)
    # Preprocessing, as the model was trained
    preprocessing: str | None = setting(
        None, "how images are prepared for the model (docs/shivai.md): shivai (the SHIVA models' "
        "authors' pipeline) | cmb-workflow-1 (the demo model's); None: the model descriptor's "
        "own, else shivai", kind="str", choices=CONVENTIONS, optional=True)
    interpolation: str = setting("bspline", "cmb-workflow-1's conform kernel: bspline (cubic) | "
                                 "welch (windowed sinc, ~50x slower) | linear",
                                 choices=("bspline", "welch", "linear"))
    final_dimensions: tuple = setting((160, 214, 176), "the models' input box, voxels",
                                      kind="dimensions")
    top_margin: int = setting(5, "voxels between the mask top and the crop box's end when the "
                              "box moves up (shivai: end exclusive, as SHiVAi counts)", minimum=0)
    normalization: str = setting("shivai", "shivai: /p99, clip 1.3, /1.3 | minmax: [brain min, "
                                 "p99] -> [0, 1]", choices=("shivai", "minmax"))
    percentile: float = setting(99.0, "percentile of brain voxels that scales intensities",
                                minimum=0, maximum=100, exclusive_minimum=True)
    clip_max: float = setting(1.3, "shivai normalisation: upper clip before rescaling",
                              minimum=0, exclusive_minimum=True)
    # Prediction
    mask_input: bool | None = setting(None, "zero the image outside the brain mask before "
                                      "prediction; None: as the preprocessing does (shivai: "
                                      "no, cmb-workflow-1: yes)", kind="bool", optional=True)
    mask_output: bool = setting(True, "zero the probability outside the brain mask after "
                                "prediction")
    save_model_input: bool = setting(False, "also write the array given to the model and its "
                                     "mask (desc-modelinput), to check what the model saw")
    precision: str = setting(
        "auto", "CPU prediction arithmetic: auto (bfloat16 where the CPU computes it natively, "
        "else float32) | float32 | bfloat16; bfloat16 is kept only if, at the model's first use on this "
        "CPU, the first image's lesions matched float32's (the sidecar records which ran, and "
        "why)",
        choices=PRECISIONS)
    # Lesions
    threshold: float = setting(0.5, "probability strictly above this is lesion",
                               minimum=0, maximum=1)
    connectivity: int = setting(26, "voxel connectivity of a lesion", choices=(6, 18, 26))
    min_lesion_size: int = setting(1, "smallest lesion, voxels of the 1 mm grid", minimum=1)
    min_peak_probability: float | None = setting(
        None, "keep a lesion only if its highest probability reaches this; None: the model "
        "descriptor's own, else no such limit", kind="float", minimum=0, maximum=1,
        optional=True)
    drop_likely_mimics: bool | None = setting(
        None, "remove lesions flagged likely_mimic (veins, edges, dark nuclei; docs/mimics.md) "
        "from the maps, tables and counts; the report lists them; None: as the model descriptor "
        "says, else no (the demo model: yes)", kind="bool", optional=True)
    # Execution
    work_dir: str | None = setting(None, "intermediate files; the same folder resumes a run; "
                                   "None: OUT/work", kind="path", optional=True)
    clean_work: bool = setting(False, "after a run in which every image succeeded, delete what "
                               "it kept in the work folder (a re-run then recomputes everything)")
    plugin: str = setting("MultiProc", "Nipype plugin: Linear, MultiProc, SLURM, SLURMGraph; or "
                          "slurm-array (job arrays, returns once submitted; docs/slurm.md)")
    nprocs: int | None = setting(None, "MultiProc processes; None: all cores", kind="int",
                                 minimum=1, optional=True)
    memory_gb: float | None = setting(None, "MultiProc memory budget, GB; None: Nipype's "
                                      "estimate of the machine", kind="float", minimum=0,
                                      exclusive_minimum=True, optional=True)
    predict_memory_gb: float = setting(3.0, "memory one prediction process needs, GB (MultiProc "
                                       "schedules with it)", minimum=0, exclusive_minimum=True)
    predict_batch_size: int = setting(8, "images per prediction job: the models are loaded once "
                                      "per batch", minimum=1)
    slurm: SlurmSettings = _section(SlurmSettings)
    qc: QCLimits = _section(QCLimits)
    report: ReportSettings = _section(ReportSettings)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """Plain values (lists, not tuples), as YAML and Nipype inputs take them."""
        return _plain(dataclasses.asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def load_config(user_yaml=None, overrides: dict | None = None, *, cwd=None) -> Settings:
    """Defaults, then the user's YAML, then flags (None means 'not given on the command line').

    cwd: the folder that relative paths given as flags are taken from (default: the current
    one)."""
    values = Settings().as_dict()
    if user_yaml:
        path = Path(user_yaml).resolve()
        try:
            user = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{path}: cannot read config ({reason})") from exc
        if not isinstance(user, dict):
            raise ConfigError(f"{path}: config must be a mapping of setting: value")
        _merge(values, user, source=str(path), base=path.parent)
    _merge(values, {k: v for k, v in (overrides or {}).items() if v is not None},
           source="command line", base=Path(cwd or Path.cwd()))
    return _build(Settings, values, source="defaults")


def _merge(values: dict, update: dict, *, source: str, base: Path, prefix: str = "") -> None:
    """Merge `update` into `values`, checking each value as it comes (so the error names its
    source); relative paths are taken from `base`."""
    fields = {f.name: f for f in dataclasses.fields(_section_class(prefix))}
    for key, value in update.items():
        name = f"{prefix}{key}"
        if not isinstance(key, str) or key not in values:
            raise ConfigError(f"{source}: unknown setting {name!r}")
        section = fields[key].metadata.get("section")
        if section:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name} {value!r}: expected a mapping of its "
                                  "settings")
            _merge(values[key], value, source=source, base=base, prefix=f"{name}.")
            continue
        checked = _check(name, value, fields[key].metadata, source)
        kind = fields[key].metadata["kind"]
        if kind == "path" and checked is not None:
            checked = str((base / Path(checked).expanduser()).resolve())
        elif kind == "model" and checked is not None:
            from ..registry import resolve_descriptor

            checked = str(resolve_descriptor(checked, base))
        values[key] = _plain(checked)


def _section_class(prefix: str):
    cls = Settings
    for part in filter(None, prefix.split(".")):
        cls = next(f.metadata["section"] for f in dataclasses.fields(cls) if f.name == part)
    return cls


def _build(cls, values: dict, *, source: str):
    kwargs = {}
    for f in dataclasses.fields(cls):
        section = f.metadata.get("section")
        kwargs[f.name] = (_build(section, values[f.name], source=source) if section
                          else _check(f.name, values[f.name], f.metadata, source))
    settings = cls(**kwargs)
    if cls is Settings:
        _check_plugin(settings.plugin)
    return settings


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(name: str, value, meta: dict, source: str):
    """The value, as its field stores it, or a ConfigError naming key, value and what is
    allowed."""
    if value is None and meta["optional"]:
        return None
    kind, choices = meta["kind"], meta["choices"]

    def refuse(allowed: str):
        return ConfigError(f"{source}: {name} {value!r}: expected {allowed}"
                           + (" or null" if meta["optional"] else ""))

    if choices:
        if isinstance(value, bool) or value not in choices:
            raise refuse("one of " + ", ".join(str(choice) for choice in choices))
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise refuse("true or false")
        return value
    if kind in ("str", "path", "model"):
        if not isinstance(value, str) or (kind != "str" and not value.strip()):
            raise refuse("a text" if kind == "str" else "a path")
        return value
    if kind == "labels":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise refuse("a list of labels")
        return tuple(value)
    if kind == "dimensions":
        if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise refuse("three positive whole numbers")
        return tuple(value)
    if kind == "range":
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
                _is_number(v) and v >= (meta["minimum"] or 0) for v in value) \
                or value[0] > value[1]:
            raise refuse("[low, high], two numbers with low <= high")
        return tuple(value)
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise refuse("a whole number" + _bounds(meta))
    elif kind == "float":
        if not _is_number(value):
            raise refuse("a number" + _bounds(meta))
    low, high = meta["minimum"], meta["maximum"]
    if (low is not None and (value < low or (meta["exclusive_minimum"] and value == low))) or \
            (high is not None and value > high):
        raise refuse(("a whole number" if kind == "int" else "a number") + _bounds(meta))
    return value


def _bounds(meta: dict) -> str:
    low, high = meta["minimum"], meta["maximum"]
    above = "above" if meta["exclusive_minimum"] else "at least"
    if low is not None and high is not None:
        return f" {above} {low:g} and at most {high:g}"
    if low is not None:
        return f" {above} {low:g}"
    return f" at most {high:g}" if high is not None else ""


def _check_plugin(name: str) -> None:
    from ..slurm import ARRAY_PLUGIN, SLURM_PLUGINS

    # The plugins the runs are built around need no look-up in Nipype, whose import (a second)
    # `run` makes only once MultiProc's forkserver has started.
    if name in ("MultiProc", "Linear", *SLURM_PLUGINS, ARRAY_PLUGIN):
        return
    from nipype.pipeline import plugins
    from nipype.pipeline.plugins.base import GraphPluginBase

    plugin_class = getattr(plugins, f"{name}Plugin", None)
    if plugin_class is None:
        raise ConfigError(f"plugin {name!r}: Nipype has no such plugin")
    # Graph plugins return once the jobs are submitted; only SLURM's queue is waited on.
    if issubclass(plugin_class, GraphPluginBase) and name != "SLURMGraph":
        raise ConfigError(f"plugin {name!r} returns before its jobs have run; use SLURMGraph, "
                          "SLURM, MultiProc or another plugin that waits")


# Settings that change how a run executes, not its results.
EXECUTION_SETTINGS = ("allow_unverified_models", "participant_label", "session_label", "work_dir",
                      "plugin", "nprocs", "memory_gb", "predict_memory_gb", "predict_batch_size",
                      "slurm")


def results_digest(settings: Settings) -> str:
    """A fingerprint of the settings that decide an image's results: an image done with the
    same digest need not run again (slurm-array resubmission)."""
    import hashlib
    import json

    values = {key: value for key, value in settings.as_dict().items()
              if key not in EXECUTION_SETTINGS}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def save_settings(settings: Settings, path) -> Path:
    """The settings a run used, as a YAML that `--config` reads back, each key documented."""
    from ..imageops import write_text_atomic

    lines = ["# Settings of this run (cmb-workflow run --config reads this file back)."]
    _describe(Settings, settings.as_dict(), lines, indent="")
    return write_text_atomic("\n".join(lines) + "\n", path)


def _describe(cls, values: dict, lines: list, indent: str) -> None:
    for f in dataclasses.fields(cls):
        section = f.metadata.get("section")
        if section:
            lines.append(f"{indent}# {' '.join(section.__doc__.split())}")
            lines.append(f"{indent}{f.name}:")
            _describe(section, values[f.name], lines, indent + "  ")
            continue
        lines.append(f"{indent}# {f.metadata['doc']}")
        dumped = yaml.safe_dump({f.name: values[f.name]}, default_flow_style=True,
                                width=10_000).strip()
        lines.append(f"{indent}{dumped.removeprefix('{').removesuffix('}')}")
