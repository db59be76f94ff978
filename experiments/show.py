"""One validation sequence, each predicted token coloured by the student's entropy, with the
positions two selections pick marked; in the terminal (ANSI) and as an HTML page:

    python -m experiments.show --policy pos_rs_kd --show-sample 3     # and any flag of train.py
"""

import html
import os

import numpy as np
import torch

import data
import experiments
import sekd
import train


def _heat(e, lo, hi):
    """White (the sequence's lowest entropy) to red (its highest) as an (r, g, b) triple."""
    f = 0.0 if hi <= lo else (e - lo) / (hi - lo)
    return 255, int(255 * (1 - f)), int(255 * (1 - f))


def paint(token, rgb, bold=False):
    """One token on a coloured background (`bold`: also bold and underlined); a line break shows as
    ↵ and is made outside the colour."""
    r, g, b = rgb
    style = f"\x1b[48;2;{r};{g};{b}m\x1b[30m" + ("\x1b[1;4m" if bold else "")
    parts = token.replace("\n", "\u21b5\n").split("\n")
    return "\n".join(f"{style}{part}\x1b[0m" if part else "" for part in parts)


def marked_tokens(ids, gpt2_ids, unk, enc):
    """Each token's text, from its original GPT-2 id: a run of tokens a compact vocabulary holds as
    its one id for rare ones (`unk`, which has no text) is marked as ⟨Windsor⟩, its leading space
    outside. -> (texts, rare: bool each)."""
    rare = [unk is not None and int(i) == unk for i in ids]
    texts = [enc.decode([int(g)]) for g in gpt2_ids]
    for t, s in enumerate(texts):
        if rare[t] and (t == 0 or not rare[t - 1]):  # a run begins
            s = s[: len(s) - len(s.lstrip())] + "⟨" + s.lstrip()
        texts[t] = s + ("⟩" if rare[t] and (t + 1 == len(rare) or not rare[t + 1]) else "")
    return texts, rare


def run(args, corpus, device, teacher, evalset, student_init=None):
    """Validation sequence --show-sample, each predicted token coloured by the student's entropy
    H(q_t), the positions selected at budget --k marked: by SE-KD (student entropy, top-k) and by
    --metric with --policy (teacher entropy with top-k when those are SE-KD's own, so that there is
    something to compare). Uses OUT_DIR/student_sekd.pt, trained first if missing; writes
    OUT_DIR/selection.html."""
    path = os.path.join(args.out_dir, "student_sekd.pt")
    if not os.path.exists(path):
        train.distill_student(args, "sekd", corpus, device, teacher, evalset, student_init)
    ckpt = train.load_checkpoint(path, corpus)
    student = train.GPT_from(ckpt).to(device).eval()
    i = min(args.show_sample, len(evalset.x) - 1)
    x, y = evalset.x[i : i + 1], evalset.y[i : i + 1]
    view = (args.metric, args.policy)
    if view == ("student_entropy", "topk"):  # SE-KD's own: compare with teacher entropy
        view = ("teacher_entropy", "topk")
    valid = y >= 0
    torch.manual_seed(args.seed)  # pos-RS-KD's draws
    with torch.no_grad():
        h, w = student.hidden(x).float(), student.head_weight.float()
        th = evalset.teacher_h[i : i + 1]
        ent = sekd.chunked_scores(sekd.student_entropy, h, w, valid)[0]
        picks = {}  # name -> the policy's mask: bool, or pos-RS-KD's draw counts
        for metric, policy in (("student_entropy", "topk"), view):
            scores = sekd.chunked_scores(
                sekd.METRICS[metric], h, w, valid, th, evalset.teacher_w, y
            )
            state = sekd.PositionState(args.gls_queue, args.curriculum_steps)  # as at step 0
            name = metric if policy == "topk" else f"{metric} {policy}"
            picks[name] = sekd.POLICIES[policy](scores, args.k, valid, state)[0]
    other = list(picks)[1]
    enc = data.gpt2_encoding()
    row = int(np.flatnonzero((corpus.val[:, :-1] == x[0].cpu().numpy()).all(1))[0])  # its sample
    gpt2 = data.val_gpt2_ids(corpus)[row]
    (first, *tokens), (_, *rare) = marked_tokens(corpus.val[row], gpt2, corpus.vocab.unk, enc)
    lo, hi = float(ent.min()), float(ent.max())
    blocks = []
    for name, m in picks.items():
        sel = m > 0
        draws = f", {int(m.sum())} draws" if m.dtype != torch.bool else ""
        title = (
            f"{'SE-KD: ' if name == 'student_entropy' else ''}{name}"
            f"{' top' if ' ' not in name else ''} "
            f"{args.k:.0%} ({int(sel.sum())} of {len(tokens)} positions marked{draws}; their mean "
            f"entropy {float(ent[sel].mean()) if sel.any() else 0.0:.2f} nats)"
        )
        ansi = "".join(
            paint(t, _heat(float(e), lo, hi), bool(s))
            for t, s, e in zip(tokens, sel, ent, strict=False)
        )
        print(
            f"\n== {title}  (colour: student entropy, white {lo:.2f} to red {hi:.2f} nats; marked "
            f"= bold underlined; ⟨rare⟩ = the text of a token the vocabulary holds as its one id "
            f"for rare ones)\n"
            f"{first}{ansi}"
        )
        spans = "".join(
            f'<span{" class=rare" if r else ""} title="H={float(e):.2f}" '
            f'style="background:rgb{_heat(float(e), lo, hi)}'
            f'{";outline:2px solid #000;font-weight:bold" if s else ""}">{html.escape(t)}</span>'
            for t, s, e, r in zip(tokens, sel, ent, rare, strict=False)
        )
        blocks.append(
            f"<div><h3>{html.escape(title)}</h3><pre>{html.escape(first)}{spans}</pre></div>"
        )
    overlap = int(((picks["student_entropy"] > 0) & (picks[other] > 0)).sum())
    print(
        f"\nboth selections marked {overlap} of {int((picks[other] > 0).sum())} positions; mean "
        f"entropy over all {int(valid.sum())} positions {float(ent[valid[0]].mean()):.2f} nats"
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>sekd "
        "selection</title><style>body{font-family:sans-serif}"
        "pre{white-space:pre-wrap;font-size:15px;line-height:1.6}.row{display:flex;gap:2em}.row>div{flex:1}"
        ".rare{font-style:italic;color:#036}"
        f"</style><p>Validation sequence {i}; colour = student entropy H(q_t) of the token "
        f"predicted there (white {lo:.2f}, red {hi:.2f} nats); boxed = selected. Both selections "
        f"marked {overlap} positions in common; <span class=rare>⟨italic⟩</span>: a token the "
        "vocabulary holds as one id for all rare ones (its text shown, the model sees that id)</p>"
        f"<div class='row'>{''.join(blocks)}</div>"
    )
    out = os.path.join(args.out_dir, "selection.html")
    data.atomic_write_bytes(out, page.encode())
    print(f"HTML written to {out}")
    return {
        "sample": i,
        "student_entropy": ent.tolist(),
        "selected": {n: s.tolist() for n, s in picks.items()},
        "html": out,
    }


def add_flags(p):
    shown = "the validation sequence shown"
    p.add_argument_group("show").add_argument(
        "--show-sample", type=train.non_negative_int, default=0, help=shown
    )


def main(argv=None):
    args = experiments.parse_args(argv, "show", __doc__, add_flags)
    experiments.one_process(args)
    return experiments.run_table(args, run)


if __name__ == "__main__":
    train.cli(job=main)
