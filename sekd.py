"""sekd: selective knowledge distillation for GPT language models, in one file.

Read top to bottom. Section numbers follow SPEC.md (the method of "Rethinking Selective
Knowledge Distillation", Tavor et al., arXiv 2602.01395):

  0. the model: a nanoGPT whose forward is split into `hidden` and `head`
  1. dense KD: `token_entropy`, `kl_per_position`, `kd_loss`              (SPEC 1)
  2. SE-KD positions: `chunked_entropy`, `topk_positions`                 (SPEC 2, 5)
  6. the streamed selective loss: `streamed_kd_loss`                      (SPEC 6)
     and one distillation step, `distill_loss`
  3. class axis: `rskd_sample`, `rskd_loss` (streamed, exact gradients)   (SPEC 3)
  4. sample axis: `sample_entropy`, `top_samples`, `random_samples`       (SPEC 4)
  5. SE-KD_3X's offline cache codec and storage accounting                (SPEC 5, 7)
  6b. evaluation: perplexity, KL to teacher, agreement, ECE              (SPEC 6b)
  +. memory: `LiveBytes`, a live-tensor-bytes meter that works on CPU too

Conventions: logits are [..., V]; `targets` are [B, L] with -1 at padding, so
`valid = targets >= 0`; a position mask is a bool [B, L]; losses are averaged per sequence,
then over sequences (SPEC 1, "per-sequence normalisation").
"""
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


# ============================================================================ 0. the model

