"""Resumable, verified downloads of large pretrained files from a list of mirrors.

`download()` streams the first mirror that works into `<dest>.part`, resumes that
file with a `Range` request after a dropped connection (or on the next run), checks
size and SHA-256, and only then moves it to `dest` with an atomic rename. A URL is
`http(s)://...` or `gdrive:<FILE_ID>` (Google Drive).

Drive answers files above ~100 MB with an HTML "virus scan warning" page instead
of the bytes; this module parses that page and follows its confirmation (a form, a
link or a `downloadUrl` field). `gdown` does the same, but it cannot resume a
partial file or report progress through our callback, which is why the
confirmation step lives here. Only the standard library is used.

A download never hangs: an attempt that receives fewer than `MIN_SPEED` bytes/s over
`STALL_SECONDS` (a server trickling a byte now and then never trips the socket timeout)
is a stall, retried with `Range` from what arrived; each mirror gets at most
`MAX_ATTEMPTS` requests and the whole call at most `MAX_SECONDS`. Every byte received is
in the part file before a retry, and a failed download keeps it for the next run. The
environment variables `IPL_DOWNLOAD_MIN_SPEED`, `IPL_DOWNLOAD_STALL_SECONDS`,
`IPL_DOWNLOAD_ATTEMPTS` and `IPL_DOWNLOAD_MAX_SECONDS` override these four.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path
from urllib.parse import quote, urlencode, urljoin, urlsplit

from ipltool import __version__
from ipltool.atomic import fsync_dir
from ipltool.errors import IplError

GDRIVE_URL = "https://drive.google.com/uc"  # `gdrive:<ID>` becomes GDRIVE_URL?id=<ID>&export=download
USER_AGENT = f"ipltool/{__version__} (python-urllib)"

# Looked up at call time, so tests can replace it with a no-op.
sleep = time.sleep

_MAX_HTML = 1 << 20  # a Drive interstitial is a few kB; never buffer more than this
_MAX_CONFIRMS = 3  # confirmation pages followed per request before giving up
_SNIFF = 512  # bytes looked at to tell an HTML page from the file
_HTML_STARTS = (b"<!doctype html", b"<html")

#: Low-speed deadline: fewer than MIN_SPEED bytes/s over STALL_SECONDS ends the attempt as a
#: stall (0 turns the speed check off; a silent server still hits `timeout`).
MIN_SPEED = 1024.0
STALL_SECONDS = 30.0
#: Budget: requests per mirror in all, and seconds for the whole download (0: no limit).
MAX_ATTEMPTS = 30
MAX_SECONDS = 0.0
_ENV = {
    "min_speed": "IPL_DOWNLOAD_MIN_SPEED",
    "stall_seconds": "IPL_DOWNLOAD_STALL_SECONDS",
    "max_attempts": "IPL_DOWNLOAD_ATTEMPTS",
    "max_seconds": "IPL_DOWNLOAD_MAX_SECONDS",
}


class DownloadError(IplError):
    """No mirror delivered the file; the message lists each URL and why."""


class ChecksumError(DownloadError):
    """The downloaded bytes have the wrong size or SHA-256 (the download was deleted)."""


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks.

    Args:
        path: the file to hash.
        chunk_size: bytes read at a time.

    Returns:
        The lowercase hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def download(
    urls: list[str],
    dest: Path,
    sha256: set[str] | frozenset[str] = frozenset(),
    size: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 30.0,
    chunk_size: int = 1 << 20,
    *,
    name: str | None = None,
    min_speed: float | None = None,
    stall_seconds: float | None = None,
    max_attempts: int | None = None,
    max_seconds: float | None = None,
) -> str:
    """Download the first working mirror of `urls` to `dest`; return the sha256 hex of the file.

    Steps, per mirror in order:
      1. Request the URL (`gdrive:<ID>` via `GDRIVE_URL`), with `Range: bytes=N-` when
         `<dest>.part` already holds N bytes. A 200 answer restarts from 0, so does a 416.
      2. If an HTML page arrives where the file was expected, follow a Drive confirmation
         found in it, or fail this mirror. HTML is never written to disk.
      3. Stream into the part file, hashing as bytes arrive (each read returns what has
         arrived, so nothing waits in memory). Dropped connections, timeouts, stalls (under
         `min_speed` bytes/s over `stall_seconds`), 429 and 5xx are retried up to `retries`
         times in a row without progress, sleeping `backoff * 2**attempt`, each retry
         resuming from what was written; a stall counts as progress only when it brought at
         least a window's worth of bytes. A mirror gets at most `max_attempts` requests, the
         call at most `max_seconds`. 403/404 and no network move on at once; so does a
         server announcing a length other than `size`.
      4. Check `size` and `sha256`. On a mismatch the part file is deleted and the next
         mirror is tried; a file that was resumed is first re-downloaded once from 0,
         in case the old part came from different bytes.
      5. fsync, then `os.replace(part, dest)`.

    Args:
        urls: mirrors, tried in order: `https://...`, `http://...` or `gdrive:<FILE_ID>`.
        dest: final path; its parent is created. Never holds a partial file.
        sha256: accepted hex digests (several when mirrors hold different re-saves);
            empty means any.
        size: expected byte count, or None.
        progress: called as `progress(done_bytes, total_bytes_or_None)`, first with the
            resumed offset.
        retries: retries per mirror for transient failures.
        backoff: base of the exponential backoff, in seconds.
        timeout: socket timeout per connect and per read, in seconds.
        chunk_size: most bytes read and written at a time.
        name: registry name, used only in the error hint (`ipl fetch NAME`, `ipl fetch --import NAME FILE`).
        min_speed: bytes/s below which an attempt is a stall; default `MIN_SPEED` or
            `IPL_DOWNLOAD_MIN_SPEED`; 0 turns the check off.
        stall_seconds: the window the speed is measured over, and the longest wait for
            one read; default `STALL_SECONDS` or `IPL_DOWNLOAD_STALL_SECONDS`.
        max_attempts: requests per mirror in all; default `MAX_ATTEMPTS` or `IPL_DOWNLOAD_ATTEMPTS`.
        max_seconds: wall-clock budget of the whole call; default `MAX_SECONDS` or
            `IPL_DOWNLOAD_MAX_SECONDS`; 0 means none.

    Returns:
        The lowercase SHA-256 hex digest of `dest`.

    Raises:
        ChecksumError: every mirror failed and at least one served the wrong bytes.
        DownloadError: every mirror failed (the bytes that arrived stay in `<dest>.part`,
            which the next call resumes), or a setting is not a number.
    """
    label = name or Path(dest).name
    if not urls:
        raise DownloadError(f"no download URL known for {label}", _hint(name, offline=False))
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    opener.addheaders = [("User-Agent", USER_AGENT)]
    limits = _limits(min_speed=min_speed, stall_seconds=stall_seconds, max_attempts=max_attempts, max_seconds=max_seconds)
    # A read waits at most one stall window: a server that sends nothing is a stall too.
    timeout = min(timeout, limits.stall_seconds) if limits.min_speed > 0 and limits.stall_seconds > 0 else timeout
    job = _Job(opener, part, size, progress or (lambda done, total: None), retries, backoff, timeout, chunk_size, limits)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest, failures, bad_bytes, offline = _try_mirrors(job, urls, {h.strip().lower() for h in sha256}, dest)
    except OSError as e:  # network errors are handled inside; what gets here is the disk
        raise DownloadError(
            f"cannot write {part}: {e.strerror or e}", "check the free disk space and that the folder is writable"
        ) from e
    if digest is not None:
        return digest
    cls = ChecksumError if bad_bytes else DownloadError
    kept = part.stat().st_size if part.is_file() else 0
    if kept:
        # Not thrown away: the next call (`ipl fetch NAME`) resumes from these bytes.
        again = f"run `ipl fetch {name}` again" if name else "run the same command again"
        failures.append(f"{kept} bytes kept in {part}")
        raise cls(f"could not download {label}: " + "; ".join(failures), f"{again} to continue from them, or {_hint(name, offline)}")
    raise cls(f"could not download {label}: " + "; ".join(failures), _hint(name, offline))


class _Limits:
    """The low-speed deadline and the budget of one `download()` call (see the module docstring)."""

    def __init__(self, min_speed: float, stall_seconds: float, max_attempts: int, max_seconds: float):
        self.min_speed, self.stall_seconds, self.max_attempts, self.max_seconds = min_speed, stall_seconds, max_attempts, max_seconds
        self.started = time.monotonic()
        self.deadline = self.started + max_seconds if max_seconds > 0 else None

    def left(self) -> float:
        """Seconds of the budget left (infinite without one)."""
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()


def _limits(**given) -> _Limits:
    """Each limit from the argument, else its environment variable, else the module constant."""
    values = {}
    for key, env in _ENV.items():
        value = given.get(key)
        if value is None:
            text = os.environ.get(env, "").strip()
            default = globals()[key.upper()]
            try:
                value = float(text) if text else default
            except ValueError:
                raise DownloadError(f"{env} must be a number, not {text!r}", f"unset it to use the default {default:g}") from None
        if not value >= 0:  # also catches NaN
            raise DownloadError(f"{env} must be 0 or more, not {value!r}", f"unset it to use the default {globals()[key.upper()]:g}")
        values[key] = value
    return _Limits(float(values["min_speed"]), float(values["stall_seconds"]), max(1, int(values["max_attempts"])), float(values["max_seconds"]))


def _try_mirrors(job, urls, expected, dest):
    """Run `job` over the mirrors; return (digest or None, failure lines, any bad bytes, any offline)."""
    failures: list[str] = []
    bad_bytes = offline = False
    for url in urls:
        for fresh in (False, True):
            try:
                digest, nbytes, resumed = job.fetch(url)
            except _MirrorFailed as e:
                failures.append(f"{url}: {e}")
                offline, bad_bytes = offline or e.offline, bad_bytes or e.bad_bytes
                break
            problem = _mismatch(digest, nbytes, expected, job.size)
            if problem is None:
                os.replace(job.part, dest)
                fsync_dir(dest.parent)
                return digest, failures, bad_bytes, offline
            job.part.unlink(missing_ok=True)  # wrong bytes are never kept, not even to resume
            if resumed and not fresh:
                continue  # the old part may hold other bytes: one clean download before blaming the mirror
            failures.append(f"{url}: {problem}; the download was deleted")
            bad_bytes = True
            break
    return None, failures, bad_bytes, offline


# ---------------------------------------------------------------------------
# One download job: mirrors, retries, resume.


class _Retry(Exception):
    """A transient failure: try this mirror again, resuming. `stall`: the link was too slow, not cut."""

    def __init__(self, reason: str, stall: bool = False):
        super().__init__(reason)
        self.stall = stall


class _MirrorFailed(Exception):
    """This mirror cannot deliver the file; move on to the next one."""

    def __init__(self, reason: str, offline: bool = False, bad_bytes: bool = False):
        super().__init__(reason)
        self.offline, self.bad_bytes = offline, bad_bytes


class _Restart(Exception):
    """The part file was discarded (416, bad Content-Range); request again from 0."""


class _Job:
    """The settings of one `download()` call plus the running hash of its part file."""

    def __init__(self, opener, part, size, progress, retries, backoff, timeout, chunk_size, limits: _Limits):
        self.opener, self.part, self.size, self.progress = opener, part, size, progress
        self.retries, self.backoff, self.timeout, self.chunk_size = retries, backoff, timeout, chunk_size
        self.limits = limits
        # Hash of the part's first `hashed` bytes, kept across retries so a resume after
        # a drop does not re-read a gigabyte from disk.
        self.hasher, self.hashed = hashlib.sha256(), 0
        self.resumed = False

    def fetch(self, url: str) -> tuple[str, int, bool]:
        """Complete the part file from `url`; return (digest, bytes, whether any bytes were resumed)."""
        request_url = _request_url(url)
        self.resumed = False
        attempt = restarts = requests = 0
        limits = self.limits
        while True:
            offset = self.part.stat().st_size if self.part.exists() else 0
            if self.size is not None and offset >= self.size:
                if offset == self.size:
                    # Complete already (a run stopped before the rename): verify it, no request.
                    self.resumed = True
                    return _hash_prefix(self.part, offset, self.chunk_size).hexdigest(), offset, True
                self.part.unlink()  # longer than the file can be: not ours to resume
                continue
            if limits.left() <= 0:
                raise _MirrorFailed(f"out of time: the {limits.max_seconds:g} s budget (IPL_DOWNLOAD_MAX_SECONDS) is used up")
            requests += 1
            try:
                return self._attempt(request_url, url, offset)
            except _Restart:
                self.part.unlink(missing_ok=True)
                restarts += 1
                if restarts > 2:
                    raise _MirrorFailed("server keeps rejecting the byte range") from None
            except _Retry as e:
                gained = (self.part.stat().st_size if self.part.exists() else 0) - offset
                # Progress gives a flaky but working link fresh retries; a stall that brought
                # less than one window's worth of bytes is no progress (else a trickle never ends).
                if gained > 0 and not (e.stall and gained < limits.min_speed * limits.stall_seconds):
                    attempt = 0
                if attempt >= self.retries:
                    raise _MirrorFailed(f"{e} (gave up after {self.retries + 1} tries in a row)") from None
                if requests >= limits.max_attempts:
                    raise _MirrorFailed(f"{e} (gave up after {requests} requests, IPL_DOWNLOAD_ATTEMPTS)") from None
                sleep(min(self.backoff * 2**attempt, max(0.0, limits.left())))
                attempt += 1

    def _attempt(self, request_url: str, url: str, offset: int) -> tuple[str, int, bool]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp, first, watch = self._open_file_response(url, request_url, headers, offset)
        with resp:
            start, total = _start_and_total(resp, offset, self.size)
            if self.size is not None and total != self.size:
                # Known before the body: do not spend a gigabyte on the wrong file.
                raise _MirrorFailed(f"size mismatch: server has {total} bytes, expected {self.size}", bad_bytes=True)
            if start == 0:
                self.hasher, self.hashed = hashlib.sha256(), 0
            else:
                self.resumed = True
                if self.hashed != start:
                    self.hasher, self.hashed = _hash_prefix(self.part, start, self.chunk_size), start
            done = start
            self.progress(done, total)
            # A 200 answer to a Range request means the server ignored it: restart the file.
            # Leaving this block on any error closes the file, which flushes every byte
            # received so far into the part file: a retry resumes after the last one.
            with open(self.part, "ab" if start else "wb") as f:
                block = first
                while block:
                    f.write(block)
                    self.hasher.update(block)
                    done += len(block)
                    self.hashed = done
                    self.progress(done, total)
                    watch.check(done - start, done)
                    block = _read_some(resp, self.chunk_size, f"connection lost after {done} bytes")
                if total is not None and done < total:
                    # http.client returns a short body without error when the peer closes early.
                    raise _Retry(f"connection dropped at {done} of {total} bytes")
                f.flush()
                os.fsync(f.fileno())
        return self.hasher.hexdigest(), done, self.resumed

    def _open_file_response(self, url, request_url, headers, offset):
        """Open `request_url`, following Drive confirmation pages; return (response, first bytes, its watch)."""
        for _ in range(_MAX_CONFIRMS + 1):
            resp = self._open(url, request_url, headers, offset)
            watch = _Watch(self.limits, urlsplit(request_url).netloc)
            try:
                first = self._head(resp, watch)
            except BaseException:
                resp.close()
                raise
            if not _is_html(resp, first):
                return resp, first, watch
            with resp:
                page_url = resp.geturl()
                page = first
                while len(page) < _MAX_HTML and (block := _read_some(resp, _MAX_HTML - len(page), "connection lost")):
                    page += block
                    watch.check(len(page), 0)
            request_url = _confirmation_url(page.decode("utf-8", "replace"), page_url)
        raise _MirrorFailed("Drive kept answering with a confirmation page")

    def _head(self, resp, watch: _Watch) -> bytes:
        """The first bytes of a response: as few as tell a web page from the file (see `_SNIFF`).

        Reading only that much means a file's bytes go to disk as they arrive; only a
        prefix that could still begin an HTML page waits here.
        """
        head = b""
        while not _sniffed(resp, head):
            block = _read_some(resp, self.chunk_size, "connection lost")
            if not block:
                break
            head += block
            watch.check(len(head), 0)
        return head

    def _open(self, url, request_url, headers, offset):
        request = urllib.request.Request(request_url, headers=headers)
        try:
            return self.opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and offset:
                raise _Restart() from None
            reason = f"{e.code} {e.reason}"
            if e.code == 429 or e.code >= 500:
                raise _Retry(reason) from None
            if e.code == 403 and _is_drive(url):
                reason += " (Drive quota or permission?)"
            raise _MirrorFailed(reason) from None
        except (OSError, http.client.HTTPException) as e:
            raise _classify(e, urlsplit(request_url).netloc) from None


# ---------------------------------------------------------------------------
# Helpers: URLs, responses, errors.


def _request_url(url: str) -> str:
    if url.startswith("gdrive:"):
        file_id = url[len("gdrive:"):].strip()
        if not file_id:
            raise _MirrorFailed("empty Google Drive file id")
        return f"{GDRIVE_URL}?id={quote(file_id, safe='')}&export=download"
    if urlsplit(url).scheme not in ("http", "https"):
        raise _MirrorFailed("unsupported URL (use https://..., http://... or gdrive:<ID>)")
    return url


def _is_drive(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return url.startswith("gdrive:") or host.endswith(("drive.google.com", "drive.usercontent.google.com"))


class _Watch:
    """The low-speed deadline of one response, checked after every read.

    Speed is measured over consecutive windows of `stall_seconds`: a window that ends
    with fewer than `min_speed` bytes per second makes the attempt a stall (`_Retry`).
    The call's time budget is checked here too, so a slow but steady download stops
    when it runs out (`_MirrorFailed`).
    """

    def __init__(self, limits: _Limits, host: str):
        self.limits, self.host = limits, host
        self.since, self.received_then = time.monotonic(), 0

    def check(self, received: int, done: int) -> None:
        """`received`: bytes of this response so far; `done`: bytes of the file in the part file."""
        limits, now = self.limits, time.monotonic()
        if limits.deadline is not None and now >= limits.deadline:
            speed = done / max(now - limits.started, 1e-9)
            raise _MirrorFailed(
                f"out of time: {done} bytes from {self.host} in the {limits.max_seconds:g} s budget "
                f"(IPL_DOWNLOAD_MAX_SECONDS), {speed:.0f} B/s"
            )
        elapsed = now - self.since
        if limits.min_speed <= 0 or elapsed < limits.stall_seconds:
            return
        got = received - self.received_then
        if got < limits.min_speed * elapsed:
            raise _Retry(
                f"stalled: {got} bytes from {self.host} in {elapsed:.1f} s ({got / elapsed:.0f} B/s, "
                f"under the {limits.min_speed:g} B/s minimum) after {done} bytes",
                stall=True,
            )
        self.since, self.received_then = now, received


def _read_some(resp, n: int, what: str) -> bytes:
    """Up to `n` bytes, returning as soon as some have arrived (never waits to fill `n`).

    A blocking `read(n)` would sit on a trickle until `n` bytes came, out of reach of the
    low-speed deadline, and lose what it had buffered when the connection then dropped.
    """
    try:
        read1 = getattr(resp, "read1", None)
        return read1(n) if read1 is not None else resp.read(n)
    except (OSError, http.client.HTTPException) as e:
        resp.close()
        raise _Retry(f"{what} ({_describe(e)})") from None


def _sniffed(resp, head: bytes) -> bool:
    """True once `head` is enough for `_is_html` to decide."""
    if resp.headers.get_content_type() in ("text/html", "application/xhtml+xml") or len(head) >= _SNIFF:
        return True
    start = head.lstrip().lower()
    # Undecided while what arrived could still grow into "<!doctype html" or "<html".
    return bool(start) and not any(len(start) < len(m) and m.startswith(start) for m in _HTML_STARTS)


def _is_html(resp, first: bytes) -> bool:
    """True if a response meant to be a binary file is a web page instead."""
    if resp.headers.get_content_type() in ("text/html", "application/xhtml+xml"):
        return True
    head = first[:_SNIFF].lstrip().lower()
    return head.startswith(_HTML_STARTS)


def _start_and_total(resp, offset: int, size: int | None) -> tuple[int, int | None]:
    """Where the body starts in the file, and the file's total size if known."""
    length = resp.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if resp.status == 206:
        m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            resp.close()
            # The range does not continue our part file; start over rather than guess.
            raise _Restart()
        return offset, int(m.group(3)) if m.group(3) != "*" else size
    return 0, length if length is not None else size


