"""harden.report: the Markdown and self-contained HTML certificates, checked as text and in a browser."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageStat

import harden
import harden.report
from harden.certify import Certificate
from harden.report import to_html, to_markdown
from harden.testing import TinyCNN, synthetic_tensors, tiny_policy

SMOOTHING = {"smoothing": True, "n0": 10, "n": 50, "n_examples": 8, "sigma": 0.25, "radius": 0.1}
HISTORY = [
    {"epoch": 1, "lr": 0.05, "train_loss": 0.91, "val_clean_acc": 0.7, "val_pgd_acc": 0.3, "seconds": 1.5},
    {"epoch": 2, "lr": 0.02, "train_loss": 0.42, "val_clean_acc": 0.9, "val_pgd_acc": 0.55, "seconds": 1.4},
]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def cert(trained) -> Certificate:
    """A certificate with every part filled: smoothing, saliency with a baseline, training history."""
    torch.manual_seed(0)
    policy = tiny_policy(certify=SMOOTHING)
    return harden.certify(
        trained,
        policy,
        synthetic_tensors(32, seed=2),
        history=HISTORY,
        baseline=TinyCNN(num_classes=3),
        progress=False,
    )


class _Page(HTMLParser):
    """Text of every element with an id, plus tag balance (a malformed page fails the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []
        self.text: dict[str, str] = {}
        self.classes: dict[str, str] = {}
        self.images: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag in VOID:
            return
        self.stack.append((tag, a.get("id")))
        if a.get("id"):
            self.text[a["id"]] = ""
            self.classes[a["id"]] = a.get("class") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {[t for t, _ in self.stack]}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        for _, id_ in self.stack:
            if id_:
                self.text[id_] += data


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert not parser.errors, parser.errors
    assert [t for t, _ in parser.stack] == [], f"unclosed tags: {parser.stack}"
    return parser


def test_markdown_has_verdict_figures_and_checks(cert):
    md = to_markdown(cert)
    assert md.startswith(f"# Robustness certificate: {cert.policy_name}\n")
    assert f"**{cert.verdict}**" in md and cert.verdict_reason in md
    for acc in (cert.clean_accuracy, cert.robust_accuracy, *cert.per_attack.values()):
        assert f"{acc:.2%}" in md
    lo, hi = cert.intervals["robust"]
    assert f"[{lo:.2%}, {hi:.2%}]" in md
    shown = {"SKIP": "SKIP (N/A)"}  # a check that tested nothing never reads like a pass
    assert cert.checks and all(
        f"| {cid} | {shown.get(c['status'], c['status'])} |" in md for cid, c in cert.checks.items()
    )
    s = cert.smoothing
    assert s is not None and f"certified accuracy at the radius | {s.certified_accuracy:.2%} |" in md
    assert "smoothed classifier" in md and f"| n0 / n | {s.n0} / {s.n} |" in md
    # the final epoch, under labels for people
    assert "| Validation PGD accuracy (the probe) | 55.00% |" in md and "| Training loss | 0.42 |" in md
    assert "| pgd_at | 1 |" in md  # objective and its weight
    assert cert.weights_sha256 in md and cert.policy_sha256 in md
    assert "## Saliency" in md and "maps: hardened, baseline" in md
    assert f"| torch | {torch.__version__.split('+')[0]}" in md


def test_markdown_escapes_table_cells(cert):
    checks = {"odd": {"id": "odd", "status": "WARN", "detail": "a | b\nc", "remedy": "none"}}
    md = to_markdown(cert.model_copy(update={"checks": checks}))
    assert "| odd | WARN | a \\| b c | none |" in md


def test_html_is_self_contained_and_parses(cert):
    page = to_html(cert)
    parsed = _parse(page)
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", page, re.I)
    assert not re.search(r"<script|<link|<iframe|@import|url\(", page, re.I)
    # eps curve, certified accuracy vs radius, training curves, saliency grid
    assert len(parsed.images) == 4
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "PNG" and img.width > 100 and img.height > 100


def test_html_ids_carry_the_figures(cert):
    parsed = _parse(to_html(cert))
    assert parsed.text["verdict"] == cert.verdict
    assert f"s-{cert.verdict}" in parsed.classes["verdict"]
    assert parsed.text["verdict-reason"] == cert.verdict_reason
    assert parsed.text["clean-accuracy"] == f"{cert.clean_accuracy:.2%}"
    assert parsed.text["robust-accuracy"] == f"{cert.robust_accuracy:.2%}"
    assert cert.smoothing is not None and cert.smoothing.certified_accuracy is not None
    assert parsed.text["certified-accuracy"] == f"{cert.smoothing.certified_accuracy:.2%}"
    for sec in ("threat-model", "accuracy", "randomized-smoothing", "sanity-checks", "training", "saliency"):
        assert f"section-{sec}" in parsed.text
    for cid in cert.checks:
        assert cid in parsed.text["section-sanity-checks"]


def test_html_without_optional_parts_has_no_plots(cert):
    bare = cert.model_copy(update={"smoothing": None, "saliency": [], "training": [], "eps_curve": []})
    parsed = _parse(to_html(bare))
    assert parsed.images == []
    assert "certified-accuracy" not in parsed.text and "section-randomized-smoothing" not in parsed.text
    assert "No sanity checks" in to_markdown(bare.model_copy(update={"checks": {}}))


def test_html_escapes_text(cert):
    evil = "<script>alert('x')</script> & <b>"
    checks = {"odd": {"id": "odd", "status": "FAIL", "detail": evil, "remedy": evil}}
    page = to_html(cert.model_copy(update={"verdict": "UNRELIABLE", "verdict_reason": evil, "checks": checks}))
    assert "<script" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;" in page
    parsed = _parse(page)
    assert parsed.text["verdict-reason"] == evil
    assert "s-UNRELIABLE" in parsed.classes["verdict"] and 'class="badge s-FAIL"' in page


def test_save_writes_all_three(cert, tmp_path):
    path = cert.save(tmp_path)
    loaded = Certificate.load(path)
    assert loaded.model_copy(update={"rendered": {}}) == cert
    assert (tmp_path / "certificate.md").read_text() == to_markdown(cert) == to_markdown(loaded)
    assert (tmp_path / "certificate.html").read_text() == to_html(cert) == to_html(loaded)
    assert set(loaded.rendered) == {"certificate.md", "certificate.html"}


def test_warnings_come_first_in_both_renderings(cert):
    evil = "<b>eps</b> below half a pixel level | see docs"
    warned = cert.model_copy(update={"warnings": ["first note", evil]})
    md = to_markdown(warned).splitlines()
    assert md[0].startswith("# Robustness certificate")
    head = md[: md.index(next(line for line in md if line.startswith(f"**{cert.verdict}**")))]
    assert "> **Warnings**" in head and "> - first note" in head
    assert "> - <b>eps</b> below half a pixel level \\| see docs" in head  # a table-safe cell, one line
    page = to_html(warned)
    parsed = _parse(page)
    assert parsed.text["warnings"].startswith("Warnings") and "first note" in parsed.text["warnings"]
    assert page.index('id="warnings"') < page.index('id="verdict"')
    assert "<b>eps</b>" not in page and "&lt;b&gt;eps&lt;/b&gt;" in page
    assert 'id="warnings"' not in to_html(cert) and "Warnings" not in to_markdown(cert)


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    msg = (
        f"no headless browser on PATH (tried {', '.join(BROWSERS)}); install one, e.g. "
        "`sudo apt-get install -y chromium` on Debian/Ubuntu"
    )
    if os.environ.get("HARDEN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"HARDEN_REQUIRE_BROWSER=1 but {msg}")
    pytest.skip(msg)


def _run_browser(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def test_certificate_renders_in_headless_browser(cert, tmp_path):
    browser = _browser()
    page = cert.save(tmp_path / "run").with_suffix(".html")
    uri = page.resolve().as_uri()

    dom = _run_browser(browser, tmp_path / "profile", "--dump-dom", uri).stdout
    parsed = _parse(dom)
    assert parsed.text["verdict"] == cert.verdict
    assert parsed.text["clean-accuracy"] == f"{cert.clean_accuracy:.2%}"
    assert parsed.text["robust-accuracy"] == f"{cert.robust_accuracy:.2%}"
    assert len(parsed.images) == 4

    shot = tmp_path / "shot.png"
    _run_browser(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,1600", uri)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 1600)
    assert ImageStat.Stat(img.convert("L")).stddev[0] > 20, "screenshot looks blank"
    colours = img.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 100, f"only {len(colours)} distinct colours: the page did not render"
    badge = harden.report._COLOURS[cert.verdict][1]  # the verdict's background: the inline CSS applied
    assert tuple(int(badge[i : i + 2], 16) for i in (1, 3, 5)) in {c for _, c in colours}


def _reviewed() -> Certificate:
    """A 4%-robust, 79%-clean model that misses its target, beside its baseline, with an exported ONNX file."""
    from harden.certificate import BaselineSummary, ClassResult, RequirementResult

    return Certificate(
        verdict="EMPIRICAL", verdict_reason="attack suite only", created="2026-01-01T00:00:00+00:00",
        policy_name="review", policy_sha256="ab" * 32, weights_sha256="cd" * 32, onnx_sha256="ef" * 32,
        threat={"norm": "linf", "eps": 0.03}, n=100, clean_accuracy=0.79, robust_accuracy=0.04,
        per_attack={"apgd_ce": 0.1, "square": 0.04}, attacks=[{"name": "apgd_ce"}, {"name": "square"}],
        seed=0, device="cpu", versions={}, sample="balanced", check_n=50, check_clean_accuracy=0.8,
        eps_curve=[(0.0, 0.8), (0.03, 0.06)], eps_intervals=[(0.67, 0.89), (0.02, 0.16)],
        checks={
            "white_box_beats_black_box": {"id": "white_box_beats_black_box", "status": "SKIP", "detail": "no black-box"},
            "onnx_black_box": {"id": "onnx_black_box", "status": "PASS", "detail": "0 of 96 fell"},
        },
        requirements=[
            RequirementResult(text="robust_accuracy >= 45%", metric="robust_accuracy", op=">=", value=0.45,
                              actual=0.04, passed=False),
            RequirementResult(text="clean_accuracy >= 70%", metric="clean_accuracy", op=">=", value=0.7,
                              actual=0.79, passed=True),
        ],
        baseline=BaselineSummary(n=100, clean_accuracy=0.91, robust_accuracy=0.0,
                                 per_attack={"apgd_ce": 0.0, "square": 0.0}, eps_curve=[(0.0, 0.9), (0.03, 0.0)]),
        per_class=[ClassResult(label=0, name="cat", n=50, clean=40, robust=3),
                   ClassResult(label=1, name=None, n=50, clean=39, robust=1)],
        export={"sha256": "ef" * 32, "parity_examples": 64, "parity_max_abs_diff": 2e-6,
                "parity_argmax_agreement": 1.0},
        onnx_black_box={"n": 96, "clean_accuracy": 0.8, "robust_accuracy": 0.05, "per_attack": {"square": 0.05},
                        "providers": ["CPUExecutionProvider"]},
    )  # fmt: skip


def test_the_target_and_the_robust_accuracy_come_first():
    cert = _reviewed()
    md = to_markdown(cert)
    lines = md.splitlines()
    fail = "Target: robust_accuracy >= 45%: FAIL (measured 4.0%)"
    assert any(fail in line for line in lines[:6]) and "Target: clean_accuracy >= 70%: PASS (measured 79.0%)" in md
    top = md[: md.index("## Threat model")]
    assert top.index(fail) < top.index("**EMPIRICAL**") < top.index("Robust accuracy (worst case over the suite)")
    assert "### Robust accuracy (worst case over the suite): 4.00%" in top  # a heading: the big figure
    assert top.index("4.00%") < top.index("79.00%")  # robust before clean
    assert "Under attack the model classifies 4.0% of the 100 examples right (4 of 100); without attack, 79.0%." in top
    parsed = _parse(to_html(cert))
    assert parsed.text["target-0"] == fail and "s-FAIL" in parsed.classes["target-0"]
    assert "s-PASS" in parsed.classes["target-1"]
    page = to_html(cert)
    assert page.index('id="target-0"') < page.index('id="verdict"') < page.index('id="robust-accuracy"')
    assert page.index('id="robust-accuracy"') < page.index('id="clean-accuracy"')
    assert page.index('class="card primary"') < page.index('id="robust-accuracy"') < page.index('class="card"')
    assert "Target" not in to_markdown(cert.model_copy(update={"requirements": []}))


def test_onnx_summary_is_at_the_top():
    cert = _reviewed()
    md = to_markdown(cert)
    top = md[: md.index("## Threat model")]
    assert "onnxruntime matches PyTorch on 64 inputs (largest logit difference 2e-06, same class on 100.00%)" in top
    assert "robust accuracy 5.00%, clean accuracy 80.00%" in top and "n = 96" in top
    assert "Agreement with the PyTorch verdict: PASS, 0 of 96 fell" in top
    parsed = _parse(to_html(cert))
    assert "gradient-free attacks, n = 96" in parsed.text["onnx-summary"]
    bare = cert.model_copy(update={"export": None, "onnx_black_box": None, "onnx_sha256": None})
    assert "onnx-summary" not in _parse(to_html(bare)).text and "attacked itself" not in to_markdown(bare)
    no_attack = to_markdown(cert.model_copy(update={"onnx_black_box": None}))
    assert "The ONNX session itself was not attacked" in no_attack


def test_labels_for_people_baseline_per_class_subsets_and_skip():
    md = to_markdown(_reviewed())
    assert "| Clean accuracy (no attack) | 79.00% | 100 |" in md
    assert "| After APGD-CE: AutoAttack's step-size-free PGD on cross-entropy (white-box) | 10.00% |" in md
    assert "| Robust accuracy (worst case over the suite) | 4.00% | 100 |" in md and md.count("| 91.00% |") == 1
    assert "undefended baseline |" in md and md.rstrip().count("| 0.00% |") >= 3  # baseline column filled
    assert "Examples verified: 100 (a seeded class-balanced sample of the test split)" in md
    assert "| the verified examples (the headline figure) | 79.00% | 100 |" in md
    assert "| the check subset (where the sanity checks and the eps curve ran) | 80.00% | 50 |" in md
    assert "| eps 0 of the eps curve (the check subset, unattacked) | 80.00% | 50 |" in md
    assert "| 0 (cat) | 50 | 80.00% | 6.00% |" in md and "| 1 | 50 | 78.00% | 2.00% |" in md
    assert "| 0.03 | 6.00% | [2.00%, 16.00%] | 0.00% |" in md  # eps, accuracy, band, baseline
    assert "on the 50-example check subset" in md
    assert "| White-box attacks beat black-box ones | white_box_beats_black_box | SKIP (N/A) | no black-box |" in md
    page = to_html(_reviewed())
    assert 'class="badge s-SKIP">SKIP (N/A)</span>' in page


def test_a_baseline_adds_a_second_line_to_the_eps_plot():
    cert = _reviewed()
    with_baseline = harden.report.certificate_plots(cert, "eps")["eps"]
    assert harden.report.certificate_plots(cert.model_copy(update={"baseline": None}), "eps")["eps"] != with_baseline
