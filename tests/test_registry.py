"""Registries: registration, lookup with suggestions, and entry-point plugins."""

import importlib.metadata
import warnings

import pytest

import harden
from harden.attacks import ATTACKS
from harden.objectives import OBJECTIVES
from harden.registry import Registry, suggest


class FakeEntryPoint:
    """Just what Registry uses of importlib.metadata.EntryPoint."""

    def __init__(self, name, value, loader):
        self.name = name
        self.value = value
        self._loader = loader

    def load(self):
        return self._loader()


def fake_entry_points(monkeypatch, group, eps):
    calls = []

    def entry_points(**kwargs):
        calls.append(kwargs)
        return list(eps) if kwargs.get("group") == group else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return calls


def test_register_get_names():
    reg = Registry("widget")

    @reg.register("knob")
    class Knob:
        pass

    @reg.register("dial-2")
    class Dial:
        pass

    assert reg.get("knob") is Knob
    assert reg.get("dial-2") is Dial
    assert reg.names() == ["dial-2", "knob"]
    assert list(reg) == ["dial-2", "knob"]
    assert len(reg) == 2
    assert "knob" in reg
    assert "lever" not in reg


def test_register_returns_the_entry_unchanged():
    reg = Registry("widget")

    def factory():
        return 1

    assert reg.register("f")(factory) is factory


def test_duplicate_registration_raises():
    reg = Registry("widget")
    reg.add("knob", int)
    with pytest.raises(harden.HardenError, match="already registered"):
        reg.add("knob", float)
    with pytest.raises(harden.HardenError, match="already registered"):
        reg.register("knob")(str)
    assert reg.get("knob") is int
    reg.add("knob", int)  # re-adding the very same entry is harmless
    assert reg.names() == ["knob"]


@pytest.mark.parametrize("bad", ["", "has space", "dots.no", "a/b"])
def test_register_refuses_odd_names(bad):
    with pytest.raises(harden.HardenError, match="expected a widget name"):
        Registry("widget").register(bad)


def test_unknown_name_raises_with_suggestions():
    reg = Registry("objective")
    for name in ("pgd_at", "trades", "ce"):
        reg.add(name, object())
    with pytest.raises(harden.UnknownNameError) as info:
        reg.get("pgd-at")
    err = info.value
    assert isinstance(err, KeyError)
    assert isinstance(err, harden.HardenError)
    assert err.name == "pgd-at"
    assert err.suggestions == ("pgd_at",)
    assert (
        str(err)
        == "expected one of the registered objectives (ce, pgd_at, trades), got 'pgd-at'; did you mean 'pgd_at'?"
    )
    assert str(err) == err.message  # not KeyError's quoted repr


def test_unknown_name_without_close_match_has_no_hint():
    reg = Registry("attack")
    reg.add("fgsm", object())
    with pytest.raises(KeyError) as info:
        reg.get("zzzzzz")
    assert "did you mean" not in str(info.value)
    assert info.value.suggestions == ()


def test_suggest():
    assert suggest("pgd-at", ["pgd_at", "trades", "ce"]) == ("pgd_at",)
    assert suggest("TRADES", ["pgd_at", "trades"]) == ("trades",)
    assert suggest("xyz", ["pgd_at", "trades"]) == ()
    assert len(suggest("pgd", [f"pgd{i}" for i in range(10)], n=3)) == 3


def test_builtin_registries():
    assert {"ce", "pgd_at", "trades"} <= set(OBJECTIVES.names())
    assert {"fgsm", "pgd"} <= set(ATTACKS.names())
    assert OBJECTIVES.get("ce").name == "ce"
    assert ATTACKS.get("pgd").name == "pgd"


def test_entry_point_plugin_is_discovered(monkeypatch):
    class PluginObjective:
        pass

    calls = fake_entry_points(
        monkeypatch, "harden.test_plugins", [FakeEntryPoint("plug", "pkg.mod:PluginObjective", lambda: PluginObjective)]
    )
    reg = Registry("objective", entry_point_group="harden.test_plugins")
    reg.add("builtin", int)
    assert calls == []  # discovery is lazy
    assert reg.get("plug") is PluginObjective
    assert reg.names() == ["builtin", "plug"]
    assert calls == [{"group": "harden.test_plugins"}]  # scanned once
    assert "plug" in reg
    assert calls == [{"group": "harden.test_plugins"}]


def test_plugin_does_not_shadow_a_builtin(monkeypatch):
    fake_entry_points(monkeypatch, "harden.test_plugins", [FakeEntryPoint("ce", "evil:CE", lambda: str)])
    reg = Registry("objective", entry_point_group="harden.test_plugins")
    reg.add("ce", int)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reg.get("ce") is int


def test_broken_plugin_warns_and_does_not_break(monkeypatch):
    def boom():
        raise ImportError("no module named 'missing_dependency'")

    class Good:
        pass

    fake_entry_points(
        monkeypatch,
        "harden.test_plugins",
        [FakeEntryPoint("broken", "bad.mod:Thing", boom), FakeEntryPoint("good", "ok.mod:Good", lambda: Good)],
    )
    reg = Registry("attack", entry_point_group="harden.test_plugins")
    with pytest.warns(RuntimeWarning, match=r"could not load attack plugin 'broken' from bad\.mod:Thing: no module"):
        names = reg.names()
    assert names == ["good"]
    assert reg.get("good") is Good
    with pytest.raises(harden.UnknownNameError):
        reg.get("broken")
