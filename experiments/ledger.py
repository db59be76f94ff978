"""The exact memory ledger behind `python -m experiments.benchmark`: seven ways ("flows") to compute
one step's KD loss, from dense [B, L, V] logits to the streamed selective loss (the paper's memory
table: chunked entropy and the selective LM heads), and a model of every logits-sized tensor each
flow creates and frees.

sekd.memory_account is the closed form one can check by hand; this file is its fine print. We
replay sekd.py's operations tensor by tensor (`LogitLedger`) so that the benchmark can hold each
flow's measured logit peak to its account byte for byte.
"""

import re
from contextlib import nullcontext

import torch

import sekd
import train

FLOWS = {  # name -> what one training step materialises (the rows of the memory benchmark)
    "dense": "Full KD, dense [B, L, V] logits",
    "dense_entropy": "Full KD + chunked entropy (k = 100%)",
    "chunked": "top-k, chunked entropy, no selective head",
    "teacher_head": "top-k, teacher selective head",
    "student_head": "top-k, student selective head",
    "both_heads": "top-k, both selective heads",
    "streamed": "top-k, streamed loss (streamed_kd_loss)",
}


def check_flow(flow):
    if flow not in FLOWS:
        raise ValueError(f"unknown memory flow '{flow}': choose one of {', '.join(FLOWS)}")


def flow_loss(
    student, teacher, idx, targets, flow, k=0.2, T=1.0, chunk_rows=None, phase=nullcontext
):
    """The pure-KL (lambda = 1) loss of one step, computed the way `flow` does it:
    which logits exist as [B, L, V], which only at the N_sel selected rows, which in chunks.
    All flows give the same loss for the same selection. `phase(name)` is entered around
    each phase (teacher forward, student forward, selection, teacher head, loss) so that
    a caller can measure it. Returns (loss, mask); no logits outlive the call."""
    check_flow(flow)
    valid = targets >= 0
    chunk_rows = chunk_rows or 0
    dense_t = flow in ("dense", "dense_entropy", "chunked", "student_head")
    dense_s = flow in ("dense", "dense_entropy", "chunked", "teacher_head")
    with phase("teacher forward"), torch.no_grad():
        teacher_h = teacher.hidden(idx)
        t_logits = teacher.head(teacher_h) if dense_t else None
    with phase("student forward"):
        student_h = student.hidden(idx)
        s_logits = student.head(student_h) if dense_s else None
    with phase("selection"):
        if flow == "dense":
            mask = valid
        else:
            entropy = (sekd.student_entropy, student_h, student.head_weight, valid)
            scores = sekd.chunked_scores(*entropy, chunk_rows=chunk_rows)
            mask = sekd.topk_positions(scores, 1.0 if flow == "dense_entropy" else k, valid)
    if flow in ("teacher_head", "both_heads"):
        with phase("teacher head"), torch.no_grad():
            t_logits = teacher.head(teacher_h[mask])  # [N_sel, V]
    cfg = sekd.KDConfig(T=T, lam=1.0, chunk_rows=chunk_rows)
    with phase("loss"):
        if flow in ("dense", "dense_entropy", "chunked"):
            loss = sekd.kd_loss(s_logits, t_logits, targets, mask, cfg)
        elif flow == "streamed":
            args = (teacher_h, teacher.head_weight, targets, mask, cfg)
            loss = sekd.streamed_kd_loss(student_h, student.head_weight, *args)
        else:
            t_rows = t_logits if flow != "student_head" else t_logits[mask]
            del t_logits  # the teacher's [B, L, V], once gathered, is not needed
            s_rows = s_logits[mask] if dense_s else student.head(student_h[mask])
            del s_logits
            kl = T * T * sekd.kl_per_position(t_rows, s_rows, T)
            loss = (sekd.per_sequence_weights(mask, kl.dtype)[mask] * kl).sum()
    return loss, mask


def logits_sized(vocab_size):
    """A `LiveBytes(match=...)` predicate: tensors whose last dimension is the vocabulary."""
    return lambda t: t.dim() >= 1 and t.shape[-1] == vocab_size


