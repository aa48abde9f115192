"""The reader's trust policy of the integrations: values, scope, and that it is never stored."""

from __future__ import annotations

import threading

import pytest

from cupycodec.integrations import trust

KEY = bytes(range(32))


@pytest.fixture(autouse=True)
def _default_trust():
    assert trust.current() == trust.Policy()
    yield
    trust.configure(trusted=False, key=None)


def test_default_believes_nothing():
    p = trust.current()
    assert p.trusted is False and p.key is None
    assert not p.chunk_trusted(True) and not p.chunk_trusted(False)


@pytest.mark.parametrize("trusted, declared, expected", [
    (False, True, False), (False, False, False),
    ("metadata", True, True), ("metadata", False, False),
    (True, True, True), (True, False, True),
])
def test_which_chunks_are_trusted(trusted, declared, expected):
    assert trust.Policy(trusted=trusted).chunk_trusted(declared) is expected


def test_configure_is_process_wide_and_keeps_what_it_is_not_given():
    trust.configure(key=KEY)
    trust.configure(trusted="metadata")
    assert trust.current() == trust.Policy("metadata", KEY)
    seen = []
    t = threading.Thread(target=lambda: seen.append(trust.current()))
    t.start()
    t.join()
    assert seen == [trust.Policy("metadata", KEY)]  # zarr's event-loop thread and Dask's threads see it
    trust.configure(key=None)
    assert trust.current() == trust.Policy("metadata", None)


def test_settings_restore_the_previous_policy():
    trust.configure(trusted=True)
    with trust.settings(key=KEY) as p:
        assert p == trust.Policy(True, KEY) == trust.current()
        with trust.settings(trusted=False):
            assert trust.current() == trust.Policy(False, KEY)
        assert trust.current() == trust.Policy(True, KEY)
    assert trust.current() == trust.Policy(True, None)


def test_the_key_is_never_printed():
    p = trust.Policy(True, KEY)
    assert repr(p) == "Policy(trusted=True, key='<set>')"
    assert KEY.hex() not in repr(p) and str(KEY) not in repr(p)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"trusted": "yes"}, ValueError, "False, True or 'metadata'"),
    ({"trusted": 1.0}, ValueError, "False, True or 'metadata'"),
    ({"key": "secret-secret-secret"}, TypeError, "key must be bytes"),
    ({"key": b"short"}, ValueError, "at least 16 bytes"),
    ({"key": 32}, TypeError, "key must be bytes"),  # bytes(32): 32 zero bytes, a key anyone has
    ({"key": 2**70}, TypeError, "key must be bytes"),
    ({"key": [1] * 32}, TypeError, "key must be bytes"),
])
def test_bad_values_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        trust.configure(**kwargs)
    with pytest.raises(error, match=match):
        trust.settings(**kwargs)
    assert trust.current() == trust.Policy()


def test_one_settings_object_entered_twice_restores_each_level():
    """The instance kept one previous policy: entered again inside its own block, its inner exit overwrote what the
    outer exit restores, and trusted=True stayed on after both blocks."""
    trusted = trust.settings(trusted=True)
    with trust.settings(trusted="metadata"):
        with trusted:
            with trusted:
                assert trust.current().trusted is True
            assert trust.current().trusted is True
        assert trust.current().trusted == "metadata"
    assert trust.current() == trust.Policy()
