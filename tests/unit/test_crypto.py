"""Envelope encryption, blind index and key files, without a database."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from engine.crypto import (
    DecryptionError,
    KeyConfigError,
    Keyring,
    PatientCipher,
    decrypt,
    encrypt,
    ensure_key_files,
    generate_key,
    key_id,
    load_keys,
    load_secret_key,
    new_token,
    token_hash,
)
from engine.settings import Settings


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    var = tmp_path / "var"
    settings = Settings(
        var_dir=var,
        database_url="sqlite://",
        master_key_file=var / "master.key",
        index_key_file=var / "index.key",
    )
    return settings.with_(**overrides)


def make_keyring() -> Keyring:
    return Keyring(master_key=generate_key(), index_key=generate_key())


def test_key_files_are_created_owner_only_and_load(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    old_umask = os.umask(0)  # even a permissive umask must not widen the files
    try:
        created = ensure_key_files(settings)
    finally:
        os.umask(old_umask)

    assert created == [
        settings.master_key_file,
        settings.index_key_file,
        settings.secret_key_path,
    ]
    for path in created:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keyring = load_keys(settings)
    assert keyring.master_key != keyring.index_key
    assert load_secret_key(settings) not in (keyring.master_key, keyring.index_key)
    assert ensure_key_files(settings) == []  # never overwritten
    assert load_keys(settings).master_key == keyring.master_key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    settings = make_settings(tmp_path)
    ensure_key_files(settings)
    settings.index_key_file.chmod(mode)

    with pytest.raises(KeyConfigError) as error:
        load_keys(settings)

    assert str(settings.index_key_file) in str(error.value)
    assert f"mode is {mode:04o}" in str(error.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (base64.b64encode(b"short").decode(), "key is 5 bytes, expected 32"),
        ("not base64!!", "not valid base64"),
    ],
)
def test_a_malformed_key_is_refused(tmp_path: Path, value: str, message: str) -> None:
    settings = make_settings(tmp_path, master_key=value)
    ensure_key_files(settings)

    with pytest.raises(KeyConfigError, match=message) as error:
        load_keys(settings)
    assert "ENGAGE_MASTER_KEY" in str(error.value)


def test_keys_given_in_the_environment_need_no_files(tmp_path: Path) -> None:
    master, index, secret = generate_key(), generate_key(), generate_key()
    settings = make_settings(
        tmp_path,
        master_key=base64.b64encode(master).decode(),
        index_key=base64.b64encode(index).decode(),
        secret_key=base64.b64encode(secret).decode(),
    )

    assert ensure_key_files(settings) == []
    keyring = load_keys(settings)
    assert (keyring.master_key, keyring.index_key) == (master, index)
    assert load_secret_key(settings) == secret
    assert not settings.var_dir.exists()


def test_field_encryption_round_trips_and_none_stays_none() -> None:
    dek = generate_key()
    blob = encrypt(dek, "Zoë Ämmälä", aad=b"P1|given_name")

    assert (
        blob is not None
        and blob[:1] == b"\x01"
        and len(blob) == 1 + 12 + len("Zoë Ämmälä".encode()) + 16
    )
    assert decrypt(dek, blob, aad=b"P1|given_name") == "Zoë Ämmälä"
    assert encrypt(dek, "x", aad=b"a") != encrypt(dek, "x", aad=b"a")  # fresh nonce each time
    assert encrypt(dek, None, aad=b"a") is None and decrypt(dek, None, aad=b"a") is None


@pytest.mark.parametrize("aad", [b"P2|given_name", b"P1|family_name", b""])
def test_a_ciphertext_does_not_open_under_other_associated_data(aad: bytes) -> None:
    dek = generate_key()
    blob = encrypt(dek, "Zebulon", aad=b"P1|given_name")

    with pytest.raises(DecryptionError):
        decrypt(dek, blob, aad=aad)


def test_a_tampered_ciphertext_does_not_open() -> None:
    dek = generate_key()
    blob = bytearray(encrypt(dek, "Zebulon", aad=b"P1|x") or b"")
    blob[-1] ^= 1

    with pytest.raises(DecryptionError):
        decrypt(dek, bytes(blob), aad=b"P1|x")


def test_data_keys_are_wrapped_for_one_patient() -> None:
    keyring = make_keyring()
    dek, wrapped, master_id = keyring.new_data_key(patient_id="P1")

    assert master_id == key_id(keyring.master_key) and len(master_id) == 8
    assert dek not in wrapped and len(dek) == 32
    assert keyring.unwrap(wrapped, patient_id="P1", master_key_id=master_id) == dek
    with pytest.raises(DecryptionError):
        keyring.unwrap(wrapped, patient_id="P2")
    with pytest.raises(DecryptionError):
        make_keyring().unwrap(wrapped, patient_id="P1")


def test_previous_master_keys_still_unwrap_after_rotation() -> None:
    old = make_keyring()
    _, wrapped, old_id = old.new_data_key(patient_id="P1")
    new = Keyring(generate_key(), old.index_key, previous_master_keys={old_id: old.master_key})

    assert new.unwrap(wrapped, patient_id="P1", master_key_id=old_id)
    with pytest.raises(DecryptionError, match="not loaded"):
        make_keyring().unwrap(wrapped, patient_id="P1", master_key_id=old_id)


def test_patient_cipher_binds_patient_and_field() -> None:
    keyring = make_keyring()
    dek, wrapped, _ = keyring.new_data_key(patient_id="P1")
    cipher = keyring.cipher(wrapped, patient_id="P1")
    blob = cipher.encrypt_field("phone", "+12125550142")

    assert cipher.decrypt_field("phone", blob) == "+12125550142"
    assert decrypt(dek, blob, aad=b"P1|phone") == "+12125550142"
    with pytest.raises(DecryptionError):
        cipher.decrypt_field("given_name", blob)
    with pytest.raises(DecryptionError):
        PatientCipher(dek, patient_id="P2").decrypt_field("phone", blob)


def test_phone_index_is_keyed_versioned_and_deterministic() -> None:
    keyring = make_keyring()
    index = keyring.phone_index("+12125550142")

    assert index.startswith("v1:") and len(index) == 3 + 64
    assert index == keyring.phone_index("+12125550142")
    assert index != keyring.phone_index("+12125550143")
    assert index != make_keyring().phone_index("+12125550142")
    assert "2125550142" not in index


def test_keys_never_show_in_repr() -> None:
    keyring = make_keyring()
    assert keyring.master_key.hex() not in repr(keyring)
    assert repr(keyring) == f"Keyring(master_key_id={keyring.master_key_id!r})"


def test_link_tokens_are_stored_as_hashes() -> None:
    token, digest = new_token()
    assert len(token) >= 22 and digest == token_hash(token) and token not in digest
    assert new_token()[0] != token
