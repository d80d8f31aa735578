"""harden.report_format: the labels and number formats both renderings of a certificate use."""

from types import SimpleNamespace

from harden.report_format import CHECK_LABELS, DASH, attack_label, ci, fmt, key_label, pct, status_label, threat_text


def test_the_formats():
    assert (pct(0.04), pct(1.0), pct(None)) == ("4.00%", "100.00%", DASH)
    assert (fmt(None), fmt(False), fmt(2 / 3), fmt(7), fmt("x")) == (DASH, "false", "0.6667", "7", "x")
    assert fmt({"a": 1, "b": None, "c": [0.5, True]}) == "a=1, c=0.5, true"
    assert fmt({"b": None}) == DASH  # nothing set reads as missing, not as an empty cell
    cert = SimpleNamespace(intervals={"robust": (0.015, 0.098)}, threat={"norm": "linf", "eps": 0.03, "radius": None})
    assert (ci(cert, "robust"), ci(cert, "clean")) == ("[1.50%, 9.80%]", DASH)
    assert threat_text(cert) == "norm = linf, eps = 0.03"  # the unset radius left out
    assert threat_text(SimpleNamespace(threat={})) == DASH
    assert (status_label("SKIP"), status_label("FAIL")) == ("SKIP (N/A)", "FAIL")


def test_attacks_checks_and_keys_read_as_labels_and_unknown_ones_as_themselves():
    assert attack_label("apgd_t") == "APGD-T: AutoAttack's targeted APGD on the DLR loss (white-box)"
    assert attack_label("my_attack#3") == "my_attack (run 3)"
    assert key_label("lr") == "Learning rate" and key_label("grad_norm") == "Grad norm"
    assert CHECK_LABELS["more_iterations_never_help"] == "More attack iterations do not help"
