"""Task ``retrieval``: image-text retrieval fine-tuning of the multiway MoE transformer (BEiT-3's dual encoder).

A config selects it with ``task: retrieval``; its ``model:`` section is `RetrievalModelConfig` (every
`multimodal.models.MultiwayConfig` field, the start ``init`` and the temperature), ``task_options:`` is
`RetrievalOptions`. See ``configs/retrieval_shapes.yaml``.

Model and loss
--------------
BEiT-3 fine-tunes for retrieval as a dual encoder: the image alone and the caption alone go through the
shared multiway model (no joint attention; the V-FFN / L-FFN path, so the VL-FFN is not used), and the
vision CLS and the text's first token are projected and L2-normalised (`MultiwayMoETransformer.itc_embeddings`).
The loss is CLIP's symmetric InfoNCE with a learnable temperature, ``s = exp(logit_scale)`` clamped to
``max_logit_scale`` (100, as CLIP)::

    L = ( CE(s * I T^T, diag) + CE(s * T I^T, diag) ) / 2

With ``gather: true`` (the default) and several ranks, ``I`` and ``T`` hold every rank's embeddings (the
global batch): each rank's rows are scored against all ranks' columns, and the gather passes gradients back
to the rank that computed the embedding (``torch.distributed.nn.functional.all_gather``, open_clip's
``gather_with_grad`` with ``local_loss``), so the averaged gradient is that of the global-batch loss.

Starting point
--------------
``model.init`` names a ``masked_multimodal`` run (its latest complete checkpoint), a checkpoint folder or a
``.safetensors`` / ``.pt`` state dict of `MultiwayMoETransformer`: every weight of the same name and shape
is loaded (the pre-training heads too, which retrieval does not use), experts of every expert-parallel rank
merged. A weight of another shape is an error naming it; weights missing from the file (e.g. a VL-FFN the
pre-training had not) start fresh and are listed in a warning. ``logit_scale`` comes from the file when it
has one (pre-training with ``itc_weight > 0`` trained it), else from ``init_temperature``. Without ``init``
the model trains from scratch.

Data
----
Pair shards (``mmoe shards pairs``, ``mmoe shards shapes [--hard]``): an image and its captions
(`mmoe.data.captions_of`: ``txt``, one caption per line). Training takes one caption of each image, drawn
from the sample's seed (a new draw every epoch, the same after a resume). Evaluation takes every caption,
and the distractor captions of ``json["extra"]["distractors"]`` when present.

Evaluation (the COCO / Flickr30k protocol, `retrieval_recall_multi`)
--------------------------------------------------------------------
Over the whole validation split, every rank's samples (a `mmoe.train.tasks.CollectingEvaluator`); samples
naming the same image (``json["image"]``) are one image with all their captions:

* ``t2i_r{k}``: share of captions whose image is among the k images most similar to them;
* ``i2t_r{k}``: share of images with at least one of their captions among the k texts most similar to
  them, among all captions of the split plus the distractors;
* ``rsum``: the sum of the six recalls (k = 1, 5, 10), the single number retrieval papers rank by;
* ``chance_i2t_r{k}`` / ``chance_t2i_r{k}``: the same recalls for a random ranking (exact expectations),
  ``images``, ``captions``, ``distractors``;
* ``loss``: the contrastive loss over each evaluation batch (each image with its first caption).

A candidate outranks the true one only when strictly more similar (ties count for the query).

``mmoe predict RUN IMAGE ... --captions TEXT ...`` ranks the given captions for each image and the images
for each caption (`RetrievalTask.rank`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe.train.tasks import CollectingEvaluator, Task, TaskContext, register_task

from .data import CaptionTokenizer, load_image
from .models import MultiwayConfig, MultiwayMoETransformer
from .tasks import IMAGE_EXTENSIONS

KS = (1, 5, 10)


@dataclass
class RetrievalModelConfig(MultiwayConfig):
    """`MultiwayConfig` (``vocab_size: 0`` = the caption tokenizer's size) plus the start and the temperature.

    Attributes:
        init: a ``masked_multimodal`` run / checkpoint folder or a state-dict file to start from (module
            docstring); None = from scratch.
        init_temperature: the contrastive temperature ``1 / exp(logit_scale)`` at the start, when ``init``
            gives none.
        learn_temperature: train ``logit_scale`` (CLIP); False keeps it fixed.
        max_logit_scale: upper clamp of ``exp(logit_scale)`` in the loss (CLIP: 100).
    """

    vocab_size: int = 0
    init: str | None = None
    init_temperature: float = 0.07
    learn_temperature: bool = True
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size: must be >= 0 (0 = the tokenizer's size), got {self.vocab_size}")
        if not 0.0 < float(self.init_temperature) < 1e3:
            raise ValueError(f"model.init_temperature: must be > 0, got {self.init_temperature!r}")
        if not float(self.max_logit_scale) >= 1.0:
            raise ValueError(f"model.max_logit_scale: must be >= 1, got {self.max_logit_scale!r}")
        if not isinstance(self.learn_temperature, bool):
            raise ValueError(f"model.learn_temperature: must be a bool, got {self.learn_temperature!r}")
        self.multiway_config(self.vocab_size or 2)  # validates the model fields, naming them

    def multiway_config(self, vocab_size: int) -> MultiwayConfig:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(MultiwayConfig)}
        values["vocab_size"] = self.vocab_size or vocab_size
        return MultiwayConfig(**values)


@dataclass
class RetrievalOptions:
    """``task_options`` of ``task: retrieval``.

    Attributes:
        gather: score every rank's rows against the global batch's embeddings (default); False = each rank's
            own batch only.
        caption: which caption of an image a training step uses: ``"random"`` (drawn from the sample's seed,
            a new one every epoch) or ``"first"``.
        ks: the recall cut-offs of the evaluation (``rsum`` sums both directions over them).
        chunk: query rows scored at a time in the evaluation (memory ``chunk x`` candidates).
    """

    gather: bool = True
    caption: str = "random"
    ks: list[int] = field(default_factory=lambda: list(KS))
    chunk: int = 1024

    def __post_init__(self) -> None:
        if self.caption not in ("random", "first"):
            raise ValueError(f"task_options.caption: 'random' or 'first', got {self.caption!r}")
        if not self.ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in self.ks):
            raise ValueError(f"task_options.ks: a non-empty list of positive integers, got {self.ks!r}")
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"task_options.chunk: a positive integer, got {self.chunk!r}")


def _seed_index(seed: int, n: int) -> int:
    return int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:8], "little") % n


# ------------------------------------------------------------------------------------------------ metrics
def retrieval_recall_multi(image: Tensor, text: Tensor, owner: Tensor, ks: tuple[int, ...] | list[int] = KS, *,
                           chunk: int = 1024) -> dict[str, float]:
    """Recall@k both ways with several captions per image (the COCO / Flickr30k protocol).

    ``image [N, D]`` and ``text [T, D]`` embeddings (dot products are the similarities), ``owner [T]`` the
    index of each text's image, -1 for a distractor (a text of no image: a candidate for image->text, never
    a query). ``t2i_r{k}``: share of the (non-distractor) texts whose image is among their k most similar
    images. ``i2t_r{k}``: share of images with one of their texts among their k most similar texts. A
    candidate outranks the true one only when strictly more similar. Also ``chance_*`` (a random ranking's
    expected recalls), ``rsum`` (the sum of all recalls), ``images``, ``captions``, ``distractors``. Every
    image needs at least one text."""
    image, text, owner = image.float(), text.float(), owner.long()
    n, t = image.shape[0], text.shape[0]
    if owner.shape != (t,):
        raise ValueError(f"retrieval_recall_multi: owner must be [{t}], got {tuple(owner.shape)}")
    if n == 0 or t == 0:
        raise ValueError("retrieval_recall_multi: no images or no texts")
    if int(owner.max()) >= n or int(owner.min()) < -1:
        raise ValueError("retrieval_recall_multi: owner indices must be in [-1, images)")
    per_image = torch.bincount(owner[owner >= 0], minlength=n)
    if bool((per_image == 0).any()):
        raise ValueError(f"retrieval_recall_multi: {int((per_image == 0).sum())} images have no caption")
    queries = (owner >= 0).nonzero().squeeze(1)
    t2i_rank = torch.empty(queries.numel(), dtype=torch.long)
    for s in range(0, queries.numel(), chunk):
        q = queries[s:s + chunk]
        sim = text[q] @ image.t()  # [c, N]
        true = sim.gather(1, owner[q][:, None])
        t2i_rank[s:s + chunk] = (sim > true).sum(1)
    i2t_rank = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(s + chunk, n))
        sim = image[rows] @ text.t()  # [c, T]
        mine = owner[None, :] == rows[:, None]
        best = sim.masked_fill(~mine, float("-inf")).max(1, keepdim=True).values
        i2t_rank[rows] = (sim > best).sum(1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).double().mean())
        out[f"t2i_r{k}"] = float((t2i_rank < k).double().mean())
        out[f"chance_t2i_r{k}"] = min(k, n) / n
        out[f"chance_i2t_r{k}"] = float(sum(1.0 - _none_drawn(t, int(c), k) for c in per_image.tolist()) / n)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    out["images"], out["captions"], out["distractors"] = float(n), float(queries.numel()), float(t - queries.numel())
    return out


def _none_drawn(total: int, good: int, k: int) -> float:
    """P(none of ``good`` items among ``k`` drawn without replacement from ``total``) = C(T-c, k) / C(T, k)."""
    p = 1.0
    for j in range(min(k, total)):
        if total - good - j <= 0:
            return 0.0
        p *= (total - good - j) / (total - j)
    return p


# ------------------------------------------------------------------------------------------------ the loss
class _AllGather(torch.autograd.Function):
    """All-gather of equal-shaped tensors whose backward sums every rank's gradient of this rank's part (one
    all-reduce), the rule of a row used by every rank's loss."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        import torch.distributed as dist

        g = torch.stack([gr.contiguous() for gr in grads])
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Every rank's rows of ``x`` (rank order) and the offset of this rank's rows; gradients flow back to the
    rank that computed a row (summed over the ranks whose loss used it). Ranks may hold different numbers of
    rows. One process: ``(x, 0)``. Written here (a small `torch.autograd.Function`) because
    ``torch.distributed.nn.functional.all_gather`` is deprecated."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    padded = F.pad(x, (0, 0, 0, top - x.shape[0])) if x.shape[0] < top else x
    parts = _AllGather.apply(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])


