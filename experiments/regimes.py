"""A map of when selective KD works at small scale. Each cell is a regime (student
size, distillation lr, steps, lambda, where CE goes, budget k); in each we train Full KD, SE-KD,
RandomPos (and in some teacher entropy) from the same initial student on the same batches, --seeds
seeds each, and report the paired gaps SE-KD - Full KD and SE-KD - RandomPos (the mean over seeds
and its 95% t interval) in val PPL, KL to the teacher and top-1 agreement, also on the "hard"
positions (the initial student's top 20% entropy), and on the paper's kind of measure: the cloze of
hard words, raw and at each model's own temperature, its control, and multiple choice
(train.EvalSet). Every item's NLL is kept, for `experiments.verdict`'s bootstrap over items.

Before any training, a diagnosis of each initial student on validation data: what SE-KD's positions
are (student and teacher entropy, student CE, KL, the norm of the KL gradient per row) against
random ones, and how well the student's entropy predicts the KL (Pearson correlation).

Every finished student is kept in OUT_DIR/regimes_runs.json, so a stopped run resumes where it was:

    # and any flag of train.py
    python -m experiments.regimes --cells A,B --seeds 3
    # a 2x160 student beats the quick default's teacher
    python -m experiments.regimes --preset full --cells C,H
"""

import json
import os

import numpy as np
import torch

import data
import experiments
import sekd
import train
from experiments.positions import mean_std_row
from experiments.stats import paired_t

# name -> (student "LxD", lr, steps, lam, ce_at, k, methods); cells run in this order, the most
# telling first. "1x64kd": an initial student pretrained by Full KD from the teacher, not by CE, as
# the paper's was (Qwen3-1.7B came out of distillation from larger Qwen3 models). K: a long, gentle
# distillation, 5x the steps at a low lr.
THREE = ("full_kd", "sekd", "random_pos")
FOUR = THREE + ("te",)  # teacher entropy: a flatter student, a check on what the cloze rewards
CELLS = {
    "A  1x64 lr1e-3 lam1": ("1x64", 1e-3, 120, 1.0, "selected", 0.2, FOUR),
    "B  1x64 lr1e-4 lam1": ("1x64", 1e-4, 120, 1.0, "selected", 0.2, THREE),
    "C  2x160 lr1e-4 lam1": ("2x160", 1e-4, 120, 1.0, "selected", 0.2, THREE),
    "D  1x64 lr1e-3 lam.5 Eq.3": ("1x64", 1e-3, 120, 0.5, "selected", 0.2, THREE),
    "E  1x64 lr1e-3 lam.5 CE-all": ("1x64", 1e-3, 120, 0.5, "all", 0.2, FOUR),
    "F  1x64 lr1e-3 lam1 k.5": ("1x64", 1e-3, 120, 1.0, "selected", 0.5, THREE),
    "G  1x64 lr3e-4 lam1": ("1x64", 3e-4, 120, 1.0, "selected", 0.2, THREE),
    "H  2x160 lr1e-3 lam1": ("2x160", 1e-3, 120, 1.0, "selected", 0.2, THREE),
    "I  1x64 lr1e-3 lam1 480 steps": ("1x64", 1e-3, 480, 1.0, "selected", 0.2, THREE),
    "J  1x64 distilled init lam1": ("1x64kd", 1e-3, 120, 1.0, "selected", 0.2, THREE),
    "K  1x64 lr2e-4 lam1 600 steps": ("1x64", 2e-4, 600, 1.0, "selected", 0.2, FOUR),
}
# a method of a cell -> (train.distill_student's method, KDConfig overrides, label)
METHODS = {
    "full_kd": ("full_kd", {}, "Full KD"),
    "sekd": ("sekd", {}, "SE-KD"),
    "random_pos": ("random_pos", {}, "RandomPos"),
    "te": ("sekd", {"metric": "teacher_entropy"}, "teacher entropy"),
    "pos_rs_kd": ("sekd", {"policy": "pos_rs_kd"}, "pos-RS-KD"),
    "rskd": ("rskd", {}, "RS-KD"),
    "top_smp": ("top_smp", {}, "TopSmp"),
    "random_smp": ("random_smp", {}, "RandomSmp"),
}
KEYS = (
    "val_ppl val_ppl_tau tau entropy cloze_ppl_tau control_ppl control_ppl_tau context_nats "
    "kl_to_teacher agreement hard_kl hard_agreement cloze_ppl cloze_acc choice_acc"
).split()

