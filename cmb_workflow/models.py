"""SHIVA model descriptors (model_info*.json), checksum verification and ensemble loading.

Model files are code: Keras-2 `.h5` files carry Lambda layers whose Python bytecode runs when
they are loaded. Every file is therefore checked against the md5 in its descriptor before
TensorFlow is even imported, and unsafe deserialisation is allowed only for files that passed
(or when the user explicitly asked for unverified loading).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .configs import CONVENTIONS, PRECISIONS

LOGGER = logging.getLogger("cmb_workflow.models")

# The modalities this tool can feed a model; the SHIVA CMB models serve SWI and T2*-GRE alike.
PROVIDED_MODALITIES = {"swi", "t2s", "t2star", "t2starw", "gre"}
# What a descriptor's target may be, as read_descriptor's expected_target, and its name.
TARGETS = {"cmb": "CMB", "brain_mask": "brain mask"}


# No model file of an ensemble is near this; a larger one is refused before it is read.
MAX_MODEL_FILE_BYTES = 4 << 30

# /proc/cpuinfo flags of native bfloat16 arithmetic (recent Xeons and EPYCs).
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")


class ModelError(RuntimeError):
    """A model descriptor or model file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class ModelFile:
    path: Path
    md5: str | None


@dataclass(frozen=True)
class ModelDescriptor:
    json_path: Path
    target: str
    modalities: tuple[str, ...]
    version: str
    files: tuple[ModelFile, ...]
    info: dict = field(compare=False, hash=False)
    # The lesion detection threshold the model was validated with, when its descriptor gives one.
    min_peak_probability: float | None = None
    # How its inputs were prepared (preprocessing.CONVENTIONS); SHIVA releases say nothing: shivai.
    preprocessing: str = "shivai"
    # Whether its lesions flagged likely_mimic are dropped unless a setting says otherwise.
    drop_likely_mimics: bool = False


def read_descriptor(json_path, *, expected_target: str = "cmb") -> ModelDescriptor:
    """expected_target: a key of TARGETS; a descriptor that gives another target is refused."""
    json_path = Path(json_path).resolve()
    try:
        _regular_files(json_path)
        info = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{json_path}: not a readable model descriptor ({exc})") from exc
    if not isinstance(info, dict):
        raise ModelError(f"{json_path}: a model descriptor is a JSON object, not a "
                         f"{type(info).__name__}")
    entries = info.get("files")
    if not isinstance(entries, list) or not entries:
        raise ModelError(f"{json_path}: descriptor lists no model files ('files')")
    target = str(info.get("target", "")).lower()
    if target and _letters(expected_target) not in _letters(target):
        raise ModelError(f"{json_path}: descriptor target is {info.get('target')!r}, "
                         f"a {TARGETS[expected_target]} model is needed")
    modalities = info.get("modalities", ["swi"])
    if not isinstance(modalities, list):
        raise ModelError(f"{json_path}: 'modalities' must be a list")
    modalities = tuple(str(m).lower() for m in modalities)
    if not set(modalities) <= PROVIDED_MODALITIES:
        raise ModelError(f"{json_path}: model needs modalities {list(modalities)}; this tool "
                         f"provides only SWI / T2*-GRE (one channel)")
    files = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not entry["name"].strip():
            raise ModelError(f"{json_path}: each entry of 'files' needs a 'name' (text)")
        if not isinstance(entry.get("md5", ""), (str, type(None))):
            raise ModelError(f"{json_path}: the md5 of {entry['name']!r} must be text")
        files.append(ModelFile(_resolve(json_path, entry["name"]), entry.get("md5")))
    min_peak = info.get("min_peak_probability")
    if min_peak is not None and not is_probability(min_peak):
        raise ModelError(f"{json_path}: min_peak_probability {min_peak!r} is not a probability")
    preprocessing = info.get("preprocessing", "shivai")
    if preprocessing not in CONVENTIONS:
        raise ModelError(f"{json_path}: preprocessing {preprocessing!r} is not one of "
                         f"{', '.join(CONVENTIONS)}")
    drop_likely_mimics = info.get("drop_likely_mimics", False)
    if not isinstance(drop_likely_mimics, bool):
        raise ModelError(f"{json_path}: drop_likely_mimics {drop_likely_mimics!r} is not true or "
                         "false")
    return ModelDescriptor(json_path, target, modalities, str(info.get("version", "")),
                           tuple(files), info, None if min_peak is None else float(min_peak),
                           preprocessing, drop_likely_mimics)


