"""Encoding detection: BOMs, binary sniffing, the plausibility check, and the short-snippet precision figures.

The precision tests generate their own snippets (seeded) and use the codecs themselves as the oracle: a snippet counts
as decoded only when the detected codec gives back exactly the string that was encoded."""

import codecs
import io
import random

import pytest

from gptforge.data.encodings import (
    MIN_SCORE,
    Undecodable,
    binary_reason,
    common_chars,
    decode_lines,
    detect_encoding,
    line_safe,
    plausibility,
    preview,
    sniff_bom,
)

# A few hundred of the most frequent Chinese characters (all GB2312 level 1).
SIMPLIFIED = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多"
    "定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因"
    "由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解"
    "问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少"
    "图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七"
    "海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目"
    "至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算"
    "低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精"
    "值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该"
    "铁价严"
)
# The same characters in traditional form (all in Big5), for the Big5 snippets.
TRADITIONAL = (
    "的一是在不了有和人這中大上個國我以要他時來用們生到作地於出就分對成會可主發年動同工也能下過子說產種面而方後多定"
    "行學法所民得經十三之進等部度家電力如水化高自二理起小物現實加量都兩體制機當使點從業本去把性好應開它合還因由其些"
    "然前外天政四日那社義事平形相全表間樣與關各重新線內數正心反你明看原又麼利比或但質氣第向道命此變條只沒結解問意建"
    "月公無系軍很情者最立代想已通並提直題黨程展五果料象員革位入常文總次品式活設及管特件長求老頭基資邊流路級少圖山統"
    "接知較將組見計別她手角期根論運農指幾九區強放決西被幹做必戰先回則任取據處隊南給色光門即保治北造百規熱領七海口東"
    "導器壓志世金增爭濟階油思術極交受聯什認六共權收證改清己美再採轉更單風切打白教速花帶安場身車例真務具萬每目至達走"
    "積示議聲報鬥完類八離華名確才科張信馬節話米整空元況今集溫傳土許步廣石記需段研界拉林律叫且究觀越織裝影算低持音書"
    "布覆容兒須際商非驗連斷深難近礦千周委素技備半辦青省列習響約支般史感勞便團往酸歷市克何除消構府稱太準精值號率族維"
    "劃選標寫存候毛親快效斯院查江型眼王按格養易置派層片始卻專狀育廠京識適屬圓包火住調滿縣局照參紅細引聽該鐵價嚴"
)


PUNCT = "，。、！？：；「」（）《》"
GERMANIC_ROMANCE = (
    "Über Größe Maße schön fährt Müller Straße Ärzte Öl Äpfel grün später Mädchen Brücke Käse hören weiß Füße Tür "
    "Österreich Ärger Übung Grüße Frühstück été café élève à où garçon français déjà noël hôtel crème naïve Éric "
    "Ça cœur sœur château forêt niño mañana corazón canción España señor Ángel Álvaro árbol Ávila Índice Óscar "
    "Úbeda pequeño acción jamás ação coração São João não Água Ásia Ângela informação INFORMAÇÕES AÇÃO ATENÇÃO "
    "você avó irmã pão"
).split()
PLAIN_WORDS = "und der die das le la les el los que de para com uma ein eine mit sur avec muy bien".split()
CJK = "\u3400-\u9fff\uf900-\ufaff\U00020000-\U0003134f"


def chinese_snippet(rng: random.Random, chars: str) -> str:
    n = rng.randint(10, 50)
    return "".join(rng.choice(PUNCT) if rng.random() < 0.12 else rng.choice(chars) for _ in range(n))


def european_snippet(rng: random.Random, codec: str) -> str:
    """10-50 characters of words, at least one of them accented and all of them encodable in `codec`."""
    while True:
        n, words = rng.randint(10, 50), []
        while len(" ".join(words)) < n:
            words.append(rng.choice(GERMANIC_ROMANCE) if rng.random() < 0.5 else rng.choice(PLAIN_WORDS))
        text = " ".join(words)[:n].strip()
        if not text.isascii() and text.encode(codec, "replace").decode(codec) == text:
            return text


def outcome(text: str, codec: str) -> str:
    raw = text.encode(codec)
    det = detect_encoding(raw)
    if det.codec is None:
        return "quarantined"
    return "exact" if raw[det.bom :].decode(det.codec) == text else "wrong"


