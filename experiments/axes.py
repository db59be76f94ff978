"""The class and sample axes: what each student trains on (`plan`: TopSmp / RandomSmp samples, SE-KD_3X's
offline teacher cache), and `--run axes`, `--run walltime`, `--run storage`: the paper's multi-axis table
(positions, classes, samples), its wall-time table and its storage table, at small scale."""
import argparse
import json
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch

import data
import sekd
import train
from experiments.positions import mean_std_row

def plan(args, samples, classes, corpus, device, student, teacher):
    """What `train.distill_student` trains every student on (the sample and class axes): the samples it sees (all; TopSmp's, by the
    frozen initial student's entropy; RandomSmp's), for as many epochs as --student-steps makes over
    all samples (l = 20% trains 20% of the steps: the wall-time saving), and SE-KD_3X's cached draws.
    -> dict: batches, steps, n_kept, prepass_s, cache_build_s, cache_reused, cache_bytes."""
    out = {"samples": samples, "n_kept": len(corpus.train), "prepass_s": None, "cache_build_s": None,
            "cache_reused": None, "cache_bytes": None, "steps": args.student_steps}
    kept, cache = None, None
    if classes == "cache" and os.path.exists(default_cache_path(args)) and not args.rebuild_cache:
        data.TeacherCache(default_cache_path(args)).check(cache_signature(args, corpus, []), skip=("kept",))  # fail fast
    if samples == "top":
        scores, out["prepass_s"] = sample_prepass(student, corpus, args, device)
        kept = sekd.top_samples(torch.from_numpy(scores), args.l).numpy()
    elif samples == "random":
        kept = sekd.random_samples(len(corpus.train), args.l, torch.Generator().manual_seed(args.seed)).numpy()
    if kept is not None:
        out["n_kept"] = len(kept)
        out["steps"] = max(1, math.ceil(args.student_steps * len(kept) / len(corpus.train)))
    if classes == "cache":
        ids = kept if kept is not None else np.arange(len(corpus.train))
        cache, out["cache_build_s"], out["cache_reused"] = teacher_cache(args, corpus, device, teacher, ids)
        out["cache_bytes"] = os.path.getsize(cache.path)
    out["batches"] = train.Batches(corpus, args.batch_size, args.grad_accum, args.seed, device, kept, train.RANK,
                                   train.WORLD, cache)
    return out


_PREPASS = {}  # (seed, student config, data, dtype, device) -> (scores, seconds): one pre-pass per seed


@torch.no_grad()

