"""The teacher's and every saved student's continuations of the same validation prompts, each
generated token coloured by that model's own entropy at that step; trains nothing:

    # and any flag of train.py
    python -m experiments.sample --sample-prompts 5 --sample-temperature 0
"""

import json
import os
import sys

import numpy as np
import torch

import data
import experiments
import train
from experiments.show import _heat, marked_tokens, paint


def add_flags(p):
    add = p.add_argument_group("text samples (uses the checkpoints in --out-dir)").add_argument
    positive, at_least_0 = train.positive_int, train.number(float, lambda v: v >= 0, ">= 0")
    spread = "prompts, spread over the validation plays"
    add("--sample-prompts", type=positive, default=3, help=spread)
    add("--sample-prompt-len", type=positive, default=24, help="tokens per prompt")
    add("--sample-len", type=positive, default=40, help="tokens each model generates per prompt")
    add("--sample-temperature", type=at_least_0, default=0.8, help="0 = greedy")
    top_k = "sample among the k likeliest ids; 0 = all"
    add("--sample-top-k", type=train.non_negative_int, default=0, help=top_k)


def sample_prompts(corpus, n, length, enc):
    """n prompts of `length` tokens spread evenly over the validation plays, each starting just
    after a line break or a document's end (a speaker's name or a verse line, in the plays), if
    one comes within 200 tokens. -> (long [n, length], start offsets)."""
    stream = np.asarray(corpus.val).reshape(-1).astype(np.int64)
    if len(stream) < length + 1:
        raise train.UserError(
            f"the validation split has {len(stream)} tokens, too few for "
            f"--sample-prompt-len {length}"
        )
    last = len(stream) - length

    starts, eot = [], enc.decode([enc.eot_token])
    for s in np.linspace(0, max(0, last - 200), n).astype(np.int64).tolist():
        texts = [corpus.vocab.decode([stream[i]], enc) for i in range(s, min(s + 200, last))]
        breaks = [s + i + 1 for i, t in enumerate(texts) if "\n" in t or t == eot]
        starts.append(breaks[0] if breaks else s)
    return torch.from_numpy(np.stack([stream[s : s + length] for s in starts])), starts


def saved_students(out_dir):
    """The students to sample from: OUT_DIR/student_<name>.pt (written by distillation runs, and
    student_init.pt), the initial student first, then CE, Full KD, SE-KD, the rest by name."""
    names = sorted(
        f[8:-3]
        for f in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
        if f.startswith("student_") and f.endswith(".pt")
    )
    first = ["init", "ce", "full_kd", "sekd"]
    names.sort(key=lambda n: (first.index(n) if n in first else len(first), n))
    if not [n for n in names if n != "init"]:
        raise train.UserError(
            f"no trained students (student_<method>.pt) in {out_dir}: run `python train.py` "
            "there (writes student_ce.pt, student_full_kd.pt, student_sekd.pt) or `python train.py "
            "--run distill --method METHOD` with this --out-dir"
        )
    return [(f"student_{n}", os.path.join(out_dir, f"student_{n}.pt")) for n in names]


def colour_enabled():
    """ANSI colour only on a terminal, and not when NO_COLOR is set (no-color.org)."""
    return not os.environ.get("NO_COLOR") and sys.stdout.isatty()


def run(args, corpus, device):
    """--sample-prompts validation prompts, and each model's continuation of them
    (the teacher, then every saved student), one block under the other; each generated token is
    coloured by that model's own entropy H(q_t) at that step (the student_entropy metric: what SE-KD
    selects by). Same --seed, same text. A prompt shows its rare tokens' text marked ⟨so⟩; a model
    never draws the vocabulary's id for them (it has no text)."""
    models = [("teacher", train.out_path(args, "teacher"))] + saved_students(args.out_dir)
    enc = data.gpt2_encoding()
    prompts, starts = sample_prompts(corpus, args.sample_prompts, args.sample_prompt_len, enc)
    gpt2 = data.val_gpt2_ids(corpus).reshape(-1)
    shown = [
        "".join(marked_tokens(p.tolist(), gpt2[s : s + len(p)], corpus.vocab.unk, enc)[0])
        for p, s in zip(prompts, starts, strict=True)
    ]
    text, entropy = {}, {}
    for name, path in models:
        ckpt = train.load_checkpoint(path, corpus)
        model = train.GPT_from(ckpt).to(device).eval()
        g = torch.Generator(device=device).manual_seed(args.seed)
        how = (args.sample_len, args.sample_temperature, args.sample_top_k, g)
        out, ent = model.generate(prompts.to(device), *how, ban=corpus.vocab.unk)
        text[name] = [
            [corpus.vocab.decode([int(t)], enc) for t in row[prompts.shape[1] :]]
            for row in out.cpu()
        ]
        entropy[name] = ent.cpu().tolist()
    colour = colour_enabled()
    hi = max(max(max(row) for row in e) for e in entropy.values())
    note = f"; colour = the model's own entropy at that step, white 0 to red {hi:.2f} nats"
    print(
        f"\n{len(prompts)} validation prompts of {prompts.shape[1]} tokens, {args.sample_len} new "
        f"tokens per model, temperature {args.sample_temperature}, top-k "
        f"{args.sample_top_k or 'off'}, seed {args.seed}{note if colour else ''}"
    )
    for i, start in enumerate(starts):
        print(f"\n=== prompt {i + 1} (validation token {start:,})\n{shown[i]}")
        for name, _ in models:
            tokens, ent = text[name][i], entropy[name][i]
            if colour:
                tokens = [paint(t, _heat(e, 0.0, hi)) for t, e in zip(tokens, ent, strict=False)]
            print(f"--- {name}, mean entropy {np.mean(ent):.2f} nats\n{''.join(tokens)}")
    result = {
        "prompt_starts": starts,
        "prompts": shown,
        "continuations": {n: ["".join(t) for t in rows] for n, rows in text.items()},
        "entropy": entropy,
        "args": vars(args),
    }
    path = os.path.join(args.out_dir, "results_sample.json")
    data.atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    print(f"\ntext and per-token entropies written to {path}")
    return result


def main(argv=None):
    args = experiments.parse_args(argv, "sample", __doc__, add_flags)
    return run(args, *train.load_data(args))


if __name__ == "__main__":
    train.cli(job=main)