ITEM_NLL = ("cloze_nll", "cloze_nll_tau", "control_nll", "control_nll_tau")


def add_flags(p):
    add = p.add_argument_group("regimes").add_argument
    add("--cells", default="", help="comma-separated cell letters to run (default: all, in order)")
    batch = "sequences per step in the cells (the teacher and initial students keep --batch-size)"
    add("--cell-batch", type=train.positive_int, default=8, help=batch)


def student_args(args, size):
    """The flags of a student size: 1x64 is the default initial student; others live in their own
    folder."""
    layers, embd = (int(v) for v in size.removesuffix("kd").split("x"))
    if (layers, embd) == (args.student_layers, args.student_embd) and not size.endswith("kd"):
        return args
    return experiments.with_flags(
        args,
        student_layers=layers,
        student_embd=embd,
        student_heads=2,
        out_dir=os.path.join(args.out_dir, f"regimes_{size}"),
        teacher_ckpt=train.out_path(args, "teacher"),
    )


@torch.no_grad()
def position_stats(model, evalset, k=0.2, seed=0, decode=None):
    """Per validation position: the student's entropy, the teacher's, the student's CE, KL(p || q),
    and the norm of the KL's logit gradient |q - p|; then means at SE-KD's top-k and at random k,
    and the input tokens SE-KD's positions most often read."""
    cols = {n: [] for n in ("s_ent", "t_ent", "s_ce", "kl", "grad")}
    for i in range(0, len(evalset.x), evalset.bs):
        x, y = evalset.x[i : i + evalset.bs], evalset.y[i : i + evalset.bs]
        zs = model.head(model.hidden(x)).float()
        zt = evalset.teacher_h[i : i + evalset.bs] @ evalset.teacher_w.T
        p, q = zt.softmax(-1), zs.softmax(-1)
        for n, v in (
            ("s_ent", sekd.token_entropy(zs)),
            ("t_ent", sekd.token_entropy(zt)),
            ("s_ce", torch.nn.functional.cross_entropy(zs.transpose(1, 2), y, reduction="none")),
            ("kl", sekd.kl_per_position(zt, zs)),
            ("grad", (q - p).norm(dim=-1)),
        ):
            cols[n].append(v)
    c = {n: torch.cat(v) for n, v in cols.items()}
    valid = torch.ones_like(c["s_ent"], dtype=torch.bool)
    top = sekd.topk_positions(c["s_ent"], k, valid)
    rand = sekd.topk_positions(
        torch.rand(c["s_ent"].shape, generator=torch.Generator().manual_seed(seed)), k, valid
    )
    out = {
        "corr_sent_kl": float(np.corrcoef(c["s_ent"].flatten(), c["kl"].flatten())[0, 1]),
        "corr_sent_tent": float(np.corrcoef(c["s_ent"].flatten(), c["t_ent"].flatten())[0, 1]),
    }
    for tag, m in (("top", top), ("random", rand)):
        out[tag] = {n: float(v[m].mean()) for n, v in c.items()}
        out[tag]["kl_share"] = float(c["kl"][m].sum() / c["kl"].sum())
        ids, counts = evalset.x[m].unique(return_counts=True)
        out[tag]["inputs"] = [
            (decode(int(i)) if decode else int(i), round(float(n) / int(m.sum()), 3))
            for n, i in sorted(zip(counts.tolist(), ids.tolist(), strict=True), reverse=True)[:8]
        ]
    return out, top


class WithHard:
    """The evaluation set, whose `evaluate` adds KL to the teacher and top-1 agreement at the `hard`
    positions (those the initial student was least sure of): where SE-KD puts its loss."""

    def __init__(self, evalset, hard):
        self.evalset, self.hard = evalset, hard

    @torch.no_grad()
    def evaluate(self, model, args):
        e, kl, agree = self.evalset, [], []
        for i in range(0, len(e.x), e.bs):
            zs = model.head(model.hidden(e.x[i : i + e.bs])).float()
            zt = e.teacher_h[i : i + e.bs] @ e.teacher_w.T
            m = self.hard[i : i + e.bs]
            kl.append(sekd.kl_per_position(zt, zs)[m])
            agree.append((zs.argmax(-1) == zt.argmax(-1))[m])
        return {
            **e.evaluate(model, args),
            "hard_kl": float(torch.cat(kl).mean()),
            "hard_agreement": float(torch.cat(agree).float().mean()),
        }


