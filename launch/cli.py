"""The ``ldm`` console script. Each verb lives in its own module under ``launch/`` with
``add_arguments(parser)`` and ``run(args)``; this file only wires them.

Errors: a `ldm.errors.UserError` (a bad value, a wrong kind of folder, an id out of range, ...)
is printed as ONE line, ``ldm VERB: error: ...``, and the command exits with status 2; under
torchrun / the DeepSpeed launcher / srun only the first rank of each node prints it. Every other
exception is a bug and shows its traceback. ``--debug`` (anywhere on the command line) or
``LDM_DEBUG=1`` shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import os
import re
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version

from ldm.errors import UserError

# verb -> (module, help)
VERBS: dict[str, tuple[str, str]] = {  # keep in sync with the README's verb table
    "list": ("launch.list_models", "list registered autoencoders and DiTs with their compression"),
    "data": ("launch.data_cmd", "dataset tools (synth: generate the synthetic attribute video set)"),
    "convert": ("launch.convert", "released weights (official IV-VAE / VideoVAE+, diffusers SD / CogVideoX VAEs) -> our format"),
    "train-ae": ("launch.train_ae", "train an autoencoder on videos"),
    "extract": ("launch.extract", "encode videos into WebDataset latent shards"),
    "reconstruct": ("launch.reconstruct", "encode+decode a video, print PSNR/SSIM"),
    "train": ("launch.train", "train a DiT on latent shards with DeepSpeed"),
    "sample": ("launch.sample", "sample videos from prompts or class labels"),
    "demo": ("launch.demo", "the whole pipeline on a laptop CPU with a report (make demo)"),
    "cost": ("launch.cost", "downstream cost per autoencoder: tokens, DiT FLOPs and training memory, no weights"),
    "eval": ("launch.evaluate", "quality: recon (PSNR/SSIM/LPIPS/rFVD) and gen (FVD/FID, attributes, VBench)"),
    "compare": ("launch.compare", "autoencoders side by side: same clips, same DiT, cost and quality report"),
}
RANKED_VERBS = ("train", "train-ae", "extract", "sample", "eval")  # the others run as one process
OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")  # a `key=value` override of train / train-ae / extract
DEBUG_ENV = "LDM_DEBUG"


def package_version() -> str:
    try:
        return version("ldm-video")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def switch_value(text: str) -> bool | str:
    """A ``true | false | auto`` flag's value as the configs hold it (``launch.engine.resolve_switch``)."""
    value = {"true": True, "false": False, "auto": "auto"}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}")
    return value


