"""One corpus of addresses for every call path that fetches a URL (load_image / LLM.chat / the pipeline, and
the server): each is refused or allowed by `preprocess/fetch.blocked_reason`, and the same URL gets the same
answer everywhere. Public addresses are never connected to in tests (no network here)."""

import socket
import threading


BLOCKED = [
    # IPv4 special ranges
    "127.0.0.1", "127.0.0.2", "127.255.255.254", "0.0.0.0", "0.1.2.3", "10.0.0.1", "172.16.0.1", "172.31.255.255",
    "192.168.1.1", "100.64.0.1", "169.254.169.254", "192.0.0.1", "192.0.2.1", "198.18.0.1", "198.51.100.1",
    "203.0.113.1", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    # IPv6 special ranges
    "::1", "::", "fe80::1", "fe80::1%lo", "fc00::1", "fd00:ec2::254", "fec0::1", "fec0:0:0:ffff::1", "ff02::1",
    "2001:db8::1", "100::1",
    # IPv6 forms embedding a blocked IPv4 address
    "::ffff:127.0.0.1", "::ffff:7f00:2", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:0:127.0.0.1",
    "::127.0.0.1", "::7f00:1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::10.0.0.1",
    "2002:7f00:1::1", "2002:a9fe:a9fe::1", "2002:c0a8:101::", "2001:0:4136:e378:8000:63bf:80ff:fffe",
    # the local-use NAT64 prefix is refused whatever it embeds (RFC 8215; its layout is the site's choice)
    "64:ff9b:1::7f00:1", "64:ff9b:1::808:808",
]

PUBLIC = [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2606:2800:220:1:248:1893:25c8:1946",
    "::ffff:8.8.8.8", "64:ff9b::808:808", "64:ff9b::8.8.4.4", "2002:808:808::1",
]

# spellings of 127.0.0.1 as a URL host (the C resolver's reading)
LOOPBACK_SPELLINGS = ["127.0.0.1", "2130706433", "0x7f000001", "017700000001", "0177.0.0.1", "127.1", "0x7f.1",
                      "127.000.000.001", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::127.0.0.1]",
                      "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "localhost", "LOCALHOST", "localhost."]


def resolver_for(table: dict[str, list[str]]):
    """A resolver that answers `table[name]` for the names in it and asks the system for every other name."""
    import socket

    def resolve(host: str, port: int) -> list[str]:
        if host in table:
            return list(table[host])
        return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]

    return resolve


def corpus_names() -> dict[str, list[str]]:
    """test names -> answers: one per blocked address, and the public-then-loopback and loopback-then-public
    answers (every answer must be allowed, not only the first)."""
    table = {f"b{i}.test": [a.split("%")[0]] for i, a in enumerate(BLOCKED)}
    table["mixed.test"] = ["93.184.216.34", "127.0.0.1"]
    table["mixed2.test"] = ["127.0.0.2", "8.8.8.8"]
    return table


class Victims:
    """Listeners on 127.0.0.1 and 127.0.0.2 (same port) that only count the connections they accept."""

    def __init__(self):
        for _ in range(20):
            self.socks = []
            try:
                first = socket.create_server(("127.0.0.1", 0))
                self.socks.append(first)
                self.port = first.getsockname()[1]
                self.socks.append(socket.create_server(("127.0.0.2", self.port)))
                break
            except OSError:
                for s in self.socks:
                    s.close()
        for s in self.socks:
            s.settimeout(0.1)
        self.connections = 0
        self.running = True
        self.threads = [threading.Thread(target=self._accept, args=(s,), daemon=True) for s in self.socks]
        for t in self.threads:
            t.start()

    def _accept(self, sock):
        while self.running:
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self.running = False
        for t in self.threads:
            t.join(2)
        for s in self.socks:
            s.close()
