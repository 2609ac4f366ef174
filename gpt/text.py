"""Text sources: files, globs and gutenberg:<id>; cleaning; Project Gutenberg header/footer stripping."""

from __future__ import annotations

import glob
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gpt import env
from gpt.errors import UserError, cache_write, check_file

MAX_PROMPT_CHARS = 1_000_000  # the model sees only the last context_length tokens; more is a mistake
TOO_LONG = (
    f"at most {MAX_PROMPT_CHARS:,} characters make sense, as the model sees only the last context_length "
    "tokens: pass the end of the text"
)
_WHITESPACE = re.compile(r"\s+")
_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
# The footer starts at "*** END OF ... ***" or at the "End of (the) Project Gutenberg's ..." line before it.
_END = re.compile(
    r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG).*$", re.MULTILINE | re.IGNORECASE
)


@dataclass(frozen=True)
class Document:
    """One source text after stripping and cleaning."""
    name: str  # file stem, used for cleaned_<name>.txt
    path: Path  # where the raw text lives (a downloaded book lives in the cache)
    text: str  # after optional stripping and cleaning


def clean_text(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space, as the reference implementation does."""
    return _WHITESPACE.sub(" ", text).strip()


def strip_gutenberg(text: str) -> str:
    """Keep only what lies between the *** START OF ... *** and *** END OF ... *** markers.

    Texts without the markers come back unchanged, so this is safe to leave on.
    """
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text


def expand_sources(sources: list[str], cache_dir: Path) -> list[Path]:
    """Turn paths, globs and gutenberg:<id> into a sorted, de-duplicated list of existing files."""
    if not sources:
        raise UserError("no data given: pass --data FILE (a .txt file, a glob or gutenberg:<id>)")
    paths: list[Path] = []
    for source in sources:
        if not source.strip():
            raise UserError("data: an empty path; give a .txt file, a glob or gutenberg:<id>")
        if source.startswith("gutenberg:"):
            paths.append(download_gutenberg(source.split(":", 1)[1], cache_dir))
        elif glob.has_magic(source):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise UserError(f"data: the pattern {source!r} matches no file")
            paths.extend(files)
        else:
            path = Path(source).expanduser()
            if os.path.isdir(path):  # False, not an error, for a name too long: check_file says that
                raise UserError(f"data: {path} is a directory; give .txt files or a glob such as '{path}/*.txt'")
            where = "" if path.is_absolute() else f" (in the working folder {Path.cwd()})"
            paths.append(check_file(path, "data:", missing=f"data: file not found: {path}{where}"))
    return list(dict.fromkeys(paths))


def read_text(path: Path) -> str:
    """A file's text (UTF-8, BOM dropped); UserError for a missing, binary, non-UTF-8 or empty file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"data: cannot read {path}: {exc.strerror}") from None
    return text_of(raw, str(path))


def text_of(raw: bytes, name: str) -> str:
    """raw as text (UTF-8, BOM dropped); UserError naming `name` for binary, non-UTF-8 or empty bytes."""
    if b"\x00" in raw:
        raise UserError(f"data: {name} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"data: {name} is not UTF-8 text (bad byte at offset {exc.start})") from None
    if not text.strip():
        raise UserError(f"data: {name} is empty")
    return text


def load_documents(sources: list[str], clean: bool, strip_header: bool, cache_dir: Path) -> list[Document]:
    """Read every source, strip and clean it, and save the cleaned text as cleaned_<name>.txt in the cache."""
    documents = []
    for path in expand_sources(sources, cache_dir):
        text = read_text(path)
        if strip_header:
            text = strip_gutenberg(text)
        if clean:
            text = clean_text(text)
        if not text.strip():
            raise UserError(f"data: {path} holds no text once cleaned")
        documents.append(Document(name=path.stem, path=path, text=text))
    save_cleaned(documents, cache_dir / "cleaned")
    return documents


def save_cleaned(documents: list[Document], directory: Path) -> None:
    """Keep the cleaned text for inspection; the input's directory may be read-only, so use the cache."""
    with cache_write("cleaned text", directory):
        directory.mkdir(parents=True, exist_ok=True)
        for doc in documents:
            target = directory / f"cleaned_{doc.name}.txt"
            if not target.exists() or target.read_text(encoding="utf-8") != doc.text:
                target.write_text(doc.text, encoding="utf-8")


def download_gutenberg(book_id: str, cache_dir: Path) -> Path:
    """Fetch a Project Gutenberg book once; later calls read the cached copy.

    $GPT_GUTENBERG_URL (with {id}) points the download elsewhere, e.g. a mirror (gpt.env).
    """
    if not book_id.isdigit():
        raise UserError(f"data: gutenberg:{book_id} - the book id must be a number, e.g. gutenberg:11")
    target = cache_dir / "gutenberg" / f"pg{book_id}.txt"
    if target.is_file():
        return target
    url = env.gutenberg_url().format(id=book_id)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file" and os.path.lexists(local := Path(urllib.request.url2pathname(parts.path))):
        check_file(local, f"data: gutenberg:{book_id} from {env.GUTENBERG_URL}:")  # urllib would wait on a pipe
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:  # ValueError: a malformed address
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"data: could not download gutenberg:{book_id} from {url} ({reason}); offline, give the book as a "
            f"file (--data book.txt) or point {env.GUTENBERG_URL} at a mirror, with {{id}} for the number"
        ) from None
    try:  # a page that is no book (an error page, a binary) is not kept: a later try downloads again
        text_of(body, f"the download of gutenberg:{book_id} from {url}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        partial.write_bytes(body)
        partial.replace(target)  # atomic: an interrupted download never looks complete
    except OSError as exc:
        raise UserError(f"data: cannot keep gutenberg:{book_id} in {target.parent}: {exc.strerror or exc}") from None
    return target


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt text from exactly one of --prompt and --prompt-file."""
    if (prompt is None) == (prompt_file is None):
        raise UserError("give exactly one of --prompt TEXT and --prompt-file FILE")
    if prompt is not None:
        return prompt
    path = check_file(Path(prompt_file).expanduser(), "prompt file")
    if path.stat().st_size > 4 * MAX_PROMPT_CHARS:  # UTF-8 takes at most 4 bytes a character
        raise UserError(f"prompt file {path} has {path.stat().st_size:,} bytes; {TOO_LONG}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompt file {path}: {exc}") from None
