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
 * recv_datagrams(fd, limit[, sources[, route]]) -> list[tuple[bytes, tuple[str, int]]]
 *     Up to `limit` datagrams with their (host, port); [] when the socket would block. ICMP-reported
 *     errors (ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, EMSGSIZE) end the drain quietly.
 *     With a `sources` dict (the UDP shell's sticky source map, see meshwg/io/dataplane/udp.py) and IP_PKTINFO /
 *     IPV6_RECVPKTINFO on the socket, sources[(host, port)] becomes the local address the datagram
 *     arrived at: (local host, ifindex, (level, type, pktinfo to send)). The value already there is
 *     compared, not rebuilt (the steady state allocates nothing); a full map is cleared first.
 *     With a node relay `route`, RECV frames of relayed transport data come back as (inner datagram,
 *     the source peer's endpoint) (see "The node's relay path" below).
 * send_datagrams(datagrams, start, v4_fd, v6_fd, v4_gso, v6_gso[, sources[, route, now]]) -> (index, status, errors)
 *     Sends datagrams[start:] ((bytes, (host, port)) pairs; fd -1: no socket for that family),
 *     each endpoint from its entry in `sources` (an IP_PKTINFO / IPV6_PKTINFO cmsg) when it has one.
 *     A send that fails because that source is gone (EINVAL, EADDRNOTAVAIL, ENETUNREACH: the address
 *     was removed) forgets the entry and is retried once from the kernel's choice.
 *     Runs to one endpoint with one size (the last may be shorter) leave as one UDP GSO sendmsg
 *     where that family's *_gso is true. Stops at `index` with status SENT_ALL (index == len),
 *     WOULD_BLOCK, NEEDS_PYTHON (an endpoint that is not a numeric (host, port) tuple, a scoped
 *     IPv6 host, a family without a socket: the caller's own path handles that one) or
 *     GSO_REFUSED (the kernel refused to segment a run whose first datagram then went out alone:
 *     `index` is the one after it; the caller turns GSO off for that family and calls again).
 *     `errors`: datagrams lost to other send errors (unreachable, EPERM, ...), as on a wire.
 *     With a node relay `route` (and the caller's clock reading `now`), datagrams to relay endpoints with a
 *     cached SEND header leave here too, framed, batched (sendmmsg) and GSO'd where the path allows.
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
#include <sys/uio.h>
#include <unistd.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#define BUFFER_SIZE 65536
#define GSO_MAX_SEGMENTS 64
#define GSO_MAX_BYTES 65000  /* under the 65507-byte payload limit of one (super) datagram */
/* Entries of the sticky source map at most (mirrors udp.MAX_SOURCES): spoofed sources cannot grow it. */
#define MAX_SOURCES 4096
#define PKTINFO_MAX 20  /* sizeof(struct in6_pktinfo) >= sizeof(struct in_pktinfo) */

enum { SENT_ALL = 0, WOULD_BLOCK = 1, NEEDS_PYTHON = 2, GSO_REFUSED = 3 };

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

/* (fd, limit) arguments; -1 with an exception set when they are not that. */
static int
fd_and_limit(PyObject *const *args, Py_ssize_t nargs, const char *usage, int *fd, Py_ssize_t *limit)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    if ((*fd = as_fd(args[0])) == -1 || (*limit = PyLong_AsSsize_t(args[1])) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "limit must be >= 0");
        }
        return -1;
    }
    return 0;
}

/* A file descriptor or -1 (no socket for that family); -1 with an exception set otherwise. */
static int
fd_or_none(PyObject *obj, int *fd)
{
    long value = PyLong_AsLong(obj);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (value < -1 || value > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return -1;
    }
    *fd = (int)value;
    return 0;
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
    if (fd_and_limit(args, nargs, "read_packets(fd, limit)", &fd, &limit) < 0) {
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
        /* A link-local source carries its scope in the host ("fe80::1%eth0"): the endpoint must say which
         * interface to answer on, and Python's sendto takes that form (the fallback writes it too). */
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

/* ---- Sticky source addresses: answer a peer from the local address it wrote to ----
 * A host with several addresses must answer from the one the peer sent to, or the peer's NAT or
 * firewall drops the answer (issue 17). The UDP shell's map (a dict, meshwg/io/dataplane/udp.py) holds, per
 * remote (host, port), (local host, ifindex, (level, type, pktinfo to send)); the drain fills it and
 * the send path reads it. */

/* The local address one datagram arrived at, as the pktinfo to send from it. */
struct local_source {
    size_t len;  /* 0: none */
    int level, type;
    unsigned int ifindex;
    unsigned char info[PKTINFO_MAX];
};

/* An entry last built by the drain: a run of datagrams to one local address reuses it. */
static PyObject *last_source_value;

static void
parse_pktinfo(const struct cmsghdr *c, struct local_source *src)
{
    if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO && c->cmsg_len >= CMSG_LEN(sizeof(struct in_pktinfo))) {
        struct in_pktinfo got, send;
        memcpy(&got, CMSG_DATA(c), sizeof got);
        /* The address alone: a forced interface would bypass the routing table (source-based policy
         * routing included), and kernel WireGuard sends from the address alone too. */
        memset(&send, 0, sizeof send);
        send.ipi_spec_dst = got.ipi_spec_dst;
        memcpy(src->info, &send, sizeof send);
        src->len = sizeof send;
        src->level = IPPROTO_IP;
        src->type = IP_PKTINFO;
        src->ifindex = (unsigned int)got.ipi_ifindex;
    } else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO
               && c->cmsg_len >= CMSG_LEN(sizeof(struct in6_pktinfo))) {
        struct in6_pktinfo got;
        memcpy(&got, CMSG_DATA(c), sizeof got);
        src->ifindex = got.ipi6_ifindex;
        /* The interface only where it is the address's scope (link-local), for the same reason. */
        if (!IN6_IS_ADDR_LINKLOCAL(&got.ipi6_addr)) {
            got.ipi6_ifindex = 0;
        }
        memcpy(src->info, &got, sizeof got);
        src->len = sizeof got;
        src->level = IPPROTO_IPV6;
        src->type = IPV6_PKTINFO;
    }
}

/* The (level, type, pktinfo) of an entry of the map, or NULL when it is not one. */
static PyObject *
entry_pktinfo(PyObject *value)
{
    if (!PyTuple_CheckExact(value) || PyTuple_GET_SIZE(value) != 3) {
        return NULL;
    }
    PyObject *cmsg = PyTuple_GET_ITEM(value, 2);
    if (!PyTuple_CheckExact(cmsg) || PyTuple_GET_SIZE(cmsg) != 3 || !PyBytes_CheckExact(PyTuple_GET_ITEM(cmsg, 2))) {
        return NULL;
    }
    return PyTuple_GET_ITEM(cmsg, 2);
}

static int
same_source(PyObject *value, const struct local_source *src)
{
    PyObject *info = value != NULL ? entry_pktinfo(value) : NULL;
    if (info == NULL || (size_t)PyBytes_GET_SIZE(info) != src->len || memcmp(PyBytes_AS_STRING(info), src->info, src->len) != 0
        || !PyLong_CheckExact(PyTuple_GET_ITEM(value, 1))) {
        return 0;
    }
    unsigned long ifindex = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(value, 1));
    if (ifindex == (unsigned long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return ifindex == src->ifindex;
}

static PyObject *
new_source_value(const struct local_source *src)
{
    char host[INET6_ADDRSTRLEN];
    const void *addr;
    struct in_pktinfo v4;
    struct in6_pktinfo v6;
    if (src->level == IPPROTO_IP) {  /* an aligned copy: src->info is a byte array */
        memcpy(&v4, src->info, sizeof v4);
        addr = &v4.ipi_spec_dst;
    } else {
        memcpy(&v6, src->info, sizeof v6);
        addr = &v6.ipi6_addr;
    }
    if (inet_ntop(src->level == IPPROTO_IP ? AF_INET : AF_INET6, addr, host, sizeof host) == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    return Py_BuildValue("(sI(iiy#))", host, src->ifindex, src->level, src->type, (const char *)src->info,
                         (Py_ssize_t)src->len);
}

/* sources[addr] = where this datagram arrived, unless it says so already. -1 with an exception set. */
static int
remember_source(PyObject *sources, PyObject *addr, const struct local_source *src)
{
    PyObject *current = PyDict_GetItemWithError(sources, addr);
    if (current == NULL && PyErr_Occurred()) {
        return -1;
    }
    if (current != NULL && same_source(current, src)) {
        return 0;  /* the steady state: one lookup, one compare */
    }
    int is_new = current == NULL;
    if (!same_source(last_source_value, src)) {
        PyObject *value = new_source_value(src);
        if (value == NULL) {
            return -1;
        }
        Py_XSETREF(last_source_value, value);
    }
    PyObject *value = last_source_value;
    Py_INCREF(value);
    if (is_new && PyDict_GET_SIZE(sources) >= MAX_SOURCES) {
        PyDict_Clear(sources);  /* bounded: peers still talking put theirs back with their next datagram */
    }
    int rc = PyDict_SetItem(sources, addr, value);
    Py_DECREF(value);
    return rc;
}

/* The pktinfo to send to `dest` from, copied into *out: 1, or 0 when the map has none. */
static int
lookup_source(PyObject *sources, PyObject *dest, int v6, struct local_source *out)
{
    PyObject *value = PyDict_GetItemWithError(sources, dest);
    if (value == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *info = entry_pktinfo(value);
    size_t want = v6 ? sizeof(struct in6_pktinfo) : sizeof(struct in_pktinfo);
    if (info == NULL || (size_t)PyBytes_GET_SIZE(info) != want) {
        return 0;
    }
    memcpy(out->info, PyBytes_AS_STRING(info), want);
    out->len = want;
    out->level = v6 ? IPPROTO_IPV6 : IPPROTO_IP;
    out->type = v6 ? IPV6_PKTINFO : IP_PKTINFO;
    return 1;
}

static void
forget_source(PyObject *sources, PyObject *dest)
{
    int saved = errno;
    if (PyDict_DelItem(sources, dest) < 0) {
        PyErr_Clear();
    }
    errno = saved;
}

/* Errors that say the remembered source address is gone (removed, or no longer routable from). */
static int
source_gone(int err)
{
    return err == EINVAL || err == EADDRNOTAVAIL || err == ENETUNREACH;
}

/* A dict, or NULL for None / a missing argument; -1 with an exception set otherwise. */
static int
optional_dict(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t index, PyObject **out)
{
    *out = NULL;
    if (nargs <= index || args[index] == Py_None) {
        return 0;
    }
    if (!PyDict_Check(args[index])) {
        PyErr_SetString(PyExc_TypeError, "sources must be a dict or None");
        return -1;
    }
    *out = args[index];
    return 0;
}

static size_t put_cmsgs(char *control, size_t room, uint16_t segment, const struct local_source *src);

/* After a failed recvmsg/recvmmsg (errno set, not EINTR): 1 ends the drain quietly (nothing more there now, an
 * ICMP error queued on the socket, i.e. a peer gone, reported on the next read, or datagrams already read, which
 * go out first); 0 raises (the OSError is set). */
static int
drain_ends_quietly(Py_ssize_t have)
{
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNREFUSED || errno == EHOSTUNREACH
        || errno == ENETUNREACH || errno == EMSGSIZE || have > 0) {
        return 1;
    }
    PyErr_SetFromErrno(PyExc_OSError);
    return 0;
}

/* ---- The node's relay path: relayed transport data on the batched path (issue 16) ----
 * A mesh peer that cannot be reached directly is reached through the signal server's UDP relay: every
 * datagram to it leaves as a SEND frame (MAGIC, T_SEND, our session token, its key, the datagram) and every
 * datagram from it arrives as a RECV frame (MAGIC, T_RECV, its key, the datagram). The relay shell
 * (meshwg/io/agent/relay_shell.py) owns the session: it builds each destination's 45-byte SEND header once
 * (the token changes only with a new HELLO_OK) into `headers`, and puts the peers' endpoint objects into
 * `endpoints`. Here:
 *   send_datagrams: a datagram whose endpoint is an `endpoint_type` with a header in `headers` (while
 *     now < until) goes to the relay address as header + datagram (two iovecs, no copy); consecutive ones
 *     leave in one sendmmsg, runs of transport data to one peer as one UDP GSO message where the path takes
 *     that segment size (a full-size frame does not fit a 1500-byte path: refused once, then never tried
 *     above that size on this route). Anything else (no header yet, the session lapsed) goes to Python.
 *   recv_datagrams: a RECV frame from the relay's own address carrying transport data (type 4, >= 32 bytes)
 *     from a key in `endpoints` comes back as (inner datagram, endpoint), beside the direct datagrams of the
 *     batch, so the core gets it as the relay shell would hand it over. Every other frame (another source, a
 *     short or foreign frame, another type, an unknown or plain key, a handshake or disco inside) comes back
 *     whole as (frame, (host, port)): the relay shell checks, counts and delivers or drops it as before.
 *
 * node_relay_new(endpoint_type, headers, endpoints, tx_counts) -> route (a capsule)
 *     The three dicts stay the relay shell's (it fills and clears them); tx_counts[key] += packets sent.
 * node_relay_set(route, addr, until) -> bool
 *     The UDP relay's (host, port), or None: off. Headers are used while now < until (the session's end).
 *     False (and off) when addr is not a numeric (host, port) this module resolves.
 * node_relay_counters(route) -> (sent, received, send_errors, gso_refused)   (totals)
 * node_relay_split_tcp(route, buffer) -> (datagrams, frames, consumed)
 *     The TCP relay's stream: its RECVs of transport data split out as recv_datagrams does (see below).
 * node_relay_send_tcp(route, datagrams, start, stop, fd, headers) -> (next, rest)
 *     The TCP relay's stream: SEND frames written from the TCP client's headers (see below).
 */
#define NODE_RELAY_CAPSULE "meshwg.node_relay"
#define NODE_SEND_HEADER 45  /* MAGIC 4 + type 1 + token 8 + key 32 */
#define NODE_RECV_HEADER 37  /* MAGIC 4 + type 1 + key 32 */
#define NODE_KEY_OFFSET 5
#define NODE_KEY_LEN 32
#define NODE_RELAY_BATCH 64
#define TRANSPORT_MIN 32

static const unsigned char node_relay_magic[4] = {0xff, 'M', 'W', 'R'};

struct node_relay {
    PyObject *endpoint_type, *headers, *endpoints, *tx_counts, *addr_tuple;  /* addr_tuple NULL: off */
    struct sockaddr_storage addr;
    socklen_t addr_len;
    double until;
    Py_ssize_t gso_max;  /* largest segment a GSO message may carry on this route (a larger one was refused) */
    unsigned long long sent, received, send_errors, gso_refused;
};

static PyObject *str_peer_key;  /* "peer_key", interned */

static void
node_relay_free(PyObject *capsule)
{
    struct node_relay *r = PyCapsule_GetPointer(capsule, NODE_RELAY_CAPSULE);
    if (r == NULL) {
        return;
    }
    Py_XDECREF(r->endpoint_type);
    Py_XDECREF(r->headers);
    Py_XDECREF(r->endpoints);
    Py_XDECREF(r->tx_counts);
    Py_XDECREF(r->addr_tuple);
    PyMem_Free(r);
}

/* The route argument: NULL for None or a missing argument, -1 with an exception set when not a route. */
static int
optional_route(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t index, struct node_relay **out)
{
    *out = NULL;
    if (nargs <= index || args[index] == Py_None) {
        return 0;
    }
    *out = PyCapsule_GetPointer(args[index], NODE_RELAY_CAPSULE);
    return *out == NULL ? -1 : 0;
}

static PyObject *
node_relay_new(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyType_Check(args[0]) || !PyDict_Check(args[1]) || !PyDict_Check(args[2])
        || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "node_relay_new(endpoint_type, headers: dict, endpoints: dict, "
                                         "tx_counts: dict)");
        return NULL;
    }
    if (str_peer_key == NULL && (str_peer_key = PyUnicode_InternFromString("peer_key")) == NULL) {
        return NULL;
    }
    struct node_relay *r = PyMem_Calloc(1, sizeof *r);
    if (r == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *capsule = PyCapsule_New(r, NODE_RELAY_CAPSULE, node_relay_free);
    if (capsule == NULL) {
        PyMem_Free(r);
        return NULL;
    }
    r->endpoint_type = Py_NewRef(args[0]);
    r->headers = Py_NewRef(args[1]);
    r->endpoints = Py_NewRef(args[2]);
    r->tx_counts = Py_NewRef(args[3]);
    r->gso_max = GSO_MAX_BYTES;
    return capsule;
}

static int resolve_dest(PyObject *dest, struct sockaddr_storage *sa, socklen_t *len);

static PyObject *
node_relay_set(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct node_relay *r = nargs == 3 ? PyCapsule_GetPointer(args[0], NODE_RELAY_CAPSULE) : NULL;
    if (r == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "node_relay_set(route, addr, until)");
        }
        return NULL;
    }
    double until = PyFloat_AsDouble(args[2]);
    if (until == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *addr = args[1];
    if (addr == Py_None) {
        Py_CLEAR(r->addr_tuple);
        Py_RETURN_TRUE;
    }
    struct sockaddr_storage sa;
    socklen_t len;
    if (!resolve_dest(addr, &sa, &len)) {
        Py_CLEAR(r->addr_tuple);
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_FALSE;
    }
    if (r->addr_tuple == NULL || len != r->addr_len || memcmp(&sa, &r->addr, len) != 0) {
        r->gso_max = GSO_MAX_BYTES;  /* another path: it may segment what the old one refused */
    }
    memcpy(&r->addr, &sa, len);
    r->addr_len = len;
    r->until = until;
    Py_INCREF(addr);
    Py_XSETREF(r->addr_tuple, addr);
    Py_RETURN_TRUE;
}

static PyObject *
node_relay_counters(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct node_relay *r = nargs == 1 ? PyCapsule_GetPointer(args[0], NODE_RELAY_CAPSULE) : NULL;
    if (r == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "node_relay_counters(route)");
        }
        return NULL;
    }
    return Py_BuildValue("(KKKK)", r->sent, r->received, r->send_errors, r->gso_refused);
}

