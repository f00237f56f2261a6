"""Models by name: bundled descriptors, install from a zip, a folder or a URL, verify, resolve."""

import hashlib
import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from cmb_workflow.cli import main
from cmb_workflow.models import ModelError, load_ensemble, md5sum, read_descriptor
from cmb_workflow.registry import (install_model, known_models, model_provenance,
                                   models_home, resolve_descriptor)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own CMB_WORKFLOW_HOME: nothing touches the user's."""
    folder = tmp_path / "cmb-home"
    monkeypatch.setenv("CMB_WORKFLOW_HOME", str(folder))
    return folder


def register(home, name, files, **fields):
    """A test-only descriptor in $CMB_WORKFLOW_HOME/descriptors/, as a packaged one would be."""
    folder = home / "descriptors"
    folder.mkdir(parents=True, exist_ok=True)
    info = {"name": name, "version": "t1", "target": "CMB", "modalities": ["swi"],
            "licence": "test-only", **fields, "files": files}
    (folder / f"{name}.json").write_text(json.dumps(info))


def fake_release(root):
    """A v2-like release folder, files only (no TensorFlow): SWI-CMB/fold{0,1}.tf_inference."""
    for fold in range(2):
        model = root / "SWI-CMB" / f"fold{fold}.tf_inference"
        (model / "variables").mkdir(parents=True)
        (model / "saved_model.pb").write_bytes(f"graph of fold {fold} ".encode() * 200)
        (model / "variables" / "variables.index").write_bytes(bytes(range(256)) * (fold + 1))
    return [{"name": f"SWI-CMB/fold{fold}.tf_inference",
             "md5": md5sum(root / "SWI-CMB" / f"fold{fold}.tf_inference")} for fold in range(2)]