def config_flag(parser: argparse.ArgumentParser, config_cls: type, *names: str, **kwargs) -> argparse.Action:
    """A flag that is a shorthand of a key of the config dataclass ``config_cls`` (``ldm train-ae``,
    ``ldm extract``: ``--config FILE.yaml`` + flags + ``key=value``): absent from the parsed
    arguments unless given, so the YAML's value or the dataclass default applies; ``--help`` shows
    the dataclass default."""
    action = parser.add_argument(*names, default=argparse.SUPPRESS, **kwargs)
    field = config_cls.__dataclass_fields__.get(action.dest)
    if field is not None and field.default is not dataclasses.MISSING:
        action.config_default = field.default
    return action


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default: X)`` to the help of every option of ``parser`` (and of its sub-commands)
    that has a default worth showing and whose help does not state one already."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)
            continue
        default = getattr(action, "config_default", action.default)  # config_flag: the dataclass default
        if (not action.option_strings or action.help == argparse.SUPPRESS or default is None
                or default is False or default == argparse.SUPPRESS or default in ([], ())):
            continue
        text = action.help or ""
        if "default" not in text.lower():
            action.help = f"{text} (default: {str(default).replace('%', '%%')})".strip()


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser with every verb listed; only ``verb``'s module is imported (fast start-up, and a
    verb whose optional dependencies are missing cannot break the others)."""
    parser = argparse.ArgumentParser(prog="ldm", description="Latent-diffusion video platform")
    parser.add_argument("--version", action="version", version=f"ldm {package_version()}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of user errors too (also: {DEBUG_ENV}=1); anywhere on the line")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            _show_defaults(p)
            p.set_defaults(_run=mod.run)
    return parser


class Stopped(Exception):
    """A verb stopped by a signal after keeping what it finished (``ldm extract`` under SIGTERM, a
    scheduler's preemption): `console` prints its message as ``ldm VERB: MESSAGE`` (none when empty:
    another rank says it) and exits with 128 + the signal's number (143 for SIGTERM), as a process
    the signal ended, so schedulers and shells see the run as interrupted."""

    def __init__(self, signal_name: str, message: str = "") -> None:
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + int(getattr(signal, self.signal_name))


def _first_rank_of_node() -> bool:
    """True unless this is a launcher's second or later process on its node."""
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    return local.strip() in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the verb; exceptions propagate (the programmatic entry, used by tests
    and by verbs that run others in-process). `console` is the process entry."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # the `deepspeed` launcher inserts --local_rank=N after the module; the rank also comes in
    # LOCAL_RANK, which launch.dist reads, so drop the flag wherever it is
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank=")) and a != "--debug"]
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb)
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all(OVERRIDE.match(x) for x in extra):
        args.overrides = [*(args.overrides or []), *extra]  # key=value after a flag (argparse takes one run)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.verb not in RANKED_VERBS:
        check_one_process(args.verb)
    if getattr(args, "config", None) is not None:  # train, train-ae, extract, demo: a path or a built-in name
        from launch.configs import check_verb, config_path
        given, args.config = args.config, config_path(args.config)
        check_verb(args.verb, args.config, given)
    return int(args._run(args) or 0)


def check_one_process(verb: str) -> None:
    """A verb that runs as one process, started by a launcher with several ranks: a `UserError`
    saying how to run it (was: every rank did the whole work into the same files)."""
    from launch.dist import dist_env

    env = dist_env()
    if env.world_size == 1:
        return
    hint = {"compare": "; `--nproc N` runs its trainings on N ranks"}.get(verb, "")
    raise UserError(f"ldm {verb} runs as one process, not on {env.world_size} ranks ({env.source}): start it "
                    f"without the launcher{hint} (the verbs that take ranks: {', '.join(RANKED_VERBS)})")


def _print_stacks_on_crash() -> None:
    """`faulthandler` on the process's own stderr (not a replaced ``sys.stderr``, which may have no file)."""
    import faulthandler

    try:
        faulthandler.enable(file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no stderr file at all (an embedding host): nowhere to print
        pass


def console(argv: list[str] | None = None) -> int:
    """The ``ldm`` command: `main`, with a `UserError` turned into one line on stderr and exit
    status 2 (``--debug`` / ``LDM_DEBUG=1``: the traceback instead). A crash in native code (a
    segmentation fault or an abort in a CUDA, NCCL or gloo library) prints every thread's Python stack
    (`faulthandler`): where it happened, for the report (was: the process died without a word).

    As the program (no ``argv``: the ``ldm`` script, ``python -m launch.cli`` under a launcher), a
    process that started a process group ends without the interpreter's teardown, where the group's
    worker threads could abort it after its work was done (`dist.exit_without_teardown`); an error
    that escapes the verb prints its traceback first, with exit status 1 as Python gives it."""
    as_program = argv is None
    try:
        status = _verb_status(argv)
    except Exception:
        if not (as_program and _started_a_group()):
            raise
        sys.excepthook(*sys.exc_info())
        status = 1
    if as_program and _started_a_group():
        sys.modules["launch.dist"].exit_without_teardown(status)
    return status


def _started_a_group() -> bool:
    """`dist.joined_a_group`, without importing torch for the verbs that never did."""
    return "launch.dist" in sys.modules and sys.modules["launch.dist"].joined_a_group()


def _verb_status(argv: list[str] | None) -> int:
    """`console`'s work: the verb's exit status, the errors it knows turned into their lines."""
    _print_stacks_on_crash()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    default_format = warnings.formatwarning
    if not debug:
        warnings.formatwarning = own_warning_format(_command([a for a in argv if a != "--debug"]), default_format)
    try:
        return main(argv)
    except BrokenPipeError:  # `ldm list --json | head`: the reader has gone, as for any command-line tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe ended
    except KeyboardInterrupt:  # a second Ctrl-C in a trainer (the first stops it with a checkpoint), or any other verb
        if debug:
            raise
        print(f"{_command([a for a in argv if a != '--debug'])}: interrupted", file=sys.stderr)
        return 130
    except Stopped as e:
        if debug:
            raise
        if str(e):
            print(f"{_command([a for a in argv if a != '--debug'])}: {e}", file=sys.stderr)
        return e.exit_code
    except UserError as e:
        if debug:
            raise
        line = f"{_command([a for a in argv if a != '--debug'])}: error: {' '.join(str(e).split())}"
        if _first_rank_of_node():
            print(line, file=sys.stderr)
        else:
            _let_the_first_rank_report(line)
        return 2
    except RuntimeError as e:  # a reader process killed (the kernel's OOM killer): not a bug of the verb
        if debug or not READER_DIED.search(str(e)):
            raise
        print(f"{_command([a for a in argv if a != '--debug'])}: error: {READER_DIED_ADVICE} ({e})".strip(),
              file=sys.stderr)
        return 1
    except OSError as e:  # the disk is full or cannot be written: the message says which file and what to do
        if debug or e.errno not in STORAGE_ERRNOS:
            raise
        what = e.strerror if e.filename is None and e.strerror else str(e)
        print(f"{_command([a for a in argv if a != '--debug'])}: error: {' '.join(what.split())}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = default_format


OWN_PACKAGES = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name, "")
                     for name in ("autoencoders", "data", "dit", "launch", "ldm"))


