"""Envelope encryption of patient identifiers, the phone blind index, and link tokens.

Every patient has a random 256-bit data key (DEK). Identifiers are sealed with it using
AES-256-GCM; the DEK itself is stored wrapped (AES-GCM) by the master key, with the
patient's external id as associated data. Destroying the wrapped DEK makes every
ciphertext of that patient unreadable (crypto-shredding, GDPR Art. 17).

Field ciphertexts carry associated data naming the patient and the field
(b"P123|phone"), so a ciphertext copied to another row or column fails to decrypt
instead of silently showing the wrong patient's data.

Phone numbers are looked up by a keyed HMAC (blind index) with a separate index key, so
the database never holds a number in clear and cannot be searched without the key.

Rotation (engine.keys): several master keys may be loaded; the current one wraps, any
loaded one unwraps (`patient_keys.master_key_id` names it). The index key is a chain,
oldest first: version n is HMAC(key n, index of version n-1), so `engage keys
rotate-index` upgrades every stored index (suppressions of erased patients included, whose
number is gone) without knowing the number, and a stolen older key alone no longer
searches the database once its values are upgraded.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from engine.settings import Settings

KEY_BYTES = 32
NONCE_BYTES = 12
FIELD_FORMAT = b"\x01"
INDEX_VERSION = "v1"  # the version of a one-key index chain
DEK_AAD_PREFIX = b"engage-dek:"


class KeyConfigError(Exception):
    """A master or index key is missing, malformed or too widely readable."""


class DecryptionError(Exception):
    """A ciphertext does not open with this key and associated data (tampered or moved)."""


def key_id(key: bytes) -> str:
    """Short public name of a key: the first 8 hex chars of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:8]


def generate_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str, *, source: str) -> bytes:
    """A base64 key of exactly 32 bytes, else a KeyConfigError naming where it came from."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyConfigError(f"{source}: not valid base64 ({exc})") from exc
    if len(key) != KEY_BYTES:
        raise KeyConfigError(f"{source}: key is {len(key)} bytes, expected {KEY_BYTES}")
    return key


def write_key_file(path: Path, key: bytes) -> None:
    """Create `path` holding `key`, readable by its owner only (0600), never overwriting."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(encode_key(key) + "\n")


def ensure_key_files(settings: Settings) -> list[Path]:
    """Create the master, index and web secret key files that are missing; return the ones
    created.

    A key given by value in the environment needs no file and none is created for it.
    """
    created = []
    for value, path in (
        (settings.master_key, settings.master_key_file),
        (settings.index_key, settings.index_key_file),
        (settings.secret_key, settings.secret_key_path),
    ):
        if value or path.exists():
            continue
        write_key_file(path, generate_key())
        created.append(path)
    return created


def read_key_file(path: Path) -> bytes:
    """The key in `path`; refused when group or others may read or write the file."""
    check_private(path)
    return decode_key(path.read_text(encoding="ascii"), source=str(path))


def check_private(path: Path) -> None:
    """KeyConfigError unless `path` exists and only its owner may read or write it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError as exc:
        raise KeyConfigError(f"{path}: key file not found (run `engage init`)") from exc
    if mode & 0o077:
        raise KeyConfigError(
            f"{path}: key file mode is {mode:04o}; it must not be accessible to group or "
            f"others (chmod 600 {path})"
        )


def read_key_chain(path: Path) -> tuple[bytes, ...]:
    """The index keys in `path`, one base64 key per line, oldest first (0600, like any key)."""
    check_private(path)
    return decode_key_chain(path.read_text(encoding="ascii"), source=str(path))


def decode_key_chain(text: str, *, source: str) -> tuple[bytes, ...]:
    """Keys separated by newlines or commas, oldest first; at least one."""
    parts = [part for part in text.replace(",", "\n").split() if part]
    if not parts:
        raise KeyConfigError(f"{source}: no key")
    return tuple(decode_key(part, source=f"{source} (key {i})") for i, part in enumerate(parts, 1))


def write_key_chain(path: Path, keys: tuple[bytes, ...]) -> None:
    """Replace `path` atomically with this chain, mode 0600 (the old chain is its prefix)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write("".join(encode_key(k) + "\n" for k in keys))
    os.replace(tmp, path)