def zip_folder(folder, archive, *, skip=None, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(archive, "w", compression) as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not (skip and skip in path.parts):
                handle.write(path, path.relative_to(folder))
    return archive


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_one_line_error(capsys, *needles):
    """The error is one line, the last on stderr (after any download progress bar)."""
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("cmb-workflow: error: "), lines
    assert not any("error" in line for line in lines[:-1]), lines
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def models_home_is_empty():
    home = models_home()
    return not home.exists() or not any(home.iterdir())


def test_bundled_descriptors_are_the_authors_published_files():
    models = known_models()
    assert {"swi-cmb-v1", "swi-cmb-v2", "demo"} <= set(models)
    # md5 of the files as published in pboutinaud/SHIVA_CMB@4367d93: not one byte changed.
    assert md5sum(models["swi-cmb-v1"].descriptor) == "bfc24920bffcf3afae0d78810f7c3e1c"
    assert md5sum(models["swi-cmb-v2"].descriptor) == "1046d7296a7c5ec84e14a4b10332e437"
    v2 = models["swi-cmb-v2"].info
    assert v2["sha256_zip"] == "DC4E3A8E92C32657A172754B0971E849737157AF07D2A229E58016D0F3A4229B"
    assert v2["url"] == "https://cloud.efixia.com/sharing/hwR97APpm"
    assert [f["md5"] for f in v2["files"]] == ["a5ae990416b0149097e1698e2e28b00a",
                                               "23fd23c83a9b30fe6dab7bef5f3277ce",
                                               "667370eb8997718b4a8cd9e89d6c1bdd"]
    assert len(models["swi-cmb-v1"].info["files"]) == 3
    assert all("CC BY-NC-SA" in models[name].licence for name in ("swi-cmb-v1", "swi-cmb-v2"))


def test_list_says_what_is_installed_where(home, tmp_path, capsys):
    register(home, "test-cmb", fake_release(tmp_path / "release"))
    assert main(["models", "install", "test-cmb", "--from", str(tmp_path / "release")]) == 0
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert f"test-cmb  version t1  installed in {models_home() / 'test-cmb'}" in out
    assert "swi-cmb-v2  version v2  not installed" in out
    assert "licence: CC BY-NC-SA 4.0" in out and "not for clinical use" in out
    assert "demo  version demo-5  installed in" in out


def test_bundled_demo_resolves_and_verifies(capsys):
    assert resolve_descriptor("demo").parent.name == "demo_model"
    assert main(["models", "verify", "demo"]) == 0
    assert "all 2 model files match their md5" in capsys.readouterr().out


def test_names_resolve_only_once_installed(home, tmp_path, capsys):
    register(home, "test-cmb", fake_release(tmp_path / "release"))
    with pytest.raises(ModelError) as error:
        resolve_descriptor("swi-cmb-v2")
    assert str(error.value) == ("model 'swi-cmb-v2' is not installed; run: cmb-workflow models "
                                "install swi-cmb-v2 --from <zip>")
    with pytest.raises(ModelError, match="unknown model 'nonesuch'"):
        resolve_descriptor("nonesuch")
    # A path is passed through, existing or not (read_descriptor reports a missing one).
    assert resolve_descriptor("elsewhere/model_info.json") == Path.cwd() / "elsewhere/model_info.json"
    # `run` resolves before anything starts; YAML configs get the same resolution.
    assert main(["run", str(tmp_path), str(tmp_path / "out"), "--models", "test-cmb"]) == 2
    assert_one_line_error(capsys, "model 'test-cmb' is not installed")
    installed = install_model("test-cmb", tmp_path / "release")
    assert resolve_descriptor("test-cmb") == installed
    assert installed == models_home() / "test-cmb" / "test-cmb.json"
    # Installed, the name gets past the model checks (the empty input is what stops the run)...
    (tmp_path / "in").mkdir()
    assert main(["run", str(tmp_path / "in"), str(tmp_path / "out"), "--models", "test-cmb"]) == 2
    assert_one_line_error(capsys, "no image found in the expected layout")
    # ... and --brain-mask-model reads the installed descriptor too (a CMB model, refused there).
    assert main(["run", str(tmp_path / "in"), str(tmp_path / "out"),
                 "--brain-mask-model", "test-cmb"]) == 2
    assert_one_line_error(capsys, f"{installed}: descriptor target is 'CMB'")


def test_release_with_other_folder_layout_installs(home, tmp_path):
    """v1 names its files 'v1/...'; a zip holding them at its top level (or deeper) is found."""
    files = fake_release(tmp_path / "release")
    register(home, "v1-like", [{"name": "v1/" + Path(f["name"]).name, "md5": f["md5"]}
                               for f in files])
    archive = zip_folder(tmp_path / "release" / "SWI-CMB", tmp_path / "flat.zip")
    descriptor = install_model("v1-like", archive)
    assert (descriptor.parent / "v1" / "fold1.tf_inference" / "saved_model.pb").is_file()
    assert [f.path.parent.name for f in read_descriptor(descriptor).files] == ["v1", "v1"]


def corrupt_one_byte(archive):
    data = bytearray(archive.read_bytes())
    offset = data.find(b"graph of fold 1") + 5
    data[offset] ^= 0xFF
    archive.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["corrupt byte, sha256 published", "corrupt byte, no sha256",
                                  "wrong sha256", "missing fold", "tampered file in a folder"])
def test_bad_release_is_refused_and_leaves_nothing(case, home, tmp_path, capsys):
    release = tmp_path / "release"
    files = fake_release(release)
    # Stored, not deflated: the flipped byte stays a flipped byte of the fold's file.
    archive = zip_folder(release, tmp_path / "release.zip", compression=zipfile.ZIP_STORED,
                         skip="fold1.tf_inference" if case == "missing fold" else None)
    published = {"sha256_zip": sha256(archive).upper()}
    source, needles = archive, []
    if case == "corrupt byte, sha256 published":
        corrupt_one_byte(archive)
        needles = ["sha256", "is not the published", published["sha256_zip"].lower()]
    elif case == "corrupt byte, no sha256":
        corrupt_one_byte(archive)
        published, needles = {}, ["damaged or not a zip archive", "Bad CRC-32"]
    elif case == "wrong sha256":
        published = {"sha256_zip": "0" * 64}
        needles = ["is not the published 000"]
    elif case == "missing fold":
        needles = ["fold 2 of 2 (SWI-CMB/fold1.tf_inference) is missing from the release"]
    else:
        (release / "SWI-CMB" / "fold0.tf_inference" / "saved_model.pb").write_bytes(b"evil")
        source, needles = release, ["fold 1 of 2 (SWI-CMB/fold0.tf_inference) has md5"]
    register(home, "test-cmb", files, **published)
    assert main(["models", "install", "test-cmb", "--from", str(source)]) == 2
    assert_one_line_error(capsys, str(source), *needles)
    assert models_home_is_empty()


