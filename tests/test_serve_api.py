"""`ipl serve` through its API (gradio_client), every endpoint with good and bad input, and the path rules."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from ipltool.errors import UsageError

gradio = pytest.importorskip("gradio", reason="the serve extra (gradio) is not installed")
from gradio_client import Client, handle_file

pytestmark = pytest.mark.xdist_group("serve")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, ipl_at):
    """(client, studio, root): a smoke studio on a free port with one finished disney run."""
    from ipltool.serve.app import launch
    from ipltool.serve.studio import Studio, StudioConfig

    root = tmp_path_factory.mktemp("serve")
    assert ipl_at(root, "--quiet", "adapt", "--domain", "disney", "--smoke", "--steps", "2", "--out", str(root / "runs")) == 0
    from skimage import data

    Image.fromarray(data.astronaut()).save(root / "astronaut.png")
    Image.new("RGB", (256, 256), (128, 128, 128)).save(root / "grey.png")
    (root / "secret.txt").write_text("not for the page")
    studio = Studio(StudioConfig(runs=root / "runs", work=root / "work", smoke=True))
    port = _free_port()
    app = launch(studio, port=port, block=False)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), studio, root
    finally:
        app.close()


def _key(studio) -> str:
    (entry,) = [e for e in studio.generators() if e.key.startswith("run:disney-")]
    return entry.key


def test_stylize_shows_every_stage_and_no_face_is_a_message(served):
    client, studio, root = served
    message, aligned, reconstruction, stylized, pasted, downloads = client.predict(
        handle_file(str(root / "astronaut.png")), [_key(studio)], 1.0, api_name="/stylize"
    )
    assert "face(s) found" in message
    assert Image.open(aligned).size == Image.open(reconstruction).size == (32, 32)  # the tiny generator's size
    assert [item["caption"] for item in stylized] == ["disney"] and Image.open(stylized[0]["image"]).size == (32, 32)
    assert Image.open(pasted[0]["image"]).size == (512, 512)  # the photo, with the face put back
    assert len(downloads) == 4
    message, *rest = client.predict(handle_file(str(root / "grey.png")), [_key(studio)], 1.0, api_name="/stylize")
    assert message.startswith("No face found") and rest[0] is None


def test_stylize_refuses_bad_input_and_keeps_serving(served):
    client, studio, root = served
    bad_file = root / "broken.png"
    bad_file.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bomb = root / "bomb.png"  # a small file that decodes to 225 Mpx
    Image.new("1", (15000, 15000)).save(bomb)
    huge = root / "huge.png"  # over the upload limit
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(21 * 2**20))
    cases = [
        ((handle_file(str(root / "astronaut.png")), [], 1.0), "choose at least one generator"),
        ((handle_file(str(root / "astronaut.png")), [_key(studio)], 5.0), "maximum value 2"),
        ((handle_file(str(bad_file)), [_key(studio)], 1.0), "cannot identify image file"),
        ((handle_file(str(bomb)), [_key(studio)], 1.0), "decompression bomb"),
        ((handle_file(str(huge)), [_key(studio)], 1.0), "too large|exceeds|maximum"),
        ((None, [_key(studio)], 1.0), "upload a photo"),
    ]
    for args, message in cases:
        with pytest.raises(Exception, match=message):
            client.predict(*args, api_name="/stylize")
    assert "face(s) found" in client.predict(handle_file(str(root / "astronaut.png")), [_key(studio)], 1.0, api_name="/stylize")[0]


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/passwd", "run:../../secret.txt", "file:../secret.txt", "run:" + "/" * 3 + "etc"])
def test_no_field_reaches_a_path_outside_the_studio_folders(served, name):
    client, _, root = served
    photo = handle_file(str(root / "astronaut.png"))
    calls = [
        ((photo, [name], 1.0), "/stylize", "unknown generator"),
        (("0", [name], 0.7, 1.0), "/explore", "unknown generator"),
        ((0, 1, [name], 0.7, 4), "/interpolate", "unknown generator"),
        ((name,), "/run_details", "unknown run"),
        ((name,), "/domain_text", "unknown domain|not in the list of choices"),
    ]
    for args, endpoint, message in calls:
        with pytest.raises(Exception, match=message):
            client.predict(*args, api_name=endpoint)
    # A domain file naming a weights path is refused before anything loads it.
    text = client.predict("disney", api_name="/domain_text")[0]
    for path in (name, str(root / "secret.txt")):
        edited = text.replace('generator = "stylegan2-ffhq-1024"', f'generator = "{path}"')
        assert edited != text
        assert client.predict(edited, api_name="/validate").startswith("❌")
        with pytest.raises(Exception, match="generator"):
            client.predict(edited, api_name="/start_adapt")
    # Gradio serves only the studio's files.
    import httpx

    for path in (root / "secret.txt", Path("/etc/passwd")):
        assert httpx.get(f"{client.src.rstrip('/')}/gradio_api/file={path}").status_code in (403, 404)


def test_explore_grid_and_seed_checks(served):
    client, studio, _ = served
    grid = client.predict("0-2", [_key(studio)], 0.7, 1.0, api_name="/explore")
    from ipltool.figures import grid_layout

    assert Image.open(grid).size == grid_layout(3, 2, 128, ["seed0000", "seed0001", "seed0002"], ["source", "disney"]).size
    for seeds, message in (("0-99", "at most 16"), ("x", "--seeds"), ("3-1", "goes down")):
        with pytest.raises(Exception, match=message):
            client.predict(seeds, [_key(studio)], 0.7, 1.0, api_name="/explore")
    with pytest.raises(Exception, match="maximum value 1"):
        client.predict("0", [_key(studio)], 3.0, 1.0, api_name="/explore")


def test_interpolation_is_a_looping_gif(served):
    client, studio, _ = served
    walk = client.predict(0, 1, [_key(studio)], 0.7, 4, api_name="/interpolate")
    with Image.open(walk) as picture:
        assert picture.n_frames == 8  # 4 frames there, 4 back
    with pytest.raises(Exception, match="maximum value 60"):
        client.predict(0, 1, [_key(studio)], 0.7, 500, api_name="/interpolate")
    with pytest.raises(UsageError, match="frames"):  # the studio's own check, for scripts that bypass the slider
        studio.interpolate(0, 1, [_key(studio)], 0.7, 500)


def test_adapt_validate_start_watch_and_stop(served):
    client, studio, _ = served
    text, _ = client.predict("disney", api_name="/domain_text")
    assert 'name = "disney"' in text
    assert client.predict(text, api_name="/validate").startswith("✅")
    check = client.predict(text.replace("[adapt]", "[adapt]\nstepz = 3"), api_name="/validate")
    assert check.startswith("❌") and "stepz" in check
    with pytest.raises(Exception, match="stepz"):
        client.predict(text.replace("[adapt]", "[adapt]\nstepz = 3"), api_name="/start_adapt")
    before = {r.key for r in studio.runs()}
    message, *_ = client.predict(text, api_name="/start_adapt")
    assert message.startswith("job ")
    assert studio.jobs.wait_idle(120)
    jobs = client.predict(api_name="/jobs")[0]
    latest = jobs["data"][0]
    assert latest[2] == "done", latest
    new = {r.key for r in studio.runs()} - before
    assert len(new) == 1 and latest[7] == next(iter(new))
    with pytest.raises(Exception, match="no adaptation job"):
        client.predict(999, api_name="/stop_adapt")
    # The new run is listed, with its config and sample grids.
    config, samples, metrics = client.predict(next(iter(new)), api_name="/run_details")
    assert 'name = "disney"' in config and samples and "no `ipl eval`" in metrics
    rows = client.predict(api_name="/runs")["data"]
    assert next(iter(new)) in [row[0] for row in rows]


def test_a_stopped_job_saves_its_state_like_ctrl_c(served):
    _, studio, _ = served
    from ipltool.domain import load_domain
    from ipltool.train.setup import SMOKE_OVERRIDES

    domain = load_domain("disney").with_overrides({**SMOKE_OVERRIDES, "adapt.steps": 200, "adapt.sample_every": 1000}).resolved()
    job = studio.jobs.submit(domain)
    deadline = time.monotonic() + 60
    while job.step < 2 and time.monotonic() < deadline:  # well into stage 2 (or stage 1)
        time.sleep(0.05)
    studio.stop_job(job.id)
    assert studio.jobs.wait_idle(60)
    assert job.state == "stopped" and "ipl adapt --resume" in job.message
    assert job.run is not None and (job.run / "state.pt").is_file()


def test_random_seeds_are_four_seeds_the_explore_tab_takes(served):
    client, studio, _ = served
    from ipltool.render.seeds import parse_seeds

    seeds = parse_seeds(client.predict(api_name="/random_seeds"))
    assert 1 <= len(seeds) <= 4 and all(0 <= s < 100_000 for s in seeds)


def test_auth_and_host_warning(served, tmp_path, run_cli):
    from ipltool.commands.serve import _auth, _loopback
    from ipltool.serve.app import launch

    _, studio, _ = served
    assert _loopback("127.0.0.1") and _loopback("localhost") and _loopback("::1") and not _loopback("0.0.0.0")
    assert _auth("me:se:cret") == ("me", "se:cret")
    code, _, err = run_cli("serve", "--auth", "nocolon")
    assert code == 2 and "USER:PASSWORD" in err
    port = _free_port()
    app = launch(studio, port=port, auth=("me", "secret"), block=False)
    try:
        with pytest.raises(Exception, match="credentials were not provided"):
            Client(f"http://127.0.0.1:{port}/", verbose=False).predict(api_name="/random_seeds")
        client = Client(f"http://127.0.0.1:{port}/", auth=("me", "secret"), verbose=False)
        assert client.predict(api_name="/random_seeds")
    finally:
        app.close()


def test_every_page_action_is_an_api_endpoint(served):
    client, _, _ = served
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    expected = {"/stylize", "/explore", "/interpolate", "/random_seeds", "/domain_text", "/validate", "/start_adapt", "/stop_adapt", "/jobs", "/run_details", "/runs", "/refresh"}
    assert expected <= names, expected - names