def sample_prepass(student, corpus, args, device):
    """The frozen initial student scores every training sample by its mean entropy. -> (scores [N]
    float64, seconds). Data parallel: each rank scores its share and every rank gets all the scores."""
    key = (args.seed, json.dumps(asdict(student.config), sort_keys=True), corpus.meta["data_fingerprint"],
           args.dtype, str(device))
    if key not in _PREPASS:
        t0, scores = time.time(), []
        student.eval()
        starts = range(0, len(corpus.train), args.batch_size)
        for i in starts[train.RANK * len(starts) // train.WORLD:(train.RANK + 1) * len(starts) // train.WORLD]:
            x = torch.from_numpy(corpus.train[i:i + args.batch_size, :-1].astype(np.int64)).to(device)
            with train.autocast(args, device):
                h = student.hidden(x)
            scores.append(sekd.sample_entropy(h.float(), student.head_weight.float(), None,
                                              args.chunk_rows or None).double().cpu().numpy())
        student.train()
        scores = np.concatenate(train.gather_objects(np.concatenate(scores) if scores else np.zeros(0)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        _PREPASS[key] = (scores, time.time() - t0)
        print(f"[pre-pass] scored {len(corpus.train):,} samples by mean student entropy in {_PREPASS[key][1]:.1f}s")
    return _PREPASS[key]


def default_cache_path(args):
    return args.cache or os.path.join(args.out_dir, f"rskd_cache_seed{args.seed}.bin")


def cache_signature(args, corpus, kept):
    """What a teacher cache must match to be used: the teacher (by hash), the data, the draws."""
    path = train.teacher_ckpt_path(args)
    if not os.path.exists(path):
        raise train.UserError(f"teacher checkpoint {path} does not exist: the cache is tied to its hash; "
                        "train it first (python train.py --run teacher)")
    return {"format": 1, "teacher_sha256": train.file_sha256(path), "data_fingerprint": corpus.meta["data_fingerprint"],
            "U": args.U, "T": args.T, "seed": args.seed, "V": corpus.vocab.size, "seq_len": args.seq_len,
            "kept": [int(i) for i in kept]}


def teacher_cache(args, corpus, device, teacher, kept):
    """SE-KD_3X's cache for `kept`: reused if its signature matches this run, refused in one line if
    not, built if absent or --rebuild-cache. -> (TeacherCache, build seconds or None, reused).
    Data parallel: rank 0 builds it (its draws do not depend on the world size); the others wait."""
    path, signature = default_cache_path(args), cache_signature(args, corpus, kept)
    build = train.RANK == 0 and (args.rebuild_cache or not os.path.exists(path))
    if build:
        if teacher is None:
            raise train.UserError("building the teacher cache needs the teacher")
        t0, V, gen = time.time(), corpus.vocab.size, torch.Generator(device=device).manual_seed(args.seed)

        @torch.no_grad()
        def blocks():  # U classes drawn from the teacher at every position of every kept sample
            for i in range(0, len(kept), args.batch_size):
                x = torch.from_numpy(corpus.train[kept[i:i + args.batch_size], :-1].astype(np.int64)).to(device)
                with train.autocast(args, device):
                    ids, counts = sekd.teacher_draws(teacher.hidden(x), teacher.head_weight, args.U, args.T,
                                                     args.chunk_rows or None, gen)
                yield data.encode_draws(ids, counts, V).cpu().numpy()
        data.write_cache(path, signature, (len(kept), args.seq_len, args.U, data.cache_bytes_per_class(V)), blocks())
        build_s = time.time() - t0
        print(f"[cache] built {path}: {len(kept):,} samples x {args.seq_len} positions x U={args.U}, "
              f"{os.path.getsize(path):,} bytes in {build_s:.1f}s")
    train.barrier()
    cache = data.TeacherCache(path)
    if build:
        return cache, build_s, False
    cache.check(signature)
    print(f"[cache] reusing {path} ({os.path.getsize(path):,} bytes): distillation runs without the teacher")
    return cache, None, True


AXES_TABLE = ("full_kd", "random_pos", "random_smp", "sekd", "rskd", "top_smp", "top_smp_rskd", "sekd_top_smp",
              "sekd_3x")
WALL_TABLE = ("full_kd", "random_pos", "top_smp", "sekd_3x")
PAPER_STORAGE_TB = {"full_fp16": 10_000, "rskd": 19.2, "sekd_3x": 3.84, "ce": 0.3}  # the paper's storage table


def run(args, corpus, device, teacher, evalset, student_init=None):
    """`--run axes`: the multi-axis table (AXES_TABLE, --seeds seeds), the wall-time table (first
    seed; SE-KD_3X once building its cache, then once reusing it) and the storage table.
    `--run walltime`: the wall-time rows only, one seed."""
    rows, walls = [], []
    table, seeds = (WALL_TABLE, 1) if args.run == "walltime" else (AXES_TABLE, args.seeds)
    for i in range(seeds):
        a = argparse.Namespace(**{**vars(args), "seed": args.seed + i})
        for m in table:
            b = argparse.Namespace(**{**vars(a), "rebuild_cache": True}) if m == "sekd_3x" else a  # time a build
            row = train.distill_student(b, m, corpus, device, teacher, evalset, student_init)
            rows.append({**row, "seed": a.seed, "key": m})
            train.print_table([r for r in rows if r["seed"] == a.seed], device)
        if i == 0:
            reuse = train.distill_student(a, "sekd_3x", corpus, device, teacher, evalset, student_init)
            walls = [r for r in rows if r["key"] in WALL_TABLE] + [{**reuse, "seed": a.seed, "key": "sekd_3x_reuse"}]
    summary = print_axes_table(rows)
    print_walltime_table(walls)
    return {"rows": rows, "summary": summary, "walltime": walls, "storage": storage(args, corpus)}


def print_axes_table(rows):
    """Mean and sample standard deviation over seeds of each method's metrics. -> summary dict."""
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    cols = (("val_ppl", "val PPL", 1), ("kl_to_teacher", "KL(T||S)", 1), ("agreement", "agree %", 100),
            ("ece", "ECE %", 1))
    n_seeds = max(len(v) for v in by_method.values())
    print(f"\nmulti-axis table, mean ± std over {n_seeds} seed(s)")
    head = f"{'method':<22}" + "".join(f" {label:>16}" for _, label, _ in cols) + f" {'steps':>6} {'samples':>8}"
    print(head + "\n" + "-" * len(head))
    out = {}
    for name, rs in by_method.items():
        # scaled before averaging, so that agreement's mean is that of the percentages
        row = mean_std_row(name, [{key: scale * r[key] for key, _, scale in cols} for r in rs], [c[0] for c in cols])
        line, out[name] = f"{name:<22}", {}
        for key, _, _ in cols:
            mean, sd = row[key], row[key + "_std"] or 0.0  # one seed: std 0
            out[name][key] = {"mean": mean, "std": sd, "n": len(rs)}
            line += f" {mean:>9.3f} ± {sd:<5.3f}"
        print(line + f" {rs[0]['steps']:>6} {rs[0]['n_kept']:>8,}")
    return out


def print_walltime_table(walls):
    def s(v):
        return "-" if v is None else f"{v:.1f}s"
    full = next((r["total_s"] for r in walls if r["key"] == "full_kd"), None)
    print("\nwall-time table (seconds; total = pre-pass + cache build + training)")
    head = f"{'method':<28} {'pre-pass':>9} {'cache':>8} {'train':>8} {'total':>8} {'vs Full KD':>10}"
    print(head + "\n" + "-" * len(head))
    names = {"sekd_3x": "SE-KD_3X (building cache)", "sekd_3x_reuse": "SE-KD_3X (reusing cache)"}
    for r in walls:
        name = names.get(r["key"], r["method"])
        rel = f"{100 * (r['total_s'] / full - 1):+.0f}%" if full else "-"
        print(f"{name:<28} {s(r['prepass_s']):>9} {s(r['cache_build_s']):>8} {s(r['train_s']):>8} "
              f"{s(r['total_s']):>8} {rel:>10}")


def storage(args, corpus):
    """The paper's storage table: bytes per position of each way to ship the teacher's signal, at
    the paper's scale (V = 100,000, U = 64, l = 0.2, 10^11 tokens) and for this corpus and flags;
    then the teacher cache on disk (default_cache_path), if there is one, against its
    accounting. -> dict."""
    paper = data.storage_bytes_per_position(100_000, 64, 0.2)
    here = data.storage_bytes_per_position(corpus.vocab.size, args.U, args.l)
    n_here = len(corpus.train) * args.seq_len
    print(f"\nstorage per training position (paper scale: V = 100,000, U = 64, l = 0.2, 100 B tokens; "
          f"here: V = {corpus.vocab.size:,}, U = {args.U}, l = {args.l}, {n_here:,} positions)")
    head = f"{'method':<22} {'B/pos':>10} {'TB @100B':>10} {'paper TB':>9} {'B/pos here':>11} {'MiB here':>10}"
    print(head + "\n" + "-" * len(head))
    labels = {"full_fp16": "Full KD, fp16 logits", "rskd": "RS-KD cache", "sekd_3x": "SE-KD_3X cache",
              "ce": "plain CE (ids)"}
    out = {"paper_scale": paper, "here": here, "positions_here": n_here}
    for key, label in labels.items():
        print(f"{label:<22} {paper[key]:>10,.1f} {paper[key] * 1e11 / 1e12:>10,.2f} {PAPER_STORAGE_TB[key]:>9,} "
              f"{here[key]:>11,.1f} {here[key] * n_here / 2**20:>10,.2f}")
    print("(2 bytes x 100,000 logits x 10^11 positions = 20,000 TB; the paper's 10,000 TB matches 1 byte per logit)")
    cache_path = default_cache_path(args)
    if os.path.exists(cache_path):
        cache = data.TeacherCache(cache_path)
        n_pos, real = cache.shape[0] * cache.shape[1], os.path.getsize(cache_path)
        predicted = n_pos * data.storage_bytes_per_position(cache.signature["V"], cache.signature["U"])["rskd"]
        out["cache"] = {"path": cache_path, "bytes": real, "positions": n_pos, "accounted_bytes": predicted,
                        "header_bytes": cache.offset}
        print(f"cache on disk {cache_path}: {real:,} bytes for {n_pos:,} positions = {real / n_pos:.2f} B/position; "
              f"accounting {predicted:,} bytes ({100 * (real - predicted) / predicted:+.3f}%: the {cache.offset}-byte "
              f"header); per position of the whole training set {real / n_here:.2f} B")
    return out