static int
same_sockaddr(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family) {
        return 0;
    }
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a, *y = (const struct sockaddr_in *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a, *y = (const struct sockaddr_in6 *)b;
        return x->sin6_port == y->sin6_port && x->sin6_scope_id == y->sin6_scope_id
               && memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
    }
    return 0;
}

/* A RECV frame carrying transport data: its header and the inner datagram's look right. */
static int
is_relayed_transport(const unsigned char *frame, Py_ssize_t size)
{
    static const unsigned char transport[4] = {4, 0, 0, 0};
    return size >= NODE_RECV_HEADER + TRANSPORT_MIN && memcmp(frame, node_relay_magic, 4) == 0 && frame[4] == 4
           && memcmp(frame + NODE_RECV_HEADER, transport, 4) == 0;
}

/* The endpoint object of the RECV frame's source key (a new reference), or NULL (no exception) when the relay
 * shell has none for it. `last_key`/`last_endpoint` cache the previous lookup of this drain. */
static PyObject *
relay_endpoint(struct node_relay *r, const unsigned char *key, unsigned char *last_key, PyObject **last_endpoint)
{
    if (*last_endpoint != NULL && memcmp(key, last_key, NODE_KEY_LEN) == 0) {
        return Py_NewRef(*last_endpoint);
    }
    PyObject *k = PyBytes_FromStringAndSize((const char *)key, NODE_KEY_LEN);
    if (k == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *endpoint = PyDict_GetItemWithError(r->endpoints, k);  /* bytes keys: no Python code runs */
    Py_DECREF(k);
    if (endpoint == NULL) {
        PyErr_Clear();
        return NULL;
    }
    memcpy(last_key, key, NODE_KEY_LEN);
    Py_XSETREF(*last_endpoint, Py_NewRef(endpoint));
    return Py_NewRef(endpoint);
}

/* The key (new reference) and SEND header (borrowed) of a datagram for `dest`, when it goes to the relay
 * on this path; 0 otherwise (no exception). */
static int
relay_header_in(struct node_relay *r, PyObject *headers, PyObject *dest, PyObject **key, PyObject **header)
{
    /* Exact type only: a subclass could run Python code from its attribute lookup. */
    if ((PyObject *)Py_TYPE(dest) != r->endpoint_type) {
        return 0;
    }
    PyObject *k = PyObject_GetAttr(dest, str_peer_key);
    if (k == NULL || !PyBytes_CheckExact(k)) {
        PyErr_Clear();
        Py_XDECREF(k);
        return 0;
    }
    PyObject *h = PyDict_GetItemWithError(headers, k);
    if (h == NULL || !PyBytes_CheckExact(h) || PyBytes_GET_SIZE(h) != NODE_SEND_HEADER) {
        PyErr_Clear();
        Py_DECREF(k);
        return 0;
    }
    *key = k;
    *header = h;
    return 1;
}

static int
relay_header(struct node_relay *r, PyObject *dest, PyObject **key, PyObject **header)
{
    return relay_header_in(r, r->headers, dest, key, header);
}

static void
count_tx(struct node_relay *r, PyObject *key, Py_ssize_t packets)
{
    PyObject *old = PyDict_GetItemWithError(r->tx_counts, key);
    long long before = old != NULL && PyLong_CheckExact(old) ? PyLong_AsLongLong(old) : 0;
    PyObject *now = PyLong_FromLongLong(before + packets);
    if (now == NULL || PyDict_SetItem(r->tx_counts, key, now) < 0) {
        PyErr_Clear();
    }
    Py_XDECREF(now);
}

struct relay_item {
    PyObject *key;       /* owned */
    const char *header;
    const char *data;
    size_t size;
};

/* One message of a relay batch: items [first, first + count), GSO segments of `segment` bytes when count > 1. */
struct relay_msg {
    int first, count;
    uint16_t segment;
};

/* Sends datagrams[i:] that go to the relay (relay_header) as SEND frames, up to the first that does not
 * or NODE_RELAY_BATCH of them. Returns the index of the first datagram not handled; *status WOULD_BLOCK when
 * the socket is full there. Send errors are counted in *errors (lost, as on a wire). */
static Py_ssize_t
send_relay(struct node_relay *r, PyObject *datagrams, Py_ssize_t i, Py_ssize_t n, int fd, int gso_on,
           PyObject *sources, int *status, Py_ssize_t *errors)
{
    struct relay_item items[NODE_RELAY_BATCH];
    int count = 0;
    while (i + count < n && count < NODE_RELAY_BATCH) {
        PyObject *item = PyList_GET_ITEM(datagrams, i + count);
        PyObject *key, *header;
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(item, 0))
            || !relay_header(r, PyTuple_GET_ITEM(item, 1), &key, &header)) {
            break;
        }
        PyObject *data = PyTuple_GET_ITEM(item, 0);
        items[count].key = key;
        items[count].header = PyBytes_AS_STRING(header);
        items[count].data = PyBytes_AS_STRING(data);
        items[count].size = (size_t)PyBytes_GET_SIZE(data);
        count++;
    }
    /* Group: a run of transport data to one peer with one size (the last may be shorter) is one GSO message. */
    struct relay_msg msgs[NODE_RELAY_BATCH];
    int nmsg = 0;
    for (int k = 0; k < count;) {
        size_t seg = NODE_SEND_HEADER + items[k].size, total = seg;
        int run = 1;
        int gso = gso_on && (Py_ssize_t)seg <= r->gso_max && items[k].size > 0 && items[k].data[0] == 4;
        while (gso && k + run < count && run < GSO_MAX_SEGMENTS) {
            const struct relay_item *next = &items[k + run];
            size_t m = NODE_SEND_HEADER + next->size;
            if (next->key != items[k].key && PyObject_RichCompareBool(next->key, items[k].key, Py_EQ) != 1) {
                break;  /* bytes == bytes: no Python code */
            }
            if (m > seg || next->size == 0 || next->data[0] != 4 || total + m > GSO_MAX_BYTES) {
                break;
            }
            total += m;
            run++;
            if (m < seg) {
                break;
            }
        }
        msgs[nmsg].first = k;
        msgs[nmsg].count = run;
        msgs[nmsg].segment = (uint16_t)seg;
        nmsg++;
        k += run;
    }
    struct iovec iov[2 * NODE_RELAY_BATCH];
    for (int k = 0; k < count; k++) {
        iov[2 * k].iov_base = (void *)items[k].header;
        iov[2 * k].iov_len = NODE_SEND_HEADER;
        iov[2 * k + 1].iov_base = (void *)items[k].data;
        iov[2 * k + 1].iov_len = items[k].size;
    }
    struct local_source local;
    int v6 = r->addr.ss_family == AF_INET6;
    int sticky = sources != NULL && lookup_source(sources, r->addr_tuple, v6, &local);
    struct mmsghdr mm[NODE_RELAY_BATCH];
    static union {
        char raw[NODE_RELAY_BATCH][CMSG_SPACE(sizeof(uint16_t)) + CMSG_SPACE(PKTINFO_MAX)];
        struct cmsghdr align;
    } control;
    int start = 0;
    while (start < nmsg) {
        for (int m = start; m < nmsg; m++) {
            struct msghdr *h = &mm[m].msg_hdr;
            memset(h, 0, sizeof *h);
            h->msg_name = &r->addr;
            h->msg_namelen = r->addr_len;
            h->msg_iov = &iov[2 * msgs[m].first];
            h->msg_iovlen = 2 * (size_t)msgs[m].count;
            h->msg_controllen = put_cmsgs(control.raw[m], sizeof control.raw[m], msgs[m].count > 1 ? msgs[m].segment : 0,
                                          sticky ? &local : NULL);
            h->msg_control = h->msg_controllen ? control.raw[m] : NULL;
        }
        int rc = sendmmsg(fd, &mm[start], (unsigned int)(nmsg - start), 0);
        if (rc > 0) {
            for (int m = start; m < start + rc; m++) {
                r->sent += (unsigned long long)msgs[m].count;
                count_tx(r, items[msgs[m].first].key, msgs[m].count);
            }
            start += rc;
            continue;
        }
        if (rc < 0 && errno == EINTR) {
            continue;
        }
        if (rc < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            *status = WOULD_BLOCK;
            break;
        }
        int err = rc < 0 ? errno : EIO;
        if (sticky && source_gone(err)) {
            forget_source(sources, r->addr_tuple);  /* the address it wrote to is gone: the kernel chooses */
            sticky = 0;
            continue;
        }
        if (msgs[start].count > 1 && (err == EIO || err == EINVAL || err == EMSGSIZE || err == ENOPROTOOPT
                                      || err == EOPNOTSUPP)) {
            /* The path does not take segments this big (a frame over its MTU) or cannot segment at all:
             * these go one by one, and no GSO message carries a segment this big on this route again. */
            r->gso_max = err == EINVAL || err == EMSGSIZE ? (Py_ssize_t)msgs[start].segment - 1 : 0;
            r->gso_refused++;
            struct relay_msg whole = msgs[start];
            int extra = whole.count - 1;
            if (nmsg + extra > NODE_RELAY_BATCH) {
                extra = 0;  /* cannot happen: one message per item at most */
            }
            memmove(&msgs[start + whole.count], &msgs[start + 1], (size_t)(nmsg - start - 1) * sizeof msgs[0]);
            for (int s = 0; s < whole.count; s++) {
                msgs[start + s].first = whole.first + s;
                msgs[start + s].count = 1;
                msgs[start + s].segment = 0;
            }
            nmsg += extra;
            continue;
        }
        /* Unreachable, EPERM, ...: this message is lost, as on a wire. */
        *errors += msgs[start].count;
        r->send_errors += (unsigned long long)msgs[start].count;
        count_tx(r, items[msgs[start].first].key, msgs[start].count);
        start++;
    }
    Py_ssize_t done = start < nmsg ? msgs[start].first : count;
    for (int k = 0; k < count; k++) {
        Py_DECREF(items[k].key);
    }
    return i + done;
}

/* node_relay_send_tcp(route, datagrams, start, stop, fd, headers) -> (next, rest)   (issue 16, the TCP relay's send)
 * datagrams[start:stop] whose endpoint is an `endpoint_type` with a SEND header in `headers` (the TCP client's,
 * under its session's current token) leave as 2-byte-length-prefixed SEND frames (length, header, datagram: three
 * iovecs, no copy) on the TCP relay's socket `fd`, one writev per NODE_RELAY_BATCH frames, up to the first datagram
 * that does not qualify. The caller owns the socket's write side for this call: no write under way, no backlog.
 * `next`: the first datagram not taken (every one before it is on the wire or in `rest`); `rest`: the bytes the
 * kernel did not take (b"" when all went; all of the last writev's when the socket is full or broken), which the
 * caller must send before anything else (a stream: a frame cut anywhere is completed by its rest). */
static PyObject *
node_relay_send_tcp(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct node_relay *r = nargs == 6 ? PyCapsule_GetPointer(args[0], NODE_RELAY_CAPSULE) : NULL;
    if (r == NULL || !PyList_Check(args[1]) || !PyDict_Check(args[5])) {
        if (r != NULL || !PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError,
                            "node_relay_send_tcp(route, datagrams: list, start, stop, fd, headers: dict)");
        }
        return NULL;
    }
    PyObject *datagrams = args[1], *headers = args[5];
    Py_ssize_t start = PyLong_AsSsize_t(args[2]), stop = PyLong_AsSsize_t(args[3]);
    long fd = PyLong_AsLong(args[4]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "node_relay_send_tcp: bad fd");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(datagrams);
    if (start < 0 || stop > n || start > stop) {
        PyErr_Format(PyExc_IndexError, "[%zd, %zd) outside [0, %zd]", start, stop, n);
        return NULL;
    }
    struct relay_item items[NODE_RELAY_BATCH];
    unsigned char lengths[NODE_RELAY_BATCH][2];
    struct iovec iov[3 * NODE_RELAY_BATCH];
    Py_ssize_t i = start;
    PyObject *rest = NULL;
    while (i < stop && rest == NULL) {
        int count = 0;
        size_t total = 0;
        while (i + count < stop && count < NODE_RELAY_BATCH) {
            PyObject *item = PyList_GET_ITEM(datagrams, i + count);
            PyObject *key, *header;
            if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2
                || !PyBytes_CheckExact(PyTuple_GET_ITEM(item, 0))
                || PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0)) > 0xffff - NODE_SEND_HEADER
                || !relay_header_in(r, headers, PyTuple_GET_ITEM(item, 1), &key, &header)) {
                break;
            }
            PyObject *data = PyTuple_GET_ITEM(item, 0);
            size_t length = NODE_SEND_HEADER + (size_t)PyBytes_GET_SIZE(data);
            items[count].key = key;
            lengths[count][0] = (unsigned char)(length >> 8);
            lengths[count][1] = (unsigned char)length;
            iov[3 * count] = (struct iovec){.iov_base = lengths[count], .iov_len = 2};
            iov[3 * count + 1] = (struct iovec){.iov_base = PyBytes_AS_STRING(header), .iov_len = NODE_SEND_HEADER};
            iov[3 * count + 2] = (struct iovec){.iov_base = PyBytes_AS_STRING(data),
                                                .iov_len = (size_t)PyBytes_GET_SIZE(data)};
            total += 2 + length;
            count++;
        }
        if (count == 0) {
            break;
        }
        ssize_t wrote;
        do {
            wrote = writev((int)fd, iov, 3 * count);
        } while (wrote < 0 && errno == EINTR);
        if (wrote < 0) {
            wrote = 0;  /* full (EAGAIN) or broken: all of it is the rest (the caller's writer meets the error) */
        }
        if ((size_t)wrote < total) {
            rest = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(total - (size_t)wrote));
            if (rest != NULL) {
                char *out = PyBytes_AS_STRING(rest);
                size_t skip = (size_t)wrote;
                for (int k = 0; k < 3 * count; k++) {
                    size_t len = iov[k].iov_len;
                    if (skip >= len) {
                        skip -= len;
                        continue;
                    }
                    memcpy(out, (char *)iov[k].iov_base + skip, len - skip);
                    out += len - skip;
                    skip = 0;
                }
            }
        }
        /* Counted per run of one destination (bulk goes to one peer): one dict update a run. */
        for (int k = 0; k < count;) {
            int run = 1;
            while (k + run < count && (items[k + run].key == items[k].key
                                       || PyObject_RichCompareBool(items[k + run].key, items[k].key, Py_EQ) == 1)) {
                run++;
            }
            count_tx(r, items[k].key, run);
            k += run;
        }
        for (int k = 0; k < count; k++) {
            Py_DECREF(items[k].key);
        }
        if (rest == NULL && (size_t)wrote < total) {
            return NULL;  /* no memory for the rest: the frames are cut (the caller's writer will not repair it) */
        }
        i += count;
    }
    if (rest == NULL) {
        rest = PyBytes_FromStringAndSize(NULL, 0);
        if (rest == NULL) {
            return NULL;
        }
    }
    return Py_BuildValue("(nN)", i, rest);
}

static PyObject *
recv_datagrams(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    Py_ssize_t limit;
    PyObject *sources;
    struct node_relay *route;
    if (fd_and_limit(args, nargs == 3 || nargs == 4 ? 2 : nargs, "recv_datagrams(fd, limit[, sources[, route]])",
                     &fd, &limit) < 0
        || optional_dict(args, nargs, 2, &sources) < 0 || optional_route(args, nargs, 3, &route) < 0) {
        return NULL;
    }
    unsigned char last_key[NODE_KEY_LEN];
    PyObject *last_endpoint = NULL;  /* the previous RECV's source: bulk traffic comes from one peer */
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    /* Room for the GRO segment size beside other cmsgs (SO_RXQ_OVFL's drop count, the pktinfo). */
    union {
        char raw[4 * CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(struct in6_pktinfo))];
        struct cmsghdr align;
    } control;
    while (PyList_GET_SIZE(out) < limit) {
        struct sockaddr_storage source;
        struct iovec iov = {.iov_base = buffer, .iov_len = BUFFER_SIZE};
        struct msghdr msg = {
            .msg_name = &source, .msg_namelen = sizeof source, .msg_iov = &iov, .msg_iovlen = 1,
            .msg_control = control.raw, .msg_controllen = sizeof control.raw,
        };
        ssize_t n;
        do {
            n = recvmsg(fd, &msg, MSG_DONTWAIT);
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (drain_ends_quietly(PyList_GET_SIZE(out))) {
                break;
            }
            goto fail;
        }
        Py_ssize_t segment = 0;
        struct local_source local = {.len = 0};
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
                int size;
                memcpy(&size, CMSG_DATA(c), sizeof size);
                segment = size;
            } else if (sources != NULL) {
                parse_pktinfo(c, &local);
            }
        }
        if (segment <= 0 || segment >= n) {
            segment = n;  /* one datagram (an empty one included) */
        }
        /* Copy every segment out of the shared buffer first: bytes objects are not tracked by the
         * garbage collector, but the tuples below are, and a collection may run arbitrary code. */
        Py_ssize_t count = n > 0 ? (n + segment - 1) / segment : 1;
        /* parts[k]: segment k's bytes; parts[count + k]: its relayed source's endpoint, or NULL. */
        PyObject **parts = PyMem_Calloc(2 * (size_t)count, sizeof(PyObject *));
        if (parts == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        int from_relay = route != NULL && route->addr_tuple != NULL && same_sockaddr(&source, &route->addr);
        Py_ssize_t made = 0;
        for (; made < count; made++) {
            Py_ssize_t offset = made * segment, size = n - offset < segment ? n - offset : segment;
            const unsigned char *frame = buffer + offset;
            PyObject *endpoint = from_relay && is_relayed_transport(frame, size)
                                 ? relay_endpoint(route, frame + NODE_KEY_OFFSET, last_key, &last_endpoint) : NULL;
            if (endpoint != NULL) {
                parts[count + made] = endpoint;
                frame += NODE_RECV_HEADER;
                size -= NODE_RECV_HEADER;
                route->received++;
            }
            if ((parts[made] = PyBytes_FromStringAndSize((const char *)frame, size)) == NULL) {
                break;
            }
        }
        PyObject *addr = made == count ? source_tuple(&source, msg.msg_namelen) : NULL;
        int ok = addr != NULL && (local.len == 0 || remember_source(sources, addr, &local) == 0);
        for (Py_ssize_t k = 0; k < made; k++) {
            PyObject *from = parts[count + k] != NULL ? parts[count + k] : addr;
            if (ok && append_new(out, PyTuple_Pack(2, parts[k], from)) < 0) {
                ok = 0;
            }
            Py_DECREF(parts[k]);
        }
        for (Py_ssize_t k = 0; k < count; k++) {
            Py_XDECREF(parts[count + k]);
        }
        PyMem_Free(parts);
        Py_XDECREF(addr);
        if (!ok) {
            goto fail;
        }
    }
    Py_XDECREF(last_endpoint);
    return out;
