/* Batched non-blocking TUN and UDP reads and TUN writes, for the driver's hot path.
 *
 * Why C: right after a wake-up every interpreter step runs cold. Measured on the project's 2-core
 * VM, 10 ms after the last call: os.read of a ready fd ~31 us (from C: ~9 us), a recvmsg ~20 us
 * (from C: ~4 us), and the read that ends a drain with EAGAIN ~40 us, most of it raising and catching
 * BlockingIOError (from C: <1 us). A ping round trip through two devices pays several of each.
 * Here a whole drain is one call: no exception for EAGAIN, the GIL kept (the fds never block),
 * GRO-coalesced reads split in C, and a repeated source address returned as the same tuple object.
 *
 * read_packets(fd, limit) -> list[bytes]
 *     Up to `limit` packets; [] when the fd would block. EOFError on end of file with nothing read;
 *     OSError for other errors when nothing was read (else the packets so far; the error recurs).
 * write_packets(fd, packets) -> int
 *     Writes each packet; returns how many were dropped (queue full, packet refused). OSError for
 *     errors that mean the device is gone (EBADF, EBADFD, EIO, ENODEV).
 * recv_datagrams(fd, limit) -> list[tuple[bytes, tuple[str, int]]]
 *     Up to `limit` datagrams with their (host, port); [] when the socket would block. ICMP-reported
 *     errors (ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, EMSGSIZE) end the drain quietly.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#define BUFFER_SIZE 65536

/* One buffer for every read: the GIL is held from the syscall until the bytes are copied out. */
static unsigned char buffer[BUFFER_SIZE];

/* The last source address and its (host, port) tuple: bulk traffic comes from one peer. */
static struct sockaddr_storage last_source;
static socklen_t last_source_len;
static PyObject *last_source_tuple;

static int
as_fd(PyObject *obj)
{
    long value = PyLong_AsLong(obj);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (value < 0 || value > INT_MAX) {
        /* A closed socket's fileno() is -1: report EBADF as the syscall would. */
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return (int)value;
}

static int
append_new(PyObject *list, PyObject *item)
{
    if (item == NULL) {
        return -1;
    }
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

static PyObject *
read_packets(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    Py_ssize_t limit;
    if (nargs != 2 || (fd = as_fd(args[0])) == -1 || (limit = PyLong_AsSsize_t(args[1])) == -1) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "read_packets(fd, limit)");
        }
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    while (PyList_GET_SIZE(out) < limit) {
        ssize_t n = read(fd, buffer, BUFFER_SIZE);
        if (n > 0) {
            if (append_new(out, PyBytes_FromStringAndSize((const char *)buffer, n)) < 0) {
                goto fail;
            }
            continue;
        }
        if (n == 0) {
            if (PyList_GET_SIZE(out) == 0) {
                PyErr_SetString(PyExc_EOFError, "end of file");
                goto fail;
            }
            break;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK && PyList_GET_SIZE(out) == 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        break;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *
write_packets(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (nargs != 2 || (fd = as_fd(args[0])) == -1 || !PyList_Check(args[1])) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "write_packets(fd, packets: list)");
        }
        return NULL;
    }
    PyObject *packets = args[1];
    Py_ssize_t dropped = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(packets); i++) {
        PyObject *packet = PyList_GET_ITEM(packets, i);
        if (!PyBytes_Check(packet)) {
            PyErr_SetString(PyExc_TypeError, "packets must be bytes");
            return NULL;
        }
        ssize_t n;
        do {
            n = write(fd, PyBytes_AS_STRING(packet), (size_t)PyBytes_GET_SIZE(packet));
        } while (n < 0 && errno == EINTR);
        if (n >= 0) {
            continue;
        }
        if (errno == EBADF || errno == EBADFD || errno == EIO || errno == ENODEV) {
            PyErr_SetFromErrno(PyExc_OSError);
            return NULL;
        }
        dropped++;  /* EAGAIN: the kernel queue is full; EINVAL: a packet the kernel refuses */
    }
    return PyLong_FromSsize_t(dropped);
}

