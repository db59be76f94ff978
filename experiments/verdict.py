"""Is a method's win on the cloze real? Paired statistics over the saved runs, no training.

Reads the default job's results of several seeds (each seed its own teacher and initial student)
and the map's runs (experiments.regimes), and compares each method with Full KD, and SE-KD with
RandomPos, on:

- val PPL, every position of the held-out text (a t interval over seeds);
- the cloze at each model's own temperature tau* (a t interval over seeds, and a bootstrap over
  items of each item's NLL difference, averaged over the seeds);
- its control, words new to their window, the same way; and "cloze - control", the part of a
  gap the context could explain (a t interval over seeds);
- the raw cloze, at tau = 1, the measure an earlier verdict rested on.

    python -m experiments.verdict --runs out/regimes_runs.json --default out/s*/results_compare.json

A difference holds only where its 95% interval excludes zero; each table says how many comparisons
it makes. Negative: the first method is better.
"""

import argparse
import json
import re
from collections import defaultdict

import numpy as np

import data
from experiments.stats import paired_bootstrap, paired_t

NAMES = {"Full KD": "full_kd", "SE-KD": "sekd", "RandomPos": "random_pos", "CE (no KD)": "ce"}
NAMES |= {"teacher entropy": "te"}
PAIRS = [("sekd", "full_kd"), ("sekd", "random_pos"), ("te", "full_kd"), ("random_pos", "full_kd")]
PAIRS += [("full_kd", "ce")]


def default_runs(paths):
    """The default job's results of several seeds -> {method: [row of each seed]} in seed order."""
    runs = defaultdict(list)
    for path in sorted(paths):
        for row in json.load(open(path))["rows"]:
            name = NAMES.get(re.sub(r" top \d+%$", "", row["method"]))
            if name:
                runs[name].append(row)
    return runs


def map_runs(path):
    """The map's runs -> {cell: {method: [row of each seed]}}, seeds in order. A key reads
    size|method|lr|steps|lam|ce_at|k|batch|seed; Full KD's (ce_at '-', k1) serves each cell it
    fits."""
    cells, full = defaultdict(lambda: defaultdict(list)), defaultdict(list)
    by_seed = sorted(json.load(open(path)).items(), key=lambda kv: int(kv[0].split("|s")[-1]))
    for key, row in by_seed:
        size, method, lr, steps, lam, ce_at, k, batch, _ = key.split("|")
        if method == "full_kd":
            full[(size, lr, steps, lam, batch)].append(row)
        else:
            cells[(size, lr, steps, lam, ce_at, k, batch)][method].append(row)
    for c, runs in cells.items():
        runs["full_kd"] = full[(*c[:4], c[6])]
    return {" ".join(c): runs for c, runs in cells.items()}


def compare(a, b):
    """A - B over seeds and items; None where a measure is missing."""
    out = {}
    for key in ("val_ppl", "cloze_ppl_tau", "control_ppl_tau", "cloze_ppl", "choice_acc"):
        if all(r.get(key) is not None for r in a + b) and len(a) == len(b) >= 2:
            out[key] = paired_t([r[key] for r in a], [r[key] for r in b])
    for kind in ("cloze_nll_tau", "control_nll_tau", "cloze_nll"):
        if all(r.get(kind) for r in a + b) and len(a) == len(b):
            per_item = np.mean(
                [np.subtract(x[kind], y[kind]) for x, y in zip(a, b, strict=True)], axis=0
            )
            out[kind] = paired_bootstrap(per_item, np.zeros_like(per_item))
    if "cloze_nll_tau" in out and "control_nll_tau" in out and len(a) >= 2:

        def gap(r, kind):  # a model's mean NLL per word
            return float(np.mean(r[kind]))

        out["context_gap"] = paired_t(
            [gap(x, "cloze_nll_tau") - gap(x, "control_nll_tau") for x in a],
            [gap(y, "cloze_nll_tau") - gap(y, "control_nll_tau") for y in b],
        )
    return out


def cell(c, digits=2):
    """'mean [low, high]', bold where it holds."""
    if c is None:
        return "-"
    s = f"{c['mean']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"
    return f"**{s}**" if c["holds"] else s


