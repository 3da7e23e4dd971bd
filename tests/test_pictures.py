"""Per-trajectory pictures: valid PNGs, self-contained HTML with the right marks, Markdown, the
batch report, and the token-text helpers. Small inputs: matplotlib dominates the runtime."""
import re

import matplotlib.image
import numpy as np
import pytest

from opdjax.teachability import pictures as pc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def example(sent_lens=(3, 4, 2, 5), split=2):
    sent = np.concatenate([[j] * n for j, n in enumerate(sent_lens)]).astype(np.int32)
    T = len(sent)
    g = np.where(sent < split, 2.0, 0.5) + np.sin(np.arange(T))
    scores = np.array([g[sent == j].mean() for j in range(len(sent_lens))])
    r = int((sent < split).sum())
    return sent, g, scores, r


def assert_valid_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0.01  # not a blank canvas


# ----------------------------------------------------------------------------- PNG

def test_plot_trajectory_writes_a_png(tmp_path):
    sent, g, scores, r = example()
    out = pc.plot_trajectory(tmp_path / "t.png", g, sent, scores, 2, True, 5.5,
                             scores[:2].mean(), scores[2:].mean(), r, title="demo", margin_name="advantage_gap")
    assert_valid_png(out)


@pytest.mark.parametrize("case", ["not_detected", "empty", "one_sentence", "nan_means", "no_candidate",
                                  "release_mid_sentence"])
def test_plot_trajectory_edge_cases(tmp_path, case):
    sent, g, scores, r = example()
    args = dict(split=2, detected=True, delta_bic=3.0, mean_left=1.0, mean_right=0.2, release_index=r)
    if case == "not_detected":
        args.update(detected=False, delta_bic=-4.0, release_index=len(g))
    elif case == "empty":
        sent, g, scores = sent[:0], g[:0], scores[:0]
        args.update(split=0, detected=False, release_index=0)
    elif case == "one_sentence":
        sent, g, scores = np.zeros(5, np.int32), g[:5], scores[:1]
        args.update(split=0, detected=False, release_index=5)
    elif case == "nan_means":
        args.update(detected=False, delta_bic=float("nan"), mean_left=float("nan"),
                    mean_right=float("nan"), release_index=len(g))
    elif case == "no_candidate":  # the scan's answer when no downward split exists
        args.update(split=len(scores), detected=False, delta_bic=float("-inf"), release_index=len(g))
    elif case == "release_mid_sentence":  # a baseline's release point
        args.update(release_index=r + 1)
    out = pc.plot_trajectory(tmp_path / f"{case}.png", g, sent, scores, **args)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.image.imread(out).shape[0] > 100


# ----------------------------------------------------------------------------- HTML

def count(pattern, page):
    return len(re.findall(pattern, page))


def test_html_marks_sentences_release_and_escapes_text(tmp_path):
    sent, g, _, r = example()
    texts = [f"t{i} " for i in range(len(sent))]
    texts[1] = "<b>&\"x\" "  # must come out escaped, supervised ...
    texts[-1] = "<u>"  # ... or released
    w = np.where(np.arange(len(sent)) < r, 1.0, np.maximum(0.0, 1 - (np.arange(len(sent)) - r + 1) / 4))
    page = pc.render_html(tmp_path / "t.html", texts, sent, w, r,
                          {"ΔBIC": 5.5, "detected": True, "note": "<i>"}, token_margins=g).read_text()
    assert "&lt;b&gt;&amp;&quot;x&quot;" in page and "&lt;u&gt;" in page
    assert not re.search("<[biu]>", page)
    assert count(r'class="sent ', page) == 4
    assert count(r'class="tok rel"', page) == len(sent) - r
    assert count(r'class="tok"', page) == r
    assert count(r'class="release-mark"', page) == 1
    assert page.index('class="release-mark"') < page.index(">t%d <" % r)
    assert page.index(">t%d <" % (r - 1)) < page.index('class="release-mark"')
    # Fade: opacity 0.3 + 0.7 w on the released tokens, in order.
    opac = [float(x) for x in re.findall(r'class="tok rel" style="opacity:([0-9.]+)"', page)]
    np.testing.assert_allclose(opac, 0.3 + 0.7 * w[r:], atol=0.006)
    assert "ΔBIC" in page and "5.5" in page
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page


def test_html_inlines_the_png(tmp_path):
    sent, g, scores, r = example()
    png = pc.plot_trajectory(tmp_path / "t.png", g, sent, scores, 2, True, 5.5, 1.0, 0.3, r)
    page = pc.render_html(tmp_path / "t.html", ["a"] * len(sent), sent, np.ones(len(sent)), r, {},
                          png_path=png).read_text()
    assert 'src="data:image/png;base64,iVBORw0KGgo' in page  # base64 of the PNG magic


@pytest.mark.parametrize("case", ["not_released", "empty", "one_sentence"])
def test_html_edge_cases(tmp_path, case):
    sent, _, _, r = example()
    texts = ["x\n"] * len(sent)
    if case == "not_released":
        r = len(sent)
    elif case == "empty":
        sent, texts, r = sent[:0], [], 0
    else:
        sent, r = np.zeros(len(sent), np.int32), len(sent)
    page = pc.render_html(tmp_path / "t.html", texts, sent, np.ones(len(sent)), r, {"detected": False}).read_text()
    assert count(r'class="sent ', page) == (0 if case == "empty" else 1 if case == "one_sentence" else 4)
    assert count(r'class="tok rel"', page) == 0 and count(r'class="release-mark"', page) == 0
    pc.render_markdown(tmp_path / "t.md", texts, sent, r, {"ΔBIC": float("-inf")})
    assert "| ΔBIC | -inf |" in (tmp_path / "t.md").read_text()
    assert page.rstrip().endswith("</html>")


