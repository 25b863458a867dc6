"""The loopback Hub (tests/hubserver.py) driven by the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import numpy as np
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import save_file

try:
    from hubserver import HubServer, fake_safetensors, make_repo
except ImportError:  # tests/ imported as a package
    from tests.hubserver import HubServer, fake_safetensors, make_repo

N_BULK = 45
PAGE = 20


def _st_bytes(tmp: Path, tensors: dict[str, np.ndarray], name: str) -> Path:
    path = tmp / name
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("src")
    root = tmp_path_factory.mktemp("hub")
    rng = np.random.default_rng(0)
    tiny = _st_bytes(tmp, {"fc1.weight": rng.standard_normal((8, 4)).astype(np.float32),
                           "fc1.bias": np.zeros(8, np.float32),
                           "fc2.weight": rng.standard_normal((2, 8)).astype(np.float16)}, "tiny.safetensors")
    make_repo(root, "acme/tiny-mlp", {
        "model.safetensors": tiny,
        "config.json": json.dumps({"architectures": ["TinyMLP"], "model_type": "mlp", "hidden": 8}),
        "README.md": "# tiny\n",
    }, tags=["mlp"], library_name="transformers", pipeline_tag="image-classification", downloads=100, likes=5,
        cardData={"license": "mit", "datasets": ["digits"]})
    big = _st_bytes(tmp, {"emb": rng.standard_normal((512, 1024)).astype(np.float32)}, "big.safetensors")  # 2 MiB
    make_repo(root, "acme/big", {"model.safetensors": big}, library_name="transformers", downloads=70)
    s1 = _st_bytes(tmp, {"a.weight": np.ones((3, 5), np.float32)}, "s1.safetensors")
    s2 = _st_bytes(tmp, {"b.weight": np.ones((7,), np.float32), "b.bias": np.ones((2, 2), np.float32)}, "s2.st")
    index = {"metadata": {"total_size": 4 * (15 + 7 + 4)},
             "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors",
                            "b.bias": "model-00002-of-00002.safetensors"}}
    make_repo(root, "acme/sharded", {"model-00001-of-00002.safetensors": s1, "model-00002-of-00002.safetensors": s2,
                                     "model.safetensors.index.json": json.dumps(index), "sub/notes.txt": "x"},
              library_name="transformers", downloads=50)
    make_repo(root, "gatedorg/secret", {"model.safetensors": tiny}, gated="manual", downloads=10)
    make_repo(root, "oldco/legacy-bin", {"pytorch_model.bin": b"\x80\x02pickle-ish" * 100,
                                         "config.json": json.dumps({"model_type": "old"})}, library_name="pytorch")
    make_repo(root, "acme/private-one", {"model.safetensors": tiny}, private=True)
    for i in range(N_BULK):
        make_repo(root, f"bulk/m{i:02d}", {"model.safetensors": fake_safetensors({"w": ("F32", [2, i + 1])}, seed=i)},
                  downloads=i, tags=["bulk"])
    return root


@pytest.fixture(autouse=True)
def _hf_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # used by get_safetensors_metadata


@pytest.fixture
def hub(store):
    with HubServer(store, page_size=PAGE) as server:
        yield server


@pytest.fixture
def api(hub) -> HfApi:
    return HfApi(endpoint=hub.url, token=False)


def _get(url: str, headers: dict | None = None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
        return r.status, dict(r.headers), r.read()


def test_list_models_paginates_and_limits(hub, api):
    models = list(api.list_models(author="bulk"))
    assert sorted(m.id for m in models) == [f"bulk/m{i:02d}" for i in range(N_BULK)]
    assert hub.count(kind="api", path_contains="/api/models") == math.ceil(N_BULK / PAGE)
    nexts = [r for r in hub.log if "cursor=" in r["query"]]
    assert len(nexts) == 2 and all("author=bulk" in r["query"] for r in nexts)

    hub.reset_log()
    assert len(list(api.list_models(author="bulk", limit=25))) == 25
    assert hub.count(kind="api") == 2
    hub.reset_log()
    assert len(list(api.list_models(filter="bulk", limit=7))) == 7
    assert hub.count(kind="api") == 1

    by_downloads = [m.id for m in api.list_models(author="acme", sort="downloads")]
    assert by_downloads == ["acme/tiny-mlp", "acme/big", "acme/sharded"]  # private repo hidden without a token


def test_list_models_filters_and_expand(hub, api, store):
    expand = ["sha", "siblings", "safetensors", "config", "tags", "library_name", "pipeline_tag", "downloads",
              "likes", "cardData", "gated", "private", "lastModified", "createdAt"]
    (m,) = list(api.list_models(filter=["safetensors", "mlp"], author="acme", search="tiny", expand=expand))
    assert m.id == "acme/tiny-mlp"
    assert m.safetensors.parameters == {"F32": 40, "F16": 16} and m.safetensors.total == 56
    assert sorted(s.rfilename for s in m.siblings) == ["README.md", "config.json", "model.safetensors"]
    assert m.config == {"architectures": ["TinyMLP"], "model_type": "mlp"}
    assert m.card_data.license == "mit" and m.card_data.datasets == ["digits"]
    assert {"mlp", "transformers", "safetensors", "license:mit", "dataset:digits"} <= set(m.tags)
    assert (m.library_name, m.pipeline_tag, m.downloads, m.likes, m.gated, m.private) == (
        "transformers", "image-classification", 100, 5, False, False)
    assert m.sha == api.model_info("acme/tiny-mlp").sha and len(m.sha) == 40
    assert m.last_modified is not None and m.created_at is not None

    # without expand: the default listing fields only
    (plain,) = list(api.list_models(search="tiny-mlp"))
    assert plain.downloads == 100 and plain.siblings is None and plain.safetensors is None and plain.sha is None
    (full,) = list(api.list_models(search="tiny-mlp", full=True, cardData=True))
    assert full.sha == m.sha and len(full.siblings) == 3 and full.card_data.license == "mit"

    # gated repos are listed; private ones only with a token; library_name and pipeline_tag filters
    assert [x.id for x in api.list_models(author="gatedorg", expand=["gated"])][0] == "gatedorg/secret"
    assert next(iter(api.list_models(author="gatedorg", expand=["gated"]))).gated == "manual"
    assert [x.id for x in api.list_models(filter="pytorch")] == ["oldco/legacy-bin"]
    assert [x.id for x in api.list_models(pipeline_tag="image-classification")] == ["acme/tiny-mlp"]
    with_token = HfApi(endpoint=hub.url, token="hf_any")
    assert "acme/private-one" in {x.id for x in with_token.list_models(author="acme")}


def test_model_info_files_metadata(hub, api, store):
    info = api.model_info("acme/sharded", files_metadata=True)
    files = {s.rfilename: s for s in info.siblings}
    for name, sib in files.items():
        data = (store / "acme/sharded" / name).read_bytes()
        assert sib.size == len(data)
        if name.endswith(".safetensors"):
            assert sib.lfs.sha256 == hashlib.sha256(data).hexdigest() and sib.lfs.size == len(data)
        else:
            assert sib.lfs is None
            assert sib.blob_id == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert info.safetensors.total == 15 + 7 + 4
    assert api.model_info("acme/sharded", revision=info.sha).sha == info.sha
    assert hub.log[-1]["path"] == f"/api/models/acme/sharded/revision/{info.sha}"
    with pytest.raises(RevisionNotFoundError):
        api.model_info("acme/sharded", revision="v9")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/missing")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/private-one")
    assert api.model_info("gatedorg/secret").gated == "manual"  # info answers for gated repos


def test_list_repo_tree(hub, api, store):
    entries = list(api.list_repo_tree("acme/sharded", recursive=True))
    paths = {e.path for e in entries}
    assert {"model.safetensors.index.json", "sub", "sub/notes.txt", "model-00001-of-00002.safetensors"} <= paths
    shard = next(e for e in entries if e.path == "model-00002-of-00002.safetensors")
    assert shard.lfs.sha256 == hashlib.sha256((store / "acme/sharded" / shard.path).read_bytes()).hexdigest()
    top = {e.path for e in api.list_repo_tree("acme/sharded")}
    assert "sub" in top and "sub/notes.txt" not in top
    assert [e.path for e in api.list_repo_tree("acme/sharded", path_in_repo="sub")] == ["sub/notes.txt"]

    hub.tree_page_size = 2
    hub.reset_log()
    assert {e.path for e in api.list_repo_tree("acme/sharded", recursive=True)} == paths
    assert hub.count(kind="api") == math.ceil(len(paths) / 2)


def test_safetensors_metadata_uses_ranged_gets(hub, api, store):
    meta = api.get_safetensors_metadata("acme/big")
    assert meta.files_metadata["model.safetensors"].tensors["emb"].shape == [512, 1024]
    gets = [r for r in hub.log if r["method"] == "GET"]
    assert gets and all(r["status"] == 206 and r["range"] for r in gets)
    size = (store / "acme/big/model.safetensors").stat().st_size
    assert hub.bytes_sent(kind="resolve") <= 100_001 < size

    hub.reset_log()
    meta = api.get_safetensors_metadata("acme/sharded")
    assert meta.sharded and meta.weight_map["b.bias"] == "model-00002-of-00002.safetensors"
    t = meta.files_metadata["model-00002-of-00002.safetensors"].tensors
    assert (t["b.weight"].dtype, t["b.weight"].shape, t["b.bias"].shape) == ("F32", [7], [2, 2])
    assert all(r["status"] == 206 for r in hub.log if r["method"] == "GET" and ".safetensors" in r["path"]
               and not r["path"].endswith(".json"))

    one = api.parse_safetensors_file_metadata("acme/tiny-mlp", "model.safetensors")
    assert one.tensors["fc2.weight"].dtype == "F16" and one.parameter_count == {"F32": 40, "F16": 16}

    hub.reset_log()
    sharded = api.get_sharded_safetensors_metadata("acme/sharded")  # one API call for every shard header
    assert sharded.files_metadata["model-00001-of-00002.safetensors"].tensors["a.weight"].shape == [3, 5]
    assert hub.count() == 1 and hub.count(kind="resolve") == 0


def test_hf_hub_download_identical_and_errors(hub, store, tmp_path):
    for repo, name in [("acme/big", "model.safetensors"), ("acme/tiny-mlp", "config.json"),
                       ("oldco/legacy-bin", "pytorch_model.bin"), ("acme/sharded", "sub/notes.txt")]:
        path = hf_hub_download(repo, name, endpoint=hub.url, cache_dir=tmp_path, token=False)
        assert Path(path).read_bytes() == (store / repo / name).read_bytes()
    assert hub.count(method="HEAD", kind="resolve") == 4 and hub.count(method="GET", kind="resolve") == 4
    head = next(r for r in hub.log if r["method"] == "HEAD")
    assert head["bytes_sent"] == 0

    with pytest.raises(GatedRepoError) as e401:
        hf_hub_download("gatedorg/secret", "model.safetensors", endpoint=hub.url, cache_dir=tmp_path, token=False)
    with pytest.raises(GatedRepoError) as e403:
        hf_hub_download("gatedorg/secret", "model.safetensors", endpoint=hub.url, cache_dir=tmp_path, token="hf_x")
    assert (e401.value.response.status_code, e403.value.response.status_code) == (401, 403)
    assert hub.log[-1]["auth"] is True
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/nothing", "config.json", endpoint=hub.url, cache_dir=tmp_path, token=False)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("acme/tiny-mlp", "nope.bin", endpoint=hub.url, cache_dir=tmp_path, token=False)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("acme/tiny-mlp", "config.json", revision="dev", endpoint=hub.url, cache_dir=tmp_path,
                        token=False)


def test_resolve_headers_and_ranges(hub, store):
    data = (store / "acme/big/model.safetensors").read_bytes()
    url = f"{hub.url}/acme/big/resolve/main/model.safetensors"
    status, headers, body = _get(url, {"Range": "bytes=10-19"})
    assert status == 206 and body == data[10:20]
    assert headers["Content-Range"] == f"bytes 10-19/{len(data)}" and headers["Content-Length"] == "10"
    assert headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"' and headers["X-Linked-Size"] == str(len(data))
    assert headers["Accept-Ranges"] == "bytes" and len(headers["X-Repo-Commit"]) == 40
    assert _get(url, {"Range": f"bytes={len(data) - 4}-"})[2] == data[-4:]
    assert _get(url, {"Range": "bytes=-3"})[2] == data[-3:]
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(url, {"Range": f"bytes={len(data)}-"})
    assert err.value.code == 416
    sha = headers["X-Repo-Commit"]
    assert _get(f"{hub.url}/acme/big/resolve/{sha}/model.safetensors", {"Range": "bytes=0-7"})[2] == data[:8]
    assert hub.count(status=206) == 4 and hub.count(status=416) == 1


def test_429_is_retried_by_list_models(store):
    with HubServer(store, page_size=PAGE, p429=0.5, retry_after=0, seed=1, fault_kinds=("api",),
                   max_consecutive_faults=1) as hub:
        api = HfApi(endpoint=hub.url, token=False)
        t0 = time.monotonic()
        assert len(list(api.list_models(author="bulk"))) == N_BULK
        n429 = hub.count(status=429)
        assert 1 <= n429 <= 3 and hub.count(status=200) == 3
        assert time.monotonic() - t0 >= n429  # the client sleeps t + 1 s per 429
        faulted = next(r for r in hub.log if r["status"] == 429)
        assert faulted["fault"] == "429"

        hub.clear_faults()
        hub.schedule_fault("429", kind="api")
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(f"{hub.url}/api/models?author=bulk")
        assert err.value.code == 429 and err.value.headers["Retry-After"] == "0"
        assert err.value.headers["RateLimit"] == '"api";r=0;t=0'
        assert "RateLimit-Policy" in err.value.headers

        hub.schedule_fault("500", kind="api")
        with pytest.raises(HfHubHTTPError) as e500:
            api.model_info("acme/tiny-mlp")  # model_info does not retry
        assert e500.value.response.status_code == 500


def test_quota_rate_limit(store):
    with HubServer(store, quota={"api": (3, 60)}) as hub:
        for _ in range(3):
            status, headers, _ = _get(f"{hub.url}/api/models/acme/big")
            assert status == 200 and headers["RateLimit"].startswith('"api";r=')
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(f"{hub.url}/api/models/acme/big")
        assert err.value.code == 429 and err.value.headers["RateLimit"].startswith('"api";r=0;t=')
        assert _get(f"{hub.url}/acme/big/resolve/main/model.safetensors", {"Range": "bytes=0-7"})[0] == 206


def test_latency_bandwidth_and_requests_in_flight(store):
    """The bench's network: every answer waits `latency_s`; file bodies are paced per connection; the server counts
    the requests it handles at once."""
    from concurrent.futures import ThreadPoolExecutor

    size = (store / "acme/big/model.safetensors").stat().st_size  # 2 MiB
    with HubServer(store, latency_s=0.3, bytes_per_s=4e6) as hub:
        t = time.monotonic()
        status, _, body = _get(f"{hub.url}/api/models/acme/big")
        assert status == 200 and time.monotonic() - t >= 0.3
        t = time.monotonic()
        assert len(_get(f"{hub.url}/acme/big/resolve/main/model.safetensors")[2]) == size
        assert time.monotonic() - t >= 0.3 + 0.9 * size / 4e6  # latency, then the body at 4 MB/s
        assert hub.peak_inflight == 1
        with ThreadPoolExecutor(4) as pool:
            assert [r[0] for r in pool.map(lambda _: _get(f"{hub.url}/api/models/acme/tiny-mlp"), range(4))] == [200] * 4
        assert hub.peak_inflight == 4 and max(r["inflight"] for r in hub.log) == 4


def test_cut_and_short_bodies(store, tmp_path):
    data = (store / "acme/big/model.safetensors").read_bytes()
    with HubServer(store, p_cut=1.0, fault_kinds=("resolve",)) as hub:
        host, port = hub.url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port))
        conn.request("GET", "/acme/big/resolve/main/model.safetensors")
        resp = conn.getresponse()
        assert int(resp.headers["Content-Length"]) == len(data)
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        conn.close()
        time.sleep(0.05)
        assert hub.log[-1]["bytes_sent"] == len(data) // 2 and hub.log[-1]["fault"] == "cut"

        # with a bound on consecutive faults, the client's retries converge to the right file. It reads the body
        # in 10 MiB chunks, so below 10 MiB a cut loses everything and the retry restarts without a Range.
        hub.max_consecutive_faults = 3  # the raw GET above was the first fault of this streak
        path = hf_hub_download("acme/big", "model.safetensors", endpoint=hub.url, cache_dir=tmp_path, token=False)
        assert Path(path).read_bytes() == data
        gets = [r for r in hub.log[1:] if r["method"] == "GET"]
        assert [(r["fault"], r["range"]) for r in gets] == [("cut", None), ("cut", None), (None, None)]

        hub.clear_faults()
        hub.schedule_fault("short", kind="resolve")
        status, headers, body = _get(f"{hub.url}/acme/big/resolve/main/model.safetensors", {"Range": "bytes=0-99"})
        assert status == 206 and len(body) == 50 and headers["Content-Range"] == f"bytes 0-99/{len(data)}"
        hub.schedule_fault("short", kind="resolve", method="GET")
        with pytest.raises(OSError, match="Consistency check failed"):  # not retried by hf_hub_download
            hf_hub_download("acme/big", "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "c2",
                            token=False)


def test_tokens_log_file_and_cli(store, tmp_path):
    log_file = tmp_path / "requests.jsonl"
    with HubServer(store, tokens={"hf_good"}, log_path=log_file) as hub:
        assert HfApi(endpoint=hub.url, token="hf_good").model_info("acme/private-one").private is True
        with pytest.raises(HfHubHTTPError) as err:
            HfApi(endpoint=hub.url, token="hf_secret_bad").model_info("acme/tiny-mlp")
        assert err.value.response.status_code == 401
    text = log_file.read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["status"] for r in rows] == [200, 401] and all(r["auth"] for r in rows)
    assert "hf_good" not in text and "hf_secret_bad" not in text

    script = Path(__file__).with_name("hubserver.py")
    proc = subprocess.Popen([sys.executable, str(script), "--root", str(store), "--port", "0", "--page-size", "5"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.strip().rsplit(" ", 1)[-1]
        assert line.startswith("HubServer serving") and url.startswith("http://127.0.0.1:")
        status, headers, body = _get(f"{url}/api/models?author=bulk")
        assert status == 200 and len(json.loads(body)) == 5 and 'rel="next"' in headers["Link"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cut_body_resumes_with_range(tmp_path):
    """Above 10 MiB the client keeps what it got and resumes with `Range: bytes=N-`."""
    data = fake_safetensors({"w": ("F32", [6, 1 << 20])})  # 24 MiB
    make_repo(tmp_path / "hub", "big/file", {"model.safetensors": data})
    with HubServer(tmp_path / "hub") as hub:
        hub.schedule_fault("cut", kind="resolve", method="GET")
        path = hf_hub_download("big/file", "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "c",
                               token=False)
        assert Path(path).read_bytes() == data
        gets = [r for r in hub.log if r["method"] == "GET"]
        assert [r["status"] for r in gets] == [200, 206] and gets[0]["fault"] == "cut"
        assert gets[1]["range"] == f"bytes={10 << 20}-"
        assert hub.bytes_sent(kind="resolve") == len(data) // 2 + len(data) - (10 << 20)


def test_disk_changes_and_stop(tmp_path):
    root = tmp_path / "hub"
    make_repo(root, "live/repo", {"config.json": "{}"}, downloads=1)
    hub = HubServer(root).start()
    api = HfApi(endpoint=hub.url, token=False)
    sha1 = api.model_info("live/repo").sha
    make_repo(root, "live/repo", {"model.safetensors": fake_safetensors({"w": ("BF16", [4])})}, sha="f" * 40)
    make_repo(root, "live/new", {"config.json": "{}"})
    info = api.model_info("live/repo", files_metadata=True)
    assert info.sha == "f" * 40 != sha1 and info.safetensors.parameters == {"BF16": 4}
    assert [m.id for m in api.list_models(author="live")] == ["live/new", "live/repo"]
    hub.stop()
    with pytest.raises(httpx2.TransportError):  # keep-alive connections are dropped too
        api.model_info("live/repo")
