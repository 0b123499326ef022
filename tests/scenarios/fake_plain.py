"""Stand-ins for the plain-device and subnet-route commands (scenarios/node_commands.py), next to fake_node.py, so
the runner's plain-device flow is tested in seconds. The registry is fake_node's (the directory next to DB).

status STATE_DIR                fake_node's status, with plain peers on the relay (as a real node lists them)
routes-list DB                  NODE ROUTE STATE rows: each node's address's /24, pending until approved
routes-approve DB NODE CIDR     marks NODE's route approved
plain-add DB NAME PNG ENDPOINT [--to NODE ...] [fail]
                                registers NAME as a plain peer, prints its config and writes it to PNG (the "QR code")
cat FILE                        prints FILE (the "decoder")
wg-quick-up CONF PIDFILE [fail] starts a daemon that leaves our process tree (as wireguard-go does), writes its PID
                                to PIDFILE, says on stderr what wg-quick says when it runs wireguard-go
endpoints CONF                  "KEY<TAB>ENDPOINT" for each Endpoint line of CONF (what `wg show IF endpoints` prints)
"""

import json
import os
import subprocess
import sys

FAKE_NODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_node.py")


def registry(db: str) -> str:
    return os.path.join(os.path.dirname(db), "registry")


def nodes(db: str) -> list[dict]:
    reg = registry(db)
    entries = [json.load(open(os.path.join(reg, f))) for f in sorted(os.listdir(reg))]
    return [e for e in entries if not e.get("plain")]


def lan(node: dict) -> str:
    return node["addresses"][0].rsplit(".", 1)[0] + ".0/24"


def approval(db: str, name: str) -> str:
    # Beside the registry, not in it: fake_node reads every file there as a node.
    return os.path.join(os.path.dirname(db), f"approved-{name}")


def approved(db: str, name: str) -> bool:
    return os.path.exists(approval(db, name))


cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "status":
    out = subprocess.run([sys.executable, FAKE_NODE, "status", *args], capture_output=True, text=True, check=True)
    status = json.loads(out.stdout)
    for peer in status["peers"]:
        if peer.get("plain"):
            peer["path"] = "relay"
    print(json.dumps(status))
elif cmd == "routes-list":
    print(f"{'NODE':20} {'ROUTE':43} STATE")
    for node in nodes(args[0]):
        print(f"{node['name']:20} {lan(node):43} {'approved' if approved(args[0], node['name']) else 'pending'}")
elif cmd == "routes-approve":
    open(approval(args[0], args[1]), "w").close()
    print(f"approved {args[2]} for {args[1]}")
elif cmd == "plain-add":
    db, name, png, endpoint, rest = args[0], args[1], args[2], args[3], args[4:]
    if "fail" in rest:
        print("error: unknown node in --to (fake failure)", file=sys.stderr)
        sys.exit(1)
    targets = [rest[i + 1] for i, a in enumerate(rest) if a == "--to"]
    with open(os.path.join(registry(db), name + ".json"), "w") as f:
        json.dump({"name": name, "addresses": ["100.127.0.9/32"], "plain": True}, f)
    config = "[Interface]\nPrivateKey = fake\nAddress = 100.127.0.9/32\n"
    for node in nodes(db):
        if node["name"] in targets:
            routes = [lan(node)] if approved(db, node["name"]) else []
            config += (f"\n[Peer]\nPublicKey = key-of-{node['name']}\n"
                       f"AllowedIPs = {', '.join([node['addresses'][0], *routes])}\nEndpoint = {endpoint}\n")
    with open(png, "w") as f:
        f.write(config)
    sys.stdout.write(config)
elif cmd == "cat":
    sys.stdout.write(open(args[0]).read())
elif cmd == "wg-quick-up":
    daemon = subprocess.Popen(["sleep", "300"], start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    with open(args[1], "w") as f:
        f.write(str(daemon.pid))
    print("[#] wireguard-go wgp0", file=sys.stderr)
    sys.exit(1 if args[2:] == ["fail"] else 0)
elif cmd == "endpoints":
    for line in open(args[0]):
        key, _, value = (part.strip() for part in line.partition("="))
        if key == "PublicKey":
            peer = value
        elif key == "Endpoint":
            print(f"{peer}\t{value}")
