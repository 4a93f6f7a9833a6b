"""The image shard builder: readers -> per-sample stages -> global dedup + resampling -> webdataset shards.

Three passes, each resumable, under ``OUT/_work``:

1. **per-sample stages**, in parallel workers, one chunk of ``samples_per_shard`` inputs at a time:
   caption rules, language id, decoding, image size rules, safety (pHash blocklist, classifier hook, face
   blurring), OCR, CLIP score, SSCD descriptor. Chunk ``i`` becomes ``chunk_i.parquet`` (every input's
   status, fields and the image to write) + ``chunk_i.npy`` (descriptors of the survivors), renamed into
   place when complete: a rerun skips finished chunks.
2. **global stages** over all survivors: SSCD + FAISS de-duplication (one pair kept per component, by
   CLIP score, caption length or input order), then n-gram resampling. Written as ``global.parquet``.
3. **shards**: ``shard_i.tar`` (``key.jpg``, ``key.txt``, ``key.json``), ``shard_i.parquet`` (a status and
   reason row for every input of chunk ``i``) and ``shard_i_stats.json``, written last: it is the resume
   marker. Every file is written to a temporary name and renamed, so a kill never leaves a partial shard
   that a rerun would trust, and no sample is written twice.

Conversation records (``llava_reader``: LLaVA JSON, any number of images, no caption) take the same road with
these differences: no caption rules; language id on the text of their turns; every image through decode,
image rules, safety and OCR (per-image findings in ``images[k]`` of their key.json; one image failing drops or
fails the record, naming it); no CLIP score (no caption to score against); not in the global stages (no
caption to resample by, and LLaVA records sharing an image are not copies). Their shard members are
``key.json`` (``{"meta": {"conversations": ...}}``, what ``data.format: conversation`` reads) plus ``key.jpg``
for one image or ``key.0.jpg``, ``key.1.jpg``, ... for several; a text-only record is ``key.json`` alone.

Inputs are assigned to chunks by their position in the (deterministic, sorted) reader order, so a rerun
maps every input to the same shard. Each chunk keeps a fingerprint of its input listing (``inputs_digest``
in its parquet's metadata): a resume whose listing changed under a finished chunk is refused. Inputs added
at the end make new chunks; the global pass and the shards record the chunk fingerprints they were made
from and are redone when those change, so the result is the one a fresh build would give. The job's lock,
its resume config and the text guard are ``shard_jobs``'s.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from common.conversation import IMAGE_PLACEHOLDER
from data_curation.curation_config import CurationConfig
from data_curation.engine import Stage, check_address
from data_curation.records import DROPPED, OK, Sample
from data_curation.readers import decode_image, open_input
from data_curation.shard_jobs import (STATUS_SCHEMA, BuildResult, ResumeConfig, StageSetupError, _atomic_write,
                                      _chunks, _replacing, check_inputs_unchanged, guard_text, inputs_digest,
                                      output_lock, refuse_output_inside_input, refuse_stale_chunk, run_chunks)

EMB_DIM = 512


# ----------------------------------------------------------------------------------------------
# Pass 1: per-sample stages


@dataclass
class Item:
    """A sample on its way through pass 1's stages: its decoded images (one for an image-caption sample, one per
    image of a conversation record), whether a stage changed each (face blur), and its SSCD descriptor."""

    sample: Sample
    images: list[Image.Image] = field(default_factory=list)
    changed: list[bool] = field(default_factory=list)
    emb: np.ndarray | None = None


def _setup(build: Callable[[], Any]) -> Any:
    try:
        return build()
    except Exception as e:  # one message naming the stage's file or model, before any work starts
        raise StageSetupError(f"cannot set up the curation stages: {type(e).__name__}: {e}") from e


def _for_each_image(items: list[Item], stage: str,
                    fn: Callable[[Sample, Image.Image, dict], tuple[Image.Image, bool] | None]) -> list[Item]:
    """``fn(sample, image, fields)`` on every image of every live item, in order; what it finds goes to the
    sample's fields (a conversation record's image ``k``: ``fields["images"][k]``). ``fn`` returns the image to
    keep and whether it changed it (re-encoded when written), or None after dropping or failing the sample (a conversation record's
    reason names the image: ``image k: ...``); the record's later images are then not looked at. An
    unexpected exception fails that sample only."""
    for item in items:
        s = item.sample
        if not s.ok:
            continue
        s.stage = stage
        try:
            for k, img in enumerate(item.images):
                fields = s.fields["images"][k] if s.is_conversation else s.fields
                out = fn(s, img, fields)
                if out is None:
                    if s.is_conversation and s.reason is not None:
                        s.reason = f"image {k}: {s.reason}"
                    break
                item.images[k] = out[0]
                item.changed[k] = item.changed[k] or out[1]
        except Exception as e:  # an unexpected failure on one sample never stops the job
            s.fail(stage, f"{type(e).__name__}: {e}")
        if s.ok:
            s.stage = None
        else:
            item.images, item.changed = [], []
    return items


class PrepareStage:
    """Caption rules, language id, decoding and the image size rules. A conversation record has no caption
    rules (its turns passed ``llava_reader``'s conversation check); its language is the text of its turns, and
    every image is decoded and checked (``fields["images"][k]``)."""

    def __init__(self, cfg: CurationConfig, device: str = "cpu") -> None:
        self.cfg, self.lang = cfg, None
        if cfg.language.enabled:
            from data_curation.filters import LanguageId

            self.lang = _setup(lambda: LanguageId(cfg.language.allowed, cfg.language.min_score))

    def __call__(self, index: int, samples: list[Sample]) -> list[Item]:
        items = [Item(s) for s in guard_text(samples)]
        for item in items:
            s = item.sample
            if not s.ok:
                continue
            try:
                self._prepare(item)
            except Exception as e:  # an unexpected failure on one sample never stops the job
                s.fail(s.stage or "stage", f"{type(e).__name__}: {e}")
            if s.ok:
                s.stage = None
            else:
                item.images, item.changed = [], []
        return items

    def _prepare(self, item: Item) -> None:
        from data_curation.filters import caption_reason, image_reason

        s, cfg = item.sample, self.cfg
        if s.is_conversation:
            text = "\n".join(t["content"].replace(IMAGE_PLACEHOLDER, " ") for t in s.meta["conversations"])
            s.fields["images"] = [{} for _ in s.images]
        else:
            s.stage = "caption"
            reason = caption_reason(s.caption, cfg.caption)
            if reason:
                s.drop("caption", reason)
                return
            text = s.caption
        if not self._language_ok(s, text):
            return
        for k in range(len(s.images) if s.is_conversation else 1):
            which = f"image {k}: " if s.is_conversation else ""
            fields = s.fields["images"][k] if s.is_conversation else s.fields
            s.stage = "decode"
            img = decode_image(s, cfg.max_pixels, k if s.is_conversation else None)
            if img is None:
                return
            fields.update(width=img.width, height=img.height)
            s.stage = "image"
            reason = image_reason(img, cfg.image)
            if reason:
                s.drop("image", which + reason)
                return
            item.images.append(img)
            item.changed.append(False)

    def _language_ok(self, s: Sample, text: str) -> bool:
        """Language id of ``text`` (when enabled); a reason drops ``s``."""
        if self.lang is None:
            return True
        s.stage = "language"
        reason, lang, score = self.lang.reason(text)
        s.fields.update(lang=lang, lang_score=round(float(score), 4))
        if reason:
            s.drop("language", reason)
            return False
        return True


class SafetyStage:
    """pHash blocklist, the unsafe-image classifier hook and face blurring, per image."""

    def __init__(self, cfg: CurationConfig, device: str = "cpu") -> None:
        from data_curation.safety import PHashBlocklist, SafetyFilter, load_classifier

        c = cfg.safety
        self.safety = _setup(lambda: SafetyFilter(
            PHashBlocklist.load(c.blocklist, max_distance=c.max_distance) if c.blocklist else None,
            load_classifier(c.classifier), c.classifier_threshold, blur_faces=c.blur_faces))

    def __call__(self, index: int, items: list[Item]) -> list[Item]:
        def one(s: Sample, img: Image.Image, fields: dict) -> tuple[Image.Image, bool] | None:
            out, reason, extra = self.safety.apply(img)
            fields.update(extra)
            if reason or out is None:
                s.drop("safety", reason or "unsafe")
                return None
            return out, out is not img and bool(extra.get("faces_blurred"))

        return _for_each_image(items, "safety", one)


class OcrStage:
    """Tesseract's text and mean confidence per image (a timeout or a tesseract failure fails that sample);
    with ``ocr.detect_text``, only images where ``ocr.text_regions`` finds a word-like region are read, the
    others get empty text and ``ocr_skipped``."""

    def __init__(self, cfg: CurationConfig, device: str = "cpu") -> None:
        from data_curation.ocr import TesseractOCR

        self.detect = cfg.ocr.detect_text
        self.ocr = _setup(lambda: TesseractOCR(lang=cfg.ocr.lang, min_conf=cfg.ocr.min_conf, timeout=cfg.ocr.timeout))

    def __call__(self, index: int, items: list[Item]) -> list[Item]:
        from data_curation.ocr import text_regions

        def one(s: Sample, img: Image.Image, fields: dict) -> tuple[Image.Image, bool]:
            if self.detect and text_regions(img) == 0:
                fields.update(ocr_text="", ocr_mean_conf=0.0, ocr_skipped=True)
                return img, False
            r = self.ocr.read(img)
            fields.update(ocr_text=r.text, ocr_mean_conf=round(float(r.mean_conf), 2), ocr_skipped=False)
            return img, False

        return _for_each_image(items, "ocr", one)


def _caption_items(items: list[Item]) -> list[Item]:
    # CLIP scores an image against its caption and SSCD feeds the caption pairs' de-duplication: a
    # conversation record has no caption, and many records ask about one image (LLaVA), so neither applies.
    return [it for it in items if it.sample.ok and not it.sample.is_conversation]


class ClipStage:
    """Image-caption CLIP score, batched over the chunk; pairs below ``clip.threshold`` are dropped."""

    def __init__(self, cfg: CurationConfig, device: str = "cpu") -> None:
        from data_curation.filters import ClipScorer

        self.cfg = cfg
        self.clip = _setup(lambda: ClipScorer.load(cfg.clip.model, cfg.clip.pretrained, device=device))

    def __call__(self, index: int, items: list[Item]) -> list[Item]:
        live = _caption_items(items)
        if live:
            c = self.cfg.clip
            scores = self.clip.score([it.images[0] for it in live], [it.sample.caption for it in live],
                                     batch_size=c.batch_size)
            for it, score in zip(live, scores):
                it.sample.fields["clip_score"] = round(float(score), 5)
                if score < c.threshold:
                    it.sample.drop("clip", f"clip_score({score:.3f}<{c.threshold})")
                    it.images, it.changed = [], []
        return items


class SscdStage:
    """SSCD copy-detection descriptors of the surviving image-caption samples, batched over the chunk."""

    def __init__(self, cfg: CurationConfig, device: str = "cpu") -> None:
        from data_curation.sscd import SSCDEmbedder

        self.cfg = cfg
        self.sscd = _setup(lambda: SSCDEmbedder.load(cfg.dedup.sscd, device=device))

    def __call__(self, index: int, items: list[Item]) -> list[Item]:
        live = _caption_items(items)
        if live:
            emb = self.sscd.embed([it.images[0] for it in live], batch_size=self.cfg.dedup.batch_size)
            for it, e in zip(live, emb.astype(np.float32)):
                it.emb = e
        return items


class ChunkWriter:
    """Pass 1's last stage: ``write_chunk`` of the chunk's items, JPEG bytes from their images."""

    def __init__(self, work: Path) -> None:
        self.work = str(work)

    def __call__(self, cfg: CurationConfig, device: str = "cpu") -> Callable[[int, list[Item]], list[str]]:
        def write(index: int, items: list[Item]) -> list[str]:
            out_bytes = [[] for _ in items]
            for i, it in enumerate(items):
                s = it.sample
                if s.ok:
                    originals = s.images if s.is_conversation else [s.image_bytes]
                    out_bytes[i] = [_jpeg_bytes(b, img, ch, cfg.jpeg_quality)
                                    for b, img, ch in zip(originals, it.images, it.changed)]
            embs = [it.emb for it in items if it.sample.ok and it.emb is not None]
            emb = np.stack(embs) if embs else np.zeros((0, EMB_DIM), np.float32)
            write_chunk(Path(self.work), index, [it.sample for it in items], out_bytes, emb)
            return [it.sample.status for it in items]

        return write


def image_stages(cfg: CurationConfig, work: Path) -> list[Stage]:
    """Pass 1's operators for ``cfg``: the enabled stages in order, then the chunk writer."""
    stages = [Stage("prepare", PrepareStage, model=False)]
    if cfg.safety.enabled:
        stages.append(Stage("safety", SafetyStage))
    if cfg.ocr.enabled:
        stages.append(Stage("ocr", OcrStage))
    if cfg.clip.enabled:
        stages.append(Stage("clip", ClipStage, model=True))
    if cfg.dedup.enabled:
        stages.append(Stage("sscd", SscdStage, model=True))
    return stages + [Stage("write", ChunkWriter(work))]


def _crashed(item: Item | Sample, stage: str, message: str) -> Item:
    """The engine's mark for an input whose worker died on it in ``stage`` (before the first stage it is a
    bare sample)."""
    item = item if isinstance(item, Item) else Item(item)
    item.sample.fail(stage, message)
    item.images, item.changed, item.emb = [], [], None
    return item


def _jpeg_bytes(original: bytes | None, img: Image.Image, changed: bool, quality: int) -> bytes:
    """The original file when it is a JPEG no stage changed; otherwise a re-encoded JPEG."""
    if not changed and original is not None and original[:3] == b"\xff\xd8\xff":
        return original
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


CHUNK_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("status", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("caption", pa.string()), ("fields", pa.string()), ("meta", pa.string()),
    ("image", pa.binary()), ("emb_row", pa.int64()),
    ("more_images", pa.list_(pa.binary())),  # a conversation record's images after the first ("image")
])


