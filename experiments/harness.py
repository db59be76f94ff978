"""Any sekd checkpoint scored by lm-eval-harness (pip install -r requirements-tools.txt), through
our own tokenizer and vocabulary, compact ones too; our items are lm-eval tasks; trains nothing:

    python -m experiments.harness --ckpt out/student_sekd.pt out/student_full_kd.pt
    python -m experiments.harness --ckpt out/student_sekd.pt --tasks sekd_cloze,lambada_openai

Our cloze and multiple choice (data.eval_items) are written to OUT_DIR/lm_eval_tasks as JSONL and
YAML (sekd_cloze, sekd_choice), and each model is scored on them by train.EvalSet too: the two
scorers side by side (results/harness_cpu.md). The paper's tasks need the Hub: docs/fineweb.md.
"""

import functools
import json
import os
from contextlib import nullcontext

import numpy as np
import torch

import data
import experiments
import sekd
import train

try:  # optional (requirements-tools.txt): only this tool and its tests need it
    import lm_eval
    from lm_eval.api.model import TemplateLM
except ImportError:
    lm_eval, TemplateLM = None, object

# Each kind of our items -> its lm-eval task's output type, and its metrics: lm-eval's name ->
# EvalSet's. Our choice normalises by the option's bytes: lm-eval's acc_bytes (acc_norm counts
# characters, the same on ASCII text).
TASKS = {
    "cloze": ("loglikelihood", {"perplexity": "cloze_ppl", "acc": "cloze_acc"}),
    "choice": ("multiple_choice", {"acc_bytes": "choice_acc", "acc_norm": None, "acc": None}),
}


@functools.cache
def gpt2():
    return data.gpt2_encoding()