def load_keys(settings: Settings) -> Keyring:
    """The keyring from environment values when set, else from the key files, with the
    previous master keys that still unwrap data keys wrapped before a rotation."""
    master = (
        decode_key(settings.master_key, source="ENGAGE_MASTER_KEY")
        if settings.master_key
        else read_key_file(settings.master_key_file)
    )
    chain = (
        decode_key_chain(settings.index_key, source="ENGAGE_INDEX_KEY")
        if settings.index_key
        else read_key_chain(settings.index_key_file)
    )
    previous: dict[str, bytes] = {}
    if settings.previous_master_keys:
        for key in decode_key_chain(
            settings.previous_master_keys, source="ENGAGE_PREVIOUS_MASTER_KEYS"
        ):
            previous[key_id(key)] = key
    for path in settings.previous_master_key_files:
        key = read_key_file(path)
        previous[key_id(key)] = key
    previous.pop(key_id(master), None)
    return Keyring(
        master_key=master,
        index_key=chain[-1],
        previous_master_keys=previous,
        previous_index_keys=chain[:-1],
    )


def load_secret_key(settings: Settings) -> bytes:
    """The key that signs web sessions and CSRF tokens (never used for data)."""
    if settings.secret_key:
        return decode_key(settings.secret_key, source="ENGAGE_SECRET_KEY")
    return read_key_file(settings.secret_key_path)


def encrypt(dek: bytes, plaintext: str | None, *, aad: bytes) -> bytes | None:
    """Seal `plaintext` as version byte + nonce + ciphertext and tag; None stays None."""
    if plaintext is None:
        return None
    nonce = secrets.token_bytes(NONCE_BYTES)
    return FIELD_FORMAT + nonce + AESGCM(dek).encrypt(nonce, plaintext.encode("utf-8"), aad)


def decrypt(dek: bytes, blob: bytes | None, *, aad: bytes) -> str | None:
    """Open a value sealed by `encrypt` with the same key and associated data."""
    if blob is None:
        return None
    return _open(AESGCM(dek), bytes(blob), aad)


def _open(aead: AESGCM, blob: bytes, aad: bytes) -> str:
    if blob[:1] != FIELD_FORMAT or len(blob) < 1 + NONCE_BYTES + 16:
        raise DecryptionError("unknown ciphertext format")
    try:
        plain = aead.decrypt(blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :], aad)
    except InvalidTag as exc:
        raise DecryptionError(f"ciphertext does not open for {aad!r}") from exc
    return plain.decode("utf-8")


class PatientCipher:
    """Seals and opens one patient's fields with their unwrapped data key.

    Field names may carry a record id (`prescription/RX1/medication`) to bind a value to
    its row as well as to its column.
    """

    __slots__ = ("_aead", "patient_id")

    def __init__(self, dek: bytes, *, patient_id: str) -> None:
        self._aead = AESGCM(dek)
        self.patient_id = patient_id

    def aad(self, name: str) -> bytes:
        return f"{self.patient_id}|{name}".encode()

    def encrypt_field(self, name: str, value: str | None) -> bytes | None:
        if value is None:
            return None
        nonce = secrets.token_bytes(NONCE_BYTES)
        return FIELD_FORMAT + nonce + self._aead.encrypt(nonce, value.encode(), self.aad(name))

    def decrypt_field(self, name: str, blob: bytes | None) -> str | None:
        if blob is None:
            return None
        return _open(self._aead, bytes(blob), self.aad(name))


