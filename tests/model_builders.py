"""Networks that only the tests and benchmarks build: hand-weighted detectors that find blobs
without training, small ensembles of them in both released formats, SHIVA-sized random U-Net
ensembles and their FLOP count. The benchmarks import this module from tests/ too.

Built with cmb_workflow.networks's helpers, so the files are written as the package writes the
demo model's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# Lambda bodies must refer to a global `tf` (not a closure) so that they serialise the way the
# released v1 models do and load with custom_objects={"tf": tf}.
from cmb_workflow.networks import (INPUT_SHAPE, build_unet, build_with_policy, keras_module,
                                   save_fold, tf, write_descriptor)


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
    inputs = K.layers.Input(input_shape)
    outputs = K.layers.Conv3D(1, 1, activation="sigmoid", name="dark")(inputs)
    model = K.Model(inputs, outputs, name=name)
    model.get_layer("dark").set_weights([np.full((1, 1, 1, 1, 1), -gain, np.float32),
                                         np.array([gain * max_darkness], np.float32)])
    return model


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


def build_unet_ensemble(folder: Path, *, folds: int = 3, fmt: str = "h5",
                        output_bias: float | None = None, **unet_kwargs):
    """A SHIVA-sized ensemble for benchmarks: randomly initialised U-Nets (speed does not depend
    on the weights), as v1 .h5 files saved under mixed_float16 like the public release, or as v2
    SavedModels (float32: a mixed_float16 export does not run on CPU). output_bias: the output
    layer's bias, e.g. -20 to push every probability near 0, so that post-processing sees a
    clean scan instead of the hundreds of "lesions" of random weights.

    Returns the descriptor and the last fold's model (for its parameter and FLOP counts).
    """
    K = keras_module(fmt)
    paths = []
    for fold in range(folds):
        model = build_with_policy(K, build_unet, mixed_precision=fmt == "h5", **unet_kwargs)
        if output_bias is not None:
            output = [layer for layer in model.layers if "Conv" in type(layer).__name__][-1]
            kernel, bias = output.get_weights()
            output.set_weights([kernel, bias * 0 + output_bias])
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
