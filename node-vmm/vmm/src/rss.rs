//! Resident memory from /proc/PID/smaps, split into guest RAM and VMM overhead
//! (the way Firecracker measures it: RSS of every mapping except guest memory).

use std::path::Path;

/// One mapping: [start, end) and its resident bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub rss: u64,
}

/// Parses smaps text.
pub fn parse(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                out.push(Mapping { start, end, rss: 0 });
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            if let Some(m) = out.last_mut() {
                m.rss = kib * 1024;
            }
        }
    }
    out
}

pub fn read(path: &Path) -> std::io::Result<Vec<Mapping>> {
    Ok(parse(&std::fs::read_to_string(path)?))
}

/// `/proc/self/smaps`, opened before the VMM jails itself (no /proc inside).
static SMAPS: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Opens `/proc/self/smaps` for later reads by [`read_self`]; call before
/// entering the jail. Without it, stats simply report no overhead figure.
pub fn preopen() {
    if let Ok(f) = std::fs::File::open("/proc/self/smaps") {
        let _ = SMAPS.set(f);
    }
}

pub fn read_self() -> std::io::Result<Vec<Mapping>> {
    let Some(f) = SMAPS.get() else {
        return read(Path::new("/proc/self/smaps"));
    };
    // A seq_file read from offset 0 produces a fresh snapshot.
    let mut text = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0u64;
    loop {
        let n = std::os::unix::fs::FileExt::read_at(f, &mut buf, off)?;
        if n == 0 || text.len() > (16 << 20) {
            break;
        }
        text.extend_from_slice(&buf[..n]);
        off += n as u64;
    }
    Ok(parse(&String::from_utf8_lossy(&text)))
}

/// RSS of all mappings that do not overlap a guest RAM range.
pub fn overhead(maps: &[Mapping], guest: &[(u64, u64)]) -> u64 {
    maps.iter()
        .filter(|m| !guest.iter().any(|&(s, e)| m.start < e && s < m.end))
        .map(|m| m.rss)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_excludes_guest_mappings() {
        let text = "\
00400000-00452000 r-xp 00000000 08:02 1 /bin/x
Size:                328 kB
Rss:                 100 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Rss:               65536 kB
7fff0000-7fff1000 rw-p 00000000 00:00 0 [stack]
Rss:                   8 kB
";
        let maps = parse(text);
        assert_eq!(maps.len(), 3);
        assert_eq!(
            overhead(&maps, &[(0x7f00_0000_0000, 0x7f00_1000_0000)]),
            108 * 1024
        );
        assert_eq!(overhead(&maps, &[]), (108 + 65536) * 1024);
    }
}
