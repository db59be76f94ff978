"""The runnable job: train a teacher, distil students, compare them.

    python train.py                      # teacher (or reuse out/teacher.pt), then CE / Full KD / SE-KD
    python train.py --run teacher        # only the teacher
    python train.py --run distill --method sekd --k 0.1
    python train.py --run distill --metric reverse_kl --policy gls
    python train.py --run positions      # the paper's position tables (metrics, policies, budgets), 3 seeds
    python train.py --run show           # one validation sequence coloured by student entropy (ANSI + HTML)
    python train.py --run distill --method sekd_3x --U 64 --l 0.2   # SPEC 5, offline teacher cache
    python train.py --run axes --seeds 3  # the paper's multi-axis, wall-time and storage tables
    python train.py --run storage        # storage accounting only (SPEC 7)
    python train.py --run sample         # teacher's and students' continuations of validation prompts
    python train.py --help               # every flag with its default
    torchrun --standalone --nproc_per_node=2 train.py -- --run distill   # data parallel, one process per rank
    python train.py --preset fineweb     # the paper's data: FineWeb-Edu streamed, 80M tokens (internet, a GPU)

Runs on CUDA when present (bf16 autocast), otherwise on the CPU; --device overrides.
"""
import argparse
import dataclasses
import datetime
import gc
import hashlib
import html
import io
import json
import math
import os
import platform
import struct
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

import data
import sekd


class UserError(ValueError):
    """A mistake the user can fix (bad flag, bad checkpoint): printed as one line, exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag is a UserError like the others: one line (not argparse's usage block), exit 2."""
        raise UserError(f"{message} (python train.py --help lists every flag)")


# The class and sample axes (SPEC 3-5) as named methods: name -> (positions, classes, samples).
# positions: a sekd.METHODS entry; classes: full | rskd (drawn from the teacher online) | cache
# (drawn once into SE-KD_3X's offline cache); samples: all | top (TopSmp) | random (RandomSmp).
AXES = {"rskd": ("full_kd", "rskd", "all"), "top_smp": ("full_kd", "full", "top"),
        "random_smp": ("full_kd", "full", "random"), "top_smp_rskd": ("full_kd", "rskd", "top"),
        "sekd_top_smp": ("sekd", "full", "top"), "sekd_3x": ("sekd", "cache", "top")}


# The paper's data setting (SPEC 7: FineWeb-Edu, 80M training tokens, 512-token samples, pure KL,
# lambda = 1) for one GPU, as a flag preset: it replaces defaults only, so flags given still win.
# Model sizes are ours (the paper distils Qwen3-8B into Qwen3-1.7B): a GPT-2 small teacher, a
# student of half its depth and width. --batch-size 16 x --grad-accum 4 x 512 positions = 32,768
# tokens per step, so one epoch of the 80M tokens is about 2,400 steps.
PRESETS = {"fineweb": {
    "dataset": "hf:HuggingFaceFW/fineweb-edu:sample-10BT", "max_tokens": 80_000_000, "seq_len": 512,
    "full_vocab": True, "lam": 1.0, "teacher_layers": 12, "teacher_embd": 768, "teacher_heads": 12,
    "student_layers": 6, "student_embd": 384, "student_heads": 6, "batch_size": 16, "grad_accum": 4,
    "teacher_steps": 4800, "teacher_lr": 6e-4, "student_init_steps": 600, "student_init_lr": 1e-3,
    "student_steps": 2400, "lr": 6e-4, "warmup": 100, "eval_interval": 500, "eval_tokens": 262_144,
    "log_interval": 50, "chunk_rows": 1024}}


def parse_args(argv=None):
    """The flags, with --preset's values as the defaults (flags given explicitly still win).
    A leading `--` is dropped: `torchrun ... train.py -- --run distill` needs it, because torchrun's
    own parser rejects --run and --l after the script name (prefixes of its --run-path, --log-dir)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = argv[1:] if argv[:1] == ["--"] else argv
    p = build_parser()
    args = p.parse_args(argv)
    if args.preset != "none":
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    return args


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="compare",
                   choices=["compare", "teacher", "distill", "positions", "show", "axes", "walltime", "storage",
                            "benchmark", "sample"],
                   help="compare: teacher + CE, Full KD, SE-KD students; teacher: train only the teacher; "
                        "distill: one student with --method; positions: the paper's position tables "
                        "(--seeds students per row); show: one validation sequence, selections coloured; "
                        "axes: the multi-axis, wall-time and storage tables over --seeds; walltime: only the "
                        "wall-time table (one seed; give it about one epoch of --student-steps); storage: the "
                        "storage accounting only; benchmark: memory and time of each flow; sample: the teacher's "
                        "and every saved student's continuations of validation prompts, coloured by entropy")
    p.add_argument("--preset", default="none", choices=["none", *PRESETS],
                   help="fineweb: the paper's data (FineWeb-Edu sample-10BT streamed, 80M tokens, 512-token "
                        "samples) and GPU-sized models (README); flags given explicitly override it")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="shakespeare", help="shakespeare | hf:NAME[:CONFIG] | files:PATH[,PATH]")
    g.add_argument("--max-tokens", type=int, default=0,
                   help="hf: / files: datasets: read documents only until they hold this many tokens "
                        "(hf: streams just those); 0 = no cap (hf: then reads 200,000 documents)")
    g.add_argument("--seq-len", type=int, default=128, help="positions per sample (block size)")
    g.add_argument("--full-vocab", action=argparse.BooleanOptionalAction, default=False,
                   help="keep all 50,257 GPT-2 ids instead of the compact vocabulary")
    g.add_argument("--data-dir", default="data_cache", help="where tokenized memmaps are written and reused")
    g = p.add_argument_group("models")
    g.add_argument("--teacher-layers", type=int, default=4)
    g.add_argument("--teacher-embd", type=int, default=256)
    g.add_argument("--teacher-heads", type=int, default=4)
    g.add_argument("--student-layers", type=int, default=1)
    g.add_argument("--student-embd", type=int, default=64)
    g.add_argument("--student-heads", type=int, default=2)
    g = p.add_argument_group("training")
    g.add_argument("--teacher-steps", type=int, default=1200)
    g.add_argument("--student-init-steps", type=int, default=600,
                   help="CE steps that make the initial student every method starts from (0: random init)")
    g.add_argument("--student-init-lr", type=float, default=3e-3, help="peak learning rate of the initial student")
    g.add_argument("--student-steps", type=int, default=300, help="distillation steps per method")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of distillation (every method)")
    g.add_argument("--teacher-lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=int, default=30, help="linear warm-up steps, then cosine to lr/10")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eval-interval", type=int, default=100,
                   help="steps between checkpoints (of the teacher, the initial student and distilled students: "
                        "a killed run, rerun, resumes from the last one) and the teacher's quick validation losses")
    g.add_argument("--eval-tokens", type=int, default=32768, help="validation tokens for the final metrics")
    g.add_argument("--log-interval", type=int, default=20)
    g = p.add_argument_group("distillation")
    g.add_argument("--method", default="sekd", choices=sekd.METHODS + tuple(AXES), help="for --run distill")
    g.add_argument("--k", type=float, default=0.2, help="SE-KD position budget, in (0, 1]")
    g.add_argument("--metric", default="student_entropy",
                   help="position importance metric of --method sekd: " + ", ".join(sekd.METRICS))
    g.add_argument("--policy", default="topk", help="position selection policy: " + ", ".join(sekd.POLICIES))
    g.add_argument("--gls-queue", type=int, default=30_000, help="GLS: scores kept in the FIFO queue")
    g.add_argument("--curriculum-steps", type=int, default=4_000,
                   help="curriculum: steps for the window to slide from the lowest to the top scores")
    g.add_argument("--seeds", type=int, default=3, help="--run positions / axes: students (seeds) per row")
    g.add_argument("--show-sample", type=int, default=0, help="--run show: which validation sequence")
    g.add_argument("--T", type=float, default=1.0, help="KD temperature")
    g.add_argument("--lam", type=float, default=0.5,
                   help="KL weight lambda; 1 - lambda goes to CE on every position. The paper uses 1 (pure KL); "
                        "from a small student 0.5 works better here (README)")
    g.add_argument("--flow", default="streamed", choices=["streamed", "dense"],
                   help="streamed: selective LM heads, rows in chunks; dense: full [B, L, V] logits")
    g.add_argument("--chunk-rows", type=int, default=0, help="rows of logits per chunk (0 = about 16 MB of float32)")
    g.add_argument("--on-policy", type=float, default=0.0,
                   help="share of each batch's sequences that are student-generated (on-policy distillation, "
                        "Agarwal et al. 2024): the student continues the first --prompt-len tokens of a training "
                        "sample and KD is applied on the tokens it wrote; 0 = off. KD methods only (CE stays on data)")
    g.add_argument("--prompt-len", type=int, default=0, help="on-policy prompt tokens (0 = half of --seq-len)")
    g.add_argument("--divergence", default="auto", choices=["auto", "forward", "reverse"],
                   help="KD divergence: forward KL(teacher || student) or reverse KL(student || teacher); "
                        "auto = reverse with --on-policy (as the paper's on-policy table), else forward")
    g = p.add_argument_group("benchmark (--run benchmark, random tokens; uses the model, --batch-size, --seq-len flags)")
    g.add_argument("--bench-vocab", default="151936,50257", help="vocabulary sizes, comma-separated")
    g.add_argument("--bench-tokens", default="1024,2048,4096,8192,16384",
                   help="B*L of the scaling sweep (multiples of --seq-len); empty for none")
    g.add_argument("--bench-repeats", type=int, default=5, help="timed steps per flow (the median is reported)")
    g.add_argument("--bench-warmup", type=int, default=2, help="untimed steps per flow before timing")
    g.add_argument("--bench-mem-gb", type=float, default=0.0,
                   help="skip (and report) a row whose analytic peak exceeds this many GiB; 0 = no limit")
    g = p.add_argument_group("text samples (--run sample; uses the checkpoints in --out-dir)")
    g.add_argument("--sample-prompts", type=int, default=3, help="prompts, spread over the validation plays")
    g.add_argument("--sample-prompt-len", type=int, default=24, help="tokens per prompt")
    g.add_argument("--sample-len", type=int, default=40, help="tokens each model generates per prompt")
    g.add_argument("--sample-temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    g.add_argument("--sample-top-k", type=int, default=0, help="sample among the k likeliest ids only; 0 = all")
    g = p.add_argument_group("class and sample axes, offline teacher cache (SPEC 3-5)")
    g.add_argument("--U", type=int, default=64, help="RS-KD draws per position, in [1, 127] (7-bit counts)")
    g.add_argument("--l", type=float, default=0.2, help="share of training samples TopSmp / RandomSmp keep, in (0, 1]")
    g.add_argument("--cache", default="", help="SE-KD_3X teacher cache file (default OUT_DIR/rskd_cache_seedSEED.bin)")
    g.add_argument("--rebuild-cache", action="store_true", help="build the teacher cache anew even if one exists")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto = bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer bodies")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--out-dir", default="out")
    g.add_argument("--teacher-ckpt", default="", help="teacher checkpoint (default OUT_DIR/teacher.pt)")
    g.add_argument("--retrain-teacher", action="store_true", help="ignore a saved teacher and train a new one")
    return p


def check_args(a):
    positive = ["seq_len", "batch_size", "grad_accum", "teacher_steps", "student_steps", "eval_interval",
                "eval_tokens", "log_interval", "teacher_layers", "teacher_embd", "teacher_heads",
                "student_layers", "student_embd", "student_heads", "sample_prompts", "sample_prompt_len", "sample_len"]
    for name in positive:
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    for who in ("teacher", "student"):
        if getattr(a, f"{who}_embd") % getattr(a, f"{who}_heads"):
            raise UserError(f"--{who}-embd must be divisible by --{who}-heads")
    if a.max_tokens < 0:
        raise UserError(f"--max-tokens must be >= 0, got {a.max_tokens}")
    if a.student_init_steps < 0:
        raise UserError(f"--student-init-steps must be >= 0, got {a.student_init_steps}")
    if a.chunk_rows < 0 or min(a.lr, a.teacher_lr, a.student_init_lr) <= 0 or a.warmup < 0:
        raise UserError("--chunk-rows, --warmup must be >= 0 and learning rates > 0")
    if a.seeds < 1 or a.show_sample < 0:
        raise UserError("--seeds must be at least 1 and --show-sample at least 0")
    if a.sample_temperature < 0 or a.sample_top_k < 0:
        raise UserError("--sample-temperature and --sample-top-k must be >= 0")
    sekd.get_metric(a.metric)
    sekd.get_policy(a.policy)
    if a.gls_queue < 1 or a.curriculum_steps < 1:
        raise UserError(f"--gls-queue and --curriculum-steps must be at least 1, got {a.gls_queue} and "
                        f"{a.curriculum_steps}")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible: use --device cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and a.run in ("benchmark", "storage", "show"):
        raise UserError(f"--run {a.run} runs in one process: start it with python, not torchrun")
    sekd.check_budget(a.k)
    sekd.check_temperature(a.T)
    check_axes_args(a)
    check_on_policy_args(a)


def check_on_policy_args(a):
    if not 0.0 <= a.on_policy <= 1.0:
        raise UserError(f"--on-policy must be in [0, 1] (the share of each batch's sequences that the student "
                        f"writes), got {a.on_policy}")
    if a.on_policy > 0 and sekd.on_policy_rows(a.batch_size, a.on_policy) == 0:
        raise UserError(f"--on-policy {a.on_policy} of --batch-size {a.batch_size} rounds to no sequence: "
                        "raise one of them")
    if not 0 <= a.prompt_len <= a.seq_len:
        raise UserError(f"--prompt-len must be in [0, --seq-len {a.seq_len}] (0 = half), got {a.prompt_len}")
    methods = "a method with the teacher's full distribution (full_kd, sekd, random_pos, or their TopSmp / RandomSmp " \
              "variants)"
    full = a.run == "compare" or a.run == "distill" and full_distribution_method(a.method)
    if a.on_policy > 0 and (not full or a.lam == 0):
        raise UserError(f"--on-policy works with --run compare or distill, --lam > 0 and {methods}")
    if a.divergence == "reverse" and not full:
        raise UserError(f"--divergence reverse works with --run compare or distill and {methods}")


def full_distribution_method(method):
    """Whether `method`'s KD term reads the teacher's full distribution, as the reverse KL and on-policy
    text need (AT-KD needs a gold token, RS-KD and SE-KD_3X read drawn or cached classes)."""
    positions, classes, _ = AXES.get(method, (method, "full", "all"))
    return positions in ("full_kd", "sekd", "random_pos") and classes == "full"


def check_axes_args(a):
    sekd.check_draws(a.U)
    sekd.check_budget(a.l, "l")
    if a.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {a.seeds}")


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, obj):
    """torch.save through a temporary file + rename: an interrupted save leaves the old file.
    Data parallel: every rank calls it at the same point; rank 0 writes, the others wait for it."""
    if RANK == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        buf = io.BytesIO()
        torch.save(obj, buf)
        data.atomic_write_bytes(path, buf.getvalue())
    barrier()


def load_checkpoint(path):
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist: train it first (python train.py --run teacher)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        GPT_from(ckpt)  # checks the keys and shapes too
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}): "
                        "delete it and train again") from None
    return ckpt


def GPT_from(ckpt):
    model = sekd.GPT(sekd.GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model


def check_signature(ckpt, corpus, path):
    """Refuse a checkpoint trained with another tokenizer or vocabulary than this data."""
    if ckpt.get("signature") != corpus.signature:
        raise UserError(f"checkpoint {path} was trained on another vocabulary or tokenizer "
                        f"({ckpt.get('signature')} vs data {corpus.signature}): use the same --dataset/"
                        "--full-vocab, or pass --retrain-teacher")


# ----------------------------------------------------------------------------- data parallel (torchrun)
# `torchrun --standalone --nproc_per_node=N train.py ...` starts N copies of this job, one per rank, as
# in nanoGPT. Every rank holds the whole student (and teacher) and runs the same code; each draws its
# slice of every global batch (Batches), and the gradients are averaged over ranks before clipping
# (average_gradients). Rank 0 prints and writes files; the others wait for it at barriers where they
# read what it wrote. Without torchrun RANK = 0, WORLD = 1 and every function here does nothing.

RANK, WORLD = 0, 1
DIST_DEVICE = None  # where collectives run: the CPU (gloo) or this rank's GPU (nccl)
DIST_TIMEOUT = datetime.timedelta(hours=3)  # the other ranks wait this long while rank 0 alone builds data or a cache


def init_distributed(device):
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE; the
    device already follows LOCAL_RANK, see pick_device): gloo on CPU, nccl on CUDA. The stdout of
    ranks other than 0 goes to /dev/null, so progress is printed once; errors still reach stderr."""
    global RANK, WORLD, DIST_DEVICE
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    RANK, WORLD, DIST_DEVICE = dist.get_rank(), dist.get_world_size(), device
    if RANK:
        sys.stdout = open(os.devnull, "w")