def distilled_init(a, corpus, device, teacher, evalset):
    """An initial student pretrained by Full KD (lambda = 1) from random weights, for
    --student-init-steps at --student-init-lr, in its own folder; reused once finished."""
    a = experiments.with_flags(
        a, lr=a.student_init_lr, student_steps=a.student_init_steps, lam=1.0, seed=a.seed + 2
    )
    path = os.path.join(a.out_dir, "student_full_kd.pt")
    ckpt = train.load_checkpoint(path) if os.path.exists(path) else {}
    if ckpt.get("step") != a.student_init_steps:
        print(f"[regimes] an initial student distilled from the teacher: {path}")
        train.distill_student(a, "full_kd", corpus, device, teacher, evalset)
        ckpt = train.load_checkpoint(path)
    return train.GPT_from(ckpt).to(device)


def paired_gap(a_rows, b_rows, key):
    """The mean over seeds of a - b, seed by seed (both methods saw the same batches), and the half
    width of its 95% t interval (None for one seed)."""
    pairs = [
        (a[key], b[key]) for a, b in zip(a_rows, b_rows, strict=False) if a.get(key) and b.get(key)
    ]
    if len(pairs) < 2:
        return (pairs[0][0] - pairs[0][1] if pairs else None), None
    t = paired_t(*zip(*pairs, strict=True))
    return t["mean"], t["high"] - t["mean"]