class LogitLedger:
    """The analytic model of one step's logits-sized tensors (last dim V): each one the code
    creates, in program order, with its dtype, and when it is freed; `peaks[phase]` is the
    most bytes of them alive at once during that phase."""

    def __init__(self, V, half, T=1.0):
        self.V, self.half, self.T = V, half, T
        self.lo = 2 if half else 4  # head outputs: bf16 or float32
        self.live, self.phase, self.peaks, self.tensors = 0, None, {}, []

    def enter(self, phase):
        self.phase = phase
        self.peaks[phase] = self.live

    def new(self, what, rows, nbytes_per_el):
        dtype = {2: "bfloat16", 4: "float32"}[nbytes_per_el]
        nbytes = rows * self.V * nbytes_per_el
        t = dict(phase=self.phase, what=what, shape=[rows, self.V], dtype=dtype, bytes=nbytes)
        self.tensors.append(t)
        self.live += t["bytes"]
        self.peaks[self.phase] = max(self.peaks[self.phase], self.live)
        return t

    def free(self, *ts):
        self.live -= sum(t["bytes"] for t in ts if t is not None)

    def new_then_free(self, what, rows, nbytes_per_el, *old):
        """A new tensor, made while `old` are still alive; then `old` are freed."""
        t = self.new(what, rows, nbytes_per_el)
        self.free(*old)
        return t

    # --- the operations of sekd.py, as the tensors they create

    def head(self, rows, d, who, grad, chunked=False):
        """h @ W.T; under autocast W.T is first copied to bf16 ([D, V]), and the student's copy
        is saved for backward. A chunk loop (`chunked`) multiplies by `chunk_weight`'s [V, D] copy,
        made once per pass, not logits-sized: `memory_account` counts it."""
        copy = self.half and not chunked
        w = self.new(f"{who} head weight, bf16 copy [D={d}, V]", d, 2) if copy else None
        z = self.new(f"{who} logits", rows, self.lo)
        if not grad:
            self.free(w)
        return z, w

    def wide(self, rows, what):
        return self.new(f"{what}, float32 copy", rows, 4) if self.half else None

    def log_softmax(self, rows, what, wide=True, T=None, divide=False):
        """F.log_softmax(_wide(z) / T): the copy and the division (a chunk formula's: none at T = 1;
        `divide`: the dense reference's, always) are freed once it exists."""
        w = self.wide(rows, what) if wide else None
        T = self.T if T is None else T
        d = self.new(f"{what} / T", rows, 4) if divide or T != 1 else None
        self.free(w)
        return self.new_then_free(f"{what} log-softmax", rows, 4, d)

    def entropy(self, rows, z):
        """token_entropy of logits z at T = 1 (selection scores are never tempered), without
        gradient: log-softmax, its exp (then q log q in place); all freed after."""
        logq = self.log_softmax(rows, "student (selection)", T=1.0)
        q = self.new("student (selection) softmax, then q log q", rows, 4)
        self.free(q, logq, z)

    def kl(self, rows):
        """sekd.kl_per_position(zt, zs): keeps log q and p for backward, returns them."""
        logp = self.log_softmax(rows, "teacher", divide=True)
        logq = self.log_softmax(rows, "student", divide=True)
        p = self.new("teacher softmax p", rows, 4)
        diff = self.new("log p - log q", rows, 4)
        prod = self.new("p * (log p - log q)", rows, 4)
        self.free(prod, diff, logp)
        return logq, p

    def kl_backward(self, rows, logq, p):
        """The logit gradient of the KL, T (q - p), built in four steps."""
        g = self.new_then_free("grad of (log p - log q)", rows, 4, p)
        g = self.new_then_free("grad of log q", rows, 4, g)
        g = self.new_then_free("grad of student logits / T", rows, 4, g, logq)
        g = self.new_then_free("student logit gradient", rows, 4, g)
        if self.half:
            g = self.new_then_free("student logit gradient, bf16", rows, 2, g)
        return g


def chunk_sizes(n, chunk_rows):
    return [min(chunk_rows, n - i) for i in range(0, n, chunk_rows)]


def logit_ledger(
    flow, BL, n_sel, V, ds, dt, chunk_rows, half=False, select=True, lam=1.0, sel_chunks=None, T=1.0
):
    """Run the analytic model of `flow_loss` + backward for BL valid positions, n_sel selected, a
    student and a teacher of widths ds and dt: which logits-sized tensors exist in which phase, and
    the peak bytes per phase.
    select=False: no entropy pass (what `distill_loss` does for Full KD).
    lam < 1 (flows dense, chunked, streamed: those `distill_loss` runs): the CE term at every
    row is added, as `kd_loss` and the streamed loss compute it; lam = 0 is plain CE, no teacher.
    `sel_chunks`: the streamed lam < 1 pass's selected rows per chunk of valid rows (default: the
    n_sel selected rows spread evenly, as SE-KD's per-sequence budget roughly does)."""
    check_flow(flow)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"CE mixing weight lambda must be in [0, 1], got {lam}")
    if lam < 1 and flow not in ("dense", "chunked", "streamed"):
        raise ValueError(
            f"the lambda < 1 account covers the dense, chunked and streamed flows, not '{flow}'"
        )
    lg = LogitLedger(V, half, T)
    dense_t = lam > 0 and flow in ("dense", "dense_entropy", "chunked", "student_head")
    dense_s = flow in ("dense", "dense_entropy", "chunked", "teacher_head")
    # kd_loss: KL at every row, then masked
    rows = BL if flow in ("dense", "dense_entropy", "chunked") else n_sel
    zt = zs = ws = None
    lg.enter("teacher forward")
    if dense_t:
        zt, _ = lg.head(BL, dt, "teacher", grad=False)
    lg.enter("student forward")
    if dense_s:
        zs, ws = lg.head(BL, ds, "student", grad=True)
    lg.enter("selection")
    if flow != "dense" and select:
        for c in chunk_sizes(BL, chunk_rows):
            z, _ = lg.head(c, ds, "student (selection)", grad=False, chunked=True)
            lg.entropy(c, z)
    if flow in ("teacher_head", "both_heads"):
        lg.enter("teacher head")
        zt, _ = lg.head(n_sel, dt, "teacher", grad=False)
    lg.enter("loss")
    if flow == "streamed":  # lam = 1 walks the selected rows, each a KL row; lam < 1 every row
        sizes = chunk_sizes(n_sel if lam == 1 else BL, chunk_rows)
        if lam == 1:
            sel_chunks = sizes
        elif lam == 0:  # plain CE: no KL rows
            sel_chunks = [0] * len(sizes)
        elif sel_chunks is None:  # the selected rows spread evenly over the chunks
            sel_chunks = [
                (i + c) * n_sel // BL - i * n_sel // BL
                for i, c in zip(range(0, BL, chunk_rows), sizes, strict=True)
            ]
        _streamed_ledger(lg, sizes, sel_chunks, ds, dt, ce=lam < 1)
        lg.enter("backward")
        lg.enter("optimizer step")
        return lg
    if flow in ("teacher_head", "student_head", "both_heads"):
        if flow == "student_head":
            zt = lg.new_then_free("teacher logits, gathered rows", n_sel, lg.lo, zt)
        if dense_s:
            zs = lg.new_then_free("student logits, gathered rows", n_sel, lg.lo, zs)
        else:
            zs, ws = lg.head(n_sel, ds, "student", grad=True)
    logq = p = ce = None
    if lam > 0:
        logq, p = lg.kl(rows)
    if lam < 1:  # F.cross_entropy over every row (no / T): its log-softmax is saved for backward
        w = lg.wide(BL, "student (CE)")
        ce = lg.new_then_free("student (CE) log-softmax", BL, 4, w)
    lg.free(zt, zs)  # the function returns: only what backward saved stays
    lg.enter("backward")
    g = None
    if lam < 1:  # autograd runs the CE branch first: the NLL's gradient, then the log-softmax's
        g = lg.new("grad of the CE's NLL", BL, 4)
        g = lg.new_then_free("grad of the CE's log-softmax", BL, 4, g, ce)
        if half:  # copied back to the bf16 logits' dtype
            g = lg.new_then_free("CE logit gradient, bf16", BL, 2, g)
    if lam > 0:
        g_kl = lg.kl_backward(rows, logq, p)
        if g is not None:  # the two branches' logit gradients are summed
            g_kl = lg.new_then_free("student logit gradient, CE + KL", BL, lg.lo, g, g_kl)
        g = g_kl
    if flow == "teacher_head":  # the gather's backward scatters the rows' gradient into [B, L, V]
        zeros = lg.new("zeros [B, L, V] for the gathered rows' gradient", BL, lg.lo)
        g = lg.new_then_free("student logit gradient, scattered to [B, L, V]", BL, lg.lo, zeros, g)
    lg.free(g, ws)
    if half:  # the gradient of autocast's bf16 weight copy, back to float32
        lg.free(lg.new("grad of the student head weight copy, float32 [D, V]", ds, 4))
    lg.enter("optimizer step")
    return lg


def _chunk_logits(lg, c, d, who):
    """One chunk's logits in the streamed pass: _wide(h @ W.T), float32 (under autocast the bf16
    product is a temporary)."""
    z, _ = lg.head(c, d, f"{who} chunk", grad=False, chunked=True)
    if lg.half:
        z = lg.new_then_free(f"{who} chunk logits, float32", c, 4, z)
    return z


def _streamed_ledger(lg, sizes, sel_chunks, ds, dt, ce):
    """The streamed loss, per chunk of c walked rows of which s are KL rows: the student logits;
    first, at the s rows (with the CE term, `ce`, from their copy), `kl_rows`'s tensors: the
    student's log-softmax, the teacher's logits and theirs, and p (the KL is summed in log p's
    storage, so it makes no [c, V] tensor), the gradient T (q - p) made in log q's storage, the one
    of them that survives; with `ce`, then the CE log-softmax of all c rows (turned into the
    gradient in place), and the KL gradient added into it, in place. The chunk's gradient goes
    through the head's two matmuls (under autocast as a bf16 copy), then dies. Each chunk's tensors
    are freed before the next starts: the peak (float32) is one chunk's 4 tensors at lam = 1,
    max(c + 4 s, 2 c + s) rows of V with `ce`."""
    for c, s in zip(sizes, sel_chunks, strict=True):
        zs, g = _chunk_logits(lg, c, ds, "student"), None
        if s:  # the KL rows first: only their gradient is alive when the CE's tensors are made
            zs_s = lg.new("student chunk, selected rows", s, 4) if ce else None
            g = lg.log_softmax(s, "student chunk", wide=False, divide=True)
            zt = lg.new_then_free("teacher chunk / T", s, 4, _chunk_logits(lg, s, dt, "teacher"))
            logp = lg.new_then_free("teacher chunk log-softmax", s, 4, zt)
            p = lg.new("teacher chunk softmax p", s, 4)
            lg.free(logp, p, zs_s)
        if ce:
            g = lg.new_then_free("student chunk CE log-softmax, then gradient", c, 4, g)
        lg.free(zs)  # rows_loss returns: only the chunk's gradient stays
        if lg.half:
            lg.free(lg.new("chunk logit gradient, bf16", c, 2))
        lg.free(g)


def account_flow(method, flow):
    """The flow whose tensors `sekd.distill_loss` makes for `method` (ce, full_kd, sekd, random_pos)
    with KDConfig.flow `flow`, and whether it runs the entropy pass (RandomPos selects without
    logits)."""
    if method in ("full_kd", "ce"):
        return ("dense" if flow == "dense" else "streamed"), False
    return ("chunked" if flow == "dense" else "streamed"), method == "sekd"


def ledger_account(
    student,
    teacher,
    B,
    L,
    flow,
    k=0.2,
    chunk_rows=None,
    half=False,
    on_cuda=False,
    select=True,
    lam=1.0,
    T=1.0,
):
    """The analytic memory account of one training step of `flow`: bytes of parameters, gradients
    and AdamW state per model, activation estimates, every logits-sized tensor the flow creates
    (from `logit_ledger`, with the CE term when lam < 1), and the expected peak per phase.
    lam = 0: plain CE, no teacher in memory. Assumes every position is valid (the benchmark's
    random tokens)."""
    V, ds, dt = student.config.vocab_size, student.config.n_embd, teacher.config.n_embd
    chunk = chunk_rows or sekd.default_chunk_rows(V, ds, "cuda" if on_cuda else "cpu")
    per_sequence = sekd.budget_counts(1.0 if flow == "dense_entropy" else k, torch.tensor([L]))
    n_sel = B * L if flow == "dense" else int(per_sequence.item()) * B
    lg = logit_ledger(flow, B * L, n_sel, V, ds, dt, chunk, half, select, lam, T=T)
    runs = lam > 0  # plain CE (lam = 0) needs no teacher at all
    s_params, t_params = train.state_bytes(student), train.state_bytes(teacher) * runs
    trainable = [p for p in student.parameters() if p.requires_grad]
    grads = train.state_bytes(*trainable)
    # AdamW keeps exp_avg and exp_avg_sq (each the size of a parameter, in its dtype) and a
    # float32 `step` per parameter tensor; on CUDA the step counters stay on the CPU
    adamw = 2 * grads + 4 * len(trainable) * (not on_cuda)
    s_act = sekd.activation_bytes(student.config, B, L, half, grad=True)
    t_act = sekd.activation_bytes(teacher.config, B, L, half, grad=False) * runs
    t_hidden = B * L * dt * 4 * runs  # ln_f output, float32 even under autocast
    resident = s_params + t_params + adamw
    head_grad = V * ds * 4 if flow == "streamed" else 0  # its float32 dL/dW, kept for backward
    # under autocast, `chunk_weight`'s bf16 [V, D] head copies, alive through their chunked pass
    copies = {
        "selection": V * ds * 2 * half * select * (flow != "dense"),
        "loss": V * (ds + dt * runs) * 2 * half * (flow == "streamed"),
    }
    forward = resident + t_hidden + s_act  # the teacher's hidden states alive
    phases = {
        "teacher forward": resident + t_act + lg.peaks["teacher forward"],
        "student forward": forward + lg.peaks["student forward"],
        "selection": forward + copies["selection"] + lg.peaks["selection"],
        "loss": forward + head_grad + copies["loss"] + lg.peaks["loss"],
        "backward": resident + s_act + grads + head_grad + lg.peaks["backward"],
        # foreach AdamW: one parameter-sized temporary
        "optimizer step": resident + grads + s_params,
    }
    if "teacher head" in lg.peaks:
        phases["teacher head"] = forward + lg.peaks["teacher head"]
    # the teacher's own peak: its forward, or its hidden states and its logits
    t_logits = [x["bytes"] for x in lg.tensors if re.match("teacher.*logits", x["what"])]
    t_peak = max(t_act + lg.peaks["teacher forward"], t_hidden + max(t_logits, default=0))
    total = max(phases.values())
    step = dict(flow=flow, B=B, L=L, V=V, n_sel=n_sel, chunk_rows=chunk, lam=lam, T=T)
    return {
        **step,
        "dtype": "bfloat16" if half else "float32",
        "student": dict(params=s_params, grads=grads, adamw=adamw, activations=s_act),
        "teacher": dict(params=t_params, activations=t_act),
        "logits": lg.tensors,
        "logit_peaks": lg.peaks,
        "logit_peak": max(lg.peaks.values()),
        "head_copies": copies,
        "phases": phases,
        "total": total,
        "teacher_total": t_params + t_peak,
        "student_total": total - t_params - t_hidden,
    }