def finish_distributed():
    """At the end of a run: wait for every rank, then leave the process group."""
    global RANK, WORLD
    if WORLD > 1:
        dist.barrier()
        dist.destroy_process_group()
    RANK, WORLD = 0, 1


def barrier():
    if WORLD > 1:
        dist.barrier()


def rank0_first(fn):
    """fn() on rank 0, then, once it is done, on the others: what rank 0 builds and writes (the
    data memmaps), they find and read."""
    if RANK == 0:
        out = fn()
    barrier()
    if RANK != 0:
        out = fn()
    return out


def broadcast_parameters(model):
    """Rank 0's weights to every rank. They are equal already (every rank seeds alike or loads the
    same checkpoint): this makes sure of it."""
    if WORLD > 1:
        for p in model.parameters():
            dist.broadcast(p.data, 0)


def average_gradients(model):
    """Average the gradients over ranks, in one all-reduce of a flat buffer. Every rank's loss is
    the mean over its B sequences (SPEC 1), so the average of the ranks' gradients is the gradient
    of the mean over all W*B sequences: the gradient one rank with the whole batch would get.
    Done by hand, not by DistributedDataParallel, because the losses call `model.hidden` and
    `model.head_weight` rather than `model(...)`, which DDP's hooks expect."""
    if WORLD == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)  # a sum (gloo has no average)
    flat /= WORLD
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def mean_over_ranks(value):
    """A float averaged over ranks (the logged loss)."""
    if WORLD == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=DIST_DEVICE)
    dist.all_reduce(t)
    return t.item() / WORLD


def gather_objects(obj):
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if WORLD == 1:
        return [obj]
    parts = [None] * WORLD
    dist.all_gather_object(parts, obj)
    return parts


def gather_concat(array):
    """Every rank's numpy array, concatenated in rank order, on every rank."""
    return array if WORLD == 1 else np.concatenate(gather_objects(array))


# ----------------------------------------------------------------------------- training loop

class Batches:
    """Deterministic sample order: epoch e visits the training samples in the permutation
    drawn from (seed, e). Step s, micro-batch j always gets the same ids, for every method.

    Data parallel (torchrun): `batch_size` is per rank; the global micro-batch is the
    world * batch_size ids that one rank with that batch would draw, and rank r takes its r-th
    slice of them. So every optimizer step sees the same samples whatever the number of ranks."""

    def __init__(self, corpus, batch_size, grad_accum, seed, device, kept=None, rank=0, world=1):
        samples = corpus.train if kept is None else corpus.train[np.asarray(kept)]  # kept: SPEC 4's sample ids
        self.samples, self.bs, self.accum, self.seed, self.device = samples, batch_size, grad_accum, seed, device
        self.rank, self.world = rank, world
        self._perm = {}

    def ids(self, step, micro):
        """This rank's sample ids (rows of `self.samples`) of step `step`, micro-batch `micro`."""
        n = len(self.samples)
        start = ((step * self.accum + micro) * self.world + self.rank) * self.bs
        out = []
        for g in range(start, start + self.bs):
            epoch = g // n
            if epoch not in self._perm:
                self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)}
            out.append(self._perm[epoch][g % n])
        return np.array(out)

    def get(self, step, micro):
        x = torch.from_numpy(self.samples[np.sort(self.ids(step, micro))].astype(np.int64))
        x = x.to(self.device)
        return x[:, :-1], x[:, 1:]


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, lr, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train_loop(model, loss_fn, batches, steps, lr, args, tag, ckpt=None, resume=None, frozen_bytes=0):
    """AdamW, warm-up + cosine, grad accumulation and clipping, progress with ETA.
    `loss_fn(x, y) -> (loss, n_selected)`. Saves `ckpt(step, opt)` every eval interval.
    A loss or gradient that is not finite stops training before the optimizer step, with a
    UserError: the last checkpoint stays as it was.
    Data parallel: gradients and the logged loss are averaged over ranks; tokens count all ranks.
    Returns stats: train seconds, tokens seen, peak bytes (including `frozen_bytes`, the
    teacher's weights) and how they were measured, and the loss of every step (`loss_curve`)."""
    opt = make_optimizer(model, lr, args.weight_decay)
    start = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        start = resume["step"]
        print(f"[{tag}] resuming at step {start}/{steps}")
    saved = start if resume is not None else None
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    broadcast_parameters(model)
    tokens_per_step = WORLD * batches.bs * batches.accum * (batches.samples.shape[1] - 1)
    t0, peak_cpu, train_time, curve = time.time(), 0, 0.0, []
    for step in range(start, steps):
        ts = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, args.warmup)
        measured = min(start + 1, steps - 1)  # the second step (AdamW's state exists), or the only one
        meter = sekd.LiveBytes() if (not cuda and step == measured) else nullcontext()
        with meter:
            total = 0.0
            for micro in range(batches.accum):
                x, y, *extra = batches.get(step, micro)  # extra: cached teacher draws (SE-KD_3X)
                with autocast(args, dev):
                    loss, _ = loss_fn(x, y, *extra)
                (loss / batches.accum).backward()
                total += loss.item() / batches.accum
            total = mean_over_ranks(total)
            curve.append(total)
            average_gradients(model)
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
            if not (math.isfinite(total) and math.isfinite(norm)):
                what = f"loss became {total}" if not math.isfinite(total) else f"gradient norm became {norm}"
                kept = f"the checkpoint of step {saved} is kept" if saved is not None else "no checkpoint was written"
                raise UserError(f"[{tag}] {what} at step {step + 1}: stopped before the update, {kept}; "
                                "lower --lr or raise --warmup")
            opt.step()
            opt.zero_grad(set_to_none=True)
        if isinstance(meter, sekd.LiveBytes):
            peak_cpu = meter.peak
        train_time += time.time() - ts
        done = step + 1
        if done % args.log_interval == 0 or done == steps:
            rate = (done - start) * tokens_per_step / max(train_time, 1e-9)
            eta = (steps - done) * train_time / (done - start)
            print(f"[{tag}] step {done:5d}/{steps} | loss {total:.4f} | {rate:,.0f} tok/s | "
                  f"elapsed {fmt_time(time.time() - t0)} | ETA {fmt_time(eta)}", flush=True)
        if ckpt is not None and (done % args.eval_interval == 0 or done == steps):
            ckpt(done, opt)
            saved = done
    state = sekd.state_bytes(model) * 2 + sum(sekd.state_bytes(t) for s in opt.state.values()
                                              for t in s.values() if torch.is_tensor(t))
    if cuda:
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:  # parameters + optimizer state + the live tensors of one measured step
        peak = state - sekd.state_bytes(model) + peak_cpu + frozen_bytes
        how = ("weights (student + teacher) + AdamW state + peak live tensor bytes of one training step, "
               "counted with a TorchDispatchMode (sekd.LiveBytes)")
    return {"train_s": train_time, "tokens": (steps - start) * tokens_per_step, "peak_bytes": peak,
            "peak_how": how, "loss_curve": curve}