def run(args, corpus, device, teacher, evalset, student_init=None):
    path = os.path.join(args.out_dir, "regimes_runs.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    wanted = [c for c in CELLS if not args.cells or c[0] in args.cells.upper().split(",")]
    inits, diagnosis, cells = {}, {}, {}
    batch = args.cell_batch
    teacher_ppl = evalset.evaluate(teacher, args, limit=len(evalset.x))["val_ppl"]
    enc = data.gpt2_encoding()
    decode = lambda i: corpus.vocab.decode([i], enc)  # noqa: E731
    for name in wanted:
        size, lr, steps, lam, ce_at, k, methods = CELLS[name]
        if size not in inits:
            a = student_args(args, size)
            if a is args:
                model = student_init
            elif size.endswith("kd"):
                model = distilled_init(a, corpus, device, teacher, evalset)
            else:
                model = train.pretrained(a, corpus, device, evalset, "student")[0]
            model.eval()
            diagnosis[size], hard = position_stats(model, evalset, seed=args.seed, decode=decode)
            hard_eval = WithHard(evalset, hard)
            diagnosis[size].update(hard_eval.evaluate(model, args), teacher_val_ppl=teacher_ppl)
            inits[size] = (a, model, hard_eval)
            print_diagnosis(size, diagnosis[size])
        a, model, hard_eval = inits[size]
        cell = dict(lr=lr, student_steps=steps, lam=lam, ce_at=ce_at, k=k, batch_size=batch)
        rows = {m: [] for m in methods}
        for m in methods:
            for s in range(args.seed, args.seed + args.seeds):
                # Full KD is the same run whatever k and where the CE goes
                where, budget = ("-", 1) if m == "full_kd" else (ce_at, k)
                key = f"{size}|{m}|lr{lr:g}|{steps}|lam{lam:g}|{where}|k{budget:g}|b{batch}|s{s}"
                if key not in done:
                    ca = experiments.with_flags(a, seed=s, **cell)
                    method, kd, _ = METHODS[m]
                    r = train.distill_student(
                        ca, method, corpus, device, teacher, hard_eval, model, save=False, **kd
                    )
                    done[key] = {x: r.get(x) for x in [*KEYS, "ece", "train_s"]}
                    for x in ITEM_NLL:  # every item's, to pair two students item by item
                        done[key][x] = [round(v, 5) for v in r.get(x, [])]
                    data.atomic_write_bytes(path, json.dumps(done, indent=1).encode())
                rows[m].append(done[key])
        cells[name] = summarise(name, rows)
        print_cell(cells[name])
    plot(cells, diagnosis, os.path.join(args.out_dir, "regimes.png"))
    regimes = dict(cells=cells, diagnosis=diagnosis, cell_batch=batch, seeds=args.seeds)
    return {"regimes": regimes}


def summarise(name, rows):
    means = {m: mean_std_row(METHODS[m][2], r, keys=KEYS) for m, r in rows.items()}
    out = {"cell": name, "rows": means}
    for other in ("full_kd", "random_pos"):
        if other in rows and "sekd" in rows:
            out[f"sekd-{other}"] = {key: paired_gap(rows["sekd"], rows[other], key) for key in KEYS}
    return out


def print_diagnosis(size, d):
    print(
        f"\n[regimes] initial student {size}: val PPL {d['val_ppl']:.2f}; corr(student entropy, "
        f"KL) {d['corr_sent_kl']:.2f}, corr(student entropy, teacher entropy) "
        f"{d['corr_sent_tent']:.2f}"
    )
    if d["val_ppl"] <= d["teacher_val_ppl"]:
        print(
            f"  note: this student is already better than the teacher (val PPL "
            f"{d['teacher_val_ppl']:.2f}), so its cells distil from a weaker model; run them with "
            "a stronger teacher (e.g. --preset full)"
        )
    print(
        f"  {'positions':<14} {'student H':>9} {'teacher H':>9} {'student CE':>10} {'KL':>6} "
        f"{'|q - p|':>7} {'KL share':>8}"
    )
    for tag, label in (("top", "SE-KD top 20%"), ("random", "random 20%")):
        r = d[tag]
        print(
            f"  {label:<14} {r['s_ent']:9.2f} {r['t_ent']:9.2f} {r['s_ce']:10.2f} {r['kl']:6.3f} "
            f"{r['grad']:7.3f} {r['kl_share']:8.0%}"
        )
        print(f"  {'':<14} inputs: " + ", ".join(f"{t!r} {share:.0%}" for t, share in r["inputs"]))


def print_cell(c):
    print(f"\n[regimes] {c['cell']}")
    for r in c["rows"].values():
        print(
            f"  {r['method']:<16} ppl {r['val_ppl']:8.2f} ± {r.get('val_ppl_std') or 0:5.2f}   "
            f"KL {r['kl_to_teacher']:.4f} ± {r.get('kl_to_teacher_std') or 0:.4f}   "
            f"agree {100 * r['agreement']:.2f} ± {100 * (r.get('agreement_std') or 0):.2f}   "
            f"cloze ppl {r.get('cloze_ppl', float('nan')):8.1f} ± "
            f"{r.get('cloze_ppl_std') or 0:5.1f}   "
            f"choice {100 * r.get('choice_acc', float('nan')):.2f} ± "
            f"{100 * (r.get('choice_acc_std') or 0):.2f}"
        )
    for g in ("sekd-full_kd", "sekd-random_pos"):  # a mean over seeds ± its 95% t half width
        if g in c:
            gaps = [f"{k} {m:+.4f} ± {h or 0:.4f}" for k, (m, h) in c[g].items() if m is not None]
            print(f"  {g:<16} " + "   ".join(gaps))


def plot(cells, diagnosis, path):
    """The paired gaps SE-KD - Full KD and SE-KD - RandomPos per cell, in val PPL, in the cloze's
    PPL at each model's own temperature and at tau = 1, and in KL to the teacher: the mean over
    seeds and its 95% t interval. Below 0, SE-KD is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c in cells if "sekd-full_kd" in cells[c] or "sekd-random_pos" in cells[c]]
    fig, axes = plt.subplots(1, 4, figsize=(20, 0.5 * len(names) + 2.5), sharey=True)
    units = {
        "val_ppl": "val PPL",
        "cloze_ppl_tau": "cloze PPL at tau* (calibrated)",
        "cloze_ppl": "cloze PPL at tau 1",
        "kl_to_teacher": "KL(teacher || student)",
    }
    for ax, (key, unit) in zip(axes, units.items(), strict=True):
        for j, other in enumerate(("full_kd", "random_pos")):  # C0: blue, C1: orange
            gap, label = f"sekd-{other}", f"SE-KD - {METHODS[other][2]}"
            at = [(i, cells[c][gap][key]) for i, c in enumerate(names) if gap in cells[c]]
            ys = [i + 0.15 * (1 - 2 * j) for i, _ in at]
            m = [np.nan if mean is None else mean for _, (mean, _) in at]
            e = [sd or 0 for _, (_, sd) in at]
            ax.errorbar(m, ys, xerr=e, fmt="o", color=f"C{j}", capsize=3, label=label)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"gap in {unit} (< 0: SE-KD better)")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    axes[0].legend(loc="best")
    corr = ", ".join(f"{size}: {d['corr_sent_kl']:.2f}" for size, d in diagnosis.items())
    fig.suptitle(
        "SE-KD (student entropy, top k) against Full KD and RandomPos: the paired gap's mean over "
        f"seeds and its 95% t interval; corr(student entropy, KL) {corr}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    return experiments.run_table(experiments.parse_args(argv, "regimes", __doc__, add_flags), run)


if __name__ == "__main__":
    train.cli(job=main)
