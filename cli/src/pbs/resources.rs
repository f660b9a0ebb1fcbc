//! `qsub -l` resource requests, and the PBS spellings of durations and sizes.
//!
//! A `-l` value is a comma-separated list of `name=value` items. Each item is
//! parsed on its own into [`ResourceItem`]s (so an error names the item and,
//! for a directive, its line); the items of every `-l` (directives first, then
//! the command line) are then folded in order into one [`Resources`], a later
//! item overriding an earlier one of the same kind. That is how the command
//! line wins over `#PBS` lines.
//!
//! picloud places every job on one node, so `select=N` and `nodes=N` with
//! `N > 1` are refused; `select=1:ncpus=4:mem=2gb` and `nodes=1:ppn=4` give the
//! single chunk's cores and memory. Resources picloud does not interpret
//! (`place`, `ngpus`, `host`...) are kept as given in [`Resources::other`].

use picloud_proto::Resources;

/// One interpreted piece of a `-l` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ResourceItem {
    /// CPU cores (`ncpus=`, `ppn=`, or a select chunk's `ncpus=`).
    Ncpus(u32),
    /// Memory limit in bytes (`mem=`).
    Mem(u64),
    /// Wall-clock limit in seconds (`walltime=`).
    Walltime(u64),
    /// Anything else, kept verbatim.
    Other(String, String),
}

/// Why a `-l` item is invalid. The caller names the item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ResourceError {
    /// The item is not `name=value`.
    #[error("expected NAME=VALUE")]
    NotNameValue,
    /// A malformed walltime.
    #[error("walltime must be [[HH:]MM:]SS")]
    WalltimeFormat,
    /// Minutes or seconds of 60 or more below a larger field.
    #[error("walltime {field} must be less than 60")]
    WalltimeField {
        /// `minutes` or `seconds`.
        field: &'static str,
    },
    /// A zero walltime.
    #[error("walltime must be more than zero")]
    WalltimeZero,
    /// A walltime too large to represent.
    #[error("walltime is too large")]
    WalltimeTooLarge,
    /// A malformed memory size.
    #[error("{name} must be a whole number with a unit b, kb, mb, gb or tb (e.g. 4gb)")]
    MemFormat {
        /// Which resource (`mem`).
        name: String,
    },
    /// A memory size too large to represent.
    #[error("{name} is too large")]
    MemTooLarge {
        /// Which resource.
        name: String,
    },
    /// A zero memory size.
    #[error("{name} must be more than zero")]
    MemZero {
        /// Which resource.
        name: String,
    },
    /// A count (`ncpus`, `ppn`, the chunk count) that is not a positive integer.
    #[error("{name} must be a whole number of at least 1")]
    Count {
        /// Which count.
        name: String,
    },
    /// More than one node or chunk asked for.
    #[error(
        "picloud runs each job on a single node; ask for {what}=1 with more cores \
         (e.g. {example}) instead of {what}={count}"
    )]
    MultiNode {
        /// `select` or `nodes`.
        what: &'static str,
        /// The count given.
        count: u64,
        /// A single-node spelling to suggest.
        example: &'static str,
    },
    /// A select with several chunk specifications joined by `+`.
    #[error("picloud runs each job on a single node; a select of several chunks (`+`) is not supported")]
    MultiChunk,
    /// A Torque node property or host name inside `nodes=`.
    #[error("node properties and host names ('{0}') are not supported in nodes=")]
    NodeProperty(String),
}

/// Parses one `-l` value (`walltime=1:00:00,mem=4gb`) into items. On error,
/// returns the offending item's text with the reason.
pub(crate) fn parse_list(list: &str) -> Result<Vec<ResourceItem>, (String, ResourceError)> {
    let mut items = Vec::new();
    let mut any = false;
    for raw in list.split(',') {
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        any = true;
        parse_item(raw, &mut items).map_err(|e| (raw.to_string(), e))?;
    }
    if !any {
        return Err((list.to_string(), ResourceError::NotNameValue));
    }
    Ok(items)
}

