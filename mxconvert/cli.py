"""The `mxconvert` command: a thin click shell over convert(), verify() and push(), same parameter names."""

import contextlib
import difflib
import json
import os
import sys
from importlib import metadata
from pathlib import Path

import click
from click.shell_completion import CompletionItem

from . import __version__
from . import format as fmt
from .errors import MxconvertError, OptionError

EXAMPLES = """
\b
Examples:
  mxconvert MiniMaxAI/MiniMax-M3-MXFP8 ./MiniMax-M3-MI300X
  mxconvert ./MiniMax-M3-MXFP8 ./out --long-context --bf16 derive
  mxconvert ./MiniMax-M3-MXFP8 ./out --dry-run
  mxconvert verify ./out --source ./MiniMax-M3-MXFP8
  mxconvert push ./out my-org/MiniMax-M3-MI300X --private
"""


class _UsageError(click.ClickException):
    """A usage error already worded as one `Error:` line: exit code 2, no usage block."""

    exit_code = 2


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class _DefaultToConvert(click.Group):
    """`mxconvert MODEL_DIR OUT_DIR` means `mxconvert convert MODEL_DIR OUT_DIR`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            if not ctx.resilient_parsing:  # shell completion parses half-typed words: no errors there
                self._check_first_word(args[0])
            args = ["convert", *args]
        return super().parse_args(ctx, args)

    def _check_first_word(self, word: str) -> None:
        """A bare word (no '/', so no Hub id owner/name) that is not on disk is a mistyped command, most
        likely: list the commands rather than report a missing OUT_DIR."""
        if word.startswith("-") or "/" in word or os.sep in word or Path(word).expanduser().exists():
            return
        close = difflib.get_close_matches(word, self.commands, n=1)
        maybe = f"Did you mean 'mxconvert {close[0]}'? " if close else ""
        raise _UsageError(
            f"{word}: is not a command, an existing path or a Hub repo id (owner/name). "
            f"{maybe}Commands: {', '.join(self.commands)} (run 'mxconvert --help')."
        )

    def shell_complete(self, ctx, incomplete):
        """Command names, else paths (the first word may be a MODEL_DIR): click's bash script drops
        the names when a path item comes with them."""
        items = super().shell_complete(ctx, incomplete)
        return items or ([] if incomplete.startswith("-") else [CompletionItem(incomplete, type="dir")])


def _versions(ctx, _param, value) -> None:
    """--version: what a bug report needs, torch, triton and safetensors included, and the GPU seen."""
    if not value or ctx.resilient_parsing:
        return
    lines = [f"mxconvert {__version__}", f"python {sys.version.split()[0]}"]
    for package in ("torch", "triton", "safetensors", "huggingface_hub", "vllm"):
        try:
            lines.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{package} not installed")
    click.echo("\n".join(lines + [_gpu_line()]))
    ctx.exit()


def _gpu_line() -> str:
    import torch  # only here: the other commands import it when they need it

    hip, cuda = torch.version.hip, torch.version.cuda
    build = f"ROCm {hip}" if hip else f"CUDA {cuda}" if cuda else None
    build = f"torch built for {build}" if build else "torch is a CPU-only build"
    if not torch.cuda.is_available():
        return f"GPU: none visible ({build})"
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return f"GPU: {torch.cuda.device_count()} visible ({', '.join(names)}; {build})"


class _Command(click.Command):
    """Usage errors as one line, `Error: <option>: <problem>. <fix>.`, exit code 2 (no usage block)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            command = " ".join(n for n in (parent.info_name if parent else None, info_name) if n)
            if isinstance(e, click.BadParameter) and not isinstance(e, click.MissingParameter) and e.param:
                subject, problem = (e.param.opts or [e.param.human_readable_name])[0], e.message
            elif isinstance(e, click.NoSuchOption):
                maybe = f" (did you mean {' or '.join(sorted(e.possibilities))}?)" if e.possibilities else ""
                subject, problem = e.option_name, f"is not an option of {command}{maybe}"
            else:
                subject, problem = command, e.format_message()
            line = f"{subject}: {problem.rstrip('.')}. Run '{command} --help' for the options."
            raise _UsageError(line) from None