def write_chunk(work: Path, index: int, samples: list[Sample], out_bytes: list[list[bytes]], emb: np.ndarray) -> None:
    """``chunk_i.npy`` (the surviving image-caption samples' descriptors), then ``chunk_i.parquet`` (every input,
    with the chunk's ``inputs_digest`` in its metadata): the chunk's completion marker. A kept sample's first
    image is ``image``, a conversation record's others ``more_images``; its caption is null."""
    guard_text(samples)
    rows, n_emb = [], 0
    for s, b in zip(samples, out_bytes):
        emb_row = -1
        if s.ok and not s.is_conversation and emb.shape[0]:
            emb_row, n_emb = n_emb, n_emb + 1
        rows.append({"key": s.key, "source": s.source, "status": s.status, "stage": s.stage, "reason": s.reason,
                     "caption": s.caption if isinstance(s.caption, str) else None,
                     "fields": json.dumps(s.fields), "meta": json.dumps(s.meta, default=str),
                     "image": b[0] if s.ok and b else None, "emb_row": emb_row,
                     "more_images": b[1:] if s.ok and b else None})
    assert n_emb == emb.shape[0], (n_emb, emb.shape)
    npy = work / f"chunk_{index:05d}.npy"
    buf = io.BytesIO()
    np.save(buf, emb)
    _atomic_write(npy, buf.getvalue())
    sink = io.BytesIO()
    schema = CHUNK_SCHEMA.with_metadata({"inputs_digest": inputs_digest(samples)})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    _atomic_write(work / f"chunk_{index:05d}.parquet", sink.getvalue())  # the chunk's completion marker


