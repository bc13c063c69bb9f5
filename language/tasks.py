"""Training tasks ``causal_lm`` and ``masked_lm`` for the mmoe engine (`mmoe.train.Trainer`).

A config selects one with ``task: causal_lm`` (or ``masked_lm``); its ``model:`` section is
`LMModelConfig`: every `language.models.LMConfig` field plus ``tokenizer`` (a ``.model`` file written by
`language.tokenizer.train_tokenizer`), ``seq_len`` and a few data options. ``vocab_size: 0`` (default)
takes the tokenizer's size (plus one id for ``<mask>`` in the masked LM when the tokenizer has no such
piece); ``max_seq_len: 0`` means ``seq_len``. See ``configs/lm_tiny.yaml``.

Data: one shard sample = one document
-------------------------------------
The shards are those ``mmoe shards text`` writes (`mmoe.data.TextSource`): ``txt`` = one document,
``json = {"lang": ...}``. The engine reads them with `mmoe.data.ShardLoader(decode=task.decode,
collate=task.collate)` and groups ``data.batch_size`` decoded samples per batch, while a language model
wants fixed-length rows packed from a *stream* of documents. The design used here:

* `decode` tokenizes one document: ``(token_ids, lang, seed)`` (``seed`` = the sample's ``__seed__``);
* `collate` packs the documents of one loader batch with `language.data.pack_documents` into rows of
  ``seq_len`` tokens (``[bos] doc [eos]``, documents split across rows where a row ends) and stacks them:
  ``input_ids``, ``labels``, ``positions``, ``doc_ids`` and per-token ``lang_ids`` (index into
  ``task.languages``; -1 for padding or a language not in the list), all ``[R, seq_len]``.

So ``data.batch_size`` counts *documents* per micro-batch, and the number of rows R varies from batch to
batch (about ``batch_size * mean tokens per document / seq_len``, rounded up). The loss is the mean over
the batch's target tokens and throughput is counted in tokens, so a varying R is harmless to the engine
(DeepSpeed never looks at tensor shapes). Attention is block-diagonal per document (``doc_ids``) with
positions restarting in every document, so packing changes no logit (tested).

Tradeoffs: the last row of every batch is padded (on average half a row: about
``seq_len / 2 / (batch_size * tokens per doc)`` of the compute, ~3% in ``lm_tiny.yaml``); a
document's continuation in the next row of the same batch does not see its beginning (as in any packing
with document masks); and documents are never carried over to the next batch. In exchange the engine's
exact resume, shuffling, rank/worker splitting and bad-data handling keep working unchanged, because
each batch is a pure function of its documents. A tighter design (rows carried across batches, exactly
``rows_per_batch`` rows) needs a stateful packing stage *between* decoding and batching in the loader,
with the partially filled row in its resume state: an engine change (e.g. a ``Task.transform_stream``
hook given to `ShardLoader`), not made here.

The masked LM masks in `collate` (`language.models.mask_tokens`, 80/10/10, ``mask_prob``) with a generator
seeded from the batch's sample seeds: deterministic, so resume stays exact and every evaluation masks the
validation set the same way.

Metrics
-------
`loss` returns the token-mean cross entropy (labels -100 ignored) and the number of input tokens; the
engine adds `mmoe.aux_loss`. `eval_step` returns sums over the batch, overall and per language:
``nll_sum``, ``tokens``, ``correct`` and ``nll_sum/<lang>``, ``tokens/<lang>`` for *every* language of
``task.languages`` (zeros included, so every rank and batch reports the same keys; the default evaluator,
`mmoe.train.tasks.SumEvaluator`, adds them up over batches and ranks). `eval_metrics` gives ``loss``,
``ppl``, ``acc`` (next-token or masked-token accuracy), ``tokens`` and ``ppl/<lang>`` for each language with
tokens.

``task.languages`` is ``model.languages`` when given, else the training shards' manifest
(``info.languages``), else the tokenizer's training languages; it is saved with the checkpoints.

Routing per language: `routing_by_language(model, batches)` (from `language.models`) counts tokens per
expert and language for every MoE layer; `language_routing` runs it over a shard folder with the task's
own decoding and packing.

``data.train: synthetic`` (tests, benchmarks) works without a tokenizer when ``vocab_size`` is set: two
"languages" of documents whose next token is the current one plus 1 (``syn0``) or plus 3 (``syn1``).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe.train.tasks import Task, TaskContext, register_task

from .data import IGNORE_INDEX, collate_packed, pack_documents
from .models import LMConfig, MoETransformerLM, mask_tokens, routing_by_language  # noqa: F401 (re-export)

# the fixed special ids of `language.tokenizer.train_tokenizer` (used when there is no tokenizer)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SYNTHETIC_LANGUAGES = ["syn0", "syn1"]
_SYNTHETIC_STEPS = (1, 3)


@dataclass
class LMModelConfig(LMConfig):
    """The ``model:`` section of ``causal_lm`` / ``masked_lm``: the `LMConfig` fields (``kind`` is set by
    the task) plus:

    Attributes:
        vocab_size: 0 = from the tokenizer (+1 for ``<mask>`` in the masked LM if the tokenizer lacks it).
        max_seq_len: 0 = ``seq_len``.
        tokenizer: path of the ``.model`` file (`language.tokenizer.train_tokenizer`); may be empty only
            with ``data.train: synthetic`` and ``vocab_size > 0``.
        seq_len: tokens per packed row.
        add_bos: frame each document as ``[bos] doc [eos]`` (else ``doc [eos]``); generation prepends
            ``bos`` to the prompt likewise.
        languages: language tags for per-language metrics (default: from the shards' manifest or the
            tokenizer).
        mask_prob: masked LM: share of tokens selected for prediction (80% ``<mask>``, 10% random, 10% kept).
        mask_token: masked LM: the tokenizer piece used as mask (a user-defined symbol); when the tokenizer
            has none, one extra id after the tokenizer's vocabulary is the mask.
    """

    vocab_size: int = 0
    max_seq_len: int = 0
    tokenizer: str = ""
    seq_len: int = 256
    add_bos: bool = True
    languages: list[str] = field(default_factory=list)
    mask_prob: float = 0.15
    mask_token: str = "<mask>"

    def validate(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len: must be a positive integer (got {self.seq_len!r})")
        if self.vocab_size < 0 or self.max_seq_len < 0:
            raise ValueError("vocab_size and max_seq_len must be >= 0 (0 = from the tokenizer / seq_len)")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob: must be in (0, 1) (got {self.mask_prob!r})")
        self.lm_config(max(self.vocab_size, 1))  # validates every LMConfig field

    def lm_config(self, vocab_size: int, kind: str | None = None) -> LMConfig:
        """The `LMConfig` of the model with the resolved vocabulary size."""
        values = {f.name: getattr(self, f.name) for f in fields(LMConfig)}
        values["vocab_size"] = vocab_size
        values["max_seq_len"] = self.max_seq_len or self.seq_len
        if kind is not None:
            values["kind"] = kind
        return LMConfig(**values)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass
class LMOptions:
    """The ``task_options`` of ``causal_lm`` / ``masked_lm``: the language mixture of the training stream
    (evaluation sees every document). The data options live in the model section.

    Attributes:
        language_ratios: target share of each language (weights >= 0, not all 0; languages of the training
            shards' manifest); the over-represented languages' documents are subsampled.
        language_temperature: XLM-R-style mixture p_l ~ q_l ** T of the data shares q_l, T in [0, 1]
            (0: uniform over languages, 1: the data as it is). Give one of the two at most.
    """

    language_ratios: dict[str, float] | None = None
    language_temperature: float | None = None

    def __post_init__(self) -> None:
        # "field: problem": the config loader reports it at that key's file:line
        if self.language_ratios is not None and self.language_temperature is not None:
            raise ValueError("language_temperature: give language_ratios or language_temperature, not both")
        if self.language_ratios is not None and (any(v < 0 for v in self.language_ratios.values())
                                                 or not any(self.language_ratios.values())):
            raise ValueError(f"language_ratios: a mapping language -> weight >= 0, not all 0 "
                             f"(got {self.language_ratios!r})")
        if self.language_temperature is not None and not 0 <= self.language_temperature <= 1:
            raise ValueError(f"language_temperature: must be in [0, 1] (got {self.language_temperature!r})")


class _LMTask(Task):
    ModelConfig = LMModelConfig
    Options = LMOptions
    unit = "tokens"
    kind = "causal"

    def __init__(self, model_cfg: LMModelConfig, options: LMOptions | None = None) -> None:
        super().__init__(model_cfg, options)
        self.language_ratios: dict[str, float] | None = self.options.language_ratios
        self.language_temperature: float | None = self.options.language_temperature
        self.accept: dict[str, float] | None = None  # training documents kept per language (set in setup)
        self._tok = None
        self.languages: list[str] = list(model_cfg.languages)
        self.run_dir: Path | None = None
        self._lang_index: dict[str, int] = {}

    # ---------------------------------------------------------------- tokenizer and vocabulary
    @property
    def tokenizer(self):
        """The `language.tokenizer.Tokenizer` (loaded on first use); None without ``model.tokenizer``."""
        if self._tok is None and self.model_cfg.tokenizer:
            from .tokenizer import Tokenizer

            path = Path(self.model_cfg.tokenizer)
            try:
                self._tok = Tokenizer(path)
            except FileNotFoundError as err:
                raise ValueError(f"model.tokenizer: {err} (train one with language.tokenizer.train_tokenizer; "
                                 f"see configs/lm_tiny.yaml)") from None
        return self._tok

    def specials(self) -> dict[str, int]:
        """``bos``, ``eos``, ``pad``, ``unk`` ids, ``base_vocab`` (ids an input token may have, without an
        added mask id) and, for the masked LM, ``mask``."""
        tok = self.tokenizer
        cfg = self.model_cfg
        if tok is not None:
            out = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "unk": tok.unk_id,
                   "base_vocab": tok.vocab_size}
            if self.kind == "masked":
                mid = tok.piece_to_id(cfg.mask_token) if cfg.mask_token else tok.unk_id
                out["mask"] = mid if mid != tok.unk_id else tok.vocab_size
            return out
        if cfg.vocab_size <= 0:
            raise ValueError("model.tokenizer is empty: give a tokenizer, or vocab_size > 0 for synthetic data")
        out = {"bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID, "unk": UNK_ID, "base_vocab": cfg.vocab_size}
        if self.kind == "masked":
            out["base_vocab"] = cfg.vocab_size - 1
            out["mask"] = cfg.vocab_size - 1
        return out

    def vocab_size(self) -> int:
        """The model's vocabulary size (``model.vocab_size``, or what the tokenizer needs)."""
        sp = self.specials()
        need = max(sp["base_vocab"], sp.get("mask", -1) + 1)
        given = self.model_cfg.vocab_size
        if given and given < need:
            raise ValueError(f"model.vocab_size={given} is smaller than the {need} ids the tokenizer "
                             f"{self.model_cfg.tokenizer} needs")
        return given or need

    def lm_config(self) -> LMConfig:
        return self.model_cfg.lm_config(self.vocab_size(), kind=self.kind)

    # ---------------------------------------------------------------- engine hooks
    def setup(self, ctx: TaskContext) -> None:
        """Languages from the training shards' manifest (unless ``model.languages``), and an early check that
        the tokenizer loads and fits ``vocab_size``."""
        self.run_dir = ctx.run_dir
        manifest = ctx.train_manifest
        if not self.languages:
            if ctx.train_data == "synthetic":
                self.languages = list(SYNTHETIC_LANGUAGES)
            elif manifest is not None:
                self.languages = [str(x) for x in (manifest.info.get("languages") or [])]
        if not self.languages and self.tokenizer is not None:
            self.languages = sorted((self.tokenizer.info.get("languages") or {}).keys())
        self.vocab_size()
        if self.language_ratios is not None or self.language_temperature is not None:
            self.accept = self._acceptance(ctx)

    def _acceptance(self, ctx: TaskContext) -> dict[str, float]:
        """Share of each language's training documents to keep so that the training stream follows the
        target mixture: ``language_ratios`` (weights) or ``language_temperature`` T (XLM-R: p_l ~ q_l**T
        for the data shares q_l). Keeping ``a_l = (p_l / q_l) / max_l (p_l / q_l)`` of language l's
        documents turns shares q into p (the over-represented languages are subsampled; nothing is
        repeated within an epoch)."""
        from .data import temperature_ratios

        src = ctx.train_data
        if ctx.train_manifest is None:
            raise ValueError(f"language mixing needs the training shards' manifest ({src or 'no data.train'}): "
                             "data.train must be a shard directory or manifest.json that can be read")
        counts = ctx.train_manifest.info.get("docs_per_language") or {}
        if not counts:
            raise ValueError(f"language mixing: {src}'s manifest has no docs_per_language (text shards from "
                             "mmoe shards text have it)")
        total = sum(counts.values())
        q = {lang: n / total for lang, n in counts.items() if n > 0}
        if self.language_ratios is not None:
            unknown = sorted(set(self.language_ratios) - set(q))
            if unknown:
                raise ValueError(f"language_ratios: {unknown} not in the training shards (they have {sorted(q)})")
            w = sum(self.language_ratios.values())
            target = {lang: self.language_ratios.get(lang, 0.0) / w for lang in q}
        else:
            target = temperature_ratios(counts, float(self.language_temperature))
        scale = {lang: target.get(lang, 0.0) / q[lang] for lang in q}
        top = max(scale.values())
        return {lang: v / top for lang, v in scale.items()}

    def build_model(self) -> nn.Module:
        return MoETransformerLM(self.lm_config())

    def state_dict(self) -> dict:
        """Languages and the tokenizer's identity (absolute path, SHA-256). Also, on rank 0, copies the
        tokenizer into the run folder (``RUN/tokenizer.model`` + ``.json``) if it is not there yet, so a run
        folder is self-contained for `language.generate.load_lm`."""
        state: dict[str, Any] = {"languages": list(self.languages), "kind": self.kind,
                                 "vocab_size": self.vocab_size()}
        tok = self.tokenizer
        if tok is not None:
            state["tokenizer"] = {"path": str(Path(tok.path).resolve()), "sha256": _file_sha256(Path(tok.path))}
            if self.run_dir is not None and _rank() == 0:
                try:
                    self._copy_tokenizer(Path(tok.path), self.run_dir)
                except OSError:
                    pass  # a convenience copy; the checkpoint still names the original
        return state

    @staticmethod
    def _copy_tokenizer(src: Path, run_dir: Path) -> None:
        dst = run_dir / "tokenizer.model"
        if dst.is_file() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        for ext in ("json", "model"):  # the model last: its presence means the pair is complete
            s = src.with_suffix(f".{ext}")
            if s.is_file():
                tmp = run_dir / f".tokenizer.{ext}.tmp"
                shutil.copyfile(s, tmp)
                os.replace(tmp, run_dir / f"tokenizer.{ext}")

    def load_state_dict(self, state: dict) -> None:
        if state.get("languages") and not self.model_cfg.languages:
            self.languages = list(state["languages"])

    # ---------------------------------------------------------------- data
    def _index(self) -> dict[str, int]:
        if len(self._lang_index) != len(self.languages):
            self._lang_index = {lang: i for i, lang in enumerate(self.languages)}
        return self._lang_index

    def decode(self, sample: dict):
        """One training document: ``(token_ids, lang, seed)``, or None when the language mixture
        (``task_options.language_ratios`` / ``language_temperature``) leaves it out."""
        return self._decode(sample, mix=True)

    def _decode(self, sample: dict, mix: bool):
        from mmoe.data.decode import decode_json, decode_text

        meta = decode_json(sample) if "json" in sample else None
        lang = meta.get("lang") if isinstance(meta, dict) else None
        if mix and self.accept is not None and not self._kept(lang, sample):
            return None  # left out by the language mixture (collate drops it)
        text = decode_text(sample)
        tok = self.tokenizer
        if tok is None:
            raise ValueError("model.tokenizer is empty: text shards need a tokenizer")
        return tok.encode(text), lang, int(sample.get("__seed__", 0))

    def _kept(self, lang: str | None, sample: dict) -> bool:
        import random

        share = self.accept.get(lang, 1.0) if lang is not None else 1.0
        if share >= 1.0:
            return True
        # a function of the sample's seed (run seed, epoch, position): the same on resume, new each epoch
        return random.Random(int(sample.get("__seed__", 0)) * 2 + 1).random() < share

    def decode_eval(self, sample: dict):
        """Evaluation sees every document (no language mixture)."""
        return self._decode(sample, mix=False)

    def synthetic_example(self, index: int):
        """Deterministic document ``index`` (``data.train: synthetic``): language ``syn{index % 2}``, 16 to 63
        tokens, each the previous one plus 1 (syn0) or 3 (syn1), wrapping inside the ordinary ids."""
        sp = self.specials()
        lo, hi = 4, sp["base_vocab"]
        if hi - lo < 8:
            raise ValueError(f"synthetic data needs vocab_size >= 12, got {self.model_cfg.vocab_size}")
        g = torch.Generator().manual_seed(1_000_003 + int(index))
        lang = int(index) % 2
        length = int(torch.randint(16, 64, (1,), generator=g))
        start = int(torch.randint(0, hi - lo, (1,), generator=g))
        step = _SYNTHETIC_STEPS[lang]
        ids = [lo + (start + step * j) % (hi - lo) for j in range(length)]
        return ids, SYNTHETIC_LANGUAGES[lang], int(index)

    def collate(self, examples: list) -> dict[str, Tensor]:
        """Pack the documents of one loader batch into rows (module docstring)."""
        sp = self.specials()
        cfg = self.model_cfg
        examples = [ex for ex in examples if ex is not None]  # documents left out by the language mixture
        docs = [(ex[0], ex[1]) for ex in examples]
        rows = list(pack_documents(docs, cfg.seq_len, eos_id=sp["eos"], pad_id=sp["pad"],
                                   bos_id=sp["bos"] if cfg.add_bos else None))
        if not rows:  # every document empty: one padding row without targets
            rows = list(pack_documents([([sp["pad"]], None)], cfg.seq_len, eos_id=sp["pad"], pad_id=sp["pad"]))
            rows[0]["labels"].fill_(IGNORE_INDEX)
        index = self._index()
        lang_rows = []
        for row in rows:
            seg = torch.tensor([index.get(lang, -1) if lang is not None else -1 for lang in row["langs"]],
                               dtype=torch.long)
            lang_rows.append(seg[row["doc_ids"]])
        batch = collate_packed([{k: v for k, v in row.items() if k != "langs"} for row in rows])
        batch["lang_ids"] = torch.stack(lang_rows)
        if self.kind == "masked":
            seed = 0
            for ex in examples:
                seed = (seed * 1_000_003 + int(ex[2]) + 1) % (2**63 - 1)
            g = torch.Generator().manual_seed(seed)
            special = {sp["bos"], sp["eos"], sp["pad"], sp["mask"]}
            inputs, labels = mask_tokens(batch["input_ids"], sp["mask"], sp["base_vocab"], special,
                                         prob=cfg.mask_prob, generator=g)
            batch["input_ids"], batch["labels"] = inputs, labels
        return batch

    # ---------------------------------------------------------------- loss / metrics
    def _forward(self, model, batch) -> Tensor:
        return model(batch["input_ids"], positions=batch["positions"], doc_ids=batch["doc_ids"])

    def loss(self, model, batch):
        logits = self._forward(model, batch)
        labels = batch["labels"]
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")
        count = (labels != IGNORE_INDEX).sum()
        loss = nll / count.clamp_min(1)
        n = int((batch["input_ids"] != self.specials()["pad"]).sum())
        return loss, {"ppl": math.exp(min(float(loss.detach()), 50.0))}, n

    @torch.no_grad()
    def eval_step(self, model, batch) -> dict[str, float]:
        logits = self._forward(model, batch)
        labels = batch["labels"].reshape(-1)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels, ignore_index=IGNORE_INDEX,
                              reduction="none")
        valid = labels != IGNORE_INDEX
        correct = (logits.argmax(-1).reshape(-1) == labels) & valid
        out = {"nll_sum": float(nll[valid].sum()), "tokens": float(valid.sum()), "correct": float(correct.sum())}
        langs = batch["lang_ids"].reshape(-1).to(nll.device)
        if self._route_counter is not None:
            self._route_counter.add(langs)
        for i, lang in enumerate(self.languages):
            sel = valid & (langs == i)
            out[f"nll_sum/{lang}"] = float(nll[sel].sum())
            out[f"tokens/{lang}"] = float(sel.sum())
        return out

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums.get("tokens", 0.0)
        loss = sums.get("nll_sum", 0.0) / max(n, 1.0)
        out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "acc": sums.get("correct", 0.0) / max(n, 1.0),
               "tokens": n}
        for lang in self.languages:
            t = sums.get(f"tokens/{lang}", 0.0)
            if t > 0:
                out[f"ppl/{lang}"] = math.exp(min(sums.get(f"nll_sum/{lang}", 0.0) / t, 50.0))
        return out


    # ---------------------------------------------------------------- routing per language during evaluation
    _route_counter = None

    def eval_begin(self, model) -> None:
        """Record every MoE layer's routing during evaluation, to count experts per language
        (`mmoe.RoutingCounter`)."""
        from mmoe.stats import RoutingCounter

        self._route_counter = None
        if self.languages:
            counter = RoutingCounter(model, self.languages)
            if counter.layers:
                self._route_counter = counter.start()

    def eval_end(self, model) -> None:
        """Write ``RUN/routing_by_language.json`` (tokens per expert and language for every MoE layer, this
        rank's share of the evaluation data) and ``RUN/plots/routing_by_language.png``."""
        counter, self._route_counter = self._route_counter, None
        if counter is None:
            return
        counter.stop()
        counts = counter.counts()
        run_dir = getattr(self, "run_dir", None)
        if run_dir is None or _rank() != 0:
            return
        import json

        from .models import plot_routing_by_language

        run_dir.mkdir(parents=True, exist_ok=True)
        data = {name: {lang: c[i].tolist() for i, lang in enumerate(self.languages)} for name, c in counts.items()}
        (run_dir / "routing_by_language.json").write_text(json.dumps(data))
        plot_routing_by_language(counts, self.languages, run_dir / "plots" / "routing_by_language.png")


@register_task("causal_lm")
class CausalLMTask(_LMTask):
    """Decoder-only MoE language model trained by next-token prediction on packed documents."""

    kind = "causal"


@register_task("masked_lm")
class MaskedLMTask(_LMTask):
    """XLM-R style masked language model (bidirectional MoE encoder, 80/10/10 masking)."""

    kind = "masked"


# ------------------------------------------------------------------------------------------------
# routing per language over shards


def language_routing(task: _LMTask, model: nn.Module, shards: str, *, split: str | None = None,
                     batch_size: int = 32, max_batches: int | None = None) -> dict[str, Tensor]:
    """`routing_by_language` over text shards decoded and packed by ``task``:
    ``{layer name: [len(task.languages), E]}`` token-slot counts (rows in ``task.languages`` order)."""
    from mmoe.data import ShardLoader

    loader = ShardLoader(shards, split=split, batch_size=batch_size, decode=task.decode, collate=task.collate,
                         shuffle_buffer=0, epochs=1, drop_last=False)

    def batches() -> Iterable[dict]:
        for i, b in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                return
            yield b

    return routing_by_language(model, batches(), num_languages=len(task.languages))
