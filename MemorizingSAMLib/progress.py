"""Progress of long loops (build-memory, evaluate, the training memory) as tqdm bars on stderr."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """A ``progress(done, total, what)`` callback drawing one tqdm bar per run of ``total`` items; ``what`` (the
    item just finished) is shown after the bar."""

    def __init__(self, desc: str | None = None, stream=None) -> None:
        self.desc, self.stream = desc, stream
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int, what: str = "") -> None:
        if self.bar is None or self.bar.total != total:
            self.close()
            self.bar = tqdm(total=total, desc=self.desc, file=self.stream or sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(what[:40], refresh=True)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
