"""``python -m aahr_fast.search``: query an index folder with a raw caption or an image file.

Usage::

    python -m aahr_fast.search --index indexes/f8k-test-images --text "a dog runs on the beach" --k 10
    python -m aahr_fast.search --index indexes/f8k-test-captions --image photo.jpg --html out.html

* ``--text`` (needs an image gallery, ``index --modality image``): the caption is tokenised and run
  through the frozen text backbone exactly as ``aahr_fast.prepare`` does (WordPiece ``[CLS] ... [SEP]``,
  MiniLM ``last_hidden_state`` and its L2-normalised masked mean, rounded to the folder's storage dtype),
  then through the model's text encoder; the top-``k`` images by inner product are returned.
* ``--image`` (needs a caption gallery, ``index --modality text``): EfficientNet-Lite0 7x7 grid regions
  and their mean, as ``prepare`` computes them (RGB, bicubic resize to 224, ``(x/255-0.498)/0.502``),
  then the model's image encoder; the top-``k`` captions are returned.

The model is the index's checkpoint (``--checkpoint`` defaults to it; another checkpoint is refused).
Raw queries need features of the real backbones: the gallery folder's ``meta.json`` (kept in the index
manifest) must name EfficientNet-Lite0 and a local BERT, and when the run's ``data.path`` is a prepared
folder on this machine its ``meta.json`` must name the same backbones and dims (ConfigError otherwise).

Output: one line per result (rank, score, image id, caption(s)) on stdout; ``--json`` writes them;
``--html`` writes a self-contained page (thumbnails embedded as base64 JPEG made with PIL; image files
from the index's ``items.json``, recorded by ``prepare`` in ``{split}_images.txt``, or ``--image-dir/<image id>``;
results with no image file are named in a note on stderr with the flag that fixes it). Files are written atomically.
Exit status: 0 ok, 2 for configuration / data / checkpoint errors (one-line message).
"""
from __future__ import annotations

import argparse
import html
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from aahr_fast.utils.errors import AAHRError, ConfigError, DataError

__all__ = ["search", "render_html", "missing_images_note", "format_results", "build_parser", "main"]


def search(index_dir: str | os.PathLike, *, text: str | None = None, image: str | os.PathLike | None = None,
           k: int = 10, checkpoint: str | os.PathLike | None = None, which: str = "best", device: str = "cpu",
           nprobe: int | None = None, ef_search: int | None = None, gallery: Any = None, loaded: Any = None,
           encoder: Any = None) -> dict:
    """Top-``k`` gallery items for one raw text or image query.

    Args:
        index_dir: index folder written by ``python -m aahr_fast.index``.
        text: caption query (image gallery). image: image file query (caption gallery). Exactly one.
        k: results (capped at the gallery size). checkpoint: the index's checkpoint (default: the one
            recorded in the manifest); which: its pointer for a run folder. device: torch device.
        nprobe / ef_search: override the IVF / HNSW search parameters.
        gallery / loaded / encoder: already loaded :class:`aahr_fast.index.GalleryIndex`,
            :class:`aahr_fast.retrieval.LoadedModel`, :class:`aahr_fast.retrieval.QueryEncoder` to reuse
            across queries (each optional).
    Returns:
        ``{"query": {"kind": "text"|"image", "value": str}, "index": str, "modality": str, "k": int,
        "results": [{"rank": 1.., "score": float, "index": int, "image_id": str, "image_path": str|None,
        "caption": str (caption gallery) | "captions": [str] (image gallery)}]}``.
    Raises:
        ConfigError: not exactly one query, k < 1, query kind not matching the gallery, features of other
            backbones. CheckpointError: another checkpoint than the index's. DataError: unreadable index
            folder / image file, empty caption.
    """
    from aahr_fast.index import GalleryIndex
    from aahr_fast.retrieval import QueryEncoder, load_model, training_data_meta

    from aahr_fast.utils.validate import check_positive_int

    if (text is None) == (image is None):
        raise ConfigError("give exactly one query: --text CAPTION or --image FILE")
    k = check_positive_int("k", k)  # before any model or backbone is loaded
    gi = gallery if gallery is not None else GalleryIndex.load(index_dir)
    want = "image" if text is not None else "text"
    if gi.modality != want:
        have = "an image gallery" if gi.modality == "image" else "a caption gallery"
        raise ConfigError(f"index {gi.folder} is {have}: a --{'text' if text is not None else 'image'} query "
                          f"searches {'images' if want == 'image' else 'captions'}; build that index with "
                          f"python -m aahr_fast.index --modality {want}")
    if loaded is None:
        loaded = load_model(checkpoint if checkpoint is not None else gi.manifest["checkpoint"]["weights"],
                            which=which, device=device)
    gi.check_model(loaded)
    gi.set_search_params(nprobe=nprobe, ef_search=ef_search)
    if encoder is None:
        gmeta = gi.manifest["data"].get("meta")
        if gmeta is None:
            raise ConfigError(f"index {gi.folder} was built from {gi.manifest['data']['folder']}, a folder without "
                              f"meta.json (plain SCAN precomp features): raw queries cannot be encoded for it")
        train_meta, _ = training_data_meta(loaded.config)
        encoder = QueryEncoder(loaded, gmeta, train_meta)
    if text is not None:
        emb = encoder.encode_texts([text])
        query = {"kind": "text", "value": text}
    else:
        emb = encoder.encode_images([image])
        query = {"kind": "image", "value": str(image)}
    scores, ids = gi.search(emb, k)
    results = []
    for rank, (s, j) in enumerate(zip(scores[0].tolist(), ids[0].tolist()), start=1):
        if j < 0:
            continue
        results.append({"rank": rank, "score": float(s), **gi.item(j)})
    return {"query": query, "index": str(gi.folder), "modality": gi.modality, "k": int(k),
            "index_kind": gi.kind, "results": results}


