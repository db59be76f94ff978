"""`python -m experiments.benchmark --head-only`: one loss step (forward + backward) at the LM head
alone, from random hidden states and head weights, for each flow side by side: dense `kd_loss`, the
streamed Full KD, SE-KD with its selection, the selection alone, our chunk formulas eager and
compiled, and, when they are installed, the peers: Liger's fused linear JSD (beta = 0, the forward
KL) and torchtune's chunked forward KL, on all rows and on SE-KD's rows. Every flow's gradient is
checked against dense (against the streamed loss where dense does not fit); the flows are timed in
turns; we write a JSON and plot time and memory against N."""

import gc
import json
import os
import statistics
from functools import partial

import torch

import experiments
import sekd
import train

MB = 2**20


def add_flags(add, ints):
    """The --head-only flags, added by `add` (the benchmark's group's add_argument)."""
    add("--head-only", action="store_true", help="time one loss step at the LM head (peers too)")
    add("--head-vocab", type=ints, default="50257,151936", help="--head-only: vocabulary sizes")
    add("--head-tokens", type=ints, default="1024,2048", help="--head-only: rows N = B*L")
    add("--head-dims", type=ints, default="256,512", help="--head-only: student, teacher widths")
    add("--head-dtype", default="float32", choices=["float32", "bfloat16"])
    chunks = "--head-only: time our flows at these MB per chunk instead"
    add("--head-chunk-mb", type=ints, default="", help=chunks)
    rounds = "--head-only: timed rounds, after one untimed round that checks and measures"
    add("--head-rounds", type=train.positive_int, default=3, help=rounds)
    add("--head-dense-max-gb", type=float, default=16.0, help="--head-only: skip dense above this")


def compiled(on):
    """Our chunk formulas compiled (sekd.compiled) or eager, for one flow."""
    return torch.compiler.set_stance("default" if on else "force_eager")


def selection(x, k, chunk):
    valid = x["y"] >= 0
    h, w = x["hs"][None].detach(), x["ws"].detach()
    scores = sekd.chunked_scores(sekd.student_entropy, h, w, valid, chunk_rows=chunk or 0)
    return sekd.topk_positions(scores, k, valid)


def run_compiled(on, fn, x):
    with compiled(on):
        return fn(x)


def our_flows(k, chunk=None, compile_on=True, tag=""):
    """{name: flow}, a flow mapping the inputs to the loss (the selection alone: to its mask); the N
    rows are one sequence, so the loss is their mean."""
    flows = {
        f"sekd streamed Full KD{tag}": lambda x: streamed(x, chunk=chunk),
        f"sekd SE-KD k={k:g} (selection included){tag}": lambda x: streamed(
            x, selection(x, k, chunk), chunk
        ),
        f"of which the selection alone{tag}": lambda x: selection(x, k, chunk),
    }
    return {name: partial(run_compiled, compile_on, fn) for name, fn in flows.items()}


def streamed(x, mask=None, chunk=None):
    cfg = sekd.KDConfig(lam=1.0, chunk_rows=chunk or 0)
    return sekd.streamed_kd_loss(x["hs"][None], x["ws"], x["ht"][None], x["wt"], x["y"], mask, cfg)


def dense(x, mask=None):
    z_student, z_teacher = (x["hs"] @ x["ws"].T)[None], (x["ht"] @ x["wt"].T)[None]
    return sekd.kd_loss(z_student, z_teacher, x["y"], mask, sekd.KDConfig(lam=1.0))


def peer_flows(k):
    """Liger and torchtune, if installed: {name: flow} and {package: version or 'not installed'}."""
    from importlib.metadata import version, PackageNotFoundError

    flows, versions = {}, {}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        versions["liger-kernel"] = version("liger-kernel")
        for on in (False, True):
            jsd = LigerFusedLinearJSDLoss(
                weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=on
            )
            name = f"Liger fused linear JSD beta=0, {'compiled' if on else 'eager'}"
            flows[name] = lambda x, jsd=jsd: jsd(*rows(x))
            flows[name + ", SE-KD's rows"] = lambda x, jsd=jsd: jsd(*rows(x, k))
    except (ImportError, PackageNotFoundError) as e:
        versions["liger-kernel"] = f"not installed ({str(e).splitlines()[0][:60]})"
    try:
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

        versions["torchtune"] = version("torchtune")
        kl = ForwardKLWithChunkedOutputLoss(num_output_chunks=8)

        # it takes the logits in its 8 chunks, the student's all kept for backward
        def tune(hs, ws, ht, wt, y):
            with torch.no_grad():
                zt = [(h @ wt.T)[None] for h in ht.chunk(8)]
            return kl([(h @ ws.T)[None] for h in hs.chunk(8)], zt, y[None])

        flows["torchtune ForwardKLWithChunkedOutputLoss (8 chunks)"] = lambda x: tune(*rows(x))
        flows["torchtune, SE-KD's rows"] = lambda x: tune(*rows(x, k))
    except (ImportError, PackageNotFoundError) as e:
        versions["torchtune"] = f"not installed ({str(e).splitlines()[0][:60]})"
    return flows, versions


