"""One training step of each memory flow (experiments/ledger.py) side by side, on random tokens:
measured peak bytes per phase beside the ledger's account, and step times. Then a sweep over B*L, to
show which flows' logit memory grows with the batch (the paper's memory table, at our scale):

    # any flag of train.py
    python -m experiments.benchmark --bench-vocab 50257 --batch-size 2 --seq-len 512
    # the LM head's loss step alone (experiments/head_bench.py)
    python -m experiments.benchmark --head-only
"""

import argparse
import gc
import json
import os
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

import data
import experiments
import train
from experiments import head_bench, ledger

GiB = 2**30


def positive_ints(text):
    """An argparse type: positive integers separated by commas, e.g. 1024,2048 ("" is none)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [0]
    if min(values, default=1) < 1:
        raise argparse.ArgumentTypeError(
            f"takes positive integers separated by commas, e.g. 1024,2048; got '{text}'"
        )
    return values


def add_flags(p):
    """The benchmark's flags (it also reads the model, --batch-size and --seq-len flags)."""
    g = p.add_argument_group("benchmark (on random tokens)")
    add = g.add_argument
    add("--bench-vocab", type=positive_ints, default="151936,50257", help="vocabulary sizes")
    sweep = "B*L of the scaling sweep; empty: none"
    add("--bench-tokens", type=positive_ints, default="1024,2048,4096,8192,16384", help=sweep)
    add("--bench-repeats", type=train.positive_int, default=5, help="timed steps per flow (median)")
    add("--bench-warmup", type=train.non_negative_int, default=2, help="untimed steps per flow")
    add("--bench-mem-gb", type=float, default=0.0, help="skip a row whose analytic peak is above")
    head_bench.add_flags(add, positive_ints)


def free_memory(opt, dev):
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


class PhaseMeter:
    """Measured peak bytes per phase of one step, beside the analytic ones: on CUDA from the
    allocator (reset_peak_memory_stats, max_memory_allocated); on CPU the resident state plus
    train.LiveBytes. On both, LiveBytes also gives the peak of the logits-sized tensors."""

    def __init__(self, dev, resident, V):
        self.cuda, self.resident, self.phases = dev.type == "cuda", resident, {}
        self.meter = train.LiveBytes(match=ledger.logits_sized(V))

    @contextmanager
    def __call__(self, name):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.meter.peak, self.meter.matched_peak = self.meter.live, self.meter.matched_live
        start = torch.cuda.memory_allocated() if self.cuda else self.resident + self.meter.live
        yield
        if self.cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if self.cuda else self.resident + self.meter.peak
        self.phases[name] = {"start": start, "peak": peak, "logit_peak": self.meter.matched_peak}