def format_results(result: dict) -> str:
    """Plain-text table of a :func:`search` result: ``rank  score  image_id  caption``."""
    q = result["query"]
    lines = [f"query ({q['kind']}): {q['value']}",
             f"index: {result['index']} ({'images' if result['modality'] == 'image' else 'captions'}, "
             f"{result['index_kind']}), top {len(result['results'])}",
             f"{'rank':>4}  {'score':>9}  {'image_id':<28} caption"]
    for r in result["results"]:
        cap = r["caption"] if result["modality"] == "text" else (r["captions"][0] if r.get("captions") else "")
        lines.append(f"{r['rank']:>4}  {r['score']:>9.5f}  {r['image_id']:<28} {cap}")
    return "\n".join(lines)


def _image_file(path: str | None, image_dir: str | os.PathLike | None, image_id: str) -> Path | None:
    """The image file shown for a result: ``image_dir/<image id>`` first, else the index's path; None if neither exists."""
    cands = []
    if image_dir is not None:
        cands.append(Path(image_dir) / image_id)
    if path:
        cands.append(Path(path))
    return next((c for c in cands if c.is_file()), None)


def _thumb(path: str | None, image_dir: str | os.PathLike | None, image_id: str, size: int) -> str | None:
    from aahr_fast.retrieval import thumbnail_data_uri

    found = _image_file(path, image_dir, image_id)
    if found is None:
        return None
    try:
        return thumbnail_data_uri(found, size)
    except DataError:
        return None


def missing_images_note(result: dict, image_dir: str | os.PathLike | None = None) -> str | None:
    """One line for stderr when ``render_html`` will show "(no image file)" for some results, else None.

    Says whether the index records no image files at all (an index built from a folder prepared before
    ``{split}_images.txt`` existed, or a feature-only source) or records files that are gone, and names
    the flag that fixes it (``--image-dir FOLDER`` holding the gallery images named by image id).
    """
    rows = result.get("results") or []
    missing = [r for r in rows if _image_file(r.get("image_path"), image_dir, r["image_id"]) is None]
    if not missing:
        return None
    recorded = [r for r in missing if r.get("image_path")]
    where = f" nor in --image-dir {image_dir}" if image_dir is not None else ""
    if not recorded:
        what = (f"the index {result.get('index')} records no image files for these images{where} (its prepared "
                f"folder has no <split>_images.txt and its dataset cannot be re-read)")
    else:
        what = (f"{len(recorded)} image files the index records no longer exist{where} "
                f"(e.g. {recorded[0]['image_path']})")
    return (f"note: {len(missing)} of {len(rows)} results have no image file, shown as '(no image file)': "
            f"{what}. Pass --image-dir FOLDER (the gallery images, named by image id, e.g. "
            f"{missing[0]['image_id']}), or rebuild the index from a folder prepared by this version.")


