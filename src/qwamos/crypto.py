"""The project's only door to the crypto library (our "hazmat" layer).

Nothing outside this module imports ``cryptography`` or calls ``os.urandom``: the volume format, the keystore
and everything above them go through the names defined here.  The contract follows pyca/cryptography's AEAD
shape — the object holds a key and no nonce state; ``open`` raises :class:`AuthenticationFailed`, never
returns a flag — so that a failure cannot be mistaken for data.

Hybrid KEM ``x25519-mlkem1024``
    An X-Wing-style combiner (draft-connolly-cfrg-xwing-kem) over ML-KEM-1024 (FIPS 203) and X25519.  The
    shared secret is ``SHA3-256(LABEL || ss_M || ss_X || ct_M || ct_X || pk_M || pk_X)``; unlike X-Wing
    (which relies on ML-KEM's ciphertext binding and hashes only the X25519 ciphertext and key) it binds both
    ciphertexts and both public keys.  The construction is written up in ``docs/keystore-format.md``.
    No standard code point exists for this pair, hence a QWAMOS-specific label.

Legacy KEM ``ecdh-curve25519``
    Ephemeral-static X25519 with the same hash shape, for keys written by configs that predate the hybrid.

Runs of AEAD records
    :meth:`Aead.open_records` and :meth:`Aead.seal_records` take a whole run (a 1 MiB request is 256 slots)
    in one call.  Where the project's small C extension ``qwamos._aead_runs`` is built (``make venv`` builds
    it; it links the system's OpenSSL), the loop runs in C without the GIL; otherwise, or with
    ``QWAMOS_AEAD_RUNS=python`` in the environment, the same loop runs here over the library's calls.  Both
    give the same bytes (tests/test_crypto_runs.py); docs/design.md ("Batch AEAD") says why it exists.

Signatures ``ml-dsa-87``
    ML-DSA-87 (FIPS 204, category 5 like ML-KEM-1024), for what must be authenticated to another host without
    a round trip (key grants).  The private key is kept as its 32-byte seed; every signature carries a
    context string naming its purpose, so a signature made for one kind of document never verifies as another.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable
from functools import cache

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qwamos.errors import AuthenticationFailed, InvalidArgument

try:
    from qwamos import _aead_runs as _native_runs
except ImportError:  # not built (no C compiler or OpenSSL headers): the Python loop below does the same
    _native_runs = None
# Why the C extension was set aside in this process, once a call of it failed for a reason that is not the
# data's (e.g. a system OpenSSL restricted to FIPS algorithms, which has no ChaCha20-Poly1305).
_native_failure: str | None = None

log = logging.getLogger("qwamos.crypto")

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16

CHACHA20_POLY1305 = "chacha20-poly1305"
AES_256_GCM = "aes-256-gcm"
ALGORITHMS = (CHACHA20_POLY1305, AES_256_GCM)
# One byte per algorithm, for associated data and binary headers.  Never renumber.
ALGORITHM_IDS = {CHACHA20_POLY1305: 1, AES_256_GCM: 2}

HYBRID_KEM = "x25519-mlkem1024"
LEGACY_KEM = "ecdh-curve25519"
KEMS = (HYBRID_KEM, LEGACY_KEM)

_HYBRID_LABEL = b"QWAMOS-KEM-v1/x25519-mlkem1024"
_LEGACY_LABEL = b"QWAMOS-KEM-v1/ecdh-curve25519"
MLKEM_PK_SIZE = 1568
MLKEM_CT_SIZE = 1568
MLKEM_SEED_SIZE = 64
X25519_SIZE = 32

SIGNATURE = "ml-dsa-87"
MLDSA_SEED_SIZE = 32
MLDSA_PK_SIZE = 2592
MLDSA_SIG_SIZE = 4627

_Buf = bytes | bytearray | memoryview
# What the raw loop function of :meth:`Aead.opener` raises on a tag mismatch (the
# library's exception, named here so that no other module imports the library).
TagMismatch = InvalidTag


def random_bytes(n: int) -> bytes:
    """Bytes from the OS CSPRNG: the one ``os.urandom`` call of the project.

    For this module (and tests).  The library draws through the named functions below, so that every kind
    of random value has one recipe (size, shape) and ``tests/test_layering.py`` can forbid generic draws
    everywhere else.
    """
    return os.urandom(n)


# --- named draws: every nonce, key, salt and identifier the project makes ----------------------------

UUID_SIZE = 16
SALT_SIZE = 16


def new_volume_key() -> bytes:
    """A new 32-byte symmetric key (a volume key)."""
    return random_bytes(KEY_SIZE)


def new_repository_key() -> bytes:
    """A new 32-byte master key of a backup repository (its subkeys are derived with HKDF)."""
    return random_bytes(KEY_SIZE)


def new_commitment_secret() -> bytes:
    """A new 32-byte secret a key file carries next to its volume key, for the volume header's key commitment."""
    return random_bytes(KEY_SIZE)


