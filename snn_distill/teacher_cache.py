"""Teacher logit cache: the teacher's top-k log-probabilities per training token, kept on disk.

`--teacher-cache DIR` makes training read the teacher's side of the loss from DIR instead of running
the teacher: the first run fills the cache as it trains (the teacher runs only on blocks that are not
cached yet); a later run over the same data, with the cache filled, never loads the teacher's weights
(only its tokenizer and config, to tokenize the data and size the student).

What is stored, per real token of every block (training and held-out):

* the k most probable next tokens (int32 ids, by decreasing probability),
* their log-probabilities at the distillation temperature (float32),
* the log of the remaining probability mass ("tail", float32), computed from the full distribution
  as logsumexp over the other V - k words (not as 1 - sum(top-k), which cancels catastrophically when
  the teacher is confident).

Precision: log-probabilities are stored as float32 because the cache must reproduce the live top-k
targets exactly (a cached run trains bit-identically to a live top-k run), and float16 would not be
safe: its relative spacing 2^-11 turns log-probability -10 into an error of 0.005 (0.5% in the
probability), and the errors of 64 entries add up in the tail mass, which for a confident teacher is
itself 1e-4..1e-3. At 8 bytes per entry plus 4 per token, k = 64 costs 516 bytes per token (0.5 GB
per million tokens); ids would fit in int32 for any vocabulary.

The bias of plain top-k truncation: renormalising the k kept words to sum to one (dropping the tail)
scales every kept probability up by 1 / (1 - tail), i.e. the student is taught that the teacher is
more confident than it is, most where the teacher is uncertain (a flat distribution over 49k words
can leave most of its mass outside any top-64), and the student's probability on the other V - k
words gets no gradient that keeps it at the teacher's level. Keeping the tail as an explicit bin (see
`losses.py`) makes the loss the exact KL between the (k+1)-bin coarse-grainings of the two
distributions: never above the full KL, equal to it when the student's tail has the teacher's shape.

Layout of one cache entry, DIR/<key>/ (key = hash of everything that decides the values):

    meta.json      format, key components, k, block count, token count (written first, atomically;
                   the entry is moved into place only when complete)
    indices.i32    int32   [tokens, k]
    logprobs.f32   float32 [tokens, k]
    tail.f32       float32 [tokens]
    crc.u32        uint32  [blocks]     crc32 of a block's three slices
    filled.u8      uint8   [blocks]     1 once the block's data and crc are written and flushed

Block b owns tokens offsets[b] : offsets[b] + len(block b), in the order of the tokenized blocks.
Writes are flushed (msync) before the block's `filled` byte is set and flushed, so a crash leaves a
block either complete or unmarked; a block whose crc does not match is recomputed, and an entry whose
meta.json or file sizes do not match is removed and rebuilt. Several processes may share an entry:
they write whole blocks of identical values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .losses import TeacherTargets
from .teacher import Teacher

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class TeacherCacheError(RuntimeError):
    """A cache entry that cannot be used (the message says why); it is rebuilt."""


# ---- what the key is made of ---------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path, memo: dict[str, str] | None = None) -> str:
    """sha256 of a file's content, memoised by (path, size, mtime) in `memo` when given."""
    st = path.stat()
    tag = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if memo is not None and tag in memo:
        return memo[tag]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo[tag] = digest
    return digest


