#!/usr/bin/env python3
"""file_watcher: fs.v1/file_created -> fs.v1/file_text_extracted with the file's text."""

import json
import os
import sys

MAX_CHARS = 100_000  # text in the result event is capped here
MAX_READ_BYTES = 16 * 1024 * 1024  # bytes of a text file read at most
MAX_PDF_PAGES = 500
TEXT_TYPES = {"text/plain": "text", "text/markdown": "markdown", "text/x-markdown": "markdown",
              "application/pdf": "pdf"}
EXTENSIONS = {".txt": "text", ".text": "text", ".log": "text", ".csv": "text",
              ".md": "markdown", ".markdown": "markdown", ".pdf": "pdf"}
PREFERRED = ["utf_8", "cp1252", "latin_1", "iso8859_15", "utf_16", "cp1251", "shift_jis",
             "gb18030", "euc_kr", "cp1250"]
MIME_OF = {"text": "text/plain", "markdown": "text/markdown", "pdf": "application/pdf"}


def fail(message: str, code: int = 2) -> None:
    print(f"file_watcher: {message}", file=sys.stderr)
    sys.exit(code)


def kind_of(path: str, mime: str | None) -> str:
    if mime:
        kind = TEXT_TYPES.get(mime.split(";")[0].strip().lower())
        if kind:
            return kind
    kind = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if kind:
        return kind
    fail(f"unsupported file type (mime_type={mime!r}, extension "
         f"{os.path.splitext(path)[1]!r}); supported: PDF, Markdown, plain text")
    return ""


def read_text(path: str) -> tuple[str, bool, str]:
    with open(path, "rb") as fh:
        data = fh.read(MAX_READ_BYTES + 1)
    cut = len(data) > MAX_READ_BYTES
    data = data[:MAX_READ_BYTES]
    if not data:
        return "", False, "utf-8"
    try:
        return data.decode("utf-8"), cut, "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes  # only here: its import is most of a UTF-8 run

    matches = list(from_bytes(data[:1024 * 1024]))
    if not matches:
        fail("file is not text in any common encoding")
    # Equal scores are common for Western text; then the more common encoding wins.
    best = min(matches, key=lambda m: (round(m.chaos, 3), -round(m.coherence, 3),
                                       PREFERRED.index(m.encoding) if m.encoding in PREFERRED
                                       else len(PREFERRED)))
    return data.decode(best.encoding, errors="replace"), cut, best.encoding


def read_pdf(path: str) -> tuple[str, bool, int]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        pages = len(reader.pages)
        parts, size = [], 0
        for page in reader.pages[:MAX_PDF_PAGES]:
            text = page.extract_text() or ""
            parts.append(text)
            size += len(text)
            if size > MAX_CHARS:
                break
    except (PyPdfError, ValueError, KeyError, TypeError, RecursionError) as exc:
        fail(f"malformed or oversized PDF: {type(exc).__name__}: {exc}")
    return "\n".join(parts), pages > MAX_PDF_PAGES, pages


def main() -> None:
    with open(os.environ["EVENT_FILE"], encoding="utf-8") as fh:
        event = json.load(fh)
    payload = event.get("payload", {})
    path = payload.get("path")
    if not isinstance(path, str) or not path:
        fail("payload.path is required")
    kind = kind_of(path, payload.get("mime_type"))
    try:
        if kind == "pdf":
            text, cut, pages = read_pdf(path)
            extra = {"pages": pages}
        else:
            text, cut, encoding = read_text(path)
            extra = {"encoding": encoding}
    except FileNotFoundError:
        fail(f"{path}: no such file")
    except PermissionError:
        fail(f"{path}: permission denied")
    except IsADirectoryError:
        fail(f"{path}: is a directory")
    result = {
        "topic": "fs.v1", "event_type": "file_text_extracted",
        "payload": {"path": path, "mime_type": payload.get("mime_type") or MIME_OF[kind],
                    "text": text[:MAX_CHARS], "truncated": cut or len(text) > MAX_CHARS,
                    "chars": len(text), **extra},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
