"""Tests of the paper-table runs and tools: the memory ledger against the tensors each flow really
creates, the benchmark, `python -m experiments.positions | show | axes | sample | regimes` end to
end on a tiny corpus, and the direction of the imports (experiments/ builds on train.py, never the
other
way)."""

import contextlib
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import experiments
import sekd
import train
from experiments import axes, benchmark, ledger, positions, regimes, sample, show, stats
from test_sekd import HERE, tiny_cli


def run_job(tool, tmp_path, corpus, *extra):
    """python -m experiments.TOOL on the tiny corpus, with the test models' sizes and steps
    (test_sekd.TINY)."""
    return tool.main(tiny_cli(tmp_path, corpus, *extra))


# ------------------------------------------------------------ the ledger: every logits-sized tensor


def tiny_pair(V=1000, L=12):
    torch.manual_seed(0)
    student = sekd.GPT(sekd.GPTConfig(vocab_size=V, block_size=L, n_layer=1, n_head=2, n_embd=16))
    teacher = sekd.GPT(
        sekd.GPTConfig(vocab_size=V, block_size=L, n_layer=1, n_head=2, n_embd=32)
    ).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def measured_logits(student, teacher, B, L, flow, half, chunk=5, T=1.0):
    """LiveBytes over one forward + backward: every tensor with last dim V, and their peak."""
    V = student.config.vocab_size
    g = torch.Generator().manual_seed(B)
    idx, y = torch.randint(0, V, (B, L), generator=g), torch.randint(0, V, (B, L), generator=g)
    meter = train.LiveBytes(match=ledger.logits_sized(V))
    with meter:
        with (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if half
            else torch.autocast("cpu", enabled=False)
        ):
            loss, mask = ledger.flow_loss(student, teacher, idx, y, flow, 0.2, T, chunk)
        loss.backward()
    student.zero_grad(set_to_none=True)
    return meter, int(mask.sum())


@pytest.mark.parametrize("half,T", [(False, 1.0), (True, 1.0), (False, 2.0), (True, 0.5)])
@pytest.mark.parametrize("flow", list(ledger.FLOWS))
def test_logit_account_equals_tensors_created(flow, half, T):
    """At T = 1 no `z / T` tensor exists; at any other T the account has it too."""
    student, teacher = tiny_pair()
    meter, n_sel = measured_logits(student, teacher, 2, 12, flow, half, T=T)
    lg = ledger.logit_ledger(flow, 24, n_sel, 1000, 16, 32, 5, half, T=T)
    got = sorted(
        (shape[0] if len(shape) == 2 else shape[0] * shape[1], str(dt)[6:], b)
        for _, shape, dt, b in meter.log
    )
    want = sorted((t["shape"][0], t["dtype"], t["bytes"]) for t in lg.tensors)
    assert got == want  # the same tensors, of the same sizes and dtypes
    assert max(lg.peaks.values()) == meter.matched_peak
    assert n_sel == (24 if flow in ("dense", "dense_entropy") else 2 * 3)


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize(
    "method,flow,lam,T",
    [
        ("sekd", "streamed", 0.5, 1.0),
        ("sekd", "dense", 0.5, 1.0),
        ("full_kd", "streamed", 0.5, 1.0),
        ("full_kd", "dense", 0.5, 1.0),
        ("ce", "streamed", 0.0, 1.0),
        ("ce", "dense", 0.0, 1.0),
        ("sekd", "streamed", 1.0, 1.0),
        ("full_kd", "dense", 1.0, 1.0),
        ("random_pos", "streamed", 0.5, 1.0),
        ("random_pos", "dense", 1.0, 1.0),
        ("sekd", "streamed", 0.5, 2.0),
        ("full_kd", "dense", 0.5, 2.0),
    ],
)
def test_training_logit_account_with_ce_term_equals_tensors_created(method, flow, lam, T, half):
    """The account of distill_loss's step (what `--run compare` trains), lambda < 1 and T != 1
    included."""
    student, teacher = tiny_pair()
    V, B, L, chunk = 1000, 2, 12, 5
    g = torch.Generator().manual_seed(7)
    idx, y = torch.randint(0, V, (B, L), generator=g), torch.randint(0, V, (B, L), generator=g)
    cfg = sekd.KDConfig(
        method=method, lam=lam, flow=flow, chunk_rows=chunk, T=T, ce_at="all"
    )  # the ledger's CE
    torch.manual_seed(0)  # RandomPos: the same draws in both calls
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        mask = sekd.select_positions(student.hidden(idx), student.head_weight, None, None, y, cfg)
    meter = train.LiveBytes(match=ledger.logits_sized(V))
    torch.manual_seed(0)
    with meter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            loss, n_sel = sekd.distill_loss(student, teacher, idx, y, cfg)
        loss.backward()
    sel = mask.flatten().long()
    sel_chunks = [int(sel[i : i + chunk].sum()) for i in range(0, B * L, chunk)]
    ledger_flow = ledger.account_flow(method, flow)
    lg = ledger.logit_ledger(
        ledger_flow[0], B * L, n_sel, V, 16, 32, chunk, half, ledger_flow[1], lam, sel_chunks, T
    )
    got = sorted(
        (shape[0] if len(shape) == 2 else shape[0] * shape[1], str(dt)[6:], b)
        for _, shape, dt, b in meter.log
    )
    want = sorted((t["shape"][0], t["dtype"], t["bytes"]) for t in lg.tensors)
    assert got == want
    assert max(lg.peaks.values()) == meter.matched_peak
    assert n_sel == (24 if method in ("ce", "full_kd") else 6)
    if (
        flow == "streamed" and 0 < lam < 1 and not half
    ):  # KL rows first, then the chunk's CE: not 2 c + 7 s
        sizes = ledger.chunk_sizes(B * L, chunk)
        assert (
            meter.matched_peak
            == max(max(c + 4 * s, 2 * c + s) for c, s in zip(sizes, sel_chunks, strict=True))
            * V
            * 4
        )