def chunk_digest(path: Path) -> str | None:
    """The ``inputs_digest`` a finished chunk was written with (None: an older build kept none)."""
    digest = (pq.read_schema(path).metadata or {}).get(b"inputs_digest")
    return digest.decode() if digest is not None else None


# ----------------------------------------------------------------------------------------------
# Pass 2: global stages


def global_stages(work: Path, n_chunks: int, cfg: CurationConfig, chunks_digest: str,
                  address: str | None = None) -> pa.Table:
    """Dedup then resampling over the image-caption survivors of every chunk -> per-survivor decisions, kept
    with the ``chunks_digest`` they were made from (reused only while it matches). Conversation records are in
    neither: they have no caption to resample by, and records sharing an image are not copies. Both run as
    Ray tasks on the build's Ray instance or cluster (``address``, ``cfg.workers``)."""
    out = work / "global.parquet"
    if out.exists() and (pq.read_schema(out).metadata or {}).get(b"chunks_digest") == chunks_digest.encode():
        return pq.read_table(out)
    keys, captions, clip, emb_parts = [], [], [], []
    for i in range(n_chunks):
        t = pq.read_table(work / f"chunk_{i:05d}.parquet", columns=["key", "status", "caption", "fields", "emb_row"])
        emb = np.load(work / f"chunk_{i:05d}.npy")
        for key, status, cap, fields, row in zip(*(t.column(c).to_pylist() for c in t.column_names)):
            if status != OK or cap is None:  # a conversation record (no caption): not judged by these stages
                continue
            keys.append(key)
            captions.append(cap)
            clip.append(json.loads(fields).get("clip_score", np.nan))
        emb_parts.append(emb)
    n = len(keys)
    dedup_keep = np.ones(n, bool)
    component = np.arange(n)
    nn_sim = np.full(n, -1.0, np.float32)
    stats: dict = {"survivors_before_global": n}
    if cfg.dedup.enabled and n:
        from data_curation.dedup import DedupConfig, choose_keepers, find_duplicates

        emb_file = work / "embeddings.npy"
        mm = np.lib.format.open_memmap(emb_file, mode="w+", dtype=np.float32, shape=(n, EMB_DIM))
        start = 0
        for part in emb_parts:
            mm[start : start + len(part)] = part
            start += len(part)
        mm.flush()
        del mm
        t0 = time.perf_counter()
        res = find_duplicates(emb_file, DedupConfig(threshold=cfg.dedup.threshold, n_clusters=cfg.dedup.clusters,
                                                    clusters_per_vector=cfg.dedup.clusters_per_vector),
                              address=address, workers=cfg.workers)
        component, nn_sim = res.labels, res.nn_similarity
        dedup_keep = choose_keepers(component, cfg.dedup.keep, clip_scores=np.asarray(clip, np.float64),
                                    caption_lengths=np.array([len(c) for c in captions]))
        stats["dedup"] = {"components": int(res.n_components), "pairs": int(res.n_pairs),
                          "removed": int((~dedup_keep).sum()), "seconds": round(time.perf_counter() - t0, 2)}
    keeper_of = {}
    for idx in np.flatnonzero(dedup_keep):
        keeper_of[int(component[idx])] = keys[idx]
    resample_keep = np.ones(n, bool)
    freq_before = freq_after = None
    if cfg.resample.enabled and n:
        from data_curation.ngram_match import Vocabulary
        from data_curation.resample import distributed_document_frequencies, resample

        vocab = Vocabulary.default() if cfg.resample.vocab == "default" else Vocabulary.from_file(cfg.resample.vocab)
        live = np.flatnonzero(dedup_keep)
        freqs, matches = distributed_document_frequencies([captions[i] for i in live], vocab, address=address,
                                                          workers=cfg.workers)
        keep_live = resample(matches, freqs, cfg.resample.t, prob=cfg.resample.prob,
                             keep_unmatched=cfg.resample.keep_unmatched, seed=cfg.resample.seed)
        resample_keep[live] = keep_live
        freq_before = freqs
        freq_after = np.bincount(matches.ids[keep_live[matches.caption_index()]], minlength=len(freqs))
        top = np.argsort(-freq_before)[:50]
        stats["resample"] = {"kept": int(keep_live.sum()), "of": int(len(live)),
                             "unmatched": int((np.diff(matches.indptr) == 0).sum()),
                             "top_entries": [[vocab.entries[j], int(freq_before[j]), int(freq_after[j])] for j in top
                                             if freq_before[j] > 0]}
    table = pa.table({
        "key": keys,
        "dedup_component": [keeper_of.get(int(c), keys[i]) for i, c in enumerate(component)],
        "dedup_nn_similarity": nn_sim.astype(np.float32),
        "dedup_keep": dedup_keep,
        "resample_keep": resample_keep,
    })
    sink = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({"chunks_digest": chunks_digest}), sink)
    _atomic_write(work / "global_stats.json", json.dumps(stats, indent=1).encode())
    _atomic_write(out, sink.getvalue())
    return table