COLUMNS = [  # header, key, digits
    ("val PPL (t)", "val_ppl", 2),
    ("cloze PPL at tau* (t)", "cloze_ppl_tau", 1),
    ("cloze nats at tau* (items)", "cloze_nll_tau", 3),
    ("control nats at tau* (items)", "control_nll_tau", 3),
    ("cloze - control (t)", "context_gap", 3),
    ("cloze nats at tau 1 (items)", "cloze_nll", 3),
]


def table(title, runs):
    """A markdown table of every pair both of whose methods ran, and the means it compares."""
    lines, n_cmp = [], 0
    head = "| A - B | seeds | " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    lines += [f"### {title}", "", head, "|" + "---|" * (len(COLUMNS) + 2)]
    for a, b in PAIRS:
        if a in runs and b in runs:
            got = compare(runs[a], runs[b])
            n_cmp += sum(k in got for _, k, _ in COLUMNS)
            cells = " | ".join(cell(got.get(k), d) for _, k, d in COLUMNS)
            lines.append(f"| {a} - {b} | {len(runs[a])} | {cells} |")

    def mean(rows, key):
        return np.mean([r[key] for r in rows])

    means = "; ".join(
        f"{m} entropy {mean(rows, 'entropy'):.2f}, tau* {mean(rows, 'tau'):.3f}, "
        f"val PPL {mean(rows, 'val_ppl'):.2f}"
        for m, rows in runs.items()
        if all(r.get("entropy") is not None for r in rows)
    )
    lines += ["", f"{n_cmp} comparisons. Means over seeds: {means}.", ""]
    return "\n".join(lines), n_cmp


def shared_table(paths, vocab_sizes):
    """SE-KD - Full KD at tau* on each vocabulary's items and on those both share (the same window
    end and target count), in each cell of both map files: t over seeds of mean NLL differences."""
    keys = []
    for v in vocab_sizes:
        corpus = data.prepare("shakespeare", 128, False, "data_cache", vocab_size=v)
        items, _ = data.eval_items(corpus, control=True)
        ends = {k: zip(v[-1][:, -1].tolist(), v[2].tolist(), strict=True) for k, v in items.items()}
        keys.append({k: list(ends[k]) for k in ("cloze", "control")})
    cells = [map_runs(path) for path in paths]
    head = "| cell | vocabulary | cloze | shared cloze | control | shared control |"
    lines = ["### SE-KD - Full KD on shared items, nats at tau* (t)", "", head, "|---" * 6 + "|"]
    for name in sorted(set(cells[0]) & set(cells[1])):
        if not all({"sekd", "full_kd"} <= set(c[name]) for c in cells):
            continue
        named = [c[name] for c in cells]
        for runs, v, mine, other in zip(named, vocab_sizes, keys, keys[::-1], strict=True):
            row = []
            for kind in ("cloze", "control"):
                shared = np.array([k in set(other[kind]) for k in mine[kind]])
                for keep in (np.ones_like(shared), shared):
                    a, b = ([r[f"{kind}_nll_tau"] for r in runs[m]] for m in ("sekd", "full_kd"))
                    a, b = ([np.mean(np.array(x)[keep]) for x in rows] for rows in (a, b))
                    row.append(cell(paired_t(a, b), 3))
            lines.append(f"| {name} | {v or 'all'} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--runs", nargs="*", default=[], help="the map's regimes_runs.json files")
    add("--default", nargs="*", default=[], help="the default job's results, a seed each")
    add("--out", default="", help="also write the tables to this markdown file")
    add("--shared", nargs=2, type=int, metavar="V", help="two --runs files' --vocab-size: R3")
    args = p.parse_args(argv)
    tables = [("the default job", default_runs(args.default))] if args.default else []
    for path in args.runs:
        tables += [(f"cell {name} ({path})", runs) for name, runs in map_runs(path).items()]
    parts = [table(title, runs) for title, runs in tables]
    total = sum(n for _, n in parts)
    text = "\n".join(part for part, _ in parts)
    text += f"\nIn all {total} comparisons: about {total / 20:.0f} would hold by chance."
    if args.shared:
        text += "\n\n" + shared_table(args.runs, args.shared)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
