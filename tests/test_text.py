"""gpt.text: sources (files, globs, gutenberg:<id>), cleaning, Gutenberg header/footer stripping."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ALICE, VERDICT, needs_alice, story

from gpt import text
from gpt.errors import UserError

STORY_START = "Alice was beginning to get very tired of sitting by her sister"
# a book as Project Gutenberg serves it (header, markers, CRLF line ends), for the download tests
BOOK_STORY = story(3000, seed=11)
BOOK = (
    "The Project Gutenberg eBook of A Test Story\r\n\r\nThis eBook is for the use of anyone anywhere.\r\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK A TEST STORY ***\r\n"
    + BOOK_STORY.replace("\n", "\r\n")
    + "\r\n*** END OF THE PROJECT GUTENBERG EBOOK A TEST STORY ***\r\nUpdated editions replace this one.\r\n"
).encode("utf-8")


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def load(sources: list[str | Path], cache_dir: Path, clean: bool = True, strip: bool = True) -> list[text.Document]:
    return text.load_documents([str(s) for s in sources], clean=clean, strip_header=strip, cache_dir=cache_dir)


def user_error(sources: list[str | Path], cache_dir: Path) -> str:
    with pytest.raises(UserError) as info:
        load(sources, cache_dir)
    return str(info.value)


# ---------------------------------------------------------------- cleaning


def test_clean_collapses_whitespace_and_newline_runs_to_one_space():
    raw = "  It was\n\n\nthe best\tof\r\n times,\n  it was\u00a0the worst.  \n"
    assert text.clean_text(raw) == "It was the best of times, it was the worst."


def test_clean_keeps_single_spaces_and_punctuation():
    assert text.clean_text("Hello, world! How's it going?") == "Hello, world! How's it going?"


def test_cleaning_can_be_turned_off(tmp_path):
    source = write(tmp_path / "in" / "poem.txt", "Line one\n\nLine two\n")
    (doc,) = load([source], tmp_path / "cache", clean=False)
    assert doc.text == "Line one\n\nLine two\n"


# ---------------------------------------------------------------- Gutenberg stripping


def test_strip_gutenberg_keeps_text_between_markers():
    raw = (
        "Header about the licence\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\n"
        "The story itself.\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\n"
        "Footer with the licence\n"
    )
    assert text.strip_gutenberg(raw).strip() == "The story itself."


def test_strip_gutenberg_leaves_text_without_markers_unchanged():
    raw = "I HAD always thought Jack Gisburn rather a cheap genius--\n\nthough a good fellow enough.\n"
    assert text.strip_gutenberg(raw) == raw


@needs_alice
def test_alice_loses_every_gutenberg_line_and_keeps_the_story(tmp_path):
    # Fails until gpt/text.py's _END also matches the "End of Project Gutenberg's ..." footer line
    # that sits just above the *** END OF ... *** marker (fix in the helper's report on issue 2).
    (doc,) = load([ALICE], tmp_path)
    assert "gutenberg" not in doc.text.lower(), "Project Gutenberg header/footer text survived the stripping"
    assert doc.text.startswith("ALICE'S ADVENTURES IN WONDERLAND Lewis Carroll")
    assert STORY_START in doc.text[:300], "the story's first words must remain, right after the title"
    assert doc.text.endswith("the happy summer days. THE END")


@needs_alice
def test_alice_unstripped_keeps_the_header_without_byte_order_mark(tmp_path):
    (doc,) = load([ALICE], tmp_path, strip=False)
    assert doc.text.startswith("Project Gutenberg's Alice's Adventures in Wonderland")
    assert "\ufeff" not in doc.text and "\r" not in doc.text


def test_file_that_is_only_header_and_footer_is_an_error(tmp_path):
    source = write(
        tmp_path / "hollow.txt",
        "licence\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n",
    )
    assert str(source) in user_error([source], tmp_path / "cache")


# ---------------------------------------------------------------- sources


def test_glob_expands_to_sorted_files_only(tmp_path):
    for name in ("b.txt", "a.txt", "c.md"):
        write(tmp_path / "books" / name, f"text of {name}")
    (tmp_path / "books" / "folder.txt").mkdir()
    docs = load([tmp_path / "books" / "*.txt"], tmp_path / "cache")
    assert [d.name for d in docs] == ["a", "b"]
    assert [d.text for d in docs] == ["text of a.txt", "text of b.txt"]


def test_recursive_glob(tmp_path):
    write(tmp_path / "books" / "x" / "deep.txt", "deep")
    write(tmp_path / "books" / "top.txt", "top")
    paths = text.expand_sources([str(tmp_path / "books" / "**" / "*.txt")], tmp_path / "cache")
    assert {p.name for p in paths} == {"deep.txt", "top.txt"}


def test_same_file_twice_is_read_once(tmp_path):
    source = write(tmp_path / "a.txt", "once")
    assert len(load([source, source, tmp_path / "*.txt"], tmp_path / "cache")) == 1


def test_glob_without_matches_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "*.txt")
    message = user_error([pattern], tmp_path / "cache")
    assert pattern in message and "matches no file" in message


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "missing.txt"
    message = user_error([missing], tmp_path / "cache")
    assert str(missing) in message and "not found" in message


def test_directory_is_named_with_a_glob_hint(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    message = user_error([folder], tmp_path / "cache")
    assert str(folder) in message and "directory" in message and "*.txt" in message


@pytest.mark.parametrize("content", ["", "   \n\n\t  "], ids=["empty", "whitespace"])
def test_empty_file_is_named(tmp_path, content):
    source = write(tmp_path / "empty.txt", content)
    message = user_error([source], tmp_path / "cache")
    assert str(source) in message and "empty" in message


def test_non_utf8_file_is_named(tmp_path):
    source = write(tmp_path / "latin1.txt", "Caf\xe9 au lait, na\xefve r\xe9sum\xe9".encode("latin-1"))
    message = user_error([source], tmp_path / "cache")
    assert str(source) in message and "UTF-8" in message


def test_binary_file_is_named(tmp_path):
    source = write(tmp_path / "model.bin", b"PK\x03\x04\x00\x00\x00binary\x00payload")
    message = user_error([source], tmp_path / "cache")
    assert str(source) in message and "binary" in message


def test_no_sources_is_an_error(tmp_path):
    assert "--data" in user_error([], tmp_path)


def test_cleaned_text_is_written_to_the_cache_not_next_to_the_input(tmp_path):
    inputs, cache = tmp_path / "inputs", tmp_path / "cache"
    source = write(inputs / "story.txt", "Once upon\n\n a time.\n")
    load([source], cache)
    assert sorted(p.name for p in inputs.iterdir()) == ["story.txt"], "nothing may be written beside the input"
    cleaned = list(cache.rglob("cleaned_story.txt"))
    assert len(cleaned) == 1, f"expected cleaned_story.txt under {cache}"
    assert cleaned[0].read_text(encoding="utf-8") == "Once upon a time."


def test_cleaned_text_is_refreshed_when_the_input_changes(tmp_path):
    source = write(tmp_path / "story.txt", "first version")
    load([source], tmp_path / "cache")
    write(source, "second version")
    load([source], tmp_path / "cache")
    (cleaned,) = (tmp_path / "cache").rglob("cleaned_story.txt")
    assert cleaned.read_text(encoding="utf-8") == "second version"


# ---------------------------------------------------------------- gutenberg:<id>


class _AliceMirror(http.server.BaseHTTPRequestHandler):
    """Serves BOOK as /pg11.txt and 404 for anything else; counts requests."""

    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        type(self).requests.append(self.path)
        if self.path != "/pg11.txt":
            self.send_error(404)
            return
        body = BOOK
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch) -> Iterator[http.server.HTTPServer]:
    """A local Gutenberg mirror on a free port, reached through $GPT_GUTENBERG_URL."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    _AliceMirror.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AliceMirror)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GPT_GUTENBERG_URL", f"http://127.0.0.1:{server.server_address[1]}/pg{{id}}.txt")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_gutenberg_download_then_cache_without_the_server(tmp_path, mirror):
    cache = tmp_path / "cache"
    (doc,) = load(["gutenberg:11"], cache)
    assert _AliceMirror.requests == ["/pg11.txt"]
    assert doc.path.is_relative_to(cache), "the downloaded book lives in the cache"
    assert doc.path.read_bytes() == BOOK
    assert doc.text == text.clean_text(BOOK_STORY), "the story, without the Gutenberg lines"

    mirror.shutdown()
    mirror.server_close()
    (again,) = load(["gutenberg:11"], cache)
    assert again.text == doc.text
    assert _AliceMirror.requests == ["/pg11.txt"], "the second call must read the cache, not download"
    assert not list(cache.rglob("*.part")), "no partial download may be left behind"


