"""Networks in the SHIVA-CMB convention, and writing them as the two released formats.

Every builder takes the Keras module to build with: `tf_keras` gives the v1 format (Keras-2
`.h5`, optionally under mixed_float16 with Lambda layers calling `tf`, like the public v1
release) and `keras` (Keras 3) gives the v2 format (SavedModel directory with a `serve`
endpoint). Used by the tests, the demo-model trainer and the benchmarks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .models import import_tensorflow, md5sum

# Lambda bodies must refer to a global `tf` (not a closure) so that they serialise the way the
# released v1 models do and load with custom_objects={"tf": tf}.
tf = import_tensorflow()

INPUT_SHAPE = (160, 214, 176, 1)


def keras_module(fmt: str):
    """'h5' -> tf_keras (Keras 2), 'savedmodel' -> keras (Keras 3)."""
    if fmt == "h5":
        import tf_keras

        return tf_keras
    import keras

    return keras


def build_unet(K, *, input_shape=INPUT_SHAPE, base_filters: int = 10, levels: int = 4,
               residual: bool = False, name: str = "unet"):
    """A 3D U-Net with a sigmoid output; residual=True gives ResUnet3D-style blocks (v2)."""
    L = K.layers
    inputs = L.Input(input_shape)
    factor = 2 ** (levels - 1)
    # Pad each axis up to a multiple of 2**(levels-1) (214 is not divisible by 8), crop at the end.
    padding = [(-n % factor // 2, -n % factor - -n % factor // 2) for n in input_shape[:3]]
    x = L.ZeroPadding3D(padding)(inputs) if any(sum(p) for p in padding) else inputs
    # A Lambda calling tf, like the released v1 models (needs custom_objects={"tf": tf}).
    x = L.Lambda(lambda t: tf.clip_by_value(t, 0.0, 1.0), name="clip_input")(x)

    def block(t, filters):
        y = L.Conv3D(filters, 3, padding="same", activation="relu")(t)
        y = L.Conv3D(filters, 3, padding="same")(y)
        if residual:
            shortcut = L.Conv3D(filters, 1, padding="same")(t)
            y = L.Add()([y, shortcut])
        return L.Activation("relu")(y)

    skips = []
    for level in range(levels - 1):
        x = block(x, base_filters * 2 ** level)
        skips.append(x)
        x = L.MaxPooling3D(2)(x)
    x = block(x, base_filters * 2 ** (levels - 1))
    for level in reversed(range(levels - 1)):
        x = L.Conv3DTranspose(base_filters * 2 ** level, 2, strides=2, padding="same")(x)
        x = L.Concatenate()([x, skips[level]])
        x = block(x, base_filters * 2 ** level)
    x = L.Conv3D(1, 1, activation="sigmoid", dtype="float32")(x)
    if any(sum(p) for p in padding):
        x = L.Cropping3D(padding, dtype="float32")(x)
    return K.Model(inputs, x, name=name)


def build_dark_spot_detector(K, *, input_shape=INPUT_SHAPE, gain: float = 40.0,
                             min_contrast: float = 0.15, max_darkness: float = 0.15,
                             name: str = "dark_spot_detector"):
    """A hand-weighted network marking small dark spots, so tests get a model that really
    detects blobs without training.

    Probability = sigmoid(gain*(mean9 - mean3 - min_contrast)) * sigmoid(gain*(max_darkness -
    mean3)): darker than the surroundings *and* dark in itself, which keeps it quiet on the
    brain rim beside bright CSF. Its Lambda layers call `tf` and its max-pooling has no float16
    CPU kernel, as in the released v1 models.
    """
    import numpy as np

    L = K.layers
    inputs = L.Input(input_shape)

    def box_mean(t, size, prefix):
        # Separable, in float32 (running sums lose too much in float16).
        for axis in (1, 2, 3):
            t = L.Lambda(_box_mean_along, arguments={"size": size, "axis": axis},
                         dtype="float32", name=f"{prefix}_axis{axis}")(t)
        return t

    small = box_mean(inputs, 3, "mean3")
    large = box_mean(inputs, 9, "mean9")
    contrast = L.Subtract(name="contrast")([large, small])
    # A 3-voxel max filter rounds the response so the spot's centre stays its centre; max is
    # separable, and three 3-voxel passes cost a ninth of one 3x3x3.
    for pool in ((3, 1, 1), (1, 3, 1), (1, 1, 3)):
        contrast = L.MaxPooling3D(pool, strides=1, padding="same")(contrast)
    features = L.Concatenate()([contrast, small])
    scores = L.Conv3D(2, 1, activation="sigmoid", dtype="float32", name="scores")(features)
    output = L.Lambda(lambda t: tf.reduce_prod(t, axis=-1, keepdims=True), dtype="float32",
                      name="both")(scores)
    model = K.Model(inputs, output, name=name)
    kernel = np.array([[gain, 0.0], [0.0, -gain]], np.float32).reshape(1, 1, 1, 2, 2)
    bias = np.array([-gain * min_contrast, gain * max_darkness], np.float32)
    model.get_layer("scores").set_weights([kernel, bias])
    return model


def _box_mean_along(t, size=3, axis=1):
    """Mean of `size` neighbours along one axis, counting only those inside the image as
    avg_pool3d's SAME padding does, from running sums: TensorFlow's CPU pooling builds every
    window (a 9x9x9 average of a 160x214x176 image took minutes). Refers to no name but `tf`,
    so it loads from a v1 file with custom_objects={"tf": tf}."""
    length = t.shape[axis]
    padding = [[0, 0]] * 5
    padding[axis] = [size // 2 + 1, size // 2]

    def window_sums(values):
        running = tf.cumsum(tf.pad(values, padding), axis=axis)
        return (tf.gather(running, tf.range(size, length + size), axis=axis)
                - tf.gather(running, tf.range(0, length), axis=axis))
    return window_sums(t) / window_sums(tf.ones_like(t))


def build_dark_voxel_detector(K, *, input_shape=INPUT_SHAPE, gain: float = 40.0,
                              max_darkness: float = 0.15, name: str = "dark_voxel_detector"):
    """Probability = sigmoid(gain*(max_darkness - voxel)): one 1x1x1 convolution, for tests of
    a pipeline's mechanics on many images, where prediction must cost next to nothing. Within
    the brain mask (the probability outside it is zeroed) the dark voxels are the blobs."""
    import numpy as np

    inputs = K.layers.Input(input_shape)
    outputs = K.layers.Conv3D(1, 1, activation="sigmoid", name="dark")(inputs)
    model = K.Model(inputs, outputs, name=name)
    model.get_layer("dark").set_weights([np.full((1, 1, 1, 1, 1), -gain, np.float32),
                                         np.array([gain * max_darkness], np.float32)])
    return model


def save_fold(model, folder: Path, name: str, fmt: str) -> Path:
    """Write one fold: `name`.h5 (tf_keras model) or `name`.tf_inference/ (Keras 3 export)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "h5":
        path = folder / f"{name}.h5"
        model.save(str(path), save_format="h5")
    else:
        path = folder / f"{name}.tf_inference"
        model.export(str(path), verbose=False)
    return path