/// Parses one `name=value` item, appending what it means to `out`.
fn parse_item(raw: &str, out: &mut Vec<ResourceItem>) -> Result<(), ResourceError> {
    let (name, value) = raw.split_once('=').ok_or(ResourceError::NotNameValue)?;
    let (name, value) = (name.trim(), value.trim());
    if name.is_empty() || value.is_empty() {
        return Err(ResourceError::NotNameValue);
    }
    match name.to_ascii_lowercase().as_str() {
        "ncpus" => out.push(ResourceItem::Ncpus(parse_count("ncpus", value)?)),
        "mem" => out.push(ResourceItem::Mem(parse_mem("mem", value)?)),
        "walltime" => out.push(ResourceItem::Walltime(parse_walltime(value)?)),
        "select" => parse_select(value, out)?,
        "nodes" => parse_nodes(value, out)?,
        _ => out.push(ResourceItem::Other(name.to_string(), value.to_string())),
    }
    Ok(())
}

/// `select=N[:res=value...]`: one chunk only.
fn parse_select(value: &str, out: &mut Vec<ResourceItem>) -> Result<(), ResourceError> {
    if value.contains('+') {
        return Err(ResourceError::MultiChunk);
    }
    let mut parts = value.split(':');
    let first = parts.next().unwrap_or_default();
    // The chunk count may be omitted: `select=ncpus=4` means one chunk.
    let rest: Vec<&str> = if first.contains('=') {
        std::iter::once(first).chain(parts).collect()
    } else {
        let count = parse_count_u64("select", first)?;
        if count > 1 {
            return Err(ResourceError::MultiNode { what: "select", count, example: "select=1:ncpus=8" });
        }
        parts.collect()
    };
    for part in rest {
        let (name, v) = part.split_once('=').ok_or(ResourceError::NotNameValue)?;
        match name.to_ascii_lowercase().as_str() {
            "ncpus" => out.push(ResourceItem::Ncpus(parse_count("ncpus", v)?)),
            "mem" => out.push(ResourceItem::Mem(parse_mem("mem", v)?)),
            _ => out.push(ResourceItem::Other(name.to_string(), v.to_string())),
        }
    }
    Ok(())
}

/// Torque's `nodes=N[:ppn=P]`: one node only.
fn parse_nodes(value: &str, out: &mut Vec<ResourceItem>) -> Result<(), ResourceError> {
    let mut parts = value.split(':');
    let first = parts.next().unwrap_or_default();
    if !first.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ResourceError::NodeProperty(first.to_string()));
    }
    let count = parse_count_u64("nodes", first)?;
    if count > 1 {
        return Err(ResourceError::MultiNode { what: "nodes", count, example: "nodes=1:ppn=8" });
    }
    for part in parts {
        match part.split_once('=') {
            Some((name, v)) if name.eq_ignore_ascii_case("ppn") => {
                out.push(ResourceItem::Ncpus(parse_count("ppn", v)?));
            }
            Some((name, v)) => out.push(ResourceItem::Other(name.to_string(), v.to_string())),
            None => return Err(ResourceError::NodeProperty(part.to_string())),
        }
    }
    Ok(())
}

fn parse_count_u64(name: &str, value: &str) -> Result<u64, ResourceError> {
    let err = || ResourceError::Count { name: name.to_string() };
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    match value.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(err()),
    }
}

fn parse_count(name: &str, value: &str) -> Result<u32, ResourceError> {
    let n = parse_count_u64(name, value)?;
    u32::try_from(n).map_err(|_| ResourceError::Count { name: name.to_string() })
}

