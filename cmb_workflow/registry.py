"""Known models by name: `cmb-workflow models list | install | verify`, and `--models NAME`.

The published descriptors of the SHIVA-CMB releases ship with the package
(data/model_descriptors/, listed in catalogue.json); more can be registered as `*.json` in
$CMB_WORKFLOW_HOME/descriptors/. A model NAME is installed in $CMB_WORKFLOW_HOME/models/NAME/
(default home ~/.cache/cmb-workflow): its descriptor beside its files, laid out as the
descriptor names them. An installation appears only after every file matched its md5, by
renaming a verified folder into place, so a failed or interrupted install leaves no model.

TensorFlow is never imported here: listing, installing and verifying stay fast.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .models import ModelDescriptor, ModelError, _resolve, md5sum

HOME_VARIABLE = "CMB_WORKFLOW_HOME"
# Names become folder names; a leading dot is kept for the installer's temporary folders.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownModel:
    name: str
    descriptor: Path  # the published descriptor, as shipped or registered
    info: dict = field(compare=False, hash=False)
    licence: str = "unknown"
    intended_use: str = ""
    bundled: bool = False  # its files ship inside the package (the demo)


def cmb_home() -> Path:
    return Path(os.environ.get(HOME_VARIABLE) or Path.home() / ".cache" / "cmb-workflow")


def models_home() -> Path:
    return cmb_home() / "models"


def _read_json(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable model descriptor ({exc})") from exc
    if not isinstance(info, dict) or not isinstance(info.get("files"), list) or not info["files"]:
        raise ModelError(f"{path}: descriptor lists no model files ('files')")
    if not all(isinstance(entry, dict) and "name" in entry for entry in info["files"]):
        raise ModelError(f"{path}: each entry of 'files' needs a 'name'")
    return info


def known_models() -> dict[str, KnownModel]:
    """The package's models, then those registered in $CMB_WORKFLOW_HOME/descriptors/."""
    shipped = Path(str(resources.files("cmb_workflow") / "data" / "model_descriptors"))
    catalogue = json.loads((shipped / "catalogue.json").read_text())
    models = {}
    for name, entry in catalogue.items():
        path = (shipped / entry["descriptor"]).resolve()
        models[name] = KnownModel(name, path, _read_json(path), entry["licence"],
                                  entry["intended_use"], entry.get("bundled", False))
    for path in sorted((cmb_home() / "descriptors").glob("*.json")):
        info = _read_json(path)
        name = str(info.get("name") or path.stem.removeprefix("model_info_"))
        if not NAME_PATTERN.fullmatch(name):
            raise ModelError(f"{path}: model name {name!r} must be letters, digits, '.', '_' "
                             "or '-', not starting with a symbol")
        # A registered file must not redefine a shipped model (and so its checksums).
        if name in models:
            raise ModelError(f"{path}: model name {name!r} is already taken by "
                             f"{models[name].descriptor}")
        models[name] = KnownModel(name, path, info, str(info.get("licence", "unknown")),
                                  str(info.get("intended_use", "")))
    return models


def known_model(name: str) -> KnownModel:
    models = known_models()
    if name not in models:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(models)}; "
                         "see: cmb-workflow models list)")
    return models[name]


def installed_descriptor(model: KnownModel) -> Path | None:
    if model.bundled:
        return model.descriptor
    path = models_home() / model.name / model.descriptor.name
    return path if path.is_file() else None


def resolve_descriptor(name_or_path, base=None) -> Path:
    """A descriptor path, absolute (a relative one is taken from `base`, default the working
    folder), or the installed descriptor of a known model's name."""
    text = str(name_or_path)
    path = (Path(base or Path.cwd()) / Path(text).expanduser()).resolve()
    if path.exists() or text.endswith(".json") or os.sep in text:
        return path
    model = known_model(text)
    installed = installed_descriptor(model)
    if installed is None:
        raise ModelError(f"model {text!r} is not installed; run: cmb-workflow models install "
                         f"{text} --from <zip>")
    return installed


def model_provenance(descriptor: ModelDescriptor) -> dict:
    """The model behind a result, for dataset_description.json's GeneratedBy and the sidecars.

    A descriptor whose files have the md5s of a known model is named after it, wherever it was
    read from; file names are the descriptor's relative ones, never local paths.
    """
    info = descriptor.info
    md5s = sorted(str(entry.get("md5", "")).lower() for entry in info["files"])
    model = next((m for m in known_models().values()
                  if sorted(str(e.get("md5", "")).lower() for e in m.info["files"]) == md5s),
                 None)
    return {
        "Name": model.name if model else str(info.get("name") or descriptor.json_path.stem),
        "Version": descriptor.version,
        "License": model.licence if model else str(info.get("licence", "unknown")),
        "Description": model.intended_use if model else str(info.get("intended_use", "")),
        "URL": info.get("url"),
        "Descriptor": descriptor.json_path.name,
        "Files": [{"Name": entry["name"], "MD5": entry.get("md5")} for entry in info["files"]],
    }