@pytest.mark.parametrize(
    "codec,chars,seed", [("gbk", SIMPLIFIED, 1), ("gb18030", SIMPLIFIED, 2), ("big5", TRADITIONAL, 3)]
)
def test_short_chinese_snippets_decode_exactly_or_are_quarantined(codec, chars, seed):
    rng = random.Random(seed)
    counts = {"exact": 0, "quarantined": 0, "wrong": 0}
    for _ in range(1000):
        counts[outcome(chinese_snippet(rng, chars), codec)] += 1
    print(f"{codec}: {counts}")
    assert counts["wrong"] == 0
    assert counts["exact"] >= 990


@pytest.mark.parametrize("codec", ["cp1252", "latin-1"])
def test_european_snippets_never_come_out_as_chinese(codec):
    rng = random.Random(7)
    as_cjk = unknown = 0
    for _ in range(1000):
        raw = european_snippet(rng, codec).encode(codec)
        det = detect_encoding(raw)
        if det.codec is None:
            unknown += 1
            assert "gb18030=" in det.detail and "big5=" in det.detail  # the scores are reported
        elif any("\u3400" <= c for c in raw.decode(det.codec, "replace")):
            as_cjk += 1
    print(f"{codec}: {unknown} of 1000 quarantined as encoding_unknown, {as_cjk} decoded as CJK")
    assert as_cjk == 0
    assert unknown == 1000


def test_decodes_without_error_is_not_evidence():
    raw = "Über Größe und Maße: schön fährt Müller.".encode("cp1252")
    as_gb = raw.decode("gb18030")  # no error: the premise of the plausibility check
    assert as_gb.startswith("躡er Gr鲞e")
    assert plausibility(as_gb, "gb18030") < MIN_SCORE
    assert detect_encoding(raw).codec is None


def test_gb18030_four_byte_characters_round_trip():
    text = "生僻字：𠀀、𠮷、㐀。这是一段包含四字节字符的国标文本，用来检查解码是否完全正确。\n"
    raw = text.encode("gb18030")
    assert len("𠀀".encode("gb18030")) == 4 and len("㐀".encode("gb18030")) == 4
    det = detect_encoding(raw)
    assert det.codec == "gb18030" and raw.decode(det.codec) == text


def test_common_sets_are_the_level_one_ranges():
    gb, big5 = common_chars("gb"), common_chars("big5")
    assert (len(gb), len(big5)) == (3755, 5401)
    assert {"的", "啊", "座"} <= gb and "們" not in gb and "𠮷" not in gb  # 啊 = 0xB0A1 and 座 = 0xD7F9: both ends
    assert {"一", "們", "籲"} <= big5 and "们" not in big5  # 一 = 0xA440, 籲 = 0xC67E
    with pytest.raises(ValueError):
        common_chars("latin")


@pytest.mark.parametrize(
    "head,codec,label,n",
    [
        (b"\xef\xbb\xbfabc", "utf-8", "utf-8-sig", 3),
        (b"\xff\xfea\x00", "utf-16-le", "utf-16", 2),
        (b"\xfe\xff\x00a", "utf-16-be", "utf-16", 2),
        (b"\xff\xfe\x00\x00a\x00\x00\x00", "utf-32-le", "utf-32", 4),
        (b"\x00\x00\xfe\xff\x00\x00\x00a", "utf-32-be", "utf-32", 4),
    ],
)
def test_bom_decides_alone(head, codec, label, n):
    assert sniff_bom(head) == (codec, label, n)
    det = detect_encoding(head)
    assert (det.codec, det.label, det.bom) == (codec, label, n)
    assert head[n:].decode(codec) == "abc"[: len(head[n:].decode(codec))]


@pytest.mark.parametrize(
    "head,what",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "PNG"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"%PDF-1.7\n", "PDF"),
        (b"PK\x03\x04\x14\x00", "ZIP"),
        (b"\x7fELF\x02\x01\x01" + bytes(9), "ELF"),
        (b"MZ\x90\x00\x03\x00\x00\x00", "PE"),
        (b"\x1f\x8b\x08\x00", "gzip"),
        (b"SQLite format 3\x00", "SQLite"),
        (bytes(range(256)) * 4, "NUL"),  # no magic: caught by the control-byte share
    ],
)
def test_binary_is_recognised(head, what):
    assert what in binary_reason(head)


