"""Reading Pipes messages while the trainer is still writing them."""

import threading
import time

from pipeline.pipes_messages import tail_whole_lines


def test_a_message_caught_half_written_is_held_until_its_newline(tmp_path):
    path = tmp_path / "messages"
    path.write_text('{"first": 1}\n{"second": "half')
    done = threading.Event()

    def finish_writing():
        time.sleep(0.2)
        with open(path, "a") as f:
            f.write(' and the rest"}\n')
        done.set()

    threading.Thread(target=finish_writing).start()
    lines = list(tail_whole_lines(str(path), done.is_set))
    assert lines == ['{"first": 1}\n', '{"second": "half and the rest"}\n']
