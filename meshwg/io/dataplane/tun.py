"""Linux TUN shell: open /dev/net/tun (IFF_TUN | IFF_NO_PI), read and write whole IP packets.

The fd is non-blocking; the driver drains it with `read_batch` and only then awaits readability,
so trio is paid once per batch, not once per packet. Closing the fd removes a non-persistent TUN.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from meshwg.io.dataplane.fastio import fastio

TUNSETIFF = 0x400454CA
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
DEFAULT_MTU = 1420
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
# A read larger than any IP packet the kernel can hand us through a TUN with MTU <= 65535.
READ_SIZE = 65535
# EBADFD / EIO after the link is deleted, or the fd closed: the device is gone.
_DEVICE_GONE = (errno.EBADFD, errno.EIO, errno.ENODEV, errno.EBADF)


class TunClosed(Exception):
    """The interface went away under us (e.g. `ip link del`)."""


class Tun:
    """One TUN device. `name` is the kernel's name (templates like "wg%d" are resolved)."""

    def __init__(self, fd: int, name: str):
        self.fd = fd
        self.name = name
        self.write_drops = 0

    @classmethod
    def open(cls, name: str) -> Tun:
        if len(name.encode()) > 15:
            raise ValueError(f"interface name too long: {name!r}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
            got = fcntl.ioctl(fd, TUNSETIFF, ifr)[:16].rstrip(b"\0").decode()
        except BaseException:
            os.close(fd)
            raise
        tun = cls(fd, got)
        try:
            # Like wireguard-go: a fresh interface gets the WireGuard MTU, not the kernel's 1500.
            tun.set_mtu(DEFAULT_MTU)
        except OSError:
            pass
        return tun

    @classmethod
    def from_fd(cls, fd: int, name: str) -> Tun:
        os.set_blocking(fd, False)
        return cls(fd, name)

    def get_mtu(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifr = fcntl.ioctl(s, SIOCGIFMTU, struct.pack("16si20x", self.name.encode(), 0))
        return struct.unpack_from("i", ifr, 16)[0]

    def set_mtu(self, mtu: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCSIFMTU, struct.pack("16si20x", self.name.encode(), mtu))

    def read_batch(self, limit: int) -> list[bytes]:
        """Up to `limit` packets; an empty list means the fd would block."""
        if fastio is not None:
            try:
                return fastio.read_packets(self.fd, limit)
            except EOFError as err:
                raise TunClosed("end of file") from err
            except OSError as err:
                if err.errno in _DEVICE_GONE:
                    raise TunClosed(str(err)) from err
                raise
        out: list[bytes] = []
        read = os.read
        fd = self.fd
        try:
            for _ in range(limit):
                pkt = read(fd, READ_SIZE)
                if not pkt:
                    # A TUN never yields an empty packet; EOF means the other end is gone.
                    if not out:
                        raise TunClosed("end of file")
                    break
                out.append(pkt)
        except BlockingIOError:
            pass
        except OSError as err:
            if err.errno in _DEVICE_GONE:
                if not out:
                    raise TunClosed(str(err)) from err
            else:
                raise
        return out

    def write_batch(self, packets: list[bytes]) -> None:
        """Write every packet; a TUN write that would block is dropped (the kernel queue is full)."""
        if fastio is not None:
            try:
                self.write_drops += fastio.write_packets(self.fd, packets)
            except OSError as err:  # only errors that mean the device is gone
                raise TunClosed(str(err)) from err
            return
        write = os.write
        fd = self.fd
        for pkt in packets:
            try:
                write(fd, pkt)
            except BlockingIOError:
                self.write_drops += 1
            except OSError as err:
                # EINVAL: the core handed us a malformed packet; the kernel refuses it. Count, go on.
                if err.errno in _DEVICE_GONE:
                    raise TunClosed(str(err)) from err
                self.write_drops += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