def test_file_tampered_after_install_is_refused_and_removed(home, tmp_path, capsys):
    files = fake_release(tmp_path / "release")
    archive = zip_folder(tmp_path / "release", tmp_path / "release.zip")
    register(home, "test-cmb", files, sha256_zip=sha256(archive))
    assert main(["models", "install", "test-cmb", "--from", str(archive)]) == 0
    assert main(["models", "verify", "test-cmb"]) == 0
    index = models_home() / "test-cmb/SWI-CMB/fold1.tf_inference/variables/variables.index"
    data = index.read_bytes()
    index.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    capsys.readouterr()
    assert main(["models", "verify", "test-cmb"]) == 2
    assert_one_line_error(capsys, "fold 2 of 2 (SWI-CMB/fold1.tf_inference) has md5",
                          "removed the installation",
                          "cmb-workflow models install test-cmb --from <zip>")
    assert models_home_is_empty()


def test_reinstall_replaces_the_earlier_installation(home, tmp_path):
    files = fake_release(tmp_path / "release")
    register(home, "test-cmb", files)
    install_model("test-cmb", tmp_path / "release")
    stray = models_home() / "test-cmb" / "stray.txt"
    stray.write_text("from an earlier installation")
    install_model("test-cmb", tmp_path / "release")
    assert not stray.exists()
    assert sorted(p.name for p in models_home().iterdir()) == ["test-cmb"]


class ReleaseHandler(http.server.BaseHTTPRequestHandler):
    """Serves the server's `body` with HTTP Range support; `cut` bytes only, once, if set."""

    def do_GET(self):
        server = self.server
        server.requests.append(self.headers.get("Range"))
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range",
                             f"bytes {start}-{len(server.body) - 1}/{len(server.body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", server.content_type)
        self.send_header("Content-Length", str(len(server.body) - start))
        self.end_headers()
        payload = server.body[start:]
        if server.cut:
            payload, server.cut = payload[:server.cut], None
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ReleaseHandler)
    httpd.requests, httpd.cut, httpd.content_type = [], None, "application/zip"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def served_release(home, tmp_path, server):
    files = fake_release(tmp_path / "release")
    archive = zip_folder(tmp_path / "release", tmp_path / "release.zip")
    server.body = archive.read_bytes()
    url = f"http://127.0.0.1:{server.server_port}/sharing/release.zip"
    register(home, "test-cmb", files, sha256_zip=sha256(archive), url=url)
    return url


def test_download_shows_progress_checks_and_installs(home, tmp_path, server, capsys):
    served_release(home, tmp_path, server)
    assert main(["models", "install", "test-cmb"]) == 0
    captured = capsys.readouterr()
    assert "test-cmb [" in captured.err and "100%" in captured.err
    assert "installed, every file matches its md5" in captured.out
    assert main(["models", "verify", "test-cmb"]) == 0
    assert not any((home / "downloads").iterdir())  # the archive is not kept


def test_interrupted_download_resumes_with_a_range_request(home, tmp_path, server, capsys):
    served_release(home, tmp_path, server)
    server.cut = len(server.body) // 2
    assert main(["models", "install", "test-cmb"]) == 2
    assert_one_line_error(capsys, "download interrupted", "run the same command again to resume")
    partial = home / "downloads" / "test-cmb.zip.part"
    assert partial.stat().st_size == len(server.body) // 2
    assert models_home_is_empty()
    assert main(["models", "install", "test-cmb"]) == 0
    assert server.requests == [None, f"bytes={len(server.body) // 2}-"]
    assert main(["models", "verify", "test-cmb"]) == 0


