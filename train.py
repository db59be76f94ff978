"""The main job: train a teacher, distil students from it, compare them.

python train.py                  # teacher (or reuse out/teacher.pt), then CE / Full KD / SE-KD
python train.py --run teacher    # only the teacher
python train.py --run distill --method sekd --k 0.1 --metric reverse_kl --policy gls
python -m experiments.positions  # a paper table: each lives in experiments/, built on this file
torchrun --standalone --nproc_per_node=2 train.py -- --run distill   # data parallel
python train.py --help           # every flag, with its default
"""

import argparse
import datetime
import hashlib
import io
import json
import math
import os
import platform
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data
import sekd

UserError = data.DataError  # a mistake the user can fix (a flag, a file): one line, exit code 2

# ----------------------------------------------------------------------------- command line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UserError(f"{message} (--help lists every flag)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the usage examples above line by line, and every flag's default."""


def number(kind, ok, what):  # an argparse type
    def parse(text):
        if not ok(value := kind(text)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # so that argparse says "invalid float value: 'abc'"
    return parse


positive_int = number(int, lambda v: v >= 1, "at least 1")
non_negative_int = number(int, lambda v: v >= 0, "at least 0")
positive_float = number(float, lambda v: v > 0, "> 0")
share = number(float, lambda v: 0 <= v <= 1, "in [0, 1]")
budget = number(float, lambda v: 0 < v <= 1, "in (0, 1] (e.g. 0.2 for 20%)")
# U's upper bound is the cache file's (7-bit counts), not the method's: KDConfig checks U >= 1
draws = f"in [1, {data.MAX_DRAWS}] (7-bit counts)"
draw_count = number(int, lambda v: 1 <= v <= data.MAX_DRAWS, draws)

# Every --method: name -> (its positions: a sekd method; classes: full, rskd, or cache (SE-KD_3X:
# the teacher's draws read from a file); samples: all, top (TopSmp) or random; its name in tables)
METHODS = {
    "ce": ("ce", "full", "all", "CE (no KD)"),
    "full_kd": ("full_kd", "full", "all", "Full KD"),
    "sekd": ("sekd", "full", "all", "SE-KD top {k:.0%}"),
    "random_pos": ("random_pos", "full", "all", "RandomPos {k:.0%}"),
    "at_kd": ("at_kd", "full", "all", "AT-KD"),
    "rskd": ("full_kd", "rskd", "all", "RS-KD U={U}"),
    "top_smp": ("full_kd", "full", "top", "TopSmp {l:.0%}"),
    "random_smp": ("full_kd", "full", "random", "RandomSmp {l:.0%}"),
    "top_smp_rskd": ("full_kd", "rskd", "top", "TopSmp+RS-KD"),
    "sekd_top_smp": ("sekd", "full", "top", "SE-KD+TopSmp"),
    "sekd_3x": ("sekd", "cache", "top", "SE-KD_3X"),
}

# A preset is flags that become the defaults (a flag given still wins). Our default job is sized to
# finish in minutes on a 2-core CPU (results/quick_default_cpu.md); full: its earlier sizes, 7-12x
# slower (results/compare_cpu.md); fineweb: the paper's data (FineWeb-Edu, 80M tokens, 512-token
# samples, pure KL) for one GPU, with a GPT-2 small teacher and a student half its size.
PRESETS = {
    "full": "--vocab-size 0 --teacher-embd 256 --teacher-steps 1200 --student-init-steps 600 "
    "--student-steps 300 --eval-tokens 32768",
    "fineweb": "--dataset hf:HuggingFaceFW/fineweb-edu:sample-10BT --max-tokens 80000000 "
    "--seq-len 512 --full-vocab --lam 1.0 --teacher-layers 12 --teacher-embd 768 "
    "--teacher-heads 12 --student-layers 6 --student-embd 384 --student-heads 6 --batch-size 16 "
    "--grad-accum 4 --teacher-steps 4800 --teacher-lr 6e-4 --student-init-steps 600 "
    "--student-init-lr 1e-3 --student-steps 2400 --lr 6e-4 --warmup 100 --eval-interval 500 "
    "--eval-tokens 262144 --log-interval 50 --chunk-rows 1024",  # 16 x 4 x 512 tokens a step
}


def build_parser():
    """Built at each call, so a metric or policy registered before `cli()` is a valid choice."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = p.add_argument
    jobs = "compare: the teacher, then CE / Full KD / SE-KD; teacher: only it; distill: --method"
    add("--run", default="compare", choices=["compare", "teacher", "distill"], help=jobs)
    add("--preset", default="none", choices=["none", *PRESETS], help="fineweb: docs/fineweb.md")
    add = p.add_argument_group("data").add_argument
    add("--dataset", default="shakespeare", help="or hf:NAME[:CONFIG], or files:PATH[,PATH]")
    add("--max-tokens", type=non_negative_int, default=0, help="read documents up to this many")
    add("--seq-len", type=positive_int, default=128, help="positions per sample (block size)")
    add("--vocab-size", type=non_negative_int, default=4096, help="the most frequent ids (0: all)")
    add("--full-vocab", action=argparse.BooleanOptionalAction, default=False, help="GPT-2's 50,257")
    add("--data-dir", default="data_cache", help="where tokenized memmaps are written and reused")
    add = p.add_argument_group("models (sekd.GPTConfig checks them)").add_argument
    for who, sizes in {"teacher": (4, 128, 4), "student": (1, 64, 2)}.items():
        for size, default in zip(("layers", "embd", "heads"), sizes, strict=True):
            add(f"--{who}-{size}", type=int, default=default)
        add(f"--{who}-init", default="", help="gpt2, gpt2-medium...: GPT-2's weights, untrained")
    add = p.add_argument_group("training").add_argument
    add("--teacher-steps", type=positive_int, default=300)
    add("--teacher-lr", type=positive_float, default=2e-3)
    # the initial student, which every method starts from
    add("--student-init-steps", type=non_negative_int, default=300, help="CE steps")
    add("--student-init-lr", type=positive_float, default=3e-3, help="peak lr")
    add("--student-steps", type=positive_int, default=150, help="distillation steps per method")
    add("--lr", type=positive_float, default=1e-3, help="peak lr of distillation (every method)")
    add("--batch-size", type=positive_int, default=16, help="sequences per micro-batch")
    add("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    add("--warmup", type=non_negative_int, default=30, help="linear warm-up, then cosine to lr/10")
    add("--weight-decay", type=float, default=0.1)
    add("--grad-clip", type=float, default=1.0)
    add("--eval-interval", type=positive_int, default=100, help="steps between checkpoints")
    add("--eval-tokens", type=positive_int, default=16384, help="validation tokens, final metrics")
    add("--log-interval", type=positive_int, default=20)
    # sekd.KDConfig's fields, with its defaults (written there, once); it checks their values
    add, kd = p.add_argument_group("distillation").add_argument, sekd.KDConfig()
    add("--method", default="sekd", choices=list(METHODS), help="for --run distill")
    add("--k", type=float, default=kd.k, help="SE-KD position budget, in (0, 1]")
    add("--metric", default=kd.metric, choices=sekd.METRICS, help="position importance")
    add("--policy", default=kd.policy, choices=sekd.POLICIES, help="position selection policy")
    add("--gls-queue", type=int, default=kd.gls_queue, help="GLS: scores kept in its FIFO queue")
    add("--curriculum-steps", type=int, default=kd.curriculum_steps, help="to reach the top-k")
    add("--T", type=float, default=kd.T, help="KD temperature")
    add("--lam", type=float, default=kd.lam, help="KL weight; 1 - lam: CE's (the paper's lam: 1)")
    add("--ce-at", default=kd.ce_at, help="where the CE goes: all, or selected (the paper's Eq. 3)")
    add("--flow", default=kd.flow, help="streamed, or dense: the full [B, L, V] logits")
    add("--chunk-rows", type=int, default=kd.chunk_rows, help="rows per chunk (0: sekd.CHUNK_MB)")
    add("--U", type=draw_count, default=kd.U, help="RS-KD draws per position (7-bit counts)")
    kl = "KL(teacher || student), or reverse: KL(student || teacher); auto: reverse on-policy"
    add("--divergence", default="auto", choices=["auto", "forward", "reverse"], help=kl)
    add("--on-policy", type=share, default=0.0, help="share of sequences the student writes")
    add("--prompt-len", type=non_negative_int, default=0, help="on-policy prompt (0: --seq-len/2)")
    add("--seeds", type=positive_int, default=3, help="experiments/: students (seeds) per row")
    add = p.add_argument_group("sample axis, offline teacher cache").add_argument
    add("--l", type=budget, default=0.2, help="share of training samples TopSmp / RandomSmp keep")
    add("--cache", default="", help="SE-KD_3X's (default OUT_DIR/rskd_cache_seedSEED.bin)")
    add("--rebuild-cache", action="store_true", help="build the cache anew even if one exists")
    add = p.add_argument_group("system").add_argument
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    dtypes = ["auto", "float32", "bfloat16"]
    add("--dtype", default="auto", choices=dtypes, help="auto: bfloat16 on CUDA, else float32")
    compiled = "chunks: sekd's chunk formulas; all (a bare --compile): the transformer bodies too; "
    compiled += "off: nothing (eager everywhere), for machines without a C++ compiler"
    modes = ["off", "chunks", "all"]
    add("--compile", nargs="?", const="all", default="chunks", choices=modes, help=compiled)
    add("--seed", type=int, default=1337)
    add("--out-dir", default="out")
    add("--teacher-ckpt", default="", help="teacher checkpoint (default OUT_DIR/teacher.pt)")
    add("--retrain-teacher", action="store_true", help="ignore a saved teacher, train a new one")
    return p


def parse_args(argv=None, parser=None):
    """The flags, with --preset's as defaults. We drop a leading `--` (torchrun needs one before the
    job's flags, or takes --run and --l for its own --run-path and --log-dir)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = argv[1:] if argv[:1] == ["--"] else argv
    p = parser or build_parser()
    if (preset := p.parse_args(argv).preset) != "none":
        p.set_defaults(**vars(p.parse_args(PRESETS[preset].split())))
    return p.parse_args(argv)


def check_flags(a):
    """What argparse cannot check, before any work. -> {each method the run trains: KDConfig}"""
    for who in ("teacher", "student"):  # sekd.GPTConfig checks the sizes (V: 1 until the data)
        model_config(a, who, vocab_size=1)
    if a.prompt_len > a.seq_len:
        half = f"[0, --seq-len {a.seq_len}] (0 = half)"
        raise UserError(f"--prompt-len must be in {half}, got {a.prompt_len}")
    if a.on_policy > 0 and sekd.on_policy_rows(a.batch_size, a.on_policy) == 0:
        none = f"{a.on_policy} of --batch-size {a.batch_size} rounds to no sequence"
        raise UserError(f"--on-policy {none}: raise one")
    jobs = {"compare": ["ce", "full_kd", "sekd"], "distill": [a.method]}
    if (a.on_policy > 0 or a.divergence == "reverse") and a.run not in jobs:
        raise UserError("--on-policy and --divergence reverse work with --run compare or distill")
    positions, classes, *_ = METHODS[a.method]
    full = positions in sekd.FULL_KL and classes == "full"
    if a.on_policy > 0 and (a.lam == 0 or not full and a.run != "compare"):
        raise UserError(  # its own text needs the teacher's every class
            "--on-policy works with --lam > 0 and a method with the teacher's full distribution "
            "(full_kd, sekd, random_pos, or their TopSmp / RandomSmp variants)"
        )
    if (a.teacher_init or a.student_init) and not a.full_vocab:
        raise UserError("GPT-2's weights index its own 50,257 ids: --*-init needs --full-vocab")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible: use --device cpu")
    configs = {m: kd_config(a, m) for m in jobs.get(a.run, ["sekd"])}
    return configs if a.run in jobs else {}  # --run teacher, experiments/: the flags checked alone


def kd_config(args, method, **kd):
    """The sekd.KDConfig of --method `method` under these flags; `kd` overrides fields."""
    positions, classes, *_ = METHODS[method]
    # auto: on the student's own text, the reverse KL; CE, the baseline, has no KL
    reverse = args.divergence == "reverse" or args.divergence == "auto" and args.on_policy > 0
    values = {f.name: getattr(args, f.name, None) for f in fields(sekd.KDConfig)}  # but classes
    values |= dict(method=positions, k=1.0 if positions == "full_kd" else args.k)
    values |= dict(classes="full" if classes == "full" else "rskd")
    values["divergence"] = "reverse" if reverse and positions != "ce" else "forward"
    try:
        return sekd.KDConfig(**values | kd)
    except ValueError as e:  # a bad value is one of the flags'; a bad combination, --method's
        flags = f"--method {method}" if method == args.method else "the distillation flags"
        raise UserError(f"{flags}: {e}") from None


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, obj):
    """Rank 0 writes, through a temporary file and a rename: an interrupted save leaves the old."""
    if RANK == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        buf = io.BytesIO()
        torch.save(obj, buf)
        data.atomic_write_bytes(path, buf.getvalue())
    sync()


