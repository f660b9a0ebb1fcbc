//! Times the way `qstat -f` writes them: `ctime(3)` style in local time,
//! `Thu Nov 26 05:40:00 2026`.
//!
//! The conversion to local time is the C library's `localtime_r` (it honours
//! `TZ` and the system zone, as PBS does, and spares a date crate); the fields
//! are then written by [`format_ctime`] with English names, as PBS prints them
//! whatever the locale.

/// The broken-down fields of a time that [`format_ctime`] prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Civil {
    /// Year, e.g. 2026.
    pub(crate) year: i64,
    /// Month, 0 = January.
    pub(crate) month: usize,
    /// Day of the month, 1..=31.
    pub(crate) day: u32,
    /// Day of the week, 0 = Sunday.
    pub(crate) weekday: usize,
    /// Hour, minute, second.
    pub(crate) hms: (u32, u32, u32),
}

const WEEKDAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] =
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// `%a %b %e %H:%M:%S %Y`.
pub(crate) fn format_ctime(c: &Civil) -> String {
    let (h, m, s) = c.hms;
    format!(
        "{} {} {:>2} {h:02}:{m:02}:{s:02} {}",
        WEEKDAYS[c.weekday % 7],
        MONTHS[c.month % 12],
        c.day,
        c.year
    )
}

/// Unix seconds in local time, ctime style.
pub(crate) fn local_ctime(secs: u64) -> String {
    let civil = local_civil(secs).unwrap_or_else(|| utc_civil(secs));
    format_ctime(&civil)
}

fn local_civil(secs: u64) -> Option<Civil> {
    let t = libc::time_t::try_from(secs).ok()?;
    // SAFETY: `libc::tm` is plain integers and one nullable pointer
    // (`tm_zone`), for all of which zero is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call;
    // `localtime_r` reads `t` and writes only into `tm` (it is the re-entrant
    // form, touching no shared buffer).
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    ok.then(|| Civil {
        year: i64::from(tm.tm_year) + 1900,
        month: usize::try_from(tm.tm_mon).unwrap_or(0),
        day: u32::try_from(tm.tm_mday).unwrap_or(1),
        weekday: usize::try_from(tm.tm_wday).unwrap_or(0),
        hms: (
            u32::try_from(tm.tm_hour).unwrap_or(0),
            u32::try_from(tm.tm_min).unwrap_or(0),
            u32::try_from(tm.tm_sec).unwrap_or(0),
        ),
    })
}

/// UTC fields of Unix seconds: the fallback when the C library cannot convert.
/// Days to a civil date by Howard Hinnant's `civil_from_days` algorithm
/// (<https://howardhinnant.github.io/date_algorithms.html>).
pub(crate) fn utc_civil(secs: u64) -> Civil {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month: (month - 1) as usize,
        day: day as u32,
        // 1970-01-01 was a Thursday.
        weekday: ((days + 4).rem_euclid(7)) as usize,
        hms: ((rem / 3600) as u32, (rem / 60 % 60) as u32, (rem % 60) as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctime_layout() {
        let c = Civil { year: 2026, month: 10, day: 26, weekday: 4, hms: (5, 40, 0) };
        assert_eq!(format_ctime(&c), "Thu Nov 26 05:40:00 2026");
        let c = Civil { year: 2026, month: 0, day: 3, weekday: 6, hms: (23, 5, 9) };
        assert_eq!(format_ctime(&c), "Sat Jan  3 23:05:09 2026");
    }

    #[test]
    fn utc_fields() {
        assert_eq!(format_ctime(&utc_civil(0)), "Thu Jan  1 00:00:00 1970");
        assert_eq!(format_ctime(&utc_civil(1_795_671_600)), "Thu Nov 26 05:40:00 2026");
        assert_eq!(format_ctime(&utc_civil(951_782_400)), "Tue Feb 29 00:00:00 2000");
    }

    #[test]
    fn local_time_has_the_shape() {
        let s = local_ctime(1_795_671_600);
        assert_eq!(s.len(), 24, "{s}");
        assert!(s.ends_with(" 2026"), "{s}");
    }
}