/// Parses a PBS size: a whole number with an optional unit `b`, `kb`, `mb`,
/// `gb`, `tb`, `pb` (any case; `k`, `m`, `g`, `t`, `p` too). Units are binary
/// (`kb` = 1024 bytes), as in PBS; a bare number is bytes.
pub(crate) fn parse_mem(name: &str, value: &str) -> Result<u64, ResourceError> {
    let format = || ResourceError::MemFormat { name: name.to_string() };
    let value = value.trim();
    let digits_end = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (digits, unit) = value.split_at(digits_end);
    if digits.is_empty() {
        return Err(format());
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" => 10,
        "m" | "mb" => 20,
        "g" | "gb" => 30,
        "t" | "tb" => 40,
        "p" | "pb" => 50,
        _ => return Err(format()),
    };
    let too_large = || ResourceError::MemTooLarge { name: name.to_string() };
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(too_large)?;
    if bytes == 0 {
        return Err(ResourceError::MemZero { name: name.to_string() });
    }
    Ok(bytes)
}

/// Parses `[[HH:]MM:]SS` into seconds. Hours may be any number of digits
/// (`100:0:0`); minutes and seconds must be below 60 when a larger field is
/// present (`90:00` is ninety minutes, `1:90:00` is an error).
pub(crate) fn parse_walltime(value: &str) -> Result<u64, ResourceError> {
    let fields: Vec<&str> = value.trim().split(':').collect();
    if fields.len() > 3 || fields.iter().any(|f| f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit())) {
        return Err(ResourceError::WalltimeFormat);
    }
    let nums: Vec<u64> = fields
        .iter()
        .map(|f| f.parse::<u64>().map_err(|_| ResourceError::WalltimeTooLarge))
        .collect::<Result<_, _>>()?;
    // `nums` holds [HH, MM, SS], [MM, SS] or [SS]; every field but the first is bounded.
    let bounded = &nums[1..];
    let names = if nums.len() == 3 { ["minutes", "seconds"].as_slice() } else { ["seconds"].as_slice() };
    for (n, field) in bounded.iter().zip(names) {
        if *n >= 60 {
            return Err(ResourceError::WalltimeField { field });
        }
    }
    let total = nums
        .iter()
        .try_fold(0u64, |acc, &n| acc.checked_mul(60).and_then(|a| a.checked_add(n)))
        .ok_or(ResourceError::WalltimeTooLarge)?;
    if total == 0 {
        return Err(ResourceError::WalltimeZero);
    }
    Ok(total)
}

/// Folds items in order into a request: a later item wins over an earlier one
/// of the same kind (and, for [`ResourceItem::Other`], of the same name).
pub(crate) fn fold(items: &[ResourceItem]) -> Resources {
    let mut res = Resources::default();
    for item in items {
        match item {
            ResourceItem::Ncpus(n) => res.ncpus = *n,
            ResourceItem::Mem(m) => res.mem = Some(*m),
            ResourceItem::Walltime(w) => res.walltime = Some(*w),
            ResourceItem::Other(name, value) => {
                match res.other.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
                    Some(slot) => slot.1 = value.clone(),
                    None => res.other.push((name.clone(), value.clone())),
                }
            }
        }
    }
    res
}

/// Seconds as PBS shows durations: `HH:MM:SS`, hours unbounded (`100:00:00`).
pub(crate) fn format_duration(secs: u64) -> String {
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// A requested size as PBS shows it: in the largest unit that is exact
/// (`1gb`, `1536mb`, `100b`).
pub(crate) fn format_size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "tb"), (30, "gb"), (20, "mb"), (10, "kb")];
    for (shift, unit) in UNITS {
        let scale = 1u64 << shift;
        // `scale` is a power of two: a multiple of it has no lower bits set.
        if bytes >= scale && bytes & (scale - 1) == 0 {
            return format!("{}{unit}", bytes / scale);
        }
    }
    format!("{bytes}b")
}

