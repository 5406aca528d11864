"""Teacher replies for sequence-level distillation (Kim & Rush, 2016): the student learns to answer.

`--teacher-responses` makes the teacher write a reply to every training and held-out prompt with
batched Hugging Face `generate`: through the tokenizer's chat template when it has one (a user turn,
then the assistant header), as a plain continuation otherwise. The student then distils over
prompt + reply (+ the teacher's end-of-turn token), so it learns to reply and to stop.

Replies are cached on disk (`ResponseCache`): one JSON-lines file per (teacher weights, tokenizer,
chat template, prompts, generation settings), one line per finished batch, so an interrupted fill
continues where it stopped, and later runs, `--resume` and `--teacher-cache` runs reuse it without
loading the teacher's weights. Sampled replies are reproducible: batch b is generated under the
seed `seed + b` (in a forked RNG: the caller's random state is untouched).

`student_continuations` decodes a batch of prompts with the student itself (greedy for evaluation,
sampled for on-policy batches).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cli_common import progress_bar

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# SNNLLMBackend's defaults for a student trained on replies (metadata `prompt_format`): never an empty
# or blank reply, and a mild repetition penalty (CTRL's 1.2) against greedy loops of a small student.
GENERATION_DEFAULTS = {"min_tokens": 1, "repetition_penalty": 1.2}


class ResponseError(ValueError):
    """Replies cannot be produced as asked; the message says what to change."""


# ---- settings --------------------------------------------------------------------------------


@dataclass
class ResponseSettings:
    """How the teacher writes its replies (every field is part of the cache key).

    `sample=False` is greedy decoding (temperature/top_p unused); `seed` makes sampled replies
    reproducible; `chat_template=False` forces plain continuation even when the tokenizer has one.
    """

    max_new_tokens: int = 48
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int = 0
    chat_template: bool = True
    batch_size: int = 16

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.max_new_tokens <= 4096, f"--response-max-new-tokens must be 1..4096, got {self.max_new_tokens}"),
            (self.temperature > 0, f"--response-temperature must be positive, got {self.temperature}"),
            (0 < self.top_p <= 1, f"--response-top-p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition penalty must be > 0 (1 = none), got {self.repetition_penalty}"),
            (self.batch_size >= 1, f"reply batch size must be positive, got {self.batch_size}"),
        ]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def key_dict(self) -> dict[str, Any]:
        """The settings that decide the replies (sampling knobs only when sampling)."""
        d = asdict(self)
        if not self.sample:
            d.pop("temperature")
            d.pop("top_p")
            d.pop("seed")
        return d


@dataclass
class Reply:
    """The teacher's reply to one prompt: token ids without the stop token, the stop token (None when
    the reply ran into max_new_tokens) and the decoded text."""

    ids: list[int]
    stop: int | None
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids, "stop": self.stop, "text": self.text}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Reply:
        return cls([int(i) for i in d["ids"]], None if d.get("stop") is None else int(d["stop"]), str(d["text"]))


# ---- prompt formatting -------------------------------------------------------------------------


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (a Jinja string), or None when it has none."""
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):  # several named templates: the default one
        tmpl = tmpl.get("default")
    return tmpl if isinstance(tmpl, str) and tmpl.strip() else None


def format_prompt(tokenizer: Any, prompt: str, chat_template: str | None) -> str:
    """`prompt` as one user turn followed by the assistant header; unchanged without a template."""
    if chat_template is None:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )


def prompt_token_ids(tokenizer: Any, prompts: Sequence[str], chat_template: str | None) -> list[list[int]]:
    """Token ids of each prompt as the teacher sees it: the chat-formatted text (its special tokens
    come from the template), or the plain prompt with the tokenizer's own special tokens."""
    if not prompts:
        return []
    if chat_template is None:
        enc = tokenizer(list(prompts), add_special_tokens=True, return_attention_mask=False)
    else:
        texts = [format_prompt(tokenizer, p, chat_template) for p in prompts]
        enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
    return [list(map(int, ids)) for ids in enc["input_ids"]]


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Ids that end a reply: the generation config's EOS id(s) and the tokenizer's EOS."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None) if model is not None else None
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for i in src if isinstance(src, (list, tuple)) else [src]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


