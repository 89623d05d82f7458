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
) -> str:
    """Download the first working mirror of `urls` to `dest`; return the sha256 hex of the file.

    Steps, per mirror in order:
      1. Request the URL (`gdrive:<ID>` via `GDRIVE_URL`), with `Range: bytes=N-` when
         `<dest>.part` already holds N bytes. A 200 answer restarts from 0, so does a 416.
      2. If an HTML page arrives where the file was expected, follow a Drive confirmation
         found in it, or fail this mirror. HTML is never written to disk.
      3. Stream into the part file, hashing as bytes arrive. Dropped connections, timeouts,
         429 and 5xx are retried up to `retries` times in a row without progress, sleeping
         `backoff * 2**attempt`, each retry resuming from what was written. 403/404 and
         no network move on at once; so does a server announcing a length other than `size`.
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
        chunk_size: bytes read and written at a time.
        name: registry name, used only in the error hint (`ipl fetch --import NAME FILE`).

    Returns:
        The lowercase SHA-256 hex digest of `dest`.

    Raises:
        ChecksumError: every mirror failed and at least one served the wrong bytes.
        DownloadError: every mirror failed.
    """
    label = name or Path(dest).name
    if not urls:
        raise DownloadError(f"no download URL known for {label}", _hint(name, offline=False))
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    opener.addheaders = [("User-Agent", USER_AGENT)]
    job = _Job(opener, part, size, progress or (lambda done, total: None), retries, backoff, timeout, chunk_size)
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
    raise cls(f"could not download {label}: " + "; ".join(failures), _hint(name, offline))


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
    """A transient failure: try this mirror again, resuming."""


class _MirrorFailed(Exception):
    """This mirror cannot deliver the file; move on to the next one."""

    def __init__(self, reason: str, offline: bool = False, bad_bytes: bool = False):
        super().__init__(reason)
        self.offline, self.bad_bytes = offline, bad_bytes


class _Restart(Exception):
    """The part file was discarded (416, bad Content-Range); request again from 0."""


class _Job:
    """The settings of one `download()` call plus the running hash of its part file."""

    def __init__(self, opener, part, size, progress, retries, backoff, timeout, chunk_size):
        self.opener, self.part, self.size, self.progress = opener, part, size, progress
        self.retries, self.backoff, self.timeout, self.chunk_size = retries, backoff, timeout, chunk_size
        # Hash of the part's first `hashed` bytes, kept across retries so a resume after
        # a drop does not re-read a gigabyte from disk.
        self.hasher, self.hashed = hashlib.sha256(), 0
        self.resumed = False

    def fetch(self, url: str) -> tuple[str, int, bool]:
        """Complete the part file from `url`; return (digest, bytes, whether any bytes were resumed)."""
        request_url = _request_url(url)
        self.resumed = False
        attempt = restarts = 0
        while True:
            offset = self.part.stat().st_size if self.part.exists() else 0
            if self.size is not None and offset >= self.size:
                if offset == self.size:
                    # Complete already (a run stopped before the rename): verify it, no request.
                    self.resumed = True
                    return _hash_prefix(self.part, offset, self.chunk_size).hexdigest(), offset, True
                self.part.unlink()  # longer than the file can be: not ours to resume
                continue
            try:
                return self._attempt(request_url, url, offset)
            except _Restart:
                self.part.unlink(missing_ok=True)
                restarts += 1
                if restarts > 2:
                    raise _MirrorFailed("server keeps rejecting the byte range") from None
            except _Retry as e:
                if self.part.exists() and self.part.stat().st_size > offset:
                    attempt = 0  # progress was made: a flaky but working link gets fresh retries
                if attempt >= self.retries:
                    raise _MirrorFailed(f"{e} (gave up after {self.retries + 1} tries)") from None
                sleep(self.backoff * 2**attempt)
                attempt += 1

    def _attempt(self, request_url: str, url: str, offset: int) -> tuple[str, int, bool]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp, first = self._open_file_response(url, request_url, headers, offset)
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
            with open(self.part, "ab" if start else "wb") as f:
                block = first
                while block:
                    f.write(block)
                    self.hasher.update(block)
                    done += len(block)
                    self.hashed = done
                    self.progress(done, total)
                    try:
                        block = resp.read(self.chunk_size)
                    except (OSError, http.client.HTTPException) as e:
                        raise _Retry(f"connection lost after {done} bytes ({_describe(e)})") from None
                if total is not None and done < total:
                    # http.client returns a short body without error when the peer closes early.
                    raise _Retry(f"connection dropped at {done} of {total} bytes")
                f.flush()
                os.fsync(f.fileno())
        return self.hasher.hexdigest(), done, self.resumed

    def _open_file_response(self, url, request_url, headers, offset):
        """Open `request_url`, following Drive confirmation pages; return (response, first block)."""
        for _ in range(_MAX_CONFIRMS + 1):
            resp = self._open(url, request_url, headers, offset)
            first = _read_safely(resp, self.chunk_size)
            if not _is_html(resp, first):
                return resp, first
            with resp:
                page_url = resp.geturl()
                page = first + _read_safely(resp, _MAX_HTML)
            request_url = _confirmation_url(page.decode("utf-8", "replace"), page_url)
        raise _MirrorFailed("Drive kept answering with a confirmation page")

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


def _read_safely(resp, n: int) -> bytes:
    try:
        return resp.read(n)
    except (OSError, http.client.HTTPException) as e:
        resp.close()
        raise _Retry(f"connection lost ({_describe(e)})") from None


def _is_html(resp, first: bytes) -> bool:
    """True if a response meant to be a binary file is a web page instead."""
    if resp.headers.get_content_type() in ("text/html", "application/xhtml+xml"):
        return True
    head = first[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


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
