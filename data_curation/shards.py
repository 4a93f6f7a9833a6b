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
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from common.conversation import IMAGE_PLACEHOLDER
from data_curation.curation_config import CurationConfig
from data_curation.records import DROPPED, OK, Sample
from data_curation.readers import decode_image, open_input
from data_curation.shard_jobs import (STATUS_SCHEMA, BuildResult, ResumeConfig, StageSetupError, _atomic_write,
                                      _chunks, _replacing, check_inputs_unchanged, guard_text, inputs_digest,
                                      output_lock, refuse_output_inside_input, refuse_stale_chunk, run_chunks)

EMB_DIM = 512


# ----------------------------------------------------------------------------------------------
# Pass 1: per-sample stages


class SampleProcessor:
    """Runs the per-sample stages on a chunk; built once per worker (models load once)."""

    def __init__(self, cfg: CurationConfig):
        try:
            self._setup(cfg)
        except Exception as e:  # one message naming the stage's file or model, before any work starts
            raise StageSetupError(f"cannot set up the curation stages: {type(e).__name__}: {e}") from e

    def _setup(self, cfg: CurationConfig) -> None:
        self.cfg = cfg
        self.lang = self.safety = self.ocr = self.clip = self.sscd = None
        if cfg.language.enabled:
            from data_curation.filters import LanguageId

            self.lang = LanguageId(cfg.language.allowed, cfg.language.min_score)
        if cfg.safety.enabled:
            from data_curation.safety import PHashBlocklist, SafetyFilter, load_classifier

            blocklist = (PHashBlocklist.load(cfg.safety.blocklist, max_distance=cfg.safety.max_distance)
                         if cfg.safety.blocklist else None)
            self.safety = SafetyFilter(blocklist, load_classifier(cfg.safety.classifier),
                                       cfg.safety.classifier_threshold, blur_faces=cfg.safety.blur_faces)
        if cfg.ocr.enabled:
            from data_curation.ocr import TesseractOCR

            self.ocr = TesseractOCR(lang=cfg.ocr.lang, min_conf=cfg.ocr.min_conf, timeout=cfg.ocr.timeout)
        if cfg.clip.enabled:
            from data_curation.filters import ClipScorer

            self.clip = ClipScorer.load(cfg.clip.model, cfg.clip.pretrained)
        if cfg.dedup.enabled:
            from data_curation.sscd import SSCDEmbedder

            self.sscd = SSCDEmbedder.load(cfg.dedup.sscd)

    def process(self, samples: list[Sample]) -> tuple[list[Sample], list[list[bytes]], np.ndarray]:
        """-> samples (statuses and fields set), the encoded images to write per sample (in order; [] if not
        kept), descriptors (n, 512) of the surviving image-caption samples in order."""
        cfg = self.cfg
        images: list[list[Image.Image]] = [[] for _ in samples]
        changed: list[list[bool]] = [[] for _ in samples]
        for i, s in enumerate(samples):
            if not s.ok:
                continue
            try:
                if s.is_conversation:
                    images[i], changed[i] = self._per_conversation(s)
                else:
                    img, ch = self._per_sample(s)
                    images[i], changed[i] = [img], [ch]
            except Exception as e:  # an unexpected failure on one sample never stops the job
                s.fail(s.stage or "stage", f"{type(e).__name__}: {e}")
        # CLIP scores an image against its caption and SSCD feeds the caption pairs' de-duplication: a
        # conversation record has no caption, and many records ask about one image (LLaVA), so neither applies.
        live = [i for i, s in enumerate(samples) if s.ok and not s.is_conversation]
        if self.clip is not None and live:
            scores = self.clip.score([images[i][0] for i in live], [samples[i].caption for i in live],
                                     batch_size=cfg.clip.batch_size)
            for i, score in zip(live, scores):
                samples[i].fields["clip_score"] = round(float(score), 5)
                if score < cfg.clip.threshold:
                    samples[i].drop("clip", f"clip_score({score:.3f}<{cfg.clip.threshold})")
            live = [i for i in live if samples[i].ok]
        emb = np.zeros((0, EMB_DIM), np.float32)
        if self.sscd is not None and live:
            emb = self.sscd.embed([images[i][0] for i in live], batch_size=cfg.dedup.batch_size)
        out_bytes: list[list[bytes]] = [[] for _ in samples]
        for i, s in enumerate(samples):
            if s.ok:
                originals = s.images if s.is_conversation else [s.image_bytes]
                out_bytes[i] = [_jpeg_bytes(b, img, ch, cfg.jpeg_quality)
                                for b, img, ch in zip(originals, images[i], changed[i])]
        return samples, out_bytes, emb.astype(np.float32)

    def _per_sample(self, s: Sample) -> tuple[Image.Image | None, bool]:
        """Caption, language, then the image stages for one image-caption sample -> (image, changed by a stage)."""
        from data_curation.filters import caption_reason

        cfg = self.cfg
        s.stage = "caption"
        reason = caption_reason(s.caption, cfg.caption)
        if reason:
            s.drop("caption", reason)
            return None, False
        if not self._language_ok(s, s.caption):
            return None, False
        img, changed = self._image_stages(s, None, s.fields)
        if s.ok:
            s.stage = None
        return img, changed

    def _per_conversation(self, s: Sample) -> tuple[list[Image.Image], list[bool]]:
        """A conversation record: no caption rules (its turns passed ``llava_reader``'s conversation check),
        language id on the text of its turns, then every image through the image stages (decode, image rules,
        safety, OCR), each image's findings in ``fields["images"][k]``. One image failing fails or drops the
        record (reason ``image k: ...``): without it the record's placeholders would not match its images.
        -> (images, changed by a stage), [] when dropped."""
        text = "\n".join(t["content"].replace(IMAGE_PLACEHOLDER, " ") for t in s.meta["conversations"])
        if not self._language_ok(s, text):
            return [], []
        per_image: list[dict] = []
        s.fields["images"] = per_image
        images, changed = [], []
        for k in range(len(s.images)):
            per_image.append({})
            img, ch = self._image_stages(s, k, per_image[-1])
            if img is None:
                return [], []
            images.append(img)
            changed.append(ch)
        s.stage = None
        return images, changed

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

    def _image_stages(self, s: Sample, index: int | None, fields: dict) -> tuple[Image.Image | None, bool]:
        """Decode, image rules, safety, OCR for the sample's image (``index``: image ``index`` of a conversation
        record, named in the reasons) -> (image, changed by a stage); what they find goes to ``fields``. A
        failure fails or drops ``s`` and gives (None, False)."""
        from data_curation.filters import image_reason

        cfg = self.cfg
        which = "" if index is None else f"image {index}: "
        changed = False
        s.stage = "decode"
        img = decode_image(s, cfg.max_pixels, index)
        if img is None:
            return None, False
        fields.update(width=img.width, height=img.height)
        s.stage = "image"
        reason = image_reason(img, cfg.image)
        if reason:
            s.drop("image", which + reason)
            return None, False
        if self.safety is not None:
            s.stage = "safety"
            out, reason, extra = self.safety.apply(img)
            fields.update(extra)
            if reason or out is None:
                s.drop("safety", which + (reason or "unsafe"))
                return None, False
            changed = out is not img and bool(extra.get("faces_blurred"))
            img = out
        if self.ocr is not None:
            s.stage = "ocr"
            r = self.ocr.read(img)  # a timeout or tesseract failure fails this sample only (caller)
            fields.update(ocr_text=r.text, ocr_mean_conf=round(float(r.mean_conf), 2))
        return img, changed


