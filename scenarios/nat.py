"""NAT types and the nftables rulesets that produce them (pure: builds text, runs nothing).

Rules follow RFC 4787's behaviours, checked in this lab. Every router gets the same filter table (INPUT
policy drop: with INPUT open, early punch packets leave conntrack entries on the router that clash with the
host's own flow, and the kernel silently remaps the host's source port), plus a NAT table chosen by its type.

Cone types with inbound filtering rules need to know which inside host owns a public port. Instead of
one fixed inside host (the minimal rule), a dynamic map is filled at postrouting, right after
source NAT, from the connection's original tuple: public port -> inside address . inside port.
That makes the rules work for any number of hosts behind one router.
"""

from __future__ import annotations

import enum


class NatType(str, enum.Enum):
    """RFC 4787 behaviour of a router (value = the name used in scenario files)."""

    NONE = "none"                        # a host with a public address, no NAT, no firewall
    FULL_CONE = "full-cone"              # EIM, endpoint-independent filtering
    RESTRICTED_CONE = "restricted-cone"  # EIM, address-dependent filtering
    PORT_RESTRICTED = "port-restricted"  # EIM, address+port-dependent filtering (Linux masquerade)
    SYMMETRIC = "symmetric"              # address+port-dependent mapping, random port per destination
    UDP_BLOCKED = "udp-blocked"          # port-restricted NAT whose firewall drops all UDP (TCP only)


# Inbound state on cone NATs lasts as long as a typical home router's UDP timeout.
MAPPING_TIMEOUT_S = 120


def filter_table(lan: str = "lan0", wan: str = "wan0", *, block_udp: bool = False) -> str:
    """The router's own firewall: drop unsolicited input, forward only inside->outside and replies."""
    udp_drop = f'iifname "{lan}" meta l4proto udp drop\n' if block_udp else ""
    return f"""
table inet labfw {{
  chain input {{
    type filter hook input priority filter; policy drop;
    iif "lo" accept
    ct state established,related accept
    {udp_drop}iifname "{lan}" accept
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    {udp_drop}ct state established,related accept
    ct status dnat accept
    iifname "{lan}" oifname "{wan}" accept
  }}
}}
"""


def nat_table(nat: NatType, wan_ip: str, *, lan: str = "lan0", wan: str = "wan0", hairpin: bool = False) -> str:
    """The NAT table for one router type (not NONE: see ruleset). `wan_ip` is the router's public address."""
    if nat in (NatType.PORT_RESTRICTED, NatType.UDP_BLOCKED):
        snat = f'oifname "{wan}" masquerade'
    elif nat is NatType.SYMMETRIC:
        snat = f'oifname "{wan}" masquerade random'
    else:
        # Explicit snat keeps the source port when the tuple is free, like masquerade.
        snat = f'oifname "{wan}" snat ip to {wan_ip}'

    inbound = ""
    if nat is NatType.FULL_CONE:
        inbound = f'iifname "{wan}" meta l4proto udp dnat ip to udp dport map @owner'
    elif nat is NatType.RESTRICTED_CONE:
        inbound = f'iifname "{wan}" meta l4proto udp dnat ip to ip saddr . udp dport map @contacted'
    hairpin_pre = hairpin_post = ""
    if hairpin:
        # A LAN host sending to the public address reaches the owner of that public port; masquerade on
        # the way back in so the owner's reply also passes through the router (and is translated).
        hairpin_pre = f'iifname "{lan}" ip daddr {wan_ip} meta l4proto udp dnat ip to udp dport map @owner'
        hairpin_post = f'oifname "{lan}" ct status dnat iifname "{lan}" masquerade'

    return f"""
table ip labnat {{
  map owner {{
    type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout {MAPPING_TIMEOUT_S}s;
  }}
  map contacted {{
    type ipv4_addr . inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout {MAPPING_TIMEOUT_S}s;
  }}
  chain pre {{
    type nat hook prerouting priority dstnat;
    {inbound}
    {hairpin_pre}
  }}
  chain post {{
    type nat hook postrouting priority srcnat;
    {hairpin_post}
    {snat}
  }}
  chain record {{
    type filter hook postrouting priority srcnat + 10;
    oifname "{wan}" meta l4proto udp update @owner {{ udp sport : ct original ip saddr . ct original proto-src }}
    oifname "{wan}" meta l4proto udp update @contacted {{ ip daddr . udp sport : ct original ip saddr . ct original proto-src }}
  }}
}}
"""


def ruleset(nat: NatType, wan_ip: str, *, hairpin: bool = False) -> str:
    """Everything one router loads with `nft -f -`."""
    if nat is NatType.NONE:
        return ""
    return filter_table(block_udp=nat is NatType.UDP_BLOCKED) + nat_table(nat, wan_ip, hairpin=hairpin)