fail:
    Py_XDECREF(last_endpoint);
    Py_DECREF(out);
    return NULL;
}

/* node_relay_split_tcp(route, buffer) -> (datagrams, frames, consumed)   (issue 16, the TCP relay's receive)
 * The TCP relay's byte stream is 2-byte-length-prefixed frames. Splits the whole frames at the start of
 * `buffer` (a read, after what the previous one left): a RECV of transport data from a key in `endpoints`
 * (the checks recv_datagrams makes: length, type, MAGIC, transport header, known key) comes out as
 * (inner datagram, endpoint) in `datagrams`, for the driver's batch decrypt-and-write; every other frame
 * (HELLO_OK, notices, handshakes, disco, unknown keys, junk) comes out whole in `frames`, for the relay
 * shell's Python path, which checks and counts it as before. `consumed`: the bytes of the whole frames; the
 * rest is the start of a frame the next read completes (the caller counts: `received` is the UDP relay's). */
static PyObject *
node_relay_split_tcp(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct node_relay *r = nargs == 2 ? PyCapsule_GetPointer(args[0], NODE_RELAY_CAPSULE) : NULL;
    if (r == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "node_relay_split_tcp(route, buffer)");
        }
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    unsigned char last_key[NODE_KEY_LEN];
    PyObject *last_endpoint = NULL;
    PyObject *datagrams = PyList_New(0), *frames = PyList_New(0), *result = NULL;
    const unsigned char *data = view.buf;
    Py_ssize_t size = view.len, offset = 0;
    if (datagrams == NULL || frames == NULL) {
        goto done;
    }
    while (size - offset >= 2) {
        Py_ssize_t length = ((Py_ssize_t)data[offset] << 8) | data[offset + 1];
        if (size - offset - 2 < length) {
            break;  /* the rest of this frame comes with the next read */
        }
        const unsigned char *frame = data + offset + 2;
        PyObject *endpoint = is_relayed_transport(frame, length)
                             ? relay_endpoint(r, frame + NODE_KEY_OFFSET, last_key, &last_endpoint) : NULL;
        int ok;
        if (endpoint != NULL) {
            PyObject *inner = PyBytes_FromStringAndSize((const char *)frame + NODE_RECV_HEADER,
                                                        length - NODE_RECV_HEADER);
            ok = inner != NULL && append_new(datagrams, PyTuple_Pack(2, inner, endpoint)) == 0;
            Py_XDECREF(inner);
            Py_DECREF(endpoint);
        } else {
            ok = append_new(frames, PyBytes_FromStringAndSize((const char *)frame, length)) == 0;
        }
        if (!ok) {
            goto done;
        }
        offset += 2 + length;
    }
    result = Py_BuildValue("(OOn)", datagrams, frames, offset);
done:
    Py_XDECREF(last_endpoint);
    Py_XDECREF(datagrams);
    Py_XDECREF(frames);
    PyBuffer_Release(&view);
    return result;
}

/* The last destination tuple and its sockaddr. The reference keeps the tuple alive, so the same
 * pointer always means the same (immutable) address. */
static PyObject *last_dest;
static struct sockaddr_storage last_dest_sa;
static socklen_t last_dest_len;

static int
is_transport(PyObject *data)
{
    return PyBytes_GET_SIZE(data) > 0 && PyBytes_AS_STRING(data)[0] == 4;
}

/* 1: resolved into *sa; 0: not a numeric (host, port) tuple this module handles. */
static int
resolve_dest(PyObject *dest, struct sockaddr_storage *sa, socklen_t *len)
{
    if (dest == last_dest) {
        memcpy(sa, &last_dest_sa, last_dest_len);
        *len = last_dest_len;
        return 1;
    }
    /* Exact types only: a subclass could run Python code (and change the list) from here. */
    if (!PyTuple_CheckExact(dest) || PyTuple_GET_SIZE(dest) != 2 || !PyUnicode_CheckExact(PyTuple_GET_ITEM(dest, 0))
        || !PyLong_CheckExact(PyTuple_GET_ITEM(dest, 1))) {
        return 0;
    }
    Py_ssize_t host_len;
    const char *host = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(dest, 0), &host_len);
    if (host == NULL) {
        PyErr_Clear();
        return 0;
    }
    long port = PyLong_AsLong(PyTuple_GET_ITEM(dest, 1));
    if ((port == -1 && PyErr_Occurred()) || (size_t)host_len != strlen(host) || port < 0 || port > 65535) {
        PyErr_Clear();
        return 0;
    }
    memset(sa, 0, sizeof *sa);
    if (strchr(host, ':') != NULL) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)sa;
        if (strchr(host, '%') != NULL || inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1) {
            return 0;  /* a scoped (link-local) host needs the interface lookup Python's socket does */
        }
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        *len = sizeof *sin6;
    } else {
        struct sockaddr_in *sin = (struct sockaddr_in *)sa;
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1) {
            return 0;
        }
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        *len = sizeof *sin;
    }
    Py_INCREF(dest);
    Py_XSETREF(last_dest, dest);
    memcpy(&last_dest_sa, sa, *len);
    last_dest_len = *len;
    return 1;
}

/* One sendto, or one sendmsg carrying a GSO run (count > 1, `segment` bytes each) and/or the source
 * address to send from. EINTR is retried; otherwise -1 with errno set. */
static ssize_t
send_run(int fd, const struct sockaddr_storage *sa, socklen_t sa_len, struct iovec *iov, size_t count,
         uint16_t segment, const struct local_source *source)
{
    ssize_t rc;
    if (count == 1 && source == NULL) {
        do {
            rc = sendto(fd, iov[0].iov_base, iov[0].iov_len, 0, (const struct sockaddr *)sa, sa_len);
        } while (rc < 0 && errno == EINTR);
        return rc;
    }
    union {
        char raw[CMSG_SPACE(sizeof(uint16_t)) + CMSG_SPACE(PKTINFO_MAX)];
        struct cmsghdr align;
    } control;
    size_t used = put_cmsgs(control.raw, sizeof control.raw, count > 1 ? segment : 0, source);
    struct msghdr msg = {
        .msg_name = (void *)sa, .msg_namelen = sa_len, .msg_iov = iov, .msg_iovlen = count,
        .msg_control = control.raw, .msg_controllen = used,
    };
    do {
        rc = sendmsg(fd, &msg, 0);
    } while (rc < 0 && errno == EINTR);
    return rc;
}

static PyObject *
send_datagrams(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *sources;
    struct node_relay *route;
    if (nargs < 6 || nargs > 9 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "send_datagrams(datagrams: list, start, v4_fd, v6_fd, v4_gso, v6_gso[, sources[, route, now]])");
        return NULL;
    }
    PyObject *datagrams = args[0];
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    int v4_fd, v6_fd;
    if (PyErr_Occurred() || fd_or_none(args[2], &v4_fd) < 0 || fd_or_none(args[3], &v6_fd) < 0
        || optional_dict(args, nargs, 6, &sources) < 0 || optional_route(args, nargs, 7, &route) < 0) {
        return NULL;
    }
    double now = 0.0;
    if (route != NULL && (nargs != 9 || ((now = PyFloat_AsDouble(args[8])) == -1.0 && PyErr_Occurred()))) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "send_datagrams: a route needs `now`");
        }
        return NULL;
    }
    int v4_gso = PyObject_IsTrue(args[4]), v6_gso = PyObject_IsTrue(args[5]);
    if (v4_gso < 0 || v6_gso < 0) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(datagrams), errors = 0;
    if (i < 0 || i > n) {
        PyErr_Format(PyExc_IndexError, "start %zd outside [0, %zd]", i, n);
        return NULL;
    }
    int status = SENT_ALL;
    struct iovec iov[GSO_MAX_SEGMENTS];
    while (i < n) {
        PyObject *item = PyList_GET_ITEM(datagrams, i);
        struct sockaddr_storage sa;
        socklen_t sa_len;
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(item, 0))
            || !resolve_dest(PyTuple_GET_ITEM(item, 1), &sa, &sa_len)) {
            if (route != NULL && route->addr_tuple != NULL && now < route->until) {
                int v6r = route->addr.ss_family == AF_INET6;
                int rfd = v6r ? v6_fd : v4_fd;
                Py_ssize_t next = rfd < 0 ? i : send_relay(route, datagrams, i, n, rfd, v6r ? v6_gso : v4_gso,
                                                           sources, &status, &errors);
                if (status == WOULD_BLOCK) {
                    i = next;
                    break;
                }
                if (next > i) {
                    i = next;
                    continue;
                }
            }
            status = NEEDS_PYTHON;
            break;
        }
        int v6 = sa.ss_family == AF_INET6;
        int fd = v6 ? v6_fd : v4_fd;
        if (fd < 0) {
            status = NEEDS_PYTHON;
            break;
        }
        PyObject *data = PyTuple_GET_ITEM(item, 0), *dest = PyTuple_GET_ITEM(item, 1);
        Py_ssize_t size = PyBytes_GET_SIZE(data);
        iov[0].iov_base = PyBytes_AS_STRING(data);
        iov[0].iov_len = (size_t)size;
        /* Extend a GSO run of transport data: same endpoint, same size; a shorter datagram ends it.
         * Only type 4: the receiver's socket filter judges a coalesced read by its first header, and
         * an initiation followed by a shorter discovery ping is not a whole number of initiations. */
        Py_ssize_t j = i + 1, total = size;
        if ((v6 ? v6_gso : v4_gso) && size > 0 && is_transport(data)) {
            while (j < n && j - i < GSO_MAX_SEGMENTS) {
                PyObject *next = PyList_GET_ITEM(datagrams, j);
                if (!PyTuple_CheckExact(next) || PyTuple_GET_SIZE(next) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(next, 0))) {
                    break;
                }
                PyObject *next_data = PyTuple_GET_ITEM(next, 0), *next_dest = PyTuple_GET_ITEM(next, 1);
                Py_ssize_t m = PyBytes_GET_SIZE(next_data);
                if (m > size || m == 0 || total + m > GSO_MAX_BYTES || !is_transport(next_data)) {
                    break;
                }
                if (next_dest != dest) {
                    struct sockaddr_storage next_sa;
                    socklen_t next_len;
                    if (!resolve_dest(next_dest, &next_sa, &next_len) || next_len != sa_len
                        || memcmp(&next_sa, &sa, sa_len) != 0) {
                        break;
                    }
                }
                iov[j - i].iov_base = PyBytes_AS_STRING(next_data);
                iov[j - i].iov_len = (size_t)m;
                total += m;
                j++;
                if (m < size) {
                    break;
                }
            }
        }
        struct local_source local;
        int sticky = sources != NULL && lookup_source(sources, dest, v6, &local);
        size_t count = (size_t)(j - i);
        ssize_t rc = send_run(fd, &sa, sa_len, iov, count, (uint16_t)size, sticky ? &local : NULL);
        if (rc < 0 && sticky && source_gone(errno)) {
            /* The address it wrote to is gone: forget it, and the kernel chooses (once more). */
            forget_source(sources, dest);
            sticky = 0;
            rc = send_run(fd, &sa, sa_len, iov, count, (uint16_t)size, NULL);
        }
        if (rc < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                status = WOULD_BLOCK;
                break;
            }
            if (count > 1 && (errno == EIO || errno == EINVAL || errno == EMSGSIZE || errno == ENOPROTOOPT
                              || errno == EOPNOTSUPP)) {
                /* The path may not segment (no checksum offload, route MTU), or the destination is bad
                 * for any datagram (port 0, ...): the first one alone tells which. */
                rc = send_run(fd, &sa, sa_len, iov, 1, 0, sticky ? &local : NULL);
                if (rc >= 0) {
                    i += 1;
                    status = GSO_REFUSED;
                    break;
                }
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    status = WOULD_BLOCK;
                    break;
                }
                errors += 1;
                i += 1;
                continue;
            }
            errors += j - i;  /* unreachable network, firewall EPERM, ...: lost, as on a wire */
        }
        i = j;
    }
    return Py_BuildValue("(nin)", i, status, errors);
}

/* ---- The signal server's UDP relay: SEND frames of established sessions forwarded in C ----
 * The server's pure RelayCore (signal_server/relay.py) admits sessions, expires them and limits them; it
 * pushes each confirmed UDP session down here (token -> the sender, key -> where its RECV frames go), with the
 * limits it applies. relay_forward drains a socket with recvmmsg and, for a SEND whose token is known, came
 * from the session's own (socket, address), has not expired, names a destination key with a live session here
 * and fits the per-node and total budgets, rewrites the frame in place as the RECV (the 45-byte SEND header
 * becomes the 37-byte RECV header) and sends it with sendmmsg, runs to one destination as one UDP GSO send.
 * Everything else (HELLOs, unknown or stale tokens, a token from another source, destinations over TCP or
 * plain peers, STUN, junk) goes back to Python as (bytes, (host, port)) pairs, as recv_datagrams returns
 * them: RelayCore decides, counts and answers those as before.
 *
 * relay_new(max_sessions) -> table (a capsule)
 * relay_set(table, token8, key32, fd, (host, port), expires, source) -> bool
 *     The session of `key` (replacing that key's previous one), bound to `fd` and the address; `expires` on
 *     time.monotonic()'s clock; `source`: None or the sticky source entry's (level, type, pktinfo) to answer
 *     from. False when the table is full or the address is not one this module resolves (scoped IPv6):
 *     that session stays on the Python path.
 * relay_remove(table, key32) -> bool
 * relay_limits(table, node_pps, node_pkt_burst, node_bytes_s, node_byte_burst, total_bytes_s, total_burst)
 *     Per-node-key packet and byte buckets, one bucket for all forwarded bytes; a rate of 0: unlimited.
 *     A key's buckets outlive its sessions (kept in a bounded side table), so a node that HELLOs again does
 *     not start over with a full burst.
 * relay_charge(table, key32, size) -> bool
 *     Takes one packet of `size` bytes from the key's buckets (the ones its fast-path SENDs spend): RelayCore
 *     charges its own forwarding here, so a node has one budget whichever path its SENDs take.
 * relay_charge_total(table, size) -> bool
 *     Takes `size` bytes from the total bucket (the one the fast path spends): RelayCore's own forwarding too,
 *     so the total limit holds whichever mix of paths the traffic takes.
 * relay_forward(table, fd, limit[, sources]) -> list[(bytes, (host, port))]   (the datagrams for Python)
 * relay_take_counters(table) -> (forwarded_packets, forwarded_bytes, drop_node_limit, drop_total_limit,
 *                                send_errors, send_would_block): counts since the last call.
 */
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>

#define RELAY_TOKEN_LEN 8
#define RELAY_KEY_LEN 32
#define RELAY_SEND_HEADER (5 + RELAY_TOKEN_LEN + RELAY_KEY_LEN)
#define RELAY_RECV_HEADER (5 + RELAY_KEY_LEN)
#define RELAY_T_SEND 3
#define RELAY_T_RECV 4
#define RELAY_BATCH 64
#define RELAY_BUFFER 65536  /* above the largest UDP payload: a datagram is never cut */
#define RELAY_CAPSULE "meshwg.relay_table"

static const unsigned char relay_magic[4] = {0xff, 'M', 'W', 'R'};

struct relay_bucket {
    double rate, burst, tokens, stamp;  /* rate 0: unlimited */
};

struct relay_session {
    int used;
    unsigned char token[RELAY_TOKEN_LEN], key[RELAY_KEY_LEN];
    int fd;
    struct sockaddr_storage addr;
    socklen_t addr_len;
    struct local_source source;  /* len 0: the kernel chooses */
    double expires;
    int32_t budget;              /* its key's entry in budgets */
    int32_t conn;                /* a TCP relay connection's slot in conns (its RECVs go there), -1: UDP */
};

/* A node key's per-node buckets: kept across that key's sessions, freed only when the table is full of keys
 * (one no session holds, refilled if any: forgetting it then forgets nothing). */
struct relay_budget {
    int used;
    unsigned char key[RELAY_KEY_LEN];
    int32_t session;             /* -1: none in the table */
    struct relay_bucket pkts, bytes;
};

struct relay_conn;

