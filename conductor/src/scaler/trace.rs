//! Load traces as found in the wild: CSV, time in the first column and the
//! value in the second whatever the header says, steps derived from the
//! data, gaps and irregular rows bucketed and reported, never a panic.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use jiff::civil::DateTime;
use jiff::tz::TimeZone;

/// A trace's problem, naming the file and line.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {reason}", path.display())]
    Row {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: {reason}", path.display())]
    Whole { path: PathBuf, reason: String },
}

/// A trace on a regular grid of buckets.
#[derive(Debug, Clone)]
pub struct Trace {
    pub path: PathBuf,
    /// What the second column is called, if the file had a header.
    pub value_name: Option<String>,
    /// Time of the first bucket.
    pub start: Timestamp,
    pub step: Duration,
    /// One value per bucket; `NaN` where the trace has no data.
    pub values: Vec<f64>,
    pub report: Report,
}

/// What bucketing did to the rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub rows: usize,
    /// Rows whose value was empty or `NA`/`NaN`.
    pub missing_values: usize,
    /// Rows earlier than the row before them (sorted).
    pub out_of_order: usize,
    /// Rows that shared a bucket with another (averaged).
    pub merged: usize,
    /// Rows off the grid by more than a tenth of a step (snapped).
    pub off_grid: usize,
    /// Buckets without any row, and the runs they form.
    pub empty_buckets: usize,
    pub gaps: usize,
    pub longest_gap: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rows", self.rows)?;
        if self.empty_buckets > 0 {
            write!(
                f,
                ", {} empty buckets in {} gaps (longest {})",
                self.empty_buckets, self.gaps, self.longest_gap
            )?;
        }
        for (n, what) in [
            (self.missing_values, "without a value"),
            (self.out_of_order, "out of order (sorted)"),
            (self.merged, "sharing a bucket (averaged)"),
            (self.off_grid, "off the grid (snapped)"),
        ] {
            if n > 0 {
                write!(f, ", {n} rows {what}")?;
            }
        }
        Ok(())
    }
}

/// Longest trace accepted, in buckets: a stray timestamp years away would
/// otherwise allocate gigabytes of empty buckets.
const MAX_BUCKETS: usize = 5_000_000;

pub fn load(path: &Path, step: Option<Duration>) -> Result<Trace, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text, step)
}

