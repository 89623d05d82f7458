"""`ipl serve`: the web studio in the browser."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

from ipltool import console
from ipltool.devices import resolve_device
from ipltool.errors import UsageError


def _auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UsageError("--auth takes USER:PASSWORD")
    return user, password


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; think before you do)."),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="Port to listen on."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Runs folder: listed, and where adaptations started from the page go."),
    generators: Optional[Path] = typer.Option(None, "--generators", help="A folder of generator .pt files to offer as well."),
    reports: Optional[list[Path]] = typer.Option(None, "--report", help="`ipl eval` report folders whose numbers the Runs tab shows (repeatable)."),
    work: Optional[Path] = typer.Option(None, "--work", help="Folder for per-session files (default: a temporary folder, removed at exit)."),
    encoder: str = typer.Option("e4e", "--encoder", "-e", help="Encoder for stylize."),
    auth: Optional[str] = typer.Option(None, "--auth", help="USER:PASSWORD required to open the page."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny random models: the whole page works without any weights."),
) -> None:
    """Open the web studio: stylize photos, explore generators, start and watch adaptations, browse runs.

    Needs the `serve` extra (pip install "ipltool[serve]"). Binds to 127.0.0.1 unless --host
    says otherwise. The page reaches only the runs, --generators, --report and work
    folders, by the names it lists.

    Examples: ipl serve --smoke   |   ipl serve --runs runs/ --port 8080   |   ipl serve --host 0.0.0.0 --auth me:secret
    """
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("ipl serve needs Gradio", hint='install the serve extra: pip install "ipltool[serve]"') from None
    from ipltool import registry
    from ipltool.serve.app import launch
    from ipltool.serve.studio import Studio, StudioConfig

    credentials = _auth(auth)
    registry.require("encoders", encoder)
    if not _loopback(host):
        console.err.print(f"[yellow]warning:[/] listening on {console.escape(host)}: anyone who can reach this machine can use the studio" + ("" if credentials else " (add --auth USER:PASSWORD)"))
    device = resolve_device(console.options.device)
    studio = Studio(StudioConfig(runs=runs, work=work, generators=generators, reports=list(reports or []), smoke=smoke, encoder=encoder, device=str(device)))
    console.info(f"ipl studio on http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}  (Ctrl-C to stop)")
    try:
        launch(studio, host, port, credentials, block=True)
    finally:
        if work is None:
            studio.close()