def check_files(json_path: Path, *, origin) -> int:
    """Every file of a descriptor against its md5; returns how many. origin: named in errors."""
    entries = _read_json(json_path)["files"]
    for number, entry in enumerate(entries, 1):
        name = entry["name"]
        fold = f"fold {number} of {len(entries)} ({name})"
        expected = str(entry.get("md5") or "").lower()
        if not expected:
            raise ModelError(f"{json_path}: no md5 for {fold}; model files execute code, an "
                             "unverifiable one is not installed")
        try:
            path = _resolve(json_path, name)
        except ModelError:
            raise ModelError(f"{origin}: {fold} is missing") from None
        actual = md5sum(path)
        if actual != expected:
            raise ModelError(f"{origin}: {fold} has md5 {actual}, the descriptor gives "
                             f"{expected}")
    return len(entries)


def verify_model(name_or_path) -> tuple[Path, int]:
    """Re-check a model's files; a damaged installation (reached by name) is removed, since
    it must never be loaded. Returns the descriptor and its number of files."""
    json_path = resolve_descriptor(name_or_path)
    try:
        return json_path, check_files(json_path, origin=json_path.parent)
    except ModelError as exc:
        model = known_models().get(str(name_or_path))
        if model is None or model.bundled:
            raise
        _discard(models_home() / model.name)
        raise ModelError(f"{exc}; removed the installation, reinstall with: cmb-workflow "
                         f"models install {model.name} --from <zip>") from None


def install_model(name: str, source=None, *, progress=None) -> Path:
    """Install a known model from a release zip or unpacked folder, or download its `url`.

    Returns the installed descriptor. Nothing is left in the models home unless every check
    passed; a download interrupted midway is kept (outside the models home) to be resumed.
    """
    model = known_model(name)
    if model.bundled:
        check_files(model.descriptor, origin=model.descriptor.parent)
        return model.descriptor
    if source is not None:
        return _install_from(model, Path(source).expanduser())
    archive = download(model, progress=progress)
    try:
        return _install_from(model, archive)
    finally:
        # Installed, or failed a check that a second try of the same bytes would fail again.
        archive.unlink()


def _install_from(model: KnownModel, source: Path) -> Path:
    if not source.exists():
        raise ModelError(f"{source}: no such file or folder")
    home = models_home()
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".install-{model.name}-", dir=home))
    try:
        if source.is_dir():
            release = source
        else:
            _check_sha256(model, source)
            release = staging / "release"
            _unzip(source, release)
        target = staging / model.name
        entries = model.info["files"]
        for number, entry in enumerate(entries, 1):
            found = _find_in_release(release, entry["name"],
                                     f"fold {number} of {len(entries)} ({entry['name']})", source)
            destination = target / entry["name"]
            destination.parent.mkdir(parents=True, exist_ok=True)
            if release is source:
                (shutil.copytree if found.is_dir() else shutil.copyfile)(found, destination)
            else:
                found.rename(destination)
        descriptor = target / model.descriptor.name
        shutil.copyfile(model.descriptor, descriptor)
        check_files(descriptor, origin=source)
        final = home / model.name
        if final.exists():
            # Replace an earlier installation only now that the new one passed.
            final.rename(staging / "previous")
        target.rename(final)
        return final / model.descriptor.name
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _discard(folder: Path) -> None:
    """Rename out of sight first, so an interrupted removal leaves no partial model."""
    trash = Path(tempfile.mkdtemp(prefix=".remove-", dir=folder.parent))
    try:
        folder.rename(trash / folder.name)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(model: KnownModel, archive: Path) -> None:
    expected = str(model.info.get("sha256_zip") or "").lower()
    if not expected:
        return
    actual = _sha256(archive)
    if actual != expected:
        raise ModelError(f"{archive}: sha256 {actual} is not the published {expected} of "
                         f"{model.name}; the archive is damaged or another release")