def teacher_fingerprint(name_or_path: str, revision: str | None = None, memo_dir: str | Path | None = None) -> str:
    """Content hash of the teacher's weights and config, without loading the model.

    A .gguf file: its bytes. A folder: config.json and every weight file. A Hub id: the snapshot commit
    of the locally cached config (and the config itself), else just the id and revision.
    Hashing a file is memoised by (path, size, mtime) in `memo_dir`/fingerprints.json.
    """
    memo_file = Path(memo_dir) / "fingerprints.json" if memo_dir is not None else None
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = dict(json.loads(memo_file.read_text()))
        except (OSError, ValueError):
            memo = {}
    before = dict(memo)
    path = Path(name_or_path).expanduser()
    parts: list[str] = [f"revision={revision}"]
    if path.is_file():
        parts.append(f"file={_file_digest(path, memo)}")
    elif path.is_dir():
        for f in sorted(path.iterdir()):
            if f.name == "config.json" or (f.is_file() and f.suffix in _WEIGHT_SUFFIXES):
                parts.append(f"{f.name}={_file_digest(f, memo)}")
    else:
        parts.append(f"hub={name_or_path}")
        try:
            from huggingface_hub import try_to_load_from_cache

            cfg = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
            if isinstance(cfg, str):
                parts.append(f"commit={Path(cfg).parent.name}")
                parts.append(f"config={_file_digest(Path(cfg))}")
        except Exception:  # noqa: BLE001 - best effort: the id and revision still identify it
            pass
    if memo_file is not None and memo != before:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}")
            tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
            os.replace(tmp, memo_file)
        except OSError:
            pass
    return _sha("\n".join(parts).encode())


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary, added and special tokens, and class."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = getattr(tokenizer, "special_tokens_map", {})
    payload = json.dumps([type(tokenizer).__name__, vocab, special], sort_keys=True, default=str)
    return _sha(payload.encode())


def blocks_fingerprint(blocks: Sequence[Sequence[int]]) -> str:
    """Hash of the tokenized blocks (lengths and ids, in order)."""
    h = hashlib.sha256()
    lengths = np.fromiter((len(b) for b in blocks), dtype=np.int64, count=len(blocks))
    h.update(lengths.tobytes())
    for b in blocks:
        h.update(np.asarray(b, dtype=np.int64).tobytes())
    return h.hexdigest()