@pytest.mark.parametrize(
    "head",
    [
        b"MZ is the name of a band\n",
        b"a text with a few NUL bytes\x00 here and\x00 there, long enough to be mostly text.\n" * 3,
        "\ufeffUTF-16 text".encode("utf-16-le"),  # NUL-heavy, but the BOM says text
        "日志 \x1b[31mred\x1b[0m\tok\r\n".encode(),
    ],
)
def test_text_is_not_binary(head):
    assert binary_reason(head) is None


def test_a_few_bad_lines_keep_a_file_utf8():
    lines = [f"第{i}行 UTF-8 文本".encode() for i in range(50)]
    lines[7] = b"broken \xff\xfe line"
    assert detect_encoding(b"\n".join(lines)).codec == "utf-8"
    ascii_lines = [b'{"text": "plain ascii"}'] * 100 + [b'{"text": "\xff"}']  # no other non-ASCII line at all
    assert detect_encoding(b"\n".join(ascii_lines)).codec == "utf-8"


def test_mostly_gbk_lines_with_ascii_around_are_gb18030():
    text = "".join(f'{{"id": {i}, "text": "数据清洗的第{i}步：去掉重复的内容。"}}\n' for i in range(20))
    assert detect_encoding(text.encode("gbk")).codec == "gb18030"


def test_truncated_head_still_detects():
    text = "中文abc" * 200_000  # 1.8 MB; a 1 MiB cut falls inside a character
    head = text.encode()[: 1 << 20]
    assert detect_encoding(head, complete=False).codec == "utf-8"
    gb_head = ("数据清洗是训练语言模型的第一步。" * 50_000).encode("gbk")[: (1 << 20) + 1]
    assert detect_encoding(gb_head, complete=False).codec == "gb18030"


def test_forced_encoding_and_unknown_codecs():
    assert detect_encoding("café".encode("cp1252"), forced="cp1252").codec == "cp1252"
    for forced in ["UTF8", "utf-8-sig"]:
        det = detect_encoding(b"\xef\xbb\xbfhi", forced=forced)
        assert (det.codec, det.label, det.bom) == ("utf-8", "utf-8-sig", 3)
    assert detect_encoding(b"hi", forced="utf-8-sig").bom == 0
    with pytest.raises(LookupError):
        detect_encoding(b"x", forced="no-such-codec")


def test_gbk_and_gb18030_listed_together_are_not_a_tie():
    raw = "数据清洗是训练语言模型的第一步。".encode("gbk")
    assert detect_encoding(raw, legacy=["gbk", "gb18030", "big5"]).codec == "gbk"


def test_decode_lines_isolates_bad_lines_and_honours_the_limit():
    raw = b"one\ntw\xffo\nthree\nfour"
    items = list(decode_lines(io.BytesIO(raw), "utf-8"))
    assert items[0] == "one\n" and items[2:] == ["three\n", "four"]
    bad = items[1]
    assert isinstance(bad, Undecodable) and bad.raw == b"tw\xffo\n"
    assert bad.describe("utf-8") == "utf-8: invalid start byte (byte 0xff) at column 3"
    limited = list(decode_lines(io.BytesIO(raw), "utf-8", limit=5))  # the line crossing byte 5 is the last
    assert limited[0] == "one\n" and len(limited) == 2 and limited[1].raw == bad.raw
    utf16 = "a\nb\u2028c\r\nd".encode("utf-16-le")
    assert list(decode_lines(io.BytesIO(utf16), "utf-16-le")) == ["a\n", "b\u2028c\r\n", "d"]  # only \n ends a line
    with pytest.raises(OSError, match="undecodable"):
        list(decode_lines(io.BytesIO("ok\n".encode("utf-16-le") + b"\x00\xd8x\x00"), "utf-16-le"))


def test_line_safety_and_preview():
    assert line_safe("utf-8") and line_safe("gb18030") and line_safe("big5")
    assert not line_safe("utf-16-le") and not line_safe("utf-32")
    assert preview(b"ab\xffc\n") == "ab\\xffc"
    assert preview("x\ud83dy") == "x\\ud83dy"
    assert preview("好" * 500) == "好" * 200
    assert codecs.lookup("gbk")  # the codecs the tests rely on exist in this Python