def _unzip(archive: Path, folder: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as handle:
            # extractall keeps members inside `folder` (it drops '..' and leading '/').
            handle.extractall(folder)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ModelError(f"{archive}: damaged or not a zip archive ({exc})") from exc
    except NotImplementedError as exc:
        raise ModelError(f"{archive}: {exc}; unpack it with another tool and install the "
                         "folder with --from FOLDER") from exc


def _find_in_release(release: Path, name: str, fold: str, source: Path) -> Path:
    """Where a descriptor's file is in an unpacked release, whatever folder the archive put
    it in: the one path ending in most of the name's parts."""
    parts = Path(name).parts
    candidates = []
    for folder, folders, files in os.walk(release):
        folders[:] = [entry for entry in folders if entry != "__MACOSX"]  # macOS zip clutter
        candidates += [Path(folder) / entry for entry in folders + files if entry == parts[-1]]

    def matching_tail(path: Path) -> int:
        tail = path.relative_to(release).parts
        count = 0
        while count < min(len(tail), len(parts)) and tail[-1 - count] == parts[-1 - count]:
            count += 1
        return count

    if not candidates:
        raise ModelError(f"{source}: {fold} is missing from the release")
    scores = sorted((matching_tail(path), str(path)) for path in candidates)
    if len(scores) > 1 and scores[-1][0] == scores[-2][0]:
        raise ModelError(f"{source}: {fold} is in the release more than once "
                         f"({scores[-1][1]}, {scores[-2][1]})")
    return Path(scores[-1][1])


def download(model: KnownModel, *, progress=None) -> Path:
    """The release archive from the descriptor's url, resumed from an earlier partial download
    (HTTP Range); returns the complete file, in $CMB_WORKFLOW_HOME/downloads/.
    progress: where the progress bar goes (default stderr)."""
    url = model.info.get("url")
    if not url:
        raise ModelError(f"{model.descriptor}: gives no 'url' to download {model.name} from")
    hint = (f"download {url} in a browser, then run: cmb-workflow models install {model.name} "
            "--from <downloaded zip>")
    folder = cmb_home() / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{model.name}.zip.part"
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": "cmb-workflow"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=60)
    except urllib.error.HTTPError as exc:
        # 416: nothing left to send, the partial file is the whole archive.
        if exc.code != 416 or not offset:
            raise ModelError(f"{url}: HTTP {exc.code} {exc.reason}; {hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        host = urllib.parse.urlsplit(url).hostname
        raise ModelError(f"cannot reach {host} ({reason}); {hint}") from None
    else:
        with response:
            _receive(response, partial, offset, url, hint, model.name, progress or sys.stderr)
    complete = folder / f"{model.name}.zip"
    os.replace(partial, complete)
    return complete


def _receive(response, partial: Path, offset: int, url: str, hint: str, label: str,
             progress) -> None:
    if response.headers.get_content_type() == "text/html":
        raise ModelError(f"{url} answered with a web page, not the model archive; {hint}")
    if response.status != 206:
        offset = 0  # the server ignored the Range: start again
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length else None
    done = offset
    shown = None
    try:
        with open(partial, "ab" if offset else "wb") as handle:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                handle.write(chunk)
                done += len(chunk)
                shown = _show_progress(progress, label, done, total, shown)
    except (OSError, http.client.HTTPException) as exc:
        raise ModelError(f"{url}: download interrupted after {done / 1e6:.1f} MB ({exc}); "
                         "run the same command again to resume") from None
    finally:
        if shown is not None:
            progress.write("\n")
    if total is not None and done < total:
        raise ModelError(f"{url}: download interrupted after {done / 1e6:.1f} of "
                         f"{total / 1e6:.1f} MB; run the same command again to resume")


def _show_progress(stream, label: str, done: int, total: int | None, shown):
    """One carriage-return line, redrawn at each whole percent (or each 10 MB if no size)."""
    step = done * 100 // total if total else done // 10_000_000
    if step == shown:
        return shown
    if total:
        bar = "#" * (step // 4)
        stream.write(f"\r{label} [{bar:<25}] {step:3d}% {done / 1e6:.1f}/{total / 1e6:.1f} MB")
    else:
        stream.write(f"\r{label} {done / 1e6:.1f} MB")
    stream.flush()
    return step


def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="models_action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every known model, whether and where it is "
                                 "installed, its version, licence and intended use")
    listing.set_defaults(action=_list)
    install = actions.add_parser(
        "install", help="install a model from its release zip or unpacked folder, or download it",
        description="Check the release (the zip's sha256 when published, every file's md5) and "
                    f"install it into ${HOME_VARIABLE}/models (default ~/.cache/cmb-workflow/"
                    "models); a release that fails a check is refused and nothing is left.")
    install.add_argument("name", metavar="NAME", help="a name from `cmb-workflow models list`")
    install.add_argument("--from", dest="source", metavar="ZIP_OR_FOLDER",
                         help="the release archive or its unpacked folder (default: download "
                              "from the descriptor's url)")
    install.set_defaults(action=_install)
    check = actions.add_parser("verify", help="re-check every file of a model against its md5")
    check.add_argument("model", metavar="NAME|JSON", help="installed model name or descriptor")
    check.set_defaults(action=_verify)


def run_from_args(args) -> int:
    return args.action(args)


def _list(args) -> int:
    print(f"Models home: {models_home()} (set {HOME_VARIABLE} to move it)")
    for model in known_models().values():
        installed = installed_descriptor(model)
        where = f"installed in {installed.parent}" if installed else "not installed"
        print(f"\n{model.name}  version {model.info.get('version', '?')}  {where}\n"
              f"  licence: {model.licence}\n  use: {model.intended_use}")
    return 0


def _install(args) -> int:
    descriptor = install_model(args.name, args.source)
    print(f"{args.name}: installed, every file matches its md5 ({descriptor}); "
          f"use it with --models {args.name}")
    return 0


def _verify(args) -> int:
    descriptor, count = verify_model(args.model)
    print(f"{args.model}: all {count} model files match their md5 ({descriptor})")
    return 0
