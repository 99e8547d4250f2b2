//! Network namespaces for the tests that run blip as if on separate hosts: two namespaces
//! joined by a veth pair, or several joined through a bridge that the test process (in the
//! root namespace) also reaches, so it can knock on every "host's" ports itself.
//!
//! Everything made here is deleted when its guard drops (deleting a namespace deletes the
//! veth ends inside it; the bridge and the root-side ends are deleted by name).

/// Runs `ip ARGS`; true when it succeeded.
pub fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Deletes its namespaces and root-namespace links when dropped.
pub struct Namespaces {
    pub names: Vec<String>,
    pub links: Vec<String>,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            ip(&["netns", "del", n]);
        }
        for l in &self.links {
            ip(&["link", "del", l]);
        }
    }
}

/// Two fresh network namespaces joined by a veth pair, 10.<subnet>.0.1 and .2, links up.
/// Returns the guard that deletes them, the namespace names and the two link names.
pub fn veth_pair(tag: &str, subnet: u8) -> (Namespaces, String, String, String, String) {
    let id = std::process::id() % 10000;
    let (na, nb) = (format!("blip{tag}a{id}"), format!("blip{tag}b{id}"));
    let guard = Namespaces {
        names: vec![na.clone(), nb.clone()],
        links: Vec::new(),
    };
    let (va, vb) = (format!("v{tag}a{id}"), format!("v{tag}b{id}"));
    assert!(
        ip(&["netns", "add", &na]) && ip(&["netns", "add", &nb]),
        "ip netns add (needs root and iproute2)"
    );
    assert!(ip(&[
        "link", "add", &va, "type", "veth", "peer", "name", &vb
    ]));
    assert!(ip(&["link", "set", &va, "netns", &na]) && ip(&["link", "set", &vb, "netns", &nb]));
    for (n, v, host) in [(&na, &va, 1), (&nb, &vb, 2)] {
        let addr = format!("10.{subnet}.0.{host}/24");
        assert!(ip(&["-n", n, "addr", "add", &addr, "dev", v]));
        assert!(
            ip(&["-n", n, "link", "set", v, "up"]) && ip(&["-n", n, "link", "set", "lo", "up"])
        );
    }
    (guard, na, nb, va, vb)
}

/// `count` namespaces ("hosts") on one bridge in the root namespace.
pub struct Bridged {
    pub guard: Namespaces,
    /// The namespaces, in order.
    pub names: Vec<String>,
    /// Each namespace's address on the bridge (same order).
    pub addrs: Vec<String>,
    /// The root namespace's address on the bridge (where the test's own connections come from).
    pub root_addr: String,
}

/// `count` (at most 9) fresh namespaces, each with one veth whose other end is on a fresh
/// bridge in the root namespace: namespace i is 10.X.Y.(i+1)/24 and the root namespace
/// 10.X.Y.254, where X comes from this process id (two test runs at once do not share a
/// subnet) and Y from `tag`'s first byte (two tests of one run do not either).
pub fn bridged(tag: &str, count: usize) -> Bridged {
    assert!(count <= 9 && !tag.is_empty() && tag.len() <= 3);
    let pid = std::process::id();
    let id = pid % 10000;
    let x = 100 + pid % 100;
    let y = tag.as_bytes()[0];
    let br = format!("bbr{tag}{id}");
    let mut guard = Namespaces {
        names: Vec::new(),
        links: vec![br.clone()],
    };
    assert!(
        ip(&["link", "add", &br, "type", "bridge"]),
        "ip link add bridge (needs root and iproute2)"
    );
    let root_addr = format!("10.{x}.{y}.254");
    assert!(ip(&["addr", "add", &format!("{root_addr}/24"), "dev", &br]));
    assert!(ip(&["link", "set", &br, "up"]));
    let (mut names, mut addrs) = (Vec::new(), Vec::new());
    for i in 0..count {
        let ns = format!("blip{tag}{i}n{id}");
        let (outer, inner) = (format!("v{tag}{i}o{id}"), format!("v{tag}{i}i{id}"));
        assert!(ip(&["netns", "add", &ns]), "ip netns add {ns}");
        guard.names.push(ns.clone());
        assert!(ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner
        ]));
        guard.links.push(outer.clone());
        assert!(ip(&["link", "set", &inner, "netns", &ns]));
        assert!(ip(&["link", "set", &outer, "master", &br]) && ip(&["link", "set", &outer, "up"]));
        let addr = format!("10.{x}.{y}.{}", i + 1);
        assert!(ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &inner
        ]));
        assert!(
            ip(&["-n", &ns, "link", "set", &inner, "up"])
                && ip(&["-n", &ns, "link", "set", "lo", "up"])
        );
        names.push(ns);
        addrs.push(addr);
    }
    Bridged {
        guard,
        names,
        addrs,
        root_addr,
    }
}
