"""`cmb-workflow train-demo`: train the bundled demo model on phantom patches, on CPU, from a seed.

Each training phantom goes through the pipeline's own preprocessing (conform, brain mask, crop,
normalise, masking), so the network sees exactly what it sees at prediction time; the target is
every crop voxel whose centre lies inside a microbleed's diameter. Most patches are drawn
again from the phantom's anatomy in a random look (domain randomisation,
synthetic/randomise.py), so that the model does not learn one look of the data. A small 3D U-Net
(the networks.build_unet used for SHIVA-sized test models) learns on cubic patches, every other
one containing a microbleed, the others anywhere in the brain or, later in training, on dark
structures that are not microbleeds (veins, iron-rich nuclei) and on the network's own false
positives, found on whole training crops in random looks five times in the second half of
training (hard-example mining). The ensemble has two such networks that differ in how they pick the
microbleed of a patch (FOLD_RECIPES). Being fully convolutional, each one's trained weights are
copied into the full 160x214x176 input model and exported as a SavedModel with the descriptor.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .configs import MASK_INPUT, Settings

LOGGER = logging.getLogger("cmb_workflow.training")

# The demo model's inputs are prepared as this project first did (preprocessing.py); its
# descriptor says so, so that `run` feeds it the same.
DEMO_CONVENTION = "cmb-workflow-1"
DEMO_VERSION = "demo-5"
TRAIN_SEED = 20261124
PATCH_SIZE = 48
# Truth brain masks grown by up to this many voxels: the automatic mask is never exact.
MAX_MASK_GROWTH = 3
# Patches darken the iron-rich nuclei further by up to this much (x their relative iron load), so
# that strongly iron-weighted scans' nuclei are not taken for microbleeds (docs/demo-model.md).
IRON_DARKENING = 0.4
# Brain voxels this dark (percentile) are sampled as hard negatives.
DARK_PERCENTILE = 5
# ... from this fraction of the training steps on.
HARD_NEGATIVES_FROM = 0.4
# At these fractions of the steps, the network's false positives on the whole training crops
# become hard negatives too: dark-voxel sampling alone left confident detections on iron-dark
# nuclei (figures: docs/demo-model.md, History).
MINING_AT = (0.5, 0.6, 0.7, 0.8, 0.9)
# The demo model's detection threshold (its descriptor's min_peak_probability): the lowest peak
# probability with the best lesion-wise F1 on validation phantoms (docs/performance.md).
DEMO_MIN_PEAK_PROBABILITY = 0.6
# This share of the patches gets a random appearance (domain randomisation, synthetic/randomise.py);
# the others show the phantom as the generator drew it and the pipeline prepared it.
RANDOMISED_SHARE = 0.75
# Each mining round looks at this many training crops, each in a random appearance.
MINING_SUBJECTS = 12


@dataclass(frozen=True)
class FoldRecipe:
    """How one network of the ensemble picks the microbleed a lesion patch is centred near.

    lesion_chance_power None: any lesion voxel of the subject, equally likely, so a 10 mm
    microbleed comes ~40 times as often as a 3 mm one. A number p: first a microbleed, with a
    chance growing as its voxel count to the power p (1: the same chances as None, drawn in two
    steps; 0: every microbleed equally likely), from `from_fraction` of the steps on, p = 1
    before (so that the network first learns to find microbleeds at all).
    iron_darkening: see sample_batch."""

    steps: int
    lesion_chance_power: float | None = None
    from_fraction: float = 0.0
    iron_darkening: float = 0.0

    def power_at(self, step: int) -> float | None:
        if self.lesion_chance_power is None or step > self.steps * self.from_fraction:
            return self.lesion_chance_power
        return 1.0


# Lesion voxels equally likely miss small faint microbleeds; microbleeds equally likely find them
# with more false positives: the average keeps the second's hits and the first's few false
# positives (docs/demo-model.md, History).
FOLD_RECIPES = (FoldRecipe(steps=1500, iron_darkening=IRON_DARKENING),
                FoldRecipe(steps=3000, lesion_chance_power=0.0, from_fraction=0.25,
                           iron_darkening=IRON_DARKENING))


def _prepared_or_cached(seed: int, cache: Path | None) -> dict:
    """prepare_subject's arrays, read from the cache folder when they are there."""
    from .configs import load_config

    cached = Path(cache) / f"seed-{seed}.npz" if cache else None
    if cached and cached.exists():
        with np.load(cached) as stored:
            if set(cached_arrays()) <= set(stored):  # older caches lack the anatomy
                return {key: stored[key] for key in cached_arrays()}
    with tempfile.TemporaryDirectory(prefix="cmb-train-") as scratch:
        prepared = prepare_subject(seed, load_config(), Path(scratch))
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, **prepared)
    return prepared


