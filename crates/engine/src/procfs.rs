//! Reading /proc/PID: the mappings list and the stat line. Parsing is pure (unit-tested);
//! reading is one `fs::read_to_string`. Bad content becomes an error, never a panic.
//!
//! The `procfs` crate could parse these too, but it drops fields we need (the raw perms and
//! the mapping names exactly as the kernel prints them) and we need only two files.

use anyhow::{anyhow, bail, Context, Result};
use nix::unistd::Pid;

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    /// The file's device as maps prints it ("fe:00"; "00:00" for anonymous memory).
    pub dev: String,
    pub inode: u64,
    /// File path, "[heap]", "[stack]", "[vdso]", … or empty for anonymous memory.
    pub name: String,
}

/// Reads a /proc file whole. /proc files report size 0, so `std::fs::read` starts small
/// and grows its buffer one read(2) at a time (a dozen calls for /proc/PID/smaps, each
/// regenerating text); this reads into 16 KiB and more from the first call.
pub fn read_file(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 16 << 10];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// `read_file` as text (what /proc prints is text; anything else becomes an error).
pub fn read_text(path: &str) -> std::io::Result<String> {
    String::from_utf8(read_file(path)?).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{path} is not text"))
    })
}

pub fn read_maps(pid: Pid) -> Result<Vec<MapsEntry>> {
    let text = read_text(&format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading /proc/{pid}/maps"))?;
    parse_maps(&text)
}

pub fn parse_maps(text: &str) -> Result<Vec<MapsEntry>> {
    text.lines().filter(|l| !l.is_empty()).map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Result<MapsEntry> {
    let bad = || anyhow!("malformed /proc maps line: {line:?}");
    let mut rest = line;
    let mut field = || -> Option<&str> {
        let t = rest.trim_start();
        let end = t.find(' ').unwrap_or(t.len());
        let (f, r) = t.split_at(end);
        rest = r;
        if f.is_empty() {
            None
        } else {
            Some(f)
        }
    };
    let range = field().ok_or_else(bad)?;
    let perms = field().ok_or_else(bad)?;
    let offset = field().ok_or_else(bad)?;
    let dev = field().ok_or_else(bad)?.to_string();
    let inode = field().ok_or_else(bad)?;
    let name = rest.trim_start().to_string();
    let (s, e) = range.split_once('-').ok_or_else(bad)?;
    let p = perms.as_bytes();
    if p.len() != 4 {
        return Err(bad());
    }
    let start = u64::from_str_radix(s, 16).map_err(|_| bad())?;
    let end = u64::from_str_radix(e, 16).map_err(|_| bad())?;
    if end <= start {
        return Err(bad());
    }
    Ok(MapsEntry {
        start,
        end,
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        shared: p[3] == b's',
        offset: u64::from_str_radix(offset, 16).map_err(|_| bad())?,
        dev,
        inode: inode.parse().map_err(|_| bad())?,
        name,
    })
}

/// The VmFlags of every mapping in /proc/PID/smaps, by (start, end).
pub fn read_vmflags(pid: Pid) -> Result<std::collections::HashMap<(u64, u64), Vec<String>>> {
    let text = read_text(&format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    Ok(parse_vmflags(&text))
}

pub fn parse_vmflags(text: &str) -> std::collections::HashMap<(u64, u64), Vec<String>> {
    let mut out = std::collections::HashMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(start) = current.take() {
                out.insert(start, flags.split_whitespace().map(str::to_string).collect());
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            // A mapping's header line starts with "start-end"; field lines with "Name:".
            if let Some((s, e)) = range.split_once('-') {
                if let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16))
                {
                    current = Some((start, end));
                }
            }
        }
    }
    out
}

/// The fields of /proc/PID/stat, 1-based as in proc(5); field 2 (comm) is returned apart.
pub struct Stat {
    pub comm: String,
    fields: Vec<String>,
}

impl Stat {
    /// Field `n` (1-based, n ≥ 3) as a number.
    pub fn num(&self, n: usize) -> Result<u64> {
        let f = self
            .fields
            .get(n.wrapping_sub(3))
            .ok_or_else(|| anyhow!("/proc stat has no field {n}"))?;
        if let Ok(v) = f.parse::<u64>() {
            return Ok(v);
        }
        f.parse::<i64>()
            .map(|v| v as u64)
            .map_err(|_| anyhow!("/proc stat field {n} is not a number: {f:?}"))
    }
}

pub fn read_stat(pid: Pid) -> Result<Stat> {
    let text = read_text(&format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat(&text)
}

pub fn parse_stat(text: &str) -> Result<Stat> {
    // comm is in parentheses and may itself contain spaces and ')': split at the last ')'.
    let open = text.find('(').ok_or_else(|| anyhow!("malformed /proc stat"))?;
    let close = text.rfind(')').ok_or_else(|| anyhow!("malformed /proc stat"))?;
    if close < open {
        bail!("malformed /proc stat");
    }
    let comm = text[open + 1..close].to_string();
    let fields = text[close + 1..].split_whitespace().map(str::to_string).collect();
    Ok(Stat { comm, fields })
}

/// Thread ids of a process.
pub fn list_threads(pid: Pid) -> Result<Vec<Pid>> {
    let mut tids = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing threads of process {pid}"))?
    {
        let e = e?;
        if let Some(t) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            tids.push(Pid::from_raw(t));
        }
    }
    tids.sort();
    Ok(tids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let m = parse_maps(
            "55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 1234     /usr/bin/my prog\n\
             7ffd1000-7ffd3000 rw-p 00000000 00:00 0                          [stack]\n\
             7f0000000000-7f0000001000 rw-s 00001000 00:01 77 /dev/zero (deleted)\n",
        )
        .unwrap();
        assert_eq!(m[0].name, "/usr/bin/my prog");
        assert!(m[0].read && !m[0].write && !m[0].shared);
        assert_eq!(m[1].name, "[stack]");
        assert!(m[2].shared && m[2].offset == 0x1000 && m[2].inode == 77);
        assert!(parse_maps("zz-10 rw-p 0 0 0\n").is_err());
        assert!(parse_maps("10-5 rw-p 0 0:0 0\n").is_err());
    }

    #[test]
    fn vmflags() {
        let f = parse_vmflags("7f00-7f10 rw-p 00000000 00:00 0\nRss:  4 kB\nVmFlags: rd wr mr mw me ac sd \n7f20-7f30 ---p 0 00:00 0\nVmFlags: mr mw me\n");
        assert_eq!(f[&(0x7f00, 0x7f10)], ["rd", "wr", "mr", "mw", "me", "ac", "sd"]);
        assert_eq!(f[&(0x7f20, 0x7f30)], ["mr", "mw", "me"]);
    }

    #[test]
    fn stat_with_parens_in_comm() {
        let s = parse_stat("42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 -5").unwrap();
        assert_eq!(s.comm, "a) b");
        assert!(s.num(3).is_err()); // "S" is not a number
        assert_eq!(s.num(4).unwrap(), 1);
        assert_eq!(s.num(19).unwrap() as i64, -5);
        assert!(s.num(99).is_err());
    }
}
