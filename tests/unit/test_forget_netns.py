"""forget_netns: when a lab namespace is deleted, every per-interface file netbpf keeps for it
goes (state, journal, health, event and apply locks, saved policy copies), and nothing of
another namespace. Files only: no kernel, no root."""
from __future__ import annotations

from netbpf.store import state


def test_every_per_interface_file_of_the_namespace_goes_and_no_other(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "STATE_ROOT", tmp_path / "run")
    monkeypatch.setattr(state, "PIN_ROOT", tmp_path / "pins")
    run = tmp_path / "run"
    files = []
    for ns in ("gone", "other"):
        key = f"{ns}:gw0"
        files += [(ns, run / "state" / f"{key}.json"), (ns, run / "state" / f"{key}.journal"),
                  (ns, run / "health" / f"{key}.json"), (ns, run / "locks" / f"{key}.lock"),
                  (ns, run / "events" / f"{key}.lock"),
                  (ns, run / "policies" / key / "current" / "manifest.json")]
    files.append(("gone", run / "health" / "gone:lb0.json"))     # no state, only health
    for _, f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}")
    forgotten = state.forget_netns("gone")
    assert forgotten == ["gone:gw0", "gone:lb0"]
    for ns, f in files:
        assert f.exists() == (ns == "other"), f
    assert not (run / "policies" / "gone:gw0").exists()
