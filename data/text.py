"""Bundled default text: Wikipedia and news articles read from the gensim 4.4.0 wheel.

The wheel ships a shortened English Wikipedia dump and the Lee news corpus as test data. We read
them with `zipfile` (gensim itself is never installed), turn the wiki markup into plain text and
cache the result as a `datasets.DatasetDict` with splits `train`, `test` (Wikipedia) and `calib`
(news), so a fresh machine gets a small real corpus without network access at run time.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import datasets

from qat.io.atomic import atomic_dir
from qat.io.env import distqat_home

BUNDLED_TEXT = "bundled:wikitext"  # the data.path that names this text
WHEEL_GLOB = "gensim-4.4.0-*.whl"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
MIN_ARTICLE_CHARS = 500
MARKER = "_COMPLETE"

# Sections that are lists of links or citations rather than prose.
_DROP_SECTIONS = set(
    "references|external links|see also|further reading|notes|bibliography|sources"
    "|footnotes|citations|notes and references|references and notes".split("|")
)
_DROP_LINK_NS = {"file", "image", "category"}
_INTERLANGUAGE = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*|simple")
# Tags whose content is not prose (citations, formulas, image lists, plots, code).
_DROP_TAGS = "ref|gallery|math|chem|ce|timeline|imagemap|score|graph|mapframe|syntaxhighlight|source|pre"
_DROP_TAG_BLOCK = re.compile(rf"<({_DROP_TAGS})\b[^>]*?(?<!/)>.*?</\1\s*>", re.I | re.S)
_DROP_TAG_SINGLE = re.compile(rf"<({_DROP_TAGS})\b[^>]*/\s*>", re.I)
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_INNER_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.S)
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:|mailto:|//)[^\s\]]*(?:\s+([^\]]*))?\]", re.I)
_BRACE_TOKEN = re.compile(r"\{\{|\}\}|\{\||\|\}")
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_LEFTOVER = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "''")


def find_gensim_wheel(search_dirs: list[Path] | None = None) -> Path:
    """Find the gensim 4.4.0 wheel in `$DISTQAT_HOME/wheels`, then in `search_dirs`."""
    wheels_dir = distqat_home() / "wheels"
    dirs = [wheels_dir, *(Path(d) for d in search_dirs or [])]
    for d in dirs:
        found = sorted(d.glob(WHEEL_GLOB)) if d.is_dir() else []
        if found:
            return found[0]
    raise FileNotFoundError(
        f"gensim 4.4.0 wheel not found in {', '.join(map(str, dirs))}; fix: "
        f"pip download --no-deps gensim==4.4.0 -d {wheels_dir} (or run ./launch.sh, which does it)"
    )


def _strip_braces(s: str) -> str:
    """Drop templates `{{..}}` and tables `{|..|}`, which nest inside each other."""
    out, stack, pos, start, opened = [], [], 0, 0, 0
    while True:
        m = _BRACE_TOKEN.search(s, pos)
        if m is None:
            if not stack:
                out.append(s[start:])
                return "".join(out)
            # Unclosed opener: MediaWiki shows it literally, so drop only its two characters.
            stack, pos = [], opened + 2
            start = pos
            continue
        tok, i = m.group(), m.start()
        pos = i + 1  # a rejected token may overlap a real one, as in "|}}"
        if tok == "{{" or (tok == "{|" and _line_start(s, i, " \t:")):
            if not stack:
                out.append(s[start:i])
                opened = i
            stack.append("}}" if tok == "{{" else "|}")
            pos = i + 2
        elif stack and tok == stack[-1] and (tok == "}}" or _line_start(s, i, " \t")):
            stack.pop()
            pos = start = i + 2


def _line_start(s: str, i: int, blanks: str) -> bool:
    return not s[s.rfind("\n", 0, i) + 1 : i].strip(blanks)


def _link(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    target = target.strip()
    prefix = target.split(":", 1)[0].strip() if ":" in target else None
    if prefix is not None and (prefix.lower() in _DROP_LINK_NS or _INTERLANGUAGE.fullmatch(prefix)):
        return ""
    return label.strip() or target.lstrip(":")


def _drop_sections(text: str) -> list[str]:
    """Turn headings into their own paragraphs and drop link-list sections with their bodies."""
    lines, drop_level = [], 0
    for line in text.split("\n"):
        m = _HEADING.match(line.strip())
        if m:
            level = len(m.group(1))
            if drop_level and level > drop_level:
                continue
            title = m.group(2)
            drop_level = level if _clean_inline(title).lower() in _DROP_SECTIONS else 0
            if not drop_level:
                lines += ["", title, ""]
        elif not drop_level:
            lines.append(line)
    return lines


def _resolve_links(s: str) -> str:
    prev = None
    while prev != s:  # innermost links first, so captions with nested links go as a whole
        prev, s = s, _INNER_LINK.sub(_link, s)
    return _EXT_LINK.sub(lambda m: m.group(1) or "", s)


def _clean_inline(s: str) -> str:
    """Tags, quote markup and entities of a template- and link-free string."""
    s = _TAG.sub(lambda m: " " if m.group(0).lower().startswith("<br") else "", s)
    s = re.sub(r"'{2,}", "", s)
    s = re.sub(r"__[A-Z]+__", "", s)
    s = html.unescape(s).replace("\xa0", " ")
    return _TAG.sub("", s)  # escaped tags like &lt;ref&gt; only become tags now


def clean_wikitext(markup: str) -> str:
    """Turn MediaWiki markup into plain text paragraphs, keeping section headings as lines."""
    s = _COMMENT.sub("", markup)
    s = _DROP_TAG_SINGLE.sub("", s)
    s = _DROP_TAG_BLOCK.sub("", s)
    s = _resolve_links(_strip_braces(s))  # on the whole text: file captions span lines
    lines = []
    for line in _drop_sections(s):
        line = _clean_inline(line)
        line = re.sub(r"^[*#:;]+", "", line.strip())
        line = re.sub(r"\(\s*\)", "", re.sub(r"\([,;\s]+", "(", line))  # "(; )" where templates were
        line = re.sub(r"\s+([,.;:])(?=\s|$)", r"\1", re.sub(r"[ \t]+", " ", line)).strip()
        prev = None
        while prev != line:  # safety net: a stray token of broken markup
            prev = line
            for token in _LEFTOVER:
                line = line.replace(token, "")
        if line.startswith("----") or (line and not any(c.isalnum() for c in line)):
            line = ""
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_wiki_articles(wheel: Path) -> Iterator[tuple[str, str]]:
    """Stream `(title, "Title\\n\\n" + plain text)` for the main-namespace articles of the dump."""
    with zipfile.ZipFile(wheel) as zf, zf.open(WIKI_MEMBER) as raw, bz2.open(raw) as xml:
        for _, elem in ElementTree.iterparse(xml, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(e.tag): e for e in elem.iter()}
            title = (fields["title"].text or "").strip()
            ns = (fields["ns"].text or "").strip() if "ns" in fields else "0"
            body = (fields["text"].text or "") if "text" in fields else ""
            elem.clear()
            if ns != "0" or "redirect" in fields or body.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wikitext(body)
            if len(text) >= MIN_ARTICLE_CHARS:
                yield title, f"{title}\n\n{text}"


def iter_lee_articles(wheel: Path) -> Iterator[str]:
    """The Lee background news articles, one per line of the corpus."""
    with zipfile.ZipFile(wheel) as zf:
        for line in zf.read(LEE_MEMBER).decode("utf-8").splitlines():
            if line.strip():
                yield line.strip()


def split_name(title: str) -> str:
    """`test` for 20% of titles, else `train`; hashing the title keeps it stable as articles come and go."""
    bucket = int(hashlib.md5(title.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "test" if bucket in (0, 1) else "train"


def build_text_dataset(wheel: Path) -> datasets.DatasetDict:
    """Build splits `train`/`test` (Wikipedia, dump order) and `calib` (Lee news) with `text`, `source`."""
    rows: dict[str, dict[str, list[str]]] = {s: {"text": [], "source": []} for s in ("train", "test", "calib")}
    for title, text in iter_wiki_articles(wheel):
        split = rows[split_name(title)]
        split["text"].append(text)
        split["source"].append(f"wikipedia:{title}")
    for i, text in enumerate(iter_lee_articles(wheel)):
        rows["calib"]["text"].append(text)
        rows["calib"]["source"].append(f"lee:{i}")
    features = datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string")})
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(cols, features=features) for name, cols in rows.items()}
    )


def load_bundled_text(cache_dir: Path | None = None) -> datasets.DatasetDict:
    """The bundled text, built once into `<cache_dir>/bundled_text` and loaded from there after."""
    cache_dir = Path(cache_dir) if cache_dir is not None else distqat_home()
    final = cache_dir / "bundled_text"
    if (final / MARKER).exists():
        return datasets.load_from_disk(str(final))
    dataset = build_text_dataset(find_gensim_wheel())
    if final.exists() and not (final / MARKER).exists():
        shutil.rmtree(final, ignore_errors=True)  # not ours: we only ever rename complete folders into place
    with atomic_dir(final, replace=False) as tmp:  # another process building it at once: keep its copy
        dataset.save_to_disk(str(tmp))
        (tmp / MARKER).write_text("ok\n")
    return datasets.load_from_disk(str(final))