# ----------------------------------------------------------------------------------------------
# Pass 3: shards


def write_shard(out: Path, work: Path, index: int, decisions: dict[str, tuple[str, float, bool, bool]],
                chunks_digest: str) -> dict:
    """Shard ``index`` from its chunk and the global ``decisions``; its stats (the resume marker) record the
    ``chunks_digest`` the decisions were made from."""
    import webdataset as wds

    name = f"shard_{index:05d}"
    t = pq.read_table(work / f"chunk_{index:05d}.parquet").to_pylist()
    rows, counts = [], {"inputs": len(t), OK: 0, DROPPED: 0, "error": 0}
    with _replacing(out / f"{name}.tar") as tmp_tar, open(tmp_tar, "wb") as f:
        writer = wds.TarWriter(f, mtime=0.0)
        for r in t:
            status, stage, reason = r["status"], r["stage"], r["reason"]
            fields = json.loads(r["fields"])
            if status == OK and r["caption"] is not None:  # a conversation record has no global decision
                comp, sim, dkeep, rkeep = decisions[r["key"]]
                fields.update(dedup_component=comp, dedup_nn_similarity=round(float(sim), 5))
                if not dkeep:
                    status, stage, reason = DROPPED, "dedup", f"duplicate_of({comp})"
                elif not rkeep:
                    status, stage, reason = DROPPED, "resample", "resampled_out"
            if status == OK and r["caption"] is None:
                images = [r["image"], *(r.get("more_images") or [])] if r["image"] is not None else []
                record = {"source": r["source"], **fields, "meta": json.loads(r["meta"])}
                writer.write({"__key__": r["key"], **image_members(images), "json": record})
            elif status == OK:
                record = {"caption": r["caption"], "source": r["source"], **fields, "meta": json.loads(r["meta"])}
                writer.write({"__key__": r["key"], "jpg": r["image"], "txt": r["caption"], "json": record})
            counts[status] += 1
            rows.append({"key": r["key"], "source": r["source"], "status": status, "stage": stage, "reason": reason,
                         "shard": f"{name}.tar" if status == OK else None})
        writer.close()
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=STATUS_SCHEMA), sink)
    _atomic_write(out / f"{name}.parquet", sink.getvalue())
    assert counts[OK] + counts[DROPPED] + counts["error"] == counts["inputs"]
    stats = {"shard": name, **counts, "chunks_digest": chunks_digest, "written_at": time.time()}
    _atomic_write(out / f"{name}_stats.json", json.dumps(stats).encode())  # last: the resume marker
    return stats