static PyObject *
source_tuple(const struct sockaddr_storage *source, socklen_t length)
{
    if (last_source_tuple != NULL && length == last_source_len && memcmp(source, &last_source, length) == 0) {
        Py_INCREF(last_source_tuple);
        return last_source_tuple;
    }
    char host[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    int port;
    if (source->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)source;
        inet_ntop(AF_INET, &sin->sin_addr, host, sizeof host);
        port = ntohs(sin->sin_port);
    } else if (source->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)source;
        /* A link-local source carries its scope ("fe80::1%eth0"), as Python's socket module writes it. */
        if (sin6->sin6_scope_id == 0) {
            inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof host);
        } else if (getnameinfo((const struct sockaddr *)source, length, host, sizeof host, NULL, 0, NI_NUMERICHOST) != 0) {
            PyErr_SetString(PyExc_OSError, "cannot format an IPv6 source address");
            return NULL;
        }
        port = ntohs(sin6->sin6_port);
    } else {
        PyErr_Format(PyExc_OSError, "unexpected address family %d", source->ss_family);
        return NULL;
    }
    PyObject *tuple = Py_BuildValue("(si)", host, port);
    if (tuple == NULL) {
        return NULL;
    }
    Py_XSETREF(last_source_tuple, tuple);
    Py_INCREF(tuple);
    memcpy(&last_source, source, length);
    last_source_len = length;
    return tuple;
}

static PyObject *
recv_datagrams(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    Py_ssize_t limit;
    if (nargs != 2 || (fd = as_fd(args[0])) == -1 || (limit = PyLong_AsSsize_t(args[1])) == -1) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "recv_datagrams(fd, limit)");
        }
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    /* Room for the GRO segment size beside other cmsgs (SO_RXQ_OVFL's drop count). */
    union {
        char raw[4 * CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    while (PyList_GET_SIZE(out) < limit) {
        struct sockaddr_storage source;
        struct iovec iov = {.iov_base = buffer, .iov_len = BUFFER_SIZE};
        struct msghdr msg = {
            .msg_name = &source, .msg_namelen = sizeof source, .msg_iov = &iov, .msg_iovlen = 1,
            .msg_control = control.raw, .msg_controllen = sizeof control.raw,
        };
        ssize_t n = recvmsg(fd, &msg, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNREFUSED || errno == EHOSTUNREACH
                || errno == ENETUNREACH || errno == EMSGSIZE || PyList_GET_SIZE(out) > 0) {
                break;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        Py_ssize_t segment = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
                int size;
                memcpy(&size, CMSG_DATA(c), sizeof size);
                segment = size;
            }
        }
        if (segment <= 0 || segment >= n) {
            segment = n;  /* one datagram (an empty one included) */
        }
        PyObject *addr = source_tuple(&source, msg.msg_namelen);
        if (addr == NULL) {
            goto fail;
        }
        Py_ssize_t offset = 0;
        do {
            Py_ssize_t size = n - offset < segment ? n - offset : segment;
            PyObject *data = PyBytes_FromStringAndSize((const char *)buffer + offset, size);
            if (data == NULL || append_new(out, PyTuple_Pack(2, data, addr)) < 0) {
                Py_XDECREF(data);
                Py_DECREF(addr);
                goto fail;
            }
            Py_DECREF(data);
            offset += size;
        } while (offset < n);
        Py_DECREF(addr);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef fastio_methods[] = {
    {"read_packets", (PyCFunction)(void (*)(void))read_packets, METH_FASTCALL,
     "read_packets(fd, limit) -> list[bytes]"},
    {"write_packets", (PyCFunction)(void (*)(void))write_packets, METH_FASTCALL,
     "write_packets(fd, packets) -> number dropped"},
    {"recv_datagrams", (PyCFunction)(void (*)(void))recv_datagrams, METH_FASTCALL,
     "recv_datagrams(fd, limit) -> list[(bytes, (host, port))]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastio_module = {
    PyModuleDef_HEAD_INIT, "meshwg.io._fastio",
    "Batched non-blocking TUN/UDP I/O for the driver (see the C source for why).", -1, fastio_methods,
};

PyMODINIT_FUNC
PyInit__fastio(void)
{
    return PyModule_Create(&fastio_module);
}
