"""Tests for sekd: every formula against an independent float64 brute force (explicit loops or
full softmax), plus data, the training job and the errors a user can cause. Run: python -m pytest"""
import json
import math
import os
import subprocess
import sys
from fractions import Fraction

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a Hub name fails fast instead of retrying

import numpy as np
import pytest
import torch

import data
import sekd
import train

torch.set_default_dtype(torch.float32)
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- brute-force references

def ref_softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def ref_entropy(row, T=1.0):
    p = ref_softmax([v / T for v in row])
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


def ref_kl(t_row, s_row, T=1.0):
    p, q = ref_softmax([v / T for v in t_row]), ref_softmax([v / T for v in s_row])
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ref_kd_loss(s_logits, t_logits, targets, mask, T, lam):
    """SPEC 1 with explicit loops: KL on the masked positions, CE on all valid ones, each
    averaged per sequence, then over the sequences that have any such position."""
    def seq_mean(values_per_seq):
        means = [sum(v) / len(v) for v in values_per_seq if v]
        return sum(means) / len(means) if means else 0.0
    kl_seqs, ce_seqs = [], []
    for b in range(len(targets)):
        kl_b, ce_b = [], []
        for t in range(len(targets[b])):
            y = int(targets[b][t])
            if y < 0:
                continue
            s_row, t_row = s_logits[b][t].tolist(), t_logits[b][t].tolist()
            ce_b.append(-math.log(ref_softmax(s_row)[y]))
            if mask[b][t]:
                kl_b.append(T * T * ref_kl(t_row, s_row, T))
        kl_seqs.append(kl_b)
        ce_seqs.append(ce_b)
    return lam * seq_mean(kl_seqs) + (1 - lam) * seq_mean(ce_seqs)


def ref_topk_count(k, n):
    return math.ceil(Fraction(str(k)) * n)


# ----------------------------------------------------------------------------- SPEC 1: entropy, KL, loss

@pytest.mark.parametrize("T", [1.0, 0.5, 2.0])
def test_token_entropy_matches_brute_force(T):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3
    got = sekd.token_entropy(logits, T)
    for i in range(4):
        assert got[i].item() == pytest.approx(ref_entropy(logits[i].tolist(), T), abs=1e-12)


