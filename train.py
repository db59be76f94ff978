"""The main job: train a teacher, distil students from it, compare them.

python train.py                    # teacher (or reuse out/teacher.pt), then CE / Full KD / SE-KD
python train.py --run teacher      # only the teacher
python train.py --run distill --method sekd --k 0.1 --metric reverse_kl --policy gls
python -m experiments.positions    # a paper table: each in experiments/, built on this file
torchrun --standalone --nproc_per_node=2 train.py -- --run distill   # data parallel
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
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import data
import sekd
from data import Batches

UserError = (
    data.DataError
)  # a mistake the user can fix (a flag, a checkpoint, a file): one line, exit 2

# ----------------------------------------------------------------------------- command line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UserError(f"{message} (--help lists every flag)")


def number(kind, ok, what):
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # so that argparse says "invalid float value: 'abc'"
    return parse


positive_int = number(int, lambda v: v >= 1, "at least 1")
non_negative_int = number(int, lambda v: v >= 0, "at least 0")
positive_float = number(float, lambda v: v > 0, "> 0")
fraction = number(float, lambda v: 0 < v <= 1, "in (0, 1] (e.g. 0.2 for 20%)")  # a budget: k, l
share = number(float, lambda v: 0 <= v <= 1, "in [0, 1]")
draws = number(
    int, lambda v: 1 <= v <= data.MAX_DRAWS, f"in [1, {data.MAX_DRAWS}] (7-bit counts in the cache)"
)

# The class and sample axes as methods:
# name -> (positions, classes: full | rskd | cache, samples: all | top | random)
AXES = {
    "rskd": ("full_kd", "rskd", "all"),
    "top_smp": ("full_kd", "full", "top"),
    "random_smp": ("full_kd", "full", "random"),
    "top_smp_rskd": ("full_kd", "rskd", "top"),
    "sekd_top_smp": ("sekd", "full", "top"),
    "sekd_3x": ("sekd", "cache", "top"),
}

# The paper's data (FineWeb-Edu, 80M tokens, 512-token samples, pure KL) as new defaults for one
# GPU; our models (a GPT-2 small teacher, a student half its size); 16 x 4 x 512 = 32,768 tokens per
# step.
# The default job is sized to finish in minutes on a 2-core CPU (results/quick_default_cpu.md).
# "full": the sizes it had before, 7-12x slower (results/compare_cpu.md).
PRESETS = {
    "full": {
        "vocab_size": 0,
        "teacher_embd": 256,
        "teacher_steps": 1200,
        "student_init_steps": 600,
        "student_steps": 300,
        "eval_tokens": 32768,
    },
    "fineweb": {
        "dataset": "hf:HuggingFaceFW/fineweb-edu:sample-10BT",
        "max_tokens": 80_000_000,
        "seq_len": 512,
        "full_vocab": True,
        "lam": 1.0,
        "teacher_layers": 12,
        "teacher_embd": 768,
        "teacher_heads": 12,
        "student_layers": 6,
        "student_embd": 384,
        "student_heads": 6,
        "batch_size": 16,
        "grad_accum": 4,
        "teacher_steps": 4800,
        "teacher_lr": 6e-4,
        "student_init_steps": 600,
        "student_init_lr": 1e-3,
        "student_steps": 2400,
        "lr": 6e-4,
        "warmup": 100,
        "eval_interval": 500,
        "eval_tokens": 262_144,
        "log_interval": 50,
        "chunk_rows": 1024,
    },
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the usage examples one to a line, and shows every flag's default."""