struct relay_out {
    const struct relay_session *dest;  /* where it goes: fd, address, source to send from (or its TCP conn) */
    unsigned char *data;
    size_t len;
};

struct relay_table {
    Py_ssize_t max_sessions, cap;  /* cap: slots of each index, a power of two >= 2 * max_sessions */
    struct relay_session *sessions;
    int32_t *by_token, *by_key;    /* session numbers, -1: empty (linear probing) */
    int32_t *free_list;
    Py_ssize_t n_free;
    Py_ssize_t max_budgets, bcap;  /* 2 * max_sessions: there is always one no session holds */
    struct relay_budget *budgets;
    int32_t *by_budget, *budget_free;
    Py_ssize_t n_budget_free, hand;
    uint64_t seed;
    double node_pps, node_pkt_burst, node_bytes, node_byte_burst;
    struct relay_bucket total;
    int gso;
    unsigned long long forwarded_packets, forwarded_bytes, drop_node, drop_total, send_errors, send_would_block;
    unsigned char *buffers;        /* RELAY_BATCH x RELAY_BUFFER, relay_forward's */
    /* The TCP relay's connections (relay_tcp_*; NULL until relay_tcp_start): slots, the epoll set of the
     * TCP worker (connections it reads, or whose outbound bytes wait for room), its counters. */
    struct relay_conn *conns;
    int32_t max_conns, *conn_free, n_conn_free;
    int epfd;
    unsigned long long tcp_in, tcp_out, tcp_out_drops, tcp_python, tcp_send_errors;
    /* Held by whoever reads or changes the table: the Python calls (GIL held, which the workers never take)
     * and each worker thread while it decides and sends a batch. relay_flush's static buffers are under it. */
    pthread_mutex_t lock;
};

/* A TCP relay connection the table writes RECV frames to (and, once Python hands it over, reads SENDs from). */
struct relay_conn {
    int used, fd, reading, ended;  /* reading: the TCP worker reads it; ended: EOF or error reported */
    int dead;                      /* a write failed: nothing more is written (the reader sees the end) */
    uint32_t gen, events;          /* gen: in its handle, so a reused slot's stale handle matches nothing */
    int32_t sessions;              /* table sessions whose RECVs come here */
    unsigned char *out;            /* bytes the kernel has not taken yet, in order (at most RELAY_TCP_OUT_MAX) */
    size_t out_len, out_cap;
    unsigned char *partial;        /* the start of a frame the next read completes */
    size_t partial_len;
    double last_read, stalled_since;  /* stalled_since: when out last made no progress (0: out empty) */
};

static void
conn_forget_session(struct relay_table *t, int32_t conn)
{
    if (conn >= 0 && t->conns != NULL) {
        t->conns[conn].sessions--;
    }
}

static void
conn_release(struct relay_conn *c)
{
    free(c->out);
    free(c->partial);
    c->out = c->partial = NULL;
    c->out_len = c->out_cap = c->partial_len = 0;
}

static void
conns_free(struct relay_table *t)
{
    if (t->conns != NULL) {
        for (int32_t i = 0; i < t->max_conns; i++) {
            conn_release(&t->conns[i]);
        }
    }
    PyMem_RawFree(t->conns);
    PyMem_RawFree(t->conn_free);
    if (t->epfd >= 0) {
        close(t->epfd);
    }
}

/* The table's lock from a Python call: waits with the GIL released (a worker holds it for a batch at most). */
static void
table_lock(struct relay_table *t)
{
    if (pthread_mutex_trylock(&t->lock) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&t->lock);
        Py_END_ALLOW_THREADS
    }
}

static void
table_unlock(struct relay_table *t)
{
    pthread_mutex_unlock(&t->lock);
}

static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* time.monotonic()'s clock on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int
bucket_take(struct relay_bucket *b, double now, double cost)
{
    if (b->rate <= 0) {
        return 1;
    }
    if (now > b->stamp) {
        b->tokens += (now - b->stamp) * b->rate;
        if (b->tokens > b->burst) {
            b->tokens = b->burst;
        }
        b->stamp = now;
    }
    if (b->tokens >= cost) {
        b->tokens -= cost;
        return 1;
    }
    return 0;
}

static void
bucket_set(struct relay_bucket *b, double rate, double burst, double now)
{
    int fresh = b->rate <= 0;
    b->rate = rate;
    b->burst = burst;
    if (fresh || b->tokens > burst) {
        b->tokens = burst;
    }
    b->stamp = now;
}

static uint64_t
relay_hash(const struct relay_table *t, const unsigned char *bytes)
{
    uint64_t x;
    memcpy(&x, bytes, sizeof x);
    x ^= t->seed;  /* splitmix64's finalizer: keys chosen to collide would need the seed */
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static const unsigned char *
index_field(const struct relay_table *t, const int32_t *index, int32_t n)
{
    if (index == t->by_budget) {
        return t->budgets[n].key;
    }
    return index == t->by_token ? t->sessions[n].token : t->sessions[n].key;
}

static Py_ssize_t
index_mask(const struct relay_table *t, const int32_t *index)
{
    return (index == t->by_budget ? t->bcap : t->cap) - 1;
}

/* The slot holding the session whose field is `bytes`, or the empty slot where it would go. */
static Py_ssize_t
index_slot(const struct relay_table *t, const int32_t *index, const unsigned char *bytes, size_t len)
{
    Py_ssize_t mask = index_mask(t, index), i = (Py_ssize_t)(relay_hash(t, bytes) & (uint64_t)mask);
    while (index[i] >= 0 && memcmp(index_field(t, index, index[i]), bytes, len) != 0) {
        i = (i + 1) & mask;
    }
    return i;
}

static int32_t
index_find(const struct relay_table *t, const int32_t *index, const unsigned char *bytes, size_t len)
{
    return index[index_slot(t, index, bytes, len)];
}

/* Removes slot i, shifting back the entries of its probe run (no tombstones). */
static void
index_delete(struct relay_table *t, int32_t *index, Py_ssize_t i)
{
    Py_ssize_t mask = index_mask(t, index), j = i;
    index[i] = -1;
    for (;;) {
        j = (j + 1) & mask;
        if (index[j] < 0) {
            return;
        }
        Py_ssize_t home = (Py_ssize_t)(relay_hash(t, index_field(t, index, index[j])) & (uint64_t)mask);
        /* Move j back to i unless its home lies cyclically in (i, j]. */
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            index[i] = index[j];
            index[j] = -1;
            i = j;
        }
    }
}

static void
session_remove(struct relay_table *t, int32_t n)
{
    struct relay_session *s = &t->sessions[n];
    index_delete(t, t->by_token, index_slot(t, t->by_token, s->token, RELAY_TOKEN_LEN));
    index_delete(t, t->by_key, index_slot(t, t->by_key, s->key, RELAY_KEY_LEN));
    t->budgets[s->budget].session = -1;  /* the budget stays: the key's next session spends it on */
    conn_forget_session(t, s->conn);
    s->used = 0;
    t->free_list[t->n_free++] = n;
}

static int
bucket_full(const struct relay_bucket *b, double now)
{
    return b->rate <= 0 || b->tokens + (now - b->stamp) * b->rate >= b->burst;
}

/* Frees one budget that no session holds, a refilled one if there is one; 0 when none. */
static int
budget_evict(struct relay_table *t, double now)
{
    int32_t pick = -1;
    for (Py_ssize_t k = 0; k < t->max_budgets; k++) {
        int32_t n = (int32_t)((t->hand + k) % t->max_budgets);
        const struct relay_budget *b = &t->budgets[n];
        if (b->session >= 0) {
            continue;
        }
        if (pick < 0) {
            pick = n;
        }
        if (bucket_full(&b->pkts, now) && bucket_full(&b->bytes, now)) {
            pick = n;
            break;
        }
    }
    if (pick < 0) {
        return 0;
    }
    t->hand = (pick + 1) % t->max_budgets;
    index_delete(t, t->by_budget, index_slot(t, t->by_budget, t->budgets[pick].key, RELAY_KEY_LEN));
    t->budgets[pick].used = 0;
    t->budget_free[t->n_budget_free++] = pick;
    return 1;
}

/* The budget of `key`, made with full buckets when it has none; -1 when none can be freed. */
static int32_t
budget_for(struct relay_table *t, const unsigned char *key, double now)
{
    int32_t n = index_find(t, t->by_budget, key, RELAY_KEY_LEN);
    if (n >= 0) {
        return n;
    }
    if (t->n_budget_free == 0 && !budget_evict(t, now)) {
        return -1;
    }
    n = t->budget_free[--t->n_budget_free];
    struct relay_budget *b = &t->budgets[n];
    memset(b, 0, sizeof *b);
    b->used = 1;
    memcpy(b->key, key, RELAY_KEY_LEN);
    b->session = -1;
    bucket_set(&b->pkts, t->node_pps, t->node_pkt_burst, now);
    bucket_set(&b->bytes, t->node_bytes, t->node_byte_burst, now);
    t->by_budget[index_slot(t, t->by_budget, key, RELAY_KEY_LEN)] = n;
    return n;
}

static void
relay_table_free(PyObject *capsule)
{
    struct relay_table *t = PyCapsule_GetPointer(capsule, RELAY_CAPSULE);
    if (t == NULL) {
        return;
    }
    PyMem_Free(t->sessions);
    PyMem_Free(t->by_token);
    PyMem_Free(t->by_key);
    PyMem_Free(t->free_list);
    PyMem_Free(t->budgets);
    PyMem_Free(t->by_budget);
    PyMem_Free(t->budget_free);
    PyMem_Free(t->buffers);
    conns_free(t);
    pthread_mutex_destroy(&t->lock);
    PyMem_Free(t);
}

static struct relay_table *
as_table(PyObject *obj)
{
    return PyCapsule_GetPointer(obj, RELAY_CAPSULE);  /* NULL with an exception set when not one */
}

/* The pointer of capsule `name` in args[0] when there are lo..hi arguments; NULL with an exception (`usage` as a
 * TypeError when the count is off) otherwise. The Python calls on a table or a worker start with it. */
static void *
capsule_arg(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi, const char *name,
            const char *usage)
{
    void *p = nargs >= lo && nargs <= hi ? PyCapsule_GetPointer(args[0], name) : NULL;
    if (p == NULL && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_TypeError, usage);
    }
    return p;
}

static PyObject *
relay_new(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t max = nargs == 1 ? PyLong_AsSsize_t(args[0]) : -1;
    if (max < 1 || max > (1 << 24)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "relay_new(max_sessions): 1 .. 2**24");
        }
        return NULL;
    }
    struct relay_table *t = PyMem_Calloc(1, sizeof *t);
    if (t == NULL) {
        return PyErr_NoMemory();
    }
    t->max_sessions = max;
    t->cap = 2;
    while (t->cap < 2 * max) {
        t->cap <<= 1;
    }
    t->sessions = PyMem_Calloc((size_t)max, sizeof *t->sessions);
    t->by_token = PyMem_Malloc((size_t)t->cap * sizeof(int32_t));
    t->by_key = PyMem_Malloc((size_t)t->cap * sizeof(int32_t));
    t->free_list = PyMem_Malloc((size_t)max * sizeof(int32_t));
    t->max_budgets = 2 * max;
    t->bcap = 2 * t->cap;
    t->budgets = PyMem_Calloc((size_t)t->max_budgets, sizeof *t->budgets);
    t->by_budget = PyMem_Malloc((size_t)t->bcap * sizeof(int32_t));
    t->budget_free = PyMem_Malloc((size_t)t->max_budgets * sizeof(int32_t));
    t->buffers = PyMem_Malloc((size_t)RELAY_BATCH * RELAY_BUFFER);
    PyObject *capsule = PyCapsule_New(t, RELAY_CAPSULE, relay_table_free);
    if (capsule == NULL) {
        PyMem_Free(t->sessions); PyMem_Free(t->by_token); PyMem_Free(t->by_key); PyMem_Free(t->free_list);
        PyMem_Free(t->budgets); PyMem_Free(t->by_budget); PyMem_Free(t->budget_free);
        PyMem_Free(t->buffers); PyMem_Free(t);
        return NULL;
    }
    if (t->sessions == NULL || t->by_token == NULL || t->by_key == NULL || t->free_list == NULL || t->buffers == NULL
        || t->budgets == NULL || t->by_budget == NULL || t->budget_free == NULL) {
        Py_DECREF(capsule);
        return PyErr_NoMemory();
    }
    memset(t->by_token, 0xff, (size_t)t->cap * sizeof(int32_t));
    memset(t->by_key, 0xff, (size_t)t->cap * sizeof(int32_t));
    memset(t->by_budget, 0xff, (size_t)t->bcap * sizeof(int32_t));
    for (Py_ssize_t i = 0; i < max; i++) {
        t->free_list[i] = (int32_t)(max - 1 - i);
    }
    t->n_free = max;
    for (Py_ssize_t i = 0; i < t->max_budgets; i++) {
        t->budget_free[i] = (int32_t)(t->max_budgets - 1 - i);
    }
    t->n_budget_free = t->max_budgets;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    t->seed = ((uint64_t)ts.tv_nsec << 32) ^ (uint64_t)ts.tv_sec ^ (uint64_t)(uintptr_t)t;
    t->gso = 1;
    t->epfd = -1;
    pthread_mutex_init(&t->lock, NULL);
    return capsule;
}

/* A bytes object of exactly `len` bytes, or NULL with a TypeError set. */
static const unsigned char *
exact_bytes(PyObject *obj, Py_ssize_t len, const char *what)
{
    if (!PyBytes_Check(obj) || PyBytes_GET_SIZE(obj) != len) {
        PyErr_Format(PyExc_TypeError, "%s must be %zd bytes", what, len);
        return NULL;
    }
    return (const unsigned char *)PyBytes_AS_STRING(obj);
}

/* The (table, fd) arguments of relay_worker_start and relay_tcp_add; NULL with an exception when not that. */
static struct relay_table *
table_and_fd(PyObject *const *args, Py_ssize_t nargs, const char *usage, int *fd)
{
    struct relay_table *t = capsule_arg(args, nargs, 2, 2, RELAY_CAPSULE, usage);
    *fd = t != NULL ? as_fd(args[1]) : -1;
    return *fd >= 0 ? t : NULL;
}

/* The (table, token, key) that relay_set's and relay_set_tcp's `want` arguments start with; NULL with an
 * exception when they are not that. */
static struct relay_table *
session_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *usage, const unsigned char **token,
             const unsigned char **key)
{
    if (nargs != want) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    struct relay_table *t = as_table(args[0]);
    *token = t ? exact_bytes(args[1], RELAY_TOKEN_LEN, "token") : NULL;
    *key = *token ? exact_bytes(args[2], RELAY_KEY_LEN, "key") : NULL;
    return *key != NULL ? t : NULL;
}

/* A new session of token and key, any other session of either removed first; NULL when the table has no room
 * for it (or `allowed` is 0: only the old ones go). The caller fills in where its RECVs go. Table locked. */
static struct relay_session *
session_add(struct relay_table *t, const unsigned char *token, const unsigned char *key, int allowed,
            double expires)
{
    int32_t old = index_find(t, t->by_key, key, RELAY_KEY_LEN);
    if (old >= 0) {
        session_remove(t, old);
    }
    old = index_find(t, t->by_token, token, RELAY_TOKEN_LEN);
    if (old >= 0) {
        session_remove(t, old);
    }
    double now = monotonic_now();
    int32_t budget = allowed && t->n_free > 0 ? budget_for(t, key, now) : -1;
    if (budget < 0) {
        return NULL;
    }
    int32_t n = t->free_list[--t->n_free];
    struct relay_session *s = &t->sessions[n];
    memset(s, 0, sizeof *s);
    s->used = 1;
    memcpy(s->token, token, RELAY_TOKEN_LEN);
    memcpy(s->key, key, RELAY_KEY_LEN);
    s->expires = expires;
    s->budget = budget;
    s->conn = -1;
    t->budgets[budget].session = n;
    t->by_token[index_slot(t, t->by_token, token, RELAY_TOKEN_LEN)] = n;
    t->by_key[index_slot(t, t->by_key, key, RELAY_KEY_LEN)] = n;
    return s;
}

static PyObject *
relay_set(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *token, *key;
    struct relay_table *t = session_args(args, nargs, 7, "relay_set(table, token, key, fd, addr, expires, source)",
                                         &token, &key);
    int fd = t ? as_fd(args[3]) : -1;
    double expires = fd >= 0 ? PyFloat_AsDouble(args[5]) : -1.0;
    if (fd < 0 || (expires == -1.0 && PyErr_Occurred())) {
        return NULL;
    }
    struct local_source source = {.len = 0};
    PyObject *src = args[6];
    if (src != Py_None) {
        if (!PyTuple_CheckExact(src) || PyTuple_GET_SIZE(src) != 3 || !PyBytes_CheckExact(PyTuple_GET_ITEM(src, 2))
            || PyBytes_GET_SIZE(PyTuple_GET_ITEM(src, 2)) > PKTINFO_MAX) {
            PyErr_SetString(PyExc_TypeError, "source must be None or (level, type, pktinfo)");
            return NULL;
        }
        source.level = (int)PyLong_AsLong(PyTuple_GET_ITEM(src, 0));
        source.type = (int)PyLong_AsLong(PyTuple_GET_ITEM(src, 1));
        if (PyErr_Occurred()) {
            return NULL;
        }
        source.len = (size_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(src, 2));
        memcpy(source.info, PyBytes_AS_STRING(PyTuple_GET_ITEM(src, 2)), source.len);
    }
    struct sockaddr_storage sa;
    socklen_t sa_len;
    if (!resolve_dest(args[4], &sa, &sa_len)) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_FALSE;
    }
    table_lock(t);
    struct relay_session *s = session_add(t, token, key, 1, expires);
    if (s != NULL) {
        s->fd = fd;
        memcpy(&s->addr, &sa, sa_len);
        s->addr_len = sa_len;
        s->source = source;
    }
    table_unlock(t);
    return PyBool_FromLong(s != NULL);
}

