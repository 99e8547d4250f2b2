//! A newc ("070701") cpio writer: enough for an initramfs (directories, one character device,
//! regular files), with no need for root or the `cpio` tool.
//!
//! Each entry: a 110-byte ASCII header (magic and 13 eight-digit hex fields), the name with its
//! NUL padded to a multiple of 4, the data padded to a multiple of 4; the archive ends with
//! the entry `TRAILER!!!`. Owner root, mtime 0: the same input gives the same bytes.

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    /// A character device (major, minor).
    CharDev(u32, u32),
    File(Vec<u8>),
}

/// One archive member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Path without a leading `/`.
    pub name: String,
    /// Permission bits (the type bits come from `kind`).
    pub perm: u32,
    pub kind: Kind,
}

fn pad4(buf: &mut Vec<u8>) {
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
}

fn header(
    buf: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
    name: &str,
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        size,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    buf.extend_from_slice(b"070701");
    for f in fields {
        buf.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    buf.extend_from_slice(name.as_bytes());
    buf.push(0);
    pad4(buf);
}

/// The archive of `entries`, in order (parents before children).
pub fn newc(entries: &[Entry]) -> Vec<u8> {
    let mut buf = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let perm = e.perm & 0o7777;
        match &e.kind {
            Kind::Dir => header(&mut buf, ino, 0o040000 | perm, 2, 0, (0, 0), &e.name),
            Kind::CharDev(ma, mi) => {
                header(&mut buf, ino, 0o020000 | perm, 1, 0, (*ma, *mi), &e.name)
            }
            Kind::File(data) => {
                header(
                    &mut buf,
                    ino,
                    0o100000 | perm,
                    1,
                    data.len() as u32,
                    (0, 0),
                    &e.name,
                );
                buf.extend_from_slice(data);
                pad4(&mut buf);
            }
        }
    }
    header(&mut buf, 0, 0, 1, 0, (0, 0), "TRAILER!!!");
    buf
}

/// The initramfs of the Linux guest: `/dev/console` (so the kernel opens a console for init
/// before anything is mounted), the mount points, and `/init` = `init`.
pub fn initramfs(init: &[u8]) -> Vec<u8> {
    let dir = |name: &str| Entry {
        name: name.into(),
        perm: 0o755,
        kind: Kind::Dir,
    };
    newc(&[
        dir("dev"),
        Entry {
            name: "dev/console".into(),
            perm: 0o600,
            kind: Kind::CharDev(5, 1),
        },
        dir("proc"),
        dir("sys"),
        dir("tmp"),
        Entry {
            name: "init".into(),
            perm: 0o755,
            kind: Kind::File(init.to_vec()),
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, size, rdev major, rdev minor, data) of each member, read back.
    fn read(mut a: &[u8]) -> Vec<(String, u32, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let total = a.len();
        loop {
            assert_eq!(&a[..6], b"070701");
            let f = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&a[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rma, rmi, namesize) = (f(1), f(6), f(9), f(10), f(11) as usize);
            let name = std::str::from_utf8(&a[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(a[110 + namesize - 1], 0);
            let data_at = (110 + namesize).div_ceil(4) * 4;
            let data = a[data_at..data_at + size as usize].to_vec();
            let next = (data_at + size as usize).div_ceil(4) * 4;
            assert_eq!((total - a.len()) % 4, 0, "entries start 4-aligned");
            if name == "TRAILER!!!" {
                assert_eq!(next, a.len());
                return out;
            }
            out.push((name, mode, size, rma, rmi, data));
            a = &a[next..];
        }
    }

    #[test]
    fn initramfs_members_read_back() {
        let init = b"\x7fELF and some bytes".to_vec();
        let members = read(&initramfs(&init));
        let names: Vec<&str> = members.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "proc", "sys", "tmp", "init"]);
        assert_eq!(members[0].1, 0o040755);
        assert_eq!((members[1].1, members[1].3, members[1].4), (0o020600, 5, 1));
        assert_eq!(members[5].1, 0o100755);
        assert_eq!(members[5].5, init);
    }

    #[test]
    fn odd_sizes_are_padded() {
        for n in 0..9 {
            let a = newc(&[Entry {
                name: "f".repeat(n + 1),
                perm: 0o644,
                kind: Kind::File(vec![7; n]),
            }]);
            assert_eq!(a.len() % 4, 0);
            assert_eq!(read(&a)[0].5, vec![7; n]);
        }
    }
}
