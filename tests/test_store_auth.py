"""The run's store signs every value the runtime writes and checks each one it reads (runtime/auth.py):
junk or forged values from a writer without the run's secret are a clear error naming the key."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from asteroid_fx.ir.errors import InputError
from asteroid_fx.runtime import auth
from asteroid_fx.runtime.auth import SignedStore, secret_from_env
from asteroid_fx.runtime.errors import StoreValueRejected
from asteroid_fx.runtime.store import (EPOCH, SPEC, agreed_failure, beat_key, epoch_of, failure_key, get_float,
                                       get_json, loss_key, seconds_key)

SECRET = "s" * 64


def pair():
    raw = dist.HashStore()
    return raw, SignedStore(raw, SECRET, "launcher"), SignedStore(raw, SECRET, "host0")


def test_signed_values_round_trip_between_writers():
    raw, launcher, worker = pair()
    worker.set(loss_key("host0", 3), repr(0.25))
    assert get_float(launcher, loss_key("host0", 3)) == 0.25
    worker.set(failure_key(0), json.dumps({"device": "host1", "reason": "silent", "by": "host0", "at": 1.0}))
    assert agreed_failure(launcher, 0)["device"] == "host1"
    launcher.set(EPOCH, "2")
    assert epoch_of(worker) == 2
    assert raw.get(EPOCH) != b"2"  # what lies in the store is signed, not the bare payload


@pytest.mark.parametrize("key, junk", [
    ("epoch0/0/2", b"junk"),  # not one of the runtime's keys at all
    (SPEC, json.dumps({"lr": 1e6}).encode()),
    (loss_key("host0", 100), b"1e9"),
    (beat_key("host1"), b"dead"),
    (failure_key(0), b"junk"),
    (EPOCH, b"junk"),
])
def test_a_value_without_the_secret_is_refused_naming_its_key(key, junk):
    raw, launcher, _ = pair()
    raw.set(key, junk)
    with pytest.raises(StoreValueRejected, match="not signed with this run's secret") as e:
        launcher.get(key)
    assert repr(key) in str(e.value)


def test_a_value_signed_with_another_secret_is_refused_and_names_the_claimed_writer():
    raw, launcher, _ = pair()
    SignedStore(raw, "other", "rogue").set(loss_key("host0", 100), "1e9")
    with pytest.raises(StoreValueRejected, match="claims to be from 'rogue'"):
        get_float(launcher, loss_key("host0", 100))


def test_a_signed_value_moved_to_another_key_is_refused():
    raw, launcher, worker = pair()
    worker.set(beat_key("host0"), "dead")
    raw.set(beat_key("host1"), raw.get(beat_key("host0")))
    assert launcher.get(beat_key("host0")) == b"dead"
    with pytest.raises(StoreValueRejected, match="ft/hb/host1"):
        launcher.get(beat_key("host1"))


@pytest.mark.parametrize("key, payload, why", [
    (seconds_key("host0", 1), "nan", "not finite"),  # a loss may be nan (a diverged run), a step time not
    (loss_key("host0", 1), "junk", "could not convert"),
    (EPOCH, "-1", "non-negative"),
    (beat_key("host1"), "maybe", "heartbeat"),
    (failure_key(0), "[1]", "expected dict"),
    (failure_key(0), json.dumps({"device": "host1"}), "missing reason"),
    (SPEC, "{", "not what the key holds"),
    ("nosuch/key", "1", "no such key"),
])
def test_a_signed_value_of_the_wrong_shape_is_refused_naming_key_and_writer(key, payload, why):
    _, launcher, worker = pair()
    worker.set(key, payload)
    with pytest.raises(StoreValueRejected, match=why) as e:
        launcher.get(key)
    assert repr(key) in str(e.value) and "'host0'" in str(e.value)


def test_compare_set_signs_and_checks_the_winner():
    raw, launcher, worker = pair()
    record = json.dumps({"device": "host1", "reason": "silent", "by": "host0", "at": 1.0})
    assert json.loads(worker.compare_set(failure_key(0), "", record))["by"] == "host0"
    other = json.dumps({"device": "host2", "reason": "x", "by": "launcher", "at": 2.0})
    assert json.loads(launcher.compare_set(failure_key(0), "", other))["device"] == "host1"  # first come wins
    raw.set(failure_key(1), b"junk")
    with pytest.raises(StoreValueRejected, match="ft/fail/1"):
        launcher.compare_set(failure_key(1), "", other)
    assert get_json(worker, failure_key(0))["device"] == "host1"


def test_the_secret_comes_from_the_environment_or_a_file(tmp_path):
    assert secret_from_env({auth.SECRET_ENV: " abc\n"}) == "abc"
    f = tmp_path / "secret"
    f.write_text("fromfile\n")
    assert secret_from_env({auth.SECRET_FILE_ENV: str(f)}) == "fromfile"
    with pytest.raises(InputError, match=auth.SECRET_ENV):
        secret_from_env({})
    with pytest.raises(InputError, match="not a file"):
        secret_from_env({auth.SECRET_FILE_ENV: str(tmp_path)})
    assert len(auth.new_secret()) == 64 and auth.new_secret() != auth.new_secret()


def test_gloo_records_are_signed_bytes_and_multi_get_checks_every_value():
    raw, launcher, worker = pair()
    record = bytes(range(256))  # gloo's address records are not text
    worker.c10d().set("epoch0/0/1", record)
    assert launcher.c10d().get("epoch0/0/1") == record
    assert raw.get("epoch0/0/1") != record
    raw.set("epoch0/0/2", b"junk")
    with pytest.raises(StoreValueRejected, match="'epoch0/0/2'"):
        launcher.c10d().get("epoch0/0/2")
    worker.set(beat_key("host0"), "3")
    raw.set(beat_key("host1"), b"dead")
    assert launcher.multi_get([beat_key("host0")]) == [b"3"]
    with pytest.raises(StoreValueRejected, match="'ft/hb/host1'"):
        launcher.multi_get([beat_key("host0"), beat_key("host1")])
