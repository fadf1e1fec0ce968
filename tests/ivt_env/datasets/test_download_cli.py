"""`python -m ivt_env.datasets download|info`: no network in tests, so download must fail fast and clearly; a fake
hub client checks that a successful download lands in the layout the loaders read."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from ivt_env.datasets import DatasetError, load_dataset
from ivt_env.datasets import download as dl
from ivt_env.datasets.__main__ import main

from . import fixtures as fx

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_offline_env_fails_at_once_with_manual_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(dl.HubUnreachable) as e:
        dl.download("refl4", str(tmp_path))
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "JierunChen/Ref-L4" in msg
    for f in ("ref-l4-val.parquet", "ref-l4-test.parquet", "images.tar.gz"):
        assert os.path.join(str(tmp_path), "refl4", f) in msg
    assert "IVT_DATA" in msg
    assert os.listdir(tmp_path) == []  # nothing written


def test_unreachable_host_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*a, **k):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(dl.HubUnreachable, match=r"cannot connect to huggingface\.co:443.*Connection refused"):
        dl.download("refadv", str(tmp_path))

    def hang(*a, **k):  # a DNS lookup or SYN that never answers: the check must not wait for it
        time.sleep(2)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    with pytest.raises(dl.HubUnreachable, match=r"no connection to .* within 0\.2 s") as e:
        dl.download("mix", str(tmp_path), timeout=0.2)
    assert "lmms-lab/RefCOCOg" in str(e.value) and "dddraxxx/ref-adv-s" in str(e.value)


def test_custom_endpoint_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.invalid:8080")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))
    with pytest.raises(dl.HubUnreachable, match=r"mirror\.invalid:8080"):
        dl.download("refadv", str(tmp_path))


def test_names():
    assert dl.resolve_names("Ref-L4") == ("refl4",)
    assert dl.resolve_names("ref-adv-s") == ("refadv",)
    assert dl.resolve_names("mix") == ("refcocog", "refadv", "refl4")
    with pytest.raises(DatasetError, match="nothing to download"):
        dl.resolve_names("synthetic")
    with pytest.raises(DatasetError, match="unknown dataset"):
        dl.resolve_names("coco")


def test_missing_huggingface_hub_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "check_hub", lambda timeout: None)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(DatasetError, match="pip install huggingface_hub"):
        dl.download("refadv", str(tmp_path))


def test_successful_download_lands_in_loader_layout(tmp_path, monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    src = tmp_path / "upstream"
    fx.write_refadv(str(src))
    fx.write_refl4(str(src), images="tar")
    calls = []

    def fake_snapshot(repo_id, repo_type, allow_patterns, local_dir):
        calls.append((repo_id, repo_type, tuple(allow_patterns)))
        folder = {"dddraxxx/ref-adv-s": "refadv", "JierunChen/Ref-L4": "refl4"}[repo_id]
        shutil.copytree(src / folder, local_dir, dirs_exist_ok=True)  # the repository's own file layout
        return local_dir

    monkeypatch.setattr(dl, "check_hub", lambda timeout: None)
    monkeypatch.setattr(hf, "snapshot_download", fake_snapshot)
    root = tmp_path / "data"
    assert dl.download("refadv", str(root)) == [str(root / "refadv")]
    assert dl.download("refl4", str(root)) == [str(root / "refl4")]
    assert calls[0] == ("dddraxxx/ref-adv-s", "dataset", ("data/train-*.parquet",))
    assert os.path.isdir(root / "refl4" / "images")  # archive extracted after download
    assert len(load_dataset("refadv", "all", data_root=str(root))) == 24
    assert len(load_dataset("refl4", "test", data_root=str(root))) == 2


def test_cli_download_offline_exit_code_and_message(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "ivt_env.datasets", "download", "mix", "--root", str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 3
    assert "cannot reach the Hugging Face Hub" in r.stderr
    assert os.path.join(str(tmp_path), "refcocog", "data", "val-*.parquet") in r.stderr
    h = subprocess.run([sys.executable, "-m", "ivt_env.datasets", "download", "--help"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert h.returncode == 0 and "HF_HUB_OFFLINE" in h.stdout


def test_cli_info_json(tmp_path, capsys):
    root = fx.write_refl4(str(tmp_path), bad=True)
    rc = main(["info", "refl4", "--root", root, "--split", "test", "--json", "--show", "1"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    t = out["splits"]["test"]
    assert t["samples"] == 10 and sum(t["dropped"].values()) == 5
    assert t["examples"][0]["id"] == "refl4-100"
    rc = main(["info", "refcocog", "--root", root, "--split", "train"])
    assert rc == 1 and "refs(umd).p" in capsys.readouterr().out


def test_cli_info_synthetic_text(capsys):
    assert main(["info", "synthetic", "--split", "val", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "synthetic/val: 200 samples" in out and "synthetic-val-000001" in out


def test_cli_info_lists_every_split_including_all(tmp_path, capsys):
    from ivt_env.datasets import dataset_splits

    assert dataset_splits("refadv") == ("train", "val", "test", "all")
    assert dataset_splits("Ref-Adv-s") == ("train", "val", "test", "all")
    assert dataset_splits("synthetic") == ("train", "val", "test")
    root = fx.write_refadv(str(tmp_path), n_rows=24)
    assert main(["info", "refadv", "--root", root, "--json"]) == 0
    splits = json.loads(capsys.readouterr().out)["splits"]
    assert list(splits) == ["train", "val", "test", "all"]
    assert splits["all"]["samples"] == 24 == sum(splits[s]["samples"] for s in ("train", "val", "test"))
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "refadv: train, val, test, all" in out


def test_cli_info_names_the_dropped_records(tmp_path, capsys):
    root = fx.write_refl4(str(tmp_path), bad=True)
    assert main(["info", "refl4", "--root", root, "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "dropped 5" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("unreadable image:"))
    assert "refl4-200" in line and "bad_garbage.jpg" in line and "refl4-201" in line and "bad_missing.jpg" in line