def cache_components(
    *,
    teacher_name: str,
    teacher_fingerprint: str,
    revision: str | None,
    teacher_dtype: str,
    tokenizer: Any,
    vocab_size: int,
    dataset: str,
    blocks: Sequence[Sequence[int]],
    max_length: int,
    pack: bool,
    temperature: float,
    k: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that decides the cached values, as a JSON-able dict (hashed into the entry's key)."""
    return {
        "format": FORMAT_VERSION,
        "teacher": {
            "name": teacher_name,
            "revision": revision,
            "fingerprint": teacher_fingerprint,
            "dtype": teacher_dtype,
            **(extra or {}),
        },
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": int(vocab_size),
        "dataset": {
            "name": dataset,
            "blocks": blocks_fingerprint(blocks),
            "num_blocks": len(blocks),
            "num_tokens": int(sum(len(b) for b in blocks)),
        },
        "max_length": int(max_length),
        "pack": bool(pack),
        "temperature": float(temperature),
        "k": min(int(k), int(vocab_size)),  # k >= V keeps the whole distribution
    }


def cache_key(components: dict[str, Any]) -> str:
    return _sha(json.dumps(components, sort_keys=True).encode())[:24]


# ---- top-k targets ------------------------------------------------------------------------------


def topk_targets(logprobs: torch.Tensor, k: int, chunk: int = 256) -> TeacherTargets:
    """Full log-probabilities [N, V] -> top-k targets: values [N, k] fp32, indices [N, k] int64 and the
    log of the remaining mass [N], logsumexp over the other V - k words (-inf-free: clamped at -80)."""
    n, v = logprobs.shape
    k = min(k, v)
    vals = torch.empty((n, k), dtype=torch.float32, device=logprobs.device)
    idx = torch.empty((n, k), dtype=torch.int64, device=logprobs.device)
    tail = torch.full((n,), -80.0, dtype=torch.float32, device=logprobs.device)
    for i in range(0, n, chunk):
        lp = logprobs[i : i + chunk].float()
        tv, ti = lp.topk(k, dim=-1)
        vals[i : i + chunk], idx[i : i + chunk] = tv, ti
        if k < v:
            rest = lp.scatter(1, ti, float("-inf"))
            tail[i : i + chunk] = torch.logsumexp(rest, dim=-1).clamp_min(-80.0)
    return TeacherTargets(vals, idx, tail)


# ---- the on-disk entry ---------------------------------------------------------------------------


def _flush(arr: np.memmap, start: int, stop: int) -> None:
    """msync the byte range [start, stop) of a memmap's file (whole map if the range API is missing)."""
    mm = getattr(arr, "_mmap", None)
    if mm is None or stop <= start:
        arr.flush()
        return
    start += int(getattr(arr, "offset", 0))
    stop += int(getattr(arr, "offset", 0))
    base = start - start % mmap.ALLOCATIONGRANULARITY
    mm.flush(base, stop - base)


class TeacherLogitCache:
    """One cache entry: top-k teacher targets for a fixed list of token blocks (see the module doc).

    `TeacherLogitCache.open(root, components, block_lengths)` creates, validates or rebuilds the entry
    DIR/<key>. `missing(ids)` lists blocks still to compute, `write(ids, targets)` stores them, and
    `read(ids)` returns the targets of those blocks' tokens concatenated in order.
    """

    def __init__(self, path: Path, meta: dict[str, Any], lengths: np.ndarray) -> None:
        self.path = path
        self.meta = meta
        self.k = int(meta["k"])
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens, blocks, k = int(self.offsets[-1]), len(lengths), self.k
        self.indices = np.memmap(path / "indices.i32", dtype=np.int32, mode="r+", shape=(tokens, k))
        self.logprobs = np.memmap(path / "logprobs.f32", dtype=np.float32, mode="r+", shape=(tokens, k))
        self.tail = np.memmap(path / "tail.f32", dtype=np.float32, mode="r+", shape=(tokens,))
        self.crc = np.memmap(path / "crc.u32", dtype=np.uint32, mode="r+", shape=(blocks,))
        self.filled = np.memmap(path / "filled.u8", dtype=np.uint8, mode="r+", shape=(blocks,))
        self._verified = np.zeros(blocks, dtype=bool)  # blocks whose crc this process has checked

    # -- creation and validation
    @staticmethod
    def _files(tokens: int, blocks: int, k: int) -> dict[str, int]:
        return {
            "indices.i32": tokens * k * 4,
            "logprobs.f32": tokens * k * 4,
            "tail.f32": tokens * 4,
            "crc.u32": blocks * 4,
            "filled.u8": blocks,
        }

    @classmethod
    def open(cls, root: str | Path, components: dict[str, Any], block_lengths: Sequence[int]) -> TeacherLogitCache:
        lengths = np.asarray(block_lengths, dtype=np.int64)
        if lengths.size == 0 or lengths.min() < 1:
            raise ValueError("a teacher cache needs at least one block and no empty blocks")
        root = Path(root)
        path = root / cache_key(components)
        expected = {
            "format": FORMAT_VERSION,
            "components": components,
            "k": int(components["k"]),
            "num_blocks": int(lengths.size),
            "num_tokens": int(lengths.sum()),
            "lengths_sha256": _sha(lengths.tobytes()),
        }
        if path.exists():
            try:
                return cls._load(path, expected, lengths)
            except TeacherCacheError as e:
                log.warning("teacher cache %s is unusable (%s); rebuilding it", path, e)
                shutil.rmtree(path, ignore_errors=True)
        cls._create(root, path, expected)
        return cls._load(path, expected, lengths)

    @classmethod
    def _create(cls, root: Path, path: Path, meta: dict[str, Any]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            for name, size in cls._files(meta["num_tokens"], meta["num_blocks"], meta["k"]).items():
                with open(tmp / name, "wb") as f:
                    f.truncate(size)  # sparse: zero pages cost nothing until written
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            try:
                os.rename(tmp, path)  # atomic; fails if another process created the entry meanwhile
            except OSError:
                if not (path / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def _load(cls, path: Path, expected: dict[str, Any], lengths: np.ndarray) -> TeacherLogitCache:
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise TeacherCacheError(f"meta.json unreadable: {e}") from e
        if meta != json.loads(json.dumps(expected)):
            raise TeacherCacheError("meta.json does not match this run's teacher and data")
        for name, size in cls._files(meta["num_tokens"], meta["num_blocks"], meta["k"]).items():
            try:
                actual = (path / name).stat().st_size
            except OSError as e:
                raise TeacherCacheError(f"{name} missing") from e
            if actual != size:
                raise TeacherCacheError(f"{name} has {actual} bytes, expected {size}")
        try:
            return cls(path, meta, lengths)
        except (OSError, ValueError) as e:
            raise TeacherCacheError(str(e)) from e

    # -- blocks
    @property
    def num_blocks(self) -> int:
        return len(self.lengths)

    def _slices(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        o, e = self.offsets[b], self.offsets[b + 1]
        return self.indices[o:e], self.logprobs[o:e], self.tail[o:e]

    def _crc(self, b: int) -> int:
        c = 0
        for a in self._slices(b):
            c = zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"), c)
        return c

    def is_filled(self, b: int) -> bool:
        """Marked filled and (checked once per process) its crc matches; a mismatch unmarks it."""
        if not self.filled[b]:
            return False
        if not self._verified[b]:
            if self._crc(b) != int(self.crc[b]):
                log.warning("teacher cache %s: block %d fails its checksum; recomputing it", self.path, b)
                self.filled[b] = 0
                return False
            self._verified[b] = True
        return True

    def missing(self, block_ids: Sequence[int]) -> list[int]:
        """The distinct blocks among `block_ids` that are not (validly) cached, in first-seen order."""
        out: list[int] = []
        for b in dict.fromkeys(int(i) for i in block_ids):
            if not self.is_filled(b):
                out.append(b)
        return out

    @property
    def num_filled(self) -> int:
        return int(np.count_nonzero(self.filled))

    def write(self, block_ids: Sequence[int], targets: TeacherTargets) -> None:
        """Store top-k targets for the tokens of `block_ids` (concatenated in that order), flush them,
        then mark the blocks filled."""
        idx = targets.indices.detach().to("cpu", torch.int32).numpy()
        lp = targets.logprobs.detach().to("cpu", torch.float32).numpy()
        tail = targets.tail.detach().to("cpu", torch.float32).numpy()
        if idx.shape[1] != self.k:
            raise ValueError(f"targets have k={idx.shape[1]}, the cache stores k={self.k}")
        row = 0
        spans = []
        for b in block_ids:
            o, e = int(self.offsets[b]), int(self.offsets[b + 1])
            n = e - o
            self.indices[o:e] = idx[row : row + n]
            self.logprobs[o:e] = lp[row : row + n]
            self.tail[o:e] = tail[row : row + n]
            row += n
            spans.append((o, e))
        if row != idx.shape[0]:
            raise ValueError(f"targets hold {idx.shape[0]} tokens, the blocks {row}")
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
        kb = self.k * 4
        _flush(self.indices, lo * kb, hi * kb)
        _flush(self.logprobs, lo * kb, hi * kb)
        _flush(self.tail, lo * 4, hi * 4)
        for b in block_ids:
            self.crc[b] = self._crc(b)
        self.crc.flush()
        for b in block_ids:
            self.filled[b] = 1
            self._verified[b] = True
        self.filled.flush()

    def read(self, block_ids: Sequence[int], pin: bool = False) -> TeacherTargets:
        """Targets for the tokens of `block_ids`, concatenated in order (blocks must be filled).

        pin: build them in page-locked host memory, so that the copy to a GPU can be non_blocking."""
        parts = [self._slices(int(b)) for b in block_ids]
        n = sum(len(p[2]) for p in parts)
        idx = torch.empty((n, self.k), dtype=torch.long, pin_memory=pin)
        lp = torch.empty((n, self.k), dtype=torch.float32, pin_memory=pin)
        tail = torch.empty((n,), dtype=torch.float32, pin_memory=pin)
        row = 0
        for ids_part, lp_part, tail_part in parts:
            m = len(tail_part)
            idx[row : row + m] = torch.from_numpy(np.asarray(ids_part))
            lp[row : row + m] = torch.from_numpy(np.asarray(lp_part))
            tail[row : row + m] = torch.from_numpy(np.asarray(tail_part))
            row += m
        return TeacherTargets(lp, idx, tail)


# ---- the training loop's view --------------------------------------------------------------------


class CachedTeacherTargets:
    """The teacher's side of the loss, served from a `TeacherLogitCache` and filled on demand.

    `source(ids, mask, block_ids)` -> `TeacherTargets` (top-k with tail) for the real tokens of a
    right-padded batch whose row r is block `block_ids[r]`; the teacher runs only on the rows whose
    blocks are not cached yet. `source.logits(ids, mask)` stands in for `Teacher.logits` in evaluation:
    it finds each row's block by its tokens and returns logits whose softmax is the cached top-k with
    the tail mass spread evenly over the other words (the teacher runs for rows not in the cache).
    """

    def __init__(
        self,
        teacher: Teacher,
        cache: TeacherLogitCache,
        blocks: Sequence[Sequence[int]],
        temperature: float,
        chunk: int = 256,
    ) -> None:
        self.teacher = teacher
        self.cache = cache
        self.blocks = blocks
        self.temperature = float(temperature)
        self.chunk = chunk
        self.pin = False  # targets in pinned host memory (set when the student trains on CUDA)
        self.hits = 0  # blocks served from the cache
        self.misses = 0  # blocks the teacher computed
        self._by_content: dict[bytes, int] | None = None

    def _compute(self, ids: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> TeacherTargets:
        """Run the teacher on `rows` of the batch; top-k targets of their real tokens, in order."""
        sub_ids, sub_mask = ids[rows], mask[rows]
        with torch.inference_mode():
            logits = self.teacher.logits(sub_ids, sub_mask)
            flat = logits.reshape(-1, logits.shape[-1])
            real = sub_mask.reshape(-1).bool().to(flat.device).nonzero().squeeze(1)
            parts = []
            for i in range(0, real.numel(), self.chunk):
                x = flat[real[i : i + self.chunk]].float()
                if self.temperature != 1.0:
                    x.div_(self.temperature)
                parts.append(topk_targets(torch.log_softmax(x, dim=-1), self.cache.k, chunk=self.chunk))
        return TeacherTargets(
            torch.cat([p.logprobs for p in parts]).cpu(),
            torch.cat([p.indices for p in parts]).cpu(),
            torch.cat([p.tail for p in parts]).cpu(),
        )

    def fill(self, ids: torch.Tensor, mask: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Make sure every block of the batch is cached (teacher on the missing ones only)."""
        missing = set(self.cache.missing(block_ids))
        self.hits += len(set(int(b) for b in block_ids) - missing)
        if not missing:
            return
        rows, seen = [], set()
        for r, b in enumerate(block_ids):
            if int(b) in missing and int(b) not in seen:
                rows.append(r)
                seen.add(int(b))
        lengths = mask[rows].sum(1).tolist()
        for r, n in zip(rows, lengths):
            if n != self.cache.lengths[int(block_ids[r])]:
                raise ValueError(
                    f"row {r} has {n} real tokens but block {block_ids[r]} has "
                    f"{self.cache.lengths[int(block_ids[r])]}: batch and blocks disagree"
                )
        targets = self._compute(ids, mask, rows)
        self.cache.write([int(block_ids[r]) for r in rows], targets)
        self.misses += len(rows)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, block_ids: Sequence[int]) -> TeacherTargets:
        self.fill(ids, mask, block_ids)
        return self.cache.read(block_ids, pin=self.pin)

    # -- evaluation
    def _block_of(self, row: torch.Tensor) -> int | None:
        if self._by_content is None:
            self._by_content = {}
            for i, b in enumerate(self.blocks):
                self._by_content.setdefault(np.asarray(b, dtype=np.int64).tobytes(), i)
        return self._by_content.get(row.to(torch.int64).numpy().tobytes())

    @torch.inference_mode()
    def eval_logprob_rows(self, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Evaluation's view of a batch: fn(flat positions [c] into [B * S]) -> log-probabilities
        [c, V] fp32 on the CPU, built a chunk at a time (no dense [B, S, V] tensor).

        Rows of cached blocks: the cached top-k with the tail mass spread evenly over the other words
        (padding positions of those rows: uniform). Rows not in the cache: the live teacher's
        log-softmax at the distillation temperature (its logits [U, S, V] stay in its dtype)."""
        ids, mask = ids.cpu(), mask.cpu()
        s, v, k = ids.shape[1], self.teacher.vocab_size, self.cache.k
        lens = mask.sum(1).tolist()
        found = [self._block_of(ids[r, : int(n)]) for r, n in enumerate(lens)]
        known = [r for r, b in enumerate(found) if b is not None]
        unknown = [r for r, b in enumerate(found) if b is None]
        start = torch.full((len(lens),), -1, dtype=torch.long)  # row -> first entry of its tokens in t
        live_row = torch.full((len(lens),), -1, dtype=torch.long)  # row -> row of the live logits
        t = self(ids[known], mask[known], [found[r] for r in known]) if known else None
        offset = 0
        for r in known:
            start[r], offset = offset, offset + int(lens[r])
        live = self.teacher.logits(ids[unknown], mask[unknown]) if unknown else None
        live_row[unknown] = torch.arange(len(unknown))
        length = torch.tensor([int(n) for n in lens], dtype=torch.long)
        spread_shift = math.log(v - k) if v > k else 0.0

        def rows(pos: torch.Tensor) -> torch.Tensor:
            pos = pos.cpu()
            r, p = pos // s, pos % s
            out = torch.full((pos.numel(), v), -math.log(v), dtype=torch.float32)
            cached_rows = ((start[r] >= 0) & (p < length[r])).nonzero().squeeze(1)
            if cached_rows.numel():
                e = start[r[cached_rows]] + p[cached_rows]
                dense = (t.tail[e] - spread_shift)[:, None].expand(-1, v).clone()
                out[cached_rows] = dense.scatter_(1, t.indices[e], t.logprobs[e])
            live_rows = (live_row[r] >= 0).nonzero().squeeze(1)
            if live_rows.numel():
                lr, lp = live_row[r[live_rows]].to(live.device), p[live_rows].to(live.device)
                x = live[lr, lp].float() / self.temperature
                out[live_rows] = torch.log_softmax(x, dim=-1).cpu()
            return out

        return rows

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, S, V] fp32 whose log_softmax is the cached targets (tail spread evenly); dense,
        so evaluation uses `eval_logprob_rows` instead."""
        b, s = ids.shape
        return self.eval_logprob_rows(ids, mask)(torch.arange(b * s)).view(b, s, -1)

    @property
    def vocab_size(self) -> int:
        return self.teacher.vocab_size

    def summary(self) -> dict[str, Any]:
        """For the run's metadata (and logged): where the cache is and what this run took from it."""
        log.info("%s", self.describe())
        return {
            "path": str(self.cache.path),
            "k": self.cache.k,
            "blocks_filled": self.cache.num_filled,
            "num_blocks": self.cache.num_blocks,
            "blocks_read": self.hits,
            "blocks_computed": self.misses,
            "teacher_model_loaded": self.teacher.model is not None,
        }

    def describe(self) -> str:
        c = self.cache
        return (
            f"teacher cache {c.path}: k={c.k}, {c.num_filled}/{c.num_blocks} blocks filled; this run "
            f"{self.hits} block reads from the cache, {self.misses} blocks computed by the teacher"
        )


def open_for_training(
    cfg: Any,
    teacher: Teacher,
    blocks: Sequence[Sequence[int]],
    device: torch.device | str = "cpu",
    temperature: float | None = None,
) -> CachedTeacherTargets:
    """The cache entry for this run (`cfg.teacher_cache`, `cfg.teacher_cache_topk`; `blocks` = training
    blocks followed by held-out blocks), opened or created, wrapped for the training loop. Its targets
    are at `temperature` (default: the distillation temperature, `cfg.temperature`)."""
    temperature = float(cfg.temperature if temperature is None else temperature)
    from .teacher import resolve_dtype

    root = Path(cfg.teacher_cache).expanduser()
    if root.exists() and not root.is_dir():
        raise TeacherCacheError(f"--teacher-cache {root} is a file; pass a folder path")
    if teacher.model is not None:
        dtype = next((p.dtype for p in teacher.model.parameters() if p.is_floating_point()), torch.float32)
    else:
        tdev = torch.device(getattr(cfg, "teacher_device", None) or device)
        dtype = resolve_dtype(getattr(cfg, "teacher_dtype", "auto"), tdev)
    components = cache_components(
        teacher_name=str(cfg.teacher_model),
        teacher_fingerprint=teacher_fingerprint(cfg.teacher_model, None, memo_dir=root),
        revision=None,
        teacher_dtype=str(dtype).replace("torch.", ""),
        tokenizer=teacher.tokenizer,
        vocab_size=teacher.vocab_size,
        dataset=str(cfg.dataset_path or cfg.dataset),
        blocks=blocks,
        max_length=cfg.max_length,
        pack=cfg.pack,
        temperature=temperature,
        k=int(cfg.teacher_cache_topk),
        extra={"quantization": str(getattr(cfg, "teacher_quantization", "none"))},
    )
    cache = TeacherLogitCache.open(root, components, [len(b) for b in blocks])
    log.info("teacher cache %s: k=%d, %d/%d blocks filled", cache.path, cache.k, cache.num_filled, cache.num_blocks)
    cached = CachedTeacherTargets(teacher, cache, blocks, temperature, chunk=min(256, cfg.loss_chunk_tokens))
    cached.pin = torch.device(device).type == "cuda"
    return cached


def open_for_evaluation(
    cfg: Any,
    teacher: Teacher,
    blocks: Sequence[Sequence[int]],
    training: CachedTeacherTargets,
    device: torch.device | str = "cpu",
) -> CachedTeacherTargets:
    """Evaluation's teacher: the teacher at temperature 1, as without a cache (perplexity, KL and agreement
    are measured at T=1, whatever the distillation temperature). At --temperature 1 that is the training
    entry itself; otherwise a second entry keyed at T=1, which holds only the blocks evaluation asks for
    (its files are sparse). Both serve the top-k with the tail mass spread evenly over the other words:
    exact for agreement, and for perplexity and KL when k covers the vocabulary (`eval_targets_note`)."""
    if float(cfg.temperature) == 1.0:
        return training
    return open_for_training(cfg, teacher, blocks, device, temperature=1.0)


def eval_targets_note(k: int, vocab_size: int) -> str:
    """What evaluation with the cache measured against, for the metadata and the report."""
    if k >= vocab_size:
        return "teacher logit cache at T=1, whole distribution (exact)"
    return (
        f"teacher logit cache at T=1, top-{k} of {vocab_size} words with the tail mass spread evenly over "
        "the rest: agreement exact, teacher perplexity and KL approximate"
    )
