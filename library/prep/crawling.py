"""Image collection with icrawler's Bing crawler (finetune/crawl_images.py).

icrawler does the searching, paging, parsing and downloading; two small subclasses add what a dataset
needs: the feeder takes its search host as a setting (a mirror, or the local server of the tests), and
the downloader skips URLs fetched by earlier runs, refuses files that do not decode fully as images
(counted; icrawler only opens their header), and appends one line per saved file to ``sources.jsonl``
(file, URL, query, time) as soon as it is written, so an interrupted run keeps its record.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from urllib.parse import quote, urlparse

from icrawler import ImageDownloader
from icrawler.builtin.bing import BingFeeder
from PIL import Image

from library.utils.errors import UserError

BING = "https://www.bing.com"
SOURCES = "sources.jsonl"
PAGE = 20  # results per Bing page, as icrawler's feeder steps


@dataclass
class CrawlRecord:
    """What the downloader threads share: URLs already fetched, the sources file, counts."""

    sources: Path
    query: str
    seen: set[str] = field(default_factory=set)
    saved: int = 0
    broken: int = 0
    known: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, out_dir: Path, query: str) -> CrawlRecord:
        record = cls(out_dir / SOURCES, query)
        if record.sources.is_file():
            for line in record.sources.read_text(encoding="utf-8").splitlines():
                try:
                    record.seen.add(json.loads(line)["url"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash: the rest still counts
        return record

    def claim(self, url: str) -> bool:
        """True the first time a URL is seen (in this run or an earlier one)."""
        with self.lock:
            if url in self.seen:
                self.known += 1
                return False
            self.seen.add(url)
            return True

    def saved_file(self, filename: str, url: str) -> None:
        line = json.dumps({"file": filename, "url": url, "query": self.query,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, ensure_ascii=False)
        with self.lock, open(self.sources, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            self.saved += 1


class HostBingFeeder(BingFeeder):
    """icrawler's Bing feeder (its filters and paging) with the search host as a setting."""

    def __init__(self, thread_num, signal, session, host: str = BING):
        super().__init__(thread_num, signal, session)
        self.host = host.rstrip("/")

    def feed(self, keyword, offset, max_num, filters=None):
        self.filter = self.get_filter()
        applied = self.filter.apply(filters)
        qft = "&qft=" + applied if applied else ""
        for first in range(offset, offset + max_num, PAGE):
            self.out_queue.put(f"{self.host}/images/async?q={quote(keyword)}&first={first}{qft}")


class RecordingDownloader(ImageDownloader):
    """icrawler's image downloader that skips known URLs, keeps only fully decodable images and
    records every saved file."""

    def __init__(self, thread_num, signal, session, storage, record: CrawlRecord):
        super().__init__(thread_num, signal, session, storage)
        self.record = record

    def download(self, task, default_ext, timeout=5, max_retry=3, overwrite=False, **kwargs):
        if not self.record.claim(task["file_url"]):
            task["success"], task["filename"] = False, None
            return
        return super().download(task, default_ext, timeout, max_retry, overwrite, **kwargs)

    def keep_file(self, task, response, min_size=None, max_size=None):
        try:
            with Image.open(BytesIO(response.content)) as img:
                img.load()  # the whole file: a truncated or corrupt download is refused here
        except Exception:  # noqa: BLE001 - any decoder error means the download is not an image
            with self.record.lock:
                self.record.broken += 1
            return False
        return super().keep_file(task, response, min_size=min_size, max_size=max_size)

    def process_meta(self, task):
        if task.get("success") and task.get("filename"):
            self.record.saved_file(task["filename"], task["file_url"])


def check_reachable(host: str, timeout: float = 3.0) -> None:
    """Fail at once, not after icrawler's retries, when the search host cannot be reached."""
    url = urlparse(host)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot reach {url.hostname}:{port} ({exc}); crawl_images.py needs the network "
                        "(or a reachable --search_host)") from exc


def parse_min_size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--min_size {text!r}: one side (256) or WIDTHxHEIGHT (320x240)")
    sides = [int(p) for p in parts]
    return (sides[0], sides[-1])


def crawl(query: str, out_dir: Path, max_num: int, filters: dict, min_size, threads: int, host: str) -> CrawlRecord:
    """Download up to ``max_num`` new images into ``out_dir``, numbered after the files already there."""
    import logging

    from icrawler import Crawler
    from icrawler.builtin.bing import BingParser

    out_dir.mkdir(parents=True, exist_ok=True)
    record = CrawlRecord.load(out_dir, query)
    crawler = Crawler(feeder_cls=HostBingFeeder, parser_cls=BingParser, downloader_cls=RecordingDownloader,
                      downloader_threads=threads, storage={"root_dir": str(out_dir)}, log_level=logging.ERROR,
                      extra_feeder_args={"host": host}, extra_downloader_args={"record": record})
    pages = min(1000, max_num + len(record.seen))  # earlier results are skipped: search past them
    crawler.crawl(feeder_kwargs={"keyword": query, "offset": 0, "max_num": pages, "filters": filters or None},
                  downloader_kwargs={"max_num": max_num, "min_size": min_size, "file_idx_offset": "auto"})
    return record