def new_nonce() -> bytes:
    """One random 12-byte AEAD nonce (key-file wrapping, passphrase sealing)."""
    return random_bytes(NONCE_SIZE)


def new_nonces(count: int) -> bytes:
    """``count`` random 12-byte nonces in one draw (the volume's nonce pool refills with thousands at once:
    one system call instead of one per block)."""
    if count < 1:
        raise InvalidArgument("count must be at least 1")
    return random_bytes(count * NONCE_SIZE)


def new_salt(size: int = SALT_SIZE) -> bytes:
    """A random KDF salt (at least 16 bytes, as :func:`argon2id` requires)."""
    if size < 16:
        raise InvalidArgument("a salt is at least 16 bytes")
    return random_bytes(size)


def new_uuid() -> bytes:
    """16 random bytes shaped as a version-4 UUID (RFC 9562: 122 random bits), e.g. a volume's ``volume_uuid``."""
    u = bytearray(random_bytes(UUID_SIZE))
    u[6] = (u[6] & 0x0F) | 0x40
    u[8] = (u[8] & 0x3F) | 0x80
    return bytes(u)


def new_id_hex(nbytes: int) -> str:
    """``nbytes`` random bytes as lowercase hex: the random part of a public identifier (key ids)."""
    return random_bytes(nbytes).hex()


def new_mac_address(prefix: str = "52:54:00") -> str:
    """A MAC address: ``prefix`` (three octets; QEMU's default OUI) and three random octets."""
    return prefix + "".join(f":{b:02x}" for b in random_bytes(3))


def new_scrub_bytes(size: int) -> bytes:
    """Random bytes to overwrite a secret file with before it is unlinked."""
    return random_bytes(size)


# --- what is in use ---------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    """The crypto library's version and the OpenSSL it is linked against, for ``qwamos --version``.

    An operator (or a bug report) needs the versions actually loaded, not the ones a lock or a distribution
    promised: a wheel bundles its own OpenSSL, a distro build links the system's.
    """
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend

    versions = {"cryptography": cryptography.__version__, "openssl": backend.openssl_version_text()}
    versions["aead runs"] = runs_implementation()
    return versions


def runs_implementation() -> str:
    """Which loop :meth:`Aead.open_records` and :meth:`Aead.seal_records` use: ``native (OpenSSL x.y.z)`` or
    ``python``.  ``QWAMOS_AEAD_RUNS=python`` selects the Python loop even where the extension is built."""
    runs = _runs()
    if runs is not None:
        return f"native ({runs.OPENSSL_VERSION})"
    return "python" if _native_failure is None else f"python (the C extension failed: {_native_failure})"


def _runs():
    """The C extension, or None for the Python loop.  Read on every call (it is a dict lookup) so that a test
    or a benchmark can switch implementations in one process."""
    if _native_runs is None or _native_failure is not None or os.environ.get("QWAMOS_AEAD_RUNS") == "python":
        return None
    return _native_runs


def _set_native_aside(e: RuntimeError) -> None:
    """The C extension could not set up or run OpenSSL's AEAD (never an authentication failure: those are
    results).  The caller redoes its whole run with the Python loop, which writes every output byte again,
    and so does every later call in this process."""
    global _native_failure
    _native_failure = str(e)
    log.warning("the C loop for runs of blocks failed (%s); using the Python loop from now on", e)


# --- AEAD ---------------------------------------------------------------------------------------------


@cache
def cpu_has_aes() -> bool:
    """True when the CPU advertises AES instructions (x86 ``aes`` flag, arm64 ``aes`` feature)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features") and "aes" in value.split():
                    return True
    except OSError:
        pass
    return False


def resolve_algorithm(name: str) -> str:
    """Map a user's choice (``auto`` or an algorithm name) to a supported algorithm name.

    ``auto`` picks AES-256-GCM where the CPU has AES instructions (about twice ChaCha20-Poly1305's speed
    through the crypto library on this project's machines), else ChaCha20-Poly1305, which is fast in
    software and immune to cache-timing without AES hardware.
    """
    name = name.strip().lower().replace("_", "-")
    if name == "auto":
        return AES_256_GCM if cpu_has_aes() else CHACHA20_POLY1305
    if name not in ALGORITHMS:
        raise InvalidArgument(f"unknown algorithm {name!r}; choose one of auto, {', '.join(ALGORITHMS)}")
    return name