static PyObject *
relay_remove(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "relay_remove(table, key)");
        return NULL;
    }
    struct relay_table *t = as_table(args[0]);
    const unsigned char *key = t ? exact_bytes(args[1], RELAY_KEY_LEN, "key") : NULL;
    if (key == NULL) {
        return NULL;
    }
    table_lock(t);
    int32_t n = index_find(t, t->by_key, key, RELAY_KEY_LEN);
    if (n >= 0) {
        session_remove(t, n);
    }
    table_unlock(t);
    return PyBool_FromLong(n >= 0);
}

static PyObject *
relay_limits(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    double v[6];
    struct relay_table *t = nargs == 7 ? as_table(args[0]) : NULL;
    if (t == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "relay_limits(table, node_pps, node_pkt_burst, node_bytes_s, "
                                             "node_byte_burst, total_bytes_s, total_burst)");
        }
        return NULL;
    }
    for (int i = 0; i < 6; i++) {
        v[i] = PyFloat_AsDouble(args[i + 1]);
        if (v[i] == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        if (!(v[i] >= 0)) {  /* NaN too */
            PyErr_SetString(PyExc_ValueError, "limits must be >= 0");
            return NULL;
        }
    }
    table_lock(t);
    double now = monotonic_now();
    t->node_pps = v[0];
    t->node_pkt_burst = v[1];
    t->node_bytes = v[2];
    t->node_byte_burst = v[3];
    bucket_set(&t->total, v[4], v[5], now);
    for (Py_ssize_t i = 0; i < t->max_budgets; i++) {
        if (t->budgets[i].used) {
            bucket_set(&t->budgets[i].pkts, v[0], v[1], now);
            bucket_set(&t->budgets[i].bytes, v[2], v[3], now);
        }
    }
    table_unlock(t);
    Py_RETURN_NONE;
}

/* One packet of `size` bytes from the key's budget; 0 when over it (the caller counts the drop). */
static int
budget_take(struct relay_table *t, int32_t n, double now, double size)
{
    struct relay_budget *b = &t->budgets[n];
    return bucket_take(&b->pkts, now, 1.0) && bucket_take(&b->bytes, now, size);
}

static PyObject *
relay_charge(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "relay_charge(table, key, size)");
        return NULL;
    }
    struct relay_table *t = as_table(args[0]);
    const unsigned char *key = t ? exact_bytes(args[1], RELAY_KEY_LEN, "key") : NULL;
    double size = key ? PyFloat_AsDouble(args[2]) : -1.0;
    if (key == NULL || (size == -1.0 && PyErr_Occurred())) {
        return NULL;
    }
    table_lock(t);
    double now = monotonic_now();
    int32_t n = budget_for(t, key, now);
    /* n < 0 cannot happen (twice as many budgets as sessions); refuse rather than go unlimited */
    int ok = n >= 0 && budget_take(t, n, now, size);
    table_unlock(t);
    return PyBool_FromLong(ok);
}

static PyObject *
relay_charge_total(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct relay_table *t = nargs == 2 ? as_table(args[0]) : NULL;
    if (t == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "relay_charge_total(table, size)");
        }
        return NULL;
    }
    double size = PyFloat_AsDouble(args[1]);
    if (size == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    table_lock(t);
    int ok = bucket_take(&t->total, monotonic_now(), size);
    table_unlock(t);
    return PyBool_FromLong(ok);
}

#define TABLE_COUNTER(name) offsetof(struct relay_table, name)
#define MAX_COUNTERS 8

/* The table's counters at `fields` (offsets of its unsigned long long members) as a tuple, zeroed: what
 * relay_take_counters and relay_tcp_counters answer. */
static PyObject *
take_counters(PyObject *const *args, Py_ssize_t nargs, const char *usage, const size_t *fields, int n)
{
    struct relay_table *t = capsule_arg(args, nargs, 1, 1, RELAY_CAPSULE, usage);
    if (t == NULL) {
        return NULL;
    }
    unsigned long long v[MAX_COUNTERS];
    table_lock(t);
    for (int i = 0; i < n; i++) {
        unsigned long long *c = (unsigned long long *)((char *)t + fields[i]);
        v[i] = *c;
        *c = 0;
    }
    table_unlock(t);
    PyObject *out = PyTuple_New(n);
    for (int i = 0; out != NULL && i < n; i++) {
        PyObject *x = PyLong_FromUnsignedLongLong(v[i]);
        if (x == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(out, i, x);
    }
    return out;
}

static PyObject *
relay_take_counters(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    static const size_t fields[] = {TABLE_COUNTER(forwarded_packets), TABLE_COUNTER(forwarded_bytes),
                                    TABLE_COUNTER(drop_node), TABLE_COUNTER(drop_total), TABLE_COUNTER(send_errors),
                                    TABLE_COUNTER(send_would_block)};
    return take_counters(args, nargs, "relay_take_counters(table)", fields, 6);
}

static int
same_addr(const struct relay_session *s, const struct sockaddr_storage *sa, socklen_t len)
{
    if (sa->ss_family != s->addr.ss_family) {
        return 0;
    }
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)sa, *b = (const struct sockaddr_in *)&s->addr;
        return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa, *b = (const struct sockaddr_in6 *)&s->addr;
        /* A scoped source never matches: such sessions are not pushed down (resolve_dest refuses them). */
        return a->sin6_port == b->sin6_port && a->sin6_scope_id == 0
               && memcmp(&a->sin6_addr, &b->sin6_addr, sizeof a->sin6_addr) == 0;
    }
    return 0;
}

/* The session a datagram's SEND is forwarded for, and its destination's; 0 when Python must decide. */
static int
fast_pair(struct relay_table *t, int fd, int32_t conn, const unsigned char *data, ssize_t n,
          const struct sockaddr_storage *sa, socklen_t sa_len, double now, int32_t *from, int32_t *to)
{
    static const unsigned char zero_key[RELAY_KEY_LEN];
    if (n < RELAY_SEND_HEADER || memcmp(data, relay_magic, 4) != 0 || data[4] != RELAY_T_SEND) {
        return 0;
    }
    int32_t a = index_find(t, t->by_token, data + 5, RELAY_TOKEN_LEN);
    if (a < 0 || t->sessions[a].conn != conn || t->sessions[a].expires < now
        || (conn < 0 && (t->sessions[a].fd != fd || !same_addr(&t->sessions[a], sa, sa_len)))) {
        return 0;  /* unknown token, another source's (UDP address or TCP connection), or stale: RelayCore
                    * refuses and counts it */
    }
    const unsigned char *dst = data + 5 + RELAY_TOKEN_LEN;
    if (memcmp(dst, zero_key, RELAY_KEY_LEN) == 0) {
        return 0;  /* CONFIRM_DST / PLAIN_SOURCE */
    }
    int32_t b = index_find(t, t->by_key, dst, RELAY_KEY_LEN);
    if (b < 0 || t->sessions[b].expires < now) {
        return 0;  /* over TCP, a plain peer, absent: RelayCore knows */
    }
    *from = a;
    *to = b;
    return 1;
}

static size_t
put_cmsgs(char *control, size_t room, uint16_t segment, const struct local_source *src)
{
    size_t used = 0;
    memset(control, 0, room);
    if (segment) {
        struct cmsghdr *c = (struct cmsghdr *)control;
        c->cmsg_level = SOL_UDP;
        c->cmsg_type = UDP_SEGMENT;
        c->cmsg_len = CMSG_LEN(sizeof segment);
        memcpy(CMSG_DATA(c), &segment, sizeof segment);
        used += CMSG_SPACE(sizeof segment);
    }
    if (src != NULL && src->len) {
        struct cmsghdr *c = (struct cmsghdr *)(control + used);
        c->cmsg_level = src->level;
        c->cmsg_type = src->type;
        c->cmsg_len = CMSG_LEN(src->len);
        memcpy(CMSG_DATA(c), src->info, src->len);
        used += CMSG_SPACE(src->len);
    }
    return used;
}

#define RELAY_CONTROL (CMSG_SPACE(sizeof(uint16_t)) + CMSG_SPACE(PKTINFO_MAX))

static void flush_tcp(struct relay_table *t, struct relay_out *q, int count, char *done);

/* Sends the queued frames: grouped per destination (its order kept), runs of one size as one GSO send. */
static void
relay_flush(struct relay_table *t, struct relay_out *q, int count)
{
    struct mmsghdr msgs[RELAY_BATCH];
    struct iovec iov[RELAY_BATCH];
    int frames[RELAY_BATCH], fds[RELAY_BATCH];
    const struct local_source *dests[RELAY_BATCH];
    char done[RELAY_BATCH] = {0};
    static union {
        char raw[RELAY_BATCH][RELAY_CONTROL];
        struct cmsghdr align;
    } control;
    int nmsg = 0, niov = 0;
    flush_tcp(t, q, count, done);
    for (int i = 0; i < count; i++) {
        if (done[i]) {
            continue;
        }
        const struct relay_session *d = q[i].dest;
        int first = niov, segs = 0;
        size_t total = 0, size = q[i].len;
        for (int j = i; j < count; j++) {
            if (done[j] || q[j].dest != q[i].dest) {
                continue;
            }
            int joins = segs == 0 || (t->gso && segs < GSO_MAX_SEGMENTS && q[j].len <= size && q[j].len > 0
                                      && total + q[j].len <= GSO_MAX_BYTES && iov[niov - 1].iov_len == size);
            if (!joins) {
                break;  /* the rest for this destination start the next message, in order */
            }
            iov[niov].iov_base = q[j].data;
            iov[niov].iov_len = q[j].len;
            niov++;
            segs++;
            total += q[j].len;
            done[j] = 1;
        }
        struct msghdr *m = &msgs[nmsg].msg_hdr;
        memset(m, 0, sizeof *m);
        m->msg_name = (void *)&d->addr;
        m->msg_namelen = d->addr_len;
        m->msg_iov = &iov[first];
        m->msg_iovlen = (size_t)segs;
        m->msg_control = control.raw[nmsg];
        m->msg_controllen = put_cmsgs(control.raw[nmsg], RELAY_CONTROL, segs > 1 ? (uint16_t)size : 0, &d->source);
        if (m->msg_controllen == 0) {
            m->msg_control = NULL;
        }
        frames[nmsg] = segs;
        fds[nmsg] = d->fd;
        dests[nmsg] = &d->source;
        nmsg++;
    }
    int start = 0;
    while (start < nmsg) {
        int end = start + 1;
        while (end < nmsg && fds[end] == fds[start]) {
            end++;
        }
        int rc = sendmmsg(fds[start], &msgs[start], (unsigned int)(end - start), 0);
        if (rc > 0) {
            start += rc;
            continue;
        }
        if (rc < 0 && errno == EINTR) {
            continue;
        }
        if (rc < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            for (int k = start; k < end; k++) {
                t->send_would_block += (unsigned long long)frames[k];
            }
            start = end;
            continue;
        }
        /* msgs[start] failed alone: a GSO run the path cannot segment goes again one by one, GSO off from
         * now on; a remembered source address that is gone is forgotten; anything else is lost, as on a wire. */
        int err = rc < 0 ? errno : EIO;
        struct msghdr *m = &msgs[start].msg_hdr;
        if (frames[start] > 1 && (err == EIO || err == EINVAL || err == EMSGSIZE || err == ENOPROTOOPT
                                  || err == EOPNOTSUPP)) {
            t->gso = 0;
            for (size_t k = 0; k < m->msg_iovlen; k++) {
                struct msghdr one = *m;
                one.msg_iov = &m->msg_iov[k];
                one.msg_iovlen = 1;
                union {
                    char raw[RELAY_CONTROL];
                    struct cmsghdr align;
                } ctl;
                one.msg_controllen = put_cmsgs(ctl.raw, RELAY_CONTROL, 0, dests[start]);
                one.msg_control = one.msg_controllen ? ctl.raw : NULL;
                if (sendmsg(fds[start], &one, 0) < 0) {
                    t->send_errors++;
                }
            }
        } else if (m->msg_controllen > 0 && source_gone(err)) {
            m->msg_control = NULL;
            m->msg_controllen = 0;
            if (sendmsg(fds[start], m, 0) < 0) {
                t->send_errors += (unsigned long long)frames[start];
            }
        } else {
            t->send_errors += (unsigned long long)frames[start];
        }
        start++;
    }
}

/* A SEND of a session the table holds, for a destination it holds: rewritten in place as the RECV and queued
 * in q, or dropped over a limit (counted); 0 when the datagram is for Python. Table locked. */
static void relay_pass(struct relay_table *t, int32_t from, int32_t to, unsigned char *data, ssize_t len, double now,
                       struct relay_out *q, int *queued);

static int
relay_step(struct relay_table *t, int fd, unsigned char *data, ssize_t len, const struct sockaddr_storage *sa,
           socklen_t sa_len, const struct local_source *local, double now, struct relay_out *q, int *queued)
{
    int32_t from, to;
    if (!fast_pair(t, fd, -1, data, len, sa, sa_len, now, &from, &to)) {
        return 0;
    }
    if (local->len) {
        t->sessions[from].source = *local;  /* answer it from where it writes to (sticky source) */
    }
    relay_pass(t, from, to, data, len, now, q, queued);
    return 1;
}

/* The SEND `data` of session `from` for session `to`: within the budgets, rewritten in place as the RECV (its
 * header ends where the SEND's does; the 8 bytes before it stay free for a TCP length prefix) and queued. */
static void
relay_pass(struct relay_table *t, int32_t from, int32_t to, unsigned char *data, ssize_t len, double now,
           struct relay_out *q, int *queued)
{
    struct relay_session *s = &t->sessions[from];
    double size = (double)(len - RELAY_SEND_HEADER);
    if (!budget_take(t, s->budget, now, size)) {
        t->drop_node++;
        return;
    }
    if (!bucket_take(&t->total, now, size)) {
        t->drop_total++;
        return;
    }
    unsigned char *frame = data + (RELAY_SEND_HEADER - RELAY_RECV_HEADER);
    memcpy(frame, relay_magic, 4);
    frame[4] = RELAY_T_RECV;
    memcpy(frame + 5, s->key, RELAY_KEY_LEN);
    q[*queued].dest = &t->sessions[to];
    q[*queued].data = frame;
    q[*queued].len = (size_t)(len - RELAY_SEND_HEADER + RELAY_RECV_HEADER);
    (*queued)++;
    t->forwarded_packets++;
    t->forwarded_bytes += (unsigned long long)size;
}

#define RELAY_RECV_CONTROL (4 * CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(struct in6_pktinfo)))

/* The receive side of one batch: buffers, names and control space of RELAY_BATCH messages. */
struct relay_rx {
    struct mmsghdr msgs[RELAY_BATCH];
    struct iovec iov[RELAY_BATCH];
    struct sockaddr_storage names[RELAY_BATCH];
    union {
        char raw[RELAY_BATCH][RELAY_RECV_CONTROL];
        struct cmsghdr align;
    } control;
    struct local_source local[RELAY_BATCH];
};

/* recvmmsg of up to `want` datagrams into `buffers` (RELAY_BATCH x RELAY_BUFFER); -1 with errno on failure. */
static int
relay_receive(int fd, struct relay_rx *rx, unsigned char *buffers, int want)
{
    for (int k = 0; k < want; k++) {
        rx->iov[k].iov_base = buffers + (size_t)k * RELAY_BUFFER;
        rx->iov[k].iov_len = RELAY_BUFFER;
        memset(&rx->msgs[k], 0, sizeof rx->msgs[k]);
        rx->msgs[k].msg_hdr.msg_name = &rx->names[k];
        rx->msgs[k].msg_hdr.msg_namelen = sizeof rx->names[k];
        rx->msgs[k].msg_hdr.msg_iov = &rx->iov[k];
        rx->msgs[k].msg_hdr.msg_iovlen = 1;
        rx->msgs[k].msg_hdr.msg_control = rx->control.raw[k];
        rx->msgs[k].msg_hdr.msg_controllen = sizeof rx->control.raw[k];
    }
    int n;
    do {
        n = recvmmsg(fd, rx->msgs, (unsigned int)want, MSG_DONTWAIT, NULL);
    } while (n < 0 && errno == EINTR);
    for (int k = 0; k < n; k++) {
        rx->local[k].len = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&rx->msgs[k].msg_hdr); c != NULL;
             c = CMSG_NXTHDR(&rx->msgs[k].msg_hdr, c)) {
            parse_pktinfo(c, &rx->local[k]);
        }
    }
    return n;
}

/* Forwards what the table may of a received batch (table locked); rest[k] = 1 for each datagram for Python. */
static int
relay_batch(struct relay_table *t, int fd, struct relay_rx *rx, int n, char *rest)
{
    struct relay_out q[RELAY_BATCH];
    double now = monotonic_now();
    int queued = 0, left = 0;
    for (int k = 0; k < n; k++) {
        rest[k] = !relay_step(t, fd, rx->iov[k].iov_base, (ssize_t)rx->msgs[k].msg_len, &rx->names[k],
                              rx->msgs[k].msg_hdr.msg_namelen, &rx->local[k], now, q, &queued);
        left += rest[k];
    }
    relay_flush(t, q, queued);
    return left;
}

