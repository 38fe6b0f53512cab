//! What one instance may use (`cpu`, `memory` of `[services.NAME]`), what
//! a node offers, and how the two meet: the leader places an instance only
//! on a node with room left for it ([`Room`]), and the runtime holds the
//! instance to it with cgroups ([`cgroup_settings`]).
//!
//! A service that declares nothing asks for nothing: it fits anywhere and
//! runs unlimited, as before resources existed (its releases keep their
//! hashes: an empty [`Resources`] is not serialized).

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// One instance's share: thousandths of a CPU and bytes of memory (0: not
/// declared, neither reserved nor limited), and the most processes and
/// threads it may have at once (a limit only: nodes do not offer pids).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub cpu_millis: u32,
    #[serde(default, skip_serializing_if = "is_zero64")]
    pub memory_bytes: u64,
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub pids: u32,
}

fn is_zero32(n: &u32) -> bool {
    *n == 0
}

fn is_zero64(n: &u64) -> bool {
    *n == 0
}

impl Resources {
    /// Nothing declared.
    pub fn is_none(&self) -> bool {
        self.cpu_millis == 0 && self.memory_bytes == 0 && self.pids == 0
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.cpu_millis != 0 {
            parts.push(format!("cpu {}", show_cpu(u64::from(self.cpu_millis))));
        }
        if self.memory_bytes != 0 {
            parts.push(format!("memory {}", show_bytes(self.memory_bytes)));
        }
        if self.pids != 0 {
            parts.push(format!("pids {}", self.pids));
        }
        if parts.is_empty() {
            f.write_str("no resources")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Thousandths of a CPU for people: `2`, `0.5`, `1.25`.
pub fn show_cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        let s = format!("{}.{:03}", millis / 1000, millis % 1000);
        s.trim_end_matches('0').to_owned()
    }
}

/// Bytes for people, in the largest binary unit that divides them
/// (`512 MiB`, `1 GiB`, `1000 B`).
pub fn show_bytes(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

/// `64M`, `1G`, `512KiB`, `100` → bytes (units are powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in `{s}` (use K, M, G or T)")),
            };
            (&t[..i], mult)
        }
        None => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 20G, 500M or bytes)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// The most CPUs one instance may ask for.
pub const MAX_CPUS: u64 = 1024;
/// The least memory an instance may be given (below it nothing starts).
pub const MIN_MEMORY: u64 = 4 << 20;

/// The fewest processes an instance may be limited to: the runtime's own
/// (bubblewrap and its reaper, or the container's pid 1) count.
pub const MIN_PIDS: u64 = 8;
/// The most the kernel's `pids.max` takes (its `PID_MAX_LIMIT`).
pub const MAX_PIDS: u64 = 4 << 20;

/// `pids = 256`: how many processes and threads an instance may have at
/// once, at least [`MIN_PIDS`] and at most [`MAX_PIDS`].
pub fn parse_pids(n: u64) -> Result<u32, String> {
    if n < MIN_PIDS {
        return Err(format!(
            "pids `{n}`: at least {MIN_PIDS}, the runtime's own processes count (or leave pids out)"
        ));
    }
    if n > MAX_PIDS {
        return Err(format!("pids `{n}`: at most {MAX_PIDS}"));
    }
    u32::try_from(n).map_err(|_| format!("pids `{n}`: at most {MAX_PIDS}"))
}

/// `pids` as the spec writes it: a whole number.
pub(crate) fn pids_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Other(serde::de::IgnoredAny),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Number(n)) => parse_pids(n).map(Some).map_err(serde::de::Error::custom),
        Some(Raw::Other(_)) => Err(serde::de::Error::custom(
            "pids: write a whole number of processes, e.g. 256",
        )),
    }
}