def contrastive_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, *, max_logit_scale: float = 100.0,
                     gather: bool = True) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE of matching rows of ``img`` / ``txt`` ``[B, D]`` (L2-normalised) at scale
    ``exp(logit_scale)`` (clamped to ``max_logit_scale``); with ``gather``, against every rank's rows
    (`gather_with_grad`). Returns ``(loss, scale)``: the mean over this rank's rows of both directions."""
    scale = logit_scale.float().clamp(max=math.log(max_logit_scale)).exp().reshape(())
    img, txt = img.float(), txt.float()
    if gather:
        all_img, offset = gather_with_grad(img)
        all_txt, _ = gather_with_grad(txt)
    else:
        all_img, all_txt, offset = img, txt, 0
    target = torch.arange(img.shape[0], device=img.device) + offset
    loss = (F.cross_entropy(scale * img @ all_txt.t(), target) + F.cross_entropy(scale * txt @ all_img.t(), target)) / 2
    return loss, scale


# ------------------------------------------------------------------------------------------------ weights
def load_multiway_weights(model: MultiwayMoETransformer, path: str | Path, what: str = "model.init: ") -> dict:
    """Load a `MultiwayMoETransformer` state from a run / checkpoint folder of this project (its latest complete
    checkpoint, expert shards merged) or a ``.safetensors`` / ``.pt`` / ``.pth`` file into ``model``: every key
    of the same name and shape. A key of another shape is an error naming it; keys the file lacks stay as
    built (warned). Returns ``{"missing": [...], "unused": [...]}``."""
    path = Path(path)
    where = f"{what}{path}"
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such checkpoint file or folder")
    try:
        if path.is_dir():
            from mmoe.train import checkpoint as ckpt_lib

            state = ckpt_lib.full_state_dict(ckpt_lib.resolve_checkpoint(path))
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{where}: cannot read a state dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{where}: not a state dict")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    if "token_embed.weight" not in state or "patch_embed.weight" not in state:
        raise ValueError(f"{where}: not a multiway model checkpoint (no token_embed / patch_embed weights)")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{where}: shapes differ from the model's (same dim / depth / experts / vocab_size / "
                         f"max_text_len?): {'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    missing = [k for k in own if k not in state]
    unused = [k for k in state if k not in own]
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if missing:
        warnings.warn(f"{where}: {len(missing)} weights are not in the file and start fresh: "
                      f"{missing[:6]}{' ...' if len(missing) > 6 else ''}", stacklevel=2)
    return {"missing": missing, "unused": unused}