def cached_arrays():
    """The arrays prepare_subject returns, by name, as kept in a --cache folder."""
    from .synthetic.randomise import MAP_NAMES

    return ("data", "mask", "target", *MAP_NAMES)


def prepare_subject(seed: int, config: Settings, scratch: Path) -> dict:
    """One phantom's arrays on the model's crop (cached_arrays()): the normalised crop (float16),
    its brain mask, the lesion target (bool) and its anatomy maps (float16, for patches in a
    random appearance)."""
    from .synthetic import make_phantom
    from .synthetic.randomise import anatomy_maps

    rng = np.random.default_rng(seed)
    phantom = make_phantom(seed, n_cmb=int(rng.integers(4, 16)))
    data, crop_mask, affine = phantom_model_input(phantom, config, scratch / f"seed-{seed}",
                                                  int(rng.integers(0, MAX_MASK_GROWTH + 1)))
    if MASK_INPUT[DEMO_CONVENTION]:
        data = data * crop_mask
    dimensions = np.asarray(config.final_dimensions)
    target = lesion_target(phantom.lesions, affine, dimensions)
    return {"data": data.astype(np.float16), "mask": crop_mask, "target": target,
            **anatomy_maps(phantom, affine, dimensions)}


@dataclass
class TrainingSubject:
    """A prepared phantom and what patch sampling needs of it."""

    data: np.ndarray  # the crop as the generator drew it and the pipeline prepared it
    mask: np.ndarray
    target: np.ndarray
    anatomy: dict  # synthetic.randomise.MAP_NAMES -> array
    lesions: Components = field(init=False)
    brain_voxels: np.ndarray = field(init=False)  # flat indices
    dark_voxels: np.ndarray = field(init=False)
    near_lesion: np.ndarray = field(init=False)
    brain_sample: np.ndarray = field(init=False)

    def __post_init__(self):
        from .synthetic.randomise import brain_sample

        self.lesions = Components(self.target)
        self.brain_voxels = np.flatnonzero(self.mask)
        self.dark_voxels = dark_non_lesion_voxels(self.data, self.mask, self.target)
        self.near_lesion = ndimage.binary_dilation(self.target, iterations=3)
        # Fixed per subject, so that a patch's normalisation depends on its appearance only.
        self.brain_sample = brain_sample(np.random.default_rng(int(self.target.sum())),
                                         self.mask)

    def image(self, box, rng, config, randomised: bool, iron_darkening: float = 0.0):
        """The model's input over `box`: in a random appearance, or as prepared with the iron
        nuclei darkened by up to iron_darkening (x their relative iron load)."""
        from .synthetic.randomise import random_appearance, render

        if randomised:
            image = render(self.anatomy, box, random_appearance(rng), rng, self.brain_sample,
                           config, self.data.shape, self.near_lesion)
            return image * self.mask[box] if MASK_INPUT[DEMO_CONVENTION] else image
        image = self.data[box].astype(np.float32)
        if iron_darkening:
            image *= 1.0 - rng.uniform(0.0, iron_darkening) * self.anatomy["iron"][box].astype(
                np.float32)
        return image


def phantom_model_input(phantom, config: Settings, folder: Path, mask_growth: int = 0):
    """(the normalised crop, its brain mask, the crop's affine) of a phantom, prepared as the
    demo model's pipeline does from the phantom's true brain mask, grown by `mask_growth`
    voxels (training varies it). The model is given the crop times the mask where
    MASK_INPUT says so."""
    from .imageops import save_atomic
    from .interfaces.brainmask import supplied_mask
    from .interfaces.conform import Conform
    from .preprocessing import box_affine, crop_start, extract_box, normalize

    folder.mkdir(parents=True, exist_ok=True)
    save_atomic(phantom.image, folder / "image.nii.gz")
    save_atomic(phantom.brain_mask, folder / "mask.nii.gz")
    cwd = os.getcwd()
    os.chdir(folder)  # Nipype interfaces write into the working directory.
    try:
        conformed = Conform(in_file=str(folder / "image.nii.gz"),
                            convention=DEMO_CONVENTION,
                            interpolation=config.interpolation).run().outputs.out_file
    finally:
        os.chdir(cwd)
    img = nib.load(conformed)
    mask = supplied_mask(str(folder / "mask.nii.gz"), img, DEMO_CONVENTION)
    if mask_growth:
        mask = ndimage.binary_dilation(mask, iterations=mask_growth)
    dimensions = np.asarray(config.final_dimensions)
    start = crop_start(mask, dimensions, config.top_margin, DEMO_CONVENTION)
    data = extract_box(np.asarray(img.dataobj, np.float32), start, dimensions)
    crop_mask = extract_box(mask, start, dimensions)
    data = normalize(data, crop_mask, config.normalization, config.percentile,
                     config.clip_max)
    return data, crop_mask, box_affine(img.affine, start)