def _jpeg_bytes(original: bytes | None, img: Image.Image, changed: bool, quality: int) -> bytes:
    """The original file when it is a JPEG no stage changed; otherwise a re-encoded JPEG."""
    if not changed and original is not None and original[:3] == b"\xff\xd8\xff":
        return original
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_processed(work: Path, index: int, processed: tuple[list[Sample], list[list[bytes]], np.ndarray]) -> None:
    """Pass 1's writer for ``shard_jobs.run_chunks``: a chunk processed by ``SampleProcessor.process``."""
    write_chunk(work, index, *processed)


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


def global_stages(work: Path, n_chunks: int, cfg: CurationConfig, chunks_digest: str) -> pa.Table:
    """Dedup then resampling over the image-caption survivors of every chunk -> per-survivor decisions, kept
    with the ``chunks_digest`` they were made from (reused only while it matches). Conversation records are in
    neither: they have no caption to resample by, and records sharing an image are not copies."""
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
                                                    clusters_per_vector=cfg.dedup.clusters_per_vector))
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
        from data_curation.ngram_match import NgramMatcher, Vocabulary
        from data_curation.resample import document_frequencies, resample

        vocab = Vocabulary.default() if cfg.resample.vocab == "default" else Vocabulary.from_file(cfg.resample.vocab)
        matcher = NgramMatcher(vocab)
        live = np.flatnonzero(dedup_keep)
        matches = matcher.match_many([captions[i] for i in live])
        freqs = document_frequencies(matches, len(vocab.entries))
        keep_live = resample(matches, freqs, cfg.resample.t, prob=cfg.resample.prob,
                             keep_unmatched=cfg.resample.keep_unmatched, seed=cfg.resample.seed)
        resample_keep[live] = keep_live
        freq_before = freqs
        freq_after = document_frequencies([m for m, k in zip(matches, keep_live) if k], len(vocab.entries))
        top = np.argsort(-freq_before)[:50]
        stats["resample"] = {"kept": int(keep_live.sum()), "of": int(len(live)),
                             "unmatched": int(sum(1 for m in matches if not m)),
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
                 max_chunks: int | None = None) -> BuildResult:
    """Run every pass (resuming finished work) and write the report, holding ``out_dir``'s lock; ``out_dir``
    may not lie inside the input folder. ``max_chunks`` stops pass 1 early (used to simulate an interrupted
    job in tests)."""
    out = Path(out_dir)
    refuse_output_inside_input(input_spec, out)
    with output_lock(out):
        return _build_locked(input_spec, out, cfg, progress, max_chunks)


