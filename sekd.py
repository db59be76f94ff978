"""sekd: selective knowledge distillation for GPT language models, in one file.

Read top to bottom. Section numbers follow SPEC.md (the method of "Rethinking Selective
Knowledge Distillation", Tavor et al., arXiv 2602.01395):

  0. the model: a nanoGPT whose forward is split into `hidden` and `head`; `generate` samples text
  1. dense KD: `token_entropy`, `kl_per_position`, `kd_loss`              (SPEC 1)
  2. SE-KD positions: `chunked_entropy`, `topk_positions`                 (SPEC 2, 5)
     the position axis: importance metrics `METRICS`, `chunked_scores`,
     policies `POLICIES` (top-k, GLS, curriculum, pos-RS-KD, pos-RS-KD*)    (SPEC 2)
  6. the streamed selective loss: `streamed_kd_loss`                      (SPEC 6)
     the AT-KD baseline `at_kd_loss` / `streamed_at_kd_loss`                (SPEC 2)
     and one distillation step, `distill_loss`; the reverse KL (`DIVERGENCES`)
     on-policy distillation: `sample_continuations`, `on_policy_distill_loss`
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
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
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

    @torch.no_grad()
    def generate(self, idx, n_new, temperature=1.0, top_k=0, generator=None):
        """Append n_new sampled tokens to idx [B, L] (greedy at temperature 0; top_k > 0 keeps the
        k likeliest ids), the context cropped to the block size; only the last row goes through
        the head. -> (idx [B, L + n_new], entropy [B, n_new]: H(q_t) at T = 1 of each step's full
        distribution, the score SE-KD ranks positions by)."""
        entropy = []
        for _ in range(n_new):
            logits = _wide(self.head(self.hidden(idx[:, -self.config.block_size:])[:, -1]))
            entropy.append(token_entropy(logits))
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
            idx = torch.cat([idx, nxt], 1)
        return idx, torch.stack(entropy, 1)


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


def _wide_dtype(x):
    """The dtype `_wide(x)` would have, without making the (possibly [B, L, V]) copy."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def chunk_weight(w):
    """The head weight a chunk loop multiplies by (SPEC 6): under autocast its low-precision copy,
    made once per pass; otherwise w itself. (Left to autocast, every chunk's `h @ w.T` would cast
    the whole [V, D] weight again: on a GPU that copy takes longer than a small chunk's matmul.)"""
    device = w.device.type
    return w.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else w


def check_temperature(T):
    if not T > 0:
        raise ValueError(f"temperature T must be > 0, got {T}")


def check_lambda(lam):
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"CE mixing weight lambda must be in [0, 1], got {lam}")


def check_divergence(divergence):
    if divergence not in DIVERGENCES:  # forward, reverse (section 6)
        raise ValueError(f"unknown divergence '{divergence}': choose forward (KL(teacher || student)) or "
                         "reverse (KL(student || teacher))")


def tempered(z, T):
    """z / T, without the extra pass over [rows, V] at T = 1 (the paper's default)."""
    return z if T == 1 else z / T


def token_entropy(logits, T=1.0):
    """H(softmax(logits / T)) in nats over the last dim (SPEC 2, student_entropy)."""
    check_temperature(T)
    logp = F.log_softmax(tempered(_wide(logits), T), dim=-1)
    p = logp.exp()
    return -(p * logp if logp.requires_grad else p.mul_(logp)).sum(-1)  # no gradient: one [rows, V] tensor fewer


