"""The `ipl` command line: global options, command registration, error handling.

Commands live in `ipltool.commands`, one module each; this module only wires them
together. Every `IplError` becomes one line plus a hint on stderr (exit code 2 for
bad input, 1 otherwise); other exceptions show a traceback only with `--debug` or
`IPL_DEBUG=1`.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

import typer

from ipltool import __version__, allocator, console
from ipltool.commands import adapt as adapt_cmd
from ipltool.commands import blend as blend_cmd
from ipltool.commands import eval as eval_cmd
from ipltool.commands import fetch as fetch_cmd
from ipltool.commands import generate as generate_cmd
from ipltool.commands import kernels as kernels_cmd
from ipltool.commands import plugins as plugins_cmd
from ipltool.commands import prompts as prompts_cmd
from ipltool.commands import serve as serve_cmd
from ipltool.commands import stylize as stylize_cmd
from ipltool.commands import train_mapper as train_mapper_cmd
from ipltool.devices import check_device_spec
from ipltool.errors import IplError
from ipltool.kernels import dispatch

app = typer.Typer(
    name="ipl",
    help=(
        "Zero-shot generative model adaptation with Image-specific Prompt Learning (IPL).\n\n"
        "Turns a pretrained StyleGAN2 into a generator of a new style described only by text."
    ),
    epilog="Examples:  ipl prompts list   |   ipl prompts show disney   |   ipl plugins",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        console.out.print(f"ipl {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, mps, cuda or cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only results and errors."),
    json_output: bool = typer.Option(False, "--json", help="Print data as JSON (every command that prints data)."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (also IPL_DEBUG=1)."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network; a missing file names the `ipl fetch` line to run (also IPL_OFFLINE=1)."),
    kernels: Optional[str] = typer.Option(
        None, "--kernels", help="StyleGAN2 ops: auto (compiled CUDA kernels on GPU, else native), native or cuda (strict). Also IPL_KERNELS."
    ),
    malloc: Optional[str] = typer.Option(
        None, "--malloc", help="C heap on Linux: system (glibc's defaults) or reuse (keeps freed blocks: CPU training up to 2x faster, up to 53 % more memory). Also IPL_MALLOC."
    ),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    console.options.device = check_device_spec(device)
    console.options.quiet = quiet
    console.options.json = json_output
    console.options.debug = debug or console.options.debug
    console.options.offline = offline
    # The environment is the one channel the ops read (worker processes inherit it too);
    # a bad value, from the flag or the environment, is refused before any work starts.
    if kernels is not None:
        os.environ[dispatch.ENV_VAR] = dispatch.kernel_choice(kernels)
    dispatch.kernel_choice()
    if malloc is not None:
        os.environ[allocator.ENV_VAR] = allocator.malloc_choice(malloc)
    _set_heap()


def _set_heap() -> None:
    """Apply `IPL_MALLOC` before any command allocates; say so when reuse cannot hold."""
    outcome = allocator.apply_malloc_choice()
    if outcome == "user":
        console.err.print(f"[yellow]warning:[/] malloc reuse (--malloc, IPL_MALLOC) not applied: {allocator.user_malloc_settings()} sets the allocator already", markup=True, highlight=False)
    elif outcome == "unavailable":
        console.err.print("[yellow]warning:[/] malloc reuse (--malloc, IPL_MALLOC) needs glibc's mallopt (Linux); the system allocator stays", markup=True, highlight=False)


app.command("fetch")(fetch_cmd.fetch)
app.add_typer(prompts_cmd.app, name="prompts")
app.command("plugins")(plugins_cmd.plugins)
app.command("train-mapper")(train_mapper_cmd.train_mapper)
app.command("adapt")(adapt_cmd.adapt)
app.command("stylize")(stylize_cmd.stylize)
app.command("eval")(eval_cmd.eval_command)
app.command("generate")(generate_cmd.generate)
app.command("blend")(blend_cmd.blend)
app.command("serve")(serve_cmd.serve)
app.add_typer(kernels_cmd.app, name="kernels")


def _report(error: IplError) -> None:
    """Print `label: message` and `hint: ...` on stderr.

    Message and hint are user-controlled text (names, paths, regex patterns such as
    `[a-z0-9]`), so they are escaped: only the label is markup. The later lines of a
    message of several lines (one problem each) are indented under the first.
    """
    first, *rest = str(error.message).splitlines() or [""]
    indent = " " * (len(error.label) + 2)
    text = "\n".join([console.escape(first), *(indent + console.escape(line) for line in rest)])
    console.err.print(f"[bold red]{error.label}:[/] {text}", markup=True, highlight=False)
    if error.hint:
        console.err.print(f"[dim]hint:[/] {console.escape(error.hint)}", markup=True, highlight=False)


def _click_exit_code(error: Exception) -> int | None:
    """Exit code for the parser's own exceptions (help, usage errors, abort), else None.

    Recent typer releases vendor click under another module name, so these are
    recognised by shape rather than by class.
    """
    name = type(error).__name__
    if name == "Exit" and hasattr(error, "exit_code"):
        return error.exit_code
    if name == "Abort":
        cause = error.__cause__ or error.__context__
        if isinstance(cause, EOFError):
            # click turns any EOFError escaping a command into Abort, meant for Ctrl-D at a
            # prompt; ipl has no prompts, so this is a file read past its end: a bug, not the user.
            if console.options.debug:
                traceback.print_exception(cause)
            _report(IplError(f"unexpected EOFError: {str(cause) or 'a file ended early'}", hint="rerun with --debug for the traceback, and please report it"))
            return 1
        console.err.print("aborted")
        return 130
    if hasattr(error, "show") and hasattr(error, "exit_code"):  # UsageError and friends
        error.show(file=sys.stderr)
        return error.exit_code
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` (default: `sys.argv[1:]`) and return the exit code."""
    console.reset()
    console.options.debug = os.environ.get("IPL_DEBUG", "") not in ("", "0")
    args = sys.argv[1:] if argv is None else list(argv)
    if "--debug" in args:
        console.options.debug = True
    try:
        # Without standalone mode, click returns the code of a `typer.Exit(n)` instead of exiting.
        result = app(args=args, prog_name="ipl", standalone_mode=False)
        if isinstance(result, int) and not isinstance(result, bool):
            return result
    except KeyboardInterrupt:
        console.err.print("interrupted")
        return 130
    except IplError as error:
        if console.options.debug:
            traceback.print_exc()
        _report(error)
        return error.exit_code
    except Exception as error:
        code = _click_exit_code(error)
        if code is not None:
            return code
        if console.options.debug:  # a bug: say so in one line unless debugging
            traceback.print_exc()
        _report(IplError(f"unexpected {type(error).__name__}: {error}", hint="rerun with --debug for the traceback, and please report it"))
        return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    code = main()
    if "torch" in sys.modules:  # a torchrun process group, if the command joined one, is left cleanly
        from ipltool.distributed import finish

        finish()
    sys.exit(code)
