"""Tests for sekd: every formula against an independent float64 brute force (explicit loops or
full softmax), plus data, the training job and the errors a user can cause. Run: python -m pytest"""

import argparse
import collections
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from fractions import Fraction
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a Hub name fails fast instead of retrying

import numpy as np
import pytest
import torch

import data
import sekd
import train

torch.set_default_dtype(torch.float32)
torch.compiler.set_stance(
    "force_eager"
)  # compiling every test's shapes would double the suite's time
HERE = os.path.dirname(os.path.abspath(__file__))


# ============================================================================ builders


def kd(**fields):
    """A KDConfig of pure KL (lam = 1, Eq. 3's CE placement) unless `fields` say otherwise."""
    return sekd.KDConfig(**{"lam": 1.0, "ce_at": "selected", **fields})


def tiny_gpt(V=37, D=16, L=12, layers=2, heads=2, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return sekd.GPT(
        sekd.GPTConfig(vocab_size=V, block_size=L, n_layer=layers, n_head=heads, n_embd=D)
    ).to(dtype)


def random_case(B=3, L=6, V=7, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (B, L), generator=g)
    if pad:
        y[0, L - 2 :] = -1  # padding at the end of one sequence
    return s, t, y


def ragged_scores(B=6, L=40, seed=4):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, L, generator=g, dtype=torch.float64)
    valid = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        valid[b, L - 7 * b :] = False  # 40, 33, 26, ... valid positions
    return scores, valid


def float64_heads(seed, B, L, D, V, Dt=5):
    """Random student hidden states and head (with grad), teacher hidden states and head, and
    targets."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = (
        torch.randn(B, L, Dt, generator=g, dtype=torch.float64),
        torch.randn(V, Dt, generator=g, dtype=torch.float64),
    )
    return g, hs, ws, ht, wt, torch.randint(0, V, (B, L), generator=g)


# =========================================================================== brute-force references


def ref_softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def ref_entropy(row, T=1.0):
    p = ref_softmax([v / T for v in row])
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


def ref_kl(t_row, s_row, T=1.0):
    p, q = ref_softmax([v / T for v in t_row]), ref_softmax([v / T for v in s_row])
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def ref_ce(row, y):
    return -math.log(ref_softmax(row)[y])


def seq_mean(values_per_seq):
    """Mean over the sequences that have any value of each sequence's mean (paper Eq. 3)."""
    means = [sum(v) / len(v) for v in values_per_seq if v]
    return sum(means) / len(means) if means else 0.0


def ref_kd_loss(s_logits, t_logits, targets, mask, T, lam, reverse=False, ce_at="selected"):
    """Eq. 3 with explicit loops: L_i = sum_t m_t [lam KL(p^T || q^T) + (1 - lam) CE] / sum_t m_t
    (reverse: KL(q^T || p^T)), then the mean over the sequences with a selected position.
    ce_at='all': lam times that mean of the KL alone, plus (1 - lam) times the same mean of CE over
    all valid ones."""
    eq3_seqs, kl_seqs, ce_seqs = [], [], []
    for b in range(len(targets)):
        eq3_b, kl_b, ce_b = [], [], []
        for t in range(len(targets[b])):
            y = int(targets[b][t])
            if y < 0:
                continue
            s_row, t_row = [float(v) for v in s_logits[b][t]], [float(v) for v in t_logits[b][t]]
            ce_b.append(-math.log(ref_softmax(s_row)[y]))
            if mask[b][t]:
                kl_b.append(
                    T * T * (ref_kl(s_row, t_row, T) if reverse else ref_kl(t_row, s_row, T))
                )
                eq3_b.append(lam * kl_b[-1] + (1 - lam) * ce_b[-1])
        eq3_seqs.append(eq3_b)
        kl_seqs.append(kl_b)
        ce_seqs.append(ce_b)
    return (
        seq_mean(eq3_seqs)
        if ce_at == "selected"
        else lam * seq_mean(kl_seqs) + (1 - lam) * seq_mean(ce_seqs)
    )


def ref_reverse_loss(s_logits, t_logits, targets, mask, T, lam):
    """Eq. 3 with KL(q^T || p^T): `ref_kd_loss` with the divergence reversed."""
    return ref_kd_loss(s_logits, t_logits, targets, mask, T, lam, reverse=True)


def ref_topk_count(k, n):
    return math.ceil(Fraction(str(k)) * n)


def ref_topk_mask(logits, targets, k):
    """Per sequence, the ceil(k n) valid positions with the highest brute-force entropy."""
    mask = []
    for b in range(len(targets)):
        valid = [t for t in range(len(targets[b])) if targets[b][t] >= 0]
        ent = {t: ref_entropy([float(v) for v in logits[b][t]]) for t in valid}
        chosen = sorted(valid, key=lambda t: -ent[t])[: ref_topk_count(k, len(valid))]
        mask.append([t in chosen for t in range(len(targets[b]))])
    return mask


REF_METRICS = {  # u(t) from one row of student logits s, teacher logits t and target y, by hand
    "student_entropy": lambda s, t, y: ref_entropy(s),
    "teacher_entropy": lambda s, t, y: ref_entropy(t),
    "student_ce": lambda s, t, y: ref_ce(s, y),
    "teacher_ce": lambda s, t, y: ref_ce(t, y),
    "kl": lambda s, t, y: ref_kl(t, s),
    "reverse_kl": lambda s, t, y: ref_kl(s, t),
    "kl_plus_student_entropy": lambda s, t, y: ref_kl(t, s) + ref_entropy(s),
    "ce_ratio": lambda s, t, y: ref_ce(s, y) / ref_ce(t, y),
    "ce_ratio_plus_student_entropy": lambda s, t, y: ref_ce(s, y) / ref_ce(t, y) + ref_entropy(s),
}


def ref_at_kd(s_logits, t_logits, targets):
    """AT-KD by hand: per sequence, the ceil(n/2) positions with the highest teacher
    1 - p(y) are hard (binary + non-target KL), the rest easy (non-target KL only);
    L_i = (0.2 * sum_easy + 0.8 * sum_hard) / n_i, averaged over sequences."""
    per_seq = []
    for b in range(len(targets)):
        rows = []
        for i in range(len(targets[b])):
            y = int(targets[b][i])
            if y < 0:
                continue
            p, q = ref_softmax(t_logits[b][i].tolist()), ref_softmax(s_logits[b][i].tolist())
            p_not = sum(p[v] for v in range(len(p)) if v != y)  # 1 - p(y), without cancellation
            q_not = sum(q[v] for v in range(len(q)) if v != y)
            binary = p[y] * math.log(p[y] / q[y]) + p_not * math.log(p_not / q_not)
            non_target = sum(
                p[v] / p_not * math.log((p[v] / p_not) / (q[v] / q_not))
                for v in range(len(p))
                if v != y
            )
            rows.append((p_not, i, binary, non_target))
        if not rows:
            continue
        ranked = sorted(rows, key=lambda r: (-r[0], r[1]))
        n_hard = math.ceil(len(rows) / 2)
        hard = sum(0.8 * (r[2] + r[3]) for r in ranked[:n_hard])
        easy = sum(0.2 * r[3] for r in ranked[n_hard:])
        per_seq.append((hard + easy) / len(rows))
    return sum(per_seq) / len(per_seq)


def ref_rskd_loss(s_logits, ids, counts, targets, mask, T, lam, ce_at):
    """RS-KD with explicit loops: sum over drawn ids of p~ log(p~ / q^T), q^T over all of V; the CE
    term as in `ref_kd_loss`."""
    rs_seqs, ce_seqs, eq3_seqs = [], [], []
    for b in range(len(targets)):
        rs_b, ce_b, eq3_b = [], [], []
        for t in range(len(targets[b])):
            if targets[b][t] < 0:
                continue
            row = s_logits[b][t].tolist()
            ce_b.append(-math.log(ref_softmax(row)[int(targets[b][t])]))
            if mask[b][t]:
                q = ref_softmax([v / T for v in row])
                U = sum(counts[b][t].tolist())
                rs_b.append(
                    T
                    * T
                    * sum(
                        c / U * math.log(c / U / q[i])
                        for i, c in zip(ids[b][t].tolist(), counts[b][t].tolist(), strict=True)
                        if c > 0
                    )
                )
                eq3_b.append(lam * rs_b[-1] + (1 - lam) * ce_b[-1])
        rs_seqs.append(rs_b)
        ce_seqs.append(ce_b)
        eq3_seqs.append(eq3_b)
    return (
        seq_mean(eq3_seqs)
        if ce_at == "selected"
        else lam * seq_mean(rs_seqs) + (1 - lam) * seq_mean(ce_seqs)
    )


def full_kd_row_grads(t, z, T):
    """d/dz of T^2 KL(p^T || q^T) per row, by autograd of the float64 dense KL."""
    z = z.clone().requires_grad_(True)
    (T * T * sekd.kl_per_position(t, z, T)).sum().backward()
    return z.grad


# ============================================================================ 1. the model


def test_selective_head_equals_gathered_dense_logits():
    m = tiny_gpt()
    idx = torch.randint(0, 37, (3, 12))
    mask = torch.rand(3, 12) < 0.3
    h = m.hidden(idx)
    assert torch.allclose(m.head(h[mask]), m(idx)[mask], atol=1e-12)


# ======================================================================= 2. dense KD, the reference


# -------------------------------------------------------------- entropy, KL, the loss (paper Eq. 3)


@pytest.mark.parametrize("T", [1.0, 0.5, 2.0])
def test_token_entropy_matches_brute_force(T):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3
    got = sekd.token_entropy(logits / T)
    for i in range(4):
        assert got[i].item() == pytest.approx(ref_entropy(logits[i].tolist(), T), abs=1e-12)