def kl_per_position(teacher_logits, student_logits, T=1.0):
    """KL(p^T || q^T) over the last dim, p = teacher, q = student (SPEC 1)."""
    check_temperature(T)
    logp = F.log_softmax(tempered(_wide(teacher_logits), T), dim=-1)
    logq = F.log_softmax(tempered(_wide(student_logits), T), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def per_sequence_weights(m, dtype=torch.float32, per_seq=None):
    """Row weights that implement SPEC 1's normalisation: L = mean over sequences with any
    selected position of (sum_t m_t l(t) / sum_t m_t). `m` may be bool or counts; [B, L].
    `per_seq` [B] replaces the denominators sum_t m_t (pos-RS-KD* divides by its draws)."""
    m = m.to(dtype)
    n_seq = (m.sum(1) > 0).sum().clamp_min(1)
    per_seq = m.sum(1, keepdim=True) if per_seq is None else per_seq.to(dtype).view(-1, 1)
    return m / per_seq.clamp_min(1e-30) / n_seq


def kd_loss(student_logits, teacher_logits, targets, mask=None, T=1.0, lam=1.0, row_weights=None,
            divergence="forward"):
    """The KD loss of SPEC 1 on dense logits [B, L, V] (the readable reference flow).

    lam * T^2 * KL(p^T || q^T), averaged over the positions in `mask` (all valid positions
    when None: Full KD; a selection: SE-KD), per sequence then over sequences
    + (1 - lam) * CE(y, q), averaged over all valid positions the same way.
    `row_weights` [B, L], when given, are the KL term's final weights instead (pos-RS-KD).
    divergence='reverse' uses KL(q^T || p^T) instead (on-policy distillation's default).
    `teacher_logits` may be None when lam == 0 (plain cross-entropy training)."""
    check_temperature(T)
    check_lambda(lam)
    check_divergence(divergence)
    valid = targets >= 0
    mask = valid if mask is None else mask & valid
    loss = student_logits.new_zeros((), dtype=_wide_dtype(student_logits))
    if lam > 0:
        pair = (teacher_logits, student_logits) if divergence == "forward" else (student_logits, teacher_logits)
        kl = T * T * kl_per_position(*pair, T)
        w = per_sequence_weights(mask, kl.dtype) if row_weights is None else row_weights.to(kl.dtype) * valid
        loss = loss + lam * (w * kl).sum()
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
    w = chunk_weight(head_weight)
    out = torch.cat([token_entropy(rows[i:i + chunk] @ w.T, T)
                     for i in range(0, rows.shape[0], chunk)])
    return out.view(hidden.shape[:-1])


def budget_counts(k, n):
    """ceil(k * n) per sequence, exact for decimal k (0.1 * 30 is 3, not 4)."""
    return torch.ceil(torch.round(k * n.to(torch.float64), decimals=6)).long()


def score_ranks(scores, valid):
    """Rank of each position in its row: 0 = highest score among the valid positions, ties to
    the earlier position; padding ranks after every valid position. -> long [B, L]."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(valid.gather(1, order).int(), dim=1, descending=True,
                                       stable=True).indices)  # valid first, then by score
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order).contiguous()
    return torch.empty_like(order).scatter_(1, order, positions)


def topk_positions(scores, k, valid=None, state=None):
    """SE-KD's policy (SPEC 2): in each row choose exactly ceil(k * n_i) of its n_i valid
    positions, those with the highest score; ties go to the earlier position. -> bool [B, L].
    (`state` is unused: top-k needs no memory; it is there so every policy is called alike.)"""
    check_budget(k)
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    return score_ranks(scores, valid) < budget_counts(k, valid.sum(1))[:, None]


# ---------------------------------------------------------------------------- 2. importance metrics u(t)
# A metric scores one chunk of rows: student logits [R, V], teacher logits [R, V] (None for a
# student-only metric) and targets [R] -> [R], higher = more important (SPEC 2 table). To add
# one, write the function and register it: `METRICS["name"] = fn` (from any file); mark it
# with `student_only` if it never reads the teacher's logits.

def student_only(fn):
    """Marks a metric that needs no teacher output: the teacher's LM head then stays selective."""
    fn.needs_teacher = False
    return fn


def _ce(logits, targets):
    return F.cross_entropy(_wide(logits), targets, reduction="none")


@student_only
def student_entropy(zs, zt, y):
    """H(q_t): SE-KD's metric (SPEC 2, 5)."""
    return token_entropy(zs)


def teacher_entropy(zs, zt, y):
    """H(p_t) (SPEC 2)."""
    return token_entropy(zt)


@student_only
def student_ce(zs, zt, y):
    """CE(y_t, q_t) = -log q_t(y_t) (SPEC 2)."""
    return _ce(zs, y)


def teacher_ce(zs, zt, y):
    """-log p_t(y_t) (SPEC 2)."""
    return _ce(zt, y)


def kl(zs, zt, y):
    """KL(p_t || q_t) (SPEC 2)."""
    return kl_per_position(zt, zs)


def reverse_kl(zs, zt, y):
    """KL(q_t || p_t) (SPEC 2)."""
    return kl_per_position(zs, zt)


def kl_plus_student_entropy(zs, zt, y):
    """KL(p_t || q_t) + H(q_t) (SPEC 2)."""
    return kl(zs, zt, y) + student_entropy(zs, zt, y)


def ce_ratio(zs, zt, y):
    """CE(y_t, q_t) / CE(y_t, p_t) (SPEC 2); a teacher CE of exactly 0 is read as the tiniest float."""
    teacher = teacher_ce(zs, zt, y)
    return student_ce(zs, zt, y) / teacher.clamp_min(torch.finfo(teacher.dtype).tiny)


def ce_ratio_plus_student_entropy(zs, zt, y):
    """ce_ratio + H(q_t) (SPEC 2)."""
    return ce_ratio(zs, zt, y) + student_entropy(zs, zt, y)


@student_only
def random(zs, zt, y):
    """Uniform noise, from torch's global generator: with top-k it is the RandomPos baseline (SPEC 2).
    It reads no logits, only how many rows there are: `chunked_scores` gives it the hidden rows."""
    return torch.rand(len(zs), dtype=_wide_dtype(zs), device=zs.device)


random.needs_logits = False  # RandomPos pays for no LM-head pass


METRICS = {fn.__name__: fn for fn in (student_entropy, teacher_entropy, student_ce, teacher_ce, kl, reverse_kl,
                                      kl_plus_student_entropy, ce_ratio, ce_ratio_plus_student_entropy, random)}


def get_metric(name):
    if name not in METRICS:
        raise ValueError(f"unknown metric '{name}': choose one of {', '.join(METRICS)}")
    return METRICS[name]


def needs_teacher(metric):
    return getattr(get_metric(metric), "needs_teacher", True)


@torch.no_grad()
def chunked_scores(metric, student_h, student_w, valid, teacher_h=None, teacher_w=None, targets=None,
                   chunk_rows=None):
    """u(t) of a named metric at every valid row -> [B, L] (0 at padding), without gradients and
    a chunk of rows at a time: never a [B, L, V] tensor. Teacher logits are made only when the
    metric needs them (then at every valid row), student logits unless it reads none (`random`)."""
    fn = get_metric(metric)
    use_teacher = needs_teacher(metric)
    if use_teacher and teacher_h is None:
        raise ValueError(f"metric '{metric}' needs the teacher's outputs: pass teacher_h and teacher_w")
    hs = student_h[valid]
    ht = teacher_h[valid] if use_teacher else None
    y = targets[valid] if targets is not None else None
    chunk = chunk_rows or default_chunk_rows(student_w.shape[0])
    project = getattr(fn, "needs_logits", True)
    ws = chunk_weight(student_w) if project else None
    wt = chunk_weight(teacher_w) if use_teacher else None
    parts = [fn(_wide(hs[i:i + chunk] @ ws.T) if project else hs[i:i + chunk],
                _wide(ht[i:i + chunk] @ wt.T) if ht is not None else None,
                y[i:i + chunk] if y is not None else None) for i in range(0, hs.shape[0], chunk)]
    dtype = _wide_dtype(hs)
    scores = torch.zeros(valid.shape, dtype=dtype, device=hs.device)
    if parts:
        scores[valid] = torch.cat(parts).to(dtype)
    return scores


# ---------------------------------------------------------------------------- 2. selection policies
# A policy turns scores [B, L] into the position mask m of SPEC 1: policy(scores, k, valid, state)
# -> bool [B, L], or float counts for the sampling policies. `state` carries what a policy
# remembers between batches. `topk_positions` (above) is SE-KD's policy.

class PositionState:
    """Memory of the stateful policies (SPEC 2): GLS's FIFO queue of recent scores (at most
    `gls_queue`), and the training step, which curriculum's window follows over `curriculum_steps`."""

    def __init__(self, gls_queue=30_000, curriculum_steps=4_000):
        if gls_queue < 1 or curriculum_steps < 1:
            raise ValueError("--gls-queue and --curriculum-steps must be at least 1")
        self.gls_queue, self.curriculum_steps = gls_queue, curriculum_steps
        self.queue = None
        self.step = 0


def gls_threshold(queue, k):
    """tau = the (1 - k) quantile of the queued scores (linear interpolation, as numpy's default)."""
    return torch.quantile(queue.double(), 1.0 - k).item()


def gls_positions(scores, k, valid, state):
    """GLS, global-level selection (SPEC 2): select u(t) >= tau, tau from the queue of recent
    scores *before* this batch is pushed; top-k while the queue is still empty. The number
    chosen per sequence varies (a sequence with none drops out of the average)."""
    check_budget(k)
    if state.queue is None or state.queue.numel() == 0:
        m = topk_positions(scores, k, valid)
    else:
        m = (scores >= gls_threshold(state.queue, k)) & valid
    new = scores[valid].detach()
    state.queue = new if state.queue is None else torch.cat([state.queue.to(new), new])
    state.queue = state.queue[-state.gls_queue:]
    return m


def curriculum_positions(scores, k, valid, state):
    """curriculum (SPEC 2): ceil(k n) positions per sequence, a window over the positions
    sorted by u(t) that slides linearly from the lowest-scored window at step 0 to the top-k
    window at step `curriculum_steps` (and stays there)."""
    check_budget(k)
    rank = score_ranks(scores, valid)  # 0 = highest
    n = valid.sum(1)
    K = budget_counts(k, n)
    progress = min(1.0, state.step / state.curriculum_steps)
    first = torch.round((1.0 - progress) * (n - K).double()).long()[:, None]  # rank the window starts at
    return (rank >= first) & (rank < first + K[:, None]) & valid


def position_probabilities(scores, valid):
    """q(t) = u(t) / sum_j u(j) over a sequence's valid positions (negative scores count as 0;
    a sequence whose scores are all 0 is drawn uniformly). -> float64 [B, L]."""
    u = scores.double().clamp_min(0) * valid
    u = torch.where(u.sum(1, keepdim=True) > 0, u, valid.double())
    return u / u.sum(1, keepdim=True).clamp_min(1e-300)


def _draw_counts(q, k, valid):
    """ceil(k n) i.i.d. draws per sequence from q -> how often each position was drawn [B, L]."""
    K = budget_counts(k, valid.sum(1))
    counts = torch.zeros_like(q)
    rows = K > 0
    if rows.any():
        draws = torch.multinomial(q[rows], int(K.max()), replacement=True)
        keep = torch.arange(draws.shape[1], device=q.device) < K[rows][:, None]
        counts[rows] = torch.zeros_like(q[rows]).scatter_add_(1, draws, keep.double())
    return counts


def pos_rs_kd_positions(scores, k, valid, state=None):
    """pos-RS-KD (SPEC 2): ceil(k n) i.i.d. draws with probability q(t); a position drawn c
    times counts c times. Normalised per sequence by the number of draws, the loss's
    expectation is the score-weighted KD sum_t u(t) l(t) / sum_j u(j). -> float counts [B, L]."""
    check_budget(k)
    return _draw_counts(position_probabilities(scores, valid), k, valid)


def pos_rs_kd_star_positions(scores, k, valid, state=None):
    """pos-RS-KD* (SPEC 2): the same draws, each weighted by 1 / (n q(t)): returns
    m_t = c_t / (n q(t)). With the per-sequence denominator fixed to the number of draws K
    (`kl_row_weights`), E[sum_t m_t l(t) / K] = sum_t K q(t) l(t) / (K n q(t)) = (1/n) sum_t l(t),
    Full KD. (Dividing by sum_t m_t instead would be self-normalised and biased.)"""
    check_budget(k)
    q = position_probabilities(scores, valid)
    n = valid.sum(1, keepdim=True).double()
    return torch.where(q > 0, _draw_counts(q, k, valid) / (n * q).clamp_min(1e-300), 0.0)


POLICIES = {"topk": topk_positions, "gls": gls_positions, "curriculum": curriculum_positions,
            "pos_rs_kd": pos_rs_kd_positions, "pos_rs_kd_star": pos_rs_kd_star_positions}


def get_policy(name):
    if name not in POLICIES:
        raise ValueError(f"unknown policy '{name}': choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


def kl_row_weights(m, k, valid, policy):
    """The KL term's row weights for mask m (SPEC 1): per-sequence normalisation by sum_t m_t,
    except pos-RS-KD*, whose sequences are divided by their number of draws ceil(k n)."""
    if policy == "pos_rs_kd_star":
        return per_sequence_weights(m, torch.float64, per_seq=budget_counts(k, valid.sum(1)))
    return per_sequence_weights(m, torch.float64)


# ============================================================================ 6. streamed selective loss

def _kd_rows(z_student, z_teacher, T):
    """Per row: T^2 KL(p^T || q^T) and its gradient w.r.t. the student logits, T (q^T - p^T)."""
    logq = F.log_softmax(tempered(z_student, T), dim=-1)
    logp = F.log_softmax(tempered(z_teacher, T), dim=-1)
    p = logp.exp()
    loss = T * T * logp.sub_(logq).mul_(p).sum(-1)  # KL(p || q), in log p's storage (not needed again)
    grad = logq.exp_().sub_(p)  # in log q's storage: no new [rows, V] tensor
    return loss, grad if T == 1 else grad.mul_(T)


def _reverse_kd_rows(z_student, z_teacher, T):
    """Per row: T^2 KL(q^T || p^T), the reverse KL (on-policy distillation's default, Agarwal et al.
    2024), and its gradient w.r.t. the student logits, T q^T (log q^T - log p^T - KL(q^T || p^T))."""
    logq = F.log_softmax(tempered(z_student, T), dim=-1)
    logp = F.log_softmax(tempered(z_teacher, T), dim=-1)
    q = logq.exp()
    diff = logq.sub_(logp)
    kl = (q * diff).sum(-1)
    return T * T * kl, diff.sub_(kl[:, None]).mul_(q).mul_(T)


DIVERGENCES = {"forward": _kd_rows, "reverse": _reverse_kd_rows}  # KL(p || q), KL(q || p)


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
    backward only scales the stored dL/dh [N, D] and dL/dW [V, D], in place (no copies of the
    [V, D] gradient; so backward runs once: no retain_graph)."""

    @staticmethod
    def forward(ctx, h, weight, row_weights, chunk_rows, rows_loss):
        loss = torch.zeros((), dtype=_wide_dtype(h), device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        w = chunk_weight(weight)
        for i in range(0, h.shape[0], chunk_rows):
            hr, wr = h[i:i + chunk_rows], row_weights[i:i + chunk_rows]
            row_loss, grad_z = rows_loss(_wide(hr @ w.T), slice(i, i + chunk_rows))  # logits freed on return
            loss += (wr * row_loss).sum()
            grad_z = grad_z.mul_(wr[:, None])
            grad_z = grad_z.to(w.dtype)  # under autocast one bf16 copy serves both matmuls
            grad_h[i:i + chunk_rows] = (grad_z @ w).to(h.dtype)
            grad_w += grad_z.T @ hr.to(w.dtype)
            del grad_z  # before the next chunk's logits exist
        ctx.grads = (grad_h, grad_w.to(weight.dtype))  # not saved tensors: backward scales them in place
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("the streamed loss's backward runs once: call backward without retain_graph")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out), None, None, None


def streamed_kd_loss(student_h, student_w, teacher_h, teacher_w, targets, mask=None,
                     T=1.0, lam=1.0, chunk_rows=None, row_weights=None, divergence="forward"):
    """`kd_loss` with selective LM heads, streamed (SPEC 6). Equal in value and gradient to
    kd_loss(student_h @ student_w.T, teacher_h @ teacher_w.T, targets, mask, T, lam, row_weights,
    divergence), but: teacher and student logits exist only for the selected rows (those in `mask`,
    or with a non-zero row weight), and only one chunk of `chunk_rows` of them at a time.
    student_h [B, L, D] (with grad), teacher_h [B, L, Dt]."""
    check_temperature(T)
    check_lambda(lam)
    check_divergence(divergence)
    valid = targets >= 0
    mask = valid if mask is None else mask & valid
    chunk = chunk_rows or default_chunk_rows(student_w.shape[0])
    dtype = _wide_dtype(student_h)
    if row_weights is None:
        kd_weights = per_sequence_weights(mask, dtype)
    else:
        mask, kd_weights = (row_weights != 0) & valid, row_weights.to(dtype)
    if lam == 0:
        y = targets[valid]
        return _StreamedHeadLoss.apply(student_h[valid], student_w, per_sequence_weights(valid, dtype)[valid],
                                       chunk, lambda z, rows: _ce_rows(z, y[rows]))
    t_rows = teacher_h[mask if lam == 1 else valid]  # the rows the pass below walks
    wt = chunk_weight(teacher_w)

    def kd_rows(z, rows):
        with torch.no_grad():
            z_teacher = _wide(t_rows[rows] @ wt.T)
        return DIVERGENCES[divergence](z, z_teacher, T)
    if lam == 1:
        return _StreamedHeadLoss.apply(student_h[mask], student_w, kd_weights[mask], chunk, kd_rows)
    return _kd_and_ce_pass(student_h, student_w, targets, mask, kd_weights, lam, chunk, kd_rows)


def _kd_and_ce_pass(student_h, student_w, targets, mask, kd_weights, lam, chunk, kd_rows):
    """0 < lam < 1: one streamed pass over every valid row, (1 - lam) CE at each and lam times the
    KD term `kd_rows(z, i) -> (loss, grad)` at the selected ones (i indexes the valid rows), so no
    student row is projected through the head twice."""
    valid = targets >= 0
    sel, y = mask[valid], targets[valid]
    kd_w = lam * kd_weights[valid]
    ce_w = (1 - lam) * per_sequence_weights(valid, kd_w.dtype)[valid]
    index = torch.arange(len(y), device=y.device)

    def mixed_rows(z, rows):
        s = sel[rows]
        kd = kd_rows(z[s], index[rows][s]) if s.any() else None  # first: its [s, V] tensors die before the CE's exist
        ce, grad = _ce_rows(z, y[rows])
        loss, grad = ce_w[rows] * ce, grad.mul_(ce_w[rows][:, None])
        if kd is not None:
            w = kd_w[rows][s]
            loss[s] += w * kd[0]
            grad.index_put_((s,), kd[1].mul_(w[:, None]), accumulate=True)  # grad[s] += ..., no copy of grad[s]
        return loss, grad
    return _StreamedHeadLoss.apply(student_h[valid], student_w, torch.ones_like(ce_w), chunk, mixed_rows)


# ---------------------------------------------------------------------------- AT-KD baseline

def at_kd_rows(zs, zt, y, hard, T=1.0):
    """Per row, AT-KD's terms (Zhong et al. 2024, "Revisiting Knowledge Distillation for
    Autoregressive Language Models"; SPEC 2). Each distribution is split into the gold class y
    and the rest (the decoupled-KD view):
      binary     KL((p(y), 1 - p(y)) || (q(y), 1 - q(y)))
      non-target KL(p(. | not y) || q(. | not y)), both renormalised over the other classes.
    A hard row gets binary + non-target, an easy row the non-target term only; logits / T and a
    T^2 factor as in SPEC 1. Differentiable in zs. -> [R].
    What this follows: the exact split KL(p || q) = binary + (1 - p(y)) * non-target couples the
    two terms through the teacher's uncertainty 1 - p(y); AT-KD decouples them (no 1 - p(y)
    factor on the non-target term), as SPEC 2 states. Choices of ours where SPEC 2 is silent:
    the hard/easy split is made per sequence (ties to the earlier position), and T applies to
    both terms."""
    zs, zt = tempered(_wide(zs), T), tempered(_wide(zt), T)
    gold = F.one_hot(y, zs.shape[-1]).bool()

    def split(z):  # log p(y), log(1 - p(y)), log of the renormalised non-gold distribution
        lse, rest = torch.logsumexp(z, -1), z.masked_fill(gold, float("-inf"))
        return z[gold] - lse, torch.logsumexp(rest, -1) - lse, F.log_softmax(rest, -1)
    lp_y, lp_not, lp_rest = split(zt)
    lq_y, lq_not, lq_rest = split(zs)
    binary = lp_y.exp() * (lp_y - lq_y) + lp_not.exp() * (lp_not - lq_not)
    non_target = (lp_rest.exp() * (lp_rest - lq_rest).masked_fill(gold, 0.0)).sum(-1)
    return T * T * (hard * binary + non_target)


def at_kd_weights(gold_ce, valid, hard_share=0.5, easy_weight=0.2):
    """AT-KD's split and weights (SPEC 2). Positions are ranked, per sequence, by the teacher's
    uncertainty 1 - p_t(y_t) (from the teacher CE -log p_t(y_t), `gold_ce` [B, L]); the most uncertain
    `hard_share` are hard. Row weights: easy_weight for easy rows, 1 - easy_weight for hard
    ones, divided by the sequence's number of positions and averaged over sequences, i.e.
    L_i = (0.2 * sum_easy + 0.8 * sum_hard) / n_i. -> (hard bool [B, L], weights [B, L])."""
    hard = topk_positions(-torch.expm1(-gold_ce), hard_share, valid)
    w = per_sequence_weights(valid, torch.float64)
    return hard, w * torch.where(hard, w.new_tensor(1.0 - easy_weight), w.new_tensor(easy_weight))


def at_kd_loss(student_logits, teacher_logits, targets, T=1.0):
    """AT-KD on dense logits [B, L, V] (the readable reference flow)."""
    valid = targets >= 0
    y = targets.clamp_min(0)
    with torch.no_grad():
        hard, w = at_kd_weights(_ce(teacher_logits.flatten(0, 1), y.flatten()).view_as(y), valid)
    rows = at_kd_rows(student_logits[valid], teacher_logits[valid], y[valid], hard[valid], T)
    return (w[valid].to(rows.dtype) * rows).sum()


def streamed_at_kd_loss(student_h, student_w, teacher_h, teacher_w, targets, T=1.0, chunk_rows=None):
    """`at_kd_loss` in chunks of rows, equal in value and gradient: AT-KD needs teacher and
    student logits at every valid row, but one chunk of [rows, V] at a time. A first no-grad
    pass scores the teacher's uncertainty; the second computes each chunk's loss and its exact
    gradient (autograd on that chunk alone)."""
    check_temperature(T)
    valid = targets >= 0
    ce = chunked_scores("teacher_ce", student_h.detach(), student_w.detach(), valid, teacher_h, teacher_w,
                        targets, chunk_rows)
    hard, w = at_kd_weights(ce, valid)
    t_rows, y, hard = teacher_h[valid], targets[valid], hard[valid]
    wt = chunk_weight(teacher_w)

    def rows_loss(z, rows):
        with torch.no_grad():
            z_teacher = _wide(t_rows[rows] @ wt.T)
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            loss = at_kd_rows(z, z_teacher, y[rows], hard[rows], T)
            grad, = torch.autograd.grad(loss.sum(), z)
        return loss.detach(), grad
    dtype = _wide_dtype(student_h)
    return _StreamedHeadLoss.apply(student_h[valid], student_w, w[valid].to(dtype),
                                   chunk_rows or default_chunk_rows(student_w.shape[0]), rows_loss)


@dataclass
class KDConfig:
    """One distillation method. method: 'ce' (no teacher), 'full_kd' (every position),
    'sekd' (positions chosen by `metric` and `policy` with budget k; the defaults,
    student_entropy + topk, are SE-KD), 'random_pos' (k of the positions uniformly at random)
    or 'at_kd' (the AT-KD baseline). flow: 'streamed' (selective heads, chunked) or 'dense'
    (full [B, L, V] logits for both models, the paper's default flow). classes: 'full' (KL over
    all of V) or 'rskd' (U classes drawn from the teacher, SPEC 3; always streamed)."""
    method: str = "sekd"
    k: float = 0.2
    T: float = 1.0
    lam: float = 1.0
    flow: str = "streamed"
    chunk_rows: int = 0
    metric: str = "student_entropy"
    policy: str = "topk"
    gls_queue: int = 30_000
    curriculum_steps: int = 4_000
    classes: str = "full"
    U: int = 64
    divergence: str = "forward"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.flow not in ("streamed", "dense"):
            raise ValueError(f"unknown flow '{self.flow}': choose streamed or dense")
        check_budget(self.k)
        check_temperature(self.T)
        check_lambda(self.lam)
        get_metric(self.metric)
        get_policy(self.policy)
        PositionState(self.gls_queue, self.curriculum_steps)  # checks both
        if self.classes not in ("full", "rskd"):
            raise ValueError(f"unknown classes '{self.classes}': choose full or rskd")
        if self.classes == "rskd":
            check_draws(self.U)
            if self.method == "ce" or self.flow == "dense":
                raise ValueError("RS-KD classes need a KD method (not ce) and the streamed flow")
        check_divergence(self.divergence)
        if self.divergence == "reverse" and (self.method in ("ce", "at_kd") or self.classes == "rskd"):
            raise ValueError("the reverse KL needs the teacher's full distribution: use it with full_kd, sekd "
                             "or random_pos and full classes (not ce, at_kd or RS-KD)")

    @property
    def uses_teacher(self):
        return self.method != "ce" and self.lam > 0

    def new_state(self):
        return PositionState(self.gls_queue, self.curriculum_steps)


METHODS = ("ce", "full_kd", "sekd", "random_pos", "at_kd")


def select_positions(student_h, student_w, valid, cfg, teacher_h=None, teacher_w=None, targets=None, state=None):
    """The position mask m of a method (SPEC 2): every valid position for Full KD; otherwise the
    scores u(t) of cfg.metric ('random' for RandomPos; no grad, in chunks) through cfg.policy.
    -> bool [B, L], or float counts for pos-RS-KD(*). `state`: a PositionState (GLS, curriculum)."""
    if cfg.method not in ("sekd", "random_pos"):
        return valid
    metric, policy = ("random", "topk") if cfg.method == "random_pos" else (cfg.metric, cfg.policy)
    if cfg.k == 1.0 and policy in ("topk", "curriculum"):
        return valid
    scores = chunked_scores(metric, student_h.detach(), student_w.detach(), valid, teacher_h, teacher_w,
                            targets, cfg.chunk_rows or None)
    return get_policy(policy)(scores, cfg.k, valid, state if state is not None else cfg.new_state())


def distill_loss(student, teacher, idx, targets, cfg, state=None, draws=None):
    """One step's loss for `cfg`: student hidden states with grad, teacher hidden states
    without, positions selected, then the streamed (or dense) KD loss. `state` carries GLS's
    queue and curriculum's step between calls. RS-KD classes go to `rskd_distill_loss`
    (with `draws` from the offline cache, if given). -> (loss, n_selected)."""
    if cfg.classes == "rskd":
        return rskd_distill_loss(student, teacher, idx, targets, cfg, draws, state)
    student_h = student.hidden(idx)
    valid = targets >= 0
    row_weights = None
    if cfg.method == "ce":  # plain cross-entropy: lambda = 0, no teacher
        lam, teacher_h, mask = 0.0, None, valid
    else:
        lam = cfg.lam
        with torch.no_grad():
            teacher_h = teacher.hidden(idx)
        if cfg.method == "at_kd":
            return _at_kd_step(student, teacher, student_h, teacher_h, targets, cfg), int(valid.sum())
        mask = select_positions(student_h, student.head_weight, valid, cfg, teacher_h, teacher.head_weight,
                                targets, state)
        if mask.dtype != torch.bool:  # pos-RS-KD counts
            row_weights = kl_row_weights(mask, cfg.k, valid, cfg.policy)
            mask = mask > 0
    teacher_w = teacher.head_weight if teacher_h is not None else None
    if cfg.flow == "dense":
        teacher_logits = teacher.head(teacher_h) if teacher_h is not None else None
        loss = kd_loss(student.head(student_h), teacher_logits, targets, mask, cfg.T, lam, row_weights,
                       cfg.divergence)
    else:
        loss = streamed_kd_loss(student_h, student.head_weight, teacher_h, teacher_w, targets,
                                mask, cfg.T, lam, cfg.chunk_rows or None, row_weights, cfg.divergence)
    return loss, int(mask.sum())


def _at_kd_step(student, teacher, student_h, teacher_h, targets, cfg):
    """lam * AT-KD + (1 - lam) * CE, in the dense or streamed flow."""
    if cfg.flow == "dense":
        loss = cfg.lam * at_kd_loss(student.head(student_h), teacher.head(teacher_h), targets, cfg.T)
        ce = kd_loss(student.head(student_h), None, targets, T=cfg.T, lam=0.0) if cfg.lam < 1 else 0.0
    else:
        loss = cfg.lam * streamed_at_kd_loss(student_h, student.head_weight, teacher_h, teacher.head_weight,
                                             targets, cfg.T, cfg.chunk_rows or None)
        ce = 0.0 if cfg.lam == 1 else streamed_kd_loss(student_h, student.head_weight, None, None, targets,
                                                        lam=0.0, chunk_rows=cfg.chunk_rows or None)
    return loss + (1 - cfg.lam) * ce


# ---------------------------------------------------------------------------- on-policy distillation
# Agarwal et al. 2024 (GKD): the student also learns on text it wrote itself. A share of each batch's
# sequences keep only their first P tokens as a prompt; the student samples the rest, and KD (SE-KD's
# selection among the generated positions; reverse KL by default, as the paper's on-policy table)
# is applied there. Generated text has no gold token, so lambda's CE part acts on real data only.

@torch.no_grad()
def sample_continuations(model, prompts, n_new, generator=None):
    """Extend each prompt [B, P] by n_new tokens sampled from `model` at temperature 1 (`GPT.generate`;
    the whole prefix is recomputed for each token, no KV cache: cheap at these sizes).
    Dropout is off while sampling. -> [B, P + n_new]."""
    was_training = model.training
    model.eval()
    seq, _ = model.generate(prompts, n_new, 1.0, 0, generator)
    model.train(was_training)
    return seq


def on_policy_batch(student, idx, prompt_len, generator=None):
    """On-policy sequences from data samples idx [B, L]: the first `prompt_len` tokens are the prompt,
    the student samples the other L - P + 1. -> (x, targets), both [B, L]: x is the prompt and the
    first L - P sampled tokens, targets x shifted by one with -1 (padding) before the first sampled
    token, so the valid positions are exactly the L - P + 1 that predict a sampled token."""
    L = idx.shape[1]
    if not 1 <= prompt_len <= L:
        raise ValueError(f"prompt length must be in [1, {L}] (the sequence length), got {prompt_len}")
    seq = sample_continuations(student, idx[:, :prompt_len], L - prompt_len + 1, generator)
    targets = seq[:, 1:].clone()
    targets[:, :prompt_len - 1] = -1
    return seq[:, :-1], targets


def check_on_policy(cfg):
    if not cfg.uses_teacher or cfg.method == "at_kd" or cfg.classes != "full":
        raise ValueError(f"on-policy distillation needs a KD method with the teacher's full distribution "
                         f"(full_kd, sekd, random_pos; lambda > 0), not {cfg.method} with {cfg.classes} classes")


def on_policy_rows(batch_size, share):
    """How many of a batch's sequences are on-policy: share * B rounded to the nearest integer."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"on-policy share must be in [0, 1], got {share}")
    return int(math.floor(share * batch_size + 0.5))


def on_policy_distill_loss(student, teacher, idx, targets, cfg, share, prompt_len, generator=None, state=None):
    """One step of mixed distillation: the last `on_policy_rows(B, share)` sequences of the batch
    become on-policy (`on_policy_batch`), the others stay real data. The loss is the mean over
    sequences (SPEC 1): (n_real * L_real + n_on * L_on) / B, where L_real is `distill_loss` on the
    real sequences (lam * KD + (1 - lam) * CE) and L_on is the KD term alone on the on-policy ones
    (lambda = 1: a sampled token is not a gold target). -> (loss, n_selected)."""
    check_on_policy(cfg)
    B = idx.shape[0]
    n_on = on_policy_rows(B, share)
    n_real = B - n_on
    loss, n_sel = 0.0, 0
    if n_real:
        real, n = distill_loss(student, teacher, idx[:n_real], targets[:n_real], cfg, state)
        loss, n_sel = loss + real * (n_real / B), n_sel + n
    if n_on:
        x, y = on_policy_batch(student, idx[n_real:], prompt_len, generator)
        on, n = distill_loss(student, teacher, x, y, replace(cfg, lam=1.0), state)
        loss, n_sel = loss + on * (n_on / B), n_sel + n
    return loss, n_sel


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
    p = F.softmax(tempered(_wide(teacher_logits).reshape(-1, V), T), dim=-1)
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
    w = chunk_weight(teacher_w)
    parts = [rskd_sample(rows[i:i + chunk] @ w.T, U, T, generator) for i in range(0, rows.shape[0], chunk)]
    if not parts:
        parts = [rskd_sample(rows.new_zeros(0, teacher_w.shape[0]), U, T)]
    shape = (*teacher_h.shape[:-1], U)
    return torch.cat([i for i, _ in parts]).view(shape), torch.cat([c for _, c in parts]).view(shape)


def _rskd_rows(z_student, ids, counts, T):
    """Per row: T^2 sum_v p~(v) log(p~(v) / q^T(v)) over the drawn ids, p~ = counts / U, with q^T
    the student's softmax over all of V; and its gradient w.r.t. the student logits, T (q^T - p~)."""
    p = counts.to(z_student.dtype) / counts.sum(-1, keepdim=True)
    logq = F.log_softmax(tempered(z_student, T), dim=-1)
    loss = T * T * (torch.xlogy(p, p) - p * logq.gather(1, ids)).sum(-1)  # padding: p = 0, adds 0
    grad = logq.exp_().scatter_add_(1, ids, -p)
    return loss, grad if T == 1 else grad.mul_(T)


def rskd_loss(student_h, student_w, ids, counts, targets, mask=None, T=1.0, lam=1.0, chunk_rows=None):
    """The RS-KD loss (SPEC 3), streamed like `streamed_kd_loss`: lam * the per-sequence mean over
    the positions in `mask` of the sparse KL above + (1 - lam) * CE over every valid position.
    ids, counts [B, L, U]: the teacher's draws (`rskd_sample` or the offline cache); only the
    rows in `mask` are read. student_h [B, L, D] with grad; gradients are exact."""
    check_temperature(T)
    check_lambda(lam)
    valid = targets >= 0
    mask = valid if mask is None else mask & valid
    chunk = chunk_rows or default_chunk_rows(student_w.shape[0])
    if lam == 0:
        return streamed_kd_loss(student_h, student_w, None, None, targets, lam=0.0, chunk_rows=chunk)
    kd_weights = per_sequence_weights(mask, _wide_dtype(student_h))
    if lam == 1:
        ids_m, counts_m = ids[mask], counts[mask]
        return _StreamedHeadLoss.apply(student_h[mask], student_w, kd_weights[mask], chunk,
                                       lambda z, rows: _rskd_rows(z, ids_m[rows], counts_m[rows], T))
    ids_v, counts_v = ids[valid], counts[valid]
    return _kd_and_ce_pass(student_h, student_w, targets, mask, kd_weights, lam, chunk,
                           lambda z, i: _rskd_rows(z, ids_v[i], counts_v[i], T))


def rskd_distill_loss(student, teacher, idx, targets, cfg, draws=None, state=None):
    """One step with RS-KD classes at the positions of `cfg.method` (SPEC 3, 5). The teacher's
    draws are `draws` = (ids, counts) [B, L, U] when given (SE-KD_3X reads them from the offline
    cache: the teacher is not used at all), otherwise drawn now from the teacher's logits at the
    selected rows only. Positions are still chosen online. -> (loss, n_selected)."""
    student_h = student.hidden(idx)
    valid = targets >= 0
    mask = select_positions(student_h, student.head_weight, valid, cfg, state=state)
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
    ws, wt = chunk_weight(student_w), chunk_weight(teacher_w) if ht is not None else None
    for i in range(0, hs.shape[0], chunk):
        zq = _wide(hs[i:i + chunk] @ ws.T)
        logq = F.log_softmax(zq, -1)
        conf, pred = logq.max(-1)
        out["n"] += len(zq)
        out["ce"] += F.nll_loss(logq, y[i:i + chunk], reduction="sum").item()
        out["conf"].append(conf.exp().cpu())
        out["correct"].append((pred == y[i:i + chunk]).cpu())
        if ht is not None:
            zp = _wide(ht[i:i + chunk] @ wt.T)
            out["kl"] += kl_per_position(zp, zq).sum().item()
            out["agree"] += (zp.argmax(-1) == pred).sum().item()
    return out


# ============================================================================ +. memory

class LiveBytes(TorchDispatchMode):
    """Measures tensor memory on any device, CPU included: while active, every storage that an
    op creates is counted until it is freed; `peak` is the most bytes alive at once.
    Tensors that existed before (parameters, optimizer state) are not counted, nor scratch
    memory a kernel frees before it returns; an op's output that shares storage with one of its
    inputs (an in-place update, a view) is not a new allocation.

    `match`, optional, picks some new tensors (e.g. the logits-sized ones, last dim V): they are
    also counted in `matched_live` / `matched_peak`, and `log` lists (op, shape, dtype, bytes)."""

    def __init__(self, match=None):
        super().__init__()
        self.live = self.peak = 0
        self.match, self.log = match, []
        self.matched_live = self.matched_peak = 0
        self._seen = set()

    def _free(self, key, nbytes, matched):
        self._seen.discard(key)
        self.live -= nbytes
        self.matched_live -= nbytes if matched else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
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
                        self.log.append((str(func.overloadpacket.__name__), tuple(t.shape), t.dtype, nbytes))
                    weakref.finalize(storage, self._free, key, nbytes, matched)
        return out


def state_bytes(*tensors_or_modules):
    """Bytes held by parameters / buffers of modules or by plain tensors."""
    total = 0
    for x in tensors_or_modules:
        ts = list(x.parameters()) + list(x.buffers()) if isinstance(x, nn.Module) else [x]
        total += sum(t.numel() * t.element_size() for t in ts)
    return total


# ============================================================================ 7. memory: the flows of SPEC 6, accounted

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


def _no_phase(name):
    return nullcontext()


def flow_loss(student, teacher, idx, targets, flow, k=0.2, T=1.0, chunk_rows=None, phase=_no_phase):
    """The pure-KL (lambda = 1) loss of one step, computed the way `flow` does it (SPEC 6):
    which logits exist as [B, L, V], which only at the N_sel selected rows, which in chunks.
    All flows give the same loss for the same selection. `phase(name)` is entered around
    each phase (teacher forward, student forward, selection, teacher head, loss) so that
    a caller can measure it. Returns (loss, mask); no logits outlive the call."""
    check_flow(flow)
    valid = targets >= 0
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
            scores = chunked_entropy(student_h.detach(), student.head_weight.detach(), 1.0, chunk_rows)
            mask = topk_positions(scores, 1.0 if flow == "dense_entropy" else k, valid)
    if flow in ("teacher_head", "both_heads"):
        with phase("teacher head"), torch.no_grad():
            t_logits = teacher.head(teacher_h[mask])  # [N_sel, V]
    with phase("loss"):
        if flow in ("dense", "dense_entropy", "chunked"):
            loss = kd_loss(s_logits, t_logits, targets, mask, T)
        elif flow == "streamed":
            loss = streamed_kd_loss(student_h, student.head_weight, teacher_h, teacher.head_weight,
                                    targets, mask, T, 1.0, chunk_rows)
        else:
            t_rows = t_logits if flow != "student_head" else t_logits[mask]
            del t_logits  # the teacher's [B, L, V], once gathered, is not needed
            s_rows = s_logits[mask] if dense_s else student.head(student_h[mask])
            del s_logits
            kl = T * T * kl_per_position(t_rows, s_rows, T)
            loss = (per_sequence_weights(mask, kl.dtype)[mask] * kl).sum()
    return loss, mask


def logits_sized(vocab_size):
    """A `LiveBytes(match=...)` predicate: tensors whose last dimension is the vocabulary."""
    return lambda t: t.dim() >= 1 and t.shape[-1] == vocab_size


class LogitLedger:
    """The analytic model of one step's logits-sized tensors (last dim V): each one the code
    creates, in program order, with its dtype, and when it is freed; `peaks[phase]` is the
    most bytes of them alive at once during that phase (SPEC 6)."""

    def __init__(self, V, half, T=1.0):
        self.V, self.half, self.lo, self.T = V, half, 2 if half else 4, T  # head outputs: bf16 or float32
        self.live, self.phase, self.peaks, self.tensors = 0, None, {}, []

    def enter(self, phase):
        self.phase = phase
        self.peaks[phase] = self.live

    def new(self, what, rows, nbytes_per_el):
        t = {"phase": self.phase, "what": what, "shape": [rows, self.V],
             "dtype": {2: "bfloat16", 4: "float32"}[nbytes_per_el], "bytes": rows * self.V * nbytes_per_el}
        self.tensors.append(t)
        self.live += t["bytes"]
        self.peaks[self.phase] = max(self.peaks[self.phase], self.live)
        return t

    def free(self, *ts):
        self.live -= sum(t["bytes"] for t in ts if t is not None)

    # --- the operations of sekd.py, as the tensors they create

    def head(self, rows, d, who, grad, chunked=False):
        """h @ W.T; under autocast W.T is first copied to bf16 ([D, V]), and the student's copy
        is saved for backward. A chunk loop (`chunked`) multiplies by `chunk_weight`'s [V, D] copy,
        made once per pass, not logits-sized: `memory_account` counts it."""
        w = self.new(f"{who} head weight, bf16 copy [D={d}, V]", d, 2) if self.half and not chunked else None
        z = self.new(f"{who} logits", rows, self.lo)
        if not grad:
            self.free(w)
        return z, w

    def wide(self, rows, what):
        return self.new(f"{what}, float32 copy", rows, 4) if self.half else None

    def log_softmax(self, rows, what, wide=True, T=None):
        """F.log_softmax(tempered(_wide(z), T)): the copy and the division (none at T = 1) are
        freed once it exists."""
        w = self.wide(rows, what) if wide else None
        d = self.new(f"{what} / T", rows, 4) if (self.T if T is None else T) != 1 else None
        self.free(w)
        out = self.new(f"{what} log-softmax", rows, 4)
        self.free(d)
        return out

    def entropy(self, rows, z):
        """token_entropy of logits z at T = 1 (selection scores are never tempered), without
        gradient: log-softmax, its exp (then q log q in place); all freed after."""
        logq = self.log_softmax(rows, "student (selection)", T=1.0)
        q = self.new("student (selection) softmax, then q log q", rows, 4)
        self.free(q, logq, z)

    def kl(self, rows):
        """kl_per_position(zt, zs): keeps log q and p for backward, returns them."""
        logp = self.log_softmax(rows, "teacher")
        logq = self.log_softmax(rows, "student")
        p = self.new("teacher softmax p", rows, 4)
        diff = self.new("log p - log q", rows, 4)
        prod = self.new("p * (log p - log q)", rows, 4)
        self.free(prod, diff, logp)
        return logq, p

    def kl_backward(self, rows, logq, p):
        """The logit gradient of the KL, T (q - p), built in four steps (three at T = 1)."""
        g1 = self.new("grad of (log p - log q)", rows, 4)
        self.free(p)
        g2 = self.new("grad of log q", rows, 4)
        self.free(g1)
        g3 = self.new("grad of student logits / T", rows, 4) if self.T != 1 else None
        self.free(g2, logq)
        g4 = self.new("student logit gradient", rows, 4)
        self.free(g3)
        if self.half:
            g5 = self.new("student logit gradient, bf16", rows, 2)
            self.free(g4)
            return g5
        return g4


def chunk_sizes(n, chunk_rows):
    return [min(chunk_rows, n - i) for i in range(0, n, chunk_rows)]


def logit_ledger(flow, BL, n_sel, V, d_student, d_teacher, chunk_rows, half=False, select=True, lam=1.0,
                 sel_chunks=None, T=1.0):
    """Run the analytic model of `flow_loss` + backward for BL valid positions, n_sel selected
    (SPEC 6): which logits-sized tensors exist in which phase, and the peak bytes per phase.
    select=False: no entropy pass (what `distill_loss` does for Full KD).
    lam < 1 (flows dense, chunked, streamed: those `distill_loss` runs): the CE term at every
    row is added, as `kd_loss` and `_kd_and_ce_pass` compute it; lam = 0 is plain CE, no teacher.
    `sel_chunks`: the streamed lam < 1 pass's selected rows per chunk of valid rows (default: the
    n_sel selected rows spread evenly, as SE-KD's per-sequence budget roughly does)."""
    check_flow(flow)
    check_lambda(lam)
    if lam < 1 and flow not in ("dense", "chunked", "streamed"):
        raise ValueError(f"the lambda < 1 account covers the dense, chunked and streamed flows, not '{flow}'")
    lg = LogitLedger(V, half, T)
    dense_t = lam > 0 and flow in ("dense", "dense_entropy", "chunked", "student_head")
    dense_s = flow in ("dense", "dense_entropy", "chunked", "teacher_head")
    rows = BL if flow in ("dense", "dense_entropy", "chunked") else n_sel  # kd_loss: KL at every row, then masked
    zt = zs = ws = None
    lg.enter("teacher forward")
    if dense_t:
        zt, _ = lg.head(BL, d_teacher, "teacher", grad=False)
    lg.enter("student forward")
    if dense_s:
        zs, ws = lg.head(BL, d_student, "student", grad=True)
    lg.enter("selection")
    if flow != "dense" and select:
        for c in chunk_sizes(BL, chunk_rows):
            z, _ = lg.head(c, d_student, "student (selection)", grad=False, chunked=True)
            lg.entropy(c, z)
    if flow in ("teacher_head", "both_heads"):
        lg.enter("teacher head")
        zt, _ = lg.head(n_sel, d_teacher, "teacher", grad=False)
    lg.enter("loss")
    if flow == "streamed":
        if lam == 1:
            _streamed_ledger(lg, n_sel, d_student, d_teacher, chunk_rows)
        else:
            sizes = chunk_sizes(BL, chunk_rows)
            if lam == 0:  # plain CE: no KL rows
                sel_chunks = [0] * len(sizes)
            elif sel_chunks is None:  # the selected rows spread evenly over the chunks
                sel_chunks = [(i + c) * n_sel // BL - i * n_sel // BL for i, c in zip(range(0, BL, chunk_rows), sizes)]
            _mixed_ledger(lg, sizes, sel_chunks, d_student, d_teacher)
        lg.enter("backward")
        lg.enter("optimizer step")
        return lg
    if flow in ("teacher_head", "student_head", "both_heads"):
        if flow == "student_head":
            zt_rows = lg.new("teacher logits, gathered rows", n_sel, lg.lo)
            lg.free(zt)
            zt = zt_rows
        if dense_s:
            zs_rows = lg.new("student logits, gathered rows", n_sel, lg.lo)
            lg.free(zs)
            zs = zs_rows
        else:
            zs, ws = lg.head(n_sel, d_student, "student", grad=True)
    logq = p = ce = None
    if lam > 0:
        logq, p = lg.kl(rows)
    if lam < 1:  # F.cross_entropy over every row (no / T): its log-softmax is saved for backward
        w = lg.wide(BL, "student (CE)")
        ce = lg.new("student (CE) log-softmax", BL, 4)
        lg.free(w)
    lg.free(zt, zs)  # the function returns: only what backward saved stays
    lg.enter("backward")
    g = _ce_backward(lg, BL, ce) if lam < 1 else None  # autograd runs the CE branch first
    if lam > 0:
        g_kl = lg.kl_backward(rows, logq, p)
        if g is not None:  # the two branches' logit gradients are summed
            g_sum = lg.new("student logit gradient, CE + KL", BL, lg.lo)
            lg.free(g, g_kl)
            g_kl = g_sum
        g = g_kl
    if flow == "teacher_head":  # the gather's backward scatters the rows' gradient into [B, L, V]
        zeros = lg.new("zeros [B, L, V] for the gathered rows' gradient", BL, lg.lo)
        scattered = lg.new("student logit gradient, scattered to [B, L, V]", BL, lg.lo)
        lg.free(zeros, g)
        g = scattered
    lg.free(g, ws)
    if half:  # the gradient of autocast's bf16 weight copy, back to float32
        lg.free(lg.new("grad of the student head weight copy, float32 [D, V]", d_student, 4))
    lg.enter("optimizer step")
    return lg


def _ce_backward(lg, rows, ce):
    """F.cross_entropy's backward: the NLL's gradient, then the log-softmax's; under autocast the
    result is copied back to the bf16 logits' dtype."""
    g1 = lg.new("grad of the CE's NLL", rows, 4)
    g2 = lg.new("grad of the CE's log-softmax", rows, 4)
    lg.free(g1, ce)
    if lg.half:
        g3 = lg.new("CE logit gradient, bf16", rows, 2)
        lg.free(g2)
        return g3
    return g2


def _chunk_logits(lg, c, d, who):
    """One chunk's logits in the streamed pass: _wide(h @ W.T), float32 (under autocast the bf16
    product is a temporary)."""
    z, _ = lg.head(c, d, f"{who} chunk", grad=False, chunked=True)
    if lg.half:
        z_wide = lg.new(f"{who} chunk logits, float32", c, 4)
        lg.free(z)
        z = z_wide
    return z


def _mixed_ledger(lg, sizes, sel_chunks, d_student, d_teacher):
    """`_kd_and_ce_pass` (0 < lam < 1) and plain streamed CE (lam = 0): per chunk of c valid rows,
    the student logits; first, at the chunk's s selected rows, the rows' copy, the teacher's logits
    and the KL's tensors, of which only the KL gradient survives; then the CE log-softmax of all c
    rows (turned into the gradient in place), and the KL gradient added into it, in place. Peak
    (float32): max(c + 5 s, 2 c + s) rows of V. Each chunk's tensors are freed before the next starts."""
    for c, s in zip(sizes, sel_chunks):
        zs, g_kl = _chunk_logits(lg, c, d_student, "student"), None
        if s:  # the KL rows first: only their gradient is alive when the CE's tensors are made
            zs_s = lg.new("student chunk, selected rows", s, 4)
            g_kl = _chunk_kd(lg, s, d_teacher, "student chunk (KL rows)")
            lg.free(zs_s)
        g = lg.new("student chunk CE log-softmax, then gradient", c, 4)
        lg.free(g_kl, zs)  # rows_loss returns: only the chunk's gradient stays
        _chunk_gradient_done(lg, c, g)


def _chunk_kd(lg, c, d_teacher, student_what):
    """The teacher's logits of c rows, then `_kd_rows` on them: both log-softmaxes and p (the KL
    is summed in log p's storage, so it makes no [c, V] tensor), and the gradient T (q - p) made in
    log q's storage, the one tensor returned alive."""
    zt = _chunk_logits(lg, c, d_teacher, "teacher")
    logq = lg.log_softmax(c, student_what, wide=False)
    logp = lg.log_softmax(c, "teacher chunk", wide=False)
    p = lg.new("teacher chunk softmax p", c, 4)
    lg.free(logp, p, zt)
    return logq


def _chunk_gradient_done(lg, c, g):
    """The chunk's gradient goes through the head's two matmuls (under autocast as a bf16 copy), then dies."""
    if lg.half:
        lg.free(lg.new("chunk logit gradient, bf16", c, 2))
    lg.free(g)


def _streamed_ledger(lg, n_sel, d_student, d_teacher, chunk_rows):
    """streamed_kd_loss (lam = 1): per chunk of c selected rows, student and teacher logits
    (float32), the KL's tensors and the gradient T (q - p); each chunk's tensors are freed
    before the next one starts, so the peak is one chunk's 5 tensors."""
    for c in chunk_sizes(n_sel, chunk_rows):
        zs = _chunk_logits(lg, c, d_student, "student")
        g = _chunk_kd(lg, c, d_teacher, "student chunk")
        lg.free(zs)
        _chunk_gradient_done(lg, c, g)


def param_bytes(model, trainable_only=False):
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


def adamw_bytes(model, step_on_device=True):
    """AdamW keeps exp_avg and exp_avg_sq (each the size of a parameter, in its dtype) and a
    float32 `step` per parameter tensor; on CUDA the step counters stay on the CPU."""
    ps = [p for p in model.parameters() if p.requires_grad]
    return 2 * sum(p.numel() * p.element_size() for p in ps) + (4 * len(ps) if step_on_device else 0)


def activation_bytes(config, B, L, half=False, grad=True):
    """Estimate of a GPT body's activation bytes (`hidden`, no head). With grad: the tensors
    autograd saves, per layer and token about 16 vectors of width D (LayerNorm inputs and
    outputs, q k v, attention output and its copy, the two MLP tensors of width 4D), plus
    LayerNorm statistics and the attention log-sum-exp; under bf16 autocast the two residual
    vectors stay float32 and the rest are bf16. Without grad (the teacher): the peak of one
    block, about 11 vectors of width D, plus the output."""
    D, H, n = config.n_embd, config.n_head, config.n_layer
    tokens, act = B * L, 2 if half else 4
    if grad:
        per_layer = D * (2 * 4 + 14 * act) + 4 * (4 + H)
        return tokens * (n * per_layer + 2 * D * 4 + 8)
    return tokens * D * (3 * 4 + 8 * act) + tokens * D * 4


def ledger_account(student, teacher, B, L, flow, k=0.2, chunk_rows=None, half=False, on_cuda=False, select=True,
                   lam=1.0, T=1.0):
    """The analytic memory account of one training step of `flow` (SPEC 6): bytes of
    parameters, gradients and AdamW state per model, activation estimates, every logits-sized
    tensor the flow creates (from `logit_ledger`, with the CE term when lam < 1), and the
    expected peak per phase. lam = 0: plain CE, no teacher in memory.
    Assumes every position is valid (the benchmark's random tokens)."""
    V = student.config.vocab_size
    chunk = chunk_rows or default_chunk_rows(V)
    n_sel = B * L if flow == "dense" else int(budget_counts(1.0 if flow == "dense_entropy" else k,
                                                             torch.tensor([L])).item()) * B
    lg = logit_ledger(flow, B * L, n_sel, V, student.config.n_embd, teacher.config.n_embd, chunk, half, select, lam,
                      T=T)
    runs = lam > 0  # plain CE (lam = 0) needs no teacher at all
    s_params, t_params = param_bytes(student), param_bytes(teacher) * runs
    s = {"params": s_params, "grads": param_bytes(student, True), "adamw": adamw_bytes(student, not on_cuda),
         "activations": activation_bytes(student.config, B, L, half, grad=True)}
    t = {"params": t_params, "activations": activation_bytes(teacher.config, B, L, half, grad=False) * runs}
    t_hidden = B * L * teacher.config.n_embd * 4 * runs  # ln_f output, float32 even under autocast
    resident = s_params + t_params + s["adamw"]
    head_grad = V * student.config.n_embd * 4 if flow == "streamed" else 0  # its float32 dL/dW, kept for backward
    # under autocast, `chunk_weight`'s bf16 [V, D] head copies, alive through the chunked pass that made them
    copies = {"selection": V * student.config.n_embd * 2 * half * select * (flow != "dense"),
              "loss": V * (student.config.n_embd + teacher.config.n_embd * runs) * 2 * half * (flow == "streamed")}
    phases = {
        "teacher forward": resident + t["activations"] + lg.peaks["teacher forward"],
        "student forward": resident + t_hidden + s["activations"] + lg.peaks["student forward"],
        "selection": resident + t_hidden + s["activations"] + copies["selection"] + lg.peaks["selection"],
        "loss": resident + t_hidden + s["activations"] + head_grad + copies["loss"] + lg.peaks["loss"],
        "backward": resident + s["activations"] + s["grads"] + head_grad + lg.peaks["backward"],
        "optimizer step": resident + s["grads"] + s_params,  # foreach AdamW: one parameter-sized temporary
    }
    if "teacher head" in lg.peaks:
        phases["teacher head"] = resident + t_hidden + s["activations"] + lg.peaks["teacher head"]
    t_logits = max((x["bytes"] for x in lg.tensors if x["what"].startswith("teacher")
                    and "logits" in x["what"]), default=0)
    total = max(phases.values())
    return {"flow": flow, "B": B, "L": L, "V": V, "n_sel": n_sel, "chunk_rows": chunk, "lam": lam, "T": T,
            "dtype": "bfloat16" if half else "float32", "student": s, "teacher": t,
            "logits": lg.tensors, "logit_peaks": lg.peaks, "logit_peak": max(lg.peaks.values()),
            "head_copies": copies, "phases": phases, "total": total,
            "teacher_total": t_params + max(t["activations"] + lg.peaks["teacher forward"], t_hidden + t_logits),
            "student_total": total - t_params - t_hidden}


def n_params(config):
    """Parameters of a GPT, by hand: the token and position embeddings (V D + block D), per block two
    LayerNorms (4 D), qkv (3 D^2 + 3 D), the attention projection (D^2 + D) and the MLP (8 D^2 + 5 D),
    and the final LayerNorm (2 D). The LM head is tied to the token embedding: no extra weight."""
    D = config.n_embd
    return (config.vocab_size + config.block_size) * D + config.n_layer * (12 * D * D + 13 * D) + 2 * D


def memory_account(student_config, teacher_config, B, L, cfg, half=False):
    """The closed-form memory of one training step of `cfg` (paper §6's accounting), in bytes; every
    term can be checked with pencil and paper. N = B L rows, chunks of c rows, V the vocabulary.
      resident: weights (student + teacher, 4 bytes per parameter) and AdamW's two moments (8 per
        student parameter); gradients (4 per student parameter) during backward;
      activations: what the student's body saves for backward (`activation_bytes`), the teacher's
        final hidden states (N Dt floats) while the loss is computed;
      logits, in [rows, V] float32 tensors alive at once (the formulas the streamed code was written to):
        selection pass 3 c; streamed loss 5 c at lambda = 1, max(c + 5 s, 2 c + s) at 0 < lambda < 1
        (s = the selected rows of a chunk), 2 c for plain CE; the dense loss 7 N (2 N for CE) and its
        backward 3 N (5 N at 0 < lambda < 1); the streamed loss keeps its [V, Ds] head gradient;
      under autocast (`half`), the chunk loops' bf16 copies of the head weights (V D 2 bytes each).
    -> dict, or None for a step it does not model (RS-KD classes, AT-KD, teacher-reading metrics,
    pos-RS-KD, the reverse KL)."""
    if cfg.classes != "full" or cfg.method == "at_kd" or cfg.divergence != "forward" or (
            cfg.method == "sekd" and (needs_teacher(cfg.metric) or cfg.policy.startswith("pos_rs_kd"))):
        return None
    V, Ds, Dt, N = student_config.vocab_size, student_config.n_embd, teacher_config.n_embd, B * L
    lam = 0.0 if cfg.method == "ce" else cfg.lam
    c = min(N, cfg.chunk_rows or default_chunk_rows(V))
    selects = cfg.method in ("sekd", "random_pos") and cfg.k < 1
    share = int(budget_counts(cfg.k, torch.tensor(L))) / L if selects else 1.0
    n_sel, s = round(share * N), math.ceil(share * c)  # selected rows: in all, in one chunk
    row = V * 4  # one float32 row of logits
    sel_rows = 3 * c if selects and cfg.method == "sekd" else 0  # RandomPos draws without logits
    if cfg.flow == "streamed":
        loss_rows = 2 * c if lam == 0 else 5 * min(c, n_sel) if lam == 1 else max(c + 5 * s, 2 * c + s)
        back_rows, head_grad = 0, V * Ds * 4
    else:
        loss_rows = 2 * N if lam == 0 else 7 * N
        back_rows, head_grad = (5 if 0 < lam < 1 else 3) * N, 0
    p_s, p_t = 4 * n_params(student_config), 4 * n_params(teacher_config) * (lam > 0)
    a = {"student_params": p_s, "teacher_params": p_t, "grads": p_s, "adamw": 2 * p_s,
         "activations": activation_bytes(student_config, B, L, half),
         "teacher_hidden": N * Dt * 4 * (lam > 0), "head_grad": head_grad,
         "head_copies": 2 * V * (Ds + Dt * (lam > 0)) * half * (cfg.flow == "streamed"),
         "logits": max(sel_rows, loss_rows, back_rows) * row, "chunk_rows": c}
    resident = p_s + p_t + a["adamw"]
    held = resident + a["activations"] + a["teacher_hidden"]
    a["phases"] = {
        "teacher forward": resident + activation_bytes(teacher_config, B, L, half, grad=False) * (lam > 0),
        "selection": held + 2 * V * Ds * half + sel_rows * row,
        "loss": held + head_grad + a["head_copies"] + loss_rows * row,
        "backward": resident + a["activations"] + a["grads"] + head_grad + back_rows * row,
        "optimizer step": resident + a["grads"] + p_s}
    a.update(method=cfg.method, B=B, L=L, V=V, n_sel=n_sel, lam=lam, dtype="bfloat16" if half else "float32",
             total=max(a["phases"].values()))
    return a
