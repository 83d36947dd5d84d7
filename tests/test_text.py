"""Tests of the bundled text extracted from the gensim 4.4.0 wheel (data/text.py).

The wheel must be in $DISTQAT_HOME/wheels (CI downloads it there); a missing wheel fails the tests
rather than skipping them, so the corpus never silently goes untested.
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import pytest

from data import text
from data.text import (
    build_text_dataset,
    clean_wikitext,
    find_gensim_wheel,
    iter_lee_articles,
    load_bundled_text,
    split_name,
)
from qat.keys import COMPLETE_MARKER

# Regression guard: these change only if the extraction or the split rule changes.
EXPECTED_ROWS = {"train": 86, "test": 18, "calib": 300}
EXPECTED_CHARS = {"train": 2487057, "test": 321393, "calib": 359484}
LEFTOVER_TOKENS = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "'''", "''")
DROPPED_HEADINGS = {"References", "External links", "See also", "Further reading", "Notes", "Bibliography", "Sources"}


@pytest.fixture(scope="module")
def wheel() -> Path:
    try:
        return find_gensim_wheel()
    except FileNotFoundError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def dataset(wheel: Path) -> datasets.DatasetDict:
    return build_text_dataset(wheel)


@pytest.fixture(scope="module")
def wiki(dataset: datasets.DatasetDict) -> dict[str, str]:
    """Title -> text of every extracted Wikipedia article, over both splits."""
    return {
        source.removeprefix("wikipedia:"): body
        for split in ("train", "test")
        for source, body in zip(dataset[split]["source"], dataset[split]["text"])
    }


def test_clean_wikitext_snippet():
    markup = """{{Infobox person
| name = {{nowrap|Jane {{small|Doe}}}}
| born = 1900
}}
'''Jane Doe''' (born 1900) was a ''[[Physics|physicist]]'' from [[Paris]].<ref name="a">Cited {{cite web|url=x}}</ref>\
 She won prizes.<ref name="b" />
[[File:Jane.jpg|thumb|Jane at the [[Sorbonne|university]] in 1920]]
<!-- hidden note -->
{| class="wikitable"
|-
! Year !! Prize
|-
| 1920 || {{flag|France}}
|}

