"""WebDataset shards: writers, manifest, reader with exact resume, weighted mixing of sources.

Writing (`mmoe.data.writers`): `write_shards` for any iterable of WebDataset-style sample dicts, and
`write_imagefolder`, `write_coco`, `write_text`, `write_pairs` (`captions_of` reads its captions back),
`write_segfolder`, `write_coco_semantic` for the common layouts (also as ``mmoe shards ...`` on the command line). Each output directory gets a
``manifest.json`` (`Manifest`, layout in `mmoe.data.manifest`); `verify_shards` re-checks it.

Reading (`mmoe.data.reader`): `ShardLoader`, batches with seeded shuffling, rank/worker splitting,
``on_error="fail" | "skip"`` and exact resume through ``state_dict()`` / ``load_state_dict()``;
`decode_image`, `decode_json`, `decode_text`, `decode_label` decode raw samples.

Mixing (`mmoe.data.mixing`): `MixedLoader`, several weighted sources (one loader each) in one stream, each
batch whole from one source chosen by `choose_source` (a pure function of seed and step, the same on every
rank), items `SourcedBatch` (batch, source index, task label), exact resume; `AllLoader`, one batch of every
source in each item (`MultiBatch`, by task label), for multi-task steps.

Bad data raises `DataError` (a `RuntimeError`) naming the file or shard, the sample key and the cause,
or, when skipping, warns with `DataWarning`.

The names are imported lazily, so ``import mmoe.data`` (and ``mmoe --help``) stays cheap.
"""

from __future__ import annotations

from .._lazy import lazy_exports
from .errors import DataError, DataWarning

_EXPORTS = {
    "Manifest": "manifest", "ShardInfo": "manifest", "SplitInfo": "manifest", "verify_shards": "manifest",
    "write_shards": "writers", "write_imagefolder": "writers", "write_coco": "writers", "write_text": "writers",
    "write_pairs": "writers", "captions_of": "writers", "ShardSource": "writers",
    "ImageFolderSource": "writers", "CocoSource": "writers",
    "TextSource": "writers", "PairsSource": "writers", "make_key": "writers", "parse_size": "writers",
    "split_for_key": "writers", "SegmentationFolderSource": "writers", "CocoSemanticSource": "writers",
    "write_segfolder": "writers", "write_coco_semantic": "writers", "read_label_map": "writers",
    "ShardLoader": "reader", "resolve_urls": "reader",
    "MixedLoader": "mixing", "AllLoader": "mixing", "SourcedBatch": "mixing", "MultiBatch": "mixing",
    "choose_source": "mixing",
    "mask_tokens": "masking", "block_mask": "masking",
    "decode_image": "decode", "decode_json": "decode", "decode_text": "decode", "decode_label": "decode",
}

__all__ = ["DataError", "DataWarning", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
