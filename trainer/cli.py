"""`distqat <command> [config.yaml] [key=value ...]` (also `python -m trainer`); `distqat convert <folder> --out`."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from safetensors import SafetensorError

from qat.keys import MANIFEST_FILE

from .config import ConfigError, RunConfig, describe_schema, load_config, override_keys, reads, to_yaml

MODEL = ("model.*",)
RUN = ("name", "output_dir")
EVAL = ("eval.split", "eval.max_tokens", "eval.seq_len", "eval.batch_size", "eval.plot", "eval.tasks",
        "eval.task_dir", "eval.task_limit", "eval.num_fewshot")


@dataclass(frozen=True)
class Command:
    help: str
    # The config keys (fnmatch patterns) the command reads: its --help lists them, and its command line may
    # set no others (a recipe may: one file serves several commands).
    reads: tuple[str, ...]
    run: Optional[Callable[[RunConfig], int]] = None


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


# The PTQ settings train.init=<method> runs with (its method is train.init's; QLoRA's merge reads some too).
PTQ_SETTINGS = ("ptq.calib_data", "ptq.calib_split", "ptq.n_samples", "ptq.seq_len", "ptq.batch_size", "ptq.device",
                "ptq.seed", "ptq.progress", "ptq.gptq.*", "ptq.awq.*", "ptq.smoothquant.*", "ptq.hqq.*", "ptq.aqlm.*",
                "ptq.rotate.*")

COMMANDS: dict[str, Command] = {
    "generate": Command("the teacher writes its own training text (LLM-QAT data-free)",
                        (*RUN, "seed", *MODEL, "generate.*"), _run_generate),
    "train": Command("QAT: distill the full-precision teacher into the fake-quantized student",
                     (*RUN, "seed", "model.*", "quant.*", "data.*", "train.*", "distributed.*", "lora.*",
                      *PTQ_SETTINGS), _run_train),
    "ptq": Command("post-training quantization (RTN, GPTQ, AWQ, SmoothQuant, LLM.int8(), HQQ, AQLM; rotation)",
                   (*RUN, *MODEL, "quant.*", "data.path", "data.text_field", "ptq.*"), _run_ptq),
    "convert": Command("pack a trained or PTQ model into integer weights (compressed-tensors layout)", ()),
    "pipeline": Command("LLM-QAT end to end: generate, train, then score FP, the RTN start, the PTQ baseline and the "
                        "trained student",
                        (*RUN, "seed", *MODEL, "quant.*", "data.*", "generate.*", "train.*", "distributed.*",
                         *PTQ_SETTINGS, *EVAL), _run_pipeline),
    "eval": Command("perplexity of the full-precision and the fake-quantized model, with a plot; lm-eval tasks",
                    (*RUN, *MODEL, "quant.*", "data.path", "data.text_field", "eval.*"), _run_eval),
    "bench": Command("speed benchmarks, each as a ratio to bf16", ()),
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
        options = f"config keys {name} reads (key=default {{allowed values}}):\n" + "\n".join(
            describe_schema(only=cmd.reads))
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=options,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", nargs="?", help="recipe YAML (e.g. configs/default.yaml); omitted: defaults")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def run_bench(argv: list[str]) -> int:
    """`distqat bench <name> [args]`: run bench/<name>.py with its own arguments (each prints its table)."""
    names = sorted(p.stem for p in BENCH_DIR.glob("[!_]*.py")) if BENCH_DIR.is_dir() else []  # _*: shared code
    if not names:
        print("distqat bench: error: the benchmarks live in the source checkout's bench/ folder, which this "
              "installation lacks; run from a clone of the repository", file=sys.stderr)
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
    # As a module of the bench package (python -m bench.<name>): a script's folder on sys.path would shadow
    # installed packages of the same name (bench/kernels.py once hid Hugging Face's `kernels` from transformers).
    if str(BENCH_DIR.parent) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR.parent))
    sys.argv = [str(BENCH_DIR / f"{name}.py"), *argv[1:]]
    try:
        runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)
    except SystemExit as e:  # the scripts end with SystemExit(main())
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    return 0


def run_convert(folder: str, out: Optional[str]) -> int:
    from qat.export import convert_folder  # lazy: --help start-up

    path = convert_folder(Path(folder), Path(out or f"{folder.rstrip('/')}-int"))
    print(f"integer checkpoint: {path}")
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
                                  f"{', '.join(wanted)}")
    return cfg


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
        return run_convert(args.folder, args.out)
    cfg = _load(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from .quiet import quiet_libraries  # lazy: --help start-up (it imports torch)

    quiet_libraries()
    return COMMANDS[args.command].run(cfg)


def main(argv: Optional[list[str]] = None) -> int:
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
        if debug:
            raise
        print(f"{who}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the one place every failure becomes one line
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