== Early life ==
She read [http://example.org her diary] and [http://example.org/bare] it.&nbsp;Done&amp;dusted.
* first item
# second item
__NOTOC__

== References ==
{{reflist}}
* [http://example.org Some source]

[[Category:Physicists]]
[[de:Jane Doe]]
"""
    assert clean_wikitext(markup) == (
        "Jane Doe (born 1900) was a physicist from Paris. She won prizes.\n\n"
        "Early life\n\n"
        "She read her diary and it. Done&dusted.\nfirst item\nsecond item"
    )


def test_clean_wikitext_nesting_and_sections():
    markup = """Intro with <small>small text</small> and <math>x^2</math> formula.
{| class="a"
| outer
{|
| inner {{tmpl|x}}
|}
| outer again
|}
After table [[Target]]s and a broken {{unclosed template.
;Term: definition
== See also ==
* [[Foo]]
=== Sub of see also ===
text
== Legacy ==
Still here.<br/>Next.
: indented
----
.
"""
    assert clean_wikitext(markup) == (
        "Intro with small text and formula.\n\n"
        "After table Targets and a broken unclosed template.\nTerm: definition\n\n"
        "Legacy\n\n"
        "Still here. Next.\nindented"
    )


def test_wiki_articles_are_plain_text(wiki: dict[str, str]):
    assert len(wiki) == EXPECTED_ROWS["train"] + EXPECTED_ROWS["test"]
    for title, body in wiki.items():
        assert body.startswith(f"{title}\n\n")
        assert len(body) - len(title) - 2 >= text.MIN_ARTICLE_CHARS, title
        for token in LEFTOVER_TOKENS:
            assert token not in body, (title, token)
        lines = body.split("\n")
        assert "\n\n\n" not in body, title
        for line in lines:
            assert line == line.strip(), (title, line)
            assert not line or any(c.isalnum() for c in line), (title, line)
            assert line not in DROPPED_HEADINGS, (title, line)


def test_headings_kept(wiki: dict[str, str]):
    lines = wiki["Anarchism"].split("\n")
    for heading in ("Etymology and terminology", "History", "Anarcho-syndicalism"):
        i = lines.index(heading)
        assert lines[i - 1] == "" and lines[i + 1] == "", heading


def test_redirects_and_short_pages_skipped(wiki: dict[str, str]):
    assert "AccessibleComputing" not in wiki  # a redirect
    assert "Anarchism" in wiki and "Alien" in wiki


def test_split_sizes_are_stable(dataset: datasets.DatasetDict):
    assert set(dataset) == {"train", "test", "calib"}
    for split, ds in dataset.items():
        assert ds.column_names == ["text", "source"]
        assert ds.num_rows == EXPECTED_ROWS[split], split
        assert sum(map(len, ds["text"])) == EXPECTED_CHARS[split], split
    assert dataset["train"]["source"][0] == "wikipedia:Anarchism"  # dump order
    assert dataset["calib"]["source"][:2] == ["lee:0", "lee:1"]


def test_splits_are_disjoint_and_follow_split_name(dataset: datasets.DatasetDict):
    titles = {split: [s.removeprefix("wikipedia:") for s in dataset[split]["source"]] for split in ("train", "test")}
    assert not set(titles["train"]) & set(titles["test"])
    assert all(split_name(t) == split for split, ts in titles.items() for t in ts)
    assert [split_name(t) for t in ("Anarchism", "Autism", "Actrius", "Alain Connes")] == [
        "train",
        "train",
        "test",
        "test",
    ]


def test_lee_articles(wheel: Path, dataset: datasets.DatasetDict):
    lee = list(iter_lee_articles(wheel))
    assert len(lee) == 300 and all(a == a.strip() and a for a in lee)
    assert dataset["calib"]["text"] == lee


def test_find_gensim_wheel_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DISTQAT_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape("pip download --no-deps gensim==4.4.0 -d")):
        find_gensim_wheel()


def test_find_gensim_wheel_extra_dirs(wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DISTQAT_HOME", str(tmp_path))
    assert find_gensim_wheel(search_dirs=[tmp_path / "missing", wheel.parent]) == wheel


def _forbid(*_args, **_kwargs):
    raise AssertionError("rebuilt although the cache was complete")


def test_load_bundled_text_caches(tmp_path: Path, dataset: datasets.DatasetDict, monkeypatch: pytest.MonkeyPatch):
    # Leftovers of a killed run: a temp folder and a final folder without the marker.
    (tmp_path / ".bundled_text-dead").mkdir()
    (tmp_path / ".bundled_text-dead" / "dataset_dict.json").write_text("{")
    (tmp_path / "bundled_text").mkdir()
    (tmp_path / "bundled_text" / "junk").write_text("half")

    first = load_bundled_text(tmp_path)
    assert (tmp_path / "bundled_text" / COMPLETE_MARKER).exists()
    assert not (tmp_path / "bundled_text" / "junk").exists()
    assert first["test"]["text"] == dataset["test"]["text"]

    monkeypatch.setattr(text, "build_text_dataset", _forbid)
    monkeypatch.setattr(text, "find_gensim_wheel", _forbid)
    second = load_bundled_text(tmp_path)
    for split in dataset:
        assert second[split]["text"] == first[split]["text"]
        assert second[split]["source"] == first[split]["source"]


def test_load_bundled_text_lost_race(tmp_path: Path, dataset: datasets.DatasetDict, monkeypatch: pytest.MonkeyPatch):
    winner = datasets.DatasetDict({"train": dataset["test"], "test": dataset["test"], "calib": dataset["calib"]})

    def build_while_another_process_finishes(_wheel: Path) -> datasets.DatasetDict:
        winner.save_to_disk(str(tmp_path / "bundled_text"))
        (tmp_path / "bundled_text" / COMPLETE_MARKER).write_text("ok\n")
        return dataset

    monkeypatch.setattr(text, "build_text_dataset", build_while_another_process_finishes)
    loaded = load_bundled_text(tmp_path)
    assert loaded["train"]["text"] == winner["train"]["text"]  # theirs, not ours
    assert [p.name for p in tmp_path.iterdir()] == ["bundled_text"]  # our temp folder is gone