static PyObject *
relay_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct relay_table *t = (nargs == 3 || nargs == 4) ? as_table(args[0]) : NULL;
    if (t == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "relay_forward(table, fd, limit[, sources])");
        }
        return NULL;
    }
    int fd;
    Py_ssize_t limit;
    PyObject *sources;
    if (fd_and_limit(args + 1, 2, "relay_forward(table, fd, limit[, sources])", &fd, &limit) < 0
        || optional_dict(args, nargs, 3, &sources) < 0) {
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    struct relay_rx rx;
    char rest[RELAY_BATCH];
    Py_ssize_t received = 0;
    while (received < limit) {
        int want = limit - received < RELAY_BATCH ? (int)(limit - received) : RELAY_BATCH;
        /* Held until the batch's objects are made: t->buffers is relay_forward's, whichever thread calls it.
         * (Making objects with the table locked cannot deadlock: the workers never take the GIL, and a Python
         * thread waiting for the table waits without it.) */
        table_lock(t);
        int n = relay_receive(fd, &rx, t->buffers, want);
        int left = n > 0 ? relay_batch(t, fd, &rx, n, rest) : 0;
        if (n < 0) {
            int err = errno;
            table_unlock(t);
            errno = err;
            if (drain_ends_quietly(PyList_GET_SIZE(out))) {
                break;
            }
            Py_DECREF(out);
            return NULL;
        }
        received += n;
        for (int k = 0; k < n && left > 0; k++) {
            if (!rest[k]) {
                continue;
            }
            left--;
            PyObject *bytes = PyBytes_FromStringAndSize(rx.iov[k].iov_base, (Py_ssize_t)rx.msgs[k].msg_len);
            PyObject *addr = bytes != NULL ? source_tuple(&rx.names[k], rx.msgs[k].msg_hdr.msg_namelen) : NULL;
            int ok = addr != NULL
                     && (rx.local[k].len == 0 || sources == NULL || remember_source(sources, addr, &rx.local[k]) == 0);
            if (ok && append_new(out, PyTuple_Pack(2, bytes, addr)) < 0) {
                ok = 0;
            }
            Py_XDECREF(bytes);
            Py_XDECREF(addr);
            if (!ok) {
                table_unlock(t);
                Py_DECREF(out);
                return NULL;  /* this batch's forwarded frames went out already */
            }
        }
        table_unlock(t);
        if (n < want) {
            break;
        }
    }
    return out;
}

/* relay_send_batch(table, fd, items[, sources]) -> list of the items left for Python
 * Frames RelayCore made ((frame, (host, port)) pairs, e.g. the SENDs of one TCP relay read) sent from `fd` as the
 * fast path sends: one sendmmsg, runs to one destination as one GSO message, each from its sticky source.
 * Items whose address this module does not resolve (scoped IPv6) come back for the caller's own send. */
static PyObject *
relay_send_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct relay_table *t = (nargs == 3 || nargs == 4) ? as_table(args[0]) : NULL;
    if (t == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "relay_send_batch(table, fd, items[, sources])");
        }
        return NULL;
    }
    int fd = as_fd(args[1]);
    PyObject *items = args[2], *sources;
    if (fd < 0 || optional_dict(args, nargs, 3, &sources) < 0) {
        return NULL;
    }
    if (!PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "items must be a list of (bytes, (host, port))");
        return NULL;
    }
    PyObject *left = PyList_New(0);
    if (left == NULL) {
        return NULL;
    }
    struct relay_session dests[RELAY_BATCH];
    struct relay_out q[RELAY_BATCH];
    Py_ssize_t n = PyList_GET_SIZE(items), i = 0;
    while (i < n) {
        int count = 0, ndest = 0;
        PyObject *last = NULL;
        for (; i < n && count < RELAY_BATCH; i++) {
            PyObject *item = PyList_GET_ITEM(items, i);
            if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(item, 0))) {
                PyErr_SetString(PyExc_TypeError, "items must be a list of (bytes, (host, port))");
                Py_DECREF(left);
                return NULL;
            }
            PyObject *dest = PyTuple_GET_ITEM(item, 1);
            if (dest != last) {
                struct relay_session *d = &dests[ndest];
                if (!resolve_dest(dest, &d->addr, &d->addr_len)) {
                    if (PyErr_Occurred() || PyList_Append(left, item) < 0) {
                        Py_DECREF(left);
                        return NULL;
                    }
                    continue;
                }
                if (ndest > 0 && d->addr_len == dests[ndest - 1].addr_len
                    && memcmp(&d->addr, &dests[ndest - 1].addr, d->addr_len) == 0) {
                    last = dest;  /* an equal tuple: the same destination */
                } else {
                    d->fd = fd;
                    d->conn = -1;
                    d->source.len = 0;
                    if (sources != NULL) {
                        lookup_source(sources, dest, d->addr.ss_family == AF_INET6, &d->source);
                    }
                    ndest++;
                    last = dest;
                }
            }
            PyObject *frame = PyTuple_GET_ITEM(item, 0);
            q[count].dest = &dests[ndest - 1];
            q[count].data = (unsigned char *)PyBytes_AS_STRING(frame);
            q[count].len = (size_t)PyBytes_GET_SIZE(frame);
            count++;
        }
        table_lock(t);
        relay_flush(t, q, count);
        table_unlock(t);
    }
    return left;
}

/* ---- The relay's forwarding thread: the fast path without trio or the GIL ----
 * relay_forward runs when trio wakes the server's task: on this 2-core machine that wakeup and trio's run loop
 * cost more than the forwarding itself (~40-80 us a wake, twice per relayed ping). A worker owns one socket:
 * its thread sleeps in poll() with no GIL, drains the socket with recvmmsg, forwards the table's SENDs under
 * the table's lock (the same relay_batch as relay_forward) and queues every other datagram for Python, copied
 * with its source, the local address it arrived at, and wakes trio through an eventfd (`fd`). Python takes
 * them with relay_worker_take and hands them to RelayCore as before. The queue is bounded (RELAY_QUEUE_MAX
 * datagrams, RELAY_QUEUE_BYTES): beyond, datagrams are dropped and counted, as a full socket buffer drops them.
 * The thread never touches a Python object; the table it uses is kept alive by the worker's reference.
 *
 * relay_worker_start(table, fd) -> worker (a capsule); relay_worker_fd(worker) -> the eventfd to wait on
 * relay_worker_take(worker, limit[, sources]) -> list[(bytes, (host, port))]   (as relay_forward returns them)
 * relay_worker_drops(worker) -> datagrams dropped on a full queue since the last call
 * relay_worker_stop(worker): stops and joins the thread (before the socket closes); also on the capsule's end.
 */
#define RELAY_WORKER_CAPSULE "meshwg.relay_worker"
#define RELAY_QUEUE_MAX 4096
#define RELAY_QUEUE_BYTES (16 << 20)
#define RELAY_WORKER_ROUNDS 8  /* batches per wake before poll() again (the stop fd is looked at there) */

/* The head of an item a forwarding thread leaves for Python (relay_pending, relay_tcp_item). */
struct queue_link {
    struct queue_link *next;
    size_t size;     /* its bytes, counted against RELAY_QUEUE_BYTES */
    uint32_t owner;  /* the TCP connection slot it comes from (the per-connection cap); 0 for UDP */
};

/* What both forwarding threads (the UDP workers, the TCP worker) have: the table they forward with (kept alive
 * by the reference), the thread, the eventfds that wake trio and stop the thread, and the bounded queue of
 * items for Python (the thread its only producer, Python its only consumer). First in each worker's struct. */
struct relay_thread {
    PyObject *table_obj;
    struct relay_table *t;
    int wake_fd, stop_fd, running;
    pthread_t thread;
    pthread_mutex_t qlock;  /* the queue and its counts */
    struct queue_link *head, *tail;
    size_t count, bytes;
    unsigned long long drops;
    uint32_t *pending, pending_max;  /* items waiting per owner, at most pending_max (NULL: no such cap) */
};

/* Whether an item of `size` bytes from `owner` fits in the queue. The thread is the queue's only producer:
 * room seen here is still there when it appends the item. */
static int
thread_room(struct relay_thread *w, size_t size, uint32_t owner)
{
    pthread_mutex_lock(&w->qlock);
    int room = w->count < RELAY_QUEUE_MAX && w->bytes + size <= RELAY_QUEUE_BYTES
               && (w->pending == NULL || w->pending[owner] < w->pending_max);
    pthread_mutex_unlock(&w->qlock);
    return room;
}

/* Appends an item for Python; p NULL (no room, no memory): a drop, counted. 1 when appended. */
static int
thread_push(struct relay_thread *w, struct queue_link *p)
{
    pthread_mutex_lock(&w->qlock);
    if (p == NULL) {
        w->drops++;
    } else {
        p->next = NULL;
        if (w->tail != NULL) {
            w->tail->next = p;
        } else {
            w->head = p;
        }
        w->tail = p;
        w->count++;
        w->bytes += p->size;
        if (w->pending != NULL) {
            w->pending[p->owner]++;
        }
    }
    pthread_mutex_unlock(&w->qlock);
    return p != NULL;
}

static void
thread_wake(struct relay_thread *w)
{
    uint64_t one = 1;
    ssize_t rc = write(w->wake_fd, &one, sizeof one);  /* EAGAIN: the counter is full, trio wakes anyway */
    (void)rc;
}

/* The Python object of a queued item (a new reference), or NULL with an exception. */
typedef PyObject *(*item_to_python)(const struct queue_link *p, void *ctx);

/* Up to `limit` queued items, made into a list by `convert` (outside the queue's lock) and freed. */
static PyObject *
thread_take(struct relay_thread *w, Py_ssize_t limit, item_to_python convert, void *ctx)
{
    uint64_t ignored;
    ssize_t rc = read(w->wake_fd, &ignored, sizeof ignored);  /* re-armed below if anything is left */
    (void)rc;
    pthread_mutex_lock(&w->qlock);
    struct queue_link *first = w->head, *last = NULL, *p = first;
    Py_ssize_t taken = 0;
    while (p != NULL && taken < limit) {
        w->bytes -= p->size;
        if (w->pending != NULL) {
            w->pending[p->owner]--;
        }
        last = p;
        p = p->next;
        taken++;
    }
    w->head = p;
    if (p == NULL) {
        w->tail = NULL;
    }
    w->count -= (size_t)taken;
    if (last != NULL) {
        last->next = NULL;
    }
    int more = w->head != NULL;
    pthread_mutex_unlock(&w->qlock);
    if (more) {
        thread_wake(w);
    }
    PyObject *out = PyList_New(0);
    int ok = out != NULL;
    for (p = taken ? first : NULL; p != NULL;) {
        ok = ok && append_new(out, convert(p, ctx)) == 0;
        struct queue_link *next = p->next;
        PyMem_RawFree(p);
        p = next;
    }
    if (!ok) {
        Py_XDECREF(out);
        return NULL;
    }
    return out;
}

static void
thread_stop(struct relay_thread *w)
{
    if (!w->running) {
        return;
    }
    uint64_t one = 1;
    ssize_t rc = write(w->stop_fd, &one, sizeof one);
    (void)rc;
    pthread_join(w->thread, NULL);  /* the thread never takes the GIL: joining with it held cannot deadlock */
    w->running = 0;
}

/* A worker of `size` bytes (a struct that starts with its relay_thread) for the table `table_obj`, zeroed but
 * for the relay_thread, in a capsule whose destructor is `destroy`; NULL with an exception. */
static struct relay_thread *
thread_new(size_t size, PyObject *table_obj, struct relay_table *t, const char *name, PyCapsule_Destructor destroy,
           PyObject **capsule)
{
    struct relay_thread *w = PyMem_RawCalloc(1, size);
    if (w == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    w->wake_fd = w->stop_fd = -1;
    pthread_mutex_init(&w->qlock, NULL);
    w->table_obj = Py_NewRef(table_obj);
    w->t = t;
    *capsule = PyCapsule_New(w, name, destroy);
    if (*capsule == NULL) {
        Py_DECREF(w->table_obj);
        pthread_mutex_destroy(&w->qlock);
        PyMem_RawFree(w);
        return NULL;
    }
    w->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    w->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->wake_fd < 0 || w->stop_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_CLEAR(*capsule);
        return NULL;
    }
    return w;
}

/* Starts the thread of the worker in `capsule`: the capsule, or NULL with an exception (the capsule released). */
static PyObject *
thread_run(struct relay_thread *w, void *(*main)(void *), PyObject *capsule)
{
    /* Signals stay with the main thread (Python handles them there; trio wakes on them). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int err = pthread_create(&w->thread, NULL, main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(capsule);
        return NULL;
    }
    w->running = 1;
    return capsule;
}

/* Stops the thread and frees what the relay_thread holds: the queue, the eventfds (the stop one first taken out of
 * the epoll set `epfd` it was added to, if any), the table's reference. */
static void
thread_end(struct relay_thread *w, int epfd)
{
    thread_stop(w);
    if (w->stop_fd >= 0 && epfd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, w->stop_fd, NULL);
    }
    for (struct queue_link *p = w->head, *next; p != NULL; p = next) {
        next = p->next;
        PyMem_RawFree(p);
    }
    if (w->wake_fd >= 0) {
        close(w->wake_fd);
    }
    if (w->stop_fd >= 0) {
        close(w->stop_fd);
    }
    pthread_mutex_destroy(&w->qlock);
    PyMem_RawFree(w->pending);
    Py_XDECREF(w->table_obj);
}

/* The Python calls both workers answer alike: the eventfd, the drops since the last call, stop. */
static PyObject *
thread_fd_call(PyObject *const *args, Py_ssize_t nargs, const char *name, const char *usage)
{
    struct relay_thread *w = capsule_arg(args, nargs, 1, 1, name, usage);
    return w != NULL ? PyLong_FromLong(w->wake_fd) : NULL;
}

static PyObject *
thread_drops_call(PyObject *const *args, Py_ssize_t nargs, const char *name, const char *usage)
{
    struct relay_thread *w = capsule_arg(args, nargs, 1, 1, name, usage);
    if (w == NULL) {
        return NULL;
    }
    pthread_mutex_lock(&w->qlock);
    unsigned long long drops = w->drops;
    w->drops = 0;
    pthread_mutex_unlock(&w->qlock);
    return PyLong_FromUnsignedLongLong(drops);
}

static PyObject *
thread_stop_call(PyObject *const *args, Py_ssize_t nargs, const char *name, const char *usage)
{
    struct relay_thread *w = capsule_arg(args, nargs, 1, 1, name, usage);
    if (w == NULL) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    thread_stop(w);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

struct relay_pending {
    struct queue_link link;  /* link.size: the datagram's length */
    struct sockaddr_storage name;
    socklen_t namelen;
    struct local_source local;
    unsigned char data[];
};

struct relay_worker {
    struct relay_thread th;
    int fd;
    unsigned char *buffers;
    struct relay_rx rx;
};

/* Copies the batch's datagrams for Python into the queue (or drops them: full); 1 when any was queued. */
static int
worker_queue(struct relay_worker *w, int n, const char *rest)
{
    struct relay_rx *rx = &w->rx;
    int added = 0;
    for (int k = 0; k < n; k++) {
        if (!rest[k]) {
            continue;
        }
        size_t len = rx->msgs[k].msg_len;
        struct relay_pending *p = thread_room(&w->th, len, 0) ? PyMem_RawMalloc(sizeof *p + len) : NULL;
        if (p != NULL) {
            p->link.size = len;
            p->link.owner = 0;
            memcpy(&p->name, &rx->names[k], sizeof p->name);
            p->namelen = rx->msgs[k].msg_hdr.msg_namelen;
            p->local = rx->local[k];
            memcpy(p->data, rx->iov[k].iov_base, len);
        }
        if (thread_push(&w->th, p != NULL ? &p->link : NULL)) {
            added = 1;
        }
    }
    return added;
}

static void
worker_drain(struct relay_worker *w)
{
    struct relay_table *t = w->th.t;
    char rest[RELAY_BATCH];
    int wake = 0;
    for (int round = 0; round < RELAY_WORKER_ROUNDS; round++) {
        int n = relay_receive(w->fd, &w->rx, w->buffers, RELAY_BATCH);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EBADF || errno == ENOTSOCK || errno == EINVAL
                || errno == EFAULT) {
                break;
            }
            continue;  /* an ICMP error reported on the socket (a node gone): read on */
        }
        pthread_mutex_lock(&t->lock);
        int left = n > 0 ? relay_batch(t, w->fd, &w->rx, n, rest) : 0;
        pthread_mutex_unlock(&t->lock);
        if (left > 0 && worker_queue(w, n, rest)) {
            wake = 1;
        }
        if (n < RELAY_BATCH) {
            break;
        }
    }
    if (wake) {
        thread_wake(&w->th);
    }
}

static void *
worker_main(void *arg)
{
    struct relay_worker *w = arg;
    struct pollfd fds[2] = {{.fd = w->fd, .events = POLLIN}, {.fd = w->th.stop_fd, .events = POLLIN}};
    for (;;) {
        int rc = poll(fds, 2, -1);
        if (rc < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;
        }
        if (fds[1].revents || (fds[0].revents & POLLNVAL)) {
            break;
        }
        if (fds[0].revents) {
            worker_drain(w);
        }
    }
    return NULL;
}

static void
relay_worker_free(PyObject *capsule)
{
    struct relay_worker *w = PyCapsule_GetPointer(capsule, RELAY_WORKER_CAPSULE);
    if (w == NULL) {
        return;
    }
    thread_end(&w->th, -1);
    PyMem_RawFree(w->buffers);
    PyMem_RawFree(w);
}