def own_warning_format(command: str, default):
    """`warnings.formatwarning` for the ``ldm`` command: a UserWarning of this project's code is one
    line ``ldm VERB: warning: ...`` (was: Python's ``/path/to/file.py:131: UserWarning: ...`` and the
    source line); any other warning (a library's deprecation, ...) keeps Python's format."""
    def fmt(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(OWN_PACKAGES):
            return f"{command}: warning: {' '.join(str(message).split())}\n"
        return default(message, category, filename, lineno, line)
    return fmt


# torch's words for a DataLoader worker gone without an error of its own: killed by a signal, or exited
READER_DIED = re.compile(r"DataLoader worker \(pid(\(s\))? [\d, ]+\) (is killed by signal|exited unexpectedly)")
READER_DIED_ADVICE = ("a reader process (decoding videos or reading shards) died, most often killed by the kernel for "
                      "lack of memory; what was finished is kept, and the same command resumes: give fewer workers "
                      "(--num-workers, data.num_workers) or a smaller batch")
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EFBIG)
ERROR_GRACE_S = 5.0  # how long a second or later rank waits for the node's first rank to print an error


def _let_the_first_rank_report(line: str) -> None:
    """On a second or later rank of a node: wait before exiting, so the first rank prints the error
    (a bad flag or config fails on every rank) before a launcher that stops all ranks when one
    exits (torchrun, deepspeed) stops it. Still running after the wait under torchrun means the
    first rank did not fail: the error is this rank's own, so print it, with the rank."""
    import time

    time.sleep(ERROR_GRACE_S)
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        print(f"{line} (rank {os.environ.get('RANK', '?')})", file=sys.stderr)


def _command(argv: list[str]) -> str:
    """``ldm VERB [SUBCOMMAND]`` as typed: the leading plain words of ``argv`` (at most two)."""
    words = []
    for a in argv:
        if not re.fullmatch(r"[a-z][a-z-]*", a) or len(words) == 2:
            break
        words.append(a)
    return " ".join(["ldm", *words])


if __name__ == "__main__":  # `python -m launch.cli` (torchrun): the console of `launch.cli`, whose
    # exception classes (`Stopped`) are the ones the verbs import, not this `__main__` copy's
    sys.exit(importlib.import_module("launch.cli").console())