def autocast(args, dev):
    dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else None, "float32": None,
             "bfloat16": torch.bfloat16}[args.dtype]
    return torch.autocast(dev.type, dtype=dtype) if dtype else nullcontext()


# ----------------------------------------------------------------------------- evaluation

class EvalSet:
    """A fixed slice of the validation split with the teacher's final hidden states cached
    once (small: [N, L, D]), so each student's KL and agreement cost only head projections."""

    def __init__(self, corpus, n_tokens, device, batch_size):
        n = max(1, min(len(corpus.val), n_tokens // (corpus.val.shape[1] - 1)))
        rows = np.linspace(0, len(corpus.val) - 1, n).astype(np.int64)
        x = torch.from_numpy(corpus.val[rows].astype(np.int64)).to(device)
        self.x, self.y, self.bs, self.teacher_h, self.teacher_w = x[:, :-1], x[:, 1:], batch_size, None, None

    @torch.no_grad()
    def set_teacher(self, teacher, args):
        dev = self.x.device
        with autocast(args, dev):
            self.teacher_h = torch.cat([teacher.hidden(self.x[i:i + self.bs]).float()
                                        for i in range(0, len(self.x), self.bs)])
        self.teacher_w = teacher.head_weight.detach().float()

    @torch.no_grad()
    def evaluate(self, model, args, limit=None):
        model.eval()
        n = len(self.x) if limit is None else min(limit, len(self.x))
        tot = {"n": 0, "ce": 0.0, "kl": 0.0, "agree": 0, "conf": [], "correct": []}
        for i in range(0, n, self.bs):
            j = min(n, i + self.bs)
            with autocast(args, self.x.device):
                h = model.hidden(self.x[i:j]).float()
            th = self.teacher_h[i:j] if self.teacher_h is not None else None
            s = sekd.evaluation_sums(h, model.head_weight.float(), th, self.teacher_w, self.y[i:j])
            for k in tot:
                tot[k] += s[k]
        model.train()
        ece = sekd.expected_calibration_error(torch.cat(tot["conf"]), torch.cat(tot["correct"]))
        return {"val_loss": tot["ce"] / tot["n"], "val_ppl": math.exp(tot["ce"] / tot["n"]),
                "kl_to_teacher": tot["kl"] / tot["n"] if self.teacher_h is not None else None,
                "agreement": tot["agree"] / tot["n"] if self.teacher_h is not None else None,
                "ece": ece, "eval_tokens": tot["n"]}


# ----------------------------------------------------------------------------- the jobs

def pick_device(args):
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU per rank
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def model_config(args, who, vocab_size):
    return sekd.GPTConfig(vocab_size=vocab_size, block_size=args.seq_len, n_layer=getattr(args, f"{who}_layers"),
                          n_head=getattr(args, f"{who}_heads"), n_embd=getattr(args, f"{who}_embd"))


def new_model(args, who, vocab_size, device):
    return sekd.GPT(model_config(args, who, vocab_size)).to(device)


def maybe_compile(model, args):
    if args.compile:
        model.hidden = torch.compile(model.hidden)
    return model


def pretrained(args, corpus, device, evalset, who):
    """Train a model with plain CE, or reuse (and resume) its checkpoint. Two models are made
    this way: the teacher, and the initial student that every method starts from (the paper
    distils a pretrained student: from random weights, a student's entropy ranks nothing yet)."""
    if who == "teacher":
        path = args.teacher_ckpt or os.path.join(args.out_dir, "teacher.pt")
        steps, lr, seed = args.teacher_steps, args.teacher_lr, args.seed + 1
        must_exist = args.run == "distill" and bool(args.teacher_ckpt)  # a named teacher is never trained here
        reuse = not args.retrain_teacher
    else:
        path = os.path.join(args.out_dir, "student_init.pt")
        steps, lr, seed, must_exist, reuse = args.student_init_steps, args.student_init_lr, args.seed + 2, False, True
    ckpt = None
    if must_exist or (os.path.exists(path) and reuse):
        ckpt = load_checkpoint(path)
        check_signature(ckpt, corpus, path)
        block = ckpt["config"]["block_size"]
        if who == "teacher" and block < args.seq_len:
            raise UserError(f"teacher checkpoint {path} has block size {block}, shorter than --seq-len "
                            f"{args.seq_len}: use --seq-len {block} or less, or --retrain-teacher")
    wanted = asdict(model_config(args, who, corpus.vocab.size))
    if who == "student" and ckpt is not None and (ckpt["config"], ckpt["steps"], ckpt.get("seed")) != (wanted, steps, seed):
        print(f"[{who}] {path} was made with other sizes, steps or seed: training a new one")
        ckpt = None
    if ckpt is not None and ckpt["step"] >= ckpt["steps"]:
        model = GPT_from(ckpt).to(device)
        print(f"[{who}] reusing {path} ({ckpt['config']['n_layer']} layers, d={ckpt['config']['n_embd']}, "
              f"{ckpt['steps']} steps, val ppl {ckpt['val_ppl']:.2f})"
              + ("; --retrain-teacher to train anew" if who == "teacher" else ""))
        return model, {"train_s": ckpt.get("train_s", 0.0), "reused": True}
    if must_exist:
        raise UserError(f"teacher checkpoint {path} is unfinished: run --run teacher to complete it")
    torch.manual_seed(args.seed)
    model = GPT_from(ckpt).to(device) if ckpt else new_model(args, who, corpus.vocab.size, device)
    body = maybe_compile(model, args)
    ce = sekd.KDConfig(method="ce", chunk_rows=args.chunk_rows)

    def save(step, opt):
        ppl = evalset.evaluate(model, args, limit=64)["val_ppl"]
        save_checkpoint(path, {"model": model.state_dict(), "config": asdict(model.config), "seed": seed,
                               "signature": corpus.signature, "step": step, "steps": steps,
                               "optimizer": opt.state_dict(), "val_ppl": ppl})
        print(f"[{who}] step {step}: quick val ppl {ppl:.2f}, saved {path}")
    stats = train_loop(model, lambda x, y: sekd.distill_loss(body, None, x, y, ce),
                       Batches(corpus, args.batch_size, args.grad_accum, seed, device, rank=RANK, world=WORLD),
                       steps, lr, args,
                       who, ckpt=save, resume=ckpt)
    ck = torch.load(path, weights_only=True)
    ck["train_s"] = stats["train_s"] + (ckpt or {}).get("train_s", 0.0)
    save_checkpoint(path, ck)
    return model, {**stats, "reused": False}


def method_label(cfg):
    if cfg.method == "sekd" and (cfg.metric, cfg.policy) != ("student_entropy", "topk"):
        return f"{cfg.metric} {cfg.policy} {cfg.k:.0%}"
    return {"ce": "CE (no KD)", "full_kd": "Full KD", "sekd": f"SE-KD top {cfg.k:.0%}",
            "random_pos": f"RandomPos {cfg.k:.0%}", "at_kd": "AT-KD"}[cfg.method]


def distill_student(args, method, corpus, device, teacher, evalset, student_init=None, save=True, **kd):
    """One student from the shared initial weights (`student_init`, or the seed's random
    init), trained with `method` (one of sekd.METHODS, or an axes method of AXES), evaluated.
    `kd` overrides KDConfig fields (metric, policy, k, ...); save=False keeps no checkpoint."""
    positions, classes, samples = AXES.get(method, (method, "full", "all"))
    on_policy = args.on_policy if positions != "ce" else 0.0  # CE, the no-KD baseline, stays on real data
    divergence = {"auto": "reverse" if on_policy > 0 else "forward"}.get(args.divergence, args.divergence)
    cfg = sekd.KDConfig(method=positions, k=1.0 if positions == "full_kd" else args.k, T=args.T, lam=args.lam,
                        flow=args.flow, chunk_rows=args.chunk_rows, metric=args.metric, policy=args.policy,
                        gls_queue=args.gls_queue, curriculum_steps=args.curriculum_steps,
                        classes="full" if classes == "full" else "rskd", U=args.U,
                        divergence=divergence if positions != "ce" else "forward")
    cfg = dataclasses.replace(cfg, **kd)
    torch.manual_seed(args.seed)
    student = new_model(args, "student", corpus.vocab.size, device)
    if student_init is not None:  # same initial weights for every method
        student.load_state_dict(student_init.state_dict())
    if cfg.uses_teacher and teacher is not None:
        sekd.check_pair(teacher, student)
    plan = axes_plan(args, samples, classes, corpus, device, student, teacher)
    batches = plan.pop("batches")  # same data order for every method over the same samples
    s_body, t_body = maybe_compile(student, args), (None if classes == "cache" else teacher)
    if RANK:  # data parallel: other random draws (RandomPos, pos-RS-KD, RS-KD) on each rank; rank 0 keeps 1 rank's
        torch.manual_seed(args.seed + 1_000_003 * RANK)
    state, calls = cfg.new_state(), [0]  # GLS's queue (one per rank); curriculum follows the optimizer step
    prompt_len = args.prompt_len or args.seq_len // 2

    def loss_fn(x, y, draws=None):
        state.step = calls[0] // args.grad_accum
        calls[0] += 1
        if on_policy > 0:  # each micro-batch samples from its own seed: a resumed run writes the same text
            gen = torch.Generator(device=x.device).manual_seed(derived_seed(args.seed, calls[0], RANK))
            return sekd.on_policy_distill_loss(s_body, t_body, x, y, cfg, on_policy, prompt_len, gen, state)
        return sekd.distill_loss(s_body, t_body, x, y, cfg, state, draws)
    name = axes_name(method, args) if method in AXES else method_label(cfg)
    if on_policy > 0:
        name += f" +{on_policy:.0%} on-policy"
    path = os.path.join(args.out_dir, f"student_{method}.pt")
    key = run_key(args, method, cfg, corpus, plan["steps"], on_policy, prompt_len) if save else None
    resume = resumable(path, key, method) if save else None
    if resume is not None:  # everything a step reads: weights, AdamW (train_loop), GLS queue, RNG, step
        student.load_state_dict(resume["model"])
        state.queue = resume["gls_queue"]
        calls[0] = resume["step"] * args.grad_accum
        set_rng_state(resume["rng"])

    def save_ckpt(step, opt):
        save_checkpoint(path, {"model": student.state_dict(), "config": asdict(student.config),
                               "signature": corpus.signature, "step": step, "steps": plan["steps"],
                               "kd": asdict(cfg), "run_key": key, "optimizer": opt.state_dict(),
                               "gls_queue": state.queue, "rng": rng_state()})
    stats = train_loop(student, loss_fn, batches, plan["steps"], args.lr, args, method,
                       ckpt=save_ckpt if save else None, resume=resume,
                       frozen_bytes=sekd.state_bytes(teacher) if cfg.uses_teacher and t_body is not None else 0)
    row = {"method": name, **evalset.evaluate(student, args), **stats, **plan,
           "resumed_at": resume["step"] if resume else None}
    row["tokens_per_s"] = row["tokens"] / max(row["train_s"], 1e-9)
    row["total_s"] = row["train_s"] + (row["prepass_s"] or 0.0) + (row["cache_build_s"] or 0.0)
    return row


# Every flag that changes a distilled student's trajectory: a checkpoint resumes only the same run.
RUN_FLAGS = ("seed", "seq_len", "batch_size", "grad_accum", "lr", "warmup", "weight_decay", "grad_clip", "dtype",
             "student_layers", "student_embd", "student_heads", "student_init_steps", "student_init_lr", "l")


def run_key(args, method, cfg, corpus, steps, on_policy, prompt_len):
    """What a distillation checkpoint must match to be resumed: the method and its KD settings, the
    data, the teacher and initial student files (by hash), the steps and RUN_FLAGS."""
    init = os.path.join(args.out_dir, "student_init.pt")
    return {"method": method, "kd": asdict(cfg), "steps": steps, "data": corpus.meta["data_fingerprint"],
            "teacher": file_sha256(teacher_ckpt_path(args)) if os.path.exists(teacher_ckpt_path(args)) else None,
            "student_init": file_sha256(init) if args.student_init_steps > 0 and os.path.exists(init) else None,
            "on_policy": on_policy, "prompt_len": prompt_len, **{f: getattr(args, f) for f in RUN_FLAGS}}


def resumable(path, key, tag):
    """The unfinished checkpoint at `path` of the same run (`run_key`), or None: a finished one,
    or one of another run, is trained over anew."""
    if not os.path.exists(path):
        return None
    ckpt = load_checkpoint(path)
    if ckpt.get("step", 0) >= ckpt.get("steps", 0) or "optimizer" not in ckpt:
        return None
    if ckpt.get("run_key") != key:
        diff = sorted(k for k in key if (ckpt.get("run_key") or {}).get(k) != key[k])
        print(f"[{tag}] {path} is an unfinished checkpoint of another run ({', '.join(diff)} differ): training anew")
        return None
    return ckpt


def derived_seed(*ints):
    return int(np.random.SeedSequence(list(ints)).generate_state(1)[0])


def rng_state():
    """torch's global generators (the random metric, pos-RS-KD's draws, online RS-KD, dropout) of
    every rank, in rank order: data-parallel ranks draw from different streams."""
    return gather_objects({"cpu": torch.get_rng_state(),
                           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})


def set_rng_state(rng):
    """This rank's generators from `rng_state()`. A rank the checkpoint has no state for (resumed
    with more ranks) keeps its fresh seed."""
    rng = [rng] if isinstance(rng, dict) else rng  # a checkpoint written before states were per rank
    if RANK >= len(rng):
        return
    torch.set_rng_state(rng[RANK]["cpu"])
    if rng[RANK]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng[RANK]["cuda"])


def print_table(rows, device, title=None):
    """Rows of results; a row with `<key>_std` entries (mean over seeds) shows them as mean ± std."""
    w = max([22] + [len(r["method"]) for r in rows])
    sd = any("val_ppl_std" in r for r in rows)

    def cell(r, key, fmt, scale=1.0):
        if r.get(key) is None:
            return "-"
        if r.get(key + "_std") is None:
            return fmt.format(scale * r[key])
        return fmt.format(scale * r[key]) + "±" + fmt.format(scale * r[key + "_std"])
    c = 14 if sd else 8
    head = (f"{'method':<{w}} {'val PPL':>{c}} {'KL(T||S)':>{c + 1}} {'agree %':>{c}} {'ECE %':>{c}} {'wall':>8} "
            f"{'tok/s':>8} {'peak MiB':>9}")
    print(("\n" + title if title else "") + "\n" + head + "\n" + "-" * len(head))
    for r in rows:
        wall = fmt_time(r["train_s"]) if r.get("train_s") else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        peak = f"{r['peak_bytes'] / 2**20:,.0f}" if r.get("peak_bytes") else "-"
        print(f"{r['method']:<{w}} {cell(r, 'val_ppl', '{:.2f}'):>{c}} {cell(r, 'kl_to_teacher', '{:.3f}'):>{c + 1}} "
              f"{cell(r, 'agreement', '{:.1f}', 100):>{c}} {cell(r, 'ece', '{:.2f}'):>{c}} {wall:>8} {tps:>8} {peak:>9}")
    how = next((r["peak_how"] for r in rows if r.get("peak_how")), "")
    if how:
        print(f"peak memory on {device}: {how}")


# ----------------------------------------------------------------------------- class and sample axes (SPEC 3-5)

def axes_name(method, args):
    return {"random_pos": f"RandomPos {args.k:.0%}", "rskd": f"RS-KD U={args.U}", "top_smp": f"TopSmp {args.l:.0%}",
            "random_smp": f"RandomSmp {args.l:.0%}", "top_smp_rskd": "TopSmp+RS-KD", "sekd_top_smp": "SE-KD+TopSmp",
            "sekd_3x": "SE-KD_3X"}[method]


def axes_plan(args, samples, classes, corpus, device, student, teacher):
    """The sample axis and the teacher cache of one student (SPEC 4, 5): which training samples it
    sees (all; TopSmp's, by the frozen initial student's entropy; RandomSmp's), for how many steps
    (as many epochs as --student-steps makes over all samples, so l = 20% trains 20% of the steps:
    that is where the wall-time saving comes from), and SE-KD_3X's cached teacher draws.
    -> dict: batches, steps, n_kept, prepass_s, cache_build_s, cache_reused, cache_bytes."""
    plan = {"samples": samples, "n_kept": len(corpus.train), "prepass_s": None, "cache_build_s": None,
            "cache_reused": None, "cache_bytes": None}
    kept = None
    if classes == "cache" and os.path.exists(default_cache_path(args)) and not args.rebuild_cache:
        TeacherCache(default_cache_path(args)).check(cache_signature(args, corpus, []), skip=("kept",))  # fail fast
    if samples == "top":
        scores, plan["prepass_s"] = sample_prepass(student, corpus, args, device)
        kept = sekd.top_samples(torch.from_numpy(scores), args.l).numpy()
    elif samples == "random":
        kept = sekd.random_samples(len(corpus.train), args.l, torch.Generator().manual_seed(args.seed)).numpy()
    plan["steps"] = args.student_steps
    if kept is not None:
        plan["n_kept"] = len(kept)
        plan["steps"] = max(1, math.ceil(args.student_steps * len(kept) / len(corpus.train)))
    batch_args = (corpus, args.batch_size, args.grad_accum, args.seed, device, kept, RANK, WORLD)
    if classes == "cache":
        cache_ids = kept if kept is not None else np.arange(len(corpus.train))
        cache, plan["cache_build_s"], plan["cache_reused"] = teacher_cache(args, corpus, device, teacher, cache_ids)
        plan["cache_bytes"] = os.path.getsize(cache.path)
        plan["batches"] = CachedBatches(*batch_args, cache=cache)
    else:
        plan["batches"] = Batches(*batch_args)
    return plan


_PREPASS = {}  # (seed, student config, data, dtype) -> (scores, seconds): one pre-pass per seed


@torch.no_grad()
def sample_prepass(student, corpus, args, device):
    """SPEC 4: the frozen initial student scores every training sample by its mean entropy
    (no grad, chunked entropy). -> (scores [N] float64, seconds). Methods that share the seed's
    initial student share one pre-pass; each reports its measured time. Data parallel: each rank
    scores its share of the batches and every rank gets all the scores."""
    key = (args.seed, json.dumps(asdict(student.config), sort_keys=True), corpus.meta["data_fingerprint"],
           args.dtype, str(device))
    if key not in _PREPASS:
        t0 = time.time()
        student.eval()
        scores = []
        starts = range(0, len(corpus.train), args.batch_size)
        for i in starts[RANK * len(starts) // WORLD:(RANK + 1) * len(starts) // WORLD]:
            x = torch.from_numpy(corpus.train[i:i + args.batch_size, :-1].astype(np.int64)).to(device)
            with autocast(args, device):
                h = student.hidden(x)
            scores.append(sekd.sample_entropy(h.float(), student.head_weight.float(), None,
                                              args.chunk_rows or None).double().cpu().numpy())
        student.train()
        scores = gather_concat(np.concatenate(scores) if scores else np.zeros(0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        _PREPASS[key] = (scores, time.time() - t0)
        print(f"[pre-pass] scored {len(corpus.train):,} samples by mean student entropy in {_PREPASS[key][1]:.1f}s")
    return _PREPASS[key]


class CachedBatches(Batches):
    """Batches of kept samples with their teacher draws read from the cache: the cache's row i is
    kept sample i, which is row i of `self.samples`. get -> (x, y, (ids, counts) [B, L, U])."""

    def __init__(self, *batch_args, cache):
        super().__init__(*batch_args)
        self.cache = cache

    def get(self, step, micro):
        x, y = super().get(step, micro)
        return x, y, self.cache.draws(np.sort(self.ids(step, micro)), self.device)


CACHE_MAGIC = b"SEKDRS1\n"


def teacher_ckpt_path(args):
    return args.teacher_ckpt or os.path.join(args.out_dir, "teacher.pt")


def default_cache_path(args):
    return args.cache or os.path.join(args.out_dir, f"rskd_cache_seed{args.seed}.bin")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cache_signature(args, corpus, kept):
    """What a teacher cache must match to be used (SPEC 5): the teacher, the data, the draws."""
    path = teacher_ckpt_path(args)
    if not os.path.exists(path):
        raise UserError(f"teacher checkpoint {path} does not exist: the cache is tied to its hash; "
                        "train it first (python train.py --run teacher)")
    return {"format": 1, "teacher_sha256": file_sha256(path), "data_fingerprint": corpus.meta["data_fingerprint"],
            "U": args.U, "T": args.T, "seed": args.seed, "V": corpus.vocab.size, "seq_len": args.seq_len,
            "kept": [int(i) for i in kept]}


def cache_header(signature, shape):
    """Magic, the JSON length (8 bytes), the JSON {signature, shape}; zero-padded to 64 bytes."""
    body = json.dumps({"signature": signature, "shape": list(shape)}).encode()
    head = CACHE_MAGIC + struct.pack("<Q", len(body)) + body
    return head + bytes(-len(head) % 64)


class TeacherCache:
    """SE-KD_3X's offline teacher cache (SPEC 5): one file, `cache_header` then the encoded draws at
    every position of every kept sample, uint8 [n_kept, seq_len, U, bytes per class], memory-mapped."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path, "rb") as f:
                if f.read(len(CACHE_MAGIC)) != CACHE_MAGIC:
                    raise ValueError("not a teacher cache")
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            self.signature, self.shape = header["signature"], tuple(header["shape"])
            self.offset = len(cache_header(self.signature, self.shape))
            if os.path.getsize(path) != self.offset + math.prod(self.shape):
                raise ValueError(f"{os.path.getsize(path):,} bytes, expected {self.offset + math.prod(self.shape):,}")
            self.data = np.memmap(path, np.uint8, "r", self.offset, self.shape)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise UserError(f"teacher cache {path} is corrupt or truncated ({str(e)[:80]}): delete it or pass "
                            "--rebuild-cache") from None

    def check(self, signature, skip=()):
        """Refuse, in one line, a cache built for another teacher, data, U, T, seed or sample set."""
        def show(v):
            if isinstance(v, list):
                return f"{len(v)} ids, sha {hashlib.sha256(json.dumps(v).encode()).hexdigest()[:8]}"
            return v
        for key, want in signature.items():
            got = self.signature.get(key)
            if got != want and key not in skip:
                raise UserError(f"teacher cache {self.path} was built for another run ({key}: {show(got)} in the "
                                f"cache, {show(want)} now): pass --rebuild-cache or another --cache path")

    def draws(self, rows, device):
        raw = torch.from_numpy(np.ascontiguousarray(self.data[rows])).to(device)
        return sekd.decode_draws(raw, self.signature["V"])


@torch.no_grad()
def build_cache(path, signature, teacher, corpus, kept, args, device):
    """Draw U classes from the teacher at every position of every kept sample (SPEC 5) and write
    them to a temporary file, renamed over `path` only once complete."""
    V = corpus.vocab.size
    shape = (len(kept), args.seq_len, args.U, sekd.cache_bytes_per_class(V))
    head = cache_header(signature, shape)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    gen = torch.Generator(device=device).manual_seed(args.seed)
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            data.preallocate(f, len(head) + math.prod(shape))  # a full disk fails here, not as a SIGBUS later
        out = np.memmap(tmp, np.uint8, "r+", len(head), shape)
        for i in range(0, len(kept), args.batch_size):
            x = torch.from_numpy(corpus.train[kept[i:i + args.batch_size], :-1].astype(np.int64)).to(device)
            with autocast(args, device):
                ids, counts = sekd.teacher_draws(teacher.hidden(x), teacher.head_weight, args.U, args.T,
                                                 args.chunk_rows or None, gen)
            out[i:i + len(x)] = sekd.encode_draws(ids, counts, V).cpu().numpy()
        out.flush()
        del out
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(data.write_error(path, e)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def teacher_cache(args, corpus, device, teacher, kept):
    """SE-KD_3X's cache for `kept`: reused if its signature matches this run, refused in one line if
    not, built if absent or --rebuild-cache. -> (TeacherCache, build seconds or None, reused).
    Data parallel: rank 0 builds it (so its draws do not depend on the number of ranks) while the
    others wait; each rank then reads only the rows of its own samples (CachedBatches)."""
    path = default_cache_path(args)
    signature = cache_signature(args, corpus, kept)
    build = RANK == 0 and (args.rebuild_cache or not os.path.exists(path))
    if build:
        if teacher is None:
            raise UserError("building the teacher cache needs the teacher")
        t0 = time.time()
        build_cache(path, signature, teacher, corpus, kept, args, device)
        build_s = time.time() - t0
        print(f"[cache] built {path}: {len(kept):,} samples x {args.seq_len} positions x U={args.U}, "
              f"{os.path.getsize(path):,} bytes in {build_s:.1f}s")
    barrier()
    cache = TeacherCache(path)
    if build:
        return cache, build_s, False
    cache.check(signature)
    print(f"[cache] reusing {path} ({os.path.getsize(path):,} bytes): distillation runs without the teacher")
    return cache, None, True


# ----------------------------------------------------------------------------- the multi-axis reproduction

AXES_TABLE = ("full_kd", "random_pos", "random_smp", "sekd", "rskd", "top_smp", "top_smp_rskd", "sekd_top_smp",
              "sekd_3x")
WALL_TABLE = ("full_kd", "random_pos", "top_smp", "sekd_3x")
PAPER_STORAGE_TB = {"full_fp16": 10_000, "rskd": 19.2, "sekd_3x": 3.84, "ce": 0.3}  # SPEC 7


def run_axes(args, corpus, device, teacher, evalset, student_init=None):
    """`--run axes`: the paper's multi-axis table (AXES_TABLE, --seeds seeds), its wall-time table
    (first seed; SE-KD_3X once building its cache, then once reusing it) and the storage table.
    `--run walltime`: the wall-time rows only, one seed."""
    rows, walls = [], []
    table, seeds = (WALL_TABLE, 1) if args.run == "walltime" else (AXES_TABLE, args.seeds)
    for i in range(seeds):
        a = argparse.Namespace(**{**vars(args), "seed": args.seed + i})
        for m in table:
            b = argparse.Namespace(**{**vars(a), "rebuild_cache": True}) if m == "sekd_3x" else a  # time a build
            row = distill_student(b, m, corpus, device, teacher, evalset, student_init)
            rows.append({**row, "seed": a.seed, "key": m})
            print_table([r for r in rows if r["seed"] == a.seed], device)
        if i == 0:
            reuse = distill_student(a, "sekd_3x", corpus, device, teacher, evalset, student_init)
            walls = [r for r in rows if r["key"] in WALL_TABLE] + [{**reuse, "seed": a.seed, "key": "sekd_3x_reuse"}]
    summary = print_axes_table(rows)
    print_walltime_table(walls)
    storage = storage_table(args, corpus, default_cache_path(args))  # the first seed's cache
    return {"rows": rows, "summary": summary, "walltime": walls, "storage": storage}


def print_axes_table(rows):
    """Mean and sample standard deviation over seeds of each method's metrics. -> summary dict."""
    summary = {}
    for r in rows:
        summary.setdefault(r["method"], []).append(r)
    cols = (("val_ppl", "val PPL", 1), ("kl_to_teacher", "KL(T||S)", 1), ("agreement", "agree %", 100), ("ece", "ECE %", 1))
    n_seeds = max(len(v) for v in summary.values())
    print(f"\nmulti-axis table, mean ± std over {n_seeds} seed(s)")
    head = f"{'method':<22}" + "".join(f" {label:>16}" for _, label, _ in cols) + f" {'steps':>6} {'samples':>8}"
    print(head + "\n" + "-" * len(head))
    out = {}
    for name, rs in summary.items():
        line, out[name] = f"{name:<22}", {}
        for key, _, scale in cols:
            v = np.array([scale * r[key] for r in rs])
            sd = v.std(ddof=1) if len(v) > 1 else 0.0
            out[name][key] = {"mean": float(v.mean()), "std": float(sd), "n": len(v)}
            line += f" {v.mean():>9.3f} ± {sd:<5.3f}"
        print(line + f" {rs[0]['steps']:>6} {rs[0]['n_kept']:>8,}")
    return out


def print_walltime_table(walls):
    def s(v):
        return "-" if v is None else f"{v:.1f}s"
    full = next((r["total_s"] for r in walls if r["key"] == "full_kd"), None)
    print("\nwall-time table (seconds; total = pre-pass + cache build + training)")
    head = f"{'method':<28} {'pre-pass':>9} {'cache':>8} {'train':>8} {'total':>8} {'vs Full KD':>10}"
    print(head + "\n" + "-" * len(head))
    for r in walls:
        name = {"sekd_3x": "SE-KD_3X (building cache)", "sekd_3x_reuse": "SE-KD_3X (reusing cache)"}.get(r["key"], r["method"])
        rel = f"{100 * (r['total_s'] / full - 1):+.0f}%" if full else "-"
        print(f"{name:<28} {s(r['prepass_s']):>9} {s(r['cache_build_s']):>8} {s(r['train_s']):>8} "
              f"{s(r['total_s']):>8} {rel:>10}")


def storage_table(args, corpus, cache_path=None):
    """SPEC 7's storage table: bytes per position of each way to ship the teacher's signal, at the
    paper's scale (V = 100,000, U = 64, l = 0.2, 10^11 tokens) and for this corpus and flags; then
    the teacher cache on disk, if there is one, against its accounting. -> dict."""
    paper = sekd.storage_bytes_per_position(100_000, 64, 0.2)
    here = sekd.storage_bytes_per_position(corpus.vocab.size, args.U, args.l)
    n_here = len(corpus.train) * args.seq_len
    print(f"\nstorage per training position (paper scale: V = 100,000, U = 64, l = 0.2, 100 B tokens; "
          f"here: V = {corpus.vocab.size:,}, U = {args.U}, l = {args.l}, {n_here:,} positions)")
    head = f"{'method':<22} {'B/pos':>10} {'TB @100B':>10} {'paper TB':>9} {'B/pos here':>11} {'MiB here':>10}"
    print(head + "\n" + "-" * len(head))
    labels = {"full_fp16": "Full KD, fp16 logits", "rskd": "RS-KD cache", "sekd_3x": "SE-KD_3X cache", "ce": "plain CE (ids)"}
    out = {"paper_scale": paper, "here": here, "positions_here": n_here}
    for key, label in labels.items():
        print(f"{label:<22} {paper[key]:>10,.1f} {paper[key] * 1e11 / 1e12:>10,.2f} {PAPER_STORAGE_TB[key]:>9,} "
              f"{here[key]:>11,.1f} {here[key] * n_here / 2**20:>10,.2f}")
    print("(2 bytes x 100,000 logits x 10^11 positions = 20,000 TB; the paper's 10,000 TB matches 1 byte per logit)")
    if cache_path and os.path.exists(cache_path):
        cache = TeacherCache(cache_path)
        n_pos, real = cache.shape[0] * cache.shape[1], os.path.getsize(cache_path)
        predicted = n_pos * sekd.storage_bytes_per_position(cache.signature["V"], cache.signature["U"])["rskd"]
        out["cache"] = {"path": cache_path, "bytes": real, "positions": n_pos, "accounted_bytes": predicted,
                        "header_bytes": cache.offset}
        print(f"cache on disk {cache_path}: {real:,} bytes for {n_pos:,} positions = {real / n_pos:.2f} B/position; "
              f"accounting {predicted:,} bytes ({100 * (real - predicted) / predicted:+.3f}%: the {cache.offset}-byte "
              f"header); per position of the whole training set {real / n_here:.2f} B")
    return out


def machine():
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}

# ----------------------------------------------------------------------------- memory account and benchmark (SPEC 6)

GiB = 2 ** 30


def parse_ints(text, flag):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{flag} takes positive integers separated by commas, e.g. 1024,2048; got '{text}'")
    return values


def account_flow(method, flow):
    """The memory flow (sekd.FLOWS) that distill_loss runs for a method, and whether it selects."""
    if method in ("full_kd", "ce"):
        return ("dense" if flow == "dense" else "streamed"), False
    return ("chunked" if flow == "dense" else "streamed"), method == "sekd"  # RandomPos selects without logits


def print_account(acc, title):
    """One flow's analytic account as a table: state per model, activations, logit tensors, phases."""
    mib = lambda b: f"{b / 2**20:,.1f}"
    s, t = acc["student"], acc["teacher"]
    print(f"\n{title}: analytic memory account (MiB), B={acc['B']} L={acc['L']} V={acc['V']:,} "
          f"N_sel={acc['n_sel']} chunk={acc['chunk_rows']} rows, {acc['dtype']}")
    print(f"  student: params {mib(s['params'])}, grads {mib(s['grads'])}, AdamW {mib(s['adamw'])}, "
          f"activations ~{mib(s['activations'])}")
    print(f"  teacher: params {mib(t['params'])}, forward activations ~{mib(t['activations'])}")
    seen = {}
    for x in acc["logits"]:  # group repeated tensors (chunks) by what they are
        key = (x["phase"], x["what"], x["dtype"])
        n, rows, b = seen.get(key, (0, 0, 0))
        seen[key] = (n + 1, max(rows, x["shape"][0]), b + x["bytes"])
    for (phase, what, dtype), (n, rows, b) in seen.items():
        times = f" x{n}" if n > 1 else ""
        print(f"    {phase:<16} {what:<52} [{rows}, V] {dtype}{times}: {mib(b)}")
    print("  peak per phase: " + ", ".join(f"{p} {mib(v)} (logits {mib(acc['logit_peaks'].get(p, 0))})"
                                           for p, v in acc["phases"].items()))


def modelled_method(args, method):
    """The method whose training step `sekd.logit_ledger` models for `method`, or None. Sample-axis
    methods train like their position method on the chosen samples; RS-KD classes, AT-KD, other
    metrics and policies, the reverse KL and on-policy steps make other tensors."""
    positions, classes, _ = AXES.get(method, (method, "full", "all"))
    if positions == "ce":
        return "ce"
    if classes != "full" or positions == "at_kd" or args.on_policy > 0 or args.divergence == "reverse":
        return None
    if positions == "sekd" and (args.metric, args.policy) != ("student_entropy", "topk"):
        return None
    return "full_kd" if args.k == 1.0 and positions != "ce" else positions  # k = 1: no selection


def training_accounts(args, methods, teacher, vocab_size, device):
    """The analytic account of each distillation run, printed before training (SPEC 6)."""
    half = autocast_dtype(args, device) is not None
    student = new_model(args, "student", vocab_size, torch.device("meta"))
    out = {}
    for m in methods:
        base = modelled_method(args, m)
        if base is None:
            print(f"\n{m}: no analytic memory account (CE, Full KD, RandomPos and SE-KD with student entropy + "
                  "top-k steps are modelled)")
            continue
        flow, select = account_flow(base, args.flow)
        acc = sekd.ledger_account(student, teacher, args.batch_size, args.seq_len, flow,
                                  args.k if base in ("sekd", "random_pos") else 1.0, args.chunk_rows or None, half,
                                  device.type == "cuda", select, 0.0 if base == "ce" else args.lam, args.T)
        print_account(acc, f"{m} ({flow} flow, lambda {acc['lam']:g})")
        out[m] = acc
    return out


def autocast_dtype(args, dev):
    return {"auto": torch.bfloat16 if dev.type == "cuda" else None, "float32": None,
            "bfloat16": torch.bfloat16}[args.dtype]


def is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)


def free_memory(opt, dev):
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


class PhaseMeter:
    """Measured peak bytes per phase of one step, beside the analytic ones: on CUDA from the
    allocator (reset_peak_memory_stats, max_memory_allocated); on CPU the resident state plus
    sekd.LiveBytes. On both, LiveBytes also gives the peak of the logits-sized tensors."""

    def __init__(self, dev, resident, V):
        self.cuda, self.resident, self.phases = dev.type == "cuda", resident, {}
        self.meter = sekd.LiveBytes(match=sekd.logits_sized(V))

    def now(self):
        return torch.cuda.memory_allocated() if self.cuda else self.resident + self.meter.live

    @contextmanager
    def __call__(self, name):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.meter.peak, self.meter.matched_peak = self.meter.live, self.meter.matched_live
        start = self.now()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if self.cuda else self.resident + self.meter.peak
        self.phases[name] = {"start": start, "peak": peak, "logit_peak": self.meter.matched_peak}


def bench_step(student, teacher, opt, x, y, flow, args, phase=sekd._no_phase):
    """One training step of `flow`: forward, selection, loss, backward, AdamW step."""
    dtype = autocast_dtype(args, x.device)
    with torch.autocast(x.device.type, dtype=dtype) if dtype else nullcontext():
        loss, _ = sekd.flow_loss(student, teacher, x, y, flow, args.k, args.T, args.chunk_rows or None, phase)
    with phase("backward"):
        loss.backward()
    with phase("optimizer step"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure_flow(student, teacher, opt, x, y, flow, args, dev):
    """Peaks of one step, per phase; student / teacher / total as in README_memory.md:
    teacher = its parameters + what its forward (and selective head) allocates;
    student = the step's peak in the student's phases less the teacher's parameters and
    hidden states; total = the step's peak with both models in one process."""
    resident = sekd.state_bytes(student, teacher) + sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
        if torch.is_tensor(t) and t.device == dev)
    pm = PhaseMeter(dev, resident, student.config.vocab_size)
    with pm.meter:
        bench_step(student, teacher, opt, x, y, flow, args, pm)
    ph = pm.phases
    t_params = sekd.param_bytes(teacher)
    t_hidden = x.numel() * teacher.config.n_embd * 4
    delta = lambda p: ph[p]["peak"] - ph[p]["start"] if p in ph else 0
    teacher_own = delta("teacher forward")
    if "teacher head" in ph:
        teacher_own = max(teacher_own, t_hidden + delta("teacher head"))
    held = {"student forward", "selection", "teacher head", "loss"}  # teacher_h is alive
    student_own = max(v["peak"] - t_params - (t_hidden if p in held else 0)
                      for p, v in ph.items() if p != "teacher forward")
    return {"phases": ph, "total": max(v["peak"] for v in ph.values()), "teacher": t_params + teacher_own,
            "student": student_own, "logit_peak": max(v["logit_peak"] for v in ph.values())}


def bench_batch(B, V, args, dev):
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    tokens = torch.randint(0, V, (B, args.seq_len + 1), generator=g).to(dev)
    return tokens[:, :-1], tokens[:, 1:]


def guard_oom(row, fn):
    """Run fn(); a lack of memory marks the row "OOM" (a result, not a crash)."""
    try:
        fn()
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        row["oom"] = "OOM"


def bench_row(student, teacher, opt, B, flow, args, dev):
    """One flow at batch B: analytic account and measured peaks (after a warm-up step); a row
    whose analytic peak is over --bench-mem-gb is skipped, one that runs out of memory says so."""
    V, L = student.config.vocab_size, args.seq_len
    half = autocast_dtype(args, dev) is not None
    acc = sekd.ledger_account(student, teacher, B, L, flow, args.k, args.chunk_rows or None, half, dev.type == "cuda",
                              T=args.T)
    row = {"flow": flow, "name": sekd.FLOWS[flow], "B": B, "L": L, "V": V, "tokens": B * L, "analytic": acc}
    if args.bench_mem_gb and acc["total"] > args.bench_mem_gb * GiB:
        return {**row, "oom": f"skipped: analytic peak {acc['total'] / GiB:.1f} GiB > --bench-mem-gb"}
    x, y = bench_batch(B, V, args, dev)

    def warm_up_then_measure():
        bench_step(student, teacher, opt, x, y, flow, args)  # allocator, AdamW state
        row.update(measure_flow(student, teacher, opt, x, y, flow, args, dev))
    guard_oom(row, warm_up_then_measure)
    free_memory(opt, dev)
    return row


def time_rows(student, teacher, opt, rows, args, dev):
    """Each row's median step seconds (`step_s`) over --bench-repeats steps after --bench-warmup.
    The flows take turns, one step each per round, so that a slow spell of a shared machine
    slows every flow alike and the ratios between them stay fair."""
    live = [(r, []) for r in rows if "oom" not in r]  # each row with its step times
    if not live:
        return rows
    x, y = bench_batch(rows[0]["B"], rows[0]["V"], args, dev)
    for i in range(args.bench_warmup + args.bench_repeats):
        for r, times in live:
            if "oom" in r:  # ran out of memory in an earlier round
                continue
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            guard_oom(r, lambda: bench_step(student, teacher, opt, x, y, r["flow"], args))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.bench_warmup:
                times.append(time.perf_counter() - t0)
    for r, times in live:
        if "oom" not in r:
            r["step_s"] = float(np.median(times))
    free_memory(opt, dev)
    return rows


def bench_rows(student, teacher, opt, B, args, dev):
    """Every flow at batch B: measured, then timed side by side."""
    rows = [bench_row(student, teacher, opt, B, f, args, dev) for f in sekd.FLOWS]
    return time_rows(student, teacher, opt, rows, args, dev)


def bench_models(args, V, dev):
    torch.manual_seed(args.seed)
    teacher, student = new_model(args, "teacher", V, dev), new_model(args, "student", V, dev)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher, make_optimizer(student, 1e-5, args.weight_decay)


def print_bench_table(rows, lines):
    base = rows[0]
    head = (f"{'#':>2} {'flow':<44} {'student GiB':>11} {'teacher GiB':>11} {'total GiB':>9} {'(analytic)':>10} "
            f"{'logits GiB':>10} {'(analytic)':>10} {'step ms':>8} {'x mem':>6} {'x time':>6}")
    lines += [head, "-" * len(head)]
    for i, r in enumerate(rows, 1):
        if "oom" in r:
            lines.append(f"{i:>2} {r['name']:<44} {r['oom']}")
            continue
        a = r["analytic"]
        ratio_m = f"{r['total'] / base['total']:.2f}" if "total" in base else "-"
        ratio_t = f"{r['step_s'] / base['step_s']:.2f}" if "step_s" in base and "step_s" in r else "-"
        ms = f"{1000 * r['step_s']:.1f}" if "step_s" in r else "-"
        lines.append(f"{i:>2} {r['name']:<44} {r['student'] / GiB:>11.3f} {r['teacher'] / GiB:>11.3f} "
                     f"{r['total'] / GiB:>9.3f} {a['total'] / GiB:>10.3f} {r['logit_peak'] / GiB:>10.3f} "
                     f"{a['logit_peak'] / GiB:>10.3f} {ms:>8} {ratio_m:>6} {ratio_t:>6}")


def print_sweep_tables(V, sweep, grid):
    """The scaling sweep as two tables: memory (logit peak / total peak) and step time (ms, and
    the ratio to the dense flow at the same B*L). A row that ran out of memory says so."""
    def cells(f, fmt):
        return "".join(f"{c:>18}" for c in (("OOM" if r["oom"] == "OOM" else "skipped") if "oom" in r else fmt(r, i)
                                            for i, r in enumerate(grid[f])))
    dense = grid["dense"]

    def time_cell(r, i):
        ratio = f" ({r['step_s'] / dense[i]['step_s']:.2f}x)" if "step_s" in dense[i] else ""
        return f"{1000 * r['step_s']:.1f}{ratio}"
    cols = f"{'flow':<44}" + "".join(f"{t:>18,}" for t in sweep)
    table = [f"\nscaling sweep, V = {V:,}: measured peak logit bytes (GiB) / total peak (GiB) per B*L", cols]
    table += [f"{sekd.FLOWS[f]:<44}" + cells(f, lambda r, i: f"{r['logit_peak'] / GiB:.3f} / {r['total'] / GiB:.2f}")
              for f in sekd.FLOWS]
    table += [f"\nscaling sweep, V = {V:,}: step ms (time / dense flow's time at the same B*L)", cols]
    table += [f"{sekd.FLOWS[f]:<44}" + cells(f, time_cell) for f in sekd.FLOWS]
    return table


def run_benchmark(args, device):
    """--run benchmark: one training step of each memory flow side by side (SPEC 6), on random
    tokens, per vocabulary size; then a sweep over B*L for the first vocabulary."""
    vocabs = parse_ints(args.bench_vocab, "--bench-vocab")
    sweep = parse_ints(args.bench_tokens, "--bench-tokens") if args.bench_tokens else []
    if any(t % args.seq_len for t in sweep):
        raise UserError(f"--bench-tokens must be multiples of --seq-len ({args.seq_len}): B = tokens / L")
    if args.bench_repeats < 1 or args.bench_warmup < 0:
        raise UserError("--bench-repeats must be >= 1 and --bench-warmup >= 0")
    lines = [f"benchmark on {device} ({machine()['gpu'] or 'CPU, ' + str(torch.get_num_threads()) + ' threads'}), "
             f"torch {torch.__version__}, autocast {autocast_dtype(args, device) or 'off (float32)'}; "
             f"B={args.batch_size} L={args.seq_len} k={args.k}; teacher {args.teacher_layers}x{args.teacher_embd}, "
             f"student {args.student_layers}x{args.student_embd}; median of {args.bench_repeats} steps after "
             f"{args.bench_warmup} warm-up, the flows taking turns"]
    print(lines[0])
    result = {"args": vars(args), "machine": machine(), "tables": {}, "sweep": []}
    for i, V in enumerate(vocabs):
        student, teacher, opt = bench_models(args, V, device)
        rows = bench_rows(student, teacher, opt, args.batch_size, args, device)
        table = [f"\nV = {V:,}: one step per flow; ratios to row 1"]
        print_bench_table(rows, table)
        print("\n".join(table), flush=True)
        lines += table
        result["tables"][str(V)] = rows
        if i == 0 and sweep:
            grid = {f: [] for f in sekd.FLOWS}
            for t in sweep:
                for r in bench_rows(student, teacher, opt, t // args.seq_len, args, device):
                    grid[r["flow"]].append(r)
                    result["sweep"].append(r)
            table = print_sweep_tables(V, sweep, grid)
            print("\n".join(table), flush=True)
            lines += table
        del student, teacher, opt
        free_memory(None, device)
    os.makedirs(args.out_dir, exist_ok=True)
    data.atomic_write_bytes(os.path.join(args.out_dir, "benchmark.txt"), ("\n".join(lines) + "\n").encode())
    data.atomic_write_bytes(os.path.join(args.out_dir, "results_benchmark.json"), json.dumps(result, indent=1).encode())
    print(f"tables in {os.path.join(args.out_dir, 'benchmark.txt')}, all numbers in results_benchmark.json")
    return result


# ----------------------------------------------------------------------------- the position axis (SPEC 2)

BUDGETS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
SUMMARY_KEYS = ("val_ppl", "kl_to_teacher", "agreement", "ece", "train_s", "tokens_per_s", "peak_bytes")


def mean_std_row(label, per_seed):
    """One table row: the mean and sample std over seeds of each metric, plus the seeds' rows."""
    row = {"method": label, "seeds": per_seed}
    for key in SUMMARY_KEYS:
        vals = [r[key] for r in per_seed if r.get(key) is not None]
        if vals:
            row[key] = float(np.mean(vals))
            row[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return row


def run_positions(args, corpus, device, teacher, evalset, student_init=None):
    """The paper's position tables at small scale (SPEC 2, 7), each row --seeds students:
    (1) every metric with top-k plus Full KD, RandomPos and AT-KD; (2) student entropy with
    every policy; (3) budgets BUDGETS for student entropy and reverse KL. A configuration that
    appears in several tables is trained once."""
    seeds = [args.seed + i for i in range(args.seeds)]
    done = {}

    def row(label, method, **kd):
        key = (method, tuple(sorted(kd.items())))
        if key not in done:
            per_seed = []
            for s in seeds:
                a = argparse.Namespace(**{**vars(args), "seed": s})
                per_seed.append(distill_student(a, method, corpus, device, teacher, evalset, student_init,
                                                save=False, **kd))
            done[key] = per_seed
        return mean_std_row(label, done[key])

    k = args.k
    steps_S = min(args.curriculum_steps, args.student_steps)
    if steps_S < args.curriculum_steps:
        print(f"note: curriculum slides over {steps_S} steps (--student-steps), not --curriculum-steps "
              f"{args.curriculum_steps}, so that it reaches the top window within training")
    tables = {}
    tables["metrics"] = [row("Full KD", "full_kd")]
    for m in sekd.METRICS:
        tables["metrics"].append(row(f"RandomPos {k:.0%} (random)", "random_pos", k=k) if m == "random" else
                                 row(f"{m} top {k:.0%}", "sekd", metric=m, policy="topk", k=k))
    tables["metrics"].append(row("AT-KD", "at_kd"))
    print_table(tables["metrics"], device, f"(1) metrics, top {k:.0%}, {len(seeds)} seed(s)")
    labels = {"curriculum": f"curriculum (S={steps_S})", "gls": f"gls (queue {args.gls_queue:,})"}
    tables["policies"] = []
    for p in sekd.POLICIES:
        extra = {"curriculum_steps": steps_S} if p == "curriculum" else {}
        tables["policies"].append(row(f"student_entropy {labels.get(p, p)} {k:.0%}", "sekd",
                                      metric="student_entropy", policy=p, k=k, **extra))
    print_table(tables["policies"], device, f"(2) policies, student entropy, k = {k:.0%}")
    tables["budget"] = []
    for m in ("student_entropy", "reverse_kl"):
        for b in BUDGETS:  # top-100% selects every position: that is Full KD
            tables["budget"].append(row(f"{m} top 100% (= Full KD)", "full_kd") if b == 1.0 else
                                    row(f"{m} top {b:.0%}", "sekd", metric=m, policy="topk", k=b))
    print_table(tables["budget"], device, "(3) budget sweep")
    for name, rows in tables.items():  # the three tables again, together at the end
        print_table(rows, device, f"table: {name}")
    return {"tables": tables, "seeds": seeds, "students_trained": len(done) * len(seeds)}


def _heat(e, lo, hi):
    """White (the sequence's lowest entropy) to red (its highest) as an (r, g, b) triple."""
    f = 0.0 if hi <= lo else (e - lo) / (hi - lo)
    return 255, int(255 * (1 - f)), int(255 * (1 - f))


def show_selection(args, corpus, device, teacher, evalset, student_init=None):
    """One validation sequence, each predicted token coloured by the student's entropy H(q_t),
    positions selected at budget --k marked: by SE-KD (student entropy, top-k) and by --metric
    with --policy (teacher entropy, top-k, when those are SE-KD's own). ANSI in the terminal + an
    HTML file. Uses OUT_DIR/student_sekd.pt (trains it first if missing)."""
    path = os.path.join(args.out_dir, "student_sekd.pt")
    if not os.path.exists(path):
        distill_student(args, "sekd", corpus, device, teacher, evalset, student_init)
    ckpt = load_checkpoint(path)
    check_signature(ckpt, corpus, path)
    student = GPT_from(ckpt).to(device).eval()
    i = min(args.show_sample, len(evalset.x) - 1)
    x, y = evalset.x[i:i + 1], evalset.y[i:i + 1]
    view = (args.metric, args.policy) if (args.metric, args.policy) != ("student_entropy", "topk") \
        else ("teacher_entropy", "topk")
    valid = y >= 0
    torch.manual_seed(args.seed)  # pos-RS-KD's draws
    with torch.no_grad():
        h, w = student.hidden(x).float(), student.head_weight.float()
        th = evalset.teacher_h[i:i + 1]
        ent = sekd.chunked_scores("student_entropy", h, w, valid)[0]
        picks = {}  # name -> the policy's mask: bool, or pos-RS-KD's draw counts
        for metric, policy in (("student_entropy", "topk"), view):
            scores = sekd.chunked_scores(metric, h, w, valid, th, evalset.teacher_w, y)
            state = sekd.PositionState(args.gls_queue, args.curriculum_steps)  # GLS, curriculum: as at step 0
            picks[metric if policy == "topk" else f"{metric} {policy}"] = \
                sekd.get_policy(policy)(scores, args.k, valid, state)[0]
    other = list(picks)[1]
    enc = data.gpt2_encoding()
    tokens = [corpus.vocab.decode([int(t)], enc) for t in y[0]]
    first = corpus.vocab.decode([int(x[0, 0])], enc)
    lo, hi = float(ent.min()), float(ent.max())
    blocks = []
    for name, m in picks.items():
        sel = m > 0
        draws = f", {int(m.sum())} draws" if m.dtype != torch.bool else ""
        title = f"{'SE-KD: ' if name == 'student_entropy' else ''}{name}{' top' if ' ' not in name else ''} " \
                f"{args.k:.0%} ({int(sel.sum())} of {len(tokens)} positions marked{draws}; their mean entropy " \
                f"{float(ent[sel].mean()) if sel.any() else 0.0:.2f} nats)"
        ansi = "".join(f"\x1b[48;2;{r};{g};{b}m\x1b[30m{(chr(27) + '[1;4m') if s else ''}{t}\x1b[0m"
                       for t, s, (r, g, b) in ((t.replace("\n", "\u21b5\n"), bool(s), _heat(float(e), lo, hi))
                                               for t, s, e in zip(tokens, sel, ent)))
        print(f"\n== {title}  (colour: student entropy, white {lo:.2f} to red {hi:.2f} nats; marked = bold underlined)\n"
              f"{first}{ansi}")
        spans = "".join(f'<span title="H={float(e):.2f}" style="background:rgb{_heat(float(e), lo, hi)}'
                        f'{";outline:2px solid #000;font-weight:bold" if s else ""}">{html.escape(t)}</span>'
                        for t, s, e in zip(tokens, sel, ent))
        blocks.append(f"<div><h3>{html.escape(title)}</h3><pre>{html.escape(first)}{spans}</pre></div>")
    overlap = int(((picks["student_entropy"] > 0) & (picks[other] > 0)).sum())
    print(f"\nboth selections marked {overlap} of {int((picks[other] > 0).sum())} positions; mean entropy over "
          f"all {int(valid.sum())} positions {float(ent[valid[0]].mean()):.2f} nats")
    page = ("<!doctype html><meta charset='utf-8'><title>sekd selection</title><style>body{font-family:sans-serif}"
            "pre{white-space:pre-wrap;font-size:15px;line-height:1.6}.row{display:flex;gap:2em}.row>div{flex:1}"
            f"</style><p>Validation sequence {i}; colour = student entropy H(q_t) of the token predicted there "
            f"(white {lo:.2f}, red {hi:.2f} nats); boxed = selected. Both selections marked {overlap} positions in "
            "common.</p>"
            f"<div class='row'>{''.join(blocks)}</div>")
    out = os.path.join(args.out_dir, "selection.html")
    data.atomic_write_bytes(out, page.encode())
    print(f"HTML written to {out}")
    return {"sample": i, "student_entropy": ent.tolist(), "selected": {n: s.tolist() for n, s in picks.items()},
            "html": out}


# ----------------------------------------------------------------------------- text samples

def sample_prompts(corpus, n, length, enc):
    """n prompts of `length` tokens spread evenly over the validation plays, each starting just
    after a line break or a document's end (a speaker's name or a verse line, in the plays), if
    one comes within 200 tokens. -> (long [n, length], start offsets)."""
    stream = np.asarray(corpus.val).reshape(-1).astype(np.int64)
    if len(stream) < length + 1:
        raise UserError(f"the validation split has {len(stream)} tokens, too few for --sample-prompt-len {length}")
    last = len(stream) - length
    is_break = lambda t: "\n" in t or t == enc.decode([enc.eot_token])
    starts = []
    for s in np.linspace(0, max(0, last - 200), n).astype(np.int64):
        breaks = [i + 1 for i in range(s, min(s + 200, last)) if is_break(corpus.vocab.decode([stream[i]], enc))]
        starts.append(breaks[0] if breaks else int(s))
    return torch.from_numpy(np.stack([stream[s:s + length] for s in starts])), starts


def saved_students(out_dir):
    """The students to sample from: OUT_DIR/student_<name>.pt (written by distillation runs, and
    student_init.pt), the initial student first, then CE, Full KD, SE-KD, the rest by name."""
    names = sorted(f[8:-3] for f in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
                   if f.startswith("student_") and f.endswith(".pt"))
    first = ["init", "ce", "full_kd", "sekd"]
    names.sort(key=lambda n: (first.index(n) if n in first else len(first), n))
    if not [n for n in names if n != "init"]:
        raise UserError(f"no trained students (student_<method>.pt) in {out_dir}: run `python train.py` there "
                        "(writes student_ce.pt, student_full_kd.pt, student_sekd.pt) or `python train.py --run "
                        "distill --method METHOD` with this --out-dir")
    return [(f"student_{n}", os.path.join(out_dir, f"student_{n}.pt")) for n in names]


def colour_enabled():
    """ANSI colour only on a terminal, and not when NO_COLOR is set (no-color.org)."""
    return not os.environ.get("NO_COLOR") and sys.stdout.isatty()


def paint(token, rgb):
    """One token on a coloured background; a line break shows as ↵ and is made outside the colour."""
    r, g, b = rgb
    return "\n".join(f"\x1b[48;2;{r};{g};{b}m\x1b[30m{part}\x1b[0m" if part else ""
                     for part in token.replace("\n", "\u21b5\n").split("\n"))


def run_sample(args, corpus, device):
    """--run sample: --sample-prompts validation prompts, and each model's continuation of them
    (the teacher, then every saved student), one block under the other; each generated token is
    coloured by that model's own entropy H(q_t) at that step (SPEC 2's student_entropy: what SE-KD
    selects by). Same --seed, same text."""
    t_path = args.teacher_ckpt or os.path.join(args.out_dir, "teacher.pt")
    models = [("teacher", t_path)] + saved_students(args.out_dir)
    enc = data.gpt2_encoding()
    prompts, starts = sample_prompts(corpus, args.sample_prompts, args.sample_prompt_len, enc)
    text, entropy = {}, {}
    for name, path in models:
        ckpt = load_checkpoint(path)
        check_signature(ckpt, corpus, path)
        model = GPT_from(ckpt).to(device).eval()
        g = torch.Generator(device=device).manual_seed(args.seed)
        out, ent = model.generate(prompts.to(device), args.sample_len, args.sample_temperature, args.sample_top_k, g)
        text[name] = [[corpus.vocab.decode([int(t)], enc) for t in row[prompts.shape[1]:]] for row in out.cpu()]
        entropy[name] = ent.cpu().tolist()
    colour = colour_enabled()
    hi = max(max(max(row) for row in e) for e in entropy.values())
    print(f"\n{len(prompts)} validation prompts of {prompts.shape[1]} tokens, {args.sample_len} new tokens per model, "
          f"temperature {args.sample_temperature}, top-k {args.sample_top_k or 'off'}, seed {args.seed}"
          + (f"; colour = the model's own entropy at that step, white 0 to red {hi:.2f} nats" if colour else ""))
    for i, start in enumerate(starts):
        print(f"\n=== prompt {i + 1} (validation token {start:,})\n{corpus.vocab.decode(prompts[i].tolist(), enc)}")
        for name, _ in models:
            tokens, ent = text[name][i], entropy[name][i]
            body = "".join(paint(t, _heat(e, 0.0, hi)) for t, e in zip(tokens, ent)) if colour else "".join(tokens)
            print(f"--- {name}, mean entropy {np.mean(ent):.2f} nats\n{body}")
    result = {"prompt_starts": starts, "prompts": [corpus.vocab.decode(p.tolist(), enc) for p in prompts],
              "continuations": {n: ["".join(t) for t in rows] for n, rows in text.items()}, "entropy": entropy,
              "args": vars(args)}
    path = os.path.join(args.out_dir, "results_sample.json")
    data.atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    print(f"\ntext and per-token entropies written to {path}")
    return result


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    device = pick_device(args)
    if args.run == "benchmark":
        return run_benchmark(args, device)
    init_distributed(device)
    t_start = time.time()
    corpus = rank0_first(lambda: data.prepare(args.dataset, args.seq_len, args.full_vocab, args.data_dir,
                                              max_tokens=args.max_tokens or None))
    print(f"data: {args.dataset}, {len(corpus.train):,} train / {len(corpus.val):,} val samples of "
          f"{args.seq_len} positions, vocabulary {corpus.vocab.size:,}; device {device}")
    if args.run == "storage":
        return {"storage": storage_table(args, corpus, default_cache_path(args))}
    if args.run == "sample":
        return run_sample(args, corpus, device)
    evalset = EvalSet(corpus, args.eval_tokens, device, args.batch_size)
    teacher, t_stats = pretrained(args, corpus, device, evalset, "teacher")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    evalset.set_teacher(teacher, args)
    rows = [{"method": "teacher", **evalset.evaluate(teacher, args), **t_stats}]
    methods = {"compare": ["ce", "full_kd", "sekd"], "distill": [args.method]}.get(args.run, [])
    student_init = None
    if args.run != "teacher" and args.student_init_steps > 0:
        student_init, s_stats = pretrained(args, corpus, device, evalset, "student")
        rows.append({"method": "student init (CE)", **evalset.evaluate(student_init, args), **s_stats})
    accounts = training_accounts(args, methods, teacher, corpus.vocab.size, device)
    for m in methods:
        rows.append(distill_student(args, m, corpus, device, teacher, evalset, student_init))
        print_table(rows, device)
    if args.run == "teacher":
        print_table(rows, device)
    extra = {}
    if args.run in ("positions", "show"):
        extra = {"positions": run_positions, "show": show_selection}[args.run](args, corpus, device, teacher, evalset,
                                                                             student_init)
    if args.run in ("axes", "walltime"):
        extra = run_axes(args, corpus, device, teacher, evalset, student_init)
        rows += extra.pop("rows", [])
    result = {"args": vars(args), "machine": machine(), "data": corpus.meta, "rows": rows, **extra,
              "memory_account": accounts,
              "total_s": time.time() - t_start}
    path = os.path.join(args.out_dir, f"results_{args.run}.json")
    if RANK == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        data.atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    print(f"results written to {path}; total time {fmt_time(result['total_s'])}")
    finish_distributed()
    return result


def cli(argv=None):
    """The command line: `main`, with a user error printed as one line and exit code 2. A script
    that registers its own metric and then calls `train.cli()` gets the same command line."""
    try:
        return main(argv)
    except (UserError, data.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are complete: the same command resumes from the last",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
