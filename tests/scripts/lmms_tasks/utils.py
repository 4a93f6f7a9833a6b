"""lmms-eval hooks of the local tasks beside this file: rows {"id", "image" | "video": an absolute path, "question",
"answer", "choices", "label"} of task.jsonl in the current directory."""

from PIL import Image


def doc_to_visual(doc: dict) -> list:
    """The row's image (PIL, RGB) or video path: what lmms-eval models expect from doc_to_visual."""
    if doc.get("video"):
        return [doc["video"]]
    with Image.open(doc["image"]) as img:
        return [img.convert("RGB")]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(results[0].strip() == doc["answer"].strip())}