static PyObject *
relay_worker_start(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    struct relay_table *t = table_and_fd(args, nargs, "relay_worker_start(table, fd)", &fd);
    if (t == NULL) {
        return NULL;
    }
    PyObject *capsule;
    struct relay_worker *w = (struct relay_worker *)thread_new(sizeof *w, args[0], t, RELAY_WORKER_CAPSULE,
                                                               relay_worker_free, &capsule);
    if (w == NULL) {
        return NULL;
    }
    w->fd = fd;
    w->buffers = PyMem_RawMalloc((size_t)RELAY_BATCH * RELAY_BUFFER);
    if (w->buffers == NULL) {
        Py_DECREF(capsule);
        return PyErr_NoMemory();
    }
    return thread_run(&w->th, worker_main, capsule);
}

static PyObject *
relay_worker_fd(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return thread_fd_call(args, nargs, RELAY_WORKER_CAPSULE, "relay_worker_fd(worker)");
}

/* A datagram for Python as relay_forward returns it: (bytes, (host, port)); its local address remembered. */
static PyObject *
pending_to_python(const struct queue_link *link, void *sources)
{
    const struct relay_pending *p = (const struct relay_pending *)link;
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)p->data, (Py_ssize_t)p->link.size);
    PyObject *addr = bytes != NULL ? source_tuple(&p->name, p->namelen) : NULL;
    PyObject *item = NULL;
    if (addr != NULL && (p->local.len == 0 || sources == NULL || remember_source(sources, addr, &p->local) == 0)) {
        item = PyTuple_Pack(2, bytes, addr);
    }
    Py_XDECREF(bytes);
    Py_XDECREF(addr);
    return item;
}