class SekdLM(TemplateLM):
    """lm-eval's model of a sekd.GPT (None: it only tokenizes). Text -> GPT-2 ids -> our ids
    (`vocab`); lm-eval's TemplateLM splits a request into context and continuation as its `hf`
    model does; we score the last block_size + 1 tokens as one sample, as train.EvalSet an item."""

    def __init__(self, model, vocab, batch_size=16, dtype=None):
        super().__init__()
        self.model, self.vocab, self.bs, self.dtype = model, vocab, batch_size, dtype

    @property
    def eot_token_id(self):  # before a text with no context
        return self.tok_encode("<|endoftext|>")[0]

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        ids = gpt2().encode(string, allowed_special="all")
        return self.vocab.encode(np.array(ids, dtype=np.int64)).tolist()

    def hidden(self, x):
        dev, dtype = self.model.wte.weight.device, self.dtype
        with torch.autocast(dev.type, dtype=dtype) if dtype else nullcontext():
            return self.model.eval().hidden(x.to(dev)).float()

    @torch.no_grad()
    def score(self, pairs):
        """[(context ids, continuation ids)] -> [(log-likelihood, whether greedy)]. Targets are -1
        but at the continuation's, and the LM head runs in chunks of rows, as in train.EvalSet."""
        out, L = [], self.model.config.block_size
        for i in range(0, len(pairs), self.bs):
            rows = [(c + t)[-L - 1 :] for c, t in pairs[i : i + self.bs]]
            x = torch.zeros(len(rows), max(map(len, rows)) - 1, dtype=torch.long)
            y = torch.full_like(x, -1)
            for r, (row, (_, t)) in enumerate(zip(rows, pairs[i : i + self.bs], strict=True)):
                x[r, : len(row) - 1] = torch.tensor(row[:-1])  # padded after: a causal model
                n = min(len(t), len(row) - 1)  # never looks there
                y[r, len(row) - 1 - n : len(row) - 1] = torch.tensor(row[len(row) - n :])
            w = self.model.head_weight.float()
            s = sekd.evaluation_sums(self.hidden(x), w, None, None, y.to(w.device))
            sample = (y >= 0).nonzero()[:, 0]  # of each target, in order
            nll = train.per_item(sample, torch.cat(s["nll"]), len(rows))
            wrong = train.per_item(sample, ~torch.cat(s["correct"]), len(rows))
            out += [(-a, b == 0) for a, b in zip(nll.tolist(), wrong.tolist(), strict=True)]
        return out

    def _loglikelihood_tokens(self, requests, **kwargs):
        return self.score([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """A whole text's log-likelihood: lm-eval's windows, each token scored once."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out, L = [], self.model.config.block_size
        for r in requests:
            windows = get_rolling_token_windows(self.tok_encode(r.args[0]), self.eot_token_id, L, 1)
            out.append(sum(ll for ll, _ in self.score(list(map(make_disjoint_window, windows)))))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        """Greedy, to a stop string or max_gen_toks; never the id of unseen tokens (no text)."""
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            ids, text = self.tok_encode(context) or [self.eot_token_id], ""
            start = len(ids)
            for _ in range(kwargs.get("max_gen_toks", 256)):
                x = torch.tensor([ids[-self.model.config.block_size :]])
                logits = self.model.head(self.hidden(x)[0, -1])
                if self.vocab.unk is not None:
                    logits[self.vocab.unk] = -float("inf")
                ids.append(int(logits.argmax()))
                text = self.vocab.decode(ids[start:], gpt2())
                if any(s in text for s in until):
                    break
            out.append(min((text.split(s)[0] for s in until), key=len, default=text))
        return out


# ----------------------------------------------------------------------------- our items as tasks


def validation_text(corpus):
    """The GPT-2 ids of the validation stream (not our ids: the unseen tokens keep their text)."""
    ours = np.asarray(corpus.val).reshape(-1).astype(np.int64)
    if corpus.vocab.full:
        return ours
    texts = data.load_split(corpus.meta["dataset"], corpus.meta["max_tokens"])[1]
    ids = data.tokenize(texts, gpt2())[: len(ours)]
    if len(ids) < len(ours) or (corpus.vocab.encode(ids) != ours).any():
        raise train.UserError(f"the dataset {corpus.meta['dataset']} has changed since its cache")
    return ids


def write_tasks(corpus, items, folder, limit=0):
    """Our items as lm-eval tasks in `folder`, sekd_KIND.jsonl and .yaml, in the validation text
    (a window from its first token: an item's sample), kept where lm-eval's split of that text
    gives back its ids (at most `limit` of each kind). -> {kind: bool tensor, the items kept}"""
    import yaml

    stream, ours = validation_text(corpus), np.asarray(corpus.val).reshape(-1).astype(np.int64)
    L, where = corpus.val.shape[1] - 1, {}  # where each run of 8 of our ids starts
    for o in range(len(ours) - 7):
        where.setdefault(ours[o : o + 8].tobytes(), []).append(o)
    os.makedirs(folder, exist_ok=True)
    kept, lm = {}, SekdLM(None, corpus.vocab)
    for kind, (x, y, n, _, *n_bytes) in items.items():
        windows, group = torch.cat([x, y[:, -1:]], 1).numpy(), data.OPTIONS if n_bytes else 1
        n, n_bytes = n.tolist(), n_bytes[0].tolist() if n_bytes else None
        docs, ok = [], torch.zeros(len(n), dtype=torch.bool)
        for q in range(0, len(n), group):  # a question's options, the true one first
            j = min(range(q, q + group), key=n.__getitem__)  # the option of the longest context
            ctx, cut = windows[j, : L + 1 - n[j]], L + 1 - n[j]
            found = [
                o
                for o in where.get(ctx[:8].tobytes(), [])
                if np.array_equal(ours[o : o + cut], ctx)
            ]
            context = gpt2().decode(stream[found[0] : found[0] + cut].tolist()) if found else ""
            ends = [
                (w, L + 1 - k)
                for w, k in zip(windows[q : q + group], n[q : q + group], strict=True)
            ]
            options = [corpus.vocab.decode(w[k:], gpt2()) for w, k in ends]
            good = bool(found) and (not limit or len(docs) < limit)
            for j, option in enumerate(options):
                c, t = lm._encode_pair(context, option)
                good &= (c + t)[-L - 1 :] == windows[q + j].tolist() and len(t) == n[q + j]
                good &= n_bytes is None or len(option.encode()) == n_bytes[q + j]
            if good:
                one = dict(choices=options, label=0) if n_bytes else dict(target=options[0])
                docs.append(dict(context=context, **one))
                ok[q : q + group] = True
        path = os.path.abspath(os.path.join(folder, f"sekd_{kind}.jsonl"))
        data.atomic_write_bytes(path, "".join(json.dumps(d) + "\n" for d in docs).encode())
        output_type, metrics = TASKS[kind]
        target = dict(doc_to_target="label", doc_to_choice="choices") if n_bytes else {}
        task = dict(task=f"sekd_{kind}", dataset_path="json", test_split="test")
        task |= dict(dataset_kwargs={"data_files": {"test": path}}, output_type=output_type)
        task |= dict(doc_to_text="context", doc_to_target="target", target_delimiter="") | target
        task["metric_list"] = [
            dict(metric=m, aggregation="perplexity" if m == "perplexity" else "mean")
            | dict(higher_is_better=m != "perplexity")
            for m in metrics
        ]
        task["metadata"] = {"version": 1}
        data.atomic_write_bytes(path[:-5] + "yaml", yaml.safe_dump(task, sort_keys=False).encode())
        print(f"[harness] sekd_{kind}: {len(docs):,} of {len(n) // group:,} items, {path}")
        kept[kind] = ok
    return kept


def subset(item, kept):
    """One kind's items (x, y, n, row, *more) with the kept ones only."""
    x, y, n, _, *more = item
    row = torch.repeat_interleave(torch.arange(int(kept.sum())), n[kept])
    return (x[kept], y[kept], n[kept], row, *[m[kept] for m in more])


def evaluate(model, corpus, tasks, folder, batch_size=16, dtype=None, limit=None, bootstrap=0):
    """lm-eval's results of a sekd.GPT on `tasks` (ours in `folder`, the others lm-eval's)."""
    from lm_eval.tasks import TaskManager

    defaults = any(not t.startswith("sekd_") for t in tasks)  # scanning them all takes seconds
    tm = TaskManager(include_path=folder, include_defaults=defaults)
    lm = SekdLM(model, corpus.vocab, batch_size, dtype)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=tm,
        limit=limit,
        bootstrap_iters=bootstrap,
        log_samples=False,
    )


def add_flags(p):
    g = p.add_argument_group("lm-eval-harness")
    g.add_argument("--ckpt", nargs="+", default=[], help="default OUT_DIR/student_sekd.pt")
    g.add_argument("--tasks", default="sekd_cloze,sekd_choice", help="comma-separated")
    g.add_argument("--limit", type=train.non_negative_int, default=0, help="items per task; 0 all")
    g.add_argument("--bootstrap", type=train.non_negative_int, default=1000, help="for stderr")


def main(argv=None):
    args = experiments.parse_args(argv, "harness", __doc__, add_flags)
    if lm_eval is None:
        raise train.UserError(
            "lm-eval-harness is not installed: pip install -r requirements-tools.txt"
        )
    corpus, device = train.load_data(args)
    evalset = train.EvalSet(corpus, 1, device, args.batch_size)
    folder, tasks = os.path.join(args.out_dir, "lm_eval_tasks"), args.tasks.split(",")
    kept = write_tasks(corpus, evalset.items, folder, args.limit)
    evalset.items = {kind: subset(item, kept[kind]) for kind, item in evalset.items.items()}
    line = "{:<32} {:<12} {:<10} {:>12} {:>12}".format
    rows, out = [line("model", "task", "metric", "lm-eval", "EvalSet")], {}
    for path in args.ckpt or [os.path.join(args.out_dir, "student_sekd.pt")]:
        ckpt = train.load_checkpoint(path)
        train.check_signature(ckpt, corpus, path)
        model = train.GPT_from(ckpt).to(device)
        dtype, limit = train.autocast_dtype(args, device), args.limit or None
        res = evaluate(model, corpus, tasks, folder, args.batch_size, dtype, limit, args.bootstrap)
        print(f"\n{path}\n{lm_eval.utils.make_table(res)}")
        ours = evalset.evaluate(model, args)
        out[path] = dict(lm_eval=res["results"], evalset=ours)
        for kind, (_, metrics) in TASKS.items():
            for metric, key in metrics.items():
                got = res["results"].get(f"sekd_{kind}", {}).get(f"{metric},none")
                if key and got is not None:
                    rows.append(
                        line(path, f"sekd_{kind}", metric, f"{got:.6g}", f"{ours[key]:.6g}")
                    )
    print("\nour items, two scorers:\n" + "\n".join(rows))
    path = os.path.join(args.out_dir, "results_harness.json")
    data.atomic_write_bytes(path, json.dumps(out, indent=1, default=str).encode())
    print(f"results written to {path}")
    return out


if __name__ == "__main__":
    train.cli(job=main)
