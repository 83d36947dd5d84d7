"""`distqat <command> [config.yaml] [key=value ...]` (also `python -m trainer`); `distqat convert <folder> --out`."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from safetensors import SafetensorError

from qat.io.atomic import check_dir
from qat.io.lock import LOCK_FILE, FolderLock
from qat.io.signals import EXIT_STOPPED, Stopped, record_exit, stop_on_signals
from qat.keys import COVERAGE_KEY, MANIFEST_FILE

from .config import ConfigError, RunConfig, command_reads, describe_schema, load_config, override_keys, reads, to_yaml

RUN = ("name", "output_dir")


@dataclass(frozen=True)
class Command:
    help: str
    # The config sections the command's code takes (a section reads all its keys, "data:text" the keys of that
    # group, a plain name one key), and those it leaves alone: its --help lists their keys, and its command line
    # may set no others (a recipe may: one file serves several commands).
    sections: tuple[str, ...] = ()
    run: Optional[Callable[[RunConfig], int]] = None
    skips: tuple[str, ...] = ()

    @property
    def reads(self) -> tuple[str, ...]:
        """The key patterns (fnmatch; "!" leaves out) derived from the sections."""
        return command_reads(self.sections, self.skips)


def _run_eval(cfg: RunConfig) -> int:
    from .commands import prepare_output  # lazy: --help start-up
    from .eval import run_eval  # lazy: --help start-up (eval pulls transformers and datasets)

    prepare_output(Path(cfg.output_dir))
    run_eval(cfg)
    return 0


def _run_generate(cfg: RunConfig) -> int:
    from .commands import run_generate  # lazy: --help start-up

    out = run_generate(cfg)
    manifest = out / MANIFEST_FILE
    if manifest.exists():
        m = json.loads(manifest.read_text())
        print(f"{m['samples']} samples, {m['tokens']} tokens in {out}")
    else:
        print(f"this rank's shards are in {out}; the manifest follows when every rank is done")
    return 0


def _run_train(cfg: RunConfig) -> int:
    from .train import run_train  # lazy: --help start-up (Lightning takes seconds to import)

    print(f"trained model: {run_train(cfg)}")
    return 0


def _run_ptq(cfg: RunConfig) -> int:
    from .commands import ptq_command  # lazy: --help start-up

    result = ptq_command(cfg)
    print(f"quantized model: {result['model_dir']}")
    return 0


def _run_pipeline(cfg: RunConfig) -> int:
    from .pipeline import run_pipeline  # lazy: --help start-up (Lightning takes seconds to import)

    run_pipeline(cfg)
    return 0


def _run_report(cfg: RunConfig) -> int:
    from .eval import run_report  # lazy: --help start-up

    run_report(cfg)
    return 0


# A PTQ start (train.init=<method>) runs with the ptq section's settings but train.init's method, and a baseline
# (llm_int8) trains nothing; QLoRA's merge reads some of them too.
NOT_FOR_A_START = ("ptq.method", "ptq.llm_int8")

COMMANDS: dict[str, Command] = {
    "generate": Command("the teacher writes its own training text (LLM-QAT data-free)",
                        (*RUN, "seed", "model", "generate", "lora:use"), _run_generate),
    "train": Command("QAT: distill the full-precision teacher into the fake-quantized student",
                     (*RUN, "seed", "model", "quant", "data", "train", "distributed", "lora", "ptq"), _run_train,
                     skips=(*NOT_FOR_A_START, "lora.adapter")),
    "ptq": Command("post-training quantization (RTN, GPTQ, AWQ, SmoothQuant, LLM.int8(), HQQ, AQLM; rotation)",
                   (*RUN, "model", "quant", "data:text", "ptq"), _run_ptq),
    "convert": Command("pack a trained or PTQ model into integer weights (compressed-tensors layout)"),
    # The pipeline scores every model it compares (eval.compare is its own) and trains with train.mode=qat.
    "pipeline": Command("LLM-QAT end to end: generate, train, then score FP, the RTN start, the PTQ baseline and the "
                        "trained student",
                        (*RUN, "seed", "model", "quant", "data", "generate", "train", "distributed", "ptq", "eval"),
                        _run_pipeline, skips=(*NOT_FOR_A_START, "eval.compare")),
    "eval": Command("perplexity of the full-precision and the fake-quantized model, with a plot; lm-eval tasks",
                    (*RUN, "model", "quant", "data:text", "eval", "lora:use"), _run_eval),
    "bench": Command("speed benchmarks, each as a ratio to bf16"),
    "report": Command("collect the results of runs into one table and plot", RUN, _run_report),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distqat",
        description="Distributed quantization-aware training for LLMs.",
        epilog="Each command but convert and bench takes an optional recipe YAML then key=value overrides, e.g.\n"
        "  distqat eval configs/default.yaml quant.scheme=w4g64 eval.max_tokens=4096\n"
        "  distqat convert runs/default/model --out runs/default/int\n"
        "A failure ends in one line 'distqat <command>: error: ...' (exit 2 for bad input, 130 when interrupted);\n"
        "--debug (or DISTQAT_DEBUG=1) shows the traceback instead.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, cmd in COMMANDS.items():
        if name == "convert":
            p = sub.add_parser(name, help=cmd.help, description=f"{cmd.help}. It reads no config keys.")
            p.add_argument("folder", help="the folder distqat train (its model/) or distqat ptq wrote")
            p.add_argument("--out", help="the integer checkpoint's folder (default: <folder>-int)")
            continue
        options = f"config keys {name} reads (key=default {{allowed values}} or [range], then what it does):\n" + \
            "\n".join(describe_schema(only=cmd.reads))
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=options,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", nargs="?", help="recipe YAML (e.g. configs/default.yaml); omitted: defaults")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def bench_names() -> list[str]:
    """The benchmarks: the modules of the bench package (installed with distqat) but the shared ones, named _*."""
    try:
        # Looked up when `bench` runs: an installation without the package still runs every other command.
        package = importlib.import_module("bench")
    except ModuleNotFoundError:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def run_bench(argv: list[str]) -> int:
    """`distqat bench <name> [args]`: bench.<name>.main(args), each benchmark printing its table."""
    names = bench_names()
    if not names:
        print("distqat bench: error: this installation lacks the bench package; install distqat from a clone of the "
              "repository (pip install -e .)", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        usage = f"usage: distqat bench <name> [args]   (names: {', '.join(names)}; " \
                "`distqat bench <name> --help` for its options)"
        if argv:
            print(usage)
            return 0
        print(f"distqat bench: error: name a benchmark, one of {', '.join(names)} "
              "(`distqat bench <name> --help` for its options)", file=sys.stderr)
        return 2
    name = argv[0]
    if name not in names:
        print(f"distqat bench: error: no benchmark {name!r}; choose one of {names}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    # sys.argv[0] as `python -m bench.<name>` sets it: argparse's program name, and the command a result records.
    argv0, sys.argv = sys.argv, [module.__file__, *argv[1:]]
    try:
        return int(module.main(argv[1:]) or 0)
    except SystemExit as e:  # argparse's --help (0) and usage errors (2)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    finally:
        sys.argv = argv0


def run_convert(folder: str, out: Optional[str]) -> int:
    from qat.export import convert_folder  # lazy: --help start-up

    path = convert_folder(Path(folder), Path(out or f"{folder.rstrip('/')}-int"))
    print(f"integer checkpoint: {path}")
    coverage = json.loads((path / "config.json").read_text()).get(COVERAGE_KEY)
    if coverage:
        print(f"convert: {coverage['share']:.2%} of the decoder's {coverage['weight_elements']:,} weight elements "
              "stored as integer or fp8 codes", file=sys.stderr)
    return 0


def _load(args: argparse.Namespace) -> RunConfig:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # no recipe, only overrides
    cfg = load_config(config, overrides)
    if not args.print_config:
        wanted = COMMANDS[args.command].reads
        for key in override_keys(overrides):
            if not reads(wanted, key):
                raise ConfigError(f"{args.command} does not read '{key}' (command line); it reads: "
                                  f"{', '.join(p for p in wanted if not p.startswith('!'))}"
                                  + "".join(f", not {p[1:]}" for p in wanted if p.startswith("!")))
    return cfg


def _tell_peers(message: Optional[str], error: Optional[BaseException] = None) -> None:
    """In a multi-process run, the other ranks learn how this one ended (trainer/watchdog.py): in order (None), or
    failed; a failed collective first waits for the watch to name the rank that died."""
    watchdog = sys.modules.get("trainer.watchdog")  # imported only by a run that trains
    if watchdog is None:
        return
    if message is None:
        watchdog.finished()
        return
    text = f"{type(error).__name__}: {message}" if error is not None else message
    watchdog.on_failure(text, communication=_is_communication(error))


def _is_communication(error: Optional[BaseException]) -> bool:
    """A collective that failed (a peer's socket closed, a timeout): torch's DistError, or gloo's and NCCL's own
    RuntimeErrors, which name themselves."""
    if error is None:
        return False
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed",
                                                                        "Connection reset", "Broken pipe"))


def one_line(e: BaseException) -> str:
    """An exception's message on one line (transformers and datasets spread theirs over several)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


# Failures a user causes with a file, a folder or a value: one line and exit 2. Anything else is a bug: one
# line naming its type and exit 1 (`--debug` shows the traceback of either).
USER_ERRORS = (ValueError, OSError, SafetensorError)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "bench":  # the scripts take their own arguments, not config overrides
        return run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        out = Path(args.out or f"{args.folder.rstrip('/')}-int")
        # Its folder is replaced whole at the end (a lock inside would go with it): the lock sits beside it.
        with stop_on_signals(), _locked(out.parent, "convert", f".{out.name}.distqat.lock", "--out"):
            return run_convert(args.folder, str(out))
    cfg = _load(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from .quiet import quiet_libraries  # lazy: --help start-up (it imports torch)

    quiet_libraries()
    # Until training starts (trainer/faults.py then finishes the step and checkpoints first), a stop signal ends
    # the command where it lands; the atomic writers drop their temp paths and keep what was finished.
    with stop_on_signals(cfg.train.stop_signals), _locked(*_writes(args.command, cfg)):
        return COMMANDS[args.command].run(cfg)


def _writes(command: str, cfg: RunConfig) -> tuple[Optional[Path], str, str, str]:
    """The folder a command writes (None: only whole files into an existing folder), its lock's name, its key."""
    if command == "generate":
        g = cfg.generate
        return (Path(g.out_dir) if g.out_dir else Path(cfg.output_dir) / "generated"), command, LOCK_FILE, \
            "generate.out_dir"
    if command == "report":
        return None, command, LOCK_FILE, ""
    return Path(cfg.output_dir), command, LOCK_FILE, "output_dir"


@contextmanager
def _locked(folder: Optional[Path], command: str, name: str, key: str) -> Iterator[None]:
    """The output folder held by this run (rank 0 holds it for all ranks of a multi-process run); a second run
    on it is refused in one line naming the holder."""
    from qat.io.env import rank_world  # lazy: it imports torch, which --help does without

    if folder is None or rank_world()[0] != 0:
        yield
        return
    check_dir(folder, key)  # the clear refusal of an unwritable folder comes before the lock's own mkdir
    with FolderLock(folder, f"distqat {command}", name=name):
        yield


def main(argv: Optional[list[str]] = None) -> int:
    code = _main(argv)
    record_exit(code)
    return code


def _main(argv: Optional[list[str]]) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("DISTQAT_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), "")
    who = f"distqat {command}" if command in COMMANDS else "distqat"
    try:
        code = _dispatch(argv)
        if "torch.distributed" in sys.modules:  # lazy: a command that made a process group imported it, --help not
            from qat.io.env import end_process_group

            end_process_group()
        return code
    except KeyboardInterrupt:
        _tell_peers("interrupted")
        if debug:
            raise
        print(f"{who}: interrupted", file=sys.stderr)
        return 130
    except Stopped as e:  # a cluster's stop signal: what was finished is kept; a rerun continues
        _tell_peers(None)
        print(f"{who}: {e} (exit {EXIT_STOPPED})", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as e:  # the one place every failure becomes one line
        _tell_peers(one_line(e), e)
        if debug:
            raise
        if isinstance(e, (ConfigError, *USER_ERRORS)):
            print(f"{who}: error: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"{who}: error: {type(e).__name__}: {one_line(e)} (unexpected; rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