/// `cpu = 0.5`, `cpu = 2` or `cpu = "500m"`: thousandths of a CPU, more
/// than 0 and at most [`MAX_CPUS`].
pub fn parse_cpu(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let bad = || format!("cpu `{s}`: write CPUs as 0.5, 2 or 500m (thousandths)");
    let millis: u64 = if let Some(m) = t.strip_suffix('m') {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        m.parse().map_err(|_| bad())?
    } else {
        let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
        let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) {
            return Err(bad());
        }
        if frac.len() > 3 {
            return Err(format!(
                "cpu `{s}`: at most three decimals (a thousandth of a CPU)"
            ));
        }
        let w: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let f: u64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<3}").parse().map_err(|_| bad())?
        };
        w.checked_mul(1000)
            .and_then(|w| w.checked_add(f))
            .ok_or_else(bad)?
    };
    if millis == 0 {
        return Err(format!("cpu `{s}`: more than 0, or leave cpu out"));
    }
    if millis > MAX_CPUS * 1000 {
        return Err(format!("cpu `{s}`: at most {MAX_CPUS} CPUs"));
    }
    // At most MAX_CPUS * 1000, which fits.
    u32::try_from(millis).map_err(|_| bad())
}

/// `memory = "512M"` (units are powers of 1024, as everywhere in the spec):
/// bytes, at least [`MIN_MEMORY`].
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let bytes = parse_size(s).map_err(|e| format!("memory: {e}"))?;
    if bytes < MIN_MEMORY {
        return Err(format!(
            "memory `{s}`: at least {} (or leave memory out)",
            show_bytes(MIN_MEMORY)
        ));
    }
    Ok(bytes)
}

/// `cpu` as the spec writes it: a number or a string.
pub(crate) fn cpu_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Float(f64),
        Text(String),
        Other(serde::de::IgnoredAny),
    }
    let text = match Option::<Raw>::deserialize(d)? {
        None => return Ok(None),
        Some(Raw::Int(n)) => n.to_string(),
        // A float's shortest form is the one written (0.5 stays 0.5).
        Some(Raw::Float(x)) => x.to_string(),
        Some(Raw::Text(s)) => s,
        Some(Raw::Other(_)) => {
            return Err(serde::de::Error::custom(
                "cpu: write CPUs as 0.5, 2 or \"500m\" (thousandths)",
            ));
        }
    };
    parse_cpu(&text).map(Some).map_err(serde::de::Error::custom)
}

/// `memory` as the spec writes it: a size string or bytes.
pub(crate) fn memory_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
        Other(serde::de::IgnoredAny),
    }
    let text = match Option::<Raw>::deserialize(d)? {
        None => return Ok(None),
        Some(Raw::Number(n)) => n.to_string(),
        Some(Raw::Text(s)) => s,
        Some(Raw::Other(_)) => {
            return Err(serde::de::Error::custom(
                "memory: write a size as \"256M\", \"1G\" or bytes",
            ));
        }
    };
    parse_memory(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// What a node offers or has left: thousandths of a CPU and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Amount {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl Amount {
    /// A node's capacity as it registered it (`cpus`, `memory_mib`); a
    /// dimension it did not register (0) is not limited.
    pub fn capacity(cpus: u32, memory_mib: u64) -> Self {
        Self {
            cpu_millis: if cpus == 0 {
                u64::MAX
            } else {
                u64::from(cpus) * 1000
            },
            memory_bytes: if memory_mib == 0 {
                u64::MAX
            } else {
                memory_mib.saturating_mul(1 << 20)
            },
        }
    }

    /// This much with `r` added.
    pub fn plus(self, r: &Resources) -> Self {
        Self {
            cpu_millis: self.cpu_millis.saturating_add(u64::from(r.cpu_millis)),
            memory_bytes: self.memory_bytes.saturating_add(r.memory_bytes),
        }
    }

    /// This much with `used` taken (never below nothing).
    pub fn minus(self, used: Amount) -> Self {
        Self {
            cpu_millis: self.cpu_millis.saturating_sub(used.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(used.memory_bytes),
        }
    }

    /// Whether `r` fits in what is left.
    pub fn fits(&self, r: &Resources) -> bool {
        u64::from(r.cpu_millis) <= self.cpu_millis && r.memory_bytes <= self.memory_bytes
    }
}

/// What each node has left for new instances: its capacity less what every
/// instance assigned to it (of every service, stopping ones too: they hold
/// their share until gone) declared. A node it does not name has no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Room {
    free: HashMap<String, Amount>,
}

