"""finetune/crawl_images.py: icrawler's real Bing crawler against a search host on 127.0.0.1 that
serves result pages in the markup icrawler's Bing parser reads, and the images they point to (some
broken or truncated, one URL listed twice)."""

from __future__ import annotations

import html
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from PIL import Image

from finetune import crawl_images
from library.utils.errors import UserError

BROKEN, TRUNCATED = {4, 9}, {6}


def _jpeg(n: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (n * 5 % 256, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


class _Search(BaseHTTPRequestHandler):
    results: list[int] = [*range(5), 3, *range(5, 60)]  # image 3 listed twice
    pages_asked: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/images/async":
            query = parse_qs(url.query)
            self.pages_asked.append(query.get("q", [""])[0])
            first = int(query["first"][0])
            host = f"http://127.0.0.1:{self.server.server_address[1]}"
            # icrawler's parser reads the "m" attribute's compact JSON (no spaces) up to ".jpg"
            links = [json.dumps({"murl": f"{host}/img/{n}.jpg"}, separators=(",", ":"))
                     for n in self.results[first:first + 20]]
            divs = "".join(f'<div class="imgpt"><a m="{html.escape(m)}"></a></div>' for m in links)
            return self._send(f"<html><body>{divs}</body></html>".encode(), "text/html")
        n = int(url.path.removeprefix("/img/").removesuffix(".jpg"))
        body = b"not an image" if n in BROKEN else _jpeg(n)[: 300 if n in TRUNCATED else None]
        self._send(body, "image/jpeg")

    def _send(self, body: bytes, kind: str):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def search_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Search)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _sources(folder):
    return [json.loads(x) for x in (folder / "sources.jsonl").read_text().splitlines()]


def test_crawl_saves_records_refuses_broken_and_continues(search_host, tmp_path, capsys):
    out = tmp_path / "raw"
    args = ["--query", "red cat", "--type", "clipart", "--color", "color", "--out_dir", str(out), "--threads", "1",
            "--search_host", search_host]
    crawl_images.main(args + ["--max_num", "10"])
    files = sorted(p.name for p in out.glob("*.jpg"))
    assert files == [f"{i:06d}.jpg" for i in range(1, 11)]
    for p in out.glob("*.jpg"):
        Image.open(p).load()  # every saved file decodes fully
    rows = _sources(out)
    urls = [r["url"] for r in rows]
    assert len(rows) == 10 and len(set(urls)) == 10 and {r["file"] for r in rows} == set(files)
    assert not any(f"/img/{n}.jpg" in u for u in urls for n in BROKEN | TRUNCATED)
    said = capsys.readouterr().out
    assert "red cat" in _Search.pages_asked and "3 download(s) that were not images refused" in said
    crawl_images.main(args + ["--max_num", "5"])
    assert "10 URL(s) already fetched skipped" in capsys.readouterr().out
    rows = _sources(out)
    assert len(rows) == 15 and len({r["url"] for r in rows}) == 15  # no URL fetched twice
    assert sorted(p.name for p in out.glob("*.jpg"))[-1] == "000015.jpg"  # numbering continued


def test_no_network_fails_at_once(tmp_path):
    import time

    start = time.monotonic()
    with pytest.raises(UserError, match="cannot reach 127.0.0.1:9"):
        crawl_images.main(["--query", "x", "--out_dir", str(tmp_path / "o"), "--search_host", "http://127.0.0.1:9"])
    assert time.monotonic() - start < 5 and not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="--max_num 0"):
        crawl_images.main(["--query", "x", "--max_num", "0"])
    with pytest.raises(UserError, match="--min_size"):
        crawl_images.main(["--query", "x", "--min_size", "big", "--search_host", "http://127.0.0.1:9"])
