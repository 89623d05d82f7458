"""ipltool.download against a real HTTP server on 127.0.0.1: resume, retries, mirrors, Drive pages."""

from __future__ import annotations

import hashlib
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from ipltool import download as dl

DATA = random.Random(0).randbytes(300_000)
DIGEST = hashlib.sha256(DATA).hexdigest()
FILE_ID = "1AbC-dEf_123"


# ---------------------------------------------------------------------------
# A tiny server: each test installs route functions, the server records every request.


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        app = self.server.app
        parts = urlsplit(self.path)
        app.requests.append((parts.path, parse_qs(parts.query), self.headers.get("Range"), self.headers.get("Cookie")))
        route = app.routes.get(parts.path)
        if route is None:
            self.send_error(404)
        else:
            route(self, parse_qs(parts.query))

    def log_message(self, *args):
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients that time out on purpose leave broken pipes behind


class App:
    """Routes (path -> fn(handler, query)) and the log of (path, query, Range, Cookie)."""

    def __init__(self, port: int):
        self.port = port
        self.routes: dict = {}
        self.requests: list = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ranges(self, path: str) -> list:
        return [r for p, _, r, _ in self.requests if p == path]


@pytest.fixture
def server():
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    httpd.app = App(httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield httpd.app
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def sleeps(monkeypatch):
    """Replace the module's sleep; returns the list of requested delays."""
    calls: list[float] = []
    monkeypatch.setattr(dl, "sleep", calls.append)
    return calls


def send_file(h, data=DATA, honor_range=True, cut_at=None, content_type="application/octet-stream", length=True):
    """Answer with `data`, honouring `Range: bytes=N-`; `cut_at` closes the body early."""
    m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
    start = int(m.group(1)) if m and honor_range else 0
    if start >= len(data) and m and honor_range:
        h.send_response(416)
        h.send_header("Content-Range", f"bytes */{len(data)}")
        h.send_header("Content-Length", "0")
        h.end_headers()
        return
    h.send_response(206 if start else 200)
    h.send_header("Content-Type", content_type)
    if length:
        h.send_header("Content-Length", str(len(data) - start))
    if start:
        h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    h.end_headers()
    h.wfile.write(data[start:cut_at])
    h.wfile.flush()


def send_html(h, page: str, status=200, cookie=None):
    body = page.encode()
    h.send_response(status)
    h.send_header("Content-Type", "text/html; charset=utf-8")
    h.send_header("Content-Length", str(len(body)))
    if cookie:
        h.send_header("Set-Cookie", cookie)
    h.end_headers()
    h.wfile.write(body)


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def serve(app, path="/f.pt", **kw):
    app.routes[path] = lambda h, q: send_file(h, **kw)
    return app.url(path)


# ---------------------------------------------------------------------------
# Plain HTTP.


def test_good_file(server, tmp_path):
    url = serve(server)
    seen = []
    dest = tmp_path / "models" / "g.pt"  # parent is created
    digest = dl.download(
        [url], dest, sha256={DIGEST.upper()}, size=len(DATA), progress=lambda *a: seen.append(a), chunk_size=64 << 10
    )
    assert digest == DIGEST == dl.sha256_file(dest)
    assert dest.read_bytes() == DATA
    assert seen[0] == (0, len(DATA)) and seen[-1] == (len(DATA), len(DATA))
    assert listing(dest.parent) == ["g.pt"]


def test_wrong_checksum_deletes_everything(server, tmp_path):
    url = serve(server)
    with pytest.raises(dl.ChecksumError) as e:
        dl.download([url], tmp_path / "g.pt", sha256={"0" * 64})
    assert "0" * 64 in e.value.message and DIGEST in e.value.message and "deleted" in e.value.message
    assert listing(tmp_path) == []


def test_size_mismatch_is_a_checksum_error(server, tmp_path):
    # Announced by Content-Length: caught before the body is read.
    with pytest.raises(dl.ChecksumError, match=f"server has {len(DATA)} bytes, expected {len(DATA) - 1}"):
        dl.download([serve(server)], tmp_path / "g.pt", size=len(DATA) - 1)
    assert listing(tmp_path) == []
    # No Content-Length: caught after the body.
    with pytest.raises(dl.ChecksumError, match=f"expected {len(DATA) - 1} bytes, got {len(DATA)}"):
        dl.download([serve(server, "/nolen.pt", length=False)], tmp_path / "g.pt", size=len(DATA) - 1)
    assert listing(tmp_path) == []


def test_checksum_mismatch_falls_back_to_next_mirror(server, tmp_path):
    bad = serve(server, "/bad.pt", data=DATA[::-1])
    good = serve(server, "/good.pt")
    assert dl.download([bad, good], tmp_path / "g.pt", sha256={DIGEST}) == DIGEST
    assert listing(tmp_path) == ["g.pt"]


def test_dropped_connection_resumes_with_range(server, tmp_path, sleeps):
    calls = []

    def route(h, q):
        calls.append(1)
        send_file(h, cut_at=len(DATA) // 2 if len(calls) == 1 else None)

    server.routes["/f.pt"] = route
    dest = tmp_path / "g.pt"
    assert dl.download([server.url("/f.pt")], dest, sha256={DIGEST}, chunk_size=32 << 10) == DIGEST
    first, second = server.ranges("/f.pt")
    assert first is None and (n := int(re.fullmatch(r"bytes=(\d+)-", second).group(1))) > 0
    assert n <= len(DATA) // 2
    assert dest.read_bytes() == DATA and listing(tmp_path) == ["g.pt"]
    assert sleeps == [1.0]


def test_drops_exhaust_retries_keep_part_then_next_run_resumes(server, tmp_path, sleeps):
    server.routes["/f.pt"] = lambda h, q: send_file(h, cut_at=len(DATA) // 2 if not h.headers.get("Range") else 0)
    dest = tmp_path / "g.pt"
    with pytest.raises(dl.DownloadError, match="gave up after 3 tries") as e:
        dl.download([server.url("/f.pt")], dest, retries=2, name="stylegan2-ffhq-1024")
    assert "ipl fetch --import stylegan2-ffhq-1024 FILE" in e.value.hint
    assert sleeps == [1.0, 2.0]
    assert listing(tmp_path) == ["g.pt.part"]  # resumable, and nothing under the final name
    assert (tmp_path / "g.pt.part").read_bytes() == DATA[: len(DATA) // 2]

    serve(server)
    assert dl.download([server.url("/f.pt")], dest, sha256={DIGEST}) == DIGEST
    assert server.ranges("/f.pt")[-1] == f"bytes={len(DATA) // 2}-"
    assert listing(tmp_path) == ["g.pt"]


def test_500_twice_then_success_with_backoff(server, tmp_path, sleeps):
    calls = []

    def route(h, q):
        calls.append(1)
        if len(calls) <= 2:
            h.send_error(500)
        else:
            send_file(h)

    server.routes["/f.pt"] = route
    assert dl.download([server.url("/f.pt")], tmp_path / "g.pt", sha256={DIGEST}, backoff=0.5) == DIGEST
    assert sleeps == [0.5, 1.0]
    assert listing(tmp_path) == ["g.pt"]


def test_timeout_is_retried(server, tmp_path, sleeps):
    calls = []

    def route(h, q):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)  # longer than the client's timeout
        send_file(h)

    server.routes["/f.pt"] = route
    assert dl.download([server.url("/f.pt")], tmp_path / "g.pt", timeout=0.3) == DIGEST
    assert sleeps == [1.0]


def test_404_lists_url_and_moves_to_next_mirror(server, tmp_path, sleeps):
    missing = server.url("/missing.pt")
    with pytest.raises(dl.DownloadError) as e:
        dl.download([missing], tmp_path / "g.pt")
    assert "404" in e.value.message and missing in e.value.message
    assert sleeps == [] and listing(tmp_path) == []

    good = serve(server)
    assert dl.download([missing, good], tmp_path / "g.pt", sha256={DIGEST}) == DIGEST
    assert sleeps == [] and listing(tmp_path) == ["g.pt"]


def test_all_mirrors_fail_lists_each(server, tmp_path, sleeps, monkeypatch):
    monkeypatch.setattr(dl, "GDRIVE_URL", server.url("/uc"))
    server.routes["/uc"] = lambda h, q: h.send_error(403)
    missing = server.url("/missing.pt")
    with pytest.raises(dl.DownloadError) as e:
        dl.download([f"gdrive:{FILE_ID}", missing], tmp_path / "g.pt", name="afhqdog")
    msg = e.value.message
    assert f"gdrive:{FILE_ID}: 403 Forbidden (Drive quota or permission?)" in msg
    assert f"{missing}: 404 Not Found" in msg
    assert "\n" not in msg and "ipl fetch --import afhqdog FILE" in e.value.hint


def test_server_ignoring_range_replaces_stale_part(server, tmp_path):
    url = serve(server, honor_range=False)
    (tmp_path / "g.pt.part").write_bytes(b"stale" * 10_000)
    assert dl.download([url], tmp_path / "g.pt", sha256={DIGEST}) == DIGEST
    assert server.ranges("/f.pt") == ["bytes=50000-"]
    assert listing(tmp_path) == ["g.pt"]


def test_416_restarts_from_zero(server, tmp_path):
    url = serve(server)
    (tmp_path / "g.pt.part").write_bytes(b"x" * (len(DATA) + 10))  # longer than the file
    assert dl.download([url], tmp_path / "g.pt", sha256={DIGEST}) == DIGEST
    assert server.ranges("/f.pt") == [f"bytes={len(DATA) + 10}-", None]
    assert listing(tmp_path) == ["g.pt"]


def test_part_from_earlier_run_is_resumed(server, tmp_path):
    url = serve(server)
    (tmp_path / "g.pt.part").write_bytes(DATA[:100_000])
    seen = []
    assert dl.download([url], tmp_path / "g.pt", sha256={DIGEST}, progress=lambda d, t: seen.append(d)) == DIGEST
    assert server.ranges("/f.pt") == ["bytes=100000-"]
    assert seen[0] == 100_000 and seen[-1] == len(DATA)
    assert listing(tmp_path) == ["g.pt"]


def test_foreign_part_is_redownloaded_once_from_zero(server, tmp_path):
    url = serve(server)
    (tmp_path / "g.pt.part").write_bytes(bytes(100_000))  # right length, wrong bytes
    assert dl.download([url], tmp_path / "g.pt", sha256={DIGEST}) == DIGEST
    assert server.ranges("/f.pt") == ["bytes=100000-", None]
    assert listing(tmp_path) == ["g.pt"]


def test_complete_part_is_verified_without_a_request(server, tmp_path):
    url = serve(server)
    (tmp_path / "g.pt.part").write_bytes(DATA)
    assert dl.download([url], tmp_path / "g.pt", sha256={DIGEST}, size=len(DATA)) == DIGEST
    assert server.requests == [] and listing(tmp_path) == ["g.pt"]


# ---------------------------------------------------------------------------
# Google Drive interstitials.

VIRUS_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<div class="uc-main"><p class="uc-warning-subcaption"><span class="uc-name-size">
<a href="/open?id={id}">g.pt</a> (364M)</span> is too large for Google to scan for viruses.</p>
<form id="download-form" action="{action}" method="get">
<input type="submit" id="uc-download-link" value="Download anyway"/>
<input type="hidden" name="id" value="{id}"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="5e1f-uuid">
</form></div></body></html>"""


@pytest.fixture
def drive(server, monkeypatch):
    monkeypatch.setattr(dl, "GDRIVE_URL", server.url("/uc"))
    return server


def test_gdrive_virus_scan_form(drive, tmp_path):
    drive.routes["/uc"] = lambda h, q: send_html(h, VIRUS_PAGE.format(id=q["id"][0], action=drive.url("/download")))

    def real(h, q):
        ok = q == {"id": [FILE_ID], "export": ["download"], "confirm": ["t"], "uuid": ["5e1f-uuid"]}
        send_file(h) if ok else h.send_error(400)

    drive.routes["/download"] = real
    assert dl.download([f"gdrive:{FILE_ID}"], tmp_path / "g.pt", sha256={DIGEST}) == DIGEST
    assert drive.requests[0][1] == {"id": [FILE_ID], "export": ["download"]}
    assert listing(tmp_path) == ["g.pt"]


def test_gdrive_form_with_resumed_part(drive, tmp_path):
    drive.routes["/uc"] = lambda h, q: send_html(h, VIRUS_PAGE.format(id=FILE_ID, action=drive.url("/download")))
    drive.routes["/download"] = lambda h, q: send_file(h)
    (tmp_path / "g.pt.part").write_bytes(DATA[:100_000])
    assert dl.download([f"gdrive:{FILE_ID}"], tmp_path / "g.pt", sha256={DIGEST}) == DIGEST
    assert drive.ranges("/download") == ["bytes=100000-"]  # the HTML page did not clobber the part
    assert listing(tmp_path) == ["g.pt"]


def test_gdrive_confirm_link_with_cookie(drive, tmp_path):
    def uc(h, q):
        if "confirm" in q and "download_warning=tok" in (h.headers.get("Cookie") or ""):
            send_file(h)
        else:
            link = f'<a id="uc-download-link" href="/uc?export=download&amp;confirm=tok&amp;id={FILE_ID}">Download</a>'
            send_html(h, f"<html><body>{link}</body></html>", cookie="download_warning=tok; Path=/")

    drive.routes["/uc"] = uc
    assert dl.download([f"gdrive:{FILE_ID}"], tmp_path / "g.pt", sha256={DIGEST}) == DIGEST


def test_gdrive_download_url_json(drive, tmp_path):
    target = drive.url(f"/download?id={FILE_ID}&confirm=t").replace("=", "\\u003d").replace("&", "\\u0026")
    page = f'<html><script>var d = {{"downloadUrl":"{target}"}};</script></html>'
    drive.routes["/uc"] = lambda h, q: send_html(h, page)
    drive.routes["/download"] = lambda h, q: send_file(h) if q.get("confirm") == ["t"] else h.send_error(400)
    assert dl.download([f"gdrive:{FILE_ID}"], tmp_path / "g.pt", sha256={DIGEST}) == DIGEST


def test_gdrive_error_page(drive, tmp_path, sleeps):
    text = "Too many users have viewed or downloaded this file recently"
    page = (f'<html><title>Google Drive - Quota exceeded</title><p class="uc-error-caption">Sorry</p>'
            f'<p class="uc-error-subcaption">{text}. Please try again later.</p></html>')
    drive.routes["/uc"] = lambda h, q: send_html(h, page)
    with pytest.raises(dl.DownloadError) as e:
        dl.download([f"gdrive:{FILE_ID}"], tmp_path / "g.pt")
    assert text in e.value.message and not isinstance(e.value, dl.ChecksumError)
    assert listing(tmp_path) == []


def test_html_without_confirmation_is_never_saved(server, tmp_path):
    server.routes["/f.pt"] = lambda h, q: send_html(h, "<!DOCTYPE html><html><body>Sign in</body></html>")
    # The same page served with a binary content type is still caught by sniffing.
    server.routes["/g.pt"] = lambda h, q: send_file(h, data=b"<!DOCTYPE html><html>Sign in</html>")
    with pytest.raises(dl.DownloadError) as e:
        dl.download([server.url("/f.pt"), server.url("/g.pt")], tmp_path / "g.pt")
    assert e.value.message.count("got an HTML page instead of the file") == 2
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------
# No network.


def test_connection_refused_says_no_network(tmp_path, sleeps):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError) as e:
        dl.download([f"http://127.0.0.1:{port}/g.pt"], tmp_path / "g.pt", name="clip-vit-b-32")
    assert "no network" in e.value.message and "connection refused" in e.value.message
    assert "internet connection" in e.value.hint
    assert sleeps == [] and time.monotonic() - t0 < 2
    assert listing(tmp_path) == []


def test_dns_failure_says_no_network(tmp_path, sleeps, monkeypatch):
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(dl.DownloadError, match="no network: cannot resolve host"):
        dl.download(["https://example.invalid/g.pt"], tmp_path / "g.pt")
    assert sleeps == []


# ---------------------------------------------------------------------------
# Slow links: the low-speed deadline, the budget, and nothing received is thrown away.


def trickle(h, fast=0, pause=0.1, limit=5.0):
    """Like `send_file`, but after `fast` bytes one byte every `pause` s (for at most `limit` s)."""
    m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
    start = int(m.group(1)) if m else 0
    h.send_response(206 if start else 200)
    h.send_header("Content-Type", "application/octet-stream")
    h.send_header("Content-Length", str(len(DATA) - start))
    if start:
        h.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
    h.end_headers()
    h.wfile.write(DATA[start : start + fast])
    h.wfile.flush()
    end = time.monotonic() + limit
    for i in range(start + fast, len(DATA)):
        if time.monotonic() > end:
            break
        time.sleep(pause)
        h.wfile.write(DATA[i : i + 1])
        h.wfile.flush()


@pytest.fixture
def fast_deadline(monkeypatch):
    """A stall is under 1000 B/s over 0.5 s, so a test sees one in about a second."""
    monkeypatch.setenv("IPL_DOWNLOAD_MIN_SPEED", "1000")
    monkeypatch.setenv("IPL_DOWNLOAD_STALL_SECONDS", "0.5")


def test_trickle_is_a_stall_resumed_from_every_byte_kept(server, tmp_path, sleeps, fast_deadline):
    def route(h, q):
        trickle(h, fast=100_000) if not h.headers.get("Range") else send_file(h)

    server.routes["/f.pt"] = route
    t0 = time.monotonic()
    assert dl.download([server.url("/f.pt")], tmp_path / "g.pt", sha256={DIGEST}) == DIGEST
    assert time.monotonic() - t0 < 5
    first, second = server.ranges("/f.pt")
    # The burst and the trickled bytes after it were all kept: the resume starts past them.
    assert first is None and int(re.fullmatch(r"bytes=(\d+)-", second).group(1)) > 100_000
    assert sleeps == [1.0]  # the burst was progress: a fresh retry, not a step towards giving up
    assert listing(tmp_path) == ["g.pt"]


def test_a_link_that_never_recovers_gives_up_keeping_the_part(server, tmp_path, sleeps, fast_deadline):
    server.routes["/f.pt"] = lambda h, q: trickle(h, fast=0 if h.headers.get("Range") else 50_000)
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError) as e:
        dl.download([server.url("/f.pt")], tmp_path / "g.pt", retries=2, name="stylegan2-ffhq-1024")
    assert time.monotonic() - t0 < 6
    part = (tmp_path / "g.pt.part").read_bytes()
    assert len(part) > 50_000 and part == DATA[: len(part)]
    msg = e.value.message
    assert "\n" not in msg and "stalled" in msg and f"127.0.0.1:{server.port}" in msg and "B/s" in msg
    assert "gave up after 3 tries in a row" in msg and f"{len(part)} bytes kept in {tmp_path / 'g.pt.part'}" in msg
    assert e.value.hint.startswith("run `ipl fetch stylegan2-ffhq-1024` again to continue from them")
    assert listing(tmp_path) == ["g.pt.part"]

    serve(server)  # the link is back: the next run resumes from the part
    assert dl.download([server.url("/f.pt")], tmp_path / "g.pt", sha256={DIGEST}) == DIGEST
    assert server.ranges("/f.pt")[-1] == f"bytes={len(part)}-"


def test_time_budget_ends_a_slow_but_steady_download(server, tmp_path, sleeps, monkeypatch):
    monkeypatch.setenv("IPL_DOWNLOAD_MIN_SPEED", "0")  # no stall: only the budget can end it
    monkeypatch.setenv("IPL_DOWNLOAD_MAX_SECONDS", "1")
    server.routes["/f.pt"] = lambda h, q: trickle(h, fast=1000, pause=0.05)
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError) as e:
        dl.download([server.url("/f.pt")], tmp_path / "g.pt", name="e4e-ffhq")
    assert time.monotonic() - t0 < 3
    kept = (tmp_path / "g.pt.part").stat().st_size
    assert kept > 1000 and "out of time" in e.value.message and "1 s budget" in e.value.message
    assert "ipl fetch e4e-ffhq" in e.value.hint


def test_requests_per_mirror_are_capped(server, tmp_path, sleeps, monkeypatch):
    monkeypatch.setattr(dl, "MAX_ATTEMPTS", 3)
    server.routes["/f.pt"] = lambda h, q: h.send_error(503)
    with pytest.raises(dl.DownloadError, match="gave up after 3 requests"):
        dl.download([server.url("/f.pt")], tmp_path / "g.pt", retries=10)
    assert len(server.requests) == 3 and sleeps == [1.0, 2.0]


def test_bytes_buffered_before_a_timeout_are_kept(server, tmp_path, sleeps):
    """A read waiting for a full chunk used to lose what it had buffered when the link went quiet."""
    def route(h, q):
        if h.headers.get("Range"):
            return send_file(h)
        h.send_response(200)
        h.send_header("Content-Length", str(len(DATA)))
        h.end_headers()
        h.wfile.write(DATA[:100_000])
        h.wfile.flush()
        time.sleep(1.0)  # silent for longer than the client's timeout

    server.routes["/f.pt"] = route
    assert dl.download([server.url("/f.pt")], tmp_path / "g.pt", sha256={DIGEST}, timeout=0.3) == DIGEST
    assert server.ranges("/f.pt") == [None, "bytes=100000-"]


def test_a_bad_setting_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("IPL_DOWNLOAD_STALL_SECONDS", "soon")
    with pytest.raises(dl.DownloadError, match="IPL_DOWNLOAD_STALL_SECONDS must be a number, not 'soon'"):
        dl.download(["http://127.0.0.1:9/g.pt"], tmp_path / "g.pt")