class Aead:
    """An AEAD cipher under one key: ``seal(nonce, plaintext, aad) -> ciphertext||tag``.

    Holds no nonce state: callers derive nonces (see the volume's slot recipe).
    """

    __slots__ = ("_alg_id", "_cipher", "_key", "algorithm")

    def __init__(self, algorithm: str, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray | memoryview):
            raise TypeError("key must be bytes")
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes")
        if algorithm == CHACHA20_POLY1305:
            self._cipher = ChaCha20Poly1305(bytes(key))
        elif algorithm == AES_256_GCM:
            self._cipher = AESGCM(bytes(key))
        else:
            raise InvalidArgument(f"unknown algorithm {algorithm!r}")
        self.algorithm = algorithm
        self._alg_id = ALGORITHM_IDS[algorithm]
        self._key = bytes(key)  # for the C loop of the record runs (the library keeps its own copy too)

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._cipher.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Decrypt and verify; raise :class:`AuthenticationFailed` (and nothing else) on any mismatch."""
        try:
            return self._cipher.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise AuthenticationFailed() from None

    def seal_into(self, nonce: _Buf, plaintext: _Buf, aad: _Buf, out: memoryview) -> None:
        """Like :meth:`seal`, writing ciphertext||tag into ``out`` (exactly len(plaintext)+16 bytes).

        Lets the volume encrypt straight into a preallocated slot buffer, without a copy per block.
        """
        self._cipher.encrypt_into(nonce, plaintext, aad, out)

    def opener(self) -> Callable[[_Buf, _Buf, _Buf, memoryview], None]:
        """:meth:`open_into` without the wrapper, for the volume's loop over a run of slots that are not alike;
        it raises :data:`TagMismatch` on a mismatch, which the caller must turn into :class:`AuthenticationFailed`
        itself."""
        return self._cipher.decrypt_into

    def open_into(self, nonce: _Buf, ciphertext: _Buf, aad: _Buf, out: memoryview) -> None:
        """Like :meth:`open`, writing the plaintext into ``out``; raise :class:`AuthenticationFailed` on a
        mismatch (``out`` may then hold garbage and must not be used)."""
        try:
            self._cipher.decrypt_into(nonce, ciphertext, aad, out)
        except InvalidTag:
            raise AuthenticationFailed() from None

    def open_records(
        self,
        src: _Buf,
        stride: int,
        nonce_off: int,
        length: int,
        aads: _Buf,
        aad_len: int,
        out: memoryview,
        count: int,
    ) -> list[int]:
        """Open ``count`` records in one call; return the indices (0-based) of those that do not authenticate.

        Record ``i`` starts at ``i * stride`` in ``src``: a 12-byte nonce at ``nonce_off``, then ``length`` bytes
        of ciphertext, then the 16-byte tag.  Its associated data is ``aads[i * aad_len : (i + 1) * aad_len]``
        and its plaintext goes to ``out[i * length : (i + 1) * length]``; a record that fails has its plaintext
        zeroed there, so no unauthenticated byte reaches the caller.  A geometry that does not fit the buffers
        raises :class:`ValueError` before anything is written.
        """
        runs = _runs()
        if runs is not None:
            try:
                return runs.open_records(
                    self._alg_id, self._key, src, stride, nonce_off, length, aads, aad_len, out, count
                )
            except RuntimeError as e:
                _set_native_aside(e)
        _check_run(len(src), stride, nonce_off, length, count, "src", len(aads), aad_len, len(out), "out")
        decrypt = self._cipher.decrypt_into
        src = memoryview(src)
        aads = memoryview(aads)
        bad = []
        for i in range(count):
            o = i * stride + nonce_off
            p = i * length
            a = i * aad_len
            try:
                decrypt(
                    src[o : o + NONCE_SIZE],
                    src[o + NONCE_SIZE : o + NONCE_SIZE + length + TAG_SIZE],
                    aads[a : a + aad_len],
                    out[p : p + length],
                )
            except InvalidTag:
                out[p : p + length] = bytes(length)
                bad.append(i)
        return bad

    def seal_records(
        self,
        plain: _Buf,
        length: int,
        out: memoryview,
        stride: int,
        nonce_off: int,
        aads: _Buf,
        aad_len: int,
        count: int,
    ) -> None:
        """Seal ``count`` plaintexts of ``length`` bytes (``plain[i * length : ...]``) into the records of
        ``out`` laid out as in :meth:`open_records`, each under the nonce already at its ``nonce_off``."""
        runs = _runs()
        if runs is not None:
            try:
                runs.seal_records(
                    self._alg_id, self._key, plain, length, out, stride, nonce_off, aads, aad_len, count
                )
                return
            except RuntimeError as e:
                _set_native_aside(e)
        _check_run(len(out), stride, nonce_off, length, count, "out", len(aads), aad_len, len(plain), "plain")
        encrypt = self._cipher.encrypt_into
        plain = memoryview(plain)
        aads = memoryview(aads)
        for i in range(count):
            o = i * stride + nonce_off
            p = i * length
            a = i * aad_len
            encrypt(
                out[o : o + NONCE_SIZE],
                plain[p : p + length],
                aads[a : a + aad_len],
                out[o + NONCE_SIZE : o + NONCE_SIZE + length + TAG_SIZE],
            )


def _check_run(
    size: int, stride: int, nonce_off: int, length: int, count: int, what: str,
    aads_size: int, aad_len: int, flat_size: int, flat: str,
) -> None:  # fmt: skip
    """The C extension's checks, for the Python loop: both refuse the same runs the same way, before any
    byte is written.  ``what`` names the buffer of records (``size`` bytes), ``flat`` the buffer of
    ``length``-byte plaintexts (``flat_size`` bytes)."""
    if min(count, length, nonce_off, stride, aad_len) < 0:
        raise ValueError(f"{what}: negative or oversized geometry")
    if count == 0:
        return
    record = nonce_off + NONCE_SIZE + length + TAG_SIZE
    if record > stride:
        raise ValueError(f"{what}: a record of {record} bytes does not fit a stride of {stride}")
    if (count - 1) * stride + record > size:
        raise ValueError(f"{what}: {count} records of stride {stride} do not fit {size} bytes")
    if count * aad_len > aads_size:
        raise ValueError(f"aads: {count} items of {aad_len} bytes do not fit {aads_size} bytes")
    if count * length > flat_size:
        raise ValueError(f"{flat}: {count} items of {length} bytes do not fit {flat_size} bytes")


# --- hashing, MACs, KDFs ------------------------------------------------------------------------------


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha3_256(data: bytes) -> bytes:
    return hashlib.sha3_256(data).digest()


def hkdf_sha256(key: bytes, *, salt: bytes, info: bytes, length: int = KEY_SIZE) -> bytes:
    """HKDF-SHA256 (RFC 5869).  ``info`` carries a versioned label so that derived keys never collide."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def verify_hmac_sha256(key: bytes, data: bytes, tag: bytes) -> None:
    """Raise :class:`AuthenticationFailed` unless ``tag`` is the MAC of ``data`` (constant-time compare)."""
    if not hmac.compare_digest(hmac_sha256(key, data), tag):
        raise AuthenticationFailed()