@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    dropout: float = 0.0


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
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.attn = CausalSelfAttention(c)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(),
                                 nn.Linear(4 * c.n_embd, c.n_embd), nn.Dropout(c.dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """nanoGPT: token + position embeddings, pre-LN blocks, tied LM head.
    `hidden(idx)` gives the final (normalised) hidden states [B, L, D]; `head(h)` projects any
    rows of them to logits. Splitting the two is what makes the selective LM head possible."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def head_weight(self):
        return self.wte.weight  # tied: the LM head is the token embedding, [V, D]

    def hidden(self, idx):
        L = idx.shape[1]
        if L > self.config.block_size:
            raise ValueError(f"sequence length {L} is longer than the model's block size "
                             f"{self.config.block_size}: use a shorter --seq-len or a bigger block size")
        x = self.wte(idx) + self.wpe(torch.arange(L, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def head(self, h):
        return h @ self.head_weight.T

    def forward(self, idx):
        return self.head(self.hidden(idx))


def check_pair(teacher, student):
    """A teacher and student must share one vocabulary (SPEC 1)."""
    vt, vs = teacher.config.vocab_size, student.config.vocab_size
    if vt != vs:
        raise ValueError(f"teacher vocabulary ({vt}) and student vocabulary ({vs}) differ: "
                         "train the teacher on the same data and --full-vocab setting")


# ============================================================================ 1. dense KD

def _wide(x):
    """Half-precision logits are upcast for softmax maths; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_temperature(T):
    if not T > 0:
        raise ValueError(f"temperature T must be > 0, got {T}")


def token_entropy(logits, T=1.0):
    """H(softmax(logits / T)) in nats over the last dim (SPEC 2, student_entropy)."""
    check_temperature(T)
    logp = F.log_softmax(_wide(logits) / T, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_per_position(teacher_logits, student_logits, T=1.0):
    """KL(p^T || q^T) over the last dim, p = teacher, q = student (SPEC 1)."""
    check_temperature(T)
    logp = F.log_softmax(_wide(teacher_logits) / T, dim=-1)
    logq = F.log_softmax(_wide(student_logits) / T, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def per_sequence_weights(m, dtype=torch.float32):
    """Row weights that implement SPEC 1's normalisation: L = mean over sequences with any
    selected position of (sum_t m_t l(t) / sum_t m_t). `m` may be bool or counts; [B, L]."""
    m = m.to(dtype)
    per_seq = m.sum(1, keepdim=True)
    n_seq = (per_seq > 0).sum().clamp_min(1)
    return m / per_seq.clamp_min(1e-30) / n_seq


def kd_loss(student_logits, teacher_logits, targets, mask=None, T=1.0, lam=1.0):
    """The KD loss of SPEC 1 on dense logits [B, L, V] (the readable reference flow).

    lam * T^2 * KL(p^T || q^T), averaged over the positions in `mask` (all valid positions
    when None: Full KD; a selection: SE-KD), per sequence then over sequences
    + (1 - lam) * CE(y, q), averaged over all valid positions the same way.
    `teacher_logits` may be None when lam == 0 (plain cross-entropy training)."""
    check_temperature(T)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"CE mixing weight lambda must be in [0, 1], got {lam}")
    valid = targets >= 0
    mask = valid if mask is None else mask & valid
    loss = student_logits.new_zeros((), dtype=_wide(student_logits).dtype)
    if lam > 0:
        kl = T * T * kl_per_position(teacher_logits, student_logits, T)
        loss = loss + lam * (per_sequence_weights(mask, kl.dtype) * kl).sum()
    if lam < 1:
        ce = F.cross_entropy(_wide(student_logits).flatten(0, 1), targets.clamp_min(0).flatten(),
                             reduction="none").view_as(targets)
        loss = loss + (1 - lam) * (per_sequence_weights(valid, ce.dtype) * ce).sum()
    return loss


# ============================================================================ 2. SE-KD positions

def check_budget(k, name="k"):
    if not 0.0 < k <= 1.0:
        raise ValueError(f"budget {name} must be in (0, 1], got {k} (e.g. 0.2 for 20%)")


def default_chunk_rows(vocab_size, elements=1 << 22):
    """Rows per chunk so that one [rows, V] float32 tensor is about 16 MB (small enough for
    the CPU allocator to reuse instead of mapping fresh pages every chunk)."""
    return max(1, elements // vocab_size)


@torch.no_grad()
def chunked_entropy(hidden, head_weight, T=1.0, chunk_rows=None):
    """Student entropy H(q_t) for every row of `hidden` [B, L, D] -> [B, L], projecting
    through the LM head a chunk of rows at a time: never a [B, L, V] tensor (SPEC 6)."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_rows or default_chunk_rows(head_weight.shape[0])
    out = torch.cat([token_entropy(rows[i:i + chunk] @ head_weight.T, T)
                     for i in range(0, rows.shape[0], chunk)])
    return out.view(hidden.shape[:-1])


def budget_counts(k, n):
    """ceil(k * n) per sequence, exact for decimal k (0.1 * 30 is 3, not 4)."""
    return torch.ceil(torch.round(k * n.to(torch.float64), decimals=6)).long()


def topk_positions(scores, k, valid=None):
    """SE-KD's policy (SPEC 2): in each row choose exactly ceil(k * n_i) of its n_i valid
    positions, those with the highest score; ties go to the earlier position. -> bool [B, L]."""
    check_budget(k)
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(valid.gather(1, order).int(), dim=1, descending=True,
                                       stable=True).indices)  # valid first, then by score
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                                            .expand_as(order).contiguous())
    return rank < budget_counts(k, valid.sum(1))[:, None]


def random_positions(valid, k, generator=None):
    """RandomPos (SPEC 2's baseline): ceil(k * n_i) valid positions per row, uniformly at random.
    A minimal version for the multi-axis table; the position metrics of issue 3 supersede it."""
    scores = torch.rand(valid.shape, generator=generator, device=valid.device)
    return topk_positions(scores, k, valid)


# ============================================================================ 6. streamed selective loss

def _kd_rows(z_student, z_teacher, T):
    """Per row: T^2 KL(p^T || q^T) and its gradient w.r.t. the student logits, T (q^T - p^T)."""
    logq = F.log_softmax(z_student / T, dim=-1)
    logp = F.log_softmax(z_teacher / T, dim=-1)
    p = logp.exp()
    loss = T * T * (p * (logp - logq)).sum(-1)
    return loss, T * (logq.exp_() - p)


def _ce_rows(z_student, targets):
    """Per row: CE(y, q) and its gradient w.r.t. the student logits, q - onehot(y)."""
    logq = F.log_softmax(z_student, dim=-1)
    loss = -logq.gather(1, targets[:, None]).squeeze(1)
    grad = logq.exp_()
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1
    return loss, grad


class _StreamedHeadLoss(torch.autograd.Function):
    """sum_r w_r * rows_loss(h_r @ W^T), computed a chunk of rows at a time. The gradient of
    each chunk is computed in the forward pass (the loss is a sum over rows, so the chunks'
    gradients add up exactly), so one chunk of [rows, V] tensors is alive at a time and
    backward only scales the stored dL/dh [N, D] and dL/dW [V, D]."""

    @staticmethod
    def forward(ctx, h, weight, row_weights, chunk_rows, rows_loss):
        loss = torch.zeros((), dtype=_wide(h).dtype, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        for i in range(0, h.shape[0], chunk_rows):
            hr, wr = h[i:i + chunk_rows], row_weights[i:i + chunk_rows]
            z = _wide(hr @ weight.T)
            row_loss, grad_z = rows_loss(z, slice(i, i + chunk_rows))
            loss += (wr * row_loss).sum()
            grad_z = grad_z.mul_(wr[:, None])
            grad_h[i:i + chunk_rows] = (grad_z.to(weight.dtype) @ weight).to(h.dtype)
            grad_w += grad_z.T.to(hr.dtype) @ hr
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_out * grad_h, grad_out * grad_w, None, None, None


def streamed_kd_loss(student_h, student_w, teacher_h, teacher_w, targets, mask=None,
                     T=1.0, lam=1.0, chunk_rows=None):
    """`kd_loss` with selective LM heads, streamed (SPEC 6). Equal in value and gradient to
    kd_loss(student_h @ student_w.T, teacher_h @ teacher_w.T, targets, mask, T, lam), but:
    teacher and student logits exist only for the selected rows, and only one chunk of
    `chunk_rows` of them at a time. student_h [B, L, D] (with grad), teacher_h [B, L, Dt]."""
    check_temperature(T)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"CE mixing weight lambda must be in [0, 1], got {lam}")
    valid = targets >= 0
    mask = valid if mask is None else mask & valid
    chunk = chunk_rows or default_chunk_rows(student_w.shape[0])
    loss = torch.zeros((), dtype=_wide(student_h).dtype, device=student_h.device)
    if lam > 0:
        t_rows = teacher_h[mask]

        def kd_rows(z, rows):
            with torch.no_grad():
                z_teacher = _wide(t_rows[rows] @ teacher_w.T)
            return _kd_rows(z, z_teacher, T)
        loss = loss + lam * _StreamedHeadLoss.apply(student_h[mask], student_w,
                                                     per_sequence_weights(mask, loss.dtype)[mask], chunk, kd_rows)
    if lam < 1:
        y = targets[valid]
        loss = loss + (1 - lam) * _StreamedHeadLoss.apply(
            student_h[valid], student_w, per_sequence_weights(valid, loss.dtype)[valid], chunk,
            lambda z, rows: _ce_rows(z, y[rows]))
    return loss


@dataclass
class KDConfig:
    """One distillation method. method: 'ce' (no teacher), 'full_kd' (every position) or
    'sekd' (student entropy, top k), 'random_pos' (k uniformly random positions). flow: 'streamed'
    (selective heads, chunked) or 'dense' (full [B, L, V] logits for both models, the paper's
    default flow). classes: 'full' (KL over all of V) or 'rskd' (U classes drawn from the
    teacher, SPEC 3; always streamed)."""
    method: str = "sekd"
    k: float = 0.2
    T: float = 1.0
    lam: float = 1.0
    flow: str = "streamed"
    chunk_rows: int = 0
    classes: str = "full"
    U: int = 64

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.flow not in ("streamed", "dense"):
            raise ValueError(f"unknown flow '{self.flow}': choose streamed or dense")
        check_budget(self.k)
        check_temperature(self.T)
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"CE mixing weight lambda must be in [0, 1], got {self.lam}")
        if self.classes not in ("full", "rskd"):
            raise ValueError(f"unknown classes '{self.classes}': choose full or rskd")
        if self.classes == "rskd":
            check_draws(self.U)
            if self.method == "ce" or self.flow == "dense":
                raise ValueError("RS-KD classes need a KD method (not ce) and the streamed flow")

    @property
    def uses_teacher(self):
        return self.method != "ce" and self.lam > 0


METHODS = ("ce", "full_kd", "sekd", "random_pos")


def select_positions(student_h, student_w, valid, cfg):
    """The position mask of a method: every valid position for Full KD, the top-k by
    student entropy (computed in chunks, no grad) for SE-KD (SPEC 2, 5)."""
    if cfg.method == "random_pos":
        return random_positions(valid, cfg.k)
    if cfg.method != "sekd" or cfg.k == 1.0:
        return valid
    scores = chunked_entropy(student_h.detach(), student_w.detach(), 1.0, cfg.chunk_rows or None)
    return topk_positions(scores, cfg.k, valid)


def distill_loss(student, teacher, idx, targets, cfg, draws=None):
    """One step's loss for `cfg`: student hidden states with grad, teacher hidden states
    without, positions selected, then the streamed (or dense) KD loss. -> (loss, n_selected).
    RS-KD classes go to `rskd_distill_loss` (with `draws` from the offline cache, if given)."""
    if cfg.classes == "rskd":
        return rskd_distill_loss(student, teacher, idx, targets, cfg, draws)
    student_h = student.hidden(idx)
    valid = targets >= 0
    if cfg.method == "ce":  # plain cross-entropy: lambda = 0, no teacher
        lam, teacher_h, mask = 0.0, None, valid
    else:
        lam = cfg.lam
        with torch.no_grad():
            teacher_h = teacher.hidden(idx)
        mask = select_positions(student_h, student.head_weight, valid, cfg)
    teacher_w = teacher.head_weight if teacher_h is not None else None
    if cfg.flow == "dense":
        teacher_logits = teacher.head(teacher_h) if teacher_h is not None else None
        loss = kd_loss(student.head(student_h), teacher_logits, targets, mask, cfg.T, lam)
    else:
        loss = streamed_kd_loss(student_h, student.head_weight, teacher_h, teacher_w, targets,
                                mask, cfg.T, lam, cfg.chunk_rows or None)
    return loss, int(mask.sum())


# ============================================================================ 3. class axis: RS-KD

MAX_DRAWS = 127  # a draw count is stored in 7 bits in the cache (SPEC 5); 0 marks padding
COUNT_BITS = 7


def check_draws(U):
    if isinstance(U, bool) or not isinstance(U, int) or not 1 <= U <= MAX_DRAWS:
        raise ValueError(f"RS-KD draws U must be an integer in [1, {MAX_DRAWS}] (7-bit counts), got {U}")


def rskd_sample(teacher_logits, U, T=1.0, generator=None):
    """SPEC 3: per row, draw U ids with replacement from softmax(teacher_logits / T).
    -> (ids, counts), both [..., U] int64: the distinct ids drawn, in increasing order, each with
    how many times it was drawn; the rest of the row is padding (id 0, count 0). This fixed-width
    layout is the cache's. Counts sum to U in every row, so p~ = counts / U is exact."""
    check_draws(U)
    check_temperature(T)
    V = teacher_logits.shape[-1]
    p = F.softmax(_wide(teacher_logits).reshape(-1, V) / T, dim=-1)
    if p.shape[0] == 0:
        draws = torch.zeros(0, U, dtype=torch.long, device=p.device)
    else:
        draws = torch.multinomial(p, U, replacement=True, generator=generator)
    draws = draws.sort(dim=1).values
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = first.cumsum(1) - 1  # equal draws are adjacent after the sort: one slot per distinct id
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
    shape = (*teacher_logits.shape[:-1], U)
    return ids.view(shape), counts.view(shape)


@torch.no_grad()
def teacher_draws(teacher_h, teacher_w, U, T=1.0, chunk_rows=None, generator=None):
    """`rskd_sample` on the teacher's logits for rows of hidden states [..., D], projected through
    the teacher's head a chunk of rows at a time (never all [rows, V]). -> (ids, counts) [..., U]."""
    rows = teacher_h.reshape(-1, teacher_h.shape[-1])
    chunk = chunk_rows or default_chunk_rows(teacher_w.shape[0])
    parts = [rskd_sample(rows[i:i + chunk] @ teacher_w.T, U, T, generator) for i in range(0, rows.shape[0], chunk)]
    if not parts:
        parts = [rskd_sample(rows.new_zeros(0, teacher_w.shape[0]), U, T)]
    shape = (*teacher_h.shape[:-1], U)
    return torch.cat([i for i, _ in parts]).view(shape), torch.cat([c for _, c in parts]).view(shape)


def _rskd_rows(z_student, ids, counts, T):
    """Per row: T^2 sum_v p~(v) log(p~(v) / q^T(v)) over the drawn ids, p~ = counts / U, with q^T
    the student's softmax over all of V; and its gradient w.r.t. the student logits, T (q^T - p~)."""
    p = counts.to(z_student.dtype) / counts.sum(-1, keepdim=True)
    logq = F.log_softmax(z_student / T, dim=-1)
    loss = T * T * (torch.xlogy(p, p) - p * logq.gather(1, ids)).sum(-1)  # padding: p = 0, adds 0
    grad = logq.exp_().scatter_add_(1, ids, -p)
    return loss, T * grad


def rskd_loss(student_h, student_w, ids, counts, targets, mask=None, T=1.0, lam=1.0, chunk_rows=None):
    """The RS-KD loss (SPEC 3), streamed like `streamed_kd_loss`: lam * the per-sequence mean over
    the positions in `mask` of the sparse KL above + (1 - lam) * CE over every valid position.
    ids, counts [B, L, U]: the teacher's draws (`rskd_sample` or the offline cache); only the
    rows in `mask` are read. student_h [B, L, D] with grad; gradients are exact."""
    check_temperature(T)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"CE mixing weight lambda must be in [0, 1], got {lam}")
    valid = targets >= 0
    mask = valid if mask is None else mask & valid
    chunk = chunk_rows or default_chunk_rows(student_w.shape[0])
    loss = torch.zeros((), dtype=_wide(student_h).dtype, device=student_h.device)
    if lam > 0:
        ids_m, counts_m = ids[mask], counts[mask]
        loss = loss + lam * _StreamedHeadLoss.apply(
            student_h[mask], student_w, per_sequence_weights(mask, loss.dtype)[mask], chunk,
            lambda z, rows: _rskd_rows(z, ids_m[rows], counts_m[rows], T))
    if lam < 1:
        loss = loss + (1 - lam) * streamed_kd_loss(student_h, student_w, None, None, targets, lam=0.0,
                                                   chunk_rows=chunk)
    return loss


def rskd_distill_loss(student, teacher, idx, targets, cfg, draws=None):
    """One step with RS-KD classes at the positions of `cfg.method` (SPEC 3, 5). The teacher's
    draws are `draws` = (ids, counts) [B, L, U] when given (SE-KD_3X reads them from the offline
    cache: the teacher is not used at all), otherwise drawn now from the teacher's logits at the
    selected rows only. Positions are still chosen online. -> (loss, n_selected)."""
    student_h = student.hidden(idx)
    valid = targets >= 0
    mask = select_positions(student_h, student.head_weight, valid, cfg)
    chunk = cfg.chunk_rows or None
    if draws is None:
        if teacher is None:
            raise ValueError("RS-KD without cached draws needs the teacher")
        with torch.no_grad():
            teacher_h = teacher.hidden(idx)
        ids = torch.zeros(*mask.shape, cfg.U, dtype=torch.long, device=idx.device)
        counts = torch.zeros_like(ids)
        ids[mask], counts[mask] = teacher_draws(teacher_h[mask], teacher.head_weight, cfg.U, cfg.T, chunk)
        draws = ids, counts
    loss = rskd_loss(student_h, student.head_weight, draws[0], draws[1], targets, mask, cfg.T, cfg.lam, chunk)
    return loss, int(mask.sum())


# ============================================================================ 4. sample axis

@torch.no_grad()
def sample_entropy(hidden, head_weight, valid=None, chunk_rows=None):
    """SPEC 4: a sample's score is its mean student entropy over its valid positions,
    U_i = (1 / (L_i - 1)) sum_t H(q_t); computed with `chunked_entropy`. hidden [B, L, D] -> [B]."""
    ent = chunked_entropy(hidden, head_weight, 1.0, chunk_rows)
    valid = torch.ones_like(ent, dtype=torch.bool) if valid is None else valid
    return (ent * valid).sum(1) / valid.sum(1).clamp_min(1)


def top_samples(scores, l):
    """TopSmp (SPEC 4): ids of the ceil(l * N) samples with the highest score (ties: lower id),
    in increasing order."""
    check_budget(l, "l")
    scores = torch.as_tensor(scores)
    n = int(budget_counts(l, torch.tensor(len(scores))))
    return torch.sort(scores, descending=True, stable=True).indices[:n].sort().values


def random_samples(n_samples, l, generator=None):
    """RandomSmp (SPEC 4): ceil(l * N) sample ids uniformly without replacement, increasing."""
    check_budget(l, "l")
    n = int(budget_counts(l, torch.tensor(n_samples)))
    return torch.randperm(n_samples, generator=generator)[:n].sort().values


# ============================================================================ 5. the offline cache codec

def cache_bytes_per_class(V):
    """SPEC 5: bytes of one cached class, an id and a 7-bit count packed as word = id << 7 | count,
    in whole little-endian bytes. Ids get 17 bits (3 bytes per class, the paper's format) up to
    V = 131,072 and as many bits as V needs beyond that (4 bytes up to 2^25 ids): never truncated."""
    if V < 1:
        raise ValueError(f"vocabulary size must be at least 1, got {V}")
    id_bits = max(17, (V - 1).bit_length())
    if id_bits + COUNT_BITS > 56:
        raise ValueError(f"a vocabulary of {V:,} ids does not fit the cache format (at most 2^49 ids)")
    return math.ceil((id_bits + COUNT_BITS) / 8)


def encode_draws(ids, counts, V):
    """Pack draws (ids, counts [..., U]) into uint8 [..., U, cache_bytes_per_class(V)]. Lossless:
    ids outside [0, V) or counts outside [0, 127] are refused, never truncated."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"a drawn id is outside the vocabulary [0, {V}): the cache cannot store it")
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > MAX_DRAWS):
        raise ValueError(f"a draw count is outside [0, {MAX_DRAWS}]: the cache stores 7-bit counts")
    word = (ids.long() << COUNT_BITS) | counts.long()
    shifts = 8 * torch.arange(cache_bytes_per_class(V), device=word.device)
    return ((word[..., None] >> shifts) & 0xFF).to(torch.uint8)


def decode_draws(raw, V):
    """Inverse of `encode_draws`: uint8 [..., U, nbytes] -> (ids, counts) [..., U], int64."""
    nb = cache_bytes_per_class(V)
    if raw.shape[-1] != nb:
        raise ValueError(f"cache entries have {raw.shape[-1]} bytes, a vocabulary of {V:,} needs {nb}")
    word = (raw.long() << (8 * torch.arange(nb, device=raw.device))).sum(-1)
    return word >> COUNT_BITS, word & MAX_DRAWS


def storage_bytes_per_position(V, U=64, l=0.2):
    """SPEC 5, 7: bytes stored per training position for each way of shipping the teacher's
    signal: full fp16 logits (2V); RS-KD's cache (U classes of `cache_bytes_per_class(V)` bytes);
    SE-KD_3X (the same, but only for the l share of samples TopSmp keeps); plain CE (the target
    token id alone, in whole bytes)."""
    rskd = U * cache_bytes_per_class(V)
    return {"full_fp16": 2 * V, "rskd": rskd, "sekd_3x": l * rskd, "ce": math.ceil((V - 1).bit_length() / 8)}


# ============================================================================ 6b. evaluation

def expected_calibration_error(confidence, correct, n_bins=15):
    """ECE in percent (SPEC 6b): equal-width bins over the top-1 probability, sum over bins
    of share * |accuracy - mean confidence| = sum_b |sum correct - sum confidence| / N."""
    confidence, correct = confidence.flatten().double(), correct.flatten().double()
    bins = (confidence * n_bins).ceil().long().clamp(1, n_bins) - 1  # bin b holds (b/n, (b+1)/n]
    gap = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct - confidence)
    return 100.0 * gap.abs().sum().item() / max(1, confidence.numel())


@torch.no_grad()
def evaluation_sums(student_h, student_w, teacher_h, teacher_w, targets, chunk_rows=None):
    """Sums over the valid rows of a batch, one chunk of logits at a time: CE, KL(p || q),
    top-1 agreement, and (confidence, correct) for ECE. teacher_h may be None."""
    valid = targets >= 0
    hs, y = student_h[valid], targets[valid]
    ht = teacher_h[valid] if teacher_h is not None else None
    chunk = chunk_rows or default_chunk_rows(student_w.shape[0])
    out = {"n": 0, "ce": 0.0, "kl": 0.0, "agree": 0, "conf": [], "correct": []}
    for i in range(0, hs.shape[0], chunk):
        zq = _wide(hs[i:i + chunk] @ student_w.T)
        logq = F.log_softmax(zq, -1)
        conf, pred = logq.max(-1)
        out["n"] += len(zq)
        out["ce"] += F.nll_loss(logq, y[i:i + chunk], reduction="sum").item()
        out["conf"].append(conf.exp().cpu())
        out["correct"].append((pred == y[i:i + chunk]).cpu())
        if ht is not None:
            zp = _wide(ht[i:i + chunk] @ teacher_w.T)
            out["kl"] += kl_per_position(zp, zq).sum().item()
            out["agree"] += (zp.argmax(-1) == pred).sum().item()
    return out


# ============================================================================ +. memory

class LiveBytes(TorchDispatchMode):
    """Measures tensor memory on any device, CPU included: while active, every storage that an
    op creates is counted until it is freed; `peak` is the most bytes alive at once.
    Tensors that existed before (parameters, optimizer state) are not counted, nor scratch
    memory a kernel frees before it returns."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._seen:
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


def state_bytes(*tensors_or_modules):
    """Bytes held by parameters / buffers of modules or by plain tensors."""
    total = 0
    for x in tensors_or_modules:
        ts = list(x.parameters()) + list(x.buffers()) if isinstance(x, nn.Module) else [x]
        total += sum(t.numel() * t.element_size() for t in ts)
    return total
