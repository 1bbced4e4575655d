//! Printing results: text for people, JSON for programs, nothing but errors
//! with `-q`. Errors always go to stderr as one line (or one JSON object).

use std::fmt::Write as _;

use ployz_api::ApiError;
use serde::Serialize;

pub struct Output {
    json: bool,
    quiet: bool,
}

impl Output {
    pub fn new(json: bool, quiet: bool) -> Self {
        Self { json, quiet }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints `value` as JSON, or the text `human` renders.
    pub fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        if self.json {
            match serde_json::to_string_pretty(value) {
                Ok(text) => println!("{text}"),
                Err(error) => eprintln!("ployzctl: internal: cannot encode JSON output: {error}"),
            }
        } else if !self.quiet {
            print!("{}", human());
        }
    }

    /// True when progress lines are wanted: text output, not quiet, stderr a terminal.
    pub fn shows_progress(&self) -> bool {
        !self.json && !self.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())
    }

    /// Progress on stderr, for people only.
    pub fn progress(&self, line: &str) {
        if !self.json && !self.quiet {
            eprintln!("{line}");
        }
    }

    pub fn error(&self, error: &ApiError) {
        if self.json {
            let value = serde_json::json!({
                "error": { "class": error.class.as_str(), "code": error.code, "message": error.message }
            });
            eprintln!("{value}");
        } else {
            eprintln!("error[{}]: {}", error.code, error.message);
        }
    }
}

/// Renders rows as left-aligned columns with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}  ");
            }
        }
        text.push_str(out.trim_end());
        text.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    text
}

/// `1234567` ms as `20m34s`.
pub fn duration_ms(ms: u64) -> String {
    let seconds = ms / 1000;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        3600..86400 => format!("{}h{:02}m", seconds / 3600, (seconds % 3600) / 60),
        _ => format!("{}d{:02}h", seconds / 86400, (seconds % 86400) / 3600),
    }
}

/// Now, in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// A Unix-ms timestamp as UTC `2026-11-23T16:02:36Z` (0 prints `-`).
pub fn timestamp(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".to_owned();
    }
    let seconds = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX);
    let (days, rem) = (seconds.div_euclid(86400), seconds.rem_euclid(86400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian, UTC).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_iso8601() {
        assert_eq!(timestamp(0), "-");
        assert_eq!(timestamp(1_000), "1970-01-01T00:00:01Z");
        assert_eq!(timestamp(1_795_449_756_000), "2026-11-23T16:02:36Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn durations_are_compact() {
        assert_eq!(duration_ms(999), "0s");
        assert_eq!(duration_ms(61_000), "1m01s");
        assert_eq!(duration_ms(3_660_000), "1h01m");
        assert_eq!(duration_ms(90_000_000), "1d01h");
    }

    #[test]
    fn tables_align_columns() {
        let text = table(&["ID", "STATE"], &[vec!["a-long-id".into(), "ok".into()]]);
        assert_eq!(text, "ID         STATE\na-long-id  ok\n");
    }
}