def test_gutenberg_id_must_be_a_number(tmp_path):
    message = user_error(["gutenberg:alice"], tmp_path)
    assert "gutenberg:alice" in message


def test_gutenberg_missing_book_names_the_id_and_url(tmp_path, mirror):
    message = user_error(["gutenberg:99"], tmp_path)
    assert "gutenberg:99" in message and "/pg99.txt" in message
    assert not list(tmp_path.rglob("pg99*")), "a failed download must not leave a file in the cache"


def test_gutenberg_unreachable_server_is_a_user_error(tmp_path, monkeypatch):
    with http.server.HTTPServer(("127.0.0.1", 0), _AliceMirror) as closed:
        port = closed.server_address[1]  # bound, then closed on exit: nothing listens there
    monkeypatch.setenv("GPT_GUTENBERG_URL", f"http://127.0.0.1:{port}/pg{{id}}.txt")
    message = user_error(["gutenberg:11"], tmp_path)
    assert "gutenberg:11" in message
    assert "GPT_GUTENBERG_URL" in message and "--data book.txt" in message, "the offline fix is named"


def test_a_gutenberg_download_that_is_no_text_is_not_kept_and_a_fixed_mirror_is_then_used(tmp_path, monkeypatch):
    pages = tmp_path / "mirror"
    pages.mkdir()
    (pages / "pg11.txt").write_bytes(bytes(range(256)))  # a binary page where the book should be
    monkeypatch.setenv("GPT_GUTENBERG_URL", f"{pages.as_uri()}/pg{{id}}.txt")
    cache = tmp_path / "cache"
    message = user_error(["gutenberg:11"], cache)
    assert message.startswith("data: the download of gutenberg:11 from file://") and "looks binary" in message
    assert not list(cache.rglob("pg11*")), "a download that is no book must not be kept"
    (pages / "pg11.txt").write_bytes(BOOK)  # the mirror fixed: the next try downloads again
    (doc,) = load(["gutenberg:11"], cache)
    assert doc.path.read_bytes() == BOOK


