"""The one fetcher (`preprocess/fetch.py`) through `load_image`: the shared address corpus, host spellings, a
resolver answering public + loopback, and loopback listeners (127.0.0.1 and 127.0.0.2) that must see zero
connections. The server side of the same corpus is in test_server_media.py. Also: local files are read only
when regular (a real FIFO, /dev/zero, a folder)."""

from __future__ import annotations

import os
import time

import pytest
from address_corpus import (
    BLOCKED,
    LOOPBACK_SPELLINGS,
    PUBLIC,
    corpus_names,
    Victims,
    resolver_for,
)

from llava_next.errors import InvalidImageError
from llava_next.preprocess.fetch import FetchPolicy, blocked_reason, parse_ip
from llava_next.preprocess.images import load_image


@pytest.fixture
def victims():
    v = Victims()
    yield v
    v.close()


@pytest.mark.parametrize("address", BLOCKED)
def test_blocked_corpus(address):
    assert blocked_reason(address) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_corpus(address):
    assert blocked_reason(address) is None


def test_spellings_parse_to_loopback():
    for text in LOOPBACK_SPELLINGS:
        ip = parse_ip(text)
        assert ip is None and "localhost" in text.lower() or blocked_reason(ip) is not None, text


def test_load_image_refuses_the_corpus_without_a_connection(victims):
    table = corpus_names()
    policy = FetchPolicy(resolve=resolver_for(table), timeout=2, connect_timeout=0.5)
    for name in table:
        with pytest.raises(InvalidImageError, match="refused to fetch"):
            load_image(f"http://{name}:{victims.port}/x.png", fetch_policy=policy)
    for host in LOOPBACK_SPELLINGS:
        with pytest.raises(InvalidImageError, match="refused to fetch"):
            load_image(f"http://{host}:{victims.port}/x.png", timeout=2, connect_timeout=0.5)
    time.sleep(0.2)
    assert victims.connections == 0


def test_public_answers_pass_the_check():
    for address in PUBLIC:
        policy = FetchPolicy(resolve=resolver_for({"pub.test": [address]}))
        assert policy.check_url("http://pub.test/x.png")[3] == [address]


def test_control_the_victims_count_an_opted_in_fetch(victims):
    """The zero above is the classifier's doing: with the opt-in, both listeners are reached."""
    for host in ("127.0.0.1", "127.0.0.2"):
        with pytest.raises(InvalidImageError, match="could not download"):
            load_image(f"http://{host}:{victims.port}/x.png", allow_local_network=True, timeout=2,
                       connect_timeout=0.5)
    time.sleep(0.3)
    assert victims.connections == 2


def test_fifo_device_and_folder_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    link = tmp_path / "zero.png"
    os.symlink("/dev/zero", link)
    for source in (str(fifo), fifo.as_uri(), str(link), str(tmp_path)):
        start = time.monotonic()
        with pytest.raises(InvalidImageError, match="regular file|folder"):
            load_image(source)
        assert time.monotonic() - start < 1.0