# ----------------------------------------------------------------------------- Markdown

def test_markdown_one_sentence_a_line_and_release_line(tmp_path):
    sent, _, _, r = example()
    texts = [f"w{i}" + ("\n" if i == 0 else " ") for i in range(len(sent))]
    texts[2] = "```"  # the fence must not close early
    md = pc.render_markdown(tmp_path / "t.md", texts, sent, r + 1, {"ΔBIC": 1.25}).read_text()
    assert "| ΔBIC | 1.25 |" in md
    lines = md.splitlines()
    assert sum(bool(re.match(r"\[ ?\d+\] ", line)) for line in lines) == 5  # 4 sentences, one cut by r
    cut = lines.index(f"---- release (r = {r + 1}) ----")
    assert lines[cut - 1].endswith(f"w{r} ") and lines[cut + 1].startswith(f"[ 2] w{r + 1}")
    assert "w0↵" in md
    assert "````text" in md


# ----------------------------------------------------------------------------- token texts

def test_token_texts_from_char_spans_keep_every_character():
    text = "  Hello world.\n\nNext one!"
    spans = np.array([[2, 7], [7, 13], [13, 14], [16, 20], [20, 24], [25, 25]])  # gaps and an EOS
    pieces = pc.token_texts_from_char_spans(text, spans)
    assert "".join(pieces) == text
    assert pieces[0] == "  Hello" and pieces[2] == ".\n\n" and pieces[-1] == ""
    assert pc.token_texts_from_char_spans("", np.zeros((0, 2))) == []


def test_decode_token_texts_gives_multibyte_chars_to_the_completing_token():
    text = "Héllo → ok 🙂."
    ids = list(text.encode("utf-8"))  # a byte-level "tokenizer": one token per byte
    decode = lambda xs: bytes(xs).decode("utf-8", errors="replace")  # noqa: E731
    pieces = pc.decode_token_texts(decode, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # é is 2 bytes
    assert pieces[-2] == "🙂" and pieces[-5:-2] == ["", "", ""]


# ----------------------------------------------------------------------------- batch report

def batch(B=6, R=16, J=5, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.array([16, 12, 0, 9, 16, 5])[:B]
    mask = np.arange(R)[None] < lengths[:, None]
    sent = np.where(mask, np.minimum(np.arange(R)[None] // 3, J - 1), -1).astype(np.int32)
    detected = np.array([True, False, False, True, True, False])[:B]
    split = np.full(B, 2, np.int32)
    r = np.where(detected, 6, lengths).astype(np.int32)
    w = (np.arange(R)[None] < r[:, None]) & mask
    return dict(response_mask=mask, sent_ids=sent, margins=rng.normal(size=(B, R)),
                sentence_scores=rng.normal(size=(B, J)), split=split, detected=detected,
                delta_bic=np.array([4.0, -1, -2, 9.0, 1.0, -3]), mean_left=np.ones(B),
                mean_right=np.zeros(B), release_index=r, weights=w.astype(np.float32))


def test_write_release_report_from_token_ids(tmp_path):
    arrays = batch()
    token_ids = np.full((6, 16), ord("a")) + np.arange(16)[None] % 26
    paths = pc.write_release_report(tmp_path, 120, token_ids=token_ids,
                                    tokenizer=lambda ids: "".join(chr(i) for i in ids),
                                    max_trajectories=4, **arrays)
    # Two released (largest ΔBIC: rows 3, 0) and two unreleased (rows 1, 2), in row order.
    names = sorted(p.name for p in paths)
    assert names == sorted(f"traj{b:03d}.{ext}" for b in (0, 1, 2, 3) for ext in ("png", "html", "md"))
    assert all(p.parent == tmp_path / "release_step0000120" and p.stat().st_size > 0 for p in paths)
    page = (tmp_path / "release_step0000120" / "traj003.html").read_text()
    assert count(r'class="tok rel"', page) == 9 - 6 and "abcdef" in re.sub(r"<[^>]+>", "", page)
    assert_valid_png(tmp_path / "release_step0000120" / "traj000.png")


def test_write_release_report_from_texts_and_indices(tmp_path):
    arrays = batch()
    texts = [[f"<{b}.{t}>" for t in range(16)] for b in range(6)]
    paths = pc.write_release_report(tmp_path, 3, token_texts=texts, indices=[5], **arrays)
    assert [p.suffix for p in paths] == [".png", ".html", ".md"]
    assert "&lt;5.4&gt;" in paths[1].read_text()
    with pytest.raises(ValueError, match="token_texts"):
        pc.write_release_report(tmp_path, 3, **arrays)


def test_pick_trajectories_balances_released_and_not():
    released = np.array([True, True, True, False, False, True])
    dbic = np.array([1.0, 5.0, 3.0, 0.0, 0.0, 4.0])
    assert pc.pick_trajectories(released, dbic, 4) == [1, 3, 4, 5]
    assert pc.pick_trajectories(np.ones(6, bool), dbic, 3) == [1, 2, 5]
    assert pc.pick_trajectories(np.zeros(6, bool), dbic, 3) == [0, 1, 2]
