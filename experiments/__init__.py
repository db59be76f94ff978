"""The paper-table runs and tools, each its own entry point that builds on train.py, as nanoGPT
keeps bench.py beside train.py: `python -m experiments.NAME` takes train.py's flags and its own
(`--help` lists them all)."""

import argparse
import os
import time

import torch

import train


def parse_args(argv, name, doc, add_flags=None):
    """train.py's flags, --preset included, and the tool's own group (`add_flags(parser)`), checked
    as train.py checks its own. args.run = name: it names OUT_DIR/results_NAME.json, and the checks
    know the job by it."""
    p = train.build_parser()
    p.prog, p.description = f"python -m experiments.{name}", doc  # shown as written (its commands)
    for action in p._actions:  # --run chooses among train.py's jobs; a tool is a job of its own
        if action.dest == "run":
            action.help = argparse.SUPPRESS
    if add_flags:
        add_flags(p)
    args = train.parse_args(argv, p)
    if args.run != "compare":
        raise train.UserError(
            f"--run {args.run} is a job of python train.py; {p.prog} is a job of its own"
        )
    args.run = name
    train.check_flags(args)
    return args


def with_flags(args, **changes):
    """A copy of the flags `args`, with `changes`."""
    return argparse.Namespace(**{**vars(args), **changes})


def seconds(fn, device):
    """fn()'s wall seconds; on CUDA, from the end of the work queued before it to the end of its."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def one_process(args):
    """A run that cannot share its work out refuses torchrun, in one line, before any work."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise train.UserError(f"{args.run} runs in one process: start it with python, not torchrun")


def run_table(args, table):
    """train.setup (the data, the teacher, the initial student), then `table(args, corpus, device,
    teacher, evalset, student_init)` -> its results, whose "rows" follow the teacher's and the
    initial student's; written to OUT_DIR/results_RUN.json as train.py writes its own."""
    t_start = time.time()
    corpus, device, evalset, teacher, student_init, rows = train.setup(args)
    extra = table(args, corpus, device, teacher, evalset, student_init)
    return train.write_results(args, corpus, t_start, rows=rows + extra.pop("rows", []), **extra)