@pytest.mark.parametrize("chunk", [2, 5, 100])
def test_chunked_passes_cast_each_head_weight_once(chunk):
    """Under autocast a chunk loop multiplies by one bf16 copy of each head weight per pass (not one
    per chunk), and those copies are what the account's `head_copies` adds per phase."""
    student, teacher = tiny_pair()
    V, B, L = 1000, 2, 12
    idx = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    meter = train.LiveBytes(
        match=lambda t: t.dtype == torch.bfloat16 and t.dim() == 2 and t.shape[0] == V
    )  # [V, *]
    copies = {}

    @contextlib.contextmanager
    def phase(name):
        start = len(meter.log)
        yield
        copies[name] = [(shape, b) for op, shape, _, b in meter.log[start:] if op == "_to_copy"]

    with meter, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = ledger.flow_loss(student, teacher, idx, idx, "streamed", 0.2, 1.0, chunk, phase)
    assert copies["selection"] == [((V, 16), V * 16 * 2)]
    assert sorted(copies["loss"]) == [((V, 16), V * 16 * 2), ((V, 32), V * 32 * 2)]
    acc = ledger.ledger_account(student, teacher, B, L, "streamed", 0.2, chunk, half=True)
    assert acc["head_copies"] == {
        name: sum(b for _, b in copies[name]) for name in ("selection", "loss")
    }


def test_the_lambda_below_1_ledger_covers_the_flows_distill_loss_runs():
    with pytest.raises(ValueError, match="lambda < 1 account covers"):
        ledger.logit_ledger("both_heads", 24, 6, 1000, 16, 32, 5, lam=0.5)


def test_random_positions_make_no_logits_and_draw_chunk_by_chunk():
    """RandomPos's selection projects nothing through the LM head; its draws are one torch.rand
    per chunk of valid rows, as when it was handed the chunk's logits."""
    student, _ = tiny_pair()
    idx = torch.randint(0, 1000, (2, 12))
    y = idx.clone()
    y[1, 9:] = -1
    valid = y >= 0
    cfg = sekd.KDConfig(method="random_pos", chunk_rows=5)
    h = student.hidden(idx)
    torch.manual_seed(3)
    with train.LiveBytes(match=ledger.logits_sized(1000)) as meter:
        mask = sekd.select_positions(h, student.head_weight, None, None, y, cfg)
    assert meter.log == [] and int(mask.sum()) == 3 + 2  # ceil(0.2 * 12) + ceil(0.2 * 9)
    torch.manual_seed(3)
    scores = torch.zeros(2, 12)
    scores[valid] = torch.cat([torch.rand(n) for n in (5, 5, 5, 5, 1)])
    assert torch.equal(mask, sekd.topk_positions(scores, 0.2, valid))


def test_state_account_equals_parameters_gradients_and_adamw():
    student, teacher = tiny_pair()
    opt = train.make_optimizer(student, 1e-3, 0.1)
    idx = torch.randint(0, 1000, (2, 12))
    ledger.flow_loss(student, teacher, idx, idx, "streamed")[0].backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in student.parameters())
    opt.step()
    adamw = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    acc = ledger.ledger_account(student, teacher, 2, 12, "streamed")
    assert acc["student"]["params"] == train.state_bytes(student)
    assert acc["student"]["grads"] == grads
    assert acc["student"]["adamw"] == adamw
    assert acc["teacher"]["params"] == train.state_bytes(teacher)


def test_streamed_logit_peak_does_not_grow_with_tokens():
    student, teacher = tiny_pair(L=20)
    peaks = {}
    for B in (1, 4, 16):
        peaks[B] = {
            f: measured_logits(student, teacher, B, 20, f, False, chunk=2)[0].matched_peak
            for f in ("dense", "both_heads", "streamed")
        }
    # N_sel = 4 B rows, in chunks of 2: at most one chunk's 4 tensors (the previous chunk's are
    # freed)
    assert peaks[1]["streamed"] == peaks[4]["streamed"] == peaks[16]["streamed"] == 4 * 2 * 1000 * 4
    assert peaks[16]["dense"] == 16 * peaks[1]["dense"]
    assert peaks[16]["both_heads"] == 16 * peaks[1]["both_heads"]
    assert peaks[16]["streamed"] < peaks[16]["both_heads"] / 4


