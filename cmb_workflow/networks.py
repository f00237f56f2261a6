"""Networks in the SHIVA-CMB convention, and writing them as the two released formats.

Every builder takes the Keras module to build with: `tf_keras` gives the v1 format (Keras-2
`.h5`, optionally under mixed_float16 with Lambda layers calling `tf`, like the public v1
release) and `keras` (Keras 3) gives the v2 format (SavedModel directory with a `serve`
endpoint). Used by the demo-model trainer; the networks only tests and benchmarks build are in
tests/model_builders.py.
"""

from __future__ import annotations

import json
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