def bench_step(student, teacher, opt, x, y, flow, args, phase=nullcontext):
    """One training step of `flow`: forward, selection, loss, backward, AdamW step."""
    with train.autocast(args, x.device):
        loss, _ = ledger.flow_loss(
            student, teacher, x, y, flow, args.k, args.T, args.chunk_rows or None, phase
        )
    with phase("backward"):
        loss.backward()
    with phase("optimizer step"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure_flow(student, teacher, opt, x, y, flow, args, dev):
    """Peaks of one step, per phase, split the way the paper's memory table reports them (student
    and teacher apart): teacher = its parameters + what its forward (and selective head)
    allocates; student = the step's peak in the student's phases less the teacher's parameters
    and hidden states; total = the step's peak with both models in one process."""
    adamw = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    resident = train.state_bytes(student, teacher, *[t for t in adamw if t.device == dev])
    pm = PhaseMeter(dev, resident, student.config.vocab_size)
    with pm.meter:
        bench_step(student, teacher, opt, x, y, flow, args, pm)
    ph = pm.phases
    t_params = train.state_bytes(teacher)
    t_hidden = x.numel() * teacher.config.n_embd * 4
    teacher_own = ph["teacher forward"]["peak"] - ph["teacher forward"]["start"]
    if "teacher head" in ph:
        head = ph["teacher head"]
        teacher_own = max(teacher_own, t_hidden + head["peak"] - head["start"])
    held = {"student forward", "selection", "teacher head", "loss"}  # teacher_h is alive
    student_own = max(
        v["peak"] - t_params - (t_hidden if p in held else 0)
        for p, v in ph.items()
        if p != "teacher forward"
    )
    return {
        "phases": ph,
        "total": max(v["peak"] for v in ph.values()),
        "teacher": t_params + teacher_own,
        "student": student_own,
        "logit_peak": max(v["logit_peak"] for v in ph.values()),
    }


def bench_batch(B, V, args, dev):
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    tokens = torch.randint(0, V, (B, args.seq_len + 1), generator=g).to(dev)
    return tokens[:, :-1], tokens[:, 1:]


@contextmanager
def oom_marks(row):
    """A lack of memory in the block marks the row "OOM" (a result, not a crash)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)
        if not oom and "can't allocate memory" not in str(e):
            raise
        row["oom"] = "OOM"


def bench_row(student, teacher, opt, B, flow, args, dev):
    """One flow at batch B: analytic account and measured peaks (after a warm-up step); a row
    whose analytic peak is over --bench-mem-gb is skipped, one that runs out of memory says so."""
    V, L = student.config.vocab_size, args.seq_len
    half = train.autocast(args, dev).fast_dtype == torch.bfloat16
    chunk, cuda = args.chunk_rows or None, dev.type == "cuda"
    acc = ledger.ledger_account(student, teacher, B, L, flow, args.k, chunk, half, cuda, T=args.T)
    row = dict(flow=flow, name=ledger.FLOWS[flow], B=B, L=L, V=V, tokens=B * L, analytic=acc)
    if args.bench_mem_gb and acc["total"] > args.bench_mem_gb * GiB:
        row["oom"] = f"skipped: analytic peak {acc['total'] / GiB:.1f} GiB > --bench-mem-gb"
        return row
    x, y = bench_batch(B, V, args, dev)
    with oom_marks(row):
        bench_step(student, teacher, opt, x, y, flow, args)  # allocator, AdamW state
        row.update(measure_flow(student, teacher, opt, x, y, flow, args, dev))
    free_memory(opt, dev)
    return row


def time_rows(student, teacher, opt, rows, args, dev):
    """Each row's median step seconds (`step_s`) over --bench-repeats steps after --bench-warmup.
    The flows take turns, one step each per round, so that a slow spell of a shared machine
    slows every flow alike and the ratios between them stay fair."""
    live = [(r, []) for r in rows if "oom" not in r]  # each row with its step times
    x, y = bench_batch(rows[0]["B"], rows[0]["V"], args, dev)
    for i in range(args.bench_warmup + args.bench_repeats):
        for r, times in live:
            if "oom" in r:  # ran out of memory in an earlier round
                continue
            with oom_marks(r):
                step_s = experiments.seconds(
                    lambda r=r: bench_step(student, teacher, opt, x, y, r["flow"], args), dev
                )
                if i >= args.bench_warmup:
                    times.append(step_s)
    for r, times in live:
        if "oom" not in r:
            r["step_s"] = float(np.median(times))
    free_memory(opt, dev)
    return rows


def bench_rows(student, teacher, opt, B, args, dev):
    """Every flow at batch B: measured, then timed side by side."""
    rows = [bench_row(student, teacher, opt, B, f, args, dev) for f in ledger.FLOWS]
    return time_rows(student, teacher, opt, rows, args, dev)


def bench_table(V, rows):
    """One step per flow at one vocabulary, the ratios to row 1 (dense)."""
    base = rows[0]
    head = (
        f"{'#':>2} {'flow':<44} {'student GiB':>11} {'teacher GiB':>11} {'total GiB':>9} "
        f"{'(analytic)':>10} "
        f"{'logits GiB':>10} {'(analytic)':>10} {'step ms':>8} {'x mem':>6} {'x time':>6}"
    )
    lines = [f"\nV = {V:,}: one step per flow; ratios to row 1", head, "-" * len(head)]
    for i, r in enumerate(rows, 1):
        if "oom" in r:
            lines.append(f"{i:>2} {r['name']:<44} {r['oom']}")
            continue
        a = r["analytic"]
        ratio_m = f"{r['total'] / base['total']:.2f}" if "total" in base else "-"
        ratio_t = (
            f"{r['step_s'] / base['step_s']:.2f}" if "step_s" in base and "step_s" in r else "-"
        )
        ms = f"{1000 * r['step_s']:.1f}" if "step_s" in r else "-"
        lines.append(
            f"{i:>2} {r['name']:<44} {r['student'] / GiB:>11.3f} {r['teacher'] / GiB:>11.3f} "
            f"{r['total'] / GiB:>9.3f} {a['total'] / GiB:>10.3f} {r['logit_peak'] / GiB:>10.3f} "
            f"{a['logit_peak'] / GiB:>10.3f} {ms:>8} {ratio_m:>6} {ratio_t:>6}"
        )
    return lines


def sweep_tables(V, sweep, grid):
    """The scaling sweep as two tables: memory (logit peak / total peak) and step time (ms, and
    the ratio to the dense flow at the same B*L). A row that ran out of memory says so."""
    dense = grid["dense"]

    def memory(r, i):
        return f"{r['logit_peak'] / GiB:.3f} / {r['total'] / GiB:.2f}"

    def time(r, i):
        ratio = f" ({r['step_s'] / dense[i]['step_s']:.2f}x)" if "step_s" in dense[i] else ""
        return f"{1000 * r['step_s']:.1f}{ratio}"

    lines, cols = [], f"{'flow':<44}" + "".join(f"{t:>18,}" for t in sweep)
    for what, cell in (
        ("measured peak logit bytes (GiB) / total peak (GiB) per B*L", memory),
        ("step ms (time / dense flow's time at the same B*L)", time),
    ):
        lines += [f"\nscaling sweep, V = {V:,}: {what}", cols]
        for f, name in ledger.FLOWS.items():
            # "OOM", or "skipped: ..." (the analytic peak is over --bench-mem-gb)
            cells = (
                r["oom"].split(":")[0] if "oom" in r else cell(r, i) for i, r in enumerate(grid[f])
            )
            lines.append(f"{name:<44}" + "".join(f"{c:>18}" for c in cells))
    return lines


def run(args, device):
    """One training step of each flow side by side, on random tokens, per vocabulary size
    (--bench-vocab); then a sweep over B*L (--bench-tokens) for the first vocabulary. Writes
    OUT_DIR/benchmark.txt (the tables) and OUT_DIR/results_benchmark.json. --head-only:
    head_bench.run."""
    if args.head_only:
        return head_bench.run(args, device)
    vocabs, sweep = args.bench_vocab, args.bench_tokens
    if not vocabs:
        raise train.UserError(
            "--bench-vocab takes positive integers separated by commas, e.g. 151936,50257"
        )
    if any(t % args.seq_len for t in sweep):
        raise train.UserError(
            f"--bench-tokens must be multiples of --seq-len ({args.seq_len}): B = tokens / L"
        )
    where = train.machine()["gpu"] or f"CPU, {torch.get_num_threads()} threads"
    lines = []

    def say(*table):
        print("\n".join(table), flush=True)
        lines.extend(table)

    say(
        f"benchmark on {device} ({where}), torch {torch.__version__}, autocast "
        f"{train.autocast(args, device).fast_dtype}; B={args.batch_size} "
        f"L={args.seq_len} k={args.k}; teacher {args.teacher_layers}x{args.teacher_embd}, student "
        f"{args.student_layers}x{args.student_embd}; median of {args.bench_repeats} steps after "
        f"{args.bench_warmup} warm-up, the flows taking turns"
    )
    result = {"args": vars(args), "machine": train.machine(), "tables": {}, "sweep": []}
    for i, V in enumerate(vocabs):
        torch.manual_seed(args.seed)
        teacher = train.new_model(args, "teacher", V, device).eval().requires_grad_(False)
        student = train.new_model(args, "student", V, device)
        opt = train.make_optimizer(student, 1e-5, args.weight_decay)
        rows = bench_rows(student, teacher, opt, args.batch_size, args, device)
        say(*bench_table(V, rows))
        result["tables"][str(V)] = rows
        if i == 0 and sweep:
            grid = {f: [] for f in ledger.FLOWS}
            for t in sweep:
                for r in bench_rows(student, teacher, opt, t // args.seq_len, args, device):
                    grid[r["flow"]].append(r)
                    result["sweep"].append(r)
            say(*sweep_tables(V, sweep, grid))
        del student, teacher, opt
        free_memory(None, device)
    os.makedirs(args.out_dir, exist_ok=True)
    txt, js = (os.path.join(args.out_dir, f) for f in ("benchmark.txt", "results_benchmark.json"))
    data.atomic_write_bytes(txt, ("\n".join(lines) + "\n").encode())
    data.atomic_write_bytes(js, json.dumps(result, indent=1).encode())
    print(f"tables in {txt}, all numbers in {js}")
    return result


def main(argv=None):
    args = experiments.parse_args(argv, "benchmark", __doc__, add_flags)
    experiments.one_process(args)
    return run(args, train.pick_device(args))


if __name__ == "__main__":
    train.cli(job=main)
