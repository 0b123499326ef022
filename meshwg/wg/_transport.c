/* WireGuard transport-data sealing and opening (ChaCha20-Poly1305, libsodium), for the hot path.
 *
 * Why C: a ping through an idle tunnel is dominated by code run cold right after a wake-up.
 * Measured on the project's 2-core VM, one 96-byte AEAD call 10 ms after the last one costs
 * ~41-55 us through cryptography (Rust binding + OpenSSL EVP), ~23 us through OpenSSL EVP from C,
 * ~12 us through libsodium from C; warm, all cost 1-2 us. Each ping round trip pays four.
 * This module also builds the whole message in one allocation (header, padding, tag), which
 * saves the Python-level concatenations on every packet.
 *
 * seal(key, header_prefix, counter, packet, padded_len) -> bytes
 *     header_prefix: the message type and receiver index (8 bytes); counter: the nonce counter.
 *     Returns header_prefix | counter (8 bytes LE) | encrypt(packet zero-padded to padded_len) | tag.
 * open(key, message) -> bytes | None
 *     message: a whole transport message (>= 32 bytes). Returns the plaintext (padding included),
 *     or None when the tag does not authenticate.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sodium.h>
#include <string.h>

#define HEADER_LEN 16
#define TAG_LEN crypto_aead_chacha20poly1305_ietf_ABYTES
#define KEY_LEN crypto_aead_chacha20poly1305_ietf_KEYBYTES
#define NONCE_LEN crypto_aead_chacha20poly1305_ietf_NPUBBYTES
/* An inner packet is at most 65535 bytes (IPv4 total length; IPv6 jumbograms never reach a TUN here),
 * padded by at most 15 more (a packet above the MTU keeps its length modulo the MTU padded to 16: a
 * datagram that big then fails to send and is counted, as with the fallback). */
#define MAX_PLAINTEXT (65535 + 15)

static int
expect_bytes(PyObject *obj, Py_ssize_t exact, const char *what)
{
    if (!PyBytes_CheckExact(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes, not %.100s", what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (exact >= 0 && PyBytes_GET_SIZE(obj) != exact) {
        PyErr_Format(PyExc_ValueError, "%s must be %zd bytes, not %zd", what, exact, PyBytes_GET_SIZE(obj));
        return -1;
    }
    return 0;
}

static void
store_le64(unsigned char *out, unsigned long long value)
{
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)(value >> (8 * i));
    }
}

static PyObject *
transport_seal(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "seal(key, header_prefix, counter, packet, padded_len)");
        return NULL;
    }
    PyObject *key = args[0], *prefix = args[1], *packet = args[3];
    if (expect_bytes(key, KEY_LEN, "key") < 0 || expect_bytes(prefix, 8, "header_prefix") < 0
        || expect_bytes(packet, -1, "packet") < 0) {
        return NULL;
    }
    unsigned long long counter = PyLong_AsUnsignedLongLong(args[2]);
    if (counter == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t padded = PyLong_AsSsize_t(args[4]);
    if (padded == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t length = PyBytes_GET_SIZE(packet);
    if (padded < length || padded > MAX_PLAINTEXT) {
        PyErr_Format(PyExc_ValueError, "padded_len %zd outside [%zd, %d]", padded, length, MAX_PLAINTEXT);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, HEADER_LEN + padded + TAG_LEN);
    if (out == NULL) {
        return NULL;
    }
    unsigned char *buf = (unsigned char *)PyBytes_AS_STRING(out);
    memcpy(buf, PyBytes_AS_STRING(prefix), 8);
    store_le64(buf + 8, counter);
    unsigned char nonce[NONCE_LEN] = {0};
    memcpy(nonce + 4, buf + 8, 8);
    unsigned char *body = buf + HEADER_LEN;
    memcpy(body, PyBytes_AS_STRING(packet), (size_t)length);
    memset(body + length, 0, (size_t)(padded - length));
    /* In place: libsodium allows the ciphertext to overwrite the message. */
    crypto_aead_chacha20poly1305_ietf_encrypt_detached(
        body, body + padded, NULL, body, (unsigned long long)padded, NULL, 0, NULL, nonce,
        (const unsigned char *)PyBytes_AS_STRING(key));
    return out;
}

static PyObject *
transport_open(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "open(key, message)");
        return NULL;
    }
    PyObject *key = args[0], *message = args[1];
    if (expect_bytes(key, KEY_LEN, "key") < 0 || expect_bytes(message, -1, "message") < 0) {
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(message);
    if (size < HEADER_LEN + TAG_LEN) {
        Py_RETURN_NONE;  /* too short to authenticate: same answer as a bad tag */
    }
    const unsigned char *msg = (const unsigned char *)PyBytes_AS_STRING(message);
    Py_ssize_t length = size - HEADER_LEN - TAG_LEN;
    unsigned char nonce[NONCE_LEN] = {0};
    memcpy(nonce + 4, msg + 8, 8);
    if (length == 0) {
        /* A keepalive: authenticate the empty plaintext without writing into the shared b"". */
        if (crypto_aead_chacha20poly1305_ietf_decrypt_detached(
                NULL, NULL, msg + HEADER_LEN, 0, msg + HEADER_LEN, NULL, 0, nonce,
                (const unsigned char *)PyBytes_AS_STRING(key)) != 0) {
            Py_RETURN_NONE;
        }
        return PyBytes_FromStringAndSize(NULL, 0);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, length);
    if (out == NULL) {
        return NULL;
    }
    if (crypto_aead_chacha20poly1305_ietf_decrypt_detached(
            (unsigned char *)PyBytes_AS_STRING(out), NULL, msg + HEADER_LEN, (unsigned long long)length,
            msg + HEADER_LEN + length, NULL, 0, nonce, (const unsigned char *)PyBytes_AS_STRING(key)) != 0) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    return out;
}

static PyMethodDef transport_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))transport_seal, METH_FASTCALL,
     "seal(key, header_prefix, counter, packet, padded_len) -> a whole transport message"},
    {"open", (PyCFunction)(void (*)(void))transport_open, METH_FASTCALL,
     "open(key, message) -> plaintext, or None when the tag does not authenticate"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef transport_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "meshwg.wg._transport",
    .m_doc = "WireGuard transport-data seal/open on libsodium (see the C source for why).",
    .m_size = -1,
    .m_methods = transport_methods,
};

PyMODINIT_FUNC
PyInit__transport(void)
{
    if (sodium_init() < 0) {
        PyErr_SetString(PyExc_ImportError, "libsodium failed to initialise");
        return NULL;
    }
    PyObject *module = PyModule_Create(&transport_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddStringConstant(module, "BACKEND", "libsodium " SODIUM_VERSION_STRING) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