/// A used size as PBS shows `resources_used.mem`: kilobytes, rounded up.
pub(crate) fn format_kb(bytes: u64) -> String {
    format!("{}kb", bytes.div_ceil(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(s: &str) -> Vec<ResourceItem> {
        parse_list(s).unwrap()
    }

    fn err(s: &str) -> (String, ResourceError) {
        parse_list(s).unwrap_err()
    }

    #[test]
    fn walltime_forms() {
        assert_eq!(parse_walltime("1:00:00"), Ok(3600));
        assert_eq!(parse_walltime("01:02:03"), Ok(3723));
        assert_eq!(parse_walltime("100:0:0"), Ok(360_000));
        assert_eq!(parse_walltime("30:00"), Ok(1800));
        assert_eq!(parse_walltime("90:00"), Ok(5400), "minutes are unbounded when they lead");
        assert_eq!(parse_walltime("45"), Ok(45));
        assert_eq!(parse_walltime("7200"), Ok(7200));
        assert_eq!(parse_walltime("0:0:1"), Ok(1));
    }

    #[test]
    fn walltime_errors() {
        for bad in ["abc", "", "1:2:3:4", "1::00", ":30", "1:00:", "-5", "1.5", "1h"] {
            assert_eq!(parse_walltime(bad), Err(ResourceError::WalltimeFormat), "{bad}");
        }
        assert_eq!(parse_walltime("1:60:00"), Err(ResourceError::WalltimeField { field: "minutes" }));
        assert_eq!(parse_walltime("1:00:60"), Err(ResourceError::WalltimeField { field: "seconds" }));
        assert_eq!(parse_walltime("10:75"), Err(ResourceError::WalltimeField { field: "seconds" }));
        assert_eq!(parse_walltime("0:00:00"), Err(ResourceError::WalltimeZero));
        assert_eq!(parse_walltime("99999999999999999999"), Err(ResourceError::WalltimeTooLarge));
        assert_eq!(ResourceError::WalltimeFormat.to_string(), "walltime must be [[HH:]MM:]SS");
    }

    #[test]
    fn mem_units() {
        assert_eq!(parse_mem("mem", "100"), Ok(100));
        assert_eq!(parse_mem("mem", "100b"), Ok(100));
        assert_eq!(parse_mem("mem", "1kb"), Ok(1024));
        assert_eq!(parse_mem("mem", "4KB"), Ok(4096));
        assert_eq!(parse_mem("mem", "2mb"), Ok(2 << 20));
        assert_eq!(parse_mem("mem", "3Gb"), Ok(3 << 30));
        assert_eq!(parse_mem("mem", "1tb"), Ok(1 << 40));
        assert_eq!(parse_mem("mem", "4g"), Ok(4 << 30));
        for bad in ["", "gb", "1.5gb", "4xb", "-1", "4 gb", "1w"] {
            assert!(matches!(parse_mem("mem", bad), Err(ResourceError::MemFormat { .. })), "{bad}");
        }
        assert!(matches!(parse_mem("mem", "0gb"), Err(ResourceError::MemZero { .. })));
        assert!(matches!(parse_mem("mem", "99999999999pb"), Err(ResourceError::MemTooLarge { .. })));
        assert!(matches!(parse_mem("mem", "999999999999999999999"), Err(ResourceError::MemTooLarge { .. })));
    }

    #[test]
    fn plain_items_and_others() {
        assert_eq!(
            items("ncpus=4,mem=1gb,walltime=1:00:00,place=scatter, ngpus=1"),
            vec![
                ResourceItem::Ncpus(4),
                ResourceItem::Mem(1 << 30),
                ResourceItem::Walltime(3600),
                ResourceItem::Other("place".into(), "scatter".into()),
                ResourceItem::Other("ngpus".into(), "1".into()),
            ]
        );
        assert_eq!(items("NCPUS=2"), vec![ResourceItem::Ncpus(2)]);
        assert_eq!(err("walltime=abc"), ("walltime=abc".into(), ResourceError::WalltimeFormat));
        assert_eq!(err("ncpus=0").1, ResourceError::Count { name: "ncpus".into() });
        assert_eq!(err("ncpus=x").1, ResourceError::Count { name: "ncpus".into() });
        assert_eq!(err("ncpus=99999999999").1, ResourceError::Count { name: "ncpus".into() });
        assert_eq!(err("mem=4,foo").0, "foo");
        assert_eq!(err("foo").1, ResourceError::NotNameValue);
        assert_eq!(err("=3").1, ResourceError::NotNameValue);
        assert_eq!(err("").1, ResourceError::NotNameValue);
    }

    #[test]
    fn select_chunks() {
        assert_eq!(
            items("select=1:ncpus=8:mem=2gb:ngpus=1"),
            vec![
                ResourceItem::Ncpus(8),
                ResourceItem::Mem(2 << 30),
                ResourceItem::Other("ngpus".into(), "1".into()),
            ]
        );
        assert_eq!(items("select=1"), vec![], "one default chunk changes nothing");
        assert_eq!(items("select=ncpus=3"), vec![ResourceItem::Ncpus(3)]);
        let (item, e) = err("select=2:ncpus=4");
        assert_eq!(item, "select=2:ncpus=4");
        assert!(matches!(e, ResourceError::MultiNode { what: "select", count: 2, .. }));
        assert!(e.to_string().contains("single node"), "{e}");
        assert!(matches!(err("select=4").1, ResourceError::MultiNode { count: 4, .. }));
        assert_eq!(err("select=1:ncpus=2+1:ncpus=4").1, ResourceError::MultiChunk);
        assert_eq!(err("select=0").1, ResourceError::Count { name: "select".into() });
        assert_eq!(err("select=1:ncpus=0").1, ResourceError::Count { name: "ncpus".into() });
        assert_eq!(err("select=1:fast").1, ResourceError::NotNameValue);
    }

    #[test]
    fn torque_nodes() {
        assert_eq!(items("nodes=1:ppn=4"), vec![ResourceItem::Ncpus(4)]);
        assert_eq!(items("nodes=1"), vec![]);
        assert!(matches!(err("nodes=2:ppn=4").1, ResourceError::MultiNode { what: "nodes", count: 2, .. }));
        assert_eq!(err("nodes=1:ppn=0").1, ResourceError::Count { name: "ppn".into() });
        assert_eq!(err("nodes=node07:ppn=2").1, ResourceError::NodeProperty("node07".into()));
        assert_eq!(err("nodes=1:fast").1, ResourceError::NodeProperty("fast".into()));
        assert_eq!(items("nodes=1:ppn=2:gpus=1")[1], ResourceItem::Other("gpus".into(), "1".into()));
    }

    #[test]
    fn fold_later_wins() {
        let r = fold(&[
            ResourceItem::Ncpus(2),
            ResourceItem::Other("place".into(), "pack".into()),
            ResourceItem::Walltime(60),
            ResourceItem::Ncpus(4),
            ResourceItem::Other("PLACE".into(), "scatter".into()),
        ]);
        assert_eq!(r.ncpus, 4);
        assert_eq!(r.walltime, Some(60));
        assert_eq!(r.mem, None);
        assert_eq!(r.other, vec![("place".to_string(), "scatter".to_string())]);
        assert_eq!(fold(&[]), Resources::default());
    }

    #[test]
    fn formatting() {
        assert_eq!(format_duration(0), "00:00:00");
        assert_eq!(format_duration(3723), "01:02:03");
        assert_eq!(format_duration(360_000), "100:00:00");
        assert_eq!(format_size(1 << 30), "1gb");
        assert_eq!(format_size(1536 << 20), "1536mb");
        assert_eq!(format_size(2 << 40), "2tb");
        assert_eq!(format_size(4096), "4kb");
        assert_eq!(format_size(100), "100b");
        assert_eq!(format_kb(0), "0kb");
        assert_eq!(format_kb(1), "1kb");
        assert_eq!(format_kb(1 << 20), "1024kb");
    }
}
