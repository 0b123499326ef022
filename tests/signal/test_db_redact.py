"""The database password never shows in a label or an error (review 14 item 2): libpq's parse errors quote the
URL or the token they could not parse, and a password may sit in the user info or in ?password=."""

from __future__ import annotations

import pytest

from signal_server.store_api import db_label, redact_db_error


@pytest.mark.parametrize("url, label", [
    ("postgresql://u:pw@db.example:5432/mesh", "postgresql://u:***@db.example:5432/mesh"),
    ("postgres://u@h/mesh?password=s3cret&sslmode=require", "postgres://u@h/mesh?password=***&sslmode=require"),
    ("postgresql://u@h/mesh?sslmode=require&password=s3cret", "postgresql://u@h/mesh?sslmode=require&password=***"),
    ("postgresql://u:s3/cret@h/mesh", "postgresql://u:***@h/mesh"),       # a '/' left unencoded
    ("postgresql://u:s3?cret@h/mesh", "postgresql://u:***@h/mesh"),       # a '?' left unencoded
    ("postgresql://u:s3cr@t@h/mesh", "postgresql://u:***@h/mesh"),        # an '@' left unencoded
    ("postgresql://h:5432/mesh?user=u", "postgresql://h:5432/mesh?user=u"),
])
def test_the_label_of_a_url_has_no_password(url, label):
    assert db_label(url) == label


@pytest.mark.parametrize("url, error", [
    ("postgresql://u:s3cret%zzpw@h/db", 'invalid percent-encoded token: "s3cret%zzpw"'),
    ("postgresql://u:s3cr%40pw@h/db", "bad password s3cr@pw"),                       # percent-decoded
    ("postgresql://u:ab/cdef@h:1/db", 'invalid integer value "ab" for connection option "port"'),
    ("postgresql://u:ab/cdef@h:1/db", 'database "cdef@h:1/db" does not exist'),
    ("postgresql://u:s3cretpw@[::1/db", 'no matching "]" in URI: "postgresql://u:s3cretpw@[::1/db"'),
    ("postgresql://u@h/db?password=s3cretpw&sslmode=zz", 'in "postgresql://u@h/db?password=s3cretpw&sslmode=zz"'),
])
def test_an_error_keeps_nothing_of_the_password(url, error):
    out = redact_db_error(url, error)
    for piece in ("s3cr", "cret", "zzpw", '"ab"', "cdef"):
        assert piece not in out
    assert "***" in out


def test_an_error_without_the_password_is_left_as_is():
    text = 'invalid sslmode value: "zz"; connection to server at "127.0.0.1", port 1 failed'
    assert redact_db_error("postgresql://u:s3cretpw@127.0.0.1:1/db", text) == text
    assert redact_db_error("postgresql://u@127.0.0.1:1/db", 'role "u" does not exist') == 'role "u" does not exist'