impl Room {
    /// `capacity` of each node, less `used` (node, resources) pairs.
    pub fn new<'a>(
        capacity: impl IntoIterator<Item = (String, Amount)>,
        used: impl IntoIterator<Item = (&'a str, &'a Resources)>,
    ) -> Self {
        let mut free: HashMap<String, Amount> = capacity.into_iter().collect();
        for (node, r) in used {
            if let Some(f) = free.get_mut(node) {
                *f = f.minus(Amount::default().plus(r));
            }
        }
        Self { free }
    }

    /// What `node` has left (unlimited when its capacity is not known).
    pub fn free(&self, node: &str) -> Amount {
        self.free.get(node).copied().unwrap_or(Amount {
            cpu_millis: u64::MAX,
            memory_bytes: u64::MAX,
        })
    }
}

/// Which cgroup interface a node's kernel offers for cpu and memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller (`/sys/fs/cgroup/cpu`, `…/memory`).
    V1,
    /// The unified hierarchy.
    V2,
}

/// The CFS period the CPU quota is given in (the kernel's default, 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// One file an instance's cgroup is set up with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSetting {
    /// The v1 hierarchy it belongs to (`cpu`, `memory`); unused on v2.
    pub controller: &'static str,
    pub file: &'static str,
    pub value: String,
    /// A kernel may lack it (swap accounting off): skipped then.
    pub optional: bool,
}

