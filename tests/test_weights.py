"""Weight registry and downloads, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import logging
import socket
import threading

import pytest

from ofer import weights
from ofer.errors import AssetError

PAYLOAD = bytes(range(256)) * 4099  # ~1 MB, several read chunks


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server API)
        if self.path == "/w.pth":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/short.pth":  # promises more bytes than it sends
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
        else:
            self.send_error(404, "Not Found")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.timeout = 5
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _register(monkeypatch, url, sha256):
    entry = weights.WeightFile(filename="w.pth", description="test weights", url=url, sha256=sha256)
    monkeypatch.setitem(weights.REGISTRY, "test", entry)


def test_download_with_checksum(server, cache, monkeypatch):
    good = hashlib.sha256(PAYLOAD).hexdigest()
    _register(monkeypatch, server + "/w.pth", good)
    path = weights.ensure_weights("test", progress=False)
    assert path == cache / "w.pth" and path.read_bytes() == PAYLOAD
    assert list(cache.iterdir()) == [path]  # no temp files left
    # cached: no second request needed (the server is gone after shutdown in other tests)
    assert weights.ensure_weights("test", download=False) == path


def test_checksum_mismatch_leaves_nothing(server, cache, monkeypatch):
    _register(monkeypatch, server + "/w.pth", "0" * 64)
    with pytest.raises(AssetError, match="does not match the expected 0000") as ei:
        weights.ensure_weights("test", progress=False)
    assert "\n" not in str(ei.value)
    assert not cache.exists() or not any(cache.iterdir())


def test_unknown_hash_is_reported(server, cache, monkeypatch, caplog):
    _register(monkeypatch, server + "/w.pth", None)
    with caplog.at_level(logging.WARNING, logger="ofer.weights"):
        weights.ensure_weights("test", progress=False)
    assert hashlib.sha256(PAYLOAD).hexdigest() in caplog.text


def test_http_error_and_truncated_transfer(server, cache, monkeypatch):
    _register(monkeypatch, server + "/missing.pth", None)
    with pytest.raises(AssetError, match=r"HTTP 404.*download it by hand and save it as .*w\.pth"):
        weights.ensure_weights("test", progress=False)
    _register(monkeypatch, server + "/short.pth", None)
    with pytest.raises(AssetError, match="connection closed after 1000 of"):
        weights.ensure_weights("test", progress=False, timeout=5)
    assert not (cache / "w.pth").exists()


def test_offline_message(cache, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on this port now
    url = f"http://127.0.0.1:{port}/w.pth"
    _register(monkeypatch, url, None)
    with pytest.raises(AssetError) as ei:
        weights.ensure_weights("test", progress=False, timeout=5)
    msg = str(ei.value)
    assert url in msg and str(cache / "w.pth") in msg and "no connection" in msg and "\n" not in msg
    with pytest.raises(AssetError, match=r"not found; download http://127\.0\.0\.1"):
        weights.ensure_weights("test", download=False)


def test_registry_entries_and_manual_files(cache, tmp_path):
    farl = weights.REGISTRY["farl"]
    assert farl.url.endswith("/pretrained_weights/FaRL-Base-Patch16-LAIONFace20M-ep64.pth")
    assert weights.weight_path("farl") == cache / "FaRL-Base-Patch16-LAIONFace20M-ep64.pth"
    with pytest.raises(AssetError, match=r"ofer\.is\.tue\.mpg\.de"):
        weights.ensure_weights("ofer_idgen_flame20")
    with pytest.raises(AssetError, match="unknown weight file 'nope'"):
        weights.ensure_weights("nope")
    own = tmp_path / "mine.pth"
    with pytest.raises(AssetError, match="mine.pth not found"):
        weights.ensure_weights("farl", path=own)
    own.write_bytes(b"x")
    assert weights.ensure_weights("farl", path=own) == own


def test_registered_hash_verified_on_cached_file(cache, monkeypatch):
    _register(monkeypatch, None, hashlib.sha256(b"right").hexdigest())
    cache.mkdir(parents=True)
    (cache / "w.pth").write_bytes(b"wrong")
    with pytest.raises(AssetError, match="does not match"):
        weights.ensure_weights("test")
    (cache / "w.pth").write_bytes(b"right")
    assert weights.ensure_weights("test") == cache / "w.pth"


def test_missing_encoder_weights_come_from_the_cache_by_name(server, cache, monkeypatch, tmp_path):
    """A config naming the FaRL release file at a path where it is not: the cached copy is used,
    downloaded once from the registered URL (here a local server)."""
    from ofer.config import ArcFaceConfig, ExpGenTrainConfig, FaRLConfig
    from ofer.models import build_model

    digest = hashlib.sha256(PAYLOAD).hexdigest()
    _register(monkeypatch, server + "/w.pth", digest)
    missing = tmp_path / "pretrained" / "w.pth"
    assert weights.find_weights(missing, "farl.weights") == cache / "w.pth"
    assert (cache / "w.pth").read_bytes() == PAYLOAD
    with pytest.raises(AssetError, match=r"^config key 'farl.weights': file not found: .*other\.pth \(x\)$"):
        weights.find_weights(tmp_path / "other.pth", "farl.weights", context=" (x)")
    # build_model reads encoder weights through it: a tiny FaRL saved as the registered file
    farl_cfg = FaRLConfig(width=64, layers=1, heads=1, patch_size=16, image_size=32, weights="pretrained/w.pth")
    cfg = ExpGenTrainConfig(data_root=str(tmp_path), farl=farl_cfg,
                            arcface=ArcFaceConfig(layers=[1, 1, 1, 1], width=8, weights=None, freeze="none"))
    import torch
    from ofer.nets import FaRLEncoder

    torch.manual_seed(3)
    ref = FaRLEncoder(image_size=32, patch_size=16, width=64, layers=1, heads=1)
    torch.save(ref.state_dict(), cache / "w.pth")
    _register(monkeypatch, server + "/w.pth", None)  # the cached file is now another one
    model = build_model("expgen", cfg)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.farl.state_dict()[k], v)