def load_checkpoint(path, corpus=None):
    """The checkpoint at `path`, whole, of a sekd.GPT, and (with `corpus`) of its vocabulary."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist: train it first (--run teacher)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        GPT_from(ckpt)  # checks the keys and shapes too
    except Exception as e:
        bad = f"checkpoint {path} is corrupt or truncated ({type(e).__name__})"
        raise UserError(f"{bad}: delete it and train again") from None
    if corpus is not None and ckpt.get("signature") != corpus.signature:
        raise UserError(
            f"checkpoint {path} was trained on another vocabulary or tokenizer "
            f"({ckpt.get('signature')} vs data {corpus.signature}): use the same --dataset/"
            "--vocab-size/--full-vocab, or pass --retrain-teacher"
        )
    return ckpt


def GPT_from(ckpt):
    model = sekd.GPT(sekd.GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model


# ---- what a student trains on: torchrun, autocast, the sample axis, the teacher cache
# torchrun starts N copies of this job, as in nanoGPT: each rank takes its slice of each global
# batch (data.Batches), we average gradients before clipping, rank 0 prints and writes.
RANK, WORLD = 0, 1  # alone; load_data joins torchrun's process group, write_results leaves it


def sync(obj=None):  # every rank waits for the others; -> every rank's obj, in rank order
    parts = [obj] * WORLD
    if WORLD > 1:
        dist.all_gather_object(parts, obj)
    return parts


def autocast(args, device):  # its fast_dtype: bfloat16 (--dtype, auto on CUDA), or float32: off
    half = args.dtype == "bfloat16" or args.dtype == "auto" and device.type == "cuda"
    return torch.autocast(device.type, torch.bfloat16 if half else torch.float32, enabled=half)


def out_path(args, what):  # what: "teacher", "student_init" or SE-KD_3X's "cache"
    if what == "cache":
        return args.cache or os.path.join(args.out_dir, f"rskd_cache_seed{args.seed}.bin")
    if what == "teacher" and args.teacher_ckpt:
        return args.teacher_ckpt
    return os.path.join(args.out_dir, f"{what}.pt")


def file_sha256(path):  # None: no such file
    if os.path.exists(path):
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def sample_plan(args, samples, classes, corpus, device, student, teacher):
    """-> (batches, plan): a student's samples and draws; its steps, --student-steps times their
    share (the saving); what choosing them cost."""
    n, kept, cache, path = len(corpus.train), None, None, out_path(args, "cache")
    plan = dict(samples=samples, prepass_s=None, cache_build_s=None, cache_reused=None)
    if classes == "cache" and os.path.exists(path) and not args.rebuild_cache:
        data.TeacherCache(path).check(cache_signature(args, corpus))  # before the pre-pass
    if samples == "top":
        scores, plan["prepass_s"] = sample_prepass(student, corpus, args, device)
        kept = sekd.top_samples(torch.from_numpy(scores), args.l).numpy()
    elif samples == "random":
        kept = sekd.random_samples(n, args.l, torch.Generator().manual_seed(args.seed)).numpy()
    if classes == "cache":
        built = teacher_cache(args, corpus, device, teacher, np.arange(n) if kept is None else kept)
        cache, plan["cache_build_s"], plan["cache_reused"] = built
    plan["cache_bytes"] = os.path.getsize(path) if cache else None
    b = (args.batch_size, args.grad_accum, args.seed, device, kept, RANK, WORLD, cache)
    batches = data.Batches(corpus, *b)
    steps = max(1, math.ceil(args.student_steps * len(batches.samples) / n))  # all: --student-steps
    return batches, plan | dict(n_kept=len(batches.samples), steps=steps)


@torch.no_grad()
def sample_prepass(student, corpus, args, device):
    """Each training sample's mean entropy under the initial student -> (scores, seconds). Each rank
    scores its share of the batches; every rank gets all the scores."""
    t0, scores, bs, w = time.time(), [np.zeros(0)], args.batch_size, student.head_weight.float()
    starts = range(0, len(corpus.train), bs)
    student.eval()
    for i in starts[RANK * len(starts) // WORLD : (RANK + 1) * len(starts) // WORLD]:
        x = torch.from_numpy(corpus.train[i : i + bs, :-1].astype(np.int64)).to(device)
        with autocast(args, device):
            h = student.hidden(x).float()
        H = sekd.sample_entropy(h, w, torch.ones_like(x, dtype=torch.bool), args.chunk_rows or None)
        scores.append(H.double().cpu().numpy())  # .cpu() waits for the GPU
    student.train()
    scores, seconds = np.concatenate(sync(np.concatenate(scores))), time.time() - t0
    print(f"[pre-pass] scored {len(scores):,} samples by mean student entropy in {seconds:.1f}s")
    return scores, seconds


def cache_signature(args, corpus):
    """What a teacher cache must match to be used (teacher_cache adds the samples)."""
    path = out_path(args, "teacher")
    if not os.path.exists(path):
        raise UserError(f"teacher checkpoint {path} does not exist: train it first (--run teacher)")
    signature = dict(format=1, teacher_sha256=file_sha256(path))
    signature |= dict(data_fingerprint=corpus.meta["data_fingerprint"], U=args.U, T=args.T)
    return signature | dict(seed=args.seed, V=corpus.vocab.size, seq_len=args.seq_len)


def teacher_cache(args, corpus, device, teacher, kept):
    """SE-KD_3X's cache for `kept` -> (cache, build seconds, reused). Rank 0 builds it (its draws do
    not depend on the world size); one of another signature is refused in one line."""
    path, build_s, bs = out_path(args, "cache"), None, args.batch_size
    signature = cache_signature(args, corpus) | {"kept": [int(i) for i in kept]}
    if RANK == 0 and (args.rebuild_cache or not os.path.exists(path)):
        t0, V, W = time.time(), corpus.vocab.size, teacher.head_weight
        gen = torch.Generator(device=device).manual_seed(args.seed)

        @torch.no_grad()
        def blocks():  # U classes drawn from the teacher at every position of every kept sample
            for i in range(0, len(kept), bs):
                x = torch.from_numpy(corpus.train[kept[i : i + bs], :-1].astype(np.int64))
                with autocast(args, device):
                    h = teacher.hidden(x.to(device))
                    draws = sekd.teacher_draws(h, W, args.U, args.T, args.chunk_rows or None, gen)
                yield data.encode_draws(*draws, V).cpu().numpy()  # (ids, counts)

        shape = (len(kept), args.seq_len, args.U, data.cache_bytes_per_class(V))
        data.write_cache(path, signature, shape, blocks())
        build_s = time.time() - t0
    sync()
    cache, size = data.TeacherCache(path), os.path.getsize(path)
    if build_s is None:
        cache.check(signature)
        print(f"[cache] reusing {path} ({size:,} bytes): distillation runs without the teacher")
    else:
        shape = f"{len(kept):,} samples x {args.seq_len} positions x U={args.U}"
        print(f"[cache] built {path}: {shape}, {size:,} bytes in {build_s:.1f}s")
    return cache, build_s, build_s is None


# ----------------------------------------------------------------------------- training loop
# The CPU has no allocator statistics, so we count live tensor bytes through torch's dispatch hooks.


class LiveBytes(TorchDispatchMode):
    """`peak`: the most bytes alive at once in the storages ops make while it is active; not those
    made before (weights, AdamW state), a kernel's scratch, an output on an input's storage (in
    place, views). `match(t)` picks tensors (the [rows, V] logits) also counted in `matched_peak`,
    listed in `log`. Compiled code runs eager meanwhile: we cannot see inside a compiled graph, and
    one compiled here would serve later calls, which would round otherwise."""

    def __init__(self, match=None):
        super().__init__()
        self.live = self.peak = self.matched_live = self.matched_peak = 0
        self.match, self.log, self.seen = match, [], set()

    def __enter__(self):
        self.eager = torch.compiler.set_stance("force_eager")  # until __exit__
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.eager.__exit__(*exc)

    def free(self, key, nbytes, matched):
        self.seen.discard(key)
        self.live -= nbytes
        self.matched_live -= nbytes if matched else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins, outs = tree_leaves((args, kwargs)), tree_leaves(out)
        inputs = {t.untyped_storage().data_ptr() for t in ins if torch.is_tensor(t)}
        for t in (t for t in outs if torch.is_tensor(t)):
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if not nbytes or key in self.seen or key in inputs:
                continue
            matched = self.match is not None and bool(self.match(t))
            self.seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            if matched:
                self.matched_live += nbytes
                self.matched_peak = max(self.matched_peak, self.matched_live)
                self.log.append((func.overloadpacket.__name__, tuple(t.shape), t.dtype, nbytes))
            weakref.finalize(storage, self.free, key, nbytes, matched)
        return out


def state_bytes(*items):  # tensors, or modules: their parameters and buffers
    tensors = [[x] if torch.is_tensor(x) else [*x.parameters(), *x.buffers()] for x in items]
    return sum(t.numel() * t.element_size() for ts in tensors for t in ts)


def make_optimizer(model, lr, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=other, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train_loop(model, loss_fn, batches, steps, lr, args, tag, save=None, resume=None, frozen=0):
    """`loss_fn(step, micro, x, y, *cached)` -> (loss, n_selected); `resume`: a checkpoint `save`
    was given; `frozen`: the teacher's bytes (the CPU's peak counts them)."""
    opt, resume = make_optimizer(model, lr, args.weight_decay), resume or {}
    start = saved = resume.get("step", 0)
    if resume:  # everything a step reads: weights, AdamW, torch's generators (each rank's), step
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if RANK < len(rng := resume.get("rng", [])):  # a rank new to the run keeps its seed
            torch.set_rng_state(rng[RANK]["cpu"])
            torch.cuda.set_rng_state_all(rng[RANK]["cuda"])  # [] where CUDA is absent
        print(f"[{tag}] resuming at step {start}/{steps}")
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for p in model.parameters() if WORLD > 1 else []:  # every rank starts from rank 0's
        dist.broadcast(p.data, 0)
    tokens_per_step = WORLD * batches.bs * batches.accum * (batches.samples.shape[1] - 1)
    t0, train_time, curve = time.time(), 0.0, []
    # On the CPU we meter step 1 (AdamW's state exists by then), or the only one, even in a resumed
    # run: the metered step runs eager, so another would change the student. Checkpoints keep it.
    metered, peak_cpu = min(1, steps - 1), resume.get("live_peak", 0)
    for step in range(start, steps):
        ts, progress = time.time(), min(1.0, (step - args.warmup) / max(1, steps - args.warmup))
        cosine = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr * (step + 1) / args.warmup if step < args.warmup else cosine
        with LiveBytes() if dev.type != "cuda" and step == metered else nullcontext() as meter:
            total = 0.0
            for micro in range(batches.accum):
                x, y, *cached = batches.get(step, micro)  # cached: SE-KD_3X's teacher draws
                with autocast(args, dev):
                    loss, _ = loss_fn(step, micro, x, y, *cached)
                (loss / batches.accum).backward()
                total += loss.item() / batches.accum
            total = sum(sync(total)) / WORLD  # logged: the mean over ranks
            curve.append(total)
            # the batch's gradient (losses are means); by hand: DDP's hooks expect `model(...)`
            for p in [p for p in model.parameters() if p.requires_grad] if WORLD > 1 else []:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad  # unused on this rank
                dist.all_reduce(p.grad)  # a sum (gloo has no average)
                p.grad /= WORLD
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
            if not math.isfinite(total + norm):
                what = ("loss", total) if not math.isfinite(total) else ("gradient norm", norm)
                kept = f"step {saved}'s checkpoint is kept" if saved else "no checkpoint yet"
                stop = f"{what[0]} became {what[1]} at step {step + 1}: stopped before the update"
                raise UserError(f"[{tag}] {stop}, {kept}; lower --lr or raise --warmup")
            opt.step()
            opt.zero_grad(set_to_none=True)
        peak_cpu = meter.peak if meter else peak_cpu
        train_time += time.time() - ts
        done = step + 1
        if done % args.log_interval == 0 or done == steps:
            rate = (done - start) * tokens_per_step / max(train_time, 1e-9)
            eta = fmt_time((steps - done) * train_time / (done - start))
            times = f"{rate:,.0f} tok/s | elapsed {fmt_time(time.time() - t0)} | ETA {eta}"
            print(f"[{tag}] step {done:5d}/{steps} | loss {total:.4f} | {times}", flush=True)
        if save is not None and (done % args.eval_interval == 0 or done == steps):
            # torch's generators (random metric, pos-RS-KD, online RS-KD) of every rank, by rank
            rng = sync({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()})
            weights = dict(model=model.state_dict(), config=asdict(model.config), rng=rng)
            # train_s: the time of every run that made this checkpoint
            trained = dict(step=done, steps=steps, train_s=resume.get("train_s", 0) + train_time)
            save(weights | trained | dict(live_peak=peak_cpu, optimizer=opt.state_dict()))
            saved = done
    if dev.type == "cuda":
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        adamw = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        peak = state_bytes(model, *adamw) + peak_cpu + frozen
        how = "weights (student + teacher) + AdamW state + the live tensors of one step (LiveBytes)"
    run = dict(tokens=(steps - start) * tokens_per_step, resumed_at=resume.get("step"))
    return run | dict(train_s=train_time, peak_bytes=peak, peak_how=how, loss_curve=curve)


# ----------------------------------------------------------------------------- evaluation


class EvalSet:
    """Validation samples (the teacher's hidden states kept: a student's KL costs two heads), and
    data.eval_items: hard words (whole-word PPL, as lm-eval's LAMBADA), their control (words new to
    their window: the cloze less it is what context gives), multiple choice (per byte, as lm-eval's
    acc_bytes). A subset's PPL rewards a flat distribution: each model also at its own tau*."""

    def __init__(self, corpus, n_tokens, device, batch_size):
        n = max(1, min(len(corpus.val), n_tokens // (corpus.val.shape[1] - 1)))
        rows = np.linspace(0, len(corpus.val) - 1, n).astype(np.int64)
        x = torch.from_numpy(corpus.val[rows].astype(np.int64)).to(device)
        self.x, self.y, self.bs, self.teacher_h = x[:, :-1], x[:, 1:], batch_size, None
        self.items, said = data.eval_items(corpus, control=True)
        free = data.outside_items(corpus, range(len(corpus.val)), self.items, windows=True)
        fit = free.any(1).nonzero()[:, 0].numpy()  # the samples with a target to fit on
        x = torch.from_numpy(corpus.val[fit].astype(np.int64))
        self.fit_x, self.fit_y = x[:, :-1], x[:, 1:].masked_fill(~free[fit], -1).to(device)
        note = f"tau* fitted on {int(free.sum()):,} tokens outside the items' windows"
        print(f"evaluation: {self.y.numel():,} validation tokens; {said}; {note}")

    def set_teacher(self, teacher, args):
        self.teacher_h = self.hidden(teacher, args, self.x)
        self.teacher_w = teacher.head_weight.detach().float()

    @torch.no_grad()
    def hidden(self, model, args, x):
        with autocast(args, self.x.device):
            return torch.cat([model.hidden(b.to(self.x.device)).float() for b in x.split(self.bs)])

    def rows(self, model, args, x, y, tau=1.0, teacher=False):
        """Each valid row of x: sekd.prediction_rows, the NLL at tau, sekd.teacher_rows if asked."""
        out, w, ce = [], model.head_weight.float(), sekd.METRICS["student_ce"]
        for i in range(0, len(x), self.bs):
            h, yi = self.hidden(model, args, x[i : i + self.bs]), y[i : i + self.bs].to(w.device)
            valid = yi >= 0
            cols = [sekd.chunked_scores(sekd.prediction_rows, h, w, valid, targets=yi)]
            nll_tau = cols[0][..., :1]
            if tau != 1:  # the NLL again, of the logits h w^T / tau
                nll_tau = sekd.chunked_scores(ce, h, w / tau, valid, targets=yi)[..., None]
            cols.append(nll_tau)
            if teacher:
                th, tw = self.teacher_h[i : i + self.bs], self.teacher_w
                cols.append(sekd.chunked_scores(sekd.teacher_rows, h, w, valid, th, tw))
            out.append(torch.cat(cols, -1)[valid].cpu())
        names = ("nll", "conf", "correct", "entropy", "nll_tau", "kl", "agree")
        return dict(zip(names, torch.cat(out).double().unbind(1), strict=False))

    @torch.no_grad()
    def evaluate(self, model, args, limit=None):
        """Every measure, and every item's NLL (to pair two models item by item); with `limit` (a
        look during training), the validation text's on `limit` samples only, at tau = 1."""
        model.eval()
        tau, y, w = 1.0, self.fit_y, model.head_weight.float()
        if limit is None:
            tau = sekd.fit_temperature(self.hidden(model, args, self.fit_x), w, y, y >= 0)
        s = self.rows(model, args, self.x[:limit], self.y[:limit], tau, self.teacher_h is not None)
        m = {name: v.mean().item() for name, v in s.items()}  # no teacher: no kl, no agree
        out = dict(val_loss=m["nll"], val_ppl=math.exp(m["nll"]), tau=tau, entropy=m["entropy"])
        out |= dict(val_ppl_tau=math.exp(m["nll_tau"]), eval_tokens=len(s["nll"]))
        out |= dict(kl_to_teacher=m.get("kl"), agreement=m.get("agree"))
        out["ece"] = sekd.expected_calibration_error(s["conf"], s["correct"])
        for kind, (x, y, lengths, row, *more) in self.items.items() if limit is None else ():
            s, n = self.rows(model, args, x, y, tau), len(lengths)
            v = torch.stack([s["nll"], s["nll_tau"], 1 - s["correct"]])  # each item's sums:
            nll, nll_tau, wrong = torch.zeros(3, n, dtype=v.dtype).index_add_(1, row, v)
            item = dict(items=n, nll=nll.tolist(), nll_tau=nll_tau.tolist())
            if kind == "choice":  # by log-likelihood per byte: the true option is option 0
                best = (-nll / more[0]).view(-1, data.OPTIONS).argmax(1)
                item |= dict(items=len(best), acc=(best == 0).double().mean().item())
            else:  # a word is right if all its tokens are
                item |= dict(ppl=math.exp(nll.mean()), ppl_tau=math.exp(nll_tau.mean()))
                item |= dict(acc=(wrong == 0).double().mean().item())
                item["ece"] = sekd.expected_calibration_error(s["conf"], s["correct"])
            out |= {f"{kind}_{name}": value for name, value in item.items()}
        if "control_nll" in out and "cloze_nll" in out:  # what the context gives, nats a word
            out["context_nats"] = math.log(out["control_ppl_tau"] / out["cloze_ppl_tau"])
        model.train()
        return out


# ------------------------------------------------------------- the teacher and the initial student


def pick_device(args):
    if args.compile == "off":  # eager from now on
        torch.compiler.set_stance("force_eager")
    name = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: a GPU per rank
        name = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(name)
    return torch.device(name)


def model_config(args, who, vocab_size):  # the teacher's or the student's, checked by sekd
    n_layer, n_head, n_embd = (getattr(args, f"{who}_{s}") for s in ("layers", "heads", "embd"))
    try:
        return sekd.GPTConfig(vocab_size, args.seq_len, n_layer, n_head, n_embd)
    except ValueError as e:  # one line, naming the flags
        flags = f"--{who}-layers, --{who}-heads, --{who}-embd, --seq-len"
        raise UserError(f"the {who} ({flags}): {e}") from None


def new_model(args, who, vocab_size, device):
    return sekd.GPT(model_config(args, who, vocab_size)).to(device)


def maybe_compile(model, args):  # --compile all: the transformer body too
    if args.compile == "all":
        model.hidden = torch.compile(model.hidden)
    return model


def pretrained(args, corpus, device, evalset, who):
    """The teacher or the initial student (as in the paper: a random student's entropy ranks
    nothing), trained with CE, or reused (a student only if these flags made it), or resumed."""
    if gpt2 := getattr(args, f"{who}_init"):  # GPT-2's weights as they are: nothing to train
        return GPT_from_hf(gpt2, args.seq_len).to(device), {}
    teacher, ckpt = who == "teacher", None
    flag, seed = ("teacher", args.seed + 1) if teacher else ("student_init", args.seed + 2)
    path = out_path(args, flag)
    steps, lr = getattr(args, f"{flag}_steps"), getattr(args, f"{flag}_lr")
    named = teacher and args.run == "distill" and args.teacher_ckpt  # never trained here
    if named or os.path.exists(path) and not (teacher and args.retrain_teacher):
        ckpt = load_checkpoint(path, corpus)
    made = ckpt and (sekd.GPTConfig(**ckpt["config"]), ckpt["steps"], ckpt.get("seed"))
    if made and not teacher and made != (model_config(args, who, corpus.vocab.size), steps, seed):
        print(f"[{who}] {path} was made with other sizes, steps or seed: training a new one")
        ckpt = None
    if ckpt and (block := ckpt["config"]["block_size"]) < args.seq_len:  # a student's matched above
        short = f"has block size {block}, shorter than --seq-len {args.seq_len}"
        fix = f"use --seq-len {block} or less, or --retrain-teacher"
        raise UserError(f"teacher checkpoint {path} {short}: {fix}")
    if ckpt and ckpt["step"] >= ckpt["steps"]:
        print(f"[{who}] reusing {path} ({ckpt['steps']} steps, val ppl {ckpt['val_ppl']:.2f})")
        return GPT_from(ckpt).to(device), {"train_s": ckpt.get("train_s"), "reused": True}
    if named:
        raise UserError(f"teacher checkpoint {path} is unfinished: complete it with --run teacher")
    torch.manual_seed(args.seed)
    model = GPT_from(ckpt).to(device) if ckpt else new_model(args, who, corpus.vocab.size, device)
    model, ce = maybe_compile(model, args), sekd.KDConfig(method="ce", chunk_rows=args.chunk_rows)

    def save(ckpt):  # with a quick look at the val ppl
        ppl = evalset.evaluate(model, args, limit=64)["val_ppl"]
        save_checkpoint(path, ckpt | dict(seed=seed, signature=corpus.signature, val_ppl=ppl))
        print(f"[{who}] step {ckpt['step']}: quick val ppl {ppl:.2f}, saved {path}")

    def loss_fn(step, micro, x, y):  # plain cross-entropy: no teacher
        return sekd.distill_loss(model, None, x, y, ce)

    ranks = dict(rank=RANK, world=WORLD)
    batches = data.Batches(corpus, args.batch_size, args.grad_accum, seed, device, **ranks)
    stats = train_loop(model, loss_fn, batches, steps, lr, args, who, save, ckpt)
    return model, {**stats, "reused": False}


def hf_name(name):
    """sekd.GPT's parameter name -> GPT2LMHeadModel's. Its LM head is tied to wte, as ours; its
    Conv1D layers keep a Linear's weight transposed, [in, out]: every matrix of a block."""
    parts = dict(blocks="h", ln1="ln_1", ln2="ln_2", qkv="c_attn", proj="c_proj")
    for ours, theirs in (parts | {"mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj"}).items():
        name = name.replace(ours, theirs)
    return "transformer." + name


def GPT_from_hf(hf, block_size):
    """A sekd.GPT of GPT-2's weights (a Hub name, or a GPT2LMHeadModel), as nanoGPT's."""
    try:
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(hf) if isinstance(hf, str) else hf
    except (ImportError, OSError) as e:  # no transformers, no internet, or no such model
        why = f"needs internet and requirements-tools.txt: {str(e).splitlines()[0]}"
        raise UserError(f"could not load {hf} from the Hugging Face Hub ({why})") from None
    c, theirs = hf.config, hf.state_dict()
    if c.n_positions < block_size:
        raise UserError(f"GPT-2 has {c.n_positions} positions: use --seq-len {c.n_positions}")
    sizes = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size)
    gelu = {"gelu": "none", "gelu_new": "tanh"}[c.activation_function]  # GPT-2's own: tanh
    model = sekd.GPT(sekd.GPTConfig(block_size=block_size, gelu=gelu, **sizes))
    for name, ours in model.state_dict().items():  # w[: len(ours)]: all of it, but wpe's first rows
        w = theirs[hf_name(name)]
        ours.copy_(w.t() if name.startswith("blocks") and w.dim() == 2 else w[: len(ours)])
    return model


# ----------------------------------------------------------------------------- distillation


def distill_student(args, method, corpus, device, teacher, evalset, init=None, save=True, **kd):
    """The initial student `init` distilled by --method `method` (`kd`: KDConfig overrides)."""
    positions, classes, samples, label = METHODS[method]
    on_policy = args.on_policy if positions != "ce" else 0.0  # CE, the no-KD baseline: real data
    cfg = kd_config(args, method, **kd)
    torch.manual_seed(args.seed)
    config = init.config if init is not None else model_config(args, "student", corpus.vocab.size)
    student = sekd.GPT(config).to(device)  # the initial student's config (GPT-2's GELU too)
    if init is not None:
        student.load_state_dict(init.state_dict())
    if cfg.lam > 0 and teacher is not None and teacher.config.vocab_size != config.vocab_size:
        sizes = f"teacher {teacher.config.vocab_size}, student {config.vocab_size}"
        fix = "train the teacher on the same data, --vocab-size and --full-vocab"
        raise UserError(f"the vocabularies differ ({sizes}): {fix}")
    batches, plan = sample_plan(args, samples, classes, corpus, device, student, teacher)
    student = maybe_compile(student, args)
    teacher = None if classes == "cache" else teacher  # SE-KD_3X: the teacher's draws are cached
    if RANK:  # data parallel: each rank its own random draws (RandomPos, pos-RS-KD, RS-KD)
        torch.manual_seed(args.seed + 1_000_003 * RANK)
    state = sekd.PositionState(cfg.gls_queue, cfg.curriculum_steps)
    prompt_len = args.prompt_len or args.seq_len // 2

    def loss_fn(step, micro, x, y, draws=None):
        state.step = step  # curriculum follows the optimizer step; GLS keeps its queue in `state`
        if on_policy > 0:  # a seed of its own per micro-batch: a resumed run writes the same text
            seed = np.random.SeedSequence([args.seed, step * args.grad_accum + micro + 1, RANK])
            gen = torch.Generator(device=x.device).manual_seed(int(seed.generate_state(1)[0]))
            how = (x, y, cfg, on_policy, prompt_len, gen, state)
            return sekd.on_policy_distill_loss(student, teacher, *how)
        if cfg.is_sekd:  # SE-KD as the paper runs it: the short path
            return sekd.sekd_loss(student, teacher, x, y, cfg)
        return sekd.distill_loss(student, teacher, x, y, cfg, state, draws)

    path, resume, save_ckpt = os.path.join(args.out_dir, f"student_{method}.pt"), None, None
    if save:
        key = run_key(args, method, cfg, corpus, plan["steps"], on_policy, prompt_len)
        if resume := resumable(path, key, method):  # GLS's queue; train_loop restores the rest
            state.queue = resume["gls_queue"]

        def save_ckpt(ckpt):
            run = dict(signature=corpus.signature, kd=asdict(cfg), run_key=key)
            save_checkpoint(path, ckpt | run | dict(gls_queue=state.queue))

    frozen = state_bytes(teacher) if cfg.lam > 0 and teacher is not None else 0
    stats = train_loop(
        student, loss_fn, batches, plan["steps"], args.lr, args, method, save_ckpt, resume, frozen
    )
    name = label.format(k=cfg.k, U=args.U, l=args.l)
    if method == "sekd" and (cfg.metric, cfg.policy) != ("student_entropy", "topk"):
        name = f"{cfg.metric} {cfg.policy} {cfg.k:.0%}"
    name += f" +{on_policy:.0%} on-policy" if on_policy > 0 else ""
    row = {"method": name, **evalset.evaluate(student, args), **stats, **plan}
    row["tokens_per_s"] = row["tokens"] / max(row["train_s"], 1e-9)
    row["total_s"] = row["train_s"] + (row["prepass_s"] or 0.0) + (row["cache_build_s"] or 0.0)
    return row


def run_key(args, method, cfg, corpus, steps, on_policy, prompt_len):
    """What a checkpoint must match to be resumed: what changes a student's trajectory."""
    flags = "seed seq_len batch_size grad_accum lr warmup weight_decay grad_clip dtype l "
    flags += "student_layers student_embd student_heads student_init_steps student_init_lr"
    key = dict(method=method, kd=asdict(cfg), steps=steps, data=corpus.meta["data_fingerprint"])
    init = file_sha256(out_path(args, "student_init")) if args.student_init_steps > 0 else None
    key |= dict(teacher=file_sha256(out_path(args, "teacher")), student_init=init)
    key |= dict(on_policy=on_policy, prompt_len=prompt_len)
    return key | {f: getattr(args, f) for f in flags.split()}


def resumable(path, key, tag):
    """The unfinished checkpoint at `path` of the same run, or None (a finished one, another's)."""
    ckpt = load_checkpoint(path) if os.path.exists(path) else {}
    if ckpt.get("step", 0) >= ckpt.get("steps", 0) or "optimizer" not in ckpt:
        return None
    if diff := [k for k in sorted(key) if ckpt.get("run_key", {}).get(k) != key[k]]:
        other = f"an unfinished checkpoint of another run ({', '.join(diff)} differ)"
        print(f"[{tag}] {path} is {other}: training anew")
    return None if diff else ckpt


# ----------------------------------------------------------------------------- results and main

# The tables' columns, header -> (key, format): the validation text's measures and costs; the items'
TEXT = {
    "val PPL": ("val_ppl", "{:.2f}".format),
    "tau*": ("tau", "{:.2f}".format),
    "PPL@tau*": ("val_ppl_tau", "{:.2f}".format),
    "entropy": ("entropy", "{:.2f}".format),
    "KL(T||S)": ("kl_to_teacher", "{:.3f}".format),
    "agree %": ("agreement", lambda v: f"{100 * v:.1f}"),
    "ECE %": ("ece", "{:.2f}".format),
    "wall": ("train_s", fmt_time),
    "tok/s": ("tokens_per_s", "{:,.0f}".format),
    "peak MiB": ("peak_bytes", lambda b: f"{b / 2**20:,.0f}"),
}
ITEMS = {
    "cloze PPL": ("cloze_ppl", "{:.1f}".format),
    "cloze@tau*": ("cloze_ppl_tau", "{:.1f}".format),
    "control PPL": ("control_ppl", "{:.1f}".format),
    "control@tau*": ("control_ppl_tau", "{:.1f}".format),
    "context": ("context_nats", "{:.3f}".format),
    "choice %": ("choice_acc", lambda v: f"{100 * v:.1f}"),
}


def print_table(rows, device, title=None):
    """TEXT's columns, then ITEMS's once a model has them."""
    print("\n" + title if title else "")
    items = next((r for r in rows if r.get("cloze_items") or r.get("choice_items")), None)
    w, c = max([22] + [len(r["method"]) for r in rows]), 15 if "val_ppl_std" in rows[-1] else 8

    def cell(r, key, fmt):  # "-": a measure the model lacks; mean ± std over seeds: `<key>_std`
        if r.get(key) is None:
            return "-"
        std = f"±{fmt(r[key + '_std'])}" if r.get(key + "_std") is not None else ""
        return fmt(r[key]) + std

    for columns in (TEXT, ITEMS) if items else (TEXT,):
        header = f"{'method':<{w}} " + " ".join(f"{h:>{c}}" for h in columns)  # c or wider
        print(("\n" if columns is ITEMS else "") + header + "\n" + "-" * len(header))
        for r in rows:
            cells = (f"{cell(r, *spec):>{max(c, len(h))}}" for h, spec in columns.items())
            print(f"{r['method']:<{w}} " + " ".join(cells))
    if items:
        n = {k: items.get(f"{k}_items", 0) for k in ("cloze", "control", "choice")}
        words = f"{n['cloze']:,} hard words, {n['control']:,} control words (new to their window)"
        print(f"cloze: {words}; context: control - cloze at tau*, nats")
        chance = f"chance {100 / data.OPTIONS:.0f}%"
        print(f"choice: {n['choice']:,} items of {data.OPTIONS} options, {chance}")
    if how := next((r["peak_how"] for r in rows if r.get("peak_how")), ""):
        print(f"peak memory on {device}: {how}")


def machine():  # where the results were measured
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cpu, threads = platform.processor() or platform.machine(), torch.get_num_threads()
    versions = dict(python=platform.python_version(), torch=torch.__version__)
    return versions | dict(cpu=cpu, threads=threads, gpu=gpu)


def load_data(args):
    """Every job's corpus and device; under torchrun only rank 0 prints (errors reach stderr)."""
    global RANK, WORLD
    device = pick_device(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # hours: rank 0 may build the data, a cache
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=3))
        RANK, WORLD = dist.get_rank(), dist.get_world_size()
        sys.stdout = open(os.devnull, "w") if RANK else sys.stdout
    sizes = dict(max_tokens=args.max_tokens or None, vocab_size=args.vocab_size)
    if RANK:  # rank 0 builds and writes the memmaps first; the others wait, then read them
        sync()
    corpus = data.prepare(args.dataset, args.seq_len, args.full_vocab, args.data_dir, **sizes)
    if RANK == 0:
        sync()
    samples = f"{len(corpus.train):,} train / {len(corpus.val):,} val samples"
    sizes = f"{samples} of {args.seq_len} positions, vocabulary {corpus.vocab.size:,}"
    print(f"data: {args.dataset}, {sizes}; device {device}")
    return corpus, device