/// Parses `text` (the contents of `path`, named in errors). `step`
/// overrides the step derived from the data.
pub fn parse(path: &Path, text: &str, step: Option<Duration>) -> Result<Trace, TraceError> {
    let row_error = |line, reason: String| TraceError::Row {
        path: path.to_owned(),
        line,
        reason,
    };
    let mut rows: Vec<(i128, f64)> = Vec::new();
    let mut value_name = None;
    let mut report = Report::default();
    let mut seen_first = false;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = raw.split(',').map(|f| f.trim().trim_matches('"')).collect();
        if fields.len() < 2 {
            return Err(row_error(
                line,
                format!("expected time,value but found {} column", fields.len()),
            ));
        }
        let first = !seen_first;
        seen_first = true;
        let time = match parse_time(fields[0]) {
            Ok(t) => t,
            // A header: the first line, neither column data.
            Err(_) if first && parse_value(fields[1]).is_err() => {
                value_name = Some(fields[1].to_owned());
                continue;
            }
            Err(reason) => return Err(row_error(line, format!("time {:?}: {reason}", fields[0]))),
        };
        let value = parse_value(fields[1])
            .map_err(|reason| row_error(line, format!("value {:?}: {reason}", fields[1])))?;
        if value.is_nan() {
            report.missing_values += 1;
        }
        if rows.last().is_some_and(|(t, _)| *t > time) {
            report.out_of_order += 1;
        }
        rows.push((time, value));
    }
    report.rows = rows.len();
    let whole = |reason: String| TraceError::Whole {
        path: path.to_owned(),
        reason,
    };
    if rows.len() < 2 {
        return Err(whole(format!(
            "{} data rows; a trace needs at least two",
            rows.len()
        )));
    }
    rows.sort_by_key(|(t, _)| *t);
    let step_ns = match step {
        Some(step) => step.as_nanos() as i128,
        None => median_step(&rows)
            .ok_or_else(|| whole("every row has the same time; no step to derive".into()))?,
    };
    if step_ns <= 0 {
        return Err(whole("the step must be longer than 0".into()));
    }
    let t0 = rows[0].0;
    let span = (rows[rows.len() - 1].0 - t0) / step_ns;
    let buckets = usize::try_from(span)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    if buckets > MAX_BUCKETS {
        return Err(whole(format!(
            "spans {buckets} steps of {}; at most {MAX_BUCKETS} are simulated (pass a longer --step)",
            humantime::format_duration(Duration::from_nanos(step_ns as u64))
        )));
    }
    let mut sums = vec![0.0; buckets];
    let mut counts = vec![0u32; buckets];
    for (t, v) in &rows {
        let offset = t - t0;
        let index = ((offset + step_ns / 2) / step_ns) as usize;
        let index = index.min(buckets - 1);
        let off = (offset - index as i128 * step_ns).abs();
        if off * 10 > step_ns {
            report.off_grid += 1;
        }
        if v.is_finite() {
            if counts[index] > 0 {
                report.merged += 1;
            }
            sums[index] += v;
            counts[index] += 1;
        }
    }
    let values: Vec<f64> = sums
        .iter()
        .zip(&counts)
        .map(|(s, &c)| if c == 0 { f64::NAN } else { s / f64::from(c) })
        .collect();
    let mut run = 0;
    for v in &values {
        if v.is_nan() {
            report.empty_buckets += 1;
            run += 1;
            report.longest_gap = report.longest_gap.max(run);
        } else {
            if run > 0 {
                report.gaps += 1;
            }
            run = 0;
        }
    }
    let start = Timestamp::from_nanosecond(t0)
        .map_err(|e| whole(format!("first time is out of range: {e}")))?;
    Ok(Trace {
        path: path.to_owned(),
        value_name,
        start,
        step: Duration::from_nanos(step_ns as u64),
        values,
        report,
    })
}

/// The most common spacing: the median of the positive differences, so a
/// few gaps or doubled rows do not change it.
fn median_step(rows: &[(i128, f64)]) -> Option<i128> {
    let mut steps: Vec<i128> = rows
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .filter(|d| *d > 0)
        .collect();
    if steps.is_empty() {
        return None;
    }
    let mid = steps.len() / 2;
    Some(*steps.select_nth_unstable(mid).1)
}

/// Nanoseconds since the epoch from RFC 3339 (`2012-01-01T00:00:00Z`,
/// with any offset), a civil time read as UTC (`2012-01-01 00:00:00`), a
/// date, or Unix seconds.
fn parse_time(field: &str) -> Result<i128, String> {
    if let Ok(ts) = field.parse::<Timestamp>() {
        return Ok(ts.as_nanosecond());
    }
    if let Ok(dt) = field.parse::<DateTime>() {
        return dt
            .to_zoned(TimeZone::UTC)
            .map(|z| z.timestamp().as_nanosecond())
            .map_err(|e| e.to_string());
    }
    if let Ok(secs) = field.parse::<f64>()
        && secs.is_finite()
    {
        return Ok((secs * 1e9) as i128);
    }
    Err("not a time (expected RFC 3339, YYYY-MM-DD HH:MM:SS, or Unix seconds)".into())
}

