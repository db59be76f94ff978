"""The paper's multi-axis table (positions, classes, samples), its wall-time table and its storage
table, at small scale. The axes themselves (TopSmp / RandomSmp samples, SE-KD_3X's offline teacher
cache) are train.py's `sample_plan`, which every `--method` trains on:

    # the three tables
    python -m experiments.axes --seeds 3
    # the wall-time rows alone, one seed
    python -m experiments.axes --table walltime --student-steps 654
    # the storage accounting; trains nothing
    python -m experiments.axes --table storage
"""

import os

import data
import experiments
import train
from experiments.positions import mean_std_row


AXES_TABLE = (
    "full_kd random_pos random_smp sekd rskd top_smp top_smp_rskd sekd_top_smp sekd_3x"
).split()
WALL_TABLE = ("full_kd", "random_pos", "top_smp", "sekd_3x")
# the storage table's rows: key -> (label, the paper's TB)
STORAGE_ROWS = {
    "full_fp16": ("Full KD, fp16 logits", 10_000),
    "rskd": ("RS-KD cache", 19.2),
    "sekd_3x": ("SE-KD_3X cache", 3.84),
    "ce": ("plain CE (ids)", 0.3),
}


def add_flags(p):
    tables = "axes: the multi-axis table, then wall time and storage; walltime: its rows alone; "
    tables += "storage: no training"
    add = p.add_argument_group("axes").add_argument
    add("--table", default="axes", choices=["axes", "walltime", "storage"], help=tables)


def run(args, corpus, device, teacher, evalset, student_init=None):
    """--table axes: the multi-axis table (AXES_TABLE, --seeds seeds), the wall-time table (first
    seed; SE-KD_3X once building its cache, then once reusing it) and the storage table.
    --table walltime: the wall-time rows only, one seed."""
    rows, walls, common = [], [], (corpus, device, teacher, evalset, student_init)
    table, seeds = (WALL_TABLE, 1) if args.table == "walltime" else (AXES_TABLE, args.seeds)
    for i in range(seeds):
        a = experiments.with_flags(args, seed=args.seed + i)
        for m in table:
            # SE-KD_3X builds its cache, to time a build
            b = experiments.with_flags(a, rebuild_cache=True) if m == "sekd_3x" else a
            rows.append({**train.distill_student(b, m, *common), "seed": a.seed, "key": m})
            train.print_table([r for r in rows if r["seed"] == a.seed], device)
        if i == 0:  # and once more, reusing the cache
            reuse = train.distill_student(a, "sekd_3x", *common)
            walls = [r for r in rows if r["key"] in WALL_TABLE]
            walls.append({**reuse, "seed": a.seed, "key": "sekd_3x_reuse"})
    summary = print_axes_table(rows)
    print_walltime_table(walls)
    return {"rows": rows, "summary": summary, "walltime": walls, "storage": storage(args, corpus)}


def print_axes_table(rows):
    """Mean and sample standard deviation over seeds of each method's metrics. -> summary dict."""
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    cols = dict(val_ppl="val PPL", kl_to_teacher="KL(T||S)", agreement="agree %", ece="ECE %")
    n_seeds = max(len(v) for v in by_method.values())
    print(f"\nmulti-axis table, mean ± std over {n_seeds} seed(s)")
    labels = "".join(f" {label:>16}" for label in cols.values())
    head = f"{'method':<22}{labels} {'steps':>6} {'samples':>8}"
    print(head + "\n" + "-" * len(head))
    out = {}
    for name, rs in by_method.items():
        # scaled before averaging, so that agreement's mean is that of the percentages
        scaled = [{key: r[key] * (100 if key == "agreement" else 1) for key in cols} for r in rs]
        row = mean_std_row(name, scaled, cols)
        # one seed: std 0
        out[name] = {k: dict(mean=row[k], std=row[k + "_std"] or 0.0, n=len(rs)) for k in cols}
        cells = "".join(f" {v['mean']:>9.3f} ± {v['std']:<5.3f}" for v in out[name].values())
        print(f"{name:<22}{cells} {rs[0]['steps']:>6} {rs[0]['n_kept']:>8,}")
    return out


