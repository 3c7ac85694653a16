//! Two hosts made of network namespaces, for the tests that need a real
//! link between a primary and a standby host: `ip netns add` twice, a veth
//! pair between them with private addresses that exist only inside the
//! namespaces (10.231.N.1 on host A, 10.231.N.2 on host B), and `cut` /
//! `heal` to take the link down and up (`ip link set down`), a partition.
//! Servers and daemons join a namespace when they start
//! (`Cluster::netns`, `Daemon::start_in`); the test itself stays in the
//! root namespace and reaches the servers through their Unix sockets.
//! Dropping it deletes both namespaces (and the veth pair with them).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct TwoHosts {
    /// Namespace names, for `Cluster::netns` and `Daemon::start_in`.
    pub a: String,
    pub b: String,
    /// The addresses of A and B on the link.
    pub a_addr: String,
    pub b_addr: String,
    veth_a: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("these tests need iproute2's `ip` (as root): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {} (the two-host tests create network namespaces and need root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl TwoHosts {
    pub fn new() -> TwoHosts {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the two-host tests create network namespaces: run them as root"
        );
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("{:x}{k}", pid & 0xffff);
        let subnet = (pid.wrapping_mul(7).wrapping_add(k * 13)) % 250 + 1;
        let h = TwoHosts {
            a: format!("wt{tag}a"),
            b: format!("wt{tag}b"),
            a_addr: format!("10.231.{subnet}.1"),
            b_addr: format!("10.231.{subnet}.2"),
            veth_a: format!("wv{tag}a"),
        };
        let veth_b = format!("wv{tag}b");
        ip(&["netns", "add", &h.a]);
        ip(&["netns", "add", &h.b]);
        ip(&[
            "link", "add", &h.veth_a, "type", "veth", "peer", "name", &veth_b,
        ]);
        ip(&["link", "set", &h.veth_a, "netns", &h.a]);
        ip(&["link", "set", &veth_b, "netns", &h.b]);
        for (ns, dev, addr) in [(&h.a, &h.veth_a, &h.a_addr), (&h.b, &veth_b, &h.b_addr)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        h
    }

    /// The partition: A's end of the link goes down.
    pub fn cut(&self) {
        ip(&["-n", &self.a, "link", "set", &self.veth_a, "down"]);
    }

    pub fn heal(&self) {
        ip(&["-n", &self.a, "link", "set", &self.veth_a, "up"]);
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