def setup(args):
    """What every job that distils starts from (ours, and each in experiments/), and its rows."""
    corpus, device = load_data(args)
    evalset = EvalSet(corpus, args.eval_tokens, device, args.batch_size)
    teacher, stats = pretrained(args, corpus, device, evalset, "teacher")
    evalset.set_teacher(teacher.eval().requires_grad_(False), args)
    rows, student_init = [{"method": "teacher", **evalset.evaluate(teacher, args), **stats}], None
    if args.run != "teacher" and args.student_init_steps > 0:
        student_init, stats = pretrained(args, corpus, device, evalset, "student")
        rows += [{"method": "student init (CE)", **evalset.evaluate(student_init, args), **stats}]
    return corpus, device, evalset, teacher, student_init, rows


def write_results(args, corpus, t_start, **results):
    """OUT_DIR/results_RUN.json; then torchrun's process group closes."""
    global RANK, WORLD
    path, total = os.path.join(args.out_dir, f"results_{args.run}.json"), time.time() - t_start
    result = dict(args=vars(args), machine=machine(), data=corpus.meta, **results, total_s=total)
    if RANK == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        data.atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    print(f"results written to {path}; total time {fmt_time(total)}")
    if WORLD > 1:  # every rank done
        sync()
        dist.destroy_process_group()
    RANK, WORLD = 0, 1
    return result