# ------------------------------------------------------------------ python -m experiments.benchmark


def test_benchmark_runs_every_flow_and_accounts_within_10_percent(tmp_path, capsys):
    r = benchmark.main(
        [
            "--bench-vocab",
            "3000",
            "--bench-tokens",
            "64,128",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--bench-repeats",
            "1",
            "--bench-warmup",
            "0",
            "--chunk-rows",
            "4",
            "--teacher-layers",
            "1",
            "--teacher-embd",
            "32",
            "--student-embd",
            "16",
            "--out-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "scaling sweep" in out and (tmp_path / "results_benchmark.json").exists()
    rows = r["tables"]["3000"]
    assert [row["flow"] for row in rows] == list(ledger.FLOWS)
    for row in rows + r["sweep"]:
        assert row["logit_peak"] == row["analytic"]["logit_peak"]
        assert abs(row["total"] - row["analytic"]["total"]) <= 0.1 * row["total"]
        assert row["student"] > 0 and row["teacher"] > 0 and row["total"] >= row["teacher"]
    assert rows[-1]["logit_peak"] < rows[0]["logit_peak"] / 4
    sweep = {(row["flow"], row["tokens"]): row["logit_peak"] for row in r["sweep"]}
    assert sweep[("streamed", 64)] == sweep[("streamed", 128)]
    assert sweep[("dense", 128)] == 2 * sweep[("dense", 64)]
    assert "step ms (time / dense flow's time" in out and all(
        row["step_s"] > 0 for row in r["sweep"]
    )


def test_benchmark_times_the_flows_in_turns(monkeypatch):
    """One step of each flow per round (after the warm-up round), so a slow spell hits all alike;
    a skipped row is not timed."""
    calls = []
    monkeypatch.setattr(benchmark, "bench_step", lambda *a, **k: calls.append(a[5]))
    args = experiments.parse_args(
        ["--bench-warmup", "1", "--bench-repeats", "2", "--seq-len", "8"],
        "benchmark",
        "",
        benchmark.add_flags,
    )
    rows = [{"flow": f, "B": 1, "V": 50} for f in ("dense", "streamed")] + [
        {"flow": "chunked", "oom": "skipped"}
    ]
    benchmark.time_rows(None, None, None, rows, args, torch.device("cpu"))
    assert calls == ["dense", "streamed"] * 3
    assert rows[0]["step_s"] > 0 and rows[1]["step_s"] > 0 and "step_s" not in rows[2]


def test_head_only_benchmark_checks_times_and_measures_every_flow(tmp_path, monkeypatch):
    """--head-only at tiny shapes, eager and without the peers (optional): every flow's gradient
    agrees with dense, each flow has a time and a memory figure, and the JSON is written."""
    monkeypatch.setattr(benchmark.head_bench, "compiled", lambda on: contextlib.nullcontext())
    monkeypatch.setattr(
        benchmark.head_bench, "peer_flows", lambda k: ({}, {"liger-kernel": "not installed"})
    )
    out = benchmark.main(
        [
            "--head-only",
            "--head-vocab",
            "97",
            "--head-tokens",
            "16",
            "--head-dims",
            "8,12",
            "--head-rounds",
            "1",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path),
        ]
    )
    rows = out["rows"]
    assert {r["flow"] for r in rows} >= {
        "dense kd_loss",
        "sekd streamed Full KD",
        "of which the selection alone",
    }
    assert len(rows) == 7 and all(r["ms"] > 0 and ("live_mb" in r or "rss_mb" in r) for r in rows)
    assert all(r["grad_rel_err"] < 1e-5 for r in rows if r["grad_rel_err"] is not None)
    assert (
        json.loads((tmp_path / "head_benchmark_cpu.json").read_text())["meta"]["liger-kernel"]
        == "not installed"
    )
    with pytest.raises(train.UserError, match="argument --head-tokens: takes positive integers"):
        benchmark.main(["--head-only", "--head-tokens", "0"])


def test_benchmark_flag_errors_are_clear():
    with pytest.raises(train.UserError, match="multiples of --seq-len"):
        benchmark.main(["--bench-tokens", "100", "--seq-len", "64"])
    for bad in ("abc", "0", "1,-2"):
        with pytest.raises(
            train.UserError, match="argument --bench-vocab: takes positive integers"
        ):
            benchmark.main(["--bench-vocab", bad])
    with pytest.raises(train.UserError, match="--bench-vocab takes positive integers"):
        benchmark.main(["--bench-vocab", ""])
    with pytest.raises(train.UserError, match="--head-dims takes two widths"):
        benchmark.main(["--head-only", "--head-dims", "8"])
    with pytest.raises(ValueError, match="unknown memory flow"):
        ledger.check_flow("magic")


# ---------------------------------------------------------------------------- positions, show, axes


def save_tiny_models(out, corpus, names):
    """Untrained checkpoints in the layout the jobs write (TINY's sizes), made in a second."""
    ds, cache = corpus
    c = data.prepare(ds, 16, cache_dir=cache)
    for i, name in enumerate(names):
        torch.manual_seed(i)
        m = sekd.GPT(
            sekd.GPTConfig(
                vocab_size=c.vocab.size,
                block_size=16,
                n_layer=1,
                n_head=2,
                n_embd=32 if name == "teacher" else 16,
            )
        )
        train.save_checkpoint(
            str(out / f"{name}.pt"),
            {
                "model": m.state_dict(),
                "config": vars(m.config).copy(),
                "signature": c.signature,
                "step": 1,
                "steps": 1,
                "val_ppl": 1.0,
            },
        )
    return c


def test_positions_and_show_runs_end_to_end(tmp_path, tiny_corpus, capsys):
    r = run_job(
        positions,
        tmp_path,
        tiny_corpus,
        "--student-steps",
        "2",
        "--seeds",
        "2",
        "--teacher-steps",
        "5",
        "--eval-tokens",
        "128",
    )
    t = r["tables"]
    assert len(t["metrics"]) == 12 and len(t["policies"]) == 5 and len(t["budget"]) == 12
    assert {"Full KD", "AT-KD", "RandomPos 20% (random)", "student_entropy top 20%"} <= {
        x["method"] for x in t["metrics"]
    }
    assert all(len(x["seeds"]) == 2 and "val_ppl_std" in x for rows in t.values() for x in rows)
    assert r["students_trained"] == 2 * (12 + 4 + 8)  # shared configurations trained once
    saved = json.loads((tmp_path / "results_positions.json").read_text())
    assert saved["tables"]["budget"][5]["val_ppl"] == t["metrics"][0]["val_ppl"]  # 100% = Full KD
    assert "(3) budget sweep" in capsys.readouterr().out
    s = run_job(show, tmp_path, tiny_corpus, "--student-steps", "2", "--eval-tokens", "128")
    out = capsys.readouterr().out
    assert (
        "\x1b[48;2;" in out
        and "SE-KD: student_entropy top 20%" in out
        and "teacher_entropy top 20%" in out
    )
    assert (
        sum(s["selected"]["student_entropy"]) == 4
        and "<span" in (tmp_path / "selection.html").read_text()
    )


def test_rare_tokens_show_their_original_text_marked(tmp_path):
    enc = data.gpt2_encoding()
    g = enc.encode_ordinary("The Merry Wives of Windsor")  # The, Merry, W, ives, of, Windsor
    vocab = data.Vocab(np.array(sorted({g[0], g[3], g[4]})), full=False)
    ids = vocab.encode(np.array(g))
    assert vocab.decode(ids, enc) == f"The{data.UNK * 2}ives of{data.UNK}"  # what a class saw
    texts, rare = show.marked_tokens(ids, g, vocab.unk, enc)
    assert "".join(texts) == "The ⟨Merry W⟩ives of ⟨Windsor⟩" and rare == [0, 1, 1, 0, 0, 1]
    # a corpus's validation samples in GPT-2 ids, read again: a rare word keeps its text
    lines = data.shakespeare_split()[1][0].splitlines()
    for name, part in (("a.txt", lines[:1500]), ("b.txt", lines[1500:1800])):
        (tmp_path / name).write_text("\n".join(part))
    ds = f"files:{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}"
    corpus = data.prepare(ds, 16, cache_dir=str(tmp_path / "cache"), vocab_size=300)
    gpt2 = data.val_gpt2_ids(corpus)
    assert (corpus.vocab.encode(gpt2) == corpus.val).all() and (
        corpus.val == corpus.vocab.unk
    ).any()
    texts, rare = show.marked_tokens(corpus.val.ravel(), gpt2.ravel(), corpus.vocab.unk, enc)
    plain = enc.decode(gpt2.ravel().tolist())
    assert "".join(texts).replace("⟨", "").replace("⟩", "") == plain and data.UNK not in plain
    words = [enc.decode([int(gpt2.ravel()[t])]).strip() for t in np.flatnonzero(rare)]
    assert any(w.isalpha() and f"⟨{w}⟩" in "".join(texts) for w in words)
    (tmp_path / "b.txt").write_text("\n".join(lines[1800:2100]))  # the text changed: refused
    with pytest.raises(data.DataError, match="not the one its data cache was built from"):
        data.val_gpt2_ids(corpus)


def test_show_compares_topk_with_another_policy(tmp_path, tiny_corpus, capsys):
    save_tiny_models(tmp_path, tiny_corpus, ["teacher", "student_sekd"])
    s = run_job(
        show,
        tmp_path,
        tiny_corpus,
        "--policy",
        "pos_rs_kd",
        "--student-init-steps",
        "0",
        "--eval-tokens",
        "128",
    )
    out = capsys.readouterr().out
    assert list(s["selected"]) == ["student_entropy", "student_entropy pos_rs_kd"]
    assert (
        sum(s["selected"]["student_entropy"]) == 4
        and sum(s["selected"]["student_entropy pos_rs_kd"]) == 4
    )
    assert (
        "SE-KD: student_entropy top 20%" in out
        and "student_entropy pos_rs_kd 20% (" in out
        and "4 draws" in out
    )
    page = (tmp_path / "selection.html").read_text()  # rare tokens show their text, marked
    assert data.UNK not in out + page and "⟨" in out and "<span class=rare" in page


def test_axes_reproduction_tiny(tmp_path, tiny_corpus, capsys):
    r = run_job(axes, tmp_path, tiny_corpus, "--seeds", "1", "--student-steps", "10", "--U", "64")
    out = capsys.readouterr().out
    assert (
        "multi-axis table" in out
        and "wall-time table" in out
        and "storage per training position" in out
    )
    names = [row["method"] for row in r["rows"][2:]]  # after the teacher and the initial student
    assert names == [
        "Full KD",
        "RandomPos 20%",
        "RandomSmp 20%",
        "SE-KD top 20%",
        "RS-KD U=64",
        "TopSmp 20%",
        "TopSmp+RS-KD",
        "SE-KD+TopSmp",
        "SE-KD_3X",
    ]
    rows = {row["key"]: row for row in r["rows"][2:]}
    n_train = r["data"]["train_samples"]
    top = rows["top_smp"]
    assert top["n_kept"] == math.ceil(0.2 * n_train) and top["steps"] == math.ceil(
        10 * top["n_kept"] / n_train
    )
    assert (
        top["prepass_s"] > 0
        and rows["full_kd"]["prepass_s"] is None
        and rows["random_smp"]["prepass_s"] is None
    )
    walls = {w["key"]: w for w in r["walltime"]}
    assert list(walls) == ["full_kd", "random_pos", "top_smp", "sekd_3x", "sekd_3x_reuse"]
    build, reuse = walls["sekd_3x"], walls["sekd_3x_reuse"]
    assert build["cache_build_s"] > 0 and not build["cache_reused"]
    assert reuse["cache_build_s"] is None and reuse["cache_reused"]
    assert reuse["val_ppl"] == build["val_ppl"] and reuse["kl_to_teacher"] == build["kl_to_teacher"]
    assert all(w["total_s"] >= w["train_s"] for w in r["walltime"])
    c = r["storage"]["cache"]
    assert abs(c["bytes"] - c["accounted_bytes"]) <= 0.01 * c["accounted_bytes"]
    assert c["positions"] == top["n_kept"] * 16
    assert (
        json.loads((tmp_path / "results_axes.json").read_text())["summary"]["SE-KD_3X"]["val_ppl"][
            "n"
        ]
        == 1
    )


def test_storage_run_prints_the_papers_storage_table(tmp_path, tiny_corpus, capsys):
    r = run_job(axes, tmp_path, tiny_corpus, "--table", "storage")["storage"]
    assert r["paper_scale"]["rskd"] == 192 and "cache" not in r  # no cache built in this folder yet
    assert "storage per training position" in capsys.readouterr().out


# ----------------------------------------------------------------------------- sample, regimes


def test_sample_prints_each_model_deterministically(tmp_path, tiny_corpus, capsys, monkeypatch):
    corpus = save_tiny_models(
        tmp_path, tiny_corpus, ["teacher", "student_init", "student_sekd", "student_ce"]
    )
    flags = ["--sample-prompts", "2", "--sample-prompt-len", "6", "--sample-len", "10"]
    bans, generate = [], sekd.GPT.generate
    with monkeypatch.context() as m:  # every model is told never to draw the id for rare tokens
        m.setattr(sekd.GPT, "generate", lambda *a, **k: bans.append(k["ban"]) or generate(*a, **k))
        r1 = run_job(sample, tmp_path, tiny_corpus, *flags)
    assert bans == [corpus.vocab.unk] * 4 and corpus.vocab.unk is not None
    out = capsys.readouterr().out
    assert data.UNK not in out
    assert list(r1["continuations"]) == ["teacher", "student_init", "student_ce", "student_sekd"]
    stream = np.asarray(corpus.val).reshape(-1)
    enc = data.gpt2_encoding()
    for s, p in zip(r1["prompt_starts"], r1["prompts"], strict=False):
        assert (
            corpus.vocab.decode([stream[s - 1]], enc) == "<|endoftext|>" and p in out
        )  # starts a line (document)
    for name in r1["continuations"]:
        ent = np.array(r1["entropy"][name])
        assert (
            ent.shape == (2, 10)
            and (ent > 0).all()
            and (ent <= math.log(corpus.vocab.size) + 1e-4).all()
        )
        assert f"--- {name}, mean entropy {ent[1].mean():.2f} nats" in out
    assert "\x1b[" not in out  # captured stdout is not a terminal: plain text
    assert (
        json.loads((tmp_path / "results_sample.json").read_text())["continuations"]
        == r1["continuations"]
    )
    again = run_job(sample, tmp_path, tiny_corpus, *flags)["continuations"]
    assert again == r1["continuations"]  # same seed, same text
    capsys.readouterr()
    monkeypatch.setattr(sample, "colour_enabled", lambda: True)
    other = run_job(sample, tmp_path, tiny_corpus, *flags, "--seed", "7")["continuations"]
    assert all(other[n] != r1["continuations"][n] for n in other)
    assert "\x1b[48;2;" in capsys.readouterr().out


def test_colour_only_on_a_terminal_and_without_no_color(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(sys, "stdout", Terminal())
    on = sample.colour_enabled()
    monkeypatch.setenv("NO_COLOR", "1")
    off = sample.colour_enabled()
    monkeypatch.undo()
    assert on and not off and not sample.colour_enabled()  # pytest's captured stdout is no terminal


def test_sample_without_students_or_teacher_is_a_clear_error(tmp_path, tiny_corpus):
    save_tiny_models(tmp_path, tiny_corpus, ["student_sekd"])
    with pytest.raises(train.UserError, match="no.pt does not exist: train it first"):
        run_job(sample, tmp_path, tiny_corpus, "--teacher-ckpt", str(tmp_path / "no.pt"))
    os.remove(tmp_path / "student_sekd.pt")
    save_tiny_models(tmp_path, tiny_corpus, ["teacher", "student_init"])
    with pytest.raises(
        train.UserError, match=r"no trained students .* run `python train.py` there"
    ):
        run_job(sample, tmp_path, tiny_corpus)


def test_regimes_map_reports_paired_gaps_and_resumes(tmp_path, tiny_corpus, capsys, monkeypatch):
    cells = {
        "A tiny lam1": ("1x16", 1e-3, 2, 1.0, "selected", 0.25, ("full_kd", "sekd", "te")),
        "B tiny lam.5": ("2x16", 1e-3, 2, 0.5, "selected", 0.25, ("sekd",)),
        "C tiny distilled": ("1x16kd", 1e-3, 2, 1.0, "selected", 0.25, ("sekd",)),
    }
    monkeypatch.setattr(regimes, "CELLS", cells)
    args = (
        "--seeds",
        "2",
        "--eval-tokens",
        "128",
        "--cell-batch",
        "2",
        "--teacher-steps",
        "3",
        "--student-init-steps",
        "5",
    )
    res = run_job(regimes, tmp_path, tiny_corpus, *args)
    r, out = res["regimes"], capsys.readouterr().out
    weaker = [s for s, d in r["diagnosis"].items() if d["val_ppl"] <= res["rows"][0]["val_ppl"]]
    assert weaker == [
        "2x16"
    ]  # a 3-step teacher: the 2x16 student starts above it, the 1x16 ones below
    assert out.count("already better than the teacher") == 1
    runs = json.loads((tmp_path / "regimes_runs.json").read_text())
    assert len(runs) == 2 * (3 + 1 + 1)  # every (cell, method, seed), each trained once
    a = r["cells"]["A tiny lam1"]
    assert set(a["rows"]) == {"full_kd", "sekd", "te"} and "sekd-random_pos" not in a
    assert (
        a["rows"]["te"]["val_ppl"] != a["rows"]["sekd"]["val_ppl"]
    )  # another metric, another student
    for key in (
        "val_ppl",
        "kl_to_teacher",
        "hard_kl",
    ):  # the gap: the mean over seeds of the seed-by-seed gaps, and its 95% t half width
        d = [
            s[key] - f[key]
            for s, f in zip(a["rows"]["sekd"]["seeds"], a["rows"]["full_kd"]["seeds"], strict=False)
        ]
        assert a["sekd-full_kd"][key][0] == pytest.approx(np.mean(d))
        half = 12.706 * np.std(d, ddof=1) / np.sqrt(2)  # t at 1 degree of freedom: 2 seeds
        assert a["sekd-full_kd"][key][1] == pytest.approx(half, rel=1e-4)
    d = r["diagnosis"]["1x16"]
    assert (
        -1 <= d["corr_sent_kl"] <= 1 and d["top"]["s_ent"] >= d["random"]["s_ent"]
    )  # top-k picks the unsure
    assert d["hard_kl"] == pytest.approx(d["top"]["kl"])  # the hard positions are the top-k ones
    assert (tmp_path / "regimes_2x16" / "student_init.pt").exists() and (
        tmp_path / "regimes.png"
    ).exists()
    kd_init = torch.load(tmp_path / "regimes_1x16kd" / "student_full_kd.pt", weights_only=True)
    assert (
        kd_init["kd"]["method"] == "full_kd"
        and kd_init["kd"]["lam"] == 1.0
        and kd_init["step"] == 5
    )
    assert (
        r["diagnosis"]["1x16kd"]["val_ppl"] != d["val_ppl"]
    )  # distilled, not the CE-pretrained student
    monkeypatch.setattr(
        train,
        "distill_student",
        lambda *a, **k: pytest.fail("a finished student was trained again"),
    )
    again = run_job(regimes, tmp_path, tiny_corpus, *args)["regimes"]
    assert (
        again["cells"]["B tiny lam.5"]["rows"]["sekd"]["val_ppl"]
        == r["cells"]["B tiny lam.5"]["rows"]["sekd"]["val_ppl"]
    )


# ------------------------------------------------------------------- statistics: paired intervals


@pytest.mark.parametrize(
    "df, p, table",  # t tables' values (two-sided 95%, 90%, 99%)
    [(1, 0.975, 12.706), (2, 0.975, 4.303), (4, 0.975, 2.776), (9, 0.975, 2.262)]
    + [(30, 0.975, 2.042), (3, 0.95, 2.353), (1, 0.995, 63.657), (1000, 0.975, 1.962)],
)
def test_t_quantile_equals_the_tables(df, p, table):
    assert stats.t_quantile(p, df) == pytest.approx(table, abs=5e-4)


def test_paired_t_interval_equals_a_hand_computation():
    got = stats.paired_t([1, 2, 3], [0, 0, 0])  # differences 1, 2, 3: mean 2, sd 1
    half = 4.303 / math.sqrt(3)
    assert got["mean"] == 2 and got["sd"] == pytest.approx(1) and got["df"] == 2
    assert got["low"] == pytest.approx(2 - half, abs=1e-3)
    assert got["high"] == pytest.approx(2 + half, abs=1e-3) and not got["holds"]
    got = stats.paired_t([5.0, 5.2, 4.8, 5.1, 4.9], [6, 6, 6, 6, 6])  # -1 +- 2.776 * 0.158 / 2.236
    assert got["high"] == pytest.approx(-1 + 2.776 * math.sqrt(0.025) / math.sqrt(5), abs=1e-3)
    assert got["holds"] and got["high"] < 0 and got["df"] == 4
    with pytest.raises(ValueError, match="at least 2 values"):
        stats.paired_t([1.0], [0.0])


def test_paired_bootstrap_equals_a_resample_loop_and_the_normal_approximation():
    a = np.random.default_rng(0).normal(0.0, 1.0, 30)
    b = a + np.random.default_rng(1).normal(-0.2, 0.5, 30)
    b[:3] = a[:3]  # three ties
    got = stats.paired_bootstrap(a, b, resamples=500, seed=7)
    rng, d, means = np.random.default_rng(7), (a - b).tolist(), []
    for _ in range(500):  # each resample: 30 items drawn with replacement, in turn
        means.append(sum(d[int(j)] for j in rng.integers(0, 30, 30)) / 30)
    means.sort()
    for q, key in ((0.025, "low"), (0.975, "high")):  # the percentile, interpolated linearly
        i, f = int(q * 499), q * 499 - int(q * 499)
        assert got[key] == pytest.approx(means[i] + f * (means[i + 1] - means[i]), rel=1e-12)
    assert got["mean"] == pytest.approx(sum(d) / 30) and got["n"] == 30
    assert got["won"] == pytest.approx((sum(x < 0 for x in d) + 3 / 2) / 30)
    # many items: the interval is mean +- 1.96 sd / sqrt(n)
    d = np.random.default_rng(2).normal(0.05, 1.0, 4000)
    got = stats.paired_bootstrap(d, np.zeros_like(d), resamples=4000, seed=0)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert got["low"] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert got["high"] == pytest.approx(d.mean() + half, abs=0.1 * half)
    assert got["holds"] == (got["low"] > 0)


# --------------------------------------------------------------- entry points, direction of imports


def test_train_imports_no_experiment():
    """sekd, data <- train <- experiments: importing train and parsing its flags loads nothing of
    experiments/; no line of sekd.py, data.py or train.py imports it, lazily (importlib) or not;
    sekd.py and data.py import neither train nor each other."""
    code = (
        "import sys, train; train.check_flags(train.parse_args([])); "
        "print([m for m in sys.modules if m.split('.')[0] == 'experiments'])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]
    imports = re.compile(
        r"\bexperiments\b.*\bimport\b|\b(import|import_module|__import__)\b.*\bexperiments\b"
    )
    for name in ("sekd.py", "data.py", "train.py"):
        with open(os.path.join(HERE, name)) as f:
            for i, line in enumerate(f, 1):
                assert not imports.search(line), f"{name}:{i} imports experiments/: {line.strip()}"
    # sekd.py and data.py are the bottom layer, side by side: each loads neither the other nor train
    for name, other in (("sekd", "data"), ("data", "sekd")):
        code = f"import sys, {name}; print(sorted({{'{other}', 'train'}} & set(sys.modules)))"
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=120
        )
        assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]
        below = re.compile(rf"\b(import|from)\s+({other}|train)\b|\b(import_module|__import__)\b")
        with open(os.path.join(HERE, f"{name}.py")) as f:
            for i, line in enumerate(f, 1):
                assert not below.search(line), f"{name}.py:{i} imports {other} or train: {line}"


def test_each_tool_checks_train_flags_and_its_own_in_one_line():
    with pytest.raises(train.UserError, match="--run compare or distill"):
        positions.main(["--on-policy", "0.5"])
    with pytest.raises(train.UserError, match="--divergence reverse work with --run compare"):
        axes.main(["--divergence", "reverse"])
    with pytest.raises(train.UserError, match="--run distill is a job of python train.py"):
        regimes.main(["--run", "distill"])
    with pytest.raises(train.UserError, match="argument --run: invalid choice: 'positions'"):
        train.main(["--run", "positions"])  # the paper-table runs left train.py
    r = subprocess.run(
        [sys.executable, "-m", "experiments.axes", "--table", "nope"],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=120,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "argument --table: invalid choice: 'nope'" in r.stderr and "--help" in r.stderr


def test_one_process_runs_refuse_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for tool, flags in ((benchmark, []), (axes, ["--table", "storage"]), (show, [])):
        with pytest.raises(
            train.UserError, match="runs in one process: start it with python, not torchrun"
        ):
            tool.main(flags)


def test_verdict_pairs_seeds_and_items_and_shares_full_kd_between_cells(tmp_path):
    from experiments import verdict
    from experiments.stats import paired_bootstrap, paired_t

    rng = np.random.default_rng(0)

    def row(shift):
        cloze, control = rng.normal(5 + shift, 1, 40), rng.normal(6, 1, 50)
        return {
            "val_ppl": 140 + shift + rng.normal(),
            "cloze_ppl_tau": float(np.exp(cloze.mean())),
            "control_ppl_tau": float(np.exp(control.mean())),
            "cloze_nll_tau": cloze.tolist(),
            "control_nll_tau": control.tolist(),
            "entropy": 5.0,
            "tau": 1.0,
        }

    runs = {}
    for s in (3, 1, 2):  # out of order: the seeds are paired by number
        runs[f"1x64|full_kd|lr0.001|120|lam1|-|k1|b8|s{s}"] = row(0.0)
        for ce_at, shift in (("selected", -0.5), ("all", 0.0)):
            runs[f"1x64|sekd|lr0.001|120|lam1|{ce_at}|k0.2|b8|s{s}"] = row(shift)
    path = tmp_path / "regimes_runs.json"
    path.write_text(json.dumps(runs))
    cells = verdict.map_runs(path)
    assert len(cells) == 2 and all(len(c["full_kd"]) == 3 for c in cells.values())
    c = cells["1x64 lr0.001 120 lam1 selected k0.2 b8"]
    a, b = c["sekd"], c["full_kd"]
    assert a == [runs[f"1x64|sekd|lr0.001|120|lam1|selected|k0.2|b8|s{s}"] for s in (1, 2, 3)]
    got = verdict.compare(a, b)
    assert got["val_ppl"] == paired_t([r["val_ppl"] for r in a], [r["val_ppl"] for r in b])
    d = np.mean(
        [np.subtract(x["cloze_nll_tau"], y["cloze_nll_tau"]) for x, y in zip(a, b, strict=True)], 0
    )
    assert got["cloze_nll_tau"] == paired_bootstrap(d, np.zeros_like(d))
    assert got["cloze_nll_tau"]["holds"] and got["cloze_nll_tau"]["high"] < 0  # 0.5 nats better
    gap = [np.mean(r["cloze_nll_tau"]) - np.mean(r["control_nll_tau"]) for r in a]
    assert got["context_gap"]["mean"] == pytest.approx(
        np.mean(gap)
        - np.mean([np.mean(r["cloze_nll_tau"]) - np.mean(r["control_nll_tau"]) for r in b])
    )
    text, n = verdict.table("cell", c)
    assert n == 5 and "sekd - full_kd" in text and "5 comparisons" in text


def test_verdict_compares_two_vocabularies_on_the_items_they_share(tmp_path, monkeypatch):
    """R3's table: each vocabulary's own items, and the items both have (the same window end and
    target count), against a brute force over the shared positions."""
    from experiments import verdict
    from experiments.stats import paired_t

    ends = {4: [(10, 1), (20, 2), (30, 1)], 0: [(20, 2), (25, 1), (30, 1), (40, 3)]}  # share 2

    def items(corpus, control):
        at = [torch.tensor([[e - 1, e]]) for e, _ in ends[corpus]]
        n = torch.tensor([n for _, n in ends[corpus]])
        return {k: (None, None, n, None, torch.cat(at)) for k in ("cloze", "control")}, ""

    monkeypatch.setattr(verdict.data, "prepare", lambda *a, vocab_size: vocab_size)
    monkeypatch.setattr(verdict.data, "eval_items", items)
    rng, paths, nll = np.random.default_rng(1), [], {}
    for v in (4, 0):
        runs = {}
        for s in (1, 2, 3):
            for m in ("full_kd", "sekd"):
                x = rng.normal(5, 1, len(ends[v])).tolist()
                nll[v, m, s] = x
                ce_at, k = ("-", "k1") if m == "full_kd" else ("selected", "k0.2")
                runs[f"1x64|{m}|lr0.001|120|lam1|{ce_at}|{k}|b8|s{s}"] = dict(
                    cloze_nll_tau=x, control_nll_tau=x
                )
        paths.append(tmp_path / f"v{v}.json")
        paths[-1].write_text(json.dumps(runs))
    text = verdict.shared_table(paths, (4, 0))
    shared = {4: [1, 2], 0: [0, 2]}  # where (20, 2) and (30, 1) are in each list
    for v, name in ((4, "4"), (0, "all")):
        means = {m: [np.mean(nll[v, m, s]) for s in (1, 2, 3)] for m in ("sekd", "full_kd")}
        own = paired_t(means["sekd"], means["full_kd"])
        means = {m: [np.mean(np.array(nll[v, m, s])[shared[v]]) for s in (1, 2, 3)] for m in means}
        cut = paired_t(means["sekd"], means["full_kd"])
        row = next(line for line in text.splitlines() if f"| {name} |" in line)
        assert f"{own['mean']:+.3f} [{own['low']:+.3f}" in row
        assert f"{cut['mean']:+.3f} [{cut['low']:+.3f}" in row