def _hash_prefix(path: Path, n: int, chunk_size: int):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while n > 0 and (block := f.read(min(chunk_size, n))):
            h.update(block)
            n -= len(block)
    return h


def _mismatch(digest: str, nbytes: int, expected: set[str], size: int | None) -> str | None:
    if size is not None and nbytes != size:
        return f"size mismatch: expected {size} bytes, got {nbytes}"
    if expected and digest not in expected:
        return f"sha256 mismatch: expected {' or '.join(sorted(expected))}, got {digest}"
    return None


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, http.client.IncompleteRead):
        return "incomplete read"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _classify(e: BaseException, host: str) -> Exception:
    """Turn a connection-level exception into _Retry or _MirrorFailed."""
    cause = e.reason if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException) else e
    if isinstance(cause, socket.gaierror):
        return _MirrorFailed(f"no network: cannot resolve host {host} ({_describe(cause)})", offline=True)
    if isinstance(cause, ConnectionRefusedError):
        return _MirrorFailed(f"no network: connection refused by {host}", offline=True)
    if isinstance(cause, OSError) and cause.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN):
        return _MirrorFailed(f"no network: {_describe(cause)}", offline=True)
    if isinstance(cause, ssl.SSLError):
        return _MirrorFailed(f"TLS error: {cause}")
    if isinstance(cause, (OSError, http.client.HTTPException)):
        return _Retry(_describe(cause))
    return _MirrorFailed(str(e))