def test_a_gutenberg_mirror_that_gives_a_pipe_is_refused_not_waited_on(tmp_path, monkeypatch):
    pages = tmp_path / "mirror"
    pages.mkdir()
    os.mkfifo(pages / "pg11.txt")  # urllib would block reading it
    monkeypatch.setenv("GPT_GUTENBERG_URL", f"{pages.as_uri()}/pg{{id}}.txt")
    message = user_error(["gutenberg:11"], tmp_path / "cache")
    assert message.startswith("data: gutenberg:11 from GPT_GUTENBERG_URL: ") and "is not a regular file" in message


def test_caches_taken_by_files_are_skipped_with_a_warning(tmp_path, capsys):
    """A cache is only a cache: its cleaned/ or tokens/ folder taken by a file costs a warning, not the run."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cleaned").write_text("a file where the folder goes")
    (doc,) = load([VERDICT], cache)
    assert doc.text and "warning: the cleaned text is not kept" in capsys.readouterr().err


def test_a_gutenberg_book_whose_cache_folder_is_a_file_is_a_user_error(tmp_path, mirror):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "gutenberg").write_text("a file where the folder goes")
    message = user_error(["gutenberg:11"], cache)
    assert message.startswith(f"data: cannot keep gutenberg:11 in {cache / 'gutenberg'}: ")
