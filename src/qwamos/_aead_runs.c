/* qwamos._aead_runs: seal and open a run of AEAD records in one call, without the GIL.
 *
 * Private to qwamos.crypto (the only module that imports it; see docs/design.md, "Batch AEAD").  A 1 MiB
 * volume request is 256 records of 4 KiB; through the Python library that is 256 calls, each taking and
 * dropping the GIL, which keeps the export's one Python thread busy for the whole decryption.  Here the run is
 * one call: the loop runs in C with the GIL released, so the export's event loop (or a second thread) goes on.
 *
 * A record, at i * stride in its buffer, holds a 12-byte nonce at nonce_off, the ciphertext (length bytes)
 * right after it and the 16-byte tag right after that.  Record i's associated data is aads[i * aad_len :
 * (i + 1) * aad_len] and its plaintext is plain[i * length : (i + 1) * length].  The algorithms are the IETF
 * ChaCha20-Poly1305 (RFC 8439) and AES-256-GCM with 96-bit nonces and 128-bit tags, through OpenSSL's EVP
 * interface, byte for byte what the Python library computes (tests/test_crypto_runs.py checks both ways).
 *
 * Every size and offset is checked against the buffers before any byte is touched; a record that does not
 * authenticate has its plaintext zeroed and its index returned, so no unauthenticated byte reaches a caller.
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <string.h>

#define KEY_SIZE 32
#define NONCE_SIZE 12
#define TAG_SIZE 16

static const EVP_CIPHER *cipher_of(int alg) {
    /* The algorithm numbers are qwamos.crypto's ALGORITHM_IDS (those of the slot's associated data). */
    switch (alg) {
    case 1:
        return EVP_chacha20_poly1305();
    case 2:
        return EVP_aes_256_gcm();
    default:
        return NULL;
    }
}

/* Check the record geometry against the buffers; on failure set ValueError and return 0. */
static int check_geometry(const char *what, Py_ssize_t buflen, Py_ssize_t stride, Py_ssize_t nonce_off,
                          Py_ssize_t length, Py_ssize_t count) {
    if (count < 0 || length < 0 || length > INT_MAX - TAG_SIZE || nonce_off < 0 || nonce_off > INT_MAX ||
        stride < 0) {
        PyErr_Format(PyExc_ValueError, "%s: negative or oversized geometry", what);
        return 0;
    }
    if (count == 0)
        return 1;
    Py_ssize_t record = nonce_off + NONCE_SIZE + length + TAG_SIZE; /* no overflow: each term is below INT_MAX */
    if (record > stride) {
        PyErr_Format(PyExc_ValueError, "%s: a record of %zd bytes does not fit a stride of %zd", what, record,
                     stride);
        return 0;
    }
    if ((count - 1) > (PY_SSIZE_T_MAX - record) / (stride ? stride : 1) || (count - 1) * stride + record > buflen) {
        PyErr_Format(PyExc_ValueError, "%s: %zd records of stride %zd do not fit %zd bytes", what, count, stride,
                     buflen);
        return 0;
    }
    return 1;
}

static int check_span(const char *what, Py_ssize_t buflen, Py_ssize_t each, Py_ssize_t count) {
    if (each < 0 || each > INT_MAX || (count > 0 && each > 0 && count > PY_SSIZE_T_MAX / each) ||
        count * each > buflen) {
        PyErr_Format(PyExc_ValueError, "%s: %zd items of %zd bytes do not fit %zd bytes", what, count, each, buflen);
        return 0;
    }
    return 1;
}