def test_token_entropy_extremes():
    assert sekd.token_entropy(torch.zeros(7, dtype=torch.float64)).item() == pytest.approx(math.log(7))
    assert sekd.token_entropy(torch.tensor([0.0, -1e4, -1e4])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kl_matches_brute_force(T):
    g = torch.Generator().manual_seed(1)
    t, s = (torch.randn(5, 11, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    got = sekd.kl_per_position(t, s, T)
    for i in range(5):
        assert got[i].item() == pytest.approx(ref_kl(t[i].tolist(), s[i].tolist(), T), abs=1e-12)


def random_case(B=3, L=6, V=7, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (B, L), generator=g)
    if pad:
        y[0, L - 2:] = -1  # padding at the end of one sequence
    return s, t, y


@pytest.mark.parametrize("lam,T", [(1.0, 1.0), (1.0, 2.0), (0.5, 1.0), (0.0, 1.0), (0.3, 1.5)])
def test_kd_loss_per_sequence_normalisation(lam, T):
    s, t, y = random_case()
    mask = torch.rand(y.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    mask[1] = False  # a sequence with no selected position drops out of the KL average
    got = sekd.kd_loss(s, t, y, mask, T, lam).item()
    want = ref_kd_loss(s, t, y, (mask & (y >= 0)).tolist(), T, lam)
    assert got == pytest.approx(want, abs=1e-12)


def test_kd_loss_full_is_mean_over_valid_positions():
    s, t, y = random_case(pad=False)
    kl = sekd.kl_per_position(t, s)
    assert sekd.kd_loss(s, t, y).item() == pytest.approx(kl.mean().item(), abs=1e-12)


# ----------------------------------------------------------------------------- SPEC 2: top-k

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
        valid[b, L - 7 * b:] = False  # 40, 33, 26, ... valid positions
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


# ----------------------------------------------------------------------------- SPEC 6: heads, chunks, streaming

def tiny_gpt(V=37, D=16, L=12, layers=2, heads=2, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return sekd.GPT(sekd.GPTConfig(vocab_size=V, block_size=L, n_layer=layers, n_head=heads, n_embd=D)).to(dtype)


def test_selective_head_equals_gathered_dense_logits():
    m = tiny_gpt()
    idx = torch.randint(0, 37, (3, 12))
    mask = torch.rand(3, 12) < 0.3
    h = m.hidden(idx)
    assert torch.allclose(m.head(h[mask]), m(idx)[mask], atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_entropy_equals_dense_entropy(chunk):
    m = tiny_gpt()
    idx = torch.randint(0, 37, (3, 12))
    h = m.hidden(idx)
    dense = sekd.token_entropy(m(idx))
    assert torch.allclose(sekd.chunked_entropy(h, m.head_weight, 1.0, chunk), dense, atol=1e-12)


@pytest.mark.parametrize("lam,T,chunk", [(1.0, 1.0, 1), (1.0, 2.0, 4), (0.4, 1.0, 3), (0.0, 1.0, 5), (0.7, 0.5, 1000)])
def test_streamed_loss_and_gradients_equal_dense(lam, T, chunk):
    g = torch.Generator().manual_seed(5)
    B, L, D, Dt, V = 3, 8, 6, 5, 13
    hs = torch.randn(B, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(B, L, Dt, generator=g, dtype=torch.float64), torch.randn(V, Dt, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, L), generator=g)
    y[2, 5:] = -1
    mask = sekd.topk_positions(torch.randn(B, L, generator=g), 0.3, y >= 0)
    dense = sekd.kd_loss(hs @ ws.T, ht @ wt.T, y, mask, T, lam)
    d_grads = torch.autograd.grad(dense, (hs, ws))
    streamed = sekd.streamed_kd_loss(hs, ws, ht, wt, y, mask, T, lam, chunk)
    s_grads = torch.autograd.grad(streamed, (hs, ws))
    assert streamed.item() == pytest.approx(dense.item(), abs=1e-12)
    for a, b in zip(d_grads, s_grads):
        assert torch.allclose(a, b, atol=1e-12)
    want = ref_kd_loss(hs @ ws.T, ht @ wt.T, y, mask.tolist(), T, lam)
    assert dense.item() == pytest.approx(want, abs=1e-12)


def test_streamed_gradients_through_a_model_match_dense_flow():
    student, teacher = tiny_gpt(seed=1), tiny_gpt(D=24, layers=1, seed=2)
    idx = torch.randint(0, 37, (2, 12))
    y = torch.randint(0, 37, (2, 12))
    grads = []
    for flow in ("dense", "streamed"):
        student.zero_grad()
        loss, n = sekd.distill_loss(student, teacher, idx, y, sekd.KDConfig("sekd", k=0.25, flow=flow, chunk_rows=2))
        loss.backward()
        grads.append([p.grad.clone() for p in student.parameters()])
        assert n == 2 * 3
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_sekd_at_k1_equals_full_kd():
    student, teacher = tiny_gpt(seed=1), tiny_gpt(D=24, layers=1, seed=2)
    idx, y = torch.randint(0, 37, (2, 12)), torch.randint(0, 37, (2, 12))
    full, _ = sekd.distill_loss(student, teacher, idx, y, sekd.KDConfig("full_kd", k=1.0))
    se1, _ = sekd.distill_loss(student, teacher, idx, y, sekd.KDConfig("sekd", k=1.0))
    ref = sekd.kd_loss(student(idx), teacher(idx), y)
    assert se1.item() == pytest.approx(full.item(), abs=1e-12)
    assert full.item() == pytest.approx(ref.item(), abs=1e-12)
    scores = torch.randn(2, 12)
    assert torch.equal(sekd.topk_positions(scores, 1.0, y >= 0), y >= 0)


def test_sekd_selects_highest_student_entropy():
    student, teacher = tiny_gpt(seed=1), tiny_gpt(seed=2)
    idx = torch.randint(0, 37, (2, 12))
    h = student.hidden(idx)
    mask = sekd.select_positions(h, student.head_weight, torch.ones(2, 12, dtype=torch.bool), sekd.KDConfig("sekd", k=0.25))
    ent = sekd.token_entropy(student(idx))
    for b in range(2):
        chosen = set(torch.nonzero(mask[b]).flatten().tolist())
        assert chosen == set(torch.topk(ent[b], 3).indices.tolist())


# ----------------------------------------------------------------------------- SPEC 6b: evaluation

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


def test_evaluation_sums_match_dense():
    s, t, y = random_case(pad=True)
    # a head of identity weights makes the logits equal the hidden states
    out = sekd.evaluation_sums(s, torch.eye(7, dtype=torch.float64), t, torch.eye(7, dtype=torch.float64), y, chunk_rows=4)
    valid = y >= 0
    ce = torch.nn.functional.cross_entropy(s[valid], y[valid], reduction="sum").item()
    assert out["n"] == int(valid.sum())
    assert out["ce"] == pytest.approx(ce, abs=1e-9)
    assert out["kl"] == pytest.approx(sekd.kl_per_position(t[valid], s[valid]).sum().item(), abs=1e-9)
    assert out["agree"] == int((s[valid].argmax(-1) == t[valid].argmax(-1)).sum())


# ----------------------------------------------------------------------------- memory meter

def test_live_bytes_counts_allocations_and_frees():
    with sekd.LiveBytes() as meter:
        a = torch.empty(1000, 250)  # 1 MB
        b = torch.empty(500, 250)   # 0.5 MB
        del a
        c = torch.empty(100, 250)
    assert meter.peak == 1_500_000
    assert meter.live == 600_000
    del b, c
    assert meter.live == 0


# ----------------------------------------------------------------------------- user errors

@pytest.mark.parametrize("k", [0.0, -0.1, 1.5, float("nan")])
def test_bad_budget_is_a_clear_error(k):
    with pytest.raises(ValueError, match="budget k must be in"):
        sekd.topk_positions(torch.randn(2, 5), k)
    with pytest.raises(ValueError, match="budget k"):
        sekd.KDConfig("sekd", k=k)


def test_bad_temperature_lambda_method():
    with pytest.raises(ValueError, match="temperature"):
        sekd.token_entropy(torch.randn(3), T=0)
    with pytest.raises(ValueError, match="lambda"):
        sekd.KDConfig("sekd", lam=1.5)
    with pytest.raises(ValueError, match="unknown method"):
        sekd.KDConfig("magic")


def test_vocab_mismatch_and_long_sequence():
    with pytest.raises(ValueError, match="vocabulary .* differ"):
        sekd.check_pair(tiny_gpt(V=37), tiny_gpt(V=40))
    with pytest.raises(ValueError, match="longer than the model's block size"):
        tiny_gpt(L=12).hidden(torch.zeros(1, 13, dtype=torch.long))


# ----------------------------------------------------------------------------- data

def test_markdown_is_stripped_to_play_text():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n*\\[Aside.\\]*\n"
    assert data.markdown_to_play_text(md) == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\n[Aside.]\n"


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
    assert vocab.decode(flat, enc) == enc.decode(ids[:len(flat)].tolist())
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
        data.prepare(write_corpus(tmp_path, "Short text.\n" * 3, "x\n"), 64, cache_dir=str(tmp_path / "c2"))
    with pytest.raises(data.DataError, match="does not exist"):
        data.prepare("files:/nonexistent/x.txt", 16, cache_dir=str(tmp_path / "c3"))
    with pytest.raises(data.DataError, match="unknown --dataset"):
        data.prepare("nosuch", 16, cache_dir=str(tmp_path / "c4"))


def test_hub_dataset_offline_fails_fast_with_one_line(tmp_path):
    with pytest.raises(data.DataError, match="could not load dataset"):
        data.prepare("hf:no-such-user/no-such-dataset", 16, cache_dir=str(tmp_path / "c"))


# ----------------------------------------------------------------------------- the training job

TINY = ["--teacher-layers", "1", "--teacher-embd", "32", "--teacher-heads", "2", "--student-layers", "1",
        "--student-embd", "16", "--student-heads", "2", "--seq-len", "16", "--batch-size", "4",
        "--teacher-steps", "40", "--student-steps", "40", "--eval-tokens", "512", "--log-interval", "10",
        "--eval-interval", "10", "--warmup", "3"]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    train_text = "\n".join(data.shakespeare_split()[0][0].splitlines()[:1500])
    val_text = "\n".join(data.shakespeare_split()[1][0].splitlines()[:300])
    return write_corpus(d, train_text, val_text), str(d / "cache")


def run_job(tmp_path, corpus, *extra):
    ds, cache = corpus
    return train.main(TINY + ["--dataset", ds, "--data-dir", cache, "--out-dir", str(tmp_path)] + list(extra))


def test_end_to_end_compare_is_deterministic_and_loss_falls(tmp_path, tiny_corpus, capsys):
    r1 = run_job(tmp_path, tiny_corpus)
    out = capsys.readouterr().out
    assert "ETA" in out and "KL(T||S)" in out
    rows = {r["method"]: r for r in r1["rows"]}
    assert set(rows) == {"teacher", "student (CE, no KD)", "Full KD", "SE-KD top 20%"}
    uniform = r1["data"]["vocab_size"]  # the perplexity of a model that learned nothing
    assert rows["teacher"]["val_ppl"] < rows["student (CE, no KD)"]["val_ppl"] < 0.7 * uniform
    assert all(r["peak_bytes"] > 0 for m, r in rows.items() if m != "teacher")
    saved = json.loads((tmp_path / "results_compare.json").read_text())
    assert [r["val_ppl"] for r in saved["rows"]] == [r["val_ppl"] for r in r1["rows"]]
    r2 = run_job(tmp_path, tiny_corpus)  # reuses the teacher, same seed: same numbers
    assert "reusing" in capsys.readouterr().out
    assert [r["val_ppl"] for r in r2["rows"]] == [r["val_ppl"] for r in r1["rows"]]


def test_training_loss_falls(tmp_path, tiny_corpus, capsys):
    run_job(tmp_path, tiny_corpus, "--run", "teacher", "--teacher-steps", "40")
    losses = [float(line.split("| loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
              if line.startswith("[teacher] step") and "| loss " in line]
    assert losses[-1] < losses[0] - 0.5


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
        run_job(tmp_path, tiny_corpus, "--run", "distill", "--teacher-ckpt", str(tmp_path / "none.pt"))


def test_checkpoints_are_written_atomically(tmp_path):
    path = tmp_path / "c.pt"
    train.save_checkpoint(str(path), {"a": torch.ones(3)})
    assert os.listdir(tmp_path) == ["c.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))


@pytest.mark.parametrize("flags,msg", [(["--k", "1.5"], "budget k must be in"), (["--k", "0"], "budget k"),
                                       (["--T", "0"], "temperature"), (["--seq-len", "0"], "--seq-len"),
                                       (["--student-embd", "15"], "divisible")])
def test_cli_user_errors_are_one_line_exit_2(flags, msg):
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py")] + flags, capture_output=True, text=True,
                       cwd=HERE, timeout=120)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_help_lists_every_flag_with_defaults():
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--help"], capture_output=True, text=True,
                       cwd=HERE, timeout=120)
    assert r.returncode == 0
    for flag in ("--run", "--method", "--k", "--T", "--lam", "--flow", "--device", "--compile", "--seed"):
        assert flag in r.stdout
    assert "(default: 0.2)" in r.stdout


# ----------------------------------------------------------------------------- memory account (SPEC 6)

def tiny_pair(V=1000, L=12):
    torch.manual_seed(0)
    student = sekd.GPT(sekd.GPTConfig(vocab_size=V, block_size=L, n_layer=1, n_head=2, n_embd=16))
    teacher = sekd.GPT(sekd.GPTConfig(vocab_size=V, block_size=L, n_layer=1, n_head=2, n_embd=32)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def measured_logits(student, teacher, B, L, flow, half, chunk=5):
    """LiveBytes over one forward + backward: every tensor with last dim V, and their peak."""
    V = student.config.vocab_size
    g = torch.Generator().manual_seed(B)
    idx, y = torch.randint(0, V, (B, L), generator=g), torch.randint(0, V, (B, L), generator=g)
    meter = sekd.LiveBytes(match=sekd.logits_sized(V))
    with meter:
        with torch.autocast("cpu", dtype=torch.bfloat16) if half else torch.autocast("cpu", enabled=False):
            loss, mask = sekd.flow_loss(student, teacher, idx, y, flow, 0.2, 1.0, chunk)
        loss.backward()
    student.zero_grad(set_to_none=True)
    return meter, int(mask.sum())


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("flow", list(sekd.FLOWS))
def test_logit_account_equals_tensors_created(flow, half):
    student, teacher = tiny_pair()
    meter, n_sel = measured_logits(student, teacher, 2, 12, flow, half)
    ledger = sekd.logit_ledger(flow, 24, n_sel, 1000, 16, 32, 5, half)
    got = sorted((shape[0] if len(shape) == 2 else shape[0] * shape[1], str(dt)[6:], b)
                 for _, shape, dt, b in meter.log)
    want = sorted((t["shape"][0], t["dtype"], t["bytes"]) for t in ledger.tensors)
    assert got == want  # the same tensors, of the same sizes and dtypes
    assert max(ledger.peaks.values()) == meter.matched_peak
    assert n_sel == (24 if flow in ("dense", "dense_entropy") else 2 * 3)


def test_state_account_equals_parameters_gradients_and_adamw():
    student, teacher = tiny_pair()
    opt = train.make_optimizer(student, 1e-3, 0.1)
    idx = torch.randint(0, 1000, (2, 12))
    sekd.flow_loss(student, teacher, idx, idx, "streamed")[0].backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in student.parameters())
    opt.step()
    adamw = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    acc = sekd.memory_account(student, teacher, 2, 12, "streamed")
    assert acc["student"]["params"] == sekd.state_bytes(student)
    assert acc["student"]["grads"] == grads
    assert acc["student"]["adamw"] == adamw
    assert acc["teacher"]["params"] == sekd.state_bytes(teacher)


def test_streamed_logit_peak_does_not_grow_with_tokens():
    student, teacher = tiny_pair(L=20)
    peaks = {}
    for B in (1, 4, 16):
        peaks[B] = {f: measured_logits(student, teacher, B, 20, f, False, chunk=2)[0].matched_peak
                    for f in ("dense", "both_heads", "streamed")}
    # N_sel = 4 B rows, in chunks of 2: at most one chunk's 7 tensors + the previous chunk's gradient
    assert peaks[1]["streamed"] == peaks[4]["streamed"] == peaks[16]["streamed"] == 8 * 2 * 1000 * 4
    assert peaks[16]["dense"] == 16 * peaks[1]["dense"]
    assert peaks[16]["both_heads"] == 16 * peaks[1]["both_heads"]
    assert peaks[16]["streamed"] < peaks[16]["both_heads"] / 4


def test_benchmark_runs_every_flow_and_accounts_within_10_percent(tmp_path, capsys):
    r = train.main(["--run", "benchmark", "--bench-vocab", "3000", "--bench-tokens", "64,128", "--seq-len", "32",
                    "--batch-size", "2", "--bench-repeats", "1", "--bench-warmup", "0", "--chunk-rows", "4",
                    "--teacher-layers", "1", "--teacher-embd", "32", "--student-embd", "16",
                    "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "scaling sweep" in out and (tmp_path / "results_benchmark.json").exists()
    rows = r["tables"]["3000"]
    assert [row["flow"] for row in rows] == list(sekd.FLOWS)
    for row in rows + r["sweep"]:
        assert row["logit_peak"] == row["analytic"]["logit_peak"]
        assert abs(row["total"] - row["analytic"]["total"]) <= 0.1 * row["total"]
        assert row["student"] > 0 and row["teacher"] > 0 and row["total"] >= row["teacher"]
    assert rows[-1]["logit_peak"] < rows[0]["logit_peak"] / 4
    sweep = {(row["flow"], row["tokens"]): row["logit_peak"] for row in r["sweep"]}
    assert sweep[("streamed", 64)] == sweep[("streamed", 128)]
    assert sweep[("dense", 128)] == 2 * sweep[("dense", 64)]


def test_benchmark_flag_errors_are_clear():
    with pytest.raises(train.UserError, match="multiples of --seq-len"):
        train.main(["--run", "benchmark", "--bench-tokens", "100", "--seq-len", "64"])
    with pytest.raises(train.UserError, match="positive integers"):
        train.main(["--run", "benchmark", "--bench-vocab", "abc"])
    with pytest.raises(ValueError, match="unknown memory flow"):
        sekd.check_flow("magic")