def test_token_entropy_extremes():
    assert sekd.token_entropy(torch.zeros(7, dtype=torch.float64)).item() == pytest.approx(
        math.log(7)
    )
    assert sekd.token_entropy(torch.tensor([0.0, -1e4, -1e4])).item() == pytest.approx(
        0.0, abs=1e-6
    )


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kl_matches_brute_force(T):
    g = torch.Generator().manual_seed(1)
    t, s = (torch.randn(5, 11, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    got = sekd.kl_per_position(t, s, T)
    for i in range(5):
        assert got[i].item() == pytest.approx(ref_kl(t[i].tolist(), s[i].tolist(), T), abs=1e-12)


@pytest.mark.parametrize("ce_at", ["selected", "all"])
@pytest.mark.parametrize("lam,T", [(1.0, 1.0), (1.0, 2.0), (0.5, 1.0), (0.0, 1.0), (0.3, 1.5)])
def test_kd_loss_per_sequence_normalisation(lam, T, ce_at):
    s, t, y = random_case()
    mask = torch.rand(y.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    mask[1] = False  # a sequence with no selected position drops out of the KL average
    got = sekd.kd_loss(s, t, y, mask, kd(T=T, lam=lam, ce_at=ce_at)).item()
    want = ref_kd_loss(s, t, y, (mask & (y >= 0)).tolist(), T, lam, ce_at=ce_at)
    assert got == pytest.approx(want, abs=1e-12)


def test_eq3_puts_the_ce_under_the_mask():
    """At 0 < lam < 1 the two CE placements differ, and Eq. 3's equals the mean over sequences of
    sum_t m_t [lam KL + (1 - lam) CE] / sum_t m_t, written out with whole-row softmaxes."""
    s, t, y = random_case(pad=False)
    mask = torch.zeros(y.shape, dtype=torch.bool)
    mask[:, ::2] = True
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    ce = -s.log_softmax(-1).gather(2, y[..., None]).squeeze(-1)
    want = ((0.5 * kl + 0.5 * ce) * mask).sum(1).div(mask.sum(1)).mean()
    assert sekd.kd_loss(s, t, y, mask, kd(lam=0.5)).item() == pytest.approx(want.item(), abs=1e-12)
    assert abs(sekd.kd_loss(s, t, y, mask, kd(lam=0.5, ce_at="all")).item() - want.item()) > 1e-3


def test_kd_loss_full_is_mean_over_valid_positions():
    s, t, y = random_case(pad=False)
    kl = sekd.kl_per_position(t, s)
    assert sekd.kd_loss(s, t, y, None, kd()).item() == pytest.approx(kl.mean().item(), abs=1e-12)


# ============================================================================ 3. SE-KD


# ------------------------------------------- student entropy in chunks, the top k% of each sequence


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_entropy_equals_dense_entropy(chunk):
    m = tiny_gpt()
    idx = torch.randint(0, 37, (3, 12))
    h = m.hidden(idx)
    dense = sekd.token_entropy(m(idx))
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[2, 7:] = False
    got = sekd.chunked_scores(sekd.student_entropy, h, m.head_weight, valid, chunk_rows=chunk)
    assert torch.allclose(got, dense * valid, atol=1e-12)


def test_budget_counts_are_exact_ceilings():
    for k in (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0):
        n = torch.arange(0, 301)
        got = sekd.budget_counts(k, n).tolist()
        assert got == [ref_topk_count(k, int(v)) for v in n]


@pytest.mark.parametrize("k", [0.05, 0.1, 0.2, 0.5, 1.0])
def test_topk_positions_counts_and_choice(k):
    g = torch.Generator().manual_seed(4)
    B, L = 6, 40
    scores = torch.randint(0, 5, (B, L), generator=g).double()  # many ties
    valid = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        valid[b, L - 7 * b :] = False  # 40, 33, 26, ... valid positions
    mask = sekd.topk_positions(scores, k, valid)
    for b in range(B):
        n = int(valid[b].sum())
        want = ref_topk_count(k, n)
        assert int(mask[b].sum()) == want
        assert not (mask[b] & ~valid[b]).any()
        ranked = sorted(range(n), key=lambda t: (-scores[b, t].item(), t))  # ties: earlier first
        assert set(torch.nonzero(mask[b]).flatten().tolist()) == set(ranked[:want])


def test_topk_positions_all_padding_row_and_default_valid():
    scores = torch.randn(2, 5)
    valid = torch.tensor([[False] * 5, [True] * 5])
    mask = sekd.topk_positions(scores, 0.2, valid)
    assert mask[0].sum() == 0 and mask[1].sum() == 1
    assert sekd.topk_positions(scores, 0.4).sum(1).tolist() == [2, 2]


# ---------------------------------------------------------------------------- the streamed loss


@pytest.mark.parametrize("ce_at", ["selected", "all"])
@pytest.mark.parametrize(
    "lam,T,chunk", [(1.0, 1.0, 1), (1.0, 2.0, 4), (0.4, 1.0, 3), (0.0, 1.0, 5), (0.7, 0.5, 1000)]
)
def test_streamed_loss_and_gradients_equal_dense(lam, T, chunk, ce_at):
    g = torch.Generator().manual_seed(5)
    B, L, D, Dt, V = 3, 8, 6, 5, 13
    hs = torch.randn(B, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = (
        torch.randn(B, L, Dt, generator=g, dtype=torch.float64),
        torch.randn(V, Dt, generator=g, dtype=torch.float64),
    )
    y = torch.randint(0, V, (B, L), generator=g)
    y[2, 5:] = -1
    mask = sekd.topk_positions(torch.randn(B, L, generator=g), 0.3, y >= 0)
    dense = sekd.kd_loss(hs @ ws.T, ht @ wt.T, y, mask, kd(T=T, lam=lam, ce_at=ce_at))
    d_grads = torch.autograd.grad(dense, (hs, ws))
    walked = []  # the rows the streamed pass makes logits for
    apply = sekd.StreamedHeadLoss.apply
    with mock.patch.object(
        sekd.StreamedHeadLoss, "apply", lambda h, *a: walked.append(len(h)) or apply(h, *a)
    ):
        streamed = sekd.streamed_kd_loss(
            hs, ws, ht, wt, y, mask, kd(T=T, lam=lam, chunk_rows=chunk, ce_at=ce_at)
        )
    s_grads = torch.autograd.grad(streamed, (hs, ws))
    assert streamed.item() == pytest.approx(dense.item(), abs=1e-12)
    for a, b in zip(d_grads, s_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    want = ref_kd_loss((hs @ ws.T).detach(), ht @ wt.T, y, mask.tolist(), T, lam, ce_at=ce_at)
    assert dense.item() == pytest.approx(want, abs=1e-12)
    under_mask = lam == 1 or ce_at == "selected"  # then the pass touches the selected rows only
    assert walked == [int(mask.sum()) if under_mask else int((y >= 0).sum())]


def test_compiled_chunk_formulas_equal_eager(monkeypatch):
    """SE-KD's step with the entropy and the KL compiled (`sekd.compiled`) equals the eager one, in
    the scores, the loss and its gradients."""
    g = torch.Generator().manual_seed(7)
    hs = torch.randn(2, 12, 8, generator=g, requires_grad=True)
    ws = torch.randn(50, 8, generator=g, requires_grad=True)
    ht, wt = torch.randn(2, 12, 6, generator=g), torch.randn(50, 6, generator=g)
    y = torch.randint(0, 50, (2, 12), generator=g)

    # chunks of 5 and 7 rows end with shorter ones: one compile must serve every row count
    def step():
        scores = sekd.chunked_scores(
            sekd.student_entropy, hs.detach(), ws.detach(), y >= 0, chunk_rows=5
        )
        mask = sekd.topk_positions(scores, 0.5, y >= 0)
        loss = sekd.streamed_kd_loss(hs, ws, ht, wt, y, mask, kd(chunk_rows=7))
        return scores, loss, *torch.autograd.grad(loss, (hs, ws))

    eager = step()
    with torch.compiler.set_stance("default"):
        compiled = step()
    for a, b in zip(eager, compiled, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_streamed_backward_scales_the_stored_gradients_in_place_once():
    g = torch.Generator().manual_seed(6)
    hs = torch.randn(2, 8, 6, generator=g, requires_grad=True)
    ws = torch.randn(500, 6, generator=g, requires_grad=True)
    ht, wt = torch.randn(2, 8, 5, generator=g), torch.randn(500, 5, generator=g)
    y = torch.randint(0, 500, (2, 8), generator=g)
    loss = 3.0 * sekd.streamed_kd_loss(hs, ws, ht, wt, y, None, kd(chunk_rows=4))
    with train.LiveBytes() as meter:
        loss.backward(retain_graph=True)
    assert meter.peak < ws.numel() * 4  # no copy of the [V, D] head gradient is made
    want = torch.autograd.grad(3.0 * sekd.kd_loss(hs @ ws.T, ht @ wt.T, y, None, kd()), (hs, ws))
    assert torch.allclose(hs.grad, want[0], atol=1e-5) and torch.allclose(
        ws.grad, want[1], atol=1e-5
    )
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


@pytest.mark.parametrize("config", [kd, sekd.KDConfig], ids=["pure_kl", "defaults"])
def test_streamed_gradients_through_a_model_match_dense_flow(config):
    student, teacher = tiny_gpt(seed=1), tiny_gpt(D=24, layers=1, seed=2)
    idx = torch.randint(0, 37, (2, 12))
    y = torch.randint(0, 37, (2, 12))
    grads = []
    for flow in ("dense", "streamed"):
        student.zero_grad()
        cfg = config(method="sekd", k=0.25, flow=flow, chunk_rows=2)
        loss, n = sekd.distill_loss(student, teacher, idx, y, cfg)
        loss.backward()
        grads.append([p.grad.clone() for p in student.parameters()])
        assert n == 2 * 3
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


# ---------------------------------------------------------------------------- one SE-KD step


@pytest.mark.parametrize("config", [kd, sekd.KDConfig], ids=["pure_kl", "defaults"])
def test_sekd_at_k1_equals_full_kd(config):
    student, teacher = tiny_gpt(seed=1), tiny_gpt(D=24, layers=1, seed=2)
    idx, y = torch.randint(0, 37, (2, 12)), torch.randint(0, 37, (2, 12))
    full, _ = sekd.distill_loss(student, teacher, idx, y, config(method="full_kd", k=1.0))
    se1, _ = sekd.distill_loss(student, teacher, idx, y, config(method="sekd", k=1.0))
    ref = sekd.kd_loss(student(idx), teacher(idx), y, None, config(method="full_kd"))
    assert se1.item() == pytest.approx(full.item(), abs=1e-12)
    assert full.item() == pytest.approx(ref.item(), abs=1e-12)
    scores = torch.randn(2, 12)
    assert torch.equal(sekd.topk_positions(scores, 1.0, y >= 0), y >= 0)


def test_sekd_selects_highest_student_entropy():
    student = tiny_gpt(seed=1)
    idx = torch.randint(0, 37, (2, 12))
    h = student.hidden(idx)
    y = torch.zeros(2, 12, dtype=torch.long)
    mask = sekd.select_positions(h, student.head_weight, None, None, y, sekd.KDConfig(k=0.25))
    ent = sekd.token_entropy(student(idx))
    for b in range(2):
        chosen = set(torch.nonzero(mask[b]).flatten().tolist())
        assert chosen == set(torch.topk(ent[b], 3).indices.tolist())


@pytest.mark.parametrize("config", [kd, sekd.KDConfig], ids=["lam1_selected", "defaults"])
@pytest.mark.parametrize("chunk", [0, 3])
def test_sekd_loss_equals_distill_loss_in_value_and_gradients(config, chunk):
    """`sekd_loss`, the plain SE-KD step, is `distill_loss` for every config `is_sekd` accepts: at
    pure KL with Eq. 3's CE placement, and at the job's defaults (lam 0.5, the CE at every
    position)."""
    student, teacher = tiny_gpt(seed=1), tiny_gpt(D=24, layers=1, seed=2)
    g = torch.Generator().manual_seed(8)
    idx, y = torch.randint(0, 37, (3, 12), generator=g), torch.randint(0, 37, (3, 12), generator=g)
    y[2, 7:] = -1  # padding: 12, 12 and 7 valid positions
    cfg = config(method="sekd", k=0.25, chunk_rows=chunk)
    assert cfg.is_sekd
    out = []
    for step in (sekd.sekd_loss, sekd.distill_loss):
        student.zero_grad()
        teacher.zero_grad()
        loss, n = step(student, teacher, idx, y, cfg)
        loss.backward()
        out.append((loss.item(), n, [p.grad.clone() for p in student.parameters()]))
        assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen
    (se, n_se, g_se), (dl, n_dl, g_dl) = out
    assert n_se == n_dl == 3 + 3 + 2  # ceil(0.25 n) per sequence
    assert se == pytest.approx(dl, abs=1e-12)
    for a, b in zip(g_se, g_dl, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    # and the dense reference at the student's top-entropy positions agrees
    mask = sekd.topk_positions(sekd.token_entropy(student(idx)), 0.25, y >= 0)
    ref = sekd.kd_loss(student(idx), teacher(idx), y, mask, cfg)
    assert se == pytest.approx(ref.item(), abs=1e-12)


def test_is_sekd_says_when_sekd_loss_applies():
    assert sekd.KDConfig().is_sekd and kd(k=0.5, T=2.0, chunk_rows=4).is_sekd
    for fields in (
        dict(method="full_kd"),
        dict(method="random_pos"),
        dict(metric="kl"),
        dict(policy="gls"),
        dict(flow="dense"),
        dict(classes="rskd"),
        dict(divergence="reverse"),
    ):
        assert not sekd.KDConfig(**fields).is_sekd, fields


# ============================================================================ 4. the position axis


# ---------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("name", list(REF_METRICS))
def test_every_metric_matches_brute_force(name):
    s, t, y = random_case(B=3, L=6, V=7, seed=11)
    eye = torch.eye(7, dtype=torch.float64)  # identity heads: the logits are the hidden states
    valid = y >= 0
    got = sekd.chunked_scores(sekd.METRICS[name], s, eye, valid, t, eye, y, chunk_rows=4)
    for b in range(3):
        for i in range(6):
            want = (
                REF_METRICS[name](s[b, i].tolist(), t[b, i].tolist(), int(y[b, i]))
                if valid[b, i]
                else 0.0
            )
            assert got[b, i].item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert set(REF_METRICS) | {"random"} == set(sekd.METRICS)


def test_random_metric_and_student_only_metrics_need_no_teacher():
    s, t, y = random_case(seed=12)
    eye, valid = torch.eye(7, dtype=torch.float64), y >= 0
    torch.manual_seed(0)
    random = sekd.METRICS["random"]
    r1 = sekd.chunked_scores(random, s, eye, valid, chunk_rows=2)
    torch.manual_seed(0)
    assert torch.equal(r1, sekd.chunked_scores(random, s, eye, valid, chunk_rows=2))
    assert (
        ((r1 >= 0) & (r1 < 1)).all()
        and (r1[~valid] == 0).all()
        and len(set(r1[valid].tolist())) == int(valid.sum())
    )
    for name in ("student_entropy", "student_ce"):  # no teacher outputs passed at all
        metric = sekd.METRICS[name]
        assert not getattr(metric, "needs_teacher", True)
        assert sekd.chunked_scores(metric, s, eye, valid, targets=y).shape == y.shape
    assert not sekd.METRICS["random"].needs_teacher
    assert getattr(sekd.METRICS["teacher_entropy"], "needs_teacher", True)
    with pytest.raises(ValueError, match="needs the teacher"):
        sekd.chunked_scores(sekd.METRICS["teacher_entropy"], s, eye, valid)


def test_a_metric_registered_elsewhere_is_accepted_by_name(monkeypatch):
    def low_entropy(zs, zt, y):
        return -sekd.token_entropy(zs)

    low_entropy.needs_teacher = False

    monkeypatch.setitem(sekd.METRICS, "low_entropy", low_entropy)
    assert train.parse_args(["--metric", "low_entropy"]).metric == "low_entropy"
    student = tiny_gpt(seed=1)
    idx, y = torch.randint(0, 37, (2, 12)), torch.randint(0, 37, (2, 12))
    cfg = sekd.KDConfig("sekd", k=0.25, metric="low_entropy")
    mask = sekd.select_positions(student.hidden(idx), student.head_weight, None, None, y, cfg)
    ent = sekd.token_entropy(student(idx))
    for b in range(2):
        assert set(torch.nonzero(mask[b]).flatten().tolist()) == set(
            torch.topk(-ent[b], 3).indices.tolist()
        )
    with pytest.raises(
        ValueError,
        match="metric must be one of student_entropy, .*, random, low_entropy, got 'nope'",
    ):
        sekd.KDConfig("sekd", metric="nope")  # the message lists the metric registered here too
    with pytest.raises(ValueError, match="policy must be one of topk, gls, .*, got 'nope'"):
        sekd.KDConfig("sekd", policy="nope")


# ---------------------------------------------------------------------------- policies


@pytest.mark.parametrize("k", [0.05, 0.2, 0.5, 1.0])
def test_curriculum_selects_exact_budget_and_slides_to_topk(k):
    scores, valid = ragged_scores()
    S = 100
    for step in (0, 1, 37, 50, 99, 100, 250):
        state = sekd.PositionState(gls_queue=1, curriculum_steps=S)
        state.step = step
        mask = sekd.curriculum_positions(scores, k, valid, state)
        for b in range(len(scores)):
            n = int(valid[b].sum())
            K = ref_topk_count(k, n)
            assert int(mask[b].sum()) == K and not (mask[b] & ~valid[b]).any()
            ascending = sorted(range(n), key=lambda t: scores[b, t].item())
            first = round((1 - min(1, step / S)) * (n - K))  # window start, counted from the top
            want = ascending[n - first - K : n - first]
            assert set(torch.nonzero(mask[b]).flatten().tolist()) == set(want)
    state.step = S
    assert torch.equal(
        sekd.curriculum_positions(scores, k, valid, state), sekd.topk_positions(scores, k, valid)
    )


def test_gls_threshold_is_the_quantile_of_the_queue_before_the_batch():
    k, cap = 0.2, 100
    state = sekd.PositionState(gls_queue=cap, curriculum_steps=1)
    pushed = []
    for batch in range(5):
        scores, valid = ragged_scores(seed=20 + batch)
        mask = sekd.gls_positions(scores, k, valid, state)
        if not pushed:  # empty queue: top-k
            assert torch.equal(mask, sekd.topk_positions(scores, k, valid))
        else:
            queue = np.array(pushed[-cap:])
            tau = np.quantile(queue, 1 - k)
            assert torch.equal(mask, (scores >= tau) & valid)
        pushed += scores[valid].tolist()
        assert state.queue.tolist() == pushed[-cap:]  # FIFO: the most recent `cap` scores


def test_pos_rs_kd_draws_ceil_kn_from_valid_scored_positions():
    scores, valid = ragged_scores()
    scores[0, :10] = 0.0  # never drawn
    torch.manual_seed(0)
    counts = sekd.pos_rs_kd_positions(scores, 0.2, valid)
    assert counts.sum(1).tolist() == [ref_topk_count(0.2, int(n)) for n in valid.sum(1)]
    assert (counts[~valid] == 0).all() and (counts[0, :10] == 0).all()
    assert (counts == counts.round()).all()


def test_pos_rs_kd_monte_carlo_converges_to_weighted_and_full_kd():
    """The mean of the pos-RS-KD loss over many independent draws must be within 4 standard
    errors of its target (entropy-weighted KD; Full KD for pos-RS-KD*), where the standard error
    is std(samples)/sqrt(draws), and more than 8 standard errors from the other target, so the
    test can tell the two estimators apart. 4 SE: a correct estimator fails about 1 run in 16,000
    for a random seed; the seed is fixed anyway."""
    s, t, y = random_case(B=3, L=12, V=7, seed=13)
    y[1, 9:] = -1
    s = (
        s * torch.linspace(0.2, 2.0, 12, dtype=torch.float64)[None, :, None]
    )  # entropies vary along the sequence
    valid = y >= 0
    u = sekd.token_entropy(s) * valid  # SE-KD's metric as the score
    kl = sekd.kl_per_position(t, s) * valid
    weighted = ((u * kl).sum(1) / u.sum(1)).mean().item()
    full = (kl.sum(1) / valid.sum(1)).mean().item()
    torch.manual_seed(1)
    draws = (
        4000  # all at once: the batch repeated `draws` times, one draw of each sequence per copy
    )
    B = len(y)
    for policy, target, other in (
        ("pos_rs_kd", weighted, full),
        ("pos_rs_kd_star", full, weighted),
    ):
        m = sekd.POLICIES[policy](u.repeat(draws, 1), 0.25, valid.repeat(draws, 1))
        K = (
            sekd.budget_counts(0.25, valid.sum(1)).repeat(draws)
            if policy.endswith("star")
            else None
        )
        w = sekd.per_sequence_weights(m, torch.float64, K) * draws  # weights of one copy
        samples = (w.view(draws, B, -1) * kl).sum((1, 2)).numpy()
        one = sekd.kd_loss(s, t, y, m[:B] > 0, kd(), row_weights=w[:B]).item()  # the loss agrees
        assert one == pytest.approx(samples[0], abs=1e-12)
        mean, se = samples.mean(), samples.std(ddof=1) / math.sqrt(draws)
        assert abs(mean - target) < 4 * se, (policy, mean, target, se)
        assert abs(mean - other) > 8 * se, (policy, mean, other, se)


@pytest.mark.parametrize("ce_at", ["selected", "all"])
def test_streamed_row_weights_equal_dense(ce_at):
    g, hs, ws, ht, wt, y = float64_heads(14, 3, 8, 6, 13)
    y[2, 5:] = -1
    w = torch.rand(y.shape, generator=g, dtype=torch.float64) * (
        torch.rand(y.shape, generator=g) < 0.5
    )
    cfg = kd(T=2.0, lam=0.6, chunk_rows=3, ce_at=ce_at)
    dense = sekd.kd_loss(hs @ ws.T, ht @ wt.T, y, None, cfg, row_weights=w)
    streamed = sekd.streamed_kd_loss(hs, ws, ht, wt, y, None, cfg, row_weights=w)
    assert streamed.item() == pytest.approx(dense.item(), abs=1e-12)
    for a, b in zip(*(torch.autograd.grad(x, (hs, ws)) for x in (dense, streamed)), strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    kl = sekd.kl_per_position(ht @ wt.T, hs @ ws.T, 2.0)
    ce = torch.nn.functional.cross_entropy(
        (hs @ ws.T).flatten(0, 1), y.clamp_min(0).flatten(), reduction="none"
    ).view_as(y)
    ce_w = w * (y >= 0) if ce_at == "selected" else sekd.per_sequence_weights(y >= 0, torch.float64)
    want = (
        0.6 * 4 * (w * (y >= 0) * kl).sum() + 0.4 * (ce_w * ce).sum()
    )  # Eq. 3: pos-RS-KD's weights on both
    assert dense.item() == pytest.approx(want.item(), abs=1e-12)


# ------------------------------------------------------------------- select_positions, distill_loss


@pytest.mark.parametrize("config", [kd, sekd.KDConfig], ids=["pure_kl", "defaults"])
@pytest.mark.parametrize(
    "fields",
    [
        dict(method="random_pos"),
        dict(method="at_kd"),
        dict(method="at_kd", lam=0.5),
        dict(metric="reverse_kl"),
        dict(metric="ce_ratio", policy="gls"),
        dict(policy="curriculum"),
        dict(policy="pos_rs_kd"),
        dict(policy="pos_rs_kd_star"),
    ],
)
def test_every_method_streamed_equals_dense_through_a_model(fields, config):
    student, teacher = tiny_gpt(seed=1), tiny_gpt(D=24, layers=1, seed=2)
    idx, y = torch.randint(0, 37, (3, 12)), torch.randint(0, 37, (3, 12))
    y[2, 8:] = -1
    out = []
    for flow in ("dense", "streamed"):
        cfg = config(**{"method": "sekd", "k": 0.25, "flow": flow, "chunk_rows": 5, **fields})
        state = sekd.PositionState(cfg.gls_queue, cfg.curriculum_steps)
        student.zero_grad()
        torch.manual_seed(3)  # the same random scores / draws in both flows
        for step in range(2):  # a second step: GLS uses its queue, curriculum moves
            state.step = step * 2000
            loss, n = sekd.distill_loss(student, teacher, idx, y, cfg, state)
        loss.backward()
        out.append((loss.item(), n, [p.grad.clone() for p in student.parameters()]))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-12) and out[0][1] == out[1][1]
    for a, b in zip(out[0][2], out[1][2], strict=True):
        assert torch.allclose(a, b, atol=1e-10)


# ============================================================================ 5. the baselines


# ------------------------------------------------------------------------ AT-KD (Zhong et al. 2024)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_at_kd_matches_brute_force_and_streamed_gradients_are_exact(chunk):
    g, hs, ws, ht, wt, y = float64_heads(15, 3, 7, 6, 11)
    y[1, 4:] = -1
    dense = sekd.at_kd_loss(hs, ws, ht, wt, y, kd(method="at_kd", flow="dense"))
    assert dense.item() == pytest.approx(ref_at_kd(hs @ ws.T, ht @ wt.T, y), rel=1e-10)
    cfg = kd(method="at_kd", chunk_rows=chunk)
    streamed = sekd.at_kd_loss(hs, ws, ht, wt, y, cfg)
    assert streamed.item() == pytest.approx(dense.item(), abs=1e-12)
    for a, b in zip(*(torch.autograd.grad(x, (hs, ws)) for x in (dense, streamed)), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


# ------------------------------------------------------ on-policy (Agarwal et al. 2024), reverse KL


@pytest.mark.parametrize(
    "lam,T,chunk", [(1.0, 1.0, 1), (1.0, 2.0, 4), (0.4, 1.0, 3), (0.7, 0.5, 1000)]
)
def test_reverse_kl_loss_and_gradient_equal_float64_brute_force(lam, T, chunk):
    g, hs, ws, ht, wt, y = float64_heads(21, 3, 5, 4, 9)
    y[2, 3:] = -1
    mask = sekd.topk_positions(torch.randn(y.shape, generator=g, dtype=torch.float64), 0.4, y >= 0)
    cfg = kd(T=T, lam=lam, chunk_rows=chunk, divergence="reverse")
    dense = sekd.kd_loss(hs @ ws.T, ht @ wt.T, y, mask, cfg)
    streamed = sekd.streamed_kd_loss(hs, ws, ht, wt, y, mask, cfg)

    def ref(h):
        return ref_reverse_loss((h @ ws.T).tolist(), (ht @ wt.T).tolist(), y, mask.tolist(), T, lam)

    assert dense.item() == pytest.approx(ref(hs.detach()), abs=1e-12)
    assert streamed.item() == pytest.approx(ref(hs.detach()), abs=1e-12)
    d_grads, s_grads = torch.autograd.grad(dense, (hs, ws)), torch.autograd.grad(streamed, (hs, ws))
    # the hand-written gradient T q (log q - log p - KL) against autograd
    for a, b in zip(d_grads, s_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    fd = torch.zeros_like(hs)  # and against central differences of the brute force
    for i in range(hs.numel()):
        e = torch.zeros(hs.numel(), dtype=torch.float64)
        e[i] = 1e-6
        e = e.view_as(hs)
        fd.view(-1)[i] = (ref(hs.detach() + e) - ref(hs.detach() - e)) / 2e-6
    assert torch.allclose(s_grads[0], fd, atol=1e-7)
    forward = sekd.streamed_kd_loss(hs, ws, ht, wt, y, mask, kd(T=T, lam=lam, chunk_rows=chunk))
    assert not torch.allclose(streamed, forward)  # not forward


def test_reverse_kl_flags_are_checked():
    with pytest.raises(
        ValueError, match="divergence must be one of forward, reverse, got 'sideways'"
    ):
        sekd.KDConfig("sekd", divergence="sideways")
    for kd in (dict(method="at_kd"), dict(method="sekd", classes="rskd")):
        with pytest.raises(ValueError, match="reverse KL needs the teacher's full distribution"):
            sekd.KDConfig(**kd, divergence="reverse")


def test_on_policy_samples_are_seeded_prompted_and_at_temperature_1():
    model = tiny_gpt(V=37, L=12, seed=3)
    prompts = torch.randint(0, 37, (3, 5), generator=torch.Generator().manual_seed(0))
    idx = torch.cat([prompts, torch.zeros(3, 7, dtype=torch.long)], 1)  # only the prompt is read
    a, b, c = (
        sekd.on_policy_batch(model, idx, 5, torch.Generator().manual_seed(s))[0] for s in (1, 1, 2)
    )
    assert a.shape == (3, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :5], prompts) and model.training
    # each new token is a draw from the model's softmax at temperature 1 given the prefix so far:
    # 4000 draws of the next token of one prefix, against its probabilities (4 standard errors)
    n = 4000
    x, y = sekd.on_policy_batch(model, a[:1, :8].expand(n, 8), 8, torch.Generator().manual_seed(5))
    draws = y[:, -1]  # the one sampled token: the target of the last position
    p = torch.softmax(model(a[:1, :8])[0, -1], -1)
    freq = torch.bincount(draws, minlength=37).double() / n
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-3).all()


def test_on_policy_batch_keeps_the_data_prompt_and_marks_only_generated_positions():
    model = tiny_gpt(V=37, L=12, seed=3)
    idx = torch.randint(0, 37, (4, 12), generator=torch.Generator().manual_seed(0))
    x, y = sekd.on_policy_batch(model, idx, 5, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (4, 12)
    assert torch.equal(x[:, :5], idx[:, :5])  # the prompt is the data's first P tokens
    assert (y[:, :4] == -1).all() and (
        y[:, 4:] >= 0
    ).all()  # valid: the 12 - 5 + 1 positions predicting a sample
    assert torch.equal(y[:, 4:-1], x[:, 5:])  # targets are the sampled tokens, shifted by one


@pytest.mark.parametrize("method,k", [("sekd", 0.25), ("full_kd", 1.0)])
def test_on_policy_loss_is_the_divergence_at_generated_positions_only(method, k):
    student, teacher = tiny_gpt(seed=1), tiny_gpt(D=24, layers=1, seed=2)
    gen = torch.Generator().manual_seed(0)
    idx, targets = (
        torch.randint(0, 37, (4, 12), generator=gen),
        torch.randint(0, 37, (4, 12), generator=gen),
    )
    cfg = kd(method=method, k=k, lam=0.5, divergence="reverse", chunk_rows=3)
    loss, n = sekd.on_policy_distill_loss(
        student, teacher, idx, targets, cfg, 0.5, 5, torch.Generator().manual_seed(7)
    )
    # brute force: rows 0-1 stay data (lam KL + (1 - lam) CE, 12 positions); rows 2-3 are the
    # student's continuations of their first 5 tokens (KL alone, at the 8 positions that predict a
    # sampled token)
    x, y = sekd.on_policy_batch(student, idx[2:], 5, torch.Generator().manual_seed(7))
    with torch.no_grad():
        zs, zt, zs_on, zt_on = student(idx[:2]), teacher(idx[:2]), student(x), teacher(x)
    m_real, m_on = (
        ref_topk_mask(zs.tolist(), targets[:2].tolist(), k),
        ref_topk_mask(zs_on.tolist(), y.tolist(), k),
    )
    assert all(not m_on[b][t] for b in range(2) for t in range(4))  # never a prompt position
    real = ref_reverse_loss(zs.tolist(), zt.tolist(), targets[:2].tolist(), m_real, 1.0, 0.5)
    on = ref_reverse_loss(zs_on.tolist(), zt_on.tolist(), y.tolist(), m_on, 1.0, 1.0)
    assert loss.item() == pytest.approx(0.5 * real + 0.5 * on, abs=1e-12)
    assert (
        n
        == sum(map(sum, m_real)) + sum(map(sum, m_on))
        == (2 * 3 + 2 * 2 if k < 1 else 2 * 12 + 2 * 8)
    )
    loss.backward()  # and it trains the student
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert [sekd.on_policy_rows(16, s) for s in (0.0, 0.25, 0.5, 0.03, 1.0)] == [0, 4, 8, 0, 16]


# ===================================================================== 6. the class and sample axes


# -------------------------------------------------------------------- RS-KD (Anshumann et al. 2025)


def logit_draws(logits, U, T=1.0, generator=None):  # `teacher_draws` of logits: an identity head
    eye = torch.eye(logits.shape[-1], dtype=logits.dtype)
    return sekd.teacher_draws(logits, eye, U, T, generator=generator)


def test_rskd_sample_layout_counts_and_support():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(4, 5, 9, generator=g, dtype=torch.float64)
    logits[..., 7:] = -1e4  # classes the teacher never predicts (p = 0 exactly) are never drawn
    ids, counts = logit_draws(logits, 13, generator=g)
    assert ids.shape == counts.shape == (4, 5, 13)
    assert (counts.sum(-1) == 13).all()
    for i_row, c_row in zip(
        ids.reshape(-1, 13).tolist(), counts.reshape(-1, 13).tolist(), strict=True
    ):
        n = sum(c > 0 for c in c_row)
        assert all(c > 0 for c in c_row[:n]) and all(
            c == 0 for c in c_row[n:]
        )  # padding at the end
        assert (
            i_row[:n] == sorted(set(i_row[:n]))
            and all(i < 7 for i in i_row[:n])
            and set(i_row[n:]) <= {0}
        )
    a, b = (logit_draws(logits, 13, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(
        a[1], b[1]
    )  # a seeded generator reproduces the draws
    ids_T, counts_T = logit_draws(torch.tensor([[4.0, 0.0]]), 127, T=1000.0, generator=g)
    assert 40 < counts_T[0, 0] < 87  # a high temperature flattens the teacher: about half each


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_rskd_gradient_is_unbiased_for_full_kd_and_topk_is_not(T):
    """Monte Carlo over M independent RS-KD draws: the mean gradient w.r.t. the student logits
    (taken through the streamed `rskd_loss`, identity head) matches Full KD's within 4.5 standard
    errors on every coordinate, while deterministic top-2 truncation is off by far more."""
    g = torch.Generator().manual_seed(11)
    R, V, U, M = 3, 8, 4, 20000
    t = torch.randn(R, V, generator=g, dtype=torch.float64)
    z = torch.randn(R, V, generator=g, dtype=torch.float64)
    ids, counts = logit_draws(t.expand(M, R, V), U, T, generator=g)
    h = z.expand(M, R, V).clone().requires_grad_(True)
    loss = sekd.rskd_loss(
        h,
        torch.eye(V, dtype=torch.float64),
        ids,
        counts,
        torch.zeros(M, R, dtype=torch.long),
        None,
        kd(T=T, chunk_rows=4096, classes="rskd"),
    )
    grads = torch.autograd.grad(loss, h)[0] * (M * R)  # per-row weights were 1 / (M R)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(M)
    want = full_kd_row_grads(t, z, T)
    assert ((mean - want).abs() <= 4.5 * se + 1e-12).all()
    top = torch.topk(t, 2, dim=-1).indices
    p_top = torch.zeros_like(t).scatter_(1, top, torch.softmax(t.gather(1, top) / T, -1))
    topk_grad = T * (torch.softmax(z / T, -1) - p_top)
    assert ((topk_grad - want).abs() / (se + 1e-12)).max() > 20


@pytest.mark.parametrize("ce_at", ["selected", "all"])
@pytest.mark.parametrize(
    "lam,T,chunk", [(1.0, 1.0, 1), (1.0, 2.0, 3), (0.6, 1.0, 1000), (0.3, 0.5, 2)]
)
def test_rskd_loss_and_gradient_equal_float64_brute_force(lam, T, chunk, ce_at):
    g = torch.Generator().manual_seed(12)
    B, L, D, V, U = 3, 7, 5, 11, 6
    hs = torch.randn(B, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    ids, counts = logit_draws(
        torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2, U, T, generator=g
    )
    y = torch.randint(0, V, (B, L), generator=g)
    y[1, 4:] = -1
    mask = sekd.topk_positions(torch.randn(B, L, generator=g), 0.4, y >= 0)
    cfg = kd(T=T, lam=lam, chunk_rows=chunk, ce_at=ce_at, classes="rskd")
    loss = sekd.rskd_loss(hs, ws, ids, counts, y, mask, cfg)
    z = hs @ ws.T
    assert loss.item() == pytest.approx(
        ref_rskd_loss(z, ids, counts, y, mask.tolist(), T, lam, ce_at), abs=1e-12
    )
    # the gradient against autograd of a dense formulation: p~ scattered over all of V
    p = torch.zeros(B, L, V, dtype=torch.float64).scatter_add_(2, ids, counts.double() / U)
    logq = torch.log_softmax(z / T, -1)
    rs = T * T * (torch.xlogy(p, p) - p * logq).sum(-1)
    ce = sekd.kd_loss(z, None, y, mask if ce_at == "selected" else None, kd(lam=0.0))
    w = sekd.per_sequence_weights(mask & (y >= 0), torch.float64)
    dense = lam * (w * rs).sum() + (1 - lam) * ce
    assert dense.item() == pytest.approx(loss.item(), abs=1e-12)
    for a, b in zip(*(torch.autograd.grad(x, (hs, ws)) for x in (loss, dense)), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_rskd_gradient_wrt_logits_is_q_minus_p_tilde():
    g = torch.Generator().manual_seed(13)
    V, U = 9, 10
    z = torch.randn(1, 1, V, generator=g, dtype=torch.float64, requires_grad=True)
    ids, counts = logit_draws(torch.randn(1, 1, V, generator=g), U, generator=g)
    y = torch.zeros(1, 1, dtype=torch.long)
    loss = sekd.rskd_loss(z, torch.eye(V, dtype=torch.float64), ids, counts, y, None, kd())
    p = torch.zeros(V, dtype=torch.float64).scatter_add_(0, ids[0, 0], counts[0, 0].double() / U)
    assert torch.allclose(
        torch.autograd.grad(loss, z)[0][0, 0], torch.softmax(z[0, 0], -1) - p, atol=1e-14
    )


def test_cached_rskd_path_selects_by_student_entropy_without_teacher():
    student, teacher = tiny_gpt(seed=1), tiny_gpt(D=24, layers=1, seed=2)
    idx, y = torch.randint(0, 37, (2, 12)), torch.randint(0, 37, (2, 12))
    y[1, 10:] = -1
    draws = sekd.teacher_draws(
        teacher.hidden(idx), teacher.head_weight, 8, generator=torch.Generator().manual_seed(0)
    )
    cfg = kd(method="sekd", k=0.25, classes="rskd", U=8, chunk_rows=5)
    loss, n = sekd.distill_loss(student, None, idx, y, cfg, draws=draws)  # no teacher at all
    valid = y >= 0
    mask = sekd.topk_positions(sekd.token_entropy(student(idx)), 0.25, valid)
    assert n == ref_topk_count(0.25, 12) + ref_topk_count(0.25, 10) == int(mask.sum())
    want = sekd.rskd_loss(student.hidden(idx), student.head_weight, *draws, y, mask, cfg)
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)
    with pytest.raises(ValueError, match="needs the teacher"):
        sekd.distill_loss(student, None, idx, y, cfg)
    torch.manual_seed(0)  # online draws from the teacher at the selected rows
    online, n_online = sekd.distill_loss(
        student, teacher, idx, y, kd(method="full_kd", k=1.0, classes="rskd", U=8)
    )
    online.backward()
    assert n_online == int(valid.sum()) and math.isfinite(online.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


@pytest.mark.parametrize("U", [0, 128, 2.5, True])
def test_bad_draw_count_is_a_clear_error(U):
    """KDConfig refuses a count that is no count; the cache's 7-bit bound is the job's --U check."""
    if U == 128 and type(U) is int:  # a valid KDConfig; the cache format cannot store it
        sekd.KDConfig("sekd", classes="rskd", U=U)
        with pytest.raises(ValueError, match=r"argument --U: must be in \[1, 127\] \(7-bit"):
            train.parse_args(["--U", str(U)])
        return
    with pytest.raises(ValueError, match=rf"^U must be an integer >= 1, got {U!r}$"):
        sekd.KDConfig("sekd", classes="rskd", U=U)


# --------------------------------------------------------------- the sample axis: TopSmp, RandomSmp


def test_sample_scores_and_selection():
    m = tiny_gpt()
    idx = torch.randint(0, 37, (4, 12))
    valid = torch.ones(4, 12, dtype=torch.bool)
    valid[2, 6:] = False
    got = sekd.sample_entropy(m.hidden(idx), m.head_weight, valid, chunk_rows=5)
    ent = sekd.token_entropy(m(idx))
    for b in range(4):
        assert got[b].item() == pytest.approx(ent[b][valid[b]].mean().item(), abs=1e-12)
    scores = torch.tensor([0.5, 3.0, 1.0, 3.0, -1.0, 2.0, 0.0])
    assert sekd.top_samples(scores, 0.4).tolist() == [1, 3, 5]  # ceil(0.4 * 7) = 3 highest
    assert sekd.top_samples(scores, 0.2).tolist() == [1, 3]
    r1 = sekd.random_samples(50, 0.2, torch.Generator().manual_seed(1))
    assert len(r1) == 10 and len(set(r1.tolist())) == 10 and r1.tolist() == sorted(r1.tolist())
    assert torch.equal(r1, sekd.random_samples(50, 0.2, torch.Generator().manual_seed(1)))


# ============================================================================ 7. evaluation


def test_ece_matches_bin_loop():
    g = torch.Generator().manual_seed(6)
    conf = torch.rand(500, generator=g, dtype=torch.float64)
    conf[:5] = torch.tensor([1.0, 1 / 15, 2 / 15, 0.5, 1e-9], dtype=torch.float64)  # bin edges
    correct = torch.rand(500, generator=g) < conf
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        idx = [i for i in range(500) if lo < conf[i] <= hi or (b == 0 and conf[i] == 0)]
        if idx:
            acc = sum(bool(correct[i]) for i in idx) / len(idx)
            mean_conf = sum(conf[i].item() for i in idx) / len(idx)
            total += len(idx) / 500 * abs(acc - mean_conf)
    assert sekd.expected_calibration_error(conf, correct) == pytest.approx(100 * total, abs=1e-9)


def test_evaluation_metrics_match_dense_brute_force():
    s, t, y = random_case(pad=True)
    eye, valid = torch.eye(7, dtype=torch.float64), y >= 0  # identity heads: logits = hidden
    got = sekd.chunked_scores(sekd.prediction_rows, s, eye, valid, targets=y, chunk_rows=4)
    pair = sekd.chunked_scores(sekd.teacher_rows, s, eye, valid, t, eye, y, chunk_rows=4)
    assert got.shape == (*y.shape, 4) and pair.shape == (*y.shape, 2)
    assert (got[~valid] == 0).all() and (pair[~valid] == 0).all()
    for (b, i), (nll, conf, correct, entropy) in zip(
        valid.nonzero().tolist(), got[valid], strict=True
    ):
        p, q, target = ref_softmax(t[b, i].tolist()), ref_softmax(s[b, i].tolist()), int(y[b, i])
        assert nll.item() == pytest.approx(-math.log(q[target]), abs=1e-12)
        assert conf.item() == pytest.approx(max(q), abs=1e-12)
        assert correct.item() == float(q.index(max(q)) == target)
        assert entropy.item() == pytest.approx(-sum(v * math.log(v) for v in q), abs=1e-12)
        kl = sum(a * math.log(a / c) for a, c in zip(p, q, strict=True))
        assert pair[b, i, 0].item() == pytest.approx(kl, abs=1e-12)
        assert pair[b, i, 1].item() == float(p.index(max(p)) == q.index(max(q)))


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])  # under-, well- and over-confident
def test_fitted_temperature_is_the_minimum_of_a_brute_force_grid(scale):
    m = tiny_gpt(seed=3)
    idx, y = torch.randint(0, 37, (3, 12)), torch.randint(0, 37, (3, 12))
    y[1, 7:] = -1
    valid = y >= 0
    h, w = m.hidden(idx).detach().double() * scale, m.head_weight.detach().double()
    tau = sekd.fit_temperature(h, w, y, valid)
    logits = (h[valid] @ w.T).tolist()

    def nll(t):
        rows = [ref_softmax([v / t for v in z]) for z in logits]
        return -sum(math.log(p[int(c)]) for p, c in zip(rows, y[valid], strict=True)) / len(rows)

    grid = [0.05 * 1.02**i for i in range(300)]  # 0.05 to 19, 2% apart
    best = min(grid, key=nll)
    assert best / 1.02 <= tau <= best * 1.02
    assert nll(tau) <= nll(best) + 1e-12


# ============================================================================ 8. memory


# ---------------------------------------------------------------------------- the memory meter


def test_live_bytes_counts_allocations_and_frees():
    with train.LiveBytes() as meter:
        a = torch.empty(1000, 250)  # 1 MB
        b = torch.empty(500, 250)  # 0.5 MB
        del a
        c = torch.empty(100, 250)
    assert meter.peak == 1_500_000
    assert meter.live == 600_000
    del b, c
    assert meter.live == 0


# ------------------------------------------------------------------- the closed-form memory account


@pytest.mark.parametrize(
    "V,L,layers,D", [(37, 12, 2, 16), (1000, 64, 1, 48), (50257, 1024, 12, 768)]
)
def test_n_params_counts_every_parameter(V, L, layers, D):
    config = sekd.GPTConfig(vocab_size=V, block_size=L, n_layer=layers, n_head=4, n_embd=D)
    model = sekd.GPT(config) if V < 50257 else None
    want = (
        sum(p.numel() for p in model.parameters()) if model else 124_439_808
    )  # GPT-2 small, tied head
    assert sekd.n_params(config) == want


def measured_step_peak(student, teacher, cfg, x, y):
    """What train_loop reports on the CPU: weights + AdamW state + the peak of the live tensors of
    one step (the second: AdamW's state exists), and the peak of the [rows, V] ones alone."""
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    V = student.config.vocab_size
    for _ in range(2):
        with train.LiveBytes(match=lambda t: t.dim() >= 1 and t.shape[-1] == V) as meter:
            loss, _ = sekd.distill_loss(student, teacher, x, y, cfg)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    resident = train.state_bytes(student, *state) + train.state_bytes(teacher) * (cfg.lam > 0)
    return resident + meter.peak, meter.matched_peak


@pytest.mark.parametrize(
    "method,lam,flow",
    [
        ("ce", 0.5, "streamed"),
        ("full_kd", 1.0, "streamed"),
        ("full_kd", 0.5, "streamed"),
        ("sekd", 1.0, "streamed"),
        ("sekd", 0.5, "streamed"),
        ("random_pos", 0.5, "streamed"),
        ("ce", 0.5, "dense"),
        ("full_kd", 0.5, "dense"),
        ("sekd", 1.0, "dense"),
    ],
)
def test_memory_account_is_within_10_percent_of_the_measured_peak(method, lam, flow):
    """The closed form against the live-tensor meter on the CPU (and the allocator on CUDA),
    float32. Its logit term is exact where every chunk selects the same number of rows."""
    torch.manual_seed(0)
    V, B, L = 8000, 8, 64
    student = sekd.GPT(sekd.GPTConfig(vocab_size=V, block_size=L, n_layer=1, n_head=2, n_embd=48))
    teacher = sekd.GPT(
        sekd.GPTConfig(vocab_size=V, block_size=L, n_layer=2, n_head=2, n_embd=96)
    ).requires_grad_(False)
    x, y = torch.randint(0, V, (B, L)), torch.randint(0, V, (B, L))
    cfg = sekd.KDConfig(
        method,
        k=1.0 if method == "full_kd" else 0.2,
        lam=lam,
        ce_at="selected",
        flow=flow,
        chunk_rows=64,
    )
    acc = sekd.memory_account(student.config, teacher.config, B, L, cfg)
    total, logits = measured_step_peak(student, teacher, cfg, x, y)
    assert abs(acc["total"] - total) <= 0.1 * total, (acc["total"], total)
    if method in ("ce", "full_kd") or lam == 1:
        assert acc["logits"] == logits
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        student, teacher, x, y = student.to(dev), teacher.to(dev), x.to(dev), y.to(dev)
        measured_step_peak(student, teacher, cfg, x, y)  # AdamW's state, the allocator's pools
        torch.cuda.reset_peak_memory_stats()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
        loss, _ = sekd.distill_loss(student, teacher, x, y, cfg)
        loss.backward()
        opt.step()
        peak = torch.cuda.max_memory_allocated()
        assert abs(acc["total"] - peak) <= 0.1 * peak, (acc["total"], peak)


def test_memory_account_models_only_the_steps_it_knows():
    s, t = sekd.GPTConfig(vocab_size=100), sekd.GPTConfig(vocab_size=100)
    for cfg in (
        sekd.KDConfig("at_kd"),
        sekd.KDConfig("sekd", classes="rskd"),
        sekd.KDConfig("sekd", metric="kl"),
        sekd.KDConfig("sekd", policy="pos_rs_kd"),
        sekd.KDConfig("full_kd", divergence="reverse"),
    ):
        assert sekd.memory_account(s, t, 2, 8, cfg) is None
    acc = sekd.memory_account(s, t, 2, 8, sekd.KDConfig("ce"))
    assert acc["teacher_params"] == acc["teacher_hidden"] == 0  # plain CE holds no teacher


# ============================================================== the job: train.py, data.py, the CLI


# ---------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5, float("nan")])
def test_bad_budget_is_a_clear_error(k):
    with pytest.raises(ValueError, match=r"^k must be in \(0, 1\] \(e.g. 0.2 for 20%\), got "):
        sekd.KDConfig("sekd", k=k)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("T", 0.0, "T must be > 0, got 0.0"),
        ("lam", 1.5, r"lam must be in \[0, 1\], got 1.5"),
        (
            "method",
            "magic",
            "method must be one of ce, full_kd, sekd, random_pos, at_kd, got 'magic'",
        ),
        ("flow", "magic", "flow must be one of streamed, dense, got 'magic'"),
        ("chunk_rows", -1, "chunk_rows must be an integer >= 0"),
        ("chunk_rows", 2.5, "chunk_rows must be an integer"),
        ("gls_queue", 0, "gls_queue must be an integer >= 1, got 0"),
        ("curriculum_steps", 0, "curriculum_steps must be an integer >= 1, got 0"),
        ("classes", "some", "classes must be one of full, rskd, got 'some'"),
        ("divergence", "sideways", "divergence must be one of forward, reverse, got 'sideways'"),
        ("ce_at", "every", "ce_at must be one of selected, all, got 'every'"),
    ],
)
def test_kdconfig_checks_every_setting_in_one_line(field, value, message):
    sekd.KDConfig(**{field: getattr(sekd.KDConfig(), field)})  # the default is accepted
    with pytest.raises(ValueError, match=message) as e:
        sekd.KDConfig(**{field: value})
    assert "\n" not in str(e.value) and "--" not in str(e.value)  # one line, no CLI flag names


def entry_points():
    """The configs and the few functions a user calls directly, each with arguments that work."""
    model = tiny_gpt(L=8)
    idx = torch.randint(0, 37, (2, 8))

    def call(fn, *args, **defaults):
        return lambda **changed: fn(*args, **{**defaults, **changed})

    return {
        "GPTConfig": call(sekd.GPTConfig, vocab_size=7, n_embd=8, n_head=2),
        "KDConfig": call(sekd.KDConfig),
        "GPT.generate": call(model.generate, idx, n_new=2),
        "on_policy_batch": call(sekd.on_policy_batch, model, idx, prompt_len=4),
    }


BAD = [  # (an entry point, arguments that make no sense, the start of its message)
    ("GPTConfig", {"vocab_size": 0}, "vocab_size must be an integer >= 1, got 0"),
    ("GPTConfig", {"n_layer": 1.5}, "n_layer must be an integer >= 1, got 1.5"),
    ("GPTConfig", {"n_head": 3}, "n_embd must be divisible by n_head, got 8, 3"),
    ("GPTConfig", {"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
    ("KDConfig", {"U": 0}, "U must be an integer >= 1, got 0"),
    ("KDConfig", {"metric": "luck"}, "metric must be one of student_entropy, teacher_entropy"),
    ("KDConfig", {"policy": "luck"}, "policy must be one of topk, gls, curriculum"),
    ("KDConfig", {"classes": "rskd", "flow": "dense"}, "classes 'rskd' needs a KD method"),
    ("KDConfig", {"method": "ce", "classes": "rskd"}, "classes 'rskd' needs a KD method"),
    ("KDConfig", {"method": "at_kd", "divergence": "reverse"}, "divergence 'reverse' works with"),
    ("GPT.generate", {"n_new": 0}, "n_new must be an integer >= 1, got 0"),
    ("GPT.generate", {"temperature": -1.0}, "temperature must be >= 0 and top_k an integer"),
    ("GPT.generate", {"top_k": -1}, "temperature must be >= 0 and top_k an integer"),
    ("on_policy_batch", {"prompt_len": 0}, "prompt_len must be in [1, 8], the sequence length"),
    ("on_policy_batch", {"prompt_len": 9}, "prompt_len must be in [1, 8], the sequence length"),
]


@pytest.mark.parametrize("name,bad,message", BAD, ids=[f"{n}-{b}" for n, b, _ in BAD])
def test_every_entry_point_refuses_a_senseless_argument_in_one_line(name, bad, message):
    calls = entry_points()
    calls[name]()  # the arguments as given are fine
    with pytest.raises(ValueError) as e:
        calls[name](**bad)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name,edge",
    [
        ("KDConfig", {"k": 1.0, "lam": 0.0}),
        ("KDConfig", {"lam": 1, "U": 127, "chunk_rows": 0}),
        ("GPTConfig", {"n_embd": 2, "n_head": 2, "dropout": 0.0}),
        ("GPT.generate", {"n_new": 1, "temperature": 0}),
        ("GPT.generate", {"top_k": 0}),
        ("on_policy_batch", {"prompt_len": 1}),
    ],
)
def test_boundary_values_are_accepted(name, edge):
    entry_points()[name](**edge)


def test_boundary_values_select_and_keep_everything():
    _, _, y = random_case(seed=30)
    assert torch.equal(sekd.topk_positions(torch.randn(y.shape), 1, y >= 0), y >= 0)
    assert sekd.top_samples(torch.rand(10), 1).tolist() == list(range(10))
    assert sekd.random_samples(10, 1).tolist() == list(range(10))
    assert (sekd.on_policy_rows(16, 0), sekd.on_policy_rows(16, 1)) == (0, 16)
    # the whole sequence as the prompt: one sampled token
    x, targets = entry_points()["on_policy_batch"](prompt_len=8)
    assert x.shape == (2, 8) and (targets[:, :7] == -1).all() and (targets[:, 7] >= 0).all()


def test_long_sequence_is_refused():
    with pytest.raises(ValueError, match="longer than the block size"):
        tiny_gpt(L=12).hidden(torch.zeros(1, 13, dtype=torch.long))


# ---------------------------------------------------------------------------- data


def test_markdown_is_stripped_to_play_text():
    md = (
        "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n"
        "**BERNARDO**  \nWho's there?  \n*\\[Aside.\\]*\n"
    )
    assert (
        data.markdown_to_play_text(md)
        == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\n[Aside.]\n"
    )


def test_shakespeare_split_holds_out_whole_plays():
    train_texts, val_texts = data.shakespeare_split()
    assert len(train_texts) + len(val_texts) == 38 and len(val_texts) == 4
    assert not set(train_texts) & set(val_texts)
    assert all("**" not in t and "\\[" not in t for t in train_texts)


def test_tokenizer_is_gpt2_offline():
    enc = data.gpt2_encoding()
    assert enc.n_vocab == 50257
    assert enc.encode_ordinary("Hello world") == [15496, 995]


def test_pack_and_vocab_round_trip():
    enc = data.gpt2_encoding()
    text = "To be, or not to be: that is the question. " * 20
    ids = data.tokenize([text], enc)
    vocab = data.Vocab(np.unique(ids), full=False)
    samples = data.pack(vocab.encode(ids), 9)
    assert samples.shape[1] == 10
    flat = samples.reshape(-1)
    assert vocab.decode(flat, enc) == enc.decode(ids[: len(flat)].tolist())
    unseen = vocab.encode(np.array(enc.encode_ordinary(" zebra")))
    assert (unseen == vocab.unk).all() and data.UNK in vocab.decode(unseen, enc)
    full = data.Vocab(np.arange(50257), full=True)
    assert (full.encode(ids) == ids).all()


def write_corpus(tmp_path, train_text, val_text):
    paths = []
    for name, text in (("a.txt", train_text), ("b.txt", val_text)):
        p = tmp_path / name
        p.write_text(text)
        paths.append(str(p))
    return "files:" + ",".join(paths)


def test_local_files_corpus_prepares_and_is_reused(tmp_path):
    line = "Now is the winter of our discontent made glorious summer by this sun of York.\n"
    ds = write_corpus(tmp_path, line * 200, line * 30)
    c1 = data.prepare(ds, 16, cache_dir=str(tmp_path / "cache"))
    c2 = data.prepare(ds, 16, cache_dir=str(tmp_path / "cache"))
    assert c1.meta == c2.meta and len(c1.train) > 10 and c1.train.shape[1] == 17
    assert not any(".tmp" in f for _, _, fs in os.walk(tmp_path / "cache") for f in fs)


def test_empty_and_too_short_corpus_are_clear_errors(tmp_path):
    with pytest.raises(data.DataError, match="empty"):
        data.prepare(write_corpus(tmp_path, "\n\n", "\n"), 16, cache_dir=str(tmp_path / "c1"))
    with pytest.raises(data.DataError, match="too few"):
        data.prepare(
            write_corpus(tmp_path, "Short text.\n" * 3, "x\n"), 64, cache_dir=str(tmp_path / "c2")
        )
    with pytest.raises(data.DataError, match="does not exist"):
        data.prepare("files:/nonexistent/x.txt", 16, cache_dir=str(tmp_path / "c3"))
    with pytest.raises(data.DataError, match="unknown --dataset"):
        data.prepare("nosuch", 16, cache_dir=str(tmp_path / "c4"))


def test_empty_or_binary_local_file_says_so(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 20)
    for name, what in (
        ("empty.txt", "is empty: give a text file"),
        ("blank.txt", "is empty"),
        ("model.bin", "is not UTF-8 text: give plain text files"),
    ):
        with pytest.raises(data.DataError, match=f"files:{tmp_path / name} {what}"):
            data.prepare(f"files:{tmp_path / name}", 16, cache_dir=str(tmp_path / "c"))
    r = run_cli(
        "--dataset",
        f"files:{tmp_path / 'empty.txt'}",
        "--data-dir",
        tmp_path / "c",
        "--out-dir",
        tmp_path,
    )
    assert_one_line_exit_2(r, "empty.txt is empty")


def test_hub_dataset_offline_fails_fast_with_one_line(tmp_path):
    with pytest.raises(data.DataError, match="could not load dataset"):
        data.prepare("hf:no-such-user/no-such-dataset", 16, cache_dir=str(tmp_path / "c"))


# ---------------------------------------------------------------------------- the training job


TINY = [
    "--teacher-layers",
    "1",
    "--teacher-embd",
    "32",
    "--teacher-heads",
    "2",
    "--student-layers",
    "1",
    "--student-embd",
    "16",
    "--student-heads",
    "2",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--teacher-steps",
    "40",
    "--student-init-steps",
    "30",
    "--student-steps",
    "20",
    "--eval-tokens",
    "512",
    "--log-interval",
    "10",
    "--eval-interval",
    "10",
    "--warmup",
    "3",
]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    train_text = "\n".join(data.shakespeare_split()[0][0].splitlines()[:1500])
    val_text = "\n".join(data.shakespeare_split()[1][0].splitlines()[:300])
    return write_corpus(d, train_text, val_text), str(d / "cache")


def run_job(tmp_path, corpus, *extra):
    ds, cache = corpus
    return train.main(
        TINY + ["--dataset", ds, "--data-dir", cache, "--out-dir", str(tmp_path)] + list(extra)
    )


def test_end_to_end_compare_is_deterministic_and_loss_falls(tmp_path, tiny_corpus, capsys):
    r1 = run_job(tmp_path, tiny_corpus)
    out = capsys.readouterr().out
    assert "ETA" in out and "KL(T||S)" in out and "PPL@tau*" in out
    assert (
        "cloze items, fewer than 20: not scored" in out
    )  # too few in the tiny corpus's held-out text
    rows = {r["method"]: r for r in r1["rows"]}
    assert set(rows) == {"teacher", "student init (CE)", "CE (no KD)", "Full KD", "SE-KD top 20%"}
    uniform = r1["data"]["vocab_size"]  # the perplexity of a model that learned nothing
    assert rows["teacher"]["val_ppl"] < rows["CE (no KD)"]["val_ppl"] < 0.7 * uniform
    assert all(r["peak_bytes"] > 0 for m, r in rows.items() if m != "teacher")
    saved = json.loads((tmp_path / "results_compare.json").read_text())
    assert [r["val_ppl"] for r in saved["rows"]] == [r["val_ppl"] for r in r1["rows"]]
    acc = saved[
        "memory_account"
    ]  # every student's step is accounted, the CE term of lambda = 0.5 included
    assert {m: a["lam"] for m, a in acc.items()} == {"ce": 0.0, "full_kd": 0.5, "sekd": 0.5}
    assert all(a["logits"] > 0 and a["chunk_rows"] > 0 for a in acc.values())
    assert acc["ce"]["teacher_hidden"] == acc["ce"]["teacher_params"] == 0
    assert acc["sekd"]["teacher_hidden"] > 0 and acc["sekd"]["n_sel"] < acc["full_kd"]["n_sel"]
    assert "[sekd] memory account, MiB: student_params" in out
    for m, name in (("ce", "CE (no KD)"), ("full_kd", "Full KD"), ("sekd", "SE-KD top 20%")):
        assert (
            abs(acc[m]["total"] - rows[name]["peak_bytes"]) <= 0.1 * rows[name]["peak_bytes"]
        )  # analytic ~ measured
    one_step = run_job(tmp_path / "one", tiny_corpus, "--run", "distill", "--student-steps", "1")
    measured = one_step["rows"][-1]["peak_bytes"]  # a 1-step run measures its only step
    assert abs(one_step["memory_account"]["sekd"]["total"] - measured) <= 0.1 * measured
    r2 = run_job(tmp_path, tiny_corpus)  # reuses the teacher, same seed: same numbers
    assert "reusing" in capsys.readouterr().out
    assert [r["val_ppl"] for r in r2["rows"]] == [r["val_ppl"] for r in r1["rows"]]
    assert (
        r2["rows"][0]["train_s"] == r1["rows"][0]["train_s"]
    )  # a reused teacher reports its training time


def test_training_loss_falls(tmp_path, tiny_corpus, capsys):
    run_job(tmp_path, tiny_corpus, "--run", "teacher", "--teacher-steps", "40")
    losses = [
        float(line.split("| loss ")[1].split()[0])
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("[teacher] step") and "| loss " in line
    ]
    assert losses[-1] < losses[0] - 0.5


def test_frequent_ids_keep_the_most_frequent_against_a_count(tmp_path):
    ids = np.random.default_rng(0).zipf(1.5, 5000) % 300 + 7
    count = {}
    for i in ids.tolist():
        count[i] = count.get(i, 0) + 1
    ranked = sorted(count, key=lambda i: (-count[i], i))  # by count, ties to the lower id
    for n in (2, 10, 50):
        assert data.frequent_ids(ids, n).tolist() == sorted(ranked[: n - 1])
    assert (
        data.frequent_ids(ids, 0).tolist()
        == data.frequent_ids(ids, 10_000).tolist()
        == sorted(count)
    )
    text = "\n".join(data.shakespeare_split()[0][0].splitlines()[:400])
    ds = write_corpus(tmp_path, text, text)
    corpus = data.prepare(ds, 16, cache_dir=str(tmp_path / "c"), vocab_size=64)
    assert corpus.vocab.size == 64 and 0 < corpus.meta["unk_share"] < 1
    assert corpus.train.max() == corpus.vocab.unk  # every rarer id maps to the reserved one
    with pytest.raises(data.DataError, match="--vocab-size must be 0 .* or at least 2, got 1"):
        data.prepare(ds, 16, cache_dir=str(tmp_path / "c"), vocab_size=1)


# ------------------------------------------------------------------- the paper's kind of evaluation


def test_word_spans_and_cloze_items_on_a_hand_made_stream():
    text = [
        "\n",
        " the",
        " King",
        " is",
        " dead",
        ".",
        " long",
        " live",
        "K",
        "ing",
        " Ri",
        "chard",
        "",
        ":",
        " Rich",
    ]
    # the King is dead . \n | King long live the Richard \n | is the King \n | Rich<unk> the Richard
    ids = np.array([1, 2, 3, 4, 5, 0, 8, 9, 6, 7, 1, 10, 11, 0, 3, 1, 2, 0, 14, 12, 1, 10, 11])
    spans = data.word_spans(ids, text)
    words = [data.word_text(ids, a, b, text) for a, b, _ in spans]
    assert words == [
        "the",
        "King",
        "is",
        "dead",
        "King",
        "long",
        "live",
        "the",
        "Richard",
        "is",
        "the",
        "King",
        "Rich",
        "the",
    ]  # "Rich" + the unseen token ends; the last word has no end in the stream
    assert [line for _, _, line in spans][:5] == [0, 0, 0, 0, 6]
    items = data.cloze_items(ids, spans, text, common={"the"}, seq_len=10)
    # "King" at 16: on an earlier line of its window (at 6), not on its own (from 14); "Richard" is
    # new; "Rich" is followed by an unseen token; "the" is common
    assert [(at.tolist(), n) for at, n in items] == [(list(range(6, 17)), 1)]
    assert data.cloze_items(ids, spans, text, common={"king", "the"}, seq_len=10) == []
    assert (
        data.cloze_items(ids, spans, text, common={"the"}, seq_len=4) == []
    )  # the earlier King is out of reach
    # the control: "Richard" is new to its window; "long" and "live" come too early for a window
    control = data.cloze_items(ids, spans, text, common={"the"}, seq_len=10, recalled=False)
    assert [(at.tolist(), n) for at, n in control] == [(list(range(2, 13)), 2)]
    # with windows of 4 tokens the earlier King is out of reach: the later one is new
    control = data.cloze_items(ids, spans, text, common={"the"}, seq_len=3, recalled=False)
    assert [data.word_text(ids, at[-n], at[-1] + 1, text) for at, n in control] == [
        "dead",
        "King",
        "Richard",
        "King",
    ]


@pytest.fixture(scope="module")
def scored_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp(
        "scored"
    )  # a files: corpus (a document per line), 10% of it held out
    lines = [line for play in data.shakespeare_split()[0][:6] for line in play.splitlines()][:20000]
    (d / "plays.txt").write_text("\n".join(lines))
    return data.prepare(f"files:{d / 'plays.txt'}", 32, cache_dir=str(d / "cache"), vocab_size=1024)


def test_eval_items_follow_their_rules_against_the_decoded_text(scored_corpus):
    enc, corpus = data.gpt2_encoding(), scored_corpus
    items, said = data.eval_items(corpus, control=True)
    val = np.asarray(corpus.val).reshape(-1)
    text = [
        t or data.UNK for t in data.token_texts(corpus.vocab, enc)
    ]  # an unseen token is not a letter
    words = re.findall(r"[^\W\d_]+", corpus.vocab.decode(np.asarray(corpus.train).ravel(), enc))
    counts = collections.Counter(map(str.lower, words))
    common = {w for w, _ in counts.most_common(data.COMMON_WORDS)}
    for kind in ("cloze", "control"):
        x, y, n, row, at = items[kind]
        assert len(n) >= data.MIN_ITEMS and f"{len(n):,} {kind} items" in said
        assert (at[1:, 0] > at[:-1, -1]).all()  # windows in order, none overlapping
        for i in range(len(n)):
            window = torch.cat([x[i], y[i, -1:]]).tolist()
            assert window == val[at[i]].tolist() == list(val[int(at[i, 0]) : int(at[i, -1]) + 1])
            target = "".join(text[t] for t in window[-int(n[i]) :]).strip()
            before = "".join(text[t] for t in window[: -int(n[i])])
            line_start = before.rfind("\n") + 1
            earlier = [w.lower() for w in re.findall(r"[^\W\d_]+", before[:line_start])]
            own_line = [w.lower() for w in re.findall(r"[^\W\d_]+", before[line_start:])]
            assert target.isalpha() and len(target) >= 3 and not target.isupper()
            assert target.lower() not in common and text[val[int(at[i, -1]) + 1]] != data.UNK
            if kind == "cloze":
                assert target.lower() in earlier and target.lower() not in own_line
            else:
                assert target.lower() not in earlier + own_line
            assert (y[i, : -int(n[i])] == -1).all() and (y[i, -int(n[i]) :] >= 0).all()
    without, _ = data.eval_items(corpus)  # the control adds a kind and changes nothing else
    assert list(without) == ["cloze", "choice"]
    assert all(
        torch.equal(a, b) for k in without for a, b in zip(without[k], items[k], strict=True)
    )
    x, y, n, row, n_bytes, at = items["choice"]
    assert len(n) % data.OPTIONS == 0 and len(n) // data.OPTIONS >= data.MIN_ITEMS
    assert torch.equal(torch.cat([x, y[:, -1:]], 1), torch.from_numpy(val.astype(np.int64))[at])
    for i in range(0, len(n), data.OPTIONS):  # one context, four endings of a line each
        ctx = [x[j, : x.shape[1] - int(n[j]) + 1] for j in range(i, i + data.OPTIONS)]
        assert all(torch.equal(c[-5:], ctx[0][-5:]) for c in ctx)
        endings = [
            "".join(text[t] for t in y[j, -int(n[j]) :].tolist())
            for j in range(i, i + data.OPTIONS)
        ]
        assert all(e.endswith("\n") for e in endings) and len(set(endings)) == data.OPTIONS
        assert [len(e.encode()) for e in endings] == n_bytes[i : i + data.OPTIONS].tolist()


def test_text_outside_the_items_equals_a_brute_force_over_their_windows(scored_corpus):
    corpus, L = scored_corpus, scored_corpus.val.shape[1] - 1
    items, _ = data.eval_items(corpus, control=True)
    rows = np.linspace(0, len(corpus.val) - 1, 40).astype(np.int64)
    scored, read = set(), set()  # the stream offsets each item scores, and those it reads
    for _, y, *_, at in items.values():
        for i in range(len(y)):
            read.update(at[i].tolist())
            scored.update(int(at[i, t + 1]) for t in range(L) if y[i, t] >= 0)
    for windows, used in ((False, scored), (True, read)):
        got = data.outside_items(corpus, rows, items, windows=windows)
        want = [[r * (L + 1) + t + 1 not in used for t in range(L)] for r in rows.tolist()]
        assert got.dtype == torch.bool and got.tolist() == want
    assert 0 < got.sum() < data.outside_items(corpus, rows, items).sum() < got.numel()


def test_paper_measures_equal_a_brute_force_over_items(scored_corpus):
    torch.manual_seed(0)
    corpus = scored_corpus
    model = sekd.GPT(
        sekd.GPTConfig(vocab_size=corpus.vocab.size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    )
    ev = train.EvalSet(corpus, 256, torch.device("cpu"), 7)
    got = ev.evaluate(model, argparse.Namespace(dtype="float32"))
    with torch.no_grad():

        def logp(x):  # every position's full softmax, in float64
            return torch.log_softmax(model(x).double(), -1)

        x, y, n, *_ = ev.items["cloze"]
        lp, words, greedy, conf, correct = logp(x), [], [], [], []
        for i in range(len(n)):
            nll, ok = 0.0, True
            for t in range(x.shape[1] - int(n[i]), x.shape[1]):
                nll -= lp[i, t, y[i, t]].item()
                ok &= bool(lp[i, t].argmax() == y[i, t])
                conf.append(lp[i, t].exp().max().item())
                correct.append(bool(lp[i, t].argmax() == y[i, t]))
            words.append(nll)
            greedy.append(ok)
        assert got["cloze_ppl"] == pytest.approx(math.exp(sum(words) / len(words)), rel=1e-5)
        assert got["cloze_acc"] == pytest.approx(sum(greedy) / len(greedy))
        assert got["cloze_ece"] == pytest.approx(
            sekd.expected_calibration_error(torch.tensor(conf), torch.tensor(correct)), abs=1e-4
        )
        x, y, n, _, n_bytes, _ = ev.items["choice"]
        lp, right = logp(x), 0
        for i in range(0, len(n), data.OPTIONS):
            per_byte = [
                sum(lp[j, t, y[j, t]].item() for t in range(x.shape[1] - int(n[j]), x.shape[1]))
                / int(n_bytes[j])
                for j in range(i, i + data.OPTIONS)
            ]
            right += max(range(data.OPTIONS), key=per_byte.__getitem__) == 0
        assert got["choice_acc"] == pytest.approx(right / (len(n) // data.OPTIONS))
        assert got["choice_items"] == len(n) // data.OPTIONS and got["cloze_items"] == len(
            ev.items["cloze"][2]
        )

        def item_nll(kind, tau):  # each item's NLL with the logits divided by tau
            x, y, n, *_ = ev.items[kind]
            lp = torch.log_softmax(model(x).double() / tau, -1)
            return [
                -sum(lp[i, t, y[i, t]].item() for t in range(L - n[i], L)) for i in range(len(n))
            ]

        L, tau = x.shape[1], got["tau"]
        for kind in ("cloze", "control", "choice"):  # every item's NLL, raw and at tau*
            assert got[f"{kind}_nll"] == pytest.approx(item_nll(kind, 1.0), rel=1e-5)
            assert got[f"{kind}_nll_tau"] == pytest.approx(item_nll(kind, tau), rel=1e-5)
        for kind in ("cloze", "control"):
            nll = item_nll(kind, tau)
            assert got[f"{kind}_ppl_tau"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
        context = math.log(got["control_ppl_tau"] / got["cloze_ppl_tau"])
        assert got["context_nats"] == pytest.approx(context)
        # tau* minimises the NLL of the validation targets outside every item's window
        rows = torch.arange(len(corpus.val))
        free = data.outside_items(corpus, rows, ev.items, windows=True)
        xs = torch.from_numpy(corpus.val.astype(np.int64))
        z, y = model(xs[:, :-1]).double()[free], xs[:, 1:][free]

        def fit_nll(t):
            return torch.nn.functional.cross_entropy(z / t, y).item()

        best = min((0.2 * 1.01**i for i in range(400)), key=fit_nll)
        assert best / 1.01 <= tau <= best * 1.01 and fit_nll(tau) <= fit_nll(best) + 1e-9
        assert 0 < free.sum() < free.numel() and got["entropy"] > 0


def test_teacher_checkpoint_for_other_vocabulary_is_refused(tmp_path, tiny_corpus):
    run_job(tmp_path, tiny_corpus, "--run", "teacher", "--teacher-steps", "5")
    ckpt = torch.load(tmp_path / "teacher.pt", weights_only=True)
    ckpt["signature"]["vocab_fingerprint"] = "0" * 16
    torch.save(ckpt, tmp_path / "teacher.pt")
    with pytest.raises(train.UserError, match="another vocabulary or tokenizer"):
        run_job(tmp_path, tiny_corpus, "--run", "distill")


def test_corrupt_and_missing_checkpoints_are_clear_errors(tmp_path, tiny_corpus):
    run_job(tmp_path, tiny_corpus, "--run", "teacher", "--teacher-steps", "5")
    blob = (tmp_path / "teacher.pt").read_bytes()
    (tmp_path / "teacher.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(train.UserError, match="corrupt or truncated"):
        run_job(tmp_path, tiny_corpus, "--run", "distill")
    with pytest.raises(train.UserError, match="does not exist"):
        run_job(
            tmp_path, tiny_corpus, "--run", "distill", "--teacher-ckpt", str(tmp_path / "none.pt")
        )


def test_checkpoints_are_written_atomically(tmp_path):
    path = tmp_path / "c.pt"
    train.save_checkpoint(str(path), {"a": torch.ones(3)})
    assert os.listdir(tmp_path) == ["c.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))


@pytest.mark.parametrize(
    "flags,msg",
    [
        (["--k", "1.5"], "the distillation flags: k must be in (0, 1]"),  # KDConfig's check
        (["--k", "0"], "the distillation flags: k must be in (0, 1]"),
        (["--run", "teacher", "--k", "0"], "k must be in (0, 1]"),  # checked if no method runs too
        (["--T", "0"], "the distillation flags: T must be > 0, got 0.0"),
        (["--seq-len", "0"], "argument --seq-len: must be at least 1"),
        (["--student-embd", "15"], "divisible"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(flags, msg, capsys):
    code, err = cli_in_process(flags, capsys)
    assert (
        code == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    )


def cli_in_process(flags, capsys):
    """`python train.py FLAGS` as train.cli runs it, in this process (the subprocess tests below
    check a real process's exit code): -> (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        train.cli(list(flags))
    return e.value.code, capsys.readouterr().err


def test_help_lists_every_flag_with_defaults():
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "train.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=120,
    )
    assert r.returncode == 0
    for flag in (
        "--run",
        "--method",
        "--k",
        "--T",
        "--lam",
        "--flow",
        "--device",
        "--compile",
        "--seed",
    ):
        assert flag in r.stdout
    assert "(default: 0.2)" in r.stdout
    for line in train.__doc__.strip().splitlines()[2:]:  # the usage examples, line by line
        assert line in r.stdout.splitlines()


def test_distillation_flags_take_kdconfigs_defaults():
    """One set of defaults: a distillation flag's is its sekd.KDConfig field's (--divergence has
    a choice of its own, auto); the default flags make the default KDConfig."""
    args, kd = train.parse_args([]), sekd.KDConfig()
    for field in dataclasses.fields(sekd.KDConfig):
        if field.name not in ("method", "classes", "divergence"):
            assert getattr(args, field.name) == getattr(kd, field.name), field.name
    assert args.divergence == "auto" and train.kd_config(args, "sekd") == kd


def test_compile_is_one_setting(monkeypatch):
    """--compile chunks (the default), all (a bare --compile: the transformer bodies too) or off
    (every torch.compile runs eager, from the start of the job)."""
    modes = [train.parse_args(f).compile for f in ([], ["--compile"], ["--compile", "off"])]
    assert modes == ["chunks", "all", "off"]
    model = tiny_gpt()
    body = model.hidden
    assert train.maybe_compile(model, train.parse_args([])).hidden == body
    assert train.maybe_compile(model, train.parse_args(["--compile"])).hidden != body
    stances = []
    monkeypatch.setattr(torch.compiler, "set_stance", stances.append)
    for flags in (["--compile", "off"], ["--compile", "chunks"], ["--compile", "all"]):
        train.pick_device(train.parse_args(flags + ["--device", "cpu"]))
    assert stances == ["force_eager"]


def test_the_memory_meter_runs_compiled_code_eager():
    """Under LiveBytes a compiled function runs eager: the meter sees its every tensor, and no graph
    compiled under it serves later calls (which would then round otherwise)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda x: (x * 2).exp().sum(), backend=backend)
    x = torch.ones(1000)
    with torch.compiler.set_stance("default"):  # the suite runs eager elsewhere
        with train.LiveBytes() as meter:
            f(x)
        assert not graphs and meter.peak >= 2 * x.nbytes  # x * 2 and its exp, alive at once
        f(x)
    assert graphs  # outside the meter it compiles


# ------------------------------------------------------------------------ the position axis's flags


def test_position_flags_errors():
    for flags, msg in (
        (["--policy", "nope"], "argument --policy: invalid choice: 'nope'"),
        (["--gls-queue", "0"], "gls_queue must be an integer >= 1, got 0"),  # KDConfig's
        (["--curriculum-steps", "-1"], "curriculum_steps must be an integer >= 1, got -1"),
        (["--seeds", "0"], "argument --seeds"),
    ):
        with pytest.raises(ValueError, match=msg):
            train.check_flags(train.parse_args(flags))
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "train.py"), "--metric", "nope"],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=120,
    )
    assert (
        r.returncode == 2
        and "argument --metric: invalid choice: 'nope' (choose from 'student_entropy'" in r.stderr
    )
    assert len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------ the sample axis's batches


def test_batches_iterate_over_kept_samples_only():
    corpus = type("C", (), {"train": np.arange(40 * 5).reshape(40, 5)})()
    kept = np.array([3, 7, 8, 21, 39])
    b = data.Batches(corpus, 2, 1, 0, "cpu", kept)
    seen = set()
    for step in range(10):
        x, _ = b.get(step, 0)
        seen |= {int(r[0]) // 5 for r in x}
    assert seen == set(kept.tolist())


# ---------------------------------------------------------------------- the cache codec and storage


@pytest.mark.parametrize(
    "V,nbytes", [(11, 3), (50257, 3), (131072, 3), (131073, 4), (1 << 25, 4), ((1 << 25) + 1, 5)]
)
def test_cache_codec_is_lossless_and_never_truncates(V, nbytes):
    assert data.cache_bytes_per_class(V) == nbytes
    ids = torch.tensor([[0, V - 1, V // 2, 0]])
    counts = torch.tensor([[127, 1, 64, 0]])
    raw = data.encode_draws(ids, counts, V)
    assert raw.dtype == torch.uint8 and raw.shape == (1, 4, nbytes)
    got_ids, got_counts = data.decode_draws(raw, V)
    assert torch.equal(got_ids, ids) and torch.equal(got_counts, counts)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        data.encode_draws(torch.tensor([V]), torch.tensor([1]), V)
    with pytest.raises(ValueError, match="7-bit counts"):
        data.encode_draws(torch.tensor([0]), torch.tensor([128]), V)


def test_storage_accounting_at_the_papers_scale():
    per = data.storage_bytes_per_position(100_000, 64, 0.2)
    tb = {k: v * 1e11 / 1e12 for k, v in per.items()}
    assert per["rskd"] == 192 and per["sekd_3x"] == pytest.approx(38.4) and per["ce"] == 3
    assert (
        tb["rskd"] == pytest.approx(19.2)
        and tb["sekd_3x"] == pytest.approx(3.84)
        and tb["ce"] == pytest.approx(0.3)
    )
    assert tb["full_fp16"] == pytest.approx(20_000)  # 2 bytes per logit; the paper prints 10,000


# ----------------------------------------------------------------- SE-KD_3X's offline teacher cache


@pytest.fixture
def cache_setup(tmp_path, tiny_corpus):
    """A tiny corpus, a saved tiny teacher, the job's args and a kept-sample list."""
    ds, cache_dir = tiny_corpus
    args = train.build_parser().parse_args(
        TINY + ["--dataset", ds, "--data-dir", cache_dir, "--out-dir", str(tmp_path), "--U", "64"]
    )
    corpus = data.prepare(ds, args.seq_len, cache_dir=cache_dir)
    teacher = train.new_model(args, "teacher", corpus.vocab.size, torch.device("cpu"))
    train.save_checkpoint(train.out_path(args, "teacher"), {"model": teacher.state_dict()})
    kept = np.arange(0, len(corpus.train), 4)
    return args, corpus, teacher, kept


def test_cache_round_trip_reuse_and_size_accounting(cache_setup):
    args, corpus, teacher, kept = cache_setup
    cache, build_s, reused = train.teacher_cache(args, corpus, torch.device("cpu"), teacher, kept)
    assert build_s > 0 and not reused
    again, build_s2, reused2 = train.teacher_cache(
        args, corpus, torch.device("cpu"), None, kept
    )  # no teacher needed
    assert build_s2 is None and reused2
    rows = np.array([0, 3, len(kept) - 1])
    ids, counts = data.decode_draws(torch.from_numpy(again.data[rows]), corpus.vocab.size)
    assert ids.shape == (3, args.seq_len, 64) and (counts.sum(-1) == 64).all()
    # the draws are the teacher's, from the seeded generator, in kept order
    x = torch.from_numpy(corpus.train[kept][:, :-1].astype(np.int64))
    want = sekd.teacher_draws(
        teacher.hidden(x),
        teacher.head_weight,
        64,
        generator=torch.Generator().manual_seed(args.seed),
    )
    assert torch.equal(ids, want[0][rows]) and torch.equal(counts, want[1][rows])
    # size on disk against the storage accounting: within 1%, and the data part exactly
    real = os.path.getsize(cache.path)
    per_position = data.storage_bytes_per_position(corpus.vocab.size, 64)["rskd"]
    accounted = len(kept) * args.seq_len * per_position
    assert per_position == 64 * 3 and abs(real - accounted) <= 0.01 * accounted
    assert real - cache.offset == accounted
    assert sorted(os.listdir(os.path.dirname(cache.path))) == [
        "rskd_cache_seed1337.bin",
        "teacher.pt",
    ]


@pytest.mark.parametrize(
    "change,key",
    [
        ({"U": 32}, "U:"),
        ({"T": 2.0}, "T:"),
        ({"seed": 7}, "seed:"),
        ("kept", "kept:"),
        ("teacher", "teacher_sha256:"),
    ],
)
def test_mismatching_cache_is_refused_in_one_line(cache_setup, change, key):
    args, corpus, teacher, kept = cache_setup
    path = train.teacher_cache(args, corpus, torch.device("cpu"), teacher, kept)[0].path
    args.cache = path
    if change == "kept":
        kept = kept[1:]
    elif change == "teacher":
        train.save_checkpoint(train.out_path(args, "teacher"), {"model": tiny_gpt().state_dict()})
    else:
        vars(args).update(change)
    with pytest.raises(train.UserError, match=key) as e:
        train.teacher_cache(args, corpus, torch.device("cpu"), teacher, kept)
    assert "--rebuild-cache" in str(e.value) and "\n" not in str(e.value)
    args.rebuild_cache = True
    assert not train.teacher_cache(args, corpus, torch.device("cpu"), teacher, kept)[2]


def test_truncated_or_interrupted_cache_leaves_nothing_valid(cache_setup, monkeypatch):
    args, corpus, teacher, kept = cache_setup
    path = train.teacher_cache(args, corpus, torch.device("cpu"), teacher, kept)[0].path
    blob = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(blob[:-100])
    with pytest.raises(train.UserError, match="corrupt or truncated"):
        train.teacher_cache(args, corpus, torch.device("cpu"), teacher, kept)
    os.remove(path)
    calls = []

    def failing_encode(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_encode(*a)

    real_encode = data.encode_draws
    monkeypatch.setattr(data, "encode_draws", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        train.teacher_cache(args, corpus, torch.device("cpu"), teacher, kept)
    assert os.listdir(os.path.dirname(path)) == ["teacher.pt"]  # no cache, no temporary file


@pytest.mark.parametrize(
    "flags,msg",
    [
        (["--U", "128"], "argument --U: must be in [1, 127] (7-bit counts), got 128"),
        (["--l", "0"], "argument --l: must be in (0, 1]"),
    ],
)
def test_cli_axis_errors_are_one_line_exit_2(flags, msg, capsys):
    code, err = cli_in_process(flags, capsys)
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_mismatching_cache_is_refused_before_the_pre_pass(cache_setup, monkeypatch):
    args, corpus, teacher, kept = cache_setup
    train.teacher_cache(args, corpus, torch.device("cpu"), teacher, kept)
    args.U = 32
    monkeypatch.setattr(
        train, "sample_prepass", lambda *a: pytest.fail("pre-pass ran before the cache check")
    )
    with pytest.raises(train.UserError, match="U: 64 in the cache, 32 now"):
        train.sample_plan(args, "top", "cache", corpus, torch.device("cpu"), tiny_gpt(), None)


# --------------------------------------------------------------- on-policy distillation, end to end


@pytest.fixture(scope="module")
def pretrained_pair(tmp_path_factory, tiny_corpus):
    """A tiny teacher and initial student (TINY flags), trained once; `with_pair` copies them into
    an --out-dir."""
    d = tmp_path_factory.mktemp("pair")
    run_job(d, tiny_corpus, "--run", "distill", "--student-steps", "1")
    return d


def with_pair(path, pair):
    path.mkdir(exist_ok=True)
    for f in ("teacher.pt", "student_init.pt"):
        shutil.copy(pair / f, path / f)
    return path


def test_on_policy_distillation_runs_end_to_end_and_lowers_the_on_policy_kl(
    tmp_path, tiny_corpus, pretrained_pair
):
    out = with_pair(tmp_path, pretrained_pair)
    r = run_job(
        out,
        tiny_corpus,
        "--run",
        "distill",
        "--on-policy",
        "0.5",
        "--student-steps",
        "40",
        "--lr",
        "3e-3",
    )
    row = r["rows"][-1]
    assert row["method"] == "SE-KD top 20% +50% on-policy" and math.isfinite(row["val_ppl"])
    ckpt = torch.load(out / "student_sekd.pt", weights_only=True)
    assert (
        ckpt["kd"]["divergence"] == "reverse" and ckpt["run_key"]["prompt_len"] == 8
    )  # auto: reverse; P = L / 2
    teacher, init, final = (
        train.GPT_from(torch.load(out / f, weights_only=True))
        for f in ("teacher.pt", "student_init.pt", "student_sekd.pt")
    )
    corpus = data.prepare(tiny_corpus[0], 16, cache_dir=tiny_corpus[1])
    idx = torch.from_numpy(corpus.val[:32, :-1].astype(np.int64))
    full = sekd.KDConfig("full_kd", k=1.0, divergence="reverse")

    def on_policy_kl(
        student,
    ):  # reverse KL on the student's own continuations of validation prompts
        with torch.no_grad():
            return np.mean(
                [
                    sekd.on_policy_distill_loss(
                        student, teacher, idx, idx, full, 1.0, 8, torch.Generator().manual_seed(s)
                    )[0].item()
                    for s in range(4)
                ]
            )

    assert on_policy_kl(final) < on_policy_kl(init)


# ============================================================================ reliability catalogue
# Every bad input or fault below ends in a one-line message that says what is wrong and how to fix
# it (from `python train.py`, exit code 2: train.cli prints a UserError, = data.DataError, as one
# line; where train.py builds a library object from flags, it turns the library's ValueError into
# one) and leaves no half-written file. CATALOGUE maps each item to the tests that check it, some of
# them further up this file; README "Reliability" lists the same.


CATALOGUE = {
    "--k out of range": [
        "test_cli_user_errors_are_one_line_exit_2",
        "test_bad_budget_is_a_clear_error",
    ],
    "--l out of range": ["test_cli_axis_errors_are_one_line_exit_2"],
    "--U out of range": [
        "test_cli_axis_errors_are_one_line_exit_2",
        "test_bad_draw_count_is_a_clear_error",
    ],
    "--T out of range": [
        "test_cli_user_errors_are_one_line_exit_2",
        "test_kdconfig_checks_every_setting_in_one_line",
    ],
    "--on-policy, --prompt-len out of range; on-policy or reverse KL with a method that "
    "cannot use them": [
        "test_bad_on_policy_flags",
        "test_reverse_kl_flags_are_checked",
    ],
    "unknown method, metric, policy, divergence (any bad flag value)": [
        "test_unknown_choices_are_one_line_exit_2",
        "test_position_flags_errors",
    ],
    "teacher and student vocabulary mismatch": [
        "test_teacher_and_student_vocabularies_must_match",
        "test_teacher_checkpoint_for_other_vocabulary_is_refused",
    ],
    "teacher trained with another tokenizer": ["test_checkpoint_for_another_tokenizer_is_refused"],
    "vocabulary too large for the cache id width": [
        "test_cache_codec_is_lossless_and_never_truncates",
        "test_vocabulary_beyond_the_cache_format_is_refused",
    ],
    "sequence length above the teacher's block size": [
        "test_seq_len_above_the_teachers_block_size_is_refused"
    ],
    "missing or truncated checkpoint": ["test_corrupt_and_missing_checkpoints_are_clear_errors"],
    "corrupt checkpoint (garbage, wrong keys or shapes)": ["test_garbage_checkpoints_are_refused"],
    "unfinished checkpoint of another run": [
        "test_unfinished_checkpoint_of_another_run_is_not_resumed"
    ],
    "cache built for another teacher, dataset, U, T, seed or sample set": [
        "test_mismatching_cache_is_refused_in_one_line",
        "test_mismatching_cache_is_refused_before_the_pre_pass",
    ],
    "truncated or interrupted cache": ["test_truncated_or_interrupted_cache_leaves_nothing_valid"],
    "empty, binary or too-short corpus": [
        "test_empty_and_too_short_corpus_are_clear_errors",
        "test_empty_or_binary_local_file_says_so",
        "test_too_short_corpus_is_one_line_exit_2",
    ],
    "NaN or inf loss or gradient": [
        "test_non_finite_loss_stops_and_keeps_the_last_checkpoint",
        "test_huge_learning_rate_stops_in_one_line",
    ],
    "disk full while writing a checkpoint": [
        "test_disk_full_while_saving_a_checkpoint",
        "test_write_failure_in_a_real_process",
    ],
    "disk full while writing the teacher cache": ["test_disk_full_while_building_the_cache"],
    "disk full while writing the data memmaps": ["test_disk_full_while_writing_the_data"],
    "SIGKILL mid-training": [
        "test_sigkill_then_resume_gives_the_same_weights",
        "test_interrupted_distillation_resumes_to_the_same_weights",
    ],
}


def test_the_catalogue_has_15_items_each_with_a_test():
    assert len(CATALOGUE) >= 15
    for item, tests in CATALOGUE.items():
        assert tests and all(callable(globals().get(t)) for t in tests), item


def leftovers(folder):
    """Temporary files left anywhere under `folder`: there must be none."""
    return [f for _, _, files in os.walk(folder) for f in files if ".tmp" in f]


def run_cli(*flags, **kw):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "train.py"), *map(str, flags)],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=300,
        **kw,
    )


def assert_one_line_exit_2(r, msg):
    """Exit code 2 and one line of error, the last of stderr (progress bars of `datasets` may come
    before)."""
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert msg in lines[-1] and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, (
        r.stderr
    )
    assert not any(line.startswith("error") for line in lines[:-1])


def tiny_cli(tmp_path, corpus, *extra):
    ds, cache = corpus
    return TINY + ["--dataset", ds, "--data-dir", cache, "--out-dir", str(tmp_path)] + list(extra)


@pytest.mark.parametrize(
    "flags,msg",
    [
        (["--method", "magic"], "argument --method: invalid choice: 'magic'"),
        (["--policy", "nope"], "argument --policy: invalid choice: 'nope'"),
    ],
)
def test_unknown_choices_are_one_line_exit_2(flags, msg, capsys):
    code, err = cli_in_process(flags, capsys)
    assert (
        code == 2
        and err.startswith("error: ")
        and msg in err
        and len(err.strip().splitlines()) == 1
    )
    for bad, want in (
        (["--divergence", "sideways"], "invalid choice: 'sideways'"),
        (["--run", "nope"], "--run"),
        (["--k", "abc"], "invalid float value: 'abc'"),
        (["--no-such-flag"], "unrecognized arguments"),
    ):
        with pytest.raises(train.UserError, match=want) as e:
            train.main(bad)
        assert "--help" in str(e.value) and "\n" not in str(e.value)


def checked(flags):
    """What `train.main` checks before any work: the flags, their combinations, each method's
    KDConfig."""
    args = train.parse_args(flags)
    train.check_flags(args)
    return [
        train.kd_config(args, m)
        for m in {"compare": ["ce", "full_kd", "sekd"]}.get(args.run, [args.method])
    ]


def test_a_flag_mistake_only_the_library_catches_is_one_line_exit_2(capsys):
    for flags, msg in (
        (
            ["--run", "distill", "--method", "rskd", "--flow", "dense"],  # KDConfig's
            "--method rskd: classes 'rskd' needs a KD method (not ce) and flow 'streamed'",
        ),
        (
            ["--student-embd", "15"],
            "the student (--student-layers, --student-heads, --student-embd, "
            "--seq-len): n_embd must be divisible by n_head, got 15, 2",
        ),
    ):
        with pytest.raises(SystemExit) as e:  # GPTConfig's, checked before any work
            train.cli(flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {msg}") and err.count("\n") == 1, err


def test_a_bug_in_a_registered_metric_keeps_its_traceback(
    tmp_path, tiny_corpus, pretrained_pair, monkeypatch, capsys
):
    def buggy_metric(zs, zt, y):
        raise ValueError("a bug in the user's own metric")

    buggy_metric.needs_teacher = False

    monkeypatch.setitem(sekd.METRICS, "buggy_metric", buggy_metric)
    out = with_pair(tmp_path, pretrained_pair)
    with pytest.raises(
        ValueError, match="a bug in the user's own metric"
    ) as e:  # not SystemExit(2): cli lets it by
        train.cli(
            tiny_cli(
                out,
                tiny_corpus,
                "--run",
                "distill",
                "--metric",
                "buggy_metric",
                "--student-steps",
                "1",
            )
        )
    assert not isinstance(e.value, train.UserError) and "error:" not in capsys.readouterr().err
    assert "buggy_metric" in [
        frame.name for frame in traceback.extract_tb(e.tb)
    ]  # the traceback reaches the bug


def test_bad_on_policy_flags():
    for flags, msg in (
        (["--on-policy", "1.5"], "argument --on-policy: must be in \\[0, 1\\], got 1.5"),
        (["--on-policy", "0.01"], "rounds to no sequence: raise one"),
        (["--prompt-len", "200"], "--prompt-len must be in \\[0, --seq-len 128\\]"),
        (["--on-policy", "0.5", "--run", "distill", "--method", "at_kd"], "--on-policy works with"),
        (
            ["--on-policy", "0.5", "--run", "distill", "--method", "sekd_3x"],
            "full_kd, sekd, random_pos",
        ),
        (["--on-policy", "0.5", "--lam", "0"], "--lam > 0"),
        (["--on-policy", "0.5", "--run", "teacher"], "--run compare or distill"),
        (
            ["--divergence", "reverse", "--run", "distill", "--method", "rskd"],
            "reverse KL needs the teacher's full",
        ),
    ):
        with pytest.raises(ValueError, match=msg):
            checked(flags)
    assert_one_line_exit_2(
        run_cli("--divergence", "reverse", "--run", "distill", "--method", "rskd"),
        "the reverse KL needs the teacher's full distribution",
    )  # KDConfig's, before any work
    assert [
        c.divergence
        for c in checked(["--on-policy", "0.5", "--run", "distill", "--method", "sekd_top_smp"])
    ] == ["reverse"]
    assert [c.divergence for c in checked(["--divergence", "reverse", "--run", "compare"])] == [
        "forward",
        "reverse",
        "reverse",
    ]  # CE, the no-KD baseline, has no divergence


@pytest.mark.parametrize("field", ["tokenizer", "vocab_size", "vocab_fingerprint"])
def test_checkpoint_for_another_tokenizer_is_refused(tmp_path, tiny_corpus, pretrained_pair, field):
    out = with_pair(tmp_path, pretrained_pair)
    ckpt = torch.load(out / "teacher.pt", weights_only=True)
    ckpt["signature"][field] = {
        "tokenizer": "llama3",
        "vocab_size": 151936,
        "vocab_fingerprint": "0" * 16,
    }[field]
    train.save_checkpoint(str(out / "teacher.pt"), ckpt)
    with pytest.raises(
        train.UserError, match="trained on another vocabulary or tokenizer .* --retrain-teacher"
    ):
        run_job(out, tiny_corpus, "--run", "distill")
    assert sorted(os.listdir(out)) == ["student_init.pt", "teacher.pt"]


def test_vocabulary_beyond_the_cache_format_is_refused():
    assert (
        data.cache_bytes_per_class(1 << 49) == 7
    )  # 49 id bits + 7 count bits: still stored, losslessly
    with pytest.raises(ValueError, match="does not fit the cache format"):
        data.cache_bytes_per_class((1 << 49) + 1)
    with pytest.raises(ValueError, match="outside the vocabulary \\[0, 11\\)"):
        data.encode_draws(torch.tensor([[11]]), torch.tensor([[1]]), 11)
    with pytest.raises(ValueError, match="7-bit counts"):
        data.encode_draws(torch.tensor([[3]]), torch.tensor([[128]]), 11)
    with pytest.raises(ValueError, match="a vocabulary of 131,073 needs 4"):
        data.decode_draws(
            torch.zeros(1, 2, 3, dtype=torch.uint8), 131_073
        )  # a 3-byte cache read with a bigger V


def test_teacher_and_student_vocabularies_must_match(cache_setup):
    args, corpus, _, _ = cache_setup
    other = train.new_model(args, "teacher", corpus.vocab.size + 1, torch.device("cpu"))
    with pytest.raises(
        train.UserError,
        match=f"vocabularies differ \\(teacher {corpus.vocab.size + 1}, student "
        f"{corpus.vocab.size}\\): train the teacher on the same data",
    ):
        train.distill_student(args, "sekd", corpus, torch.device("cpu"), other, None)


def test_seq_len_above_the_teachers_block_size_is_refused(tmp_path, tiny_corpus, pretrained_pair):
    out = with_pair(tmp_path, pretrained_pair)
    with pytest.raises(
        train.UserError, match="block size 16, shorter than --seq-len 32: use --seq-len 16 or less"
    ):
        run_job(out, tiny_corpus, "--run", "distill", "--seq-len", "32")
    assert sorted(os.listdir(out)) == ["student_init.pt", "teacher.pt"]


@pytest.mark.parametrize("damage", ["garbage", "wrong keys", "wrong shapes", "student garbage"])
def test_garbage_checkpoints_are_refused(tmp_path, tiny_corpus, pretrained_pair, damage):
    out = with_pair(tmp_path, pretrained_pair)
    if damage == "garbage":
        (out / "teacher.pt").write_bytes(os.urandom(5000))
    elif damage == "wrong keys":
        torch.save({"model": {}, "config": {"vocab_size": 3}}, out / "teacher.pt")
    elif damage == "wrong shapes":
        ckpt = torch.load(out / "teacher.pt", weights_only=True)
        ckpt["config"]["n_embd"] = 64
        torch.save(ckpt, out / "teacher.pt")
    else:  # a distilled student's checkpoint, which the run would resume from
        (out / "student_sekd.pt").write_bytes(b"PK\x03\x04" + os.urandom(100))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    with pytest.raises(
        train.UserError, match="is corrupt or truncated .*: delete it and train again"
    ) as e:
        run_job(out, tiny_corpus, "--run", "distill")
    assert "\n" not in str(e.value)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # nothing written over


def test_unfinished_checkpoint_of_another_run_is_not_resumed(tmp_path, capsys):
    model = tiny_gpt(dtype=torch.float32)
    opt = train.make_optimizer(model, 1e-3, 0.1)
    key = {"method": "sekd", "lr": 0.001, "seed": 1}
    ckpt = {
        "model": model.state_dict(),
        "config": vars(model.config),
        "step": 10,
        "steps": 30,
        "optimizer": opt.state_dict(),
        "run_key": key,
    }
    path = str(tmp_path / "student_sekd.pt")
    train.save_checkpoint(path, ckpt)
    assert train.resumable(path, key, "sekd")["step"] == 10
    assert train.resumable(path, {**key, "lr": 0.002}, "sekd") is None
    assert (
        "unfinished checkpoint of another run (lr differ): training anew" in capsys.readouterr().out
    )
    train.save_checkpoint(path, {**ckpt, "step": 30})
    assert train.resumable(path, key, "sekd") is None  # finished: a new run trains over it
    assert train.resumable(str(tmp_path / "none.pt"), key, "sekd") is None


def test_too_short_corpus_is_one_line_exit_2(tmp_path):
    ds = write_corpus(tmp_path, "Short text.\n" * 3, "x\n")
    r = run_cli(
        "--dataset",
        ds,
        "--seq-len",
        "64",
        "--data-dir",
        tmp_path / "cache",
        "--out-dir",
        tmp_path / "out",
    )
    assert_one_line_exit_2(
        r, "too few for 2 samples of 65 tokens: use a bigger corpus or a smaller --seq-len"
    )
    assert not leftovers(tmp_path) and not os.path.exists(tmp_path / "out")
    assert not any(
        f == "meta.json" for _, _, fs in os.walk(tmp_path / "cache") for f in fs
    )  # nothing reusable


def inject_after_checkpoint(path, n, fault, step="distill_loss"):
    """A sekd step (`distill_loss`, or `sekd_loss`: plain SE-KD's) that calls `fault(loss,
    student)` from the n-th call after `path` first exists."""
    real, calls = getattr(sekd, step), [0]

    def loss(student, *a, **k):
        out = real(student, *a, **k)
        calls[0] += os.path.exists(path)
        return (fault(out[0], student), out[1]) if calls[0] >= n else out

    return loss


@pytest.mark.parametrize(
    "fault,what",
    [
        (lambda loss, s: loss * float("nan"), "loss became nan"),
        (lambda loss, s: loss * float("inf"), "loss became inf"),
        (
            lambda loss, s: loss + (s.wte.weight.sum() - s.wte.weight.sum().detach()).sqrt(),
            "gradient norm became",
        ),
    ],
)
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(
    tmp_path, tiny_corpus, pretrained_pair, monkeypatch, fault, what
):
    out = with_pair(tmp_path, pretrained_pair)
    path = out / "student_sekd.pt"
    seen = {}

    def faulty(loss, student):  # from the 3rd call after the step-5 checkpoint: step 8
        seen.setdefault("bytes", path.read_bytes())
        return fault(loss, student)

    faulty_step = inject_after_checkpoint(str(path), 3, faulty, "sekd_loss")
    monkeypatch.setattr(sekd, "sekd_loss", faulty_step)  # the default job's SE-KD step
    with pytest.raises(
        train.UserError,
        match=f"{what}.* at step 8: stopped before the update, step 5's checkpoint "
        "is kept; lower --lr",
    ) as e:
        run_job(out, tiny_corpus, "--run", "distill", "--eval-interval", "5")
    assert "\n" not in str(e.value)
    assert path.read_bytes() == seen["bytes"] and torch.load(path, weights_only=True)["step"] == 5
    assert not leftovers(out)


def test_huge_learning_rate_stops_in_one_line(tmp_path, tiny_corpus, pretrained_pair):
    out = with_pair(tmp_path, pretrained_pair)
    r = run_cli(*tiny_cli(out, tiny_corpus, "--run", "distill", "--lr", "1e30", "--warmup", "0"))
    assert_one_line_exit_2(
        r, "[sekd] loss became nan at step 2: stopped before the update, no checkpoint yet"
    )
    assert sorted(os.listdir(out)) == ["student_init.pt", "teacher.pt"]


class FullDisk:
    """A stand-in for `open` in one module: files whose name contains `match` take half of a write
    and then fail with ENOSPC (from the `after`-th such file on), as on a full disk."""

    def __init__(self, match, after=1):
        self.match, self.after, self.seen = match, after, 0

    def __call__(self, path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        if self.match in str(path) and "w" in mode:
            self.seen += 1
            if self.seen >= self.after:
                real_write = f.write

                def write(b):
                    real_write(b[: len(b) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                f.write = write
        return f


def test_disk_full_while_saving_a_checkpoint(tmp_path, tiny_corpus, pretrained_pair, monkeypatch):
    out = with_pair(tmp_path, pretrained_pair)
    monkeypatch.setattr(
        data, "open", FullDisk("student_sekd.pt.tmp", after=2), raising=False
    )  # step 10 fails
    with pytest.raises(data.DataError) as e:
        run_job(out, tiny_corpus, "--run", "distill", "--eval-interval", "5")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"could not write {out / 'student_sekd.pt'}: No space left on device"
    )
    assert "disk full? free space or choose another --out-dir" in msg
    assert torch.load(out / "student_sekd.pt", weights_only=True)["step"] == 5 and not leftovers(
        out
    )
    monkeypatch.undo()  # space again: the run resumes from the step-5 checkpoint
    assert (
        run_job(out, tiny_corpus, "--run", "distill", "--eval-interval", "5")["rows"][-1][
            "resumed_at"
        ]
        == 5
    )


@pytest.mark.parametrize("where", ["allocate", "header"])
def test_disk_full_while_building_the_cache(cache_setup, monkeypatch, where):
    args, corpus, teacher, kept = cache_setup
    path = train.teacher_cache(args, corpus, torch.device("cpu"), teacher, kept)[0].path
    good = open(path, "rb").read()
    args.rebuild_cache = True
    if where == "allocate":

        def no_space(fd, offset, size):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "posix_fallocate", no_space)
    else:
        monkeypatch.setattr(data, "open", FullDisk(".tmp"), raising=False)
    with pytest.raises(
        train.UserError,
        match=f"could not write {path}: No space left on device .* the previous "
        "file, if any, is unchanged",
    ):
        train.teacher_cache(args, corpus, torch.device("cpu"), teacher, kept)
    assert open(path, "rb").read() == good and not leftovers(os.path.dirname(path))


def test_disk_full_while_writing_the_data(tmp_path, monkeypatch):
    line = "Now is the winter of our discontent made glorious summer by this sun of York.\n"
    ds = write_corpus(tmp_path, line * 200, line * 30)
    real_save = np.save

    def save(path, array):
        if "val.npy" in str(path):
            real_save(path, array[: len(array) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(path, array)

    monkeypatch.setattr(np, "save", save)
    with pytest.raises(data.DataError, match="could not write .*val.npy: No space left on device"):
        data.prepare(ds, 16, cache_dir=str(tmp_path / "cache"))
    assert not leftovers(tmp_path) and not any(
        f == "meta.json" for _, _, fs in os.walk(tmp_path) for f in fs
    )
    monkeypatch.undo()
    assert (
        len(data.prepare(ds, 16, cache_dir=str(tmp_path / "cache")).val) > 0
    )  # rebuilt once there is space


def limit_file_size():
    """preexec_fn: writes past 200 kB fail with EFBIG (SIGXFSZ ignored), like a full disk."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_write_failure_in_a_real_process(tmp_path, tiny_corpus, pretrained_pair):
    out = with_pair(tmp_path, pretrained_pair)
    before = (out / "teacher.pt").read_bytes()
    assert len(before) > 200_000
    r = run_cli(
        *tiny_cli(out, tiny_corpus, "--run", "teacher", "--retrain-teacher"),
        preexec_fn=limit_file_size,
    )
    assert_one_line_exit_2(r, f"could not write {out / 'teacher.pt'}: File too large")
    assert (out / "teacher.pt").read_bytes() == before and not leftovers(out)


def final_weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra",
    [["--policy", "gls", "--gls-queue", "50", "--on-policy", "0.5"], ["--method", "random_pos"]],
)
def test_interrupted_distillation_resumes_to_the_same_weights(
    tmp_path, tiny_corpus, pretrained_pair, monkeypatch, extra
):
    """GLS's queue, on-policy sampling and RandomPos's global RNG all carry over a resume."""
    flags = ["--run", "distill", "--eval-interval", "5", *extra]
    name = f"student_{'random_pos' if 'random_pos' in extra else 'sekd'}.pt"
    whole = run_job(with_pair(tmp_path / "a", pretrained_pair), tiny_corpus, *flags)
    out = with_pair(tmp_path / "b", pretrained_pair)
    stop = inject_after_checkpoint(
        str(out / name), 3, lambda loss, s: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    monkeypatch.setattr(sekd, "distill_loss", stop)
    with pytest.raises(KeyboardInterrupt):
        run_job(out, tiny_corpus, *flags)
    monkeypatch.undo()
    assert torch.load(out / name, weights_only=True)["step"] == 5
    resumed = run_job(out, tiny_corpus, *flags)
    assert resumed["rows"][-1]["resumed_at"] == 5 and whole["rows"][-1]["resumed_at"] is None
    assert_same_weights(final_weights(tmp_path / "a" / name), final_weights(out / name))
    assert resumed["rows"][-1]["val_ppl"] == whole["rows"][-1]["val_ppl"]


def test_sigkill_then_resume_gives_the_same_weights(tmp_path, tiny_corpus, pretrained_pair):
    flags = ["--run", "distill", "--student-steps", "60", "--eval-interval", "10"]
    # the same threads in all three runs, and fast on busy cores; compiled, as a user runs it: a
    # step under the memory meter once changed the compiled formulas' rounding for every later
    # step, which a resumed run missed
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the chunk formulas compiled, as by default
    a, b = with_pair(tmp_path / "a", pretrained_pair), with_pair(tmp_path / "b", pretrained_pair)
    assert run_cli(*tiny_cli(a, tiny_corpus, *flags), env=env).returncode == 0  # uninterrupted
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "train.py"), *tiny_cli(b, tiny_corpus, *flags)],
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 240
    while not (b / "student_sekd.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # mid-training: just after its first checkpoint
    assert proc.wait() == -signal.SIGKILL
    step = torch.load(b / "student_sekd.pt", weights_only=True)["step"]
    assert 10 <= step < 60
    r = run_cli(*tiny_cli(b, tiny_corpus, *flags), env=env)
    assert r.returncode == 0 and f"[sekd] resuming at step {step}/60" in r.stdout
    assert_same_weights(final_weights(a / "student_sekd.pt"), final_weights(b / "student_sekd.pt"))


# ========================================================================= data parallel (torchrun)


def test_batches_shard_the_global_batch_across_ranks():
    corpus = type("C", (), {"train": np.arange(30 * 5).reshape(30, 5)})()
    one = data.Batches(corpus, 6, 2, 0, "cpu")
    ranks = [data.Batches(corpus, 2, 2, 0, "cpu", rank=r, world=3) for r in range(3)]
    for step in range(6):  # 72 ids: crosses two epochs of 30 samples
        for micro in range(2):
            assert (
                np.concatenate([b.ids(step, micro) for b in ranks]).tolist()
                == one.ids(step, micro).tolist()
            )


def as_rank(monkeypatch, rank, world):
    """Run the job's code as `rank` of `world` in this process: collectives do nothing."""
    monkeypatch.setattr(train, "RANK", rank)
    monkeypatch.setattr(train, "WORLD", world)
    monkeypatch.setattr(train, "sync", lambda obj=None: [obj] * world)


def test_sharded_prepass_cache_rows_and_rank0_builds(cache_setup, monkeypatch):
    args, corpus, teacher, kept = cache_setup
    args.U, kept = 8, kept[:40]  # a small cache is enough here
    student, dev = (
        train.new_model(args, "student", corpus.vocab.size, torch.device("cpu")),
        torch.device("cpu"),
    )
    whole = train.sample_prepass(student, corpus, args, dev)[0]
    shards = []
    for r in range(
        3
    ):  # each rank scores its share of the batches; gathered, they are the 1-rank scores
        as_rank(monkeypatch, r, 3)
        monkeypatch.setattr(train, "sync", lambda obj=None: [obj])  # this rank's share alone
        shards.append(train.sample_prepass(student, corpus, args, dev)[0])
    assert 0 < len(shards[0]) < len(whole)
    np.testing.assert_array_equal(np.concatenate(shards), whole)
    as_rank(monkeypatch, 1, 2)  # a rank other than 0 never builds the cache, it waits for rank 0's
    with pytest.raises(train.UserError, match="corrupt or truncated"):
        train.teacher_cache(args, corpus, dev, teacher, kept)
    as_rank(monkeypatch, 0, 1)
    cache = train.teacher_cache(args, corpus, dev, teacher, kept)[0]
    as_rank(monkeypatch, 1, 2)
    before = os.stat(cache.path).st_mtime_ns
    args.rebuild_cache = True
    assert train.teacher_cache(args, corpus, dev, teacher, kept)[1:] == (None, True)
    assert os.stat(cache.path).st_mtime_ns == before
    # each rank reads the cache rows of its own samples: together, those of the 1-rank batch
    one = data.Batches(corpus, 4, 1, 3, dev, kept, cache=cache)
    parts = [data.Batches(corpus, 2, 1, 3, dev, kept, r, 2, cache=cache) for r in range(2)]

    def rows(x, ids, counts):  # (sample, its draws), in a fixed order
        return sorted(
            (a.tolist(), i.tolist(), c.tolist()) for a, i, c in zip(x, ids, counts, strict=True)
        )

    for step in range(3):
        x, _, (ids, counts) = one.get(step, 0)
        merged = sorted(
            sum((rows(px, *draws) for px, _, draws in (p.get(step, 0) for p in parts)), [])
        )
        assert merged == rows(x, ids, counts)


def test_checkpoint_keeps_each_ranks_random_stream(monkeypatch):
    """A resumed data-parallel run: every rank continues its own generator, not rank 0's."""
    states = []
    for rank in range(2):  # two "ranks" in this process, each with its own stream
        torch.manual_seed(100 + rank)
        states.append({"cpu": torch.get_rng_state(), "cuda": []})
    for collective in ("broadcast", "all_reduce"):
        monkeypatch.setattr(train.dist, collective, lambda *a: None)
    args, model, drawn, saved = train.parse_args(["--warmup", "0"]), tiny_gpt(), [], []

    class Batches:  # a step of one empty micro-batch
        bs, accum, samples = 1, 1, np.zeros((1, 2))

        def get(self, step, micro):
            return None, None

    def loss_fn(step, micro, x, y):  # a draw from torch's generator at each step
        drawn.append(torch.rand(4))
        return model.head_weight.sum() * 0, None

    def resumed(rank, world, seed):  # a restarted process resuming at step 2 -> its draw there
        as_rank(monkeypatch, rank, world)
        torch.manual_seed(seed)
        drawn.clear()
        train.train_loop(model, loss_fn, Batches(), 2, 1e-3, args, "t", None, saved[0])
        return drawn[0]

    def sync(obj):  # as rank 1 of 2, which saves rank 0's generators as rank 0 sent them
        return [states[0], obj] if isinstance(obj, dict) else [obj] * 2

    as_rank(monkeypatch, 1, 2)
    monkeypatch.setattr(train, "sync", sync)
    torch.manual_seed(101)
    args.eval_interval = 1
    train.train_loop(model, loss_fn, Batches(), 2, 1e-3, args, "t", saved.append)
    want = drawn[1]
    assert saved[0]["step"] == 1 and len(saved[0]["rng"]) == 2
    assert torch.equal(resumed(1, 2, 0), want)
    torch.manual_seed(100)
    rank0 = torch.rand(4)
    assert torch.equal(resumed(0, 2, 0), rank0) and not torch.equal(rank0, want)
    torch.manual_seed(7)  # resumed with more ranks: the new rank keeps its own seed
    fresh = torch.rand(4)
    assert torch.equal(resumed(2, 3, 7), fresh)


def test_two_ranks_with_half_the_batch_equal_one_rank(tmp_path, tiny_corpus):
    """torchrun, 2 CPU ranks (gloo) with --batch-size 2 each against 1 rank with --batch-size 4:
    every step's loss (teacher, initial student, CE, Full KD, SE-KD top-k) and the final weights."""
    ds, cache = tiny_corpus
    flags = TINY + [
        "--dataset",
        ds,
        "--data-dir",
        cache,
        "--device",
        "cpu",
        "--teacher-steps",
        "6",
        "--student-init-steps",
        "4",
        "--student-steps",
        "6",
        "--eval-interval",
        "3",
    ]
    one = train.main(flags + ["--out-dir", str(tmp_path / "one"), "--batch-size", "4"])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            os.path.join(HERE, "train.py"),
            "--",
            "--run",
            "compare",
        ]
        + flags
        + ["--out-dir", str(tmp_path / "two"), "--batch-size", "2"],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("[sekd] step     6/6") == 1  # rank 1 prints nothing
    two = json.loads((tmp_path / "two" / "results_compare.json").read_text())
    assert [row["method"] for row in two["rows"]] == [row["method"] for row in one["rows"]]
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert (
            len(a["loss_curve"]) == len(b["loss_curve"]) > 0 and b["tokens"] == a["tokens"]
        )  # all ranks' tokens
        np.testing.assert_allclose(b["loss_curve"], a["loss_curve"], rtol=1e-5)
        assert b["val_ppl"] == pytest.approx(a["val_ppl"], rel=1e-4)
    for name in ("teacher", "student_init", "student_ce", "student_full_kd", "student_sekd"):
        wa, wb = (
            torch.load(tmp_path / d / f"{name}.pt", weights_only=True)["model"]
            for d in ("one", "two")
        )
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(
        os.listdir(tmp_path / "one")
    )  # no stray files


# =============================================================== the paper's data: --preset fineweb


def test_preset_sets_defaults_and_explicit_flags_win():
    a = train.parse_args(
        ["--preset", "fineweb", "--teacher-layers", "1", "--no-full-vocab", "--lr", "0.01"]
    )
    assert a.dataset == "hf:HuggingFaceFW/fineweb-edu:sample-10BT" and a.seq_len == 512
    assert a.max_tokens == 80_000_000 and a.lam == 1.0 and a.teacher_embd == 768
    assert a.teacher_layers == 1 and not a.full_vocab and a.lr == 0.01  # given, so kept
    plain = train.parse_args([])
    assert (
        plain.dataset == "shakespeare"
        and plain.seq_len == 128
        and plain.max_tokens == 0
        and not plain.full_vocab
    )


def test_fineweb_preset_streams_caps_and_packs_a_local_parquet(tmp_path, monkeypatch):
    """The preset's data path offline: a local parquet file stands in for the Hub's FineWeb-Edu."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = "\n".join(data.shakespeare_split()[0][:3])
    docs = [text[i : i + 8000] for i in range(0, 8000 * 30, 8000)]
    pq.write_table(
        pa.table({"text": docs, "id": [str(i) for i in range(len(docs))]}), tmp_path / "fw.parquet"
    )
    import datasets

    calls, load = [], datasets.load_dataset

    def hub(name, config=None, data_files=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        fw = [str(tmp_path / "fw.parquet")]
        return load("parquet", data_files=fw, split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    tiny = [
        "--teacher-layers",
        "1",
        "--teacher-embd",
        "16",
        "--teacher-heads",
        "2",
        "--teacher-steps",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--eval-tokens",
        "1024",
        "--warmup",
        "1",
        "--chunk-rows",
        "0",
    ]
    r = train.main(
        [
            "--preset",
            "fineweb",
            "--run",
            "teacher",
            "--max-tokens",
            "20000",
            "--device",
            "cpu",
            "--data-dir",
            str(tmp_path / "cache"),
            "--out-dir",
            str(tmp_path / "out"),
        ]
        + tiny
    )
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    meta = r["data"]
    enc = data.gpt2_encoding()
    sizes = [len(enc.encode_ordinary(d)) + 1 for d in docs]
    n_read = next(
        i + 1 for i in range(len(docs)) if sum(sizes[: i + 1]) >= 20000
    )  # documents up to the cap
    assert n_read < len(docs) and meta["train_tokens"] + meta["val_tokens"] == sum(sizes[:n_read])
    assert (
        meta["val_tokens"] == sizes[n_read - 1]
    )  # the last 1% of the documents read (here one) is held out
    assert meta["seq_len"] == 512 and meta["vocab_size"] == 50257 and meta["max_tokens"] == 20000
    assert (
        meta["train_samples"] == meta["train_tokens"] // 513
        and meta["val_samples"] == meta["val_tokens"] // 513
    )
    assert r["rows"][0]["method"] == "teacher" and len(r["rows"][0]["loss_curve"]) == 2


# --------------------------------------------------------------- teaching: text samples, exercise 2


def test_generate_appends_tokens_with_their_entropy():
    m = tiny_gpt(L=8)  # block size 8: 5 + 6 tokens exercise the context crop
    idx = torch.randint(0, 37, (2, 5))

    def seeded():
        return torch.Generator().manual_seed(3)

    out, ent = m.generate(idx, 6, 1.0, 0, seeded())
    assert out.shape == (2, 11) and torch.equal(out[:, :5], idx) and ent.shape == (2, 6)
    for j in range(6):
        logits = m(out[:, : 5 + j][:, -8:])[:, -1]
        assert torch.allclose(ent[:, j], sekd.token_entropy(logits), atol=1e-12)
    assert torch.equal(m.generate(idx, 6, 1.0, 0, seeded())[0], out)  # same seed, same tokens
    greedy = m.generate(idx, 6, 0.0)[0]
    for j in range(6):
        assert torch.equal(greedy[:, 5 + j], m(greedy[:, : 5 + j][:, -8:])[:, -1].argmax(-1))
    assert torch.equal(m.generate(idx, 6, 1.0, 1, seeded())[0], greedy)  # top-1 sampling is greedy
    top3 = m.generate(idx, 6, 5.0, 3, seeded())[0]
    for j in range(6):
        best = torch.topk(m(top3[:, : 5 + j][:, -8:])[:, -1], 3).indices
        assert (best == top3[:, 5 + j : 6 + j]).any(1).all()


def test_generate_never_draws_the_banned_id():
    m, ban = tiny_gpt(V=5, L=8), 2  # five ids: unbanned, id 2 comes often
    idx, g = torch.zeros(4, 1, dtype=torch.long), torch.Generator().manual_seed(0)
    out, ent = m.generate(idx, 40, 2.0, 0, g)
    assert (out[:, 1:] == ban).any()
    banned, ent_banned = m.generate(idx, 40, 2.0, 0, torch.Generator().manual_seed(0), ban=ban)
    assert not (banned[:, 1:] == ban).any() and (ent_banned > 0).all()  # the model's own entropy
    second, first = torch.topk(m(idx)[0, -1], 2).indices.tolist()[::-1]
    assert (m.generate(idx, 1, 0.0, ban=first)[0][:, 1] == second).all()  # greedy: the runner-up


def test_a_metric_registered_in_a_test_file_is_selected_from_the_cli(
    tmp_path, tiny_corpus, monkeypatch
):
    calls, ranked = [], []

    def teacher_margin(
        zs, zt, y
    ):  # README exercise 2, shifted by 1000 so that its scores are recognisable
        calls.append((zs.shape, zt.shape))
        top2 = torch.softmax(zt, -1).topk(2, -1).values
        return top2[:, 0] - top2[:, 1] + 1000.0

    def spy_topk(scores, k, valid=None, state=None):
        ranked.append(scores[valid])
        return sekd.topk_positions(scores, k, valid, state)

    monkeypatch.setitem(sekd.METRICS, "teacher_margin", teacher_margin)
    monkeypatch.setitem(sekd.POLICIES, "topk", spy_topk)
    r = run_job(
        tmp_path,
        tiny_corpus,
        "--run",
        "distill",
        "--metric",
        "teacher_margin",
        "--teacher-steps",
        "3",
        "--student-init-steps",
        "0",
        "--student-steps",
        "3",
    )
    assert r["rows"][-1]["method"] == "teacher_margin topk 20%"
    assert calls and all(s == t for s, t in calls)  # given the teacher's logits for the same rows
    assert len(ranked) == 3 and all(
        ((v >= 1000) & (v <= 1001)).all() for v in ranked
    )  # one ranking per step


def test_readme_metric_script_runs_from_the_command_line(tmp_path, tiny_corpus):
    readme = open(os.path.join(HERE, "docs", "exercises.md"), encoding="utf-8").read()
    script = readme.split("```python\n# my_metric.py")[1].split("```")[0]
    (tmp_path / "my_metric.py").write_text("# my_metric.py" + script)
    ds, cache = tiny_corpus
    cmd = [
        sys.executable,
        "my_metric.py",
        "--run",
        "distill",
        "--metric",
        "teacher_margin",
        *TINY,
        "--dataset",
        ds,
        "--data-dir",
        cache,
        "--out-dir",
        str(tmp_path),
        "--teacher-steps",
        "2",
        "--student-init-steps",
        "0",
        "--student-steps",
        "2",
        "--eval-tokens",
        "128",
    ]
    env = {**os.environ, "PYTHONPATH": HERE}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "teacher_margin topk 20%" in r.stdout
