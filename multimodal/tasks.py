"""Task ``masked_multimodal``: BEiT-3-style masked data modelling with MoE on image-text pair shards.

A config selects it with ``task: masked_multimodal``; its ``model:`` section is `MultimodalModelConfig`:
every `multimodal.models.MultiwayConfig` field plus the masking ratios, the streams and the loss weights.
See ``configs/beit3_moe_shapes.yaml``.

Data and streams
----------------
The shards are those ``mmoe shards pairs`` (or ``mmoe shards shapes``, a generated data set) writes:
image bytes + ``txt`` caption. BEiT-3 pre-trains on three sources in every step (images, texts, and
image-text pairs, 2048 of each); here one pair shard feeds all three streams of a batch:

* ``pair``: image with 40% of its patches block-masked (BEiT) + its caption with 50% of the tokens masked;
  joint attention over [image tokens ; text tokens];
* ``image``: the same images alone, a fresh 40% block mask;
* ``text``: the same captions alone, 15% masked.

(``model.streams`` picks a subset.) Monomodal views of paired data are a simplification: BEiT-3's
monomodal corpora are far larger than its paired one. Masks are drawn in `collate` from a generator seeded
by the batch's sample seeds, so a resumed run and every evaluation mask the same way.

Targets and losses
------------------
MLM: cross entropy over masked caption tokens (open_clip's BPE vocabulary plus one [MASK] id), pair and
text streams together. MIM: BEiT-3 predicts the discrete codes of the BEiT v2 VQ-KD tokenizer, whose
weights cannot be fetched here; the target is each masked patch's pixels normalised by the patch's mean
and variance (MAE's ``norm_pix_loss``), mean squared error over masked patches. ``itc_weight > 0`` adds
the image-text contrastive loss BEiT-3 uses for retrieval fine-tuning (vision CLS and the text's first
token, projected and L2-normalised, symmetric InfoNCE over the batch).

The model runs several times per batch; the MoE layers accumulate the aux losses of every run and the
engine adds them all (`mmoe.aux_loss`) to the loss.

Metrics
-------
Validation: ``mlm_loss``, ``mlm_acc`` (masked tokens), ``mim_loss``, ``loss`` (the weighted sum),
``i2t_r1`` / ``t2i_r1`` (image->text and text->image retrieval top-1 among the ``eval_batch_size``
candidates of each batch, from the unmasked image-only and text-only forwards), ``split_i2t_r1``,
``split_i2t_r5``, ``split_t2i_r1``, ``split_t2i_r5`` (recall@1/5 among *all* pairs of the validation split,
every rank's: the task's evaluator is a `mmoe.train.tasks.CollectingEvaluator` that keeps every pair's
embeddings; `retrieval_recall`) with ``split_pairs``, and the expert load per modality of every MoE layer,
written to ``RUN/routing_by_modality.json`` and a heatmap PNG.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe.train.tasks import CollectingEvaluator, NoOptions, Task, TaskContext, register_task

from .data import (IMAGE_MASK_RATIO, PAIR_TEXT_MASK_RATIO, TEXT_MASK_RATIO, CaptionTokenizer, block_mask,
                   load_image, mask_caption)
from .models import MultiwayConfig, MultiwayMoETransformer, mim_targets, routing_by_modality

STREAMS = ("pair", "image", "text")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")
IGNORE_INDEX = -100


@dataclass
class MultimodalModelConfig(MultiwayConfig):
    """`MultiwayConfig` (``vocab_size: 0`` = the caption tokenizer's size) plus the pre-training recipe."""

    vocab_size: int = 0
    image_mask_ratio: float = IMAGE_MASK_RATIO
    pair_text_mask_ratio: float = PAIR_TEXT_MASK_RATIO
    text_mask_ratio: float = TEXT_MASK_RATIO
    streams: list[str] = field(default_factory=lambda: list(STREAMS))
    mlm_weight: float = 1.0
    mim_weight: float = 1.0
    itc_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("image_mask_ratio", "pair_text_mask_ratio", "text_mask_ratio"):
            v = getattr(self, name)
            if not 0.0 < float(v) < 1.0:
                raise ValueError(f"model.{name}: must be in (0, 1), got {v!r}")
        for name in ("mlm_weight", "mim_weight", "itc_weight"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"model.{name}: must be >= 0, got {getattr(self, name)!r}")
        unknown = [s for s in self.streams if s not in STREAMS]
        if unknown or not self.streams or len(set(self.streams)) != len(self.streams):
            raise ValueError(f"model.streams: a non-empty list of distinct streams from {list(STREAMS)}, "
                             f"got {self.streams!r}")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size: must be >= 0 (0 = the tokenizer's size), got {self.vocab_size}")
        self.multiway_config(self.vocab_size or 2)  # validates the model fields, naming them

    def multiway_config(self, vocab_size: int) -> MultiwayConfig:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(MultiwayConfig)}
        values["vocab_size"] = self.vocab_size or vocab_size
        return MultiwayConfig(**values)


def _batch_seed(seeds: list) -> int:
    digest = hashlib.sha256(",".join(map(str, seeds)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@register_task("masked_multimodal")
class MaskedMultimodalTask(Task):
    ModelConfig = MultimodalModelConfig
    Options = NoOptions  # no task_options: the recipe (masking ratios, streams, loss weights) is in the model section
    unit = "samples"

    def __init__(self, model_cfg: MultimodalModelConfig, options: NoOptions | None = None) -> None:
        super().__init__(model_cfg, options)
        self.tokenizer = CaptionTokenizer(context_length=model_cfg.max_text_len)
        self.run_dir: Path | None = None
        self._route_counts: dict[str, dict[str, Tensor]] = {}
        self._routing = False

    # ---------------------------------------------------------------- model
    def setup(self, ctx: TaskContext) -> None:
        self.run_dir = ctx.run_dir

    def multiway_config(self) -> MultiwayConfig:
        cfg = self.model_cfg.multiway_config(self.tokenizer.vocab_size)
        if cfg.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size: {cfg.vocab_size} is smaller than the caption tokenizer's "
                             f"{self.tokenizer.vocab_size} ids")
        return cfg

    def build_model(self) -> nn.Module:
        return MultiwayMoETransformer(self.multiway_config())

    # ---------------------------------------------------------------- data
    def decode(self, sample: dict) -> dict[str, Any]:
        key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or "txt" not in sample:
            raise ValueError(f"sample {key}: an image-text pair needs an image field ({'/'.join(IMAGE_EXTENSIONS)}) "
                             f"and 'txt'; it has {sorted(k for k in sample if not k.startswith('__'))}")
        cfg = self.model_cfg
        image = load_image(sample[ext], cfg.img_size, key=key)
        if image.shape[0] != cfg.in_chans:
            raise ValueError(f"sample {key}: image has {image.shape[0]} channels, model.in_chans is {cfg.in_chans}")
        from mmoe.data import captions_of

        captions = captions_of(sample["txt"])
        if not captions:
            raise ValueError(f"sample {key}: empty caption")
        seed = sample.get("__seed__")
        if seed is None:
            seed = _batch_seed([key])
        # an image with several captions (one per line): one of them, drawn from the sample's seed
        ids = self.tokenizer.encode(captions[_batch_seed([seed]) % len(captions)])
        return {"image": image, "ids": ids, "seed": int(seed)}

    def collate(self, examples: list[dict]) -> dict[str, Tensor]:
        cfg = self.model_cfg
        g = torch.Generator().manual_seed(_batch_seed([e["seed"] for e in examples]))
        images = torch.stack([e["image"] for e in examples])
        ids, pad = self.tokenizer.pad([e["ids"] for e in examples])
        grid = cfg.img_size // cfg.patch_size
        n_mask = max(1, round(cfg.image_mask_ratio * grid * grid))

        def image_masks() -> Tensor:
            return torch.stack([block_mask(grid, grid, n_mask, g).reshape(-1) for _ in examples])

        batch = {"images": images, "ids": ids, "pad": pad}
        if "pair" in cfg.streams:
            batch["pair_image_mask"] = image_masks()
            batch["pair_ids"], batch["pair_labels"] = mask_caption(ids, pad, cfg.pair_text_mask_ratio,
                                                                   self.tokenizer, g)
        if "image" in cfg.streams:
            batch["image_mask"] = image_masks()
        if "text" in cfg.streams:
            batch["text_ids"], batch["text_labels"] = mask_caption(ids, pad, cfg.text_mask_ratio, self.tokenizer, g)
        return batch

    # ---------------------------------------------------------------- losses
    def _run(self, model, **inputs) -> dict[str, Tensor | None]:
        """One forward (its MoE aux losses stay in the layers for the engine); during evaluation its routing
        per modality is counted."""
        out = model(**inputs)
        if self._routing:
            for layer, counts in routing_by_modality(_module(model)).items():
                acc = self._route_counts.setdefault(layer, {})
                for modality, c in counts.items():
                    c = torch.tensor(c, dtype=torch.float64)
                    acc[modality] = acc[modality] + c if modality in acc else c
        return out

    def _streams(self, model, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per stream: summed MLM nll / correct / count and MIM squared error / count (tensors)."""
        m = _module(model)
        cfg = self.model_cfg
        targets = mim_targets(batch["images"], cfg.patch_size)
        zero = batch["images"].new_zeros(())
        sums = {"mlm_nll": zero, "mlm_correct": zero, "mlm_count": zero, "mim_sq": zero, "mim_count": zero}

        def add_mlm(hidden: Tensor, labels: Tensor, stream: str) -> None:
            sel = labels != IGNORE_INDEX
            logits = m.mlm_logits(hidden[sel]).float()
            nll = F.cross_entropy(logits, labels[sel], reduction="sum")
            correct = (logits.argmax(-1) == labels[sel]).sum().to(nll.dtype)
            for k, v in (("mlm_nll", nll), ("mlm_correct", correct), ("mlm_count", sel.sum().to(nll.dtype))):
                sums[k] = sums[k] + v
                sums[f"{k}/{stream}"] = v

        def add_mim(hidden: Tensor, mask: Tensor, stream: str) -> None:
            pred = m.mim_pred(hidden).float()
            sq = (pred[mask] - targets[mask]).pow(2).mean(-1).sum()
            n = mask.sum().to(sq.dtype)
            sums["mim_sq"], sums["mim_count"] = sums["mim_sq"] + sq, sums["mim_count"] + n
            sums[f"mim_sq/{stream}"], sums[f"mim_count/{stream}"] = sq, n

        if "pair_ids" in batch:
            out = self._run(model, image=batch["images"], text=batch["pair_ids"], text_padding_mask=batch["pad"],
                            image_mask=batch["pair_image_mask"])
            add_mlm(out["text"], batch["pair_labels"], "pair")
            add_mim(out["vision"], batch["pair_image_mask"], "pair")
        if "image_mask" in batch:
            out = self._run(model, image=batch["images"], image_mask=batch["image_mask"])
            add_mim(out["vision"], batch["image_mask"], "image")
        if "text_ids" in batch:
            out = self._run(model, text=batch["text_ids"], text_padding_mask=batch["pad"])
            add_mlm(out["text"], batch["text_labels"], "text")
        return sums

    def _itc_embeddings(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """L2-normalised image and text embeddings ``[B, D]`` of the unmasked image-only and text-only forwards."""
        m = _module(model)
        img, _ = m.itc_embeddings(vision_hidden=self._run(model, image=batch["images"])["vision"])
        _, txt = m.itc_embeddings(text_hidden=self._run(model, text=batch["ids"],
                                                        text_padding_mask=batch["pad"])["text"])
        return img, txt

    def _itc(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Image-text contrastive loss over the batch and its similarity matrix (unmasked inputs)."""
        m = _module(model)
        img, txt = self._itc_embeddings(model, batch)
        sim = img.float() @ txt.float().t()
        logits = m.logit_scale.exp().float() * sim
        target = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2, sim

    def loss(self, model, batch):
        cfg = self.model_cfg
        s = self._streams(model, batch)
        mlm = s["mlm_nll"] / s["mlm_count"].clamp_min(1)
        mim = s["mim_sq"] / s["mim_count"].clamp_min(1)
        total = cfg.mlm_weight * mlm + cfg.mim_weight * mim
        scalars = {"mlm": float(mlm.detach()), "mim": float(mim.detach())}
        if cfg.itc_weight > 0:
            itc, _ = self._itc(model, batch)
            total = total + cfg.itc_weight * itc
            scalars["itc"] = float(itc.detach())
        return total, scalars, batch["images"].shape[0]

    @torch.no_grad()
    def _eval_batch(self, model, batch) -> tuple[dict[str, float], Tensor, Tensor]:
        """The sums of `eval_step` and the batch's image and text embeddings ``[B, D]``."""
        s = self._streams(model, batch)
        out = {k: float(v) for k, v in s.items()}
        for stream in STREAMS:  # same keys on every rank and batch
            for k in ("mlm_nll", "mlm_correct", "mlm_count", "mim_sq", "mim_count"):
                out.setdefault(f"{k}/{stream}", 0.0)
        img, txt = self._itc_embeddings(model, batch)
        sim = img.float() @ txt.float().t()
        target = torch.arange(sim.shape[0], device=sim.device)
        out["i2t_hits"] = float((sim.argmax(1) == target).sum())
        out["t2i_hits"] = float((sim.argmax(0) == target).sum())
        out["pairs"] = float(sim.shape[0])
        return out, img, txt

    @torch.no_grad()
    def eval_step(self, model, batch) -> dict[str, float]:
        """Sums over the batch: the losses per stream and the in-batch retrieval hits."""
        return self._eval_batch(model, batch)[0]

    def evaluator(self) -> CollectingEvaluator:
        """The sums of `eval_step` and every pair's embeddings, from every rank: `eval_metrics` plus retrieval
        over the whole split (`retrieval_recall`)."""
        return CollectingEvaluator(self._eval_record, self._eval_summary)

    def _eval_record(self, model, batch) -> dict[str, Any]:
        sums, img, txt = self._eval_batch(model, batch)
        return {"sums": sums, "image": img.float(), "text": txt.float()}

    def _eval_summary(self, records: list[dict[str, Any]]) -> dict[str, float]:
        sums: dict[str, float] = {}
        for r in records:
            for k, v in r["sums"].items():
                sums[k] = sums.get(k, 0.0) + v
        out = self.eval_metrics(sums)
        out.update(retrieval_recall(torch.cat([r["image"] for r in records]),
                                    torch.cat([r["text"] for r in records]), prefix="split_"))
        return out

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        cfg = self.model_cfg
        mlm = sums.get("mlm_nll", 0.0) / max(sums.get("mlm_count", 0.0), 1.0)
        mim = sums.get("mim_sq", 0.0) / max(sums.get("mim_count", 0.0), 1.0)
        out = {"loss": cfg.mlm_weight * mlm + cfg.mim_weight * mim, "mlm_loss": mlm,
               "mlm_acc": sums.get("mlm_correct", 0.0) / max(sums.get("mlm_count", 0.0), 1.0), "mim_loss": mim}
        for stream in STREAMS:
            n = sums.get(f"mlm_count/{stream}", 0.0)
            if n > 0:
                out[f"mlm_acc/{stream}"] = sums[f"mlm_correct/{stream}"] / n
            n = sums.get(f"mim_count/{stream}", 0.0)
            if n > 0:
                out[f"mim_loss/{stream}"] = sums[f"mim_sq/{stream}"] / n
        pairs = sums.get("pairs", 0.0)
        if pairs > 0:
            out["i2t_r1"] = sums["i2t_hits"] / pairs
            out["t2i_r1"] = sums["t2i_hits"] / pairs
        return out

    # ---------------------------------------------------------------- routing per modality during evaluation
    def eval_begin(self, model) -> None:
        self._route_counts, self._routing = {}, True

    def eval_end(self, model) -> None:
        self._routing = False
        counts, self._route_counts = self._route_counts, {}
        if not counts or self.run_dir is None or not _is_main_rank():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data = {layer: {k: v.tolist() for k, v in c.items()} for layer, c in counts.items()}
        (self.run_dir / "routing_by_modality.json").write_text(json.dumps(data, indent=1))
        plot_routing_by_modality(data, self.run_dir / "routing_by_modality.png")


def retrieval_recall(image: Tensor, text: Tensor, ks: tuple[int, ...] = (1, 5), *, prefix: str = "",
                     chunk: int = 1024) -> dict[str, float]:
    """Image <-> text retrieval recall@k over a whole set of pairs (image i's caption is text i).

    ``i2t_r{k}``: share of images whose caption is among the k texts most similar to them (dot products of
    the embeddings ``[N, D]``, L2-normalised ones give cosines), out of all N; ``t2i_r{k}`` the other way; plus
    ``pairs`` = N. A candidate outranks the true one only when strictly more similar, so an exact tie (two
    identical captions) does not count against the pair. Similarities are computed ``chunk`` rows at a time
    (memory ``chunk x N``).
    """
    image, text = image.float(), text.float()
    n = image.shape[0]
    if text.shape[0] != n:
        raise ValueError(f"retrieval_recall: {n} images but {text.shape[0]} texts")
    ranks = {"i2t": torch.empty(n, dtype=torch.long), "t2i": torch.empty(n, dtype=torch.long)}
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        for name, queries, candidates in (("i2t", image, text), ("t2i", text, image)):
            sim = queries[rows] @ candidates.t()  # [c, N]
            true = sim[torch.arange(rows.numel()), rows]
            ranks[name][rows] = (sim > true[:, None]).sum(1)  # candidates strictly more similar
    out = {f"{prefix}{name}_r{k}": float((r < k).double().mean()) for name, r in ranks.items() for k in ks}
    out[f"{prefix}pairs"] = float(n)
    return out


def _module(model) -> nn.Module:
    return getattr(model, "module", model)


def _is_main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def plot_routing_by_modality(counts: dict[str, dict[str, list[float]]], path: str | Path) -> Path:
    """Heatmap per MoE layer: rows = modalities, columns = experts, colour = share of the modality's slots."""
    from mmoe.stats import plot_routing_shares

    modalities = list(next(iter(counts.values()), {}))
    mats = {layer: torch.tensor([c[m] for m in modalities], dtype=torch.float64) for layer, c in counts.items()}
    return plot_routing_shares(mats, modalities, path, "share of each modality's routed slots per expert")
