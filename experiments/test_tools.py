"""Tests of the optional tools (requirements-tools.txt), offline: lm-eval-harness scores our items
as train.EvalSet does, and GPT-2's weights go in and out of Hugging Face's format, logits equal."""

import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

import data  # noqa: E402 (after the skips)
import sekd  # noqa: E402
import train  # noqa: E402
from experiments import harness  # noqa: E402

FLOAT32 = argparse.Namespace(dtype="float32")  # what EvalSet.evaluate reads of the flags


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A play's first 3,200 lines as 8 documents (a parquet file), the last one held out, 32
    positions a sample: with a compact vocabulary, and with GPT-2's whole one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, lines = tmp_path_factory.mktemp("tools"), data.shakespeare_split()[0][0].splitlines()
    docs = ["\n".join(lines[i : i + 400]) + "\n" for i in range(0, 3200, 400)]
    pq.write_table(pa.table({"text": docs}), path / "play.parquet")
    ds = f"files:{path / 'play.parquet'}"
    return [data.prepare(ds, 32, full, str(path / "cache")) for full in (False, True)]


def fitted(corpus, items, steps=30):
    """A small GPT fitted to the cloze's windows and the true options': it gets some right."""
    torch.manual_seed(0)
    config = sekd.GPTConfig(corpus.vocab.size, block_size=32, n_layer=1, n_head=2, n_embd=32)
    model = sekd.GPT(config)
    x = torch.cat([items["cloze"][0], items["choice"][0][:: data.OPTIONS]])
    y = torch.cat([items["cloze"][1], items["choice"][1][:: data.OPTIONS]])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(steps):  # the head at the target rows only: V may be GPT-2's 50,257
        loss = torch.nn.functional.cross_entropy(model.head(model.hidden(x)[y >= 0]), y[y >= 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def both_scorers(corpus, folder, n_items=None, fit=True):
    """A model (fitted to the items, or random), and its measures on our items (the first n_items
    of each kind) written as tasks to `folder`: lm-eval's through SekdLM, EvalSet's."""
    evalset = train.EvalSet(corpus, 1, torch.device("cpu"), 8)
    for kind, (x, y, n, _, *more) in list(evalset.items.items()) if n_items else []:
        first = torch.arange(len(n)) < n_items * (data.OPTIONS if kind == "choice" else 1)
        row = torch.repeat_interleave(torch.arange(int(first.sum())), n[first])
        evalset.items[kind] = (x[first], y[first], n[first], row, *[m[first] for m in more])
    kept = {k: v[2].numel() for k, v in evalset.items.items()}
    evalset.items = harness.write_tasks(corpus, evalset.items, folder)
    kept = {k: v[2].numel() / kept[k] for k, v in evalset.items.items()}
    model = fitted(corpus, evalset.items, steps=30 if fit else 0)
    got = harness.evaluate(model, corpus, ["sekd_cloze", "sekd_choice"], folder, batch_size=8)
    return model, kept, got["results"], evalset.evaluate(model, FLOAT32)


@pytest.fixture
def few_items(monkeypatch):
    monkeypatch.setattr(data, "MIN_ITEMS", 1)  # this small text has a few items of each kind
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)  # pip list: slow


def test_lm_eval_scores_our_items_as_evalset(corpora, tmp_path, few_items):
    """lm-eval's perplexity, greedy accuracy and acc_bytes on sekd_cloze / sekd_choice are
    EvalSet's cloze PPL, cloze accuracy and choice accuracy on the same items, in float precision
    (a compact vocabulary: the unseen tokens' text is the validation text's own)."""
    _, kept, got, ours = both_scorers(corpora[0], str(tmp_path))
    assert min(kept.values()) > 0.8  # most items' text gives back their ids
    assert math.isclose(got["sekd_cloze"]["perplexity,none"], ours["cloze_ppl"], rel_tol=1e-5)
    assert got["sekd_cloze"]["acc,none"] == ours["cloze_acc"] > 0
    assert got["sekd_choice"]["acc_bytes,none"] == ours["choice_acc"] > 0.25


def test_tasks_read_each_window_where_it_is(tmp_path, few_items):
    """The validation text twice, every 4th line of the copy its next one: many windows of the copy
    begin with ids met earlier and go on otherwise. Each item's context is its own window's text,
    so lm-eval's split gives back every choice item's ids (its context ends in a word)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = data.shakespeare_split()[0][0].splitlines()
    val = lines[2800:3000]
    copy = [val[i + 1] if i % 4 == 0 else line for i, line in enumerate(val[:-1])]
    docs = ["\n".join(lines[i : i + 400]) + "\n" for i in range(0, 2800, 400)]
    pq.write_table(
        pa.table({"text": docs + ["\n".join(val + copy) + "\n"]}), tmp_path / "p.parquet"
    )
    corpus = data.prepare(f"files:{tmp_path / 'p.parquet'}", 32, False, str(tmp_path / "cache"))
    items = data.eval_items(corpus)[0]
    kept = harness.write_tasks(corpus, items, str(tmp_path / "tasks"))
    assert len(items["choice"][2]) >= 20 * data.OPTIONS
    assert torch.equal(kept["choice"][-1], items["choice"][-1])  # all of them, in order


def test_lm_eval_hf_model_of_the_export_scores_as_ours(corpora, tmp_path, few_items):
    """GPT-2's whole vocabulary: lm-eval's own `hf` model, on the exported model, says what
    SekdLM and EvalSet say (12 items of each kind, a random model)."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, kept, got, ours = both_scorers(corpora[1], str(tmp_path), n_items=12, fit=False)
    assert min(kept.values()) > 0.5
    harness.export(saved(model, corpora[1], tmp_path / "model.pt"), str(tmp_path / "hf"))
    theirs = harness.lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(tmp_path / "hf"), batch_size=8, device="cpu"),
        tasks=["sekd_cloze", "sekd_choice"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=0,
    )["results"]
    for key, (task, metric) in {
        "cloze_ppl": ("sekd_cloze", "perplexity,none"),
        "cloze_acc": ("sekd_cloze", "acc,none"),
        "choice_acc": ("sekd_choice", "acc_bytes,none"),
    }.items():
        assert math.isclose(got[task][metric], ours[key], rel_tol=1e-5)
        assert math.isclose(theirs[task][metric], ours[key], rel_tol=1e-4)