def rows(x, k=None):
    """A peer's inputs at SE-KD's rows at budget k (None: all rows): student rows and weight,
    teacher's, targets."""
    sel = slice(None) if k is None else selection(x, k, None)[0]
    return x["hs"][sel], x["ws"], x["ht"][sel], x["wt"], x["y"][0][sel]


def inputs(N, V, ds, dt, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    return {
        "hs": make(N, ds).requires_grad_(),
        "ws": make(V, ds, scale=ds**-0.5 * 2).requires_grad_(),
        "ht": make(N, dt),
        "wt": make(V, dt, scale=dt**-0.5 * 3),
        "y": torch.randint(0, V, (1, N), generator=g).to(device),
    }


def rss_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def one_step(flow, x):
    x["hs"].grad = x["ws"].grad = None
    loss = flow(x)
    if loss.dtype != torch.bool:  # the selection alone returns its mask
        loss.backward()
    grads = (x["hs"].grad, x["ws"].grad)
    x["hs"].grad = x["ws"].grad = None
    return grads


def measure(flow, x, device, compiled_code):
    """Peak extra memory of one step: on CUDA the allocator's peak; on a CPU the live tensor bytes
    (LiveBytes), but for compiled code, which that meter cannot see, the process's peak-RSS growth
    (Linux)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads = one_step(flow, x)
        return grads, {"live_mb": (torch.cuda.max_memory_allocated() - base) / MB}
    if compiled_code and os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        base = rss_bytes("VmRSS")
        grads = one_step(flow, x)
        return grads, {"rss_mb": (rss_bytes("VmHWM") - base) / MB}
    with train.LiveBytes() as meter:
        grads = one_step(flow, x)
    return grads, {"live_mb": meter.peak / MB}


def rel_err(grads, ref):
    errs = [
        (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-30)
        for a, b in zip(grads, ref, strict=False)
        if a is not None and b is not None
    ]
    return max(errs) if errs else None


def bench_shape(V, N, args, device, peers):
    """Every flow at one (V, N): a checked, measured step, then timed rounds in turns. -> rows."""
    ds, dt = args.head_dims
    dtype = getattr(torch, args.head_dtype)
    x = inputs(N, V, ds, dt, dtype, device, args.seed)
    fits = 7 * N * V * 4 / 2**30 <= args.head_dense_max_gb
    flows = {} if args.head_chunk_mb or not fits else {"dense kd_loss": dense}
    if args.head_chunk_mb:
        for mb in args.head_chunk_mb:
            c = max(1, (mb << 20) // (4 * V))
            flows.update(list(our_flows(args.k, c, tag=f" @ {mb} MB ({c} rows)").items())[:2])
    else:
        flows.update(our_flows(args.k))
        flows.update(our_flows(args.k, compile_on=False, tag=", eager"))
        flows.update(peers)
    reference = dense if fits else streamed
    with compiled(False):
        mask = selection(x, args.k, None)
        ref_all = one_step(reference, x)
        ref_sel = one_step(lambda x: reference(x, mask), x)
    small = inputs(min(N, 64), V, ds, dt, dtype, device, args.seed)
    # compiles (ours for every N; a peer's maybe not) before memory is measured
    for flow in flows.values():
        one_step(flow, small)
    results = {}
    for name, flow in flows.items():
        row = dict(flow=name, V=V, N=N, ds=ds, dt=dt, dtype=args.head_dtype, times=[])
        ours = name.startswith(("sekd", "of which"))
        compiled_code = "compiled" in name or ours and "eager" not in name
        try:
            grads, mem = measure(flow, x, device, compiled_code)
            selected = "SE-KD" in name or "selection" in name
            row.update(mem, grad_rel_err=rel_err(grads, ref_sel if selected else ref_all))
        except (RuntimeError, torch.OutOfMemoryError) as e:
            row["error"] = str(e).splitlines()[0][:120]
        results[name] = row
    for _ in range(args.head_rounds):
        for name, flow in flows.items():
            if "error" not in results[name]:
                step_s = experiments.seconds(lambda flow=flow: one_step(flow, x), device)
                results[name]["times"].append(step_s)
    for r in results.values():
        r["ms"] = 1000 * statistics.median(r["times"]) if r["times"] else None
    return list(results.values())


def table(rows):
    base = next((r for r in rows if r["flow"] == "dense kd_loss" and r.get("ms")), rows[0])
    lines = [
        f"V = {rows[0]['V']:,}, N = {rows[0]['N']:,}, d = {rows[0]['ds']}/{rows[0]['dt']}, "
        f"{rows[0]['dtype']}; ratios to '{base['flow']}'",
        f"{'flow':<62} {'live MB':>9} {'RSS MB':>8} {'ms':>9} {'x time':>7} {'grad err':>9}",
        "-" * 109,
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['flow']:<62} {r['error']}")
            continue
        live, rss = (f"{r[key]:,.0f}" if key in r else "-" for key in ("live_mb", "rss_mb"))
        err = f"{r['grad_rel_err']:.1e}" if r.get("grad_rel_err") is not None else "-"
        lines.append(
            f"{r['flow']:<62} {live:>9} {rss:>8} {r['ms']:>9,.0f} "
            f"{r['ms'] / base['ms']:>7.2f} {err:>9}"
        )
    return lines


def plot(rows, path):
    """ms and peak memory against N, one line per flow, one pair of panels per vocabulary."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    vocabs = sorted({r["V"] for r in rows})
    fig, axes = plt.subplots(len(vocabs), 2, figsize=(13, 4.5 * len(vocabs)), squeeze=False)
    for (ax_t, ax_m), V in zip(axes, vocabs, strict=True):
        for i, flow in enumerate(dict.fromkeys(r["flow"] for r in rows if r["V"] == V)):
            # ours solid, eager dashed; the peers dotted
            ours = flow.startswith(("sekd", "of which", "dense"))
            line = ("--" if "eager" in flow else "-") if ours else ":"
            style = dict(color=plt.cm.tab20(i % 20), label=flow, marker="o", linestyle=line)
            pts = sorted(
                (r["N"], r["ms"], r.get("live_mb", r.get("rss_mb")))
                for r in rows
                if r["V"] == V and r["flow"] == flow and r.get("ms")
            )
            if pts:
                n, ms, mb = zip(*pts, strict=True)
                ax_t.plot(n, ms, **style)
                ax_m.plot(n, mb, **style)
        ax_t.set(ylabel="ms per step")
        ax_m.set(ylabel="peak extra MB (live tensors; compiled: RSS growth)")
        for ax in (ax_t, ax_m):
            ax.set(xlabel="N rows", title=f"V = {V:,}", xscale="log", yscale="log")
        ax_t.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def run(args, device):
    """Every flow at every (V, N); prints the tables, writes OUT_DIR/head_benchmark_<device>.json
    and .png."""
    if len(args.head_dims) != 2:
        raise train.UserError(
            "--head-dims takes two widths, the student's and the teacher's, e.g. 256,512"
        )
    peers, peer_versions = ({}, {}) if args.head_chunk_mb else peer_flows(args.k)
    rows = []
    for V in args.head_vocab:
        for N in args.head_tokens:
            shape_rows = bench_shape(V, N, args, device, peers)
            print("\n" + "\n".join(table(shape_rows)), flush=True)
            rows += shape_rows
            gc.collect()
    os.makedirs(args.out_dir, exist_ok=True)
    name = f"head_benchmark_{device.type}" + ("_chunks" if args.head_chunk_mb else "")
    stem = os.path.join(args.out_dir, name)
    meta = dict(torch=torch.__version__, device=str(device), threads=torch.get_num_threads())
    meta |= {**peer_versions, "rounds": args.head_rounds, "k": args.k}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    png = plot(rows, stem + ".png")
    print(f"\n{meta}\nwritten: {stem}.json" + (f", {png}" if png else ""))
    return {"meta": meta, "rows": rows}
