"""A Pipes message reader that never parses half a message.

Dagster's file reader tails the message file line by line and parses whatever `readline`
returns. When it catches up with the writer in the middle of a long message (a final
materialization with its lineage runs to a few kilobytes), it gets half a line and the step
fails with a JSON error after training has finished. This reader holds a line back until its
newline has arrived.
"""

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dagster as dg


def tail_whole_lines(path: str, should_stop: Callable[[], bool], poll_seconds: float = 0.01) -> Iterator[str]:
    pending = ""
    with open(path, encoding="utf-8") as stream:
        while True:
            piece = stream.readline()
            if piece:
                pending += piece
                if pending.endswith("\n"):
                    yield pending
                    pending = ""
            elif should_stop():
                # The writer is gone; whatever arrived since the last read is all there will be.
                rest = pending + stream.read()
                yield from (line + "\n" for line in rest.splitlines() if line.strip())
                return
            else:
                time.sleep(poll_seconds)


class WholeLineFileMessageReader(dg.PipesFileMessageReader):
    def _reader_thread(self, handler, is_resource_complete) -> None:
        try:
            for line in tail_whole_lines(self._path, is_resource_complete.is_set):
                handler.handle_message(json.loads(line))
        except BaseException:
            handler.report_pipes_framework_exception(f"{self.__class__.__name__} reader thread", sys.exc_info())
            raise


class WholeLineTempFileMessageReader(dg.PipesTempFileMessageReader):
    @contextmanager
    def read_messages(self, handler) -> Iterator[dict]:
        with tempfile.TemporaryDirectory() as folder:
            reader = WholeLineFileMessageReader(os.path.join(folder, "messages"),
                                                include_stdio_in_messages=self._include_stdio_in_messages)
            with reader.read_messages(handler) as params:
                yield params


def training_pipes_client() -> dg.PipesSubprocessClient:
    return dg.PipesSubprocessClient(message_reader=WholeLineTempFileMessageReader())