def render_html(result: dict, path: str | os.PathLike, *, image_dir: str | os.PathLike | None = None,
                thumb_size: int = 160) -> int:
    """Write a self-contained HTML page of a :func:`search` result (atomically).

    One ``<tr class="result">`` per result with rank, score, a thumbnail (base64 JPEG ``<img>``, when the
    image file is found: ``image_dir/<image id>`` first, else the path in the index) and the image id /
    caption(s); the query caption, or the query image's thumbnail, heads the page.

    Args:
        result: :func:`search` output. path: ``.html`` file. image_dir: folder holding the gallery images
            by id. thumb_size: longest thumbnail side in px.
    Returns:
        the number of result rows written.
    Raises:
        DataError: the query image cannot be read.
    """
    from aahr_fast.retrieval import thumbnail_data_uri
    from aahr_fast.utils.io import atomic_write

    esc = html.escape
    q = result["query"]
    if q["kind"] == "image":
        head = (f'<p>Query image: {esc(q["value"])}</p><img class="query" alt="query" '
                f'src="{thumbnail_data_uri(q["value"], 2 * thumb_size)}">')
    else:
        head = f'<p>Query caption: <b>{esc(q["value"])}</b></p>'
    rows = []
    for r in result["results"]:
        uri = _thumb(r.get("image_path"), image_dir, r["image_id"], thumb_size)
        img = f'<img alt="{esc(r["image_id"])}" src="{uri}">' if uri else '<span class="noimg">(no image file)</span>'
        if result["modality"] == "text":
            text = f'<b>{esc(r["caption"])}</b>'
        else:
            text = "<br>".join(esc(c) for c in r.get("captions", []))
        rows.append(f'<tr class="result"><td>{r["rank"]}</td><td>{r["score"]:.5f}</td><td>{img}</td>'
                    f'<td><code>{esc(r["image_id"])}</code><br>{text}</td></tr>')
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>aahr_fast search</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}img.query{border:2px solid #36c}"
        ".noimg{color:#999}</style></head><body>\n"
        f"<h1>aahr_fast search</h1>{head}\n"
        f"<p>Index: <code>{esc(result['index'])}</code> ({esc(result['index_kind'])}, "
        f"{'images' if result['modality'] == 'image' else 'captions'}); top {len(rows)} by inner product.</p>\n"
        "<table><tr><th>rank</th><th>score</th><th>image</th><th>item</th></tr>\n"
        + "\n".join(rows) + "\n</table></body></html>\n")
    with atomic_write(path, "w") as fh:
        fh.write(page)
    return len(rows)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m aahr_fast.search",
                                description="Search an aahr_fast index with a raw caption or image file.")
    p.add_argument("--index", required=True, help="index folder (python -m aahr_fast.index)")
    p.add_argument("--checkpoint", default=None, help="the index's checkpoint (default: the one it records)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="caption query: returns images (needs an image gallery)")
    q.add_argument("--image", help="image file query: returns captions (needs a caption gallery)")
    p.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--html", metavar="FILE.html", help="write a self-contained HTML page with thumbnails")
    p.add_argument("--image-dir", default=None,
                   help="folder holding gallery images by id (for --html thumbnails; default: the image files the "
                        "index records, from the prepared folder's <split>_images.txt or its dataset)")
    p.add_argument("--json", metavar="FILE.json", help="write the results as JSON")
    p.add_argument("--which", choices=("best", "last"), default="best", help="pointer used for a run folder")
    p.add_argument("--nprobe", type=int, default=None, help="ivf index: cells probed")
    p.add_argument("--ef-search", type=int, default=None, help="hnsw index: efSearch")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 configuration/data/checkpoint error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.threads is not None:
            import torch

            if args.threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        res = search(args.index, text=args.text, image=args.image, k=args.k, checkpoint=args.checkpoint,
                     which=args.which, device=args.device, nprobe=args.nprobe, ef_search=args.ef_search)
        print(format_results(res), flush=True)
        if args.html:
            n = render_html(res, args.html, image_dir=args.image_dir)
            print(f"wrote {args.html} ({n} results)", file=sys.stderr, flush=True)
            note = missing_images_note(res, args.image_dir)
            if note:
                print(note, file=sys.stderr, flush=True)
        if args.json:
            from aahr_fast.utils.io import atomic_save_json

            atomic_save_json(res, args.json)
        return 0
    except AAHRError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
