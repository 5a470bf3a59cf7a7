"""forget_netns: when a lab namespace is deleted, every per-interface file netbpf keeps for it
goes (state records and saved policy copies in the lib root; journal, health, event and apply
locks in the runtime root), and nothing of another namespace. Files only: no kernel, no root."""
from __future__ import annotations

from netbpf.store import state


def test_every_per_interface_file_of_the_namespace_goes_and_no_other(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "STATE_ROOT", tmp_path / "run")
    monkeypatch.setattr(state, "LIB_ROOT", tmp_path / "lib")
    monkeypatch.setattr(state, "PIN_ROOT", tmp_path / "pins")
    run, lib = tmp_path / "run", tmp_path / "lib"
    files = []
    for ns in ("gone", "other"):
        key = f"{ns}:gw0"
        files += [(ns, lib / "state" / f"{key}.json"), (ns, run / "state" / f"{key}.journal"),
                  (ns, run / "health" / f"{key}.json"), (ns, run / "locks" / f"{key}.lock"),
                  (ns, run / "events" / f"{key}.lock"),
                  (ns, lib / "policies" / key / "current" / "manifest.json")]
    files.append(("gone", run / "health" / "gone:lb0.json"))     # no state, only health
    for _, f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}")
    forgotten = state.forget_netns("gone")
    assert forgotten == ["gone:gw0", "gone:lb0"]
    for ns, f in files:
        assert f.exists() == (ns == "other"), f
    assert not (lib / "policies" / "gone:gw0").exists()


def test_state_records_are_durable_and_journals_are_not(tmp_path, monkeypatch):
    """What a reboot must keep (the record of what was applied, the copies of the files) is
    under the lib root; what describes this boot's kernel objects is under the runtime root."""
    monkeypatch.setattr(state, "STATE_ROOT", tmp_path / "run")
    monkeypatch.setattr(state, "LIB_ROOT", tmp_path / "lib")
    key = "ns1:gw0"
    assert state.state_file(key).is_relative_to(tmp_path / "lib")
    assert state.policies_root().is_relative_to(tmp_path / "lib")
    for runtime in (state.journal_file(key), state.lock_file(key), state.health_file(key)):
        assert runtime.is_relative_to(tmp_path / "run"), runtime


def test_a_record_whose_pins_are_gone_is_not_loaded_but_listed_for_status(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(state, "STATE_ROOT", tmp_path / "run")
    monkeypatch.setattr(state, "LIB_ROOT", tmp_path / "lib")
    monkeypatch.setattr(state, "PIN_ROOT", tmp_path / "pins")
    st = state.InterfaceState(key="gw0", ifname="gw0", netns=None, ifindex=2,
                              requested_mode="auto", conntrack=False, ct_timeouts={},
                              created_clsact=False, policy_path="/p.yaml", policy_hash="h")
    state.save_state(st)
    state.pin_dir("gw0").mkdir(parents=True)
    assert state.load_state("gw0") is not None and not state.kernel_gone("gw0")
    state.pin_dir("gw0").rmdir()                       # a reboot: bpffs is empty
    assert state.kernel_gone("gw0")
    assert state.load_state("gw0") is None, "the engine loads afresh"
    assert [s.key for s in state.list_states()] == []
    assert [s.key for s in state.list_states(not_loaded=True)] == ["gw0"]
    state.journal_file("gw0").parent.mkdir(parents=True)
    state.journal_file("gw0").write_text("{}")         # an apply in progress moves the pins
    assert not state.kernel_gone("gw0")


def test_records_of_an_older_netbpf_under_the_runtime_root_move_to_the_lib_root(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(state, "STATE_ROOT", tmp_path / "run")
    monkeypatch.setattr(state, "LIB_ROOT", tmp_path / "lib")
    monkeypatch.setattr(state, "_migrated", False)
    old = tmp_path / "run" / "state" / "gw0.json"
    old.parent.mkdir(parents=True)
    old.write_text("{}")
    (tmp_path / "run" / "policies" / "gw0" / "current").mkdir(parents=True)
    state.list_states(not_loaded=True)
    assert not old.exists() and (tmp_path / "lib" / "state" / "gw0.json").exists()
    assert (tmp_path / "lib" / "policies" / "gw0" / "current").is_dir()