# ------------------------------------------------------------------------------------------------ the task
@register_task("retrieval")
class RetrievalTask(Task):
    ModelConfig = RetrievalModelConfig
    Options = RetrievalOptions
    unit = "samples"

    def __init__(self, model_cfg: RetrievalModelConfig, options: RetrievalOptions | None = None) -> None:
        super().__init__(model_cfg, options)
        self.tokenizer = CaptionTokenizer(context_length=model_cfg.max_text_len)
        self.init_report: dict | None = None
        self._stats: dict[str, dict] = {}

    # ---------------------------------------------------------------- model
    def setup(self, ctx: TaskContext) -> None:
        self.world_size = ctx.world_size

    def multiway_config(self) -> MultiwayConfig:
        cfg = self.model_cfg.multiway_config(self.tokenizer.vocab_size)
        if cfg.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size: {cfg.vocab_size} is smaller than the caption tokenizer's "
                             f"{self.tokenizer.vocab_size} ids")
        return cfg

    def build_model(self) -> nn.Module:
        cfg = self.model_cfg
        model = MultiwayMoETransformer(self.multiway_config())
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / cfg.init_temperature))
        if cfg.init:
            self.init_report = load_multiway_weights(model, cfg.init)
        model.logit_scale.requires_grad_(cfg.learn_temperature)
        return model

    # ---------------------------------------------------------------- data
    def _read(self, sample: dict) -> tuple[str, Tensor, list[str], dict]:
        from mmoe.data import captions_of

        key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or "txt" not in sample:
            raise ValueError(f"sample {key}: an image-text pair needs an image field ({'/'.join(IMAGE_EXTENSIONS)}) "
                             f"and 'txt'; it has {sorted(k for k in sample if not k.startswith('__'))}")
        cfg = self.model_cfg
        image = load_image(sample[ext], cfg.img_size, key=key)
        if image.shape[0] != cfg.in_chans:
            raise ValueError(f"sample {key}: image has {image.shape[0]} channels, model.in_chans is {cfg.in_chans}")
        captions = captions_of(sample["txt"])
        if not captions:
            raise ValueError(f"sample {key}: empty caption")
        meta = sample.get("json") or {}
        if isinstance(meta, (bytes, str)):
            import json

            try:
                meta = json.loads(meta)
            except ValueError:
                meta = {}
        return key, image, captions, meta if isinstance(meta, dict) else {}

    def decode(self, sample: dict) -> dict[str, Any]:
        key, image, captions, _ = self._read(sample)
        seed = sample.get("__seed__")
        i = 0 if self.options.caption == "first" or seed is None else _seed_index(int(seed), len(captions))
        return {"image": image, "ids": self.tokenizer.encode(captions[i])}

    def decode_eval(self, sample: dict) -> dict[str, Any]:
        key, image, captions, meta = self._read(sample)
        extra = meta.get("extra") or {}
        distractors = [d for d in (extra.get("distractors") or []) if isinstance(d, str) and d.strip()]
        image_id = f"{sample.get('__url__', '?')}:{meta['image']}" if isinstance(meta.get("image"), str) else key
        return {"image": image, "captions": [self.tokenizer.encode(c) for c in captions],
                "distractors": [self.tokenizer.encode(d) for d in distractors], "image_id": image_id}

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        images = torch.stack([e["image"] for e in examples])
        if "captions" not in examples[0]:
            ids, pad = self.tokenizer.pad([e["ids"] for e in examples])
            return {"images": images, "ids": ids, "pad": pad}
        texts, owner = [], []
        for i, e in enumerate(examples):
            texts += e["captions"] + e["distractors"]
            owner += [i] * len(e["captions"]) + [-1] * len(e["distractors"])
        ids, pad = self.tokenizer.pad(texts)
        first = torch.tensor([owner.index(i) for i in range(len(examples))])
        return {"images": images, "ids": ids, "pad": pad, "owner": torch.tensor(owner), "first": first,
                "image_ids": [e["image_id"] for e in examples]}

    # ---------------------------------------------------------------- forward
    def embed(self, model, images: Tensor | None = None, ids: Tensor | None = None,
              pad: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """The dual encoder: L2-normalised embeddings of the images alone and of the texts alone."""
        from mmoe.layer import routing_stats

        m = _module(model)
        img = txt = None
        if images is not None:
            img, _ = m.itc_embeddings(vision_hidden=model(image=images)["vision"])
            self._stats["image"] = routing_stats(m)
        if ids is not None:
            _, txt = m.itc_embeddings(text_hidden=model(text=ids, text_padding_mask=pad)["text"])
            self._stats["text"] = routing_stats(m)
        return img, txt

    def loss(self, model, batch):
        cfg = self.model_cfg
        img, txt = self.embed(model, batch["images"], batch["ids"], batch["pad"])
        loss, scale = contrastive_loss(img, txt, _module(model).logit_scale, max_logit_scale=cfg.max_logit_scale,
                                       gather=self.options.gather)
        return loss, {"itc": float(loss.detach()), "temperature": float(1.0 / scale.detach())}, img.shape[0]

    def routing_groups(self, model) -> dict[str | None, dict]:
        """The latest image-only and text-only forwards' routing, tagged ``image`` / ``text``."""
        return {tag: stats for tag, stats in self._stats.items() if stats} or super().routing_groups(model)

    # ---------------------------------------------------------------- evaluation
    def evaluator(self) -> CollectingEvaluator:
        return CollectingEvaluator(self._eval_record, self._eval_summary)

    @torch.no_grad()
    def _eval_record(self, model, batch) -> dict[str, Any]:
        img, txt = self.embed(model, batch["images"], batch["ids"], batch["pad"])
        first = batch["first"]
        scale = _module(model).logit_scale.float().clamp(max=math.log(self.model_cfg.max_logit_scale)).exp()
        logits = scale * img.float() @ txt[first].float().t()
        target = torch.arange(img.shape[0])
        loss = (F.cross_entropy(logits, target, reduction="sum") + F.cross_entropy(logits.t(), target, reduction="sum")) / 2
        return {"image": img.float(), "text": txt.float(), "owner": batch["owner"], "image_ids": batch["image_ids"],
                "loss_sum": float(loss), "n": img.shape[0]}

    def _eval_summary(self, records: list[dict[str, Any]]) -> dict[str, float]:
        index: dict[str, int] = {}
        images, texts, owners = [], [], []
        for r in records:
            local = []
            for row, image_id in enumerate(r["image_ids"]):
                if image_id not in index:  # an image listed again (one sample per caption): one gallery image
                    index[image_id] = len(images)
                    images.append(r["image"][row])
                local.append(index[image_id])
            local_t = torch.tensor(local)
            own = r["owner"]
            owners.append(torch.where(own >= 0, local_t[own.clamp_min(0)], own))
            texts.append(r["text"])
        out = retrieval_recall_multi(torch.stack(images), torch.cat(texts), torch.cat(owners),
                                     tuple(self.options.ks), chunk=self.options.chunk)
        out["loss"] = sum(r["loss_sum"] for r in records) / max(sum(r["n"] for r in records), 1)
        return out

    # ---------------------------------------------------------------- mmoe predict
    @torch.no_grad()
    def rank(self, model: nn.Module, images: list[str], captions: list[str], topk: int = 5) -> dict[str, list]:
        """Rank ``captions`` for every image file and the images for every caption (cosine similarities of the
        dual encoder). Returns ``{"images": [{"image", "top": [{"caption", "index", "score"}]}], "captions":
        [{"caption", "top": [{"image", "index", "score"}]}]}``."""
        if not images or not captions:
            raise ValueError("retrieval ranking needs at least one image and one caption")
        xs = [load_image(Path(p).read_bytes(), self.model_cfg.img_size, key=str(p)) for p in images]
        ids, pad = self.tokenizer.batch(captions)
        model.eval()
        img, txt = self.embed(model, torch.stack(xs), ids, pad)
        sim = (img.float() @ txt.float().t()).cpu()
        out = {"images": [], "captions": []}
        for i, path in enumerate(images):
            top = sim[i].topk(min(topk, len(captions)))
            out["images"].append({"image": str(path), "top": [
                {"caption": captions[int(j)], "index": int(j), "score": float(s)} for s, j in zip(top.values, top.indices)]})
        for j, text in enumerate(captions):
            top = sim[:, j].topk(min(topk, len(images)))
            out["captions"].append({"caption": text, "top": [
                {"image": str(images[int(i)]), "index": int(i), "score": float(s)} for s, i in zip(top.values, top.indices)]})
        return out


def _module(model) -> nn.Module:
    return getattr(model, "module", model)