def _hint(name: str | None, offline: bool) -> str:
    by_hand = (
        f"download it by hand and run `ipl fetch --import {name} FILE`"
        if name
        else "download the file by hand and check its sha256"
    )
    return f"check the internet connection (or proxy), or {by_hand}" if offline else by_hand


# ---------------------------------------------------------------------------
# Google Drive confirmation pages.


class _DrivePage(HTMLParser):
    """Collects what a Drive interstitial offers: a download form, a link, an error text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.form_action: str | None = None
        self.form_fields: dict[str, str] = {}
        self.links: list[str] = []
        self.errors: list[str] = []
        self._in_form = False
        self._in_error = False

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}  # attribute values arrive HTML-unescaped (&amp; -> &)
        if tag == "form" and a.get("id") == "download-form":
            self._in_form, self.form_action = True, a.get("action", "")
        elif tag == "input" and self._in_form and a.get("name") and a.get("type", "hidden") == "hidden":
            self.form_fields[a["name"]] = a.get("value", "")
        elif tag == "a" and "href" in a:
            parts = urlsplit(a["href"])
            if parts.path.endswith("/uc") and "export=download" in parts.query:
                self.links.append(a["href"])
        elif tag == "p" and "uc-error-subcaption" in a.get("class", "").split():
            self._in_error = True
            self.errors.append("")

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False
        elif tag == "p":
            self._in_error = False

    def handle_data(self, data):
        if self._in_error:
            self.errors[-1] += data


def _confirmation_url(page: str, page_url: str) -> str:
    """The URL a Drive "can't scan for viruses" page points to; _MirrorFailed if there is none."""
    parser = _DrivePage()
    parser.feed(page)
    parser.close()
    error = " ".join(" ".join(parser.errors).split())
    if error:
        raise _MirrorFailed(f"Google Drive says: {error}")
    if parser.form_action is not None:
        action = urljoin(page_url, parser.form_action)
        return action + ("&" if "?" in action else "?") + urlencode(parser.form_fields)
    if parser.links:
        return urljoin(page_url, parser.links[0])
    m = re.search(r'"downloadUrl"\s*:\s*"((?:[^"\\]|\\.)*)"', page)
    if m:
        try:
            return json.loads(f'"{m.group(1)}"')  # decodes \u003d, \u0026, \/
        except ValueError:
            return m.group(1).replace("\\u003d", "=").replace("\\u0026", "&")
    raise _MirrorFailed("got an HTML page instead of the file")