def main(argv=None):
    args = parse_args(argv)
    configs = check_flags(args)  # a bad flag fails here, before any work
    t_start = time.time()
    corpus, device, evalset, teacher, student_init, rows = setup(args)
    student, accounts = model_config(args, "student", corpus.vocab.size), {}
    half = autocast(args, device).fast_dtype == torch.bfloat16
    settings = ("method", "B", "L", "V", "n_sel", "chunk_rows", "lam", "dtype")  # the rest: bytes
    for m, cfg in configs.items():  # sekd.memory_account of each step, by its own names
        step = (student, teacher.config, args.batch_size, args.seq_len, cfg, half, device.type)
        acc = sekd.memory_account(*step) if args.on_policy == 0 or cfg.method == "ce" else None
        if acc is None:
            print(f"\n[{m}] memory account: not modelled for this step")
            continue
        accounts[m] = acc
        mib = ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in acc.items() if k not in settings)
        rest = ", ".join(f"{k} {acc[k]}" for k in settings)
        print(f"\n[{m}] memory account, MiB: {mib} ({rest})")
    for m in configs:
        rows.append(distill_student(args, m, corpus, device, teacher, evalset, student_init))
        print_table(rows, device)
    if not configs:  # --run teacher
        print_table(rows, device)
    return write_results(args, corpus, t_start, rows=rows, memory_account=accounts)


def cli(argv=None, job=None):
    """Runs `job` (default: `main`; experiments/ pass their own). A user error is one line and exit
    code 2; any other exception is a bug (in a registered metric too): it keeps its traceback."""
    try:
        return (job or main)(argv)
    except UserError as e:  # = data.DataError; a library's refusal of a flag becomes one too
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        done = "checkpoints written so far are complete: the same command resumes from the last"
        print(f"interrupted; {done}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