static PyObject *
relay_worker_take(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct relay_worker *w = capsule_arg(args, nargs, 2, 3, RELAY_WORKER_CAPSULE,
                                         "relay_worker_take(worker, limit[, sources])");
    if (w == NULL) {
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    PyObject *sources;
    if ((limit == -1 && PyErr_Occurred()) || optional_dict(args, nargs, 2, &sources) < 0) {
        return NULL;
    }
    return thread_take(&w->th, limit, pending_to_python, sources);
}

static PyObject *
relay_worker_drops(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return thread_drops_call(args, nargs, RELAY_WORKER_CAPSULE, "relay_worker_drops(worker)");
}

static PyObject *
relay_worker_stop(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return thread_stop_call(args, nargs, RELAY_WORKER_CAPSULE, "relay_worker_stop(worker)");
}

/* ---- The TCP relay's connections in C (issue 16: the TCP relay's round trip) ----
 * A TCP relay connection used to cross a trio task and RelayCore in Python per frame, each way (~150 us a leg on
 * this machine). Now each connection the server accepts gets a slot here (relay_tcp_add) and every byte written
 * to it goes through that slot: frames from Python (HELLO_OK, notices, RECVs RelayCore made) and RECVs the
 * forwarding threads make for sessions bound to it (relay_set_tcp), written at once when nothing waits, else
 * kept in a bounded outbound buffer (RELAY_TCP_OUT_MAX; whole frames beyond it are dropped and counted) that
 * the TCP worker thread writes when the socket has room. Once RelayCore has granted the connection a session,
 * Python stops reading it and hands it over (relay_tcp_read, with the partial frame it holds): the TCP worker
 * reads it (epoll, no GIL), forwards each SEND the table allows exactly as the UDP workers do (same token check,
 * bound to this connection, same per-key and total buckets, same rewrite to RECV) to a UDP session (sendmmsg)
 * or a TCP one (its outbound buffer), and queues every other frame, and the connection's end, for Python
 * (relay_tcp_take), which answers them with RelayCore as before. Python removes the slot (relay_tcp_remove)
 * before it closes the socket; a write that fails shuts the socket down so that its reader sees the end.
 *
 * relay_tcp_start(table, max_conns) -> worker; relay_tcp_fd(worker) -> eventfd readable when items wait
 * relay_tcp_add(table, fd) -> handle (int), or None: no free slot (the connection stays on the Python path)
 * relay_tcp_send(table, handle, frame) -> bool (False: dropped, the outbound buffer is full or the socket broke)
 * relay_tcp_read(table, handle, partial): the worker reads it from now on; `partial`: bytes of an unfinished frame
 * relay_tcp_state(table, handle) -> (seconds since its last read, seconds its outbound bytes made no progress,
 *                                    outbound bytes waiting)
 * relay_tcp_remove(table, handle): forgotten (and its table sessions); before the socket closes
 * relay_set_tcp(table, token8, key32, handle, expires) -> bool: a session whose RECVs go to that connection
 * relay_tcp_take(worker, limit) -> list[(handle, frame bytes, or None for the connection's end)]
 * relay_tcp_counters(table) -> (frames forwarded from TCP connections, frames written (or buffered) to them,
 *                               dropped on a full outbound buffer, frames left for Python, failed writes)
 * relay_tcp_stop(worker): stops and joins the thread; also on the capsule's end
 */
#define RELAY_TCP_CAPSULE "meshwg.relay_tcp_worker"
#define RELAY_TCP_OUT_MAX (512 << 10)
#define RELAY_TCP_FRAME_MAX (2 + 65535)
#define RELAY_TCP_READ (4 * 65536)
#define RELAY_TCP_EVENTS 64
#define RELAY_TCP_STOP UINT64_MAX
/* Frames one connection may have waiting for Python at once (what Python takes per wakeup): the shared queue
 * (RELAY_QUEUE_MAX) stays open to the other connections while one floods frames RelayCore must look at. */
#define RELAY_TCP_PY_PER_CONN 512

struct relay_tcp_item {
    struct queue_link link;  /* link.owner: the connection's slot */
    uint64_t handle;
    Py_ssize_t len;  /* -1: the connection's end */
    unsigned char data[];
};

struct relay_tcp_worker {
    struct relay_thread th;  /* th.pending: per connection slot, its items in the queue */
    unsigned char *rbuf;  /* RELAY_TCP_READ + RELAY_TCP_FRAME_MAX: a partial frame, then what one read brings */
};

static uint64_t
conn_handle(const struct relay_table *t, int32_t slot)
{
    return ((uint64_t)t->conns[slot].gen << 32) | (uint32_t)slot;
}

/* The connection of `handle`, or NULL when it is not (any more) one. Table locked. */
static struct relay_conn *
conn_of(struct relay_table *t, uint64_t handle, int32_t *slot)
{
    uint32_t n = (uint32_t)handle;
    if (t->conns == NULL || n >= (uint32_t)t->max_conns) {
        return NULL;
    }
    struct relay_conn *c = &t->conns[n];
    if (!c->used || c->gen != (uint32_t)(handle >> 32)) {
        return NULL;
    }
    if (slot != NULL) {
        *slot = (int32_t)n;
    }
    return c;
}

/* The epoll interest the connection needs now: its reads (handed over, not ended), room for its outbound bytes. */
static void
conn_arm(struct relay_table *t, int32_t slot)
{
    struct relay_conn *c = &t->conns[slot];
    uint32_t want = (c->reading && !c->ended ? EPOLLIN : 0) | (c->out_len && !c->dead ? EPOLLOUT : 0);
    if (want == c->events) {
        return;
    }
    struct epoll_event ev = {.events = want, .data.u64 = conn_handle(t, slot)};
    int op = want == 0 ? EPOLL_CTL_DEL : c->events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    if (epoll_ctl(t->epfd, op, c->fd, &ev) == 0 || op == EPOLL_CTL_DEL) {
        c->events = want;
    }
}

/* Nothing more is written to it: a failed write. Shut down so that whoever reads it sees the end. */
static void
conn_break(struct relay_table *t, int32_t slot)
{
    struct relay_conn *c = &t->conns[slot];
    c->dead = 1;
    c->out_len = 0;
    shutdown(c->fd, SHUT_RDWR);
    conn_arm(t, slot);
}

static int
conn_append(struct relay_conn *c, const unsigned char *data, size_t len)
{
    if (c->out_len + len > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 16384;
        while (cap < c->out_len + len) {
            cap *= 2;
        }
        unsigned char *grown = realloc(c->out, cap);
        if (grown == NULL) {
            return 0;
        }
        c->out = grown;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
    return 1;
}

/* Whole TCP frames (iov[k]: a length prefix and its frame) to the connection, in order: written at once when
 * nothing waits before them, the rest buffered (a partly written frame's tail always: the stream must stay
 * whole; a whole frame only within RELAY_TCP_OUT_MAX). Returns the frames dropped. Table locked. */
static int
conn_send(struct relay_table *t, int32_t slot, struct iovec *iov, int n)
{
    struct relay_conn *c = &t->conns[slot];
    int k = 0, dropped = 0;
    size_t was = c->out_len;
    if (c->dead) {
        t->tcp_send_errors += (unsigned long long)n;
        return n;
    }
    if (c->out_len == 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t w;
        do {
            w = sendmsg(c->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (w < 0 && errno == EINTR);
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            t->tcp_send_errors += (unsigned long long)n;
            conn_break(t, slot);
            return n;
        }
        size_t sent = w < 0 ? 0 : (size_t)w;
        while (k < n && sent >= iov[k].iov_len) {
            sent -= iov[k].iov_len;
            k++;
        }
        if (k < n && sent > 0) {
            if (!conn_append(c, (unsigned char *)iov[k].iov_base + sent, iov[k].iov_len - sent)) {
                t->tcp_send_errors++;
                conn_break(t, slot);  /* the stream cannot stay whole */
                return n - k;
            }
            k++;
        }
    }
    for (; k < n; k++) {
        if (c->out_len + iov[k].iov_len > RELAY_TCP_OUT_MAX || !conn_append(c, iov[k].iov_base, iov[k].iov_len)) {
            dropped++;
        }
    }
    if (was == 0 && c->out_len > 0) {
        c->stalled_since = monotonic_now();
        conn_arm(t, slot);
    }
    return dropped;
}

/* Writes what waits in its outbound buffer (the socket has room). Table locked. */
static void
conn_flush(struct relay_table *t, int32_t slot)
{
    struct relay_conn *c = &t->conns[slot];
    if (c->dead || c->out_len == 0) {
        conn_arm(t, slot);
        return;
    }
    ssize_t w;
    do {
        w = send(c->fd, c->out, c->out_len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (w < 0 && errno == EINTR);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            t->tcp_send_errors++;
            conn_break(t, slot);
        }
        return;
    }
    memmove(c->out, c->out + w, c->out_len - (size_t)w);
    c->out_len -= (size_t)w;
    c->stalled_since = monotonic_now();
    if (c->out_len == 0) {
        if (c->out_cap > 65536) {  /* a burst's buffer is not kept by an idle connection */
            free(c->out);
            c->out = NULL;
            c->out_cap = 0;
        }
        conn_arm(t, slot);
    }
}

/* The RECVs queued for TCP sessions: one sendmsg per destination connection, frames in order; marked done. */
static void
flush_tcp(struct relay_table *t, struct relay_out *q, int count, char *done)
{
    struct iovec iov[RELAY_BATCH];
    for (int i = 0; i < count; i++) {
        if (done[i] || q[i].dest->conn < 0) {
            continue;
        }
        int32_t slot = q[i].dest->conn, n = 0;
        for (int j = i; j < count; j++) {
            if (done[j] || q[j].dest != q[i].dest) {
                continue;
            }
            unsigned char *framed = q[j].data - 2;  /* the RECV starts 8 bytes into its SEND: room for the prefix */
            framed[0] = (unsigned char)(q[j].len >> 8);
            framed[1] = (unsigned char)q[j].len;
            iov[n].iov_base = framed;
            iov[n].iov_len = q[j].len + 2;
            n++;
            done[j] = 1;
        }
        int dropped = conn_send(t, slot, iov, n);
        t->tcp_out += (unsigned long long)(n - dropped);
        t->tcp_out_drops += (unsigned long long)dropped;
    }
}

/* A frame or a connection's end (data NULL) for Python; 0 when the queue is full (dropped, counted). */
static int
tcp_queue(struct relay_tcp_worker *w, uint64_t handle, const unsigned char *data, Py_ssize_t len)
{
    size_t size = data != NULL ? (size_t)len : 0;
    uint32_t slot = (uint32_t)handle;  /* < max_conns: handles are conn_handle's */
    int room = data == NULL || thread_room(&w->th, size, slot);
    struct relay_tcp_item *p = room ? PyMem_RawMalloc(sizeof *p + size) : NULL;
    if (p != NULL) {
        p->link.size = size;
        p->link.owner = slot;
        p->handle = handle;
        p->len = data != NULL ? len : -1;
        if (size) {
            memcpy(p->data, data, size);
        }
    }
    return thread_push(&w->th, p != NULL ? &p->link : NULL);
}

/* The complete frames of buf[0:len) from connection `slot`: SENDs the table allows forwarded, the rest queued
 * for Python. Returns the bytes used (the rest is the start of a frame). Table locked. */
static size_t
tcp_frames(struct relay_tcp_worker *w, int32_t slot, unsigned char *buf, size_t len, double now, int *queued_python)
{
    struct relay_table *t = w->th.t;
    struct relay_out q[RELAY_BATCH];
    int queued = 0;
    size_t off = 0;
    uint64_t handle = conn_handle(t, slot);
    while (len - off >= 2) {
        size_t n = ((size_t)buf[off] << 8) | buf[off + 1];
        if (len - off < 2 + n) {
            break;
        }
        unsigned char *frame = buf + off + 2;
        off += 2 + n;
        int32_t from, to;
        if (fast_pair(t, -1, slot, frame, (ssize_t)n, NULL, 0, now, &from, &to)) {
            relay_pass(t, from, to, frame, (ssize_t)n, now, q, &queued);
            t->tcp_in++;
            if (queued == RELAY_BATCH) {
                relay_flush(t, q, queued);
                queued = 0;
            }
            continue;
        }
        t->tcp_python++;
        if (tcp_queue(w, handle, frame, (Py_ssize_t)n)) {
            *queued_python = 1;
        }
    }
    relay_flush(t, q, queued);
    return off;
}

/* One read of a handed-over connection and its complete frames; its end queued for Python. Table locked. */
static void
conn_read(struct relay_tcp_worker *w, int32_t slot, int *wake)
{
    struct relay_table *t = w->th.t;
    struct relay_conn *c = &t->conns[slot];
    size_t have = c->partial_len;
    if (have) {
        memcpy(w->rbuf, c->partial, have);
    }
    ssize_t n;
    do {
        n = recv(c->fd, w->rbuf + have, RELAY_TCP_READ, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return;
    }
    if (n <= 0) {
        c->ended = 1;
        conn_arm(t, slot);
        tcp_queue(w, conn_handle(t, slot), NULL, 0);
        *wake = 1;
        return;
    }
    double now = monotonic_now();
    c->last_read = now;
    size_t total = have + (size_t)n;
    size_t used = tcp_frames(w, slot, w->rbuf, total, now, wake);
    size_t rest = total - used;  /* < RELAY_TCP_FRAME_MAX */
    if (rest != c->partial_len) {
        free(c->partial);
        c->partial = rest ? malloc(rest) : NULL;
        if (rest && c->partial == NULL) {
            c->partial_len = 0;
            t->tcp_send_errors++;
            conn_break(t, slot);  /* the stream cannot be followed any more */
            return;
        }
    }
    if (rest) {
        memcpy(c->partial, w->rbuf + used, rest);
    }
    c->partial_len = rest;
}

static void *
tcp_worker_main(void *arg)
{
    struct relay_tcp_worker *w = arg;
    struct relay_table *t = w->th.t;
    struct epoll_event evs[RELAY_TCP_EVENTS];
    for (;;) {
        int n = epoll_wait(t->epfd, evs, RELAY_TCP_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;
        }
        int stop = 0, wake = 0;
        pthread_mutex_lock(&t->lock);
        for (int i = 0; i < n; i++) {
            int32_t slot;
            if (evs[i].data.u64 == RELAY_TCP_STOP) {
                stop = 1;
                continue;
            }
            struct relay_conn *c = conn_of(t, evs[i].data.u64, &slot);
            if (c == NULL) {
                continue;  /* removed since epoll_wait returned */
            }
            if (evs[i].events & EPOLLOUT) {
                conn_flush(t, slot);
            }
            if ((evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && c->reading && !c->ended) {
                conn_read(w, slot, &wake);
            } else if ((evs[i].events & (EPOLLHUP | EPOLLERR)) && !(c->reading && !c->ended)) {
                c->dead = 1;  /* a connection Python reads: its reader sees the end; nothing more to write */
                c->out_len = 0;
                conn_arm(t, slot);
            }
        }
        pthread_mutex_unlock(&t->lock);
        if (wake) {
            thread_wake(&w->th);
        }
        if (stop) {
            break;
        }
    }
    return NULL;
}

static void
relay_tcp_worker_free(PyObject *capsule)
{
    struct relay_tcp_worker *w = PyCapsule_GetPointer(capsule, RELAY_TCP_CAPSULE);
    if (w == NULL) {
        return;
    }
    thread_end(&w->th, w->th.t->epfd);
    PyMem_RawFree(w->rbuf);
    PyMem_RawFree(w);
}

/* The connection slots and the epoll set, made once per table. Table locked. */
static int
conns_init(struct relay_table *t, int32_t max)
{
    if (t->conns != NULL) {
        return 0;
    }
    t->conns = PyMem_RawCalloc((size_t)max, sizeof *t->conns);
    t->conn_free = PyMem_RawMalloc((size_t)max * sizeof(int32_t));
    t->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (t->conns == NULL || t->conn_free == NULL || t->epfd < 0) {
        int err = t->epfd < 0 ? errno : ENOMEM;
        conns_free(t);
        t->conns = NULL;
        t->conn_free = NULL;
        t->epfd = -1;
        errno = err;
        return -1;
    }
    t->max_conns = max;
    for (int32_t i = 0; i < max; i++) {
        t->conn_free[i] = max - 1 - i;
    }
    t->n_conn_free = max;
    return 0;
}

static PyObject *
relay_tcp_start(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct relay_table *t = nargs == 2 ? as_table(args[0]) : NULL;
    long max = t != NULL ? PyLong_AsLong(args[1]) : -1;
    if (t == NULL || max < 1 || max > (1 << 24)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "relay_tcp_start(table, max_conns: 1 .. 2**24)");
        }
        return NULL;
    }
    table_lock(t);
    int rc = t->conns != NULL ? -2 : conns_init(t, (int32_t)max);
    table_unlock(t);
    if (rc == -2) {
        PyErr_SetString(PyExc_ValueError, "relay_tcp_start: this table has its TCP worker");
        return NULL;
    }
    if (rc < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *capsule;
    struct relay_tcp_worker *w = (struct relay_tcp_worker *)thread_new(sizeof *w, args[0], t, RELAY_TCP_CAPSULE,
                                                                       relay_tcp_worker_free, &capsule);
    if (w == NULL) {
        return NULL;
    }
    w->rbuf = PyMem_RawMalloc(RELAY_TCP_READ + RELAY_TCP_FRAME_MAX);
    w->th.pending = PyMem_RawCalloc((size_t)max, sizeof *w->th.pending);
    w->th.pending_max = RELAY_TCP_PY_PER_CONN;
    if (w->rbuf == NULL || w->th.pending == NULL) {
        Py_DECREF(capsule);
        return PyErr_NoMemory();
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = RELAY_TCP_STOP};
    if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, w->th.stop_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(capsule);
        return NULL;
    }
    return thread_run(&w->th, tcp_worker_main, capsule);
}

/* The table and the connection handle of args[0], args[1] (of `want` arguments); NULL with an exception when not. */
static struct relay_table *
table_and_handle(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *usage, uint64_t *handle)
{
    struct relay_table *t = capsule_arg(args, nargs, want, want, RELAY_CAPSULE, usage);
    if (t == NULL) {
        return NULL;
    }
    *handle = PyLong_AsUnsignedLongLong(args[1]);
    if (*handle == (uint64_t)-1 && PyErr_Occurred()) {
        return NULL;
    }
    return t;
}

static PyObject *
relay_tcp_add(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    struct relay_table *t = table_and_fd(args, nargs, "relay_tcp_add(table, fd)", &fd);
    if (t == NULL) {
        return NULL;
    }
    table_lock(t);
    if (t->conns == NULL || t->n_conn_free == 0) {
        table_unlock(t);
        Py_RETURN_NONE;
    }
    int32_t slot = t->conn_free[--t->n_conn_free];
    struct relay_conn *c = &t->conns[slot];
    uint32_t gen = c->gen + 1;
    memset(c, 0, sizeof *c);
    c->used = 1;
    c->fd = fd;
    c->gen = gen;
    c->last_read = monotonic_now();
    uint64_t handle = conn_handle(t, slot);
    table_unlock(t);
    return PyLong_FromUnsignedLongLong(handle);
}

static PyObject *
relay_tcp_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t handle;
    struct relay_table *t = table_and_handle(args, nargs, 3, "relay_tcp_send(table, handle, frame)", &handle);
    if (t == NULL) {
        return NULL;
    }
    if (!PyBytes_Check(args[2]) || PyBytes_GET_SIZE(args[2]) > 65535) {
        PyErr_SetString(PyExc_ValueError, "frame must be bytes of at most 65535");
        return NULL;
    }
    Py_ssize_t len = PyBytes_GET_SIZE(args[2]);
    unsigned char prefix[2] = {(unsigned char)(len >> 8), (unsigned char)len};
    unsigned char *framed = PyMem_Malloc((size_t)len + 2);
    if (framed == NULL) {
        return PyErr_NoMemory();
    }
    memcpy(framed, prefix, 2);
    memcpy(framed + 2, PyBytes_AS_STRING(args[2]), (size_t)len);
    struct iovec iov = {.iov_base = framed, .iov_len = (size_t)len + 2};
    table_lock(t);
    int32_t slot;
    int ok = conn_of(t, handle, &slot) != NULL && conn_send(t, slot, &iov, 1) == 0;
    table_unlock(t);
    PyMem_Free(framed);
    return PyBool_FromLong(ok);
}

static PyObject *
relay_tcp_read(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t handle;
    struct relay_table *t = table_and_handle(args, nargs, 3, "relay_tcp_read(table, handle, partial)", &handle);
    if (t == NULL) {
        return NULL;
    }
    if (!PyBytes_Check(args[2]) || PyBytes_GET_SIZE(args[2]) >= RELAY_TCP_FRAME_MAX) {
        PyErr_SetString(PyExc_ValueError, "partial must be the bytes of one unfinished frame");
        return NULL;
    }
    size_t len = (size_t)PyBytes_GET_SIZE(args[2]);
    unsigned char *partial = len ? malloc(len) : NULL;
    if (len && partial == NULL) {
        return PyErr_NoMemory();
    }
    if (len) {
        memcpy(partial, PyBytes_AS_STRING(args[2]), len);
    }
    table_lock(t);
    int32_t slot;
    struct relay_conn *c = conn_of(t, handle, &slot);
    if (c != NULL && !c->reading) {
        free(c->partial);
        c->partial = partial;
        c->partial_len = len;
        partial = NULL;
        c->reading = 1;
        c->last_read = monotonic_now();
        conn_arm(t, slot);
    }
    table_unlock(t);
    free(partial);
    if (c == NULL) {
        PyErr_SetString(PyExc_KeyError, "relay_tcp_read: no such connection");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
relay_tcp_state(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t handle;
    struct relay_table *t = table_and_handle(args, nargs, 2, "relay_tcp_state(table, handle)", &handle);
    if (t == NULL) {
        return NULL;
    }
    table_lock(t);
    struct relay_conn *c = conn_of(t, handle, NULL);
    double now = monotonic_now(), idle = 0.0, stalled = 0.0;
    size_t out = 0;
    if (c != NULL) {
        idle = now - c->last_read;
        stalled = c->out_len ? now - c->stalled_since : 0.0;
        out = c->out_len;
    }
    table_unlock(t);
    if (c == NULL) {
        PyErr_SetString(PyExc_KeyError, "relay_tcp_state: no such connection");
        return NULL;
    }
    return Py_BuildValue("(ddn)", idle, stalled, (Py_ssize_t)out);
}

static PyObject *
relay_tcp_remove(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t handle;
    struct relay_table *t = table_and_handle(args, nargs, 2, "relay_tcp_remove(table, handle)", &handle);
    if (t == NULL) {
        return NULL;
    }
    table_lock(t);
    int32_t slot;
    struct relay_conn *c = conn_of(t, handle, &slot);
    if (c != NULL) {
        for (Py_ssize_t n = 0; c->sessions > 0 && n < t->max_sessions; n++) {
            if (t->sessions[n].used && t->sessions[n].conn == slot) {
                session_remove(t, (int32_t)n);  /* RelayCore removes them first; never left pointing here */
            }
        }
        if (c->events) {
            epoll_ctl(t->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        }
        conn_release(c);
        c->used = 0;
        c->events = 0;
        t->conn_free[t->n_conn_free++] = slot;
    }
    table_unlock(t);
    return PyBool_FromLong(c != NULL);
}

static PyObject *
relay_set_tcp(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *token, *key;
    struct relay_table *t = session_args(args, nargs, 5, "relay_set_tcp(table, token, key, handle, expires)", &token,
                                         &key);
    if (t == NULL) {
        return NULL;
    }
    uint64_t handle = PyLong_AsUnsignedLongLong(args[3]);
    double expires = PyErr_Occurred() ? -1.0 : PyFloat_AsDouble(args[4]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    table_lock(t);
    int32_t slot = -1;
    struct relay_conn *c = conn_of(t, handle, &slot);
    struct relay_session *s = session_add(t, token, key, c != NULL, expires);
    if (s != NULL) {
        s->fd = c->fd;
        s->conn = slot;
        c->sessions++;
    }
    table_unlock(t);
    return PyBool_FromLong(s != NULL);
}

static PyObject *
relay_tcp_fd(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return thread_fd_call(args, nargs, RELAY_TCP_CAPSULE, "relay_tcp_fd(worker)");
}

/* A frame for Python, or its connection's end: (handle, bytes or None). */
static PyObject *
tcp_item_to_python(const struct queue_link *link, void *ctx)
{
    const struct relay_tcp_item *p = (const struct relay_tcp_item *)link;
    PyObject *frame = p->len >= 0 ? PyBytes_FromStringAndSize((const char *)p->data, p->len) : Py_NewRef(Py_None);
    PyObject *h = frame != NULL ? PyLong_FromUnsignedLongLong(p->handle) : NULL;
    PyObject *item = h != NULL ? PyTuple_Pack(2, h, frame) : NULL;
    Py_XDECREF(frame);
    Py_XDECREF(h);
    return item;
}

static PyObject *
relay_tcp_take(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct relay_tcp_worker *w = capsule_arg(args, nargs, 2, 2, RELAY_TCP_CAPSULE, "relay_tcp_take(worker, limit)");
    Py_ssize_t limit = w != NULL ? PyLong_AsSsize_t(args[1]) : -1;
    if (w == NULL || limit < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "relay_tcp_take(worker, limit)");
        }
        return NULL;
    }
    return thread_take(&w->th, limit, tcp_item_to_python, NULL);
}

static PyObject *
relay_tcp_counters(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    static const size_t fields[] = {TABLE_COUNTER(tcp_in), TABLE_COUNTER(tcp_out), TABLE_COUNTER(tcp_out_drops),
                                    TABLE_COUNTER(tcp_python), TABLE_COUNTER(tcp_send_errors)};
    return take_counters(args, nargs, "relay_tcp_counters(table)", fields, 5);
}

static PyObject *
relay_tcp_drops(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return thread_drops_call(args, nargs, RELAY_TCP_CAPSULE, "relay_tcp_drops(worker)");
}

static PyObject *
relay_tcp_stop(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return thread_stop_call(args, nargs, RELAY_TCP_CAPSULE, "relay_tcp_stop(worker)");
}

static PyMethodDef fastio_methods[] = {
    {"read_packets", (PyCFunction)(void (*)(void))read_packets, METH_FASTCALL,
     "read_packets(fd, limit) -> list[bytes]"},
    {"write_packets", (PyCFunction)(void (*)(void))write_packets, METH_FASTCALL,
     "write_packets(fd, packets) -> number dropped"},
    {"recv_datagrams", (PyCFunction)(void (*)(void))recv_datagrams, METH_FASTCALL,
     "recv_datagrams(fd, limit[, sources[, route]]) -> list[(bytes, (host, port) or endpoint)]"},
    {"send_datagrams", (PyCFunction)(void (*)(void))send_datagrams, METH_FASTCALL,
     "send_datagrams(datagrams, start, v4_fd, v6_fd, v4_gso, v6_gso[, sources[, route, now]]) -> (index, status, "
     "errors)"},
    {"node_relay_new", (PyCFunction)(void (*)(void))node_relay_new, METH_FASTCALL,
     "node_relay_new(endpoint_type, headers, endpoints, tx_counts) -> route"},
    {"node_relay_set", (PyCFunction)(void (*)(void))node_relay_set, METH_FASTCALL,
     "node_relay_set(route, addr, until) -> bool"},
    {"node_relay_counters", (PyCFunction)(void (*)(void))node_relay_counters, METH_FASTCALL,
     "node_relay_counters(route) -> (sent, received, send_errors, gso_refused)"},
    {"node_relay_split_tcp", (PyCFunction)(void (*)(void))node_relay_split_tcp, METH_FASTCALL,
     "node_relay_split_tcp(route, buffer) -> (datagrams, frames, consumed)"},
    {"node_relay_send_tcp", (PyCFunction)(void (*)(void))node_relay_send_tcp, METH_FASTCALL,
     "node_relay_send_tcp(route, datagrams, start, stop, fd, headers) -> (next, rest)"},
    {"relay_new", (PyCFunction)(void (*)(void))relay_new, METH_FASTCALL, "relay_new(max_sessions) -> table"},
    {"relay_set", (PyCFunction)(void (*)(void))relay_set, METH_FASTCALL,
     "relay_set(table, token, key, fd, addr, expires, source) -> bool"},
    {"relay_remove", (PyCFunction)(void (*)(void))relay_remove, METH_FASTCALL, "relay_remove(table, key) -> bool"},
    {"relay_limits", (PyCFunction)(void (*)(void))relay_limits, METH_FASTCALL,
     "relay_limits(table, node_pps, node_pkt_burst, node_bytes_s, node_byte_burst, total_bytes_s, total_burst)"},
    {"relay_charge", (PyCFunction)(void (*)(void))relay_charge, METH_FASTCALL,
     "relay_charge(table, key, size) -> bool (within the key's per-node budget)"},
    {"relay_charge_total", (PyCFunction)(void (*)(void))relay_charge_total, METH_FASTCALL,
     "relay_charge_total(table, size) -> bool (within the total budget)"},
    {"relay_forward", (PyCFunction)(void (*)(void))relay_forward, METH_FASTCALL,
     "relay_forward(table, fd, limit[, sources]) -> list[(bytes, (host, port))] for Python"},
    {"relay_send_batch", (PyCFunction)(void (*)(void))relay_send_batch, METH_FASTCALL,
     "relay_send_batch(table, fd, items[, sources]) -> items left for Python"},
    {"relay_worker_start", (PyCFunction)(void (*)(void))relay_worker_start, METH_FASTCALL,
     "relay_worker_start(table, fd) -> worker (a thread forwarding fd's datagrams)"},
    {"relay_worker_fd", (PyCFunction)(void (*)(void))relay_worker_fd, METH_FASTCALL,
     "relay_worker_fd(worker) -> eventfd readable when datagrams wait for Python"},
    {"relay_worker_take", (PyCFunction)(void (*)(void))relay_worker_take, METH_FASTCALL,
     "relay_worker_take(worker, limit[, sources]) -> list[(bytes, (host, port))] for Python"},
    {"relay_worker_drops", (PyCFunction)(void (*)(void))relay_worker_drops, METH_FASTCALL,
     "relay_worker_drops(worker) -> datagrams dropped on a full queue since the last call"},
    {"relay_worker_stop", (PyCFunction)(void (*)(void))relay_worker_stop, METH_FASTCALL,
     "relay_worker_stop(worker): stops and joins its thread"},
    {"relay_take_counters", (PyCFunction)(void (*)(void))relay_take_counters, METH_FASTCALL,
     "relay_take_counters(table) -> (forwarded_packets, forwarded_bytes, drop_node_limit, drop_total_limit, "
     "send_errors, send_would_block)"},
    {"relay_tcp_start", (PyCFunction)(void (*)(void))relay_tcp_start, METH_FASTCALL,
     "relay_tcp_start(table, max_conns) -> worker (a thread reading and writing the TCP relay's connections)"},
    {"relay_tcp_fd", (PyCFunction)(void (*)(void))relay_tcp_fd, METH_FASTCALL,
     "relay_tcp_fd(worker) -> eventfd readable when frames wait for Python"},
    {"relay_tcp_take", (PyCFunction)(void (*)(void))relay_tcp_take, METH_FASTCALL,
     "relay_tcp_take(worker, limit) -> list[(handle, frame or None)] for Python"},
    {"relay_tcp_drops", (PyCFunction)(void (*)(void))relay_tcp_drops, METH_FASTCALL,
     "relay_tcp_drops(worker) -> frames dropped on a full queue since the last call"},
    {"relay_tcp_stop", (PyCFunction)(void (*)(void))relay_tcp_stop, METH_FASTCALL,
     "relay_tcp_stop(worker): stops and joins its thread"},
    {"relay_tcp_add", (PyCFunction)(void (*)(void))relay_tcp_add, METH_FASTCALL,
     "relay_tcp_add(table, fd) -> handle or None"},
    {"relay_tcp_send", (PyCFunction)(void (*)(void))relay_tcp_send, METH_FASTCALL,
     "relay_tcp_send(table, handle, frame) -> bool"},
    {"relay_tcp_read", (PyCFunction)(void (*)(void))relay_tcp_read, METH_FASTCALL,
     "relay_tcp_read(table, handle, partial): the TCP worker reads the connection from now on"},
    {"relay_tcp_state", (PyCFunction)(void (*)(void))relay_tcp_state, METH_FASTCALL,
     "relay_tcp_state(table, handle) -> (idle_s, stalled_s, outbound_bytes)"},
    {"relay_tcp_remove", (PyCFunction)(void (*)(void))relay_tcp_remove, METH_FASTCALL,
     "relay_tcp_remove(table, handle) -> bool"},
    {"relay_set_tcp", (PyCFunction)(void (*)(void))relay_set_tcp, METH_FASTCALL,
     "relay_set_tcp(table, token, key, handle, expires) -> bool"},
    {"relay_tcp_counters", (PyCFunction)(void (*)(void))relay_tcp_counters, METH_FASTCALL,
     "relay_tcp_counters(table) -> (from_tcp, to_tcp, out_drops, to_python, send_errors)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastio_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "meshwg.io.dataplane._fastio",
    .m_doc = "Batched non-blocking TUN/UDP I/O for the driver (see the C source for why).",
    .m_size = -1,
    .m_methods = fastio_methods,
};

PyMODINIT_FUNC
PyInit__fastio(void)
{
    PyObject *module = PyModule_Create(&fastio_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "SENT_ALL", SENT_ALL) < 0
        || PyModule_AddIntConstant(module, "MAX_SOURCES", MAX_SOURCES) < 0
        || PyModule_AddIntConstant(module, "WOULD_BLOCK", WOULD_BLOCK) < 0
        || PyModule_AddIntConstant(module, "NEEDS_PYTHON", NEEDS_PYTHON) < 0
        || PyModule_AddIntConstant(module, "GSO_REFUSED", GSO_REFUSED) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