fn parse_value(field: &str) -> Result<f64, String> {
    if field.is_empty() || field.eq_ignore_ascii_case("na") || field.eq_ignore_ascii_case("nan") {
        return Ok(f64::NAN);
    }
    let v: f64 = field.parse().map_err(|_| "not a number".to_owned())?;
    if !v.is_finite() {
        return Err("not a finite number".into());
    }
    if v < 0.0 {
        return Err("a load cannot be negative".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Trace, TraceError> {
        parse(Path::new("t.csv"), text, None)
    }

    #[test]
    fn any_header_names_the_columns_by_position() {
        for header in ["ds,y", "timestamp,value", "when,load"] {
            let t = parse_str(&format!(
                "{header}\n2012-01-01 00:00:00,1\n2012-01-01 01:00:00,2\n"
            ))
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(t.values, vec![1.0, 2.0]);
            assert_eq!(t.step, Duration::from_secs(3600));
            assert_eq!(t.value_name.as_deref(), header.split(',').nth(1));
        }
        let t = parse_str("2012-01-01 00:00:00,1\n2012-01-01 00:01:00,2\n").unwrap();
        assert_eq!((t.value_name, t.step), (None, Duration::from_secs(60)));
    }

    #[test]
    fn rfc3339_with_offsets_and_unix_seconds() {
        let t = parse_str(
            "time,v\n2024-03-01T10:00:00+01:00,5\n2024-03-01T09:00:30Z,6\n2024-03-01T09:01:00Z,7\n",
        )
        .unwrap();
        assert_eq!(t.values, vec![5.0, 6.0, 7.0]);
        assert_eq!(t.step, Duration::from_secs(30));
        let t = parse_str("1700000000,1\n1700000010,2\n1700000020,3\n").unwrap();
        assert_eq!(t.step, Duration::from_secs(10));
    }

    #[test]
    fn gaps_are_bucketed_and_reported() {
        // A business closed from 02:00 to 05:00.
        let t = parse_str(
            "ds,y\n2012-01-01 00:00:00,1\n2012-01-01 01:00:00,2\n2012-01-01 05:00:00,3\n2012-01-01 06:00:00,4\n",
        )
        .unwrap();
        assert_eq!(t.values.len(), 7);
        assert!(t.values[2..5].iter().all(|v| v.is_nan()));
        assert_eq!(
            (t.report.empty_buckets, t.report.gaps, t.report.longest_gap),
            (3, 1, 3)
        );
        assert!(t.report.to_string().contains("3 empty buckets in 1 gaps"));
    }

    #[test]
    fn irregular_rows_are_snapped_merged_and_sorted() {
        let t = parse_str("0,1\n60,2\n125,3\n150,5\n120,1\n240,4\n").unwrap();
        assert_eq!(t.step, Duration::from_secs(60));
        // 125 joins the bucket at 120 s; 150 is half a step off and
        // snaps to 180 s.
        assert_eq!(t.values, vec![1.0, 2.0, 2.0, 5.0, 4.0]);
        assert_eq!(t.report.out_of_order, 1);
        assert_eq!(t.report.merged, 1);
        assert_eq!(t.report.off_grid, 1);
    }

    #[test]
    fn missing_values_are_gaps_not_errors() {
        let t = parse_str("0,1\n10,NA\n20,\n30,4\n").unwrap();
        assert_eq!(t.report.missing_values, 2);
        assert_eq!(t.report.empty_buckets, 2);
    }

    #[test]
    fn malformed_rows_name_their_line() {
        let cases = [
            (
                "ds,y\n2012-01-01 00:00:00,1\n2012-01-01 01:00:00,abc\n",
                ":3: value \"abc\": not a number",
            ),
            (
                "ds,y\n2012-01-01 00:00:00,1\nyesterday,2\n",
                ":3: time \"yesterday\"",
            ),
            ("0,1\n10\n", ":2: expected time,value"),
            (
                "0,1\n10,-4\n",
                ":2: value \"-4\": a load cannot be negative",
            ),
            ("ds,y\n", "0 data rows"),
            ("5,1\n5,2\n", "same time"),
            ("0,1\n10,2\n20,3\n999999999999,4\n", "at most"),
        ];
        for (text, expected) in cases {
            let error = parse_str(text).map(|_| ()).unwrap_err().to_string();
            assert!(error.starts_with("t.csv"), "{error}");
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }
}