static int check_key(int alg, const Py_buffer *key, const EVP_CIPHER **cipher) {
    *cipher = cipher_of(alg);
    if (*cipher == NULL) {
        PyErr_Format(PyExc_ValueError, "unknown algorithm number %d", alg);
        return 0;
    }
    if (key->len != KEY_SIZE) {
        PyErr_Format(PyExc_ValueError, "key must be %d bytes", KEY_SIZE);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(open_records_doc,
             "open_records(alg, key, src, stride, nonce_off, length, aads, aad_len, out, count) -> list[int]\n\n"
             "Open count records of src into out (count * length bytes); return the indices of those that do\n"
             "not authenticate, whose plaintext in out is zeroed.");

static PyObject *open_records(PyObject *self, PyObject *args) {
    int alg;
    Py_buffer key, src, aads, out;
    Py_ssize_t stride, nonce_off, length, aad_len, count;
    const EVP_CIPHER *cipher;
    PyObject *result = NULL;
    unsigned char *bad = NULL;
    int failed = 0;

    (void)self;
    if (!PyArg_ParseTuple(args, "iy*y*nnny*nw*n", &alg, &key, &src, &stride, &nonce_off, &length, &aads,
                          &aad_len, &out, &count))
        return NULL;
    if (!check_key(alg, &key, &cipher) || !check_geometry("src", src.len, stride, nonce_off, length, count) ||
        !check_span("aads", aads.len, aad_len, count) || !check_span("out", out.len, length, count))
        goto done;
    bad = PyMem_Calloc(count ? (size_t)count : 1, 1);
    if (bad == NULL) {
        PyErr_NoMemory();
        goto done;
    }

    Py_BEGIN_ALLOW_THREADS
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL || EVP_DecryptInit_ex(ctx, cipher, NULL, key.buf, NULL) != 1)
        failed = 1;
    for (Py_ssize_t i = 0; i < count && !failed; i++) {
        const unsigned char *rec = (const unsigned char *)src.buf + i * stride + nonce_off;
        const unsigned char *ct = rec + NONCE_SIZE;
        unsigned char *pt = (unsigned char *)out.buf + i * length;
        int n = 0;
        if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, rec) != 1 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_SIZE, (void *)(ct + length)) != 1 ||
            EVP_DecryptUpdate(ctx, NULL, &n, (const unsigned char *)aads.buf + i * aad_len, (int)aad_len) != 1) {
            failed = 1;
            break;
        }
        /* The plaintext is written before the tag is checked: on a mismatch it is wiped below. */
        if (EVP_DecryptUpdate(ctx, pt, &n, ct, (int)length) != 1 || EVP_DecryptFinal_ex(ctx, pt + n, &n) != 1) {
            OPENSSL_cleanse(pt, (size_t)length);
            bad[i] = 1;
        }
    }
    if (failed && count > 0)
        OPENSSL_cleanse(out.buf, (size_t)(count * length));
    EVP_CIPHER_CTX_free(ctx); /* frees the key schedule after wiping it */
    Py_END_ALLOW_THREADS

    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to set up the AEAD (not an authentication failure)");
        goto done;
    }
    result = PyList_New(0);
    for (Py_ssize_t i = 0; result != NULL && i < count; i++) {
        if (!bad[i])
            continue;
        PyObject *index = PyLong_FromSsize_t(i);
        if (index == NULL || PyList_Append(result, index) != 0)
            Py_CLEAR(result);
        Py_XDECREF(index);
    }
done:
    PyMem_Free(bad);
    PyBuffer_Release(&key);
    PyBuffer_Release(&src);
    PyBuffer_Release(&aads);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(seal_records_doc,
             "seal_records(alg, key, plain, length, out, stride, nonce_off, aads, aad_len, count) -> None\n\n"
             "Seal count plaintexts of length bytes into the records of out, under the nonces already there.");

static PyObject *seal_records(PyObject *self, PyObject *args) {
    int alg;
    Py_buffer key, plain, out, aads;
    Py_ssize_t length, stride, nonce_off, aad_len, count;
    const EVP_CIPHER *cipher;
    int failed = 0;

    (void)self;
    if (!PyArg_ParseTuple(args, "iy*y*nw*nny*nn", &alg, &key, &plain, &length, &out, &stride, &nonce_off, &aads,
                          &aad_len, &count))
        return NULL;
    if (!check_key(alg, &key, &cipher) || !check_geometry("out", out.len, stride, nonce_off, length, count) ||
        !check_span("aads", aads.len, aad_len, count) || !check_span("plain", plain.len, length, count)) {
        failed = -1;
        goto done;
    }

    Py_BEGIN_ALLOW_THREADS
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL || EVP_EncryptInit_ex(ctx, cipher, NULL, key.buf, NULL) != 1)
        failed = 1;
    for (Py_ssize_t i = 0; i < count && !failed; i++) {
        unsigned char *rec = (unsigned char *)out.buf + i * stride + nonce_off;
        unsigned char *ct = rec + NONCE_SIZE;
        int n = 0, m = 0;
        if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, rec) != 1 ||
            EVP_EncryptUpdate(ctx, NULL, &n, (const unsigned char *)aads.buf + i * aad_len, (int)aad_len) != 1 ||
            EVP_EncryptUpdate(ctx, ct, &n, (const unsigned char *)plain.buf + i * length, (int)length) != 1 ||
            EVP_EncryptFinal_ex(ctx, ct + n, &m) != 1 || n + m != length ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_SIZE, ct + length) != 1)
            failed = 1;
    }
    EVP_CIPHER_CTX_free(ctx);
    Py_END_ALLOW_THREADS

    if (failed)
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to seal a record");
done:
    PyBuffer_Release(&key);
    PyBuffer_Release(&plain);
    PyBuffer_Release(&out);
    PyBuffer_Release(&aads);
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"open_records", open_records, METH_VARARGS, open_records_doc},
    {"seal_records", seal_records, METH_VARARGS, seal_records_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "qwamos._aead_runs", "Batch AEAD over runs of records, without the GIL.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__aead_runs(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) != 0)
        Py_CLEAR(m);
    return m;
}
