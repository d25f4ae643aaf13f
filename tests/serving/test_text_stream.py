"""Releasing generated text: whole UTF-8 characters only, stop strings never shown."""

from __future__ import annotations

from serving.text_stream import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.push(p) for p in pieces]


def test_a_character_split_across_tokens_waits_for_its_last_byte():
    stream = TextStream()
    euro = "€".encode()  # three bytes
    assert feed(stream, [b"price ", euro[:1], euro[1:2], euro[2:] + b"5"]) == ["price ", "", "", "€5"]
    assert stream.finish() == ""


def test_bytes_that_can_never_be_utf8_become_replacement_characters():
    stream = TextStream()
    assert stream.push(b"a\xffb") == "a\ufffdb"
    assert stream.push("é".encode()[:1]) == ""
    assert stream.finish() == "\ufffd"  # an unfinished character at the very end


def test_stop_string_split_across_tokens_is_held_back_and_dropped():
    stream = TextStream(stop=["###"])
    assert feed(stream, [b"Answer: 42", b" #", b"#"]) == ["Answer: 42", " ", ""]
    assert stream.push(b"# Next") == ""
    assert stream.stopped
    assert stream.push(b"more") == "" and stream.finish() == ""


def test_held_back_text_is_released_once_it_cannot_become_a_stop():
    stream = TextStream(stop=["STOP"])
    assert stream.push(b"go ST") == "go "
    assert stream.push(b"AY") == "STAY"
    assert stream.push(b" ST") == " "
    assert stream.finish() == "ST"  # the end came first: the tail was never a stop string


def test_earliest_of_several_stops_wins_and_text_before_it_is_kept():
    stream = TextStream(stop=["world", "lo w"])
    assert stream.push(b"hello world") == "hel"
    assert stream.stopped


def test_a_stop_inside_a_multibyte_run():
    stream = TextStream(stop=["€"])
    euro = "€".encode()
    assert feed(stream, [b"cost: 5", euro[:2]]) == ["cost: 5", ""]
    assert stream.push(euro[2:] + b" more") == "" and stream.stopped