def build_parser():
    """Built at each call, so a metric or policy registered before `cli()` is a valid choice."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--run",
        default="compare",
        choices=["compare", "teacher", "distill"],
        help="teacher + CE / Full KD / SE-KD; only the teacher; one --method",
    )
    p.add_argument(
        "--preset",
        default="none",
        choices=["none", *PRESETS],
        help="full: the earlier, larger default job; fineweb: the paper's data (docs/fineweb.md)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="shakespeare",
        help="shakespeare | hf:NAME[:CONFIG] | files:PATH[,PATH]",
    )
    g.add_argument(
        "--max-tokens",
        type=non_negative_int,
        default=0,
        help="read documents up to this many tokens",
    )
    g.add_argument(
        "--seq-len", type=positive_int, default=128, help="positions per sample (block size)"
    )
    g.add_argument(
        "--vocab-size",
        type=non_negative_int,
        default=4096,
        help="the training text's most frequent ids, one more for the rest (0: all its ids)",
    )
    g.add_argument(
        "--full-vocab",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="all 50,257 GPT-2 ids (--vocab-size is then not used)",
    )
    g.add_argument(
        "--data-dir", default="data_cache", help="where tokenized memmaps are written and reused"
    )
    g = p.add_argument_group("models")
    for who, (layers, embd, heads) in {"teacher": (4, 128, 4), "student": (1, 64, 2)}.items():
        g.add_argument(f"--{who}-layers", type=positive_int, default=layers)
        g.add_argument(f"--{who}-embd", type=positive_int, default=embd)
        g.add_argument(f"--{who}-heads", type=positive_int, default=heads)
    g = p.add_argument_group("training")
    g.add_argument("--teacher-steps", type=positive_int, default=300)
    g.add_argument(
        "--student-init-steps",
        type=non_negative_int,
        default=300,
        help="CE steps of the initial student",
    )
    g.add_argument(
        "--student-init-lr",
        type=positive_float,
        default=3e-3,
        help="peak lr of the initial student",
    )
    g.add_argument(
        "--student-steps", type=positive_int, default=150, help="distillation steps per method"
    )
    g.add_argument("--batch-size", type=positive_int, default=16, help="sequences per micro-batch")
    g.add_argument(
        "--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step"
    )
    g.add_argument(
        "--lr",
        type=positive_float,
        default=1e-3,
        help="peak learning rate of distillation (every method)",
    )
    g.add_argument("--teacher-lr", type=positive_float, default=2e-3)
    g.add_argument(
        "--warmup",
        type=non_negative_int,
        default=30,
        help="linear warm-up steps, then cosine to lr/10",
    )
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument(
        "--eval-interval",
        type=positive_int,
        default=100,
        help="steps between checkpoints (resume points)",
    )
    g.add_argument(
        "--eval-tokens",
        type=positive_int,
        default=16384,
        help="validation tokens for the final metrics",
    )
    g.add_argument("--log-interval", type=positive_int, default=20)
    g = p.add_argument_group("distillation")
    g.add_argument(
        "--method", default="sekd", choices=sekd.METHODS + tuple(AXES), help="for --run distill"
    )
    g.add_argument("--k", type=fraction, default=0.2, help="SE-KD position budget, in (0, 1]")
    g.add_argument(
        "--metric",
        default="student_entropy",
        choices=list(sekd.METRICS),
        help="position importance",
    )
    g.add_argument(
        "--policy", default="topk", choices=list(sekd.POLICIES), help="position selection policy"
    )
    g.add_argument(
        "--gls-queue", type=positive_int, default=30_000, help="GLS: scores kept in the FIFO queue"
    )
    g.add_argument(
        "--curriculum-steps",
        type=positive_int,
        default=4_000,
        help="curriculum: steps to reach the top-k",
    )
    g.add_argument(
        "--seeds", type=positive_int, default=3, help="experiments/: students (seeds) per row"
    )
    g.add_argument("--T", type=positive_float, default=1.0, help="KD temperature")
    g.add_argument(
        "--lam",
        type=share,
        default=0.5,
        help="KL weight; 1 - lam: the CE weight (paper and KDConfig: 1)",
    )
    g.add_argument(
        "--ce-at",
        default="all",
        choices=["selected", "all"],
        help="where CE goes (Eq. 3, KDConfig: selected)",
    )
    g.add_argument(
        "--flow",
        default="streamed",
        choices=["streamed", "dense"],
        help="dense: full [B, L, V] logits",
    )
    g.add_argument(
        "--chunk-rows",
        type=non_negative_int,
        default=0,
        help="rows per logits chunk (0: sekd.CHUNK_MB)",
    )
    g.add_argument(
        "--on-policy",
        type=share,
        default=0.0,
        help="share of sequences the student writes (on-policy)",
    )
    g.add_argument(
        "--prompt-len",
        type=non_negative_int,
        default=0,
        help="on-policy prompt tokens (0 = --seq-len / 2)",
    )
    g.add_argument(
        "--divergence",
        default="auto",
        choices=["auto", "forward", "reverse"],
        help="KL(teacher || student) or KL(student || teacher); auto: reverse when on-policy",
    )
    g = p.add_argument_group("class and sample axes, offline teacher cache")
    g.add_argument(
        "--U", type=draws, default=64, help="RS-KD draws per position, in [1, 127] (7-bit counts)"
    )
    g.add_argument(
        "--l", type=fraction, default=0.2, help="share of training samples TopSmp / RandomSmp keep"
    )
    g.add_argument(
        "--cache",
        default="",
        help="SE-KD_3X teacher cache file (default OUT_DIR/rskd_cache_seedSEED.bin)",
    )
    g.add_argument(
        "--rebuild-cache",
        action="store_true",
        help="build the teacher cache anew even if one exists",
    )
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: bfloat16 on CUDA",
    )
    g.add_argument(
        "--compile",
        nargs="?",
        const="all",
        default="chunks",
        choices=["off", "chunks", "all"],
        help="torch.compile: the chunk formulas of sekd.py; all: the transformer bodies too; "
        "off: eager everywhere (a machine without a C++ compiler)",
    )
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--out-dir", default="out")
    g.add_argument(
        "--teacher-ckpt", default="", help="teacher checkpoint (default OUT_DIR/teacher.pt)"
    )
    g.add_argument(
        "--retrain-teacher", action="store_true", help="ignore a saved teacher and train a new one"
    )
    return p


def parse_args(argv=None, parser=None):
    """The flags, with --preset's values as defaults. We drop a leading `--` (torchrun needs one
    before the job's flags, or takes --run and --l for its own --run-path and --log-dir)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = argv[1:] if argv[:1] == ["--"] else argv
    p = parser or build_parser()
    args = p.parse_args(argv)
    if args.preset != "none":
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    return args


def check_flags(a):
    """What argparse types cannot check: flags that depend on each other, and the machine."""
    for who in (
        "teacher",
        "student",
    ):  # sekd.GPTConfig checks the sizes now, before any work (V: 1 until the data)
        model_config(a, who, vocab_size=1)
    if a.prompt_len > a.seq_len:
        raise UserError(
            f"--prompt-len must be in [0, --seq-len {a.seq_len}] (0 = half), got {a.prompt_len}"
        )
    if a.on_policy > 0 and sekd.on_policy_rows(a.batch_size, a.on_policy) == 0:
        raise UserError(
            f"--on-policy {a.on_policy} of --batch-size {a.batch_size} rounds to no sequence: "
            "raise one"
        )
    if (a.on_policy > 0 or a.divergence == "reverse") and a.run not in ("compare", "distill"):
        raise UserError("--on-policy and --divergence reverse work with --run compare or distill")
    positions, classes, _ = AXES.get(a.method, (a.method, "full", "all"))
    full = (
        a.run == "compare" or positions in ("full_kd", "sekd", "random_pos") and classes == "full"
    )
    if a.on_policy > 0 and (
        a.lam == 0 or not full
    ):  # the student's own text needs the teacher's full distribution
        raise UserError(
            "--on-policy works with --lam > 0 and a method with the teacher's full distribution "
            "(full_kd, sekd, random_pos, or their TopSmp / RandomSmp variants)"
        )
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible: use --device cpu")


def from_flags(flags, make, **fields):
    """make(**fields), a library object built from the user's `flags`: what it refuses is a user
    error."""
    try:
        return make(**fields)
    except ValueError as e:  # the library's own check, in one line
        raise UserError(f"{flags}: {e}") from None


def kd_config(args, method, **kd):
    """The sekd.KDConfig of `method` (sekd.METHODS or AXES) under these flags, which it checks; `kd`
    overrides fields."""
    positions, classes, _ = AXES.get(method, (method, "full", "all"))
    on_policy = (
        args.on_policy if positions != "ce" else 0.0
    )  # CE, the no-KD baseline, stays on real data
    divergence = {"auto": "reverse" if on_policy > 0 else "forward"}.get(
        args.divergence, args.divergence
    )
    fields = dict(
        method=positions,
        k=1.0 if positions == "full_kd" else args.k,
        T=args.T,
        lam=args.lam,
        flow=args.flow,
        chunk_rows=args.chunk_rows,
        metric=args.metric,
        policy=args.policy,
        gls_queue=args.gls_queue,
        curriculum_steps=args.curriculum_steps,
        classes="full" if classes == "full" else "rskd",
        U=args.U,
        divergence=divergence if positions != "ce" else "forward",
        ce_at=args.ce_at,
    )
    return from_flags(f"--method {method}", sekd.KDConfig, **{**fields, **kd})


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, obj):
    """Through a temporary file and a rename: an interrupted save leaves the old file. Rank 0
    writes."""
    if RANK == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        buf = io.BytesIO()
        torch.save(obj, buf)
        data.atomic_write_bytes(path, buf.getvalue())
    barrier()