def constant_time_eq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def argon2id(
    passphrase: bytes, salt: bytes, *, iterations: int, memory_kib: int, lanes: int, length: int = KEY_SIZE
) -> bytes:
    """Argon2id (RFC 9106) for passphrase-sealed secrets; parameters are stored beside the salt."""
    if len(salt) < 16:
        raise InvalidArgument("argon2id salt must be at least 16 bytes")
    kdf = Argon2id(salt=salt, length=length, iterations=iterations, lanes=lanes, memory_cost=memory_kib)
    return kdf.derive(passphrase)


# --- KEM ----------------------------------------------------------------------------------------------


def kem_generate() -> tuple[bytes, bytes]:
    """A new hybrid identity: ``(private, public)``.

    private = ML-KEM-1024 seed (64) || X25519 private (32); public = ML-KEM-1024 ek (1568) || X25519 (32).
    The X25519 half also serves the legacy ``ecdh-curve25519`` KEM.
    """
    m = mlkem.MLKEM1024PrivateKey.generate()
    x = x25519.X25519PrivateKey.generate()
    private = m.private_bytes_raw() + x.private_bytes_raw()
    return private, kem_public_from_private(private)


def kem_public_from_private(private: bytes) -> bytes:
    m, x = _split_private(private)
    return m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()