def is_probability(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value <= 1


def _letters(text: str) -> str:
    """'Brain mask', 'brain_mask', 'BrainMask' -> 'brainmask'."""
    return "".join(character for character in text.lower() if character.isalnum())


def _resolve(json_path: Path, name: str) -> Path:
    """File names are relative to the JSON folder; v2 releases prefix the folder's own name."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ModelError(f"{json_path}: model file name {name!r} must be a relative path "
                         "inside the descriptor's folder")
    folder = json_path.parent
    candidate = folder / relative
    if not candidate.exists() and relative.parts and relative.parts[0] == folder.name:
        candidate = folder.parent / relative
    if not candidate.exists():
        raise ModelError(f"{json_path}: model file {name!r} not found (looked in {folder})")
    return candidate


def _regular_files(path: Path) -> list[Path]:
    """path itself if it is a regular file, or the regular files under a directory, sorted; a
    FIFO, device or other special file (which would block or never end a read), or a file over
    MAX_MODEL_FILE_BYTES, is refused. Links are followed, so a link to /dev/zero is refused."""
    def checked(file: Path) -> Path:
        info = file.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ModelError(f"{file}: not a regular file; model files must be plain files")
        if info.st_size > MAX_MODEL_FILE_BYTES:
            raise ModelError(f"{file}: {info.st_size} bytes, more than any model file "
                             f"({MAX_MODEL_FILE_BYTES} at most)")
        return file

    if stat.S_ISDIR(path.stat().st_mode):
        return [checked(file) for file in sorted(path.rglob("*"))
                if not stat.S_ISDIR(file.stat().st_mode)]
    return [checked(path)]


def md5sum(path: Path) -> str:
    """md5 of a file's bytes; for a directory, one md5 over every file in sorted path order."""
    digest = hashlib.md5()
    for file in _regular_files(path):
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def verify(descriptor: ModelDescriptor, *, allow_unverified: bool = False) -> None:
    """Check every file's md5 before anything is loaded; refuse mismatches unless allowed."""
    for model_file in descriptor.files:
        actual = md5sum(model_file.path)
        if model_file.md5 and actual == model_file.md5.lower():
            continue
        problem = (f"{model_file.path}: md5 {actual} does not match the descriptor's "
                   f"{model_file.md5}" if model_file.md5 else
                   f"{model_file.path}: descriptor gives no md5")
        if not allow_unverified:
            raise ModelError(f"{problem}; refusing to load it (model files execute code). "
                             "Use --allow-unverified-models only for files you trust.")
        LOGGER.warning("%s; loading it anyway because unverified models were allowed", problem)


def import_tensorflow():
    # Keras-2 .h5 files need tf_keras; the switch must be set before TensorFlow is imported.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    # TensorFlow turns its oneDNN kernels on by default only on some CPUs; elsewhere (AMD EPYC
    # here) a SHIVA-sized fold predicted in 19 s instead of 6 s and a training step took 3.8 s
    # instead of 0.64 s, with outputs within 2e-6 (docs/performance.md). Same kernels on every
    # CPU, unless the user set it.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    # On a GPU TensorFlow takes nearly all of its memory at the first use, so a second
    # prediction job on the same GPU (MultiProc with several batches) would find none left: it
    # takes what it needs instead, unless the user set it.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    # TensorFlow's native start-up lines (CUDA probing on a host without a GPU, CPU features)
    # bypass Python's logging: during a run they go to the run log unless --verbose.
    run_log = os.environ.get("CMB_WORKFLOW_RUN_LOG")
    quiet = run_log and not os.environ.get("CMB_WORKFLOW_VERBOSE")
    with _native_stderr_to(run_log) if quiet else contextlib.nullcontext():
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe happens here, inside the redirect
    return tf


@contextlib.contextmanager
def _native_stderr_to(path):
    """File descriptor 2 (what C++ code writes to) appended to `path` for the duration."""
    try:
        target = open(path, "a")
    except OSError:  # a log of an earlier run in this process, since removed
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with target:
        os.dup2(target.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _float32_config(config):
    """The model config with every mixed_float16 policy replaced by float32.

    CPUs have no float16 kernels for 3D pooling, so mixed-precision models are rebuilt in float32.
    """
    if isinstance(config, dict):
        if config.get("class_name") in ("Policy", "DTypePolicy") and \
                config.get("config", {}).get("name", "").startswith("mixed_"):
            return {**config, "config": {**config["config"], "name": "float32"}}
        # Plain-string policies sit under "dtype"; other strings (layer names) stay as they are.
        return {key: "float32" if key == "dtype" and isinstance(value, str)
                and value.startswith("mixed_") else _float32_config(value)
                for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_config(item) for item in config]
    return config


def load_h5_model(path: Path):
    """The tf_keras model of a v1 .h5 file: in its own policy (mixed_float16, as the v1 release
    was trained and as SHiVAi runs it) on a GPU, rebuilt in float32 on a CPU. It runs the file's
    Lambda bytecode: only for files verified against their descriptor (or explicitly allowed)."""
    import h5py
    tf = import_tensorflow()
    import tf_keras
    from tf_keras.src.saving import serialization_lib

    with h5py.File(path, "r") as handle:
        raw = handle.attrs.get("model_config")
    if raw is None:
        raise ModelError(f"{path}: HDF5 file holds no Keras model config")
    config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    if not tf.config.list_physical_devices("GPU"):
        config = _float32_config(config)
    # Lambda layers are Python bytecode; callers pass verified files only, so their
    # deserialisation is permitted.
    with serialization_lib.SafeModeScope(safe_mode=False):
        try:
            model = tf_keras.models.model_from_json(json.dumps(config),
                                                    custom_objects={"tf": tf})
        except ValueError as exc:
            raise ModelError(f"{path}: cannot rebuild the model ({exc})") from exc
    model.load_weights(str(path))
    return model


def _load_h5(path: Path):
    tf = import_tensorflow()
    model = load_h5_model(path)
    expected = tuple(model.input_shape[1:])
    # A graph rather than eager calls: Grappler fuses each convolution with its bias and
    # activation (about 10 % faster; docs/performance.md).
    forward = tf.function(lambda batch: model(batch, training=False),
                          input_signature=[tf.TensorSpec((None, *expected), tf.float32)])

    def predict(batch):
        # Keras would say so in a multi-line message that names a layer, not the file.
        if len(expected) != batch.ndim - 1 or any(
                size not in (None, actual) for size, actual in zip(expected, batch.shape[1:])):
            raise ModelError(f"{path}: the model takes inputs of shape {expected}, "
                             f"the images are {tuple(batch.shape[1:])}")
        return forward(tf.constant(batch, tf.float32)).numpy()
    return predict


def _load_savedmodel(path: Path):
    tf = import_tensorflow()
    loaded = tf.saved_model.load(str(path))
    if not hasattr(loaded, "serve"):
        raise ModelError(f"{path}: SavedModel has no 'serve' endpoint")
    serve = loaded.serve

    def predict(batch):
        try:
            return np.asarray(serve(tf.constant(batch, dtype=tf.float32)))
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as exc:
            raise ModelError(f"{path}: SavedModel failed to run ({str(exc).splitlines()[0]}); "
                             "models exported under mixed_float16 need a GPU") from exc
    predict.keep_alive = loaded  # the endpoint needs its SavedModel object alive
    return predict


def bfloat16_candidate(requested: str) -> tuple[bool, str]:
    """Whether `requested` precision makes bfloat16 worth a check run here, and why (or why not).

    bfloat16 reaches the models through TensorFlow's oneDNN graph rewrite, which works for both
    formats (a SavedModel's dtypes are fixed at export, so a Keras policy cannot change them)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested == "float32":
        return False, "float32 was asked for"
    tf = import_tensorflow()
    if tf.config.list_physical_devices("GPU"):
        return False, "prediction runs on the GPU (the precision setting is for CPUs)"
    native = native_bfloat16_flags()
    if not native and requested == "auto":
        return False, f"the CPU has no native bfloat16 ({' or '.join(NATIVE_BFLOAT16_FLAGS)})"
    try:  # TensorFlow says whether oneDNN is on only through this private module
        from tensorflow.python.util._pywrap_util_port import IsMklEnabled as onednn_enabled
    except ImportError:
        return False, "this TensorFlow does not tell whether its oneDNN optimisations are on"
    if not onednn_enabled():
        return False, ("TensorFlow's oneDNN optimisations are off (TF_ENABLE_ONEDNN_OPTS=0; "
                       "bfloat16 needs them)")
    if native:
        return True, f"the CPU computes bfloat16 natively ({', '.join(native)})"
    return True, "bfloat16 was asked for (emulated on this CPU: slower than float32)"


def native_bfloat16_flags() -> list[str]:
    """The native bfloat16 flags of this CPU, from /proc/cpuinfo (none where it is unreadable)."""
    flags = cpu_flags()
    return [flag for flag in NATIVE_BFLOAT16_FLAGS if flag in flags]


def cpu_flags() -> list[str]:
    """The CPU's flags from /proc/cpuinfo (none where it is unreadable)."""
    return _cpuinfo("flags").split()


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (empty where it is unreadable)."""
    return _cpuinfo("model name")


def _cpuinfo(field_name: str) -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.split(":", 1)[0].strip() == field_name), "")


@contextlib.contextmanager
def _bfloat16_graphs():
    """Graphs run inside this are rewritten by oneDNN to compute in bfloat16 (inputs, outputs
    and accumulation stay float32); the rewrite follows the setting at each call."""
    tf = import_tensorflow()
    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options(
            {"auto_mixed_precision_onednn_bfloat16": False})


class Ensemble:
    """The folds of one descriptor; predictions are the mean of the folds."""

    def __init__(self, descriptor: ModelDescriptor, folds):
        self.descriptor = descriptor
        self.folds = folds

    def predict(self, batch: np.ndarray, floor: float = 0.0, *,
                precision: str = "float32") -> np.ndarray:
        """batch: (N, X, Y, Z, 1) float32 in [0, 1] -> (N, X, Y, Z) mean probability; each
        fold's probabilities below `floor` count as 0 (SHiVAi's 0.001). precision: float32 or
        bfloat16 (see bfloat16_candidate; the caller checks its lesions against float32)."""
        with _bfloat16_graphs() if precision == "bfloat16" else contextlib.nullcontext():
            return self._predict(batch, floor)

    def _predict(self, batch: np.ndarray, floor: float) -> np.ndarray:
        total = np.zeros(batch.shape[:4], dtype=np.float64)
        for fold in self.folds:
            # One image at a time bounds memory; the folds see exactly the same input.
            for index in range(batch.shape[0]):
                probability = np.asarray(fold(batch[index:index + 1]), dtype=np.float32)[0, ..., 0]
                if floor:
                    probability = np.where(probability < floor, np.float32(0), probability)
                total[index] += probability
        return (total / len(self.folds)).astype(np.float32)


_ENSEMBLES: dict[tuple, Ensemble] = {}


def load_ensemble(json_path, *, allow_unverified: bool = False,
                  expected_target: str = "cmb") -> Ensemble:
    """Verify and load the folds of a descriptor, once per process."""
    descriptor = read_descriptor(json_path, expected_target=expected_target)
    key = (descriptor.json_path, tuple((f.path, f.md5) for f in descriptor.files),
           allow_unverified)
    if key in _ENSEMBLES:
        return _ENSEMBLES[key]
    verify(descriptor, allow_unverified=allow_unverified)
    folds = []
    for number, model_file in enumerate(descriptor.files, 1):
        if model_file.path.is_dir():
            loader = _load_savedmodel
        elif model_file.path.suffix in (".h5", ".hdf5"):
            loader = _load_h5
        else:
            raise ModelError(f"{model_file.path}: unknown model format (expected .h5 or a "
                             "SavedModel directory)")
        try:
            folds.append(loader(model_file.path))
        except ModelError:
            raise
        # h5py and TensorFlow fail in many ways; any of them must stop the run, never leave an
        # ensemble with fewer folds than the descriptor lists.
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"{model_file.path}: fold {number} of {len(descriptor.files)} "
                             f"cannot be loaded ({reason}); refusing to run with fewer "
                             "folds") from exc
        LOGGER.info("loaded model fold %s", model_file.path)
    _ENSEMBLES[key] = ensemble = Ensemble(descriptor, folds)
    return ensemble


def preload_ensemble(json_path, allow_unverified: bool = False) -> None:
    """load_ensemble in a worker process that predicts later (Execution.prepare_prediction):
    the folds stay loaded there; nothing goes back to the caller."""
    load_ensemble(json_path, allow_unverified=allow_unverified)