def test_download_of_a_damaged_archive_is_refused_and_discarded(home, tmp_path, server, capsys):
    served_release(home, tmp_path, server)
    server.body = server.body[:-1] + bytes([server.body[-1] ^ 1])
    assert main(["models", "install", "test-cmb"]) == 2
    assert_one_line_error(capsys, "is not the published")
    assert models_home_is_empty() and not any((home / "downloads").iterdir())


def test_web_page_instead_of_archive_says_how_to_install_by_hand(home, tmp_path, server, capsys):
    url = served_release(home, tmp_path, server)
    server.content_type, server.body = "text/html; charset=utf-8", b"<html>log in</html>"
    assert main(["models", "install", "test-cmb"]) == 2
    assert_one_line_error(capsys, f"{url} answered with a web page",
                          "cmb-workflow models install test-cmb --from <downloaded zip>")
    assert models_home_is_empty()


def test_unreachable_host_says_how_to_install_by_hand(home, tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    register(home, "test-cmb", fake_release(tmp_path / "release"),
             url=f"http://127.0.0.1:{port}/release.zip")
    assert main(["models", "install", "test-cmb"]) == 2
    assert_one_line_error(capsys, "cannot reach 127.0.0.1",
                          "cmb-workflow models install test-cmb --from <downloaded zip>")
    assert models_home_is_empty()


def test_provenance_names_the_bundled_model_and_no_local_path(tmp_path):
    folder = tmp_path / "anywhere"
    folder.mkdir()
    published = known_models()["swi-cmb-v2"].descriptor
    shutil.copyfile(published, folder / published.name)
    for entry in json.loads(published.read_text())["files"]:
        (folder / entry["name"]).mkdir(parents=True)  # read_descriptor needs them to exist
    provenance = model_provenance(read_descriptor(folder / published.name))
    assert provenance["Name"] == "swi-cmb-v2" and provenance["Version"] == "v2"
    assert provenance["License"] == "CC BY-NC-SA 4.0"
    assert provenance["URL"] == "https://cloud.efixia.com/sharing/hwR97APpm"
    assert provenance["Files"][1] == {
        "Name": "SWI-CMB/20250129-195344_ResUnet3D-8.9.2-1.5-SWAN.CMB_prod2_fold_1_bestvalloss"
                ".tf_inference", "MD5": "23fd23c83a9b30fe6dab7bef5f3277ce"}
    assert str(tmp_path) not in json.dumps(provenance)


def test_provenance_of_an_unknown_descriptor(tmp_path):
    files = fake_release(tmp_path)
    (tmp_path / "model_info_mine.json").write_text(json.dumps({"version": "3", "files": files}))
    provenance = model_provenance(read_descriptor(tmp_path / "model_info_mine.json"))
    assert (provenance["Name"], provenance["License"]) == ("model_info_mine", "unknown")


def test_release_zip_of_a_real_ensemble_installs_verifies_and_loads_by_name(
        home, savedmodel_models, tmp_path, capsys):
    """Acceptance: a SHIVA-format (v2 layout) ensemble, zipped as released, used by name."""
    root = savedmodel_models.parent.parent
    archive = zip_folder(root, tmp_path / "release.zip")
    register(home, "test-cmb", json.loads(savedmodel_models.read_text())["files"],
             sha256_zip=sha256(archive))
    assert main(["models", "install", "test-cmb", "--from", str(archive)]) == 0
    assert main(["models", "verify", "test-cmb"]) == 0
    descriptor = resolve_descriptor("test-cmb")
    assert descriptor.is_relative_to(models_home())
    ensemble = load_ensemble(descriptor)
    assert len(ensemble.folds) == 2
    assert all(model_file.path.is_relative_to(models_home() / "test-cmb")
               for model_file in ensemble.descriptor.files)


def test_list_install_and_verify_never_import_tensorflow(home, tmp_path):
    register(home, "test-cmb", fake_release(tmp_path / "release"))
    commands = [["list"], ["install", "test-cmb", "--from", str(tmp_path / "release")],
                ["verify", "test-cmb"]]
    script = (
        "import sys\n"
        "from cmb_workflow.cli import main\n"
        f"for command in {commands!r}:\n"
        "    assert main(['models', *command]) == 0\n"
        "print('TF_IMPORTED', 'tensorflow' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert "TF_IMPORTED False" in result.stdout