def print_walltime_table(walls):
    def s(v):
        return "-" if v is None else f"{v:.1f}s"

    full = next((r["total_s"] for r in walls if r["key"] == "full_kd"), None)
    print("\nwall-time table (seconds; total = pre-pass + cache build + training)")
    head = (
        f"{'method':<28} {'pre-pass':>9} {'cache':>8} {'train':>8} {'total':>8} {'vs Full KD':>10}"
    )
    print(head + "\n" + "-" * len(head))
    names = {"sekd_3x": "SE-KD_3X (building cache)", "sekd_3x_reuse": "SE-KD_3X (reusing cache)"}
    for r in walls:
        name = names.get(r["key"], r["method"])
        rel = f"{100 * (r['total_s'] / full - 1):+.0f}%" if full else "-"
        print(
            f"{name:<28} {s(r['prepass_s']):>9} {s(r['cache_build_s']):>8} {s(r['train_s']):>8} "
            f"{s(r['total_s']):>8} {rel:>10}"
        )


def storage(args, corpus):
    """The paper's storage table: bytes per position of each way to ship the teacher's signal, at
    the paper's scale (V = 100,000, U = 64, l = 0.2, 10^11 tokens) and for this corpus and flags;
    then the teacher cache on disk (train.out_path), if there is one, against its
    accounting. -> dict."""
    paper = data.storage_bytes_per_position(100_000, 64, 0.2)
    here = data.storage_bytes_per_position(corpus.vocab.size, args.U, args.l)
    n_here = len(corpus.train) * args.seq_len
    print(
        "\nstorage per training position (paper scale: V = 100,000, U = 64, l = 0.2, 100 B tokens; "
        f"here: V = {corpus.vocab.size:,}, U = {args.U}, l = {args.l}, {n_here:,} positions)"
    )
    head = (
        f"{'method':<22} {'B/pos':>10} {'TB @100B':>10} {'paper TB':>9} "
        f"{'B/pos here':>11} {'MiB here':>10}"
    )
    print(head + "\n" + "-" * len(head))
    out = {"paper_scale": paper, "here": here, "positions_here": n_here}
    for key, (label, paper_tb) in STORAGE_ROWS.items():
        print(
            f"{label:<22} {paper[key]:>10,.1f} {paper[key] * 1e11 / 1e12:>10,.2f} {paper_tb:>9,} "
            f"{here[key]:>11,.1f} {here[key] * n_here / 2**20:>10,.2f}"
        )
    print(
        "(2 bytes x 100,000 logits x 10^11 positions = 20,000 TB; the paper's 10,000 TB matches 1 "
        "byte per logit)"
    )
    cache_path = train.out_path(args, "cache")
    if os.path.exists(cache_path):
        cache = data.TeacherCache(cache_path)
        n_pos, real = cache.shape[0] * cache.shape[1], os.path.getsize(cache_path)
        rskd = data.storage_bytes_per_position(cache.signature["V"], cache.signature["U"])["rskd"]
        predicted = n_pos * rskd
        out["cache"] = dict(path=cache_path, bytes=real, positions=n_pos)
        out["cache"].update(accounted_bytes=predicted, header_bytes=cache.offset)
        print(
            f"cache on disk {cache_path}: {real:,} bytes for {n_pos:,} positions = "
            f"{real / n_pos:.2f} B/position; accounting {predicted:,} bytes "
            f"({100 * (real - predicted) / predicted:+.3f}%: the {cache.offset}-byte header); per "
            f"position of the whole training set {real / n_here:.2f} B"
        )
    return out


def main(argv=None):
    args = experiments.parse_args(argv, "axes", __doc__, add_flags)
    args.run = args.table  # OUT_DIR/results_axes.json, results_walltime.json
    if args.table == "storage":
        experiments.one_process(args)
        return {"storage": storage(args, train.load_data(args)[0])}
    return experiments.run_table(args, run)


if __name__ == "__main__":
    train.cli(job=main)