def _choice(name: str, choices: list[str], default: str, help: str):
    return click.option(name, type=click.Choice(choices), default=default, show_default=True, help=help)


class _TokenCount(click.ParamType):
    """A token count of at least `low`; with `never`, also 'never' (no batch is that large)."""

    def __init__(self, low: int, *, never: bool):
        self.low, self.never = low, never
        self.name = "integer|never" if never else "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        if self.never and str(value).strip().lower() == "never":
            return fmt.NEVER
        try:
            n = int(value)
        except ValueError:
            self.fail(f"{value!r} is not a whole number" + (" or 'never'" if self.never else ""), param, ctx)
        if n < self.low:
            self.fail(f"{n} is below {self.low}", param, ctx)
        return n


def _tokens(name: str, low: int, default: int, help: str, *, never: bool = False):
    shown = "never" if default == fmt.NEVER else default  # click converts it, and shows it as written
    return click.option(name, type=_TokenCount(low, never=never), default=shown, show_default=True, help=help)


def _quiet_option(command):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars and no messages: errors only.")(command)


@contextlib.contextmanager
def _silenced(quiet: bool):
    """--quiet: what the command prints goes nowhere; its errors still reach stderr (raised past this)."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def _run(
    fn,
    *,
    interrupted: str = "Interrupted: OUT_DIR has no manifest, so it is not a finished conversion. "
    "Run the same command with --resume to go on (finished shards are kept).",
    **kwargs,
):
    """MxconvertError, OSError and Ctrl-C become one line on stderr, never a traceback."""
    try:
        return fn(**kwargs)
    except OptionError as e:
        raise _UsageError(str(e)) from None
    except MxconvertError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # a disk or file system failure outside the checked paths
        raise click.ClickException(f"{e.filename or 'disk'}: {e.strerror or e}. Fix that, then run again") from None
    except KeyboardInterrupt:
        click.echo("\n" + interrupted, err=True)
        sys.exit(130)
    except Exception as e:  # a bug of ours: still one line (MXCONVERT_DEBUG=1 shows the traceback)
        if os.environ.get("MXCONVERT_DEBUG"):
            raise
        first = (str(e).splitlines() or [""])[0][:200]
        raise click.ClickException(
            f"mxconvert {__version__}: internal error ({type(e).__name__}: {first}). This is a bug: please report it "
            "with the command line; MXCONVERT_DEBUG=1 shows the traceback"
        ) from None


@click.group(cls=_DefaultToConvert, epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_versions,
    help="Show the versions of mxconvert, torch, triton and safetensors, the GPU seen, and exit.",
)
def main():
    """Convert MiniMax-M3 MXFP8 checkpoints into the MI300X-ready format (FNUZ FP8, packed scales, BF16 copies)."""


@main.command(cls=_Command, epilog=EXAMPLES)
@click.argument("model_dir", type=click.Path())  # or a Hub repo id; Path only for shell completion
@click.argument("out_dir", type=click.Path())
@click.option(
    "--long-context", is_flag=True, help="Store MoE layers with index % 5 == 0 as BF16 only (fits HBM at long context)."
)
@_choice("--bf16", ["materialize", "derive"], "derive",
         "derive: FP8 only on disk, BF16 copies (where a band uses them) dequantized at load, the same bits; "
         "materialize: also store them (3x the disk, slower to load).")  # fmt: skip
@_tokens("--bf16-max-tokens", 0, fmt.DISPATCH[0], "Batches of at most this many tokens run on the BF16 experts.")
@_tokens("--bf16-min-tokens", 1, fmt.DISPATCH[1], "Batches of at least this many tokens run on the BF16 experts "
         "('never': none; the default bands hold no BF16 copy).", never=True)  # fmt: skip
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 5GB, 2GiB).")
@click.option(
    "--dry-run", is_flag=True, help="Report the bytes in and out, the disks, peak memory and time; write nothing."
)
@_choice("--device", ["cpu", "cuda"], "cpu", "Where the BF16 copies are computed (bit-identical either way).")
@click.option(
    "--force", is_flag=True, help="Replace an earlier conversion in OUT_DIR (only files it wrote; others are refused)."
)
@click.option(
    "--resume",
    is_flag=True,
    help="Go on with an interrupted conversion in OUT_DIR (same input and options): keep its finished shards.",
)
@click.option(
    "--progress/--no-progress", default=True, help="Progress bars (bytes written), when stderr is a terminal."
)
@click.option("--push-to-hub", metavar="REPO_ID", help="Then upload OUT_DIR to this Hub repo (see `mxconvert push`).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("--revision", metavar="BRANCH", help="With --push-to-hub: push to this branch, created if missing.")
@click.option("--token", help="Hub token for the source and the push (default: HF_TOKEN, else the saved login).")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the report as JSON.")
@_quiet_option
def convert(**kwargs):
    """Convert MODEL_DIR (a local checkpoint or a Hub repo id) into OUT_DIR."""
    from .convert import convert as run_convert

    as_json, quiet = kwargs.pop("as_json"), kwargs.pop("quiet")
    with _silenced(quiet):
        done = _run(run_convert, **{**kwargs, "progress": kwargs["progress"] and not quiet})
    out, plan = kwargs["out_dir"], done.plan
    if quiet and done.report is None:
        return
    if done.report is not None:
        from .dryrun import render

        click.echo(json.dumps(done.report, indent=2) if as_json else render(done.report))
    elif done.complete:
        click.echo(f"Already finished: {out} holds this conversion (same input and options); nothing to do.")
    elif not kwargs["dry_run"]:
        size = f"{plan.output_bytes / 2**30:.2f} GiB"
        if done.kept:
            written = f"{len(plan.shards) - len(done.kept)} of {_plural(len(plan.shards), 'shard')} ({size} in all)"
            click.echo(f"Wrote {written} to {out}, kept {len(done.kept)} finished before; verified.")
        else:
            click.echo(f"Wrote {_plural(len(plan.shards), 'shard')} ({size}) to {out}; verified.")


@main.command(cls=_Command, epilog=EXAMPLES)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--source", type=click.Path(file_okay=False), help="Also compare every tensor with this source checkpoint."
)
@click.option("--quick", is_flag=True, help="Sizes, headers, index and format only; skip the sha256 of every file.")
@_quiet_option
def verify(out_dir, source, quick, quiet):
    """Check OUT_DIR against its manifest and the format (and the source, bit for bit)."""
    from .verify import verify as run_verify

    with _silenced(quiet):
        manifest = _run(
            run_verify,
            out_dir=out_dir,
            source=source,
            full=not quick,
            progress=not quiet,
            interrupted="Interrupted: the check did not finish.",
        )
    if quiet:
        return
    checked = "sizes, headers" if quick else "sizes, sha256"
    click.echo(
        f"OK: {len(manifest['files'])} files ({checked}, index, format)" + (", source bit-exact" if source else "")
    )


@main.command(cls=_Command, epilog=EXAMPLES)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private; refused if it exists and is public.")
@click.option("--revision", metavar="BRANCH", help="Push to this branch, created if missing.")
@click.option("--token", help="Hub token (default: HF_TOKEN, else the saved login).")
@click.option("--commit-message", help="Message of the upload commit.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@_quiet_option
def push(quiet, **kwargs):
    """Upload a verified OUT_DIR to the Hugging Face Hub, resumably (files already there are skipped)."""
    from .hub import push as run_push

    with _silenced(quiet):
        _run(
            run_push,
            **kwargs,
            interrupted="Interrupted: run the same command again to resume the push; files already on the Hub are "
            "skipped.",
        )


if __name__ == "__main__":
    main()
