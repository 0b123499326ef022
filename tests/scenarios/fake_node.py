"""A stand-in for the node software, so the runner can be tested before `meshwg join` exists.

serve DB PORT IP   listens on IP:PORT (TCP) until stopped; the "registry" is the directory next to DB
invite DB          prints that directory as the invite
join INVITE NAME STATE_DIR [fail]
                   records NAME and this host's address in the registry, then idles ('fail' exits 1)
status INVITE_FILE_DIR STATE_DIR
                   prints status JSON: own address, every other registered node as a direct peer
The "mesh address" is the host's real address, so it only works for hosts with public addresses.
"""

import json
import os
import socket
import subprocess
import sys
import time


def my_addr() -> str:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True).stdout
    return out.split()[3].split("/")[0]


cmd = sys.argv[1]
if cmd == "serve":
    registry = os.path.join(os.path.dirname(sys.argv[2]), "registry")
    os.makedirs(registry, exist_ok=True)
    server = socket.create_server((sys.argv[4], int(sys.argv[3])))
    while True:
        time.sleep(1)
elif cmd == "invite":
    print("invite follows")
    print(os.path.join(os.path.dirname(sys.argv[2]), "registry"))
elif cmd == "join":
    registry, name, state_dir = sys.argv[2:5]
    if sys.argv[5:] == ["fail"]:
        print("join: cannot reach the signal server (fake failure)", file=sys.stderr)
        sys.exit(1)
    os.makedirs(state_dir, exist_ok=True)
    with open(os.path.join(state_dir, "registry"), "w") as f:
        f.write(registry)
    with open(os.path.join(registry, name + ".json"), "w") as f:
        json.dump({"name": name, "addresses": [my_addr() + "/32"]}, f)
    while True:
        time.sleep(1)
elif cmd == "status":
    state_dir = sys.argv[2]
    registry = open(os.path.join(state_dir, "registry")).read()
    me = my_addr()
    nodes = [json.load(open(os.path.join(registry, f))) for f in sorted(os.listdir(registry))]
    peers = [dict(n, path="direct", endpoint=n["addresses"][0].split("/")[0] + ":51820", latency_ms=0.1)
             for n in nodes if n["addresses"][0].split("/")[0] != me]
    print(json.dumps({"addresses": [me + "/32"], "peers": peers}))