/// The cgroup files that hold an instance to `limits`, in the order they
/// are written: a CPU quota of `cpu_millis` per [`CPU_PERIOD_US`], a memory
/// limit with no swap beyond it, a `pids.max`. Nothing for what is not
/// declared.
pub fn cgroup_settings(version: CgroupVersion, limits: &Resources) -> Vec<CgroupSetting> {
    let set = |controller, file, value: String, optional| CgroupSetting {
        controller,
        file,
        value,
        optional,
    };
    let quota = u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000;
    let mem = limits.memory_bytes;
    let mut out = Vec::new();
    match version {
        CgroupVersion::V1 => {
            if limits.cpu_millis != 0 {
                out.push(set(
                    "cpu",
                    "cpu.cfs_period_us",
                    CPU_PERIOD_US.to_string(),
                    false,
                ));
                out.push(set("cpu", "cpu.cfs_quota_us", quota.to_string(), false));
            }
            if mem != 0 {
                out.push(set(
                    "memory",
                    "memory.limit_in_bytes",
                    mem.to_string(),
                    false,
                ));
                // Memory and swap together: no swapping past the limit
                // (written after the limit: it may not be below it).
                out.push(set(
                    "memory",
                    "memory.memsw.limit_in_bytes",
                    mem.to_string(),
                    true,
                ));
            }
            if limits.pids != 0 {
                out.push(set("pids", "pids.max", limits.pids.to_string(), false));
            }
        }
        CgroupVersion::V2 => {
            if limits.cpu_millis != 0 {
                out.push(set(
                    "cpu",
                    "cpu.max",
                    format!("{quota} {CPU_PERIOD_US}"),
                    false,
                ));
            }
            if mem != 0 {
                out.push(set("memory", "memory.max", mem.to_string(), false));
                out.push(set("memory", "memory.swap.max", "0".to_owned(), true));
            }
            if limits.pids != 0 {
                out.push(set("pids", "pids.max", limits.pids.to_string(), false));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_are_read_as_thousandths() {
        for (text, millis) in [
            ("0.5", 500),
            ("2", 2000),
            ("500m", 500),
            (".25", 250),
            ("1.125", 1125),
            ("1.", 1000),
            (" 3 ", 3000),
            ("1m", 1),
            ("1024", 1_024_000),
        ] {
            assert_eq!(parse_cpu(text), Ok(millis), "{text}");
        }
    }

    #[test]
    fn bad_cpus_are_refused_naming_them() {
        for text in [
            "",
            "0",
            "0.0",
            "0m",
            "m",
            "-1",
            "+1",
            "+5m",
            "1.+5",
            "1.0001",
            "abc",
            "1..2",
            "1e3",
            "1025",
            "99999999999999999999",
        ] {
            let e = parse_cpu(text).expect_err(text);
            assert!(e.contains(&format!("`{text}`")), "{e}");
        }
        assert!(parse_cpu("0.0001").is_err_and(|e| e.contains("three decimals")));
        assert!(parse_cpu("1025").is_err_and(|e| e.contains("at most 1024")));
        assert!(parse_cpu("0").is_err_and(|e| e.contains("more than 0")));
    }

    #[test]
    fn memory_is_a_size_of_at_least_four_mib() {
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        assert_eq!(parse_memory("1GiB"), Ok(1 << 30));
        assert_eq!(parse_memory("4M"), Ok(MIN_MEMORY));
        assert!(parse_memory("4194303").is_err_and(|e| e.contains("at least 4 MiB")));
        assert!(parse_memory("lots").is_err_and(|e| e.starts_with("memory: ")));
    }

    #[test]
    fn pids_are_a_whole_number_within_what_the_kernel_takes() {
        assert_eq!(parse_pids(MIN_PIDS), Ok(8));
        assert_eq!(parse_pids(256), Ok(256));
        assert_eq!(parse_pids(MAX_PIDS), Ok(4 << 20));
        assert!(parse_pids(MIN_PIDS - 1).is_err_and(|e| e.contains("pids `7`: at least 8")));
        assert!(parse_pids(0).is_err_and(|e| e.contains("at least")));
        assert!(parse_pids(MAX_PIDS + 1).is_err_and(|e| e.contains("at most")));
        let p = Resources {
            pids: 64,
            ..Resources::default()
        };
        assert!(!p.is_none());
        assert_eq!(p.to_string(), "pids 64");
        assert_eq!(
            serde_json::to_string(&p).unwrap_or_default(),
            r#"{"pids":64}"#
        );
    }

    #[test]
    fn amounts_read_for_people() {
        assert_eq!(show_cpu(500), "0.5");
        assert_eq!(show_cpu(2000), "2");
        assert_eq!(show_cpu(1250), "1.25");
        assert_eq!(show_cpu(1), "0.001");
        assert_eq!(show_bytes(512 << 20), "512 MiB");
        assert_eq!(show_bytes(1 << 30), "1 GiB");
        assert_eq!(show_bytes(3 << 40), "3 TiB");
        assert_eq!(show_bytes(1536), "1536 B");
        assert_eq!(show_bytes(1024), "1 KiB");
        assert_eq!(show_bytes(1000), "1000 B");
        assert_eq!(show_bytes(0), "0 B");
        let r = Resources {
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            pids: 0,
        };
        assert_eq!(r.to_string(), "cpu 0.5, memory 256 MiB");
        assert_eq!(
            Resources {
                cpu_millis: 2000,
                memory_bytes: 0,
                pids: 0
            }
            .to_string(),
            "cpu 2"
        );
        assert_eq!(
            Resources {
                cpu_millis: 0,
                memory_bytes: 1 << 30,
                pids: 0
            }
            .to_string(),
            "memory 1 GiB"
        );
        assert_eq!(Resources::default().to_string(), "no resources");
    }

    #[test]
    fn nothing_declared_is_not_serialized() {
        assert!(Resources::default().is_none());
        assert_eq!(
            serde_json::to_string(&Resources::default()).unwrap_or_default(),
            "{}"
        );
        let half = Resources {
            cpu_millis: 500,
            memory_bytes: 0,
            pids: 0,
        };
        assert!(!half.is_none());
        assert!(
            !Resources {
                cpu_millis: 0,
                memory_bytes: 1,
                pids: 0
            }
            .is_none()
        );
        assert_eq!(
            serde_json::to_string(&half).unwrap_or_default(),
            r#"{"cpu_millis":500}"#
        );
        let mib = Resources {
            cpu_millis: 0,
            memory_bytes: 1 << 20,
            pids: 0,
        };
        assert_eq!(
            serde_json::to_string(&mib).unwrap_or_default(),
            r#"{"memory_bytes":1048576}"#
        );
    }

    #[test]
    fn capacity_not_registered_is_not_limited() {
        let c = Amount::capacity(2, 1024);
        assert_eq!(c.cpu_millis, 2000);
        assert_eq!(c.memory_bytes, 1 << 30);
        assert_eq!(Amount::capacity(0, 0).cpu_millis, u64::MAX);
        assert_eq!(Amount::capacity(0, 0).memory_bytes, u64::MAX);
        assert_eq!(Amount::capacity(u32::MAX, u64::MAX).memory_bytes, u64::MAX);
    }

    #[test]
    fn room_is_capacity_less_what_is_assigned() {
        let one = Resources {
            cpu_millis: 1000,
            memory_bytes: 256 << 20,
            pids: 0,
        };
        let room = Room::new(
            [
                ("a".to_owned(), Amount::capacity(2, 1024)),
                ("b".to_owned(), Amount::capacity(1, 256)),
            ],
            [("a", &one), ("b", &one), ("b", &one), ("gone", &one)],
        );
        assert_eq!(
            room.free("a"),
            Amount {
                cpu_millis: 1000,
                memory_bytes: 768 << 20
            }
        );
        // Overcommitted: nothing left, never less.
        assert_eq!(room.free("b"), Amount::default());
        assert!(room.free("b").fits(&Resources::default()));
        assert!(!room.free("b").fits(&one));
        assert!(room.free("a").fits(&one));
        assert!(!room.free("a").fits(&Resources {
            cpu_millis: 1001,
            memory_bytes: 0,
            pids: 0
        }));
        assert!(!room.free("a").fits(&Resources {
            cpu_millis: 0,
            memory_bytes: (768 << 20) + 1,
            pids: 0
        }));
        assert!(room.free("unknown").fits(&Resources {
            cpu_millis: u32::MAX,
            memory_bytes: u64::MAX,
            pids: 0
        }));
    }

    #[test]
    fn cgroup_files_hold_the_declared_limits_only() {
        let both = Resources {
            cpu_millis: 500,
            memory_bytes: 64 << 20,
            pids: 0,
        };
        let files = |v, r: &Resources| -> Vec<(&str, &str, String, bool)> {
            cgroup_settings(v, r)
                .into_iter()
                .map(|s| (s.controller, s.file, s.value, s.optional))
                .collect()
        };
        assert_eq!(
            files(CgroupVersion::V1, &both),
            vec![
                ("cpu", "cpu.cfs_period_us", "100000".to_owned(), false),
                ("cpu", "cpu.cfs_quota_us", "50000".to_owned(), false),
                (
                    "memory",
                    "memory.limit_in_bytes",
                    "67108864".to_owned(),
                    false
                ),
                (
                    "memory",
                    "memory.memsw.limit_in_bytes",
                    "67108864".to_owned(),
                    true
                ),
            ]
        );
        assert_eq!(
            files(CgroupVersion::V2, &both),
            vec![
                ("cpu", "cpu.max", "50000 100000".to_owned(), false),
                ("memory", "memory.max", "67108864".to_owned(), false),
                ("memory", "memory.swap.max", "0".to_owned(), true),
            ]
        );
        let two_cpus = Resources {
            cpu_millis: 2000,
            memory_bytes: 0,
            pids: 0,
        };
        assert_eq!(
            files(CgroupVersion::V2, &two_cpus),
            vec![("cpu", "cpu.max", "200000 100000".to_owned(), false)]
        );
        assert_eq!(files(CgroupVersion::V1, &two_cpus).len(), 2);
        let pids = Resources {
            pids: 64,
            ..Resources::default()
        };
        for v in [CgroupVersion::V1, CgroupVersion::V2] {
            assert_eq!(
                files(v, &pids),
                vec![("pids", "pids.max", "64".to_owned(), false)]
            );
        }
        assert!(cgroup_settings(CgroupVersion::V1, &Resources::default()).is_empty());
        assert!(cgroup_settings(CgroupVersion::V2, &Resources::default()).is_empty());
    }
}