# ---- the cache ---------------------------------------------------------------------------------


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def cache_components(
    *,
    teacher_name: str,
    teacher_fingerprint: str,
    teacher_dtype: str,
    tokenizer_fingerprint: str,
    chat_template: str | None,
    prompts: Sequence[str],
    settings: ResponseSettings,
) -> dict[str, Any]:
    """Everything that decides the replies, as a JSON-able dict (hashed into the file name)."""
    return {
        "format": FORMAT_VERSION,
        "teacher": {"name": teacher_name, "fingerprint": teacher_fingerprint, "dtype": teacher_dtype},
        "tokenizer": tokenizer_fingerprint,
        "chat_template": None if chat_template is None else _sha(chat_template),
        "prompts": _sha(list(prompts)),
        "num_prompts": len(prompts),
        "settings": settings.key_dict(),
    }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`.lock (data-parallel ranks fill one file once; POSIX only)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no concurrent fills there
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ResponseCache:
    """Replies on disk: DIR/<key>.jsonl, a header line with the key components, then one line per
    finished batch `{"batch": b, "replies": [...]}`. A torn last line (a crash mid-write) is dropped;
    a file whose header does not match is replaced."""

    def __init__(self, root: str | Path, components: dict[str, Any]) -> None:
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise ResponseError(f"reply cache {self.root} is a file; pass a folder path")
        self.components = components
        self.path = self.root / f"{_sha(components)[:24]}.jsonl"
        self.batches: dict[int, list[Reply]] = {}

    def load(self) -> int:
        """Read the finished batches; returns how many. Truncates a torn tail, drops a foreign file."""
        self.batches = {}
        if not self.path.is_file():
            return 0
        good_end, lines = 0, self.path.read_bytes().split(b"\n")
        for n, raw in enumerate(lines[:-1]):  # the last piece has no newline: torn or empty
            try:
                row = json.loads(raw)
            except ValueError:
                break
            if n == 0:
                if row.get("components") != self.components:
                    log.warning("reply cache %s does not match this run; rebuilding it", self.path)
                    self.path.unlink()
                    return 0
            else:
                self.batches[int(row["batch"])] = [Reply.from_json(r) for r in row["replies"]]
            good_end += len(raw) + 1
        if good_end != self.path.stat().st_size:
            os.truncate(self.path, good_end)
        return len(self.batches)

    def append(self, batch: int, replies: list[Reply]) -> None:
        """Add one finished batch (flushed to disk before returning)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lines = []
        if not self.path.is_file():
            lines.append(json.dumps({"components": self.components}, sort_keys=True, ensure_ascii=False))
        lines.append(json.dumps({"batch": batch, "replies": [r.to_json() for r in replies]}, ensure_ascii=False))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.batches[batch] = replies


# ---- generation --------------------------------------------------------------------------------


@torch.inference_mode()
def generate_batch(
    model: Any, tokenizer: Any, prompts: list[list[int]], settings: ResponseSettings, seed: int
) -> list[Reply]:
    """Replies to `prompts` (token ids) with one left-padded `model.generate` call."""
    dev = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    kw: dict[str, Any] = {"do_sample": settings.sample, "repetition_penalty": settings.repetition_penalty}
    if settings.sample:
        kw.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:  # the model's generation_config may ask for sampling: greedy means greedy here
        kw.update(temperature=None, top_p=None, top_k=None)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=stops or None,
            pad_token_id=pad,
            **kw,
        )
    replies = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        body = row if cut is None else row[:cut]
        replies.append(Reply(body, None if cut is None else row[cut], tokenizer.decode(body, skip_special_tokens=True)))
    return replies


def fill_replies(
    cache: ResponseCache,
    prompt_ids: list[list[int]],
    teacher: Any,
    settings: ResponseSettings,
    progress: bool = True,
) -> list[Reply]:
    """One reply per prompt: cached batches are read, missing ones generated (teacher loaded only
    then) and appended to the cache as each finishes."""
    bs = settings.batch_size
    n_batches = (len(prompt_ids) + bs - 1) // bs
    with _locked(cache.path):
        done = cache.load()
        missing = [b for b in range(n_batches) if b not in cache.batches]
        if missing:
            log.info(
                "teacher replies: %d of %d prompts cached in %s; generating the other %d (max %d new tokens)",
                sum(len(cache.batches[b]) for b in cache.batches),
                len(prompt_ids),
                cache.path,
                sum(len(prompt_ids[b * bs : (b + 1) * bs]) for b in missing),
                settings.max_new_tokens,
            )
            model = teacher.ensure_model()
            bar = progress_bar(len(prompt_ids), "teacher replies", "prompt", progress, min(done * bs, len(prompt_ids)))
            try:
                for b in missing:
                    chunk = prompt_ids[b * bs : (b + 1) * bs]
                    cache.append(b, generate_batch(model, teacher.tokenizer, chunk, settings, settings.seed + b))
                    bar.update(len(chunk))
            finally:
                bar.close()
        else:
            log.info("teacher replies: all %d read from %s", len(prompt_ids), cache.path)
    replies = [r for b in range(n_batches) for r in cache.batches[b]]
    if len(replies) != len(prompt_ids):
        raise ResponseError(f"reply cache {cache.path} is inconsistent; delete it and run again")
    return replies


@dataclass
class ReplySet:
    """Prompts with their token ids and the teacher's replies, in the same order."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    replies: list[Reply]
    chat_template: str | None = None
    cache_path: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def teacher_replies(
    teacher: Any,
    prompts: Sequence[str],
    settings: ResponseSettings,
    cache_dir: str | Path,
    teacher_dtype: str,
    progress: bool = True,
) -> ReplySet:
    """The teacher's replies to `prompts`, from the cache in `cache_dir` or generated into it."""
    from .teacher_cache import teacher_fingerprint, tokenizer_fingerprint

    tok = teacher.tokenizer
    template = chat_template_of(tok) if settings.chat_template else None
    ids = prompt_token_ids(tok, prompts, template)
    comps = cache_components(
        teacher_name=str(teacher.name),
        teacher_fingerprint=teacher_fingerprint(str(teacher.name), None, memo_dir=Path(cache_dir)),
        teacher_dtype=teacher_dtype,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        chat_template=template,
        prompts=list(prompts),
        settings=settings,
    )
    cache = ResponseCache(cache_dir, comps)
    replies = fill_replies(cache, ids, teacher, settings, progress)
    lengths = [len(r.ids) for r in replies]
    stats = {
        "prompts": len(replies),
        "mean_reply_tokens": sum(lengths) / max(len(lengths), 1),
        "empty_replies": sum(not r.text.strip() for r in replies),
        "hit_max_new_tokens": sum(r.stop is None for r in replies),
    }
    return ReplySet(list(prompts), ids, replies, template, str(cache.path), stats)


# ---- the student's own continuations -----------------------------------------------------------


@dataclass
class Continuation:
    """Tokens the student produced after a prompt (stop token excluded) and the stop token or None."""

    ids: list[int]
    stop: int | None


@torch.inference_mode()
def student_continuations(
    student: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
    device: torch.device | str = "cpu",
) -> list[Continuation]:
    """Decode every prompt with the student's KV cache (`forward_step`), prompts of equal length as
    one batch. temperature 0: greedy; otherwise sampled with `generator`. Ids >= `vocab_limit` (logit
    rows the tokenizer cannot decode) are never picked."""
    was_training = student.training
    student.eval()
    stops = {int(s) for s in stop_ids}
    out: list[Continuation | None] = [None] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    try:
        for rows in groups.values():
            x = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)
            logits, past = student.forward_step(x, None)
            gen: list[list[int]] = [[] for _ in rows]
            stop: list[int | None] = [None] * len(rows)
            live = set(range(len(rows)))
            for step in range(max_new_tokens):
                z = logits[:, -1].float()
                if vocab_limit is not None and vocab_limit < z.shape[-1]:
                    z[:, vocab_limit:] = float("-inf")
                if temperature > 0:
                    probs = torch.softmax(z / temperature, dim=-1)
                    tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                else:
                    tok = z.argmax(-1)
                for j, t in enumerate(tok.tolist()):
                    if j in live:
                        if t in stops:
                            stop[j] = t
                            live.discard(j)
                        else:
                            gen[j].append(t)
                if not live or step + 1 == max_new_tokens:
                    break
                logits, past = student.forward_step(tok[:, None], past)
            for j, i in enumerate(rows):
                out[i] = Continuation(gen[j], stop[j])
    finally:
        student.train(was_training)
    return [c for c in out if c is not None]


# ---- what the training loop uses ---------------------------------------------------------------


def settings_from_config(cfg: Any) -> ResponseSettings:
    """The reply settings of a `TrainConfig` (--response-* flags; the seed defaults to --seed)."""
    return ResponseSettings(
        max_new_tokens=cfg.response_max_new_tokens,
        sample=cfg.response_sample,
        temperature=cfg.response_temperature,
        top_p=cfg.response_top_p,
        seed=cfg.seed if cfg.response_seed is None else cfg.response_seed,
    )


def cache_dir_from_config(cfg: Any) -> Path:
    """--response-cache, else TEACHER_CACHE/responses (one folder for both caches), else
    $SNN_DISTILL_CACHE/responses."""
    from .teacher import cache_root

    if cfg.response_cache:
        return Path(cfg.response_cache).expanduser()
    if cfg.teacher_cache:
        return Path(cfg.teacher_cache).expanduser() / "responses"
    return cache_root() / "responses"


@dataclass
class ReplyData:
    """Prompt + reply examples for training and held-out evaluation (`data.reply_blocks`)."""

    train_blocks: list[list[int]]
    train_starts: list[int]
    held_blocks: list[list[int]]
    held_starts: list[int]
    held: ReplySet
    chat_template: str | None
    stop_ids: list[int]  # ends a student's reply in evaluation and on-policy sampling
    summary: dict[str, Any]


def reply_data(
    cfg: Any,
    teacher: Any,
    train_texts: Sequence[str],
    held_texts: Sequence[str],
    teacher_dtype: str,
    progress: bool = True,
) -> ReplyData:
    """The teacher's replies to every training and held-out prompt (one cache file, one progress bar),
    turned into prompt + reply blocks of at most `cfg.max_length` tokens. Held-out prompts beyond what
    evaluation reads (64, or eval_batches x batch_size) get no reply."""
    from .data import reply_blocks

    held_texts = list(held_texts)[: max(64, cfg.eval_batches * cfg.batch_size)]
    settings = settings_from_config(cfg)
    rs = teacher_replies(
        teacher, [*train_texts, *held_texts], settings, cache_dir_from_config(cfg), teacher_dtype, progress
    )
    blocks, starts = reply_blocks(rs.prompt_ids, [(r.ids, r.stop) for r in rs.replies], cfg.max_length)
    n = len(train_texts)
    held = ReplySet(rs.prompts[n:], rs.prompt_ids[n:], rs.replies[n:], rs.chat_template, rs.cache_path)
    summary = {
        **rs.stats,
        "cache": rs.cache_path,
        "chat_template": rs.chat_template is not None,
        "settings": settings.key_dict(),
    }
    log.info(
        "teacher replies: %d prompts, %.1f tokens on average, %d empty, %d cut at %d new tokens (%s)",
        rs.stats["prompts"],
        rs.stats["mean_reply_tokens"],
        rs.stats["empty_replies"],
        rs.stats["hit_max_new_tokens"],
        settings.max_new_tokens,
        "chat template" if rs.chat_template else "plain continuation",
    )
    # the tokenizer's EOS and the stop tokens the teacher used: the same whether its weights are loaded or not
    used = sorted({r.stop for r in rs.replies if r.stop is not None})
    stops = list(dict.fromkeys([*stop_token_ids(teacher.tokenizer), *used]))
    return ReplyData(blocks[:n], starts[:n], blocks[n:], starts[n:], held, rs.chat_template, stops, summary)


def on_policy_blocks(
    student: Any,
    blocks: Sequence[Sequence[int]],
    reply_starts: Sequence[int],
    max_new_tokens: int,
    max_length: int,
    stop_ids: Sequence[int],
    generator: torch.Generator,
    vocab_limit: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[list[int]], list[int]]:
    """On-policy examples (GKD, Agarwal et al. 2024): each block's prompt followed by a reply the
    student samples itself (temperature 1), cut at `max_length`. The teacher's distribution on these
    tokens is then the target. Returns (blocks, reply_starts)."""
    prompts = [list(b[: max(1, s)]) for b, s in zip(blocks, reply_starts)]
    conts = student_continuations(
        student,
        prompts,
        max_new_tokens,
        stop_ids,
        temperature=1.0,
        generator=generator,
        vocab_limit=vocab_limit,
        device=device,
    )
    out = [[*p, *c.ids, *([] if c.stop is None else [c.stop])][:max_length] for p, c in zip(prompts, conts)]
    return out, [min(len(p), max_length) for p in prompts]
