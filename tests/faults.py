"""Crawl workers that fail on purpose, for the fault tests (importable by Ray's workers: tests/ is on their path)."""

from __future__ import annotations

import os

from crawl.worker import CrawlWorker


class DiesAfterCommit(CrawlWorker):
    """Commits its first batch, then its process dies before returning it (once per crawl: a marker file
    in the catalog folder, named by `options["die_marker"]`, says it happened)."""

    def _batch(self, batch):
        out = super()._batch(batch)
        marker = self.options["die_marker"]
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return out
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)