def test_sekd_lm_rolling_and_generation(corpora):
    """loglikelihood_rolling: every token's log-probability, once; generate_until stops at its
    stop string and never writes the id of unseen tokens."""
    corpus = corpora[0]
    torch.manual_seed(0)
    model = sekd.GPT(sekd.GPTConfig(vocab_size=corpus.vocab.size, block_size=8, n_layer=1))
    lm = harness.SekdLM(model, corpus.vocab, batch_size=3)
    text = "Now is the winter of our discontent made glorious summer by this sun of York."
    ids, direct = lm.tok_encode(text), 0.0
    assert len(ids) == 16  # two of lm-eval's windows: 8 tokens each, after the token before
    for a in (0, 8):
        logp = torch.log_softmax(model(torch.tensor([([lm.eot_token_id] + ids)[a : a + 8]])), -1)
        direct += logp[0].gather(1, torch.tensor(ids[a : a + 8])[:, None]).sum().item()
    request = type("Request", (), {"args": (text,)})
    assert math.isclose(lm.loglikelihood_rolling([request])[0], direct, rel_tol=1e-5)
    with torch.no_grad():  # the unseen tokens' id, made the likeliest
        model.wte.weight[corpus.vocab.unk] = 10 * model.ln_f.weight.sign() * model.ln_f.bias.sign()
    request.args = ("To be, or", {"until": ["\n"], "max_gen_toks": 12})
    out = lm.generate_until([request])[0]
    assert data.UNK not in out and "\n" not in out


@pytest.mark.parametrize("act", ["gelu_new", "gelu"])
def test_hf_gpt2_round_trip_equal_logits(act, corpora, tmp_path):
    """A random GPT-2 of Hugging Face -> sekd.GPT -> --export -> GPT2LMHeadModel: the same logits
    each time. Every weight is drawn anew (LayerNorms and biases too): a swapped one would show."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, activation_function=act)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.3)
    ours = train.GPT_from_hf(theirs, 1024).eval()
    assert ours.config.gelu == ("tanh" if act == "gelu_new" else "none")
    harness.export(saved(ours, corpora[1], tmp_path / "gpt2.pt"), str(tmp_path / "hf"))
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert again.config.activation_function == act
    x = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(x).logits
        torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(again(x).logits, want, rtol=1e-4, atol=1e-4)
        short = train.GPT_from_hf(theirs, 16)  # nanoGPT's crop_block_size: the first positions
        torch.testing.assert_close(short(x[:, :16]), want[:, :16], rtol=1e-4, atol=1e-4)


def saved(model, corpus, path):
    ckpt = dict(model=model.state_dict(), config=dataclasses.asdict(model.config), step=1, steps=1)
    train.save_checkpoint(str(path), ckpt | dict(signature=corpus.signature))
    return str(path)


def test_export_writes_gpt2_and_refuses_a_compact_vocabulary(corpora, tmp_path, capsys):
    """--export: a checkpoint of the whole vocabulary -> a folder that transformers loads offline,
    its logits sekd's, its tokenizer data.gpt2_encoding's; a compact one is refused in one line
    that says to score it with lm-eval instead."""
    paths = []
    for corpus in corpora:
        torch.manual_seed(0)
        model = sekd.GPT(sekd.GPTConfig(vocab_size=corpus.vocab.size, n_layer=1, n_embd=16))
        paths.append(saved(model, corpus, tmp_path / f"{corpus.vocab.size}.pt"))
    with pytest.raises(SystemExit) as e:
        train.cli(["--ckpt", paths[0], "--export", str(tmp_path / "no")], job=harness.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "score it with lm-eval" in err
    train.cli(["--ckpt", paths[1], "--export", str(tmp_path / "hf")], job=harness.main)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.activation_function == "gelu"  # sekd's exact GELU
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Good morrow, cousin.\n\nExeunt<|endoftext|>"
    ids = data.gpt2_encoding().encode(text, allowed_special="all")
    assert tokenizer(text)["input_ids"] == ids
    model = train.GPT_from(train.load_checkpoint(paths[1])).eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        torch.testing.assert_close(theirs(x).logits, model(x), rtol=1e-4, atol=1e-4)


def test_gpt2_weights_need_the_full_vocabulary_and_say_they_need_internet(monkeypatch):
    with pytest.raises(train.UserError, match="--full-vocab"):
        train.check_flags(train.parse_args(["--teacher-init", "gpt2"]))
    train.check_flags(train.parse_args(["--student-init", "gpt2", "--full-vocab"]))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as CI sets it
    with pytest.raises(train.UserError, match=r"gpt2 from the Hugging Face Hub \(needs internet"):
        train.GPT_from_hf("gpt2", 128)
    assert np.array_equal(data.Vocab(np.arange(50257), True).encode(np.arange(3)), np.arange(3))