def load_checkpoint(path):
    if not os.path.exists(path):
        raise UserError(
            f"checkpoint {path} does not exist: train it first (python train.py --run teacher)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        GPT_from(ckpt)  # checks the keys and shapes too
    except Exception as e:
        raise UserError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}): "
            "delete it and train again"
        ) from None
    return ckpt


def GPT_from(ckpt):
    model = sekd.GPT(sekd.GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model


def check_signature(ckpt, corpus, path):  # refuse a checkpoint of another tokenizer or vocabulary
    if ckpt.get("signature") != corpus.signature:
        raise UserError(
            f"checkpoint {path} was trained on another vocabulary or tokenizer "
            f"({ckpt.get('signature')} vs data {corpus.signature}): use the same --dataset/"
            "--vocab-size/--full-vocab, or pass --retrain-teacher"
        )


# ---- what a student trains on: torchrun, autocast, the sample axis, the teacher cache
# torchrun starts N copies of this job, as in nanoGPT: each rank takes its slice of each global
# batch (data.Batches), we average gradients before clipping, rank 0 prints and writes.
RANK, WORLD = 0, 1  # alone


def init_distributed(device):
    """Join torchrun's process group; ranks other than 0 print nothing (errors reach stderr)."""
    global RANK, WORLD
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # the others may wait hours while rank 0 alone builds the data or a teacher cache
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=3))
        RANK, WORLD = dist.get_rank(), dist.get_world_size()
        if RANK:
            sys.stdout = open(os.devnull, "w")


def finish_distributed():
    global RANK, WORLD
    if WORLD > 1:
        dist.barrier()
        dist.destroy_process_group()
    RANK, WORLD = 0, 1


def barrier():
    if WORLD > 1:
        dist.barrier()


def rank0_first(fn):
    """fn() on rank 0, then on the others: they read what rank 0 built and wrote (the memmaps)."""
    out = fn() if RANK == 0 else None
    barrier()
    return fn() if RANK != 0 else out


def gather_objects(obj):  # every rank's obj, in rank order
    parts = [obj] * WORLD
    if WORLD > 1:
        dist.all_gather_object(parts, obj)
    return parts


def average_gradients(model):
    """Each loss is a mean over sequences, so the ranks' mean gradient is the whole batch's. By
    hand, as DistributedDataParallel's hooks expect `model(...)`; the losses call `model.hidden`."""
    if WORLD == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)  # a sum (gloo has no average)
    flat /= WORLD
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p)


def autocast_dtype(args, device):  # --dtype auto: bfloat16 on CUDA
    auto = torch.bfloat16 if device.type == "cuda" else None
    return {"auto": auto, "float32": None, "bfloat16": torch.bfloat16}[args.dtype]


def autocast(args, device):
    dtype = autocast_dtype(args, device)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def teacher_ckpt_path(args):
    return args.teacher_ckpt or os.path.join(args.out_dir, "teacher.pt")


def cache_path(args):
    return args.cache or os.path.join(args.out_dir, f"rskd_cache_seed{args.seed}.bin")


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def sample_plan(args, samples, classes, corpus, device, student, teacher):
    """What `distill_student` trains a student on: the samples it sees (all; TopSmp's, by the
    frozen initial student's entropy; RandomSmp's), for as many epochs as --student-steps makes
    over all samples (l = 20% trains 20% of the steps: the wall-time saving), SE-KD_3X's draws."""
    n, kept, prepass_s, cache, build_s, reused = len(corpus.train), None, None, None, None, None
    if classes == "cache" and os.path.exists(cache_path(args)) and not args.rebuild_cache:
        # we refuse a cache of another run before the pre-pass, not after
        data.TeacherCache(cache_path(args)).check(cache_signature(args, corpus, []), skip=("kept",))
    if samples == "top":
        scores, prepass_s = sample_prepass(student, corpus, args, device)
        kept = sekd.top_samples(torch.from_numpy(scores), args.l).numpy()
    elif samples == "random":
        kept = sekd.random_samples(n, args.l, torch.Generator().manual_seed(args.seed)).numpy()
    if classes == "cache":
        ids = kept if kept is not None else np.arange(n)
        cache, build_s, reused = teacher_cache(args, corpus, device, teacher, ids)
    n_kept, steps = n, args.student_steps
    if kept is not None:
        n_kept, steps = len(kept), max(1, math.ceil(args.student_steps * len(kept) / n))
    return {
        "samples": samples,
        "n_kept": n_kept,
        "prepass_s": prepass_s,
        "cache_build_s": build_s,
        "cache_reused": reused,
        "cache_bytes": os.path.getsize(cache.path) if cache else None,
        "steps": steps,
        "batches": Batches(
            corpus, args.batch_size, args.grad_accum, args.seed, device, kept, RANK, WORLD, cache
        ),
    }


_PREPASS = {}  # (seed, student config, data, dtype, device) -> (scores, seconds): one per seed