def lesion_target(lesions, affine, shape) -> np.ndarray:
    """Voxels whose centre lies within each lesion's radius, plus each centre's nearest voxel."""
    target = np.zeros(tuple(shape), bool)
    inverse = np.linalg.inv(affine)
    for lesion in lesions:
        centre = nib.affines.apply_affine(inverse, [lesion["x"], lesion["y"], lesion["z"]])
        nearest = np.rint(centre).astype(int)
        if np.any(nearest < 0) or np.any(nearest >= shape):
            continue
        reach = int(np.ceil(lesion["diameter_mm"] / 2)) + 1
        lo = np.maximum(nearest - reach, 0)
        hi = np.minimum(nearest + reach + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        local = np.indices(hi - lo).reshape(3, -1).T + lo
        inside = np.linalg.norm(local - centre, axis=1) <= lesion["diameter_mm"] / 2
        target[box] |= inside.reshape(hi - lo)
        target[tuple(nearest)] = True
    return target


def sample_batch(rng, subjects, batch_size: int, patch: int, hard_negatives: bool, config,
                 false_positives=(), lesion_chance_power: float | None = None,
                 iron_darkening: float = 0.0, randomised_share: float = RANDOMISED_SHARE):
    """Every other patch contains a microbleed (anywhere inside the patch; which one: see
    FoldRecipe); the others are centred on any brain voxel or, with hard_negatives, every second
    one on a dark structure that is not a microbleed (a vein, an iron-rich nucleus) or, half the
    time when there are some, on a false positive of the network (false_positives: (subject,
    voxels) per mined component, each component equally likely). A share of the patches gets a
    random appearance (TrainingSubject.image); the others have their iron nuclei darkened
    by a random amount: the nuclei get darker, microbleeds and veins keep their contrast to the
    tissue around them. Random left-right flips."""
    images, targets = [], []
    half = patch // 2
    for index in range(batch_size):
        subject = rng.integers(len(subjects))
        hard_slot = hard_negatives and index % 4 == 1
        mined = hard_slot and len(false_positives) and rng.integers(2)
        if mined:
            subject, voxels = false_positives[rng.integers(len(false_positives))]
        current = subjects[subject]
        mask, lesions, dark_voxels = current.mask, current.lesions, current.dark_voxels
        if mined:
            centre = voxels[rng.integers(len(voxels))]
        elif index % 2 == 0 and lesions:
            if lesion_chance_power is None:
                voxels = lesions.all_voxels
            else:
                sizes = np.array([len(lesion) for lesion in lesions])
                chances = sizes ** lesion_chance_power
                voxels = lesions[rng.choice(len(lesions), p=chances / chances.sum())]
            centre = voxels[rng.integers(len(voxels))] + rng.integers(-half + 6, half - 6, 3)
        elif hard_slot and len(dark_voxels):
            centre = dark_voxels[rng.integers(len(dark_voxels))]
        else:
            brain = current.brain_voxels
            centre = np.array(np.unravel_index(brain[rng.integers(brain.size)], mask.shape))
        start = np.clip(centre - half, 0, np.asarray(mask.shape) - patch)
        box = tuple(slice(s, s + patch) for s in start)
        image = current.image(box, rng, config, rng.random() < randomised_share, iron_darkening)
        label = current.target[box].astype(np.float32)
        if rng.integers(2):
            image, label = image[::-1], label[::-1]
        images.append(image)
        targets.append(label)
    return np.stack(images)[..., None], np.stack(targets)[..., None]


class Components(list):
    """The voxel indices (n x 3) of each connected component of a binary volume, and of all of
    them in one array (all_voxels, in C order)."""

    def __init__(self, binary):
        labels, _ = ndimage.label(binary)
        super().__init__(np.transpose(component) for component in
                         ndimage.value_indices(labels, ignore_value=0).values())
        self.all_voxels = np.argwhere(binary)


def dark_non_lesion_voxels(data, mask, target) -> np.ndarray:
    """Brain voxels among the darkest DARK_PERCENTILE % that are not near a microbleed."""
    # float32: percentile arithmetic overflows in float16, the dtype the crops are kept in.
    threshold = np.percentile(data[mask].astype(np.float32), DARK_PERCENTILE)
    near_lesion = ndimage.binary_dilation(target, iterations=3)
    return np.argwhere(mask & (data <= threshold) & ~near_lesion)


def false_positive_sites(predict, subjects, rng, config, threshold: float = 0.5) -> list:
    """(subject index, voxels) of each connected component the network calls a microbleed
    away from every true one, on MINING_SUBJECTS whole training crops drawn at random, each in
    a random appearance."""
    sites = []
    whole = tuple(slice(0, n) for n in subjects[0].mask.shape)
    chosen = rng.choice(len(subjects), min(MINING_SUBJECTS, len(subjects)), replace=False)
    for index in sorted(chosen):
        subject = subjects[index]
        image = subject.image(whole, rng, config, randomised=True)
        probability = predict(image[np.newaxis, ..., np.newaxis])[0, ..., 0]
        wrong = (probability > threshold) & subject.mask & ~subject.near_lesion
        sites += [(int(index), voxels) for voxels in Components(wrong)]
    return sites


def dice_bce_loss(ops, positive_weight: float = 10.0):
    """Weighted binary cross-entropy plus soft Dice over the batch. Lesions are ~0.1 % of a
    patch: unweighted, the network settled on "no lesion anywhere" within 100 steps."""

    def loss(y_true, y_pred):
        # From the sigmoid's logits (Keras does it): clipped probabilities cut the gradient of
        # every missed lesion voxel.
        bce = ops.mean((1 + (positive_weight - 1) * y_true)
                       * ops.binary_crossentropy(y_true, y_pred))
        overlap = ops.sum(y_true * y_pred)
        dice = (2 * overlap + 1.0) / (ops.sum(y_true) + ops.sum(y_pred) + 1.0)
        return bce + (1 - dice)

    return loss


def train(out_folder: Path, *, recipes=FOLD_RECIPES, n_subjects: int = 32, batch_size: int = 6,
          patch: int = PATCH_SIZE, base_filters: int = 8, levels: int = 3,
          seed: int = TRAIN_SEED, learning_rate: float = 1e-3,
          cache: Path | None = None, jobs: int = 1) -> Path:
    """Train one network per FoldRecipe and write them with a model_info JSON.

    `cache` keeps each prepared phantom (npz named by its seed) for the next training run;
    `jobs` phantoms are prepared at a time (each in its own process)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from .synthetic import subject_plan

    started = time.time()
    seeds = [plan["seed"] for plan in subject_plan(n_subjects, seed=seed)]
    with ProcessPoolExecutor(max(1, jobs), mp_context=get_context("spawn")) as pool:
        # In plan order whatever finishes first, so the subjects' order never depends on timing.
        prepared_all = list(pool.map(_prepared_or_cached, seeds,
                                     [cache] * len(seeds)))
    subjects = []
    for subject_seed, prepared in zip(seeds, prepared_all):
        subjects.append(TrainingSubject(
            prepared.pop("data"), prepared.pop("mask"), prepared.pop("target"), prepared))
        LOGGER.info("prepared seed %d: %d microbleeds", subject_seed, len(subjects[-1].lesions))
    del prepared_all
    LOGGER.info("prepared %d subjects in %.0f s", len(subjects), time.time() - started)

    from .configs import load_config
    from .networks import (INPUT_SHAPE, build_unet, keras_module, save_fold, tf,
                           write_descriptor)

    config = load_config()
    K = keras_module("savedmodel")

    fold_paths = []
    history = []
    mining = []
    total_steps = sum(recipe.steps for recipe in recipes)
    steps_before = 0
    training_started = time.time()
    for fold, recipe in enumerate(recipes):
        steps = recipe.steps
        # The recipes make the folds differ, so they share the seed ([seed, 0]: as the shipped
        # folds were drawn).
        K.utils.set_random_seed(seed)
        tf.config.experimental.enable_op_determinism()
        rng = np.random.default_rng([seed, 0])
        model = build_unet(K, input_shape=(patch, patch, patch, 1), base_filters=base_filters,
                           levels=levels, name="cmb_demo_unet")
        schedule = K.optimizers.schedules.CosineDecay(learning_rate, steps, alpha=0.05)
        model.compile(optimizer=K.optimizers.Adam(schedule), loss=dice_bce_loss(K.ops))
        full = build_unet(K, input_shape=INPUT_SHAPE, base_filters=base_filters, levels=levels,
                          name="cmb_demo_unet")
        fold_started = time.time()
        running = []
        false_positives = []
        mining_steps = {round(steps * fraction) for fraction in MINING_AT}
        for step in range(1, steps + 1):
            if step in mining_steps:
                full.set_weights(model.get_weights())
                false_positives = false_positive_sites(full.predict_on_batch, subjects, rng,
                                                       config)
                mining.append({"fold": fold, "step": step, "false_positives": len(false_positives)})
                LOGGER.info("fold %d step %d: %d false-positive components mined", fold, step,
                            len(false_positives))
            # Hard negatives only once the network finds microbleeds: from the start, they kept
            # it at "no lesion anywhere".
            images, targets = sample_batch(rng, subjects, batch_size, patch,
                                           hard_negatives=step > steps * HARD_NEGATIVES_FROM,
                                           config=config, false_positives=false_positives,
                                           lesion_chance_power=recipe.power_at(step),
                                           iron_darkening=recipe.iron_darkening)
            running.append(float(model.train_on_batch(images, targets)))
            if step % 50 == 0:
                mean = float(np.mean(running))
                history.append({"fold": fold, "step": step, "loss": round(mean, 5)})
                done = steps_before + step
                elapsed = time.time() - training_started
                LOGGER.info("fold %d step %d/%d loss %.4f (%.0f s); all folds %d %%, about "
                            "%.0f min left", fold, step, steps, mean, time.time() - fold_started,
                            100 * done / total_steps,
                            elapsed / done * (total_steps - done) / 60)
                running = []
        steps_before += steps
        full.set_weights(model.get_weights())
        fold_paths.append(save_fold(full, out_folder, f"demo_fold{fold}", "savedmodel"))

    training = {"seed": seed, "n_subjects": n_subjects,
                "folds": [asdict(recipe) for recipe in recipes], "batch_size": batch_size,
                "patch": patch, "base_filters": base_filters, "levels": levels,
                "learning_rate": learning_rate,
                "dark_percentile": DARK_PERCENTILE, "hard_negatives_from": HARD_NEGATIVES_FROM,
                "randomised_share": RANDOMISED_SHARE, "mining_subjects": MINING_SUBJECTS,
                "mining_at": list(MINING_AT), "mining": mining,
                "parameters": int(full.count_params()),
                "seconds": round(time.time() - started), "loss_history": history}
    (out_folder / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return write_descriptor(
        out_folder, fold_paths, json_name="model_info_savedmodel.json", version=DEMO_VERSION,
        description="DEMO MODEL for cmb-workflow's synthetic phantoms only; NOT for real scans. "
                    f"{len(recipes)} 3D U-Nets ({levels} levels, {base_filters} base filters) "
                    "trained on phantom patches in random looks by `cmb-workflow train-demo`.",
        training=f"cmb-workflow train-demo --seed {seed} (see training.json)",
        min_peak_probability=DEMO_MIN_PEAK_PROBABILITY, preprocessing=DEMO_CONVENTION,
        # Its false positives on unseen looks are mostly what the mimic score flags (CSF edges,
        # cortical ribbon, folia): dropping them was measured to cost few microbleeds
        # (docs/demo-model.md).
        drop_likely_mimics=True)


def add_arguments(parser) -> None:
    parser.add_argument("out_dir", metavar="OUT", help="folder for the model files and descriptor")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help="training seed")
    parser.add_argument("--subjects", type=int, default=32, help="training phantoms")
    parser.add_argument("--batch-size", type=int, default=6, help="patches per step")
    parser.add_argument("--cache", type=Path,
                        help="folder keeping prepared phantoms between training runs")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="phantoms prepared at a time (default: one per CPU)")


def run_from_args(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    descriptor = train(Path(args.out_dir), n_subjects=args.subjects,
                       batch_size=args.batch_size, seed=args.seed, cache=args.cache,
                       jobs=args.jobs)
    print(f"Model descriptor: {descriptor}")
    return 0