@dataclass(frozen=True, repr=False)
class Keyring:
    """The master key (wraps data keys) and the index key (blind index HMAC).

    `previous_master_keys` (by key id) still unwrap data keys wrapped before a rotation.
    `previous_index_keys` are the older links of the index chain, oldest first; the
    current `index_key` is the last link, so its version is their number plus one.
    """

    master_key: bytes
    index_key: bytes
    previous_master_keys: Mapping[str, bytes] = field(default_factory=dict)
    previous_index_keys: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        named = [("master", self.master_key), ("index", self.index_key)]
        named += [("previous master", k) for k in self.previous_master_keys.values()]
        named += [("previous index", k) for k in self.previous_index_keys]
        for name, key in named:
            if len(key) != KEY_BYTES:
                raise KeyConfigError(f"{name} key is {len(key)} bytes, expected {KEY_BYTES}")

    @property
    def index_chain(self) -> tuple[bytes, ...]:
        return (*self.previous_index_keys, self.index_key)

    @property
    def index_version(self) -> int:
        return len(self.previous_index_keys) + 1

    @property
    def master_key_ids(self) -> frozenset[str]:
        """Every master key that can unwrap: the current one and the previous ones."""
        return frozenset({self.master_key_id, *self.previous_master_keys})

    def with_master_key(self, new: bytes) -> Keyring:
        """This keyring wrapping with `new`; every key loaded now still unwraps."""
        previous = {**self.previous_master_keys, self.master_key_id: self.master_key}
        previous.pop(key_id(new), None)
        return Keyring(new, self.index_key, previous, self.previous_index_keys)

    def with_index_key(self, new: bytes) -> Keyring:
        """This keyring with `new` as the next link of the index chain (version + 1)."""
        return Keyring(self.master_key, new, self.previous_master_keys, (*self.index_chain,))

    def __repr__(self) -> str:
        return f"Keyring(master_key_id={self.master_key_id!r})"

    @cached_property  # compared on every unwrap
    def master_key_id(self) -> str:
        return key_id(self.master_key)

    def new_data_key(self, *, patient_id: str) -> tuple[bytes, bytes, str]:
        """A fresh data key for a patient: (dek, wrapped dek, id of the wrapping key)."""
        dek = generate_key()
        return dek, self.wrap(dek, patient_id=patient_id), self.master_key_id

    def wrap(self, dek: bytes, *, patient_id: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        aad = DEK_AAD_PREFIX + patient_id.encode()
        return nonce + _master_aead(self.master_key).encrypt(nonce, dek, aad)

    def unwrap(self, wrapped: bytes, *, patient_id: str, master_key_id: str | None = None) -> bytes:
        """The data key inside `wrapped`; DecryptionError when it was not wrapped for them."""
        key = self._master_for(master_key_id)
        wrapped = bytes(wrapped)
        try:
            return _master_aead(key).decrypt(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], DEK_AAD_PREFIX + patient_id.encode()
            )
        except InvalidTag as exc:
            raise DecryptionError(f"data key of patient {patient_id} does not unwrap") from exc

    def cipher(
        self, wrapped: bytes, *, patient_id: str, master_key_id: str | None = None
    ) -> PatientCipher:
        dek = self.unwrap(wrapped, patient_id=patient_id, master_key_id=master_key_id)
        return PatientCipher(dek, patient_id=patient_id)

    def phone_index(self, e164: str) -> str:
        """Blind index of an E.164 number, tagged with the index key version (`v1:`...)."""
        digest = hmac.new(self.index_chain[0], e164.encode(), hashlib.sha256).hexdigest()
        return self.upgrade_index(f"{INDEX_VERSION}:{digest}")

    def upgrade_index(self, value: str) -> str:
        """A stored index of an older version brought to the current one, without the number.

        KeyConfigError when it claims a version newer than this keyring knows.
        """
        version = index_version(value)
        if version > self.index_version:
            raise KeyConfigError(
                f"a v{version} phone index needs {version} index keys; {self.index_version} "
                "are loaded (is the index key file the whole chain?)"
            )
        for n in range(version + 1, self.index_version + 1):
            digest = hmac.new(self.index_chain[n - 1], value.encode(), hashlib.sha256)
            value = f"v{n}:{digest.hexdigest()}"
        return value

    def _master_for(self, master_key_id: str | None) -> bytes:
        if master_key_id is None or master_key_id == self.master_key_id:
            return self.master_key
        try:
            return self.previous_master_keys[master_key_id]
        except KeyError as exc:
            raise DecryptionError(f"master key {master_key_id} is not loaded") from exc


@functools.lru_cache(maxsize=8)
def _master_aead(key: bytes) -> AESGCM:
    """The AES-GCM instance of a master key, made once (a planner unwraps a key per patient)."""
    return AESGCM(key)


def index_version(value: str) -> int:
    """The version number of a stored phone index (`v2:ab12...` -> 2)."""
    prefix, sep, _ = value.partition(":")
    if not sep or not prefix.startswith("v") or not prefix[1:].isdigit():
        raise ValueError(f"not a versioned phone index: {value[:8]!r}")
    return int(prefix[1:])


def new_token(nbytes: int = 16) -> tuple[str, str]:
    """An unguessable URL-safe token and the hash to store instead of it."""
    token = secrets.token_urlsafe(nbytes)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
