"""MNIST and CIFAR-10 downloaded on request into the data cache, offline: a local HTTP server on 127.0.0.1
serves tiny files in the official formats, with the checksum table set to their MD5s."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from test_data import assert_bytes_roundtrip, cifar_images, fake_cifar_tar, write_idx

from pyro_ddpm import data
from pyro_ddpm.cli import main

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
TINY_TRAIN = ["--T", "10", "--ch", "8", "--batch-size", "4", "--threads", "1", "--no-progress"]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_labels(path: Path, labels: np.ndarray) -> None:
    """A gzipped IDX1 label file (magic 2049)."""
    header = np.array([2049, len(labels)], dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + labels.astype(np.uint8).tobytes()))


class Server:
    """``http.server`` on 127.0.0.1 (a free port) serving ``root`` in a thread; records the paths asked."""

    def __init__(self, root: Path):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join(timeout=30)
        self.httpd.server_close()


@pytest.fixture
def www(tmp_path, monkeypatch):
    """Official-format files under www/mnist/ and www/cifar10/, the checksum table set to their MD5s,
    the cache in tmp_path/cache and the base URLs at the server; the server stops at teardown."""
    root = tmp_path / "www"
    (root / "mnist").mkdir(parents=True)
    (root / "cifar10").mkdir()
    rng = np.random.default_rng(0)
    images = {
        "train": rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8),
        "t10k": rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8),
    }
    for split, x in images.items():
        write_idx(root / "mnist" / f"{split}-images-idx3-ubyte", x, gz=True)
        write_labels(root / "mnist" / f"{split}-labels-idx1-ubyte.gz", np.arange(len(x)) % 10)
    cifar = cifar_images()
    fake_cifar_tar(root / "cifar10" / "cifar-10-python.tar.gz", cifar)
    monkeypatch.setitem(data.CHECKSUMS, "mnist", {f: md5(root / "mnist" / f) for f in MNIST_FILES})
    monkeypatch.setitem(
        data.CHECKSUMS, "cifar10", {"cifar-10-python.tar.gz": md5(root / "cifar10" / "cifar-10-python.tar.gz")}
    )
    monkeypatch.setenv("PYRO_DDPM_DATA", str(tmp_path / "cache"))
    server = Server(root)
    try:
        monkeypatch.setenv("PYRO_DDPM_MNIST_URL", f"{server.url}/mnist/")
        monkeypatch.setenv("PYRO_DDPM_CIFAR10_URL", f"{server.url}/cifar10")  # with or without the final slash
        yield {"root": root, "server": server, "cache": tmp_path / "cache", "mnist": images, "cifar": cifar}
    finally:
        server.stop()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_the_official_files_and_checksums_are_listed():
    assert tuple(data.CHECKSUMS["mnist"]) == MNIST_FILES
    assert data.CHECKSUMS["cifar10"] == {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
    assert all(len(v) == 32 for files in data.CHECKSUMS.values() for v in files.values())


def test_mnist_downloads_into_the_cache_and_loads_from_it_afterwards(www):
    d = data.load("mnist", download=True)
    folder = www["cache"] / "mnist"
    assert listing(folder) == sorted(MNIST_FILES)  # every official file, no temporaries
    assert (d.name, d.levels, d.preset, d.shape, d.source) == ("mnist", 256, "mnist", (1, 28, 28), str(folder))
    assert (len(d.train), len(d.test)) == (6, 4)
    assert_bytes_roundtrip(d.train[:, 0], www["mnist"]["train"])
    assert_bytes_roundtrip(d.test[:, 0], www["mnist"]["t10k"])
    assert sorted(www["server"].requests) == sorted(f"/mnist/{f}" for f in MNIST_FILES)
    # files already there with the right checksum are not fetched again
    assert data.download("mnist") == str(folder) and len(www["server"].requests) == 4
    www["server"].stop()  # from here on any request would fail
    for again in (data.load("mnist"), data.load("mnist", download=True)):
        assert again.source == str(folder) and np.array_equal(again.train.numpy(), d.train.numpy())


def test_cifar10_downloads_into_the_cache_and_loads_from_it_afterwards(www):
    d = data.load("cifar10", download=True)
    folder = www["cache"] / "cifar10"
    assert listing(folder) == ["cifar-10-python.tar.gz"]
    assert (d.name, d.levels, d.shape, d.flip) == ("cifar10", 256, (3, 32, 32), True)
    assert d.source == str(folder / "cifar-10-python.tar.gz")
    assert (len(d.train), len(d.test)) == (10, 3)
    assert_bytes_roundtrip(d.test, www["cifar"]["test_batch"])
    assert www["server"].requests == ["/cifar10/cifar-10-python.tar.gz"]
    www["server"].stop()
    assert len(data.load("cifar10").train) == 10 and len(data.load("cifar10", download=True).test) == 3


def test_a_corrupted_download_is_refused_and_leaves_nothing(www, capsys):
    served = www["root"] / "mnist" / "t10k-images-idx3-ubyte.gz"
    expected = data.CHECKSUMS["mnist"]["t10k-images-idx3-ubyte.gz"]
    served.write_bytes(served.read_bytes()[:-7] + b"garbage")  # the bytes differ from the checksum
    actual = md5(served)
    with pytest.raises(ValueError) as e:
        data.load("mnist", download=True)
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert "checksum mismatch for t10k-images-idx3-ubyte.gz" in message
    assert f"MD5 {actual}, expected {expected}" in message
    folder = www["cache"] / "mnist"
    # the files checked before it are kept; the corrupted one is not there, nor any temporary file
    assert listing(folder) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    # the command line says the same in one line and writes no run
    out = www["cache"].parent / "run"
    assert main(["train", "--data", "mnist", "--download", "--steps", "1", *TINY_TRAIN, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"pyro-ddpm: error: {message}\n"
    assert listing(folder) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert not out.exists()


def test_a_truncated_transfer_is_refused(www, monkeypatch):
    """A transfer cut short (fewer bytes than the checksum's file) leaves no partial file."""
    served = www["root"] / "cifar10" / "cifar-10-python.tar.gz"
    served.write_bytes(served.read_bytes()[:100])
    with pytest.raises(ValueError, match="checksum mismatch for cifar-10-python.tar.gz"):
        data.download("cifar10")
    assert listing(www["cache"] / "cifar10") == []


def test_an_unreachable_server_is_one_line_and_leaves_nothing(www, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PYRO_DDPM_CIFAR10_URL", f"http://127.0.0.1:{port}/")
    with pytest.raises(ValueError) as e:
        data.load("cifar10", download=True)
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"cannot download cifar-10-python.tar.gz: http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    assert "PYRO_DDPM_CIFAR10_URL" in message
    with pytest.raises(ValueError, match=r"cannot download .*/nothing-here/cifar-10-python.tar.gz \(.*404"):
        data.download("cifar10", base_url=www["server"].url + "/nothing-here/")
    assert listing(www["cache"] / "cifar10") == []


def test_without_download_one_line_names_the_cache_folder(www, capsys):
    for name, wanted in (("mnist", "train-images-idx3-ubyte.gz"), ("cifar10", "cifar-10-python.tar.gz")):
        folder = www["cache"] / name
        with pytest.raises(ValueError) as e:
            data.load(name)
        message = str(e.value)
        assert len(message.splitlines()) == 1 and str(folder) in message and wanted in message
        assert "--download" in message
        out = www["cache"].parent / "run"
        assert main(["train", "--data", name, "--steps", "1", *TINY_TRAIN, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(folder) in err and "--download" in err
        assert not out.exists()
    assert www["server"].requests == [] and listing(www["cache"]) == []


def test_files_put_in_the_cache_by_hand_load_without_download(www):
    folder = www["cache"] / "mnist"
    shutil.copytree(www["root"] / "mnist", folder)
    for f in MNIST_FILES[1::2]:  # only the image files are read
        os.remove(folder / f)
    www["server"].stop()
    assert len(data.load("mnist").train) == 6


def test_a_named_folder_downloads_there(www, tmp_path):
    target = tmp_path / "elsewhere" / "mnist"
    d = data.load(f"mnist:{target}", download=True)
    assert d.source == str(target) and listing(target) == sorted(MNIST_FILES)
    assert not (www["cache"] / "mnist").exists()
    assert data.fetch("digits") is None and data.fetch(str(target)) is None  # nothing to download for these


def test_the_commands_download_on_request(www, tmp_path, capsys, monkeypatch):
    import pyro_ddpm.cli

    run = tmp_path / "run"
    assert main(["train", "--data", "mnist", "--download", "--steps", "2", *TINY_TRAIN, "--out", str(run)]) == 0
    assert listing(www["cache"] / "mnist") == sorted(MNIST_FILES) and (run / "checkpoint.pt").exists()
    # evaluate on a machine whose cache is empty: --download fetches the files into it again
    shutil.rmtree(www["cache"])
    assert main(["evaluate", str(run), "--no-progress"]) == 2
    assert "--download" in capsys.readouterr().err
    args = ["evaluate", str(run), "--download", "--limit", "2", "--no-figures", "--no-progress"]
    assert main(args) == 0
    assert listing(www["cache"] / "mnist") == sorted(MNIST_FILES)
    # compare fetches before anything trains
    shutil.rmtree(www["cache"])
    seen = []
    nothing = {"paths": {}, "runs": []}  # what compare returns: the files written and the run folders
    monkeypatch.setattr(pyro_ddpm.cli, "compare", lambda config, out, **kw: seen.append(config.data) or nothing)
    assert main(["compare", "--data", "cifar10", "--download", "--no-progress", "--out", str(tmp_path / "c")]) == 0
    assert seen == ["cifar10"] and listing(www["cache"] / "cifar10") == ["cifar-10-python.tar.gz"]
