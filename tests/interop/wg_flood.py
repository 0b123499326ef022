"""Test-only helper: send one prebuilt datagram to 127.0.0.1:<port> as fast as possible for <seconds>.

Run inside a test namespace (ip netns exec) to push wireguard-go's handshake queue past its under-load mark.
"""

import socket
import sys
import time

port, message, seconds = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), float(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(200):
        try:
            sock.sendto(message, ("127.0.0.1", port))
        except OSError:  # ENOBUFS/ECONNREFUSED under flood: keep going
            pass
sock.close()