def _split_private(private: bytes) -> tuple[mlkem.MLKEM1024PrivateKey, x25519.X25519PrivateKey]:
    if len(private) != MLKEM_SEED_SIZE + X25519_SIZE:
        raise InvalidArgument("hybrid private key has the wrong length")
    m = mlkem.MLKEM1024PrivateKey.from_seed_bytes(private[:MLKEM_SEED_SIZE])
    x = x25519.X25519PrivateKey.from_private_bytes(private[MLKEM_SEED_SIZE:])
    return m, x


def _split_public(public: bytes) -> tuple[bytes, bytes]:
    if len(public) != MLKEM_PK_SIZE + X25519_SIZE:
        raise InvalidArgument("hybrid public key has the wrong length")
    return public[:MLKEM_PK_SIZE], public[MLKEM_PK_SIZE:]


def kem_encapsulate(kem: str, public: bytes) -> tuple[bytes, bytes]:
    """Encapsulate to an identity's public key: ``(shared_secret, ciphertext)``.

    ``x25519-mlkem1024``: ct = ct_M (1568) || ct_X (32).  ``ecdh-curve25519``: ct = ct_X (32).
    """
    pk_m_raw, pk_x_raw = _split_public(public)
    pk_x = x25519.X25519PublicKey.from_public_bytes(pk_x_raw)
    eph = x25519.X25519PrivateKey.generate()
    ct_x = eph.public_key().public_bytes_raw()
    ss_x = eph.exchange(pk_x)
    if kem == LEGACY_KEM:
        return sha3_256(_LEGACY_LABEL + ss_x + ct_x + pk_x_raw), ct_x
    if kem != HYBRID_KEM:
        raise InvalidArgument(f"unknown KEM {kem!r}")
    ss_m, ct_m = mlkem.MLKEM1024PublicKey.from_public_bytes(pk_m_raw).encapsulate()
    return _combine(ss_m, ss_x, ct_m, ct_x, pk_m_raw, pk_x_raw), ct_m + ct_x


def kem_decapsulate(kem: str, private: bytes, ciphertext: bytes) -> bytes:
    """Recover the shared secret.  A wrong identity yields an unrelated secret (ML-KEM's implicit
    rejection), which the caller's AEAD then refuses; malformed lengths raise :class:`InvalidArgument`."""
    m, x = _split_private(private)
    pk_m_raw = m.public_key().public_bytes_raw()
    pk_x_raw = x.public_key().public_bytes_raw()
    if kem == LEGACY_KEM:
        if len(ciphertext) != X25519_SIZE:
            raise InvalidArgument("ecdh-curve25519 ciphertext has the wrong length")
        ss_x = x.exchange(x25519.X25519PublicKey.from_public_bytes(ciphertext))
        return sha3_256(_LEGACY_LABEL + ss_x + ciphertext + pk_x_raw)
    if kem != HYBRID_KEM:
        raise InvalidArgument(f"unknown KEM {kem!r}")
    if len(ciphertext) != MLKEM_CT_SIZE + X25519_SIZE:
        raise InvalidArgument("x25519-mlkem1024 ciphertext has the wrong length")
    ct_m, ct_x = ciphertext[:MLKEM_CT_SIZE], ciphertext[MLKEM_CT_SIZE:]
    ss_m = m.decapsulate(ct_m)
    ss_x = x.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    return _combine(ss_m, ss_x, ct_m, ct_x, pk_m_raw, pk_x_raw)


def x25519_static_secret(private: bytes, peer_public: bytes) -> bytes:
    """The static-static X25519 secret between a hybrid identity's private key and another identity's hybrid
    public key (their X25519 halves): what only these two holders can compute, so a MAC under it
    authenticates the sender to the receiver (key grants, docs/keystore-format.md).  Classical only: ML-KEM
    gives no authentication without a round trip.  An all-zero result (a low-order point) is refused."""
    _m, x = _split_private(private)
    _pk_m, pk_x = _split_public(peer_public)
    try:
        secret = x.exchange(x25519.X25519PublicKey.from_public_bytes(pk_x))
    except ValueError:
        raise InvalidArgument("X25519 rejected the public key (a low-order point)") from None
    if not any(secret):
        raise InvalidArgument("X25519 gave an all-zero secret (a low-order public key)")
    return secret


# --- signatures (ML-DSA-87, FIPS 204) ---------------------------------------------------------------------


def sign_generate() -> tuple[bytes, bytes]:
    """A new ML-DSA-87 signing key: ``(seed (32 bytes), public key (2592 bytes))``.  The seed is the whole
    private key (FIPS 204 key generation from the seed ``xi``)."""
    key = mldsa.MLDSA87PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def sign_public_from_seed(seed: bytes) -> bytes:
    """The ML-DSA-87 public key of a 32-byte seed (deterministic)."""
    return _mldsa_key(seed).public_key().public_bytes_raw()


