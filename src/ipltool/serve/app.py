"""The page of `ipl serve`: four tabs over a `Studio` — Stylize, Explore, Adapt, Runs.

Only layout and translation live here: every button calls one `Studio` method, and an
`IplError` becomes a Gradio error message (a toast on the page, an `AppError` for API
clients) while the server goes on. Each handler has an `api_name`, so everything the page
does can be scripted with `gradio_client`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gradio as gr

from ipltool.errors import IplError
from ipltool.serve.studio import MAX_EXPLORE_SEEDS, Studio

INTRO = (
    "# ipltool studio\n"
    "Stylize a photo with adapted generators, explore seeds side by side, start and watch adaptations, "
    "and browse runs. Everything here calls the same library functions as the `ipl` commands."
)


def _safe(fn):
    """Run a handler; an `IplError` (bad input, unknown name, missing weights) becomes a message on the page."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except IplError as err:
            raise gr.Error(err.message + (f" ({err.hint})" if err.hint else ""), print_exception=False) from None

    return wrapper


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or "api"


def build_app(studio: Studio) -> gr.Blocks:
    """The Gradio app of `studio` (not launched)."""

    def generator_choices():
        return [(entry.label, entry.key) for entry in studio.generators()]

    def run_choices():
        return [run.key for run in studio.runs()]

    def refresh():
        choices = generator_choices()
        first = [choices[0][1]] if choices else []
        return gr.Dropdown(choices=choices, value=first), gr.Dropdown(choices=choices, value=first), gr.Dropdown(choices=run_choices()), runs_table()

    @_safe
    def stylize(photo, keys, strength, request: gr.Request = None):
        view = studio.stylize(photo, keys, float(strength), _session(request))
        downloads = [p for p in (view.aligned, view.reconstruction) if p] + [p for p, _ in view.stylized + view.pasted]
        return view.message, view.aligned, view.reconstruction, view.stylized, view.pasted, downloads or None

    @_safe
    def explore(seeds, keys, truncation, strength, request: gr.Request = None):
        return studio.explore(str(seeds), keys, float(truncation), float(strength), _session(request))

    def random_seeds():
        import secrets

        return ",".join(str(secrets.randbelow(100_000)) for _ in range(4))

    @_safe
    def interpolate(first, second, keys, truncation, frames, request: gr.Request = None):
        return studio.interpolate(int(first), int(second), keys, float(truncation), int(frames), _session(request))

    @_safe
    def load_domain(name):
        return studio.domain_text(name), ""

    def validate(text):
        try:
            domain = studio.check_domain(text)
        except IplError as err:
            return "❌ " + err.message.replace("\n", "  \n❌ ")
        return f"✅ valid: {domain.name} ({domain.source} → {domain.target}), {domain.adapt.steps} steps"

    @_safe
    def start(text):
        job = studio.start_adapt(text)
        return f"job {job['id']} queued: {job['domain']}", *status()

    @_safe
    def stop(job_id):
        job = studio.stop_job(job_id)
        return f"job {job['id']}: {job['message'] or job['state']}", *status()

    def status():
        jobs, grid = studio.job_status()
        rows = [[j["id"], j["domain"], j["state"], j["stage"], f"{j['step']}/{j['total']}", _number(j["loss"]), _eta(j["eta_seconds"]), j["run"] or "", j["message"]] for j in jobs]
        return rows or None, grid

    def runs_table():
        return [[r.key, r.domain, r.stage, r.method, r.steps or "", "yes" if r.finished else "no", "yes" if r.smoke else ""] for r in studio.runs()] or None

    @_safe
    def show_run(key):
        details = studio.run_details(key)
        return details["config"], details["samples"], json.dumps(details["metrics"], indent=1) if details["metrics"] else "no `ipl eval` numbers for this run yet"

    # No telemetry or version check (the studio works offline); Gradio's copies of files older than an hour go.
    with gr.Blocks(title="ipltool studio", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(INTRO)
        with gr.Tab("Stylize"):
            with gr.Row():
                with gr.Column():
                    photo = gr.Image(type="filepath", label="Photo (upload, drop or webcam)", sources=["upload", "webcam", "clipboard"], elem_id="photo")
                    stylize_keys = gr.Dropdown(generator_choices(), multiselect=True, allow_custom_value=True, label="Styles", elem_id="stylize-styles")
                    strength = gr.Slider(0, 2, value=1, step=0.05, label="Style strength (0 source, 1 adapted)", elem_id="strength")
                    with gr.Row():
                        stylize_button = gr.Button("Stylize", variant="primary", elem_id="stylize-button")
                        refresh_button = gr.Button("Refresh lists", elem_id="refresh")
                    message = gr.Markdown(elem_id="stylize-message")
                with gr.Column():
                    with gr.Row():
                        aligned = gr.Image(label="Aligned face", interactive=False, height=220, elem_id="aligned")
                        reconstruction = gr.Image(label="Reconstruction", interactive=False, height=220, elem_id="reconstruction")
                    stylized = gr.Gallery(label="Stylized", columns=3, height=260, elem_id="stylized")
                    pasted = gr.Gallery(label="Pasted back", columns=3, height=260, elem_id="pasted")
                    downloads = gr.File(label="Downloads", file_count="multiple", elem_id="downloads")
            stylize_button.click(stylize, [photo, stylize_keys, strength], [message, aligned, reconstruction, stylized, pasted, downloads], api_name="stylize")
        with gr.Tab("Explore"):
            with gr.Row():
                with gr.Column():
                    explore_keys = gr.Dropdown(generator_choices(), multiselect=True, allow_custom_value=True, label="Generators", elem_id="explore-generators")
                    with gr.Row():
                        seeds = gr.Textbox("0-3", label=f"Seeds (0-3, 1,5,9; at most {MAX_EXPLORE_SEEDS})", elem_id="seeds", scale=3)
                        dice = gr.Button("Random seeds", elem_id="random-seeds", scale=1)
                    truncation = gr.Slider(0, 1, value=0.7, step=0.05, label="Truncation ψ")
                    explore_strength = gr.Slider(0, 2, value=1, step=0.05, label="Style strength")
                    explore_button = gr.Button("Render", variant="primary", elem_id="explore-button")
                    with gr.Row():
                        first = gr.Number(0, precision=0, label="From seed")
                        second = gr.Number(1, precision=0, label="To seed")
                        frames = gr.Slider(2, 60, value=16, step=1, label="Frames")
                    walk_button = gr.Button("Interpolate", elem_id="walk-button")
                with gr.Column():
                    grid = gr.Image(label="Source and each generator, a row per seed", interactive=False, elem_id="grid")
                    walk = gr.Image(label="Interpolation (loops)", interactive=False, elem_id="walk")
            explore_button.click(explore, [seeds, explore_keys, truncation, explore_strength], grid, api_name="explore")
            dice.click(random_seeds, None, seeds, api_name="random_seeds").then(
                explore, [seeds, explore_keys, truncation, explore_strength], grid, api_name="explore_random", api_visibility="private"
            )
            walk_button.click(interpolate, [first, second, explore_keys, truncation, frames], walk, api_name="interpolate")
        with gr.Tab("Adapt"):
            from ipltool.domain import discover_domains

            names = sorted({entry.name for entry in discover_domains() if not entry.error})
            with gr.Row():
                with gr.Column():
                    domain = gr.Dropdown(names, value="disney" if "disney" in names else None, label="Domain", elem_id="domain")
                    toml = gr.Textbox(lines=18, max_lines=40, label="Domain file (TOML)", elem_id="domain-toml")
                    check = gr.Markdown(elem_id="domain-check")
                    with gr.Row():
                        validate_button = gr.Button("Validate", elem_id="validate-button")
                        start_button = gr.Button("Start adaptation", variant="primary", elem_id="start-button")
                    with gr.Row():
                        job_id = gr.Number(label="Job to stop", precision=0)
                        stop_button = gr.Button("Stop", variant="stop", elem_id="stop-button")
                    job_message = gr.Markdown(elem_id="job-message")
                with gr.Column():
                    jobs = gr.Dataframe(headers=["job", "domain", "state", "stage", "step", "loss", "eta", "run", "message"], interactive=False, elem_id="jobs")
                    latest = gr.Image(label="Latest sample grid", interactive=False, elem_id="latest-grid")
            domain.change(load_domain, domain, [toml, check], api_name="domain_text")
            app.load(load_domain, domain, [toml, check], api_visibility="private")
            validate_button.click(validate, toml, check, api_name="validate")
            start_button.click(start, toml, [job_message, jobs, latest], api_name="start_adapt")
            stop_button.click(stop, job_id, [job_message, jobs, latest], api_name="stop_adapt")
            gr.Timer(1.0).tick(status, None, [jobs, latest], api_name="jobs")
        with gr.Tab("Runs"):
            runs = gr.Dataframe(runs_table(), headers=["run", "domain", "stage", "method", "steps", "finished", "smoke"], interactive=False, elem_id="runs")
            with gr.Row():
                run_key = gr.Dropdown(run_choices(), allow_custom_value=True, label="Run", elem_id="run")
                runs_refresh = gr.Button("Refresh", elem_id="runs-refresh")
            config = gr.Code(label="config.toml", elem_id="run-config")
            samples = gr.Gallery(label="Sample grids", columns=2, elem_id="run-samples")
            metrics = gr.Code(label="ipl eval", language="json", elem_id="run-metrics")
            run_key.change(show_run, run_key, [config, samples, metrics], api_name="run_details")
            runs_refresh.click(runs_table, None, runs, api_name="runs")
        refresh_button.click(refresh, None, [stylize_keys, explore_keys, run_key, runs], api_name="refresh")
    return app


def _number(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _eta(seconds) -> str:
    if seconds is None:
        return ""
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def launch(studio: Studio, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None, block: bool = True):
    """Start the server of `studio`; returns the Gradio app (with `block=False`, the server runs in a thread).

    Files the page may serve are those of the studio's work folder and runs folder
    (Gradio refuses every other path); uploads above `MAX_UPLOAD_MB` are refused.
    """
    from ipltool.serve.studio import MAX_UPLOAD_MB

    app = build_app(studio)
    app.queue(default_concurrency_limit=1, max_size=64)  # one model call at a time on the device
    allowed = [str(Path(studio.work).resolve()), str(Path(studio.config.runs).resolve())]
    app.launch(
        server_name=host, server_port=port, auth=auth, prevent_thread_lock=not block, quiet=True,
        allowed_paths=allowed, max_file_size=f"{MAX_UPLOAD_MB}mb", show_error=True,
    )
    return app