@torch.no_grad()
def sample_prepass(student, corpus, args, device):
    """The frozen initial student scores every training sample by its mean entropy -> (scores [N]
    float64, seconds). Each rank scores its share of the batches; every rank gets all the scores."""
    config = json.dumps(asdict(student.config), sort_keys=True)
    key = (args.seed, config, corpus.meta["data_fingerprint"], args.dtype, str(device))
    if key not in _PREPASS:
        t0, scores, bs, chunk_rows = time.time(), [], args.batch_size, args.chunk_rows or None
        student.eval()
        starts = range(0, len(corpus.train), bs)
        for i in starts[RANK * len(starts) // WORLD : (RANK + 1) * len(starts) // WORLD]:
            x = torch.from_numpy(corpus.train[i : i + bs, :-1].astype(np.int64)).to(device)
            with autocast(args, device):
                h = student.hidden(x)
            H = sekd.sample_entropy(h.float(), student.head_weight.float(), None, chunk_rows)
            scores.append(H.double().cpu().numpy())
        student.train()
        scores = np.concatenate(gather_objects(np.concatenate(scores) if scores else np.zeros(0)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t0
        _PREPASS[key] = (scores, seconds)
        print(
            f"[pre-pass] scored {len(corpus.train):,} samples by mean student entropy "
            f"in {seconds:.1f}s"
        )
    return _PREPASS[key]


def cache_signature(args, corpus, kept):
    """What a teacher cache must match to be used: the teacher (by hash), the data, the draws."""
    path = teacher_ckpt_path(args)
    if not os.path.exists(path):
        raise UserError(
            f"teacher checkpoint {path} does not exist: the cache is tied to its hash; "
            "train it first (python train.py --run teacher)"
        )
    return {
        "format": 1,
        "teacher_sha256": file_sha256(path),
        "data_fingerprint": corpus.meta["data_fingerprint"],
        "U": args.U,
        "T": args.T,
        "seed": args.seed,
        "V": corpus.vocab.size,
        "seq_len": args.seq_len,
        "kept": [int(i) for i in kept],
    }


def teacher_cache(args, corpus, device, teacher, kept):
    """SE-KD_3X's cache for `kept`: reused if its signature matches this run, refused in one line
    if not, built if absent or --rebuild-cache. -> (data.TeacherCache, build seconds or None,
    reused). Rank 0 builds it (its draws do not depend on the world size); the others wait."""
    path, signature = cache_path(args), cache_signature(args, corpus, kept)
    build = RANK == 0 and (args.rebuild_cache or not os.path.exists(path))
    if build:
        if teacher is None:
            raise UserError("building the teacher cache needs the teacher")
        t0, V, W = time.time(), corpus.vocab.size, teacher.head_weight
        gen = torch.Generator(device=device).manual_seed(args.seed)

        @torch.no_grad()
        def blocks():  # U classes drawn from the teacher at every position of every kept sample
            for i in range(0, len(kept), args.batch_size):
                rows = corpus.train[kept[i : i + args.batch_size], :-1]
                x = torch.from_numpy(rows.astype(np.int64)).to(device)
                with autocast(args, device):
                    h = teacher.hidden(x)
                    ids, counts = sekd.teacher_draws(
                        h, W, args.U, args.T, args.chunk_rows or None, gen
                    )
                yield data.encode_draws(ids, counts, V).cpu().numpy()

        shape = (len(kept), args.seq_len, args.U, data.cache_bytes_per_class(V))
        data.write_cache(path, signature, shape, blocks())
        build_s = time.time() - t0
    barrier()
    cache, size = data.TeacherCache(path), os.path.getsize(path)
    if build:
        print(
            f"[cache] built {path}: {len(kept):,} samples x {args.seq_len} positions x "
            f"U={args.U}, {size:,} bytes in {build_s:.1f}s"
        )
        return cache, build_s, False
    cache.check(signature)
    print(f"[cache] reusing {path} ({size:,} bytes): distillation runs without the teacher")
    return cache, None, True


# ----------------------------------------------------------------------------- memory meter
# The CPU has no allocator statistics, so we count live tensor bytes through torch's dispatch hooks.


class LiveBytes(TorchDispatchMode):
    """While active, every storage an op makes counts until it is freed; `peak` is the most bytes
    alive at once. Not counted: tensors made before (weights, AdamW state), a kernel's scratch, an
    output sharing an input's storage (in place, views). `match(t)`, optional, picks tensors also
    counted in `matched_live` / `matched_peak` and listed in `log` (e.g. the [rows, V] logits)."""

    def __init__(self, match=None):
        super().__init__()
        self.live = self.peak = self.matched_live = self.matched_peak = 0
        self.match, self.log, self._seen = match, [], set()

    def _free(self, key, nbytes, matched):
        self._seen.discard(key)
        self.live -= nbytes
        self.matched_live -= nbytes if matched else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if torch.is_tensor(t)
        }
        for t in (t for t in tree_flatten(out)[0] if torch.is_tensor(t)):
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in self._seen and key not in inputs:
                self._seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                matched = self.match is not None and bool(self.match(t))
                if matched:
                    self.matched_live += nbytes
                    self.matched_peak = max(self.matched_peak, self.matched_live)
                    self.log.append(
                        (str(func.overloadpacket.__name__), tuple(t.shape), t.dtype, nbytes)
                    )
                weakref.finalize(storage, self._free, key, nbytes, matched)
        return out


def state_bytes(*tensors_or_modules):
    """Bytes held by the parameters and buffers of modules, or by plain tensors."""
    ts = [
        t
        for x in tensors_or_modules
        for t in (
            list(x.parameters()) + list(x.buffers()) if isinstance(x, torch.nn.Module) else [x]
        )
    ]
    return sum(t.numel() * t.element_size() for t in ts)


# ----------------------------------------------------------------------------- training loop


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, lr, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train_loop(
    model, loss_fn, batches, steps, lr, args, tag, ckpt=None, resume=None, frozen_bytes=0
):
    """AdamW, warm-up + cosine, accumulation, clipping; `ckpt(step, opt, train_s, live_peak)` every
    --eval-interval steps. A non-finite loss or gradient stops before the update. -> seconds,
    tokens, peak bytes, losses."""
    opt = make_optimizer(model, lr, args.weight_decay)
    start = saved = resume["step"] if resume else 0
    if resume:
        opt.load_state_dict(resume["optimizer"])
        print(f"[{tag}] resuming at step {start}/{steps}")
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for p in model.parameters() if WORLD > 1 else []:  # every rank starts from rank 0's weights
        dist.broadcast(p.data, 0)
    tokens_per_step = WORLD * batches.bs * batches.accum * (batches.samples.shape[1] - 1)
    t0, train_time, curve = time.time(), 0.0, []
    # On the CPU we count the live tensors of step 1 (AdamW's state exists by then), or of the only
    # step, at whatever step a run resumes: under the meter everything runs eager (a graph compiled
    # there would round otherwise), so metering another step would end a resumed run on another
    # student. Its checkpoint keeps the peak.
    metered, peak_cpu = min(1, steps - 1), (resume or {}).get("live_peak", 0)
    for step in range(start, steps):
        ts = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, args.warmup)
        metering = dev.type != "cuda" and step == metered
        meter = LiveBytes() if metering else nullcontext()
        eager = torch.compiler.set_stance("force_eager") if metering else nullcontext()
        with meter, eager:
            total = 0.0
            for micro in range(batches.accum):
                x, y, *cached = batches.get(step, micro)  # cached: SE-KD_3X's teacher draws
                with autocast(args, dev):
                    loss, _ = loss_fn(x, y, *cached)
                (loss / batches.accum).backward()
                total += loss.item() / batches.accum
            total = sum(gather_objects(total)) / WORLD  # the logged loss: the mean over ranks
            curve.append(total)
            average_gradients(model)
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
            if not (math.isfinite(total) and math.isfinite(norm)):
                what = (
                    f"loss became {total}"
                    if not math.isfinite(total)
                    else f"gradient norm became {norm}"
                )
                kept = (
                    f"the checkpoint of step {saved} is kept"
                    if saved
                    else "no checkpoint was written"
                )
                raise UserError(
                    f"[{tag}] {what} at step {step + 1}: stopped before the update, {kept}; "
                    "lower --lr or raise --warmup"
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
        peak_cpu = meter.peak if isinstance(meter, LiveBytes) else peak_cpu
        train_time += time.time() - ts
        done = step + 1
        if done % args.log_interval == 0 or done == steps:
            rate = (done - start) * tokens_per_step / max(train_time, 1e-9)
            eta = (steps - done) * train_time / (done - start)
            print(
                f"[{tag}] step {done:5d}/{steps} | loss {total:.4f} | {rate:,.0f} tok/s | "
                f"elapsed {fmt_time(time.time() - t0)} | ETA {fmt_time(eta)}",
                flush=True,
            )
        if ckpt is not None and (done % args.eval_interval == 0 or done == steps):
            ckpt(done, opt, train_time, peak_cpu)
            saved = done
    if dev.type == "cuda":
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        adamw = sum(
            state_bytes(t) for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
        )
        peak = state_bytes(model) + adamw + peak_cpu + frozen_bytes
        how = "weights (student + teacher) + AdamW state + the live tensors of one step (LiveBytes)"
    return {
        "train_s": train_time,
        "tokens": (steps - start) * tokens_per_step,
        "peak_bytes": peak,
        "peak_how": how,
        "loss_curve": curve,
    }


# ----------------------------------------------------------------------------- evaluation


def per_item(
    row, v, lengths
):  # the sums over each item's target rows; lengths: its targets' tokens
    return torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, row, v.double())


class EvalSet:
    """What every model is scored on: validation samples at every position (with the teacher's
    hidden states on them, a student's KL costs two heads only), and the paper's kind of items
    (data.eval_items). The cloze of hard words: PPL as lm-eval-harness gives LAMBADA's (exp of the
    mean -log p of a whole word), accuracy (the greedy continuation is the word) and ECE at its
    tokens. Multiple choice: the option of highest log-likelihood per byte (lm-eval-harness's
    acc_norm), against a chance of 1 / data.OPTIONS."""

    def __init__(self, corpus, n_tokens, device, batch_size):
        n = max(1, min(len(corpus.val), n_tokens // (corpus.val.shape[1] - 1)))
        rows = np.linspace(0, len(corpus.val) - 1, n).astype(np.int64)
        x = torch.from_numpy(corpus.val[rows].astype(np.int64)).to(device)
        self.x, self.y, self.bs, self.teacher_h, self.teacher_w = (
            x[:, :-1],
            x[:, 1:],
            batch_size,
            None,
            None,
        )
        self.items, said = data.eval_items(corpus)
        print(f"evaluation: {self.y.numel():,} validation tokens; {said}")

    @torch.no_grad()
    def set_teacher(self, teacher, args):
        with autocast(args, self.x.device):
            self.teacher_h = torch.cat(
                [
                    teacher.hidden(self.x[i : i + self.bs]).float()
                    for i in range(0, len(self.x), self.bs)
                ]
            )
        self.teacher_w = teacher.head_weight.detach().float()

    def sums(self, model, args, x, y, teacher_h=None):
        """sekd.evaluation_sums over batches of x: the sums added, the per-row lists joined."""
        tot, dev = {}, self.x.device
        for i in range(0, len(x), self.bs):
            with autocast(args, dev):
                h = model.hidden(x[i : i + self.bs].to(dev)).float()
            th = teacher_h[i : i + self.bs] if teacher_h is not None else None
            for k, v in sekd.evaluation_sums(
                h, model.head_weight.float(), th, self.teacher_w, y[i : i + self.bs].to(dev)
            ).items():
                tot[k] = tot.get(k, type(v)()) + v
        return {k: torch.cat(v) if isinstance(v, list) else v for k, v in tot.items()}

    @torch.no_grad()
    def evaluate(self, model, args, limit=None):
        """Every measure; with `limit` (a quick look during training), val PPL on `limit` samples
        only."""
        model.eval()
        n = len(self.x) if limit is None else min(limit, len(self.x))
        t = self.teacher_h is not None
        s = self.sums(model, args, self.x[:n], self.y[:n], self.teacher_h[:n] if t else None)
        n, ce = len(s["nll"]), s["nll"].double().mean().item()
        out = {
            "val_loss": ce,
            "val_ppl": math.exp(ce),
            "kl_to_teacher": s["kl"] / n if t else None,
            "agreement": s["agree"] / n if t else None,
            "eval_tokens": n,
            "ece": sekd.expected_calibration_error(s["conf"], s["correct"]),
        }
        if limit is None and "cloze" in self.items:
            x, y, lengths, row = self.items["cloze"]
            s = self.sums(model, args, x, y)
            out |= {
                "cloze_ppl": math.exp(per_item(row, s["nll"], lengths).mean()),
                "cloze_items": len(lengths),
                "cloze_acc": (per_item(row, ~s["correct"], lengths) == 0).double().mean().item(),
                "cloze_ece": sekd.expected_calibration_error(s["conf"], s["correct"]),
            }
        if limit is None and "choice" in self.items:
            x, y, lengths, row, n_bytes = self.items["choice"]
            logp_per_byte = -per_item(row, self.sums(model, args, x, y)["nll"], lengths) / n_bytes
            best = logp_per_byte.view(-1, data.OPTIONS).argmax(1)  # the true option is option 0
            out |= {"choice_acc": (best == 0).double().mean().item(), "choice_items": len(best)}
        model.train()
        return out


# ------------------------------------------------------------- the teacher and the initial student


def pick_device(args):
    name = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU per rank
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def model_config(args, who, vocab_size):
    return from_flags(
        f"the {who} (--{who}-layers, --{who}-heads, --{who}-embd, --seq-len)",
        sekd.GPTConfig,
        vocab_size=vocab_size,
        block_size=args.seq_len,
        n_layer=getattr(args, f"{who}_layers"),
        n_head=getattr(args, f"{who}_heads"),
        n_embd=getattr(args, f"{who}_embd"),
    )


def new_model(args, who, vocab_size, device):
    return sekd.GPT(model_config(args, who, vocab_size)).to(device)


def maybe_compile(model, args):
    if args.compile == "all":
        model.hidden = torch.compile(model.hidden)
    return model


def pretrained(args, corpus, device, evalset, who):
    """The teacher, or the initial student every method starts from (as in the paper: a random
    student's entropy ranks nothing), trained with CE, or reused or resumed from its checkpoint."""
    if who == "teacher":
        path, steps, lr, seed = (
            teacher_ckpt_path(args),
            args.teacher_steps,
            args.teacher_lr,
            args.seed + 1,
        )
        must_exist = args.run == "distill" and bool(
            args.teacher_ckpt
        )  # a named teacher is never trained here
        reuse = not args.retrain_teacher
    else:
        path = os.path.join(args.out_dir, "student_init.pt")
        steps, lr, seed, must_exist, reuse = (
            args.student_init_steps,
            args.student_init_lr,
            args.seed + 2,
            False,
            True,
        )
    ckpt = None
    if must_exist or (os.path.exists(path) and reuse):
        ckpt = load_checkpoint(path)
        check_signature(ckpt, corpus, path)
        block = ckpt["config"]["block_size"]
        if who == "teacher" and block < args.seq_len:
            raise UserError(
                f"teacher checkpoint {path} has block size {block}, shorter than --seq-len "
                f"{args.seq_len}: use --seq-len {block} or less, or --retrain-teacher"
            )
    wanted = (asdict(model_config(args, who, corpus.vocab.size)), steps, seed)
    if (
        who == "student"
        and ckpt is not None
        and (ckpt["config"], ckpt["steps"], ckpt.get("seed")) != wanted
    ):
        print(f"[{who}] {path} was made with other sizes, steps or seed: training a new one")
        ckpt = None
    if ckpt is not None and ckpt["step"] >= ckpt["steps"]:
        print(
            f"[{who}] reusing {path} ({ckpt['config']['n_layer']} layers, "
            f"d={ckpt['config']['n_embd']}, "
            f"{ckpt['steps']} steps, val ppl {ckpt['val_ppl']:.2f})"
            + ("; --retrain-teacher to train anew" if who == "teacher" else "")
        )
        return GPT_from(ckpt).to(device), {"train_s": ckpt.get("train_s", 0.0), "reused": True}
    if must_exist:
        raise UserError(
            f"teacher checkpoint {path} is unfinished: run --run teacher to complete it"
        )
    torch.manual_seed(args.seed)
    model = GPT_from(ckpt).to(device) if ckpt else new_model(args, who, corpus.vocab.size, device)
    body, ce = maybe_compile(model, args), sekd.KDConfig(method="ce", chunk_rows=args.chunk_rows)
    before = (ckpt or {}).get("train_s", 0.0)  # the training time of the run this one resumes

    def save(step, opt, train_s, live_peak):
        ppl = evalset.evaluate(model, args, limit=64)["val_ppl"]
        save_checkpoint(
            path,
            {
                "model": model.state_dict(),
                "config": asdict(model.config),
                "seed": seed,
                "signature": corpus.signature,
                "step": step,
                "steps": steps,
                "optimizer": opt.state_dict(),
                "val_ppl": ppl,
                "train_s": before + train_s,
                "live_peak": live_peak,
            },
        )
        print(f"[{who}] step {step}: quick val ppl {ppl:.2f}, saved {path}")

    batches = Batches(
        corpus, args.batch_size, args.grad_accum, seed, device, rank=RANK, world=WORLD
    )
    stats = train_loop(
        model,
        lambda x, y: sekd.distill_loss(body, None, x, y, ce),
        batches,
        steps,
        lr,
        args,
        who,
        ckpt=save,
        resume=ckpt,
    )
    return model, {**stats, "reused": False}


# ----------------------------------------------------------------------------- distillation


def method_label(method, cfg, args):
    if method in AXES:
        return {
            "rskd": f"RS-KD U={args.U}",
            "top_smp": f"TopSmp {args.l:.0%}",
            "random_smp": f"RandomSmp {args.l:.0%}",
            "top_smp_rskd": "TopSmp+RS-KD",
            "sekd_top_smp": "SE-KD+TopSmp",
            "sekd_3x": "SE-KD_3X",
        }[method]
    if cfg.method == "sekd" and (cfg.metric, cfg.policy) != ("student_entropy", "topk"):
        return f"{cfg.metric} {cfg.policy} {cfg.k:.0%}"
    return {
        "ce": "CE (no KD)",
        "full_kd": "Full KD",
        "sekd": f"SE-KD top {cfg.k:.0%}",
        "random_pos": f"RandomPos {cfg.k:.0%}",
        "at_kd": "AT-KD",
    }[cfg.method]


def distill_student(
    args, method, corpus, device, teacher, evalset, student_init=None, save=True, **kd
):
    """One student from the shared initial weights, trained with `method` (sekd.METHODS or AXES)
    and evaluated; `kd` overrides KDConfig fields; save=False keeps no checkpoint. -> the results
    row."""
    positions, classes, samples = AXES.get(method, (method, "full", "all"))
    on_policy = (
        args.on_policy if positions != "ce" else 0.0
    )  # CE, the no-KD baseline, stays on real data
    cfg = kd_config(args, method, **kd)
    torch.manual_seed(args.seed)
    student = new_model(args, "student", corpus.vocab.size, device)
    if student_init is not None:  # same initial weights for every method
        student.load_state_dict(student_init.state_dict())
    if (
        cfg.uses_teacher
        and teacher is not None
        and teacher.config.vocab_size != student.config.vocab_size
    ):
        raise UserError(
            f"teacher vocabulary ({teacher.config.vocab_size}) and student vocabulary "
            f"({student.config.vocab_size}) differ: train the teacher on the same data, "
            "--vocab-size and --full-vocab"
        )
    plan = sample_plan(args, samples, classes, corpus, device, student, teacher)
    batches = plan.pop("batches")
    s_body, t_body = maybe_compile(student, args), (None if classes == "cache" else teacher)
    # data parallel: other random draws (RandomPos, pos-RS-KD, RS-KD) on each rank; rank 0 keeps 1
    # rank's
    if RANK:
        torch.manual_seed(args.seed + 1_000_003 * RANK)
    state, calls = (
        cfg.new_state(),
        [0],
    )  # GLS's queue (one per rank); curriculum follows the optimizer step
    prompt_len = args.prompt_len or args.seq_len // 2

    def loss_fn(x, y, draws=None):
        state.step = calls[0] // args.grad_accum
        calls[0] += 1
        if (
            on_policy > 0
        ):  # each micro-batch samples from its own seed: a resumed run writes the same text
            seed = int(np.random.SeedSequence([args.seed, calls[0], RANK]).generate_state(1)[0])
            gen = torch.Generator(device=x.device).manual_seed(seed)
            return sekd.on_policy_distill_loss(
                s_body, t_body, x, y, cfg, on_policy, prompt_len, gen, state
            )
        if cfg.is_sekd:  # SE-KD as the paper runs it: the short path through sekd.py
            return sekd.sekd_loss(s_body, t_body, x, y, cfg)
        return sekd.distill_loss(s_body, t_body, x, y, cfg, state, draws)

    path = os.path.join(args.out_dir, f"student_{method}.pt")
    key = run_key(args, method, cfg, corpus, plan["steps"], on_policy, prompt_len) if save else None
    resume = resumable(path, key, method) if save else None
    if (
        resume is not None
    ):  # everything a step reads: weights, AdamW (train_loop), GLS queue, RNG, step
        student.load_state_dict(resume["model"])
        state.queue, calls[0] = resume["gls_queue"], resume["step"] * args.grad_accum
        set_rng_state(resume["rng"])

    def save_ckpt(step, opt, train_s, live_peak):
        save_checkpoint(
            path,
            {
                "model": student.state_dict(),
                "config": asdict(student.config),
                "signature": corpus.signature,
                "step": step,
                "steps": plan["steps"],
                "kd": asdict(cfg),
                "run_key": key,
                "optimizer": opt.state_dict(),
                "gls_queue": state.queue,
                "rng": rng_state(),
                "live_peak": live_peak,
            },
        )

    stats = train_loop(
        student,
        loss_fn,
        batches,
        plan["steps"],
        args.lr,
        args,
        method,
        ckpt=save_ckpt if save else None,
        resume=resume,
        frozen_bytes=state_bytes(teacher) if cfg.uses_teacher and t_body is not None else 0,
    )
    name = method_label(method, cfg, args) + (
        f" +{on_policy:.0%} on-policy" if on_policy > 0 else ""
    )
    row = {
        "method": name,
        **evalset.evaluate(student, args),
        **stats,
        **plan,
        "resumed_at": resume["step"] if resume else None,
    }
    row["tokens_per_s"] = row["tokens"] / max(row["train_s"], 1e-9)
    row["total_s"] = row["train_s"] + (row["prepass_s"] or 0.0) + (row["cache_build_s"] or 0.0)
    return row


# Every flag that changes a distilled student's trajectory: a checkpoint resumes only the same run.
RUN_FLAGS = (
    "seed",
    "seq_len",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup",
    "weight_decay",
    "grad_clip",
    "dtype",
    "student_layers",
    "student_embd",
    "student_heads",
    "student_init_steps",
    "student_init_lr",
    "l",
)


def run_key(args, method, cfg, corpus, steps, on_policy, prompt_len):
    """What a checkpoint must match to be resumed: the settings, data, teacher and initial
    student."""
    init, teacher = os.path.join(args.out_dir, "student_init.pt"), teacher_ckpt_path(args)
    return {
        "method": method,
        "kd": asdict(cfg),
        "steps": steps,
        "data": corpus.meta["data_fingerprint"],
        "teacher": file_sha256(teacher) if os.path.exists(teacher) else None,
        "student_init": file_sha256(init)
        if args.student_init_steps > 0 and os.path.exists(init)
        else None,
        "on_policy": on_policy,
        "prompt_len": prompt_len,
        **{f: getattr(args, f) for f in RUN_FLAGS},
    }


def resumable(path, key, tag):
    """The unfinished checkpoint at `path` of the same run, or None (a finished one, another
    run's)."""
    ckpt = load_checkpoint(path) if os.path.exists(path) else {}
    if ckpt.get("step", 0) >= ckpt.get("steps", 0) or "optimizer" not in ckpt:
        return None
    if ckpt.get("run_key") != key:
        diff = sorted(k for k in key if (ckpt.get("run_key") or {}).get(k) != key[k])
        print(
            f"[{tag}] {path} is an unfinished checkpoint of another run ({', '.join(diff)} "
            "differ): training anew"
        )
        return None
    return ckpt


def rng_state():
    """torch's global generators (random metric, pos-RS-KD, online RS-KD) of every rank, in rank
    order."""
    return gather_objects(
        {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
    )


def set_rng_state(rng):
    """This rank's generators from `rng_state()`; a rank it has no state for keeps its fresh
    seed."""
    rng = (
        [rng] if isinstance(rng, dict) else rng
    )  # a checkpoint written before states were per rank
    if RANK < len(rng):
        torch.set_rng_state(rng[RANK]["cpu"])
        if rng[RANK]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng[RANK]["cuda"])


# ----------------------------------------------------------------------------- results and main


def print_table(rows, device, title=None):
    """Rows of results; a row with `<key>_std` entries (mean over seeds) shows them as mean ±
    std."""
    w, c = (
        max([22] + [len(r["method"]) for r in rows]),
        14 if any("val_ppl_std" in r for r in rows) else 8,
    )

    def cell(r, key, fmt, scale=1.0):
        if r.get(key) is None:
            return "-"
        std = r.get(key + "_std")
        return fmt.format(scale * r[key]) + ("" if std is None else "±" + fmt.format(scale * std))

    head = (
        f"{'method':<{w}} {'val PPL':>{c}} {'KL(T||S)':>{c + 1}} {'agree %':>{c}} {'ECE %':>{c}} "
        f"{'cloze PPL':>{c}} {'cloze %':>{c}} {'choice %':>{c}} {'wall':>8} {'tok/s':>8} "
        f"{'peak MiB':>9}"
    )
    print(("\n" + title if title else "") + "\n" + head + "\n" + "-" * len(head))
    for r in rows:
        wall = fmt_time(r["train_s"]) if r.get("train_s") else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        peak = f"{r['peak_bytes'] / 2**20:,.0f}" if r.get("peak_bytes") else "-"
        print(
            f"{r['method']:<{w}} {cell(r, 'val_ppl', '{:.2f}'):>{c}} "
            f"{cell(r, 'kl_to_teacher', '{:.3f}'):>{c + 1}} "
            f"{cell(r, 'agreement', '{:.1f}', 100):>{c}} {cell(r, 'ece', '{:.2f}'):>{c}} "
            f"{cell(r, 'cloze_ppl', '{:.1f}'):>{c}} {cell(r, 'cloze_acc', '{:.1f}', 100):>{c}} "
            f"{cell(r, 'choice_acc', '{:.1f}', 100):>{c}} {wall:>8} {tps:>8} {peak:>9}"
        )
    items = next((r for r in rows if r.get("cloze_items") or r.get("choice_items")), None)
    if items:
        print(
            f"cloze: {items.get('cloze_items', 0):,} hard words, PPL and greedy accuracy; choice: "
            f"{items.get('choice_items', 0):,} items of {data.OPTIONS} options, "
            f"chance {100 / data.OPTIONS:.0f}%"
        )
    how = next((r["peak_how"] for r in rows if r.get("peak_how")), "")
    if how:
        print(f"peak memory on {device}: {how}")


ACCOUNT = {
    "student_params": "student weights",
    "teacher_params": "teacher weights",
    "grads": "grads",
    "adamw": "AdamW",
    "activations": "activations",
    "teacher_hidden": "teacher hidden",
    "head_grad": "head grad",
    "logits": "logits peak",
    "total": "total",
}


def memory_accounts(args, configs, corpus, teacher, device):
    """sekd.memory_account of each method's step, printed (MiB) before training."""
    out = {}
    for m, cfg in configs.items():  # sekd.memory_account models no on-policy step
        acc = (
            None
            if args.on_policy > 0 and cfg.method != "ce"
            else sekd.memory_account(
                model_config(args, "student", corpus.vocab.size),
                teacher.config,
                args.batch_size,
                args.seq_len,
                cfg,
                autocast_dtype(args, device) is not None,
                device.type,
            )
        )
        print(
            f"\n[{m}] memory account, MiB: "
            + (
                "not modelled for this step"
                if acc is None
                else ", ".join(f"{label} {acc[key] / 2**20:,.1f}" for key, label in ACCOUNT.items())
                + f" (chunks of {acc['chunk_rows']} "
                f"rows, {acc['n_sel']:,} of {acc['B'] * acc['L']:,} rows selected, "
                f"lambda {acc['lam']:g}, {acc['dtype']})"
            )
        )
        out.update({m: acc} if acc else {})
    return out


def machine():
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
    }


def load_data(args):
    """The device and the corpus every job starts from (rank 0 builds the memmaps, the others read
    them)."""
    device = pick_device(args)
    init_distributed(device)
    corpus = rank0_first(
        lambda: data.prepare(
            args.dataset,
            args.seq_len,
            args.full_vocab,
            args.data_dir,
            max_tokens=args.max_tokens or None,
            vocab_size=args.vocab_size,
        )
    )
    print(
        f"data: {args.dataset}, {len(corpus.train):,} train / {len(corpus.val):,} val samples of "
        f"{args.seq_len} positions, vocabulary {corpus.vocab.size:,}; device {device}"
    )
    return corpus, device


def setup(args):
    """What every job that distils starts from (ours, and each in experiments/): the data, the
    evaluation set, the teacher and, but for --run teacher, the initial student. -> (corpus, device,
    evalset, teacher, student_init, the teacher's and the initial student's result rows)"""
    corpus, device = load_data(args)
    evalset = EvalSet(corpus, args.eval_tokens, device, args.batch_size)
    teacher, t_stats = pretrained(args, corpus, device, evalset, "teacher")
    teacher.eval().requires_grad_(False)
    evalset.set_teacher(teacher, args)
    rows = [{"method": "teacher", **evalset.evaluate(teacher, args), **t_stats}]
    student_init = None
    if args.run != "teacher" and args.student_init_steps > 0:
        student_init, s_stats = pretrained(args, corpus, device, evalset, "student")
        rows.append(
            {"method": "student init (CE)", **evalset.evaluate(student_init, args), **s_stats}
        )
    return corpus, device, evalset, teacher, student_init, rows


def write_results(args, corpus, t_start, **results):
    """OUT_DIR/results_RUN.json (rank 0 writes it): the flags, the machine, the data, then
    `results`."""
    result = {
        "args": vars(args),
        "machine": machine(),
        "data": corpus.meta,
        **results,
        "total_s": time.time() - t_start,
    }
    path = os.path.join(args.out_dir, f"results_{args.run}.json")
    if RANK == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        data.atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    print(f"results written to {path}; total time {fmt_time(result['total_s'])}")
    finish_distributed()
    return result


def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    if args.compile == "off":
        torch.compiler.set_stance("force_eager")
    methods = {"compare": ["ce", "full_kd", "sekd"], "distill": [args.method]}.get(args.run, [])
    configs = {
        m: kd_config(args, m) for m in methods
    }  # a bad method setting fails here, before any work
    t_start = time.time()
    corpus, device, evalset, teacher, student_init, rows = setup(args)
    accounts = memory_accounts(args, configs, corpus, teacher, device)
    for m in methods:
        rows.append(distill_student(args, m, corpus, device, teacher, evalset, student_init))
        print_table(rows, device)
    if args.run == "teacher":
        print_table(rows, device)
    return write_results(args, corpus, t_start, rows=rows, memory_account=accounts)


def cli(argv=None, job=None):
    """`job` (default `main`; an entry point in experiments/ passes its own), a user error printed
    in one line with exit code 2 (a script that registers a metric and calls `train.cli()` gets the
    same command line). Any other exception is a bug, in a registered metric too: it keeps its
    traceback."""
    try:
        return (job or main)(argv)
    except (
        UserError
    ) as e:  # = data.DataError; `from_flags` turns the library's refusals of flags into one
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "interrupted; checkpoints written so far are complete: the same command resumes "
            "from the last",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    cli()