def _mldsa_key(seed: bytes) -> mldsa.MLDSA87PrivateKey:
    if len(seed) != MLDSA_SEED_SIZE:
        raise InvalidArgument("ML-DSA-87 seed has the wrong length")
    return mldsa.MLDSA87PrivateKey.from_seed_bytes(seed)


def _check_context(context: bytes) -> None:
    # FIPS 204 allows up to 255 bytes; an empty context would let a signature serve any purpose.
    if not 0 < len(context) <= 255:
        raise InvalidArgument("a signature context is 1 to 255 bytes")


def sign(seed: bytes, message: bytes, *, context: bytes) -> bytes:
    """ML-DSA-87 signature (hedged: two signatures of one message differ) of ``message`` under the key of
    ``seed``, for the purpose named by ``context`` (FIPS 204's context string)."""
    _check_context(context)
    return _mldsa_key(seed).sign(message, context)


def verify_signature(public: bytes, message: bytes, signature: bytes, *, context: bytes) -> None:
    """Raise :class:`AuthenticationFailed` unless ``signature`` is an ML-DSA-87 signature of ``message``
    under ``public`` with ``context``; a malformed public key or signature fails the same way."""
    _check_context(context)
    if len(public) != MLDSA_PK_SIZE or len(signature) != MLDSA_SIG_SIZE:
        raise AuthenticationFailed()
    try:
        mldsa.MLDSA87PublicKey.from_public_bytes(public).verify(signature, message, context)
    except (InvalidSignature, ValueError):
        raise AuthenticationFailed() from None


def _combine(ss_m: bytes, ss_x: bytes, ct_m: bytes, ct_x: bytes, pk_m: bytes, pk_x: bytes) -> bytes:
    return sha3_256(_HYBRID_LABEL + ss_m + ss_x + ct_m + ct_x + pk_m + pk_x)


# --- X.509 for the NBD export's mutual TLS (docs/nbd-export.md "TLS") ---------------------------------------
# A small private CA, its server certificate and its client certificates, shaped the way QEMU's
# tls-creds-x509 and libnbd (both GnuTLS) check them: the CA has basicConstraints CA:TRUE and keyCertSign;
# a leaf is CA:FALSE with digitalSignature + keyEncipherment (QEMU refuses a critical keyUsage without
# keyEncipherment) and the extended key usage of its role; a server certificate names every host and address
# clients dial in its subjectAltName (GnuTLS checks the name the client connected to).  ECDSA P-256 with
# SHA-256: what every TLS 1.3 stack accepts.

X509_DAYS_CA = 3650
X509_DAYS_LEAF = 825


def _x509_key_pem(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _x509_builder(subject_cn: str, issuer: object, public_key: object, days: int) -> object:
    import datetime

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer if issuer is not None else name)  # type: ignore[arg-type]
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of two hosts differ a little
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
    )


def x509_new_ca(common_name: str, *, days: int = X509_DAYS_CA) -> tuple[bytes, bytes]:
    """A self-signed CA certificate and its private key, both PEM: ``(cert, key)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    builder = _x509_builder(common_name, None, key.public_key(), days)
    cert = (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)  # type: ignore[attr-defined]
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM), _x509_key_pem(key)


def x509_issue(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    *,
    server: bool,
    hosts: tuple[str, ...] = (),
    days: int = X509_DAYS_LEAF,
) -> tuple[bytes, bytes]:
    """A leaf certificate signed by the CA, and its new private key (PEM): a server certificate (serverAuth,
    ``hosts`` as DNS names or IP addresses in subjectAltName) or a client certificate (clientAuth)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except ValueError as e:
        raise InvalidArgument(f"cannot load the CA certificate or key: {e}") from None
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _x509_builder(common_name, ca_cert.subject, key.public_key(), days)
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)  # type: ignore[attr-defined]
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM), _x509_key_pem(key)


def x509_describe(cert_pem: bytes) -> dict[str, object]:
    """Subject CN, issuer CN, validity end and subjectAltNames of a PEM certificate (for ``qwamos tls``)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise InvalidArgument(f"not a PEM certificate: {e}") from None

    def cn(name: x509.Name) -> str:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else ""

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        hosts += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        hosts = []
    return {
        "subject": cn(cert.subject),
        "issuer": cn(cert.issuer),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "hosts": hosts,
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }
