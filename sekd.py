"""sekd: selective knowledge distillation for GPT language models, in one file.

"Rethinking Selective Knowledge Distillation" (Tavor et al., arXiv 2602.01395), in its order: 1 the
model, 2 dense KD (the reference), 3 SE-KD (a reader who stops here has a whole, working SE-KD),
4 the position axis, 5 AT-KD and on-policy, 6 RS-KD and the sample axis, 7 evaluation, 8 memory.
`targets` [B, L] are -1 at padding; a loss is averaged per sequence, then over sequences (Eq. 3).
"""

import math
from dataclasses import dataclass, replace
from functools import cache, partial, wraps

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# ============================================================================ 1. the model


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    dropout: float = 0.0
    gelu: str = "none"  # nn.GELU's approximate: "tanh" for GPT-2's own weights

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if type(value := getattr(self, name)) is not int or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd must be divisible by n_head, got {self.n_embd}, {self.n_head}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.gelu not in ("none", "tanh"):
            raise ValueError(f"gelu must be none or tanh, got {self.gelu!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = nn.Linear(c.n_embd, c.n_embd)
        self.dropout = c.dropout

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, L, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.attn = CausalSelfAttention(c)
        self.mlp = nn.Sequential(
            nn.Linear(c.n_embd, 4 * c.n_embd),
            nn.GELU(approximate=c.gelu),
            nn.Linear(4 * c.n_embd, c.n_embd),
            nn.Dropout(c.dropout),
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """nanoGPT, LM head tied to the embedding; `head(h)` projects any rows of `hidden(idx)`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        for m in self.modules():  # GPT-2's init
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():  # and its scaled init of residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))

    @property
    def head_weight(self):
        return self.wte.weight  # [V, D]

    def hidden(self, idx):
        L, size = idx.shape[1], self.config.block_size
        if L > size:
            raise ValueError(f"sequence length {L} is longer than the block size {size}")
        x = self.wte(idx) + self.wpe(torch.arange(L, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def head(self, h):
        return h @ self.head_weight.T

    def forward(self, idx):
        return self.head(self.hidden(idx))

    @torch.no_grad()
    def generate(self, idx, n_new, temperature=1.0, top_k=0, generator=None, ban=None):
        """n_new sampled tokens after idx [B, L] (temperature 0: greedy), never the id `ban` (a
        compact vocabulary's rare-token id has no text). -> (idx, each step's H(q_t) [B, n_new])."""
        if type(n_new) is not int or n_new < 1:
            raise ValueError(f"n_new must be an integer >= 1, got {n_new!r}")
        if temperature < 0 or type(top_k) is not int or top_k < 0:
            raise ValueError(
                f"temperature must be >= 0 and top_k an integer >= 0, got {temperature}, {top_k}"
            )
        entropy = []
        for _ in range(n_new):
            logits = _wide(self.head(self.hidden(idx[:, -self.config.block_size :])[:, -1]))
            entropy.append(token_entropy(logits))
            if ban is not None:
                logits[:, ban] = -math.inf
            if 0 < top_k < logits.shape[-1]:  # the k likeliest (greedy: the same argmax)
                logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], -math.inf)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)
            idx = torch.cat([idx, nxt], 1)
        return idx, torch.stack(entropy, 1)


# ======================================================================= 2. dense KD, the reference


@dataclass
class KDConfig:
    """A method and its settings, checked here; defaults: the default job's (paper: lam = 1)."""

    method: str = "sekd"  # ce, full_kd, sekd, random_pos, at_kd
    k: float = 0.2  # the share of each sequence's positions that SE-KD distils
    T: float = 1.0  # the KD temperature
    lam: float = 0.5  # the KD weight; 1 - lam: the CE's (0 for method 'ce')
    ce_at: str = "all"  # the CE at every position, or at the selected ones (paper Eq. 3)
    chunk_rows: int = 0  # rows per [rows, V] chunk; 0: default_chunk_rows
    flow: str = "streamed"  # or 'dense': [B, L, V] logits, as the paper's code
    metric: str = "student_entropy"  # a name in METRICS
    policy: str = "topk"  # a name in POLICIES
    gls_queue: int = 30_000  # GLS: how many recent scores set its threshold
    curriculum_steps: int = 4_000  # curriculum: the steps its window takes to reach the top-k
    classes: str = "full"  # or 'rskd': U classes drawn from the teacher (paper §5)
    U: int = 64  # RS-KD's draws per position
    divergence: str = "forward"  # KL(p || q), or 'reverse': KL(q || p)

    def __post_init__(self):
        if self.method == "ce":
            self.lam = 0.0  # plain cross-entropy: no teacher
        names = {"method": ("ce", "full_kd", "sekd", "random_pos", "at_kd"), "metric": METRICS}
        names |= {"policy": POLICIES, "ce_at": ("selected", "all"), "flow": ("streamed", "dense")}
        names |= {"classes": ("full", "rskd"), "divergence": ("forward", "reverse")}
        for name, allowed in names.items():
            if (value := getattr(self, name)) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for name, least in {"gls_queue": 1, "curriculum_steps": 1, "U": 1, "chunk_rows": 0}.items():
            if type(value := getattr(self, name)) is not int or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if not 0 < self.k <= 1:
            raise ValueError(f"k must be in (0, 1] (e.g. 0.2 for 20%), got {self.k!r}")
        if not self.T > 0:
            raise ValueError(f"T must be > 0, got {self.T!r}")
        if not 0 <= self.lam <= 1:
            raise ValueError(f"lam must be in [0, 1], got {self.lam!r}")
        if self.classes == "rskd" and (self.method == "ce" or self.flow != "streamed"):
            raise ValueError("classes 'rskd' needs a KD method (not ce) and flow 'streamed'")
        if self.divergence == "reverse" and (self.method not in FULL_KL or self.classes != "full"):
            raise ValueError(
                "divergence 'reverse' works with full_kd, sekd or random_pos and classes 'full': "
                "the reverse KL needs the teacher's full distribution"
            )

    @property
    def is_sekd(self):  # SE-KD as the paper runs it, which `sekd_loss` makes
        plain = self.metric == "student_entropy" and self.policy == "topk"
        full = self.flow == "streamed" and self.classes == "full" and self.divergence == "forward"
        return self.method == "sekd" and plain and full


def _wide_dtype(x):  # we do the softmax maths of half-precision logits in float32
    return torch.promote_types(x.dtype, torch.float32)


def _wide(x):
    return x.to(_wide_dtype(x))


def token_entropy(logits):  # H(softmax(logits)) in nats: SE-KD's score
    logp = F.log_softmax(_wide(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_per_position(teacher_logits, student_logits, T=1.0):  # KL(p^T || q^T), p the teacher
    logp = F.log_softmax(_wide(teacher_logits) / T, dim=-1)
    logq = F.log_softmax(_wide(student_logits) / T, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def per_sequence_weights(m, dtype=torch.float32, per_seq=None):
    """Eq. 3's row weights: L = mean over the sequences with a selected position of L_i = sum_t m_t
    l(t) / sum_t m_t, m bool or counts [B, L]; `per_seq` [B] replaces the sums sum_t m_t."""
    m = m.to(dtype)
    n_seq = (m.sum(1) > 0).sum().clamp_min(1)
    per_seq = m.sum(1, keepdim=True) if per_seq is None else per_seq.to(dtype).view(-1, 1)
    return m / per_seq.clamp_min(1e-30) / n_seq


def kd_loss(student_logits, teacher_logits, targets, mask, cfg, row_weights=None):
    """The reference every fast path equals, on logits [B, L, V] (Eq. 3): lam T^2 KL(p^T || q^T)
    at `mask` (None: all) + (1 - lam) CE there (ce_at='all': at all); row_weights: pos-RS-KD's."""
    T, lam, valid = cfg.T, cfg.lam, targets >= 0
    mask = valid if mask is None else mask & valid
    dtype = _wide_dtype(student_logits)
    w = per_sequence_weights(mask, dtype) if row_weights is None else row_weights.to(dtype) * valid
    loss = student_logits.new_zeros((), dtype=dtype)
    if lam > 0:
        p, q = teacher_logits, student_logits
        kl = kl_per_position(p, q, T) if cfg.divergence == "forward" else kl_per_position(q, p, T)
        loss = loss + lam * (w * T * T * kl).sum()
    if lam < 1:
        z, y = _wide(student_logits).flatten(0, 1), targets.clamp_min(0).flatten()
        ce = F.cross_entropy(z, y, reduction="none").view_as(targets)
        w_ce = w if cfg.ce_at == "selected" else per_sequence_weights(valid, dtype)
        loss = loss + (1 - lam) * (w_ce * ce).sum()
    return loss


# ============================================================================ 3. SE-KD
# Student entropy in chunks, the top k% of each sequence, the streamed loss at those rows: the step.

CHUNK_MB = {"cpu": 16, "cuda": 256}  # MB of float32 in a [rows, V] chunk; on a CPU per 64 of D


def default_chunk_rows(vocab_size, width=64, device="cpu"):
    # Few rows a chunk rewrite the whole [V, D] head gradient often; on a CPU a big chunk costs
    # memory traffic, which pays at a wide D (results/head_benchmark_cpu.md).
    kind = torch.device(device).type
    mb = CHUNK_MB.get(kind, 16) * (max(1, width // 64) if kind == "cpu" else 1)
    return max(1, (mb << 20) // (4 * vocab_size))


def compiled(fn):  # at its first call (importing the compiler takes seconds), for any row count
    # a chunk formula's passes over [rows, V] fuse: entropy 3x, KL 1.8x faster on a CPU
    fast = cache(lambda: torch.compile(fn, dynamic=True))
    return wraps(fn)(lambda *args: fast()(*args))


def chunk_weight(w):
    # under autocast, one low-precision copy per chunked pass, not one per chunk's `h @ w.T`
    on = torch.is_autocast_enabled(w.device.type)
    return w.to(torch.get_autocast_dtype(w.device.type)) if on else w


@torch.no_grad()
def chunked_scores(
    metric, student_h, student_w, valid, teacher_h=None, teacher_w=None, targets=None, chunk_rows=0
):
    """metric(zs, zt, y) at every valid row, a chunk of rows at a time -> [B, L] (or [B, L, C])."""
    use_teacher = getattr(metric, "needs_teacher", True)
    if use_teacher and teacher_h is None:
        raise ValueError(f"metric {metric.__name__} needs the teacher: pass teacher_h, teacher_w")
    hs, ht = student_h[valid], teacher_h[valid] if use_teacher else None
    y = targets[valid] if targets is not None else None
    dtype = _wide_dtype(hs)
    chunk = chunk_rows or default_chunk_rows(*student_w.shape, student_w.device)
    project = getattr(metric, "needs_logits", True)  # RandomPos draws without logits
    ws, wt = chunk_weight(student_w), chunk_weight(teacher_w) if use_teacher else None
    parts = []
    for i in range(0, max(1, len(hs)), chunk):  # no rows: one empty chunk, for the columns
        r = slice(i, i + chunk)
        zs = (hs[r] @ ws.T).to(dtype) if project else hs[r]
        zt = (ht[r] @ wt.T).to(dtype) if use_teacher else None
        parts.append(metric(zs, zt, y[r] if y is not None else None))
    rows = torch.cat(parts)
    scores = rows.new_zeros(valid.shape + rows.shape[1:], dtype=dtype)
    scores[valid] = rows.to(dtype)
    return scores


@compiled
def student_entropy(zs, zt, y):
    """H(q_t), SE-KD's metric: student logits zs [R, V] -> [R], as every metric of section 4."""
    logq = F.log_softmax(zs, dim=-1)
    return -logq.exp().mul_(logq).sum(-1)  # p log p in p's storage: no grad here


student_entropy.needs_teacher = False  # so the teacher's LM head stays selective


def budget_counts(k, n):
    """ceil(k n) of n positions, exact for a decimal k (0.1 * 30 is 3, not 4): a policy's budget."""
    return torch.ceil(torch.round(k * n.to(torch.float64), decimals=6)).long()


def topk_positions(scores, k, valid=None, state=None):
    """SE-KD's policy: the ceil(k n) highest-scored of a sequence's n valid positions."""
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    scores = scores.masked_fill(~valid, float("-inf"))  # padding ranks last, ties the earlier first
    rank = scores.sort(dim=1, descending=True, stable=True).indices.argsort(1)
    return rank < budget_counts(k, valid.sum(1))[:, None]


# ---------------------------------------------------------------------------- the streamed loss
# The selective LM head: logits only at the rows the loss needs, a chunk at a time, in closed form.


@compiled
def kl_rows(teacher_h, teacher_w, T, z, i):
    """T^2 KL(p^T || q^T) at walked rows i (student logits z), and its gradient T (q^T - p^T)."""
    logq = F.log_softmax(z / T, dim=-1)
    logp = F.log_softmax((teacher_h[i] @ teacher_w.T).to(z.dtype) / T, dim=-1)
    p = logp.exp()
    loss = T * T * logp.sub_(logq).mul_(p).sum(-1)  # in log p's storage (not needed again)
    return loss, logq.exp_().sub_(p).mul_(T)  # in log q's storage: no new [rows, V] tensor


class StreamedHeadLoss(torch.autograd.Function):
    """Sum over rows h [N, D] of ce_w CE + kd_w kd_rows(z, i) at rows `sel`, z = h W^T a chunk at a
    time. The chunks' gradients add up, so forward makes them; backward only scales them (once)."""

    @staticmethod
    def forward(ctx, h, weight, chunk_rows, kd_rows, kd_w, ce_w, y, sel):
        dtype, w = _wide_dtype(h), chunk_weight(weight)  # the logits' dtype, the chunks' weight
        loss = torch.zeros((), dtype=dtype, device=h.device)
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight, dtype=_wide_dtype(weight))
        for start in range(0, h.shape[0], chunk_rows):
            r = slice(start, start + chunk_rows)
            z = (h[r] @ w.T).to(dtype)
            i = torch.arange(start, start + len(z), device=z.device)
            s = torch.ones_like(i, dtype=torch.bool) if sel is None else sel[r]
            has_kd = kd_rows is not None and s.any()
            kd = kd_rows(z if sel is None else z[s], i[s]) if has_kd else None
            if ce_w is None:  # lam = 1: the KD alone
                row_loss, grad_z = kd_w[r] * kd[0], kd[1].mul_(kd_w[r][:, None])
            else:  # the CE per row, and in log q's storage its gradient q - onehot(y)
                grad_z = F.log_softmax(z, dim=-1)
                row_loss = -grad_z.gather(1, y[r][:, None]).squeeze(1) * ce_w[r]
                grad_z.exp_()[torch.arange(len(z), device=z.device), y[r]] -= 1
                grad_z.mul_(ce_w[r][:, None])
                if kd is not None:
                    kd_ws = kd_w[r][s]
                    row_loss[s] += kd_ws * kd[0]
                    grad_z.index_put_((s,), kd[1].mul_(kd_ws[:, None]), accumulate=True)
            loss += row_loss.sum()
            del z, kd  # before the gradient's matmuls: one chunk's [rows, V] tensors at a time
            grad_z = grad_z.to(w.dtype)  # under autocast one bf16 copy serves both matmuls
            grad_h[r] = (grad_z @ w).to(h.dtype)
            grad_w += grad_z.T @ h[r].to(w.dtype)
            del grad_z  # before the next chunk's logits exist
        ctx.grads = (grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("the streamed loss's backward runs once: no retain_graph")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out), *[None] * 6


def walked_rows(valid, mask, cfg):  # the rows the streamed loss makes logits for
    return mask if cfg.lam == 1 or cfg.ce_at == "selected" else valid


def streamed_kd_loss(student_h, student_w, teacher_h, teacher_w, targets, mask, cfg, **kd):
    """`kd_loss` of h @ w.T without a [B, L, V] tensor. `kd` may hold row_weights (pos-RS-KD,
    AT-KD) and kd_rows(z, i), the KD term in place of the teacher's KL (RS-KD, AT-KD)."""
    valid, lam, row_weights = targets >= 0, cfg.lam, kd.get("row_weights")
    mask = valid if mask is None else mask & valid
    dtype = _wide_dtype(student_h)
    if row_weights is None:
        kd_w = per_sequence_weights(mask, dtype)
    else:  # the rows they weigh are the mask
        mask, kd_w = (row_weights != 0) & valid, row_weights.to(dtype)
    ce_w = kd_w if cfg.ce_at == "selected" else per_sequence_weights(valid, dtype)
    rows = walked_rows(valid, mask, cfg)  # lam = 1 or Eq. 3's CE: the selected only, the memory win
    kd_rows = kd.get("kd_rows")
    if kd_rows is None and lam > 0:  # the teacher's KL, forward (SE-KD's) or reverse
        kl = kl_rows if cfg.divergence == "forward" else reverse_kl_rows
        kd_rows = partial(kl, teacher_h[rows], chunk_weight(teacher_w), cfg.T)
    chunk = cfg.chunk_rows or default_chunk_rows(*student_w.shape, student_w.device)
    ce_w = None if lam == 1 else (1 - lam) * ce_w[rows]
    sel = None if rows is mask else mask[rows]
    args = (chunk, kd_rows, lam * kd_w[rows], ce_w, targets[rows], sel)
    return StreamedHeadLoss.apply(student_h[rows], student_w, *args)


def sekd_loss(student, teacher, idx, targets, cfg):
    """One SE-KD step (paper §3): the KD loss at each sequence's top k% positions by student
    entropy, LM heads at those rows only. -> (loss, positions distilled)."""
    valid = targets >= 0
    student_h, student_w = student.hidden(idx), student.head_weight
    with torch.no_grad():
        teacher_h, teacher_w = teacher.hidden(idx), teacher.head_weight
    scores = chunked_scores(student_entropy, student_h, student_w, valid, chunk_rows=cfg.chunk_rows)
    mask = topk_positions(scores, cfg.k, valid)
    loss = streamed_kd_loss(student_h, student_w, teacher_h, teacher_w, targets, mask, cfg)
    return loss, int(mask.sum())


# ============================================================================ 4. the position axis
# A metric(zs, zt, y) -> [R] scores a chunk of rows from the student's logits zs [R, V], the
# teacher's zt (None where `fn.needs_teacher = False`) and the targets y; `METRICS["name"] = fn`.


def _ce_ratio(zs, zt, y):  # a teacher CE of exactly 0 is read as the tiniest float
    teacher = F.cross_entropy(zt, y, reduction="none")
    return F.cross_entropy(zs, y, reduction="none") / teacher.clamp_min(torch.finfo(zt.dtype).tiny)


METRICS = {  # the paper's position-axis metrics (its Table 1)
    "student_entropy": student_entropy,  # H(q_t): SE-KD's
    "teacher_entropy": lambda zs, zt, y: student_entropy(zt, zs, y),  # H(p_t)
    "student_ce": lambda zs, zt, y: F.cross_entropy(zs, y, reduction="none"),  # -log q_t(y_t)
    "teacher_ce": lambda zs, zt, y: F.cross_entropy(zt, y, reduction="none"),  # -log p_t(y_t)
    "kl": lambda zs, zt, y: kl_per_position(zt, zs),  # KL(p_t || q_t)
    "reverse_kl": lambda zs, zt, y: kl_per_position(zs, zt),  # KL(q_t || p_t)
    "kl_plus_student_entropy": lambda zs, zt, y: kl_per_position(zt, zs) + token_entropy(zs),
    "ce_ratio": _ce_ratio,  # CE(y_t, q_t) / CE(y_t, p_t)
    "ce_ratio_plus_student_entropy": lambda zs, zt, y: _ce_ratio(zs, zt, y) + token_entropy(zs),
    # noise: with top-k, the RandomPos baseline; it gets rows, not logits (no LM-head pass)
    "random": lambda zs, zt, y: torch.rand(len(zs), dtype=_wide_dtype(zs), device=zs.device),
}
METRICS["student_ce"].needs_teacher = METRICS["random"].needs_teacher = False
METRICS["random"].needs_logits = False


@dataclass
class PositionState:
    """GLS's queue of recent scores, and the training step that curriculum's window follows."""

    gls_queue: int
    curriculum_steps: int
    queue: torch.Tensor = None
    step: int = 0


def gls_positions(scores, k, valid, state):
    """GLS: u(t) >= the (1 - k) quantile of the recent scores *before* this batch joins them."""
    queue = scores.new_zeros(0) if state.queue is None else state.queue
    if queue.numel() == 0:
        m = topk_positions(scores, k, valid)
    else:
        m = (scores >= torch.quantile(queue.double(), 1.0 - k).item()) & valid
    state.queue = torch.cat([queue.to(scores), scores[valid].detach()])[-state.gls_queue :]
    return m


def curriculum_positions(scores, k, valid, state):
    """ceil(k n) positions: a window of ranks by u(t), sliding from the lowest to the top-k."""
    scores = scores.masked_fill(~valid, float("-inf"))  # ranked as in topk_positions
    rank = scores.sort(dim=1, descending=True, stable=True).indices.argsort(1)
    n = valid.sum(1)
    K = budget_counts(k, n)
    progress = min(1.0, state.step / state.curriculum_steps)
    first = torch.round((1.0 - progress) * (n - K).double()).long()[:, None]  # the window's start
    return (rank >= first) & (rank < first + K[:, None]) & valid


def pos_rs_kd_positions(scores, k, valid, state=None, star=False):
    """pos-RS-KD: K = ceil(k n) draws per sequence with probability q(t) = u(t) / sum_j u(j), each
    counted: over K, unbiased for sum_t q(t) l(t). star (pos-RS-KD*): each draw weighted 1 / (n
    q(t)), unbiased for Full KD over K (`distill_loss`; over sum_t m_t it is biased)."""
    u = scores.double().clamp_min(0) * valid  # q(t) = u(t) / sum_j u(j); negative scores count 0
    u = torch.where(u.sum(1, keepdim=True) > 0, u, valid.double())  # all 0: uniform
    q = u / u.sum(1, keepdim=True).clamp_min(1e-300)
    K = budget_counts(k, valid.sum(1))
    counts, rows = torch.zeros_like(q), K > 0
    if rows.any():
        draws = torch.multinomial(q[rows], int(K.max()), replacement=True)
        keep = torch.arange(draws.shape[1], device=q.device) < K[rows][:, None]
        counts[rows] = torch.zeros_like(q[rows]).scatter_add_(1, draws, keep.double())
    n = valid.sum(1, keepdim=True).double()
    return torch.where(q > 0, counts / (n * q).clamp_min(1e-300), 0.0) if star else counts


POLICIES = {  # policy(scores, k, valid, state) -> m [B, L]: bool, or counts (the sampling ones)
    "topk": topk_positions,
    "gls": gls_positions,
    "curriculum": curriculum_positions,
    "pos_rs_kd": pos_rs_kd_positions,
    "pos_rs_kd_star": partial(pos_rs_kd_positions, star=True),
}
FULL_KL = ("full_kd", "sekd", "random_pos")  # the methods with the teacher's whole distribution


def select_positions(student_h, student_w, teacher_h, teacher_w, targets, cfg, state=None):
    """cfg.metric's scores through cfg.policy -> bool [B, L] (pos-RS-KD: float counts)."""
    valid = targets >= 0
    metric, policy = ("random", "topk") if cfg.method == "random_pos" else (cfg.metric, cfg.policy)
    if cfg.method not in ("sekd", "random_pos") or cfg.k == 1 and policy in ("topk", "curriculum"):
        return valid  # Full KD, or every position by a deterministic policy: no scores needed
    args = (teacher_h, teacher_w, targets, cfg.chunk_rows)
    scores = chunked_scores(METRICS[metric], student_h, student_w, valid, *args)
    state = PositionState(cfg.gls_queue, cfg.curriculum_steps) if state is None else state
    return POLICIES[policy](scores, cfg.k, valid, state)


def distill_loss(student, teacher, idx, targets, cfg, state=None, draws=None):
    """Any method's step (SE-KD's own: `sekd_loss`) -> (loss, n_sel). RS-KD classes read cached
    `draws` (ids, counts) [B, L, U] (SE-KD_3X: no teacher), or draw them at the selected rows."""
    student_h, student_w, valid = student.hidden(idx), student.head_weight, targets >= 0
    teacher_h = teacher_w = row_weights = None
    if cfg.method != "ce" and draws is None:
        if teacher is None:
            raise ValueError(f"{cfg.method} needs the teacher, or (RS-KD classes) cached draws")
        with torch.no_grad():
            teacher_h, teacher_w = teacher.hidden(idx), teacher.head_weight
    if cfg.method == "at_kd":
        loss = at_kd_loss(student_h, student_w, teacher_h, teacher_w, targets, cfg)
        return loss, int(valid.sum())
    mask = select_positions(student_h, student_w, teacher_h, teacher_w, targets, cfg, state)
    if mask.dtype != torch.bool:  # pos-RS-KD's counts, per sequence over their sum (pos-RS-KD*: K)
        K = budget_counts(cfg.k, valid.sum(1)) if cfg.policy == "pos_rs_kd_star" else None
        row_weights, mask = per_sequence_weights(mask, torch.float64, K), mask > 0
    if cfg.classes == "rskd":
        if draws is None:  # drawn at the selected rows only
            draws = torch.zeros(2, *mask.shape, cfg.U, dtype=torch.long, device=idx.device)
            drawn = teacher_draws(teacher_h[mask], teacher_w, cfg.U, cfg.T, cfg.chunk_rows)
            draws[0][mask], draws[1][mask] = drawn  # ids, counts
        loss = rskd_loss(student_h, student_w, *draws, targets, mask, cfg)
    elif cfg.flow == "dense":
        z_teacher = teacher.head(teacher_h) if cfg.lam > 0 else None
        loss = kd_loss(student.head(student_h), z_teacher, targets, mask, cfg, row_weights)
    else:
        args = (teacher_h, teacher_w, targets, mask, cfg)
        loss = streamed_kd_loss(student_h, student_w, *args, row_weights=row_weights)
    return loss, int(mask.sum())


# ============================================================================ 5. the baselines
# ------------------------------------------------------------------------ AT-KD (Zhong et al. 2024)


def at_kd_rows(teacher_h, teacher_w, y, hard, T, z, i):
    """AT-KD at walked rows i: the binary KL((p(y), 1 - p(y)) || (q(y), 1 - q(y))) at hard rows,
    plus the renormalised KL(p(.|not y) || q(.|not y)) at all (the exact KL weighs it 1 - p(y)),
    both tempered where the paper is silent; the logit gradient by autograd."""
    gold = F.one_hot(y[i], z.shape[-1]).bool()

    def split(z):  # log p(y), log(1 - p(y)), log of the renormalised non-gold distribution
        lse, rest = torch.logsumexp(z, -1), z.masked_fill(gold, float("-inf"))
        return z[gold] - lse, torch.logsumexp(rest, -1) - lse, F.log_softmax(rest, -1)

    lp_y, lp_not, lp_rest = split(_wide(teacher_h[i] @ teacher_w.T) / T)
    with torch.enable_grad():
        zs = z.detach().requires_grad_()
        lq_y, lq_not, lq_rest = split(zs / T)
        binary = lp_y.exp() * (lp_y - lq_y) + lp_not.exp() * (lp_not - lq_not)
        non_target = (lp_rest.exp() * (lp_rest - lq_rest).masked_fill(gold, 0.0)).sum(-1)
        loss = T * T * (hard[i] * binary + non_target)
        (grad,) = torch.autograd.grad(loss.sum(), zs)
    return loss.detach(), grad


def at_kd_loss(student_h, student_w, teacher_h, teacher_w, targets, cfg):
    """lam AT-KD + (1 - lam) CE at every valid position; hard: the half of each sequence where the
    teacher is least sure of the gold token; L_i = (0.2 sum_easy + 0.8 sum_hard) / n_i."""
    valid = targets >= 0
    args = (student_h, student_w, valid, teacher_h, teacher_w, targets, cfg.chunk_rows)
    doubt = -torch.expm1(-chunked_scores(METRICS["teacher_ce"], *args))  # 1 - p(y)
    hard, w = topk_positions(doubt, 0.5, valid), per_sequence_weights(valid, torch.float64)
    w = torch.where(hard, w * 0.8, w * 0.2)
    rows = (teacher_h[valid], chunk_weight(teacher_w), targets[valid], hard[valid], cfg.T)
    kd = {"row_weights": w, "kd_rows": partial(at_kd_rows, *rows)}
    chunk = int(valid.sum()) if cfg.flow == "dense" else cfg.chunk_rows  # dense: one chunk
    cfg = replace(cfg, ce_at="all", chunk_rows=max(1, chunk))
    return streamed_kd_loss(student_h, student_w, None, None, targets, None, cfg, **kd)


# ------------------------------------------------------------------ on-policy (Agarwal et al. 2024)
# The student continues prompts, and KD applies there (the paper's on-policy table: the reverse KL)


@compiled
def reverse_kl_rows(teacher_h, teacher_w, T, z, i):
    """`kl_rows` of T^2 KL(q^T || p^T); its gradient T q^T (log q^T - log p^T - KL)."""
    logq = F.log_softmax(z / T, dim=-1)
    logp = F.log_softmax((teacher_h[i] @ teacher_w.T).to(z.dtype) / T, dim=-1)
    q = logq.exp()
    diff = logq.sub_(logp)
    kl = (q * diff).sum(-1)
    return T * T * kl, diff.sub_(kl[:, None]).mul_(q).mul_(T)


def on_policy_batch(student, idx, prompt_len, generator=None):
    """idx's first P tokens, then the student's samples (T = 1, no dropout); targets -1 before."""
    L, was_training = idx.shape[1], student.training
    if type(prompt_len) is not int or not 1 <= prompt_len <= L:
        raise ValueError(f"prompt_len must be in [1, {L}], the sequence length, got {prompt_len!r}")
    student.eval()
    seq, _ = student.generate(idx[:, :prompt_len], L - prompt_len + 1, 1.0, 0, generator)
    student.train(was_training)
    targets = seq[:, 1:].clone()
    targets[:, : prompt_len - 1] = -1
    return seq[:, :-1], targets


def on_policy_rows(batch_size, share):  # share * B, rounded to the nearest integer
    return int(math.floor(share * batch_size + 0.5))


def on_policy_distill_loss(
    student, teacher, idx, targets, cfg, share, prompt_len, gen=None, state=None
):
    """The last on_policy_rows(B, share) sequences go on-policy (KD alone); a mean over them."""
    B = idx.shape[0]
    n = B - on_policy_rows(B, share)  # sequences of real text
    loss, n_sel = distill_loss(student, teacher, idx[:n], targets[:n], cfg, state) if n else (0, 0)
    if n < B:
        x, y = on_policy_batch(student, idx[n:], prompt_len, gen)
        own, n_own = distill_loss(student, teacher, x, y, replace(cfg, lam=1.0), state)
        loss, n_sel = loss * (n / B) + own * ((B - n) / B), n_sel + n_own
    return loss, n_sel


# ===================================================================== 6. the class and sample axes
# -------------------------------------------------------------------- RS-KD (Anshumann et al. 2025)


@torch.no_grad()
def teacher_draws(teacher_h, teacher_w, U, T=1.0, chunk_rows=0, generator=None):
    """U draws per row from softmax(h w^T / T) of the teacher's rows h [..., D], a chunk of rows at
    a time. -> (ids, counts) [..., U]: the distinct ids, increasing, with their counts, then 0s."""
    rows, w = teacher_h.reshape(-1, teacher_h.shape[-1]), chunk_weight(teacher_w)
    chunk = chunk_rows or default_chunk_rows(*teacher_w.shape, teacher_w.device)
    starts = range(0, max(1, len(rows)), chunk)  # no rows: one empty chunk
    p = (F.softmax(_wide(rows[i : i + chunk] @ w.T) / T, dim=-1) for i in starts)
    draws = torch.cat([torch.multinomial(q, U, replacement=True, generator=generator) for q in p])
    draws = draws.sort(dim=1).values
    slot = (draws.diff(dim=1, prepend=draws[:, :1]) != 0).cumsum(1)  # sorted: a new id, a new slot
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
    shape = (*teacher_h.shape[:-1], U)
    return ids.view(shape), counts.view(shape)


def _rskd_rows(ids, counts, T, z_student, i):
    """T^2 sum_v p~ log(p~ / q^T) at walked rows i (p~ = counts / U); gradient T (q^T - p~)."""
    p = counts[i].to(z_student.dtype) / counts[i].sum(-1, keepdim=True)
    logq = F.log_softmax(z_student / T, dim=-1)
    loss = T * T * (torch.xlogy(p, p) - p * logq.gather(1, ids[i])).sum(-1)  # padding: p = 0
    return loss, logq.exp_().scatter_add_(1, ids[i], -p).mul_(T)


def rskd_loss(student_h, student_w, ids, counts, targets, mask, cfg):
    """`streamed_kd_loss` with the teacher's draws [B, L, U] in place of its logits."""
    valid = targets >= 0
    rows = walked_rows(valid, valid if mask is None else mask & valid, cfg)
    kd_rows = partial(_rskd_rows, ids[rows], counts[rows], cfg.T)
    return streamed_kd_loss(student_h, student_w, None, None, targets, mask, cfg, kd_rows=kd_rows)


# --------------------------------------------------------------- the sample axis: TopSmp, RandomSmp


def sample_entropy(hidden, head_weight, valid, chunk_rows=0):
    """A sample's score: its mean student entropy over its valid positions. [B, L, D] -> [B]."""
    ent = chunked_scores(student_entropy, hidden, head_weight, valid, chunk_rows=chunk_rows)
    return ent.sum(1) / valid.sum(1).clamp_min(1)


def top_samples(scores, share):
    """TopSmp: the ids of the ceil(share N) samples of highest score, increasing."""
    return topk_positions(torch.as_tensor(scores).double()[None], share)[0].nonzero().flatten()


def random_samples(n_samples, share, generator=None):
    """RandomSmp: ceil(share N) sample ids drawn uniformly without replacement, increasing."""
    n = int(budget_counts(share, torch.tensor(n_samples)))
    return torch.randperm(n_samples, generator=generator)[:n].sort().values


# ============================================================================ 7. evaluation


def expected_calibration_error(confidence, correct, n_bins=15):
    """ECE in percent, the paper's: over equal-width bins of max q, |sum correct - sum conf| / N."""
    confidence, correct = confidence.flatten().double(), correct.flatten().double()
    bins = (confidence * n_bins).ceil().long().clamp(1, n_bins) - 1  # bin b holds (b/n, (b+1)/n]
    gap = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct - confidence)
    return 100.0 * gap.abs().sum().item() / max(1, confidence.numel())


def prediction_rows(zs, zt, y):
    """Per row: -log q(y), max q, whether argmax q == y, H(q)."""
    logq = F.log_softmax(zs, -1)
    conf, pred = logq.max(-1)
    nll, entropy = F.nll_loss(logq, y, reduction="none"), -(logq.exp() * logq).sum(-1)
    return torch.stack([nll, conf.exp(), (pred == y).to(nll.dtype), entropy], 1)


def teacher_rows(zs, zt, y):
    """Per row: KL(p || q), and whether the teacher's top-1 is the student's."""
    return torch.stack([kl_per_position(zt, zs), (zt.argmax(-1) == zs.argmax(-1)).to(zs.dtype)], 1)


prediction_rows.needs_teacher = False


@torch.no_grad()
def fit_temperature(h, w, targets, valid, steps=40):
    """tau* in [1/20, 20] of least NLL of h w^T / tau at the valid rows (a subset's PPL rewards a
    flat distribution: we compare models at their own tau*); convex in 1/tau: golden section."""

    def nll(log_tau):
        ce = chunked_scores(METRICS["student_ce"], h, w / math.exp(log_tau), valid, targets=targets)
        return ce[valid].double().sum().item()

    a, b, g = -math.log(20), math.log(20), (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    nc, nd = nll(c), nll(d)
    for _ in range(steps):  # the point kept is the next step's other point: one new NLL a step
        if nc < nd:  # the minimum is in [a, d]: d becomes b, c becomes d
            b, c, d, nd = d, d - g * (d - a), c, nc
            nc = nll(c)
        else:  # in [c, b]: c becomes a, d becomes c
            a, c, d, nc = c, d, c + g * (b - c), nd
            nd = nll(d)
    return math.exp((a + b) / 2)


# ============================================================================ 8. memory
# One step's bytes in closed form, for pencil and paper (a test holds them within 10% of a meter)


def n_params(config):
    """Embeddings (V + block) D; a block 12 D^2 + 13 D (qkv, out, MLP, 2 LayerNorms); ln_f 2 D."""
    V, L, D = config.vocab_size, config.block_size, config.n_embd
    return (V + L) * D + config.n_layer * (12 * D * D + 13 * D) + 2 * D


def activation_bytes(config, B, L, half=False, grad=True):
    """With grad, autograd's saved vectors per layer and token (~16 of width D, bf16 but the
    residuals under autocast); without (the teacher): a block's peak, 11."""
    D, H, n = config.n_embd, config.n_head, config.n_layer
    tokens, act = B * L, 2 if half else 4
    if grad:
        return tokens * (n * (D * (2 * 4 + 14 * act) + 4 * (4 + H)) + 2 * D * 4 + 8)
    return tokens * D * (3 * 4 + 8 * act) + tokens * D * 4


def memory_account(student_config, teacher_config, B, L, cfg, half=False, device="cpu"):
    """One step's expected peak bytes: the most its phases hold at once (N = B L rows, chunks of c,
    s selected; [rows, V] logits in float32). None for a step it does not model."""
    reads_teacher = getattr(METRICS[cfg.metric], "needs_teacher", True)
    other = cfg.method == "sekd" and (reads_teacher or cfg.policy.startswith("pos_rs"))
    if other or cfg.classes != "full" or cfg.method == "at_kd" or cfg.divergence != "forward":
        return None
    V, Ds, Dt, N = student_config.vocab_size, student_config.n_embd, teacher_config.n_embd, B * L
    lam, uses_teacher = cfg.lam, cfg.lam > 0
    c = min(N, cfg.chunk_rows or default_chunk_rows(V, Ds, device))
    selects = cfg.method in ("sekd", "random_pos") and cfg.k < 1
    share = int(budget_counts(cfg.k, torch.tensor(L))) / L if selects else 1.0
    n_sel, s = round(share * N), math.ceil(share * c)
    sel_rows = 3 * c if selects and cfg.method == "sekd" else 0  # RandomPos draws without logits
    if cfg.flow == "streamed":
        under_mask = lam == 1 or cfg.ce_at == "selected"  # the pass walks the selected rows only
        mixed = max(c + 4 * s, 2 * c + s)  # the KD's rows of a chunk, then its CE's
        loss_rows = 2 * c if lam == 0 else 4 * min(c, n_sel) if under_mask else mixed
        back_rows, head_grad = 0, V * Ds * 4
    else:  # the dense flow: [N, V] logits
        loss_rows = (2 if lam == 0 else 7) * N
        back_rows, head_grad = (5 if 0 < lam < 1 else 3) * N, 0
    p_s, p_t = 4 * n_params(student_config), 4 * n_params(teacher_config) * uses_teacher
    act, t_hidden = activation_bytes(student_config, B, L, half), 4 * N * Dt * uses_teacher
    copies = 2 * V * (Ds + Dt * uses_teacher) * half * (cfg.flow == "streamed")
    resident = 3 * p_s + p_t  # the weights and AdamW's two moments
    phases = [  # the teacher's forward, the selection, the loss, backward, the optimizer step
        resident + activation_bytes(teacher_config, B, L, half, False) * uses_teacher,
        resident + act + t_hidden + 2 * V * Ds * half + 4 * V * sel_rows,
        resident + act + t_hidden + head_grad + copies + 4 * V * loss_rows,
        resident + act + p_s + head_grad + 4 * V * back_rows,
        resident + 2 * p_s,
    ]
    a = dict(student_params=p_s, teacher_params=p_t, grads=p_s, adamw=2 * p_s, head_grad=head_grad)
    a |= dict(activations=act, head_copies=copies, teacher_hidden=t_hidden, chunk_rows=c)
    a |= dict(logits=4 * V * max(sel_rows, loss_rows, back_rows), method=cfg.method, B=B, L=L, V=V)
    a |= dict(n_sel=n_sel, lam=lam, dtype="bfloat16" if half else "float32", total=max(phases))
    return a