def image_members(images: list[bytes]) -> dict[str, bytes]:
    """A conversation record's images as tar members: none; one as ``key.jpg``; several as ``key.0.jpg``,
    ``key.1.jpg``, ... in order (``training.codecs.sample_media`` reads both)."""
    if len(images) == 1:
        return {"jpg": images[0]}
    return {f"{k}.jpg": b for k, b in enumerate(images)}


# ----------------------------------------------------------------------------------------------
# Driver


def build_shards(input_spec: str | Path, out_dir: str | Path, cfg: CurationConfig, progress: bool = True,
                 max_chunks: int | None = None, address: str | None = None) -> BuildResult:
    """Run every pass (resuming finished work) and write the report, holding ``out_dir``'s lock; ``out_dir``
    may not lie inside the input folder. Pass 1 runs on Ray (``engine``: a local instance, or the cluster at
    ``address``). ``max_chunks`` stops pass 1 early (used to simulate an interrupted job in tests)."""
    out = Path(out_dir)
    refuse_output_inside_input(input_spec, out)
    check_address(address)
    with output_lock(out):
        return _build_locked(input_spec, out, cfg, progress, max_chunks, address)


def _build_locked(input_spec: str | Path, out: Path, cfg: CurationConfig, progress: bool,
                  max_chunks: int | None, address: str | None) -> BuildResult:
    from data_curation.report import write_report

    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    resume = ResumeConfig(work / "config.json", cfg)
    resume.check()
    t0 = time.perf_counter()

    # Pass 1. Inputs are read here; finished chunks are skipped (still read, for order and for their
    # fingerprint). The config is saved once the stage models loaded.
    inputs = open_input(input_spec, max_sample_bytes=cfg.max_sample_bytes, allow_outside_root=cfg.allow_outside_root,
                        image_folder=cfg.image_folder)
    digests: list[str] = []
    times = run_chunks(_pass1_chunks(inputs, work, cfg, max_chunks, digests), image_stages(cfg, work), cfg,
                       progress=progress, unit="sample", on_setup=resume.save, address=address, crashed=_crashed)
    resume.save()
    n_chunks = len(digests)
    if max_chunks is not None:
        return BuildResult(out, -1, sum((work / f"chunk_{i:05d}.parquet").exists() for i in range(n_chunks)), {}, {})
    refuse_stale_chunk(work / f"chunk_{n_chunks:05d}.parquet")
    chunks_digest = hashlib.sha1(" ".join(digests).encode()).hexdigest()
    t_pass1 = time.perf_counter() - t0

    # Pass 2.
    decisions_t = global_stages(work, n_chunks, cfg, chunks_digest, address)
    decisions = {k: (c, s, d, r) for k, c, s, d, r in zip(*(decisions_t.column(n).to_pylist()
                                                            for n in decisions_t.column_names))}
    t_pass2 = time.perf_counter() - t0 - t_pass1

    # Pass 3: shards written from other global decisions (inputs were added since) are rewritten.
    for i in tqdm(range(n_chunks), desc="shards", disable=not progress):
        stats = out / f"shard_{i:05d}_stats.json"
        if not stats.exists() or json.loads(stats.read_text()).get("chunks_digest") != chunks_digest:
            write_shard(out, work, i, decisions, chunks_digest)
    seconds = {"per_sample": round(t_pass1, 2), "global": round(t_pass2, 2),
               "total": round(time.perf_counter() - t0, 2)}
    report = write_report(out, n_chunks, cfg, seconds, times.report("sample"))
    return BuildResult(out, report["inputs"], n_chunks, report["counts"], report)


def _pass1_chunks(inputs: Iterable[Sample], work: Path, cfg: CurationConfig, max_chunks: int | None,
                  digests: list[str]) -> Iterator[tuple[int, list[Sample]]]:
    """The chunks pass 1 still has to run. Every chunk's ``inputs_digest`` is appended to ``digests``; a
    finished chunk's must match the one it was written with."""
    for i, chunk in _chunks(inputs, cfg.samples_per_shard):
        digest = inputs_digest(chunk)
        digests.append(digest)
        done = work / f"chunk_{i:05d}.parquet"
        if done.exists():
            check_inputs_unchanged(chunk_digest(done), digest, done)
        elif max_chunks is None or i < max_chunks:
            yield i, chunk