def _build_locked(input_spec: str | Path, out: Path, cfg: CurationConfig, progress: bool,
                  max_chunks: int | None) -> BuildResult:
    from data_curation.report import write_report

    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    resume = ResumeConfig(work / "config.json", cfg)
    resume.check()
    t0 = time.perf_counter()

    # Pass 1. Inputs are read in the main process; finished chunks are skipped (still read, for order and
    # for their fingerprint). The config is saved once the stage models loaded.
    inputs = open_input(input_spec, max_sample_bytes=cfg.max_sample_bytes, allow_outside_root=cfg.allow_outside_root,
                        image_folder=cfg.image_folder)
    digests: list[str] = []
    run_chunks(_pass1_jobs(inputs, work, cfg, max_chunks, digests), SampleProcessor, cfg, progress=progress,
               unit="sample", on_setup=resume.save)
    resume.save()
    n_chunks = len(digests)
    if max_chunks is not None:
        return BuildResult(out, -1, sum((work / f"chunk_{i:05d}.parquet").exists() for i in range(n_chunks)), {}, {})
    refuse_stale_chunk(work / f"chunk_{n_chunks:05d}.parquet")
    chunks_digest = hashlib.sha1(" ".join(digests).encode()).hexdigest()
    t_pass1 = time.perf_counter() - t0

    # Pass 2.
    decisions_t = global_stages(work, n_chunks, cfg, chunks_digest)
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
    report = write_report(out, n_chunks, cfg, seconds)
    return BuildResult(out, report["inputs"], n_chunks, report["counts"], report)


def _pass1_jobs(inputs: Iterable[Sample], work: Path, cfg: CurationConfig, max_chunks: int | None,
                digests: list[str]) -> Iterator[tuple]:
    """The chunks pass 1 still has to run, as ``shard_jobs.run_chunks`` jobs. Every chunk's ``inputs_digest``
    is appended to ``digests``; a finished chunk's must match the one it was written with."""
    for i, chunk in _chunks(inputs, cfg.samples_per_shard):
        digest = inputs_digest(chunk)
        digests.append(digest)
        done = work / f"chunk_{i:05d}.parquet"
        if done.exists():
            check_inputs_unchanged(chunk_digest(done), digest, done)
        elif max_chunks is None or i < max_chunks:
            yield _write_processed, i, chunk, str(work)