def write_descriptor(folder: Path, fold_paths, *, json_name: str = "model_info.json",
                     names_relative_to: Path | None = None, **fields) -> Path:
    """A model_info JSON in the released form: file names with md5.

    Names are relative to the JSON's folder, or to `names_relative_to` (v2 releases name files
    from the folder above, "SWI-CMB/...").
    """
    base = names_relative_to or folder
    files = [{"name": os.path.relpath(path, base), "md5": md5sum(Path(path))}
             for path in fold_paths]
    info = {"version": "test", "target": "CMB", "modalities": ["swi"], **fields, "files": files}
    path = Path(folder) / json_name
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def build_with_policy(K, builder, *, mixed_precision: bool, **kwargs):
    """Build under the mixed_float16 global policy (as v1 was saved), then restore float32."""
    if not mixed_precision:
        return builder(K, **kwargs)
    K.mixed_precision.set_global_policy("mixed_float16")
    try:
        return builder(K, **kwargs)
    finally:
        K.mixed_precision.set_global_policy("float32")


def build_detector_ensemble(folder: Path, fmt: str, *, folds: int = 2, **fields) -> Path:
    """A small ensemble of dark-spot detectors in one released format, with its descriptor.

    v1 (.h5) folds are saved under mixed_float16 like the public release; v2 names its files
    from the folder above ("SWI-CMB/...") like the public release.
    """
    K = keras_module(fmt)
    paths = []
    for fold in range(folds):
        model = build_with_policy(K, build_dark_spot_detector, mixed_precision=(fmt == "h5"),
                                  gain=40.0 + fold)
        paths.append(save_fold(model, folder, f"fold{fold}", fmt))
    return write_descriptor(folder, paths, json_name=f"model_info_{fmt}.json",
                            names_relative_to=folder.parent if fmt != "h5" else None, **fields)


def build_unet_ensemble(folder: Path, *, folds: int = 3, fmt: str = "h5", **unet_kwargs):
    """A SHIVA-sized ensemble for benchmarks: randomly initialised U-Nets (speed does not depend
    on the weights), as v1 .h5 files saved under mixed_float16 like the public release, or as v2
    SavedModels (float32: a mixed_float16 export does not run on CPU).

    Returns the descriptor and the last fold's model (for its parameter and FLOP counts).
    """
    K = keras_module(fmt)
    paths = []
    for fold in range(folds):
        model = build_with_policy(K, build_unet, mixed_precision=fmt == "h5", **unet_kwargs)
        paths.append(save_fold(model, folder, f"fold{fold}", fmt))
    return write_descriptor(folder, paths), model


def forward_flops(model) -> int:
    """Floating-point operations of one forward pass of one image: 2 per multiply-add of the
    convolutions (pooling, activations and additions are comparatively negligible)."""
    flops = 0
    for layer in model.layers:
        if "Conv" not in type(layer).__name__ or not hasattr(layer, "kernel"):
            continue
        # A convolution visits every output voxel, a transposed one every input voxel.
        grid = layer.input.shape if "Transpose" in type(layer).__name__ else layer.output.shape
        flops += 2 * math.prod(tuple(layer.kernel.shape)) * math.prod(tuple(grid)[1:-1])
    return flops
