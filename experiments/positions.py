"""The paper's position-axis tables at small scale, each row --seeds students:

    python -m experiments.positions --seeds 2 --student-steps 60     # and any flag of train.py

(1) every importance metric with top-k, beside Full KD, RandomPos and AT-KD; (2) student entropy
with every selection policy; (3) the budget sweep BUDGETS for student entropy and reverse KL.
"""

import numpy as np

import experiments
import sekd
import train

BUDGETS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
SUMMARY_KEYS = (
    "val_ppl kl_to_teacher agreement ece cloze_ppl cloze_acc cloze_ece choice_acc train_s "
    "tokens_per_s peak_bytes"
).split()


def mean_std_row(label, per_seed, keys=SUMMARY_KEYS):
    """One table row: the mean and sample std over seeds of each metric (std None for one seed),
    plus the seeds' rows. The axes table builds its mean ± std from it too."""
    row = {"method": label, "seeds": per_seed}
    for key in keys:
        vals = [r[key] for r in per_seed if r.get(key) is not None]
        if vals:
            row[key] = float(np.mean(vals))
            row[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return row


def run(args, corpus, device, teacher, evalset, student_init=None):
    """The three tables, printed as they fill and again together at the end. We train a
    configuration that appears in several tables once. -> {"tables", "seeds",
    "students_trained"}."""
    seeds = [args.seed + i for i in range(args.seeds)]
    done, common = {}, (corpus, device, teacher, evalset, student_init)

    def row(label, method, **kd):
        key = (method, tuple(sorted(kd.items())))
        if key not in done:
            flags = [experiments.with_flags(args, seed=s) for s in seeds]
            done[key] = [train.distill_student(a, method, *common, save=False, **kd) for a in flags]
        return mean_std_row(label, done[key])

    k = args.k
    steps_S = min(args.curriculum_steps, args.student_steps)
    if steps_S < args.curriculum_steps:
        print(
            f"note: curriculum slides over {steps_S} steps (--student-steps), not "
            f"--curriculum-steps {args.curriculum_steps}, so that it reaches the top window within "
            "training"
        )
    tables = {}
    tables["metrics"] = [row("Full KD", "full_kd")]
    for m in sekd.METRICS:
        tables["metrics"].append(
            row(f"RandomPos {k:.0%} (random)", "random_pos", k=k)
            if m == "random"
            else row(f"{m} top {k:.0%}", "sekd", metric=m, policy="topk", k=k)
        )
    tables["metrics"].append(row("AT-KD", "at_kd"))
    train.print_table(tables["metrics"], device, f"(1) metrics, top {k:.0%}, {len(seeds)} seed(s)")
    labels = {"curriculum": f"curriculum (S={steps_S})", "gls": f"gls (queue {args.gls_queue:,})"}
    tables["policies"] = []
    for p in sekd.POLICIES:
        extra = {"curriculum_steps": steps_S} if p == "curriculum" else {}
        label = f"student_entropy {labels.get(p, p)} {k:.0%}"
        tables["policies"].append(
            row(label, "sekd", metric="student_entropy", policy=p, k=k, **extra)
        )
    train.print_table(tables["policies"], device, f"(2) policies, student entropy, k = {k:.0%}")
    tables["budget"] = []
    for m in ("student_entropy", "reverse_kl"):
        for b in BUDGETS:  # top-100% selects every position: that is Full KD
            tables["budget"].append(
                row(f"{m} top 100% (= Full KD)", "full_kd")
                if b == 1.0
                else row(f"{m} top {b:.0%}", "sekd", metric=m, policy="topk", k=b)
            )
    train.print_table(tables["budget"], device, "(3) budget sweep")
    for name, rows in tables.items():  # the three tables again, together at the end
        train.print_table(rows, device, f"table: {name}")
    return {"tables": tables, "seeds": seeds, "students_trained": len(done) * len(seeds)}


def main(argv=None):
    return experiments.run_table(experiments.parse_args(argv, "positions", __doc__), run)


if __name__ == "__main__":
    train.cli(job=main)
